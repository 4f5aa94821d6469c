//! The disk part of a primary's session with a (re)joining standby, run before the
//! memory synchronisation: exchange metadata, decide per disk (pure:
//! `storage_mirror::decision`), then copy the marked blocks in disk order while the
//! guest runs, pass after pass, until what the guest keeps writing is small enough for
//! epoch 0 to carry (epoch 0 ships every block written since the resync began, read
//! back from the image while paused).
//!
//! A block's bit is cleared only once the standby has it durably and the guest has not
//! written it since the resync began, so the primary's persistent bitmap is the resync's
//! progress: an interrupted resync (either side killed, links cut) resumes from it.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use alink::{Alink, AlinkError};
use storage_mirror::decision::{decide, Decision, ReplicaView, Side};
use storage_mirror::meta::MetaState;
use storage_mirror::resync::{read_chunk, ResyncConfig, ResyncPlanner};
use storage_mirror::BlockSet;
use vmm::Vmm;

use super::disks::PrimaryDisks;
use super::driver::DriverError;
use super::inbox::Inbox;
use crate::disk_msgs::{bitmap_words, DiskPlan, DiskToPrimary, DiskToStandby, PlanKind};
use crate::messages::{decode_to_primary, PrimaryboundMsg, ToStandby};

/// How long the standby may take to report its disks.
const META_TIMEOUT: Duration = Duration::from_secs(60);
/// A resync pass ends with at most this many blocks left (written by the guest during
/// the pass): epoch 0 carries them.
const SMALL_ENOUGH_BLOCKS: u64 = 1024;
/// Passes at most; after them epoch 0 carries whatever is left.
const MAX_PASSES: u32 = 8;
const SEND_WAIT: Duration = Duration::from_millis(50);

/// How a disk session ended.
#[derive(Debug)]
pub enum SessionEnd {
    /// The standby's disks are in step (up to what epoch 0 carries).
    Ready(ResyncStats),
    /// A disk cannot be resynced without an operator (split brain, unrelated disks...).
    Refused(String),
    /// The standby went away.
    PeerLost,
}

#[derive(Clone, Copy, Debug, Default)]
pub struct ResyncStats {
    pub passes: u32,
    pub chunks: u64,
    pub blocks: u64,
    pub bytes: u64,
    pub elapsed: Duration,
}

enum Fail {
    Peer,
    Error(DriverError),
}

impl From<AlinkError> for Fail {
    fn from(e: AlinkError) -> Self {
        match e {
            AlinkError::Closed => Fail::Peer,
            e => Fail::Error(e.into()),
        }
    }
}

fn send(link: &Alink, head: &ToStandby, payload: Vec<alink::Bytes>) -> Result<(), Fail> {
    loop {
        match link.send_timeout(head, payload.clone(), Some(SEND_WAIT)) {
            Ok(_) => return Ok(()),
            Err(AlinkError::Timeout) => {
                if !link.peer_reachable() {
                    return Err(Fail::Peer);
                }
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// Receives the next disk message (waiting at most `wait`).
fn recv_disk(
    link: &Alink,
    inbox: &Inbox,
    wait: Duration,
) -> Result<Option<(DiskToPrimary, Vec<u8>)>, Fail> {
    let Some(m) = inbox.recv(wait)? else {
        if !link.peer_reachable() {
            return Err(Fail::Peer);
        }
        return Ok(None);
    };
    match decode_to_primary(m.head_bytes(), m.payload()) {
        Ok(PrimaryboundMsg::Disk(d, p)) => Ok(Some((d, p.to_vec()))),
        Ok(PrimaryboundMsg::Ack { epoch }) => {
            log::warn!("primary: ack of epoch {epoch} during the disk session (ignored)");
            Ok(None)
        }
        Err(e) => {
            log::error!("primary: undecodable message from the standby: {e}");
            Ok(None)
        }
    }
}

/// Runs the disk session; the `Hello` was sent.
pub fn run_disk_session(
    link: &Alink,
    inbox: &Inbox,
    disks: &PrimaryDisks,
    vmm: &Vmm,
    cfg: &ResyncConfig,
) -> Result<SessionEnd, DriverError> {
    match session(link, inbox, disks, vmm, cfg) {
        Ok(end) => Ok(end),
        Err(Fail::Peer) => Ok(SessionEnd::PeerLost),
        Err(Fail::Error(e)) => Err(e),
    }
}

fn session(
    link: &Alink,
    inbox: &Inbox,
    disks: &PrimaryDisks,
    vmm: &Vmm,
    cfg: &ResyncConfig,
) -> Result<SessionEnd, Fail> {
    let t0 = Instant::now();
    let (reports, payload) = loop {
        if t0.elapsed() > META_TIMEOUT {
            return Err(Fail::Error(DriverError::DiskSession(format!(
                "the standby did not report its disks within {META_TIMEOUT:?}"
            ))));
        }
        match recv_disk(link, inbox, Duration::from_millis(20))? {
            Some((DiskToPrimary::Meta { disks }, p)) => break (disks, p),
            Some((DiskToPrimary::Refused { reason }, _)) => return Ok(SessionEnd::Refused(reason)),
            Some((other, _)) => log::warn!("primary: unexpected {other:?} before the disk report"),
            None => {}
        }
    };
    if reports.len() != disks.len() {
        let reason = format!(
            "the standby has {} disks, the VM has {}",
            reports.len(),
            disks.len()
        );
        refuse_all(link, disks.len(), &reason)?;
        return Ok(SessionEnd::Refused(reason));
    }
    let words = bitmap_words(&reports, &payload);
    // Decide every disk before touching any.
    let mut plans = Vec::new();
    for (i, rep) in reports.iter().enumerate() {
        let d = disks.lock(i);
        let ours = MetaState::Ok(d.meta.clone());
        let theirs = MetaState::from(rep.meta.clone());
        let v = decide(
            &ReplicaView {
                meta: &ours,
                dirty_blocks: d.bitmap.count(),
            },
            &ReplicaView {
                meta: &theirs,
                dirty_blocks: rep.dirty_blocks,
            },
            Some(Side::A),
        );
        let kind = match v.decision {
            Decision::InSync => PlanKind::InSync,
            Decision::Delta { from: Side::A, .. } => PlanKind::Delta,
            Decision::Full { from: Side::A, .. } => PlanKind::Full,
            Decision::Delta { .. } | Decision::Full { .. } | Decision::Refuse => PlanKind::Refuse,
        };
        log::info!(
            "primary: disk {}: {:?}: {}",
            d.path.display(),
            kind,
            v.reason
        );
        plans.push(DiskPlan {
            kind,
            reason: v.reason,
            source_gen: d.meta.current_gen,
            source_history: d.meta.history.clone(),
            blocks: 0,
        });
    }
    if let Some(p) = plans.iter().find(|p| p.kind == PlanKind::Refuse) {
        let reason = p.reason.clone();
        send(
            link,
            &ToStandby::Disk(DiskToStandby::Plan { disks: plans }),
            Vec::new(),
        )?;
        return Ok(SessionEnd::Refused(reason));
    }
    // Mark what must be copied, durably, before the standby hears the plan.
    for (i, p) in plans.iter_mut().enumerate() {
        let mut d = disks.lock(i);
        let r = match p.kind {
            PlanKind::Full => d.bitmap.set_all().map(|_| ()),
            PlanKind::Delta => d.bitmap.merge_words(&words[i]).map(|_| ()),
            PlanKind::InSync | PlanKind::Refuse => Ok(()),
        };
        r.map_err(|e| Fail::Error(DriverError::DiskSession(format!("bitmap: {e}"))))?;
        p.blocks = d.bitmap.count();
        let full = p.kind == PlanKind::Full;
        let total = p.blocks;
        d.meta.resync = Some(storage_mirror::meta::ResyncProgress {
            full,
            total_blocks: total,
            done_blocks: 0,
        });
    }
    // Writes from here on are noted (touched) and land in the written-block maps that
    // epoch 0 ships: take (reset) those maps now.
    disks.begin_resync();
    crate::primary::capture::reset_written_blocks(vmm);
    send(
        link,
        &ToStandby::Disk(DiskToStandby::Plan {
            disks: plans.clone(),
        }),
        Vec::new(),
    )?;
    let mut stats = ResyncStats::default();
    for (i, p) in plans.iter().enumerate() {
        if p.kind == PlanKind::InSync {
            continue;
        }
        resync_disk(vmm, link, inbox, disks, i, cfg, &mut stats)?;
    }
    stats.elapsed = t0.elapsed();
    send(
        link,
        &ToStandby::Disk(DiskToStandby::ResyncDone {
            rounds: stats.passes,
            blocks: stats.blocks,
        }),
        Vec::new(),
    )?;
    log::info!(
        "primary: disk resync done: {} chunks, {} bytes, {} passes in {:?}",
        stats.chunks,
        stats.bytes,
        stats.passes,
        stats.elapsed
    );
    Ok(SessionEnd::Ready(stats))
}

fn refuse_all(link: &Alink, n: usize, reason: &str) -> Result<(), Fail> {
    let plans = (0..n.max(1))
        .map(|_| DiskPlan {
            kind: PlanKind::Refuse,
            reason: reason.to_string(),
            source_gen: 0,
            source_history: Vec::new(),
            blocks: 0,
        })
        .collect();
    send(
        link,
        &ToStandby::Disk(DiskToStandby::Plan { disks: plans }),
        Vec::new(),
    )
}

/// Copies disk `i`'s marked blocks, pass after pass.
fn resync_disk(
    vmm: &Vmm,
    link: &Alink,
    inbox: &Inbox,
    disks: &PrimaryDisks,
    i: usize,
    cfg: &ResyncConfig,
    stats: &mut ResyncStats,
) -> Result<(), Fail> {
    let (block_size, disk_size, total, image) = {
        let d = disks.lock(i);
        let image = d
            .image
            .try_clone()
            .map_err(|e| Fail::Error(DriverError::DiskSession(format!("image: {e}"))))?;
        (d.meta.block_size, d.meta.disk_size, d.bitmap.count(), image)
    };
    let mut planner = ResyncPlanner::new(*cfg, block_size, total)
        .map_err(|e| Fail::Error(DriverError::DiskSession(e.to_string())))?;
    let disk = i as u16;
    let mut ids: HashMap<u64, u64> = HashMap::new();
    let mut buf = Vec::new();
    let mut pass_end = 0u64;
    let mut passes = 0u32;
    let mut last_guest = disks.lock(i).guest_write_bytes;
    let mut last_save = Instant::now();
    loop {
        let now = Instant::now();
        {
            let g = disks.lock(i).guest_write_bytes;
            if g > last_guest {
                planner.note_guest_io(now, g - last_guest);
                last_guest = g;
            }
        }
        // A pass ends when nothing is in flight and nothing is set past its last
        // chunk (the planner would wrap to block 0 for the next pass on its own).
        if planner.progress().chunks_in_flight == 0 {
            let mut d = disks.lock(i);
            if d.bitmap.next_set(pass_end).is_none() {
                passes += 1;
                let left = d.bitmap.count();
                if left <= SMALL_ENOUGH_BLOCKS || passes >= MAX_PASSES {
                    stats.passes = stats.passes.max(passes);
                    drop(d);
                    save_progress(disks, i, &planner);
                    return Ok(());
                }
                pass_end = 0;
                // The next pass reads every block the guest wrote during this one again,
                // from block 0 (the planner's cursor must not carry over: a pass that
                // found only blocks written ahead of it would end without sending the
                // ones behind, which neither its touched set nor the written-block map
                // epoch 0 ships would hold any more): from here on only its own writes
                // need to be caught, by its touched set and by that map.
                planner.restart_pass().map_err(|e| {
                    Fail::Error(DriverError::DiskSession(format!("resync pass: {e}")))
                })?;
                d.new_pass();
                drop(d);
                crate::primary::capture::reset_written_blocks_of(vmm, i);
            }
        }
        // Issue what the window and the rate allow.
        loop {
            let c = {
                let d = disks.lock(i);
                planner.next_chunk(now, &d.bitmap)
            };
            let Some(c) = c else { break };
            read_chunk(&image, block_size, disk_size, &c, &mut buf).map_err(|e| {
                Fail::Error(DriverError::DiskSession(format!("reading disk {i}: {e}")))
            })?;
            ids.insert(c.first_block, c.id);
            pass_end = c.end_block();
            stats.chunks += 1;
            stats.blocks += u64::from(c.blocks);
            stats.bytes += buf.len() as u64;
            let head = ToStandby::Disk(DiskToStandby::Chunk {
                disk,
                first_block: c.first_block,
                blocks: c.blocks,
                crc: crc32c::crc32c(&buf),
            });
            send(
                link,
                &head,
                vec![alink::Bytes::from(std::mem::take(&mut buf))],
            )?;
        }
        // Acks (and the rate limiter's next slot).
        let wait = planner
            .next_wakeup(now)
            .map(|t| t.saturating_duration_since(Instant::now()))
            .unwrap_or(Duration::from_millis(20))
            .clamp(Duration::from_micros(100), Duration::from_millis(20));
        match recv_disk(link, inbox, wait)? {
            Some((
                DiskToPrimary::ChunkDone {
                    disk: d,
                    first_block,
                    blocks,
                },
                _,
            )) if d == disk => {
                let Some(id) = ids.remove(&first_block) else {
                    log::warn!("primary: ack of an unknown resync chunk at block {first_block}");
                    continue;
                };
                match planner.on_acked(id) {
                    Ok(c) => {
                        debug_assert_eq!(c.blocks, blocks);
                        disks.lock(i).chunk_done(c.first_block, u64::from(c.blocks));
                    }
                    Err(e) => log::warn!("primary: resync ack: {e}"),
                }
            }
            Some((DiskToPrimary::Refused { reason }, _)) => {
                return Err(Fail::Error(DriverError::DiskSession(format!(
                    "the standby gave up the resync: {reason}"
                ))))
            }
            Some((other, _)) => log::warn!("primary: unexpected {other:?} during the resync"),
            None => {}
        }
        if last_save.elapsed() > Duration::from_secs(1) {
            save_progress(disks, i, &planner);
            last_save = Instant::now();
        }
    }
}

fn save_progress(disks: &PrimaryDisks, i: usize, planner: &ResyncPlanner) {
    let mut d = disks.lock(i);
    let p = planner.progress();
    if let Some(r) = &mut d.meta.resync {
        r.done_blocks = p.done_blocks.min(r.total_blocks);
    }
    if let Err(e) = d.bitmap.flush() {
        log::warn!("dirty bitmap flush: {e}");
    }
    let m = d.meta.clone();
    if let Err(e) = d.store.save(&m) {
        log::warn!("saving replica metadata: {e}");
    }
}
