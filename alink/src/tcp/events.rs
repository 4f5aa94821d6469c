//! What the A-Link tells the layer above (everything is also logged).

use crate::linkset::LinkEvent;
use log::{info, warn};
use std::net::SocketAddr;
use std::sync::atomic::Ordering;

use super::shared::{lock, Shared};

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
}

impl Shared {
    pub(super) fn emit(&self, ev: Event) {
        match &ev {
            Event::Link(LinkEvent::PeerUnreachable) => {
                warn!(
                    "alink: peer node {} unreachable: all links down",
                    self.cfg.peer_node_id
                )
            }
            Event::Link(e) => info!("alink: {e:?}"),
            Event::Refused { link, peer, reason } => {
                warn!("alink link {link}: refused connection from {peer:?}: {reason}")
            }
        }
        let mut q = lock(&self.events);
        if q.len() == MAX_QUEUED_EVENTS {
            q.pop_front();
        }
        q.push_back(ev);
        self.event_cv.notify_all();
    }

    pub(super) fn refuse(&self, link: usize, peer: Option<SocketAddr>, reason: String) {
        self.links[link].refused.fetch_add(1, Ordering::Relaxed);
        self.emit(Event::Refused { link, peer, reason });
    }
}
