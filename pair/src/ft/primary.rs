//! The primary: builds and starts the VM, then checkpoints it to the standby until
//! SIGTERM/SIGINT. Output commit and the disk journal are switched on by the capture
//! edge at epoch 0; a file console is positioned first so that its bytes land at
//! their stream positions (the standby may write the same bytes there again).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::exit;
use crate::settings::{FtSettings, Role};
use alink::{Alink, AlinkConfig};
use checkpoint::primary::{
    run_primary, DriverError, MirroredDisks, PrimaryDriverConfig, PrimaryReport, SwapDone,
};
use checkpoint::protocol::PrimaryConfig;
use log::{error, info, warn};
use storage_mirror::primary::PrimaryDisks;
use vmm::config::{ConsoleConfig, VmConfig};
use vmm::{build_vm, Vmm};

use super::gate::HeldOutput;
use super::quorum::Quorum;
use super::shutdown::Shutdown;
use super::status::PairStatus;
use super::Next;
use crate::alone::exit_code;

/// Logged once the standby has committed epoch 0 (tools ask the control socket's
/// status instead).
const PROTECTED_LOG: &str = "FT primary: protected";

pub fn run(
    cfg: &VmConfig,
    ft: &FtSettings,
    acfg: AlinkConfig,
    sd: &Shutdown,
    status: &PairStatus,
    quorum: Option<&Quorum>,
) -> Next {
    let mut vm = match build_vm(cfg) {
        Ok(vm) => vm,
        Err(e) => {
            error!("cannot build the VM: {e}");
            return exit::START_FAILED.into();
        }
    };
    if matches!(cfg.console, ConsoleConfig::File { .. }) {
        match vm.set_console_positioned(None) {
            Ok(p) => info!("console file positioned, stream starts at byte {p:?}"),
            Err(e) => {
                error!("cannot position the console file: {e}");
                return exit::START_FAILED.into();
            }
        }
    } else {
        warn!("the console is not a file: output the standby releases again after a failover may be duplicated");
    }
    // Before the guest runs: every write is marked in the disks' persistent bitmaps
    // until a standby is in sync.
    let images: Vec<_> = cfg.disks.iter().map(|d| d.path.clone()).collect();
    let disks = match PrimaryDisks::open(&images) {
        Ok(d) => d,
        Err(e) => {
            error!("cannot start disk mirroring: {e}");
            return exit::START_FAILED.into();
        }
    };
    vm.set_disk_hooks(Some(Arc::new(MirroredDisks(disks.clone()))));
    if let Err(e) = vm.start() {
        error!("cannot start the VM: {e}");
        return exit::START_FAILED.into();
    }
    status.vm_running(&vm, Some(disks.clone()));
    if ft.unprotected {
        info!(
            "unprotected VM running alone (no dirty logging, no checkpoints); a live \
             migration's receiving VMM may connect over {} A-Link(s): {:?}",
            acfg.links.len(),
            acfg.links.iter().map(|l| l.remote).collect::<Vec<_>>()
        );
    } else {
        info!(
            "FT primary: VM running; {} A-Link(s) to the standby: {:?}",
            acfg.links.len(),
            acfg.links.iter().map(|l| l.remote).collect::<Vec<_>>()
        );
    }
    protect(vm, ft, acfg, sd, disks, status, quorum, false)
}

/// Protects the running `vm` with one standby after another until it ends or
/// SIGTERM/SIGINT: the primary's whole life, and a failover survivor's (failback: the
/// old primary, restarted as a standby, is resynced with a delta and protects the VM).
///
/// With a quorum, output the standby has not acknowledged leaves only as the quorum
/// says ([`HeldOutput`]), and a primary that lost the VM to a higher generation stops
/// it and exits with [`exit::DEMOTED`]. `commit_on`: the VM holds its output already
/// (a failover survivor's).
#[allow(clippy::too_many_arguments)]
pub fn protect(
    mut vm: Vmm,
    ft: &FtSettings,
    acfg: AlinkConfig,
    sd: &Shutdown,
    disks: Arc<PrimaryDisks>,
    status: &PairStatus,
    quorum: Option<&Quorum>,
    commit_on: bool,
) -> Next {
    let protocol = ft.primary_protocol();
    info!(
        "FT primary: epoch {:?} (at least {:?} when output waits, and less than {} KiB \
         in flight), {} epochs in flight at most",
        protocol.epoch_len,
        protocol.min_epoch,
        protocol.coalesce_bytes >> 10,
        protocol.max_in_flight
    );
    // One session per standby: when the standby is lost the VM runs on (degraded,
    // written blocks recorded) and the next standby to connect is resynced and
    // protects it again.
    let mut held = HeldOutput::new(commit_on);
    for session in 1u64.. {
        let link = match Alink::start(acfg.clone()) {
            Ok(l) => Arc::new(l),
            Err(e) => {
                error!("cannot start the A-Link: {e}");
                vm.stopper().stop();
                vm.wait();
                return exit::START_FAILED.into();
            }
        };
        if session > 1 {
            info!("FT primary: waiting for a standby (session {session})");
        }
        let acked = Arc::new(AtomicU64::new(0));
        status.begin_session(link.clone(), Some(acked.clone()));
        // Between sessions (no peer connected): an online level change may be taken
        // here ([`super::level`]); the session loop goes on at the new level.
        let waited = match quorum {
            Some(q) => {
                q.begin_session(link.clone(), Some(acked.clone()));
                wait_for_standby(&vm, &link, q, sd, &mut held, status)
            }
            None => Ok(wait_alone(&link, sd, status)),
        };
        let waited = match waited {
            Ok(Waited::Level(request)) => {
                if let Some(q) = quorum {
                    q.end_session();
                }
                status.end_session(None);
                drop(link);
                return Next::Level {
                    vm: Box::new(vm),
                    disks,
                    request,
                };
            }
            other => other,
        };
        if let Some(q) = quorum {
            match waited {
                // (A level change returned above.)
                Ok(Waited::Standby | Waited::Level(_)) => {}
                Ok(Waited::Stop) => {
                    // Stop requested while waiting.
                    q.end_session();
                    status.end_session(None);
                    drop(link);
                    sd.hand_vm(vm.stopper());
                    vm.stopper().stop();
                    let end = vm.wait();
                    disks.clean_shutdown();
                    return exit_code(&end, true).into();
                }
                Err(generation) => {
                    q.end_session();
                    status.end_session(None);
                    drop(link);
                    held.discard(&vm);
                    return demote(vm, &disks, generation).into();
                }
            }
        }
        let mut dcfg = driver_config(protocol, acked.clone(), disks.clone(), ft);
        dcfg.hold_on_simplex = quorum.is_some();
        dcfg.generation = quorum.map(Quorum::generation);
        dcfg.own_generations = quorum.map(Quorum::own_generations);
        dcfg.swap = status.swap_side().port_for(quorum.is_some());
        let done = AtomicBool::new(false);
        let result = std::thread::scope(|s| {
            // Also for an unprotected VM (only while a migration's session runs): the
            // node daemon reads the line as "the receiving VMM is in sync".
            s.spawn(|| announce_protection(&acked, &done, sd, ft.unprotected));
            let r = run_primary(&vm, &link, &dcfg, sd.flag());
            // Ends the announcer if nothing was ever acknowledged.
            done.store(true, Ordering::SeqCst);
            r
        });
        if let Ok(report) = &result {
            log_report(report);
        }
        status.end_session(result.as_ref().ok());
        if let Some(q) = quorum {
            q.end_session();
            held.after_session(&vm, result.as_ref().ok());
        }
        drop(link);
        if let Some(done) = result.as_ref().ok().and_then(|r| r.swapped) {
            return hand_over(vm, ft, disks, status, done);
        }
        if let Some(generation) = quorum.and_then(Quorum::handed_over) {
            // The peer took the VM at the swap point (its grant seen here first) and
            // this session never saw the acceptance: the VM is the peer's (issue 15).
            held.discard(&vm);
            return demote(vm, &disks, generation).into();
        }
        match result {
            Err(DriverError::Fenced { peer, .. }) => {
                // The standby knows a newer generation: this primary lost the VM.
                // The driver released nothing after the refusal; nothing held leaves.
                if let Some(q) = quorum {
                    q.generation().fetch_max(peer, Ordering::SeqCst);
                }
                held.discard(&vm);
                return demote(vm, &disks, peer).into();
            }
            // Without a stop request the driver returns only when the standby is gone.
            Ok(_) if !sd.requested() => {
                if let Some(end) = vm.wait_timeout(Duration::ZERO) {
                    return exit_code(&end, sd.requested()).into();
                }
                // Output commit is off (released at simplex); the next session turns
                // it on again at its epoch 0.
                if ft.unprotected {
                    run_alone_again(&vm);
                }
                continue;
            }
            Ok(_) => {
                sd.hand_vm(vm.stopper());
                vm.stopper().stop();
                let end = vm.wait();
                disks.clean_shutdown();
                return exit_code(&end, true).into();
            }
            Err(e) => {
                if let Some(end) = vm.wait_timeout(Duration::ZERO) {
                    info!("checkpointing ended with the VM: {e}");
                    disks.clean_shutdown();
                    return exit_code(&end, sd.requested()).into();
                }
                if ft.unprotected && !sd.requested() {
                    // A migration that failed: the VM runs on here, as it did before,
                    // and a later migration gets a new session.
                    warn!("unprotected VM: the migration's session failed ({e})");
                    unprotect(&vm);
                    disks.peer_lost();
                    run_alone_again(&vm);
                    continue;
                }
                error!(
                    "FT primary: checkpointing FAILED ({e}); the VM runs on UNPROTECTED \
                     (held output released)"
                );
                unprotect(&vm);
                disks.peer_lost();
                sd.hand_vm(vm.stopper());
                let end = vm.wait();
                disks.clean_shutdown();
                return exit_code(&end, sd.requested()).into();
            }
        }
    }
    unreachable!("sessions are numbered without end")
}

/// How waiting for a standby between sessions ended.
enum Waited {
    /// A peer is connected: the session begins.
    Standby,
    /// Stop requested.
    Stop,
    /// An online level change to take now ([`super::level`]).
    Level(super::level::LevelRequest),
}

/// Waits for a peer on `link` without a quorum (the driver would wait the same way),
/// taking a level change asked meanwhile: any change (nothing is held: without a
/// quorum a lost standby's output was released at simplex).
fn wait_alone(link: &Alink, sd: &Shutdown, status: &PairStatus) -> Waited {
    loop {
        if sd.requested() {
            return Waited::Stop;
        }
        if link.peer_reachable() {
            return Waited::Standby;
        }
        if let Some(r) = super::level::take(status, |_| true) {
            return Waited::Level(r);
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Waits for a standby on `link` while the quorum governs the VM's output and guest.
/// Standby: a standby is connected (held output handed to the session); Stop: stop
/// requested; Level: a change to unprotected or HA, taken only while the gate is `Free` (the
/// witness recorded the standby as outdated and the lease is valid: nothing can take
/// the VM over), with everything held released first; Err(generation): this primary
/// lost the VM to that generation.
fn wait_for_standby(
    vm: &Vmm,
    link: &Alink,
    q: &Quorum,
    sd: &Shutdown,
    held: &mut HeldOutput,
    status: &PairStatus,
) -> Result<Waited, u64> {
    loop {
        if let Some(g) = q.demoted() {
            return Err(g);
        }
        if sd.requested() {
            return Ok(Waited::Stop);
        }
        if let Err(e) = held.step(vm, q) {
            warn!("quorum: applying the output gate: {e}");
        }
        if link.peer_reachable() {
            if let Err(e) = held.before_session(vm) {
                warn!("quorum: handing output to the session: {e}");
            }
            return Ok(Waited::Standby);
        }
        let free = match q.gate() {
            super::quorum::Gate::Free { until } => until.is_none_or(|u| Instant::now() < u),
            _ => false,
        };
        if free && !q.pause() {
            if let Some(r) = super::level::take(status, |c| {
                matches!(
                    c,
                    twinrun_control::LevelChange::Unprotected | twinrun_control::LevelChange::Ha(_)
                )
            }) {
                // Everything held leaves now (the gate allows it), and output commit
                // is off for good: the VM runs alone, or at HA (which holds no output:
                // its writes wait for the standby instead).
                if let Err(e) = held.before_session(vm) {
                    warn!("level change: releasing the held output: {e}");
                }
                return Ok(Waited::Level(r));
            }
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// A primary that lost: its VM stops with its held output discarded, its disks are
/// marked as the resync target of the new primary (an interrupted resync target: the
/// next session copies the new primary's disks over them), and the process exits with
/// [`exit::DEMOTED`]; restarted with `--role standby` and the same disks it rejoins.
pub(crate) fn demote(mut vm: Vmm, disks: &PrimaryDisks, generation: u64) -> i32 {
    vm.stopper().stop();
    let _ = vm.wait();
    // Not a clean shutdown: the metadata must not say this disk is a usable primary's.
    drop(vm);
    for image in mark_resync_targets(disks, generation) {
        error!("quorum: could not mark disk {image} as the resync target");
    }
    error!(
        "{DEMOTED_LOG}: the peer holds generation {generation}; this VM stopped without \
         releasing its held output. Restart this node with --role standby (same disks): \
         they are the resync target"
    );
    exit::DEMOTED
}

/// Logged by a primary that lost the VM to its peer.
pub const DEMOTED_LOG: &str = "FT primary: DEMOTED";

/// Marks every disk's replica metadata as demoted (an interrupted resync target, rule c
/// of the resync decision: the other side's copy wins, by a delta when both bitmaps
/// start at a shared generation) and records the winner's `generation` in it (the disk
/// itself then says this node lost); returns the images it could not mark.
fn mark_resync_targets(disks: &PrimaryDisks, generation: u64) -> Vec<String> {
    let mut failed = Vec::new();
    for st in disks.status() {
        let store = storage_mirror::meta::MetaStore::for_image(std::path::Path::new(&st.path));
        let r = match store.load() {
            Ok(storage_mirror::meta::MetaState::Ok(mut m)) => {
                // The winner's data is newer than anything it saw; its bitmap (every
                // block it wrote since the generation both last shared) is kept, so
                // the resync is a delta when the winner's bitmap starts there too.
                m.mark_demoted(generation);
                store.save(&m).map_err(|e| e.to_string())
            }
            Ok(other) => Err(format!("metadata {other:?}")),
            Err(e) => Err(e.to_string()),
        };
        if let Err(e) = r {
            failed.push(format!("{} ({e})", st.path));
        }
    }
    failed
}

/// The driver's config, field by field: it grows (e.g. test-mode hashing) and keeps
/// its defaults for what FT mode does not set, whichever fields it has.
#[allow(clippy::field_reassign_with_default)]
fn driver_config(
    protocol: PrimaryConfig,
    acked: Arc<AtomicU64>,
    disks: Arc<PrimaryDisks>,
    ft: &FtSettings,
) -> PrimaryDriverConfig {
    let mut d = PrimaryDriverConfig::default();
    d.protocol = protocol;
    d.disks = Some(disks);
    d.resync.rate_limit = ft.resync_rate;
    // Twice the standby's acknowledgement batch: the next chunks travel while it syncs.
    d.resync.max_in_flight = 16;
    d.return_on_simplex = true;
    // The VM runs (unprotected, output not yet held) until the standby connects;
    // waiting for it is not an error.
    d.connect_timeout = Duration::from_secs(365 * 24 * 3600);
    d.acked = Some(acked);
    match ft.hot_pages {
        None => {}
        Some(0) => d.hot_pages = None,
        Some(n) => {
            if let Some(h) = &mut d.hot_pages {
                h.max_pages = n;
            }
        }
    }
    d
}

/// Logs [`PROTECTED_LOG`] once the first epoch is acknowledged (for people reading
/// the log; tools and tests ask the control socket's status).
fn announce_protection(acked: &AtomicU64, done: &AtomicBool, sd: &Shutdown, unprotected: bool) {
    loop {
        if acked.load(Ordering::SeqCst) > 0 {
            if unprotected {
                info!(
                    "{PROTECTED_LOG}: the migration's receiving VMM committed the first \
                     checkpoint (in sync; the handover follows)"
                );
            } else {
                info!("{PROTECTED_LOG}: the standby committed the first checkpoint");
            }
            return;
        }
        if done.load(Ordering::SeqCst) || sd.requested() {
            return;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// An unprotected VM whose migration session ended without the handover (given up,
/// or the receiving VMM gone): it runs alone again at full speed. The session's dirty
/// logging stops (the next migration's pre-copy starts it again with a full round);
/// output commit and the disk journal ended with the session (`enter_simplex`).
pub(crate) fn run_alone_again(vm: &Vmm) {
    match vm.stop_dirty_tracking() {
        Ok(()) => info!(
            "unprotected VM: the migration's session ended without the handover; the VM \
             runs alone here again (dirty logging off)"
        ),
        Err(e) => warn!("unprotected VM: cannot turn dirty logging off: {e}"),
    }
}

fn unprotect(vm: &Vmm) {
    if let Err(e) = vm.pause() {
        warn!("cannot pause to release held output: {e}");
        return;
    }
    match vm.disable_output_commit() {
        Ok(st) => info!("released held output: {st:?}"),
        Err(e) => warn!("releasing held output: {e}"),
    }
    vm.disable_disk_journal();
    if let Err(e) = vm.resume() {
        error!("cannot resume the VM: {e}");
    }
}

fn log_report(r: &PrimaryReport) {
    let pct = |p: usize| r.pauses.get(r.pauses.len() * p / 100).copied();
    info!(
        "FT primary: {} sync rounds, {} epochs captured, {} acknowledged, released through \
         {:?}, pause p50 {:?} p99 {:?}, commit wait p50 {:?}, {:.1} dirty pages per epoch \
         ({:.1} hot), {} throttles{}",
        r.sync_rounds,
        r.epochs_captured,
        r.epochs_acked,
        r.released,
        pct(50),
        pct(99),
        r.commit_waits.get(r.commit_waits.len() / 2),
        r.epoch_pages as f64 / r.epochs_captured.saturating_sub(1).max(1) as f64,
        r.hot_pages as f64 / r.epochs_captured.saturating_sub(1).max(1) as f64,
        r.throttles,
        if r.simplex {
            "; ran SIMPLEX (standby lost)"
        } else {
            ""
        }
    );
    if let Some(rs) = &r.resync {
        info!(
            "FT primary: disk resync of the session: {} chunks, {} bytes, {} passes in {:?}",
            rs.chunks, rs.bytes, rs.passes, rs.elapsed
        );
    }
    if let Some(why) = &r.refused {
        error!("FT primary: the standby was refused: {why}");
    }
}

/// After a swap: this end's guest stays paused at the swap point (the standby runs
/// it now). Stops it, closes the disks cleanly (they hold exactly the swap point, as
/// the new primary's do) and says how this end runs on: as the standby of the same
/// pair ([`super::Next::Standby`]).
fn hand_over(
    mut vm: Vmm,
    ft: &FtSettings,
    disks: Arc<PrimaryDisks>,
    status: &PairStatus,
    done: SwapDone,
) -> super::Next {
    info!(
        "FT primary: role swap done: the peer runs the VM from epoch {} (guest paused here \
         {:?}); this end becomes its standby",
        done.epoch, done.paused_for
    );
    vm.stopper().stop();
    let _ = vm.wait();
    vm.set_disk_hooks(None);
    drop(vm);
    disks.clean_shutdown();
    status.swapped_out();
    drop(disks);
    let mut as_standby = ft.clone();
    as_standby.role = Role::Standby;
    // Never discard: these disks are the replica's data.
    as_standby.discard_disk_data = false;
    super::Next::Standby {
        cfg: Box::new(status.swap_side().cfg().clone()),
        ft: Box::new(as_standby),
    }
}
