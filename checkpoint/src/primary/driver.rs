//! The primary's driver: runs the [`Primary`] state machine (and, with mirrored disks,
//! the disk session before it) against a [`PrimaryVm`] and a [`ToStandbyLink`], with a
//! clock. It is where the primary's protocol meets effects: actions become captures,
//! sends, pauses and releases; acks and link events become events.
//!
//! [`PrimaryDriver`] is a step function (no thread, no blocking wait of its own): the
//! real loop [`run_primary`] feeds it what the A-Link delivers and the link events, and
//! `tests/sim.rs` feeds it a simulated network and a toy VM, the same code either way.
//!
//! The real loop: one thread waits for a message (at most until the next epoch deadline
//! or a short poll interval, so that waiting output can end an epoch early), drains
//! link events, ticks. Sends never block for long: when the A-Link's window stays full
//! the link reports a lost standby, which becomes `PeerLost`.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use alink::{Alink, AlinkError, Event, LinkEvent};
use storage_mirror::primary::{PrimaryDisks, ResyncStats, SessionConfig, SessionEnd};
use storage_mirror::resync::ResyncConfig;
use vmm::vstate::hot_pages::HotPageConfig;
use vmm::{Vmm, VmmError};

use super::capture::{
    lent_slices, CaptureError, Captured, Capturer, EpochObserver, LentPart, OutPart,
};
use super::disks::{DiskSide, MirroredDisks, Step};
use super::epoch_copy::EpochCopy;
use super::inbox::{outbox, pump, FromStandby, Inbound, Inbox, OwnGenerations};
use super::swap::{SwapDone, SwapPort, SwapReply};
use super::vm::PrimaryVm;
use crate::link::{SendError, ToStandbyLink};
use crate::messages::{PageRun, ToStandby};
use crate::protocol::{Primary, PrimaryAction, PrimaryConfig, PrimaryEvent, PrimaryPhase};
use crate::verify::HashLog;

/// Commit waits kept for the report at most (about an hour of 20 ms epochs).
const MAX_COMMIT_SAMPLES: usize = 1 << 18;
/// How often the loop looks at waiting output and link events when nothing else wakes it.
const POLL: Duration = Duration::from_millis(1);
/// How often the loop ticks the disk session at least.
const DISK_POLL: Duration = Duration::from_millis(20);

#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    #[error("capture: {0}")]
    Capture(#[from] CaptureError),
    #[error("VMM: {0}")]
    Vmm(#[from] VmmError),
    #[error("A-Link: {0}")]
    Alink(#[from] AlinkError),
    #[error("the standby did not connect within {0:?}")]
    NoStandby(Duration),
    #[error("disk session: {0}")]
    DiskSession(String),
    #[error("encoding a message: {0}")]
    Encode(String),
    #[error("the standby speaks A-Link protocol {version}, which has no such {what}")]
    Unsupported { version: u16, what: &'static str },
    /// The standby knows a newer quorum generation: this primary lost the VM. Nothing
    /// more was released; the caller follows the demoted path.
    #[error("fenced: the standby knows quorum generation {peer}, newer than this primary's {own}")]
    Fenced { peer: u64, own: u64 },
}

/// Tunables of the driver (the protocol's are in [`PrimaryConfig`]).
#[derive(Clone)]
pub struct PrimaryDriverConfig {
    pub protocol: PrimaryConfig,
    /// How long to wait for the standby's first link before giving up.
    pub connect_timeout: Duration,
    /// Pages per part (default: the wire limit).
    pub max_part_pages: Option<u32>,
    /// Parts of at least this many pages are copied by two threads during the pause
    /// (default 512; tests lower it to cover the split copy with small parts).
    pub split_copy_min_pages: Option<u64>,
    /// Where epoch pages are copied: in the pause (default), or after it with the
    /// pages write-protected by userfaultfd until copied (see
    /// [`crate::primary::epoch_copy`]).
    pub epoch_copy: EpochCopy,
    /// Updated with the count of acknowledged epochs as acks arrive (for monitoring).
    pub acked: Option<Arc<AtomicU64>>,
    /// Test mode: hash guest memory and state while paused at every capture and record
    /// them here by epoch (see [`crate::verify`]). Lengthens each pause by a pass over
    /// guest memory.
    pub verify: Option<Arc<HashLog>>,
    /// Mirrored disks: metadata exchange and resync before the memory sync, activity
    /// log while protected, degraded bitmap after the standby is lost. None: the
    /// standby's images are taken to equal the primary's at start (tests of the memory
    /// protocol). The VM's disk hooks must be [`MirroredDisks`] over the same disks.
    pub disks: Option<Arc<PrimaryDisks>>,
    /// Resync pacing.
    pub resync: ResyncConfig,
    /// Return when the standby is lost (the VM runs on; the caller may wait for a new
    /// standby and start another session) instead of idling until `stop`.
    pub return_on_simplex: bool,
    /// Pages the guest keeps writing stay writable and are copied at every epoch
    /// (see `vmm::vstate::hot_pages`); None re-protects every page at every harvest.
    pub hot_pages: Option<HotPageConfig>,
    /// At Simplex, keep every unacknowledged output held (output commit stays on, the
    /// guest runs on) instead of releasing it: the pair's quorum decides what may leave
    /// (a cut-off standby may take over with a witness's grant; output of a history it
    /// never had must then never appear). The caller ends output commit itself.
    pub hold_on_simplex: bool,
    /// The pair's quorum generation, read when a session begins and stamped on its
    /// `Hello` (None: 0, no quorum). A standby that knows a higher one refuses it.
    pub generation: Option<Arc<AtomicU64>>,
    /// Which generations were granted to this node (the quorum's parity rule): an ack
    /// citing a newer one of them is this primary's own grant, learned by the standby
    /// first, and fences nothing (None: every newer generation fences).
    pub own_generations: Option<OwnGenerations>,
    /// Planned role swaps: requests come in here (None: no swap is offered).
    pub swap: Option<Arc<SwapPort>>,
}

impl Default for PrimaryDriverConfig {
    fn default() -> Self {
        PrimaryDriverConfig {
            protocol: PrimaryConfig::default(),
            connect_timeout: Duration::from_secs(10),
            max_part_pages: None,
            split_copy_min_pages: None,
            epoch_copy: EpochCopy::InPause,
            acked: None,
            verify: None,
            disks: None,
            resync: ResyncConfig::default(),
            return_on_simplex: false,
            hot_pages: Some(HotPageConfig::default()),
            hold_on_simplex: false,
            generation: None,
            own_generations: None,
            swap: None,
        }
    }
}

/// What a run did.
#[derive(Clone, Debug, Default)]
pub struct PrimaryReport {
    pub sync_rounds: u32,
    pub epochs_captured: u64,
    pub epochs_acked: u64,
    /// Newest epoch whose output was released.
    pub released: Option<u64>,
    /// The standby was lost and the VM ran on unprotected.
    pub simplex: bool,
    /// Guest pause per epoch capture, sorted.
    pub pauses: Vec<Duration>,
    /// Captures that found the guest already paused by a throttle.
    pub throttles: u64,
    /// Dirty pages of every epoch after epoch 0, summed (per-epoch mean in the logs).
    pub epoch_pages: u64,
    /// Of those, the pages the hot-page policy had left writable, summed.
    pub hot_pages: u64,
    /// Epoch pages the write-protect fault handler copied because the guest wrote them
    /// before the copier got there (`EpochCopy::WriteProtect`; 0 otherwise).
    pub epoch_copy_handler_copies: u64,
    /// Write faults on epoch pages the copier was copying, or on pages of no epoch
    /// (a writer woken by the copier's un-protect before its fault was read).
    pub epoch_copy_other_faults: u64,
    /// UFFDIO_WRITEPROTECT calls made for the epochs (protect and un-protect).
    pub epoch_copy_ioctls: u64,
    /// Per acknowledged epoch: from the end of its capture (guest resumed) to its
    /// acknowledgement, sorted. What output commit adds to a reply beyond the pause.
    pub commit_waits: Vec<Duration>,
    /// Console stream position where output commit began (epoch 0's first byte):
    /// output before it went out directly.
    pub protected_from_console: Option<u64>,
    /// The disk session refused the standby (reason).
    pub refused: Option<String>,
    /// The disk resync of this session.
    pub resync: Option<ResyncStats>,
    /// Page staging buffers: how many were reused from the pool, how many allocated.
    pub staging: alink::PoolStats,
    /// Parts whose page copy was split between the driver's and vCPU 0's threads.
    pub split_copies: u64,
    /// Bytes of page data the initial sync sent (sync rounds; epoch 0 not included).
    pub sync_bytes: u64,
    /// Pages the initial sync found all zero and sent without data.
    pub sync_zero_pages: u64,
    /// From round 0 to epoch 0 committed.
    pub sync_time: Option<Duration>,
    /// The session ended in a planned role swap: the standby took the VM over at this
    /// epoch; this side's guest is paused for good (the caller stops it).
    pub swapped: Option<SwapDone>,
}

/// Why an action did not complete.
enum Lost {
    Peer,
    Error(DriverError),
}

impl From<DriverError> for Lost {
    fn from(e: DriverError) -> Self {
        Lost::Error(e)
    }
}

impl From<CaptureError> for Lost {
    fn from(e: CaptureError) -> Self {
        Lost::Error(e.into())
    }
}

impl From<SendError> for Lost {
    fn from(e: SendError) -> Self {
        match e {
            SendError::PeerLost => Lost::Peer,
            SendError::Failed(e) => Lost::Error(e.into()),
            SendError::Unsupported { version, what } => {
                Lost::Error(DriverError::Unsupported { version, what })
            }
        }
    }
}

/// The driver's clock: time since its `base`.
pub type Clock = Box<dyn Fn() -> Duration>;

/// The primary's side of one standby connection, one step at a time.
pub struct PrimaryDriver<V: PrimaryVm, L: ToStandbyLink> {
    vm: V,
    link: L,
    /// Time since `base` (the protocol's clock).
    clock: Clock,
    /// The instant `clock` counts from (the disk session's clock).
    base: Instant,
    proto: Primary,
    cap: Capturer,
    /// Captured epochs waiting for their `Send`.
    staged: VecDeque<(u64, Vec<OutPart>)>,
    /// When each unacknowledged epoch's capture ended.
    captured_at: VecDeque<(u64, Duration)>,
    paused_by_throttle: bool,
    /// When the throttle last paused the guest (a swap requested while throttled
    /// pauses nothing more: its pause began there).
    throttled_at: Option<Duration>,
    report: PrimaryReport,
    acked: Option<Arc<AtomicU64>>,
    verify: Option<Arc<HashLog>>,
    disks: Option<Arc<PrimaryDisks>>,
    resync: ResyncConfig,
    /// The disk session, while it runs (before the memory sync).
    session: Option<DiskSide>,
    hold_on_simplex: bool,
    generation: Option<Arc<AtomicU64>>,
    /// The generation this session's `Hello` carried, stamped on every part.
    stamp: u64,
    /// When sync round 0 began (throughput log; the bytes are counted in the report).
    sync_started: Option<Duration>,
    /// When the guest was paused for a requested swap.
    swap_paused_at: Option<Duration>,
    /// A requested swap: output released here through this epoch (by the protocol or
    /// the pump before its hold); the standby releases what comes after.
    swap_released: Option<u64>,
    /// A swap sent: the frames its message carries (given back if it fails).
    swap_rx: Vec<(u16, Vec<u8>)>,
    /// The real loop's swap port (the receive pump's early release reads its hold).
    swap_port: Option<Arc<SwapPort>>,
    /// The standby refused the requested swap (its quorum gave no grant): the guest
    /// resumed here; the session loop tells the requester.
    swap_refused: bool,
    /// Sequence number of the last sync round's `SyncRoundDone` (0: none yet): the
    /// barrier of the next round's lent parts.
    sync_barrier: u64,
}

impl<V: PrimaryVm, L: ToStandbyLink> PrimaryDriver<V, L> {
    /// A driver for `vm` (started) over `link`; `clock` gives the time since `base`.
    pub fn new(
        vm: V,
        link: L,
        cfg: &PrimaryDriverConfig,
        clock: Clock,
        base: Instant,
    ) -> Result<Self, DriverError> {
        let mut cap = Capturer::new(&vm)?;
        cap.set_verify(&vm, cfg.verify.is_some());
        cap.set_observer(
            cfg.disks
                .clone()
                .map(|d| Arc::new(MirroredDisks(d)) as Arc<dyn EpochObserver>),
        );
        if let Some(n) = cfg.split_copy_min_pages {
            cap.set_split_copy_min_pages(n);
        }
        if let Some(n) = cfg.max_part_pages {
            cap.set_max_part_pages(n);
        }
        cap.set_epoch_copy(&vm, cfg.epoch_copy)?;
        Ok(PrimaryDriver {
            vm,
            link,
            clock,
            base,
            proto: Primary::new(cfg.protocol),
            cap,
            staged: VecDeque::new(),
            captured_at: VecDeque::new(),
            paused_by_throttle: false,
            throttled_at: None,
            report: PrimaryReport::default(),
            acked: cfg.acked.clone(),
            verify: cfg.verify.clone(),
            disks: cfg.disks.clone(),
            resync: cfg.resync,
            session: None,
            hold_on_simplex: cfg.hold_on_simplex,
            generation: cfg.generation.clone(),
            stamp: 0,
            sync_started: None,
            swap_paused_at: None,
            swap_released: None,
            swap_rx: Vec::new(),
            swap_port: cfg.swap.clone(),
            swap_refused: false,
            sync_barrier: 0,
        })
    }

    fn now(&self) -> Duration {
        (self.clock)()
    }

    fn instant(&self) -> Instant {
        self.base + self.now()
    }

    pub fn phase(&self) -> PrimaryPhase {
        self.proto.phase()
    }

    /// Epochs captured and not acknowledged.
    pub fn unacked(&self) -> u64 {
        self.proto.unacked()
    }

    /// When the driver wants to be ticked at the latest (time since `base`).
    pub fn next_deadline(&self) -> Option<Duration> {
        if let Some(s) = &self.session {
            let now = self.instant();
            return Some(match s.next_wakeup(now) {
                Some(t) => self.now() + t.saturating_duration_since(now),
                None => self.now() + DISK_POLL,
            });
        }
        self.proto.next_deadline()
    }

    /// The session begins: the `Hello`, then the disk session (mirrored disks) or the
    /// initial sync.
    pub fn start(&mut self) -> Result<(), DriverError> {
        let layout = vmm::persist::memory::layout(self.vm.guest_memory());
        let generation = self
            .generation
            .as_ref()
            .map_or(0, |g| g.load(Ordering::SeqCst));
        self.stamp = generation;
        match self.send_msg(&ToStandby::Hello { layout, generation }, Vec::new()) {
            Ok(()) => {}
            Err(Lost::Peer) => return self.peer_lost(),
            Err(Lost::Error(e)) => return Err(e),
        }
        match &self.disks {
            None => self.feed(PrimaryEvent::Start { now: self.now() }),
            Some(d) => {
                let cfg = SessionConfig {
                    resync: self.resync,
                    ..SessionConfig::default()
                };
                self.session = Some(DiskSide::new(d.clone(), cfg, self.instant()));
                self.tick()
            }
        }
    }

    /// A message from the standby.
    pub fn on_message(&mut self, m: FromStandby) -> Result<(), DriverError> {
        match m {
            FromStandby::Ack { epoch } => {
                if self.session.is_some() {
                    log::warn!("primary: ack of epoch {epoch} during the disk session (ignored)");
                    return Ok(());
                }
                self.feed(PrimaryEvent::Ack { epoch })
            }
            FromStandby::Fenced { generation } => {
                log::error!(
                    "primary: FENCED: the standby knows quorum generation {generation} (this \
                     primary's is {}); nothing more is released",
                    self.stamp
                );
                Err(DriverError::Fenced {
                    peer: generation,
                    own: self.current_generation(),
                })
            }
            // Not a standby of this generation: nothing was released on its ack, and
            // the session ends as if the standby were lost (the VM runs on under the
            // quorum's rules, its blocks recorded for the next standby's resync).
            FromStandby::Stale { generation } => {
                log::error!(
                    "primary: an ack of quorum generation {generation}, older than this \
                     session's {}: refused, the session ends",
                    self.stamp
                );
                self.peer_lost()
            }
            FromStandby::SwapAccepted { epoch } => self.feed(PrimaryEvent::SwapAccepted { epoch }),
            FromStandby::SwapRefused { epoch } => self.feed(PrimaryEvent::SwapRefused { epoch }),
            FromStandby::Disk { msg, payload } => {
                let now = self.instant();
                match &mut self.session {
                    Some(s) => {
                        let step = s.on_msg(msg, &payload, now, &self.vm, &self.link);
                        self.session_step(step)
                    }
                    None => {
                        log::warn!("primary: unexpected disk message {msg:?}");
                        Ok(())
                    }
                }
            }
        }
    }

    /// Time passed: ticks the disk session or the protocol (an epoch may end).
    pub fn tick(&mut self) -> Result<(), DriverError> {
        let now = self.instant();
        if let Some(s) = &mut self.session {
            let step = s.tick(now, &self.vm, &self.link);
            return self.session_step(step);
        }
        if self.proto.phase() == PrimaryPhase::Simplex {
            return Ok(());
        }
        let now = self.now();
        if self.vm.output_waiting() {
            self.feed(PrimaryEvent::OutputWaiting { now })?;
        }
        self.feed(PrimaryEvent::Tick { now })
    }

    /// An operator asks for a planned role swap: the guest pauses at once and the
    /// swap proceeds with the next events (`report().swapped` once the standby
    /// accepted). Refused (Ok(Err(why))) when the pair is not in sync.
    pub fn request_swap(&mut self) -> Result<Result<(), String>, DriverError> {
        let version = self.link.version();
        if version < crate::messages::WIRE_VERSION {
            // Protocol 2 has no swap messages: a pair mid-upgrade cannot swap.
            return Ok(Err(format!(
                "role swap refused: the standby speaks A-Link protocol {version}, which has no \
                 planned role swap (upgrade it first)"
            )));
        }
        if self.session.is_some() {
            return Ok(Err(
                "role swap refused: the pair is not in sync (disk resync running)".into(),
            ));
        }
        match self.proto.on_event(PrimaryEvent::SwapRequested) {
            Ok(actions) => {
                log::info!("primary: planned role swap requested: pausing the guest");
                // From here nothing more is released here (the protocol's acks release
                // nothing; the pump is held): the standby releases it after its MAC
                // announce. The pump may have released beyond the protocol's view.
                let first_held = self.proto.released().map_or(0, |r| r + 1);
                let pumped = self
                    .swap_port
                    .as_ref()
                    .and_then(|p| p.hold_from(first_held));
                self.swap_released = self.proto.released().max(pumped);
                self.perform_all(actions.into())?;
                Ok(Ok(()))
            }
            Err(e) => Ok(Err(e.to_string())),
        }
    }

    /// Every link to the standby is down.
    pub fn peer_lost(&mut self) -> Result<(), DriverError> {
        if let Some(mut s) = self.session.take() {
            let now = self.instant();
            s.peer_lost(now, &self.vm, &self.link);
            return self.session_ended(Step::PeerLost);
        }
        self.feed(PrimaryEvent::PeerLost)
    }

    fn session_step(&mut self, step: Step) -> Result<(), DriverError> {
        match step {
            Step::Running => Ok(()),
            other => {
                self.session = None;
                self.session_ended(other)
            }
        }
    }

    fn session_ended(&mut self, step: Step) -> Result<(), DriverError> {
        let disks = self.disks.clone();
        let lost = |d: &mut Self| {
            d.report.simplex = true;
            if let Some(disks) = &disks {
                disks.peer_lost();
            }
            d.feed(PrimaryEvent::PeerLost)
        };
        match step {
            Step::Running => Ok(()),
            Step::Ended(SessionEnd::Ready(stats)) => {
                log::info!(
                    "primary: disk resync done: {} chunks, {} bytes, {} passes in {:?}",
                    stats.chunks,
                    stats.bytes,
                    stats.passes,
                    stats.elapsed
                );
                self.report.resync = Some(stats);
                self.feed(PrimaryEvent::Start { now: self.now() })
            }
            Step::Ended(SessionEnd::Refused(reason)) => {
                log::error!(
                    "primary: the standby cannot be resynced: {reason}; the VM runs \
                     UNPROTECTED until an operator resolves it"
                );
                self.report.refused = Some(reason);
                lost(self)
            }
            Step::Ended(SessionEnd::PeerLost) | Step::PeerLost => lost(self),
            Step::Ended(SessionEnd::Failed(why)) | Step::Failed(why) => {
                Err(DriverError::DiskSession(why))
            }
        }
    }

    /// The run's figures (pauses and waits sorted).
    pub fn report(&self) -> PrimaryReport {
        let mut r = self.report.clone();
        r.pauses.sort();
        r.commit_waits.sort();
        r.released = self.proto.released();
        r.staging = self.cap.pool_stats();
        r.split_copies = self.cap.split_copies();
        r
    }

    fn feed(&mut self, ev: PrimaryEvent) -> Result<(), DriverError> {
        let actions = match self.proto.on_event(ev) {
            Ok(a) => a,
            Err(e) => {
                log::error!("primary: {e} (event ignored)");
                return Ok(());
            }
        };
        self.perform_all(actions.into())
    }

    /// Performs `actions`, feeding back the events they produce (and theirs).
    fn perform_all(&mut self, mut actions: VecDeque<PrimaryAction>) -> Result<(), DriverError> {
        let mut queue: VecDeque<PrimaryEvent> = VecDeque::new();
        loop {
            if actions.is_empty() {
                let Some(ev) = queue.pop_front() else {
                    return Ok(());
                };
                match self.proto.on_event(ev) {
                    Ok(a) => actions = a.into(),
                    Err(e) => {
                        log::error!("primary: {e} (event ignored)");
                        continue;
                    }
                }
            }
            while let Some(a) = actions.pop_front() {
                match self.perform(a) {
                    Ok(Some(next)) => queue.push_back(next),
                    Ok(None) => {}
                    Err(Lost::Peer) => queue.push_back(PrimaryEvent::PeerLost),
                    Err(Lost::Error(e)) => return Err(e),
                }
            }
        }
    }

    fn perform(&mut self, a: PrimaryAction) -> Result<Option<PrimaryEvent>, Lost> {
        match a {
            PrimaryAction::SyncRound { round } if self.link.lends() => {
                if round == 0 {
                    self.sync_started = Some(self.now());
                }
                self.sync_round_lent(round)
            }
            PrimaryAction::SyncRound { round } => {
                if round == 0 {
                    self.sync_started = Some(self.now());
                }
                // Part by part: copy one, send it (waiting for window room), then the
                // next, so a round holds at most a window of staging buffers.
                let mut r = self.cap.begin_sync_round(&self.vm, round)?;
                let (pages, parts) = (r.pages(), r.parts());
                while let Some(p) = self.cap.next_sync_part(&self.vm, &mut r) {
                    let p = p?;
                    self.report.sync_bytes += p.head.payload_len();
                    self.report.sync_zero_pages += p.head.zero_page_count();
                    self.send_part(p)?;
                }
                self.send_msg(&ToStandby::SyncRoundDone { round, pages }, Vec::new())?;
                log::info!("primary: initial sync round {round}: {pages} pages in {parts} parts");
                self.report.sync_rounds = round + 1;
                Ok(Some(PrimaryEvent::SyncRoundSent { round, pages }))
            }
            PrimaryAction::Capture { epoch } => self.capture(epoch, false),
            PrimaryAction::CaptureFinal { epoch } => {
                // A swap requested while the guest was throttled has no `PauseForSwap`:
                // its pause began with the throttle's (else `HandOver` would report 0).
                let pause_starts = match (self.paused_by_throttle, self.throttled_at) {
                    (true, Some(t)) => t,
                    _ => self.now(),
                };
                let ev = self.capture(epoch, true)?;
                self.swap_paused_at.get_or_insert(pause_starts);
                // The swap point: the guest stays paused (a lost standby resumes it).
                self.paused_by_throttle = true;
                log::info!("primary: swap: final epoch {epoch} captured, guest stays paused");
                Ok(ev)
            }
            PrimaryAction::PauseForSwap => {
                if !self.paused_by_throttle {
                    self.vm.pause().map_err(DriverError::from)?;
                    self.paused_by_throttle = true;
                }
                self.swap_paused_at = Some(self.now());
                Ok(None)
            }
            PrimaryAction::SendSwap {
                epoch,
                released_through,
            } => {
                // What left here: the protocol's releases and the pump's before the hold.
                let released_through = released_through.max(self.swap_released);
                self.swap_released = released_through;
                // What the TAPs received since the pause goes with the VM: the new
                // primary's guest receives it first (a request that reached this TAP
                // is not lost with this VM; see `messages::encode_rx_frames`).
                self.swap_rx = self.vm.take_rx_frames(crate::messages::MAX_SWAP_RX_FRAMES);
                let payload = crate::messages::encode_rx_frames(&self.swap_rx);
                self.send_msg(
                    &ToStandby::Swap {
                        epoch,
                        released_through,
                    },
                    if payload.is_empty() {
                        Vec::new()
                    } else {
                        vec![alink::Bytes::from(payload)]
                    },
                )?;
                log::info!(
                    "primary: swap: epoch {epoch} acknowledged; handing over (released here \
                     through {released_through:?}, the standby releases the rest; {} frames \
                     received since the pause go with it)",
                    self.swap_rx.len()
                );
                Ok(None)
            }
            PrimaryAction::HandOver { epoch } => {
                let paused_for = self
                    .swap_paused_at
                    .take()
                    .map_or(Duration::ZERO, |t| self.now().saturating_sub(t));
                self.report.swapped = Some(SwapDone { epoch, paused_for });
                // The standby releases what was held since the request (it owns the VM
                // now); nothing was released here after `swap_released`.
                // (A swap needs epoch 0 acknowledged, which released it: never None.)
                debug_assert!(self.swap_released.is_some());
                self.vm
                    .discard_output_after(self.swap_released.unwrap_or_default());
                self.staged.clear();
                self.captured_at.clear();
                self.swap_rx.clear();
                log::info!(
                    "primary: swap: the standby took the VM over at epoch {epoch} ({paused_for:?} \
                     after the pause); this side's guest stays paused"
                );
                Ok(None)
            }
            PrimaryAction::ResumeAfterSwap { epoch } => {
                if let Some(p) = &self.swap_port {
                    p.clear_hold();
                }
                // The frames taken for the standby are this guest's again, ahead of
                // what its TAPs receive from now on.
                let rx = std::mem::take(&mut self.swap_rx);
                if !rx.is_empty() {
                    log::info!("primary: swap refused: {} frames given back", rx.len());
                    self.vm.inject_rx_frames(rx);
                }
                self.swap_paused_at = None;
                self.paused_by_throttle = false;
                self.vm.resume().map_err(DriverError::from)?;
                self.swap_refused = true;
                log::warn!(
                    "primary: swap: the standby refused to take the VM over at epoch {epoch} \
                     (no quorum grant); the guest resumes here"
                );
                Ok(None)
            }
            PrimaryAction::Send { epoch } => {
                while let Some((e, parts)) = self.staged.pop_front() {
                    let done = e == epoch;
                    for p in parts {
                        self.send_part(p)?;
                    }
                    if done {
                        break;
                    }
                }
                Ok(None)
            }
            PrimaryAction::ThrottleGuest => {
                self.vm.pause().map_err(DriverError::from)?;
                self.paused_by_throttle = true;
                self.throttled_at = Some(self.now());
                log::debug!(
                    "primary: {} epochs unacknowledged, guest held",
                    self.proto.unacked()
                );
                Ok(None)
            }
            PrimaryAction::ReleaseOutput { through } => {
                let now = self.now();
                while let Some(&(e, at)) = self.captured_at.front() {
                    if e > through {
                        break;
                    }
                    self.captured_at.pop_front();
                    if e > 0 && self.report.commit_waits.len() < MAX_COMMIT_SAMPLES {
                        self.report.commit_waits.push(now.saturating_sub(at));
                    }
                }
                self.vm.release_output(through).map_err(DriverError::from)?;
                self.report.epochs_acked = through + 1;
                if let Some(d) = &self.disks {
                    d.acked(through);
                }
                if let Some(a) = &self.acked {
                    a.store(through + 1, Ordering::Relaxed);
                }
                if through == 0 {
                    log::info!("primary: standby committed epoch 0: the VM is protected");
                    if let Some(t) = self.sync_started.take() {
                        // Checkpoint throughput of the pipeline (capture, A-Link, standby
                        // staging and apply) while the guest runs.
                        let el = now.saturating_sub(t);
                        log::info!(
                            "primary: initial synchronisation: {} bytes of memory sent ({} \
                             all-zero pages not sent) from round 0 to epoch 0 committed in \
                             {:.1} ms ({:.0} MB/s)",
                            self.report.sync_bytes,
                            self.report.sync_zero_pages,
                            el.as_secs_f64() * 1e3,
                            self.report.sync_bytes as f64 / el.as_secs_f64().max(1e-9) / 1e6
                        );
                        self.report.sync_time = Some(el);
                    }
                }
                Ok(None)
            }
            PrimaryAction::EnterSimplex => {
                // A swap that failed: the frames taken for the standby are this
                // guest's again, ahead of what its TAPs receive from now on.
                let rx = std::mem::take(&mut self.swap_rx);
                if !rx.is_empty() {
                    log::warn!("primary: swap failed: {} frames given back", rx.len());
                    self.vm.inject_rx_frames(rx);
                }
                self.enter_simplex().map_err(DriverError::from)?;
                Ok(None)
            }
        }
    }

    /// Initial-sync round `round` with lent sends (sessions of
    /// [`crate::messages::LENT_SYNC_VERSION`]): a thread looks at each part's pages in
    /// guest memory (zero pages become runs) while this one sends the parts found so
    /// far, in batches, straight from guest memory over every healthy link
    /// ([`ToStandbyLink::send_lent_parts`]); nothing is copied. The round's parts are
    /// placed at the standby only after it processed the previous round's
    /// `SyncRoundDone` (the barrier). At the end the driver waits until the standby
    /// consumed the round and takes back, as owed, the pages of every part that went
    /// void (its link failed after the loan ended): the next round or epoch 0 sends them
    /// again. Pages the guest changed during their send are dirty: the next harvest has
    /// them.
    fn sync_round_lent(&mut self, round: u32) -> Result<Option<PrimaryEvent>, Lost> {
        let r = self.cap.begin_sync_round(&self.vm, round)?;
        let (pages, parts) = (r.pages(), r.parts());
        let generation = self.current_generation();
        let barrier = self.sync_barrier;
        let mem = self.vm.guest_memory();
        let scan = self.cap.lent_scan(&self.vm, r);
        let link = &self.link;
        let report = &mut self.report;
        // Sequence number of each lent part, with its data pages.
        let mut sent: Vec<(u64, Vec<PageRun>)> = Vec::new();
        std::thread::scope(|s| -> Result<(), Lost> {
            let (tx, rx) = std::sync::mpsc::sync_channel(LENT_BATCH_PARTS);
            // Ends when the scan does or this side stops receiving (`rx` dropped).
            s.spawn(move || {
                for p in scan {
                    if tx.send(p).is_err() {
                        break;
                    }
                }
            });
            let mut batch: Vec<LentPart> = Vec::with_capacity(LENT_BATCH_PARTS);
            while let Ok(p) = rx.recv() {
                batch.push(p?);
                while batch.len() < LENT_BATCH_PARTS {
                    match rx.try_recv() {
                        Ok(p) => batch.push(p?),
                        Err(_) => break,
                    }
                }
                let mut lent: Vec<(ToStandby, Vec<&[u8]>)> = Vec::new();
                let mut runs: Vec<Vec<PageRun>> = Vec::new();
                for mut p in batch.drain(..) {
                    p.head.generation = generation;
                    report.sync_bytes += p.head.payload_len();
                    report.sync_zero_pages += p.head.zero_page_count();
                    if p.data.is_empty() {
                        // Zero pages only: a plain message, in order after the lent
                        // ones before it.
                        send_lent_batch(link, &mut lent, &mut runs, barrier, &mut sent)?;
                        link.send(&ToStandby::Part(p.head), Vec::new())?;
                        continue;
                    }
                    let slices = lent_slices(mem, &p.data)?;
                    lent.push((ToStandby::Part(p.head), slices));
                    runs.push(p.data);
                }
                send_lent_batch(link, &mut lent, &mut runs, barrier, &mut sent)?;
            }
            Ok(())
        })?;
        self.sync_barrier = self
            .link
            .send_numbered(&ToStandby::SyncRoundDone { round, pages }, Vec::new())?;
        let lost = self.link.settle()?;
        let mut owed = 0u64;
        for (seq, runs) in &sent {
            if lost.contains(seq) {
                owed += runs.iter().map(|r| u64::from(r.pages)).sum::<u64>();
                self.cap.owe(runs);
            }
        }
        if owed > 0 {
            log::warn!(
                "primary: initial sync round {round}: {} lent parts went void (a link \
                 failed): their {owed} pages are sent again",
                lost.len()
            );
        }
        log::info!("primary: initial sync round {round}: {pages} pages in {parts} parts (lent)");
        self.report.sync_rounds = round + 1;
        Ok(Some(PrimaryEvent::SyncRoundSent { round, pages }))
    }

    /// Captures `epoch` (the guest left paused after it with `stay_paused`).
    fn capture(&mut self, epoch: u64, stay_paused: bool) -> Result<Option<PrimaryEvent>, Lost> {
        let already = std::mem::take(&mut self.paused_by_throttle);
        if already && !stay_paused {
            self.report.throttles += 1;
        }
        let Captured {
            parts,
            pause,
            hash,
            pages,
            hot_pages,
        } = self.cap.capture_epoch(
            &self.vm,
            epoch,
            self.proto.sync_rounds(),
            self.proto.released(),
            already,
            stay_paused,
        )?;
        if epoch == 0 {
            self.report.protected_from_console =
                parts.last().and_then(|p| p.head.console).map(|c| c.pos);
            log::info!("primary: epoch 0 captured (stop-and-copy), output commit on");
        }
        if let (Some(log), Some(h)) = (&self.verify, hash) {
            log.record(epoch, h);
        }
        self.report.pauses.push(pause);
        self.report.epochs_captured += 1;
        if epoch > 0 {
            self.report.epoch_pages += pages;
            self.report.hot_pages += hot_pages as u64;
        }
        let st = self.cap.epoch_copy_stats();
        self.report.epoch_copy_handler_copies = st.handler_copies;
        self.report.epoch_copy_other_faults = st.other_faults;
        self.report.epoch_copy_ioctls = st.ioctls;
        let bytes = parts.iter().map(|p| p.head.payload_len()).sum();
        self.staged.push_back((epoch, parts));
        let now = self.now();
        self.captured_at.push_back((epoch, now));
        Ok(Some(PrimaryEvent::Captured { epoch, now, bytes }))
    }

    fn enter_simplex(&mut self) -> Result<(), VmmError> {
        if let Some(d) = &self.disks {
            d.peer_lost();
        }
        self.staged.clear();
        self.captured_at.clear();
        self.report.simplex = true;
        if !self.paused_by_throttle {
            self.vm.pause()?;
        }
        self.paused_by_throttle = false;
        if self.hold_on_simplex {
            // The quorum decides: output stays held, the guest runs on.
            self.vm.resume()?;
            log::error!(
                "primary: STANDBY LOST; the VM runs on with its output HELD until the \
                 quorum allows releasing it"
            );
            return Ok(());
        }
        // Held output of every epoch may leave now: no failover can roll it back.
        let r = self.vm.end_output_commit();
        let resumed = self.vm.resume();
        let (console_bytes, frames) = r?;
        resumed?;
        log::error!(
            "primary: STANDBY LOST, THE VM RUNS UNPROTECTED (simplex); released {console_bytes} \
             held console bytes and {frames} frames. If the standby is alive but cut off, it \
             fails over too and two copies run (no quorum witness yet)"
        );
        Ok(())
    }

    /// This primary's generation now: the session's, or a newer one granted since
    /// (its first grant after the `Hello`), so that a standby that learned it from
    /// the witness does not take this primary's own parts for a stale primary's.
    fn current_generation(&self) -> u64 {
        self.generation
            .as_ref()
            .map_or(0, |g| g.load(Ordering::SeqCst))
            .max(self.stamp)
    }

    /// Sends a part stamped with this primary's current generation (after the
    /// capture: the pause reads nothing more).
    fn send_part(&self, p: OutPart) -> Result<(), Lost> {
        let mut head = p.head;
        head.generation = self.current_generation();
        self.send_msg(&ToStandby::Part(head), p.payload)
    }

    fn send_msg(&self, head: &ToStandby, payload: Vec<alink::Bytes>) -> Result<(), Lost> {
        Ok(self.link.send(head, payload)?)
    }
}

/// Lent sync parts sent per `send_lent` call at most (4 MiB each: half the default
/// window's bytes), as many as the scan found since the last call.
const LENT_BATCH_PARTS: usize = 32;

/// Sends the lent parts gathered in `lent` (their data runs in `runs`), recording each
/// one's sequence number with its runs in `sent`; empties both.
fn send_lent_batch<L: ToStandbyLink>(
    link: &L,
    lent: &mut Vec<(ToStandby, Vec<&[u8]>)>,
    runs: &mut Vec<Vec<PageRun>>,
    barrier: u64,
    sent: &mut Vec<(u64, Vec<PageRun>)>,
) -> Result<(), Lost> {
    if lent.is_empty() {
        return Ok(());
    }
    let seqs = link.send_lent_parts(lent, barrier)?;
    lent.clear();
    sent.extend(seqs.into_iter().zip(runs.drain(..)));
    Ok(())
}

/// Runs the primary side until `stop` is set (or the VM's standby is lost and `stop`
/// is set later: in Simplex the driver just idles, the VM keeps running; with
/// `return_on_simplex` it returns then). The VM must be started; the link may still
/// be connecting. With mirrored disks the VM's disk hooks must already be
/// [`MirroredDisks`] over `cfg.disks`.
pub fn run_primary(
    vmm: &Vmm,
    link: &Alink,
    cfg: &PrimaryDriverConfig,
    stop: &AtomicBool,
) -> Result<PrimaryReport, DriverError> {
    let t0 = Instant::now();
    while !link.peer_reachable() {
        if t0.elapsed() > cfg.connect_timeout {
            return Err(DriverError::NoStandby(cfg.connect_timeout));
        }
        if stop.load(Ordering::Relaxed) {
            return Ok(PrimaryReport::default());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    log::info!("primary: standby connected, starting the initial synchronisation");
    if !vmm.set_hot_pages(cfg.hot_pages) {
        log::info!("primary: this KVM cannot leave hot pages writable; every page is re-protected");
    }
    let (tx, rx) = std::sync::mpsc::channel();
    let inbox = Inbox::new(rx);
    // Waiting output wakes the loop at once: a reply's epoch can end as soon as
    // `min_epoch` allows, not at the next poll.
    let wake = tx.clone();
    vmm.set_output_notifier(Some(Arc::new(move || {
        let _ = wake.send(Inbound::Wake);
    })));
    let quit = AtomicBool::new(false);
    let disks = cfg.disks.as_deref();
    let r = std::thread::scope(|s| {
        let quit = &quit;
        // The standby holds epoch N once it acknowledges it: its output may leave at
        // once (the driver's own release of it, later, finds nothing left to write).
        // Acks come only for epochs captured (closed) in this session: a session has
        // its own A-Link, and the gate's numbering restarts with it.
        let release = move |epoch: u64| {
            let release = |epoch: u64| {
                if let Err(e) = vmm.release_output(epoch) {
                    log::debug!("primary: early release through epoch {epoch}: {e}");
                }
            };
            // Never the output held for a requested swap: the standby releases that.
            match cfg.swap.as_ref() {
                Some(p) => p.release_on_ack(epoch, release),
                None => release(epoch),
            }
        };
        let generation = cfg.generation.as_deref();
        let own = cfg.own_generations.as_ref();
        s.spawn(move || pump(link, disks, generation, own, &release, tx, quit));
        if let Some(d) = disks {
            let (otx, orx) = std::sync::mpsc::channel();
            s.spawn(move || outbox(link, orx, quit));
            d.set_peer(Some(Box::new(move |m| otx.send(m).is_ok())));
            s.spawn(move || storage_mirror::primary::verify::verifier(d, quit));
        }
        let r = session(vmm, link, &inbox, cfg, stop, t0);
        if let Some(d) = disks {
            d.set_peer(None);
        }
        quit.store(true, Ordering::Relaxed);
        r
    });
    vmm.set_output_notifier(None);
    r
}

fn session(
    vmm: &Vmm,
    link: &Alink,
    inbox: &Inbox,
    cfg: &PrimaryDriverConfig,
    stop: &AtomicBool,
    t0: Instant,
) -> Result<PrimaryReport, DriverError> {
    let clock = move || t0.elapsed();
    let mut d = PrimaryDriver::new(vmm, link, cfg, Box::new(clock), t0)?;
    d.start()?;
    let port = cfg.swap.as_deref();
    if let Some(p) = port {
        p.set_active(true);
    }
    let r = session_loop(&mut d, link, inbox, cfg, stop, &clock, port);
    if let Some(p) = port {
        p.set_active(false);
    }
    r?;
    Ok(d.report())
}

/// The loop of [`session`] (the swap port is deactivated whichever way it ends).
fn session_loop(
    d: &mut PrimaryDriver<&Vmm, &Alink>,
    link: &Alink,
    inbox: &Inbox,
    cfg: &PrimaryDriverConfig,
    stop: &AtomicBool,
    clock: &dyn Fn() -> Duration,
    port: Option<&SwapPort>,
) -> Result<(), DriverError> {
    // The operator's swap request being carried out.
    let mut swapping: Option<SwapReply> = None;
    // Whether the standby has sent anything in this session (see the link check below).
    let mut heard = false;
    while !stop.load(Ordering::Relaxed) {
        if let Some(done) = d.report.swapped {
            if let Some(r) = swapping.take() {
                r.answer(Ok(done));
            }
            break;
        }
        if std::mem::take(&mut d.swap_refused) {
            if let Some(r) = swapping.take() {
                r.answer(Err(
                    "role swap refused: the standby's quorum did not grant it the next \
                     generation (the witness is unreachable or refused); the VM runs on here"
                        .into(),
                ));
            }
        }
        if let Some(req) = port.and_then(SwapPort::take) {
            if swapping.is_some() {
                req.answer(Err("a swap is in progress already".into()));
            } else {
                match d.request_swap()? {
                    Ok(()) => swapping = Some(req),
                    Err(why) => req.answer(Err(why)),
                }
            }
        }
        if d.phase() == PrimaryPhase::Simplex {
            if let Some(r) = swapping.take() {
                r.answer(Err(
                    "role swap failed: the standby was lost before it took over; the VM \
                     runs on here (unprotected)"
                        .into(),
                ));
            }
            if cfg.return_on_simplex {
                break;
            }
            // Nothing more to do: the VM runs on unprotected.
            std::thread::sleep(Duration::from_millis(20));
            continue;
        }
        let wait = match d.next_deadline() {
            Some(t) => t
                .saturating_sub(clock())
                .min(POLL.max(Duration::from_micros(100))),
            None => POLL,
        };
        match inbox.recv(wait) {
            Ok(Some(m)) => {
                heard = true;
                d.on_message(m)?
            }
            Ok(None) => {}
            Err(AlinkError::Closed | AlinkError::PeerRestarted { .. }) => {
                d.peer_lost()?;
                continue;
            }
            Err(e) => return Err(e.into()),
        }
        let (lost, a_link_down) = link_lost(link);
        if lost {
            d.peer_lost()?;
            continue;
        }
        if a_link_down && !heard && link.peer_incarnation().is_none() {
            // A standby that ended its previous session (the primary came back without
            // a takeover) listens on a fresh A-Link. A hello sent on a link still
            // connected to its OLD instance was lost with it while another link already
            // reached the new one, so the standby never reported. With incarnations
            // (see `alink::incarnation`) that link is never made: the old instance,
            // bound to our previous A-Link, is refused as stale (and ends its session),
            // so the hello waits in the window for a link to the new one. A standby of
            // the previous version sends no incarnation (`peer_incarnation` is None
            // once a link was up): for it, an A-Link that goes down before the standby
            // answered still starts the session again on fresh links.
            log::warn!(
                "primary: an A-Link to a standby without incarnations went down before it \
                 answered this session: its hello may be lost with it; the session starts again"
            );
            d.peer_lost()?;
            continue;
        }
        d.tick()?;
    }
    Ok(())
}

/// Drains link events: (every link is down, some link went down).
fn link_lost(link: &Alink) -> (bool, bool) {
    let mut lost = false;
    let mut down = false;
    while let Some(ev) = link.poll_event(Duration::ZERO) {
        match ev {
            Event::Link(LinkEvent::PeerUnreachable) => lost = true,
            Event::Link(LinkEvent::PeerReachable) => lost = false,
            Event::Link(e @ LinkEvent::LinkDown(_)) => {
                down = true;
                log::info!("primary: A-Link {e:?}");
            }
            Event::Link(e) => log::info!("primary: A-Link {e:?}"),
            Event::Refused { link, peer, reason } => {
                log::warn!("primary: A-Link {link} refused {peer:?}: {reason}")
            }
            // The standby's A-Link was replaced: this session is over (the A-Link
            // takes nothing more), the next one starts on a fresh A-Link.
            Event::PeerRestarted { old, new } => {
                log::warn!(
                    "primary: the standby's A-Link instance {old:#x} was replaced by {new:#x}: \
                     this session ends"
                );
                return (true, down);
            }
        }
    }
    (lost && !link.peer_reachable(), down)
}
