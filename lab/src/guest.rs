//! The test guest (`guest/`): the one place that finds it, and builds it when a test
//! or benchmark needs it.
//!
//! `$TWINRUN_GUEST` names a built guest ELF and wins everywhere. Otherwise
//! [`guest_elf`] builds it (once per process; cargo's lock on `guest/target`
//! serialises parallel test processes) and [`find_built`] looks for an existing build
//! without building (what `twinrun vm run` does without `--guest`).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use crate::LabError;

/// File name of the test-guest ELF.
pub const GUEST_NAME: &str = "twinrun-guest";
/// Where `cargo build --release` in `guest/` puts it, relative to the repo root.
pub const GUEST_IN_REPO: &str = "guest/target/x86_64-unknown-linux-gnu/release/twinrun-guest";
/// Where the host build of the guest's kv engine (`guest/examples/kv_host.rs`) goes.
pub const KV_HOST_IN_REPO: &str = "guest/target/x86_64-unknown-linux-gnu/release/examples/kv_host";

/// The repository this crate was built from.
pub fn repo_root() -> PathBuf {
    let lab = Path::new(env!("CARGO_MANIFEST_DIR"));
    lab.parent().unwrap_or(lab).to_path_buf()
}

/// The places a built guest is looked for, in order: `$TWINRUN_GUEST`, next to the
/// running binary, `guest/target/...` under each ancestor of the binary's directory and
/// of the current directory, and under the repo this crate was built from.
pub fn candidates() -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Some(p) = std::env::var_os("TWINRUN_GUEST") {
        out.push(PathBuf::from(p));
    }
    let exe_dir = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(Path::to_path_buf));
    if let Some(dir) = &exe_dir {
        out.push(dir.join(GUEST_NAME));
    }
    let roots = exe_dir
        .iter()
        .cloned()
        .chain(std::env::current_dir().ok())
        .collect::<Vec<_>>();
    for root in &roots {
        for anc in root.ancestors() {
            out.push(anc.join(GUEST_IN_REPO));
        }
    }
    out.push(repo_root().join(GUEST_IN_REPO));
    let mut seen = std::collections::HashSet::new();
    out.retain(|p| seen.insert(p.clone()));
    out
}

/// The first of [`candidates`] that is a file, or every place looked at.
pub fn find_built() -> Result<PathBuf, Vec<PathBuf>> {
    let c = candidates();
    c.iter().find(|p| p.is_file()).cloned().ok_or(c)
}

/// `cargo <args>` in `guest/`, with the guest's own target dir and none of the outer
/// build's flags.
fn guest_cargo(args: &[&str]) -> Command {
    let dir = repo_root().join("guest");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut c = Command::new(cargo);
    c.args(args)
        .current_dir(&dir)
        .env("CARGO_TARGET_DIR", dir.join("target"))
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("CARGO_BUILD_TARGET");
    c
}

fn run_cargo(mut c: Command, what: &str, output: PathBuf) -> Result<PathBuf, LabError> {
    let out = c
        .output()
        .map_err(LabError::io(format!("cannot run cargo to build {what}")))?;
    if !out.status.success() {
        return Err(LabError::Build(format!(
            "building {what} failed ({}):\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    if !output.is_file() {
        return Err(LabError::Build(format!(
            "{what} built but {} is missing",
            output.display()
        )));
    }
    Ok(output)
}

/// The test guest ELF: `$TWINRUN_GUEST`, or built in `guest/` (once per process, a
/// no-op when up to date, so the guest is the current source's).
pub fn guest_elf() -> Result<PathBuf, LabError> {
    static ELF: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    ELF.get_or_init(|| {
        if let Some(p) = std::env::var_os("TWINRUN_GUEST") {
            return Ok(PathBuf::from(p));
        }
        run_cargo(
            guest_cargo(&["build", "--release"]),
            "the test guest",
            repo_root().join(GUEST_IN_REPO),
        )
        .map_err(|e| e.to_string())
    })
    .clone()
    .map_err(LabError::Build)
}

/// The guest's kv engine built for the host (`guest/examples/kv_host.rs`), to serve
/// on host TCP as the baseline of the kv figures.
pub fn kv_host_bin() -> Result<PathBuf, LabError> {
    run_cargo(
        guest_cargo(&["build", "--release", "--example", "kv_host"]),
        "kv_host",
        repo_root().join(KV_HOST_IN_REPO),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn candidates_include_repo_build_output() {
        let c = candidates();
        assert!(c.contains(&repo_root().join(GUEST_IN_REPO)));
        let unique: std::collections::HashSet<_> = c.iter().collect();
        assert_eq!(unique.len(), c.len());
        assert!(repo_root().join("guest/Cargo.toml").is_file());
    }
}
