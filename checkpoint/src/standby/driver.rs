//! The standby's driver: runs the [`Standby`] state machine on what the A-Link
//! delivers, applies epochs into the [`Mirror`], acknowledges them, and on the loss of
//! every link fails over: a VM built from the last committed epoch on the standby's own
//! console sink, disks and TAPs, the committed-but-maybe-unreleased console output
//! released again at its stream positions, the guest's MAC announced on each TAP and
//! the committed-but-maybe-unreleased net frames sent again on them.
//!
//! Failover without a quorum witness: a cut of all links while the primary is alive
//! looks exactly like a dead primary from here. The standby then runs a second copy of
//! the VM. This is logged at every failover until the quorum issue lands.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use alink::{Alink, AlinkError, Event, InMsg, LinkEvent};

use crate::disk_msgs::{DiskToPrimary, DiskToStandby, DIGEST_LEN};
use crate::messages::{decode_to_standby, PartOf, StandboundMsg, ToPrimary};
use crate::protocol::{Standby, StandbyAction, StandbyConfig, StandbyEvent};
use crate::standby::disks::{StandbyDiskError, StandbyDisks};
use crate::standby::mirror::{Mirror, MirrorError};
use crate::verify::{hash_state, is_full_epoch, HashLog, ReplicaHash};
use vmm::config::VmConfig;
use vmm::devices::output::OutputGate;
use vmm::devices::virtio::persist::{ConsoleAttachment, DeviceState};
use vmm::{build_vm_from_state_with_memory, BuildError, VmState, Vmm, VmmError};

const POLL: Duration = Duration::from_millis(5);
/// Resync chunks written before one `fdatasync` acknowledges them all (fewer when the
/// link is idle).
const CHUNK_ACK_BATCH: usize = 8;

#[derive(Debug, thiserror::Error)]
pub enum StandbyDriverError {
    #[error("mirror: {0}")]
    Mirror(#[from] MirrorError),
    #[error("A-Link: {0}")]
    Alink(#[from] AlinkError),
    #[error("opening the standby's disk {path}: {source}")]
    Disk {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("the committed VM state does not decode: {0}")]
    State(#[from] vmm::persist::StateFormatError),
    #[error("failover: building the VM: {0}")]
    Build(#[from] BuildError),
    #[error("failover: {0}")]
    Vmm(#[from] VmmError),
    #[error("disk mirroring: {0}")]
    Disks(#[from] StandbyDiskError),
    #[error("the primary sent an epoch before its memory layout")]
    NoHello,
    #[error("failover with no committed state in the mirror")]
    NoState,
}

/// What happened after the failover.
#[derive(Clone, Debug, Default)]
pub struct FailoverReport {
    pub last_committed: u64,
    pub released_through: Option<u64>,
    /// Console bytes released again (those of committed epochs after
    /// `released_through`), and the stream position of the first of them.
    pub rereleased_bytes: u64,
    pub rereleased_from: Option<u64>,
    /// Where the resumed guest's console output starts.
    pub console_next: Option<u64>,
    /// From the loss of the primary to the VM running.
    pub failover_time: Duration,
    /// RARP announces written before the guest ran, one per net device (the repeats
    /// of [`ANNOUNCE_REPEATS`] follow from a thread and are not counted).
    pub announces: usize,
    /// Net frames of committed epochs after `released_through` sent again, and those
    /// the TAP refused (or whose device the config lacks).
    pub resent_frames: u64,
    pub resend_failed: u64,
    /// The survivor's mirrored disks (recording its writes, degraded), installed as
    /// the VM's disk hooks: what protects the VM again when a standby returns.
    pub disks: Option<Arc<crate::primary::disks::PrimaryDisks>>,
}

/// How a standby run ended.
pub enum StandbyOutcome {
    /// The primary was lost; this VM runs now.
    FailedOver(Box<Vmm>, FailoverReport),
    /// The primary was lost before the first epoch committed.
    NoReplica,
    /// `stop` was set.
    Stopped { committed: Option<u64> },
}

/// What the standby has done so far (for progress reports and tests).
#[derive(Clone, Copy, Debug, Default)]
pub struct StandbyProgress {
    pub committed: Option<u64>,
    pub sync_pages: u64,
    pub applied_pages: u64,
    pub applied_disk_writes: u64,
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
}

/// [`run_standby`] with the driver's options.
pub fn run_standby_with(
    link: &Alink,
    cfg: &VmConfig,
    opts: &StandbyDriverConfig,
    stop: &AtomicBool,
) -> Result<StandbyOutcome, StandbyDriverError> {
    let mut disks = None;
    if opts.mirror_disks {
        let mut d = StandbyDisks::open(cfg)?;
        if opts.discard_disk_data {
            log::warn!("standby: discarding the disks' replica metadata: the primary will send full copies");
            d.discard_all()?;
        }
        disks = Some(d);
    }
    let mut d = Driver {
        link,
        cfg,
        disks,
        last_progress_save: Instant::now(),
        verify: opts.verify.clone(),
        proto: Standby::new(opts.protocol),
        mirror: None,
        console_end: BTreeMap::new(),
        committed_console_end: None,
        progress: StandbyProgress::default(),
        seen_peer: false,
    };
    while !stop.load(Ordering::Relaxed) {
        if let Some(out) = d.step()? {
            return Ok(out);
        }
    }
    Ok(StandbyOutcome::Stopped {
        committed: d.proto.committed(),
    })
}

struct Driver<'a> {
    link: &'a Alink,
    cfg: &'a VmConfig,
    disks: Option<StandbyDisks>,
    last_progress_save: Instant,
    proto: Standby,
    mirror: Option<Mirror>,
    /// End of the console output of each received epoch (from its last part).
    console_end: BTreeMap<u64, u64>,
    /// Console stream position after the last committed epoch.
    committed_console_end: Option<u64>,
    progress: StandbyProgress,
    seen_peer: bool,
    verify: Option<Arc<HashLog>>,
}

impl Driver<'_> {
    fn step(&mut self) -> Result<Option<StandbyOutcome>, StandbyDriverError> {
        let wait = if self.disks.as_ref().is_some_and(|d| d.unacked_chunks() > 0) {
            Duration::ZERO
        } else {
            POLL
        };
        let msg = match self.link.recv(wait) {
            Ok(m) => m,
            Err(AlinkError::Closed) => None,
            Err(e) => return Err(e.into()),
        };
        if msg.is_none() {
            // Nothing waiting: make the resync chunks written so far durable and
            // acknowledge them.
            self.ack_chunks()?;
        }
        if let Some(m) = msg {
            self.seen_peer = true;
            if let Some(out) = self.on_message(m)? {
                return Ok(Some(out));
            }
        }
        let mut lost = false;
        while let Some(ev) = self.link.poll_event(Duration::ZERO) {
            match ev {
                Event::Link(LinkEvent::PeerUnreachable) => lost = true,
                Event::Link(LinkEvent::PeerReachable) => {
                    self.seen_peer = true;
                    lost = false;
                }
                Event::Link(e) => log::info!("standby: A-Link {e:?}"),
                Event::Refused { link, peer, reason } => {
                    log::warn!("standby: A-Link {link} refused {peer:?}: {reason}")
                }
            }
        }
        if lost && self.seen_peer && !self.link.peer_reachable() {
            // Everything the primary sent before it went away was delivered (in order)
            // before this event; drain what is still queued first.
            while let Ok(Some(m)) = self.link.recv(Duration::ZERO) {
                if let Some(out) = self.on_message(m)? {
                    return Ok(Some(out));
                }
            }
            log::warn!("standby: every link to the primary is down, heartbeats timed out");
            return self.feed(StandbyEvent::PeerLost, None);
        }
        Ok(None)
    }

    fn on_message(&mut self, m: InMsg) -> Result<Option<StandbyOutcome>, StandbyDriverError> {
        let ev = match decode_to_standby(m.head_bytes(), m.payload()) {
            Ok(StandboundMsg::Hello { layout }) => {
                if self.mirror.is_none() {
                    let disks = self.open_disks()?;
                    let mut m = Mirror::new(&layout, disks)?;
                    if self.verify.is_some() {
                        m.enable_page_hashes();
                    }
                    self.mirror = Some(m);
                    log::info!("standby: primary connected, mirror of {layout:x?}");
                    if let Some(d) = &self.disks {
                        let (disks, payload) = d.report();
                        self.send_disk(DiskToPrimary::Meta { disks }, payload)?;
                    }
                }
                return Ok(None);
            }
            Ok(StandboundMsg::Disk(msg, payload)) => {
                self.on_disk(msg, payload)?;
                return Ok(None);
            }
            Ok(StandboundMsg::SyncRoundDone { round, pages }) => {
                log::info!("standby: initial sync round {round} received ({pages} pages)");
                return Ok(None);
            }
            Ok(StandboundMsg::Part(v)) => match v.head.of {
                PartOf::Sync { round } => StandbyEvent::SyncPart {
                    round,
                    part: v.head.part,
                    parts: v.head.parts,
                },
                PartOf::Epoch { epoch, sync_rounds } => {
                    if let Some(c) = v.head.console {
                        self.console_end.insert(epoch, c.pos + u64::from(c.len));
                    }
                    StandbyEvent::EpochPart {
                        epoch,
                        part: v.head.part,
                        parts: v.head.parts,
                        sync_rounds,
                        released_through: v.head.released_through,
                    }
                }
            },
            Err(e) => {
                log::error!("standby: bad message from the primary: {e}");
                StandbyEvent::BadMessage
            }
        };
        self.feed(ev, Some(m))
    }

    fn open_disks(&self) -> Result<Vec<File>, StandbyDriverError> {
        self.cfg
            .disks
            .iter()
            .map(|d| {
                OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(&d.path)
                    .map_err(|source| StandbyDriverError::Disk {
                        path: d.path.clone(),
                        source,
                    })
            })
            .collect()
    }

    fn mirror(&mut self) -> Result<&mut Mirror, StandbyDriverError> {
        self.mirror.as_mut().ok_or(StandbyDriverError::NoHello)
    }

    /// Feeds `ev` (from message `msg`, if any) and performs the resulting actions.
    fn feed(
        &mut self,
        ev: StandbyEvent,
        mut msg: Option<InMsg>,
    ) -> Result<Option<StandbyOutcome>, StandbyDriverError> {
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
                    StandbyAction::WriteSync { .. } => {
                        if let Some(m) = msg.take() {
                            let (h, p) = m.body.split_at(m.head_len);
                            self.progress.sync_pages += self.mirror()?.write_sync(h, p)?;
                        }
                    }
                    StandbyAction::Stage { epoch, .. } => {
                        if let Some(m) = msg.take() {
                            self.mirror()?.stage(epoch, m.head_len, m.body)?;
                        }
                    }
                    StandbyAction::Apply { epoch } => {
                        let mirror = self.mirror.as_mut().ok_or(StandbyDriverError::NoHello)?;
                        let st = mirror.apply_into(epoch, self.disks.as_mut())?;
                        if let Some(d) = &mut self.disks {
                            if epoch == 0 {
                                d.in_sync();
                            } else if self.last_progress_save.elapsed() > Duration::from_secs(1) {
                                d.note_committed(epoch);
                                self.last_progress_save = Instant::now();
                            }
                        }
                        if let Some(log) = self.verify.clone() {
                            let m = self.mirror()?;
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
                        queue.push_back(StandbyEvent::Applied { epoch });
                    }
                    StandbyAction::Ack { epoch } => {
                        self.progress.committed = Some(epoch);
                        let head = ToPrimary::Ack { epoch };
                        // Acks are tiny; a full window means the primary is gone, which
                        // the link events report.
                        match self.link.send_timeout(
                            &head,
                            Vec::new(),
                            Some(Duration::from_millis(50)),
                        ) {
                            Ok(_) | Err(AlinkError::Timeout) | Err(AlinkError::Closed) => {}
                            Err(e) => return Err(e.into()),
                        }
                    }
                    StandbyAction::TrimOutput { through } => self.mirror()?.trim_output(through),
                    StandbyAction::DiscardStaged => {
                        log::warn!("standby: discarding incomplete epochs");
                        self.mirror()?.discard_staged();
                    }
                    StandbyAction::Failover {
                        last_committed,
                        released_through,
                    } => {
                        let (vmm, report) = self.fail_over(last_committed, released_through)?;
                        return Ok(Some(StandbyOutcome::FailedOver(Box::new(vmm), report)));
                    }
                    StandbyAction::NoReplica => return Ok(Some(StandbyOutcome::NoReplica)),
                }
            }
        }
        Ok(None)
    }

    /// Syncs the resync chunks written so far and acknowledges them.
    fn ack_chunks(&mut self) -> Result<(), StandbyDriverError> {
        let Some(disks) = self.disks.as_mut() else {
            return Ok(());
        };
        if disks.unacked_chunks() == 0 {
            return Ok(());
        }
        for (disk, first_block, blocks) in disks.sync_chunks()? {
            self.send_disk(
                DiskToPrimary::ChunkDone {
                    disk,
                    first_block,
                    blocks,
                },
                Vec::new(),
            )?;
        }
        Ok(())
    }

    fn send_disk(&self, m: DiskToPrimary, payload: Vec<u8>) -> Result<(), StandbyDriverError> {
        let payload = if payload.is_empty() {
            Vec::new()
        } else {
            vec![alink::Bytes::from(payload)]
        };
        match self
            .link
            .send_timeout(&ToPrimary::Disk(m), payload, Some(Duration::from_secs(5)))
        {
            Ok(_) | Err(AlinkError::Timeout) | Err(AlinkError::Closed) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    fn on_disk(&mut self, m: DiskToStandby, payload: &[u8]) -> Result<(), StandbyDriverError> {
        let Some(disks) = self.disks.as_mut() else {
            log::error!("standby: disk message but this standby does not mirror disks");
            return Ok(());
        };
        match m {
            DiskToStandby::Plan { disks: plan } => {
                if let Err(e) = disks.on_plan(&plan) {
                    log::error!("standby: {e}");
                    self.send_disk(
                        DiskToPrimary::Refused {
                            reason: e.to_string().chars().take(1000).collect(),
                        },
                        Vec::new(),
                    )?;
                    return Err(e.into());
                }
            }
            DiskToStandby::Chunk {
                disk,
                first_block,
                blocks,
                ..
            } => {
                disks.write_chunk(disk, first_block, blocks, payload)?;
                if self.last_progress_save.elapsed() > Duration::from_secs(1) {
                    disks.save_progress();
                    self.last_progress_save = Instant::now();
                }
                // Acknowledged in batches once durable: here when enough are waiting,
                // else as soon as no message is waiting (see `step`).
                if disks.unacked_chunks() >= CHUNK_ACK_BATCH {
                    self.ack_chunks()?;
                }
            }
            DiskToStandby::ResyncDone { rounds, blocks } => {
                disks.save_progress();
                log::info!(
                    "standby: disk resync rounds done ({rounds} passes, {blocks} blocks sent, \
                     {} bytes received); consistent once epoch 0 commits",
                    disks.resync_bytes
                );
            }
            DiskToStandby::Read {
                id,
                disk,
                offset,
                len,
            } => {
                let (ok, data) = match disks.read(disk, offset, len) {
                    Ok(d) => (true, d),
                    Err(e) => {
                        log::error!("standby: serving a read for the primary: {e}");
                        (false, Vec::new())
                    }
                };
                self.send_disk(DiskToPrimary::ReadDone { id, ok }, data)?;
            }
            DiskToStandby::Verify {
                id,
                disk,
                range_bytes,
                first_range,
                count,
            } => {
                let mut buf = Vec::new();
                let r = disks.image(usize::from(disk)).map(|(f, size)| {
                    storage_mirror::verify::range_digests(
                        f,
                        size,
                        range_bytes,
                        first_range,
                        count,
                        &mut buf,
                    )
                });
                let (ok, payload) = match r {
                    Some(Ok(ds)) => {
                        let mut p = Vec::with_capacity(ds.len() * DIGEST_LEN);
                        for d in &ds {
                            p.extend_from_slice(d);
                        }
                        (true, p)
                    }
                    Some(Err(e)) => {
                        log::error!("standby: verify digests: {e}");
                        (false, Vec::new())
                    }
                    None => (false, Vec::new()),
                };
                let count = if ok { count } else { 0 };
                self.send_disk(DiskToPrimary::Digests { id, count, ok }, payload)?;
            }
        }
        Ok(())
    }

    fn fail_over(
        &mut self,
        last_committed: u64,
        released_through: Option<u64>,
    ) -> Result<(Vmm, FailoverReport), StandbyDriverError> {
        let t0 = Instant::now();
        log::warn!(
            "standby: FAILOVER from epoch {last_committed} (primary released through \
             {released_through:?}). Without a quorum witness, a cut of all links with both \
             PMs alive leads to two running copies"
        );
        if let Some(d) = &mut self.disks {
            d.prepare_failover()?;
        }
        let mut mirror = self.mirror.take().ok_or(StandbyDriverError::NoState)?;
        let mut state = mirror.vm_state().ok_or(StandbyDriverError::NoState)??;
        let cfg = rebind_attachments(&mut state, self.cfg);
        // The VM runs in the mirror's RAM itself: no copy, whatever the guest's size.
        let mem = mirror.take_memory().ok_or(StandbyDriverError::NoState)?;
        let (mut vmm, report) = build_vm_from_state_with_memory(&cfg, &state, mem)?;
        if !report.refused_msrs.is_empty() {
            log::warn!(
                "standby: MSRs refused on restore: {:x?}",
                report.refused_msrs
            );
        }
        let mut out = FailoverReport {
            last_committed,
            released_through,
            ..FailoverReport::default()
        };
        // The resumed guest's output continues where the last committed epoch's ended.
        out.console_next = vmm.set_console_positioned(self.committed_console_end)?;
        for (pos, bytes) in mirror.console_to_rerelease(released_through) {
            vmm.write_console_at(pos, bytes);
            out.rereleased_from.get_or_insert(pos);
            out.rereleased_bytes += bytes.len() as u64;
        }
        // Before the guest runs, in this order: the RARP announce, so that the LAN
        // learns the guest's MAC on this port first; then the frames of committed
        // epochs the primary may not have released (the resumed guest thinks they are
        // on the wire; without them its TCP waits for its RTO, >= 1 s in smoltcp); then
        // whatever the resumed guest sends. Each NIC's frames thus leave in the order
        // the guest emitted them: nothing the resumed guest sends overtakes an older
        // frame. Not idempotent, unlike the console: a frame the primary did release
        // goes out twice, which TCP (duplicate segments are dropped and re-ACKed), ARP
        // and ICMP tolerate as they tolerate any duplicating network.
        let mut macs = Vec::new();
        for (i, n) in cfg.nets.iter().enumerate() {
            match vmm::config::parse_mac(&n.mac) {
                Ok(mac) => {
                    if vmm.send_raw_frame(i, &rarp_announce(mac)) {
                        out.announces += 1;
                    }
                    macs.push((i, mac));
                }
                Err(e) => log::error!("standby: net {i}: bad MAC {}: {e}", n.mac),
            }
        }
        for (net, frame) in mirror.frames_to_resend(released_through) {
            if vmm.send_raw_frame(usize::from(net), frame) {
                out.resent_frames += 1;
            } else {
                out.resend_failed += 1;
            }
        }
        drop(mirror);
        if self.disks.is_some() {
            // From the first instruction the resumed guest runs, its writes are the
            // survivor's alone: record them (new generation, degraded) for the resync
            // of the returning peer.
            let survivor = crate::primary::disks::PrimaryDisks::open(&cfg)
                .map_err(|e| StandbyDiskError::Survivor(e.to_string()))?;
            vmm.set_disk_hooks(Some(survivor.clone()));
            out.disks = Some(survivor);
        }
        vmm.start()?;
        out.failover_time = t0.elapsed();
        repeat_announces(vmm.devices().output_gate().clone(), macs);
        log::warn!(
            "standby: the VM runs here now (failover took {:?}; {} console bytes released \
             again from position {:?}; {} RARP announces; {} frames sent again, {} refused)",
            out.failover_time,
            out.rereleased_bytes,
            out.rereleased_from,
            out.announces,
            out.resent_frames,
            out.resend_failed
        );
        Ok((vmm, out))
    }
}

/// The committed state names the primary's console, disks and TAPs; the standby runs
/// the VM on its own. Rewrites the state's attachments to the standby's `cfg` and
/// returns the config to build with (disk serials and MACs as the guest knew them).
pub fn rebind_attachments(state: &mut VmState, cfg: &VmConfig) -> VmConfig {
    let mut cfg = cfg.clone();
    let (mut disk, mut net) = (0, 0);
    for t in &mut state.devices {
        match &mut t.device {
            DeviceState::Console { sink } => *sink = ConsoleAttachment::from(&cfg.console),
            DeviceState::Block { disk: saved } => {
                if let Some(mine) = cfg.disks.get_mut(disk) {
                    mine.serial = saved.serial.clone();
                    *saved = mine.clone();
                }
                disk += 1;
            }
            DeviceState::Net { tap, mac } => {
                if let Some(mine) = cfg.nets.get_mut(net) {
                    *tap = mine.tap.clone();
                    mine.mac = mac
                        .iter()
                        .map(|b| format!("{b:02x}"))
                        .collect::<Vec<_>>()
                        .join(":");
                }
                net += 1;
            }
            DeviceState::Other { .. } => {}
        }
    }
    cfg
}

/// When the RARP announce is sent again after the first one (sent before the guest
/// runs), like QEMU's self-announce rounds: one lost frame (a bridge port still coming
/// up, a busy switch) must not leave the LAN pointing at the dead PM.
pub const ANNOUNCE_REPEATS: [Duration; 4] = [
    Duration::from_millis(50),
    Duration::from_millis(150),
    Duration::from_millis(300),
    Duration::from_millis(500),
];

/// Sends the announces of [`ANNOUNCE_REPEATS`] on each `(net index, MAC)` from a
/// short-lived thread, so neither the driver nor the guest waits for them. The frames
/// bypass output commit, as the first; the gate's TAP writers serialize them with the
/// guest's released frames.
fn repeat_announces(gate: Arc<OutputGate>, macs: Vec<(usize, [u8; 6])>) {
    if macs.is_empty() {
        return;
    }
    let spawned = std::thread::Builder::new()
        .name("rarp-announce".into())
        .spawn(move || {
            let t0 = Instant::now();
            for at in ANNOUNCE_REPEATS {
                std::thread::sleep(at.saturating_sub(t0.elapsed()));
                for &(i, mac) in &macs {
                    if !gate.send_frame(i, &rarp_announce(mac)) {
                        log::warn!("standby: net {i}: a repeated RARP announce was refused");
                    }
                }
            }
        });
    if let Err(e) = spawned {
        log::warn!("standby: cannot start the thread repeating the RARP announce: {e}");
    }
}

/// A RARP "request reverse" broadcast from `mac`, as QEMU sends after a migration: the
/// switches learn the guest's MAC on the new port.
pub fn rarp_announce(mac: [u8; 6]) -> Vec<u8> {
    let mut f = Vec::with_capacity(60);
    f.extend_from_slice(&[0xff; 6]);
    f.extend_from_slice(&mac);
    f.extend_from_slice(&0x8035u16.to_be_bytes()); // RARP
    f.extend_from_slice(&1u16.to_be_bytes()); // Ethernet
    f.extend_from_slice(&0x0800u16.to_be_bytes()); // IPv4
    f.extend_from_slice(&[6, 4]);
    f.extend_from_slice(&3u16.to_be_bytes()); // request reverse
    f.extend_from_slice(&mac);
    f.extend_from_slice(&[0; 4]);
    f.extend_from_slice(&mac);
    f.extend_from_slice(&[0; 4]);
    f.resize(60, 0);
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rarp_frame_layout() {
        let mac = [0x52, 0x54, 0, 0x12, 0x34, 0x56];
        let f = rarp_announce(mac);
        assert_eq!(f.len(), 60);
        assert_eq!(&f[0..6], &[0xff; 6]);
        assert_eq!(&f[6..12], &mac);
        assert_eq!(&f[12..14], &[0x80, 0x35]);
        assert_eq!(&f[20..22], &[0, 3]);
        assert_eq!(&f[22..28], &mac);
        assert_eq!(&f[32..38], &mac);
    }
}
