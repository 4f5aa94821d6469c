//! The HA primary: builds and starts the VM with its disks mirrored synchronously,
//! then serves one standby after another (the primary's whole life, and a takeover
//! survivor's): the disk session resyncs the standby (guest writes already mirrored
//! meanwhile), the closing commit makes it in sync, and from then on every write
//! batch waits for its acknowledgement. When the standby is lost the writers complete
//! alone, their blocks recorded for its return. A standby that stays reachable but
//! leaves the oldest batch unacknowledged for the ack timeout is declared failed the
//! same way (a new disk session on the same link resyncs it, by a delta, once it
//! answers again).
//!
//! Ending (stop requested, or the VM ended): the VM's end is looked at without joining
//! its threads, the writers still waiting for an acknowledgement are released first
//! ([`SyncDisks::stop`]: they fail, no new generation), and only then is the VM joined:
//! a vCPU waiting for an acknowledgement that only this thread takes must never be
//! what the join waits for.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use alink::{Alink, AlinkConfig, AlinkError, Bytes, Event, LinkEvent};
use log::{error, info, warn};
use storage_mirror::primary::{
    Performed, PrimaryDisks, PrimarySession, SessionAction, SessionConfig, SessionEnd, SessionEvent,
};
use storage_mirror::sync::wire::{self as hawire, HaToPrimary, HaToStandby};
use storage_mirror::sync::{SyncDisks, ACK_TIMEOUT};
use storage_mirror::wire::{self, DiskToStandby};
use vmm::config::VmConfig;
use vmm::{build_vm, Vmm};

use super::hooks::HaHooks;
use super::migrate::{self, MigrateSide, Sent};
use super::Next;
use crate::alone::exit_code;
use crate::exit;
use crate::ft::quorum::{Gate, Quorum};
use crate::ft::shutdown::Shutdown;
use crate::ft::status::PairStatus;
use crate::settings::FtSettings;

/// Logged once the standby is in sync (tools ask the control socket's status).
pub const PROTECTED_LOG: &str = "HA primary: protected";

/// A send waits this long for window room before looking whether the peer is there.
const SEND_WAIT: Duration = Duration::from_millis(50);

/// Overrides [`ACK_TIMEOUT`] (milliseconds): how long the oldest mirrored write may
/// wait for the standby's acknowledgement before the standby is declared failed.
pub const ACK_TIMEOUT_ENV: &str = "TWINRUN_HA_ACK_TIMEOUT_MS";

/// Logged (with the reason) when a reachable standby is declared failed.
pub const STANDBY_FAILED_LOG: &str = "HA primary: the standby is declared FAILED";

fn ack_timeout() -> Duration {
    match std::env::var(ACK_TIMEOUT_ENV).map(|v| v.parse::<u64>()) {
        Ok(Ok(ms)) if ms > 0 => Duration::from_millis(ms),
        Ok(_) => {
            warn!(
                "{ACK_TIMEOUT_ENV} is not a positive number of milliseconds; using {ACK_TIMEOUT:?}"
            );
            ACK_TIMEOUT
        }
        Err(_) => ACK_TIMEOUT,
    }
}

pub fn run(
    cfg: &VmConfig,
    ft: &FtSettings,
    acfg: AlinkConfig,
    sd: &Shutdown,
    status: &PairStatus,
    q: Option<&Quorum>,
    side: &MigrateSide,
) -> Next {
    let (vm, sync, hooks) = match start_vm(cfg) {
        Ok(v) => v,
        Err(code) => return Next::Exit(code),
    };
    status.vm_running(&vm, Some(sync.disks.clone()));
    info!(
        "HA primary: VM running; {} A-Link(s) to the standby",
        acfg.links.len()
    );
    protect(vm, ft, acfg, sd, sync, hooks, status, q, side)
}

/// Builds and starts the VM with its disks mirrored synchronously (degraded, every
/// write marked, until a standby is in sync). Also the takeover survivor's boot.
pub fn start_vm(cfg: &VmConfig) -> Result<(Vmm, Arc<SyncDisks>, Arc<HaHooks>), i32> {
    let mut vm = build_vm(cfg).map_err(|e| {
        error!("cannot build the VM: {e}");
        exit::START_FAILED
    })?;
    let images: Vec<_> = cfg.disks.iter().map(|d| d.path.clone()).collect();
    let disks = PrimaryDisks::open(&images).map_err(|e| {
        error!("cannot start disk mirroring: {e}");
        exit::START_FAILED
    })?;
    // A file console writes at stream positions (from the file's end): a live
    // migration's checkpoint session carries them, and its target continues there.
    if matches!(cfg.console, vmm::config::ConsoleConfig::File { .. }) {
        vm.set_console_positioned(None).map_err(|e| {
            error!("cannot position the console file: {e}");
            exit::START_FAILED
        })?;
    }
    let sync = SyncDisks::new(disks);
    let hooks = HaHooks::new(sync.clone());
    vm.set_disk_hooks(Some(hooks.clone()));
    vm.start().map_err(|e| {
        error!("cannot start the VM: {e}");
        exit::START_FAILED
    })?;
    Ok((vm, sync, hooks))
}

/// How a session with one standby ended.
enum End {
    /// The VM ended on its own (not joined yet: `vm.wait()` gives how).
    Vm,
    Stop,
    PeerLost,
    /// The quorum says the peer won the VM with this generation.
    Demoted(u64),
    /// A live migration: every write acknowledged, the hooks' gate closed, the
    /// standby told (`HaToStandby::Migrate`).
    Migrate,
    /// An online level change to FT or unprotected, taken while no standby was
    /// connected (`crate::ft::level`).
    Level(crate::ft::level::LevelRequest),
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

/// Serves one standby after another until the VM ends or SIGTERM/SIGINT, or a live
/// migration hands the VM to the standby.
#[allow(clippy::too_many_arguments)]
pub fn protect(
    mut vm: Vmm,
    ft: &FtSettings,
    acfg: AlinkConfig,
    sd: &Shutdown,
    sync: Arc<SyncDisks>,
    hooks: Arc<HaHooks>,
    status: &PairStatus,
    q: Option<&Quorum>,
    side: &MigrateSide,
) -> Next {
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
                // Writers held for the quorum's leave are released before the join.
                sync.stop();
                vm.stopper().stop();
                vm.wait();
                sync.disks.clean_shutdown();
                return Next::Exit(exit::START_FAILED);
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
        let mut lim = Limits {
            ack_timeout: ack_timeout(),
            cut: Arc::new(AtomicBool::new(false)),
        };
        let ctx = Migration {
            side,
            hooks: &hooks,
            status,
        };
        let mut end = session(&vm, &link, &sync, sd, &acked, ft, &mut rule, &mut lim, &ctx);
        if let End::Level(request) = end {
            // No standby is attached (the disks are degraded already, every write
            // marked): nothing to end but this session's link.
            status.end_session(None);
            if let Some(q) = q {
                q.end_session();
            }
            drop(link);
            match to_ft_hooks(&vm, &hooks, &mut rule) {
                Ok(()) => {
                    return Next::Level {
                        vm: Box::new(vm),
                        sync,
                        request: Box::new(request),
                    }
                }
                Err(g) => {
                    request.answer(Err(
                        "this node lost the VM to its peer (quorum) during the change".into(),
                    ));
                    vm.stopper().stop();
                    sync.fence();
                    sync.peer_lost();
                    return Next::Exit(crate::ft::primary::demote(vm, &sync.disks, g));
                }
            }
        }
        if !matches!(end, End::Migrate) {
            // A migration taken but not begun: the gate opens, the request fails.
            hooks.reopen();
            side.fail("live migration given up: the HA session with the standby ended".into());
        }
        if matches!(end, End::PeerLost) && (sd.requested() || vm.ended().is_some()) {
            // The standby went in the same moment as a requested stop (or the VM's
            // end): it is a stop. Nothing completes alone, no generation begins.
            info!("HA primary: the standby went while this end stops; stopping");
            end = if sd.requested() { End::Stop } else { End::Vm };
        }
        if matches!(end, End::Demoted(_)) {
            // The VM ends before any held writer is released (they fail): a vCPU
            // leaving its write finds the stop and runs no guest instruction, so the
            // guest cannot see a failed write and send a frame about it.
            vm.stopper().stop();
            sync.fence();
        }
        match end {
            End::PeerLost | End::Demoted(_) | End::Migrate | End::Level(_) => {
                // Writers never wait for a standby that is gone. (Migrate: none waits,
                // and the checkpoint session's disk session finds a delta of nothing.)
                sync.peer_lost();
            }
            End::Vm | End::Stop => {
                // The VM is not joined yet: a writer waiting for an acknowledgement is
                // released first (failed: the guest is stopping), and this requested or
                // final stop begins no generation (the bitmap holds what the standby
                // lacks: finalize or a restart resyncs by a delta, or not at all).
                // Before the cut below: a writer that sees its send cut must find the
                // stop already made (else its failed send would count as the standby's
                // loss and begin a generation).
                sync.stop();
            }
        }
        // A writer stuck in a send to this standby gives up.
        lim.cut.store(true, Ordering::SeqCst);
        status.end_session(None);
        if let Some(q) = q {
            q.end_session();
        }
        drop(link);
        let end = match end {
            End::Migrate => {
                hooks.switch(true);
                match migrate::send_vm(&vm, ft, sd, &hooks, &sync, status, q, side) {
                    Sent::Swapped(done) => return hand_over(vm, hooks, sync, status, done),
                    Sent::Back => continue,
                    Sent::Demoted(g) => {
                        vm.stopper().stop();
                        sync.fence();
                        End::Demoted(g)
                    }
                    Sent::Ended => {
                        sync.stop();
                        if sd.requested() {
                            End::Stop
                        } else {
                            End::Vm
                        }
                    }
                }
            }
            e => e,
        };
        match end {
            End::PeerLost => continue,
            End::Migrate | End::Level(_) => unreachable!("mapped above"),
            End::Demoted(g) => {
                // Held completions failed above (the VM stops; none may be seen done).
                return Next::Exit(crate::ft::primary::demote(vm, &sync.disks, g));
            }
            End::Vm | End::Stop => {
                vm.stopper().stop();
                let e = vm.wait();
                sync.disks.clean_shutdown();
                return Next::Exit(exit_code(&e, sd.requested() || matches!(end, End::Stop)));
            }
        }
    }
    unreachable!("sessions are numbered without end")
}

/// A live migration's source after the swap: its guest stays paused at the swap point
/// (the target runs it now). Stops it, closes the disks cleanly (they hold exactly the
/// swap point, as the target's replicas do) and runs on as the HA standby.
fn hand_over(
    mut vm: Vmm,
    hooks: Arc<HaHooks>,
    sync: Arc<SyncDisks>,
    status: &PairStatus,
    done: checkpoint::primary::SwapDone,
) -> Next {
    info!(
        "HA primary: role swap done (live migration): the standby runs the VM from epoch {} \
         (guest paused here {:?}); this end becomes its HA standby",
        done.epoch, done.paused_for
    );
    vm.stopper().stop();
    let _ = vm.wait();
    vm.set_disk_hooks(None);
    drop(vm);
    drop(hooks);
    sync.stop();
    sync.disks.clean_shutdown();
    status.swapped_out();
    Next::Standby
}

/// What the session loop needs for a live migration (and an online level change).
struct Migration<'a> {
    side: &'a MigrateSide,
    hooks: &'a HaHooks,
    status: &'a PairStatus,
}

/// An online level change away from HA: the hooks become FT's (the same disks, every
/// write recorded in their bitmaps; FT's hooks never wait). Writers of a batch begun
/// in HA's mode finish first (without a standby they complete alone as the quorum's
/// gate allows, which was free when the change was taken); the quorum is obeyed
/// meanwhile. Err: this node lost the VM (the generation).
fn to_ft_hooks(vm: &Vmm, hooks: &HaHooks, rule: &mut Obey) -> Result<(), u64> {
    while !hooks.quiesce() {
        if let Err(g) = rule.step(vm) {
            hooks.reopen();
            return Err(g);
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    hooks.switch(true);
    info!("HA primary: level change: the VM's disk hooks are FT's now (no synchronous mirroring)");
    Ok(())
}

/// Sends `m` to the standby; false when it is gone, when `cut` is set (the standby was
/// declared failed: a writer stuck here gives up) or, with `within`, when the A-Link
/// had no room for that long (a reachable standby that stopped reading).
fn send(
    link: &Alink,
    m: &HaToStandby,
    payload: Vec<u8>,
    cut: &AtomicBool,
    within: Option<Duration>,
) -> bool {
    let payload = if payload.is_empty() {
        Vec::new()
    } else {
        vec![Bytes::from(payload)]
    };
    let t0 = Instant::now();
    loop {
        match link.send_timeout(m, payload.clone(), Some(SEND_WAIT)) {
            Ok(_) => return true,
            Err(AlinkError::Timeout) if link.peer_reachable() => {
                if cut.load(Ordering::SeqCst) || within.is_some_and(|w| t0.elapsed() >= w) {
                    if within != Some(Duration::ZERO) {
                        warn!("HA primary: the standby takes nothing; giving up this send");
                    }
                    return false;
                }
            }
            Err(e) => {
                warn!("HA primary: sending to the standby: {e}");
                return false;
            }
        }
    }
}

/// A disk session message (from the session's thread: bounded by the ack timeout).
fn send_session(link: &Alink, m: &DiskToStandby, payload: Vec<u8>, lim: &Limits) -> bool {
    match wire::encode(m) {
        Ok(h) => send(
            link,
            &HaToStandby::Session(h),
            payload,
            &lim.cut,
            Some(lim.ack_timeout),
        ),
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
    /// The standby, still reachable, was declared failed (no acknowledgement, or no
    /// room on the A-Link, for the ack timeout): a new disk session begins on the same
    /// link once its `Hello` can be sent (the standby reads it after everything before
    /// it, starts its session again and is resynced by a delta).
    Failed,
    /// Refused or failed: the VM runs on alone until this standby goes away.
    Idle,
}

/// The session's bounds: the ack timeout, and the flag that makes a writer stuck in a
/// send to a standby declared failed give up.
struct Limits {
    ack_timeout: Duration,
    cut: Arc<AtomicBool>,
}

/// One disk session with the standby on `link` (the state `drive` works on).
struct Disk {
    ses: PrimarySession,
    pending: std::collections::VecDeque<SessionEvent>,
    prepared: Vec<u64>,
    phase: Phase,
    /// A send of this session found no room for the ack timeout.
    stuck: bool,
}

impl Disk {
    fn new(ft: &FtSettings) -> Disk {
        let mut cfg = SessionConfig::default();
        cfg.resync.rate_limit = ft.resync_rate;
        Disk {
            ses: PrimarySession::new(cfg, Instant::now()),
            pending: std::collections::VecDeque::new(),
            prepared: Vec::new(),
            phase: Phase::Resync,
            stuck: false,
        }
    }
}

// The session's whole context, passed as such (a struct would only rename it).
#[allow(clippy::too_many_arguments)]
fn session(
    vm: &Vmm,
    link: &Arc<Alink>,
    sync: &Arc<SyncDisks>,
    sd: &Shutdown,
    acked: &AtomicU64,
    ft: &FtSettings,
    rule: &mut Obey,
    lim: &mut Limits,
    mig: &Migration,
) -> End {
    // Wait for a standby. The VM's end is looked at without joining it (see the
    // module's comment).
    loop {
        if vm.ended().is_some() {
            return End::Vm;
        }
        if let Err(g) = rule.step(vm) {
            return End::Demoted(g);
        }
        if sd.requested() {
            return End::Stop;
        }
        if mig.side.wanted() {
            mig.side
                .fail("live migration refused: no standby is connected (the VM stays here)".into());
        }
        while link.poll_event(Duration::ZERO).is_some() {}
        if link.peer_reachable() {
            break;
        }
        // An online level change away from HA, between two sessions: with a quorum
        // only while the gate is free (the witness recorded the standby as outdated and
        // the lease is valid: no writer waits, nothing can take the VM over).
        let free = rule.q.is_none_or(|q| {
            !q.pause()
                && matches!(q.gate(), Gate::Free { until } if until.is_none_or(|u| Instant::now() < u))
        });
        if free {
            if let Some(r) = crate::ft::level::take(mig.status, |c| {
                !matches!(c, twinrun_control::LevelChange::Ha(_))
            }) {
                return End::Level(r);
            }
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    info!("HA primary: standby connected; disk session begins");
    if !send(
        link,
        &HaToStandby::Hello,
        Vec::new(),
        &lim.cut,
        Some(lim.ack_timeout),
    ) {
        return End::PeerLost;
    }
    let mut d = Disk::new(ft);
    // A live migration taken: the hooks' gate is closed, waiting for the last batch.
    let mut migrating = false;
    loop {
        if vm.ended().is_some() {
            return End::Vm;
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
                // The standby's A-Link was replaced: this session is over.
                Event::PeerRestarted { .. } => lost = true,
            }
        }
        if lost && !link.peer_reachable() {
            warn!("HA primary: the standby is lost; running on alone, recording writes");
            if d.phase == Phase::Resync {
                d.pending.push_back(SessionEvent::PeerLost);
                drive(&mut d, link, sync, lim);
            }
            return End::PeerLost;
        }
        match link.recv(Duration::from_millis(5)) {
            Ok(Some(msg)) => match hawire::decode::<HaToPrimary>(msg.head_bytes()) {
                // A failed standby's answers until it reads the new `Hello`: stale.
                Ok(HaToPrimary::Session(_)) if d.phase == Phase::Failed => {}
                Ok(HaToPrimary::Session(h)) => match wire::decode_to_primary(&h, msg.payload()) {
                    Ok(m) => {
                        if let Some(ev) = SessionEvent::from_msg(m, msg.payload()) {
                            d.pending.push_back(ev);
                        }
                    }
                    Err(e) => error!("HA primary: bad disk message: {e}"),
                },
                Ok(HaToPrimary::Ack { seq }) => {
                    if let Err(e) = sync.on_ack(seq) {
                        error!("HA primary: {e}; dropping this standby");
                        return End::PeerLost;
                    }
                    if d.phase == Phase::InSync {
                        acked.fetch_add(1, Ordering::SeqCst);
                    }
                }
                Ok(HaToPrimary::InSync) if d.phase == Phase::Ending => {
                    sync.in_sync();
                    d.phase = Phase::InSync;
                    acked.store(1, Ordering::SeqCst);
                    info!("{PROTECTED_LOG}: the standby's replicas are in sync");
                }
                Ok(HaToPrimary::InSync) => warn!("HA primary: unexpected InSync"),
                Ok(HaToPrimary::Failed { reason }) => {
                    error!("HA primary: the standby failed: {reason}; running on alone");
                    sync.peer_lost();
                    d.phase = Phase::Idle;
                }
                Err(e) => error!("HA primary: bad message from the standby: {e}"),
            },
            Ok(None) => {}
            Err(e) => {
                warn!("HA primary: A-Link: {e}");
                return End::PeerLost;
            }
        }
        if let Some((seq, waited)) = sync.ack_overdue(lim.ack_timeout) {
            declare_failed(
                sync,
                acked,
                &mut d,
                lim,
                format!(
                    "reachable, but it left write batch {seq} unacknowledged for {} ms \
                     (ack timeout {} ms)",
                    waited.as_millis(),
                    lim.ack_timeout.as_millis()
                ),
            );
        }
        if d.phase == Phase::Failed {
            // Room on the A-Link for the new session's Hello: the standby reads it
            // after every batch before it and starts its session again.
            let fresh = AtomicBool::new(false);
            if send(
                link,
                &HaToStandby::Hello,
                Vec::new(),
                &fresh,
                Some(Duration::ZERO),
            ) {
                info!("HA primary: a new disk session for the failed standby (delta resync)");
                lim.cut = Arc::new(AtomicBool::new(false));
                d = Disk::new(ft);
            }
        }
        if d.phase == Phase::Draining && sync.drained() {
            d.phase = closing_commit(sync);
        }
        if d.phase == Phase::Resync {
            d.pending.push_back(SessionEvent::Tick);
            drive(&mut d, link, sync, lim);
        }
        if mig.side.wanted() {
            if d.phase == Phase::InSync {
                info!("HA primary: live migration asked: holding new writes until every one out is acknowledged");
                mig.side.take();
                migrating = true;
            } else {
                mig.side.fail(
                    "live migration refused: the standby is not in sync (the VM stays here)".into(),
                );
            }
        }
        if migrating && d.phase != Phase::InSync {
            // The standby failed meanwhile (ack timeout): no migration to it.
            migrating = false;
            mig.hooks.reopen();
            mig.side
                .fail("live migration given up: the standby stopped acknowledging".into());
        }
        if migrating && mig.hooks.quiesce() {
            // No batch open: every mirrored write is acknowledged, the replicas equal.
            if !send(
                link,
                &HaToStandby::Migrate,
                Vec::new(),
                &lim.cut,
                Some(lim.ack_timeout),
            ) {
                return End::PeerLost;
            }
            // The session's link is dropped next, which kills its connections at once:
            // a Migrate still queued here would never reach the standby (it would see
            // its primary lost instead, and boot the VM without a quorum). It waits
            // until the standby consumed it, or its links closed (it leaves this
            // session on reading it), bounded by the ack timeout.
            let t0 = Instant::now();
            while link.flush(SEND_WAIT).is_err()
                && link.peer_reachable()
                && t0.elapsed() < lim.ack_timeout
            {}
            return End::Migrate;
        }
        if d.stuck {
            let why = format!(
                "reachable, but the A-Link had no room for the disk session for {} ms",
                lim.ack_timeout.as_millis()
            );
            declare_failed(sync, acked, &mut d, lim, why);
        }
    }
}

/// The standby stays reachable but takes nothing (`why`): declared failed for every
/// disk. Its writers complete alone under the quorum's rule (the quorum is told this
/// node is no longer protected, so its renewals ask the witness to record the peer
/// outdated, which opens the gate), the disks degraded with `why` in the status, and
/// a new disk session begins once the standby can be told.
fn declare_failed(sync: &SyncDisks, acked: &AtomicU64, d: &mut Disk, lim: &Limits, why: String) {
    error!("{STANDBY_FAILED_LOG}: {why}; the disks are DEGRADED (written blocks recorded for its delta resync)");
    lim.cut.store(true, Ordering::SeqCst);
    sync.standby_failed(format!("standby declared failed: {why}"));
    acked.store(0, Ordering::SeqCst);
    d.phase = Phase::Failed;
    d.stuck = false;
    d.pending.clear();
    d.prepared.clear();
}

/// Feeds the disk session its events and performs its actions; on `Ready` sends the
/// closing commit. A send that finds no room for the ack timeout sets `stuck`.
fn drive(d: &mut Disk, link: &Arc<Alink>, sync: &Arc<SyncDisks>, lim: &Limits) {
    while let Some(ev) = d.pending.pop_front() {
        for a in d.ses.on_event(ev, Instant::now(), &*sync.disks) {
            match &a {
                SessionAction::Send(m) => {
                    if !send_session(link, m, Vec::new(), lim) {
                        d.stuck = true;
                        return;
                    }
                    if matches!(m, DiskToStandby::Plan { .. }) && !sync.attached() {
                        // The standby applies the plan before anything after it:
                        // guest writes are mirrored to it from here on.
                        let l = link.clone();
                        let cut = lim.cut.clone();
                        sync.attach(Box::new(move |m, p| send(&l, m, p, &cut, None)));
                    }
                    continue;
                }
                SessionAction::End(end) => {
                    end_session(end, sync, &mut d.phase);
                    return;
                }
                _ => {}
            }
            match sync.disks.perform(&a, &mut d.prepared) {
                Performed::Done => {}
                Performed::Event(ev) => d.pending.push_back(ev),
                Performed::Chunk(m, data) => {
                    if !send_session(link, &m, data, lim) {
                        d.stuck = true;
                        return;
                    }
                }
                Performed::Failed(why) => {
                    error!("HA primary: disk session failed: {why}");
                    d.phase = Phase::Idle;
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
