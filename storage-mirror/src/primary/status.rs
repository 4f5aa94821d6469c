//! What `twinrun disk status` shows of one mirrored disk of a running primary.

use serde::{Deserialize, Serialize};

use super::disk::PrimaryDisk;
use crate::meta::{ResyncProgress, VerifyReport};

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskStatus {
    pub path: String,
    /// "degraded" (no standby in sync: written blocks recorded), "syncing" (a resync
    /// is copying to the standby), "protected" (in sync, epochs commit on the standby).
    pub mode: String,
    /// The local replica failed: guest I/O goes to the standby.
    pub failed: bool,
    pub current_gen: u64,
    pub bitmap_base_gen: u64,
    /// Blocks marked in the persistent bitmap (still to copy to the standby).
    pub dirty_blocks: u64,
    pub blocks: u64,
    pub block_size: u32,
    /// Of the running or last resync.
    pub resync: Option<ResyncProgress>,
    /// Of the running verify: (ranges compared, ranges in total).
    pub verify_running: Option<(u64, u64)>,
    /// Of the last finished verify.
    pub verify: Option<VerifyReport>,
}

impl DiskStatus {
    pub fn of(d: &PrimaryDisk) -> DiskStatus {
        DiskStatus {
            path: d.path.display().to_string(),
            mode: d.mode().name().into(),
            failed: d.meta.failed,
            current_gen: d.meta.current_gen,
            bitmap_base_gen: d.meta.bitmap_base_gen,
            dirty_blocks: d.bitmap.count(),
            blocks: d.bitmap.blocks(),
            block_size: d.meta.block_size,
            resync: d.meta.resync,
            verify_running: d.verify_progress,
            verify: d.meta.verify,
        }
    }
}
