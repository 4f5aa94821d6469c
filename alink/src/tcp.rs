//! The I/O edge: TCP connections for each configured link, driving the pure state machines
//! (handshake, health, send window, reorder buffer).
//!
//! Threads (all bounded, all joined on drop):
//! - per link, a manager thread: dials (lower node id) or takes authenticated connections
//!   from the listener (higher node id), then runs the connection's reader loop, which also
//!   ticks the heartbeat machine;
//! - per live connection, a writer thread that writes queued messages with one vectored
//!   write per frame (header, head and the caller's payload buffers, no copies);
//! - on the accepting side, per link, a listener thread; each accepted connection is
//!   authenticated on a short-lived thread (at most [`MAX_PENDING_HANDSHAKES`] at once), so a
//!   garbage or slow connection never blocks the live link.

use crate::buf::BufPool;
use crate::frame::{FrameDecoder, FrameEncoder, FrameError, Kind, HEADER_LEN, MAX_BODY_CEILING};
use crate::handshake::{
    random_nonce, Handshake, HandshakeConfig, HandshakeError, HsStep, ReplayCache, Role,
    PROTOCOL_VERSION,
};
use crate::health::{HealthAction, HealthConfig, LinkHealth};
use crate::linkset::{LinkEvent, TxWindow, WindowLimits, MAX_LINKS};
use crate::reorder::{InMsg, RxReorder};
use bytes::Bytes;
use log::{debug, info, warn};
use std::collections::VecDeque;
use std::io::{self, IoSlice, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TryRecvError, TrySendError};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Accepted connections being authenticated at once, per link.
pub const MAX_PENDING_HANDSHAKES: usize = 4;
/// Events kept for [`Alink::poll_event`]; older ones are dropped (they are also logged).
pub const MAX_QUEUED_EVENTS: usize = 1024;

/// Addresses of one link. The accepting end listens on `local`; the dialing end binds its
/// socket to `local`'s IP (port 0 = any) and connects to `remote`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinkAddrs {
    pub local: SocketAddr,
    pub remote: SocketAddr,
}

/// Configuration of one end.
#[derive(Clone)]
pub struct AlinkConfig {
    pub cluster_id: u64,
    pub node_id: u64,
    pub peer_node_id: u64,
    pub secret: Vec<u8>,
    pub links: Vec<LinkAddrs>,
    pub health: HealthConfig,
    pub handshake_timeout: Duration,
    /// Must be equal on both ends (the receiver sizes its reorder buffer from it).
    pub window: WindowLimits,
    pub max_frame_body: u32,
    /// Overridable for tests of version refusal.
    pub protocol_version: u16,
    pub reconnect_max: Duration,
}

impl std::fmt::Debug for AlinkConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AlinkConfig")
            .field("cluster_id", &self.cluster_id)
            .field("node_id", &self.node_id)
            .field("peer_node_id", &self.peer_node_id)
            .field("links", &self.links)
            .field("health", &self.health)
            .finish_non_exhaustive()
    }
}

impl AlinkConfig {
    /// Defaults: heartbeat 100 ms, down after 4 misses, 2 s handshake timeout, window of
    /// 1024 messages / 256 MiB, frames up to 64 MiB.
    pub fn new(
        cluster_id: u64,
        node_id: u64,
        peer_node_id: u64,
        secret: &[u8],
        links: Vec<LinkAddrs>,
    ) -> AlinkConfig {
        AlinkConfig {
            cluster_id,
            node_id,
            peer_node_id,
            secret: secret.to_vec(),
            links,
            health: HealthConfig::default(),
            handshake_timeout: Duration::from_secs(2),
            window: WindowLimits {
                max_msgs: 1024,
                max_bytes: 256 << 20,
            },
            max_frame_body: 64 << 20,
            protocol_version: PROTOCOL_VERSION,
            reconnect_max: Duration::from_secs(1),
        }
    }

    fn validate(&self) -> Result<(), AlinkError> {
        let bad = |m: &str| Err(AlinkError::Config(m.to_string()));
        if self.links.is_empty() || self.links.len() > MAX_LINKS {
            return bad("between 1 and 8 links");
        }
        if self.node_id == self.peer_node_id {
            return bad("node id and peer node id must differ");
        }
        if self.secret.len() < 16 {
            return bad("cluster secret must be at least 16 bytes");
        }
        if self.health.misses == 0 || self.health.interval.is_zero() {
            return bad("heartbeat interval and misses must be positive");
        }
        if self.window.max_msgs == 0 || self.window.max_bytes == 0 {
            return bad("window limits must be positive");
        }
        if self.max_frame_body == 0 || self.max_frame_body > MAX_BODY_CEILING {
            return bad("max_frame_body must be in 1..=1 GiB");
        }
        Ok(())
    }

    fn role(&self) -> Role {
        if self.node_id < self.peer_node_id {
            Role::Dialer
        } else {
            Role::Acceptor
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AlinkError {
    #[error("invalid A-Link configuration: {0}")]
    Config(String),
    #[error("A-Link I/O: {0}")]
    Io(#[from] io::Error),
    #[error("cannot encode message head: {0}")]
    Encode(#[from] postcard::Error),
    #[error("message of {len} bytes exceeds the frame limit of {max}")]
    TooLarge { len: usize, max: u32 },
    #[error("timed out")]
    Timeout,
    #[error("A-Link is shut down")]
    Closed,
}

/// Something worth telling the layer above (everything is also logged).
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

/// Per-link status snapshot.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LinkStatus {
    pub up: bool,
    pub queued_msgs: usize,
    pub sent_msgs: u64,
    pub sent_bytes: u64,
    pub connections: u64,
    pub refused: u64,
}

struct Conn {
    stream: TcpStream,
    peer: SocketAddr,
    dead: AtomicBool,
    hb_due: AtomicBool,
}

impl Conn {
    fn kill(&self) {
        if !self.dead.swap(true, Ordering::SeqCst) {
            let _ = self.stream.shutdown(Shutdown::Both);
        }
    }
}

#[derive(Default)]
struct LinkShared {
    conn: Mutex<Option<Arc<Conn>>>,
    connections: AtomicU64,
    refused: AtomicU64,
}

struct Shared {
    cfg: AlinkConfig,
    origin: Instant,
    stop: AtomicBool,
    tx: Mutex<TxWindow>,
    /// Writers wait here for work.
    tx_work: Condvar,
    /// Senders wait here for window room.
    tx_room: Condvar,
    rx: Mutex<RxReorder>,
    rx_ready: Condvar,
    /// Ack value last put on the wire, and whether a new one should go out now.
    ack_sent: AtomicU64,
    ack_due: AtomicBool,
    bytes_since_ack: AtomicU64,
    events: Mutex<VecDeque<Event>>,
    event_cv: Condvar,
    links: Vec<LinkShared>,
    health: Vec<Mutex<LinkHealth>>,
    replay: Mutex<ReplayCache>,
    handshakes_inflight: AtomicUsize,
    /// Receive buffers of every link (frame bodies, handed to the consumer as
    /// [`InMsg::body`] and recycled when it drops them).
    rx_pool: BufPool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panicking thread already reported its bug; the state machines stay consistent under
    // their own invariants, so keep going rather than cascade panics.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Shared {
    fn now(&self) -> Duration {
        self.origin.elapsed()
    }

    fn tick(&self) -> Duration {
        (self.cfg.health.interval / 4).max(Duration::from_millis(2))
    }

    fn emit(&self, ev: Event) {
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

    fn refuse(&self, link: usize, peer: Option<SocketAddr>, reason: String) {
        self.links[link].refused.fetch_add(1, Ordering::Relaxed);
        self.emit(Event::Refused { link, peer, reason });
    }

    fn handshake_config(&self) -> HandshakeConfig {
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

/// An authenticated connection ready to carry traffic.
struct Authed {
    stream: TcpStream,
    peer: SocketAddr,
    enc: FrameEncoder,
    dec: FrameDecoder,
}

#[derive(Debug)]
enum HsFail {
    Io(io::Error),
    Frame(FrameError),
    Hs(HandshakeError),
}

impl std::fmt::Display for HsFail {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HsFail::Io(e) => write!(f, "I/O during handshake: {e}"),
            HsFail::Frame(e) => write!(f, "bad frame during handshake: {e}"),
            HsFail::Hs(e) => write!(f, "{e}"),
        }
    }
}

fn write_all_vectored(w: &mut impl Write, mut bufs: &mut [IoSlice<'_>]) -> io::Result<()> {
    IoSlice::advance_slices(&mut bufs, 0);
    while !bufs.is_empty() {
        match w.write_vectored(bufs) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => IoSlice::advance_slices(&mut bufs, n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted
    )
}

/// Runs the handshake on a fresh connection (blocking, bounded by the handshake timeout).
fn handshake(
    shared: &Shared,
    mut stream: TcpStream,
    peer: SocketAddr,
    role: Role,
) -> Result<Authed, HsFail> {
    stream.set_nodelay(true).map_err(HsFail::Io)?;
    stream
        .set_read_timeout(Some(Duration::from_millis(50)))
        .map_err(HsFail::Io)?;
    let mut enc = FrameEncoder::new(shared.cfg.max_frame_body);
    let mut dec = FrameDecoder::with_pool(shared.cfg.max_frame_body, shared.rx_pool.clone());
    let nonce = random_nonce().map_err(HsFail::Io)?;
    let (mut hs, hello) = Handshake::new(shared.handshake_config(), role, nonce, shared.now());
    let send =
        |enc: &mut FrameEncoder, stream: &mut TcpStream, kind: Kind, msg| -> Result<(), HsFail> {
            let body = postcard::to_stdvec(&msg)
                .map_err(|e| HsFail::Hs(HandshakeError::Malformed(e.to_string())))?;
            let wire = enc
                .encode(kind, 0, &[], &body)
                .ok_or_else(|| HsFail::Hs(HandshakeError::Malformed("hello too large".into())))?;
            stream.write_all(&wire).map_err(HsFail::Io)
        };
    send(&mut enc, &mut stream, Kind::Hello, hello)?;
    loop {
        hs.on_tick(shared.now()).map_err(HsFail::Hs)?;
        if shared.stop.load(Ordering::Relaxed) {
            return Err(HsFail::Io(io::Error::other("shutting down")));
        }
        let n = match stream.read(dec.read_buf()) {
            Ok(0) => {
                return Err(HsFail::Hs(HandshakeError::Malformed(
                    "peer closed the connection during the handshake".into(),
                )))
            }
            Ok(n) => n,
            Err(e) if is_timeout(&e) => continue,
            Err(e) => return Err(HsFail::Io(e)),
        };
        let Some(frame) = dec.advance(n).map_err(HsFail::Frame)? else {
            continue;
        };
        let step = if role == Role::Acceptor {
            let mut cache = lock(&shared.replay);
            hs.on_body(&frame.body, Some(&mut cache))
        } else {
            hs.on_body(&frame.body, None)
        }
        .map_err(HsFail::Hs)?;
        match step {
            HsStep::Send(msg) => send(&mut enc, &mut stream, Kind::Auth, msg)?,
            HsStep::Done(session) => {
                enc.set_session_key(&session.send_key);
                dec.set_session_key(&session.recv_key);
                return Ok(Authed {
                    stream,
                    peer,
                    enc,
                    dec,
                });
            }
        }
    }
}

fn dial(shared: &Shared, addrs: LinkAddrs) -> io::Result<(TcpStream, SocketAddr)> {
    let domain = socket2::Domain::for_address(addrs.remote);
    let sock = socket2::Socket::new(domain, socket2::Type::STREAM, Some(socket2::Protocol::TCP))?;
    if !addrs.local.ip().is_unspecified() {
        sock.bind(&SocketAddr::new(addrs.local.ip(), 0).into())?;
    }
    let timeout = shared.cfg.handshake_timeout.min(Duration::from_secs(1));
    sock.connect_timeout(&addrs.remote.into(), timeout)?;
    Ok((sock.into(), addrs.remote))
}

/// The A-Link handle. Cheap to share behind an `Arc`; every method takes `&self`.
pub struct Alink {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
    local_addrs: Vec<SocketAddr>,
}

impl Alink {
    /// Starts all links. The accepting end binds its listeners before returning (errors are
    /// reported here); connections are made in the background.
    pub fn start(cfg: AlinkConfig) -> Result<Alink, AlinkError> {
        cfg.validate()?;
        let n = cfg.links.len();
        let role = cfg.role();
        let shared = Arc::new(Shared {
            origin: Instant::now(),
            stop: AtomicBool::new(false),
            tx: Mutex::new(TxWindow::new(n, cfg.window)),
            tx_work: Condvar::new(),
            tx_room: Condvar::new(),
            rx: Mutex::new(RxReorder::new(cfg.window.max_msgs as u64)),
            rx_ready: Condvar::new(),
            ack_sent: AtomicU64::new(1),
            ack_due: AtomicBool::new(false),
            bytes_since_ack: AtomicU64::new(0),
            events: Mutex::new(VecDeque::new()),
            event_cv: Condvar::new(),
            links: (0..n).map(|_| LinkShared::default()).collect(),
            health: (0..n)
                .map(|_| Mutex::new(LinkHealth::new(cfg.health)))
                .collect(),
            replay: Mutex::new(ReplayCache::new(1024)),
            handshakes_inflight: AtomicUsize::new(0),
            rx_pool: BufPool::default(),
            cfg,
        });
        let mut threads = Vec::new();
        let mut local_addrs = Vec::new();
        for (i, addrs) in shared.cfg.links.iter().enumerate() {
            match role {
                Role::Dialer => {
                    local_addrs.push(addrs.local);
                    let s = shared.clone();
                    threads.push(
                        std::thread::Builder::new()
                            .name(format!("alink-dial{i}"))
                            .spawn(move || link_manager(s, i, None))?,
                    );
                }
                Role::Acceptor => {
                    let listener = TcpListener::bind(addrs.local)?;
                    listener.set_nonblocking(true)?;
                    local_addrs.push(listener.local_addr()?);
                    let (tx, rx) = mpsc::sync_channel::<Authed>(1);
                    let s = shared.clone();
                    threads.push(
                        std::thread::Builder::new()
                            .name(format!("alink-lsn{i}"))
                            .spawn(move || listen(s, i, listener, tx))?,
                    );
                    let s = shared.clone();
                    threads.push(
                        std::thread::Builder::new()
                            .name(format!("alink-acc{i}"))
                            .spawn(move || link_manager(s, i, Some(rx)))?,
                    );
                }
            }
        }
        Ok(Alink {
            shared,
            threads,
            local_addrs,
        })
    }

    /// The addresses the links use locally (listeners: the bound address, useful with port 0).
    pub fn local_addrs(&self) -> &[SocketAddr] {
        &self.local_addrs
    }

    /// Sends a message: `head` is postcard-encoded, `payload` chunks are sent as they are
    /// (reference-counted, never copied). Blocks while the window is full.
    pub fn send<T: serde::Serialize>(
        &self,
        head: &T,
        payload: Vec<Bytes>,
    ) -> Result<u64, AlinkError> {
        self.send_timeout(head, payload, None)
    }

    /// Like [`Alink::send`], failing with Timeout if the window stays full for `timeout`.
    pub fn send_timeout<T: serde::Serialize>(
        &self,
        head: &T,
        payload: Vec<Bytes>,
        timeout: Option<Duration>,
    ) -> Result<u64, AlinkError> {
        let head = postcard::to_stdvec(head)?;
        let len = head.len() + payload.iter().map(|p| p.len()).sum::<usize>();
        if len > self.shared.cfg.max_frame_body as usize {
            return Err(AlinkError::TooLarge {
                len,
                max: self.shared.cfg.max_frame_body,
            });
        }
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut tx = lock(&self.shared.tx);
        loop {
            if self.shared.stop.load(Ordering::Relaxed) {
                return Err(AlinkError::Closed);
            }
            if tx.has_room(len) {
                break;
            }
            let wait = match deadline {
                Some(d) => {
                    let now = Instant::now();
                    if now >= d {
                        return Err(AlinkError::Timeout);
                    }
                    (d - now).min(Duration::from_millis(100))
                }
                None => Duration::from_millis(100),
            };
            tx = self
                .shared
                .tx_room
                .wait_timeout(tx, wait)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        let seq = tx.push(head, payload).ok_or(AlinkError::Timeout)?;
        drop(tx);
        self.shared.tx_work.notify_all();
        Ok(seq)
    }

    /// Next message in sequence order, waiting up to `timeout`.
    pub fn recv(&self, timeout: Duration) -> Result<Option<InMsg>, AlinkError> {
        let deadline = Instant::now() + timeout;
        let mut rx = lock(&self.shared.rx);
        loop {
            if let Some(m) = rx.pop() {
                let ack = rx.ack();
                let has_more = rx.has_ready();
                drop(rx);
                self.after_consume(ack, m.body.len() as u64, has_more);
                return Ok(Some(m));
            }
            if self.shared.stop.load(Ordering::Relaxed) {
                return Err(AlinkError::Closed);
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(None);
            }
            rx = self
                .shared
                .rx_ready
                .wait_timeout(rx, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// Decides whether the consumption just recorded warrants an immediate ack (rather than
    /// waiting for the next heartbeat): an eighth of the window consumed, or the consumer
    /// caught up with what arrived.
    fn after_consume(&self, ack: u64, bytes: u64, has_more: bool) {
        let s = &self.shared;
        let since = s.bytes_since_ack.fetch_add(bytes, Ordering::Relaxed) + bytes;
        let sent = s.ack_sent.load(Ordering::Relaxed);
        let w = s.cfg.window;
        let msgs_due = ack.saturating_sub(sent) >= (w.max_msgs as u64 / 8).max(1);
        let bytes_due = since >= (w.max_bytes as u64 / 8).max(1);
        if msgs_due || bytes_due || (!has_more && ack > sent) {
            s.ack_due.store(true, Ordering::Release);
            // Take the tx lock so a writer between its check and its wait cannot miss this.
            drop(lock(&s.tx));
            s.tx_work.notify_all();
        }
    }

    /// Waits until the peer consumed everything sent so far.
    pub fn flush(&self, timeout: Duration) -> Result<(), AlinkError> {
        let deadline = Instant::now() + timeout;
        let mut tx = lock(&self.shared.tx);
        while !tx.is_drained() {
            let now = Instant::now();
            if now >= deadline {
                return Err(AlinkError::Timeout);
            }
            tx = self
                .shared
                .tx_room
                .wait_timeout(tx, (deadline - now).min(Duration::from_millis(50)))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        Ok(())
    }

    /// Next event, waiting up to `timeout`.
    pub fn poll_event(&self, timeout: Duration) -> Option<Event> {
        let deadline = Instant::now() + timeout;
        let mut q = lock(&self.shared.events);
        loop {
            if let Some(e) = q.pop_front() {
                return Some(e);
            }
            let now = Instant::now();
            if now >= deadline {
                return None;
            }
            q = self
                .shared
                .event_cv
                .wait_timeout(q, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// How the receive-buffer pool has done (buffers reused against allocated).
    pub fn rx_pool_stats(&self) -> crate::buf::PoolStats {
        self.shared.rx_pool.stats()
    }

    /// True while at least one link is up.
    pub fn peer_reachable(&self) -> bool {
        lock(&self.shared.tx).any_up()
    }

    pub fn link_status(&self) -> Vec<LinkStatus> {
        let tx = lock(&self.shared.tx).stats();
        tx.iter()
            .zip(&self.shared.links)
            .map(|(t, l)| LinkStatus {
                up: t.up,
                queued_msgs: t.queued_msgs,
                sent_msgs: t.sent_msgs,
                sent_bytes: t.sent_bytes,
                connections: l.connections.load(Ordering::Relaxed),
                refused: l.refused.load(Ordering::Relaxed),
            })
            .collect()
    }

    /// Messages received twice (resent after a link failure) and dropped.
    pub fn duplicates_dropped(&self) -> u64 {
        lock(&self.shared.rx).duplicates()
    }
}

impl Drop for Alink {
    fn drop(&mut self) {
        let s = &self.shared;
        s.stop.store(true, Ordering::SeqCst);
        for l in &s.links {
            if let Some(c) = lock(&l.conn).as_ref() {
                c.kill();
            }
        }
        {
            let _g = lock(&s.tx);
            s.tx_work.notify_all();
            s.tx_room.notify_all();
        }
        s.rx_ready.notify_all();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        // Handshake threads end within the handshake timeout (they poll `stop` every 50 ms).
        let deadline = Instant::now() + s.cfg.handshake_timeout + Duration::from_millis(200);
        while s.handshakes_inflight.load(Ordering::SeqCst) > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

fn listen(shared: Arc<Shared>, link: usize, listener: TcpListener, out: SyncSender<Authed>) {
    while !shared.stop.load(Ordering::Relaxed) {
        let (stream, peer) = match listener.accept() {
            Ok(x) => x,
            Err(e) if is_timeout(&e) => {
                std::thread::sleep(Duration::from_millis(20));
                continue;
            }
            Err(e) => {
                warn!("alink link {link}: accept failed: {e}");
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        if shared.handshakes_inflight.load(Ordering::SeqCst) >= MAX_PENDING_HANDSHAKES {
            shared.refuse(link, Some(peer), "too many pending handshakes".into());
            continue;
        }
        if let Err(e) = stream.set_nonblocking(false) {
            warn!("alink link {link}: {e}");
            continue;
        }
        shared.handshakes_inflight.fetch_add(1, Ordering::SeqCst);
        let s = shared.clone();
        let out = out.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("alink-hs{link}"))
            .spawn(move || {
                match handshake(&s, stream, peer, Role::Acceptor) {
                    Ok(mut authed) => {
                        // Hand over to the manager; give up if shutting down.
                        loop {
                            match out.try_send(authed) {
                                Ok(()) => break,
                                Err(TrySendError::Full(a)) => {
                                    if s.stop.load(Ordering::Relaxed) {
                                        break;
                                    }
                                    authed = a;
                                    std::thread::sleep(Duration::from_millis(5));
                                }
                                Err(TrySendError::Disconnected(_)) => break,
                            }
                        }
                    }
                    Err(e) => s.refuse(link, Some(peer), e.to_string()),
                }
                s.handshakes_inflight.fetch_sub(1, Ordering::SeqCst);
            });
        if spawned.is_err() {
            shared.handshakes_inflight.fetch_sub(1, Ordering::SeqCst);
            warn!("alink link {link}: cannot spawn handshake thread");
        }
    }
}

/// Dials (or waits for accepted connections) and runs them, forever until stop.
fn link_manager(shared: Arc<Shared>, link: usize, incoming: Option<Receiver<Authed>>) {
    let addrs = shared.cfg.links[link];
    let mut backoff = Duration::from_millis(50);
    let mut next: Option<Authed> = None;
    while !shared.stop.load(Ordering::Relaxed) {
        let authed = match (next.take(), &incoming) {
            (Some(a), _) => a,
            (None, Some(rx)) => match rx.recv_timeout(Duration::from_millis(50)) {
                Ok(a) => a,
                Err(_) => continue,
            },
            (None, None) => {
                let attempt = dial(&shared, addrs)
                    .map_err(HsFail::Io)
                    .and_then(|(s, p)| handshake(&shared, s, p, Role::Dialer));
                match attempt {
                    Ok(a) => {
                        backoff = Duration::from_millis(50);
                        a
                    }
                    Err(e) => {
                        match &e {
                            HsFail::Io(io) => {
                                debug!("alink link {link}: dial {}: {io}", addrs.remote)
                            }
                            _ => shared.refuse(link, Some(addrs.remote), e.to_string()),
                        }
                        sleep_unless_stopped(&shared, backoff);
                        backoff = (backoff * 2).min(shared.cfg.reconnect_max);
                        continue;
                    }
                }
            }
        };
        next = run_conn(&shared, link, authed, incoming.as_ref());
    }
}

fn sleep_unless_stopped(shared: &Shared, d: Duration) {
    let end = Instant::now() + d;
    while !shared.stop.load(Ordering::Relaxed) {
        let now = Instant::now();
        if now >= end {
            return;
        }
        std::thread::sleep((end - now).min(Duration::from_millis(20)));
    }
}

/// Runs one authenticated connection until it dies. Returns a replacement connection if the
/// peer reconnected on this link meanwhile.
fn run_conn(
    shared: &Arc<Shared>,
    link: usize,
    authed: Authed,
    incoming: Option<&Receiver<Authed>>,
) -> Option<Authed> {
    let Authed {
        stream,
        peer,
        enc,
        mut dec,
    } = authed;
    let wstream = match stream.try_clone() {
        Ok(s) => s,
        Err(e) => {
            warn!("alink link {link}: {e}");
            return None;
        }
    };
    if let Err(e) = stream.set_read_timeout(Some(shared.tick())) {
        warn!("alink link {link}: {e}");
        return None;
    }
    let conn = Arc::new(Conn {
        stream,
        peer,
        dead: AtomicBool::new(false),
        hb_due: AtomicBool::new(true),
    });
    *lock(&shared.links[link].conn) = Some(conn.clone());
    shared.links[link]
        .connections
        .fetch_add(1, Ordering::Relaxed);
    lock(&shared.health[link]).on_up(shared.now());
    info!("alink link {link}: authenticated connection with {peer}");
    let events = {
        let mut tx = lock(&shared.tx);
        tx.link_up(link)
    };
    shared.tx_work.notify_all();
    for e in events {
        shared.emit(Event::Link(e));
    }
    let writer = {
        let s = shared.clone();
        let c = conn.clone();
        std::thread::Builder::new()
            .name(format!("alink-wr{link}"))
            .spawn(move || writer(s, link, c, wstream, enc))
    };
    let writer = match writer {
        Ok(w) => Some(w),
        Err(e) => {
            warn!("alink link {link}: cannot spawn writer: {e}");
            conn.kill();
            None
        }
    };

    let mut replacement = None;
    let reason = loop {
        if shared.stop.load(Ordering::Relaxed) {
            break "shutting down".to_string();
        }
        if conn.dead.load(Ordering::SeqCst) {
            break "write failed".to_string();
        }
        if let Some(rx) = incoming {
            match rx.try_recv() {
                Ok(a) => {
                    replacement = Some(a);
                    break "peer reconnected; replacing the connection".to_string();
                }
                Err(TryRecvError::Empty) | Err(TryRecvError::Disconnected) => {}
            }
        }
        let read = dec.read_from_fd(&conn.stream);
        let now = shared.now();
        if matches!(read, Ok(n) if n > 0) {
            // Any progress counts as life, not only complete frames: a frame larger than
            // what the link moves in `misses` intervals must not look like a dead link.
            // (A frame that then fails its checks drops the connection anyway.)
            lock(&shared.health[link]).on_frame_received(now);
        }
        match read {
            Ok(0) => break "peer closed the connection".to_string(),
            Ok(n) => match dec.advance(n) {
                Ok(Some(frame)) => {
                    if let Err(e) = on_frame(shared, frame) {
                        shared.refuse(link, Some(peer), e.clone());
                        break e;
                    }
                }
                Ok(None) => {}
                Err(e) => {
                    shared.refuse(link, Some(peer), format!("bad frame: {e}"));
                    break format!("bad frame: {e}");
                }
            },
            Err(e) if is_timeout(&e) => {}
            Err(e) => break format!("read: {e}"),
        }
        if lock(&shared.health[link]).is_overdue(now) && bytes_pending(&conn.stream) {
            // Our own thread was late, not the peer: a read can time out and then this
            // thread get no CPU for a while (a loaded host, a long page-fault stall)
            // while the peer's bytes arrive. Bytes waiting in the socket are life.
            lock(&shared.health[link]).on_frame_received(now);
        }
        match lock(&shared.health[link]).on_tick(now) {
            Some(HealthAction::LinkDown) => {
                break format!(
                    "no frame for {:?} ({} heartbeats missed)",
                    shared.cfg.health.dead_after(),
                    shared.cfg.health.misses
                )
            }
            Some(HealthAction::SendHeartbeat) => {
                conn.hb_due.store(true, Ordering::Release);
                drop(lock(&shared.tx));
                shared.tx_work.notify_all();
            }
            None => {}
        }
    };
    if !shared.stop.load(Ordering::Relaxed) {
        warn!("alink link {link}: connection with {peer} down: {reason}");
    }
    conn.kill();
    {
        let _g = lock(&shared.tx);
        shared.tx_work.notify_all();
    }
    if let Some(w) = writer {
        let _ = w.join();
    }
    lock(&shared.health[link]).on_down();
    *lock(&shared.links[link].conn) = None;
    let events = lock(&shared.tx).link_down(link);
    shared.tx_work.notify_all();
    shared.tx_room.notify_all();
    for e in events {
        shared.emit(Event::Link(e));
    }
    replacement
}

fn on_frame(shared: &Shared, frame: crate::frame::Frame) -> Result<(), String> {
    match frame.header.kind {
        Kind::Data => {
            let msg = InMsg {
                seq: frame.header.msg_seq,
                head_len: frame.header.head_len as usize,
                body: frame.body,
            };
            let mut rx = lock(&shared.rx);
            rx.on_message(msg).map_err(|e| e.to_string())?;
            if rx.has_ready() {
                shared.rx_ready.notify_all();
            }
            Ok(())
        }
        Kind::Heartbeat => {
            let moved = lock(&shared.tx).on_ack(frame.header.msg_seq);
            if moved {
                shared.tx_room.notify_all();
            }
            Ok(())
        }
        // The decoder refuses handshake kinds in the session phase.
        Kind::Hello | Kind::Auth => Err("handshake frame in session".into()),
    }
}

enum Work {
    Msg(Arc<crate::linkset::OutMsg>),
    Heartbeat(u64),
}

fn writer(
    shared: Arc<Shared>,
    link: usize,
    conn: Arc<Conn>,
    mut stream: TcpStream,
    mut enc: FrameEncoder,
) {
    let tick = shared.tick();
    loop {
        let work = {
            let mut tx = lock(&shared.tx);
            loop {
                if shared.stop.load(Ordering::Relaxed) || conn.dead.load(Ordering::SeqCst) {
                    return;
                }
                // Heartbeats and acks first: a busy data stream must not starve them.
                if conn.hb_due.swap(false, Ordering::AcqRel)
                    || shared.ack_due.swap(false, Ordering::AcqRel)
                {
                    break Work::Heartbeat(lock(&shared.rx).ack());
                }
                if let Some(m) = tx.next_for(link) {
                    break Work::Msg(m);
                }
                tx = shared
                    .tx_work
                    .wait_timeout(tx, tick)
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
            }
        };
        let r = match &work {
            Work::Heartbeat(ack) => {
                let hdr = enc.header(Kind::Heartbeat, *ack, &[], &[]);
                let r = match hdr {
                    Some(h) => stream.write_all(&h[..HEADER_LEN]),
                    None => Err(io::Error::other("heartbeat exceeds frame limit")),
                };
                if r.is_ok() {
                    shared.ack_sent.fetch_max(*ack, Ordering::Relaxed);
                    shared.bytes_since_ack.store(0, Ordering::Relaxed);
                }
                r
            }
            Work::Msg(m) => {
                let slices: Vec<&[u8]> = m.payload.iter().map(|b| b.as_ref()).collect();
                match enc.header(Kind::Data, m.seq, &m.head, &slices) {
                    Some(h) => {
                        let mut iov = Vec::with_capacity(2 + slices.len());
                        iov.push(IoSlice::new(&h));
                        iov.push(IoSlice::new(&m.head));
                        iov.extend(slices.iter().map(|s| IoSlice::new(s)));
                        write_all_vectored(&mut stream, &mut iov)
                    }
                    None => Err(io::Error::other("message exceeds frame limit")),
                }
            }
        };
        if let Err(e) = r {
            if !conn.dead.load(Ordering::SeqCst) {
                debug!("alink link {link}: write to {}: {e}", conn.peer);
            }
            conn.kill();
            return;
        }
        lock(&shared.health[link]).on_frame_sent(shared.now());
    }
}

/// Whether bytes are waiting to be read on `stream` (FIONREAD), without consuming them.
fn bytes_pending(stream: &TcpStream) -> bool {
    use std::os::fd::AsRawFd;
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one c_int through the pointer, which points at `n`, alive
    // for the call; the fd is owned by `stream`, open for the duration of the call.
    let rc = unsafe { libc::ioctl(stream.as_raw_fd(), libc::FIONREAD, &mut n) };
    rc == 0 && n > 0
}
