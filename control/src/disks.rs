//! The replication state of mirrored disks as `twinrun disk` shows it, from either
//! source:
//!
//! - **live**: the running FT primary answers [`Op::DiskStatus`](super::Op) with its
//!   [`DiskStatus`] list ([`status`]) and starts an online verify on
//!   [`Op::DiskVerify`](super::Op) ([`verify`]);
//! - **offline**: the replica metadata and dirty bitmap beside an image, read without
//!   changing anything ([`offline`]), e.g. on a PM whose VM is stopped.
//!
//! Both become one [`DiskView`], so the text and the JSON of the CLI have one shape.

use std::path::Path;

use serde::{Deserialize, Serialize};
use storage_mirror::bitmap::DirtyBitmap;
use storage_mirror::meta::{MetaState, MetaStore, ReplicaMeta, ResyncProgress, VerifyReport};
use storage_mirror::primary::{DiskStatus, PrimaryDisks};

use super::Response;

/// The answer of a VM that is not an FT primary to the disk ops.
pub const NOT_MIRRORED: &str = "this VM does not mirror its disks (run it with --role)";
/// The answer to [`super::Op::DiskVerify`] while a verify is requested or running.
pub const VERIFY_RUNNING: &str = "a verify is already running";

/// [`super::Op::DiskStatus`] on the running primary.
pub fn status(disks: &PrimaryDisks) -> Response {
    Response::Disks {
        disks: disks.status(),
    }
}

/// [`super::Op::DiskVerify`] on the running primary: refused when there is nothing to
/// compare with (no disk, or no standby in sync: the verify runs only while protected,
/// a request made meanwhile would wait unseen) or a verify is already under way.
pub fn verify(disks: &PrimaryDisks) -> Response {
    let err = |message: String| Response::Error { message };
    let st = disks.status();
    if st.is_empty() {
        return err("the VM has no disks to verify".into());
    }
    if st.iter().any(|d| d.verify_running.is_some()) {
        return err(VERIFY_RUNNING.into());
    }
    let unprotected: Vec<String> = st
        .iter()
        .filter(|d| !d.failed && d.mode != "protected")
        .map(|d| format!("{} is {}", d.path, d.mode))
        .collect();
    if !unprotected.is_empty() || st.iter().all(|d| d.failed) {
        return err(format!(
            "no standby is in sync ({}): an online verify compares both replicas and runs \
             only while the VM is protected",
            if unprotected.is_empty() {
                "every local disk has failed".to_string()
            } else {
                unprotected.join(", ")
            }
        ));
    }
    if !disks.request_verify() {
        return err(VERIFY_RUNNING.into());
    }
    log::info!("online verify of {} disk(s) by control request", st.len());
    Response::Ok
}

/// A verify in progress: ranges compared so far of `total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerifyRunning {
    pub compared: u64,
    pub total: u64,
}

/// One disk's replication state, live or offline. Generation ids are 16 hex digits
/// (strings: JSON numbers lose the low bits of a 64-bit id in many readers).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskView {
    pub path: String,
    /// "live" (the running primary) or "offline" (the metadata files).
    pub source: String,
    /// Stable key: protected, syncing, degraded, in-sync, inconsistent, failed,
    /// no-metadata, damaged, replaced.
    pub kind: String,
    /// The state in words, e.g. "degraded (12 blocks to copy)".
    pub state: String,
    pub failed: bool,
    /// Offline only (the live primary is never a resync target).
    pub inconsistent: Option<bool>,
    /// Offline only: ran as primary or alone and did not shut down cleanly.
    pub unclean_primary: Option<bool>,
    pub current_gen: Option<String>,
    /// None when the bitmap records nothing since a shared generation (base 0).
    pub bitmap_base_gen: Option<String>,
    /// Offline, resync target: the source generation it copies from.
    pub sync_source_gen: Option<String>,
    pub history: Vec<String>,
    pub last_committed_epoch: Option<u64>,
    pub block_size: Option<u32>,
    pub blocks: Option<u64>,
    /// Blocks marked in the dirty bitmap (None: the bitmap could not be read).
    pub dirty_blocks: Option<u64>,
    pub dirty_bytes: Option<u64>,
    /// Why `dirty_blocks` is unknown.
    pub bitmap_problem: Option<String>,
    pub resync: Option<ResyncProgress>,
    pub verify_running: Option<VerifyRunning>,
    pub verify: Option<VerifyReport>,
}

pub fn hex_gen(g: u64) -> String {
    format!("{g:016x}")
}

fn nonzero_gen(g: u64) -> Option<String> {
    (g != 0).then(|| hex_gen(g))
}

fn blocks_to_copy(n: u64) -> String {
    format!("{n} block{} to copy", if n == 1 { "" } else { "s" })
}

impl DiskView {
    fn empty(path: &Path, kind: &'static str, state: String) -> DiskView {
        DiskView {
            path: path.display().to_string(),
            source: "offline".into(),
            kind: kind.into(),
            state,
            failed: false,
            inconsistent: None,
            unclean_primary: None,
            current_gen: None,
            bitmap_base_gen: None,
            sync_source_gen: None,
            history: Vec::new(),
            last_committed_epoch: None,
            block_size: None,
            blocks: None,
            dirty_blocks: None,
            dirty_bytes: None,
            bitmap_problem: None,
            resync: None,
            verify_running: None,
            verify: None,
        }
    }

    /// The view of a running primary's disk.
    pub fn live(s: &DiskStatus) -> DiskView {
        let (kind, state) = if s.failed {
            (
                "failed",
                "FAILED (guest I/O is served by the standby's replica; replace the disk)"
                    .to_string(),
            )
        } else {
            match s.mode.as_str() {
                "protected" => ("protected", "protected (in sync with the standby)".into()),
                "syncing" => (
                    "syncing",
                    format!(
                        "syncing to the standby ({})",
                        blocks_to_copy(s.dirty_blocks)
                    ),
                ),
                "degraded" => (
                    "degraded",
                    format!(
                        "degraded, no standby in sync ({})",
                        blocks_to_copy(s.dirty_blocks)
                    ),
                ),
                other => ("degraded", format!("unknown mode {other:?}")),
            }
        };
        DiskView {
            source: "live".into(),
            failed: s.failed,
            current_gen: nonzero_gen(s.current_gen),
            bitmap_base_gen: nonzero_gen(s.bitmap_base_gen),
            block_size: Some(s.block_size),
            blocks: Some(s.blocks),
            dirty_blocks: Some(s.dirty_blocks),
            dirty_bytes: Some(s.dirty_blocks.saturating_mul(u64::from(s.block_size))),
            resync: s.resync,
            verify_running: s
                .verify_running
                .map(|(compared, total)| VerifyRunning { compared, total }),
            verify: s.verify,
            ..DiskView::empty(Path::new(&s.path), kind, state)
        }
    }
}

/// The view of `image` from its metadata files. Reads only: a missing bitmap is not
/// created, nothing is saved. `Err` only for an I/O error reading the metadata (its
/// content being wrong is a state of the view).
pub fn offline(image: &Path) -> Result<DiskView, String> {
    let store = MetaStore::for_image(image);
    let meta = match store.load().map_err(|e| e.to_string())? {
        MetaState::Missing => {
            return Ok(DiskView::empty(
                image,
                "no-metadata",
                "no metadata (never mirrored: a standby gets a full copy)".into(),
            ))
        }
        MetaState::Damaged(why) => {
            return Ok(DiskView::empty(
                image,
                "damaged",
                format!("metadata damaged: {why} (a full copy is needed)"),
            ))
        }
        MetaState::Replaced { reason } => {
            return Ok(DiskView::empty(
                image,
                "replaced",
                format!("replaced: {reason} (a full copy is needed)"),
            ))
        }
        MetaState::Ok(m) => m,
    };
    let (dirty, bitmap_problem) = read_dirty(&store, &meta);
    let (kind, state) = offline_state(&meta, dirty, bitmap_problem.as_deref());
    Ok(DiskView {
        failed: meta.failed,
        inconsistent: Some(meta.inconsistent),
        unclean_primary: Some(meta.unclean_primary),
        current_gen: nonzero_gen(meta.current_gen),
        bitmap_base_gen: nonzero_gen(meta.bitmap_base_gen),
        sync_source_gen: nonzero_gen(meta.sync_source_gen),
        history: meta.history.iter().map(|&g| hex_gen(g)).collect(),
        last_committed_epoch: meta.last_committed_epoch,
        block_size: Some(meta.block_size),
        blocks: Some(meta.disk_size.div_ceil(u64::from(meta.block_size))),
        dirty_blocks: dirty,
        dirty_bytes: dirty.map(|d| d.saturating_mul(u64::from(meta.block_size))),
        bitmap_problem,
        resync: meta.resync,
        verify: meta.verify,
        ..DiskView::empty(image, kind, state)
    })
}

/// The bitmap's set bits, or why they are unknown. Opened only if it exists (opening
/// creates a missing one).
fn read_dirty(store: &MetaStore, meta: &ReplicaMeta) -> (Option<u64>, Option<String>) {
    let path = store.bitmap_path();
    if !path.exists() {
        return (None, Some(format!("no bitmap file {}", path.display())));
    }
    match DirtyBitmap::open(&path, meta.disk_size, meta.block_size) {
        Ok(b) => (Some(b.count()), None),
        Err(e) => (None, Some(e.to_string())),
    }
}

/// The state of a replica with intact metadata, first match wins: failed, resync
/// target, blocks to copy (or a bitmap recording since a shared generation: the peer
/// holds another generation even if nothing was written), in sync.
fn offline_state(
    m: &ReplicaMeta,
    dirty: Option<u64>,
    bitmap_problem: Option<&str>,
) -> (&'static str, String) {
    if m.failed {
        return (
            "failed",
            "FAILED (replace the disk; it is then fully resynced)".into(),
        );
    }
    if m.inconsistent {
        return (
            "inconsistent",
            "resync target, INCONSISTENT (not promotable)".into(),
        );
    }
    match (dirty, bitmap_problem) {
        (Some(n), _) if n > 0 || m.bitmap_base_gen != 0 => {
            ("degraded", format!("degraded ({})", blocks_to_copy(n)))
        }
        (Some(_), _) => ("in-sync", "in sync".into()),
        (None, why) if m.bitmap_base_gen != 0 => (
            "degraded",
            format!(
                "degraded (blocks to copy unknown: {}; a full copy is needed)",
                why.unwrap_or("bitmap unreadable")
            ),
        ),
        (None, why) => (
            "in-sync",
            format!("in sync ({})", why.unwrap_or("bitmap unreadable")),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta() -> ReplicaMeta {
        ReplicaMeta {
            disk_size: 1 << 20,
            block_size: 4096,
            current_gen: 0xabc,
            bitmap_base_gen: 0,
            history: vec![],
            unclean_primary: false,
            inconsistent: false,
            sync_source_gen: 0,
            failed: false,
            last_committed_epoch: None,
            resync: None,
            verify: None,
            image: storage_mirror::meta::ImageId::Legacy { dev: 1, ino: 2 },
            quorum_generation: 0,
        }
    }

    #[test]
    fn offline_states_first_match_wins() {
        let mut m = meta();
        assert_eq!(offline_state(&m, Some(0), None).0, "in-sync");
        assert_eq!(
            offline_state(&m, Some(3), None),
            ("degraded", "degraded (3 blocks to copy)".into())
        );
        m.bitmap_base_gen = 0x55;
        assert_eq!(
            offline_state(&m, Some(0), None),
            ("degraded", "degraded (0 blocks to copy)".into())
        );
        assert!(offline_state(&m, None, Some("x")).1.contains("unknown: x"));
        m.inconsistent = true;
        m.sync_source_gen = 0x77;
        assert_eq!(offline_state(&m, Some(9), None).0, "inconsistent");
        m.failed = true;
        assert_eq!(offline_state(&m, Some(9), None).0, "failed");
    }

    #[test]
    fn live_view_from_status() {
        let s = DiskStatus {
            path: "/x.img".into(),
            mode: "syncing".into(),
            failed: false,
            current_gen: 0x1234,
            bitmap_base_gen: 0,
            dirty_blocks: 1,
            blocks: 256,
            block_size: 4096,
            resync: None,
            verify_running: Some((3, 16)),
            verify: None,
        };
        let v = DiskView::live(&s);
        assert_eq!(v.kind, "syncing");
        assert_eq!(v.state, "syncing to the standby (1 block to copy)");
        assert_eq!(v.current_gen.as_deref(), Some("0000000000001234"));
        assert_eq!(v.bitmap_base_gen, None);
        assert_eq!(v.dirty_bytes, Some(4096));
        assert_eq!(
            v.verify_running,
            Some(VerifyRunning {
                compared: 3,
                total: 16
            })
        );
        let v = DiskView::live(&DiskStatus { failed: true, ..s });
        assert_eq!(v.kind, "failed");
    }
}
