//! The primary's checkpoint protocol: a pure state machine. Events in (time passed in),
//! actions out; the driver ([`crate::primary`]) performs the actions against the VMM and
//! the A-Link and feeds back what happened.
//!
//! ```text
//!   Idle --Start--> InitialSync(round 0: all memory, guest running)
//!        InitialSync(r) --SyncRoundSent(r, pages)--> InitialSync(r+1)   [pages large, r+1 < max]
//!        InitialSync(r) --SyncRoundSent(r, pages)--> Protected, Capture(0)  [small or round limit]
//!   Protected: epoch N runs; on Tick (epoch_len elapsed) or OutputWaiting (min_epoch elapsed,
//!              and less than coalesce_bytes of earlier epochs unacknowledged, or none):
//!        unacked < max_in_flight  -> Capture(N)         (pause, capture, stage, resume)
//!        otherwise                -> ThrottleGuest      (guest stays paused until an ack)
//!      Captured(N) -> Send(N);  Ack(N) -> ReleaseOutput(N) [+ Capture if throttled]
//!   any --PeerLost--> Simplex (EnterSimplex: release all held output, stop checkpointing)
//!
//!   Planned role swap (Protected, epoch 0 acknowledged):
//!     SwapRequested -> PauseForSwap (guest paused for good), then, when the window has
//!                      room, CaptureFinal(F) (captured like any epoch, guest left paused)
//!                      From the request on, acks release nothing here (held from H, the
//!                      first epoch not released at the request).
//!     Captured(F) -> Send(F);  Ack(F) -> SendSwap(F, released H-1)
//!     SwapAccepted(F) -> SwappedOut, HandOver(F): the output of H..=F held here is
//!                      discarded; the standby releases it and resumes the VM from F
//!     PeerLost before SwapAccepted -> Simplex as above: the guest resumes HERE
//!     SwapRefused(F) (the standby's quorum did not grant it the next generation)
//!                   -> ReleaseOutput(F), ResumeAfterSwap: Protected, the guest resumes
//!                      HERE, checkpointing goes on as before the request
//! ```
//!
//! Why the swap loses and duplicates nothing: the guest is paused at the end of F, so
//! no output exists after F; everything before H was released here before the
//! request, H..=F (committed on the standby) is released by the standby at takeover
//! and discarded here. If the standby is lost before it accepted, Simplex releases
//! H..=F here (the standby never ran the VM).
//!
//! Why nothing is released here once the swap is requested: a client answered from
//! here sends its next request here, to the TAP of a guest that never runs again
//! (the new primary's MAC announce comes later); the request dies with it and the
//! client resends it only after its TCP retransmission timeout (>= 200 ms on Linux:
//! the swap's client-visible stall, measured by capture). Released by the standby
//! after its announce, the answers bring the next requests to the new primary. Until the acceptance arrives the old primary may still resume (standby
//! lost); once it arrived it never does. A cut of every link between the two is the
//! usual failover case (the standby takes over from F, as it would anyway).
//!
//! Why releasing held output in Simplex is safe: output is held only so that no one
//! outside ever sees output from a state a failover could roll back. Once the standby is
//! gone there is no failover, hence no rollback: the primary's state is the only one.
//! The hazard is a standby that is not gone but cut off (all links down, both PMs alive):
//! it fails over too and two copies run. Until the quorum issue adds a witness that
//! decides which side may continue, this is documented and logged, not prevented.

use std::time::Duration;

/// Tunables, with defaults.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PrimaryConfig {
    /// Epoch length when no output is waiting.
    pub epoch_len: Duration,
    /// An epoch with output waiting ends early, but not before it has run this long (so
    /// a chatty guest cannot turn every output byte into a checkpoint).
    pub min_epoch: Duration,
    /// Epochs captured and not yet acknowledged, at most. Beyond, the guest is paused
    /// until an acknowledgement arrives: memory for staged epochs stays bounded.
    pub max_in_flight: u32,
    /// An epoch with output waiting ends early only while the epochs in flight hold
    /// less than this many bytes (or none is in flight); past it, it waits for an
    /// acknowledgement (or `epoch_len`). A guest whose epochs are small (a server
    /// replying to requests) keeps its early ends; one that dirties pages fast and
    /// writes output all the time (its replies could not leave before the queued
    /// epochs are acknowledged anyway) gets fewer, larger epochs instead of a
    /// saturated pipeline: fewer pauses, fewer copies of the same hot pages.
    pub coalesce_bytes: u64,
    /// Initial-sync rounds at most (round 0 copies all of memory).
    pub sync_max_rounds: u32,
    /// A sync round (after round 0) this small ends the initial sync: the rest goes in
    /// the stop-and-copy of epoch 0.
    pub sync_small_pages: u64,
}

impl Default for PrimaryConfig {
    fn default() -> Self {
        PrimaryConfig {
            // Chosen from the epoch-length sweep (`twinrun-bench --only ft-epoch`,
            // benches/README.md): a guest with output waiting ends its epoch after
            // `min_epoch` whatever this is, so request latency and kv throughput did
            // not move from 5 to 80 ms (added p50 2.0-2.3 ms). For a guest without
            // output the pause share fell from 5.5 % (5 ms) to 3.6 % (20 ms) and no
            // further at 40-80 ms, while the pause per epoch kept growing (p50 at
            // 10k pages/s: 0.23, 0.42, 0.87, 1.07 ms at 5, 20, 40, 80 ms). 20 ms is
            // the shortest length past which longer epochs buy nothing but longer
            // stalls, more staging memory and more work lost at a failover.
            epoch_len: Duration::from_millis(20),
            // Chosen from the minimum-epoch sweep (`--only ft-min-epoch`): with the
            // driver woken by waiting output, the added reply latency p50 was 0.7 ms
            // at 0-0.5 ms, 1.2 ms at 1 ms, 2.2 ms at 2 ms, 5.2 ms at 5 ms; kv req/s
            // was best at 0.25-1 ms with 10 and 50 clients. 0.5 ms keeps the latency
            // of 0 while bounding a chatty guest to 2,000 checkpoints a second.
            min_epoch: Duration::from_micros(500),
            max_in_flight: 4,
            coalesce_bytes: 1 << 20,
            sync_max_rounds: 8,
            sync_small_pages: 1024,
        }
    }
}

/// Hard ceiling on `max_in_flight` (each in-flight epoch holds a staging buffer).
pub const MAX_IN_FLIGHT_LIMIT: u32 = 64;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PrimaryPhase {
    Idle,
    InitialSync {
        round: u32,
    },
    Protected,
    Simplex,
    /// A planned role swap handed the VM to the standby (it accepted at the final
    /// epoch): this side's guest stays paused for good; the session is over.
    SwappedOut,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PrimaryEvent {
    Start {
        now: Duration,
    },
    /// Round `round` of the initial sync is handed to the transport; it held `pages`.
    SyncRoundSent {
        round: u32,
        pages: u64,
    },
    Tick {
        now: Duration,
    },
    /// The guest produced output that is now held (console bytes or a TX frame).
    OutputWaiting {
        now: Duration,
    },
    /// Epoch `epoch` is captured and staged (`bytes` of checkpoint data); the guest runs
    /// again.
    Captured {
        epoch: u64,
        now: Duration,
        bytes: u64,
    },
    /// The standby applied every epoch through `epoch`.
    Ack {
        epoch: u64,
    },
    /// Every link to the standby is down (heartbeats timed out).
    PeerLost,
    // The planned role swap (see `protocol::primary` docs: "Planned role swap").
    /// An operator asked to hand the VM to the standby at the next epoch boundary.
    SwapRequested,
    /// The standby took the VM over at `epoch` (the handover point).
    SwapAccepted {
        epoch: u64,
    },
    /// The standby refused to take the VM over at `epoch` (its quorum gave no grant).
    SwapRefused {
        epoch: u64,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PrimaryAction {
    /// Harvest the dirty pages (round 0: all of memory) and send them while the guest
    /// runs; report `SyncRoundSent`.
    SyncRound { round: u32 },
    /// Pause the guest (if not already paused by a throttle), close the output epoch
    /// `epoch` (epoch 0: turn output commit on), harvest dirty pages, capture the state,
    /// take the disk journal, copy the pages into a staging buffer, resume; report
    /// `Captured`.
    Capture { epoch: u64 },
    /// Send the staged epoch.
    Send { epoch: u64 },
    /// Pause the guest and keep it paused: too many epochs are unacknowledged.
    ThrottleGuest,
    /// Release the output held for every epoch through `through`, in order.
    ReleaseOutput { through: u64 },
    /// The standby is gone: release all held output, stop holding output and stop
    /// checkpointing; resume the guest if it was throttled.
    EnterSimplex,
    /// Swap: pause the guest (if not already paused) and keep it paused.
    PauseForSwap,
    /// Swap: capture `epoch` like `Capture` but leave the guest paused (it is the swap
    /// point: nothing runs here after it).
    CaptureFinal { epoch: u64 },
    /// Swap: the final epoch is acknowledged (its output and that of every epoch
    /// after `released_through` stay held here): tell the standby to take the VM over
    /// at `epoch` and to release the output after `released_through` itself.
    SendSwap {
        epoch: u64,
        released_through: Option<u64>,
    },
    /// Swap: the standby accepted; discard the output held here (after the
    /// `released_through` of `SendSwap`: the standby releases it); this side's guest
    /// never runs again (its VM is stopped by the caller), the session ends.
    HandOver { epoch: u64 },
    /// Swap refused by the standby: resume the guest here (the swap point's output
    /// was released by the `ReleaseOutput` before); checkpointing goes on.
    ResumeAfterSwap { epoch: u64 },
}

/// How far a requested role swap got (see `PrimaryPhase::SwappedOut`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SwapStage {
    /// The guest is paused; the final epoch is captured as soon as the window allows.
    Pausing,
    /// The final epoch is captured (or being captured); waiting for its ack.
    Final(u64),
    /// `Swap` was sent after the final epoch's ack; waiting for the acceptance. From
    /// here the guest is never resumed by anything but the loss of the standby.
    Sent(u64),
}

/// Input that the protocol does not allow (from a faulty or hostile peer, or a driver
/// bug); the event is ignored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PrimaryError {
    #[error("ack for epoch {epoch}, but only epochs before {sent_below} were sent")]
    AckForUnsent { epoch: u64, sent_below: u64 },
    #[error("{event} in phase {phase:?}")]
    Unexpected {
        event: &'static str,
        phase: PrimaryPhase,
    },
    #[error("captured epoch {got}, expected {want:?}")]
    WrongCapture { got: u64, want: Option<u64> },
    #[error("sync round {got} reported, round {want} is running")]
    WrongRound { got: u32, want: u32 },
    #[error("role swap refused: {0}")]
    SwapRefused(&'static str),
    #[error("swap accepted at epoch {got}, but the swap is at {want:?}")]
    WrongSwap { got: u64, want: Option<SwapStage> },
}

/// The primary's protocol state.
#[derive(Debug)]
pub struct Primary {
    cfg: PrimaryConfig,
    phase: PrimaryPhase,
    /// The epoch the guest is running now (captured next).
    next_epoch: u64,
    /// A `Capture` was issued and `Captured` has not come back.
    capturing: Option<u64>,
    /// Every epoch below this is acknowledged.
    first_unacked: u64,
    /// Output of every epoch below this was released.
    released_below: u64,
    epoch_started: Duration,
    output_waiting: bool,
    throttled: bool,
    sync_rounds: u32,
    /// Bytes of each unacknowledged epoch, oldest first (at most `max_in_flight`).
    in_flight: std::collections::VecDeque<(u64, u64)>,
    in_flight_bytes: u64,
    /// A planned role swap in progress.
    swap: Option<SwapStage>,
}

impl Primary {
    /// Panics on a configuration outside the limits (a programming error, checked once).
    pub fn new(cfg: PrimaryConfig) -> Primary {
        assert!(cfg.max_in_flight >= 1 && cfg.max_in_flight <= MAX_IN_FLIGHT_LIMIT);
        assert!(cfg.sync_max_rounds >= 1);
        assert!(cfg.min_epoch <= cfg.epoch_len);
        Primary {
            cfg,
            phase: PrimaryPhase::Idle,
            next_epoch: 0,
            capturing: None,
            first_unacked: 0,
            released_below: 0,
            epoch_started: Duration::ZERO,
            output_waiting: false,
            throttled: false,
            sync_rounds: 0,
            in_flight: std::collections::VecDeque::new(),
            in_flight_bytes: 0,
            swap: None,
        }
    }

    /// The role swap in progress, if any.
    pub fn swap(&self) -> Option<SwapStage> {
        self.swap
    }

    /// Bytes of checkpoint data captured and not yet acknowledged.
    pub fn in_flight_bytes(&self) -> u64 {
        self.in_flight_bytes
    }

    /// Waiting output may end the running epoch early (see
    /// [`PrimaryConfig::coalesce_bytes`]).
    fn may_end_early(&self) -> bool {
        self.output_waiting
            && (self.in_flight.is_empty() || self.in_flight_bytes < self.cfg.coalesce_bytes)
    }

    pub fn config(&self) -> PrimaryConfig {
        self.cfg
    }

    pub fn phase(&self) -> PrimaryPhase {
        self.phase
    }

    /// True once the standby acknowledged the baseline (epoch 0) and until it is lost.
    pub fn is_protected(&self) -> bool {
        self.phase == PrimaryPhase::Protected && self.first_unacked > 0
    }

    /// Epochs captured and not yet acknowledged.
    pub fn unacked(&self) -> u64 {
        self.next_epoch - self.first_unacked
    }

    /// The epoch the guest is running now: output produced now belongs to it.
    pub fn running_epoch(&self) -> u64 {
        self.next_epoch
    }

    /// The newest acknowledged epoch.
    pub fn acked(&self) -> Option<u64> {
        self.first_unacked.checked_sub(1)
    }

    /// Output of every epoch through this one was released.
    pub fn released(&self) -> Option<u64> {
        self.released_below.checked_sub(1)
    }

    pub fn is_throttled(&self) -> bool {
        self.throttled
    }

    /// Initial-sync rounds before epoch 0 (the standby needs all of them).
    pub fn sync_rounds(&self) -> u32 {
        self.sync_rounds
    }

    /// When the driver should tick next (None: nothing is time-driven now).
    pub fn next_deadline(&self) -> Option<Duration> {
        if self.phase != PrimaryPhase::Protected
            || self.capturing.is_some()
            || self.throttled
            || self.swap.is_some()
        {
            return None;
        }
        let after = if self.may_end_early() {
            self.cfg.min_epoch
        } else {
            self.cfg.epoch_len
        };
        Some(self.epoch_started + after)
    }

    /// Feeds one event; returns the actions to perform, in order.
    pub fn on_event(&mut self, ev: PrimaryEvent) -> Result<Vec<PrimaryAction>, PrimaryError> {
        let mut out = Vec::new();
        match ev {
            PrimaryEvent::Start { now } => {
                if self.phase != PrimaryPhase::Idle {
                    return Err(self.unexpected("start"));
                }
                self.epoch_started = now;
                self.phase = PrimaryPhase::InitialSync { round: 0 };
                out.push(PrimaryAction::SyncRound { round: 0 });
            }
            PrimaryEvent::SyncRoundSent { round, pages } => {
                let PrimaryPhase::InitialSync { round: want } = self.phase else {
                    if self.phase == PrimaryPhase::Simplex {
                        return Ok(out);
                    }
                    return Err(self.unexpected("sync round sent"));
                };
                if round != want {
                    return Err(PrimaryError::WrongRound { got: round, want });
                }
                let done = round + 1 >= self.cfg.sync_max_rounds
                    || (round > 0 && pages <= self.cfg.sync_small_pages);
                if done {
                    // Stop-and-copy: epoch 0 carries what the last round missed and the
                    // first VM state; from here on output is held.
                    self.sync_rounds = round + 1;
                    self.phase = PrimaryPhase::Protected;
                    self.capture(&mut out);
                } else {
                    self.phase = PrimaryPhase::InitialSync { round: round + 1 };
                    out.push(PrimaryAction::SyncRound { round: round + 1 });
                }
            }
            PrimaryEvent::Tick { now } => self.maybe_end_epoch(now, &mut out),
            PrimaryEvent::OutputWaiting { now } => {
                if self.phase == PrimaryPhase::Protected {
                    self.output_waiting = true;
                    self.maybe_end_epoch(now, &mut out);
                }
            }
            PrimaryEvent::Captured { epoch, now, bytes } => {
                if self.phase == PrimaryPhase::Simplex {
                    // The standby went away during the capture; nothing to send.
                    return Ok(out);
                }
                if self.capturing != Some(epoch) {
                    return Err(PrimaryError::WrongCapture {
                        got: epoch,
                        want: self.capturing,
                    });
                }
                self.capturing = None;
                self.next_epoch = epoch + 1;
                self.in_flight.push_back((epoch, bytes));
                self.in_flight_bytes += bytes;
                self.throttled = false;
                self.epoch_started = now;
                self.output_waiting = false;
                if self.swap == Some(SwapStage::Pausing) {
                    self.swap = Some(SwapStage::Final(epoch));
                }
                out.push(PrimaryAction::Send { epoch });
            }
            PrimaryEvent::Ack { epoch } => {
                if self.phase != PrimaryPhase::Protected {
                    return Ok(out);
                }
                // Only epochs whose capture completed were sent.
                let sent_below = self.next_epoch;
                if epoch >= sent_below {
                    return Err(PrimaryError::AckForUnsent { epoch, sent_below });
                }
                if epoch < self.first_unacked {
                    // Cumulative acks: an older one carries no news.
                    return Ok(out);
                }
                self.first_unacked = epoch + 1;
                // Once a swap is requested, the output held here is released by the
                // side that owns the VM after the swap: the standby (it re-releases the
                // committed epochs after `released_through`, after its MAC announce), so
                // the reply a client waits for leaves from where its next request will
                // go (see the module docs).
                let release_below = if self.swap.is_some() {
                    self.released_below
                } else {
                    epoch + 1
                };
                let release = release_below > self.released_below;
                self.released_below = self.released_below.max(release_below);
                while let Some(&(e, b)) = self.in_flight.front() {
                    if e > epoch {
                        break;
                    }
                    self.in_flight.pop_front();
                    self.in_flight_bytes -= b;
                }
                if release {
                    out.push(PrimaryAction::ReleaseOutput {
                        through: self.released_below - 1,
                    });
                }
                if self.swap.is_some() {
                    self.swap_step(&mut out);
                    self.check_invariants();
                    return Ok(out);
                }
                if self.throttled && self.capturing.is_none() {
                    // The throttle held the guest because an epoch was due: capture it
                    // now that there is room (the guest is already paused).
                    self.capture(&mut out);
                }
            }
            PrimaryEvent::PeerLost => {
                if matches!(self.phase, PrimaryPhase::Simplex | PrimaryPhase::Idle) {
                    self.phase = PrimaryPhase::Simplex;
                    return Ok(out);
                }
                log::warn!(
                    "standby lost: running unprotected (simplex); held output is released. \
                     Without a quorum witness, a cut of all links with both PMs alive \
                     leads to two running copies"
                );
                if self.phase == PrimaryPhase::SwappedOut {
                    // The VM is the standby's now: nothing here resumes.
                    return Ok(out);
                }
                if let Some(s) = self.swap.take() {
                    log::warn!(
                        "role swap ({s:?}) failed: the standby was lost before it accepted; \
                         the VM runs on here"
                    );
                }
                self.phase = PrimaryPhase::Simplex;
                self.throttled = false;
                self.output_waiting = false;
                out.push(PrimaryAction::EnterSimplex);
            }
            PrimaryEvent::SwapRequested => {
                if self.phase != PrimaryPhase::Protected {
                    return Err(PrimaryError::SwapRefused(match self.phase {
                        PrimaryPhase::Idle | PrimaryPhase::InitialSync { .. } => {
                            "the pair is not in sync (initial synchronisation running)"
                        }
                        PrimaryPhase::Simplex => "the standby is lost (the VM runs simplex)",
                        _ => "the VM was handed over already",
                    }));
                }
                if self.first_unacked == 0 {
                    return Err(PrimaryError::SwapRefused(
                        "the pair is not in sync (the first checkpoint is not committed yet)",
                    ));
                }
                if self.swap.is_some() {
                    return Err(PrimaryError::SwapRefused("a swap is in progress already"));
                }
                if self.capturing.is_some() {
                    // The driver performs a capture before it takes the next event.
                    return Err(PrimaryError::SwapRefused("a capture is running"));
                }
                self.swap = Some(SwapStage::Pausing);
                self.output_waiting = false;
                if !self.throttled {
                    out.push(PrimaryAction::PauseForSwap);
                }
                // A throttled guest is paused already; its due epoch becomes the final
                // one (captured by swap_step when the window allows).
                self.throttled = false;
                self.swap_step(&mut out);
            }
            PrimaryEvent::SwapAccepted { epoch } => match self.swap {
                Some(SwapStage::Sent(e)) if e == epoch && self.phase == PrimaryPhase::Protected => {
                    self.swap = None;
                    self.phase = PrimaryPhase::SwappedOut;
                    out.push(PrimaryAction::HandOver { epoch });
                }
                other => {
                    return Err(PrimaryError::WrongSwap {
                        got: epoch,
                        want: other,
                    })
                }
            },
            PrimaryEvent::SwapRefused { epoch } => match self.swap {
                Some(SwapStage::Sent(e)) if e == epoch && self.phase == PrimaryPhase::Protected => {
                    // F is acknowledged (Swap left only after its ack): its output, and
                    // every acknowledged epoch's held here since the request, is this
                    // side's to release again, as for any acked epoch.
                    self.swap = None;
                    assert!(self.released_below <= e);
                    self.released_below = e + 1;
                    out.push(PrimaryAction::ReleaseOutput { through: e });
                    out.push(PrimaryAction::ResumeAfterSwap { epoch: e });
                }
                other => {
                    return Err(PrimaryError::WrongSwap {
                        got: epoch,
                        want: other,
                    })
                }
            },
        }
        self.check_invariants();
        Ok(out)
    }

    fn unexpected(&self, event: &'static str) -> PrimaryError {
        PrimaryError::Unexpected {
            event,
            phase: self.phase,
        }
    }

    /// Moves a requested swap on: the final capture once the window has room, the
    /// `Swap` once the final epoch is acknowledged (the output held since the request
    /// stays held: the standby releases it).
    fn swap_step(&mut self, out: &mut Vec<PrimaryAction>) {
        match self.swap {
            Some(SwapStage::Pausing) => {
                if self.capturing.is_none() && self.unacked() < u64::from(self.cfg.max_in_flight) {
                    self.capturing = Some(self.next_epoch);
                    out.push(PrimaryAction::CaptureFinal {
                        epoch: self.next_epoch,
                    });
                }
            }
            Some(SwapStage::Final(e)) => {
                if self.first_unacked > e {
                    assert!(self.released_below <= e);
                    self.swap = Some(SwapStage::Sent(e));
                    out.push(PrimaryAction::SendSwap {
                        epoch: e,
                        released_through: self.released(),
                    });
                }
            }
            Some(SwapStage::Sent(_)) | None => {}
        }
    }

    fn maybe_end_epoch(&mut self, now: Duration, out: &mut Vec<PrimaryAction>) {
        if self.phase != PrimaryPhase::Protected
            || self.capturing.is_some()
            || self.throttled
            || self.swap.is_some()
        {
            return;
        }
        let ran = now.saturating_sub(self.epoch_started);
        let due = ran >= self.cfg.epoch_len || (self.may_end_early() && ran >= self.cfg.min_epoch);
        if !due {
            return;
        }
        if self.unacked() < u64::from(self.cfg.max_in_flight) {
            self.capture(out);
        } else {
            self.throttled = true;
            out.push(PrimaryAction::ThrottleGuest);
        }
    }

    fn capture(&mut self, out: &mut Vec<PrimaryAction>) {
        assert!(self.capturing.is_none());
        assert!(self.unacked() < u64::from(self.cfg.max_in_flight));
        self.capturing = Some(self.next_epoch);
        out.push(PrimaryAction::Capture {
            epoch: self.next_epoch,
        });
    }

    fn check_invariants(&self) {
        // Never more than max_in_flight epochs captured or being captured, unacked.
        let in_flight = self.unacked() + u64::from(self.capturing.is_some());
        assert!(in_flight <= u64::from(self.cfg.max_in_flight));
        // Release only after ack; ack only of sent epochs.
        assert!(self.released_below <= self.first_unacked);
        assert!(self.first_unacked <= self.next_epoch);
        if let Some(c) = self.capturing {
            assert_eq!(c, self.next_epoch);
        }
        if self.throttled {
            assert_eq!(self.phase, PrimaryPhase::Protected);
            assert!(self.swap.is_none());
        }
        match self.swap {
            Some(SwapStage::Pausing) | None => {}
            // Nothing is captured after the final epoch.
            Some(SwapStage::Final(e)) => {
                assert!(e + 1 == self.next_epoch || self.capturing == Some(e));
                assert!(self.released_below <= e);
            }
            // The swap point: everything through it acknowledged; nothing released
            // since the request.
            Some(SwapStage::Sent(e)) => {
                assert_eq!(self.next_epoch, e + 1);
                assert!(self.first_unacked > e);
                assert!(self.released_below <= e);
                assert!(self.capturing.is_none());
            }
        }
        if self.swap.is_some() {
            assert_eq!(self.phase, PrimaryPhase::Protected);
        }
        // The in-flight byte count covers exactly the unacknowledged epochs (until
        // Simplex, which stops counting).
        if self.phase == PrimaryPhase::Protected {
            assert_eq!(self.in_flight.len() as u64, self.unacked());
            assert_eq!(
                self.in_flight.iter().map(|&(_, b)| b).sum::<u64>(),
                self.in_flight_bytes
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use PrimaryAction as A;
    use PrimaryEvent as E;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn cfg() -> PrimaryConfig {
        PrimaryConfig {
            epoch_len: ms(10),
            min_epoch: ms(2),
            max_in_flight: 2,
            coalesce_bytes: 1000,
            sync_max_rounds: 3,
            sync_small_pages: 10,
        }
    }

    /// Runs the primary through the initial sync and the baseline capture.
    fn protected() -> Primary {
        let mut p = Primary::new(cfg());
        assert_eq!(
            p.on_event(E::Start { now: ms(0) }).unwrap(),
            [A::SyncRound { round: 0 }]
        );
        // Round 0 is all of memory; never ends the sync by itself.
        assert_eq!(
            p.on_event(E::SyncRoundSent { round: 0, pages: 5 }).unwrap(),
            [A::SyncRound { round: 1 }]
        );
        assert_eq!(
            p.on_event(E::SyncRoundSent { round: 1, pages: 5 }).unwrap(),
            [A::Capture { epoch: 0 }]
        );
        assert_eq!(p.sync_rounds(), 2);
        assert_eq!(
            p.on_event(E::Captured {
                epoch: 0,
                now: ms(1),
                bytes: 100,
            })
            .unwrap(),
            [A::Send { epoch: 0 }]
        );
        p
    }

    /// Protected, epoch 0 acknowledged, epoch 1 captured and in flight (not acked).
    fn swap_ready() -> Primary {
        let mut p = protected();
        p.on_event(E::Ack { epoch: 0 }).unwrap();
        assert_eq!(
            p.on_event(E::Tick { now: ms(11) }).unwrap(),
            [A::Capture { epoch: 1 }]
        );
        p.on_event(E::Captured {
            epoch: 1,
            now: ms(12),
            bytes: 100,
        })
        .unwrap();
        p
    }

    #[test]
    fn a_swap_releases_nothing_here_after_its_request() {
        let mut p = swap_ready();
        assert_eq!(
            p.on_event(E::SwapRequested).unwrap(),
            [A::PauseForSwap, A::CaptureFinal { epoch: 2 }]
        );
        // Epoch 1 was in flight at the request: its ack releases nothing here (a
        // client answered here would send its next request to a guest that never
        // runs again).
        assert!(p.on_event(E::Ack { epoch: 1 }).unwrap().is_empty());
        assert_eq!(p.released(), Some(0));
        assert_eq!(
            p.on_event(E::Captured {
                epoch: 2,
                now: ms(13),
                bytes: 100,
            })
            .unwrap(),
            [A::Send { epoch: 2 }]
        );
        assert_eq!(
            p.on_event(E::Ack { epoch: 2 }).unwrap(),
            [A::SendSwap {
                epoch: 2,
                released_through: Some(0),
            }]
        );
        assert_eq!(
            p.on_event(E::SwapAccepted { epoch: 2 }).unwrap(),
            [A::HandOver { epoch: 2 }]
        );
        assert_eq!(p.phase(), PrimaryPhase::SwappedOut);
        assert_eq!(p.released(), Some(0));
    }

    #[test]
    fn a_failed_swap_releases_what_it_held_here() {
        let mut p = swap_ready();
        p.on_event(E::SwapRequested).unwrap();
        p.on_event(E::Captured {
            epoch: 2,
            now: ms(13),
            bytes: 100,
        })
        .unwrap();
        assert!(p.on_event(E::Ack { epoch: 2 }).unwrap().len() == 1);
        // The standby is lost before it accepted: the VM runs on here, and Simplex
        // releases everything held (epochs 1 and 2).
        assert_eq!(p.on_event(E::PeerLost).unwrap(), [A::EnterSimplex]);
        assert_eq!(p.phase(), PrimaryPhase::Simplex);
        assert_eq!(p.swap(), None);
    }

    #[test]
    fn sync_stops_at_round_limit() {
        let mut p = Primary::new(cfg());
        p.on_event(E::Start { now: ms(0) }).unwrap();
        for r in 0..2 {
            assert_eq!(
                p.on_event(E::SyncRoundSent {
                    round: r,
                    pages: 1000
                })
                .unwrap(),
                [A::SyncRound { round: r + 1 }]
            );
        }
        assert_eq!(
            p.on_event(E::SyncRoundSent {
                round: 2,
                pages: 1000
            })
            .unwrap(),
            [A::Capture { epoch: 0 }]
        );
        assert!(p.on_event(E::SyncRoundSent { round: 2, pages: 1 }).is_err());
    }

    #[test]
    fn epochs_on_timer_and_early_on_output() {
        let mut p = protected();
        assert!(!p.is_protected());
        assert_eq!(
            p.on_event(E::Ack { epoch: 0 }).unwrap(),
            [A::ReleaseOutput { through: 0 }]
        );
        assert!(p.is_protected());
        assert!(p.on_event(E::Tick { now: ms(10) }).unwrap().is_empty());
        assert_eq!(p.next_deadline(), Some(ms(11)));
        assert_eq!(
            p.on_event(E::Tick { now: ms(11) }).unwrap(),
            [A::Capture { epoch: 1 }]
        );
        // No second capture while one is running.
        assert!(p.on_event(E::Tick { now: ms(50) }).unwrap().is_empty());
        p.on_event(E::Captured {
            epoch: 1,
            now: ms(12),
            bytes: 100,
        })
        .unwrap();
        // Output waiting: not before min_epoch.
        assert!(p
            .on_event(E::OutputWaiting { now: ms(13) })
            .unwrap()
            .is_empty());
        assert_eq!(p.next_deadline(), Some(ms(14)));
        assert_eq!(
            p.on_event(E::Tick { now: ms(14) }).unwrap(),
            [A::Capture { epoch: 2 }]
        );
    }

    #[test]
    fn waiting_output_waits_for_an_ack_when_much_is_in_flight() {
        let mut p = protected();
        p.on_event(E::Ack { epoch: 0 }).unwrap();
        assert_eq!(
            p.on_event(E::Tick { now: ms(11) }).unwrap(),
            [A::Capture { epoch: 1 }]
        );
        // A large epoch in flight (over coalesce_bytes).
        p.on_event(E::Captured {
            epoch: 1,
            now: ms(12),
            bytes: 5000,
        })
        .unwrap();
        assert_eq!(p.in_flight_bytes(), 5000);
        // Output waits, min_epoch passes: no early end, the deadline is the timer's.
        assert!(p
            .on_event(E::OutputWaiting { now: ms(15) })
            .unwrap()
            .is_empty());
        assert_eq!(p.next_deadline(), Some(ms(22)));
        // The ack arrives: the epoch ends at once (its output could not leave earlier).
        assert_eq!(
            p.on_event(E::Ack { epoch: 1 }).unwrap(),
            [A::ReleaseOutput { through: 1 }]
        );
        assert_eq!(p.in_flight_bytes(), 0);
        assert_eq!(p.next_deadline(), Some(ms(14)));
        assert_eq!(
            p.on_event(E::Tick { now: ms(16) }).unwrap(),
            [A::Capture { epoch: 2 }]
        );
        // A small epoch in flight does not hold the next early end back.
        p.on_event(E::Captured {
            epoch: 2,
            now: ms(16),
            bytes: 10,
        })
        .unwrap();
        p.on_event(E::OutputWaiting { now: ms(17) }).unwrap();
        assert_eq!(p.next_deadline(), Some(ms(18)));
        assert_eq!(
            p.on_event(E::Tick { now: ms(18) }).unwrap(),
            [A::Capture { epoch: 3 }]
        );
    }

    #[test]
    fn throttles_at_max_in_flight_and_resumes_on_ack() {
        let mut p = protected();
        // Epoch 0 unacked; epoch 1 may go (max 2).
        assert_eq!(
            p.on_event(E::Tick { now: ms(11) }).unwrap(),
            [A::Capture { epoch: 1 }]
        );
        p.on_event(E::Captured {
            epoch: 1,
            now: ms(11),
            bytes: 100,
        })
        .unwrap();
        assert_eq!(
            p.on_event(E::Tick { now: ms(21) }).unwrap(),
            [A::ThrottleGuest]
        );
        assert!(p.is_throttled());
        assert!(p.on_event(E::Tick { now: ms(40) }).unwrap().is_empty());
        assert_eq!(
            p.on_event(E::Ack { epoch: 0 }).unwrap(),
            [A::ReleaseOutput { through: 0 }, A::Capture { epoch: 2 }]
        );
        // Acks for unsent epochs are refused, stale ones ignored.
        assert!(p.on_event(E::Ack { epoch: 2 }).is_err());
        assert!(p.on_event(E::Ack { epoch: 0 }).unwrap().is_empty());
        assert_eq!(
            p.on_event(E::Ack { epoch: 1 }).unwrap(),
            [A::ReleaseOutput { through: 1 }]
        );
    }

    #[test]
    fn peer_lost_enters_simplex_once() {
        let mut p = protected();
        p.on_event(E::Tick { now: ms(11) }).unwrap();
        assert_eq!(p.on_event(E::PeerLost).unwrap(), [A::EnterSimplex]);
        assert_eq!(p.phase(), PrimaryPhase::Simplex);
        // The capture in progress finishes but is not sent; nothing is time-driven.
        assert!(p
            .on_event(E::Captured {
                epoch: 1,
                now: ms(12),
                bytes: 100,
            })
            .unwrap()
            .is_empty());
        assert!(p.on_event(E::Tick { now: ms(100) }).unwrap().is_empty());
        assert!(p.on_event(E::PeerLost).unwrap().is_empty());
        assert!(p.on_event(E::Ack { epoch: 0 }).unwrap().is_empty());
    }
}
