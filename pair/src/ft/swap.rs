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
use twinrun_lock::lock;

use super::quorum::LeaseHandover;

use vmm::config::VmConfig;

/// How long a swap request waits for the session's answer.
const SWAP_WAIT: Duration = twinrun_control::SWAP_TIMEOUT;

/// What one end keeps for swaps: the port its primary sessions listen on and the VM
/// config it needs to become the standby.
pub struct SwapSide {
    port: Arc<SwapPort>,
    cfg: VmConfig,
    /// The quorum's lease handover, when the pair runs with one (lease path, issue 15).
    handover: std::sync::Mutex<Option<LeaseHandover>>,
}

impl SwapSide {
    pub fn new(cfg: &VmConfig) -> SwapSide {
        SwapSide {
            port: Arc::new(SwapPort::default()),
            cfg: cfg.clone(),
            handover: std::sync::Mutex::new(None),
        }
    }

    /// The VM's configuration (the swapped-out end runs on as its standby).
    pub fn cfg(&self) -> &VmConfig {
        &self.cfg
    }

    /// The port for a primary session's driver config (with a quorum too: the lease
    /// handover of [`SwapSide::request`] comes first).
    pub fn port_for(&self, _quorum_configured: bool) -> Option<Arc<SwapPort>> {
        Some(self.port.clone())
    }

    /// The pair runs with a quorum: swaps hand its lease over (lease path, issue 15).
    pub fn set_handover(&self, h: LeaseHandover) {
        *lock(&self.handover) = Some(h);
    }

    /// The quorum stopped (an online change to unprotected): no handover any more.
    pub fn clear_handover(&self) {
        *lock(&self.handover) = None;
    }

    /// An operator's request: waits until the standby took the VM over. With a quorum,
    /// the lease is given up at the witness first (refused, nothing paused, if the
    /// witness does not confirm), and the standby takes the next generation before it
    /// accepts (refused, the guest resumed here, without it); the handover is ended
    /// with the outcome either way.
    pub fn request(&self, quorum_configured: bool) -> Result<(u64, u64), String> {
        let handover = lock(&self.handover).clone();
        if quorum_configured && handover.is_none() {
            return Err("role swap refused: the quorum is not running yet".into());
        }
        if let Some(h) = &handover {
            h.release(super::quorum::HANDOVER_WAIT)
                .map_err(|why| format!("role swap refused: {why}; the VM runs on here"))?;
        }
        let r = self.port.request(SWAP_WAIT);
        if let Some(h) = &handover {
            h.end(r.is_ok());
        }
        let done = r?;
        Ok((done.epoch, done.paused_for.as_micros() as u64))
    }
}
