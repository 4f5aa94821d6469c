//! The standby's checkpoint protocol: a pure state machine.
//!
//! ```text
//!   WaitingForSync --sync part (round 0, part 0)--> Syncing
//!   Syncing: sync parts are written straight into the mirror, strictly in order
//!            (round by round, part by part); epoch parts are staged meanwhile
//!   Syncing --epoch 0 complete and every sync round complete--> Apply(0) --Applied(0)-->
//!            Ack(0), Mirroring
//!   Mirroring: parts of epoch N go to STAGING; when epoch committed+1 has all its parts:
//!            Apply(N) --Applied(N)--> Ack(N) (then the next staged epoch, if complete)
//!   any --PeerLost--> DiscardStaged, then Failover{last_committed, released_through}
//!            (or NoReplica if no epoch was ever committed)
//!   a protocol violation (gap in the sync stream, epoch beyond the window, bad part)
//!            --> Broken: nothing more is applied; the last committed epoch stays a
//!            valid failover point
//! ```
//!
//! Parts carry the received message (`M`) through the machine: a `WriteSync` or
//! `Stage` action hands the driver the very message the event brought, decoded once.
//!
//! An epoch is a delta on top of the previous one, so epochs are applied strictly in
//! order; parts of an epoch may arrive in any order and more than once (a resend after a
//! link failure), and are staged until the epoch is complete. Sync parts go straight
//! into the mirror (it is no replica before epoch 0 commits), which is why they must come
//! in order: an older round written over a newer one would leave a stale page that the
//! stop-and-copy does not resend.

use std::collections::BTreeMap;

/// Epochs staged at once, at most (hard ceiling; the configured value matches the
/// primary's `max_in_flight`).
pub const MAX_STAGED_LIMIT: u32 = 64;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StandbyConfig {
    /// Must be at least the primary's `max_in_flight`.
    pub max_staged: u32,
}

impl Default for StandbyConfig {
    fn default() -> Self {
        StandbyConfig {
            max_staged: super::primary::PrimaryConfig::default().max_in_flight,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StandbyPhase {
    WaitingForSync,
    Syncing,
    Mirroring,
    /// The stream from the primary broke the protocol; the standby stops applying.
    Broken,
    FailedOver,
    /// The primary was lost before any epoch committed: nothing to resume.
    NoReplica,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StandbyEvent<M = ()> {
    /// A valid (decoded, checksum-checked) part of an initial-sync round.
    SyncPart {
        round: u32,
        part: u32,
        parts: u32,
        msg: M,
    },
    /// A valid part of a checkpoint epoch.
    EpochPart {
        epoch: u64,
        part: u32,
        parts: u32,
        sync_rounds: u32,
        /// The primary's release progress when it sent the part.
        released_through: Option<u64>,
        msg: M,
    },
    /// A message that did not decode or failed its checksum.
    BadMessage,
    /// The driver finished `Apply(epoch)`: memory, disk (synced) and state replaced.
    Applied { epoch: u64 },
    /// Every link to the primary is down (heartbeats timed out).
    PeerLost,
    /// Planned role swap: the primary paused its guest at the end of `epoch` (which
    /// this standby acknowledged) and released its output through `released_through`.
    SwapRequest {
        epoch: u64,
        released_through: Option<u64>,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StandbyAction<M = ()> {
    /// Write this sync part's pages into the mirror.
    WriteSync { round: u32, part: u32, msg: M },
    /// Keep this part in the staging area of `epoch`.
    Stage { epoch: u64, part: u32, msg: M },
    /// Apply staged `epoch` atomically (pages, disk journal + fdatasync, state); report
    /// `Applied`.
    Apply { epoch: u64 },
    /// Tell the primary every epoch through `epoch` is applied.
    Ack { epoch: u64 },
    /// The primary released the output of every epoch through `through`: forget the
    /// console output and net frames kept for those epochs.
    TrimOutput { through: u64 },
    /// Drop every staged (incomplete or unapplied) epoch.
    DiscardStaged,
    /// Resume the guest from the mirror as it was when `last_committed` was applied,
    /// after releasing (again, at the same stream positions) the console output of the
    /// epochs after `released_through` through `last_committed` and sending their net
    /// frames again (before the guest runs): the primary may have died before
    /// releasing them, and the resumed guest will not produce them again.
    Failover {
        last_committed: u64,
        released_through: Option<u64>,
    },
    /// The primary is gone and there is no consistent copy to resume.
    NoReplica,
    /// Tell the primary this standby takes the VM over at `epoch` (the handover; a
    /// `Failover` from the same epoch follows).
    AcceptSwap { epoch: u64 },
}

/// Why an event was refused (the standby goes to Broken on protocol violations).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum StandbyError {
    #[error("sync part {round}.{part} out of order (expected {want_round}.{want_part})")]
    SyncOutOfOrder {
        round: u32,
        part: u32,
        want_round: u32,
        want_part: u32,
    },
    #[error("epoch {epoch} is outside the staging window starting at {base} ({max} epochs)")]
    BeyondWindow { epoch: u64, base: u64, max: u32 },
    #[error("epoch {epoch}: part {part} of {parts} disagrees with the parts seen before")]
    PartMismatch { epoch: u64, part: u32, parts: u32 },
    #[error("a message from the primary did not decode or failed its checksum")]
    BadMessage,
    #[error("applied epoch {got}, but {want:?} was being applied")]
    WrongApplied { got: u64, want: Option<u64> },
    #[error("the primary says it released epoch {released}, but only {committed:?} is committed")]
    ReleasedUncommitted {
        released: u64,
        committed: Option<u64>,
    },
    #[error("{0} after failover")]
    AfterFailover(&'static str),
    #[error(
        "swap at epoch {epoch}, but {committed:?} is committed and {staged} epochs are staged"
    )]
    SwapNotAtCommitted {
        epoch: u64,
        committed: Option<u64>,
        staged: usize,
    },
}

#[derive(Debug)]
struct Staged {
    parts: u32,
    received: Vec<bool>,
    count: u32,
    sync_rounds: u32,
}

impl Staged {
    fn complete(&self) -> bool {
        self.count == self.parts
    }
}

#[derive(Debug)]
pub struct Standby<M = ()> {
    cfg: StandbyConfig,
    phase: StandbyPhase,
    /// Next sync part expected: `(round, part)`.
    sync_cursor: (u32, u32),
    /// Newest applied epoch.
    committed: Option<u64>,
    applying: Option<u64>,
    staged: BTreeMap<u64, Staged>,
    /// PeerLost arrived during an apply: fail over once it is done.
    failover_pending: bool,
    /// The primary released the output of every epoch through this one.
    released_known: Option<u64>,
    /// Protocol violations seen (each one makes the standby Broken).
    violations: u64,
    _msg: std::marker::PhantomData<fn(M)>,
}

impl<M> Standby<M> {
    pub fn new(cfg: StandbyConfig) -> Standby<M> {
        assert!(cfg.max_staged >= 1 && cfg.max_staged <= MAX_STAGED_LIMIT);
        Standby {
            cfg,
            phase: StandbyPhase::WaitingForSync,
            sync_cursor: (0, 0),
            committed: None,
            applying: None,
            staged: BTreeMap::new(),
            failover_pending: false,
            released_known: None,
            violations: 0,
            _msg: std::marker::PhantomData,
        }
    }

    pub fn phase(&self) -> StandbyPhase {
        self.phase
    }

    /// The newest epoch applied (and acknowledged).
    pub fn committed(&self) -> Option<u64> {
        self.committed
    }

    /// Epochs held in staging.
    pub fn staged_epochs(&self) -> usize {
        self.staged.len()
    }

    /// Protocol violations seen.
    pub fn violations(&self) -> u64 {
        self.violations
    }

    fn base(&self) -> u64 {
        self.committed.map_or(0, |c| c + 1)
    }

    fn ended(&self) -> bool {
        matches!(
            self.phase,
            StandbyPhase::FailedOver | StandbyPhase::NoReplica
        )
    }

    /// Feeds one event; returns the actions to perform, in order. An error means the
    /// event was refused; for protocol violations the standby is now Broken.
    pub fn on_event(&mut self, ev: StandbyEvent<M>) -> Result<Vec<StandbyAction<M>>, StandbyError> {
        let mut out = Vec::new();
        if self.ended() {
            return match ev {
                StandbyEvent::PeerLost => Ok(out),
                _ => Err(StandbyError::AfterFailover("message")),
            };
        }
        let r = self.step(ev, &mut out);
        if let Err(e) = &r {
            if !matches!(e, StandbyError::WrongApplied { .. }) {
                self.violations += 1;
                log::error!("checkpoint stream from the primary is broken: {e}");
                self.phase = StandbyPhase::Broken;
            }
        }
        self.check_invariants();
        r.map(|()| out)
    }

    fn step(
        &mut self,
        ev: StandbyEvent<M>,
        out: &mut Vec<StandbyAction<M>>,
    ) -> Result<(), StandbyError> {
        let broken = self.phase == StandbyPhase::Broken;
        match ev {
            StandbyEvent::SyncPart {
                round,
                part,
                parts,
                msg,
            } => {
                if broken {
                    return Ok(());
                }
                let (want_round, want_part) = self.sync_cursor;
                if self.committed.is_some() || (round, part) < (want_round, want_part) {
                    // Already written (a resend), or the sync is over.
                    return Ok(());
                }
                if (round, part) != (want_round, want_part) || parts == 0 || part >= parts {
                    return Err(StandbyError::SyncOutOfOrder {
                        round,
                        part,
                        want_round,
                        want_part,
                    });
                }
                self.phase = StandbyPhase::Syncing;
                self.sync_cursor = if part + 1 == parts {
                    (round + 1, 0)
                } else {
                    (round, part + 1)
                };
                out.push(StandbyAction::WriteSync { round, part, msg });
                self.try_apply(out);
            }
            StandbyEvent::EpochPart {
                epoch,
                part,
                parts,
                sync_rounds,
                released_through,
                msg,
            } => {
                if broken {
                    return Ok(());
                }
                if let Some(r) = released_through {
                    // The primary releases an epoch only after our ack of it.
                    if self.committed.is_none_or(|c| r > c) {
                        return Err(StandbyError::ReleasedUncommitted {
                            released: r,
                            committed: self.committed,
                        });
                    }
                    if self.released_known.is_none_or(|k| r > k) {
                        self.released_known = Some(r);
                        out.push(StandbyAction::TrimOutput { through: r });
                    }
                }
                let base = self.base();
                if epoch < base {
                    return Ok(()); // already applied: a resend
                }
                if epoch - base >= u64::from(self.cfg.max_staged) {
                    return Err(StandbyError::BeyondWindow {
                        epoch,
                        base,
                        max: self.cfg.max_staged,
                    });
                }
                if parts == 0 || part >= parts || parts > crate::messages::MAX_PARTS {
                    return Err(StandbyError::PartMismatch { epoch, part, parts });
                }
                let s = self.staged.entry(epoch).or_insert_with(|| Staged {
                    parts,
                    received: vec![false; parts as usize],
                    count: 0,
                    sync_rounds,
                });
                if s.parts != parts || s.sync_rounds != sync_rounds {
                    return Err(StandbyError::PartMismatch { epoch, part, parts });
                }
                if s.received[part as usize] {
                    return Ok(()); // duplicate
                }
                s.received[part as usize] = true;
                s.count += 1;
                if self.phase == StandbyPhase::WaitingForSync {
                    self.phase = StandbyPhase::Syncing;
                }
                out.push(StandbyAction::Stage { epoch, part, msg });
                self.try_apply(out);
            }
            StandbyEvent::BadMessage => {
                if !broken {
                    return Err(StandbyError::BadMessage);
                }
            }
            StandbyEvent::Applied { epoch } => {
                if self.applying != Some(epoch) {
                    return Err(StandbyError::WrongApplied {
                        got: epoch,
                        want: self.applying,
                    });
                }
                self.applying = None;
                self.staged.remove(&epoch);
                self.committed = Some(epoch);
                if self.phase == StandbyPhase::Syncing {
                    self.phase = StandbyPhase::Mirroring;
                }
                // Only now, with the epoch in the mirror and the disk synced.
                out.push(StandbyAction::Ack { epoch });
                if self.failover_pending {
                    self.fail_over(out);
                } else if !broken {
                    self.try_apply(out);
                }
            }
            StandbyEvent::SwapRequest {
                epoch,
                released_through,
            } => {
                if broken {
                    return Ok(());
                }
                if let Some(e) = self.swap_refusal(epoch, released_through) {
                    return Err(e);
                }
                if let Some(r) = released_through {
                    if self.released_known.is_none_or(|k| r > k) {
                        self.released_known = Some(r);
                        out.push(StandbyAction::TrimOutput { through: r });
                    }
                }
                log::info!("planned role swap at epoch {epoch}: taking the VM over");
                out.push(StandbyAction::AcceptSwap { epoch });
                self.phase = StandbyPhase::FailedOver;
                out.push(StandbyAction::Failover {
                    last_committed: epoch,
                    released_through: self.released_known,
                });
            }
            StandbyEvent::PeerLost => {
                if self.applying.is_some() {
                    // An apply is atomic from the protocol's view: let it finish.
                    self.failover_pending = true;
                } else {
                    self.fail_over(out);
                }
            }
        }
        Ok(())
    }

    /// Why a swap at `epoch` cannot be accepted now (None: it can): the primary sends
    /// it only after this standby's ack of `epoch`, and captures nothing after it, so
    /// the replica must be exactly the swap point. The driver asks this before it asks
    /// its quorum for the grant a swap needs.
    pub fn swap_refusal(&self, epoch: u64, released_through: Option<u64>) -> Option<StandbyError> {
        if self.committed != Some(epoch)
            || self.applying.is_some()
            || !self.staged.is_empty()
            || released_through.is_some_and(|r| r > epoch)
        {
            return Some(StandbyError::SwapNotAtCommitted {
                epoch,
                committed: self.committed,
                staged: self.staged.len(),
            });
        }
        None
    }

    fn fail_over(&mut self, out: &mut Vec<StandbyAction<M>>) {
        if !self.staged.is_empty() {
            self.staged.clear();
            out.push(StandbyAction::DiscardStaged);
        }
        match self.committed {
            Some(last_committed) => {
                log::warn!(
                    "primary lost: failing over from epoch {last_committed}. Without a \
                     quorum witness, a cut of all links with both PMs alive leads to two \
                     running copies"
                );
                self.phase = StandbyPhase::FailedOver;
                out.push(StandbyAction::Failover {
                    last_committed,
                    released_through: self.released_known,
                });
            }
            None => {
                log::error!("primary lost before the first checkpoint committed: no replica");
                self.phase = StandbyPhase::NoReplica;
                out.push(StandbyAction::NoReplica);
            }
        }
    }

    fn try_apply(&mut self, out: &mut Vec<StandbyAction<M>>) {
        if self.applying.is_some() {
            return;
        }
        let next = self.base();
        let Some(s) = self.staged.get(&next) else {
            return;
        };
        if !s.complete() {
            return;
        }
        // Epoch 0 lands on top of the initial sync: every round must be in the mirror.
        if next == 0 && self.sync_cursor != (s.sync_rounds, 0) {
            return;
        }
        self.applying = Some(next);
        out.push(StandbyAction::Apply { epoch: next });
    }

    fn check_invariants(&self) {
        assert!(self.staged.len() <= self.cfg.max_staged as usize);
        let base = self.base();
        for (e, s) in &self.staged {
            assert!(*e >= base && *e - base < u64::from(self.cfg.max_staged));
            assert!(s.count <= s.parts);
        }
        if let Some(a) = self.applying {
            // Only the next epoch in order, and only when complete.
            assert_eq!(a, base);
            assert!(self.staged.get(&a).is_some_and(Staged::complete));
        }
        if self.phase == StandbyPhase::Mirroring {
            assert!(self.committed.is_some());
        }
        if let Some(r) = self.released_known {
            assert!(self.committed.is_some_and(|c| c >= r));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use StandbyAction as A;
    use StandbyEvent as E;

    fn sb() -> Standby {
        Standby::new(StandbyConfig { max_staged: 2 })
    }

    fn ep(epoch: u64, part: u32, parts: u32) -> E {
        E::EpochPart {
            epoch,
            part,
            parts,
            sync_rounds: 1,
            released_through: None,
            msg: (),
        }
    }

    fn synced() -> Standby {
        let mut s = sb();
        assert_eq!(
            s.on_event(E::SyncPart {
                round: 0,
                part: 0,
                parts: 1,
                msg: ()
            })
            .unwrap(),
            [A::WriteSync {
                round: 0,
                part: 0,
                msg: ()
            }]
        );
        assert_eq!(
            s.on_event(ep(0, 0, 1)).unwrap(),
            [
                A::Stage {
                    epoch: 0,
                    part: 0,
                    msg: ()
                },
                A::Apply { epoch: 0 }
            ]
        );
        assert_eq!(
            s.on_event(E::Applied { epoch: 0 }).unwrap(),
            [A::Ack { epoch: 0 }]
        );
        assert_eq!(s.phase(), StandbyPhase::Mirroring);
        s
    }

    #[test]
    fn epoch_zero_waits_for_every_sync_round() {
        let mut s = sb();
        // Epoch 0 says 2 rounds came first; it arrives early (reordered).
        let e0 = E::EpochPart {
            epoch: 0,
            part: 0,
            parts: 1,
            sync_rounds: 2,
            released_through: None,
            msg: (),
        };
        assert_eq!(
            s.on_event(e0).unwrap(),
            [A::Stage {
                epoch: 0,
                part: 0,
                msg: ()
            }]
        );
        s.on_event(E::SyncPart {
            round: 0,
            part: 0,
            parts: 1,
            msg: (),
        })
        .unwrap();
        assert_eq!(
            s.on_event(E::SyncPart {
                round: 1,
                part: 0,
                parts: 1,
                msg: ()
            })
            .unwrap(),
            [
                A::WriteSync {
                    round: 1,
                    part: 0,
                    msg: ()
                },
                A::Apply { epoch: 0 }
            ]
        );
    }

    #[test]
    fn sync_gap_breaks_and_no_replica() {
        let mut s = sb();
        assert!(s
            .on_event(E::SyncPart {
                round: 0,
                part: 1,
                parts: 2,
                msg: ()
            })
            .is_err());
        assert_eq!(s.phase(), StandbyPhase::Broken);
        assert_eq!(s.on_event(E::PeerLost).unwrap(), [A::NoReplica]);
    }

    #[test]
    fn parts_in_any_order_apply_in_epoch_order() {
        let mut s = synced();
        assert_eq!(
            s.on_event(ep(2, 0, 1)).unwrap(),
            [A::Stage {
                epoch: 2,
                part: 0,
                msg: ()
            }]
        );
        assert_eq!(
            s.on_event(ep(1, 1, 2)).unwrap(),
            [A::Stage {
                epoch: 1,
                part: 1,
                msg: ()
            }]
        );
        assert!(s.on_event(ep(1, 1, 2)).unwrap().is_empty()); // duplicate
        assert_eq!(
            s.on_event(ep(1, 0, 2)).unwrap(),
            [
                A::Stage {
                    epoch: 1,
                    part: 0,
                    msg: ()
                },
                A::Apply { epoch: 1 }
            ]
        );
        assert_eq!(
            s.on_event(E::Applied { epoch: 1 }).unwrap(),
            [A::Ack { epoch: 1 }, A::Apply { epoch: 2 }]
        );
        assert_eq!(
            s.on_event(E::Applied { epoch: 2 }).unwrap(),
            [A::Ack { epoch: 2 }]
        );
        assert!(s.on_event(ep(1, 0, 2)).unwrap().is_empty()); // stale resend
        assert_eq!(s.committed(), Some(2));
    }

    #[test]
    fn window_and_mismatch_violations() {
        let mut s = synced();
        assert!(matches!(
            s.on_event(ep(3, 0, 1)),
            Err(StandbyError::BeyondWindow { .. })
        ));
        assert_eq!(s.phase(), StandbyPhase::Broken);
        // Broken: later epochs are ignored, the committed one remains the failover point.
        assert!(s.on_event(ep(1, 0, 1)).unwrap().is_empty());
        assert_eq!(
            s.on_event(E::PeerLost).unwrap(),
            [A::Failover {
                last_committed: 0,
                released_through: None
            }]
        );

        let mut s = synced();
        s.on_event(ep(1, 0, 2)).unwrap();
        assert!(matches!(
            s.on_event(ep(1, 1, 3)),
            Err(StandbyError::PartMismatch { .. })
        ));
    }

    #[test]
    fn peer_lost_discards_incomplete_and_waits_for_apply() {
        let mut s = synced();
        s.on_event(ep(1, 0, 2)).unwrap();
        assert_eq!(
            s.on_event(E::PeerLost).unwrap(),
            [
                A::DiscardStaged,
                A::Failover {
                    last_committed: 0,
                    released_through: None
                }
            ]
        );
        assert!(s.on_event(ep(1, 1, 2)).is_err());

        let mut s = synced();
        s.on_event(ep(1, 0, 1)).unwrap();
        assert!(s.on_event(E::PeerLost).unwrap().is_empty());
        assert_eq!(
            s.on_event(E::Applied { epoch: 1 }).unwrap(),
            [
                A::Ack { epoch: 1 },
                A::Failover {
                    last_committed: 1,
                    released_through: None
                }
            ]
        );
    }
}

#[cfg(test)]
mod release_tests {
    use super::*;

    #[test]
    fn released_progress_trims_and_reaches_failover() {
        let mut s: Standby = Standby::new(StandbyConfig { max_staged: 2 });
        let part = |epoch, released_through| StandbyEvent::EpochPart {
            epoch,
            part: 0,
            parts: if epoch == 2 { 2 } else { 1 },
            sync_rounds: 0,
            released_through,
            msg: (),
        };
        s.on_event(part(0, None)).unwrap();
        s.on_event(StandbyEvent::Applied { epoch: 0 }).unwrap();
        s.on_event(part(1, None)).unwrap();
        s.on_event(StandbyEvent::Applied { epoch: 1 }).unwrap();
        let a = s.on_event(part(2, Some(0))).unwrap();
        assert_eq!(a[0], StandbyAction::TrimOutput { through: 0 });
        // Lost: epoch 1's output may not have been released by the primary.
        let a = s.on_event(StandbyEvent::PeerLost).unwrap();
        assert_eq!(
            a.last(),
            Some(&StandbyAction::Failover {
                last_committed: 1,
                released_through: Some(0)
            })
        );
        // A release claim beyond what is committed is a violation.
        let mut s: Standby = Standby::new(StandbyConfig { max_staged: 2 });
        assert!(s.on_event(part(0, Some(0))).is_err());
    }
}
