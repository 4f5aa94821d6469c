//! The standby's driver: runs the [`Standby`] state machine on what the primary sends,
//! applies epochs into the [`Mirror`], acknowledges them, runs the disk session's
//! standby side, and on the loss of the primary hands the last committed epoch to a
//! [`Takeover`].
//!
//! [`StandbyDriver`] is a step function: [`run_standby_with`] feeds it what the A-Link
//! delivers and the link events; `tests/sim.rs` feeds it a simulated network. Each
//! message is decoded once ([`decode_standbound`]): a part travels through the state
//! machine inside its event and comes back inside the `WriteSync` or `Stage` action,
//! and the mirror stages it decoded.

use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use alink::{Alink, AlinkError, Event, LinkEvent};
use storage_mirror::standby::StandbyEvent as DiskEvent;
use vmm::config::VmConfig;

use super::disks::DiskSide;
use super::mirror::{DiskCommit, Mirror};
use super::outcome::{fence, FailoverReport, StandbyDriverError, StandbyOutcome, StandbyProgress};
use super::takeover::{BeforeStart, Takeover, TakeoverInput, VmmTakeover};
use crate::link::ToPrimaryLink;
use crate::messages::{
    decode_delivered, decode_standbound_at, DecodeError, PartOf, ReceivedPart, Standbound,
    ToPrimary,
};
use crate::protocol::{Standby, StandbyAction, StandbyConfig, StandbyEvent};
use crate::verify::{hash_state, is_full_epoch, HashLog, ReplicaHash};

const POLL: Duration = Duration::from_millis(5);
/// An ack waits at most this long for window room (a full window means the primary is
/// gone, which the link events report).
const ACK_WAIT: Duration = Duration::from_millis(50);

/// Tunables of the standby driver.
#[derive(Clone, Debug, Default)]
pub struct StandbyDriverConfig {
    pub protocol: StandbyConfig,
    /// Test mode: after every apply, hash the mirror's memory and the committed state's
    /// canonical parts and record them here by epoch (see [`crate::verify`]). Delays
    /// each ack by a pass over the mirror.
    pub verify: Option<Arc<HashLog>>,
    /// Mirrored disks: report metadata, take resync chunks, apply epochs through the
    /// crash-safe apply journal (the primary must run with disks too).
    pub mirror_disks: bool,
    /// Forget the disks' metadata first, so that the primary sends full copies (the
    /// operator's way out of a refused resync: "discard this replica's data").
    pub discard_disk_data: bool,
    /// Called on the failed-over VM before it starts (see [`VmmTakeover`]).
    pub before_start: Option<BeforeStart>,
    /// The pair's quorum: fail over only when it grants the takeover (None: as soon as
    /// every link to the primary is down).
    pub takeover_gate: Option<TakeoverGateRef>,
}

/// Whether a standby that lost every link to its primary may fail over: the pair's
/// quorum (a witness grants the takeover) sits behind it. Without a grant the standby
/// keeps its replica and waits; when a link to the primary comes back first, the run
/// ends with [`StandbyOutcome::PrimaryBack`] (the primary starts a new session).
pub trait TakeoverGate: Send + Sync {
    /// The replica committed `epoch` of the current session (it can be taken over).
    fn committed(&self, epoch: u64);
    /// Asked while every link to the primary is down: fail over now?
    fn may_take_over(&self) -> bool;
    /// The highest quorum generation this node knows (0: none). A primary whose
    /// `Hello` carries a lower one lost the VM: its session is refused.
    fn generation(&self) -> u64 {
        0
    }
    /// Whether `generation` was granted to the primary's node (the quorum names a
    /// generation's holder). A part older than a generation its own sender holds is
    /// that primary's, stamped before its quorum thread handed the grant over: it is
    /// not fenced. False (the default): every newer generation fences.
    fn peer_holds(&self, _generation: u64) -> bool {
        false
    }
    /// A planned swap hands the VM over at the swap point: may this node take it?
    /// With a quorum, only once its witness granted it the next generation by
    /// compare-and-set (waits for the answer; Err: why not, and the swap is refused).
    /// Without one (the default): yes.
    fn grant_swap(&self) -> Result<(), String> {
        Ok(())
    }
}

/// A shared [`TakeoverGate`] in a config.
#[derive(Clone)]
pub struct TakeoverGateRef(pub Arc<dyn TakeoverGate>);

impl std::fmt::Debug for TakeoverGateRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TakeoverGate(..)")
    }
}

/// The standby's side of one primary connection, one step at a time.
pub struct StandbyDriver<L: ToPrimaryLink, T: Takeover> {
    link: L,
    takeover: T,
    clock: crate::primary::driver::Clock,
    base: Instant,
    /// The standby's own disk images (the mirror writes them, directly or through the
    /// apply journal).
    images: Vec<PathBuf>,
    disks: Option<DiskSide>,
    proto: Standby<ReceivedPart>,
    mirror: Option<Mirror>,
    /// End of the console output of each received epoch (from its last part).
    console_end: BTreeMap<u64, u64>,
    /// Console stream position after the last committed epoch.
    committed_console_end: Option<u64>,
    progress: StandbyProgress,
    verify: Option<Arc<HashLog>>,
    /// The pair's quorum (the generation a primary's `Hello` must not be below).
    gate: Option<Arc<dyn TakeoverGate>>,
    /// The generation the session's `Hello` carried (accepted: not below `gate`'s):
    /// every part must carry at least it, every ack echoes it (or a newer one).
    session_generation: u64,
    /// The primary asked for a planned role swap (the takeover that follows is one).
    swap_requested: bool,
    /// The A-Link places sync parts into the mirror (until the first apply).
    placing: bool,
    /// The frames a `Swap` carried (the old primary's TAPs received them after its
    /// guest's final pause): the taken-over guest receives them first.
    swap_rx: Vec<(u16, Vec<u8>)>,
}

impl<L: ToPrimaryLink, T: Takeover> StandbyDriver<L, T> {
    /// A driver for the standby's disk `images` (opened now when `opts.mirror_disks`:
    /// the apply journal is recovered before anything else).
    pub fn new(
        link: L,
        takeover: T,
        images: Vec<PathBuf>,
        opts: &StandbyDriverConfig,
        clock: crate::primary::driver::Clock,
        base: Instant,
    ) -> Result<Self, StandbyDriverError> {
        let disks = if opts.mirror_disks {
            Some(DiskSide::open(
                &images,
                opts.discard_disk_data,
                base + clock(),
            )?)
        } else {
            None
        };
        Ok(StandbyDriver {
            link,
            takeover,
            clock,
            base,
            images,
            disks,
            proto: Standby::new(opts.protocol),
            mirror: None,
            console_end: BTreeMap::new(),
            committed_console_end: None,
            progress: StandbyProgress::default(),
            verify: opts.verify.clone(),
            gate: opts.takeover_gate.as_ref().map(|g| g.0.clone()),
            session_generation: 0,
            swap_requested: false,
            placing: false,
            swap_rx: Vec::new(),
        })
    }

    fn instant(&self) -> Instant {
        self.base + (self.clock)()
    }

    pub fn committed(&self) -> Option<u64> {
        self.proto.committed()
    }

    pub fn progress(&self) -> StandbyProgress {
        self.progress
    }

    /// Protocol violations seen (the machine is Broken after the first).
    pub fn violations(&self) -> u64 {
        self.proto.violations()
    }

    /// The mirror (once the primary said hello).
    pub fn mirror(&self) -> Option<&Mirror> {
        self.mirror.as_ref()
    }

    /// Resync chunks wait for their acknowledgement: look for messages without waiting
    /// and call [`StandbyDriver::on_idle`] as soon as none is there.
    pub fn acks_waiting(&self) -> bool {
        self.disks.as_ref().is_some_and(DiskSide::acks_waiting)
    }

    /// No message is waiting: acknowledge the resync chunks written so far (one
    /// `fdatasync` for them all).
    pub fn on_idle(&mut self) -> Result<(), StandbyDriverError> {
        let now = self.instant();
        if let Some(d) = &mut self.disks {
            d.feed(DiskEvent::Idle, &[], now, &self.link)?;
        }
        Ok(())
    }

    /// A message from the primary: `body[..head_len]` is its head (as the A-Link
    /// delivers it).
    pub fn on_message(
        &mut self,
        head_len: usize,
        body: alink::Buf,
    ) -> Result<Option<StandbyOutcome<T::Vm>>, StandbyDriverError> {
        let m = decode_standbound_at(self.link.version(), self.session_generation, head_len, body);
        self.on_decoded(m)
    }

    /// A message as the A-Link delivered it: its payload in its body, or (an
    /// initial-sync part) placed into the mirror or lost (see [`crate::messages::PartData`]).
    pub fn on_delivered(
        &mut self,
        m: alink::InMsg,
    ) -> Result<Option<StandbyOutcome<T::Vm>>, StandbyDriverError> {
        let m = decode_delivered(self.link.version(), self.session_generation, m);
        self.on_decoded(m)
    }

    fn on_decoded(
        &mut self,
        m: Result<Standbound, DecodeError>,
    ) -> Result<Option<StandbyOutcome<T::Vm>>, StandbyDriverError> {
        let ev = match m {
            Ok(Standbound::Hello { layout, generation }) => {
                self.check_generation(generation)?;
                self.session_generation = generation;
                if self.mirror.is_none() {
                    let mut m = Mirror::new(&layout, self.open_images()?)?;
                    if self.verify.is_some() {
                        m.enable_page_hashes();
                    }
                    // Sessions of protocol 4 on: sync parts' pages go straight into
                    // the mirror (the placer stops at the first epoch's apply).
                    let placed = self.link.set_sync_placer(m.sync_placer());
                    self.placing = placed;
                    self.mirror = Some(m);
                    log::info!(
                        "standby: primary connected, mirror of {layout:x?}{}",
                        if placed { ", sync pages placed" } else { "" }
                    );
                    let now = self.instant();
                    if let Some(d) = &mut self.disks {
                        d.feed(DiskEvent::Hello, &[], now, &self.link)?;
                    }
                }
                return Ok(None);
            }
            Ok(Standbound::Disk(m)) => {
                let now = self.instant();
                match &mut self.disks {
                    Some(d) => d.on_msg(&m.head, m.payload(), now, &self.link)?,
                    None => {
                        log::error!("standby: disk message but this standby does not mirror disks")
                    }
                }
                return Ok(None);
            }
            Ok(Standbound::Swap {
                epoch,
                released_through,
                rx_frames,
            }) => {
                // The grant is asked only for a swap this replica can accept (else the
                // protocol refuses it below, as before), and before the protocol
                // commits to the takeover.
                if self.proto.swap_refusal(epoch, released_through).is_none() {
                    if let Some(g) = &self.gate {
                        if let Err(why) = g.grant_swap() {
                            log::warn!(
                                "standby: planned role swap at epoch {epoch} REFUSED: {why}; \
                                 the VM runs on at the primary"
                            );
                            self.link.send(
                                &ToPrimary::SwapRefused { epoch },
                                Vec::new(),
                                ACK_WAIT,
                            )?;
                            return Ok(None);
                        }
                    }
                }
                self.swap_requested = true;
                self.swap_rx = rx_frames;
                StandbyEvent::SwapRequest {
                    epoch,
                    released_through,
                }
            }
            Ok(Standbound::SyncRoundDone { round, pages }) => {
                log::info!("standby: initial sync round {round} received ({pages} pages)");
                return Ok(None);
            }
            Ok(Standbound::Part(p)) => {
                let h = p.head();
                self.check_generation(h.generation)?;
                match h.of {
                    PartOf::Sync { round } => StandbyEvent::SyncPart {
                        round,
                        part: h.part,
                        parts: h.parts,
                        msg: p,
                    },
                    PartOf::Epoch { epoch, sync_rounds } => {
                        if let Some(c) = h.console {
                            self.console_end.insert(epoch, c.pos + u64::from(c.len));
                        }
                        StandbyEvent::EpochPart {
                            epoch,
                            part: h.part,
                            parts: h.parts,
                            sync_rounds,
                            released_through: h.released_through,
                            msg: p,
                        }
                    }
                }
            }
            Err(e) => {
                log::error!("standby: bad message from the primary: {e}");
                StandbyEvent::BadMessage
            }
        };
        self.feed(ev)
    }

    /// The highest quorum generation this node knows (0: none): its quorum's, or the
    /// one the session's `Hello` carried if that is newer (what its acks echo, so that
    /// a primary refuses acks of any other generation).
    fn known_generation(&self) -> u64 {
        self.gate
            .as_ref()
            .map_or(0, |g| g.generation())
            .max(self.session_generation)
    }

    /// Refuses a session `Hello` or a checkpoint part stamped with a generation older
    /// than its session's `Hello` (a part: the primary's stamp only grows), or older
    /// than the quorum's newest generation when the primary's node does not hold that
    /// one (see [`fence`]: the primary's own fresh grant, learned here first, fences
    /// nothing): the primary is told ([`ToPrimary::Fenced`]: it releases nothing more
    /// and is demoted) and the driver ends with [`StandbyDriverError::Fenced`]; nothing
    /// of it was staged or applied.
    fn check_generation(&self, generation: u64) -> Result<(), StandbyDriverError> {
        let quorum = self.gate.as_ref().map_or(0, |g| g.generation());
        let peer_holds = self.gate.as_ref().is_some_and(|g| g.peer_holds(quorum));
        let verdict = fence(generation, self.session_generation, false)
            .and_then(|()| fence(generation, quorum, peer_holds));
        if let Err(e) = verdict {
            let known = match &e {
                StandbyDriverError::Fenced { known, .. } => *known,
                _ => self.known_generation(),
            };
            log::error!("standby: {e}");
            if let Err(se) = self.link.send(
                &ToPrimary::Fenced { generation: known },
                Vec::new(),
                ACK_WAIT,
            ) {
                log::warn!("standby: telling the primary it is fenced: {se}");
            }
            return Err(e);
        }
        Ok(())
    }

    /// Every link to the primary is down (after the messages already received).
    pub fn on_peer_lost(&mut self) -> Result<Option<StandbyOutcome<T::Vm>>, StandbyDriverError> {
        self.feed(StandbyEvent::PeerLost)
    }

    fn open_images(&self) -> Result<Vec<std::fs::File>, StandbyDriverError> {
        self.images
            .iter()
            .map(|p| {
                OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(p)
                    .map_err(|source| StandbyDriverError::Disk {
                        path: p.clone(),
                        source,
                    })
            })
            .collect()
    }

    fn mirror_mut(&mut self) -> Result<&mut Mirror, StandbyDriverError> {
        self.mirror.as_mut().ok_or(StandbyDriverError::NoHello)
    }

    /// Feeds `ev` and performs the resulting actions.
    fn feed(
        &mut self,
        ev: StandbyEvent<ReceivedPart>,
    ) -> Result<Option<StandbyOutcome<T::Vm>>, StandbyDriverError> {
        let mut queue = std::collections::VecDeque::from([ev]);
        while let Some(ev) = queue.pop_front() {
            let actions = match self.proto.on_event(ev) {
                Ok(a) => a,
                Err(e) => {
                    log::error!("standby: {e}");
                    continue;
                }
            };
            for a in actions {
                match a {
                    StandbyAction::WriteSync { msg, .. } => {
                        self.progress.sync_pages += self.mirror_mut()?.write_sync_received(&msg)?;
                    }
                    StandbyAction::Stage { epoch, msg, .. } => {
                        self.mirror_mut()?.stage_part(epoch, msg)?;
                    }
                    StandbyAction::Apply { epoch } => {
                        if std::mem::take(&mut self.placing) {
                            // Every sync part was delivered before this epoch's parts.
                            self.link.set_sync_placer(None);
                        }
                        self.apply(epoch)?;
                        queue.push_back(StandbyEvent::Applied { epoch });
                    }
                    StandbyAction::Ack { epoch } => {
                        self.progress.committed = Some(epoch);
                        let generation = self.known_generation();
                        self.link.send(
                            &ToPrimary::Ack { epoch, generation },
                            Vec::new(),
                            ACK_WAIT,
                        )?;
                    }
                    StandbyAction::TrimOutput { through } => {
                        self.mirror_mut()?.trim_output(through)
                    }
                    StandbyAction::DiscardStaged => {
                        log::warn!("standby: discarding incomplete epochs");
                        self.mirror_mut()?.discard_staged();
                    }
                    StandbyAction::Failover {
                        last_committed,
                        released_through,
                    } => {
                        let (vm, report) = self.fail_over(last_committed, released_through)?;
                        return Ok(Some(StandbyOutcome::FailedOver(Box::new(vm), report)));
                    }
                    StandbyAction::NoReplica => return Ok(Some(StandbyOutcome::NoReplica)),
                    StandbyAction::AcceptSwap { epoch } => {
                        // The handover: from here the primary never resumes its guest.
                        self.link
                            .send(&ToPrimary::SwapAccepted { epoch }, Vec::new(), ACK_WAIT)?;
                    }
                }
            }
        }
        Ok(None)
    }

    fn apply(&mut self, epoch: u64) -> Result<(), StandbyDriverError> {
        let now = self.instant();
        let mirror = self.mirror.as_mut().ok_or(StandbyDriverError::NoHello)?;
        let commit = self
            .disks
            .as_mut()
            .map(|d| &mut d.disks as &mut dyn DiskCommit);
        let st = mirror.apply_into(epoch, commit)?;
        if let Some(d) = &mut self.disks {
            d.feed(DiskEvent::Committed { epoch }, &[], now, &self.link)?;
        }
        if let Some(log) = self.verify.clone() {
            let m = self.mirror_mut()?;
            let state = match m.vm_state() {
                Some(s) => hash_state(&s?),
                None => 0,
            };
            if let Some(memory) = m.page_hash_digest(is_full_epoch(epoch)) {
                log.record(epoch, ReplicaHash { memory, state });
            }
        }
        self.progress.applied_pages += st.pages;
        self.progress.applied_disk_writes += st.disk_writes;
        if let Some(end) = self.console_end.remove(&epoch) {
            self.committed_console_end = Some(end);
        }
        self.console_end = self.console_end.split_off(&epoch);
        if epoch == 0 {
            log::info!("standby: epoch 0 committed: the VM is protected");
        }
        Ok(())
    }

    fn fail_over(
        &mut self,
        last_committed: u64,
        released_through: Option<u64>,
    ) -> Result<(T::Vm, FailoverReport), StandbyDriverError> {
        let t0 = self.instant();
        log::warn!(
            "standby: FAILOVER from epoch {last_committed} (primary released through \
             {released_through:?}). Without a quorum witness, a cut of all links with both \
             PMs alive leads to two running copies"
        );
        if let Some(mut d) = self.disks.take() {
            // The images hold every committed epoch durably; a half-done resync target
            // is never promoted. The disks are closed before the VM opens them.
            d.feed(DiskEvent::Failover, &[], t0, &self.link)?;
        }
        let mut mirror = self.mirror.take().ok_or(StandbyDriverError::NoState)?;
        let state = mirror
            .state_bytes()
            .ok_or(StandbyDriverError::NoState)?
            .to_vec();
        let memory = mirror.take_memory().ok_or(StandbyDriverError::NoState)?;
        let input = TakeoverInput {
            last_committed,
            released_through,
            state: &state,
            memory,
            console_next: self.committed_console_end,
            console: mirror.console_to_rerelease(released_through).collect(),
            frames: mirror.frames_to_resend(released_through).collect(),
            rx_frames: std::mem::take(&mut self.swap_rx),
        };
        let (vm, mut out) = self.takeover.take_over(input)?;
        out.last_committed = last_committed;
        out.released_through = released_through;
        out.planned = self.swap_requested;
        out.failover_time = self.instant().saturating_duration_since(t0);
        log::warn!(
            "standby: the VM runs here now (failover took {:?}; {} console bytes released \
             again from position {:?}; {} RARP announces; {} frames sent again, {} refused; \
             {} frames the old primary received handed to the guest)",
            out.failover_time,
            out.rereleased_bytes,
            out.rereleased_from,
            out.announces,
            out.resent_frames,
            out.resend_failed,
            out.handed_in_frames
        );
        Ok((vm, out))
    }
}

/// Runs the standby side for `cfg` (its own console, disks and TAPs; the same memory
/// size, vCPUs and guest) until the primary is lost (then fails over and returns the
/// running VM) or `stop` is set.
pub fn run_standby(
    link: &Alink,
    cfg: &VmConfig,
    protocol: StandbyConfig,
    stop: &AtomicBool,
) -> Result<StandbyOutcome, StandbyDriverError> {
    let opts = StandbyDriverConfig {
        protocol,
        ..StandbyDriverConfig::default()
    };
    run_standby_with(link, cfg, &opts, stop)
}

/// [`run_standby`] with the driver's options.
pub fn run_standby_with(
    link: &Alink,
    cfg: &VmConfig,
    opts: &StandbyDriverConfig,
    stop: &AtomicBool,
) -> Result<StandbyOutcome, StandbyDriverError> {
    let t0 = Instant::now();
    let takeover = VmmTakeover {
        cfg,
        before_start: opts.before_start.clone(),
    };
    let images = cfg.disks.iter().map(|d| d.path.clone()).collect();
    let mut d = StandbyDriver::new(
        link,
        takeover,
        images,
        opts,
        Box::new(move || t0.elapsed()),
        t0,
    )?;
    let mut seen_peer = false;
    let gate = opts.takeover_gate.as_ref().map(|g| g.0.clone());
    // Every link is down and the gate has not granted the takeover yet.
    let mut waiting_grant = false;
    let mut told_committed = None;
    while !stop.load(Ordering::Relaxed) {
        let wait = if d.acks_waiting() {
            Duration::ZERO
        } else {
            POLL
        };
        let msg = match link.recv(wait) {
            Ok(m) => m,
            Err(AlinkError::Closed) => None,
            // A new instance of the primary's A-Link ended this session: the primary is
            // alive (it authenticated) and starts its next session; no takeover.
            Err(e @ AlinkError::PeerRestarted { .. }) => {
                log::warn!("standby: {e}");
                return Ok(StandbyOutcome::PrimaryBack {
                    committed: d.committed(),
                });
            }
            Err(e) => return Err(e.into()),
        };
        match msg {
            // Nothing waiting: make the resync chunks written so far durable and
            // acknowledge them.
            None => d.on_idle()?,
            Some(m) => {
                seen_peer = true;
                if let Some(out) = d.on_delivered(m)? {
                    if let StandbyOutcome::FailedOver(_, r) = &out {
                        if r.planned {
                            // The acceptance must reach the old primary (a lost one
                            // makes it resume its guest); the VM runs here meanwhile.
                            if let Err(e) = link.flush(Duration::from_secs(2)) {
                                log::warn!("standby: swap acceptance not confirmed: {e}");
                            }
                        }
                    }
                    return Ok(out);
                }
            }
        }
        if let (Some(g), Some(c)) = (&gate, d.committed()) {
            if told_committed != Some(c) {
                told_committed = Some(c);
                g.committed(c);
            }
        }
        if waiting_grant {
            if link.peer_reachable() || link.peer_restarted().is_some() {
                log::warn!(
                    "standby: a link to the primary is back before any takeover grant: it \
                     ran on; a new session resyncs this replica"
                );
                return Ok(StandbyOutcome::PrimaryBack {
                    committed: d.committed(),
                });
            }
            if gate.as_ref().is_some_and(|g| g.may_take_over()) {
                waiting_grant = false;
                log::warn!("standby: the quorum grants the takeover");
                if let Some(out) = d.on_peer_lost()? {
                    return Ok(out);
                }
            }
            continue;
        }
        let mut lost = false;
        while let Some(ev) = link.poll_event(Duration::ZERO) {
            match ev {
                Event::Link(LinkEvent::PeerUnreachable) => lost = true,
                Event::Link(LinkEvent::PeerReachable) => {
                    seen_peer = true;
                    lost = false;
                }
                Event::Link(e) => log::info!("standby: A-Link {e:?}"),
                Event::Refused { link, peer, reason } => {
                    log::warn!("standby: A-Link {link} refused {peer:?}: {reason}")
                }
                Event::PeerRestarted { old, new } => {
                    log::warn!(
                        "standby: the primary's A-Link instance {old:#x} was replaced by \
                         {new:#x}: it is alive and starts a new session; no takeover"
                    );
                    return Ok(StandbyOutcome::PrimaryBack {
                        committed: d.committed(),
                    });
                }
            }
        }
        if lost && seen_peer && !link.peer_reachable() {
            // Everything the primary sent before it went away was delivered (in order)
            // before this event; drain what is still queued first.
            while let Ok(Some(m)) = link.recv(Duration::ZERO) {
                if let Some(out) = d.on_delivered(m)? {
                    return Ok(out);
                }
            }
            log::warn!("standby: every link to the primary is down, heartbeats timed out");
            if let Some(g) = gate.as_ref().filter(|_| d.committed().is_some()) {
                if !g.may_take_over() {
                    log::warn!(
                        "standby: waiting for the quorum's grant before taking over (the \
                         replica is kept)"
                    );
                    waiting_grant = true;
                    continue;
                }
            }
            if let Some(out) = d.on_peer_lost()? {
                return Ok(out);
            }
        }
    }
    Ok(StandbyOutcome::Stopped {
        committed: d.committed(),
    })
}
