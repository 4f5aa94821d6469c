//! One end of an HA pair (`twinrun vm run --protection ha --role primary|standby`):
//! the VM's disks mirrored synchronously to the standby (a write or flush completes
//! for the guest once both replicas have it: `storage_mirror::sync`), no memory
//! checkpoints, no epoch pauses. When the primary is lost (every A-Link silent) the
//! standby boots the guest again from its replica and runs on as an HA primary that
//! waits for the peer to return as its standby (delta resync by the disk session).
//!
//! | module | what it owns |
//! | --- | --- |
//! | [`hooks`] | the VMM's disk hooks answered by `storage_mirror::sync::SyncDisks` (FT's for a live migration's session) |
//! | [`migrate`] | live migration: one checkpoint session (pre-copy, planned swap) from the primary to its in-sync standby, then HA again the other way round |
//! | [`primary`] | build and start the VM, then one session per standby: the disk session (resync), the closing commit, acknowledgements, the standby's loss or its failure to acknowledge (ack timeout), the stop |
//! | [`status`] | the control socket's status: FT's, with `protection: "ha"` |
//! | [`standby`] | the replica: the disk session's answers, write batches applied through the apply journal and acknowledged; the takeover |
//!
//! Status: the control socket serves the same `FtStatus` as FT (role, state
//! protected/syncing/waiting, failover), so the daemon reads both alike; a protected
//! HA primary counts the write batches its standby acknowledged as `epochs_committed`.

pub mod hooks;
pub mod migrate;
pub mod primary;
pub mod standby;
pub mod status;

use std::sync::Arc;

use log::error;
use vmm::config::VmConfig;

use crate::ft::link;
use crate::ft::quorum::Quorum;
use crate::ft::shutdown::Shutdown;
use crate::ft::status::ControlThread;
use crate::ft::status::PairStatus;
use crate::settings::{FtSettings, Role};
use crate::{exit, signals};
use hooks::HaHooks;
use migrate::MigrateSide;
use storage_mirror::sync::SyncDisks;
use vmm::Vmm;

/// Logged by an HA end started without a quorum (no `--quorum-config`/`--witness`).
pub const NO_WITNESS_WARNING: &str = "HA mode WITHOUT QUORUM (no --quorum-config or \
--witness): if ALL A-Links are cut while both PMs are alive, the standby boots the VM too \
and TWO copies of it run";

/// `run_pair` for HA: signals, control socket, then the role; returns the exit code.
pub fn run_pair(cfg: &VmConfig, ft: &FtSettings, name: Option<&str>) -> i32 {
    if let Err(e) = signals::block() {
        error!("cannot block SIGTERM/SIGINT: {e}");
        return exit::START_FAILED;
    }
    let shutdown = Shutdown::install();
    let server = match name.map(|n| crate::alone::control_server(Some(n), cfg)) {
        Some(Ok(s)) => s,
        Some(Err(code)) => return code,
        None => None,
    };
    let status = PairStatus::new(ft.role, cfg);
    let side = Arc::new(MigrateSide::default());
    status.set_ha(side.clone());
    let _control = server.map(|s| ControlThread::start(s, status.clone()));
    run_pair_with_migration(cfg, ft, &shutdown, &status, &side)
}

/// [`run_pair`] in-process: `shutdown` stops this end, `status` shows how it goes.
pub fn run_pair_with(
    cfg: &VmConfig,
    ft: &FtSettings,
    shutdown: &Shutdown,
    status: &Arc<PairStatus>,
) -> i32 {
    run_pair_with_migration(cfg, ft, shutdown, status, &Arc::default())
}

/// [`run_pair_with`] where `side` carries the live migrations asked of this end.
pub fn run_pair_with_migration(
    cfg: &VmConfig,
    ft: &FtSettings,
    shutdown: &Shutdown,
    status: &Arc<PairStatus>,
    side: &Arc<MigrateSide>,
) -> i32 {
    status.set_ha(side.clone());
    // The same quorum as FT: the standby boots the VM only with the grant; the
    // primary pauses before its lease could lapse and stops when it lost the VM.
    let q = match crate::ft::quorum::start_for(ft, status, NO_WITNESS_WARNING) {
        Ok(q) => q,
        Err(code) => return code,
    };
    let sd = shutdown;
    let run = match ft.role {
        Role::Primary => primary::run,
        Role::Standby => standby::run,
    };
    let first = run(
        cfg,
        ft,
        link::alink_config(ft),
        sd,
        status,
        q.as_ref(),
        side,
    );
    match drive(cfg, ft, sd, status, q.as_ref(), side, first) {
        HaEnd::Exit(code) => code,
        // An online level change to FT or unprotected: FT's runtime goes on with the
        // same VM, disks and quorum client.
        HaEnd::Level {
            ft,
            vm,
            sync,
            request,
        } => crate::ft::run_from_ha(
            cfg,
            &ft,
            sd,
            status,
            q,
            side,
            vm,
            sync.disks.clone(),
            *request,
        ),
    }
}

/// How [`drive`] ended.
pub(crate) enum HaEnd {
    Exit(i32),
    /// The primary took an online level change to FT or unprotected between two
    /// sessions (no standby connected): the VM's hooks are FT's already, `ft` the
    /// settings it ran with.
    Level {
        ft: Box<FtSettings>,
        vm: Box<Vmm>,
        sync: Arc<SyncDisks>,
        request: Box<crate::ft::level::LevelRequest>,
    },
}

/// The HA runtime from `next` on (a role's first run, or an online change to HA):
/// the role switches, in one place: a takeover survivor, or the target of a live
/// migration, protects the VM as the primary; a migration's source runs on as the
/// standby of the same pair.
pub(crate) fn drive(
    cfg: &VmConfig,
    ft: &FtSettings,
    sd: &Shutdown,
    status: &Arc<PairStatus>,
    q: Option<&Quorum>,
    side: &Arc<MigrateSide>,
    mut next: Next,
) -> HaEnd {
    let mut cur = ft.clone();
    loop {
        next = match next {
            Next::Exit(code) => return HaEnd::Exit(code),
            Next::Primary(vm, sync, hooks) => {
                let acfg = link::alink_config_as(&cur, Role::Primary);
                primary::protect(*vm, &cur, acfg, sd, sync, hooks, status, q, side)
            }
            Next::Standby => {
                cur.role = Role::Standby;
                // Never discard: these disks are the replica's data.
                cur.discard_disk_data = false;
                let acfg = link::alink_config_as(&cur, Role::Standby);
                standby::run(cfg, &cur, acfg, sd, status, q, side)
            }
            Next::Level { vm, sync, request } => {
                cur.role = Role::Primary;
                return HaEnd::Level {
                    ft: Box::new(cur),
                    vm,
                    sync,
                    request,
                };
            }
        };
    }
}

/// How one role's run ends: the process exits, or this end goes on in the other role.
pub enum Next {
    Exit(i32),
    /// This end runs the VM (a takeover, or a live migration's target): it protects
    /// it as the HA primary.
    Primary(Box<Vmm>, Arc<SyncDisks>, Arc<HaHooks>),
    /// This end handed the VM over (a live migration's source): it runs on as the
    /// HA standby.
    Standby,
    /// The primary took an online level change to FT or unprotected between two
    /// sessions; its hooks are FT's already ([`HaHooks::switch`]).
    Level {
        vm: Box<Vmm>,
        sync: Arc<SyncDisks>,
        request: Box<crate::ft::level::LevelRequest>,
    },
}
