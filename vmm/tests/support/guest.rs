//! Shared support for the integration tests that run the real test guest (guest/):
//! building it once, the temporary console/disk files it writes, base configs and the
//! checks and waits on its console lines.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use vmm::config::{ConsoleConfig, DiskConfig, IoEngine, Payload, VmConfig, Workloads};
use vmm::Vmm;

pub use twinrun_lab::console::count_prefix;

/// The test guest (`$TWINRUN_GUEST`, or built once per test process by
/// `twinrun_lab::guest`); panics with cargo's output when the build fails.
pub fn guest_elf() -> PathBuf {
    twinrun_lab::guest::guest_elf().unwrap_or_else(|e| panic!("{e}"))
}

/// A temporary file (console log, disk image) unique to this process and `tag`,
/// removed on drop, also when the test fails.
pub struct TempFile(PathBuf);

impl TempFile {
    /// Also removes a stale file of the same name: the console sink appends, so old
    /// output would otherwise count as this run's.
    pub fn new(tag: &str) -> TempFile {
        let p = std::env::temp_dir().join(format!("twinrun-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_file(&p);
        TempFile(p)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    /// The contents, empty while the file does not exist.
    pub fn bytes(&self) -> Vec<u8> {
        std::fs::read(&self.0).unwrap_or_default()
    }

    /// The contents as text, empty while the file does not exist.
    pub fn text(&self) -> String {
        std::fs::read_to_string(&self.0).unwrap_or_default()
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A directory for one test's files, unique to this process and `tag` (a stale one of
/// the same name emptied first), removed on drop, also when the test fails.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!("twinrun-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// One vCPU, 64 MiB, the test guest with `workloads`, console to the file `console`,
/// no disk and no NIC; tests add what they need.
pub fn guest_config(workloads: Workloads, console: &Path) -> VmConfig {
    VmConfig {
        mem_mib: 64,
        vcpus: 1,
        payload: Payload::TestGuest {
            elf: guest_elf(),
            workloads,
        },
        disks: vec![],
        nets: vec![],
        console: ConsoleConfig::File {
            path: console.to_owned(),
        },
    }
}

/// [`guest_config`] with only the counter workload: `rate` lines/s (0: as fast as it
/// can), `limit` lines (0: no end).
pub fn counter_config(console: &Path, rate: u32, limit: u64) -> VmConfig {
    guest_config(
        Workloads {
            counter: true,
            counter_rate: rate,
            counter_limit: limit,
            ..Workloads::default()
        },
        console,
    )
}

/// A writable disk on the raw image `path`, served by io_uring.
pub fn disk(path: &Path) -> DiskConfig {
    DiskConfig {
        path: path.to_owned(),
        read_only: false,
        io_engine: IoEngine::IoUring,
        serial: None,
    }
}

/// Creates (or truncates) the raw image `path` as `len` bytes of zeros.
pub fn create_image(path: &Path, len: u64) {
    std::fs::File::create(path)
        .and_then(|f| f.set_len(len))
        .unwrap();
}

/// Waits until the console file `log` holds `n` lines starting with `prefix`,
/// failing if the guest ends first or it takes longer than `limit`. `what` names the
/// step in the failure message.
pub fn wait_for_lines(
    vm: &mut Vmm,
    log: &Path,
    prefix: &str,
    n: usize,
    limit: Duration,
    what: &str,
) {
    let read = || std::fs::read_to_string(log).unwrap_or_default();
    let t0 = Instant::now();
    while count_prefix(&read(), prefix) < n {
        assert!(
            vm.wait_timeout(Duration::from_millis(5)).is_none(),
            "{what}: guest ended before {n} {prefix:?} lines:\n{}",
            read()
        );
        assert!(t0.elapsed() < limit, "{what}: guest too slow");
    }
}

/// Checks counter-workload console output: the BOOT line, then `C 1..` without gap or
/// duplicate, then (if `done`) DONE and nothing after it, ending with a whole line.
/// Returns the last counter value.
pub fn check_counter_lines(text: &str, done: bool) -> u64 {
    let mut lines = text.lines();
    let boot = lines.next().unwrap_or_default();
    assert!(
        boot.starts_with("BOOT workloads=counter tsc_khz="),
        "first line {boot:?}\n{text}"
    );
    let mut next = 1;
    let mut saw_done = false;
    for l in lines {
        assert!(!saw_done, "output after DONE:\n{text}");
        if let Some(n) = l.strip_prefix("C ") {
            assert_eq!(n.parse::<u64>().unwrap(), next, "gap or duplicate:\n{text}");
            next += 1;
        } else {
            assert_eq!(l, "DONE", "unexpected line in:\n{text}");
            saw_done = true;
        }
    }
    assert_eq!(saw_done, done, "{text}");
    assert!(text.ends_with('\n'), "output ends mid-line:\n{text}");
    next - 1
}
