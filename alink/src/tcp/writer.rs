//! The writer thread of one connection: heartbeats and acks first, then the messages
//! the send window assigns to this link, each with one vectored write (header, head and
//! the caller's payload buffers, no copies). A segmented message is written chunk by
//! chunk instead: the chunk's segment CRCs are computed just before its write, so the
//! socket copy reads the chunk from cache, and for memory that may change under the send
//! (guest memory) computed again after it, the changed segments marked torn.

use crate::frame::{seg_trailer, FrameEncoder, Kind, SegCrcs, SegInfo, HEADER_LEN};
use crate::linkset::{OutMsg, SegOpts};
use log::debug;
use std::io::{self, IoSlice, Write};
use std::net::TcpStream;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use twinrun_lock::CondvarExt;

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
                tx = shared.tx_work.wait_timeout_or_recover(tx, tick).0;
            }
        };
        let r = match &work {
            Work::Heartbeat(ack) => {
                // Side messages ride on heartbeats (one each); none: a bare heartbeat.
                let side = lock(&shared.side_tx).take_for(link);
                let r = if side.is_empty() {
                    match enc.header(Kind::Heartbeat, *ack, &[], &[]) {
                        Some(h) => stream.write_all(&h[..HEADER_LEN]),
                        None => Err(io::Error::other("heartbeat exceeds frame limit")),
                    }
                } else {
                    side.iter().try_for_each(|body| {
                        match enc.header(Kind::Heartbeat, *ack, body, &[]) {
                            Some(h) => write_all_vectored(
                                &mut stream,
                                &mut [IoSlice::new(&h), IoSlice::new(body)],
                            ),
                            None => Err(io::Error::other("side message exceeds frame limit")),
                        }
                    })
                };
                if r.is_ok() {
                    shared.ack_sent.fetch_max(*ack, Ordering::Relaxed);
                    shared.bytes_since_ack.store(0, Ordering::Relaxed);
                }
                r
            }
            Work::Msg(m) if m.seg.is_some() => {
                let opts = m.seg.unwrap_or_default();
                match &m.lent {
                    Some(lent) => match lent.borrow() {
                        Some(mut b) => {
                            let r = write_segmented(&mut stream, &mut enc, m, &b.slices(), opts);
                            if r.is_ok() {
                                b.set_written();
                            }
                            r.map(drop)
                        }
                        None => {
                            // The loan ended before this (re)send: the payload is gone.
                            let r = write_void(&mut stream, &mut enc, m, opts);
                            if r.is_ok() && !m.lost_reported.swap(true, Ordering::AcqRel) {
                                lock(&shared.lost).push(m.seq);
                                debug!(
                                    "alink link {link}: message {} lost (lent payload gone)",
                                    m.seq
                                );
                            }
                            r.map(drop)
                        }
                    },
                    None => {
                        let slices: Vec<&[u8]> = m.payload.iter().map(|b| b.as_ref()).collect();
                        write_segmented(&mut stream, &mut enc, m, &slices, opts).map(drop)
                    }
                }
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

/// Payload bytes per vectored write of a segmented frame: the chunk the CRC pass just
/// read must still be in cache (L2) when the socket copy reads it.
pub(super) const SEG_WRITE_CHUNK: usize = 128 << 10;

/// The header's barrier field for message `seq` placed after `barrier`: 0 (none) when
/// there is none or it lies beyond what the header can say (older than any window, so
/// consumed long ago).
fn barrier_delta(seq: u64, barrier: u64) -> u32 {
    if barrier == 0 {
        return 0;
    }
    // A barrier at or after the message itself makes no sense: the message before it.
    let barrier = barrier.min(seq.saturating_sub(1));
    u32::try_from(seq - barrier).unwrap_or(0)
}

/// Spans of a payload given as slices, taken in order.
struct Cursor<'a> {
    slices: &'a [&'a [u8]],
    idx: usize,
    off: usize,
}

impl<'a> Cursor<'a> {
    /// The next `len` bytes as spans (fewer at the payload's end).
    fn take(&mut self, mut len: usize, out: &mut Vec<&'a [u8]>) {
        while len > 0 && self.idx < self.slices.len() {
            let s = self.slices[self.idx];
            let n = (s.len() - self.off).min(len);
            if n > 0 {
                out.push(&s[self.off..self.off + n]);
            }
            self.off += n;
            len -= n;
            if self.off == s.len() {
                self.idx += 1;
                self.off = 0;
            }
        }
    }
}

/// Writes message `m` as a segmented frame with `payload`. Returns the torn segments.
pub(super) fn write_segmented(
    w: &mut impl Write,
    enc: &mut FrameEncoder,
    m: &OutMsg,
    payload: &[&[u8]],
    opts: SegOpts,
) -> io::Result<usize> {
    let payload_len: usize = payload.iter().map(|s| s.len()).sum();
    let info = SegInfo {
        seg_size: opts.seg_size,
        barrier_delta: barrier_delta(m.seq, opts.barrier),
        void: false,
    };
    let hdr = enc
        .segmented_header(m.seq, &m.head, payload_len, info)
        .ok_or_else(|| io::Error::other("segmented message exceeds the frame limits"))?;
    let seg = opts.seg_size as usize;
    let chunk = (SEG_WRITE_CHUNK / seg).max(1) * seg;
    let mut crcs = Vec::with_capacity(SegCrcs::count(payload_len, opts.seg_size));
    let mut torn: Vec<u32> = Vec::new();
    let mut cursor = Cursor {
        slices: payload,
        idx: 0,
        off: 0,
    };
    let mut spans: Vec<&[u8]> = Vec::new();
    let mut off = 0;
    let mut first = true;
    loop {
        let len = chunk.min(payload_len - off);
        spans.clear();
        cursor.take(len, &mut spans);
        let mut before = SegCrcs::new(opts.seg_size);
        for s in &spans {
            before.feed(s);
        }
        let before = before.finish();
        let mut iov = Vec::with_capacity(spans.len() + 2);
        if first {
            iov.push(IoSlice::new(&hdr));
            iov.push(IoSlice::new(&m.head));
        }
        iov.extend(spans.iter().map(|s| IoSlice::new(s)));
        write_all_vectored(w, &mut iov)?;
        if opts.volatile {
            // The memory may have changed under the write (that is what is checked):
            // hide the spans' identity from the optimiser so this pass reads it again.
            let mut after = SegCrcs::new(opts.seg_size);
            for s in std::hint::black_box(&spans) {
                after.feed(std::hint::black_box(s));
            }
            for (k, (b, a)) in before.iter().zip(after.finish()).enumerate() {
                if *b != a {
                    torn.push((crcs.len() + k) as u32);
                }
            }
        }
        crcs.extend(before);
        off += len;
        first = false;
        if off >= payload_len {
            break;
        }
    }
    w.write_all(&seg_trailer(&crcs, &torn))?;
    Ok(torn.len())
}

/// Writes a void frame for message `m`: its head, no payload.
pub(super) fn write_void(
    w: &mut impl Write,
    enc: &mut FrameEncoder,
    m: &OutMsg,
    opts: SegOpts,
) -> io::Result<usize> {
    let info = SegInfo {
        seg_size: opts.seg_size,
        barrier_delta: barrier_delta(m.seq, opts.barrier),
        void: true,
    };
    let hdr = enc
        .segmented_header(m.seq, &m.head, 0, info)
        .ok_or_else(|| io::Error::other("void message exceeds the frame limits"))?;
    write_all_vectored(w, &mut [IoSlice::new(&hdr), IoSlice::new(&m.head)])?;
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::FrameDecoder;

    fn msg(seq: u64, opts: SegOpts) -> OutMsg {
        OutMsg {
            seq,
            head: b"head".to_vec(),
            payload: Vec::new(),
            seg: Some(opts),
            lent: None,
            lost_reported: Default::default(),
        }
    }

    fn pair() -> (FrameEncoder, FrameDecoder) {
        let mut e = FrameEncoder::new(64 << 20);
        let mut d = FrameDecoder::new(64 << 20);
        e.set_session_key(b"k");
        d.set_session_key(b"k");
        (e, d)
    }

    #[test]
    fn segmented_writes_decode_whatever_the_slices() {
        let data: Vec<u8> = (0..(3 * SEG_WRITE_CHUNK + 5000) as u32)
            .map(|i| (i ^ (i >> 9)) as u8)
            .collect();
        // Slices cut at odd places, across segment and chunk boundaries.
        let cuts = [0usize, 1, 4095, 4097, SEG_WRITE_CHUNK + 3, data.len()];
        let slices: Vec<&[u8]> = cuts.windows(2).map(|w| &data[w[0]..w[1]]).collect();
        for volatile in [false, true] {
            let (mut e, mut d) = pair();
            let opts = SegOpts {
                seg_size: 4096,
                volatile,
                barrier: 3,
            };
            let mut wire = Vec::new();
            let torn = write_segmented(&mut wire, &mut e, &msg(5, opts), &slices, opts).unwrap();
            assert_eq!(torn, 0);
            write_void(&mut wire, &mut e, &msg(6, opts), opts).unwrap();
            let f = d.feed(&wire).unwrap();
            assert_eq!(f.len(), 2);
            assert_eq!(f[0].head(), b"head");
            assert_eq!(f[0].payload(), &data[..]);
            let s = f[0].seg.as_ref().unwrap();
            assert_eq!((s.barrier, s.torn.len()), (3, 0));
            assert!(f[1].seg.as_ref().unwrap().void);
            assert_eq!(f[1].seg.as_ref().unwrap().barrier, 3);
        }
    }

    #[test]
    fn barrier_deltas() {
        assert_eq!(barrier_delta(10, 0), 0);
        assert_eq!(barrier_delta(10, 7), 3);
        assert_eq!(barrier_delta(10, 10), 1);
        assert_eq!(barrier_delta(10, 99), 1);
        assert_eq!(barrier_delta(u64::MAX, 1), 0);
    }

    /// Memory rewritten while its chunk is being written: the writer sees the change
    /// and marks the segment torn; the receiver accepts the frame and reports it.
    #[test]
    fn memory_changed_during_the_write_is_marked_torn() {
        /// A writer that rewrites the first byte of the lent memory during each write,
        /// as a guest would.
        struct Racing {
            out: Vec<u8>,
            target: *mut u8,
        }
        impl Write for Racing {
            fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
                self.out.extend_from_slice(buf);
                Ok(buf.len())
            }
            fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
                let n = bufs.iter().map(|b| b.len()).sum();
                for b in bufs {
                    self.out.extend_from_slice(b);
                }
                // SAFETY: `target` points into `page`, alive for the test; nothing else
                // reads it concurrently (the writer reads it before and after this call).
                unsafe { *self.target = self.target.read().wrapping_add(1) };
                Ok(n)
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let mut page = vec![9u8; 2 * 4096];
        let target = page.as_mut_ptr().wrapping_add(4096 + 10);
        let (mut e, mut d) = pair();
        let opts = SegOpts {
            seg_size: 4096,
            volatile: true,
            barrier: 0,
        };
        let mut w = Racing {
            out: Vec::new(),
            target,
        };
        // SAFETY: the slice is only read by write_segmented while `page` lives; the
        // racing writer's store models a guest write the CRC passes must notice.
        let view: &[u8] = unsafe { std::slice::from_raw_parts(page.as_ptr(), page.len()) };
        let torn = write_segmented(&mut w, &mut e, &msg(1, opts), &[view], opts).unwrap();
        assert_eq!(torn, 1);
        let f = d.feed(&w.out).unwrap();
        assert_eq!(f[0].seg.as_ref().unwrap().torn, vec![1]);
        // Stable memory (volatile off) with the same race: nothing is marked, and the
        // receiver refuses the frame (the bytes do not match their CRC).
        let (mut e, mut d) = pair();
        let stable = SegOpts {
            volatile: false,
            ..opts
        };
        let mut w = Racing {
            out: Vec::new(),
            target,
        };
        // Write the data as the socket copy would have seen it after the change.
        let torn = write_segmented(&mut w, &mut e, &msg(1, stable), &[view], stable).unwrap();
        assert_eq!(torn, 0);
        let hdr_head = HEADER_LEN + 4;
        w.out[hdr_head + 4096 + 10] = w.out[hdr_head + 4096 + 10].wrapping_add(1);
        assert!(d.feed(&w.out).is_err());
        drop(page);
    }
}
