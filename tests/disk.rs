//! Disk records written by one boot survive into the next boot on the same image; the
//! image is also checked on the host against the record format.
mod common;

use std::path::Path;
use std::time::Duration;

use common::{disk_image, require_kvm, VmRun};
use twinrun_guest_abi::{fnv1a64, DISK_FIRST_SECTOR, DISK_RECORD_MAGIC};

fn w_seqs(lines: &[String]) -> Vec<u64> {
    lines
        .iter()
        .filter_map(|l| l.strip_prefix("W "))
        .map(|s| s.parse().expect("W <seq>"))
        .collect()
}

/// Counts the valid, contiguous records on the image, checking each one's checksum.
fn records_on_image(path: &Path) -> u64 {
    let img = std::fs::read(path).unwrap();
    let mut n = 0;
    loop {
        let off = ((DISK_FIRST_SECTOR + n) * 512) as usize;
        let Some(sector) = img.get(off..off + 512) else {
            return n;
        };
        let word = |i: usize| u64::from_le_bytes(sector[i * 8..i * 8 + 8].try_into().unwrap());
        if word(0) != DISK_RECORD_MAGIC || word(1) != n + 1 {
            return n;
        }
        let mut zeroed = sector.to_vec();
        zeroed[16..24].fill(0);
        assert_eq!(fnv1a64(&zeroed), word(2), "record {} checksum", n + 1);
        n += 1;
    }
}

#[test]
fn disk_records_survive_restart() {
    require_kvm();
    let dir = tempfile::tempdir().unwrap();
    let img = disk_image(dir.path(), "disk.img", 4);
    let disk = img.display().to_string();
    let common = ["--mem-mib", "64", "--workload", "disk", "--disk-rate", "0"];

    // First boot on the default (io_uring) engine.
    let r = VmRun::new(dir.path(), "boot1")
        .args(common)
        .args(["--disk-limit", "50", "--disk", &disk])
        .run(Duration::from_secs(120));
    r.expect_code(0);
    assert!(
        r.lines
            .iter()
            .any(|l| l == "DISK recovered=0 corrupt=0 next=1"),
        "{:?}",
        &r.lines[..r.lines.len().min(5)]
    );
    assert_eq!(w_seqs(&r.lines), (1..=50).collect::<Vec<_>>());
    assert_eq!(
        records_on_image(&img),
        50,
        "records durable on the host image"
    );

    // Second boot, same image, the synchronous engine.
    let r = VmRun::new(dir.path(), "boot2")
        .args(common)
        .args([
            "--disk-limit",
            "30",
            "--disk",
            &format!("{disk},engine=sync"),
        ])
        .run(Duration::from_secs(120));
    r.expect_code(0);
    assert!(
        r.lines
            .iter()
            .any(|l| l == "DISK recovered=50 corrupt=0 next=51"),
        "{:?}",
        &r.lines[..r.lines.len().min(5)]
    );
    assert_eq!(w_seqs(&r.lines), (51..=80).collect::<Vec<_>>());
    assert!(!r.lines.iter().any(|l| l.starts_with("DISK-ERROR")));
    assert_eq!(records_on_image(&img), 80);
}

#[test]
fn read_only_disk_cannot_run_the_disk_workload() {
    let dir = tempfile::tempdir().unwrap();
    let img = disk_image(dir.path(), "ro.img", 1);
    let r = VmRun::new(dir.path(), "ro")
        .args([
            "--workload",
            "disk",
            "--disk",
            &format!("{},ro", img.display()),
        ])
        .run(Duration::from_secs(30));
    r.expect_code(2);
    assert!(r.stderr.contains("read-only"), "{}", r.stderr);
}
