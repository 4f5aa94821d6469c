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
//! **Segmented frames** ([`FLAG_SEGMENTED`]) carry page payloads sent straight from memory
//! that may change while it is sent (guest memory during a sync round): the header's
//! checksum covers the head only, and a trailer after the body holds a CRC32C per
//! segment of the payload (`seg_size` bytes, 4 KiB for pages), computed by the sender
//! chunk by chunk just before each chunk is written (so the socket copy reads it from
//! cache), the list of *torn* segments (the sender computed the segment's CRC again after
//! the write and it differed: the memory changed under the send, so the bytes on the
//! wire are unchecked; the sender knows and sends that memory again) and a CRC32C of the
//! trailer itself. The receiver checks every other segment. A segmented frame may also
//! be *placed*: its payload read straight into destinations the receiver chose after
//! seeing the (checked) head ([`Placement`]), and it names a barrier: the message it may
//! be placed after (see `reorder.rs`). A *void* frame ([`FLAG_VOID`]) stands for a
//! message whose lent payload is gone: its head, no payload, no trailer.
//!
//! The decoder reads straight into the final body buffer (no intermediate copy), taken
//! from a [`BufPool`] so that steady traffic reuses memory that is already mapped; it
//! never takes more than `max_body` bytes per frame, validates the header (and its tag)
//! before taking a buffer, and never panics on any input.

mod decode;
mod encode;
mod seg;

pub use decode::{FrameDecoder, PlaceRequest, Placement, Placer};
pub use encode::FrameEncoder;
pub use seg::{seg_trailer, SegCrcs};

use crate::buf::Buf;
use hmac::{Hmac, Mac};
use sha2::Sha256;

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

/// Header flag: the body is head + payload with per-segment CRCs in a trailer.
pub const FLAG_SEGMENTED: u16 = 1;
/// Header flag (with [`FLAG_SEGMENTED`]): a void message, head only.
pub const FLAG_VOID: u16 = 2;
/// Header flag bits 4..8: the segment size is `MIN_SEG << value`.
const SEG_SHIFT_MASK: u16 = 0xf0;
const KNOWN_FLAGS: u16 = FLAG_SEGMENTED | FLAG_VOID | SEG_SHIFT_MASK;
/// Segment sizes: 512 B to 1 MiB, powers of two.
pub const MIN_SEG: u32 = 512;
pub const MAX_SEG: u32 = 1 << 20;
/// Largest head of a segmented frame: it is read into its own buffer before the
/// payload is placed.
pub const MAX_SEG_HEAD: u32 = 1 << 20;

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
    #[error("bad segmented frame: {0}")]
    BadSegmentLayout(&'static str),
    #[error("segment trailer checksum mismatch")]
    BadTrailer,
    #[error("payload segment {index} checksum mismatch (crc32c {got:#010x}, sender says {expected:#010x})")]
    BadSegment { index: u32, expected: u32, got: u32 },
}

/// A precomputed HMAC key for frame tags (cloning the keyed state saves two compressions per
/// frame).
#[derive(Clone)]
pub struct FrameKey(HmacSha256);

impl FrameKey {
    // HMAC accepts keys of any length; this cannot fail.
    #[allow(clippy::expect_used)]
    pub fn new(key: &[u8]) -> FrameKey {
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

/// What a segmented frame's header says beyond the plain fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegInfo {
    /// Payload segment size (a power of two in `MIN_SEG..=MAX_SEG`).
    pub seg_size: u32,
    /// `msg_seq - barrier` (0: no barrier): the payload may be placed straight into its
    /// destination only once the receiver's consumer has consumed message `barrier`.
    pub barrier_delta: u32,
    /// A void message: head only.
    pub void: bool,
}

impl SegInfo {
    /// The barrier sequence for a message `msg_seq` (0 = none).
    pub fn barrier(&self, msg_seq: u64) -> u64 {
        if self.barrier_delta == 0 {
            0
        } else {
            msg_seq.saturating_sub(u64::from(self.barrier_delta))
        }
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
    /// CRC32C of the body (of the head only for a segmented frame).
    pub body_crc: u32,
    /// Segmented frames only.
    pub seg: Option<SegInfo>,
}

impl Header {
    fn flags(&self) -> (u16, u32) {
        match self.seg {
            None => (0, 0),
            Some(s) => {
                let shift = (s.seg_size / MIN_SEG).trailing_zeros() as u16;
                let mut f = FLAG_SEGMENTED | (shift << 4);
                if s.void {
                    f |= FLAG_VOID;
                }
                (f, s.barrier_delta)
            }
        }
    }

    fn auth_bytes(&self) -> [u8; HEADER_AUTH_LEN] {
        let (flags, reserved) = self.flags();
        let mut b = [0u8; HEADER_AUTH_LEN];
        b[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        b[4] = FRAME_VERSION;
        b[5] = self.kind as u8;
        b[6..8].copy_from_slice(&flags.to_le_bytes());
        b[8..16].copy_from_slice(&self.link_seq.to_le_bytes());
        b[16..24].copy_from_slice(&self.msg_seq.to_le_bytes());
        b[24..28].copy_from_slice(&self.head_len.to_le_bytes());
        b[28..32].copy_from_slice(&self.body_len.to_le_bytes());
        b[32..36].copy_from_slice(&self.body_crc.to_le_bytes());
        b[36..40].copy_from_slice(&reserved.to_le_bytes());
        b
    }

    /// Payload bytes (after the head).
    pub fn payload_len(&self) -> usize {
        (self.body_len - self.head_len) as usize
    }
}

/// The segment info of a header's flags and reserved word, if they are valid.
fn parse_flags(kind: Kind, flags: u16, reserved: u32) -> Result<Option<SegInfo>, FrameError> {
    if flags == 0 {
        return if reserved == 0 {
            Ok(None)
        } else {
            Err(FrameError::Reserved { flags, reserved })
        };
    }
    if flags & !KNOWN_FLAGS != 0 || flags & FLAG_SEGMENTED == 0 || kind != Kind::Data {
        return Err(FrameError::Reserved { flags, reserved });
    }
    let shift = u32::from((flags & SEG_SHIFT_MASK) >> 4);
    let seg_size = MIN_SEG << shift;
    if seg_size > MAX_SEG {
        return Err(FrameError::BadSegmentLayout("segment size beyond 1 MiB"));
    }
    Ok(Some(SegInfo {
        seg_size,
        barrier_delta: reserved,
        void: flags & FLAG_VOID != 0,
    }))
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

/// What a segmented frame carried beyond its body.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SegFrame {
    /// The payload went into the receiver's destinations (the body is the head only).
    pub placed: Option<Placement>,
    /// Segments the sender saw change under the send: unchecked, stale.
    pub torn: Vec<u32>,
    /// Segment size.
    pub seg_size: u32,
    /// Message the payload may be placed after (0 = none).
    pub barrier: u64,
    /// A void message (head only).
    pub void: bool,
}

/// One decoded frame. The body is the buffer the socket was read into (for a placed
/// or void segmented frame, the head only).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub header: Header,
    pub body: Buf,
    pub seg: Option<SegFrame>,
}

impl Frame {
    pub fn head(&self) -> &[u8] {
        &self.body[..self.header.head_len as usize]
    }
    /// The payload, when it is in the body (empty for a placed or void frame).
    pub fn payload(&self) -> &[u8] {
        &self.body[self.header.head_len as usize..]
    }
}
