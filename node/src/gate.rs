//! The quorum seam: every decision to act alone goes through a [`QuorumGate`].
//!
//! The step function never decides alone. When a node would run the active copy of a
//! VM while its peer is not online (start or placement after the boot grace) or take
//! over a VM whose owner node is lost, it returns `Action::AskQuorum`; the daemon asks
//! the gate off the step function's thread and feeds the answer back as
//! `Input::Quorum`. Phase 2 puts the `quorum` crate's witness client behind this trait;
//! the only gate in this build is [`NoWitness`], everRun's documented behaviour with no
//! quorum server (a node that loses its peer carries on, and a full partition runs two
//! copies), logged as such at every grant.

use std::time::Duration;

use crate::cluster::QuorumKind;

/// One question to the quorum.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QuorumRequest {
    pub cluster: String,
    pub node: String,
    pub peer: String,
    pub vm: String,
    pub kind: QuorumKind,
    /// How long ago the peer was last heard from (None: never, since this start).
    pub peer_silent_for: Option<Duration>,
}

/// The answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QuorumVerdict {
    pub granted: bool,
    /// Shown in the VM's reason and the event log.
    pub reason: String,
    /// A fencing token (the witness's generation for this VM) that the new owner
    /// hands to its VMM so a stale owner's writes can be refused; None without one.
    pub token: Option<u64>,
}

/// What decides whether this node may act alone. Implementations may block (a network
/// round trip to a witness): the daemon calls them from a blocking task with a bound.
pub trait QuorumGate: Send + Sync + 'static {
    fn decide(&self, req: &QuorumRequest) -> QuorumVerdict;
    /// For `node show`: which gate, and its state.
    fn describe(&self) -> String;
}

/// No witness (config `quorum.mode = "none"`): every request is granted, and the
/// reason says what that risks.
pub struct NoWitness;

impl QuorumGate for NoWitness {
    fn decide(&self, req: &QuorumRequest) -> QuorumVerdict {
        let what = match req.kind {
            QuorumKind::Alone => "run alone",
            QuorumKind::Takeover => "take over",
        };
        QuorumVerdict {
            granted: true,
            reason: format!(
                "no witness configured: {} may {what} (if {} is alive behind a cut network, two copies run)",
                req.node, req.peer
            ),
            token: None,
        }
    }

    fn describe(&self) -> String {
        "none (no witness: a full partition can run a VM twice)".into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_witness_grants_and_says_the_risk() {
        let v = NoWitness.decide(&QuorumRequest {
            cluster: "c".into(),
            node: "pm2".into(),
            peer: "pm1".into(),
            vm: "db".into(),
            kind: QuorumKind::Takeover,
            peer_silent_for: Some(Duration::from_secs(3)),
        });
        assert!(v.granted);
        assert!(v.reason.contains("two copies"), "{}", v.reason);
    }
}
