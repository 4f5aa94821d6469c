//! The primary's disk session with a (re)joining standby, as a sans-IO state machine:
//! events in (the standby's messages, ticks), actions out (messages to send, chunks to
//! read and send, bitmap changes), time passed in, the disks' state read through a
//! [`DiskView`]. The edge that performs the actions is
//! [`PrimaryDisks`](super::PrimaryDisks) (files) plus whoever carries the messages.
//!
//! ```text
//! WaitMeta --Meta--> decide every disk (pure: crate::decision)
//!     any Refuse (or a disk count mismatch) --> Send(Plan), End(Refused)
//!     otherwise --> Prepare each disk (Full: set every bit; Delta: merge the peer's
//!                   bitmap) --Prepared--> BeginResync, Send(Plan), Resync
//! Resync: one disk after the other, pass after pass in disk order (ResyncPlanner):
//!     SendChunk while the window and the rate allow; ChunkDone --> ClearChunk
//!     a pass ends when nothing is in flight and nothing is set past its last chunk:
//!         few blocks left (or the pass limit) --> next disk; else NewPass from block 0
//! last disk done --> Send(ResyncDone), End(Ready)    [epoch 0 carries what is left]
//! WaitMeta too long --> End(Failed); Refused --> End(Refused | Failed); PeerLost --> End
//! ```
//!
//! A block's bit is cleared only once the standby has it durably and the guest has not
//! written it since the pass began, so the primary's persistent bitmap is the resync's
//! progress: an interrupted resync (either side killed, links cut) resumes from it.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::decision::{decide, Decision, ReplicaView, Side};
use crate::meta::{MetaState, ReplicaMeta};
use crate::resync::{Chunk, ResyncConfig, ResyncPlanner};
use crate::wire::{DiskPlan, DiskReport, DiskToPrimary, DiskToStandby, PlanKind};
use crate::BlockSet;

/// What the session reads of the primary's disks (the edge's state, passed in).
pub trait DiskView {
    fn disks(&self) -> usize;
    fn meta(&self, disk: usize) -> ReplicaMeta;
    /// Blocks set in the disk's persistent bitmap.
    fn dirty_blocks(&self, disk: usize) -> u64;
    /// Guest bytes written to the disk so far (the resync yields to guest I/O).
    fn guest_write_bytes(&self, disk: usize) -> u64;
    /// Runs `f` on the disk's persistent bitmap.
    fn with_bitmap(&self, disk: usize, f: &mut dyn FnMut(&dyn BlockSet));
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SessionConfig {
    pub resync: ResyncConfig,
    /// How long the standby may take to report its disks.
    pub meta_timeout: Duration,
    /// A pass ends the disk's resync with at most this many blocks left (written by the
    /// guest during the pass): epoch 0 carries them.
    pub small_enough_blocks: u64,
    /// Passes per disk at most; after them epoch 0 carries whatever is left.
    pub max_passes: u32,
    /// How often the progress of a running resync is saved.
    pub progress_every: Duration,
}

impl Default for SessionConfig {
    fn default() -> Self {
        SessionConfig {
            resync: ResyncConfig::default(),
            meta_timeout: Duration::from_secs(60),
            small_enough_blocks: 1024,
            max_passes: 8,
            progress_every: Duration::from_secs(1),
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ResyncStats {
    /// Disks copied whole, and disks copied as a delta, by the plan.
    pub full_disks: u32,
    pub delta_disks: u32,
    pub passes: u32,
    pub chunks: u64,
    pub blocks: u64,
    pub bytes: u64,
    pub elapsed: Duration,
}

/// How a session ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SessionEnd {
    /// The standby's disks are in step (up to what epoch 0 carries).
    Ready(ResyncStats),
    /// A disk cannot be resynced without an operator (split brain, unrelated disks...).
    Refused(String),
    /// The session could not go on (the standby gave up, or never reported).
    Failed(String),
    /// The standby went away.
    PeerLost,
}

#[derive(Clone, Debug)]
pub enum SessionEvent {
    /// The standby's report: each disk's metadata and bitmap words.
    Meta {
        reports: Vec<DiskReport>,
        words: Vec<Vec<u64>>,
    },
    /// The `Prepare` actions are done: blocks to copy per disk.
    Prepared {
        blocks: Vec<u64>,
    },
    ChunkDone {
        disk: u16,
        first_block: u64,
        blocks: u32,
    },
    Refused {
        reason: String,
    },
    /// Time passed (also after each batch of messages).
    Tick,
    PeerLost,
}

impl SessionEvent {
    /// The event a message from the standby makes (None: not the session's).
    pub fn from_msg(m: DiskToPrimary, payload: &[u8]) -> Option<SessionEvent> {
        match m {
            DiskToPrimary::Meta { disks } => {
                let words = crate::wire::bitmap_words(&disks, payload);
                Some(SessionEvent::Meta {
                    reports: disks,
                    words,
                })
            }
            DiskToPrimary::ChunkDone {
                disk,
                first_block,
                blocks,
            } => Some(SessionEvent::ChunkDone {
                disk,
                first_block,
                blocks,
            }),
            DiskToPrimary::Refused { reason } => Some(SessionEvent::Refused { reason }),
            DiskToPrimary::ReadDone { .. } | DiskToPrimary::Digests { .. } => None,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SessionAction {
    /// Send this message to the standby (no payload).
    Send(DiskToStandby),
    /// Read `chunk` of disk `disk` and send it (`DiskToStandby::Chunk` with its CRC).
    SendChunk {
        disk: usize,
        chunk: Chunk,
    },
    /// What was decided for a disk, and why (for the log).
    Decided {
        disk: usize,
        kind: PlanKind,
        reason: String,
    },
    /// Mark what the resync of disk `disk` must copy, durably, before the standby hears
    /// the plan: every block (Full) or the peer's bits too (Delta); record the resync
    /// in the metadata. Then report `Prepared` with each disk's count of set blocks.
    Prepare {
        disk: usize,
        kind: PlanKind,
        peer_words: Vec<u64>,
    },
    /// Every disk is syncing from now on (guest writes are noted as touched), and the
    /// VM's written-block maps start afresh (epoch 0 reads back what they hold).
    BeginResync,
    /// Chunk blocks are durable on the standby: clear them unless touched.
    ClearChunk {
        disk: usize,
        first_block: u64,
        blocks: u64,
    },
    /// A new pass over disk `disk` begins: forget what was touched, and start the VM's
    /// written-block map of the disk afresh.
    NewPass {
        disk: usize,
    },
    /// Save disk `disk`'s resync progress.
    SaveProgress {
        disk: usize,
        done_blocks: u64,
    },
    End(SessionEnd),
}

/// A disk being resynced.
struct Running {
    /// Index into `todo`.
    at: usize,
    planner: ResyncPlanner,
    /// Chunk id by first block, of chunks in flight.
    ids: HashMap<u64, u64>,
    /// End of the last chunk of the pass (a pass ends when nothing is set past it).
    pass_end: u64,
    passes: u32,
    last_guest: u64,
    last_save: Instant,
}

enum Phase {
    WaitMeta,
    Preparing { plans: Vec<DiskPlan> },
    Resync { todo: Vec<usize>, run: Box<Running> },
    Ended,
}

pub struct PrimarySession {
    cfg: SessionConfig,
    started: Instant,
    phase: Phase,
    stats: ResyncStats,
}

impl PrimarySession {
    /// A session whose start (the checkpoint's `Hello`) went out at `now`.
    pub fn new(cfg: SessionConfig, now: Instant) -> PrimarySession {
        PrimarySession {
            cfg,
            started: now,
            phase: Phase::WaitMeta,
            stats: ResyncStats::default(),
        }
    }

    pub fn is_ended(&self) -> bool {
        matches!(self.phase, Phase::Ended)
    }

    /// When the session wants a `Tick` at the latest (the resync's rate limiter).
    pub fn next_wakeup(&self, now: Instant) -> Option<Instant> {
        match &self.phase {
            Phase::Resync { run, .. } => run.planner.next_wakeup(now),
            _ => None,
        }
    }

    /// Feeds one event; returns the actions to perform, in order.
    pub fn on_event(
        &mut self,
        ev: SessionEvent,
        now: Instant,
        view: &dyn DiskView,
    ) -> Vec<SessionAction> {
        let mut out = Vec::new();
        if self.is_ended() {
            return out;
        }
        match ev {
            SessionEvent::PeerLost => self.end(SessionEnd::PeerLost, &mut out),
            SessionEvent::Meta { reports, words } => match self.phase {
                Phase::WaitMeta => self.on_meta(&reports, words, now, view, &mut out),
                _ => log::warn!("primary: a second disk report (ignored)"),
            },
            SessionEvent::Prepared { blocks } => {
                let Phase::Preparing { plans } = &mut self.phase else {
                    log::warn!("primary: disks prepared outside the session's plan (ignored)");
                    return out;
                };
                let plans = std::mem::take(plans);
                self.prepared(plans, blocks, now, view, &mut out);
            }
            SessionEvent::Refused { reason } => {
                let end = match self.phase {
                    Phase::WaitMeta => SessionEnd::Refused(reason),
                    _ => SessionEnd::Failed(format!("the standby gave up the resync: {reason}")),
                };
                self.end(end, &mut out);
            }
            SessionEvent::ChunkDone {
                disk,
                first_block,
                blocks,
            } => {
                if let Phase::Resync { todo, run } = &mut self.phase {
                    let i = todo[run.at];
                    if usize::from(disk) != i {
                        log::warn!(
                            "primary: ack of a resync chunk of disk {disk} while disk {i} resyncs"
                        );
                        return out;
                    }
                    let Some(id) = run.ids.remove(&first_block) else {
                        log::warn!(
                            "primary: ack of an unknown resync chunk at block {first_block}"
                        );
                        return out;
                    };
                    match run.planner.on_acked(id) {
                        Ok(c) => {
                            debug_assert_eq!(c.blocks, blocks);
                            out.push(SessionAction::ClearChunk {
                                disk: i,
                                first_block: c.first_block,
                                blocks: u64::from(c.blocks),
                            });
                        }
                        Err(e) => log::warn!("primary: resync ack: {e}"),
                    }
                } else {
                    log::warn!("primary: resync ack outside a resync (ignored)");
                }
                self.pump(now, view, &mut out);
            }
            SessionEvent::Tick => {
                if matches!(self.phase, Phase::WaitMeta)
                    && now.saturating_duration_since(self.started) > self.cfg.meta_timeout
                {
                    let why = format!(
                        "the standby did not report its disks within {:?}",
                        self.cfg.meta_timeout
                    );
                    self.end(SessionEnd::Failed(why), &mut out);
                    return out;
                }
                self.pump(now, view, &mut out);
            }
        }
        out
    }

    fn end(&mut self, end: SessionEnd, out: &mut Vec<SessionAction>) {
        self.phase = Phase::Ended;
        out.push(SessionAction::End(end));
    }

    /// The disks are prepared (`blocks` to copy each): the plan goes out and the
    /// resync of the first disk that needs one starts.
    fn prepared(
        &mut self,
        mut plans: Vec<DiskPlan>,
        blocks: Vec<u64>,
        now: Instant,
        view: &dyn DiskView,
        out: &mut Vec<SessionAction>,
    ) {
        for (p, b) in plans.iter_mut().zip(blocks) {
            p.blocks = b;
        }
        let todo: Vec<usize> = (0..plans.len())
            .filter(|&i| plans[i].kind != PlanKind::InSync)
            .collect();
        for p in &plans {
            match p.kind {
                PlanKind::Full => self.stats.full_disks += 1,
                PlanKind::Delta => self.stats.delta_disks += 1,
                PlanKind::InSync | PlanKind::Refuse => {}
            }
        }
        out.push(SessionAction::BeginResync);
        out.push(SessionAction::Send(DiskToStandby::Plan { disks: plans }));
        self.start_disk(todo, 0, now, view, out);
    }

    fn on_meta(
        &mut self,
        reports: &[DiskReport],
        mut words: Vec<Vec<u64>>,
        now: Instant,
        view: &dyn DiskView,
        out: &mut Vec<SessionAction>,
    ) {
        let n = view.disks();
        if reports.len() != n {
            let reason = format!("the standby has {} disks, the VM has {n}", reports.len());
            let plans = (0..n.max(1))
                .map(|_| DiskPlan {
                    kind: PlanKind::Refuse,
                    reason: reason.clone(),
                    source_gen: 0,
                    source_history: Vec::new(),
                    blocks: 0,
                })
                .collect();
            out.push(SessionAction::Send(DiskToStandby::Plan { disks: plans }));
            self.end(SessionEnd::Refused(reason), out);
            return;
        }
        // Decide every disk before touching any.
        let mut plans = Vec::with_capacity(n);
        for (i, rep) in reports.iter().enumerate() {
            let meta = view.meta(i);
            let ours = MetaState::Ok(meta.clone());
            let theirs = MetaState::from(rep.meta.clone());
            let v = decide(
                &ReplicaView {
                    meta: &ours,
                    dirty_blocks: view.dirty_blocks(i),
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
                Decision::Delta { .. } | Decision::Full { .. } | Decision::Refuse => {
                    PlanKind::Refuse
                }
            };
            out.push(SessionAction::Decided {
                disk: i,
                kind,
                reason: v.reason.clone(),
            });
            plans.push(DiskPlan {
                kind,
                reason: v.reason,
                source_gen: meta.current_gen,
                source_history: meta.history,
                blocks: 0,
            });
        }
        if let Some(p) = plans.iter().find(|p| p.kind == PlanKind::Refuse) {
            let reason = p.reason.clone();
            out.push(SessionAction::Send(DiskToStandby::Plan { disks: plans }));
            self.end(SessionEnd::Refused(reason), out);
            return;
        }
        if plans.is_empty() {
            // A VM without disks: nothing to prepare, nothing to copy (the edge reports
            // `Prepared` after its last `Prepare`, and there is none).
            self.prepared(plans, Vec::new(), now, view, out);
            return;
        }
        for (i, p) in plans.iter().enumerate() {
            out.push(SessionAction::Prepare {
                disk: i,
                kind: p.kind,
                peer_words: if p.kind == PlanKind::Delta {
                    std::mem::take(&mut words[i])
                } else {
                    Vec::new()
                },
            });
        }
        self.phase = Phase::Preparing { plans };
    }

    /// Starts the resync of `todo[at]`, or ends the session when every disk is done.
    fn start_disk(
        &mut self,
        todo: Vec<usize>,
        at: usize,
        now: Instant,
        view: &dyn DiskView,
        out: &mut Vec<SessionAction>,
    ) {
        let Some(&i) = todo.get(at) else {
            self.stats.elapsed = now.saturating_duration_since(self.started);
            out.push(SessionAction::Send(DiskToStandby::ResyncDone {
                rounds: self.stats.passes,
                blocks: self.stats.blocks,
            }));
            let stats = self.stats;
            self.end(SessionEnd::Ready(stats), out);
            return;
        };
        let meta = view.meta(i);
        let planner =
            match ResyncPlanner::new(self.cfg.resync, meta.block_size, view.dirty_blocks(i)) {
                Ok(p) => p,
                Err(e) => {
                    self.end(SessionEnd::Failed(format!("resync of disk {i}: {e}")), out);
                    return;
                }
            };
        let run = Box::new(Running {
            at,
            planner,
            ids: HashMap::new(),
            pass_end: 0,
            passes: 0,
            last_guest: view.guest_write_bytes(i),
            last_save: now,
        });
        self.phase = Phase::Resync { todo, run };
        self.pump(now, view, out);
    }

    /// Moves the running resync on: ends a pass (or the disk), issues the chunks the
    /// window and the rate allow, saves progress now and then.
    fn pump(&mut self, now: Instant, view: &dyn DiskView, out: &mut Vec<SessionAction>) {
        let Phase::Resync { todo, run } = &mut self.phase else {
            return;
        };
        let i = todo[run.at];
        let g = view.guest_write_bytes(i);
        if g > run.last_guest {
            run.planner.note_guest_io(now, g - run.last_guest);
            run.last_guest = g;
        }
        // A pass ends when nothing is in flight and nothing is set past its last
        // chunk (the planner would wrap to block 0 for the next pass on its own).
        if run.planner.progress().chunks_in_flight == 0 {
            let mut pass_done = false;
            let from = run.pass_end;
            view.with_bitmap(i, &mut |set| pass_done = set.next_set(from).is_none());
            if pass_done {
                run.passes += 1;
                let left = view.dirty_blocks(i);
                if left <= self.cfg.small_enough_blocks || run.passes >= self.cfg.max_passes {
                    self.stats.passes = self.stats.passes.max(run.passes);
                    out.push(SessionAction::SaveProgress {
                        disk: i,
                        done_blocks: run.planner.progress().done_blocks,
                    });
                    let todo = std::mem::take(todo);
                    let at = run.at + 1;
                    self.start_disk(todo, at, now, view, out);
                    return;
                }
                // The next pass reads every block the guest wrote during this one
                // again, from block 0 (the planner's cursor must not carry over: a pass
                // that found only blocks written ahead of it would end without sending
                // the ones behind, which neither its touched set nor the written-block
                // map epoch 0 reads back would hold any more).
                run.pass_end = 0;
                if let Err(e) = run.planner.restart_pass() {
                    let why = format!("resync pass of disk {i}: {e}");
                    self.end(SessionEnd::Failed(why), out);
                    return;
                }
                out.push(SessionAction::NewPass { disk: i });
            }
        }
        // Issue what the window and the rate allow.
        let meta = view.meta(i);
        let bs = u64::from(meta.block_size);
        let stats = &mut self.stats;
        view.with_bitmap(i, &mut |set| {
            while let Some(c) = run.planner.next_chunk(now, set) {
                run.ids.insert(c.first_block, c.id);
                run.pass_end = c.end_block();
                stats.chunks += 1;
                stats.blocks += u64::from(c.blocks);
                let start = c.first_block * bs;
                stats.bytes += (u64::from(c.blocks) * bs).min(meta.disk_size.saturating_sub(start));
                out.push(SessionAction::SendChunk { disk: i, chunk: c });
            }
        });
        if now.saturating_duration_since(run.last_save) > self.cfg.progress_every {
            out.push(SessionAction::SaveProgress {
                disk: i,
                done_blocks: run.planner.progress().done_blocks,
            });
            run.last_save = now;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::WireMeta;

    /// Disks as plain memory: metadata, a bit per block, guest bytes.
    struct Disks {
        metas: Vec<ReplicaMeta>,
        bits: Vec<Vec<bool>>,
        guest: Vec<u64>,
    }

    struct Bits<'a>(&'a [bool]);
    impl BlockSet for Bits<'_> {
        fn blocks(&self) -> u64 {
            self.0.len() as u64
        }
        fn is_set(&self, b: u64) -> bool {
            self.0.get(b as usize).copied().unwrap_or(false)
        }
        fn next_set(&self, from: u64) -> Option<u64> {
            (from..self.blocks()).find(|&b| self.is_set(b))
        }
    }

    impl DiskView for Disks {
        fn disks(&self) -> usize {
            self.metas.len()
        }
        fn meta(&self, d: usize) -> ReplicaMeta {
            self.metas[d].clone()
        }
        fn dirty_blocks(&self, d: usize) -> u64 {
            self.bits[d].iter().filter(|&&b| b).count() as u64
        }
        fn guest_write_bytes(&self, d: usize) -> u64 {
            self.guest[d]
        }
        fn with_bitmap(&self, d: usize, f: &mut dyn FnMut(&dyn BlockSet)) {
            f(&Bits(&self.bits[d]))
        }
    }

    fn meta(gen: u64, base: u64) -> ReplicaMeta {
        ReplicaMeta {
            disk_size: 64 * 4096,
            block_size: 4096,
            current_gen: gen,
            bitmap_base_gen: base,
            history: vec![],
            unclean_primary: false,
            inconsistent: false,
            sync_source_gen: 0,
            failed: false,
            last_committed_epoch: None,
            resync: None,
            verify: None,
            image: crate::meta::ImageId::Legacy { dev: 1, ino: 2 },
            quorum_generation: 0,
        }
    }

    /// Performs the edge's part of `acts` on `d`; returns messages sent and the end.
    fn perform(
        s: &mut PrimarySession,
        d: &mut Disks,
        now: Instant,
        acts: Vec<SessionAction>,
        sent: &mut Vec<DiskToStandby>,
        chunks: &mut Vec<(usize, Chunk)>,
    ) -> Option<SessionEnd> {
        let mut queue: std::collections::VecDeque<_> = acts.into();
        let mut prepared = Vec::new();
        let mut end = None;
        while let Some(a) = queue.pop_front() {
            match a {
                SessionAction::Send(m) => sent.push(m),
                SessionAction::SendChunk { disk, chunk } => chunks.push((disk, chunk)),
                SessionAction::Decided { .. } | SessionAction::SaveProgress { .. } => {}
                SessionAction::Prepare {
                    disk,
                    kind,
                    peer_words,
                } => {
                    match kind {
                        PlanKind::Full => d.bits[disk].iter_mut().for_each(|b| *b = true),
                        PlanKind::Delta => {
                            for (k, b) in d.bits[disk].iter_mut().enumerate() {
                                let w = peer_words.get(k / 64).copied().unwrap_or(0);
                                *b |= w & (1 << (k % 64)) != 0;
                            }
                        }
                        _ => {}
                    }
                    prepared.push(d.dirty_blocks(disk));
                    if prepared.len() == d.disks() {
                        let blocks = std::mem::take(&mut prepared);
                        queue.extend(s.on_event(SessionEvent::Prepared { blocks }, now, d));
                    }
                }
                SessionAction::BeginResync | SessionAction::NewPass { .. } => {}
                SessionAction::ClearChunk {
                    disk,
                    first_block,
                    blocks,
                } => {
                    for b in first_block..first_block + blocks {
                        d.bits[disk][b as usize] = false;
                    }
                }
                SessionAction::End(e) => end = Some(e),
            }
        }
        end
    }

    #[test]
    fn a_delta_copies_both_bitmaps_and_ends_ready() {
        let t0 = Instant::now();
        let mut d = Disks {
            metas: vec![meta(7, 5)],
            bits: vec![vec![false; 64]],
            guest: vec![0],
        };
        d.bits[0][3] = true;
        let mut s = PrimarySession::new(SessionConfig::default(), t0);
        let (mut sent, mut chunks) = (Vec::new(), Vec::new());
        // The standby holds generation 5 and wrote block 40 (its last epoch).
        let mut m = meta(5, 0);
        m.current_gen = 5;
        let a = s.on_event(
            SessionEvent::Meta {
                reports: vec![DiskReport {
                    meta: WireMeta::Ok(m),
                    bitmap_words: 1,
                    dirty_blocks: 1,
                }],
                words: vec![vec![1 << 40]],
            },
            t0,
            &d,
        );
        assert!(perform(&mut s, &mut d, t0, a, &mut sent, &mut chunks).is_none());
        let DiskToStandby::Plan { disks } = &sent[0] else {
            panic!("{sent:?}")
        };
        assert_eq!(disks[0].kind, PlanKind::Delta);
        assert_eq!(disks[0].blocks, 2);
        assert_eq!(
            chunks
                .iter()
                .map(|(_, c)| (c.first_block, c.blocks))
                .collect::<Vec<_>>(),
            vec![(3, 1), (40, 1)]
        );
        // Guest I/O meanwhile slows the resync but does not stop it.
        d.guest[0] += 4096;
        let mut end = None;
        for (disk, c) in std::mem::take(&mut chunks) {
            let a = s.on_event(
                SessionEvent::ChunkDone {
                    disk: disk as u16,
                    first_block: c.first_block,
                    blocks: c.blocks,
                },
                t0,
                &d,
            );
            end = end.or(perform(&mut s, &mut d, t0, a, &mut sent, &mut chunks));
        }
        assert_eq!(d.dirty_blocks(0), 0);
        let Some(SessionEnd::Ready(st)) = end else {
            panic!("{end:?}")
        };
        assert_eq!((st.chunks, st.blocks, st.passes), (2, 2, 1));
        assert!(matches!(
            sent.last(),
            Some(DiskToStandby::ResyncDone { blocks: 2, .. })
        ));
    }

    /// A node that lost the VM (demoted) comes back as the standby: the plan is a
    /// delta of exactly the union of what the winner wrote since its takeover and
    /// what the loser wrote that the winner never had, not the whole disk.
    #[test]
    fn a_demoted_standby_gets_a_delta_of_both_bitmaps() {
        let t0 = Instant::now();
        // The winner took over from the shared generation 5 and wrote blocks 3 and 4.
        let mut d = Disks {
            metas: vec![meta(7, 5)],
            bits: vec![vec![false; 64]],
            guest: vec![0],
        };
        d.bits[0][3] = true;
        d.bits[0][4] = true;
        // The loser ran alone from 5 too (its own generation 9), wrote 4, 40 and 41,
        // then learned it lost the VM to quorum generation 2.
        let mut m = meta(9, 5);
        m.mark_demoted(2);
        let mut s = PrimarySession::new(SessionConfig::default(), t0);
        let (mut sent, mut chunks) = (Vec::new(), Vec::new());
        let a = s.on_event(
            SessionEvent::Meta {
                reports: vec![DiskReport {
                    meta: WireMeta::Ok(m),
                    bitmap_words: 1,
                    dirty_blocks: 3,
                }],
                words: vec![vec![(1 << 4) | (1 << 40) | (1 << 41)]],
            },
            t0,
            &d,
        );
        assert!(perform(&mut s, &mut d, t0, a, &mut sent, &mut chunks).is_none());
        let DiskToStandby::Plan { disks } = &sent[0] else {
            panic!("{sent:?}")
        };
        assert_eq!(disks[0].kind, PlanKind::Delta);
        assert_eq!(disks[0].blocks, 4, "of 64");
        assert_eq!(
            chunks
                .iter()
                .map(|(_, c)| (c.first_block, c.blocks))
                .collect::<Vec<_>>(),
            vec![(3, 2), (40, 2)]
        );
        // Without the shared generation (the loser's bitmap starts at 6): full.
        let mut d = Disks {
            metas: vec![meta(7, 5)],
            bits: vec![vec![false; 64]],
            guest: vec![0],
        };
        let mut m = meta(9, 6);
        m.mark_demoted(2);
        let mut s = PrimarySession::new(SessionConfig::default(), t0);
        let (mut sent, mut chunks) = (Vec::new(), Vec::new());
        let a = s.on_event(
            SessionEvent::Meta {
                reports: vec![DiskReport {
                    meta: WireMeta::Ok(m),
                    bitmap_words: 1,
                    dirty_blocks: 1,
                }],
                words: vec![vec![1 << 40]],
            },
            t0,
            &d,
        );
        perform(&mut s, &mut d, t0, a, &mut sent, &mut chunks);
        let DiskToStandby::Plan { disks } = &sent[0] else {
            panic!("{sent:?}")
        };
        assert_eq!((disks[0].kind, disks[0].blocks), (PlanKind::Full, 64));
    }

    #[test]
    fn split_brain_is_refused_before_anything_is_marked() {
        let t0 = Instant::now();
        let mut d = Disks {
            metas: vec![meta(7, 5)],
            bits: vec![vec![false; 64]],
            guest: vec![0],
        };
        let mut s = PrimarySession::new(SessionConfig::default(), t0);
        let a = s.on_event(
            SessionEvent::Meta {
                reports: vec![DiskReport {
                    meta: WireMeta::Ok(meta(9, 5)),
                    bitmap_words: 0,
                    dirty_blocks: 0,
                }],
                words: vec![vec![]],
            },
            t0,
            &d,
        );
        let (mut sent, mut chunks) = (Vec::new(), Vec::new());
        let end = perform(&mut s, &mut d, t0, a, &mut sent, &mut chunks);
        assert!(matches!(end, Some(SessionEnd::Refused(r)) if r.contains("split brain")));
        assert!(
            matches!(&sent[0], DiskToStandby::Plan { disks } if disks[0].kind == PlanKind::Refuse)
        );
        assert_eq!(d.dirty_blocks(0), 0);
        assert!(s.on_event(SessionEvent::Tick, t0, &d).is_empty());
    }

    #[test]
    fn a_vm_without_disks_is_ready_at_once() {
        let t0 = Instant::now();
        let mut d = Disks {
            metas: vec![],
            bits: vec![],
            guest: vec![],
        };
        let mut s = PrimarySession::new(SessionConfig::default(), t0);
        let a = s.on_event(
            SessionEvent::Meta {
                reports: vec![],
                words: vec![],
            },
            t0,
            &d,
        );
        let (mut sent, mut chunks) = (Vec::new(), Vec::new());
        let end = perform(&mut s, &mut d, t0, a, &mut sent, &mut chunks);
        assert!(matches!(end, Some(SessionEnd::Ready(_))), "{end:?}");
        assert_eq!(
            sent,
            vec![
                DiskToStandby::Plan { disks: vec![] },
                DiskToStandby::ResyncDone {
                    rounds: 0,
                    blocks: 0
                }
            ]
        );
        assert!(chunks.is_empty());
    }

    #[test]
    fn a_silent_standby_times_out_and_a_count_mismatch_is_refused() {
        let t0 = Instant::now();
        let d = Disks {
            metas: vec![meta(7, 5)],
            bits: vec![vec![false; 64]],
            guest: vec![0],
        };
        let mut s = PrimarySession::new(SessionConfig::default(), t0);
        assert!(s
            .on_event(SessionEvent::Tick, t0 + Duration::from_secs(59), &d)
            .is_empty());
        let a = s.on_event(SessionEvent::Tick, t0 + Duration::from_secs(61), &d);
        assert!(matches!(
            &a[..],
            [SessionAction::End(SessionEnd::Failed(_))]
        ));
        let mut s = PrimarySession::new(SessionConfig::default(), t0);
        let a = s.on_event(
            SessionEvent::Meta {
                reports: vec![],
                words: vec![],
            },
            t0,
            &d,
        );
        assert!(matches!(
            a.last(),
            Some(SessionAction::End(SessionEnd::Refused(_)))
        ));
    }
}
