//! The disk-mirroring messages of the A-Link protocol (see `storage-mirror`): the
//! metadata exchange that decides how a returning standby's disks are brought back in
//! sync, the resync chunks, reads served from the partner's replica when the local disk
//! failed, and online verify digests.
//!
//! Session order: the primary's `Hello` is answered by [`DiskToPrimary::Meta`]; the
//! primary decides per disk and sends [`DiskToStandby::Plan`]; resync chunks follow in
//! disk order, each acknowledged once durable; [`DiskToStandby::ResyncDone`] ends the
//! resync rounds, and the memory synchronisation and epoch 0 (which carries every block
//! written during the resync) follow. Every size is bounded and checked on decode.

use serde::{Deserialize, Serialize};
use storage_mirror::meta::{MetaState, ReplicaMeta};

use crate::messages::{DecodeError, LimitError};

/// Disks per VM, at most.
pub const MAX_DISKS: usize = 64;
/// Bytes of one resync chunk or served read, at most.
pub const MAX_CHUNK_BYTES: u32 = 4 << 20;
/// Bitmap words of one disk, at most (1 TiB at 4 KiB blocks).
pub const MAX_BITMAP_WORDS: u64 = (1 << 40) / 4096 / 64;
/// Verify digests per request, at most.
pub const MAX_DIGESTS: u32 = 1024;
/// Digest bytes (SHA-256).
pub const DIGEST_LEN: usize = 32;
/// Bytes of a reason string, at most.
pub const MAX_REASON: usize = 1024;

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

/// Primary to standby, disk part.
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
    /// The resync rounds of every disk are over; epoch 0 carries the rest.
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

/// Standby to primary, disk part.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum DiskToPrimary {
    /// Answer to `Hello`; payload = the bitmaps.
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

fn limit(what: &'static str, have: u64, max: u64) -> Result<(), DecodeError> {
    if have > max {
        return Err(LimitError::Exceeded { what, have, max }.into());
    }
    Ok(())
}

fn no_payload(payload: &[u8], what: &'static str) -> Result<(), DecodeError> {
    if payload.is_empty() {
        Ok(())
    } else {
        Err(DecodeError::UnexpectedPayload(what))
    }
}

fn payload_is(payload: &[u8], want: u64) -> Result<(), DecodeError> {
    if payload.len() as u64 != want {
        return Err(LimitError::PayloadLen {
            have: payload.len() as u64,
            want,
        }
        .into());
    }
    Ok(())
}

impl DiskToStandby {
    /// Checks limits and the payload against the head.
    pub fn check(&self, payload: &[u8]) -> Result<(), DecodeError> {
        match self {
            DiskToStandby::Plan { disks } => {
                limit("disks", disks.len() as u64, MAX_DISKS as u64)?;
                for d in disks {
                    limit("reason bytes", d.reason.len() as u64, MAX_REASON as u64)?;
                    limit("history entries", d.source_history.len() as u64, 64)?;
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
                    return Err(LimitError::PayloadLen {
                        have: payload.len() as u64,
                        want: 1,
                    }
                    .into());
                }
                let computed = crc32c::crc32c(payload);
                if computed != *crc {
                    return Err(DecodeError::Checksum {
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
                limit("range bytes", *range_bytes, 1 << 30)?;
                if *range_bytes == 0 {
                    return Err(LimitError::Exceeded {
                        what: "zero range bytes",
                        have: 0,
                        max: 0,
                    }
                    .into());
                }
                no_payload(payload, "verify")
            }
        }
    }
}

impl DiskToPrimary {
    /// Checks limits and the payload against the head.
    pub fn check(&self, payload: &[u8]) -> Result<(), DecodeError> {
        match self {
            DiskToPrimary::Meta { disks } => {
                limit("disks", disks.len() as u64, MAX_DISKS as u64)?;
                let mut words = 0u64;
                for d in disks {
                    limit("bitmap words", d.bitmap_words, MAX_BITMAP_WORDS)?;
                    words += d.bitmap_words;
                }
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

/// Splits a `Meta` payload into each disk's bitmap words.
pub fn bitmap_words(disks: &[DiskReport], payload: &[u8]) -> Vec<Vec<u64>> {
    let mut out = Vec::with_capacity(disks.len());
    let mut at = 0usize;
    for d in disks {
        let n = d.bitmap_words as usize * 8;
        let bytes = payload.get(at..at + n).unwrap_or(&[]);
        out.push(
            bytes
                .chunks_exact(8)
                .map(|c| u64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
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
        let mut bad = data.clone();
        bad[7] ^= 1;
        assert!(matches!(ok.check(&bad), Err(DecodeError::Checksum { .. })));
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
}
