//! Finding (and building) what the benchmarks run: the `twinrun` binary here; the test
//! guest and the host build of its kv engine come from `twinrun_lab::guest`.

use std::path::{Path, PathBuf};
use std::process::Command;

pub use twinrun_lab::have;

/// The test guest ELF (`$TWINRUN_GUEST`, or built in `guest/`).
pub fn guest_elf() -> Result<PathBuf, String> {
    twinrun_lab::guest::guest_elf().map_err(|e| e.to_string())
}

/// The guest's kv engine served on host TCP (`guest/examples/kv_host.rs`).
pub fn kv_host_bin() -> Result<PathBuf, String> {
    twinrun_lab::guest::kv_host_bin().map_err(|e| e.to_string())
}

/// `twinrun`, release build, next to this binary (same cargo target dir); built here
/// (a no-op when up to date) so the figures are for the current source.
/// `TWINRUN_BENCH_TWINRUN=PATH`: that binary instead, not built (a before/after
/// comparison in one session: a copy of the binary built before a change).
pub fn twinrun_bin() -> Result<PathBuf, String> {
    if let Some(p) = std::env::var_os("TWINRUN_BENCH_TWINRUN") {
        let p = PathBuf::from(p);
        return if p.is_file() {
            Ok(p)
        } else {
            Err(format!("TWINRUN_BENCH_TWINRUN: no file {}", p.display()))
        };
    }
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let out = Command::new(cargo)
        .args(["build", "--release", "-p", "twinrun", "--bin", "twinrun"])
        .current_dir(twinrun_lab::guest::repo_root())
        .output()
        .map_err(|e| format!("cannot run cargo to build twinrun: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "building twinrun failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
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
