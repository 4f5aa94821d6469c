//! The planned role swap in the pair's runtime: the primary's control socket takes
//! the operator's request ([`SwapSide::request`], through `Op::Swap`), the running
//! checkpoint session carries it out (the protocol is `checkpoint`'s: pause, final
//! epoch, its ack and release, `Swap`, the standby's acceptance), and then this
//! process, whose guest stays paused at the swap point, stops its VM and becomes the
//! standby of the same pair ([`become_standby`]): it listens on its A-Links for the
//! new primary, which dials it (as after a failover) and protects the VM again.
//!
//! The standby's side needs nothing of its own here: it takes the VM over as at a
//! failover (from the swap point, with nothing to release again), then protects it
//! as a failover survivor does.

use std::sync::Arc;
use std::time::Duration;

use checkpoint::primary::{SwapDone, SwapPort};
use log::{error, info};
use storage_mirror::primary::PrimaryDisks;
use vmm::config::VmConfig;
use vmm::Vmm;

use super::quorum::Quorum;
use super::shutdown::Shutdown;
use super::status::PairStatus;
use crate::settings::{FtSettings, Role};

/// How long a swap request waits for the session's answer.
const SWAP_WAIT: Duration = twinrun_control::SWAP_TIMEOUT;

/// What one end keeps for swaps: the port its primary sessions listen on and the VM
/// config it needs to become the standby.
pub struct SwapSide {
    port: Arc<SwapPort>,
    cfg: VmConfig,
}

impl SwapSide {
    pub fn new(cfg: &VmConfig) -> SwapSide {
        SwapSide {
            port: Arc::new(SwapPort::default()),
            cfg: cfg.clone(),
        }
    }

    /// The port for a primary session's driver config (None: swaps refused with a
    /// reason, see [`SwapSide::request`]).
    pub fn port_for(&self, quorum: Option<&Quorum>) -> Option<Arc<SwapPort>> {
        quorum.is_none().then(|| self.port.clone())
    }

    /// An operator's request: waits until the standby took the VM over.
    pub fn request(&self, quorum_configured: bool) -> Result<(u64, u64), String> {
        if quorum_configured {
            return Err(
                "role swap refused: this pair runs with a quorum witness, and the lease \
                 handover a swap needs is not built yet"
                    .into(),
            );
        }
        let done = self.port.request(SWAP_WAIT)?;
        Ok((done.epoch, done.paused_for.as_micros() as u64))
    }
}

/// After a swap: this end's guest stays paused at the swap point (the standby runs
/// it now). Stops it, closes the disks cleanly (they hold exactly the swap point, as
/// the new primary's do) and runs this end as the standby of the same pair.
pub fn become_standby(
    mut vm: Vmm,
    ft: &FtSettings,
    sd: &Shutdown,
    disks: Arc<PrimaryDisks>,
    status: &PairStatus,
    quorum: Option<&Quorum>,
    done: SwapDone,
) -> i32 {
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
    let acfg = super::link::alink_config_as(ft, Role::Standby);
    let cfg = status.swap_side().cfg.clone();
    let code = super::standby::run(&cfg, &as_standby, acfg, sd, status, quorum);
    if code != crate::exit::OK {
        error!("FT: the swapped-out end's standby run ended with code {code}");
    }
    code
}
