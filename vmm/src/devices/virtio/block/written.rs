//! Which 4 KiB blocks of the image the guest has written since the last take: what an
//! incremental snapshot of the disk must copy.
//!
//! A write marks its blocks when it is prepared, before it is submitted, and requests
//! complete before the notify that submitted them returns; so while the VM is paused
//! every write the guest issued is both on the image and in the map. Failed writes stay
//! marked (the image may have changed partly): a snapshot copies a block too many,
//! never one too few.

/// Size of a tracked block.
pub const WRITE_BLOCK: u64 = 4096;

/// One bit per [`WRITE_BLOCK`] of the image.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WrittenBlocks {
    blocks: u64,
    words: Vec<u64>,
}

impl WrittenBlocks {
    /// An empty map for an image of `capacity` bytes.
    pub fn new(capacity: u64) -> WrittenBlocks {
        let blocks = capacity.div_ceil(WRITE_BLOCK);
        WrittenBlocks {
            blocks,
            words: vec![0; blocks.div_ceil(64) as usize],
        }
    }

    /// Blocks in the image.
    pub fn blocks(&self) -> u64 {
        self.blocks
    }

    /// Marks every block touched by `len` bytes at byte `offset`.
    pub fn mark(&mut self, offset: u64, len: u64) {
        if len == 0 {
            return;
        }
        let first = offset / WRITE_BLOCK;
        let last =
            (offset.saturating_add(len - 1) / WRITE_BLOCK).min(self.blocks.saturating_sub(1));
        for b in first..=last {
            if let Some(w) = self.words.get_mut((b / 64) as usize) {
                *w |= 1 << (b % 64);
            }
        }
    }

    pub fn contains(&self, block: u64) -> bool {
        self.words
            .get((block / 64) as usize)
            .is_some_and(|w| w & (1 << (block % 64)) != 0)
    }

    /// Number of marked blocks.
    pub fn count(&self) -> u64 {
        self.words.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    /// Runs of marked blocks as `(first block, block count)`, in order.
    pub fn runs(&self) -> Vec<(u64, u64)> {
        let mut out: Vec<(u64, u64)> = Vec::new();
        for (wi, &w) in self.words.iter().enumerate() {
            let mut bits = w;
            while bits != 0 {
                let b = wi as u64 * 64 + u64::from(bits.trailing_zeros());
                bits &= bits - 1;
                match out.last_mut() {
                    Some((start, n)) if *start + *n == b => *n += 1,
                    _ => out.push((b, 1)),
                }
            }
        }
        out
    }

    /// Returns the map and leaves an empty one in its place.
    pub fn take(&mut self) -> WrittenBlocks {
        let empty = WrittenBlocks::new(self.blocks * WRITE_BLOCK);
        std::mem::replace(self, empty)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_runs_and_take() {
        let mut w = WrittenBlocks::new(1 << 20);
        assert_eq!(w.blocks(), 256);
        w.mark(512, 512); // inside block 0
        w.mark(4095, 2); // blocks 0 and 1
        w.mark(10 * 4096, 3 * 4096); // 10..13
        w.mark(255 * 4096, 1 << 20); // clamped to the last block
        w.mark(7, 0);
        assert_eq!(w.runs(), vec![(0, 2), (10, 3), (255, 1)]);
        assert_eq!(w.count(), 6);
        assert!(w.contains(11) && !w.contains(13));
        let taken = w.take();
        assert_eq!(taken.count(), 6);
        assert_eq!(w.count(), 0);
        assert_eq!(w.blocks(), 256);
        // Across a word boundary.
        w.mark(63 * 4096, 2 * 4096);
        assert_eq!(w.runs(), vec![(63, 2)]);
    }
}
