//! What this end of the pair tells its control socket (`twinrun vm status`, tools,
//! tests): role, protection state, sessions, the checkpoints its standby committed,
//! the failover it performed, its A-Links and its disks. The pair's code records what
//! happens here as it goes; the control thread reads it ([`FtControl`]).

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use twinrun_lock::lock;

use crate::settings::Role;
use alink::Alink;
use checkpoint::primary::PrimaryReport;
use checkpoint::standby::FailoverReport;
use storage_mirror::primary::PrimaryDisks;
use twinrun_control::disks::{self, DiskView};
use twinrun_control::server::{FtControl, Server};
use twinrun_control::{FailoverStatus, FtRole, FtState, FtStatus, LinkState, SessionStatus};
use vmm::config::VmConfig;
use vmm::devices::virtio::block::DiskFaults;
use vmm::Vmm;

/// The state of one end of the pair, shared by its runtime and its control thread.
pub struct PairStatus {
    inner: Mutex<Inner>,
    /// The A-Link of the current session. Its state is read only under this lock and
    /// the slot is emptied before the runtime drops the link, so that drop really
    /// closes it (a standby's next session listens on the same addresses).
    link: Mutex<Option<Arc<Alink>>>,
    /// The quorum's state, when one is configured.
    quorum: Mutex<Option<Arc<Mutex<twinrun_control::QuorumView>>>>,
    /// Planned role swaps (`Op::Swap`).
    swap: super::swap::SwapSide,
    /// An online level change asked on the control socket, until the runtime takes it
    /// at a session boundary (`Op::SetLevel`, [`super::level`]).
    level: Mutex<Option<super::level::LevelRequest>>,
    /// An HA runtime's live migrations (`Op::Swap` asked of an HA primary): set when
    /// this end protects its VM with HA (started so, or changed online to HA).
    ha: Mutex<Option<Arc<crate::ha::migrate::MigrateSide>>>,
}

struct Inner {
    role: FtRole,
    /// "ft", or "unprotected" for an unprotected VM's VMM (`--protection unprotected`).
    protection: &'static str,
    session: u64,
    /// Finished sessions (in this process) that had committed a checkpoint.
    protected_sessions: u64,
    /// Checkpoints acknowledged in the current session of a primary.
    acked: Option<Arc<AtomicU64>>,
    failover: Option<FailoverStatus>,
    last_session: Option<SessionStatus>,
    vm_running: bool,
    faults: Vec<Arc<DiskFaults>>,
    disks: Option<Arc<PrimaryDisks>>,
    /// The disk images of this end (a standby's replicas).
    images: Vec<PathBuf>,
}

/// What [`FtControl::status`] copies out of [`Inner`].
struct Snapshot {
    role: FtRole,
    protection: &'static str,
    session: u64,
    protected_sessions: u64,
    acked: u64,
    failover: Option<FailoverStatus>,
    last_session: Option<SessionStatus>,
    vm_running: bool,
    disks: Option<Arc<PrimaryDisks>>,
    images: Vec<PathBuf>,
}

impl PairStatus {
    pub fn new(role: Role, cfg: &VmConfig) -> Arc<PairStatus> {
        Arc::new(PairStatus {
            inner: Mutex::new(Inner {
                role: match role {
                    Role::Primary => FtRole::Primary,
                    Role::Standby => FtRole::Standby,
                },
                protection: "ft",
                session: 0,
                protected_sessions: 0,
                acked: None,
                failover: None,
                last_session: None,
                vm_running: false,
                faults: Vec::new(),
                disks: None,
                images: cfg.disks.iter().map(|d| d.path.clone()).collect(),
            }),
            link: Mutex::new(None),
            quorum: Mutex::new(None),
            swap: super::swap::SwapSide::new(cfg),
            level: Mutex::new(None),
            ha: Mutex::new(None),
        })
    }

    /// This end protects its VM with HA now (started so, or an online change): the
    /// status says `ha`, and a swap asked of the primary is HA's live migration
    /// through `side`.
    pub fn set_ha(&self, side: Arc<crate::ha::migrate::MigrateSide>) {
        *lock(&self.ha) = Some(side);
        lock(&self.inner).protection = "ha";
    }

    /// The HA runtime's migration side while this end is at HA.
    pub fn ha_side(&self) -> Option<Arc<crate::ha::migrate::MigrateSide>> {
        lock(&self.ha).clone()
    }

    /// This end protects its VM with FT now (an online change from unprotected or HA).
    pub fn set_ft(&self) {
        lock(&self.ha).take();
        lock(&self.inner).protection = "ft";
    }

    /// The quorum stopped (an online change to unprotected): no quorum in the status.
    pub fn clear_quorum(&self) {
        *lock(&self.quorum) = None;
    }

    /// "ft", "unprotected" (or "ha", set by the HA runtime's status).
    pub fn protection(&self) -> &'static str {
        lock(&self.inner).protection
    }

    /// The pending level change, if the runtime may take it (expired ones dropped).
    pub(crate) fn level_slot(&self) -> &Mutex<Option<super::level::LevelRequest>> {
        &self.level
    }

    /// This end runs an unprotected VM (the status says so; a primary's "protected"
    /// state then means a migration's receiving VMM is in sync).
    pub fn set_unprotected(&self) {
        lock(&self.ha).take();
        lock(&self.inner).protection = "unprotected";
    }

    pub fn swap_side(&self) -> &super::swap::SwapSide {
        &self.swap
    }

    /// A planned role swap handed the VM to the peer: this end runs no VM and is its
    /// standby from now on.
    pub fn swapped_out(&self) {
        let mut i = lock(&self.inner);
        i.role = FtRole::Standby;
        i.session = 0;
        i.vm_running = false;
        i.faults.clear();
        i.disks = None;
        i.failover = None;
    }

    /// Shows the quorum's state (kept up to date by its thread) in the status.
    pub fn set_quorum(&self, view: Arc<Mutex<twinrun_control::QuorumView>>) {
        *lock(&self.quorum) = Some(view);
    }

    /// The VM runs here now, with these mirrored disks.
    pub fn vm_running(&self, vm: &Vmm, disks: Option<Arc<PrimaryDisks>>) {
        let faults = (0..vm.devices().disk_count())
            .filter_map(|d| vm.disk_faults(d))
            .collect();
        let mut i = lock(&self.inner);
        i.vm_running = true;
        i.faults = faults;
        i.disks = disks;
    }

    /// A session begins on `link`; a primary's `acked` counts the checkpoints its
    /// standby acknowledges.
    pub fn begin_session(&self, link: Arc<Alink>, acked: Option<Arc<AtomicU64>>) {
        {
            let mut i = lock(&self.inner);
            i.session += 1;
            i.acked = acked;
        }
        *lock(&self.link) = Some(link);
    }

    /// The session ended (a primary's with its report); the runtime may drop the link
    /// once this returns.
    pub fn end_session(&self, report: Option<&PrimaryReport>) {
        *lock(&self.link) = None;
        let mut i = lock(&self.inner);
        let acked = i.acked.take().map_or(0, |a| a.load(Ordering::SeqCst));
        if acked > 0 {
            i.protected_sessions += 1;
        }
        if let Some(r) = report {
            i.last_session = Some(session_status(i.session, r));
        }
    }

    /// This standby took over: from now on it is the primary of the VM `vm`.
    /// The standby took over: the VM runs here, on the survivor's `disks` (opened by
    /// the role switch).
    pub fn failed_over(&self, r: &FailoverReport, vm: &Vmm, disks: Option<Arc<PrimaryDisks>>) {
        {
            let mut i = lock(&self.inner);
            i.role = FtRole::Primary;
            i.session = 0;
            i.failover = Some(FailoverStatus {
                time_ms: r.failover_time.as_millis() as u64,
                resumed_from_epoch: r.last_committed,
                released_through: r.released_through,
                rereleased_bytes: r.rereleased_bytes,
                announces: r.announces as u64,
            });
        }
        self.vm_running(vm, disks);
    }

    fn links(&self) -> Vec<LinkState> {
        lock(&self.link).as_ref().map_or_else(Vec::new, |l| {
            l.link_status()
                .iter()
                .map(|s| LinkState {
                    up: s.up,
                    connections: s.connections,
                    refused: s.refused,
                    sent_bytes: s.sent_bytes,
                })
                .collect()
        })
    }
}

fn us(d: Option<&Duration>) -> Option<u64> {
    d.map(|d| d.as_micros() as u64)
}

fn session_status(session: u64, r: &PrimaryReport) -> SessionStatus {
    let pct = |p: usize| r.pauses.get(r.pauses.len() * p / 100);
    SessionStatus {
        session,
        sync_rounds: r.sync_rounds,
        epochs_captured: r.epochs_captured,
        epochs_acked: r.epochs_acked,
        pause_p50_us: us(pct(50)),
        pause_p99_us: us(pct(99)),
        commit_wait_p50_us: us(r.commit_waits.get(r.commit_waits.len() / 2)),
        epoch_pages: r.epoch_pages,
        throttles: r.throttles,
        sync_bytes: r.sync_bytes,
        sync_us: r.sync_time.map(|t| t.as_micros() as u64),
        resync_bytes: r.resync.map(|s| s.bytes),
        refused: r.refused.clone(),
        simplex: r.simplex,
    }
}

impl FtControl for PairStatus {
    fn status(&self) -> FtStatus {
        let links = self.links();
        let peer = links.iter().any(|l| l.up);
        // A copy of the shared state: the disks' views below read files, which must not
        // hold up the runtime.
        let i = {
            let g = lock(&self.inner);
            Snapshot {
                role: g.role,
                protection: g.protection,
                session: g.session,
                protected_sessions: g.protected_sessions,
                acked: g.acked.as_ref().map_or(0, |a| a.load(Ordering::SeqCst)),
                failover: g.failover.clone(),
                last_session: g.last_session.clone(),
                vm_running: g.vm_running,
                disks: g.disks.clone(),
                images: g.images.clone(),
            }
        };
        let acked = i.acked;
        let disks: Vec<DiskView> = match &i.disks {
            Some(d) => d.status().iter().map(DiskView::live).collect(),
            None => i
                .images
                .iter()
                .filter_map(|p| disks::offline(p).ok())
                .collect(),
        };
        let (state, last_committed_epoch) = match i.role {
            FtRole::Primary => (
                if acked > 0 {
                    FtState::Protected
                } else if peer {
                    FtState::Syncing
                } else {
                    FtState::WaitingForPeer
                },
                acked.checked_sub(1),
            ),
            FtRole::Standby => (
                if peer {
                    FtState::Mirroring
                } else {
                    FtState::WaitingForPeer
                },
                disks.iter().map(|d| d.last_committed_epoch).min().flatten(),
            ),
        };
        let mut st = FtStatus {
            protection: i.protection.into(),
            role: i.role,
            state,
            vm_running: i.vm_running,
            session: i.session,
            protections: i.protected_sessions + u64::from(acked > 0),
            epochs_committed: acked,
            last_committed_epoch,
            failover: i.failover,
            last_session: i.last_session,
            links,
            disks,
            quorum: lock(&self.quorum).as_ref().map(|v| lock(v).clone()),
        };
        if i.protection == "ha" {
            crate::ha::status::decorate(self, &mut st);
        }
        st
    }

    fn disk_faults(&self) -> Vec<Arc<DiskFaults>> {
        lock(&self.inner).faults.clone()
    }

    fn disks(&self) -> Option<Arc<PrimaryDisks>> {
        lock(&self.inner).disks.clone()
    }

    fn swap(&self) -> Result<(u64, u64), String> {
        if lock(&self.inner).role == FtRole::Standby {
            return Err("this end of the pair is the standby: ask the primary".into());
        }
        if let Some(side) = self.ha_side() {
            // HA: the pre-copy first (one checkpoint session), then FT's planned swap.
            return side.request(|| self.swap.request(lock(&self.quorum).is_some()));
        }
        self.swap.request(lock(&self.quorum).is_some())
    }

    fn set_level(&self, change: twinrun_control::LevelChange) -> Result<(), String> {
        let (role, running, protection) = {
            let i = lock(&self.inner);
            (i.role, i.vm_running, i.protection)
        };
        super::level::ask(self, role, running, protection, change)
    }
}

/// Serves the control socket of this end on its own thread until dropped.
pub struct ControlThread {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ControlThread {
    pub fn start(mut server: Server, status: Arc<PairStatus>) -> ControlThread {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("control".into())
            .spawn(move || {
                while !flag.load(Ordering::Relaxed) {
                    server.poll_ft(status.as_ref(), Duration::from_millis(50));
                }
            });
        let thread = match thread {
            Ok(t) => Some(t),
            Err(e) => {
                log::warn!("cannot start the control thread ({e}): no control socket");
                None
            }
        };
        ControlThread { stop, thread }
    }
}

impl Drop for ControlThread {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
