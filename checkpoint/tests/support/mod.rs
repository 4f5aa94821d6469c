//! Shared by the checkpoint integration tests: the test guest (`twinrun_lab::guest`,
//! built once per test process), unique temp paths and their cleanup.
#![allow(dead_code)] // each test binary uses a different part

use std::path::PathBuf;

/// The test guest; panics with cargo's output when it cannot be built.
pub fn guest_elf() -> PathBuf {
    twinrun_lab::guest::guest_elf().unwrap_or_else(|e| panic!("{e}"))
}

/// Removes the test's files even when an assertion fails.
pub struct Cleanup(pub Vec<PathBuf>);

impl Drop for Cleanup {
    fn drop(&mut self) {
        for f in &self.0 {
            let _ = std::fs::remove_file(f);
        }
    }
}

/// A temp path unique to this test process: `twinrun-<test>-<pid>-<tag>`.
pub fn temp(test: &str, tag: &str) -> PathBuf {
    std::env::temp_dir().join(format!("twinrun-{test}-{}-{tag}", std::process::id()))
}
