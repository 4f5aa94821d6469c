//! The incremental frame decoder: header, body (into a pooled buffer or, for a placed
//! segmented frame, straight into the receiver's destinations), trailer.

use std::os::fd::AsRawFd;

use super::seg::{self, SegCrcs};
use super::{
    le_u32, le_u64, parse_flags, Frame, FrameError, FrameKey, Header, Kind, SegFrame,
    FRAME_VERSION, HANDSHAKE_MAX_BODY, HEADER_AUTH_LEN, HEADER_LEN, MAGIC, MAX_BODY_CEILING,
    MAX_SEG_HEAD,
};
use crate::buf::{Buf, BufPool};

/// Where a placed frame's payload goes: destination ranges, in payload order, whose
/// lengths add up to the payload's length.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    /// `(address, len)` of each destination.
    dests: Vec<(usize, usize)>,
}

// SAFETY: a Placement is only addresses; whoever builds one promised (`Placement::new`)
// that the memory may be written from the decoder's thread.
unsafe impl Send for Placement {}

impl Placement {
    /// # Safety
    ///
    /// Every range `[ptr, ptr + len)` must stay valid for writes, and must not be read or
    /// written by anyone else as meaningful data, until the message is delivered (then its
    /// bytes are the payload), reported lost, or the decoder (for an A-Link: the
    /// [`crate::Alink`]) is dropped; the ranges must not overlap each other.
    pub unsafe fn new(dests: Vec<(*mut u8, usize)>) -> Placement {
        Placement {
            dests: dests.into_iter().map(|(p, l)| (p as usize, l)).collect(),
        }
    }

    /// Total bytes.
    pub fn len(&self) -> usize {
        self.dests.iter().map(|d| d.1).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The destination ranges, as addresses.
    pub fn ranges(&self) -> &[(usize, usize)] {
        &self.dests
    }
}

/// What the receiver sees of a segmented frame before its payload: it may return a
/// [`Placement`] for the payload, or None to have it read into a pooled buffer.
#[derive(Debug)]
pub struct PlaceRequest<'a> {
    pub msg_seq: u64,
    /// The message this one may be placed after (0 = none).
    pub barrier: u64,
    /// The head (its checksum already verified).
    pub head: &'a [u8],
    pub payload_len: usize,
    pub seg_size: u32,
}

/// Decides where placed payloads go (see [`PlaceRequest`]).
pub type Placer = Box<dyn FnMut(&PlaceRequest<'_>) -> Option<Placement> + Send>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Header,
    /// Plain frame: the whole body into `body`.
    Body,
    /// Segmented frame: the head into `body`.
    Head,
    /// Segmented frame: the payload into `body` after the head, or into the placement.
    Payload,
    /// Segmented frame: the trailer.
    Trailer,
}

/// A segmented frame in progress.
#[derive(Debug)]
struct SegRx {
    payload_len: usize,
    nseg: usize,
    placed: Option<Placement>,
    /// Payload bytes received.
    filled: usize,
    /// Placement cursor: destination index and offset in it.
    dest: usize,
    dest_off: usize,
    crcs: SegCrcs,
    trailer: Buf,
    trailer_need: usize,
    trailer_filled: usize,
    fixed_done: bool,
}

/// Incremental frame decoder. Use [`FrameDecoder::read_buf`] + [`FrameDecoder::advance`] to
/// read from a socket straight into the frame, or [`FrameDecoder::feed`] for byte slices.
pub struct FrameDecoder {
    key: FrameKey,
    session: bool,
    expected_seq: u64,
    max_body: u32,
    hdr: [u8; HEADER_LEN],
    hdr_filled: usize,
    pending: Option<Header>,
    phase: Phase,
    /// Body of the pending frame (from `pool`), filled up to `body_filled`.
    body: Option<Buf>,
    body_filled: usize,
    /// CRC32C of `body[..body_filled]` (of the head, for a segmented frame), extended
    /// after every read while those bytes are still in cache (one pass over a
    /// multi-MiB body at the end would read it back from memory).
    body_crc: u32,
    seg: Option<SegRx>,
    pool: BufPool,
    placer: Option<Placer>,
    /// The message whose payload was granted a placement and has not completed (also
    /// after the frame failed: its destinations hold part of it).
    placing: Option<u64>,
    failed: Option<FrameError>,
}

impl std::fmt::Debug for FrameDecoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FrameDecoder")
            .field("session", &self.session)
            .field("expected_seq", &self.expected_seq)
            .field("phase", &self.phase)
            .field("failed", &self.failed)
            .finish_non_exhaustive()
    }
}

impl FrameDecoder {
    /// A new decoder in handshake phase (only Hello and Auth, bodies up to
    /// [`HANDSHAKE_MAX_BODY`]), with a pool of its own.
    pub fn new(max_body: u32) -> FrameDecoder {
        FrameDecoder::with_pool(max_body, BufPool::default())
    }

    /// As [`FrameDecoder::new`], taking body buffers from `pool` (shared by the links
    /// of one A-Link: the consumer's drops feed every reader).
    pub fn with_pool(max_body: u32, pool: BufPool) -> FrameDecoder {
        FrameDecoder {
            key: FrameKey::handshake(),
            session: false,
            expected_seq: 0,
            max_body: max_body.min(MAX_BODY_CEILING),
            hdr: [0u8; HEADER_LEN],
            hdr_filled: 0,
            pending: None,
            phase: Phase::Header,
            body: None,
            body_filled: 0,
            body_crc: 0,
            seg: None,
            pool,
            placer: None,
            placing: None,
            failed: None,
        }
    }

    /// Switches to the session phase: frames must carry the session key's tag and only Data
    /// and Heartbeat kinds are accepted.
    pub fn set_session_key(&mut self, key: &[u8]) {
        self.key = FrameKey::new(key);
        self.session = true;
    }

    /// Asks `placer` where the payload of each segmented frame goes, once its head is in
    /// and checked.
    pub fn set_placer(&mut self, placer: Placer) {
        self.placer = Some(placer);
    }

    /// True between frames (no partial frame buffered).
    pub fn at_boundary(&self) -> bool {
        self.hdr_filled == 0 && self.pending.is_none()
    }

    /// The message whose payload is being written into a placement now (granted, not
    /// finished): if the stream ends here, its destinations hold a partial payload.
    pub fn placing(&self) -> Option<u64> {
        self.placing
    }

    /// Where the next bytes from the stream go. Never empty unless the decoder failed.
    /// It never spans two frames, so a caller reading into it never consumes bytes of a frame
    /// that must be decoded under a different key.
    pub fn read_buf(&mut self) -> &mut [u8] {
        if self.failed.is_some() {
            return &mut [];
        }
        let head_len = self.pending.map_or(0, |h| h.head_len as usize);
        match self.phase {
            Phase::Header => &mut self.hdr[self.hdr_filled..],
            Phase::Body => match &mut self.body {
                Some(b) => &mut b[self.body_filled..],
                None => &mut [],
            },
            Phase::Head => match &mut self.body {
                Some(b) => &mut b[self.body_filled..head_len],
                None => &mut [],
            },
            Phase::Payload => {
                let Some(s) = &mut self.seg else {
                    return &mut [];
                };
                match &s.placed {
                    Some(p) => {
                        let (addr, len) = p.dests[s.dest];
                        // SAFETY: the placement's creator promised the range is valid for
                        // writes by this decoder until the frame is finished or abandoned
                        // (`Placement::new`); `dest_off < len` while the payload is
                        // incomplete (the cursor moves on at each destination's end).
                        unsafe {
                            std::slice::from_raw_parts_mut(
                                (addr as *mut u8).add(s.dest_off),
                                len - s.dest_off,
                            )
                        }
                    }
                    None => match &mut self.body {
                        Some(b) => &mut b[head_len + s.filled..],
                        None => &mut [],
                    },
                }
            }
            Phase::Trailer => match &mut self.seg {
                Some(s) => &mut s.trailer[s.trailer_filled..s.trailer_need],
                None => &mut [],
            },
        }
    }

    /// Reads once from `fd` into the frame being decoded (header, body buffer, the
    /// placement's destinations, up to 64 of them per call, or the trailer); returns the
    /// byte count for [`FrameDecoder::advance`] (0 = end of stream).
    pub fn read_from_fd(&mut self, fd: &impl AsRawFd) -> std::io::Result<usize> {
        if self.failed.is_some() {
            return Ok(0);
        }
        if self.phase == Phase::Payload {
            if let Some(SegRx {
                placed: Some(p),
                dest,
                dest_off,
                ..
            }) = &self.seg
            {
                const MAX_IOV: usize = 64;
                let mut iov: [libc::iovec; MAX_IOV] = [libc::iovec {
                    iov_base: std::ptr::null_mut(),
                    iov_len: 0,
                }; MAX_IOV];
                let mut n = 0;
                for (i, (addr, len)) in p.dests[*dest..].iter().take(MAX_IOV).enumerate() {
                    let off = if i == 0 { *dest_off } else { 0 };
                    iov[i] = libc::iovec {
                        iov_base: (addr + off) as *mut libc::c_void,
                        iov_len: len - off,
                    };
                    n += 1;
                }
                // SAFETY: each iovec is the unfilled part of a destination the placement's
                // creator made writable for this decoder (`Placement::new`); readv(2)
                // writes at most their lengths.
                let r = unsafe { libc::readv(fd.as_raw_fd(), iov.as_ptr(), n as libc::c_int) };
                if r < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                return Ok(r as usize);
            }
        }
        let b = self.read_buf();
        // SAFETY: `b` is a live, exclusively borrowed slice (the header tail or the body
        // buffer's unfilled tail); read(2) writes at most `b.len()` bytes into it.
        let r = unsafe { libc::read(fd.as_raw_fd(), b.as_mut_ptr().cast(), b.len()) };
        if r < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(r as usize)
    }

    /// Records that `n` bytes were written into [`FrameDecoder::read_buf`] (or by
    /// [`FrameDecoder::read_from_fd`]). Returns a frame when one completes. After an
    /// error the decoder stays failed.
    pub fn advance(&mut self, n: usize) -> Result<Option<Frame>, FrameError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        let r = self.advance_inner(n);
        if let Err(e) = &r {
            self.failed = Some(e.clone());
        }
        r
    }

    fn advance_inner(&mut self, n: usize) -> Result<Option<Frame>, FrameError> {
        let Some(h) = self.pending else {
            assert!(self.hdr_filled + n <= HEADER_LEN, "advance past read_buf");
            self.hdr_filled += n;
            if self.hdr_filled < HEADER_LEN {
                return Ok(None);
            }
            let h = self.check_header()?;
            self.hdr_filled = 0;
            self.body_filled = 0;
            self.body_crc = 0;
            self.pending = Some(h);
            return match h.seg {
                None => {
                    // Bounded by check_header; filled by the reads, not zeroed here.
                    self.body = Some(self.pool.take(h.body_len as usize));
                    self.phase = Phase::Body;
                    if h.body_len == 0 {
                        return self.finish_plain();
                    }
                    Ok(None)
                }
                Some(_) => {
                    self.body = Some(self.pool.take(h.head_len as usize));
                    self.phase = Phase::Head;
                    if h.head_len == 0 {
                        return self.after_head(h);
                    }
                    Ok(None)
                }
            };
        };
        match self.phase {
            Phase::Header => unreachable!("a pending frame is past its header"),
            Phase::Body | Phase::Head => {
                let target = if self.phase == Phase::Body {
                    h.body_len as usize
                } else {
                    h.head_len as usize
                };
                assert!(self.body_filled + n <= target, "advance past read_buf");
                if let Some(b) = &self.body {
                    let fresh = &b[self.body_filled..self.body_filled + n];
                    self.body_crc = crc32c::crc32c_append(self.body_crc, fresh);
                }
                self.body_filled += n;
                if self.body_filled < target {
                    return Ok(None);
                }
                if self.phase == Phase::Body {
                    self.finish_plain()
                } else {
                    self.after_head(h)
                }
            }
            Phase::Payload => self.advance_payload(h, n),
            Phase::Trailer => {
                let Some(s) = &mut self.seg else {
                    unreachable!("trailer phase without a segmented frame")
                };
                assert!(
                    s.trailer_filled + n <= s.trailer_need,
                    "advance past read_buf"
                );
                s.trailer_filled += n;
                if s.trailer_filled < s.trailer_need {
                    return Ok(None);
                }
                if !s.fixed_done {
                    let torn = seg::torn_count(&s.trailer[..s.trailer_need], s.nseg)?;
                    s.fixed_done = true;
                    s.trailer_need += 4 * torn + 4;
                    return Ok(None);
                }
                self.finish_segmented(h)
            }
        }
    }

    /// The head of a segmented frame is in: check it, then decide where the payload goes.
    fn after_head(&mut self, h: Header) -> Result<Option<Frame>, FrameError> {
        let got = std::mem::take(&mut self.body_crc);
        if got != h.body_crc {
            return Err(FrameError::BadChecksum {
                expected: h.body_crc,
                got,
            });
        }
        let Some(info) = h.seg else {
            unreachable!("after_head of a plain frame")
        };
        let payload_len = h.payload_len();
        if info.void {
            return self.finish_segmented(h);
        }
        let head_len = h.head_len as usize;
        let mut placed = None;
        if payload_len > 0 {
            if let (Some(placer), Some(head)) = (&mut self.placer, &self.body) {
                let req = PlaceRequest {
                    msg_seq: h.msg_seq,
                    barrier: info.barrier(h.msg_seq),
                    head: &head[..head_len],
                    payload_len,
                    seg_size: info.seg_size,
                };
                // A placement that does not cover the payload exactly is the receiver's
                // bug: read into a buffer instead of writing past its ranges.
                placed = placer(&req).filter(|p| {
                    let ok = p.len() == payload_len && p.dests.iter().all(|d| d.1 > 0);
                    debug_assert!(ok, "placement does not match the payload");
                    ok
                });
            }
        }
        if placed.is_some() {
            self.placing = Some(h.msg_seq);
        } else {
            let mut body = self.pool.take(h.body_len as usize);
            if let Some(head) = &self.body {
                body[..head_len].copy_from_slice(&head[..head_len]);
            }
            self.body = Some(body);
        }
        let nseg = SegCrcs::count(payload_len, info.seg_size);
        let fixed = seg::fixed_len(nseg);
        self.seg = Some(SegRx {
            payload_len,
            nseg,
            placed,
            filled: 0,
            dest: 0,
            dest_off: 0,
            crcs: SegCrcs::new(info.seg_size),
            // Fixed part now; grown by the torn list (at most as long) and its CRC.
            trailer: self.pool.take(2 * fixed + 4),
            trailer_need: fixed,
            trailer_filled: 0,
            fixed_done: false,
        });
        self.phase = if payload_len > 0 {
            Phase::Payload
        } else {
            Phase::Trailer
        };
        Ok(None)
    }

    fn advance_payload(&mut self, h: Header, mut n: usize) -> Result<Option<Frame>, FrameError> {
        let head_len = h.head_len as usize;
        let Some(s) = &mut self.seg else {
            unreachable!("payload phase without a segmented frame")
        };
        assert!(s.filled + n <= s.payload_len, "advance past read_buf");
        match &s.placed {
            Some(p) => {
                while n > 0 {
                    let (addr, len) = p.dests[s.dest];
                    let k = (len - s.dest_off).min(n);
                    // SAFETY: these `k` bytes of the destination were just written by the
                    // caller's read into `read_buf`/`read_from_fd`; the range is valid
                    // (`Placement::new`) and nothing else writes it meanwhile.
                    let fresh =
                        unsafe { std::slice::from_raw_parts((addr + s.dest_off) as *const u8, k) };
                    s.crcs.feed(fresh);
                    s.dest_off += k;
                    s.filled += k;
                    n -= k;
                    if s.dest_off == len {
                        s.dest += 1;
                        s.dest_off = 0;
                    }
                }
            }
            None => {
                if let Some(b) = &self.body {
                    s.crcs
                        .feed(&b[head_len + s.filled..head_len + s.filled + n]);
                }
                s.filled += n;
            }
        }
        if s.filled == s.payload_len {
            self.phase = Phase::Trailer;
        }
        Ok(None)
    }

    fn check_header(&mut self) -> Result<Header, FrameError> {
        let b = &self.hdr;
        let magic = le_u32(b, 0);
        if magic != MAGIC {
            return Err(FrameError::BadMagic(magic));
        }
        if b[4] != FRAME_VERSION {
            return Err(FrameError::BadVersion(b[4]));
        }
        let kind = Kind::from_u8(b[5]).ok_or(FrameError::UnknownKind(b[5]))?;
        let flags = u16::from_le_bytes([b[6], b[7]]);
        let reserved = le_u32(b, 36);
        // Tag first: nothing from an unauthenticated header decides an allocation size or
        // reaches the protocol.
        let mut auth = [0u8; HEADER_AUTH_LEN];
        auth.copy_from_slice(&b[..HEADER_AUTH_LEN]);
        if !self.key.verify(&auth, &b[HEADER_AUTH_LEN..]) {
            return Err(FrameError::BadTag);
        }
        let seg = parse_flags(kind, flags, reserved)?;
        let h = Header {
            kind,
            link_seq: le_u64(b, 8),
            msg_seq: le_u64(b, 16),
            head_len: le_u32(b, 24),
            body_len: le_u32(b, 28),
            body_crc: le_u32(b, 32),
            seg,
        };
        if kind.is_handshake() == self.session {
            return Err(FrameError::WrongPhase(kind));
        }
        let max = if self.session {
            self.max_body
        } else {
            HANDSHAKE_MAX_BODY
        };
        if h.body_len > max {
            return Err(FrameError::TooLarge {
                len: h.body_len,
                max,
            });
        }
        if h.head_len > h.body_len {
            return Err(FrameError::HeadLen {
                head_len: h.head_len,
                body_len: h.body_len,
            });
        }
        if let Some(s) = seg {
            if h.head_len > MAX_SEG_HEAD {
                return Err(FrameError::BadSegmentLayout("head over 1 MiB"));
            }
            if s.void && h.body_len != h.head_len {
                return Err(FrameError::BadSegmentLayout("void frame with a payload"));
            }
        }
        if h.link_seq != self.expected_seq {
            return Err(FrameError::Replay {
                expected: self.expected_seq,
                got: h.link_seq,
            });
        }
        self.expected_seq += 1;
        Ok(h)
    }

    // Invariant of the decoder's phases, not of its input.
    #[allow(clippy::expect_used)]
    fn take_pending(&mut self) -> Header {
        self.phase = Phase::Header;
        self.body_filled = 0;
        self.pending
            .take()
            .expect("a frame is finished only while pending")
    }

    fn finish_plain(&mut self) -> Result<Option<Frame>, FrameError> {
        let h = self.take_pending();
        let body = self
            .body
            .take()
            .unwrap_or_else(|| Buf::from_vec(Vec::new()));
        debug_assert_eq!(body.len(), h.body_len as usize);
        let got = std::mem::take(&mut self.body_crc);
        if got != h.body_crc {
            return Err(FrameError::BadChecksum {
                expected: h.body_crc,
                got,
            });
        }
        Ok(Some(Frame {
            header: h,
            body,
            seg: None,
        }))
    }

    fn finish_segmented(&mut self, h: Header) -> Result<Option<Frame>, FrameError> {
        let Some(info) = h.seg else {
            unreachable!("finish_segmented of a plain frame")
        };
        let torn = match self.seg.take() {
            None => Vec::new(), // void: head only
            Some(s) => {
                let nseg = s.nseg;
                let crcs = s.crcs.finish();
                let torn = seg::check(&s.trailer[..s.trailer_need], nseg, &crcs)?;
                self.placing = None;
                self.take_pending();
                let body = self
                    .body
                    .take()
                    .unwrap_or_else(|| Buf::from_vec(Vec::new()));
                return Ok(Some(Frame {
                    header: h,
                    body,
                    seg: Some(SegFrame {
                        placed: s.placed,
                        torn,
                        seg_size: info.seg_size,
                        barrier: info.barrier(h.msg_seq),
                        void: false,
                    }),
                }));
            }
        };
        self.take_pending();
        let body = self
            .body
            .take()
            .unwrap_or_else(|| Buf::from_vec(Vec::new()));
        Ok(Some(Frame {
            header: h,
            body,
            seg: Some(SegFrame {
                placed: None,
                torn,
                seg_size: info.seg_size,
                barrier: info.barrier(h.msg_seq),
                void: true,
            }),
        }))
    }

    /// Feeds a byte slice; returns the frames completed by it. Bytes after an error are
    /// ignored. Allocation stays bounded by one frame body.
    pub fn feed(&mut self, mut input: &[u8]) -> Result<Vec<Frame>, FrameError> {
        let mut out = Vec::new();
        while !input.is_empty() {
            let buf = self.read_buf();
            let n = buf.len().min(input.len());
            if n == 0 {
                // Only a failed decoder has an empty read_buf.
                return Err(self.failed.clone().unwrap_or(FrameError::BadTag));
            }
            buf[..n].copy_from_slice(&input[..n]);
            input = &input[n..];
            if let Some(f) = self.advance(n)? {
                out.push(f);
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::{FrameEncoder, Kind, SegInfo, FRAME_VERSION, MAGIC};

    fn session_pair() -> (FrameEncoder, FrameDecoder) {
        let mut e = FrameEncoder::new(1 << 20);
        let mut d = FrameDecoder::new(1 << 20);
        e.set_session_key(b"k1");
        d.set_session_key(b"k1");
        (e, d)
    }

    #[test]
    fn roundtrip_in_all_split_points() {
        let (mut e, _) = session_pair();
        let mut wire = Vec::new();
        for i in 0..5u64 {
            let payload = vec![i as u8; (i as usize) * 1000];
            wire.extend(e.encode(Kind::Data, i + 1, b"head", &payload).unwrap());
        }
        wire.extend(e.encode(Kind::Heartbeat, 9, b"", b"").unwrap());
        for chunk in [1usize, 3, 55, 56, 57, 4096, wire.len()] {
            let (_, mut d) = session_pair();
            let mut frames = Vec::new();
            for c in wire.chunks(chunk) {
                frames.extend(d.feed(c).unwrap());
            }
            assert_eq!(frames.len(), 6);
            for (i, f) in frames.iter().take(5).enumerate() {
                assert_eq!(f.header.kind, Kind::Data);
                assert_eq!(f.header.msg_seq, i as u64 + 1);
                assert_eq!(f.head(), b"head");
                assert_eq!(f.payload(), &vec![i as u8; i * 1000][..]);
            }
            assert_eq!(frames[5].header.kind, Kind::Heartbeat);
            assert!(d.at_boundary());
        }
    }

    #[test]
    fn vectored_header_matches_concatenated_body() {
        let (mut e, mut d) = session_pair();
        let pages: Vec<Vec<u8>> = (0..3).map(|i| vec![i as u8; 4096]).collect();
        let slices: Vec<&[u8]> = pages.iter().map(|p| p.as_slice()).collect();
        let hdr = e.header(Kind::Data, 7, b"hd", &slices).unwrap();
        let mut wire = hdr.to_vec();
        wire.extend_from_slice(b"hd");
        for p in &pages {
            wire.extend_from_slice(p);
        }
        let f = d.feed(&wire).unwrap();
        assert_eq!(f.len(), 1);
        assert_eq!(f[0].payload().len(), 3 * 4096);
    }

    #[test]
    fn wrong_key_is_unauthenticated() {
        let mut e = FrameEncoder::new(1024);
        e.set_session_key(b"other");
        let (_, mut d) = session_pair();
        let w = e.encode(Kind::Data, 1, b"", b"x").unwrap();
        assert_eq!(d.feed(&w), Err(FrameError::BadTag));
        // Stays failed.
        assert_eq!(d.feed(&w), Err(FrameError::BadTag));
    }

    #[test]
    fn replayed_frame_is_refused() {
        let (mut e, mut d) = session_pair();
        let w0 = e.encode(Kind::Data, 1, b"", b"a").unwrap();
        let w1 = e.encode(Kind::Data, 2, b"", b"b").unwrap();
        d.feed(&w0).unwrap();
        d.feed(&w1).unwrap();
        assert_eq!(
            d.feed(&w0),
            Err(FrameError::Replay {
                expected: 2,
                got: 0
            })
        );
    }

    #[test]
    fn corrupted_body_and_header_detected() {
        let (mut e, mut d) = session_pair();
        let mut w = e.encode(Kind::Data, 1, b"", b"hello").unwrap();
        let last = w.len() - 1;
        w[last] ^= 1;
        assert!(matches!(d.feed(&w), Err(FrameError::BadChecksum { .. })));
        let (mut e, mut d) = session_pair();
        let mut w = e.encode(Kind::Data, 1, b"", b"hello").unwrap();
        w[20] ^= 1;
        assert_eq!(d.feed(&w), Err(FrameError::BadTag));
    }

    #[test]
    fn limits_and_phases() {
        let mut e = FrameEncoder::new(100);
        assert!(e.encode(Kind::Data, 0, b"", &[0u8; 101]).is_none());
        // Handshake decoder refuses data frames, session decoder refuses handshake frames.
        let mut he = FrameEncoder::new(1 << 20);
        let mut hd = FrameDecoder::new(1 << 20);
        let w = he.encode(Kind::Data, 0, b"", b"").unwrap();
        assert_eq!(hd.feed(&w), Err(FrameError::WrongPhase(Kind::Data)));
        let (_, mut sd) = session_pair();
        let mut he = FrameEncoder::new(1 << 20);
        he.set_session_key(b"k1");
        let w = he.encode(Kind::Hello, 0, b"", b"").unwrap();
        assert_eq!(sd.feed(&w), Err(FrameError::WrongPhase(Kind::Hello)));
        // Oversized handshake body refused before allocation.
        let mut he = FrameEncoder::new(1 << 20);
        let mut hd = FrameDecoder::new(1 << 20);
        let w = he.encode(Kind::Hello, 0, b"", &[0u8; 2000]).unwrap();
        assert!(matches!(hd.feed(&w), Err(FrameError::TooLarge { .. })));
    }

    #[test]
    fn reads_from_a_socket_into_pooled_bodies() {
        use std::io::Write;
        let (mut w, r) = std::os::unix::net::UnixStream::pair().unwrap();
        let (mut e, mut d) = session_pair();
        let payload: Vec<u8> = (0..100_000u32).map(|i| i as u8).collect();
        let mut wire = e.encode(Kind::Data, 1, b"h", &payload).unwrap();
        wire.extend(e.encode(Kind::Heartbeat, 5, b"", b"").unwrap());
        let t = std::thread::spawn(move || w.write_all(&wire).unwrap());
        let mut frames = Vec::new();
        while frames.len() < 2 {
            let n = d.read_from_fd(&r).unwrap();
            assert!(n > 0);
            if let Some(f) = d.advance(n).unwrap() {
                frames.push(f);
            }
        }
        t.join().unwrap();
        assert_eq!(frames[0].payload(), &payload[..]);
        assert_eq!(frames[1].header.msg_seq, 5);
    }

    #[test]
    fn big_frames_over_a_socket_in_partial_reads() {
        use std::io::Write;
        let (mut w, r) = std::os::unix::net::UnixStream::pair().unwrap();
        let mut e = FrameEncoder::new(1 << 22);
        e.set_session_key(b"k");
        let payload: Vec<u8> = (0..(1u32 << 20))
            .map(|i| (i * 7 + i / 4096) as u8)
            .collect();
        let mut wire = Vec::new();
        for i in 0..8usize {
            let p = &payload[..(1 << 20) - i * 1000];
            wire.extend(e.encode(Kind::Data, i as u64, b"h", p).unwrap());
        }
        let t = std::thread::spawn(move || w.write_all(&wire).unwrap());
        let mut d = FrameDecoder::new(1 << 22);
        d.set_session_key(b"k");
        let mut got = 0;
        while got < 8 {
            let n = d.read_from_fd(&r).unwrap();
            if let Some(f) = d.advance(n).unwrap() {
                assert_eq!(f.payload(), &payload[..(1 << 20) - got * 1000]);
                got += 1;
            }
        }
        t.join().unwrap();
    }

    #[test]
    fn garbage_never_panics() {
        let mut rng = twinrun_lab::Rng::new(0x9e3779b97f4a7c15);
        for _ in 0..2000 {
            let mut d = FrameDecoder::new(1 << 16);
            let mut buf = vec![0u8; 200];
            rng.fill(&mut buf);
            buf[..4].copy_from_slice(&MAGIC.to_le_bytes());
            buf[4] = FRAME_VERSION;
            let _ = d.feed(&buf);
        }
    }

    fn seg(seg_size: u32) -> SegInfo {
        SegInfo {
            seg_size,
            barrier_delta: 0,
            void: false,
        }
    }

    fn pattern(len: usize, salt: u32) -> Vec<u8> {
        (0..len as u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13 ^ salt) as u8)
            .collect()
    }

    /// What a placer was asked: message, barrier, head.
    type Asked = std::sync::Arc<std::sync::Mutex<Vec<(u64, u64, Vec<u8>)>>>;

    /// A placer over `pages` destination buffers, recording what it was asked.
    fn page_placer(pages: std::sync::Arc<Vec<std::sync::Mutex<Vec<u8>>>>, asked: Asked) -> Placer {
        Box::new(move |r: &PlaceRequest<'_>| {
            asked
                .lock()
                .unwrap()
                .push((r.msg_seq, r.barrier, r.head.to_vec()));
            if r.head == b"buffer please" {
                return None;
            }
            // Scatter the payload over the pages in reverse order (4 KiB each, the last
            // one cut to the payload's end).
            let mut dests = Vec::new();
            let mut left = r.payload_len;
            for p in pages.iter().rev() {
                if left == 0 {
                    break;
                }
                let mut g = p.lock().unwrap();
                let n = left.min(g.len());
                dests.push((g.as_mut_ptr(), n));
                left -= n;
            }
            // SAFETY: the page buffers live in the Arc for the whole test and the test
            // reads them only after the frame completed.
            Some(unsafe { Placement::new(dests) })
        })
    }

    #[test]
    fn segmented_frames_roundtrip_at_every_split_point() {
        let (mut e, _) = session_pair();
        let payloads = [0usize, 1, 4096, 10_000, 3 * 4096];
        let mut wire = Vec::new();
        for (i, len) in payloads.iter().enumerate() {
            let p = pattern(*len, i as u32);
            let torn: &[u32] = if *len > 4096 { &[1] } else { &[] };
            wire.extend(
                e.encode_segmented(i as u64 + 10, b"hd", &p, seg(4096), torn)
                    .unwrap(),
            );
        }
        let void = SegInfo {
            void: true,
            barrier_delta: 3,
            ..seg(4096)
        };
        wire.extend(
            e.encode_segmented(20, b"lost head", &[], void, &[])
                .unwrap(),
        );
        wire.extend(e.encode(Kind::Heartbeat, 9, b"", b"").unwrap());
        for chunk in [1usize, 3, 55, 56, 57, 4095, 4097, wire.len()] {
            let (_, mut d) = session_pair();
            let mut frames = Vec::new();
            for c in wire.chunks(chunk) {
                frames.extend(d.feed(c).unwrap());
            }
            assert_eq!(frames.len(), payloads.len() + 2, "chunk {chunk}");
            for (i, len) in payloads.iter().enumerate() {
                let f = &frames[i];
                assert_eq!(f.head(), b"hd");
                assert_eq!(f.payload(), &pattern(*len, i as u32)[..]);
                let s = f.seg.as_ref().unwrap();
                assert_eq!(s.torn, if *len > 4096 { vec![1] } else { vec![] });
                assert!(s.placed.is_none() && !s.void);
            }
            let v = &frames[payloads.len()];
            assert_eq!(v.head(), b"lost head");
            let s = v.seg.as_ref().unwrap();
            assert!(s.void);
            assert_eq!(s.barrier, 17);
            assert_eq!(frames[payloads.len() + 1].header.kind, Kind::Heartbeat);
            assert!(d.at_boundary());
        }
    }

    #[test]
    fn placed_payloads_land_in_their_destinations_and_buffers_when_declined() {
        use std::sync::{Arc, Mutex};
        let pages = Arc::new(
            (0..3)
                .map(|_| Mutex::new(vec![0u8; 4096]))
                .collect::<Vec<_>>(),
        );
        let asked = Arc::new(Mutex::new(Vec::new()));
        let (mut e, _) = session_pair();
        let p1 = pattern(10_000, 1);
        let p2 = pattern(5000, 2);
        let barrier = SegInfo {
            barrier_delta: 2,
            ..seg(4096)
        };
        let mut wire = e.encode_segmented(7, b"h1", &p1, barrier, &[]).unwrap();
        wire.extend(
            e.encode_segmented(8, b"buffer please", &p2, seg(4096), &[])
                .unwrap(),
        );
        for chunk in [1usize, 100, 4096, wire.len()] {
            for p in pages.iter() {
                p.lock().unwrap().fill(0);
            }
            asked.lock().unwrap().clear();
            let (_, mut d) = session_pair();
            d.set_placer(page_placer(pages.clone(), asked.clone()));
            let mut frames = Vec::new();
            for c in wire.chunks(chunk) {
                frames.extend(d.feed(c).unwrap());
                if frames.is_empty() && d.placing().is_some() {
                    assert_eq!(d.placing(), Some(7));
                }
            }
            assert_eq!(frames.len(), 2);
            // Frame 1: placed; its body is the head only; pages in reverse order.
            let s = frames[0].seg.as_ref().unwrap();
            assert!(s.placed.is_some());
            assert_eq!(frames[0].body.len(), 2);
            assert_eq!(frames[0].payload(), b"");
            let got: Vec<u8> = pages
                .iter()
                .rev()
                .flat_map(|p| p.lock().unwrap().clone())
                .take(10_000)
                .collect();
            assert_eq!(got, p1);
            // Frame 2: the placer declined: in the body.
            assert!(frames[1].seg.as_ref().unwrap().placed.is_none());
            assert_eq!(frames[1].payload(), &p2[..]);
            let a = asked.lock().unwrap();
            assert_eq!(a[0], (7, 5, b"h1".to_vec()));
            assert_eq!(a[1].0, 8);
            assert_eq!(a[1].1, 0);
        }
    }

    #[test]
    fn placed_payload_over_a_socket_with_readv() {
        use std::io::Write;
        use std::sync::{Arc, Mutex};
        // 100 destinations of 4 KiB: more than one readv's 64 iovecs.
        let pages = Arc::new(
            (0..100)
                .map(|_| Mutex::new(vec![0u8; 4096]))
                .collect::<Vec<_>>(),
        );
        let asked = Arc::new(Mutex::new(Vec::new()));
        let (mut e, mut d) = session_pair();
        d.set_placer(page_placer(pages.clone(), asked));
        let p = pattern(100 * 4096, 5);
        let wire = e.encode_segmented(1, b"h", &p, seg(4096), &[]).unwrap();
        let (mut w, r) = std::os::unix::net::UnixStream::pair().unwrap();
        let t = std::thread::spawn(move || w.write_all(&wire).unwrap());
        let f = loop {
            let n = d.read_from_fd(&r).unwrap();
            assert!(n > 0);
            if let Some(f) = d.advance(n).unwrap() {
                break f;
            }
        };
        t.join().unwrap();
        assert!(f.seg.unwrap().placed.is_some());
        let got: Vec<u8> = pages
            .iter()
            .rev()
            .flat_map(|p| p.lock().unwrap().clone())
            .collect();
        assert_eq!(got, p);
    }

    #[test]
    fn corrupted_segments_trailers_and_heads_are_refused_torn_ones_are_not() {
        let p = pattern(3 * 4096, 9);
        let build = |torn: &[u32]| {
            let (mut e, _) = session_pair();
            e.encode_segmented(1, b"head", &p, seg(4096), torn).unwrap()
        };
        let payload_at = HEADER_LEN + 4;
        // A flipped byte in segment 1.
        let mut w = build(&[]);
        w[payload_at + 4096 + 17] ^= 0x20;
        let (_, mut d) = session_pair();
        assert!(matches!(
            d.feed(&w),
            Err(FrameError::BadSegment { index: 1, .. })
        ));
        // The same byte in a segment the sender marked torn: delivered, marked.
        let mut w = build(&[1]);
        w[payload_at + 4096 + 17] ^= 0x20;
        let (_, mut d) = session_pair();
        let f = d.feed(&w).unwrap();
        assert_eq!(f[0].seg.as_ref().unwrap().torn, vec![1]);
        // A flipped byte in the trailer (a segment CRC, the torn count, the trailer CRC).
        for back in [1usize, 5, 9, 13] {
            let mut w = build(&[]);
            let at = w.len() - back;
            w[at] ^= 1;
            let (_, mut d) = session_pair();
            let r = d.feed(&w);
            assert!(
                matches!(
                    r,
                    Err(FrameError::BadTrailer)
                        | Err(FrameError::BadSegment { .. })
                        | Err(FrameError::BadSegmentLayout(_))
                ),
                "{back}: {r:?}"
            );
        }
        // A flipped byte in the head: refused before anything is placed.
        let mut w = build(&[]);
        w[HEADER_LEN + 1] ^= 1;
        let (_, mut d) = session_pair();
        let asked = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let pages = std::sync::Arc::new(vec![std::sync::Mutex::new(vec![0u8; 4 * 4096])]);
        d.set_placer(page_placer(pages, asked.clone()));
        assert!(matches!(d.feed(&w), Err(FrameError::BadChecksum { .. })));
        assert!(asked.lock().unwrap().is_empty());
    }

    #[test]
    fn truncated_placed_frame_reports_the_message_being_placed() {
        use std::sync::{Arc, Mutex};
        let pages = Arc::new(
            (0..3)
                .map(|_| Mutex::new(vec![0u8; 4096]))
                .collect::<Vec<_>>(),
        );
        let (mut e, mut d) = session_pair();
        d.set_placer(page_placer(pages, Arc::new(Mutex::new(Vec::new()))));
        let w = e
            .encode_segmented(42, b"h", &pattern(3 * 4096, 3), seg(4096), &[])
            .unwrap();
        assert!(d.feed(&w[..HEADER_LEN + 1 + 5000]).unwrap().is_empty());
        assert_eq!(d.placing(), Some(42));
        // The rest (trailer included) completes it and ends the placement.
        assert_eq!(d.feed(&w[HEADER_LEN + 1 + 5000..]).unwrap().len(), 1);
        assert_eq!(d.placing(), None);
        // A placed frame that fails its segment checks (found at the trailer) leaves the
        // placement reported: its destinations hold bytes that did not check.
        let mut w = e
            .encode_segmented(43, b"h", &pattern(3 * 4096, 4), seg(4096), &[])
            .unwrap();
        w[HEADER_LEN + 1 + 4096 + 5] ^= 1;
        assert!(matches!(
            d.feed(&w),
            Err(FrameError::BadSegment { index: 1, .. })
        ));
        assert_eq!(d.placing(), Some(43));
    }

    #[test]
    fn bad_segment_flags_are_refused() {
        let mut e = FrameEncoder::new(1 << 20);
        e.set_session_key(b"k1");
        // The encoder refuses what the decoder would.
        assert!(e.segmented_header(1, b"", 10, seg(3000)).is_none());
        assert!(e.segmented_header(1, b"", 10, seg(256)).is_none());
        assert!(e.segmented_header(1, b"", 10, seg(2 << 20)).is_none());
        let void = SegInfo {
            void: true,
            ..seg(4096)
        };
        assert!(e.segmented_header(1, b"", 10, void).is_none());
        // Hand-sealed headers: segment flags on a heartbeat, unknown flags, a void frame
        // with a payload, a segment size of 2^15 * 512.
        let seal = |kind, flags: u16, reserved: u32, head_len: u32, body_len: u32| {
            let h = Header {
                kind,
                link_seq: 0,
                msg_seq: 1,
                head_len,
                body_len,
                body_crc: 0,
                seg: None,
            };
            let mut auth = h.auth_bytes();
            auth[6..8].copy_from_slice(&flags.to_le_bytes());
            auth[36..40].copy_from_slice(&reserved.to_le_bytes());
            let mut w = auth.to_vec();
            w.extend_from_slice(&FrameKey::new(b"k1").tag(&auth));
            w
        };
        for (kind, flags, reserved, head_len, body_len) in [
            (Kind::Heartbeat, 1u16, 0u32, 0u32, 0u32),
            (Kind::Data, 1 | 0x100, 0, 0, 0),
            (Kind::Data, 3, 0, 2, 10),
            (Kind::Data, 1 | 0xf0, 0, 0, 0),
            (Kind::Data, 2, 0, 0, 0),
            (Kind::Data, 0, 5, 0, 0),
        ] {
            let w = seal(kind, flags, reserved, head_len, body_len);
            let (_, mut d) = session_pair();
            assert!(
                matches!(
                    d.feed(&w),
                    Err(FrameError::Reserved { .. }) | Err(FrameError::BadSegmentLayout(_))
                ),
                "{kind:?} {flags:#x}"
            );
        }
    }
}
