//! State shared by the A-Link's threads and its handle.

use crate::buf::BufPool;
use crate::frame::{PlaceRequest, Placement};
use crate::handshake::{HandshakeConfig, ReplayCache};
use crate::health::LinkHealth;
use crate::incarnation::Incarnations;
use crate::linkset::TxWindow;
use crate::reorder::RxReorder;
use crate::side::{SideRx, SideTx};
use std::collections::VecDeque;
use std::io;
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};
pub(super) use twinrun_lock::lock;

use super::config::AlinkConfig;
use super::events::{Event, MAX_QUEUED_EVENTS};
use crate::linkset::LinkEvent;
use log::{info, warn};

pub(super) struct Conn {
    pub(super) stream: TcpStream,
    pub(super) peer: SocketAddr,
    pub(super) dead: AtomicBool,
    pub(super) hb_due: AtomicBool,
}

impl Conn {
    pub(super) fn kill(&self) {
        if !self.dead.swap(true, Ordering::SeqCst) {
            let _ = self.stream.shutdown(Shutdown::Both);
        }
    }
}

#[derive(Default)]
pub(super) struct LinkShared {
    pub(super) conn: Mutex<Option<Arc<Conn>>>,
    pub(super) connections: AtomicU64,
    pub(super) refused: AtomicU64,
}

pub(super) struct Shared {
    pub(super) cfg: AlinkConfig,
    pub(super) origin: Instant,
    pub(super) stop: AtomicBool,
    pub(super) tx: Mutex<TxWindow>,
    /// Writers wait here for work.
    pub(super) tx_work: Condvar,
    /// Senders wait here for window room.
    pub(super) tx_room: Condvar,
    pub(super) rx: Mutex<RxReorder>,
    pub(super) rx_ready: Condvar,
    /// Ack value last put on the wire, and whether a new one should go out now.
    pub(super) ack_sent: AtomicU64,
    pub(super) ack_due: AtomicBool,
    pub(super) bytes_since_ack: AtomicU64,
    pub(super) events: Mutex<VecDeque<Event>>,
    pub(super) event_cv: Condvar,
    pub(super) links: Vec<LinkShared>,
    pub(super) health: Vec<Mutex<LinkHealth>>,
    pub(super) replay: Mutex<ReplayCache>,
    pub(super) handshakes_inflight: AtomicUsize,
    /// Receive buffers of every link (frame bodies, handed to the consumer as
    /// [`InMsg::body`] and recycled when it drops them).
    pub(super) rx_pool: BufPool,
    /// Where placed payloads go (see `reorder`); None: every payload into `rx_pool`.
    pub(super) placer: Mutex<Option<SharedPlacer>>,
    /// Lent messages that had to be sent as void (their loan ended before a resend),
    /// for [`super::Alink::take_lost`].
    pub(super) lost: Mutex<Vec<u64>>,
    /// Side messages to write on each link's heartbeats, and those received.
    pub(super) side_tx: Mutex<SideTx>,
    pub(super) side_rx: Mutex<SideRx>,
    /// The protocol version of the latest authenticated session (0: none yet): the
    /// layer above speaks the previous version's messages to a peer not yet upgraded.
    pub(super) session_version: AtomicU16,
    /// This instance's incarnation and the peer instance its links serve.
    pub(super) incarnation: Mutex<Incarnations>,
}

/// The receiver's placer, shared by every link's reader.
pub(super) type SharedPlacer =
    Arc<dyn Fn(&PlaceRequest<'_>) -> Option<Placement> + Send + Sync + 'static>;

impl Shared {
    pub(super) fn now(&self) -> Duration {
        self.origin.elapsed()
    }

    pub(super) fn tick(&self) -> Duration {
        (self.cfg.health.interval / 4).max(Duration::from_millis(2))
    }

    pub(super) fn handshake_config(&self) -> HandshakeConfig {
        HandshakeConfig {
            version: self.cfg.protocol_version,
            cluster_id: self.cfg.cluster_id,
            node_id: self.cfg.node_id,
            peer_node_id: Some(self.cfg.peer_node_id),
            secret: self.cfg.secret.clone(),
            timeout: self.cfg.handshake_timeout,
        }
    }
}

pub(super) fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted
    )
}

/// Events for the layer above (the queue [`super::Alink::poll_event`] reads), each
/// also logged.
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
            Event::PeerRestarted { old, new } => warn!(
                "alink: peer node {}'s A-Link instance {old:#018x} was replaced by {new:#018x}: \
                 this session ended",
                self.cfg.peer_node_id
            ),
        }
        let mut q = lock(&self.events);
        if q.len() == MAX_QUEUED_EVENTS {
            q.pop_front();
        }
        q.push_back(ev);
        self.event_cv.notify_all();
    }

    /// The error for an A-Link that no longer runs: shut down, or ended by a new peer
    /// instance.
    pub(super) fn closed_error(&self) -> super::AlinkError {
        match lock(&self.incarnation).ended() {
            Some((old, new)) => super::AlinkError::PeerRestarted { old, new },
            None => super::AlinkError::Closed,
        }
    }

    pub(super) fn refuse(&self, link: usize, peer: Option<SocketAddr>, reason: String) {
        self.links[link].refused.fetch_add(1, Ordering::Relaxed);
        self.emit(Event::Refused { link, peer, reason });
    }
}
