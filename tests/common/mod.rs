//! Shared harness of the integration tests: builds the test guest, runs `twinrun vm run`
//! as a child process with a console file, reads console lines with timeouts, and owns
//! network namespaces / TAP / veth plumbing through RAII guards that clean up on drop,
//! also when a test panics.
#![allow(dead_code, unused_imports)] // each test binary uses a different part of the harness

pub mod console;
pub mod net;
pub mod vm;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;

pub use console::ConsoleLog;
pub use net::{KvNet, NetNs};
pub use vm::{VmProcess, VmRun};

/// Root of the repository (the root package's manifest dir).
pub fn repo_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// One run/state directory for this test process (`$TWINRUN_RUN_DIR` for control
/// sockets, `$TWINRUN_STATE_DIR` for snapshots), set in the environment before any VMM
/// is spawned so that children inherit it; tests in one process use distinct VM names.
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

/// Builds the test guest (once per test process; cargo's lock on `guest/target`
/// serialises parallel test processes) and returns its ELF. `$TWINRUN_GUEST` skips the
/// build. Panics with cargo's output when the build fails.
pub fn guest_elf() -> PathBuf {
    static ELF: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    ELF.get_or_init(build_guest)
        .clone()
        .unwrap_or_else(|e| panic!("{e}"))
}

fn build_guest() -> Result<PathBuf, String> {
    if let Some(p) = std::env::var_os("TWINRUN_GUEST") {
        return Ok(PathBuf::from(p));
    }
    let guest_dir = repo_root().join("guest");
    let target = guest_dir.join("target");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let out = Command::new(cargo)
        .args(["build", "--release"])
        .current_dir(&guest_dir)
        // The guest has its own target dir and flags; nothing of the outer build leaks.
        .env("CARGO_TARGET_DIR", &target)
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("CARGO_BUILD_TARGET")
        .output()
        .map_err(|e| format!("cannot run cargo to build the guest: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "building the test guest failed ({}):\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let elf = repo_root().join("guest/target/x86_64-unknown-linux-gnu/release/twinrun-guest");
    if !elf.is_file() {
        return Err(format!("guest built but {} is missing", elf.display()));
    }
    Ok(elf)
}

/// A name prefix unique among concurrently running tests: `tw<pid%10000><n>`. Short
/// enough that a 3-byte suffix keeps interface names within 15 bytes.
pub fn unique_prefix() -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "tw{}{}",
        std::process::id() % 10000,
        N.fetch_add(1, Ordering::Relaxed) % 100
    )
}

/// Panics with an install hint when `tool` is not on PATH.
pub fn require_tool(tool: &str, package: &str) {
    let found = std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|d| d.join(tool).is_file()))
        .unwrap_or(false);
    assert!(
        found,
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

/// A sparse raw disk image of `mib` MiB in `dir`.
pub fn disk_image(dir: &Path, name: &str, mib: u64) -> PathBuf {
    let path = dir.join(name);
    let f = std::fs::File::create(&path).expect("create disk image");
    f.set_len(mib << 20).expect("size disk image");
    path
}
