//! Finding the built test guest when `--guest` is not given.

use std::path::{Path, PathBuf};

/// File name of the test-guest ELF.
pub const GUEST_NAME: &str = "twinrun-guest";
/// Where `cargo build --release` in `guest/` puts it, relative to the repo root.
pub const GUEST_IN_REPO: &str = "guest/target/x86_64-unknown-linux-gnu/release/twinrun-guest";

/// The places the default guest is looked for, in order: `$TWINRUN_GUEST`, next to the
/// running binary, `guest/target/...` under each ancestor of the binary's directory and
/// of the current directory, and under the repo this binary was built from.
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
    out.push(Path::new(env!("CARGO_MANIFEST_DIR")).join(GUEST_IN_REPO));
    let mut seen = std::collections::HashSet::new();
    out.retain(|p| seen.insert(p.clone()));
    out
}

/// The first candidate that is a file, or every place looked at.
pub fn find_default_guest() -> Result<PathBuf, Vec<PathBuf>> {
    let c = candidates();
    c.iter().find(|p| p.is_file()).cloned().ok_or(c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn candidates_include_repo_build_output() {
        let c = candidates();
        let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join(GUEST_IN_REPO);
        assert!(c.contains(&repo));
        let unique: std::collections::HashSet<_> = c.iter().collect();
        assert_eq!(unique.len(), c.len());
    }
}
