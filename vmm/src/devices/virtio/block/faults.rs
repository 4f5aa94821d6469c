//! Fault injection for one disk: a failed disk, bad block ranges, slow I/O.
//!
//! The block device asks [`DiskFaults::check`] for every operation of a batch before
//! the batch goes to the I/O engine; an operation that hits a fault is not submitted
//! (the image is untouched) and completes with EIO. Shared as `Arc<DiskFaults>`
//! between the device (vCPU thread) and whoever injects (control socket, tests), so
//! it uses interior mutability; with nothing configured the hot path costs one atomic
//! load.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;
use twinrun_lock::MutexExt;

use serde::{Deserialize, Serialize};

use super::io::OpKind;

/// Most bad ranges one disk holds; a bound so `check` stays cheap.
pub const MAX_BAD_RANGES: usize = 64;
/// Longest injected delay. The vCPU sleeps it with the device locked, so it must stay
/// well under `vmm_handle::PAUSE_LIMIT` (2 s), or pausing the VM (snapshots, FT
/// epochs) would fail while a request is being delayed.
pub const MAX_DELAY: Duration = Duration::from_secs(1);

/// Which operations a bad range fails. Flushes are failed only by a failed disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum FaultOps {
    Reads,
    Writes,
    All,
}

impl FaultOps {
    fn hits(self, kind: OpKind) -> bool {
        matches!(
            (self, kind),
            (FaultOps::All, OpKind::Read | OpKind::Write)
                | (FaultOps::Reads, OpKind::Read)
                | (FaultOps::Writes, OpKind::Write)
        )
    }
}

/// Bytes `[offset, offset + len)` of the image fail the operations `ops`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BadRange {
    pub offset: u64,
    pub len: u64,
    pub ops: FaultOps,
}

impl BadRange {
    fn overlaps(&self, offset: u64, len: u64) -> bool {
        // Ranges were checked not to overflow when added; a request's end is bounded
        // by the image size.
        let end = offset.saturating_add(len);
        offset < self.offset + self.len && self.offset < end
    }
}

/// What is configured now (for reports).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FaultConfig {
    pub failed: bool,
    pub bad_ranges: Vec<BadRange>,
    pub delay: Duration,
}

impl FaultConfig {
    fn is_active(&self) -> bool {
        self.failed || !self.bad_ranges.is_empty() || !self.delay.is_zero()
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FaultError {
    #[error("a bad range must be at least one byte long")]
    EmptyRange,
    #[error("bad range {offset}+{len} overflows a 64-bit offset")]
    RangeOverflow { offset: u64, len: u64 },
    #[error("at most {MAX_BAD_RANGES} bad ranges per disk")]
    TooManyRanges,
    #[error("delay {0:?} is longer than the limit of {MAX_DELAY:?}")]
    DelayTooLong(Duration),
}

#[derive(Debug, Default)]
pub struct DiskFaults {
    /// Mirrors `config.is_active()`: the only thing the hot path reads when idle.
    active: AtomicBool,
    config: Mutex<FaultConfig>,
    injected: AtomicU64,
}

impl DiskFaults {
    pub fn new() -> DiskFaults {
        DiskFaults::default()
    }

    fn lock(&self) -> MutexGuard<'_, FaultConfig> {
        // The config is plain data, valid even if a holder panicked.
        self.config.lock_or_recover()
    }

    fn update(&self, f: impl FnOnce(&mut FaultConfig)) {
        let mut c = self.lock();
        f(&mut c);
        self.active.store(c.is_active(), Ordering::Release);
    }

    /// The whole disk fails: every read, write and flush errors (EIO).
    pub fn fail_disk(&self) {
        self.update(|c| c.failed = true);
    }

    /// Operations of kind `ops` touching bytes `[offset, offset + len)` fail.
    pub fn add_bad_range(&self, offset: u64, len: u64, ops: FaultOps) -> Result<(), FaultError> {
        if len == 0 {
            return Err(FaultError::EmptyRange);
        }
        if offset.checked_add(len).is_none() {
            return Err(FaultError::RangeOverflow { offset, len });
        }
        let mut result = Ok(());
        self.update(|c| {
            if c.bad_ranges.len() >= MAX_BAD_RANGES {
                result = Err(FaultError::TooManyRanges);
            } else {
                c.bad_ranges.push(BadRange { offset, len, ops });
            }
        });
        result
    }

    /// Slow I/O: each batch of requests waits `d` before it runs (zero: no delay).
    pub fn set_delay(&self, d: Duration) -> Result<(), FaultError> {
        if d > MAX_DELAY {
            return Err(FaultError::DelayTooLong(d));
        }
        self.update(|c| c.delay = d);
        Ok(())
    }

    /// Removes every fault (the injected count stays).
    pub fn clear(&self) {
        self.update(|c| *c = FaultConfig::default());
    }

    /// Operations failed by injection so far.
    pub fn injected(&self) -> u64 {
        self.injected.load(Ordering::Relaxed)
    }

    pub fn config(&self) -> FaultConfig {
        self.lock().clone()
    }

    /// Whether any fault is configured: one atomic load.
    #[inline]
    pub(crate) fn is_active(&self) -> bool {
        self.active.load(Ordering::Acquire)
    }

    /// The delay to apply before a batch, if any.
    pub(crate) fn delay(&self) -> Option<Duration> {
        if !self.is_active() {
            return None;
        }
        let d = self.lock().delay;
        (!d.is_zero()).then_some(d)
    }

    /// The error an operation gets by injection, counted, or None if it runs.
    pub(crate) fn check(&self, kind: OpKind, offset: u64, len: u64) -> Option<io::Error> {
        if !self.is_active() {
            return None;
        }
        let c = self.lock();
        let hit = c.failed
            || c.bad_ranges
                .iter()
                .any(|r| r.ops.hits(kind) && r.overlaps(offset, len));
        drop(c);
        if !hit {
            return None;
        }
        self.injected.fetch_add(1, Ordering::Relaxed);
        Some(io::Error::from_raw_os_error(libc::EIO))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_ops_and_clear() {
        let f = DiskFaults::new();
        assert!(f.check(OpKind::Read, 0, 512).is_none());
        f.add_bad_range(4096, 4096, FaultOps::Writes).unwrap();
        assert!(f.check(OpKind::Read, 4096, 512).is_none());
        assert!(f.check(OpKind::Write, 4095, 1).is_none());
        assert!(f.check(OpKind::Write, 8192, 512).is_none());
        let e = f.check(OpKind::Write, 4000, 512).unwrap();
        assert_eq!(e.raw_os_error(), Some(libc::EIO));
        assert!(f.check(OpKind::Flush, 0, 0).is_none());
        assert_eq!(f.injected(), 1);
        f.fail_disk();
        assert!(f.check(OpKind::Flush, 0, 0).is_some());
        f.clear();
        assert!(!f.is_active());
        assert!(f.check(OpKind::Write, 4096, 512).is_none());
        assert_eq!(f.injected(), 2);
    }

    #[test]
    fn limits() {
        let f = DiskFaults::new();
        assert_eq!(
            f.add_bad_range(0, 0, FaultOps::All),
            Err(FaultError::EmptyRange)
        );
        assert!(f.add_bad_range(u64::MAX, 2, FaultOps::All).is_err());
        for i in 0..MAX_BAD_RANGES as u64 {
            f.add_bad_range(i * 512, 512, FaultOps::Reads).unwrap();
        }
        assert_eq!(
            f.add_bad_range(0, 1, FaultOps::All),
            Err(FaultError::TooManyRanges)
        );
        assert!(f.set_delay(MAX_DELAY + Duration::from_millis(1)).is_err());
        f.clear();
        f.set_delay(Duration::from_millis(3)).unwrap();
        assert_eq!(f.delay(), Some(Duration::from_millis(3)));
        assert!(f.check(OpKind::Read, 0, 512).is_none());
    }
}
