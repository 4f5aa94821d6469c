//! Finding (and building) what the benchmarks run: the `twinrun` binary, the test
//! guest ELF and the host build of the guest's kv engine (`kv_host`).

use std::path::{Path, PathBuf};
use std::process::Command;

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

fn cargo() -> Command {
    Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
}

fn run_cargo(mut c: Command, what: &str) -> Result<(), String> {
    let out = c
        .output()
        .map_err(|e| format!("cannot run cargo to build {what}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "building {what} failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// `twinrun`, release build, next to this binary (same cargo target dir); built here
/// (a no-op when up to date) so the figures are for the current source.
pub fn twinrun_bin() -> Result<PathBuf, String> {
    let mut c = cargo();
    c.args(["build", "--release", "-p", "twinrun", "--bin", "twinrun"])
        .current_dir(repo_root());
    run_cargo(c, "twinrun")?;
    let exe = std::env::current_exe().map_err(|e| format!("current_exe: {e}"))?;
    let p = exe
        .parent()
        .ok_or("current_exe has no directory")?
        .join("twinrun");
    if p.is_file() {
        Ok(p)
    } else {
        Err(format!("built twinrun not found at {}", p.display()))
    }
}

fn guest_dir() -> PathBuf {
    repo_root().join("guest")
}

fn guest_cargo(args: &[&str]) -> Command {
    let dir = guest_dir();
    let mut c = cargo();
    c.args(args)
        .current_dir(&dir)
        .env("CARGO_TARGET_DIR", dir.join("target"))
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS");
    c
}

/// The test guest ELF (`$TWINRUN_GUEST`, or built in `guest/`).
pub fn guest_elf() -> Result<PathBuf, String> {
    if let Some(p) = std::env::var_os("TWINRUN_GUEST") {
        return Ok(PathBuf::from(p));
    }
    run_cargo(guest_cargo(&["build", "--release"]), "the test guest")?;
    Ok(guest_dir().join("target/x86_64-unknown-linux-gnu/release/twinrun-guest"))
}

/// The guest's kv engine served on host TCP (`guest/examples/kv_host.rs`).
pub fn kv_host_bin() -> Result<PathBuf, String> {
    run_cargo(
        guest_cargo(&["build", "--release", "--example", "kv_host"]),
        "kv_host",
    )?;
    Ok(guest_dir().join("target/x86_64-unknown-linux-gnu/release/examples/kv_host"))
}

/// A scratch directory removed on drop, on the filesystem of `base`.
pub struct ScratchDir(pub PathBuf);

impl ScratchDir {
    pub fn new(base: &Path) -> Result<ScratchDir, String> {
        let p = base.join(format!("twinrun-bench-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).map_err(|e| format!("mkdir {}: {e}", p.display()))?;
        Ok(ScratchDir(p))
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// True if `program` is on PATH.
pub fn have(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|d| d.join(program).is_file()))
}
