//! The node's I/O edge toward its quorum services: the [`Backend`] trait (one quorum
//! service as a node sees it), [`WitnessClient`] (the UDP witness: one socket and one
//! authenticated session per witness), the etcd backend (`crate::etcd::EtcdBackend`)
//! and [`Runner`], which drives a [`QuorumNode`] with time from the monotonic clock,
//! carries its requests and answers through whichever backend sits in each slot, and
//! hands every other action to the pair runtime.
//!
//! Both backends answer the same [`Request`]s with the same [`Reply`]s under the same
//! rules (`crate::rules`), so the node machine does not know which one it talks to.
//!
//! Phase 2 wires it: a quorum thread owns the `Runner`, calls [`Runner::poll`] in a
//! loop, feeds `PeerReachable` / `Protected` / `FromPeer` events with
//! [`Runner::event`] and obeys the returned actions (output gate, guest, takeover,
//! demote, peer messages, records, alerts).

use std::collections::HashMap;
use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::{AsFd, BorrowedFd};
use std::time::{Duration, Instant};

use crate::node::{Action, Event, QuorumNode};
use crate::types::{NodeId, Slot};
use crate::witness::ops::{Reply, Request};
use crate::witness::wire::{random_nonce, ClientError, ClientEvent, ClientWire, MAX_DATAGRAM};

/// One quorum service (the UDP witness or etcd) as one node sees it. It carries the
/// node machine's requests ([`Action::ToWitness`]) and hands back the answers
/// ([`Event::WitnessReply`]); it never blocks its caller.
///
/// What an implementation must guarantee (the node machine's safety rests on it):
/// - an answer `Granted` to a request means the service started or extended the
///   holder's lease no earlier than the moment the request was given to [`send`]
///   (the machine measures the lease from then, on its own clock);
/// - a request that changes state is answered only once the change is durable;
/// - requests of one node take effect in the order they were sent (a request may be
///   dropped; the machine resends on its own schedule).
///
/// [`send`]: Backend::send
pub trait Backend: Send {
    /// Sends request `id`, or queues it until the service can be reached.
    fn send(&mut self, id: u64, req: &Request) -> io::Result<()>;
    /// The answers that arrived since the last call, as (id, reply); never waits.
    fn drain(&mut self) -> io::Result<Vec<(u64, Reply)>>;
    /// A descriptor that becomes readable when an answer may be waiting (for poll(2)).
    fn wake_fd(&self) -> BorrowedFd<'_>;
    /// What this is, for logs and status views ("witness 10.0.0.3:4557", "etcd ...").
    fn describe(&self) -> String;
}

/// One witness as seen by one node: socket, session, outstanding requests.
pub struct WitnessClient {
    addr: SocketAddr,
    sock: UdpSocket,
    wire: ClientWire,
    hello_at: Option<Instant>,
    /// Requests waiting for the session (dropped if the handshake takes too long: the
    /// machine resends on its own schedule).
    queued: Vec<(u64, Request)>,
    /// Wire sequence -> the caller's id.
    in_flight: HashMap<u64, u64>,
    pub last_error: Option<ClientError>,
}

const MAX_QUEUED: usize = 8;
const MAX_IN_FLIGHT: usize = 64;
const HELLO_RETRY: Duration = Duration::from_millis(100);

impl WitnessClient {
    /// A client of the witness at `addr` for `node` of `cluster`.
    pub fn new(
        addr: SocketAddr,
        cluster: &str,
        node: NodeId,
        secret: &[u8],
    ) -> io::Result<WitnessClient> {
        let local: SocketAddr = if addr.is_ipv4() {
            "0.0.0.0:0".parse().map_err(io::Error::other)?
        } else {
            "[::]:0".parse().map_err(io::Error::other)?
        };
        let sock = UdpSocket::bind(local)?;
        sock.set_nonblocking(true)?;
        Ok(WitnessClient {
            addr,
            sock,
            wire: ClientWire::new(cluster, node, secret),
            hello_at: None,
            queued: Vec::new(),
            in_flight: HashMap::new(),
            last_error: None,
        })
    }

    pub fn is_ready(&self) -> bool {
        self.wire.is_ready()
    }

    fn hello(&mut self) -> io::Result<()> {
        let h = self.wire.hello(random_nonce()?);
        self.hello_at = Some(Instant::now());
        self.in_flight.clear();
        let _ = self.sock.send_to(&h, self.addr);
        Ok(())
    }

    /// Sends (or queues until the session is up) request `id`.
    fn send_request(&mut self, id: u64, req: &Request) -> io::Result<()> {
        if !self.wire.is_ready() {
            if self.queued.len() >= MAX_QUEUED {
                self.queued.remove(0);
            }
            self.queued.push((id, req.clone()));
            if self.hello_at.is_none_or(|t| t.elapsed() >= HELLO_RETRY) {
                self.hello()?;
            }
            return Ok(());
        }
        if let Some((seq, bytes)) = self.wire.request(req) {
            if self.in_flight.len() >= MAX_IN_FLIGHT {
                if let Some(&k) = self.in_flight.keys().min() {
                    self.in_flight.remove(&k);
                }
            }
            self.in_flight.insert(seq, id);
            // A lost datagram is the machine's to resend.
            let _ = self.sock.send_to(&bytes, self.addr);
        }
        Ok(())
    }

    /// Reads every datagram waiting; returns the answers as (id, reply).
    fn drain_replies(&mut self) -> io::Result<Vec<(u64, Reply)>> {
        let mut out = Vec::new();
        let mut buf = [0u8; MAX_DATAGRAM + 1];
        loop {
            let (n, from) = match self.sock.recv_from(&mut buf) {
                Ok(x) => x,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => continue,
                Err(e) => return Err(e),
            };
            if from != self.addr {
                continue;
            }
            match self.wire.on_datagram(&buf[..n]) {
                Ok(ClientEvent::Send(b)) => {
                    let _ = self.sock.send_to(&b, self.addr);
                }
                Ok(ClientEvent::Ready) => {
                    self.last_error = None;
                    for (id, req) in std::mem::take(&mut self.queued) {
                        self.send_request(id, &req)?;
                    }
                }
                Ok(ClientEvent::Reply { seq, reply }) => {
                    if let Some(id) = self.in_flight.remove(&seq) {
                        out.push((id, reply));
                    }
                }
                Ok(ClientEvent::Ignored) => {}
                Err(e) => {
                    log::warn!("quorum: witness {}: {e}", self.addr);
                    self.last_error = Some(e);
                    self.hello_at = None;
                }
            }
        }
        Ok(out)
    }

    pub fn socket(&self) -> &UdpSocket {
        &self.sock
    }
}

impl Backend for WitnessClient {
    fn send(&mut self, id: u64, req: &Request) -> io::Result<()> {
        self.send_request(id, req)
    }

    fn drain(&mut self) -> io::Result<Vec<(u64, Reply)>> {
        self.drain_replies()
    }

    fn wake_fd(&self) -> BorrowedFd<'_> {
        self.sock.as_fd()
    }

    fn describe(&self) -> String {
        format!("witness {}", self.addr)
    }
}

/// Drives one node's [`QuorumNode`] against its real quorum services.
pub struct Runner {
    node: QuorumNode,
    clients: [Option<Box<dyn Backend>>; 2],
    epoch: Instant,
}

impl Runner {
    /// `preferred` and `alternate` are the backends of the configured slots (a UDP
    /// witness or etcd each).
    pub fn new(
        node: QuorumNode,
        preferred: Option<Box<dyn Backend>>,
        alternate: Option<Box<dyn Backend>>,
    ) -> Runner {
        Runner {
            node,
            clients: [preferred, alternate],
            epoch: Instant::now(),
        }
    }

    /// The node's monotonic time.
    pub fn now(&self) -> Duration {
        self.epoch.elapsed()
    }

    /// The instant of the node's time `t` (e.g. a gate's `until`).
    pub fn instant(&self, t: Duration) -> Instant {
        self.epoch + t
    }

    pub fn node(&self) -> &QuorumNode {
        &self.node
    }

    /// The backend in `slot`, if configured.
    pub fn backend(&self, slot: Slot) -> Option<&dyn Backend> {
        self.clients[slot.index()].as_deref()
    }

    /// Feeds an event from the pair runtime; returns the actions for the runtime
    /// (witness traffic is carried here).
    pub fn event(&mut self, ev: Event) -> io::Result<Vec<Action>> {
        let now = self.now();
        let actions = self.node.step(now, ev);
        self.carry(actions)
    }

    fn carry(&mut self, actions: Vec<Action>) -> io::Result<Vec<Action>> {
        let mut rest = Vec::new();
        for a in actions {
            match a {
                Action::ToWitness { slot, id, request } => {
                    if let Some(c) = self.clients[slot.index()].as_mut() {
                        c.send(id, &request)?;
                    }
                }
                other => rest.push(other),
            }
        }
        Ok(rest)
    }

    /// Waits for witness answers until the machine's next wake-up (at most `max`),
    /// steps it, and returns the actions for the runtime.
    pub fn poll(&mut self, max: Duration) -> io::Result<Vec<Action>> {
        let now = self.now();
        let deadline = self.node.next_wakeup(now).min(now + max);
        let mut out = Vec::new();
        loop {
            for slot in Slot::ALL {
                let answers = match self.clients[slot.index()].as_mut() {
                    Some(c) => c.drain()?,
                    None => Vec::new(),
                };
                for (id, reply) in answers {
                    let now = self.now();
                    let acts = self.node.step(now, Event::WitnessReply { slot, id, reply });
                    out.extend(self.carry(acts)?);
                }
            }
            let now = self.now();
            if now >= deadline {
                break;
            }
            wait_readable(
                &self.clients,
                (deadline - now).min(Duration::from_millis(5)),
            );
        }
        let now = self.now();
        let acts = self.node.step(now, Event::Tick);
        out.extend(self.carry(acts)?);
        Ok(out)
    }
}

fn wait_readable(clients: &[Option<Box<dyn Backend>>; 2], d: Duration) {
    use std::os::fd::AsRawFd;
    let mut fds: Vec<libc::pollfd> = clients
        .iter()
        .flatten()
        .map(|c| libc::pollfd {
            fd: c.wake_fd().as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    let ms = d.as_millis().clamp(1, 1000) as libc::c_int;
    // SAFETY: `fds` is a valid array of `fds.len()` pollfd structures that lives across
    // the call; poll only writes their `revents`.
    unsafe {
        libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms);
    }
}
