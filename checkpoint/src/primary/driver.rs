//! The primary's driver: runs the [`Primary`] state machine against a real [`Vmm`] and
//! an [`Alink`], with a clock. It is the only place where the primary's protocol meets
//! I/O: actions become captures, sends, pauses and releases; acks and link events become
//! events.
//!
//! One thread, one loop: wait for an ack (at most until the next epoch deadline or a
//! short poll interval, so that waiting output can end an epoch early), drain link
//! events, tick. Sends never block for long: when the A-Link's window stays full the
//! driver looks at the link events again, so a dead standby is noticed even then.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use alink::{Alink, AlinkError, Event, LinkEvent};

use crate::disk_msgs::DiskToPrimary;
use crate::messages::{decode_to_primary, PrimaryboundMsg, ToStandby};
use crate::primary::capture::{CaptureError, Captured, Capturer, OutPart};
use crate::primary::disks::PrimaryDisks;
use crate::primary::inbox::{outbox, pump, Inbound, Inbox};
use crate::primary::resync::{run_disk_session, ResyncStats, SessionEnd};
use crate::primary::verify_disks::verifier;
use crate::protocol::{Primary, PrimaryAction, PrimaryConfig, PrimaryEvent, PrimaryPhase};
use crate::verify::HashLog;
use storage_mirror::resync::ResyncConfig;
use vmm::vstate::hot_pages::HotPageConfig;
use vmm::{Vmm, VmmError};

/// Commit waits kept for the report at most (about an hour of 20 ms epochs).
const MAX_COMMIT_SAMPLES: usize = 1 << 18;
/// How often the loop looks at waiting output and link events when nothing else wakes it.
const POLL: Duration = Duration::from_millis(1);
/// A send waits this long for room in the A-Link's window before the driver checks
/// whether the standby is still there.
const SEND_WAIT: Duration = Duration::from_millis(50);

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
    /// Updated with the count of acknowledged epochs as acks arrive (for monitoring).
    pub acked: Option<Arc<AtomicU64>>,
    /// Test mode: hash guest memory and state while paused at every capture and record
    /// them here by epoch (see [`crate::verify`]). Lengthens each pause by a pass over
    /// guest memory.
    pub verify: Option<Arc<HashLog>>,
    /// Mirrored disks: metadata exchange and resync before the memory sync, activity
    /// log while protected, degraded bitmap after the standby is lost. None: the
    /// standby's images are taken to equal the primary's at start (tests of the memory
    /// protocol).
    pub disks: Option<Arc<PrimaryDisks>>,
    /// Resync pacing.
    pub resync: ResyncConfig,
    /// Return when the standby is lost (the VM runs on; the caller may wait for a new
    /// standby and start another session) instead of idling until `stop`.
    pub return_on_simplex: bool,
    /// Pages the guest keeps writing stay writable and are copied at every epoch
    /// (see `vmm::vstate::hot_pages`); None re-protects every page at every harvest.
    pub hot_pages: Option<HotPageConfig>,
}

impl Default for PrimaryDriverConfig {
    fn default() -> Self {
        PrimaryDriverConfig {
            protocol: PrimaryConfig::default(),
            connect_timeout: Duration::from_secs(10),
            max_part_pages: None,
            split_copy_min_pages: None,
            acked: None,
            verify: None,
            disks: None,
            resync: ResyncConfig::default(),
            return_on_simplex: false,
            hot_pages: Some(HotPageConfig::default()),
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
    /// Per acknowledged epoch: from the end of its capture (guest resumed) to its
    /// acknowledgement, sorted. What output commit adds to a reply beyond the pause.
    pub commit_waits: Vec<Duration>,
    /// Console stream position where output commit began (epoch 0's first byte):
    /// output before it went out directly, as did disk writes (their copy to the
    /// standby is the storage issue's initial disk sync).
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
}

/// Runs the primary side until `stop` is set (or the VM's standby is lost and `stop`
/// is set later: in Simplex the driver just idles, the VM keeps running). The VM must
/// be started; the link may still be connecting.
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
            if let Err(e) = vmm.release_output(epoch) {
                log::debug!("primary: early release through epoch {epoch}: {e}");
            }
        };
        s.spawn(move || pump(link, disks, &release, tx, quit));
        if let Some(d) = disks {
            let (otx, orx) = std::sync::mpsc::channel();
            s.spawn(move || outbox(link, orx, quit));
            d.set_peer(Some(otx));
            s.spawn(move || verifier(d, quit));
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
    let mut d = Driver {
        sync_started: None,
        vmm,
        link,
        inbox,
        proto: Primary::new(cfg.protocol),
        cap: Capturer::new(vmm)?,
        staged: VecDeque::new(),
        captured_at: VecDeque::new(),
        paused_by_throttle: false,
        report: PrimaryReport::default(),
        t0,
        acked: cfg.acked.clone(),
        verify: cfg.verify.clone(),
        disks: cfg.disks.clone(),
    };
    d.cap.set_verify(vmm, d.verify.is_some());
    if !vmm.set_hot_pages(cfg.hot_pages) {
        log::info!("primary: this KVM cannot leave hot pages writable; every page is re-protected");
    }
    d.cap.set_disks(cfg.disks.clone());
    if let Some(n) = cfg.split_copy_min_pages {
        d.cap.set_split_copy_min_pages(n);
    }
    if let Some(n) = cfg.max_part_pages {
        d.cap.set_max_part_pages(n);
    }
    let layout = vmm::persist::memory::layout(vmm.guest_memory());
    match d.send_msg(&ToStandby::Hello { layout }, Vec::new()) {
        Ok(()) => match &cfg.disks {
            None => d.feed(PrimaryEvent::Start { now: d.now() })?,
            Some(disks) => match run_disk_session(link, inbox, disks, vmm, &cfg.resync)? {
                SessionEnd::Ready(stats) => {
                    d.report.resync = Some(stats);
                    d.feed(PrimaryEvent::Start { now: d.now() })?
                }
                SessionEnd::Refused(reason) => {
                    log::error!(
                        "primary: the standby cannot be resynced: {reason}; the VM runs \
                         UNPROTECTED until an operator resolves it"
                    );
                    d.report.refused = Some(reason);
                    d.report.simplex = true;
                    disks.peer_lost();
                    d.peer_lost()?;
                }
                SessionEnd::PeerLost => {
                    d.report.simplex = true;
                    disks.peer_lost();
                    d.peer_lost()?
                }
            },
        },
        Err(Lost::Error(e)) => return Err(e),
        Err(Lost::Peer) => d.peer_lost()?,
    }
    while !stop.load(Ordering::Relaxed) {
        if cfg.return_on_simplex && d.proto.phase() == PrimaryPhase::Simplex {
            break;
        }
        d.step()?;
    }
    d.report.pauses.sort();
    d.report.commit_waits.sort();
    d.report.released = d.proto.released();
    d.report.staging = d.cap.pool_stats();
    d.report.split_copies = d.cap.split_copies();
    Ok(d.report)
}

struct Driver<'a> {
    /// When sync round 0 began (throughput log; the bytes are counted in the report).
    sync_started: Option<Instant>,
    vmm: &'a Vmm,
    link: &'a Alink,
    inbox: &'a Inbox,
    proto: Primary,
    cap: Capturer,
    /// Captured epochs waiting for their `Send`.
    staged: VecDeque<(u64, Vec<OutPart>)>,
    /// When each unacknowledged epoch's capture ended.
    captured_at: VecDeque<(u64, Instant)>,
    paused_by_throttle: bool,
    report: PrimaryReport,
    t0: Instant,
    acked: Option<Arc<AtomicU64>>,
    verify: Option<Arc<HashLog>>,
    disks: Option<Arc<PrimaryDisks>>,
}

impl Driver<'_> {
    fn now(&self) -> Duration {
        self.t0.elapsed()
    }

    fn step(&mut self) -> Result<(), DriverError> {
        if self.proto.phase() == PrimaryPhase::Simplex {
            // Nothing more to do: the VM runs on unprotected.
            std::thread::sleep(Duration::from_millis(20));
            return Ok(());
        }
        let wait = match self.proto.next_deadline() {
            Some(d) => d.saturating_sub(self.now()).min(POLL),
            None => POLL,
        };
        match self.inbox.recv(wait) {
            Ok(Some(m)) => match decode_to_primary(m.head_bytes(), m.payload()) {
                Ok(PrimaryboundMsg::Ack { epoch }) => self.feed(PrimaryEvent::Ack { epoch })?,
                Ok(PrimaryboundMsg::Disk(d, payload)) => self.on_disk_msg(d, payload),
                Err(e) => log::error!("primary: undecodable message from the standby: {e}"),
            },
            Ok(None) => {}
            Err(AlinkError::Closed) => return self.peer_lost(),
            Err(e) => return Err(e.into()),
        }
        if self.link_lost() {
            return self.peer_lost();
        }
        let now = self.now();
        if self.vmm.output_waiting() {
            self.feed(PrimaryEvent::OutputWaiting { now })?;
        }
        self.feed(PrimaryEvent::Tick { now })
    }

    /// Drains link events; true when every link is down.
    fn link_lost(&self) -> bool {
        let mut lost = false;
        while let Some(ev) = self.link.poll_event(Duration::ZERO) {
            match ev {
                Event::Link(LinkEvent::PeerUnreachable) => lost = true,
                Event::Link(LinkEvent::PeerReachable) => lost = false,
                Event::Link(e) => log::info!("primary: A-Link {e:?}"),
                Event::Refused { link, peer, reason } => {
                    log::warn!("primary: A-Link {link} refused {peer:?}: {reason}")
                }
            }
        }
        lost && !self.link.peer_reachable()
    }

    fn peer_lost(&mut self) -> Result<(), DriverError> {
        self.feed(PrimaryEvent::PeerLost)
    }

    fn feed(&mut self, ev: PrimaryEvent) -> Result<(), DriverError> {
        let mut queue: VecDeque<PrimaryEvent> = VecDeque::from([ev]);
        while let Some(ev) = queue.pop_front() {
            let actions = match self.proto.on_event(ev) {
                Ok(a) => a,
                Err(e) => {
                    log::error!("primary: {e} (event ignored)");
                    continue;
                }
            };
            for a in actions {
                match self.perform(a) {
                    Ok(Some(next)) => queue.push_back(next),
                    Ok(None) => {}
                    Err(Lost::Peer) => queue.push_back(PrimaryEvent::PeerLost),
                    Err(Lost::Error(e)) => return Err(e),
                }
            }
        }
        Ok(())
    }

    fn perform(&mut self, a: PrimaryAction) -> Result<Option<PrimaryEvent>, Lost> {
        match a {
            PrimaryAction::SyncRound { round } => {
                if round == 0 {
                    self.sync_started = Some(Instant::now());
                }
                // Part by part: copy one, send it (waiting for window room), then the
                // next, so a round holds at most a window of staging buffers.
                let mut r = self.cap.begin_sync_round(self.vmm, round)?;
                let (pages, parts) = (r.pages(), r.parts());
                while let Some(p) = self.cap.next_sync_part(self.vmm, &mut r) {
                    let p = p?;
                    self.report.sync_bytes += p.head.payload_len();
                    self.report.sync_zero_pages += p.head.zero_page_count();
                    self.send_msg(&ToStandby::Part(p.head), p.payload)?;
                }
                self.send_msg(&ToStandby::SyncRoundDone { round, pages }, Vec::new())?;
                log::info!("primary: initial sync round {round}: {pages} pages in {parts} parts");
                self.report.sync_rounds = round + 1;
                Ok(Some(PrimaryEvent::SyncRoundSent { round, pages }))
            }
            PrimaryAction::Capture { epoch } => {
                let already = std::mem::take(&mut self.paused_by_throttle);
                if already {
                    self.report.throttles += 1;
                }
                let Captured {
                    parts,
                    pause,
                    hash,
                    pages,
                    hot_pages,
                } = self.cap.capture_epoch(
                    self.vmm,
                    epoch,
                    self.proto.sync_rounds(),
                    self.proto.released(),
                    already,
                    false,
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
                let bytes = parts.iter().map(|p| p.head.payload_len()).sum();
                self.staged.push_back((epoch, parts));
                self.captured_at.push_back((epoch, Instant::now()));
                Ok(Some(PrimaryEvent::Captured {
                    epoch,
                    now: self.now(),
                    bytes,
                }))
            }
            PrimaryAction::Send { epoch } => {
                while let Some((e, parts)) = self.staged.pop_front() {
                    let done = e == epoch;
                    self.send_parts(parts)?;
                    if done {
                        break;
                    }
                }
                Ok(None)
            }
            PrimaryAction::ThrottleGuest => {
                self.vmm.pause().map_err(DriverError::from)?;
                self.paused_by_throttle = true;
                log::debug!(
                    "primary: {} epochs unacknowledged, guest held",
                    self.proto.unacked()
                );
                Ok(None)
            }
            PrimaryAction::ReleaseOutput { through } => {
                while let Some(&(e, at)) = self.captured_at.front() {
                    if e > through {
                        break;
                    }
                    self.captured_at.pop_front();
                    if e > 0 && self.report.commit_waits.len() < MAX_COMMIT_SAMPLES {
                        self.report.commit_waits.push(at.elapsed());
                    }
                }
                self.vmm
                    .release_output(through)
                    .map_err(DriverError::from)?;
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
                        // Checkpoint throughput of the pipeline (capture, checksums,
                        // A-Link, standby staging and apply) while the guest runs.
                        let el = t.elapsed();
                        log::info!(
                            "primary: initial synchronisation: {} bytes of memory sent ({} \
                             all-zero pages not sent) from round 0 to epoch 0 committed in \
                             {:.1} ms ({:.0} MB/s)",
                            self.report.sync_bytes,
                            self.report.sync_zero_pages,
                            el.as_secs_f64() * 1e3,
                            self.report.sync_bytes as f64 / el.as_secs_f64() / 1e6
                        );
                        self.report.sync_time = Some(el);
                    }
                }
                Ok(None)
            }
            PrimaryAction::EnterSimplex => {
                self.enter_simplex().map_err(DriverError::from)?;
                Ok(None)
            }
        }
    }

    fn on_disk_msg(&mut self, m: DiskToPrimary, _payload: &[u8]) {
        log::warn!("primary: unexpected disk message {m:?}");
    }

    fn enter_simplex(&mut self) -> Result<(), VmmError> {
        if let Some(d) = &self.disks {
            d.peer_lost();
        }
        self.staged.clear();
        self.captured_at.clear();
        self.report.simplex = true;
        if !self.paused_by_throttle {
            self.vmm.pause()?;
        }
        self.paused_by_throttle = false;
        // Held output of every epoch may leave now: no failover can roll it back.
        let r = self.vmm.disable_output_commit();
        self.vmm.disable_disk_journal();
        let resumed = self.vmm.resume();
        let r = r?;
        resumed?;
        log::error!(
            "primary: STANDBY LOST, THE VM RUNS UNPROTECTED (simplex); released {} held \
             console bytes and {} frames. If the standby is alive but cut off, it fails \
             over too and two copies run (no quorum witness yet)",
            r.console_bytes,
            r.net_frames
        );
        Ok(())
    }

    fn send_parts(&self, parts: Vec<OutPart>) -> Result<(), Lost> {
        for p in parts {
            self.send_msg(&ToStandby::Part(p.head), p.payload)?;
        }
        Ok(())
    }

    /// Sends one message, waiting for window room while the standby is reachable.
    fn send_msg(&self, head: &ToStandby, payload: Vec<alink::Bytes>) -> Result<(), Lost> {
        loop {
            match self
                .link
                .send_timeout(head, payload.clone(), Some(SEND_WAIT))
            {
                Ok(_) => return Ok(()),
                Err(AlinkError::Timeout) => {
                    if !self.link.peer_reachable() {
                        return Err(Lost::Peer);
                    }
                }
                Err(AlinkError::Closed) => return Err(Lost::Peer),
                Err(e) => return Err(Lost::Error(e.into())),
            }
        }
    }
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
