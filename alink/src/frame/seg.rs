//! The per-segment checksums of segmented frames: computed over a payload that arrives
//! (or is sent) in spans of any length, and the trailer that carries them.
//!
//! Trailer layout (little endian): `nseg` u32 segment CRCs, u32 `torn_count`,
//! `torn_count` u32 segment indices (ascending), u32 CRC32C of everything before it.

use super::{le_u32, FrameError};

/// CRC32C of each `seg_size` segment of a byte stream fed in spans of any length.
#[derive(Debug, Clone)]
pub struct SegCrcs {
    seg_size: usize,
    /// Bytes of the current (unfinished) segment seen.
    in_seg: usize,
    cur: u32,
    done: Vec<u32>,
}

impl SegCrcs {
    pub fn new(seg_size: u32) -> SegCrcs {
        SegCrcs {
            seg_size: seg_size.max(1) as usize,
            in_seg: 0,
            cur: 0,
            done: Vec::new(),
        }
    }

    /// Number of segments of a `len`-byte payload.
    pub fn count(len: usize, seg_size: u32) -> usize {
        len.div_ceil(seg_size.max(1) as usize)
    }

    /// Feeds the next bytes of the stream.
    pub fn feed(&mut self, mut span: &[u8]) {
        while !span.is_empty() {
            let n = (self.seg_size - self.in_seg).min(span.len());
            self.cur = crc32c::crc32c_append(self.cur, &span[..n]);
            self.in_seg += n;
            span = &span[n..];
            if self.in_seg == self.seg_size {
                self.done.push(self.cur);
                self.cur = 0;
                self.in_seg = 0;
            }
        }
    }

    /// Finished segments so far.
    pub fn finished(&self) -> &[u32] {
        &self.done
    }

    /// The CRCs of every segment, the last one possibly short.
    pub fn finish(mut self) -> Vec<u32> {
        if self.in_seg > 0 {
            self.done.push(self.cur);
        }
        self.done
    }

    /// Clears the finished list (keeps the unfinished segment), for chunked use.
    pub fn take_finished(&mut self) -> Vec<u32> {
        std::mem::take(&mut self.done)
    }
}

/// The trailer for `crcs` with the segments `torn` (ascending) marked unchecked.
pub fn seg_trailer(crcs: &[u32], torn: &[u32]) -> Vec<u8> {
    let mut t = Vec::with_capacity(4 * (crcs.len() + torn.len() + 2));
    for c in crcs {
        t.extend_from_slice(&c.to_le_bytes());
    }
    t.extend_from_slice(&(torn.len() as u32).to_le_bytes());
    for i in torn {
        t.extend_from_slice(&i.to_le_bytes());
    }
    let c = crc32c::crc32c(&t);
    t.extend_from_slice(&c.to_le_bytes());
    t
}

/// Bytes of the trailer's fixed part (the CRCs and the torn count) for `nseg` segments.
pub(super) fn fixed_len(nseg: usize) -> usize {
    4 * nseg + 4
}

/// The torn count in a trailer's fixed part, checked against `nseg`.
pub(super) fn torn_count(fixed: &[u8], nseg: usize) -> Result<usize, FrameError> {
    let n = le_u32(fixed, 4 * nseg) as usize;
    if n > nseg {
        return Err(FrameError::BadSegmentLayout(
            "more torn segments than segments",
        ));
    }
    Ok(n)
}

/// Checks a whole trailer and the receiver's segment CRCs against it; returns the torn
/// segments.
pub(super) fn check(trailer: &[u8], nseg: usize, got: &[u32]) -> Result<Vec<u32>, FrameError> {
    let body = trailer.len() - 4;
    if crc32c::crc32c(&trailer[..body]) != le_u32(trailer, body) {
        return Err(FrameError::BadTrailer);
    }
    let torn_n = torn_count(trailer, nseg)?;
    let torn: Vec<u32> = (0..torn_n)
        .map(|k| le_u32(trailer, 4 * nseg + 4 + 4 * k))
        .collect();
    if torn.windows(2).any(|w| w[0] >= w[1]) || torn.last().is_some_and(|t| *t as usize >= nseg) {
        return Err(FrameError::BadSegmentLayout(
            "torn list not ascending or out of range",
        ));
    }
    let mut t = torn.iter().peekable();
    for (i, g) in got.iter().enumerate().take(nseg) {
        if t.peek().is_some_and(|x| **x as usize == i) {
            t.next();
            continue;
        }
        let expected = le_u32(trailer, 4 * i);
        if expected != *g {
            return Err(FrameError::BadSegment {
                index: i as u32,
                expected,
                got: *g,
            });
        }
    }
    Ok(torn)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segment_crcs_do_not_depend_on_how_the_stream_is_cut() {
        let data: Vec<u8> = (0..10_000u32).map(|i| (i * 31 + i / 7) as u8).collect();
        let want: Vec<u32> = data.chunks(4096).map(crc32c::crc32c).collect();
        for cut in [1usize, 7, 4095, 4096, 4097, 10_000] {
            let mut s = SegCrcs::new(4096);
            for c in data.chunks(cut) {
                s.feed(c);
            }
            assert_eq!(s.finish(), want, "cut {cut}");
        }
        assert_eq!(SegCrcs::count(10_000, 4096), 3);
        assert_eq!(SegCrcs::count(0, 4096), 0);
    }

    #[test]
    fn trailer_checks_segments_except_torn_ones() {
        let crcs = [1, 2, 3, 4];
        let t = seg_trailer(&crcs, &[2]);
        assert_eq!(t.len(), 4 * 4 + 4 + 4 + 4);
        assert_eq!(torn_count(&t, 4).unwrap(), 1);
        assert_eq!(check(&t, 4, &[1, 2, 99, 4]).unwrap(), vec![2]);
        assert_eq!(
            check(&t, 4, &[1, 2, 3, 5]),
            Err(FrameError::BadSegment {
                index: 3,
                expected: 4,
                got: 5
            })
        );
        let mut bad = t.clone();
        bad[5] ^= 1;
        assert_eq!(check(&bad, 4, &[1, 2, 3, 4]), Err(FrameError::BadTrailer));
        // A torn list out of order, with its own CRC right: refused.
        let t = seg_trailer(&crcs, &[3, 1]);
        assert!(matches!(
            check(&t, 4, &crcs),
            Err(FrameError::BadSegmentLayout(_))
        ));
        let t = seg_trailer(&crcs, &[4]);
        assert!(matches!(
            check(&t, 4, &crcs),
            Err(FrameError::BadSegmentLayout(_))
        ));
    }
}
