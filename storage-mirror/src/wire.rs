//! The disk session's messages (what the two sides of a mirrored disk set say to each
//! other): the metadata report that decides how a returning standby's disks are
//! brought back in sync, the plan, the resync chunks and their acknowledgements, reads
//! served from the partner's replica when the local disk failed, and online verify
//! digests.
//!
//! Each message is a postcard head plus a raw payload (chunk data, bitmap words,
//! digests, read data); the transport carries both without looking inside (checkpoint
//! puts them in an opaque, bounded kind of its own wire format). Every count and size is
//! bounded and checked by [`decode_to_standby`] / [`decode_to_primary`]: a malformed or
//! hostile message gives a typed [`WireError`], never a panic or an unbounded
//! allocation.
//!
//! Session order: the standby answers the checkpoint's `Hello` with
//! [`DiskToPrimary::Meta`]; the primary decides per disk and sends
//! [`DiskToStandby::Plan`]; resync chunks follow in disk order, each acknowledged once
//! durable; [`DiskToStandby::ResyncDone`] ends the resync, and the memory
//! synchronisation and epoch 0 (which carries what the resync left) follow.

use serde::{Deserialize, Serialize};

use crate::meta::{MetaState, ReplicaMeta};

/// Disks per VM, at most.
pub const MAX_DISKS: usize = 64;
/// Bytes of one resync chunk or served read, at most.
pub const MAX_CHUNK_BYTES: u32 = 4 << 20;
/// Bitmap words of one disk, at most (1 TiB at 4 KiB blocks).
pub const MAX_BITMAP_WORDS: u64 = (1 << 40) / 4096 / 64;
/// Payload bytes of one message, at most (bitmap words of every disk in a report:
/// under the A-Link's 64 MiB frame with room for the head).
pub const MAX_PAYLOAD_BYTES: u64 = 48 << 20;
/// Encoded head of one message, at most.
pub const MAX_HEAD_BYTES: usize = 256 << 10;
/// Verify digests per request, at most.
pub const MAX_DIGESTS: u32 = 1024;
/// Digest bytes (SHA-256).
pub const DIGEST_LEN: usize = 32;
/// Bytes of a reason string, at most.
pub const MAX_REASON: usize = 1024;
/// Generations in a plan's history, at most.
pub const MAX_HISTORY: usize = 64;
/// Largest verify range (64 MiB, as `verify::MAX_RANGE_BYTES`).
pub const MAX_VERIFY_RANGE: u64 = crate::verify::MAX_RANGE_BYTES;

/// One replica's metadata as sent over the wire.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum WireMeta {
    Missing,
    Damaged(String),
    Replaced(String),
    Ok(ReplicaMeta),
}

impl From<&MetaState> for WireMeta {
    fn from(m: &MetaState) -> Self {
        match m {
            MetaState::Missing => WireMeta::Missing,
            MetaState::Damaged(r) => WireMeta::Damaged(r.clone()),
            MetaState::Replaced { reason } => WireMeta::Replaced(reason.clone()),
            MetaState::Ok(m) => WireMeta::Ok(m.clone()),
        }
    }
}

impl From<WireMeta> for MetaState {
    fn from(m: WireMeta) -> Self {
        match m {
            WireMeta::Missing => MetaState::Missing,
            WireMeta::Damaged(r) => MetaState::Damaged(r),
            WireMeta::Replaced(reason) => MetaState::Replaced { reason },
            WireMeta::Ok(m) => MetaState::Ok(m),
        }
    }
}

/// A standby disk's report: its metadata and its dirty bitmap (the blocks it wrote that
/// the primary may not have: a returning ex-primary's last uncommitted epochs).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskReport {
    pub meta: WireMeta,
    /// Bitmap words of this disk in the payload (little-endian u64s, disks in order).
    pub bitmap_words: u64,
    pub dirty_blocks: u64,
}

/// What the primary decided for one disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PlanKind {
    InSync,
    Delta,
    Full,
    Refuse,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskPlan {
    pub kind: PlanKind,
    pub reason: String,
    /// The primary's current generation (what the standby holds once in sync).
    pub source_gen: u64,
    pub source_history: Vec<u64>,
    /// Blocks the resync copies (before guest writes add more).
    pub blocks: u64,
}

/// Primary to standby.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum DiskToStandby {
    Plan {
        disks: Vec<DiskPlan>,
    },
    /// `blocks` blocks from `first_block` of disk `disk`; payload = the data (the last
    /// block of the disk may be short), CRC-32C `crc`.
    Chunk {
        disk: u16,
        first_block: u64,
        blocks: u32,
        crc: u32,
    },
    /// The resync passes of every disk are over; epoch 0 carries the rest.
    ResyncDone {
        rounds: u32,
        blocks: u64,
    },
    /// Read `len` bytes at `offset` of disk `disk` from the committed replica.
    Read {
        id: u64,
        disk: u16,
        offset: u64,
        len: u32,
    },
    /// Digests of `count` ranges of `range_bytes` from range `first_range`.
    Verify {
        id: u64,
        disk: u16,
        range_bytes: u64,
        first_range: u64,
        count: u32,
    },
}

/// Standby to primary.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum DiskToPrimary {
    /// Answer to the session's start; payload = the bitmaps.
    Meta { disks: Vec<DiskReport> },
    /// The chunk is durable on the standby's image.
    ChunkDone {
        disk: u16,
        first_block: u64,
        blocks: u32,
    },
    /// The standby cannot take part (it refused the plan, or its disk failed).
    Refused { reason: String },
    /// Answer to `Read`; payload = the data when `ok`.
    ReadDone { id: u64, ok: bool },
    /// Answer to `Verify`; payload = `count` digests.
    Digests { id: u64, count: u32, ok: bool },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("disk message head of {0} bytes exceeds {MAX_HEAD_BYTES}")]
    HeadTooLarge(usize),
    #[error("disk message payload of {0} bytes exceeds {MAX_PAYLOAD_BYTES}")]
    PayloadTooLarge(usize),
    #[error("disk message head does not decode: {0}")]
    Postcard(#[from] postcard::Error),
    #[error("disk message head has {0} trailing bytes")]
    Trailing(usize),
    #[error("{what}: {have} exceeds the limit of {max}")]
    Exceeded {
        what: &'static str,
        have: u64,
        max: u64,
    },
    #[error("payload is {have} bytes, the head describes {want}")]
    PayloadLen { have: u64, want: u64 },
    #[error("chunk checksum mismatch (head {stored:#010x}, computed {computed:#010x})")]
    Checksum { stored: u32, computed: u32 },
    #[error("a {0} message carries a payload")]
    UnexpectedPayload(&'static str),
    #[error("{0} must not be zero")]
    Zero(&'static str),
}

fn limit(what: &'static str, have: u64, max: u64) -> Result<(), WireError> {
    if have > max {
        return Err(WireError::Exceeded { what, have, max });
    }
    Ok(())
}

fn no_payload(payload: &[u8], what: &'static str) -> Result<(), WireError> {
    if payload.is_empty() {
        Ok(())
    } else {
        Err(WireError::UnexpectedPayload(what))
    }
}

fn payload_is(payload: &[u8], want: u64) -> Result<(), WireError> {
    if payload.len() as u64 != want {
        return Err(WireError::PayloadLen {
            have: payload.len() as u64,
            want,
        });
    }
    Ok(())
}

impl DiskToStandby {
    /// Checks limits and the payload against the head.
    pub fn check(&self, payload: &[u8]) -> Result<(), WireError> {
        match self {
            DiskToStandby::Plan { disks } => {
                limit("disks", disks.len() as u64, MAX_DISKS as u64)?;
                for d in disks {
                    limit("reason bytes", d.reason.len() as u64, MAX_REASON as u64)?;
                    limit(
                        "history entries",
                        d.source_history.len() as u64,
                        MAX_HISTORY as u64,
                    )?;
                }
                no_payload(payload, "disk plan")
            }
            DiskToStandby::Chunk { blocks, crc, .. } => {
                limit(
                    "chunk bytes",
                    payload.len() as u64,
                    u64::from(MAX_CHUNK_BYTES),
                )?;
                if *blocks == 0 || payload.is_empty() {
                    return Err(WireError::PayloadLen {
                        have: payload.len() as u64,
                        want: 1,
                    });
                }
                let computed = crc32c::crc32c(payload);
                if computed != *crc {
                    return Err(WireError::Checksum {
                        stored: *crc,
                        computed,
                    });
                }
                Ok(())
            }
            DiskToStandby::ResyncDone { .. } => no_payload(payload, "resync done"),
            DiskToStandby::Read { len, .. } => {
                limit("read bytes", u64::from(*len), u64::from(MAX_CHUNK_BYTES))?;
                no_payload(payload, "read")
            }
            DiskToStandby::Verify {
                count, range_bytes, ..
            } => {
                limit("digests", u64::from(*count), u64::from(MAX_DIGESTS))?;
                limit("range bytes", *range_bytes, MAX_VERIFY_RANGE)?;
                if *range_bytes == 0 {
                    return Err(WireError::Zero("verify range bytes"));
                }
                no_payload(payload, "verify")
            }
        }
    }
}

impl DiskToPrimary {
    /// Checks limits and the payload against the head.
    pub fn check(&self, payload: &[u8]) -> Result<(), WireError> {
        match self {
            DiskToPrimary::Meta { disks } => {
                limit("disks", disks.len() as u64, MAX_DISKS as u64)?;
                let mut words = 0u64;
                for d in disks {
                    limit("bitmap words", d.bitmap_words, MAX_BITMAP_WORDS)?;
                    words += d.bitmap_words;
                    if let WireMeta::Damaged(r) | WireMeta::Replaced(r) = &d.meta {
                        limit("reason bytes", r.len() as u64, MAX_REASON as u64)?;
                    }
                }
                limit("bitmap bytes", words * 8, MAX_PAYLOAD_BYTES)?;
                payload_is(payload, words * 8)
            }
            DiskToPrimary::ChunkDone { .. } => no_payload(payload, "chunk done"),
            DiskToPrimary::Refused { reason } => {
                limit("reason bytes", reason.len() as u64, MAX_REASON as u64)?;
                no_payload(payload, "refused")
            }
            DiskToPrimary::ReadDone { ok, .. } => {
                limit(
                    "read bytes",
                    payload.len() as u64,
                    u64::from(MAX_CHUNK_BYTES),
                )?;
                if !ok {
                    no_payload(payload, "failed read")?;
                }
                Ok(())
            }
            DiskToPrimary::Digests { count, ok, .. } => {
                limit("digests", u64::from(*count), u64::from(MAX_DIGESTS))?;
                if *ok {
                    payload_is(payload, u64::from(*count) * DIGEST_LEN as u64)
                } else {
                    no_payload(payload, "failed digests")
                }
            }
        }
    }
}

fn decode_head<'a, T: Deserialize<'a>>(head: &'a [u8], payload: &[u8]) -> Result<T, WireError> {
    if head.len() > MAX_HEAD_BYTES {
        return Err(WireError::HeadTooLarge(head.len()));
    }
    if payload.len() as u64 > MAX_PAYLOAD_BYTES {
        return Err(WireError::PayloadTooLarge(payload.len()));
    }
    let (v, rest) = postcard::take_from_bytes::<T>(head)?;
    if !rest.is_empty() {
        return Err(WireError::Trailing(rest.len()));
    }
    Ok(v)
}

/// Decodes and checks a message from the primary (its head and its payload).
pub fn decode_to_standby(head: &[u8], payload: &[u8]) -> Result<DiskToStandby, WireError> {
    let m: DiskToStandby = decode_head(head, payload)?;
    m.check(payload)?;
    Ok(m)
}

/// Decodes and checks a message from the standby (its head and its payload).
pub fn decode_to_primary(head: &[u8], payload: &[u8]) -> Result<DiskToPrimary, WireError> {
    let m: DiskToPrimary = decode_head(head, payload)?;
    m.check(payload)?;
    Ok(m)
}

/// Encodes a message head (postcard).
pub fn encode<T: Serialize>(m: &T) -> Result<Vec<u8>, WireError> {
    Ok(postcard::to_stdvec(m)?)
}

/// Splits a `Meta` payload into each disk's bitmap words (the payload was checked
/// against the reports by [`decode_to_primary`]).
pub fn bitmap_words(disks: &[DiskReport], payload: &[u8]) -> Vec<Vec<u64>> {
    let mut out = Vec::with_capacity(disks.len());
    let mut at = 0usize;
    for d in disks {
        let n = d.bitmap_words as usize * 8;
        let bytes = payload.get(at..at + n).unwrap_or(&[]);
        out.push(
            bytes
                .chunks_exact(8)
                .map(|c| {
                    let mut w = [0u8; 8];
                    w.copy_from_slice(c);
                    u64::from_le_bytes(w)
                })
                .collect(),
        );
        at += n;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_crc_and_limits() {
        let data = vec![5u8; 4096];
        let ok = DiskToStandby::Chunk {
            disk: 0,
            first_block: 3,
            blocks: 1,
            crc: crc32c::crc32c(&data),
        };
        ok.check(&data).unwrap();
        let head = encode(&ok).unwrap();
        assert_eq!(decode_to_standby(&head, &data).unwrap(), ok);
        let mut bad = data.clone();
        bad[7] ^= 1;
        assert!(matches!(ok.check(&bad), Err(WireError::Checksum { .. })));
        let big = vec![0u8; MAX_CHUNK_BYTES as usize + 1];
        let h = DiskToStandby::Chunk {
            disk: 0,
            first_block: 0,
            blocks: 1,
            crc: crc32c::crc32c(&big),
        };
        assert!(h.check(&big).is_err());
        assert!(DiskToStandby::ResyncDone {
            rounds: 1,
            blocks: 0
        }
        .check(b"x")
        .is_err());
    }

    #[test]
    fn meta_payload_must_match_bitmaps() {
        let disks = vec![
            DiskReport {
                meta: WireMeta::Missing,
                bitmap_words: 2,
                dirty_blocks: 1,
            },
            DiskReport {
                meta: WireMeta::Damaged("crc".into()),
                bitmap_words: 1,
                dirty_blocks: 0,
            },
        ];
        let mut payload = Vec::new();
        for w in [1u64, 2, 3] {
            payload.extend_from_slice(&w.to_le_bytes());
        }
        let m = DiskToPrimary::Meta {
            disks: disks.clone(),
        };
        m.check(&payload).unwrap();
        assert_eq!(bitmap_words(&disks, &payload), vec![vec![1, 2], vec![3]]);
        assert!(m.check(&payload[..16]).is_err());
        let huge = DiskToPrimary::Meta {
            disks: vec![DiskReport {
                meta: WireMeta::Missing,
                bitmap_words: MAX_BITMAP_WORDS + 1,
                dirty_blocks: 0,
            }],
        };
        assert!(huge.check(&[]).is_err());
    }

    #[test]
    fn digests_payload_length() {
        let d = DiskToPrimary::Digests {
            id: 1,
            count: 2,
            ok: true,
        };
        d.check(&[0u8; 64]).unwrap();
        assert!(d.check(&[0u8; 63]).is_err());
    }

    #[test]
    fn garbage_gives_typed_errors() {
        for junk in [&b""[..], &[0xff; 7][..], &[9][..], &[2, 0][..]] {
            assert!(decode_to_standby(junk, &[]).is_err());
        }
        for junk in [&b""[..], &[0xff; 7][..], &[5][..], &[1, 0][..]] {
            assert!(decode_to_primary(junk, &[]).is_err());
        }
        assert!(matches!(
            decode_to_standby(&vec![0u8; MAX_HEAD_BYTES + 1], &[]),
            Err(WireError::HeadTooLarge(_))
        ));
        let mut h = encode(&DiskToPrimary::ChunkDone {
            disk: 1,
            first_block: 2,
            blocks: 3,
        })
        .unwrap();
        assert!(decode_to_primary(&h, &[]).is_ok());
        h.push(0);
        assert!(matches!(
            decode_to_primary(&h, &[]),
            Err(WireError::Trailing(1))
        ));
    }
}
