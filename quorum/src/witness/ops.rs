//! What a node asks a witness and what it answers: the operations, above the wire's
//! authentication (`wire`) and shared by the server, the client, the node's state
//! machine and the simulation.

use serde::{Deserialize, Serialize};

use crate::types::{Generation, NodeId};

/// One request about one VM of the sender's cluster (the cluster comes from the
/// authenticated session, never from the request).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// The holder of `generation` extends its lease by `lease_ms` from the moment this
    /// arrives, and states whether its peer's replica is current (`peer_outdated` false:
    /// the peer may take over once the lease lapses) or stale (true: the holder released
    /// output the peer does not have; the peer must never take over). Granted only to
    /// the holder of the current generation; a higher generation than the witness knows
    /// is adopted (the pair used the other witness meanwhile).
    Renew {
        vm: String,
        node: NodeId,
        generation: Generation,
        lease_ms: u32,
        peer_outdated: bool,
    },
    /// Compare-and-set: generation `from + 1` for `node`, if `from` is the current
    /// generation, its holder's lease has lapsed and `node`'s replica is not stale.
    Acquire {
        vm: String,
        node: NodeId,
        from: Generation,
        lease_ms: u32,
    },
    /// No change: the VM's state (and proof the witness is reachable).
    Query { vm: String },
    // New variants go last: postcard encodes the variant index.
    /// The holder of `generation` gives its lease up now (a planned role swap: its
    /// guest is about to pause and it will release nothing without acknowledgement
    /// again), so that its peer's compare-and-set of the next generation is granted
    /// at once instead of after the lease's lapse. The generation, its holder and the
    /// peer-outdated mark stay as they are; the holder may renew again (a swap that
    /// did not happen).
    Release {
        vm: String,
        node: NodeId,
        generation: Generation,
    },
}

impl Request {
    pub fn vm(&self) -> &str {
        match self {
            Request::Renew { vm, .. }
            | Request::Acquire { vm, .. }
            | Request::Query { vm }
            | Request::Release { vm, .. } => vm,
        }
    }
}

/// The witness's answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Reply {
    /// The sender holds `generation` with a lease of `lease_ms` from when the request
    /// arrived (an acquire: the new generation).
    Granted {
        generation: Generation,
        lease_ms: u32,
    },
    /// A newer generation exists: the sender lost.
    Lost {
        generation: Generation,
        holder: Option<NodeId>,
    },
    /// The holder's lease is still running: ask again after `retry_after_ms`.
    Busy {
        generation: Generation,
        holder: Option<NodeId>,
        retry_after_ms: u32,
    },
    /// The sender's replica is stale (the holder ran without it): it may not take over.
    Outdated { generation: Generation },
    /// Answer to a query.
    State {
        generation: Generation,
        holder: Option<NodeId>,
        peer_outdated: bool,
        lease_left_ms: u32,
    },
    /// The request cannot be served (limits, bad values, storage).
    Refused(OpError),
    // New variants go last.
    /// Answer to a release: no lease of the sender's runs here for `generation` any
    /// more (or none ran: this service never knew it).
    Released { generation: Generation },
}

/// Why a witness refused a well-formed request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum OpError {
    #[error("bad VM name: {0}")]
    BadName(String),
    #[error("lease of {0} ms is outside the witness's limits")]
    BadLease(u32),
    #[error("generation 0 cannot be held")]
    ZeroGeneration,
    #[error("generation {0} cannot grow any more")]
    GenerationOverflow(Generation),
    #[error("too many VMs for this witness (limit {0})")]
    TooManyVms(u32),
    #[error("the witness could not store the change durably")]
    StorageFailed,
    // New variants go last.
    #[error("not supported by this backend: {0}")]
    Unsupported(String),
}
