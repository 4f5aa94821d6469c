//! What the A-Link tells the layer above (everything is also logged).

use crate::linkset::LinkEvent;
use std::net::SocketAddr;

/// Events kept for [`Alink::poll_event`]; older ones are dropped (they are also logged).
pub const MAX_QUEUED_EVENTS: usize = 1024;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Link(LinkEvent),
    /// A connection to or from the A-Link port failed authentication or sent bad frames.
    Refused {
        link: usize,
        peer: Option<SocketAddr>,
        reason: String,
    },
    /// A link reached a new instance of the peer's A-Link (incarnation `new`) while this
    /// session served `old`: the session ended at once (see [`crate::incarnation`]).
    /// The peer is alive (it authenticated); this A-Link is done: start a new one.
    PeerRestarted {
        old: u64,
        new: u64,
    },
}
