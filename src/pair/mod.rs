//! FT mode of `twinrun vm run`: one end of a protected pair (`--role primary|standby`).
//!
//! `shutdown` takes SIGTERM/SIGINT on a dedicated thread (as `vm run` does) and stops
//! whatever runs at that moment: the checkpoint driver, then the VM; `primary` and
//! `standby` run each role to its end and map it to `vm run`'s exit codes; `status`
//! is what either end serves on its control socket (with `--name`).

mod primary;
mod shutdown;
mod standby;
mod status;

use std::time::Duration;

use alink::{AlinkConfig, HealthConfig, LinkAddrs};
use log::{error, warn};
use twinrun::cli::ft::{FtSettings, Role};
use twinrun::{exit, signals};
use vmm::config::VmConfig;

/// Node ids on the A-Link: the primary dials, the standby accepts.
const PRIMARY_NODE: u64 = 1;
const STANDBY_NODE: u64 = 2;

/// Runs this process's end of the pair; returns the exit code.
pub fn run_pair(cfg: &VmConfig, ft: &FtSettings, name: Option<&str>) -> i32 {
    // Before any thread exists, so every later thread inherits the mask.
    if let Err(e) = signals::block() {
        error!("cannot block SIGTERM/SIGINT: {e}");
        return exit::START_FAILED;
    }
    let shutdown = shutdown::Shutdown::install();
    warn!(
        "FT mode without quorum: if ALL A-Links are cut while both PMs are alive, the \
         standby takes over and TWO copies of the VM run (the quorum witness is not \
         built yet)"
    );
    let acfg = alink_config(ft);
    // With --name, either end serves a control socket: status (role, protection,
    // failover, links, disks) and, where a VM runs, disk fault injection and the
    // mirrored disks' state (no pause or snapshot: they would fight the checkpoints).
    let server = match name.map(|n| crate::run::control_server(Some(n), cfg)) {
        Some(Ok(s)) => s,
        Some(Err(code)) => return code,
        None => None,
    };
    let status = status::PairStatus::new(ft.role, cfg);
    let _control = server.map(|s| status::ControlThread::start(s, status.clone()));
    match ft.role {
        Role::Primary => primary::run(cfg, ft, acfg, &shutdown, &status),
        Role::Standby => standby::run(cfg, ft, acfg, &shutdown, &status),
    }
}

/// The A-Link configuration of this end; both ends derive the same window, heartbeat
/// and cluster id from the same flags.
fn alink_config(ft: &FtSettings) -> AlinkConfig {
    alink_config_as(ft, ft.role)
}

/// [`alink_config`] for this end acting as `role` (a failover survivor becomes the
/// primary: it dials, the restarted old primary listens as the standby).
fn alink_config_as(ft: &FtSettings, role: Role) -> AlinkConfig {
    let (me, peer) = match role {
        Role::Primary => (PRIMARY_NODE, STANDBY_NODE),
        Role::Standby => (STANDBY_NODE, PRIMARY_NODE),
    };
    let links = ft
        .alinks
        .iter()
        .map(|l| LinkAddrs {
            local: l.local,
            remote: l.peer,
        })
        .collect();
    let mut c = AlinkConfig::new(ft.cluster_id_u64(), me, peer, &ft.secret, links);
    c.health = HealthConfig {
        interval: Duration::from_millis(ft.heartbeat_ms),
        misses: ft.heartbeat_misses,
    };
    // Reconnect quickly: a link that comes back should be in use again within a
    // heartbeat or two.
    c.reconnect_max = Duration::from_millis(250);
    c
}
