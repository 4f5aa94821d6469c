//! The writer thread of one connection: heartbeats and acks first, then the messages
//! the send window assigns to this link, each with one vectored write (header, head and
//! the caller's payload buffers, no copies).

use crate::frame::{FrameEncoder, Kind, HEADER_LEN};
use log::debug;
use std::io::{self, IoSlice, Write};
use std::net::TcpStream;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::shared::{lock, Conn, Shared};

pub(super) fn write_all_vectored(
    w: &mut impl Write,
    mut bufs: &mut [IoSlice<'_>],
) -> io::Result<()> {
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

enum Work {
    Msg(Arc<crate::linkset::OutMsg>),
    Heartbeat(u64),
}

pub(super) fn writer(
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
