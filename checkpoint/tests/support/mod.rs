//! Shared by the checkpoint integration tests: the test guest (built once per test
//! process, the way the vmm tests build it), unique temp paths and their cleanup.
#![allow(dead_code)] // each test binary uses a different part

use std::path::PathBuf;

#[path = "../../../vmm/tests/support/guest.rs"]
mod vmm_support;
pub use vmm_support::guest_elf;

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
