//! Frame format, encoder and incremental decoder.
//!
//! Every byte on an A-Link travels inside a frame: a fixed 56-byte header followed by a body
//! of `body_len` bytes. The header carries a per-link sequence number and a CRC32C of the body,
//! and ends with a 16-byte tag: HMAC-SHA256 of the first 40 header bytes, truncated. Before
//! the handshake completes the tag is keyed with a public constant (so it only detects
//! corruption); afterwards it is keyed with the per-direction session key, which makes frames
//! from anyone without the cluster secret, frames replayed from another session and frames
//! replayed or reordered within a session (the sequence number is covered) fail the check.
//!
//! The body checksum is bound into the authenticated header, so a corrupted body is caught
//! at line rate (CRC32C runs at memory speed) without MACing every page byte. See README.md
//! for the trade-off.
//!
//! The decoder reads straight into the final body buffer (no intermediate copy), taken
//! from a [`BufPool`] so that steady traffic reuses memory that is already mapped; it
//! never takes more than `max_body` bytes per frame, validates the header (and its tag)
//! before taking a buffer, and never panics on any input.

use crate::buf::{Buf, BufPool};
use hmac::{Hmac, Mac};
use sha2::Sha256;
use std::os::fd::AsRawFd;

/// "ALNK" in little-endian byte order.
pub const MAGIC: u32 = u32::from_le_bytes(*b"ALNK");
/// Wire format version of the frame header itself.
pub const FRAME_VERSION: u8 = 1;
/// Bytes of the header that the tag covers.
pub const HEADER_AUTH_LEN: usize = 40;
/// Truncated HMAC length.
pub const TAG_LEN: usize = 16;
/// Full header size on the wire.
pub const HEADER_LEN: usize = HEADER_AUTH_LEN + TAG_LEN;
/// Hard ceiling for any configured `max_body` (1 GiB): keeps every length a valid u32 and
/// every allocation bounded even when a caller misconfigures the limit.
pub const MAX_BODY_CEILING: u32 = 1 << 30;
/// Body limit used while handshaking: hello and auth messages are tiny.
pub const HANDSHAKE_MAX_BODY: u32 = 1024;

/// Key used for handshake frames. It is public: it gives those frames a header check, not
/// authenticity (the handshake provides that).
const HANDSHAKE_FRAME_KEY: &[u8] = b"twinrun-alink-handshake-frame-v1";

type HmacSha256 = Hmac<Sha256>;

/// Frame kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// Handshake: hello with version, cluster id, node id and nonce.
    Hello = 1,
    /// Handshake: HMAC of the transcript.
    Auth = 2,
    /// A message: `msg_seq` is its global sequence, body = head (`head_len` bytes) + payload.
    Data = 3,
    /// Heartbeat; `msg_seq` carries the cumulative acknowledgement (next unconsumed seq).
    Heartbeat = 4,
}

impl Kind {
    fn from_u8(v: u8) -> Option<Kind> {
        match v {
            1 => Some(Kind::Hello),
            2 => Some(Kind::Auth),
            3 => Some(Kind::Data),
            4 => Some(Kind::Heartbeat),
            _ => None,
        }
    }

    fn is_handshake(self) -> bool {
        matches!(self, Kind::Hello | Kind::Auth)
    }
}

/// Why a frame was refused. Any of these ends the connection: a byte stream that produced
/// one bad frame cannot be resynchronised safely.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("bad magic {0:#010x} (not an A-Link peer)")]
    BadMagic(u32),
    #[error("unsupported frame version {0} (we speak {FRAME_VERSION})")]
    BadVersion(u8),
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    #[error("reserved bits set (flags {flags:#x}, reserved {reserved:#x})")]
    Reserved { flags: u16, reserved: u32 },
    #[error("body of {len} bytes exceeds the limit of {max}")]
    TooLarge { len: u32, max: u32 },
    #[error("head length {head_len} exceeds body length {body_len}")]
    HeadLen { head_len: u32, body_len: u32 },
    #[error("frame tag does not verify (unauthenticated or corrupted frame)")]
    BadTag,
    #[error("frame kind {0:?} not allowed in this phase")]
    WrongPhase(Kind),
    #[error("replayed or reordered frame: link sequence {got}, expected {expected}")]
    Replay { expected: u64, got: u64 },
    #[error("body checksum mismatch (crc32c {got:#010x}, header says {expected:#010x})")]
    BadChecksum { expected: u32, got: u32 },
}

/// A precomputed HMAC key for frame tags (cloning the keyed state saves two compressions per
/// frame).
#[derive(Clone)]
pub struct FrameKey(HmacSha256);

impl FrameKey {
    pub fn new(key: &[u8]) -> FrameKey {
        // HMAC accepts keys of any length; this cannot fail.
        FrameKey(HmacSha256::new_from_slice(key).expect("HMAC takes any key length"))
    }

    fn handshake() -> FrameKey {
        FrameKey::new(HANDSHAKE_FRAME_KEY)
    }

    fn tag(&self, auth: &[u8; HEADER_AUTH_LEN]) -> [u8; TAG_LEN] {
        let mut m = self.0.clone();
        m.update(auth);
        let full = m.finalize().into_bytes();
        let mut t = [0u8; TAG_LEN];
        t.copy_from_slice(&full[..TAG_LEN]);
        t
    }

    fn verify(&self, auth: &[u8; HEADER_AUTH_LEN], tag: &[u8]) -> bool {
        let mut m = self.0.clone();
        m.update(auth);
        // Constant time comparison of the truncated tag.
        m.verify_truncated_left(tag).is_ok()
    }
}

impl std::fmt::Debug for FrameKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FrameKey(..)")
    }
}

/// Decoded header fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub kind: Kind,
    pub link_seq: u64,
    pub msg_seq: u64,
    pub head_len: u32,
    pub body_len: u32,
    pub body_crc: u32,
}

impl Header {
    fn auth_bytes(&self) -> [u8; HEADER_AUTH_LEN] {
        let mut b = [0u8; HEADER_AUTH_LEN];
        b[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        b[4] = FRAME_VERSION;
        b[5] = self.kind as u8;
        // 6..8 flags = 0
        b[8..16].copy_from_slice(&self.link_seq.to_le_bytes());
        b[16..24].copy_from_slice(&self.msg_seq.to_le_bytes());
        b[24..28].copy_from_slice(&self.head_len.to_le_bytes());
        b[28..32].copy_from_slice(&self.body_len.to_le_bytes());
        b[32..36].copy_from_slice(&self.body_crc.to_le_bytes());
        // 36..40 reserved = 0
        b
    }
}

fn le_u32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

fn le_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

/// One decoded frame. The body is the buffer the socket was read into.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub header: Header,
    pub body: Buf,
}

impl Frame {
    pub fn head(&self) -> &[u8] {
        &self.body[..self.header.head_len as usize]
    }
    pub fn payload(&self) -> &[u8] {
        &self.body[self.header.head_len as usize..]
    }
}

/// Per-direction frame encoder: assigns link sequence numbers and computes tags.
#[derive(Debug)]
pub struct FrameEncoder {
    key: FrameKey,
    next_seq: u64,
    max_body: u32,
}

impl FrameEncoder {
    /// A new encoder in handshake phase.
    pub fn new(max_body: u32) -> FrameEncoder {
        FrameEncoder {
            key: FrameKey::handshake(),
            next_seq: 0,
            max_body: max_body.min(MAX_BODY_CEILING),
        }
    }

    /// Switches to the session key: every later frame is authenticated.
    pub fn set_session_key(&mut self, key: &[u8]) {
        self.key = FrameKey::new(key);
    }

    /// Builds the header for a frame whose body is `head` followed by `payload` slices.
    /// The body itself is not copied: the caller writes header, head and payload with one
    /// vectored write. Returns None if the body exceeds the limit.
    pub fn header(
        &mut self,
        kind: Kind,
        msg_seq: u64,
        head: &[u8],
        payload: &[&[u8]],
    ) -> Option<[u8; HEADER_LEN]> {
        let total: usize = head.len() + payload.iter().map(|p| p.len()).sum::<usize>();
        if total > self.max_body as usize {
            return None;
        }
        let mut crc = crc32c::crc32c(head);
        for p in payload {
            crc = crc32c::crc32c_append(crc, p);
        }
        let h = Header {
            kind,
            link_seq: self.next_seq,
            msg_seq,
            head_len: head.len() as u32,
            body_len: total as u32,
            body_crc: crc,
        };
        self.next_seq += 1;
        let auth = h.auth_bytes();
        let mut out = [0u8; HEADER_LEN];
        out[..HEADER_AUTH_LEN].copy_from_slice(&auth);
        out[HEADER_AUTH_LEN..].copy_from_slice(&self.key.tag(&auth));
        Some(out)
    }

    /// Convenience for small frames (handshake, tests): header and body in one buffer.
    pub fn encode(
        &mut self,
        kind: Kind,
        msg_seq: u64,
        head: &[u8],
        payload: &[u8],
    ) -> Option<Vec<u8>> {
        let hdr = self.header(kind, msg_seq, head, &[payload])?;
        let mut v = Vec::with_capacity(HEADER_LEN + head.len() + payload.len());
        v.extend_from_slice(&hdr);
        v.extend_from_slice(head);
        v.extend_from_slice(payload);
        Some(v)
    }
}

/// Incremental frame decoder. Use [`FrameDecoder::read_buf`] + [`FrameDecoder::advance`] to
/// read from a socket straight into the frame, or [`FrameDecoder::feed`] for byte slices.
#[derive(Debug)]
pub struct FrameDecoder {
    key: FrameKey,
    session: bool,
    expected_seq: u64,
    max_body: u32,
    hdr: [u8; HEADER_LEN],
    hdr_filled: usize,
    pending: Option<Header>,
    /// Body of the pending frame (`body_len` bytes, from `pool`), filled up to
    /// `body_filled`.
    body: Option<Buf>,
    body_filled: usize,
    /// CRC32C of `body[..body_filled]`, extended after every read while those bytes
    /// are still in cache (one pass over a multi-MiB body at the end would read it
    /// back from memory).
    body_crc: u32,
    pool: BufPool,
    failed: Option<FrameError>,
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
            body: None,
            body_filled: 0,
            body_crc: 0,
            pool,
            failed: None,
        }
    }

    /// Switches to the session phase: frames must carry the session key's tag and only Data
    /// and Heartbeat kinds are accepted.
    pub fn set_session_key(&mut self, key: &[u8]) {
        self.key = FrameKey::new(key);
        self.session = true;
    }

    /// True between frames (no partial frame buffered).
    pub fn at_boundary(&self) -> bool {
        self.hdr_filled == 0 && self.pending.is_none()
    }

    /// Where the next bytes from the stream go. Never empty unless the decoder failed.
    /// It never spans two frames, so a caller reading into it never consumes bytes of a frame
    /// that must be decoded under a different key.
    pub fn read_buf(&mut self) -> &mut [u8] {
        if self.failed.is_some() {
            return &mut [];
        }
        match (&self.pending, &mut self.body) {
            (Some(_), Some(b)) => &mut b[self.body_filled..],
            _ => &mut self.hdr[self.hdr_filled..],
        }
    }

    /// Reads once from `fd` into the frame being decoded (header, or the body buffer
    /// itself); returns the byte count for [`FrameDecoder::advance`] (0 = end of stream).
    pub fn read_from_fd(&mut self, fd: &impl AsRawFd) -> std::io::Result<usize> {
        if self.failed.is_some() {
            return Ok(0);
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

    /// Records that `n` bytes were written into [`FrameDecoder::read_buf`]. Returns a frame
    /// when one completes. After an error the decoder stays failed.
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
        match self.pending {
            None => {
                assert!(self.hdr_filled + n <= HEADER_LEN, "advance past read_buf");
                self.hdr_filled += n;
                if self.hdr_filled < HEADER_LEN {
                    return Ok(None);
                }
                let h = self.check_header()?;
                self.hdr_filled = 0;
                // Bounded by check_header; filled by the reads, not zeroed here.
                self.body = Some(self.pool.take(h.body_len as usize));
                self.body_filled = 0;
                self.body_crc = 0;
                self.pending = Some(h);
                if h.body_len == 0 {
                    return self.finish_body();
                }
                Ok(None)
            }
            Some(h) => {
                let target = h.body_len as usize;
                assert!(self.body_filled + n <= target, "advance past read_buf");
                if let Some(b) = &self.body {
                    let fresh = &b[self.body_filled..self.body_filled + n];
                    self.body_crc = crc32c::crc32c_append(self.body_crc, fresh);
                }
                self.body_filled += n;
                if self.body_filled < target {
                    return Ok(None);
                }
                self.finish_body()
            }
        }
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
        if flags != 0 || reserved != 0 {
            return Err(FrameError::Reserved { flags, reserved });
        }
        let h = Header {
            kind,
            link_seq: le_u64(b, 8),
            msg_seq: le_u64(b, 16),
            head_len: le_u32(b, 24),
            body_len: le_u32(b, 28),
            body_crc: le_u32(b, 32),
        };
        // Tag first: nothing from an unauthenticated header decides an allocation size or
        // reaches the protocol.
        let mut auth = [0u8; HEADER_AUTH_LEN];
        auth.copy_from_slice(&b[..HEADER_AUTH_LEN]);
        if !self.key.verify(&auth, &b[HEADER_AUTH_LEN..]) {
            return Err(FrameError::BadTag);
        }
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
        if h.link_seq != self.expected_seq {
            return Err(FrameError::Replay {
                expected: self.expected_seq,
                got: h.link_seq,
            });
        }
        self.expected_seq += 1;
        Ok(h)
    }

    fn finish_body(&mut self) -> Result<Option<Frame>, FrameError> {
        let h = self
            .pending
            .take()
            .expect("finish_body with a pending header");
        let body = self
            .body
            .take()
            .unwrap_or_else(|| Buf::from_vec(Vec::new()));
        debug_assert_eq!(body.len(), h.body_len as usize);
        debug_assert_eq!(self.body_filled, body.len());
        self.body_filled = 0;
        let got = std::mem::take(&mut self.body_crc);
        if got != h.body_crc {
            return Err(FrameError::BadChecksum {
                expected: h.body_crc,
                got,
            });
        }
        Ok(Some(Frame { header: h, body }))
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
        let mut x: u64 = 0x9e3779b97f4a7c15;
        for _ in 0..2000 {
            let mut d = FrameDecoder::new(1 << 16);
            let mut buf = vec![0u8; 200];
            for b in buf.iter_mut() {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                *b = x as u8;
            }
            buf[..4].copy_from_slice(&MAGIC.to_le_bytes());
            buf[4] = FRAME_VERSION;
            let _ = d.feed(&buf);
        }
    }
}
