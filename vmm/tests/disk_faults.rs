//! Disk faults with the real test guest's `disk` workload: a disk that fails mid-run is
//! invisible to the guest when hooks serve its I/O from a second copy of the image, and
//! an I/O error (`DISK-ERROR`) for it without hooks. A VM whose local disk failed
//! before boot recovers its records through the hooks' reads.

mod support;
use support::guest;

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use guest::{create_image, disk, guest_config, wait_for_lines};
use twinrun_guest_abi::{DISK_FIRST_SECTOR, DISK_RECORD_MAGIC};
use vmm::config::{VmConfig, Workloads};
use vmm::devices::virtio::block::DiskHooks;
use vmm::{build_vm, VmExit};

const IMAGE_BYTES: u64 = 4 << 20;
const SECTOR: u64 = 512;

/// Hooks serving a failed local disk from a second image file.
struct CopyFile {
    copy: File,
    reads: AtomicU64,
    writes: AtomicU64,
    flushes: AtomicU64,
}

impl CopyFile {
    fn open(path: &Path) -> CopyFile {
        CopyFile {
            copy: OpenOptions::new()
                .read(true)
                .write(true)
                .open(path)
                .unwrap(),
            reads: AtomicU64::new(0),
            writes: AtomicU64::new(0),
            flushes: AtomicU64::new(0),
        }
    }
}

impl DiskHooks for CopyFile {
    fn before_writes(&self, _disk: usize, _ranges: &[(u64, u64)]) -> std::io::Result<()> {
        Ok(())
    }
    fn read_failed(
        &self,
        disk: usize,
        offset: u64,
        buf: &mut [u8],
        _err: &std::io::Error,
    ) -> std::io::Result<()> {
        assert_eq!(disk, 0);
        self.reads.fetch_add(1, Ordering::Relaxed);
        self.copy.read_exact_at(buf, offset)
    }
    fn write_failed(
        &self,
        disk: usize,
        offset: u64,
        data: &[u8],
        _err: &std::io::Error,
    ) -> std::io::Result<()> {
        assert_eq!(disk, 0);
        self.writes.fetch_add(1, Ordering::Relaxed);
        self.copy.write_all_at(data, offset)
    }
    fn flush_failed(&self, _disk: usize, _err: &std::io::Error) -> std::io::Result<()> {
        self.flushes.fetch_add(1, Ordering::Relaxed);
        self.copy.sync_data()
    }
}

fn config(dir: &Path, image: &str, limit: u64) -> VmConfig {
    let workloads = Workloads {
        disk: true,
        disk_rate: 400,
        disk_limit: limit,
        ..Workloads::default()
    };
    VmConfig {
        disks: vec![disk(&dir.join(image))],
        ..guest_config(workloads, &dir.join(format!("{image}.console")))
    }
}

/// Sequence numbers of the `W` lines, checked contiguous from 1; no `DISK-ERROR`.
fn check_records(text: &str) -> u64 {
    assert!(
        !text.contains("DISK-ERROR"),
        "guest saw a disk error:\n{text}"
    );
    assert!(!text.contains("PANIC"), "{text}");
    let mut next = 1;
    for l in text.lines() {
        if let Some(n) = l.strip_prefix("W ") {
            assert_eq!(n.parse::<u64>().unwrap(), next, "W gap:\n{text}");
            next += 1;
        }
    }
    next - 1
}

/// Whether the image holds record `seq` (its magic at the record's sector).
fn has_record(image: &Path, seq: u64) -> bool {
    let f = File::open(image).unwrap();
    let mut magic = [0u8; 8];
    f.read_exact_at(&mut magic, (DISK_FIRST_SECTOR + seq - 1) * SECTOR)
        .unwrap();
    u64::from_le_bytes(magic) == DISK_RECORD_MAGIC
}

#[test]
fn failed_disk_is_served_by_hooks_then_read_back_through_them() {
    const LIMIT: u64 = 600;
    let dir = guest::TempDir::new("diskfaults-served");
    let local = dir.0.join("local.img");
    let copy = dir.0.join("copy.img");
    create_image(&local, IMAGE_BYTES);
    let cfg = config(&dir.0, "local.img", LIMIT);
    let console = dir.0.join("local.img.console");

    let mut vm = build_vm(&cfg).unwrap();
    vm.start().unwrap();
    wait_for_lines(
        &mut vm,
        &console,
        "W ",
        50,
        Duration::from_secs(30),
        "before the fault",
    );
    // Paused, the local image is complete (requests finish within their notify):
    // the copy taken now is in sync, and the hooks keep it so from here.
    vm.pause().unwrap();
    std::fs::copy(&local, &copy).unwrap();
    let hooks = Arc::new(CopyFile::open(&copy));
    vm.set_disk_hooks(Some(hooks.clone()));
    let faults = vm.disk_faults(0).expect("disk 0 has fault injection");
    assert!(vm.disk_faults(1).is_none());
    faults.fail_disk();
    let at_fault = check_records(&std::fs::read_to_string(&console).unwrap());
    vm.resume().unwrap();

    let exit = vm
        .wait_timeout(Duration::from_secs(60))
        .expect("guest ends");
    let text = std::fs::read_to_string(&console).unwrap();
    assert_eq!(exit, VmExit::GuestExit { status: 0 }, "{exit}\n{text}");
    assert!(text.contains("DONE"), "{text}");
    assert_eq!(check_records(&text), LIMIT, "{text}");
    assert!(at_fault < LIMIT);
    // Everything after the fault went to the copy, nothing to the failed image.
    assert!(hooks.writes.load(Ordering::Relaxed) > 0);
    assert!(hooks.flushes.load(Ordering::Relaxed) > 0);
    assert!(faults.injected() > 0);
    assert!((1..=LIMIT).all(|s| has_record(&copy, s)));
    assert!(has_record(&local, at_fault));
    assert!(!has_record(&local, LIMIT));
    drop(vm);

    // Boot again on the stale local image, failed from the start: the guest's
    // recovery scan reads through the hooks and finds every record of the copy.
    let cfg = config(&dir.0, "local.img", LIMIT + 20);
    let console = dir.0.join("local.img.console");
    std::fs::remove_file(&console).unwrap();
    let mut vm = build_vm(&cfg).unwrap();
    let hooks = Arc::new(CopyFile::open(&copy));
    vm.set_disk_hooks(Some(hooks.clone()));
    vm.disk_faults(0).unwrap().fail_disk();
    vm.start().unwrap();
    let exit = vm
        .wait_timeout(Duration::from_secs(60))
        .expect("guest ends");
    let text = std::fs::read_to_string(&console).unwrap();
    assert_eq!(exit, VmExit::GuestExit { status: 0 }, "{exit}\n{text}");
    assert!(
        text.contains(&format!(
            "DISK recovered={LIMIT} corrupt=0 next={}",
            LIMIT + 1
        )),
        "{text}"
    );
    assert!(!text.contains("DISK-ERROR"), "{text}");
    assert!(hooks.reads.load(Ordering::Relaxed) > 0);
    assert!(has_record(&copy, LIMIT + 20));
    assert!(!has_record(&local, LIMIT + 1));
}

#[test]
fn failed_disk_without_hooks_is_an_io_error_for_the_guest() {
    let dir = guest::TempDir::new("diskfaults-unserved");
    create_image(&dir.0.join("disk.img"), IMAGE_BYTES);
    let cfg = config(&dir.0, "disk.img", 0);
    let console = dir.0.join("disk.img.console");
    let mut vm = build_vm(&cfg).unwrap();
    vm.start().unwrap();
    wait_for_lines(
        &mut vm,
        &console,
        "W ",
        20,
        Duration::from_secs(30),
        "before the fault",
    );
    let faults = vm.disk_faults(0).unwrap();
    faults.fail_disk();
    // The disk workload stops at its first error; with no other workload the guest
    // then reports DONE and exits.
    let exit = vm
        .wait_timeout(Duration::from_secs(30))
        .expect("guest ends");
    let text = std::fs::read_to_string(&console).unwrap();
    assert_eq!(exit, VmExit::GuestExit { status: 0 }, "{exit}\n{text}");
    let errors: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("DISK-ERROR"))
        .collect();
    assert_eq!(errors.len(), 1, "{text}");
    assert!(
        errors[0].starts_with("DISK-ERROR write ") || errors[0].starts_with("DISK-ERROR flush "),
        "{text}"
    );
    assert!(errors[0].ends_with(" status=1"), "IOERR expected:\n{text}");
    assert!(faults.injected() >= 1);
}
