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

use crate::settings::{FtSettings, Role};
use crate::{exit, signals};
use shutdown::Shutdown;
use status::PairStatus;

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
    // Owned here: an online level change starts or stops it (`Next::Level`).
    let mut q = q;
    let mut next = match ft.role {
        Role::Primary => primary::run(cfg, ft, acfg, shutdown, status, q.as_ref()),
        Role::Standby => standby::run(cfg, ft, acfg, shutdown, status, q.as_ref()),
    };
    // The role switches, in one place: a failover survivor (or the standby that
    // accepted a planned swap) protects the VM as the primary; a swapped-out primary
    // runs on as the standby of the same pair.
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
                change_level(&vm, &mut cur_ft, &mut q, status, request);
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

/// An online level change between two of the primary's sessions ([`level`]): the
/// settings and the quorum the next sessions run with. A change that cannot be made
/// (a bad quorum config) is answered with why and changes nothing.
fn change_level(
    vm: &Vmm,
    ft: &mut FtSettings,
    q: &mut Option<quorum::Quorum>,
    status: &PairStatus,
    request: level::LevelRequest,
) {
    let from = if ft.unprotected { "unprotected" } else { "ft" };
    match request.change.clone() {
        twinrun_control::LevelChange::Ft(flags) => {
            let mut next = ft.clone();
            next.unprotected = false;
            next.quorum = match flags.as_ref().map(level::quorum_settings).transpose() {
                Ok(qs) => qs,
                Err(why) => {
                    error!("level change to FT refused: {why}");
                    request.answer(Err(why));
                    return;
                }
            };
            match quorum::start_for(
                &next,
                status,
                "FT mode WITHOUT QUORUM (no quorum settings in the level change): if ALL \
                 A-Links are cut while both PMs are alive, the standby takes over and TWO \
                 copies of the VM run",
            ) {
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
                    return;
                }
            }
            *ft = next;
            status.set_ft();
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
    /// the same VM and disks at the new level ([`change_level`]).
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
