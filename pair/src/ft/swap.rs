//! The planned role swap in the pair's runtime: the primary's control socket takes
//! the operator's request ([`SwapSide::request`], through `Op::Swap`), the running
//! checkpoint session carries it out (the protocol is `checkpoint`'s: pause, final
//! epoch, its ack and release, `Swap`, the standby's acceptance), and then this
//! process, whose guest stays paused at the swap point, stops its VM and becomes the
//! standby of the same pair (`primary::hand_over`, then the role switch in
//! [`super::run_pair_with`]): it listens on its A-Links for the
//! new primary, which dials it (as after a failover) and protects the VM again.
//!
//! The standby's side needs nothing of its own here: it takes the VM over as at a
//! failover (from the swap point, with nothing to release again), then protects it
//! as a failover survivor does.

use std::sync::Arc;
use std::time::Duration;

use checkpoint::primary::SwapPort;

use vmm::config::VmConfig;

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

    /// The VM's configuration (the swapped-out end runs on as its standby).
    pub fn cfg(&self) -> &VmConfig {
        &self.cfg
    }

    /// The port for a primary session's driver config (None: swaps refused with a
    /// reason, see [`SwapSide::request`]).
    pub fn port_for(&self, quorum_configured: bool) -> Option<Arc<SwapPort>> {
        (!quorum_configured).then(|| self.port.clone())
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
