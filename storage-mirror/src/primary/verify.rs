//! Online verify of the mirrored disks while the guest runs: both sides digest the same
//! ranges (SHA-256 per 1 MiB, [`crate::verify`]), the primary compares them and marks
//! the blocks of differing ranges in its persistent bitmap for the next resync. Nothing
//! is repaired: a difference is reported (log, metadata, `twinrun disk status`) and
//! marked, never silently fixed.
//!
//! The standby digests its replica when the request reaches it, i.e. after every epoch
//! sent before the request and maybe some sent after. So a range the guest wrote in an
//! epoch not acknowledged when the batch started, or while the batch is out, may differ
//! only because of that write: such ranges are skipped (counted), not reported. That
//! rule is [`compare_batch`] (pure); [`verifier`] is the thread that runs batches (its
//! local reads and digests take tens of milliseconds per batch: not on the checkpoint
//! driver's thread).

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::{Mode, PrimaryDisks};
use crate::meta::VerifyReport;
use crate::verify::{range_digests, Digest, Verifier, DEFAULT_RANGE_BYTES};
use crate::wire::{DiskToStandby, DIGEST_LEN};

/// Ranges per batch (8 MiB).
const BATCH_RANGES: u32 = 8;
/// Pause between batches: the guest's I/O keeps priority over a verify.
const BATCH_GAP: Duration = Duration::from_millis(20);
const REPLY_TIMEOUT: Duration = Duration::from_secs(10);

fn overlaps(ranges: &[(u64, u64)], start: u64, end: u64) -> bool {
    ranges
        .iter()
        .any(|&(o, l)| l > 0 && o < end && o.saturating_add(l) > start)
}

/// One batch compared: the peer's digests with skipped ranges replaced by ours (so the
/// planner sees them equal), how many were skipped, and which ranges differ.
#[derive(Debug, PartialEq, Eq)]
pub struct Compared {
    pub peer: Vec<Digest>,
    pub skipped: u64,
    pub differing: Vec<u64>,
}

/// Compares the batch of `local.len()` ranges of `range_bytes` from `first` on a disk
/// of `size` bytes: ranges that overlap `unstable` (written in unacknowledged epochs
/// when the batch started) or `watched` (written while it was out) are skipped.
pub fn compare_batch(
    first: u64,
    range_bytes: u64,
    size: u64,
    local: &[Digest],
    peer: &[Digest],
    unstable: &[(u64, u64)],
    watched: &[(u64, u64)],
) -> Compared {
    let mut out = Compared {
        peer: peer.to_vec(),
        skipped: 0,
        differing: Vec::new(),
    };
    for (k, l) in local.iter().enumerate() {
        let r = first + k as u64;
        let (start, end) = (r * range_bytes, ((r + 1) * range_bytes).min(size));
        if overlaps(unstable, start, end) || overlaps(watched, start, end) {
            if let Some(p) = out.peer.get_mut(k) {
                *p = *l;
            }
            out.skipped += 1;
        } else if peer.get(k) != Some(l) {
            out.differing.push(r);
        }
    }
    out
}

/// Runs requested verifies until `quit` (a thread of the primary's session).
pub fn verifier(disks: &PrimaryDisks, quit: &AtomicBool) {
    while !quit.load(Ordering::Relaxed) {
        if !disks.take_verify_request() {
            std::thread::sleep(Duration::from_millis(50));
            continue;
        }
        for i in 0..disks.len() {
            if let Err(why) = verify_disk(disks, i, quit) {
                log::warn!("verify of disk {i} stopped: {why}");
                disks.lock(i).verify_progress = None;
            }
        }
        disks.verify_finished();
    }
}

fn verify_disk(disks: &PrimaryDisks, i: usize, quit: &AtomicBool) -> Result<(), String> {
    let (image, size, bs, path) = {
        let d = disks.lock(i);
        let f = d.image.try_clone().map_err(|e| e.to_string())?;
        (f, d.meta.disk_size, d.meta.block_size, d.path.clone())
    };
    let rb = DEFAULT_RANGE_BYTES.max(u64::from(bs));
    let mut v = Verifier::new(size, bs, rb, BATCH_RANGES).map_err(|e| e.to_string())?;
    let total = v.ranges();
    let t0 = Instant::now();
    log::info!("verify of {} started ({total} ranges)", path.display());
    let mut skipped = 0u64;
    let mut differing_ranges = BTreeSet::new();
    let mut buf = Vec::new();
    while let Some((first, count)) = v.next_batch() {
        if quit.load(Ordering::Relaxed) {
            return Err("the session ended".into());
        }
        // What may differ only because the standby has not applied it yet.
        let unstable = {
            let mut d = disks.lock(i);
            if d.mode() != Mode::Protected {
                return Err("the standby is no longer in sync".into());
            }
            d.verify_watch = Some(Vec::new());
            d.unacked_ranges()
        };
        let id = disks.peer_requests().request(|id| DiskToStandby::Verify {
            id,
            disk: i as u16,
            range_bytes: rb,
            first_range: first,
            count,
        });
        let local = range_digests(&image, size, rb, first, count, &mut buf);
        let reply = id.and_then(|id| disks.peer_requests().wait(id, REPLY_TIMEOUT));
        let watched = disks.lock(i).verify_watch.take().unwrap_or_default();
        let local = local.map_err(|e| format!("local digests: {e}"))?;
        let peer: Vec<Digest> = match reply {
            Some((true, data)) if data.len() == count as usize * DIGEST_LEN => data
                .chunks_exact(DIGEST_LEN)
                .map(|c| {
                    let mut d = [0u8; DIGEST_LEN];
                    d.copy_from_slice(c);
                    d
                })
                .collect(),
            Some(_) => return Err("the standby could not digest its replica".into()),
            None => return Err("no answer from the standby".into()),
        };
        let c = compare_batch(first, rb, size, &local, &peer, &unstable, &watched);
        skipped += c.skipped;
        differing_ranges.extend(c.differing);
        let runs = v
            .on_digests(first, &local, &c.peer)
            .map_err(|e| e.to_string())?;
        let mut d = disks.lock(i);
        if !runs.is_empty() {
            let bytes: Vec<(u64, u64)> = runs
                .iter()
                .map(|&(b, n)| {
                    let off = b * u64::from(bs);
                    (off, (n * u64::from(bs)).min(size.saturating_sub(off)))
                })
                .collect();
            d.mark_verify_differences(&bytes);
            log::error!(
                "verify of {}: replicas DIFFER in blocks {runs:?}; marked for resync (not repaired)",
                path.display()
            );
        }
        d.verify_progress = Some((v.report().ranges_compared, total));
        drop(d);
        std::thread::sleep(BATCH_GAP);
    }
    let out = v.report();
    let report = VerifyReport {
        finished_unix_ms: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0),
        ranges_compared: out.ranges_compared,
        ranges_differing: out.ranges_differing,
        blocks_marked: out.blocks_marked,
    };
    let mut d = disks.lock(i);
    d.verify_progress = None;
    d.meta.verify = Some(report);
    d.save_meta();
    log::info!(
        "verify of {} done in {:?}: {} ranges compared, {} differ ({} blocks marked), {} skipped (written meanwhile)",
        path.display(),
        t0.elapsed(),
        out.ranges_compared,
        out.ranges_differing,
        out.blocks_marked,
        skipped
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_written_meanwhile_are_skipped_not_reported() {
        let (a, b) = ([1u8; 32], [2u8; 32]);
        // Ranges 4..8 of 1 MiB: 4 differs, 5 differs but was written in an unacked
        // epoch, 6 differs but was written while the batch was out, 7 equal.
        let c = compare_batch(
            4,
            1 << 20,
            64 << 20,
            &[a, a, a, a],
            &[b, b, b, a],
            &[(5 << 20, 10)],
            &[((7 << 20) - 1, 1)],
        );
        assert_eq!(c.differing, vec![4]);
        assert_eq!(c.skipped, 2);
        assert_eq!(c.peer, vec![b, a, a, a]);
    }
}
