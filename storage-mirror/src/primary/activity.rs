//! The activity log of a protected primary disk (pure): which 4 MiB extents hold
//! writes of epochs the standby has not acknowledged yet.
//!
//! A write makes its extents *active*; an extent stays active while any captured,
//! unacknowledged epoch (or the open one) wrote it. The caller marks an extent in the
//! persistent bitmap, durably, when it becomes active (one `fdatasync` per extent
//! entering the set, not one per block) and clears it once it goes idle. After a
//! crash of this PM the set bits cover every block of its unacknowledged epochs: the
//! delta a returning ex-primary needs.

use std::collections::{BTreeMap, HashMap};

/// Activity-log extent: 4 MiB.
pub const EXTENT_SHIFT: u32 = 22;

/// The extents each of `ranges` (byte offset, length) touches, one item per (range,
/// extent) pair: how writes are counted in and out of the log.
pub fn extents_of(ranges: &[(u64, u64)]) -> impl Iterator<Item = u64> + '_ {
    ranges
        .iter()
        .filter(|&&(_, len)| len > 0)
        .flat_map(|&(off, len)| {
            (off >> EXTENT_SHIFT)..=(off.saturating_add(len - 1) >> EXTENT_SHIFT)
        })
}

/// Byte range of extent `x` on a disk of `size` bytes.
pub fn extent_range(x: u64, size: u64) -> (u64, u64) {
    let start = x << EXTENT_SHIFT;
    (
        start,
        (1u64 << EXTENT_SHIFT).min(size.saturating_sub(start)),
    )
}

#[derive(Debug, Default)]
pub struct ActivityLog {
    /// Byte ranges written since the last capture.
    open: Vec<(u64, u64)>,
    /// Byte ranges written per captured, unacknowledged epoch.
    pending: BTreeMap<u64, Vec<(u64, u64)>>,
    /// Extent -> (range, extent) pairs of `open` and `pending` that touch it; an
    /// extent is active while this is nonzero.
    refs: HashMap<u64, u32>,
}

impl ActivityLog {
    /// Writes of `ranges` in the open epoch; returns the extents that became active
    /// (to be marked durably before the writes are issued).
    pub fn write(&mut self, ranges: &[(u64, u64)]) -> Vec<u64> {
        self.open.extend_from_slice(ranges);
        let mut new = Vec::new();
        for x in extents_of(ranges) {
            let r = self.refs.entry(x).or_insert(0);
            *r += 1;
            if *r == 1 {
                new.push(x);
            }
        }
        new
    }

    /// The open epoch was captured as `epoch`.
    pub fn captured(&mut self, epoch: u64) {
        let ranges = std::mem::take(&mut self.open);
        self.pending.insert(epoch, ranges);
    }

    /// Every epoch through `through` is acknowledged; returns the extents that went
    /// idle.
    pub fn acked(&mut self, through: u64) -> Vec<u64> {
        let later = self.pending.split_off(&through.saturating_add(1));
        let done = std::mem::replace(&mut self.pending, later);
        let mut idle = Vec::new();
        for x in done.values().flat_map(|r| extents_of(r)) {
            if let Some(r) = self.refs.get_mut(&x) {
                *r -= 1;
                if *r == 0 {
                    self.refs.remove(&x);
                    idle.push(x);
                }
            }
        }
        idle
    }

    /// Byte ranges written in unacknowledged epochs and in the open one.
    pub fn unacked_ranges(&self) -> Vec<(u64, u64)> {
        let mut v = self.open.clone();
        for r in self.pending.values() {
            v.extend_from_slice(r);
        }
        v
    }

    pub fn is_active(&self, extent: u64) -> bool {
        self.refs.contains_key(&extent)
    }

    /// The active extents, in no order.
    pub fn active(&self) -> Vec<u64> {
        self.refs.keys().copied().collect()
    }

    /// Forgets everything (a new mode begins).
    pub fn clear(&mut self) {
        *self = ActivityLog::default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extents_stay_active_until_every_epoch_that_wrote_them_is_acked() {
        let mut a = ActivityLog::default();
        assert_eq!(a.write(&[(4096, 4096)]), vec![0]);
        a.captured(1);
        assert_eq!(a.write(&[(8192, 4096), (9 << 20, 4096)]), vec![2]);
        a.captured(2);
        assert!(a.acked(0).is_empty());
        assert!(a.acked(1).is_empty(), "extent 0 still has epoch 2");
        let mut idle = a.acked(2);
        idle.sort();
        assert_eq!(idle, vec![0, 2]);
        assert!(a.active().is_empty());
        // A write across an extent boundary counts in both.
        assert_eq!(a.write(&[((4 << 20) - 1, 2)]), vec![0, 1]);
        assert_eq!(a.unacked_ranges(), vec![((4 << 20) - 1, 2)]);
    }
}
