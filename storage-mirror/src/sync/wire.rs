//! The messages of an HA pair's disk link: the disk session's own messages (encoded by
//! [`crate::wire`], carried opaque), synchronous write batches and their
//! acknowledgements, and the commit that ends a resync. Decoding checks every bound.

use serde::{Deserialize, Serialize};

use crate::wire::{MAX_DISKS, MAX_HEAD_BYTES, MAX_PAYLOAD_BYTES};

/// Writes in one batch at most (a virtio-blk queue holds far fewer requests).
pub const MAX_BATCH_WRITES: usize = 1024;

/// One write of a batch: disk, byte offset, length (its data follows in the payload,
/// in order).
pub type WriteHead = (u16, u64, u32);

/// One write with its data: disk, byte offset, data (as the apply journal takes it).
pub type WriteData<'a> = (u16, u64, &'a [u8]);

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum HaToStandby {
    /// A session starts: report your disks (the disk session's `Hello`).
    Hello,
    /// A disk-session message (`crate::wire::DiskToStandby`, encoded).
    Session(Vec<u8>),
    /// A guest write batch: apply it durably, then acknowledge `seq`.
    Writes { seq: u64, writes: Vec<WriteHead> },
    /// The resync is over: apply these last blocks durably (as journal epoch `seq`,
    /// acknowledged like a batch); the replicas are then in sync (the disk session's
    /// epoch 0).
    EndResync { seq: u64, writes: Vec<WriteHead> },
    /// A live migration begins (every batch before it is acknowledged, none follows):
    /// end this session and receive the VM over a checkpoint session (the pre-copy)
    /// on a fresh A-Link; its planned swap hands the VM over (`twinrun-pair`'s
    /// `ha::migrate`).
    Migrate,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum HaToPrimary {
    /// A disk-session message (`crate::wire::DiskToPrimary`, encoded).
    Session(Vec<u8>),
    /// Every batch through `seq` is durable on the standby.
    Ack { seq: u64 },
    /// Epoch 0 is durable: the standby's replicas are in sync.
    InSync,
    /// The standby cannot apply what it was sent (its disk failed...): it stops.
    Failed { reason: String },
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum HaWireError {
    #[error("HA disk message: {0}")]
    Decode(String),
    #[error("HA disk message: {0}")]
    Bounds(String),
}

/// Checks a write list against the payload that carries the data; returns each
/// write's data.
pub fn split_writes<'a>(
    writes: &[WriteHead],
    payload: &'a [u8],
) -> Result<Vec<WriteData<'a>>, HaWireError> {
    if writes.len() > MAX_BATCH_WRITES {
        return Err(HaWireError::Bounds(format!(
            "{} writes in a batch (at most {MAX_BATCH_WRITES})",
            writes.len()
        )));
    }
    if payload.len() as u64 > MAX_PAYLOAD_BYTES {
        return Err(HaWireError::Bounds(format!(
            "payload of {} bytes",
            payload.len()
        )));
    }
    let mut at = 0usize;
    let mut out = Vec::with_capacity(writes.len());
    for &(disk, offset, len) in writes {
        if usize::from(disk) >= MAX_DISKS {
            return Err(HaWireError::Bounds(format!("disk {disk}")));
        }
        let end = at
            .checked_add(len as usize)
            .filter(|&e| e <= payload.len())
            .ok_or_else(|| HaWireError::Bounds("writes longer than the payload".into()))?;
        out.push((disk, offset, &payload[at..end]));
        at = end;
    }
    if at != payload.len() {
        return Err(HaWireError::Bounds(format!(
            "{} payload bytes past the writes",
            payload.len() - at
        )));
    }
    Ok(out)
}

/// Decodes a message head (bounded).
pub fn decode<'a, T: Deserialize<'a>>(head: &'a [u8]) -> Result<T, HaWireError> {
    if head.len() > MAX_HEAD_BYTES + 64 {
        return Err(HaWireError::Bounds(format!("head of {} bytes", head.len())));
    }
    postcard::from_bytes(head).map_err(|e| HaWireError::Decode(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_split_exactly_over_the_payload() {
        let p = [1u8, 2, 3, 4, 5];
        let w = split_writes(&[(0, 0, 2), (1, 4096, 3)], &p).unwrap();
        assert_eq!(w, vec![(0, 0, &p[..2]), (1, 4096, &p[2..])]);
        assert!(split_writes(&[(0, 0, 6)], &p).is_err());
        assert!(split_writes(&[(0, 0, 4)], &p).is_err());
        assert!(split_writes(&[(MAX_DISKS as u16, 0, 5)], &p).is_err());
        assert!(split_writes(&[(0, 0, u32::MAX)], &p).is_err());
    }

    #[test]
    fn heads_round_trip_and_garbage_is_an_error() {
        let m = HaToStandby::Writes {
            seq: 9,
            writes: vec![(0, 512, 512)],
        };
        let b = postcard::to_allocvec(&m).unwrap();
        assert_eq!(decode::<HaToStandby>(&b), Ok(m));
        assert!(decode::<HaToPrimary>(&[0xff, 0xff, 0xff]).is_err());
    }
}
