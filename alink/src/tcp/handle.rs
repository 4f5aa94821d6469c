//! The [`Alink`] handle: starting the links, sending, receiving, flushing, events and
//! status, and shutting everything down on drop.

use crate::buf::BufPool;
use crate::frame::{PlaceRequest, Placement};
use crate::handshake::{ReplayCache, Role};
use crate::health::LinkHealth;
use crate::incarnation::{random_incarnation, Incarnations};
use crate::lent::Lent;
use crate::linkset::{SegOpts, TxWindow};
use crate::reorder::{InMsg, RxReorder};
use crate::side::{SideRx, SideTx};
use bytes::Bytes;
use std::collections::VecDeque;
use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use twinrun_lock::CondvarExt;

use super::config::AlinkConfig;
use super::conn::Authed;
use super::connect::{link_manager, listen};
use super::error::AlinkError;
use super::events::Event;
use super::shared::{lock, LinkShared, Shared};

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LinkStatus {
    pub up: bool,
    pub queued_msgs: usize,
    pub sent_msgs: u64,
    pub sent_bytes: u64,
    pub connections: u64,
    pub refused: u64,
}

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
            placer: Mutex::new(None),
            lost: Mutex::new(Vec::new()),
            side_tx: Mutex::new(SideTx::new(n, side_instance())),
            side_rx: Mutex::new(SideRx::default()),
            session_version: AtomicU16::new(0),
            incarnation: Mutex::new(Incarnations::new(random_incarnation())),
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
        let deadline = timeout.map(|t| Instant::now() + t);
        self.push(head, payload, None, None, deadline)
    }

    /// Sends a segmented message (see [`SegOpts`]): a CRC per `seg_size` segment of the
    /// payload instead of one for the body, and the receiver may have the payload read
    /// straight into its final place ([`Alink::set_placer`]) once message
    /// `opts.barrier` was consumed there. Blocks while the window is full.
    pub fn send_segmented<T: serde::Serialize>(
        &self,
        head: &T,
        payload: Vec<Bytes>,
        opts: SegOpts,
    ) -> Result<u64, AlinkError> {
        let head = postcard::to_stdvec(head)?;
        self.push(head, payload, Some(opts), None, None)
    }

    /// Sends a batch of segmented messages whose payloads are *lent*: slices of the
    /// caller's memory (guest memory), written by the links' writer threads straight
    /// from where they lie, spread over every healthy link, with no copy. Blocks until
    /// every message was written whole into a socket once (or `timeout`), then ends the
    /// loan; returns the messages' sequence numbers.
    ///
    /// With `opts.volatile` the memory may change while it is sent: segments that
    /// changed under their write are marked torn (the receiver gets them unchecked in
    /// [`InMsg::torn`]; the caller must send that memory again, which a dirty log does).
    /// A message that has to be sent again after the loan ended (its link failed before
    /// the peer acknowledged it, or it was not written within `timeout`) goes as a void
    /// message: delivered as [`crate::PayloadAt::Lost`] and listed by
    /// [`Alink::take_lost`], so the caller sends that memory again too.
    pub fn send_lent<T: serde::Serialize>(
        &self,
        batch: &[(&T, &[&[u8]])],
        opts: SegOpts,
        timeout: Duration,
    ) -> Result<Vec<u64>, AlinkError> {
        /// Ends every loan when the call returns, whatever the path (errors, unwinding):
        /// no writer may touch the caller's memory afterwards.
        struct Loans(Vec<Arc<Lent>>);
        impl Drop for Loans {
            fn drop(&mut self) {
                for l in &self.0 {
                    l.revoke();
                }
            }
        }
        let deadline = Instant::now() + timeout;
        let mut loans = Loans(Vec::with_capacity(batch.len()));
        let mut seqs = Vec::with_capacity(batch.len());
        for (head, slices) in batch {
            let head = postcard::to_stdvec(head)?;
            // SAFETY: the slices are borrowed for this whole call, and `loans` revokes
            // every loan (waiting for the writers holding it) before the call returns.
            let lent = Arc::new(unsafe { Lent::new(slices) });
            loans.0.push(lent.clone());
            seqs.push(self.push(head, Vec::new(), Some(opts), Some(lent), Some(deadline))?);
        }
        for l in &loans.0 {
            l.wait_written(deadline);
        }
        drop(loans);
        Ok(seqs)
    }

    /// Lent messages sent void since the last call (see [`Alink::send_lent`]), each once.
    /// A message may be listed although the peer got it whole (its acknowledgement was
    /// lost with the link): sending its memory again is then merely redundant.
    pub fn take_lost(&self) -> Vec<u64> {
        std::mem::take(&mut *lock(&self.shared.lost))
    }

    /// From now on, the payload of each segmented message is read straight into the
    /// places `placer` returns for it (given its checked head), or into a pooled buffer
    /// when it returns None. Delivered messages say which ([`InMsg::at`]); a placed
    /// message's segments were checked as they arrived, before it counts. See
    /// [`crate::reorder`] for the rules that make writing in place safe, and
    /// [`Placement::new`] for what the destinations must guarantee.
    pub fn set_placer(
        &self,
        placer: impl Fn(&PlaceRequest<'_>) -> Option<Placement> + Send + Sync + 'static,
    ) {
        *lock(&self.shared.placer) = Some(Arc::new(placer));
    }

    /// Payloads go into pooled buffers again (messages being placed now finish).
    pub fn clear_placer(&self) {
        *lock(&self.shared.placer) = None;
    }

    /// Messages received whole and deliverable in order by [`Alink::recv`] now.
    pub fn ready_to_recv(&self) -> usize {
        lock(&self.shared.rx).ready_len()
    }

    /// Messages whose payloads are being written in place right now.
    pub fn placing(&self) -> usize {
        lock(&self.shared.rx).claimed()
    }

    fn push(
        &self,
        head: Vec<u8>,
        payload: Vec<Bytes>,
        seg: Option<SegOpts>,
        lent: Option<Arc<Lent>>,
        deadline: Option<Instant>,
    ) -> Result<u64, AlinkError> {
        let version = self.session_version();
        if seg.is_some() && version < crate::handshake::SEGMENTED_SINCE {
            return Err(AlinkError::SegmentedUnsupported {
                version,
                need: crate::handshake::SEGMENTED_SINCE,
            });
        }
        let len = head.len()
            + payload.iter().map(|p| p.len()).sum::<usize>()
            + lent.as_ref().map_or(0, |l| l.len());
        if len > self.shared.cfg.max_frame_body as usize {
            return Err(AlinkError::TooLarge {
                len,
                max: self.shared.cfg.max_frame_body,
            });
        }
        let mut tx = lock(&self.shared.tx);
        loop {
            if self.shared.stop.load(Ordering::Relaxed) {
                drop(tx);
                return Err(self.shared.closed_error());
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
            tx = self.shared.tx_room.wait_timeout_or_recover(tx, wait).0;
        }
        let seq = tx
            .push_msg(head, payload, seg, lent)
            .ok_or(AlinkError::Timeout)?;
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
                self.after_consume(ack, (m.body.len() + m.placed_len) as u64, has_more);
                return Ok(Some(m));
            }
            if self.shared.stop.load(Ordering::Relaxed) {
                drop(rx);
                return Err(self.shared.closed_error());
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(None);
            }
            rx = self
                .shared
                .rx_ready
                .wait_timeout_or_recover(rx, deadline - now)
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
            if self.shared.stop.load(Ordering::Relaxed) {
                drop(tx);
                return Err(self.shared.closed_error());
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(AlinkError::Timeout);
            }
            tx = self
                .shared
                .tx_room
                .wait_timeout_or_recover(tx, (deadline - now).min(Duration::from_millis(50)))
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
                .wait_timeout_or_recover(q, deadline - now)
                .0;
        }
    }

    /// How the receive-buffer pool has done (buffers reused against allocated).
    pub fn rx_pool_stats(&self) -> crate::buf::PoolStats {
        self.shared.rx_pool.stats()
    }

    /// The protocol version the peer and this node speak: that of the latest
    /// authenticated session (the lower of the two nodes' versions; see
    /// [`crate::handshake::accepts`]), or this node's before any session.
    pub fn session_version(&self) -> u16 {
        match self.shared.session_version.load(Ordering::Relaxed) {
            0 => self.shared.cfg.protocol_version,
            v => v,
        }
    }

    /// This instance's incarnation (random, picked at start; what the peer's links are
    /// bound to).
    pub fn incarnation(&self) -> u64 {
        lock(&self.shared.incarnation).own()
    }

    /// The peer instance this A-Link's links serve (None: no link yet, or a peer without
    /// incarnations).
    pub fn peer_incarnation(&self) -> Option<u64> {
        lock(&self.shared.incarnation).bound()
    }

    /// (old, new) once a new peer instance ended this A-Link's session (see
    /// [`Event::PeerRestarted`]).
    pub fn peer_restarted(&self) -> Option<(u64, u64)> {
        lock(&self.shared.incarnation).ended()
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

    /// Sends a side message (see [`crate::side`]) with the next heartbeat of every link
    /// that is up now, without waiting for the message window; best effort (a link that
    /// dies first loses it). False: longer than [`crate::side::MAX_SIDE_LEN`].
    pub fn send_side(&self, msg: &[u8]) -> bool {
        if !lock(&self.shared.side_tx).push(msg) {
            return false;
        }
        for l in &self.shared.links {
            if let Some(c) = lock(&l.conn).as_ref() {
                c.hb_due.store(true, Ordering::Release);
            }
        }
        drop(lock(&self.shared.tx));
        self.shared.tx_work.notify_all();
        true
    }

    /// The side messages received since the last call, oldest first (each once, from
    /// whichever link brought it first).
    pub fn recv_side(&self) -> Vec<Vec<u8>> {
        lock(&self.shared.side_rx).drain()
    }

    /// Messages received twice (resent after a link failure) and dropped.
    pub fn duplicates_dropped(&self) -> u64 {
        lock(&self.shared.rx).duplicates()
    }
}

/// A random instance id for this handle's side messages (time-derived if the kernel's
/// generator fails: it only has to differ from the previous handle's).
fn side_instance() -> u64 {
    match crate::handshake::random_nonce() {
        Ok(n) => {
            let mut w = [0u8; 8];
            w.copy_from_slice(&n[..8]);
            u64::from_le_bytes(w)
        }
        Err(_) => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64),
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
