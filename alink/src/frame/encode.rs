//! The frame encoder: link sequence numbers, tags, headers for vectored writes.

use super::{
    FrameKey, Header, Kind, SegInfo, HEADER_AUTH_LEN, HEADER_LEN, MAX_BODY_CEILING, MAX_SEG,
    MAX_SEG_HEAD, MIN_SEG,
};

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

    fn seal(&mut self, h: Header) -> [u8; HEADER_LEN] {
        self.next_seq += 1;
        let auth = h.auth_bytes();
        let mut out = [0u8; HEADER_LEN];
        out[..HEADER_AUTH_LEN].copy_from_slice(&auth);
        out[HEADER_AUTH_LEN..].copy_from_slice(&self.key.tag(&auth));
        out
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
            seg: None,
        };
        Some(self.seal(h))
    }

    /// The header of a segmented Data frame: `head`, then `payload_len` bytes of payload,
    /// then the trailer the caller builds from the segment CRCs ([`super::seg_trailer`]).
    /// Returns None if the body exceeds the limit or `seg` is invalid (segment size not
    /// a power of two in range, a void frame with a payload, a head over 1 MiB).
    pub fn segmented_header(
        &mut self,
        msg_seq: u64,
        head: &[u8],
        payload_len: usize,
        seg: SegInfo,
    ) -> Option<[u8; HEADER_LEN]> {
        let total = head.len().checked_add(payload_len)?;
        if total > self.max_body as usize
            || head.len() > MAX_SEG_HEAD as usize
            || !seg.seg_size.is_power_of_two()
            || !(MIN_SEG..=MAX_SEG).contains(&seg.seg_size)
            || (seg.void && payload_len > 0)
        {
            return None;
        }
        let h = Header {
            kind: Kind::Data,
            link_seq: self.next_seq,
            msg_seq,
            head_len: head.len() as u32,
            body_len: total as u32,
            body_crc: crc32c::crc32c(head),
            seg: Some(seg),
        };
        Some(self.seal(h))
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

    /// A whole segmented frame in one buffer (tests, tools): header, head, payload,
    /// trailer with `torn` marked.
    pub fn encode_segmented(
        &mut self,
        msg_seq: u64,
        head: &[u8],
        payload: &[u8],
        seg: SegInfo,
        torn: &[u32],
    ) -> Option<Vec<u8>> {
        let hdr = self.segmented_header(msg_seq, head, payload.len(), seg)?;
        let mut v = Vec::with_capacity(HEADER_LEN + head.len() + payload.len());
        v.extend_from_slice(&hdr);
        v.extend_from_slice(head);
        if !seg.void {
            v.extend_from_slice(payload);
            let crcs: Vec<u32> = payload
                .chunks(seg.seg_size as usize)
                .map(crc32c::crc32c)
                .collect();
            v.extend(super::seg_trailer(&crcs, torn));
        }
        Some(v)
    }
}
