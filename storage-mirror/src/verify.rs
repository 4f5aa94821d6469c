//! Online verify: both replicas digest the same ranges, the digests are compared, and the
//! blocks of differing ranges are reported and marked for resync, never fixed here.
//!
//! [`range_digests`] is the I/O edge (reads a replica, SHA-256 per range). [`Verifier`]
//! is the pure planner: it hands out batches of ranges in disk order, takes both sides'
//! digests for a batch, and returns the block runs to mark. While the guest runs, a range
//! written between the two sides' reads can differ transiently: the caller should digest
//! both sides at the same epoch boundary (the standby applies epochs in order, so "after
//! epoch E" names the same contents on both), or verify a differing range again before
//! believing it.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use sha2::{Digest as _, Sha256};
use thiserror::Error;

pub const DEFAULT_RANGE_BYTES: u64 = 1 << 20;
/// Largest range: bounds one range's buffer.
pub const MAX_RANGE_BYTES: u64 = 64 << 20;
/// Most ranges per batch: bounds one digest message (32 bytes each).
pub const MAX_BATCH_RANGES: u32 = 4096;

/// SHA-256 of one range.
pub type Digest = [u8; 32];

#[derive(Debug, Error, PartialEq, Eq)]
pub enum VerifyError {
    #[error("invalid verify config: {0}")]
    Config(&'static str),
    #[error("batch at range {first_range} was not handed out (or already answered)")]
    UnknownBatch { first_range: u64 },
    #[error("batch at range {first_range} has {expected} ranges, got {local} local and {peer} peer digests")]
    Count {
        first_range: u64,
        expected: u32,
        local: usize,
        peer: usize,
    },
}

/// SHA-256 digests of `count` ranges of `range_bytes` starting at range `first_range`
/// (the disk's last range may be short). `buf` is scratch, kept to avoid reallocating.
pub fn range_digests(
    file: &File,
    disk_size: u64,
    range_bytes: u64,
    first_range: u64,
    count: u32,
    buf: &mut Vec<u8>,
) -> io::Result<Vec<Digest>> {
    let bad = |what: String| io::Error::new(io::ErrorKind::InvalidInput, what);
    if range_bytes == 0 || range_bytes > MAX_RANGE_BYTES {
        return Err(bad(format!("range size {range_bytes} out of bounds")));
    }
    let ranges = disk_size.div_ceil(range_bytes);
    if first_range
        .checked_add(u64::from(count))
        .is_none_or(|end| end > ranges)
    {
        return Err(bad(format!(
            "ranges {first_range}+{count} past the disk's {ranges} ranges"
        )));
    }
    let mut out = Vec::with_capacity(count as usize);
    for r in first_range..first_range + u64::from(count) {
        let start = r * range_bytes;
        let len = range_bytes.min(disk_size - start);
        buf.clear();
        buf.resize(len as usize, 0);
        file.read_exact_at(buf, start)?;
        out.push(Sha256::digest(&buf[..]).into());
    }
    Ok(out)
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VerifyOutcome {
    pub ranges_compared: u64,
    pub ranges_differing: u64,
    pub blocks_marked: u64,
    /// Every range has been compared.
    pub done: bool,
}

/// Pure planner over one disk's ranges.
pub struct Verifier {
    disk_size: u64,
    block_size: u32,
    range_bytes: u64,
    batch_ranges: u32,
    ranges: u64,
    /// Next range to hand out.
    next: u64,
    /// Batches handed out and not yet answered: (first_range, count).
    outstanding: Vec<(u64, u32)>,
    outcome: VerifyOutcome,
}

impl Verifier {
    /// `range_bytes` must be a multiple of `block_size` so each range covers whole blocks.
    pub fn new(
        disk_size: u64,
        block_size: u32,
        range_bytes: u64,
        batch_ranges: u32,
    ) -> Result<Self, VerifyError> {
        if !block_size.is_power_of_two() || block_size < 512 {
            return Err(VerifyError::Config(
                "block size must be a power of two >= 512",
            ));
        }
        if range_bytes == 0
            || range_bytes > MAX_RANGE_BYTES
            || range_bytes & (u64::from(block_size) - 1) != 0
        // a power of two, checked above
        {
            return Err(VerifyError::Config(
                "range size must be a non-zero multiple of the block size, at most 64 MiB",
            ));
        }
        if batch_ranges == 0 || batch_ranges > MAX_BATCH_RANGES {
            return Err(VerifyError::Config("batch must be 1..=4096 ranges"));
        }
        let ranges = disk_size.div_ceil(range_bytes);
        Ok(Verifier {
            disk_size,
            block_size,
            range_bytes,
            batch_ranges,
            ranges,
            next: 0,
            outstanding: Vec::new(),
            outcome: VerifyOutcome {
                done: ranges == 0,
                ..VerifyOutcome::default()
            },
        })
    }

    pub fn ranges(&self) -> u64 {
        self.ranges
    }

    pub fn range_bytes(&self) -> u64 {
        self.range_bytes
    }

    /// The next batch of ranges to digest on both sides, in disk order; None when all
    /// have been handed out.
    pub fn next_batch(&mut self) -> Option<(u64, u32)> {
        if self.next >= self.ranges {
            return None;
        }
        let count = u64::from(self.batch_ranges).min(self.ranges - self.next) as u32;
        let b = (self.next, count);
        self.next += u64::from(count);
        self.outstanding.push(b);
        Some(b)
    }

    /// Compares a batch's digests; returns the block runs `(first_block, blocks)` of the
    /// differing ranges (adjacent differing ranges merged) for the caller to mark.
    pub fn on_digests(
        &mut self,
        first_range: u64,
        local: &[Digest],
        peer: &[Digest],
    ) -> Result<Vec<(u64, u64)>, VerifyError> {
        let i = self
            .outstanding
            .iter()
            .position(|&(f, _)| f == first_range)
            .ok_or(VerifyError::UnknownBatch { first_range })?;
        let count = self.outstanding[i].1;
        if local.len() != count as usize || peer.len() != count as usize {
            return Err(VerifyError::Count {
                first_range,
                expected: count,
                local: local.len(),
                peer: peer.len(),
            });
        }
        self.outstanding.swap_remove(i);
        let bs = u64::from(self.block_size);
        let disk_blocks = self.disk_size.div_ceil(bs);
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for (k, (l, p)) in local.iter().zip(peer).enumerate() {
            self.outcome.ranges_compared += 1;
            if l == p {
                continue;
            }
            self.outcome.ranges_differing += 1;
            let r = first_range + k as u64;
            let first = r * self.range_bytes / bs;
            let end = ((r + 1) * self.range_bytes / bs).min(disk_blocks);
            match runs.last_mut() {
                Some((f, n)) if *f + *n == first => *n += end - first,
                _ => runs.push((first, end - first)),
            }
            self.outcome.blocks_marked += end - first;
        }
        if self.next >= self.ranges && self.outstanding.is_empty() {
            self.outcome.done = true;
        }
        Ok(runs)
    }

    pub fn report(&self) -> VerifyOutcome {
        self.outcome
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::OpenOptions;
    use std::path::PathBuf;
    use std::sync::atomic::{AtomicU32, Ordering};

    static N: AtomicU32 = AtomicU32::new(0);

    struct Tmp(PathBuf);
    impl Drop for Tmp {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    fn image(bytes: &[u8]) -> (Tmp, File) {
        let p = std::env::temp_dir().join(format!(
            "twinrun-verify-{}-{}.img",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&p)
            .unwrap();
        f.write_all_at(bytes, 0).unwrap();
        (Tmp(p), f)
    }

    fn run(
        a: &File,
        b: &File,
        size: u64,
        range: u64,
        batch: u32,
    ) -> (Vec<(u64, u64)>, VerifyOutcome) {
        let mut v = Verifier::new(size, 4096, range, batch).unwrap();
        let mut buf = Vec::new();
        let mut marked = Vec::new();
        while let Some((first, count)) = v.next_batch() {
            let l = range_digests(a, size, range, first, count, &mut buf).unwrap();
            let p = range_digests(b, size, range, first, count, &mut buf).unwrap();
            marked.extend(v.on_digests(first, &l, &p).unwrap());
        }
        (marked, v.report())
    }

    #[test]
    fn reports_exactly_the_ranges_with_flipped_bytes() {
        // 10 ranges of 16 KiB, the last one short (disk not a multiple of anything).
        let size: u64 = 9 * 16384 + 5000;
        let data: Vec<u8> = (0..size).map(|i| (i * 31 % 251) as u8).collect();
        let (_ta, a) = image(&data);
        let mut other = data.clone();
        for off in [100u64, 16384 * 3 + 7, 16384 * 4, 16384 * 4 + 9000, size - 1] {
            other[off as usize] ^= 0x40;
        }
        let (_tb, b) = image(&other);
        let (marked, out) = run(&a, &b, size, 16384, 3);
        // Ranges 0, 3, 4, 9 differ; 3 and 4 (same batch) merge; range 9 has 2 blocks (one short).
        assert_eq!(marked, vec![(0, 4), (12, 8), (36, 2)]);
        assert_eq!(
            out,
            VerifyOutcome {
                ranges_compared: 10,
                ranges_differing: 4,
                blocks_marked: 14,
                done: true
            }
        );
        // Identical replicas: nothing.
        let (_tc, c) = image(&data);
        let (marked, out) = run(&a, &c, size, 16384, 4);
        assert!(marked.is_empty());
        assert_eq!(
            (out.ranges_compared, out.ranges_differing, out.done),
            (10, 0, true)
        );
    }

    #[test]
    fn merges_runs_within_a_batch() {
        let size = 4 * 8192u64;
        let (_ta, a) = image(&vec![0u8; size as usize]);
        let (_tb, b) = image(&vec![1u8; size as usize]);
        let (marked, out) = run(&a, &b, size, 8192, 4);
        assert_eq!(marked, vec![(0, 8)]);
        assert_eq!(out.blocks_marked, 8);
    }

    #[test]
    fn rejects_unknown_batches_and_bad_counts() {
        let mut v = Verifier::new(1 << 20, 4096, 1 << 16, 4).unwrap();
        let (f, n) = v.next_batch().unwrap();
        assert_eq!((f, n), (0, 4));
        let d = vec![[0u8; 32]; 4];
        assert_eq!(
            v.on_digests(4, &d, &d),
            Err(VerifyError::UnknownBatch { first_range: 4 })
        );
        assert!(matches!(
            v.on_digests(0, &d[..3], &d),
            Err(VerifyError::Count { .. })
        ));
        assert_eq!(v.on_digests(0, &d, &d), Ok(vec![]));
        assert_eq!(
            v.on_digests(0, &d, &d),
            Err(VerifyError::UnknownBatch { first_range: 0 })
        );
        assert!(!v.report().done);
        assert!(Verifier::new(1 << 20, 4096, 1000, 4).is_err());
        assert!(Verifier::new(1 << 20, 4096, 4096, 0).is_err());
    }

    #[test]
    fn digests_reject_ranges_past_the_end() {
        let (_t, f) = image(&[7u8; 5000]);
        let mut buf = Vec::new();
        assert_eq!(
            range_digests(&f, 5000, 4096, 0, 2, &mut buf).unwrap().len(),
            2
        );
        assert!(range_digests(&f, 5000, 4096, 1, 2, &mut buf).is_err());
    }
}
