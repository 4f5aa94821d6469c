//! Resync in disk order while the guest runs: the planner (pure) and chunk I/O (edges).
//!
//! [`ResyncPlanner`] walks a [`BlockSet`] (the source's persistent dirty bitmap) from a
//! cursor in ascending block order and hands out [`Chunk`]s: runs of consecutive set
//! blocks, at most `chunk_blocks` long. A chunk never includes clear blocks: the walk is
//! ascending anyway, so reads stay sequential in the kernel's eyes, and only blocks that
//! need copying cross the link (a sparse bitmap yields small chunks; that is the price).
//!
//! Flow: `next_chunk` -> caller reads it with [`read_chunk`] and sends it -> the target
//! [`write_chunk`]s it, syncs, and acknowledges -> `on_acked` -> the caller clears the
//! chunk's bits in the bitmap (persistently). Bits are cleared only after the target's
//! durable ack, so the bitmap itself IS the progress: the planner keeps no durable state,
//! and a new planner over the same bitmap resumes where the old one stopped (chunks that
//! were in flight are simply sent again).
//!
//! The caller must not lose a guest write that lands in a chunk between its read and its
//! ack: either such writes are mirrored to the target as usual (connected resync), or the
//! caller sets the block's bit again after clearing the chunk.
//!
//! When the cursor reaches the end while bits remain behind it (set again by the guest
//! meanwhile) and nothing is in flight, the walk starts another pass from block 0, so the
//! planner converges as long as the guest dirties blocks slower than resync copies them.
//!
//! Throttling (token bucket, debt style): a chunk may start when the bucket is not in
//! debt; starting it takes its bytes from the bucket, which may go negative; the bucket
//! refills at the effective rate up to one full chunk of bytes. The effective rate is
//! `rate_limit` (None = unlimited), lowered to [`GuestIoShare::busy_rate`] while the guest
//! is busy. The guest is busy for `window` after it did more than `busy_bytes` of I/O
//! within one `window` (counted in fixed windows from the first noted I/O). So guest I/O
//! keeps priority: resync drops to a trickle while the guest works and speeds up again
//! one `window` after it stops.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

use thiserror::Error;

use crate::BlockSet;

/// Longest chunk (256 MiB at 4 KiB blocks): bounds one chunk's buffer.
pub const MAX_CHUNK_BLOCKS: u32 = 1 << 16;
const NANOS: i128 = 1_000_000_000;

/// Nano-bytes `rate` bytes/s earns in `dt`.
fn nano_bytes(rate: u64, dt: Duration) -> i128 {
    i128::from(rate).saturating_mul(dt.as_nanos().min(u64::MAX as u128) as i128)
}

/// Most chunks in flight at once.
pub const MAX_IN_FLIGHT: usize = 1024;

/// How guest I/O throttles the resync (see the module doc).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GuestIoShare {
    /// Observation window; the guest stays "busy" this long after its last busy window.
    pub window: Duration,
    /// Guest bytes within one window above which the guest counts as busy.
    pub busy_bytes: u64,
    /// Resync rate (bytes/s) while the guest is busy; must be > 0 so resync still ends.
    pub busy_rate: u64,
}

impl Default for GuestIoShare {
    fn default() -> Self {
        GuestIoShare {
            window: Duration::from_millis(100),
            busy_bytes: 64 << 10,
            busy_rate: 8 << 20,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ResyncConfig {
    /// Longest chunk in blocks (default 256: 1 MiB at 4 KiB).
    pub chunk_blocks: u32,
    /// Chunks sent and not yet acknowledged (default 8).
    pub max_in_flight: usize,
    /// Bytes per second when the guest is quiet; None = unlimited.
    pub rate_limit: Option<u64>,
    pub guest_io_share: GuestIoShare,
}

impl Default for ResyncConfig {
    fn default() -> Self {
        ResyncConfig {
            chunk_blocks: 256,
            max_in_flight: 8,
            rate_limit: None,
            guest_io_share: GuestIoShare::default(),
        }
    }
}

impl ResyncConfig {
    pub fn validate(&self) -> Result<(), ResyncError> {
        let bad = |what: &'static str| Err(ResyncError::Config(what));
        if self.chunk_blocks == 0 || self.chunk_blocks > MAX_CHUNK_BLOCKS {
            return bad("chunk_blocks must be 1..=65536");
        }
        if self.max_in_flight == 0 || self.max_in_flight > MAX_IN_FLIGHT {
            return bad("max_in_flight must be 1..=1024");
        }
        if self.rate_limit == Some(0) {
            return bad("rate_limit must be > 0 (None = unlimited)");
        }
        if self.guest_io_share.busy_rate == 0 {
            return bad("guest_io_share.busy_rate must be > 0");
        }
        if self.guest_io_share.window.is_zero() {
            return bad("guest_io_share.window must be > 0");
        }
        Ok(())
    }
}

/// A run of blocks to copy from source to target.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Chunk {
    pub id: u64,
    pub first_block: u64,
    pub blocks: u32,
}

impl Chunk {
    /// One past the last block.
    pub fn end_block(&self) -> u64 {
        self.first_block + u64::from(self.blocks)
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ResyncProgressView {
    /// Blocks acknowledged by the target.
    pub done_blocks: u64,
    /// Blocks set when the planner started (blocks the guest dirties later add to the work
    /// but not to this total, so done may pass total).
    pub total_blocks: u64,
    pub chunks_in_flight: usize,
    /// Bytes handed out in chunks (including re-sent ones).
    pub bytes_sent: u64,
}

#[derive(Debug, Error)]
pub enum ResyncError {
    #[error("invalid resync config: {0}")]
    Config(&'static str),
    #[error("block size {0} is not a power of two in 512..=1 MiB")]
    BlockSize(u32),
    #[error("chunk {0} was already acknowledged or failed")]
    AlreadyAcked(u64),
    #[error("chunk {0} was never handed out")]
    UnknownChunk(u64),
    #[error("a new pass cannot start with {0} chunks in flight")]
    InFlight(usize),
    #[error("chunk {first_block}+{blocks} is outside a disk of {disk_size} bytes")]
    Range {
        first_block: u64,
        blocks: u32,
        disk_size: u64,
    },
    #[error("chunk {first_block}+{blocks} needs {expected} bytes, got {got}")]
    Length {
        first_block: u64,
        blocks: u32,
        expected: u64,
        got: u64,
    },
    #[error("chunk I/O: {0}")]
    Io(#[from] io::Error),
}

pub struct ResyncPlanner {
    cfg: ResyncConfig,
    block_size: u32,
    total_blocks: u64,
    /// Next block to look at; every in-flight chunk lies below it (same pass).
    cursor: u64,
    passes: u64,
    in_flight: Vec<Chunk>,
    next_id: u64,
    done_blocks: u64,
    bytes_sent: u64,
    /// Token bucket in nano-bytes (bytes x 1e9, so refills at any rate are exact);
    /// negative = debt. Meaningful only while a rate applies.
    tokens: i128,
    /// When `tokens` was last refilled (None: not yet).
    refilled: Option<Instant>,
    guest_window_start: Option<Instant>,
    guest_window_bytes: u64,
    guest_busy_until: Option<Instant>,
}

impl ResyncPlanner {
    /// `total_blocks`: bits set when resync starts (for progress only).
    pub fn new(cfg: ResyncConfig, block_size: u32, total_blocks: u64) -> Result<Self, ResyncError> {
        cfg.validate()?;
        if !block_size.is_power_of_two() || !(512..=1 << 20).contains(&block_size) {
            return Err(ResyncError::BlockSize(block_size));
        }
        let mut p = ResyncPlanner {
            cfg,
            block_size,
            total_blocks,
            cursor: 0,
            passes: 0,
            in_flight: Vec::with_capacity(cfg.max_in_flight),
            next_id: 0,
            done_blocks: 0,
            bytes_sent: 0,
            tokens: 0,
            refilled: None,
            guest_window_start: None,
            guest_window_bytes: 0,
            guest_busy_until: None,
        };
        p.tokens = p.capacity();
        Ok(p)
    }

    pub fn config(&self) -> &ResyncConfig {
        &self.cfg
    }

    /// Completed passes over the disk (a pass ends when the cursor wraps).
    pub fn passes(&self) -> u64 {
        self.passes
    }

    /// Starts a new pass at block 0, now, whatever the cursor says: a caller that ends
    /// passes itself (nothing set past the last chunk) must make the next pass sweep
    /// the whole disk again. Otherwise the walk would go on from the old cursor, find
    /// only blocks the guest wrote ahead of it, and a "pass" of those alone would skip
    /// every block left set behind it (written during the previous pass, which the new
    /// pass exists to copy again). Only with nothing in flight.
    pub fn restart_pass(&mut self) -> Result<(), ResyncError> {
        if !self.in_flight.is_empty() {
            return Err(ResyncError::InFlight(self.in_flight.len()));
        }
        if self.cursor > 0 {
            self.cursor = 0;
            self.passes += 1;
        }
        Ok(())
    }

    fn chunk_bytes(&self) -> u64 {
        u64::from(self.cfg.chunk_blocks) * u64::from(self.block_size)
    }

    fn capacity(&self) -> i128 {
        i128::from(self.chunk_bytes()) * NANOS
    }

    fn guest_busy(&self, now: Instant) -> bool {
        self.guest_busy_until.is_some_and(|t| now < t)
    }

    /// Bytes/s now; None = unlimited.
    fn effective_rate(&self, now: Instant) -> Option<u64> {
        if self.guest_busy(now) {
            let busy = self.cfg.guest_io_share.busy_rate;
            Some(self.cfg.rate_limit.map_or(busy, |r| r.min(busy)))
        } else {
            self.cfg.rate_limit
        }
    }

    fn refill(&mut self, now: Instant) {
        let last = self.refilled.replace(now);
        let Some(last) = last else { return };
        // Instants are monotonic, but a caller could pass an older one: no time passed.
        let dt = now.saturating_duration_since(last);
        match self.effective_rate(now) {
            None => self.tokens = self.capacity(),
            Some(rate) => {
                self.tokens = self
                    .tokens
                    .saturating_add(nano_bytes(rate, dt))
                    .min(self.capacity());
            }
        }
    }

    /// The next chunk to send, or None when the window is full, the rate limiter says
    /// wait (see [`next_wakeup`](Self::next_wakeup)), or no set block is left past the
    /// cursor (with chunks in flight; with none, the walk wraps to block 0 first).
    pub fn next_chunk(&mut self, now: Instant, set: &dyn BlockSet) -> Option<Chunk> {
        if self.in_flight.len() >= self.cfg.max_in_flight {
            return None;
        }
        self.refill(now);
        if self.effective_rate(now).is_some() && self.tokens < 0 {
            return None;
        }
        let total = set.blocks();
        let first = match set.next_set(self.cursor).filter(|&b| b < total) {
            Some(b) => b,
            None if self.in_flight.is_empty() && self.cursor > 0 => {
                self.cursor = 0;
                self.passes += 1;
                set.next_set(0).filter(|&b| b < total)?
            }
            None => return None,
        };
        debug_assert!(first >= self.cursor);
        let limit = total.min(first + u64::from(self.cfg.chunk_blocks));
        let mut end = first + 1;
        while end < limit && set.is_set(end) {
            end += 1;
        }
        let c = Chunk {
            id: self.next_id,
            first_block: first,
            blocks: (end - first) as u32,
        };
        assert!(self
            .in_flight
            .iter()
            .all(|f| f.end_block() <= c.first_block));
        self.next_id += 1;
        self.cursor = end;
        self.in_flight.push(c);
        let bytes = u64::from(c.blocks) * u64::from(self.block_size);
        self.bytes_sent += bytes;
        if self.effective_rate(now).is_some() {
            self.tokens = self.tokens.saturating_sub(i128::from(bytes) * NANOS);
        }
        Some(c)
    }

    fn take(&mut self, id: u64) -> Result<Chunk, ResyncError> {
        match self.in_flight.iter().position(|c| c.id == id) {
            Some(i) => Ok(self.in_flight.swap_remove(i)),
            None if id < self.next_id => Err(ResyncError::AlreadyAcked(id)),
            None => Err(ResyncError::UnknownChunk(id)),
        }
    }

    /// The target durably wrote chunk `id`: the caller now clears its bits.
    pub fn on_acked(&mut self, id: u64) -> Result<Chunk, ResyncError> {
        let c = self.take(id)?;
        self.done_blocks += u64::from(c.blocks);
        Ok(c)
    }

    /// Chunk `id` failed (read or target error): its bits stay set and the next pass
    /// sends it again.
    pub fn on_failed(&mut self, id: u64) -> Result<Chunk, ResyncError> {
        self.take(id)
    }

    /// Guest I/O of `bytes` happened at `now` (reads and writes both count: they compete
    /// for the same disks).
    pub fn note_guest_io(&mut self, now: Instant, bytes: u64) {
        // Settle the bucket at the rate that applied until now.
        self.refill(now);
        let w = self.cfg.guest_io_share.window;
        let start = match self.guest_window_start {
            Some(s) if now.saturating_duration_since(s) < w => s,
            _ => {
                self.guest_window_bytes = 0;
                self.guest_window_start = Some(now);
                now
            }
        };
        debug_assert!(start <= now);
        self.guest_window_bytes = self.guest_window_bytes.saturating_add(bytes);
        if self.guest_window_bytes > self.cfg.guest_io_share.busy_bytes {
            self.guest_busy_until = Some(now + w);
        }
    }

    /// When the rate limiter allows the next chunk; None if it allows one now (the window
    /// or the lack of work may still stop it).
    pub fn next_wakeup(&self, now: Instant) -> Option<Instant> {
        let rate = self.effective_rate(now)?;
        let elapsed = self
            .refilled
            .map_or(Duration::ZERO, |t| now.saturating_duration_since(t));
        let tokens = self.tokens.saturating_add(nano_bytes(rate, elapsed));
        if tokens >= 0 {
            return None;
        }
        let wait_ns = tokens.unsigned_abs().div_ceil(u128::from(rate));
        let at = now + Duration::from_nanos(wait_ns.min(u128::from(u64::MAX)) as u64);
        // Once the guest stops, the normal rate (maybe unlimited) takes over.
        Some(match self.guest_busy_until {
            Some(b) if b > now && b < at && self.cfg.rate_limit.is_none() => b,
            _ => at,
        })
    }

    /// Nothing set and nothing in flight.
    pub fn is_done(&self, set: &dyn BlockSet) -> bool {
        self.in_flight.is_empty() && set.next_set(0).is_none_or(|b| b >= set.blocks())
    }

    pub fn progress(&self) -> ResyncProgressView {
        ResyncProgressView {
            done_blocks: self.done_blocks,
            total_blocks: self.total_blocks,
            chunks_in_flight: self.in_flight.len(),
            bytes_sent: self.bytes_sent,
        }
    }
}

/// Byte range of chunk `c` on a disk of `disk_size` bytes (the last block may be short).
fn chunk_range(block_size: u32, disk_size: u64, c: &Chunk) -> Option<(u64, u64)> {
    let bs = u64::from(block_size);
    let start = c.first_block.checked_mul(bs)?;
    let end = c.end_block().checked_mul(bs)?;
    // The last block must start inside the disk; only it may be cut short.
    if c.blocks == 0 || start >= disk_size || end - bs >= disk_size {
        return None;
    }
    Some((start, end.min(disk_size)))
}

/// Reads chunk `c` from the source into `buf` (resized to the chunk's byte length).
pub fn read_chunk(
    file: &File,
    block_size: u32,
    disk_size: u64,
    c: &Chunk,
    buf: &mut Vec<u8>,
) -> io::Result<()> {
    let (start, end) = chunk_range(block_size, disk_size, c).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "chunk {}+{} outside a disk of {disk_size} bytes",
                c.first_block, c.blocks
            ),
        )
    })?;
    buf.clear();
    buf.resize((end - start) as usize, 0);
    file.read_exact_at(buf, start)
}

/// Writes chunk `c`'s `data` into the target after checking range and length. Does not
/// sync: the caller syncs (maybe several chunks at once) before acknowledging.
pub fn write_chunk(
    file: &File,
    block_size: u32,
    disk_size: u64,
    c: &Chunk,
    data: &[u8],
) -> Result<(), ResyncError> {
    let (start, end) = chunk_range(block_size, disk_size, c).ok_or(ResyncError::Range {
        first_block: c.first_block,
        blocks: c.blocks,
        disk_size,
    })?;
    if data.len() as u64 != end - start {
        return Err(ResyncError::Length {
            first_block: c.first_block,
            blocks: c.blocks,
            expected: end - start,
            got: data.len() as u64,
        });
    }
    file.write_all_at(data, start)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Bits(Vec<bool>);
    impl BlockSet for Bits {
        fn blocks(&self) -> u64 {
            self.0.len() as u64
        }
        fn is_set(&self, b: u64) -> bool {
            self.0.get(b as usize).copied().unwrap_or(false)
        }
        fn next_set(&self, from: u64) -> Option<u64> {
            (from..self.blocks()).find(|&b| self.0[b as usize])
        }
    }
    impl Bits {
        fn with(n: usize, set: &[u64]) -> Bits {
            let mut v = vec![false; n];
            for &b in set {
                v[b as usize] = true;
            }
            Bits(v)
        }
        fn clear(&mut self, c: &Chunk) {
            for b in c.first_block..c.end_block() {
                self.0[b as usize] = false;
            }
        }
    }

    fn cfg(chunk: u32, window: usize, rate: Option<u64>) -> ResyncConfig {
        ResyncConfig {
            chunk_blocks: chunk,
            max_in_flight: window,
            rate_limit: rate,
            guest_io_share: GuestIoShare::default(),
        }
    }

    #[test]
    fn walks_in_disk_order_coalescing_runs() {
        let set = Bits::with(64, &[3, 4, 5, 6, 7, 9, 20, 21, 63]);
        let mut p = ResyncPlanner::new(cfg(4, 100, None), 4096, 9).unwrap();
        let t = Instant::now();
        let got: Vec<_> = std::iter::from_fn(|| p.next_chunk(t, &set))
            .map(|c| (c.first_block, c.blocks))
            .collect();
        assert_eq!(got, vec![(3, 4), (7, 1), (9, 1), (20, 2), (63, 1)]);
        // Nothing past the cursor and chunks in flight: no wrap.
        assert!(p.next_chunk(t, &set).is_none());
        assert!(!p.is_done(&set));
        assert_eq!(p.progress().bytes_sent, 9 * 4096);
    }

    #[test]
    fn window_limits_chunks_in_flight() {
        let set = Bits::with(100, &(0..100).collect::<Vec<_>>());
        let mut p = ResyncPlanner::new(cfg(10, 3, None), 4096, 100).unwrap();
        let t = Instant::now();
        let a = p.next_chunk(t, &set).unwrap();
        p.next_chunk(t, &set).unwrap();
        p.next_chunk(t, &set).unwrap();
        assert!(p.next_chunk(t, &set).is_none());
        assert_eq!(p.progress().chunks_in_flight, 3);
        p.on_acked(a.id).unwrap();
        assert_eq!(p.next_chunk(t, &set).unwrap().first_block, 30);
    }

    #[test]
    fn acks_out_of_order_and_bad_acks() {
        let mut set = Bits::with(40, &(0..40).collect::<Vec<_>>());
        let mut p = ResyncPlanner::new(cfg(10, 8, None), 4096, 40).unwrap();
        let t = Instant::now();
        let cs: Vec<_> = std::iter::from_fn(|| p.next_chunk(t, &set)).collect();
        assert_eq!(cs.len(), 4);
        for i in [2usize, 0, 3, 1] {
            let c = p.on_acked(cs[i].id).unwrap();
            assert_eq!(c, cs[i]);
            set.clear(&c);
        }
        assert!(matches!(
            p.on_acked(cs[2].id),
            Err(ResyncError::AlreadyAcked(2))
        ));
        assert!(matches!(p.on_acked(99), Err(ResyncError::UnknownChunk(99))));
        assert!(p.is_done(&set));
        assert_eq!(p.progress().done_blocks, 40);
    }

    #[test]
    fn a_restarted_pass_sweeps_from_block_0_not_from_the_old_cursor() {
        // The driver's pass ends with nothing set past its last chunk; blocks behind
        // the cursor were written during that pass and must be copied again. Before
        // restart_pass the walk went on from the old cursor: a guest writing just
        // ahead of it made a "pass" of its new blocks alone and the old ones were
        // never sent again.
        let t = Instant::now();
        let mut p = ResyncPlanner::new(cfg(4, 8, None), 4096, 2).unwrap();
        let mut set = Bits(vec![false; 40]);
        set.0[10] = true;
        let a = p.next_chunk(t, &set).unwrap();
        set.clear(&p.on_acked(a.id).unwrap());
        set.0[2] = true; // written behind the cursor during the pass
        set.0[30] = true; // written ahead of it after the pass ended
        p.restart_pass().unwrap();
        assert_eq!(p.next_chunk(t, &set).unwrap().first_block, 2);
        assert!(p.restart_pass().is_err(), "a chunk is in flight");
    }

    #[test]
    fn wraps_for_blocks_dirtied_behind_the_cursor_and_resends_failed() {
        let mut set = Bits::with(20, &[5, 15]);
        let mut p = ResyncPlanner::new(cfg(4, 8, None), 4096, 2).unwrap();
        let t = Instant::now();
        let a = p.next_chunk(t, &set).unwrap();
        let b = p.next_chunk(t, &set).unwrap();
        set.0[2] = true; // guest dirtied a block behind the cursor
        set.clear(&p.on_acked(a.id).unwrap());
        assert!(p.next_chunk(t, &set).is_none(), "b still in flight");
        p.on_failed(b.id).unwrap();
        let c = p.next_chunk(t, &set).unwrap();
        assert_eq!((c.first_block, p.passes()), (2, 1));
        let d = p.next_chunk(t, &set).unwrap();
        assert_eq!(d.first_block, 15);
    }

    #[test]
    fn rate_limit_with_a_fake_clock() {
        let set = Bits::with(1000, &(0..1000).collect::<Vec<_>>());
        // 4 blocks of 4 KiB per chunk = 16 KiB; 160 KiB/s = 10 chunks/s.
        let mut p = ResyncPlanner::new(cfg(4, 1000, Some(160 << 10)), 4096, 1000).unwrap();
        let t0 = Instant::now();
        // A full bucket allows one chunk at once, then debt.
        assert!(p.next_chunk(t0, &set).is_some());
        assert!(p.next_chunk(t0, &set).is_some());
        assert!(p.next_chunk(t0, &set).is_none());
        let wake = p.next_wakeup(t0).unwrap();
        assert_eq!(wake - t0, Duration::from_millis(100));
        assert!(p.next_chunk(t0 + Duration::from_millis(99), &set).is_none());
        assert!(p.next_chunk(wake, &set).is_some());
        // Over 10 simulated seconds, about 10 chunks/s.
        let mut n = 0;
        let mut t = wake;
        while t < wake + Duration::from_secs(10) {
            while p.next_chunk(t, &set).is_some() {
                n += 1;
            }
            t = p.next_wakeup(t).unwrap();
        }
        assert!((99..=101).contains(&n), "{n} chunks in 10 s");
    }

    #[test]
    fn guest_io_throttles_to_the_busy_rate_then_recovers() {
        let set = Bits::with(100_000, &(0..100_000).collect::<Vec<_>>());
        let mut c = cfg(1, 1024, None);
        c.guest_io_share = GuestIoShare {
            window: Duration::from_millis(100),
            busy_bytes: 1000,
            busy_rate: 40960, // 10 blocks/s
        };
        let mut p = ResyncPlanner::new(c, 4096, 100_000).unwrap();
        let t0 = Instant::now();
        // Unlimited while quiet.
        for _ in 0..500 {
            assert!(p.next_chunk(t0, &set).is_some());
        }
        assert!(p.next_wakeup(t0).is_none());
        // Small guest I/O below the threshold changes nothing.
        p.note_guest_io(t0, 500);
        assert!(p.next_chunk(t0, &set).is_some());
        // Busy: bucket refills at 10 blocks/s from its current level.
        p.note_guest_io(t0, 600);
        let mut n = 0;
        let mut t = t0;
        while t < t0 + Duration::from_millis(1000) {
            // The guest keeps going.
            p.note_guest_io(t, 2000);
            while p.next_chunk(t, &set).is_some() {
                n += 1;
            }
            t = p.next_wakeup(t).unwrap().min(t + Duration::from_millis(50));
        }
        assert!((9..=12).contains(&n), "{n} blocks in 1 s while busy");
        // The guest stops: full speed again one window later.
        let quiet = t + Duration::from_millis(100);
        assert!(p.next_wakeup(quiet).is_none() || p.next_wakeup(quiet).unwrap() <= quiet);
        let mut m = 0;
        while m < 1000 {
            let Some(c) = p.next_chunk(quiet, &set) else {
                break;
            };
            p.on_acked(c.id).unwrap();
            m += 1;
        }
        assert_eq!(m, 1000);
    }

    #[test]
    fn config_and_block_size_are_checked() {
        assert!(ResyncPlanner::new(cfg(0, 8, None), 4096, 0).is_err());
        assert!(ResyncPlanner::new(cfg(8, 0, None), 4096, 0).is_err());
        assert!(ResyncPlanner::new(cfg(8, 8, Some(0)), 4096, 0).is_err());
        assert!(matches!(
            ResyncPlanner::new(cfg(8, 8, None), 1000, 0),
            Err(ResyncError::BlockSize(1000))
        ));
        assert!(ResyncConfig::default().validate().is_ok());
    }

    #[test]
    fn chunk_ranges_allow_a_short_last_block() {
        let c = |first_block, blocks| Chunk {
            id: 0,
            first_block,
            blocks,
        };
        assert_eq!(chunk_range(4096, 10_000, &c(0, 3)), Some((0, 10_000)));
        assert_eq!(chunk_range(4096, 10_000, &c(2, 1)), Some((8192, 10_000)));
        assert_eq!(chunk_range(4096, 10_000, &c(2, 2)), None);
        assert_eq!(chunk_range(4096, 10_000, &c(3, 1)), None);
        assert_eq!(chunk_range(4096, 8192, &c(2, 1)), None);
        assert_eq!(chunk_range(4096, 8192, &c(0, 0)), None);
    }
}
