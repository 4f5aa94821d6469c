//! Live migration of an HA VM (`twinrun vm migrate`; the control socket's `Op::Swap`
//! asked of the HA primary): the VM moves to the standby's PM while it runs, and the
//! old primary becomes its standby.
//!
//! How: the standby already holds replicas equal to the primary's disks, so only the
//! VM's memory, vCPU and device state and its held output must move, and FT's
//! checkpoint session does exactly that (pre-copy rounds while the guest runs, a final
//! pause with the state, then the planned role swap at an epoch boundary with the
//! output held across it, the lease handed over under a quorum, the frames queued
//! after the final pause carried over, the MAC announced). Nothing of it is written
//! twice: for the migration the pair runs ONE checkpoint session, then goes back to HA.
//!
//! 1. The primary's session loop takes the request once the standby is in sync,
//!    closes the gate of its disk hooks ([`super::hooks::HaHooks`]) and waits until no
//!    write batch is open (every mirrored write acknowledged: the replicas are equal),
//!    then sends `HaToStandby::Migrate`; both ends leave the HA session.
//! 2. The primary's hooks become FT's (its disks' writes recorded for the checkpoint
//!    session's disk session, which finds the replicas equal: an empty delta), and it
//!    runs one checkpoint session ([`send_vm`]) on a fresh A-Link; the standby runs the
//!    matching standby session ([`receive_vm`]) whose takeover gate refuses every
//!    takeover but the planned swap (like `ft::migration`'s receiving end).
//! 3. Once the standby committed epoch 0 the control request asks the session's swap
//!    port (FT's `SwapSide::request`: with a quorum the lease is released first, the
//!    target takes the next generation before it accepts).
//! 4. Swapped: the target's VM starts on its replicas with HA's hooks installed before
//!    its first instruction and runs as the HA primary ([`super::primary::protect`]);
//!    the old end stops its VM (paused at the swap point) and runs on as its HA
//!    standby (the resync is a delta of nothing).
//!    Not swapped (the target killed or cut off, the swap refused, the pre-copy too
//!    long): the VM never stopped running here; held output is released (under a
//!    quorum only while this node may act alone), dirty logging ends, the hooks are
//!    HA's again and the next HA session re-protects the VM (the target, back to an
//!    HA standby, gets a delta).
//!
//! Chosen over a second pre-copy path beside HA's write stream: a checkpoint session
//! that left the disks to HA would need two sessions on the A-Links at once, epochs
//! without disk writes and an ordering rule between the two streams at the target; the
//! checkpoint session already carries disks, output and the swap's lease handover,
//! and costs the guest only FT's epochs for the seconds of a migration.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use alink::{Alink, AlinkConfig};
use checkpoint::primary::{run_primary, DriverError, PrimaryDriverConfig, SwapDone};
use checkpoint::protocol::StandbyConfig;
use checkpoint::standby::{
    run_standby_with, BeforeStart, FailoverReport, StandbyDriverConfig, StandbyOutcome,
    TakeoverGate, TakeoverGateRef,
};
use log::{error, info, warn};
use storage_mirror::primary::PrimaryDisks;
use storage_mirror::sync::SyncDisks;
use vmm::config::VmConfig;
use vmm::Vmm;

use super::hooks::HaHooks;
use crate::ft::link::alink_config_as;
use crate::ft::quorum::{Gate, Quorum};
use crate::ft::shutdown::Shutdown;
use crate::ft::status::PairStatus;
use crate::settings::{FtSettings, Role};

/// How long a request waits for the target to commit the pre-copy's epoch 0 (with
/// the swap after it, within the control client's wait: `twinrun_control::swap`).
pub const PRECOPY_WAIT: Duration = Duration::from_secs(20);

/// How long the source's checkpoint session waits for the target to connect.
const CONNECT_WAIT: Duration = Duration::from_secs(10);

/// Logged by the source when the migration's checkpoint session begins.
pub const MIGRATE_LOG: &str = "HA primary: live migration: pre-copy to the standby begins";

/// Logged by the source when a migration ended without the handover.
pub const MIGRATE_BACK_LOG: &str =
    "HA primary: live migration given up; the VM runs on here and is re-protected";

#[derive(Debug, Clone, PartialEq, Eq)]
enum Req {
    Idle,
    /// Asked; the HA session has not taken it yet.
    Wanted,
    /// Taken by the runtime (the pre-copy runs).
    Taken,
    /// The target committed epoch 0: the swap may be asked.
    Ready,
    /// The swap is being asked (the control thread waits for its answer).
    Swapping,
    /// The swap's answer (false: the session must end, the VM stays).
    Done(bool),
    /// The runtime gave the migration up (why).
    Failed(String),
}

/// A migration request between the control socket's thread and the runtime.
pub struct MigrateSide {
    st: Mutex<Req>,
    cv: Condvar,
}

impl Default for MigrateSide {
    fn default() -> Self {
        MigrateSide {
            st: Mutex::new(Req::Idle),
            cv: Condvar::new(),
        }
    }
}

impl MigrateSide {
    fn st(&self) -> std::sync::MutexGuard<'_, Req> {
        self.st.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn set(&self, r: Req) {
        *self.st() = r;
        self.cv.notify_all();
    }

    /// The control thread: asks the runtime for the pre-copy, then `swap` (the
    /// session's swap port) once the target is in sync; Ok((epoch, paused µs)).
    pub fn request(
        &self,
        swap: impl FnOnce() -> Result<(u64, u64), String>,
    ) -> Result<(u64, u64), String> {
        {
            let mut s = self.st();
            if !matches!(*s, Req::Idle | Req::Done(_) | Req::Failed(_)) {
                return Err("a live migration of this VM is already under way".into());
            }
            *s = Req::Wanted;
        }
        self.cv.notify_all();
        let t0 = Instant::now();
        let mut s = self.st();
        loop {
            match &*s {
                Req::Ready => break,
                Req::Failed(why) => {
                    let why = why.clone();
                    *s = Req::Idle;
                    return Err(why);
                }
                _ if t0.elapsed() >= PRECOPY_WAIT => {
                    *s = Req::Failed(format!(
                        "the pre-copy did not reach the standby's first checkpoint within {}s; \
                         the VM runs on here",
                        PRECOPY_WAIT.as_secs()
                    ));
                    self.cv.notify_all();
                    return Err("live migration given up: the pre-copy took too long".into());
                }
                _ => {
                    s = self
                        .cv
                        .wait_timeout(s, Duration::from_millis(50))
                        .unwrap_or_else(|p| p.into_inner())
                        .0;
                }
            }
        }
        *s = Req::Swapping;
        drop(s);
        let r = swap();
        self.set(Req::Done(r.is_ok()));
        r.map_err(|e| format!("live migration: {e}"))
    }

    /// The HA session loop: whether a migration is asked (and not taken yet).
    pub(super) fn wanted(&self) -> bool {
        *self.st() == Req::Wanted
    }

    /// The HA session loop took the request.
    pub(super) fn take(&self) {
        let mut s = self.st();
        if *s == Req::Wanted {
            *s = Req::Taken;
        }
    }

    /// The runtime refuses or gives up the migration (the request's error).
    pub(super) fn fail(&self, why: String) {
        let mut s = self.st();
        if matches!(*s, Req::Wanted | Req::Taken | Req::Ready) {
            *s = Req::Failed(why);
            drop(s);
            self.cv.notify_all();
        }
    }

    fn ready(&self) {
        let mut s = self.st();
        if *s == Req::Taken {
            *s = Req::Ready;
            drop(s);
            self.cv.notify_all();
        }
    }

    /// The session must end without the handover (the swap failed, or the request
    /// was given up).
    fn aborted(&self) -> bool {
        matches!(*self.st(), Req::Done(false) | Req::Failed(_))
    }
}

/// How the source's checkpoint session ended.
pub(super) enum Sent {
    /// The target runs the VM (this end's guest is paused at the swap point).
    Swapped(SwapDone),
    /// No handover: the VM runs on here with HA's hooks again.
    Back,
    /// This node lost the VM to the target (quorum): the generation.
    Demoted(u64),
    /// The VM ended, or a stop was requested.
    Ended,
}

/// The source: one checkpoint session to the standby (the hooks are FT's already).
#[allow(clippy::too_many_arguments)]
pub(super) fn send_vm(
    vm: &Vmm,
    ft: &FtSettings,
    sd: &Shutdown,
    hooks: &HaHooks,
    sync: &Arc<SyncDisks>,
    status: &PairStatus,
    q: Option<&Quorum>,
    side: &MigrateSide,
) -> Sent {
    info!("{MIGRATE_LOG}");
    let acfg = alink_config_as(ft, Role::Primary);
    let link = match start_alink(&acfg) {
        Ok(l) => Arc::new(l),
        Err(e) => {
            error!("HA primary: live migration: cannot start the A-Link: {e}");
            side.fail(format!("cannot start the A-Link: {e}"));
            return back(vm, hooks, sync, q, sd);
        }
    };
    let acked = Arc::new(AtomicU64::new(0));
    status.begin_session(link.clone(), Some(acked.clone()));
    if let Some(q) = q {
        q.begin_session(link.clone(), Some(acked.clone()));
    }
    let dcfg = driver_config(ft, acked.clone(), sync.disks.clone(), status, q);
    let stop = AtomicBool::new(false);
    let done = AtomicBool::new(false);
    let result = std::thread::scope(|s| {
        s.spawn(|| {
            while !done.load(Ordering::SeqCst) {
                if acked.load(Ordering::SeqCst) > 0 {
                    side.ready();
                }
                if sd.requested() || side.aborted() {
                    stop.store(true, Ordering::SeqCst);
                }
                std::thread::sleep(Duration::from_millis(2));
            }
        });
        let r = run_primary(vm, &link, &dcfg, &stop);
        done.store(true, Ordering::SeqCst);
        r
    });
    status.end_session(result.as_ref().ok());
    if let Some(q) = q {
        q.end_session();
    }
    drop(link);
    match &result {
        Ok(r) => info!(
            "HA primary: live migration's session: {} sync rounds, {} epochs, {} acknowledged{}",
            r.sync_rounds,
            r.epochs_captured,
            r.epochs_acked,
            if r.swapped.is_some() {
                "; handed over"
            } else {
                ""
            }
        ),
        Err(e) => warn!("HA primary: live migration's session failed: {e}"),
    }
    if let Some(d) = result.as_ref().ok().and_then(|r| r.swapped) {
        return Sent::Swapped(d);
    }
    if let Some(g) = q.and_then(Quorum::handed_over) {
        // The target took the VM at the swap point (its grant seen here first).
        return Sent::Demoted(g);
    }
    if let Err(DriverError::Fenced { peer, .. }) = &result {
        if let Some(q) = q {
            q.generation().fetch_max(*peer, Ordering::SeqCst);
        }
        return Sent::Demoted(*peer);
    }
    let why = match &result {
        Ok(_) if sd.requested() => "this end stops".to_string(),
        Ok(r) if r.simplex => "the standby was lost during the pre-copy".to_string(),
        Ok(_) => "the migration was given up".to_string(),
        Err(e) => e.to_string(),
    };
    side.fail(format!(
        "live migration given up: {why}; the VM runs on here"
    ));
    back(vm, hooks, sync, q, sd)
}

/// No handover: output held by the session leaves (under a quorum only while this
/// node may act alone, as HA's guest runs), dirty logging and the disk journal end,
/// and the hooks are HA's again (the next HA session re-protects the VM).
fn back(
    vm: &Vmm,
    hooks: &HaHooks,
    sync: &Arc<SyncDisks>,
    q: Option<&Quorum>,
    sd: &Shutdown,
) -> Sent {
    if let Some(q) = q {
        loop {
            if let Some(g) = q.demoted().or_else(|| q.handed_over()) {
                return Sent::Demoted(g);
            }
            if vm.ended().is_some() || sd.requested() {
                return Sent::Ended;
            }
            match q.gate() {
                Gate::Acked => break,
                Gate::Free { until } if until.is_none_or(|u| Instant::now() < u) => break,
                _ => std::thread::sleep(Duration::from_millis(1)),
            }
        }
    }
    match vm.pause() {
        Ok(_) => {
            match vm.disable_output_commit() {
                Ok(st) => info!("HA primary: held output released: {st:?}"),
                Err(e) => warn!("HA primary: releasing held output: {e}"),
            }
            vm.disable_disk_journal();
            if let Err(e) = vm.resume() {
                error!("HA primary: cannot resume the VM: {e}");
            }
        }
        Err(e) => warn!("HA primary: cannot pause to release held output: {e}"),
    }
    if let Err(e) = vm.stop_dirty_tracking() {
        warn!("HA primary: cannot turn dirty logging off: {e}");
    }
    // FT's hooks answer each batch at once: the gate empties without help.
    while !hooks.quiesce() {
        std::thread::sleep(Duration::from_millis(1));
    }
    // The standby is not attached: the disks are degraded from here on (every write
    // marked) until the next HA session's resync makes it in sync again.
    sync.peer_lost();
    hooks.switch(false);
    warn!("{MIGRATE_BACK_LOG}");
    if vm.ended().is_some() || sd.requested() {
        return Sent::Ended;
    }
    Sent::Back
}

#[allow(clippy::field_reassign_with_default)]
fn driver_config(
    ft: &FtSettings,
    acked: Arc<AtomicU64>,
    disks: Arc<PrimaryDisks>,
    status: &PairStatus,
    q: Option<&Quorum>,
) -> PrimaryDriverConfig {
    let protocol = ft.primary_protocol();
    let mut d = PrimaryDriverConfig::default();
    d.protocol = protocol;
    d.disks = Some(disks);
    d.resync.rate_limit = ft.resync_rate;
    d.resync.max_in_flight = 16;
    d.return_on_simplex = true;
    d.connect_timeout = CONNECT_WAIT;
    d.acked = Some(acked);
    d.hold_on_simplex = q.is_some();
    d.generation = q.map(Quorum::generation);
    d.own_generations = q.map(Quorum::own_generations);
    d.swap = status.swap_side().port_for(q.is_some());
    d
}

/// The previous session's A-Link may still be closing: its addresses are retried.
fn start_alink(acfg: &AlinkConfig) -> Result<Alink, alink::AlinkError> {
    let mut tries = 0;
    loop {
        match Alink::start(acfg.clone()) {
            Err(e) if tries < 50 => {
                log::debug!("A-Link start: {e}; retrying");
                tries += 1;
                std::thread::sleep(Duration::from_millis(20));
            }
            r => return r,
        }
    }
}

/// The target's takeover gate: the quorum's (generations, the swap's grant), but no
/// takeover on silence: until the swap the VM is the source's (a source that was
/// killed, or cut off, is not replaced by the pre-copy's copy).
struct MigrationGate(Option<TakeoverGateRef>);

impl TakeoverGate for MigrationGate {
    fn committed(&self, epoch: u64) {
        if let Some(g) = &self.0 {
            g.0.committed(epoch);
        }
    }
    fn may_take_over(&self) -> bool {
        false
    }
    fn generation(&self) -> u64 {
        self.0.as_ref().map_or(0, |g| g.0.generation())
    }
    fn peer_holds(&self, generation: u64) -> bool {
        self.0.as_ref().is_some_and(|g| g.0.peer_holds(generation))
    }
    fn grant_swap(&self) -> Result<(), String> {
        self.0.as_ref().map_or(Ok(()), |g| g.0.grant_swap())
    }
}

/// How the target's checkpoint session ended.
pub(super) enum Received {
    /// The VM runs here (started with HA's hooks): this end is the HA primary now.
    Primary(Box<Vmm>, Arc<SyncDisks>, Arc<HaHooks>),
    /// No handover: back to the HA standby (the source re-protects the VM).
    Back,
    Stop,
}

type Slot = Arc<Mutex<Option<(Arc<SyncDisks>, Arc<HaHooks>)>>>;

/// Installs HA's hooks on the VM the swap starts, before its first instruction: the
/// replicas opened as a primary's disks (a new generation, degraded until the old end,
/// now its standby, is resynced by a delta).
fn ha_hook(cfg: &VmConfig) -> (BeforeStart, Slot) {
    let images: Vec<_> = cfg.disks.iter().map(|d| d.path.clone()).collect();
    let slot: Slot = Arc::default();
    let keep = slot.clone();
    let hook = BeforeStart(Arc::new(move |vm: &mut Vmm| {
        let disks = PrimaryDisks::open(&images).map_err(|e| e.to_string())?;
        let sync = SyncDisks::new(disks);
        let hooks = HaHooks::new(sync.clone());
        vm.set_disk_hooks(Some(hooks.clone()));
        *keep.lock().unwrap_or_else(|p| p.into_inner()) = Some((sync, hooks));
        Ok(())
    }));
    (hook, slot)
}

/// The target (the HA standby, its replicas closed): one checkpoint session from the
/// source; its planned swap makes this end the HA primary.
pub(super) fn receive_vm(
    cfg: &VmConfig,
    ft: &FtSettings,
    sd: &Shutdown,
    status: &PairStatus,
    q: Option<&Quorum>,
) -> Received {
    info!("HA standby: live migration: receiving the VM over a checkpoint session");
    // The TAPs are attached now, long before the swap builds the VM on them (see
    // `ft::standby`: a TAP without a process has no carrier).
    for (i, n) in cfg.nets.iter().enumerate() {
        if let Err(e) = vmm::devices::virtio::net::tap::preopen(&n.tap) {
            error!("HA standby: net {i}: cannot open TAP {}: {e}", n.tap);
            return Received::Back;
        }
    }
    let acfg = alink_config_as(ft, Role::Standby);
    let link = match start_alink(&acfg) {
        Ok(l) => Arc::new(l),
        Err(e) => {
            error!("HA standby: live migration: cannot start the A-Link: {e}");
            return Received::Back;
        }
    };
    status.begin_session(link.clone(), None);
    if let Some(q) = q {
        q.begin_session(link.clone(), None);
    }
    let (before_start, slot) = ha_hook(cfg);
    let opts = StandbyDriverConfig {
        protocol: StandbyConfig::default(),
        mirror_disks: true,
        discard_disk_data: false,
        before_start: Some(before_start),
        takeover_gate: Some(TakeoverGateRef(Arc::new(MigrationGate(
            q.map(Quorum::takeover_gate),
        )))),
        ..StandbyDriverConfig::default()
    };
    // A source that does not connect soon, or is lost (every A-Link silent), gave the
    // migration up or will: the takeover gate refuses any takeover, so there is
    // nothing to wait for here, and the source dials this end again as an HA primary
    // (whose messages this session could not read: it would stay broken).
    let stop = AtomicBool::new(false);
    let done = AtomicBool::new(false);
    let outcome = std::thread::scope(|s| {
        s.spawn(|| {
            let t0 = Instant::now();
            let mut seen = false;
            while !done.load(Ordering::SeqCst) {
                let reachable = link.peer_reachable();
                let lost = seen && !reachable;
                seen |= reachable;
                if sd.requested() || lost || (!seen && t0.elapsed() > CONNECT_WAIT / 2) {
                    stop.store(true, Ordering::SeqCst);
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        });
        let r = run_standby_with(&link, cfg, &opts, &stop);
        done.store(true, Ordering::SeqCst);
        r
    });
    status.end_session(None);
    if let Some(q) = q {
        q.end_session();
    }
    drop(link);
    match outcome {
        Ok(StandbyOutcome::FailedOver(vm, r)) => {
            let taken = slot.lock().unwrap_or_else(|p| p.into_inner()).take();
            let Some((sync, hooks)) = taken else {
                error!("HA standby: the migrated VM runs without its disks opened");
                return Received::Stop;
            };
            log_handover(&r);
            sd.hand_vm(vm.stopper());
            status.failed_over(&r, &vm, Some(sync.disks.clone()));
            Received::Primary(vm, sync, hooks)
        }
        _ if sd.requested() => Received::Stop,
        Ok(o) => {
            let what = match o {
                StandbyOutcome::NoReplica => "the source was lost before the first checkpoint",
                StandbyOutcome::PrimaryBack { .. } => "the source came back without the handover",
                _ => "the session ended without the handover",
            };
            warn!("HA standby: live migration given up ({what}); back to the HA standby");
            Received::Back
        }
        Err(e) => {
            warn!("HA standby: live migration's session failed ({e}); back to the HA standby");
            Received::Back
        }
    }
}

fn log_handover(r: &FailoverReport) {
    // The node daemon follows FT's line (with "HA"): `twinrund`'s supervisor markers.
    info!(
        "HA standby: failover complete in {} ms (PLANNED ROLE SWAP: live migration done, the \
         VM runs here from epoch {}; {} RARP announce(s), {} frames handed in); this end is \
         the HA primary now, the old one its standby",
        r.failover_time.as_millis(),
        r.last_committed,
        r.announces,
        r.handed_in_frames
    );
}
