//! One end of a protected pair (`twinrun vm run --role primary|standby`).
//!
//! [`shutdown`] stops whatever runs (the checkpoint driver, then the VM) on
//! SIGTERM/SIGINT, taken on a dedicated thread, or when asked; [`primary`] and
//! [`standby`] run each role to its end and map it to `vm run`'s exit codes; [`role`]
//! is the failover survivor's switch from standby to primary; [`status`] is what
//! either end serves on its control socket (with `--name`); [`link`] the A-Link
//! configuration both ends derive from the same settings.

pub mod gate;
pub mod level;
pub mod link;
pub mod migration;
pub mod primary;
pub mod quorum;
pub mod role;
pub mod shutdown;
pub mod standby;
pub mod status;
pub mod swap;

use std::sync::Arc;

use log::{error, info, warn};
use storage_mirror::primary::PrimaryDisks;
use vmm::config::VmConfig;
use vmm::Vmm;

use crate::ha::hooks::HaHooks;
use crate::ha::migrate::MigrateSide;
use crate::settings::{FtSettings, Role};
use crate::{exit, signals};
use shutdown::Shutdown;
use status::PairStatus;
use storage_mirror::sync::SyncDisks;

/// Runs this process's end of the pair until it ends or SIGTERM/SIGINT (with `name`,
/// serving its control socket); returns the exit code.
pub fn run_pair(cfg: &VmConfig, ft: &FtSettings, name: Option<&str>) -> i32 {
    // Before any thread exists, so every later thread inherits the mask.
    if let Err(e) = signals::block() {
        error!("cannot block SIGTERM/SIGINT: {e}");
        return exit::START_FAILED;
    }
    let shutdown = Shutdown::install();
    // With --name, either end serves a control socket: status (role, protection,
    // failover, links, disks) and, where a VM runs, disk fault injection and the
    // mirrored disks' state (no pause or snapshot: they would fight the checkpoints).
    let server = match name.map(|n| crate::alone::control_server(Some(n), cfg)) {
        Some(Ok(s)) => s,
        Some(Err(code)) => return code,
        None => None,
    };
    let status = PairStatus::new(ft.role, cfg);
    let _control = server.map(|s| status::ControlThread::start(s, status.clone()));
    run_pair_with(cfg, ft, &shutdown, &status)
}

/// [`run_pair`] in-process: no signal handling and no control socket; `shutdown`
/// stops this end when requested, `status` shows how it goes.
pub fn run_pair_with(
    cfg: &VmConfig,
    ft: &FtSettings,
    shutdown: &Shutdown,
    status: &Arc<PairStatus>,
) -> i32 {
    // An unprotected VM runs alone: no quorum (nothing ever takes it over), and the
    // primary's machinery (dirty logging, epochs) only while a migration runs.
    let q = if ft.unprotected {
        status.set_unprotected();
        None
    } else {
        match quorum::start_for(
            ft,
            status,
            "FT mode WITHOUT QUORUM (no --quorum-config or --witness): if ALL A-Links are cut \
             while both PMs are alive, the standby takes over and TWO copies of the VM run",
        ) {
            Ok(q) => q,
            Err(code) => return code,
        }
    };
    let acfg = link::alink_config(ft);
    let first = match ft.role {
        Role::Primary => primary::run(cfg, ft, acfg, shutdown, status, q.as_ref()),
        Role::Standby => standby::run(cfg, ft, acfg, shutdown, status, q.as_ref()),
    };
    drive(cfg, ft, shutdown, status, q, &Arc::default(), first)
}

/// An HA primary that took an online level change to FT or unprotected
/// (`crate::ha::drive`): FT's runtime goes on with its VM (its hooks FT's already),
/// disks and quorum client, the change made as from unprotected or FT.
#[allow(clippy::too_many_arguments)]
pub(crate) fn run_from_ha(
    cfg: &VmConfig,
    ft: &FtSettings,
    shutdown: &Shutdown,
    status: &Arc<PairStatus>,
    q: Option<quorum::Quorum>,
    side: &Arc<MigrateSide>,
    vm: Box<Vmm>,
    disks: Arc<PrimaryDisks>,
    request: level::LevelRequest,
) -> i32 {
    let next = Next::Level { vm, disks, request };
    drive(cfg, ft, shutdown, status, q, side, next)
}

/// FT's runtime from `next` on. The role switches, in one place: a failover survivor
/// (or the standby that accepted a planned swap) protects the VM as the primary; a
/// swapped-out primary runs on as the standby of the same pair; an online level
/// change goes on at the new level, HA's runtime included (`crate::ha::drive`, which
/// comes back here on a change away from HA). `q` is owned here: a level change
/// starts or stops it.
fn drive(
    cfg: &VmConfig,
    ft: &FtSettings,
    shutdown: &Shutdown,
    status: &Arc<PairStatus>,
    mut q: Option<quorum::Quorum>,
    side: &Arc<MigrateSide>,
    mut next: Next,
) -> i32 {
    let mut cur_ft = ft.clone();
    let mut swapped_out = false;
    loop {
        next = match next {
            Next::Exit(code) => {
                if swapped_out && code != exit::OK {
                    error!("FT: the swapped-out end's standby run ended with code {code}");
                }
                return code;
            }
            Next::Primary { vm, disks } => {
                let acfg = link::alink_config_as(&cur_ft, Role::Primary);
                let q = q.as_ref();
                primary::protect(*vm, &cur_ft, acfg, shutdown, disks, status, q, q.is_some())
            }
            Next::Level { vm, disks, request } => {
                match change_level(&vm, &disks, &mut cur_ft, &mut q, status, side, request) {
                    Changed::Ha(sync, hooks) => {
                        let at_ha = crate::ha::Next::Primary(vm, sync, hooks);
                        match crate::ha::drive(
                            cfg,
                            &cur_ft,
                            shutdown,
                            status,
                            q.as_ref(),
                            side,
                            at_ha,
                        ) {
                            crate::ha::HaEnd::Exit(code) => Next::Exit(code),
                            crate::ha::HaEnd::Level {
                                ft,
                                vm,
                                sync,
                                request,
                            } => {
                                cur_ft = *ft;
                                Next::Level {
                                    vm,
                                    disks: sync.disks.clone(),
                                    request: *request,
                                }
                            }
                        }
                    }
                    Changed::Ft => {
                        let acfg = link::alink_config_as(&cur_ft, Role::Primary);
                        primary::protect(
                            *vm,
                            &cur_ft,
                            acfg,
                            shutdown,
                            disks,
                            status,
                            q.as_ref(),
                            false,
                        )
                    }
                }
            }
            Next::Standby {
                cfg,
                ft: as_standby,
            } => {
                swapped_out = true;
                let acfg = link::alink_config_as(&as_standby, Role::Standby);
                cur_ft = *as_standby;
                standby::run(&cfg, &cur_ft, acfg, shutdown, status, q.as_ref())
            }
        };
    }
}

/// Where an online level change leaves the VM.
enum Changed {
    /// FT's session loop goes on: at FT or unprotected (the new level, or the old one
    /// when the change was refused; a change from HA is never refused).
    Ft,
    /// HA's runtime takes the VM with these hooks installed.
    Ha(Arc<SyncDisks>, Arc<HaHooks>),
}

/// An online level change between two of the primary's sessions ([`level`]): the
/// settings and the quorum the next sessions run with. A change that cannot be made
/// (a bad quorum config) is answered with why and changes nothing.
fn change_level(
    vm: &Vmm,
    disks: &Arc<PrimaryDisks>,
    ft: &mut FtSettings,
    q: &mut Option<quorum::Quorum>,
    status: &PairStatus,
    side: &Arc<MigrateSide>,
    request: level::LevelRequest,
) -> Changed {
    let from = status.protection();
    // Every refusal below is of a change from unprotected or FT (the VM stays there):
    // from HA (its hooks FT's already) nothing can fail, as its quorum client runs on.
    let mut changed = Changed::Ft;
    match request.change.clone() {
        twinrun_control::LevelChange::Ft(flags) | twinrun_control::LevelChange::Ha(flags) => {
            let to_ha = matches!(request.change, twinrun_control::LevelChange::Ha(_));
            let mut next = ft.clone();
            next.unprotected = false;
            if ft.unprotected {
                // From unprotected: the quorum client starts with the daemon's
                // settings. (From FT or HA it runs on: the same lease, the same
                // generation.)
                next.quorum = match flags.as_ref().map(level::quorum_settings).transpose() {
                    Ok(qs) => qs,
                    Err(why) => {
                        error!("level change to {} refused: {why}", request.change.name());
                        request.answer(Err(why));
                        return Changed::Ft;
                    }
                };
                let warning = if to_ha {
                    crate::ha::NO_WITNESS_WARNING
                } else {
                    "FT mode WITHOUT QUORUM (no quorum settings in the level change): if ALL \
                     A-Links are cut while both PMs are alive, the standby takes over and TWO \
                     copies of the VM run"
                };
                match quorum::start_for(&next, status, warning) {
                    Ok(started) => {
                        if let Some(qq) = &started {
                            wait_for_the_lease(qq);
                        }
                        *q = started
                    }
                    Err(code) => {
                        let why = format!(
                            "the quorum client could not start (code {code}; see the VMM's log)"
                        );
                        request.answer(Err(why));
                        return Changed::Ft;
                    }
                }
            }
            if to_ha {
                match install_ha_hooks(vm, disks) {
                    Ok((sync, hooks)) => {
                        status.set_ha(side.clone());
                        changed = Changed::Ha(sync, hooks);
                    }
                    Err(why) => {
                        if ft.unprotected {
                            // The quorum client started above stops again: the VM
                            // stays unprotected.
                            q.take();
                            status.clear_quorum();
                        }
                        error!("level change to HA refused: {why}");
                        request.answer(Err(why));
                        return Changed::Ft;
                    }
                }
            } else {
                status.set_ft();
            }
            *ft = next;
        }
        twinrun_control::LevelChange::Unprotected => {
            if let Some(old) = q.take() {
                // The lease is left to lapse: safe, as no standby can be granted the VM
                // (the change was taken only while the witness recorded it outdated, and
                // its daemon runs none for an unprotected VM). `Release` (the swap's
                // handover) is for a pair in sync and would be refused here.
                info!(
                    "level change: the quorum client stops; this node's lease lapses at the \
                     witness (generation {} stays recorded)",
                    old.generation().load(std::sync::atomic::Ordering::SeqCst)
                );
                drop(old);
                status.clear_quorum();
                status.swap_side().clear_handover();
            }
            ft.unprotected = true;
            ft.quorum = None;
            status.set_unprotected();
            primary::run_alone_again(vm);
        }
    }
    level::log_change(from, request.change.name());
    request.answer(Ok(()));
    changed
}

/// Installs HA's disk hooks on the running VM (an online change to HA): the guest is
/// paused for the swap of hooks, so no write batch is between FT's hooks' calls (FT's
/// hooks never wait as a host wait: a pause waits for the vCPU to leave its batch);
/// the disks' bitmaps carry over (every write recorded since the last standby was in
/// sync: HA's standby gets a delta), and FT's dirty logging and disk journal are off
/// (HA needs neither; a live migration's session turns them on again).
fn install_ha_hooks(
    vm: &Vmm,
    disks: &Arc<PrimaryDisks>,
) -> Result<(Arc<SyncDisks>, Arc<HaHooks>), String> {
    let sync = SyncDisks::new(disks.clone());
    let hooks = HaHooks::new(sync.clone());
    let t0 = std::time::Instant::now();
    vm.pause()
        .map_err(|e| format!("cannot pause the VM to install HA's disk hooks: {e}"))?;
    vm.set_disk_hooks(Some(hooks.clone()));
    vm.disable_disk_journal();
    if let Err(e) = vm.resume() {
        error!("level change: cannot resume the VM: {e}");
    }
    if let Err(e) = vm.stop_dirty_tracking() {
        warn!("level change: cannot turn dirty logging off: {e}");
    }
    info!(
        "level change: HA's synchronous disk hooks installed (guest paused {:?}); a write \
         completes once both replicas have it from the first standby in sync on",
        t0.elapsed()
    );
    Ok((sync, hooks))
}

/// How long an online change to FT lets the guest run on before the quorum's gate
/// takes over (well inside the control socket's wait for the answer).
const LEASE_WAIT: std::time::Duration = std::time::Duration::from_secs(3);

/// Lets the guest run on, as it did unprotected, until the new quorum client holds
/// the witness's lease (or [`LEASE_WAIT`] passed): a primary alone without a lease is
/// paused by the gate, and its first lease takes a detection period or more. Safe:
/// no standby exists yet (its daemon starts one only after this change is answered),
/// so this is the only copy of the VM.
fn wait_for_the_lease(q: &quorum::Quorum) {
    let t0 = std::time::Instant::now();
    // The machine's first step says Pause (no peer, no lease yet): wait for the gate
    // that a lease opens, not merely for "no pause".
    let free = || !q.pause() && matches!(q.gate(), quorum::Gate::Free { .. });
    while !free() && t0.elapsed() < LEASE_WAIT {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    if !free() {
        warn!(
            "level change: no lease within {LEASE_WAIT:?}; the guest pauses until the \
             standby or a lease"
        );
    } else {
        info!(
            "level change: the quorum lets the guest run (after {:?})",
            t0.elapsed()
        );
    }
}

/// How one role's run ends: the process exits with a code, or this end goes on in the
/// other role ([`run_pair_with`] switches).
pub enum Next {
    Exit(i32),
    /// The standby took the VM over (a failover, or a planned swap it accepted): it is
    /// the primary now, `disks` its mirrored disks.
    Primary {
        vm: Box<Vmm>,
        disks: Arc<PrimaryDisks>,
    },
    /// The primary handed the VM over in a planned swap (`primary::hand_over`): this end
    /// runs on as the standby with these settings.
    Standby {
        cfg: Box<VmConfig>,
        ft: Box<FtSettings>,
    },
    /// The primary took an online level change between two sessions: it goes on with
    /// the same VM and disks at the new level ([`change_level`]; from HA, its hooks
    /// are FT's already).
    Level {
        vm: Box<Vmm>,
        disks: Arc<PrimaryDisks>,
        request: level::LevelRequest,
    },
}

impl From<i32> for Next {
    fn from(code: i32) -> Next {
        Next::Exit(code)
    }
}
