//! The HA primary: builds and starts the VM with its disks mirrored synchronously,
//! then serves one standby after another (the primary's whole life, and a takeover
//! survivor's): the disk session resyncs the standby (guest writes already mirrored
//! meanwhile), the closing commit makes it in sync, and from then on every write
//! batch waits for its acknowledgement. When the standby is lost the writers complete
//! alone, their blocks recorded for its return.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use alink::{Alink, AlinkConfig, AlinkError, Bytes, Event, LinkEvent};
use log::{error, info, warn};
use storage_mirror::primary::{
    Performed, PrimaryDisks, PrimarySession, SessionAction, SessionConfig, SessionEnd, SessionEvent,
};
use storage_mirror::sync::wire::{self as hawire, HaToPrimary, HaToStandby};
use storage_mirror::sync::SyncDisks;
use storage_mirror::wire::{self, DiskToStandby};
use vmm::config::VmConfig;
use vmm::{build_vm, VmExit, Vmm};

use super::hooks::SyncHooks;
use crate::alone::exit_code;
use crate::exit;
use crate::ft::quorum::Quorum;
use crate::ft::shutdown::Shutdown;
use crate::ft::status::PairStatus;
use crate::settings::FtSettings;

/// Logged once the standby is in sync (tools ask the control socket's status).
pub const PROTECTED_LOG: &str = "HA primary: protected";

/// A send waits this long for window room before looking whether the peer is there.
const SEND_WAIT: Duration = Duration::from_millis(50);

pub fn run(
    cfg: &VmConfig,
    ft: &FtSettings,
    acfg: AlinkConfig,
    sd: &Shutdown,
    status: &PairStatus,
    q: Option<&Quorum>,
) -> i32 {
    let (vm, sync) = match start_vm(cfg) {
        Ok(v) => v,
        Err(code) => return code,
    };
    status.vm_running(&vm, Some(sync.disks.clone()));
    info!(
        "HA primary: VM running; {} A-Link(s) to the standby",
        acfg.links.len()
    );
    protect(vm, ft, acfg, sd, sync, status, q)
}

/// Builds and starts the VM with its disks mirrored synchronously (degraded, every
/// write marked, until a standby is in sync). Also the takeover survivor's boot.
pub fn start_vm(cfg: &VmConfig) -> Result<(Vmm, Arc<SyncDisks>), i32> {
    let mut vm = build_vm(cfg).map_err(|e| {
        error!("cannot build the VM: {e}");
        exit::START_FAILED
    })?;
    let images: Vec<_> = cfg.disks.iter().map(|d| d.path.clone()).collect();
    let disks = PrimaryDisks::open(&images).map_err(|e| {
        error!("cannot start disk mirroring: {e}");
        exit::START_FAILED
    })?;
    let sync = SyncDisks::new(disks);
    vm.set_disk_hooks(Some(Arc::new(SyncHooks(sync.clone()))));
    vm.start().map_err(|e| {
        error!("cannot start the VM: {e}");
        exit::START_FAILED
    })?;
    Ok((vm, sync))
}

/// How a session with one standby ended.
enum End {
    Vm(Box<VmExit>),
    Stop,
    PeerLost,
    /// The quorum says the peer won the VM with this generation.
    Demoted(u64),
}

/// The quorum as the HA primary obeys it (none: no rule) and whether it paused the guest.
struct Obey<'a> {
    q: Option<&'a Quorum>,
    paused: bool,
}

impl Obey<'_> {
    /// Between two looks at the A-Link: pauses the guest before this primary's lease
    /// could lapse at the witness (nothing leaves the VM after that) and resumes it
    /// when the lease or the standby is back; `Err` when this primary lost the VM.
    fn step(&mut self, vm: &Vmm) -> Result<(), u64> {
        obey(vm, self.q, &mut self.paused)
    }
}

fn obey(vm: &Vmm, q: Option<&Quorum>, paused: &mut bool) -> Result<(), u64> {
    let Some(q) = q else { return Ok(()) };
    if let Some(g) = q.demoted() {
        return Err(g);
    }
    let pause = q.pause();
    if pause && !*paused {
        match vm.pause() {
            Ok(_) => {
                *paused = true;
                warn!("quorum: HA guest PAUSED (neither the standby nor a witness lease)");
            }
            Err(e) => warn!("quorum: cannot pause the guest: {e}"),
        }
    } else if !pause && *paused {
        match vm.resume() {
            Ok(()) => {
                *paused = false;
                info!("quorum: HA guest resumed");
            }
            Err(e) => warn!("quorum: cannot resume the guest: {e}"),
        }
    }
    Ok(())
}

/// Serves one standby after another until the VM ends or SIGTERM/SIGINT.
pub fn protect(
    mut vm: Vmm,
    ft: &FtSettings,
    acfg: AlinkConfig,
    sd: &Shutdown,
    sync: Arc<SyncDisks>,
    status: &PairStatus,
    q: Option<&Quorum>,
) -> i32 {
    sd.hand_vm(vm.stopper());
    let mut rule = Obey { q, paused: false };
    if let Some(q) = q {
        // Writes the standby did not acknowledge complete only while this node may act
        // alone (FT's output rule), checked on the I/O path itself.
        let gate = q.gate_reader();
        sync.set_alone_gate(Some(Box::new(move || gate().free_at(Instant::now()))));
    }
    for n in 1u64.. {
        let link = match Alink::start(acfg.clone()) {
            Ok(l) => Arc::new(l),
            Err(e) => {
                error!("cannot start the A-Link: {e}");
                vm.stopper().stop();
                vm.wait();
                return exit::START_FAILED;
            }
        };
        if n > 1 {
            info!("HA primary: waiting for a standby (session {n})");
        }
        let acked = Arc::new(AtomicU64::new(0));
        status.begin_session(link.clone(), Some(acked.clone()));
        if let Some(q) = q {
            q.begin_session(link.clone(), Some(acked.clone()));
        }
        let end = session(&mut vm, &link, &sync, sd, &acked, ft, &mut rule);
        // Writers never wait for a standby that is gone.
        sync.peer_lost();
        status.end_session(None);
        if let Some(q) = q {
            q.end_session();
        }
        drop(link);
        match end {
            End::PeerLost => continue,
            End::Demoted(g) => {
                // Held completions fail (the VM stops; none of them may be seen done).
                sync.fence();
                return crate::ft::primary::demote(vm, &sync.disks, g);
            }
            End::Vm(e) => {
                sync.disks.clean_shutdown();
                return exit_code(&e, sd.requested());
            }
            End::Stop => {
                // A completion the quorum holds is never given: the guest stops.
                sync.fence();
                vm.stopper().stop();
                let e = vm.wait();
                sync.disks.clean_shutdown();
                return exit_code(&e, true);
            }
        }
    }
    unreachable!("sessions are numbered without end")
}

/// Sends `m` to the standby; false when it is gone.
fn send(link: &Alink, m: &HaToStandby, payload: Vec<u8>) -> bool {
    let payload = if payload.is_empty() {
        Vec::new()
    } else {
        vec![Bytes::from(payload)]
    };
    loop {
        match link.send_timeout(m, payload.clone(), Some(SEND_WAIT)) {
            Ok(_) => return true,
            Err(AlinkError::Timeout) if link.peer_reachable() => {}
            Err(e) => {
                warn!("HA primary: sending to the standby: {e}");
                return false;
            }
        }
    }
}

fn send_session(link: &Alink, m: &DiskToStandby, payload: Vec<u8>) -> bool {
    match wire::encode(m) {
        Ok(h) => send(link, &HaToStandby::Session(h), payload),
        Err(e) => {
            error!("HA primary: encoding a disk message: {e}");
            false
        }
    }
}

/// Where the session is.
#[derive(PartialEq, Eq)]
enum Phase {
    Resync,
    /// The resync passes are over: new writes wait at the gate while the ones in
    /// flight get their acknowledgements (taken by this thread).
    Draining,
    /// The closing commit is out; the gate holds new writes.
    Ending,
    InSync,
    /// Refused or failed: the VM runs on alone until this standby goes away.
    Idle,
}

fn session(
    vm: &mut Vmm,
    link: &Arc<Alink>,
    sync: &Arc<SyncDisks>,
    sd: &Shutdown,
    acked: &AtomicU64,
    ft: &FtSettings,
    rule: &mut Obey,
) -> End {
    // Wait for a standby.
    loop {
        if let Some(e) = vm.wait_timeout(Duration::ZERO) {
            return End::Vm(Box::new(e));
        }
        if let Err(g) = rule.step(vm) {
            return End::Demoted(g);
        }
        if sd.requested() {
            return End::Stop;
        }
        while link.poll_event(Duration::ZERO).is_some() {}
        if link.peer_reachable() {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    info!("HA primary: standby connected; disk session begins");
    if !send(link, &HaToStandby::Hello, Vec::new()) {
        return End::PeerLost;
    }
    let mut cfg = SessionConfig::default();
    cfg.resync.rate_limit = ft.resync_rate;
    let mut ses = PrimarySession::new(cfg, Instant::now());
    let mut phase = Phase::Resync;
    let mut prepared = Vec::new();
    let mut pending = std::collections::VecDeque::new();
    loop {
        if let Some(e) = vm.wait_timeout(Duration::ZERO) {
            return End::Vm(Box::new(e));
        }
        if let Err(g) = rule.step(vm) {
            return End::Demoted(g);
        }
        if sd.requested() {
            return End::Stop;
        }
        let mut lost = false;
        while let Some(ev) = link.poll_event(Duration::ZERO) {
            match ev {
                Event::Link(LinkEvent::PeerUnreachable) => lost = true,
                Event::Link(e) => info!("HA primary: A-Link {e:?}"),
                Event::Refused { link, peer, reason } => {
                    warn!("HA primary: A-Link {link} refused {peer:?}: {reason}")
                }
            }
        }
        if lost && !link.peer_reachable() {
            warn!("HA primary: the standby is lost; running on alone, recording writes");
            if phase == Phase::Resync {
                pending.push_back(SessionEvent::PeerLost);
                drive(
                    &mut ses,
                    &mut pending,
                    &mut prepared,
                    link,
                    sync,
                    &mut phase,
                );
            }
            return End::PeerLost;
        }
        match link.recv(Duration::from_millis(5)) {
            Ok(Some(msg)) => match hawire::decode::<HaToPrimary>(msg.head_bytes()) {
                Ok(HaToPrimary::Session(h)) => match wire::decode_to_primary(&h, msg.payload()) {
                    Ok(m) => {
                        if let Some(ev) = SessionEvent::from_msg(m, msg.payload()) {
                            pending.push_back(ev);
                        }
                    }
                    Err(e) => error!("HA primary: bad disk message: {e}"),
                },
                Ok(HaToPrimary::Ack { seq }) => {
                    if let Err(e) = sync.on_ack(seq) {
                        error!("HA primary: {e}; dropping this standby");
                        return End::PeerLost;
                    }
                    if phase == Phase::InSync {
                        acked.fetch_add(1, Ordering::SeqCst);
                    }
                }
                Ok(HaToPrimary::InSync) if phase == Phase::Ending => {
                    sync.in_sync();
                    phase = Phase::InSync;
                    acked.store(1, Ordering::SeqCst);
                    info!("{PROTECTED_LOG}: the standby's replicas are in sync");
                }
                Ok(HaToPrimary::InSync) => warn!("HA primary: unexpected InSync"),
                Ok(HaToPrimary::Failed { reason }) => {
                    error!("HA primary: the standby failed: {reason}; running on alone");
                    sync.peer_lost();
                    phase = Phase::Idle;
                }
                Err(e) => error!("HA primary: bad message from the standby: {e}"),
            },
            Ok(None) => {}
            Err(e) => {
                warn!("HA primary: A-Link: {e}");
                return End::PeerLost;
            }
        }
        if phase == Phase::Draining && sync.drained() {
            phase = closing_commit(sync);
        }
        if phase == Phase::Resync {
            pending.push_back(SessionEvent::Tick);
            drive(
                &mut ses,
                &mut pending,
                &mut prepared,
                link,
                sync,
                &mut phase,
            );
        }
    }
}

/// Feeds the disk session its events and performs its actions; on `Ready` sends the
/// closing commit.
fn drive(
    ses: &mut PrimarySession,
    queue: &mut std::collections::VecDeque<SessionEvent>,
    prepared: &mut Vec<u64>,
    link: &Arc<Alink>,
    sync: &Arc<SyncDisks>,
    phase: &mut Phase,
) {
    while let Some(ev) = queue.pop_front() {
        for a in ses.on_event(ev, Instant::now(), &*sync.disks) {
            match &a {
                SessionAction::Send(m) => {
                    if !send_session(link, m, Vec::new()) {
                        return;
                    }
                    if matches!(m, DiskToStandby::Plan { .. }) && !sync.attached() {
                        // The standby applies the plan before anything after it:
                        // guest writes are mirrored to it from here on.
                        let l = link.clone();
                        sync.attach(Box::new(move |m, p| send(&l, m, p)));
                    }
                    continue;
                }
                SessionAction::End(end) => {
                    end_session(end, sync, phase);
                    return;
                }
                _ => {}
            }
            match sync.disks.perform(&a, prepared) {
                Performed::Done => {}
                Performed::Event(ev) => queue.push_back(ev),
                Performed::Chunk(m, data) => {
                    if !send_session(link, &m, data) {
                        return;
                    }
                }
                Performed::Failed(why) => {
                    error!("HA primary: disk session failed: {why}");
                    *phase = Phase::Idle;
                    return;
                }
            }
        }
    }
}

/// Sends the blocks still marked as the resync's closing commit (the gate is closed and
/// drained).
fn closing_commit(sync: &SyncDisks) -> Phase {
    match sync.end_resync() {
        Ok((heads, payload)) => {
            if sync.send_end_resync(heads, payload) {
                return Phase::Ending;
            }
            sync.peer_lost();
        }
        Err(e) => {
            error!("HA primary: ending the resync: {e}; running on alone");
            sync.peer_lost();
        }
    }
    Phase::Idle
}

fn end_session(end: &SessionEnd, sync: &Arc<SyncDisks>, phase: &mut Phase) {
    match end {
        SessionEnd::Ready(stats) => {
            info!(
                "HA primary: resync done ({} chunks, {} bytes, {} passes in {:?}); closing commit",
                stats.chunks, stats.bytes, stats.passes, stats.elapsed
            );
            sync.close_gate();
            *phase = Phase::Draining;
        }
        SessionEnd::Refused(why) => {
            error!("HA primary: the standby was refused: {why}");
            *phase = Phase::Idle;
        }
        SessionEnd::Failed(why) => {
            error!("HA primary: disk session failed: {why}");
            *phase = Phase::Idle;
        }
        SessionEnd::PeerLost => *phase = Phase::Idle,
    }
}
