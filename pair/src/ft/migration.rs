//! The receiving end of a live migration (`--migration-target`): an FT standby that
//! never takes the VM over when the primary is lost.
//!
//! A migration is a pre-copy (the FT session's initial sync: memory rounds while the
//! guest runs, then a final pause with vCPU and device state and the disks resynced),
//! then the planned role swap at an epoch boundary, then the old end is stopped. Until
//! the swap the VM belongs to the source: a target that loses the source (the source
//! was killed, or every A-Link cut) must not start a second copy, and a source that
//! loses its target runs on as before. So the target's takeover gate refuses every
//! takeover; a primary that comes back gets a new session (the standby driver's
//! `PrimaryBack`), and the daemon stops a target whose migration it gave up.

use std::sync::Arc;

use checkpoint::standby::{TakeoverGate, TakeoverGateRef};

/// Refuses every takeover; the committed epochs and the generation go to the quorum's
/// gate when the pair has one (a fenced old primary is still refused its session).
pub struct NoTakeover {
    inner: Option<TakeoverGateRef>,
}

impl NoTakeover {
    pub fn gate(inner: Option<TakeoverGateRef>) -> TakeoverGateRef {
        TakeoverGateRef(Arc::new(NoTakeover { inner }))
    }
}

impl TakeoverGate for NoTakeover {
    fn committed(&self, epoch: u64) {
        if let Some(g) = &self.inner {
            g.0.committed(epoch);
        }
    }

    fn may_take_over(&self) -> bool {
        false
    }

    fn generation(&self) -> u64 {
        self.inner.as_ref().map_or(0, |g| g.0.generation())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_takes_over() {
        let g = NoTakeover::gate(None);
        g.0.committed(3);
        assert!(!g.0.may_take_over());
        assert_eq!(g.0.generation(), 0);
    }
}
