//! One authenticated connection: its writer thread is started, its reader loop runs
//! here (frames to the receive side, heartbeats and link health), and when it dies
//! the link's unacknowledged messages move to the other links.

use crate::frame::Kind;
use crate::frame::{PlaceRequest, Placement};
use crate::health::HealthAction;
use crate::reorder::{InMsg, PayloadAt};
use log::{info, warn};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, TryRecvError};
use std::sync::Arc;

use super::events::Event;
use super::shared::{is_timeout, lock, Conn, Shared};
use super::writer::writer;
use crate::frame::{FrameDecoder, FrameEncoder};
use std::net::SocketAddr;

/// An authenticated connection ready to carry traffic.
pub(super) struct Authed {
    pub(super) stream: TcpStream,
    pub(super) peer: SocketAddr,
    pub(super) enc: FrameEncoder,
    pub(super) dec: FrameDecoder,
}
/// Runs one authenticated connection until it dies. Returns a replacement connection if the
/// peer reconnected on this link meanwhile.
pub(super) fn run_conn(
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
    {
        // Placed payloads: claim the message first (see `reorder`), then ask the
        // receiver's placer; a claim the placer declines is given back.
        let s = shared.clone();
        dec.set_placer(Box::new(move |req| place(&s, link, req)));
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
    lock(&shared.side_tx).link_up(link);
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
                    if let Err(e) = on_frame(shared, frame, link) {
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
    if let Some(seq) = dec.placing() {
        // Cut off mid-payload (or the frame failed its checks): its places hold part of
        // it. Another copy, parked meanwhile, resolves it now; else a resend or void will.
        abandon(shared, seq, link);
    }
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

/// The decoder's placer on `link`: a claim, then the receiver's placer.
fn place(shared: &Shared, link: usize, req: &PlaceRequest<'_>) -> Option<Placement> {
    let placer = lock(&shared.placer).clone()?;
    if !lock(&shared.rx).try_claim(req.msg_seq, req.barrier, link) {
        return None;
    }
    let p = placer(req);
    if p.is_none() {
        abandon(shared, req.msg_seq, link);
    }
    p
}

fn abandon(shared: &Shared, seq: u64, link: usize) {
    let mut rx = lock(&shared.rx);
    match rx.abandon(seq, link) {
        Ok(_) => {
            if rx.has_ready() {
                shared.rx_ready.notify_all();
            }
        }
        Err(e) => warn!("alink link {link}: message {seq}: {e}"),
    }
}

pub(super) fn on_frame(
    shared: &Shared,
    frame: crate::frame::Frame,
    link: usize,
) -> Result<(), String> {
    match frame.header.kind {
        Kind::Data => {
            let mut msg = InMsg::new(
                frame.header.msg_seq,
                frame.header.head_len as usize,
                frame.body,
            );
            if let Some(s) = frame.seg {
                msg.at = if s.void {
                    PayloadAt::Lost
                } else if let Some(p) = &s.placed {
                    msg.placed_len = p.len();
                    PayloadAt::Placed
                } else {
                    PayloadAt::InBody
                };
                msg.torn = s.torn;
                msg.seg_size = s.seg_size;
            }
            let mut rx = lock(&shared.rx);
            rx.on_message_from(msg, link).map_err(|e| e.to_string())?;
            if rx.has_ready() {
                shared.rx_ready.notify_all();
            }
            Ok(())
        }
        Kind::Heartbeat => {
            if !frame.body.is_empty() {
                lock(&shared.side_rx).on_body(&frame.body)?;
            }
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

/// Whether bytes are waiting to be read on `stream` (FIONREAD), without consuming them.
pub(super) fn bytes_pending(stream: &TcpStream) -> bool {
    use std::os::fd::AsRawFd;
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one c_int through the pointer, which points at `n`, alive
    // for the call; the fd is owned by `stream`, open for the duration of the call.
    let rc = unsafe { libc::ioctl(stream.as_raw_fd(), libc::FIONREAD, &mut n) };
    rc == 0 && n > 0
}
