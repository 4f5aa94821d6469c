//! The standby's disk session as a sans-IO state machine: the primary's disk messages
//! and the checkpoint's milestones in, what to do with the disks out, time passed in.
//! The actions are performed by [`StandbyDisks::perform`](super::StandbyDisks::perform).
//!
//! ```text
//! Hello (once)           --> SendReport (each disk's metadata and bitmap)
//! Plan                   --> ApplyPlan (refuse, or mark the targets inconsistent)
//! Chunk                  --> WriteChunk [+ AckChunks once `ack_batch` are waiting]
//! Idle (nothing waiting) --> AckChunks if any chunk waits (one fdatasync for them all)
//! ResyncDone             --> SaveProgress, ResyncDone (the log)
//! Read / Verify          --> ServeRead / ServeDigests (answered from the replica)
//! Committed(0)           --> InSync (the resync targets hold the primary's generation)
//! Committed(n)           --> NoteCommitted(n), at most every `progress_every`
//! Failover               --> PrepareFailover (journal durable; never promote a target)
//! ```

use std::time::{Duration, Instant};

use crate::wire::{DiskPlan, DiskToStandby};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StandbySessionConfig {
    /// Resync chunks written before one `fdatasync` acknowledges them all (fewer when
    /// no message is waiting).
    pub ack_batch: usize,
    /// How often progress-only metadata saves may happen.
    pub progress_every: Duration,
}

impl Default for StandbySessionConfig {
    fn default() -> Self {
        StandbySessionConfig {
            ack_batch: 8,
            progress_every: Duration::from_secs(1),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StandbyEvent {
    /// The primary's session started (its `Hello`).
    Hello,
    /// A disk message (its payload stays with the caller, for `WriteChunk`).
    Msg(DiskToStandby),
    /// No message is waiting.
    Idle,
    /// Epoch `epoch` is applied (durably) on the replicas.
    Committed { epoch: u64 },
    /// The standby takes over.
    Failover,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StandbyAction {
    SendReport,
    ApplyPlan(Vec<DiskPlan>),
    /// Write the payload of the message just fed, durably once acknowledged.
    WriteChunk {
        disk: u16,
        first_block: u64,
        blocks: u32,
    },
    /// Make the chunks written so far durable and acknowledge them.
    AckChunks,
    SaveProgress,
    /// The resync passes are over (for the log).
    ResyncDone {
        rounds: u32,
        blocks: u64,
    },
    ServeRead {
        id: u64,
        disk: u16,
        offset: u64,
        len: u32,
    },
    ServeDigests {
        id: u64,
        disk: u16,
        range_bytes: u64,
        first_range: u64,
        count: u32,
    },
    InSync,
    NoteCommitted(u64),
    PrepareFailover,
}

#[derive(Debug)]
pub struct StandbySession {
    cfg: StandbySessionConfig,
    reported: bool,
    /// Chunks written and not yet acknowledged.
    unacked: usize,
    last_save: Instant,
}

impl StandbySession {
    pub fn new(cfg: StandbySessionConfig, now: Instant) -> StandbySession {
        StandbySession {
            cfg,
            reported: false,
            unacked: 0,
            last_save: now,
        }
    }

    /// Chunks wait for their acknowledgement: look for messages without waiting, and
    /// report `Idle` as soon as none is there.
    pub fn acks_waiting(&self) -> bool {
        self.unacked > 0
    }

    fn paced(&mut self, now: Instant) -> bool {
        if now.saturating_duration_since(self.last_save) > self.cfg.progress_every {
            self.last_save = now;
            return true;
        }
        false
    }

    pub fn on_event(&mut self, ev: StandbyEvent, now: Instant) -> Vec<StandbyAction> {
        let mut out = Vec::new();
        match ev {
            StandbyEvent::Hello => {
                if !self.reported {
                    self.reported = true;
                    out.push(StandbyAction::SendReport);
                }
            }
            StandbyEvent::Msg(m) => match m {
                DiskToStandby::Plan { disks } => {
                    self.unacked = 0;
                    out.push(StandbyAction::ApplyPlan(disks));
                }
                DiskToStandby::Chunk {
                    disk,
                    first_block,
                    blocks,
                    ..
                } => {
                    out.push(StandbyAction::WriteChunk {
                        disk,
                        first_block,
                        blocks,
                    });
                    self.unacked += 1;
                    if self.paced(now) {
                        out.push(StandbyAction::SaveProgress);
                    }
                    if self.unacked >= self.cfg.ack_batch {
                        self.unacked = 0;
                        out.push(StandbyAction::AckChunks);
                    }
                }
                DiskToStandby::ResyncDone { rounds, blocks } => {
                    out.push(StandbyAction::SaveProgress);
                    out.push(StandbyAction::ResyncDone { rounds, blocks });
                }
                DiskToStandby::Read {
                    id,
                    disk,
                    offset,
                    len,
                } => out.push(StandbyAction::ServeRead {
                    id,
                    disk,
                    offset,
                    len,
                }),
                DiskToStandby::Verify {
                    id,
                    disk,
                    range_bytes,
                    first_range,
                    count,
                } => out.push(StandbyAction::ServeDigests {
                    id,
                    disk,
                    range_bytes,
                    first_range,
                    count,
                }),
            },
            StandbyEvent::Idle => {
                if self.unacked > 0 {
                    self.unacked = 0;
                    out.push(StandbyAction::AckChunks);
                }
            }
            StandbyEvent::Committed { epoch } => {
                if epoch == 0 {
                    out.push(StandbyAction::InSync);
                } else if self.paced(now) {
                    out.push(StandbyAction::NoteCommitted(epoch));
                }
            }
            StandbyEvent::Failover => out.push(StandbyAction::PrepareFailover),
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(b: u64) -> StandbyEvent {
        StandbyEvent::Msg(DiskToStandby::Chunk {
            disk: 0,
            first_block: b,
            blocks: 1,
            crc: 0,
        })
    }

    #[test]
    fn chunks_are_acknowledged_in_batches_or_when_idle() {
        let t0 = Instant::now();
        let mut s = StandbySession::new(StandbySessionConfig::default(), t0);
        assert_eq!(
            s.on_event(StandbyEvent::Hello, t0),
            vec![StandbyAction::SendReport]
        );
        assert!(s.on_event(StandbyEvent::Hello, t0).is_empty());
        for b in 0..7 {
            assert_eq!(s.on_event(chunk(b), t0).len(), 1);
        }
        assert!(s.acks_waiting());
        assert_eq!(
            s.on_event(chunk(7), t0).last(),
            Some(&StandbyAction::AckChunks)
        );
        assert!(!s.acks_waiting());
        assert!(s.on_event(StandbyEvent::Idle, t0).is_empty());
        s.on_event(chunk(8), t0);
        assert_eq!(
            s.on_event(StandbyEvent::Idle, t0),
            vec![StandbyAction::AckChunks]
        );
    }

    #[test]
    fn commits_are_recorded_at_a_pace_and_epoch_0_ends_the_resync() {
        let t0 = Instant::now();
        let mut s = StandbySession::new(StandbySessionConfig::default(), t0);
        assert_eq!(
            s.on_event(StandbyEvent::Committed { epoch: 0 }, t0),
            vec![StandbyAction::InSync]
        );
        assert!(s
            .on_event(StandbyEvent::Committed { epoch: 1 }, t0)
            .is_empty());
        let later = t0 + Duration::from_secs(2);
        assert_eq!(
            s.on_event(StandbyEvent::Committed { epoch: 9 }, later),
            vec![StandbyAction::NoteCommitted(9)]
        );
    }
}
