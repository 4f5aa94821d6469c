//! Snapshots of a VM, the everRun way: generation 1 (or the first one a VM process
//! takes) holds all memory and whole disk images; every later one holds only the pages
//! and 4 KiB disk blocks written since the previous one. At most [`MAX_GENERATIONS`]
//! per VM; taking one more folds the oldest into the next.
//!
//! Layout: `$TWINRUN_STATE_DIR/<vm>/snapshots/gen-<NNNNNNNN>/` holding `manifest.bin`
//! ([`format::Manifest`], framed and checksummed), `state.bin` (`vmm::VmState` bytes),
//! `memory.runs` (page runs) and `disk-<i>.img` (full) or `disk-<i>.runs` (changed
//! blocks). Every part's length and CRC-32C is in the manifest. A generation appears
//! by renaming its finished, fsynced `.tmp` directory.
//!
//! - [`take`]: the pause-copy-resume of a running VM, then writing the files.
//! - [`store`]: listing, reading, deleting and folding generations.
//! - [`rebuild`]: memory, state and disks of a generation from its chain.
//! - [`export`]: one portable file per generation, and importing it.
//! - [`paths`]: where per-VM files live (the state directory of snapshots, the run
//!   directory of control sockets) and which VM names are valid.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod export;
pub mod format;
pub mod paths;
pub mod rebuild;
pub mod store;
pub mod take;

use std::path::{Path, PathBuf};

/// Generations kept per VM.
pub const MAX_GENERATIONS: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum SnapError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// A snapshot or export file is damaged, truncated or not ours.
    #[error("{0}")]
    Corrupt(String),
    /// The request cannot be done (no such generation, disk in use, ...).
    #[error("{0}")]
    Invalid(String),
    /// The VMM failed (pause, capture, harvest, restore).
    #[error("{0}")]
    Vm(String),
}

impl SnapError {
    pub fn io(path: &Path, source: std::io::Error) -> SnapError {
        SnapError::Io {
            path: path.to_path_buf(),
            source,
        }
    }

    /// Bad input (damaged files included), as opposed to a failure of this machine.
    pub fn is_bad_input(&self) -> bool {
        matches!(self, SnapError::Corrupt(_) | SnapError::Invalid(_))
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A random u64 (for snapshot ids), from the kernel.
pub fn random_u64() -> u64 {
    let mut b = [0u8; 8];
    // SAFETY: getrandom writes at most `b.len()` bytes into the buffer we own.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    if n != 8 {
        // Unique enough for telling snapshots of one VM apart.
        return now_ms() ^ (u64::from(std::process::id()) << 40);
    }
    u64::from_le_bytes(b)
}

/// fsyncs a directory (after creating or renaming entries in it).
pub fn sync_dir(dir: &Path) -> Result<(), SnapError> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| SnapError::io(dir, e))
}
