//! Making authenticated connections: dialing (the lower node id), listening and
//! authenticating accepted connections on short-lived threads (the higher), the
//! handshake on a socket, and the per-link manager that reconnects with backoff.

use super::events::Event;
use crate::frame::{FrameDecoder, FrameEncoder, FrameError, Kind};
use crate::handshake::{random_nonce, Handshake, HandshakeError, HsStep, Role};
use crate::incarnation::Verdict;
use log::{debug, info, warn};
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::config::LinkAddrs;
use super::conn::{run_conn, Authed};
use super::shared::{is_timeout, lock, Shared};

/// Accepted connections being authenticated at once, per link.
pub const MAX_PENDING_HANDSHAKES: usize = 4;

#[derive(Debug)]
pub(super) enum HsFail {
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

pub(super) fn handshake(
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
    let (own, bound) = {
        let inc = lock(&shared.incarnation);
        (inc.own(), inc.bound())
    };
    let (hs, _) = Handshake::new(shared.handshake_config(), role, nonce, shared.now());
    let mut hs = hs.with_incarnation(own, bound);
    let send = |enc: &mut FrameEncoder,
                stream: &mut TcpStream,
                kind: Kind,
                body: &[u8]|
     -> Result<(), HsFail> {
        let wire = enc
            .encode(kind, 0, &[], body)
            .ok_or_else(|| HsFail::Hs(HandshakeError::Malformed("hello too large".into())))?;
        stream.write_all(&wire).map_err(HsFail::Io)
    };
    let hello = hs.hello_body().map_err(HsFail::Hs)?;
    send(&mut enc, &mut stream, Kind::Hello, &hello)?;
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
            HsStep::Send(msg) => {
                let body = postcard::to_stdvec(&msg)
                    .map_err(|e| HsFail::Hs(HandshakeError::Malformed(e.to_string())))?;
                send(&mut enc, &mut stream, Kind::Auth, &body)?
            }
            HsStep::Done(session) => {
                // Only an authenticated peer may bind this bundle or end its session.
                let verdict = lock(&shared.incarnation).judge(session.peer_ext);
                match verdict {
                    Verdict::Accept => {}
                    Verdict::Refuse(r) => return Err(HsFail::Hs(HandshakeError::Incarnation(r))),
                    Verdict::NewPeer { old, new } => {
                        end_session(shared, old, new);
                        return Err(HsFail::Hs(HandshakeError::Incarnation(
                            crate::incarnation::Refusal::NewPeer { old, new },
                        )));
                    }
                }
                if session.version != shared.cfg.protocol_version {
                    info!(
                        "alink: peer {peer} speaks an adjacent protocol version; session at {} (ours {})",
                        session.version, shared.cfg.protocol_version
                    );
                }
                shared
                    .session_version
                    .store(session.version, Ordering::Relaxed);
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

/// A new peer instance replaced the one this A-Link served: the session ends at once.
/// Told to the layer above first (the event, then `send`/`recv` fail with
/// `PeerRestarted`), then every thread winds down as at a shutdown: the links to the
/// old instance close, nothing more is accepted or dialed.
fn end_session(shared: &Shared, old: u64, new: u64) {
    shared.emit(Event::PeerRestarted { old, new });
    shared.stop.store(true, Ordering::SeqCst);
    for l in &shared.links {
        if let Some(c) = lock(&l.conn).as_ref() {
            c.kill();
        }
    }
    {
        let _g = lock(&shared.tx);
        shared.tx_work.notify_all();
        shared.tx_room.notify_all();
    }
    shared.rx_ready.notify_all();
}

pub(super) fn dial(shared: &Shared, addrs: LinkAddrs) -> io::Result<(TcpStream, SocketAddr)> {
    let domain = socket2::Domain::for_address(addrs.remote);
    let sock = socket2::Socket::new(domain, socket2::Type::STREAM, Some(socket2::Protocol::TCP))?;
    if !addrs.local.ip().is_unspecified() {
        sock.bind(&SocketAddr::new(addrs.local.ip(), 0).into())?;
    }
    let timeout = shared.cfg.handshake_timeout.min(Duration::from_secs(1));
    sock.connect_timeout(&addrs.remote.into(), timeout)?;
    Ok((sock.into(), addrs.remote))
}

pub(super) fn listen(
    shared: Arc<Shared>,
    link: usize,
    listener: TcpListener,
    out: SyncSender<Authed>,
) {
    while !shared.stop.load(Ordering::Relaxed) {
        let (stream, peer) = match listener.accept() {
            Ok(x) => x,
            Err(e) if is_timeout(&e) => {
                // Woken by the next connection at once (a dialer's first attempt is
                // served without a poll's delay), or after 20 ms to check `stop`.
                wait_readable(&listener, Duration::from_millis(20));
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

/// Waits until `listener` has a connection to accept, or `max`.
fn wait_readable(listener: &TcpListener, max: Duration) {
    use std::os::fd::AsRawFd;
    let mut p = libc::pollfd {
        fd: listener.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd, for the duration of the call; `listener` outlives it.
    let r = unsafe { libc::poll(&mut p, 1, max.as_millis() as libc::c_int) };
    if r < 0 {
        // EINTR or a bad state: do not spin.
        std::thread::sleep(max);
    }
}

/// Dials (or waits for accepted connections) and runs them, forever until stop.
pub(super) fn link_manager(shared: Arc<Shared>, link: usize, incoming: Option<Receiver<Authed>>) {
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
                        let (wait, next) = retry_after(&e, backoff, &shared.cfg);
                        sleep_unless_stopped(&shared, wait);
                        backoff = next;
                        continue;
                    }
                }
            }
        };
        next = run_conn(&shared, link, authed, incoming.as_ref());
    }
}

/// After a failed dial: how long to wait, and the back-off after that. A refused
/// connection (the peer's host is up, nothing listens yet) is tried again after
/// `refused_retry` and leaves the back-off as it was; anything else (a timeout, an
/// unreachable host, a failed handshake) waits the back-off, which doubles up to
/// `reconnect_max` (so does a refusal with a zero `refused_retry`).
fn retry_after(e: &HsFail, backoff: Duration, cfg: &super::AlinkConfig) -> (Duration, Duration) {
    match e {
        HsFail::Io(io)
            if io.kind() == io::ErrorKind::ConnectionRefused && !cfg.refused_retry.is_zero() =>
        {
            (cfg.refused_retry.min(backoff), backoff)
        }
        _ => (backoff, (backoff * 2).min(cfg.reconnect_max)),
    }
}

pub(super) fn sleep_unless_stopped(shared: &Shared, d: Duration) {
    let end = Instant::now() + d;
    while !shared.stop.load(Ordering::Relaxed) {
        let now = Instant::now();
        if now >= end {
            return;
        }
        std::thread::sleep((end - now).min(Duration::from_millis(20)));
    }
}
