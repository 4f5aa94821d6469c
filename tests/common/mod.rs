//! Shared harness of the integration tests: `twinrun vm run` (and `snapshot restore`)
//! as child processes with a console file ([`vm`]), one end of an FT pair and what its
//! control socket reports ([`pair`]), and the per-process run/state directories. The
//! namespaces, processes, guest, clients and checks come from `twinrun_lab`.
#![allow(dead_code, unused_imports)] // each test binary uses a different part of the harness

pub mod pair;
pub mod quorum;
pub mod vm;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

pub use twinrun_lab::console::ConsoleLog;
pub use twinrun_lab::{unique_prefix, NetNs, Topology};
pub use vm::{VmProcess, VmRun};

/// One run/state directory for this test process (`$TWINRUN_RUN_DIR` for control
/// sockets, `$TWINRUN_STATE_DIR` for snapshots and block devices' replica metadata),
/// set in the environment before any VMM is spawned so that children inherit it; tests
/// in one process use distinct VM names.
pub fn private_dirs() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    let d = DIR.get_or_init(|| {
        // Kept past the test's end (the TempDir guard would remove it when the first
        // test using it returns), removed when the test process exits.
        let p = tempfile::tempdir().unwrap().keep();
        // SAFETY: registers a plain function; it only reads a static set before it.
        unsafe { libc::atexit(remove_private_dirs) };
        p
    });
    std::env::set_var("TWINRUN_RUN_DIR", d.join("run"));
    std::env::set_var("TWINRUN_STATE_DIR", d.join("state"));
    PRIVATE.get_or_init(|| d.clone());
    d
}

static PRIVATE: OnceLock<PathBuf> = OnceLock::new();

extern "C" fn remove_private_dirs() {
    if let Some(p) = PRIVATE.get() {
        let _ = std::fs::remove_dir_all(p);
    }
}

/// The `twinrun` binary cargo built for these tests.
pub fn twinrun_bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_twinrun"))
}

/// The test guest (`$TWINRUN_GUEST`, or built once per test process); panics with
/// cargo's output when the build fails.
pub fn guest_elf() -> PathBuf {
    twinrun_lab::guest::guest_elf().unwrap_or_else(|e| panic!("{e}"))
}

/// A topology with a unique prefix; panics (with `ip`'s message) if it cannot be made.
pub fn topology(b: twinrun_lab::topology::Builder) -> Topology {
    b.build()
        .unwrap_or_else(|e| panic!("building the test network: {e}"))
}

/// Panics with an install hint when `tool` is not on PATH.
pub fn require_tool(tool: &str, package: &str) {
    assert!(
        twinrun_lab::have(tool),
        "`{tool}` is not installed: install Debian's `{package}` \
         (scripts/install-deps.sh does, and scripts/test.sh runs it)"
    );
}

/// Fails clearly when KVM is not usable here.
pub fn require_kvm() {
    assert!(
        Path::new("/dev/kvm").exists(),
        "/dev/kvm is missing: these tests boot real VMs"
    );
}

/// A finished command's status and output, for failure messages.
pub fn output_text(o: &std::process::Output) -> String {
    format!(
        "status {}; stdout {:?}; stderr {:?}",
        o.status,
        String::from_utf8_lossy(&o.stdout).trim(),
        String::from_utf8_lossy(&o.stderr).trim()
    )
}

/// A sparse raw disk image of `mib` MiB in `dir`.
pub fn disk_image(dir: &Path, name: &str, mib: u64) -> PathBuf {
    let path = dir.join(name);
    let f = std::fs::File::create(&path).expect("create disk image");
    f.set_len(mib << 20).expect("size disk image");
    path
}
