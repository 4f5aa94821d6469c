//! The log of the VMM's own writes to guest memory: one bit per page, plus a summary
//! level with one bit per 64-page word, so that taking the log costs per dirty word and
//! not per GiB of guest memory.
//!
//! vm-memory marks every write made through its `Bytes` API (device emulation: virtio
//! used rings, block reads, net RX) in the region's [`Bitmap`]. Its own `AtomicBitmap`
//! can only be read back with `get_and_reset`, which swaps every word of the region
//! into a fresh `Vec` (one atomic read-modify-write per 256 KiB of guest memory:
//! 65,536 of them for 16 GiB, inside the checkpoint pause). [`SummaryBitmap`] is the
//! same log with a summary level, installed as the bitmap type of
//! [`super::super::memory::GuestMemoryMmap`]; [`SummaryBitmap::drain`] visits only the
//! words whose summary bit is set.
//!
//! Ordering (why no write is lost even with a concurrent writer, although harvests run
//! paused): a writer sets the page bit (`fetch_or`, AcqRel) and then the summary bit
//! (a load first, `fetch_or` only when clear); the harvester swaps the summary word to
//! zero and then each page word it names (AcqRel). If the writer's summary load saw a
//! stale set bit, the harvester's page-word swap is ordered after the writer's
//! `fetch_or` (otherwise that `fetch_or` would have read from the swap and the load
//! would see the cleared summary), so the harvest takes the bit; if it saw the cleared
//! summary, it sets it again and the next harvest takes the bit.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};

use vm_memory::bitmap::{Bitmap, NewBitmap, RefSlice, WithBitmapSlice};

use super::PAGE_SIZE;

/// A page-granular dirty bitmap (4 KiB pages) with a summary level.
pub struct SummaryBitmap {
    pages: usize,
    /// Bit `p % 64` of word `p / 64`: page `p` was written.
    words: Box<[AtomicU64]>,
    /// Bit `w % 64` of summary word `w / 64`: word `w` may be non-zero.
    summary: Box<[AtomicU64]>,
}

impl SummaryBitmap {
    /// A clean bitmap for `bytes` bytes of memory.
    pub fn new(bytes: usize) -> SummaryBitmap {
        let pages = bytes.div_ceil(PAGE_SIZE as usize);
        let words = pages.div_ceil(64);
        SummaryBitmap {
            pages,
            words: (0..words).map(|_| AtomicU64::new(0)).collect(),
            summary: (0..words.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    /// Pages covered.
    pub fn pages(&self) -> usize {
        self.pages
    }

    /// Whether page `page` is marked.
    pub fn is_page_set(&self, page: usize) -> bool {
        page < self.pages && self.words[page / 64].load(Ordering::Acquire) & (1 << (page % 64)) != 0
    }

    fn set_word(&self, w: usize, mask: u64) {
        self.words[w].fetch_or(mask, Ordering::AcqRel);
        let s = &self.summary[w / 64];
        let bit = 1u64 << (w % 64);
        if s.load(Ordering::Acquire) & bit == 0 {
            s.fetch_or(bit, Ordering::AcqRel);
        }
    }

    /// Marks pages `[first, last]` (clamped to the bitmap), one atomic per word.
    fn mark_pages(&self, first: usize, last: usize) {
        if first >= self.pages {
            return;
        }
        let last = last.min(self.pages - 1);
        let (fw, lw) = (first / 64, last / 64);
        for w in fw..=lw {
            let lo = if w == fw { first % 64 } else { 0 };
            let hi = if w == lw { last % 64 } else { 63 };
            let mask = (u64::MAX >> (63 - hi)) & (u64::MAX << lo);
            self.set_word(w, mask);
        }
    }

    /// Takes every marked word and clears it: `f(word_index, bits)` for each non-zero
    /// word, in ascending order. Costs one load per 64 words (the summary) plus one
    /// swap per word that was marked.
    pub fn drain(&self, mut f: impl FnMut(usize, u64)) {
        for (si, s) in self.summary.iter().enumerate() {
            if s.load(Ordering::Relaxed) == 0 {
                continue;
            }
            let mut bits = s.swap(0, Ordering::AcqRel);
            while bits != 0 {
                let w = si * 64 + bits.trailing_zeros() as usize;
                bits &= bits - 1;
                let v = self.words[w].swap(0, Ordering::AcqRel);
                if v != 0 {
                    f(w, v);
                }
            }
        }
    }

    /// Clears every mark.
    pub fn reset(&self) {
        self.drain(|_, _| {});
    }
}

impl fmt::Debug for SummaryBitmap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SummaryBitmap")
            .field("pages", &self.pages)
            .finish_non_exhaustive()
    }
}

impl Default for SummaryBitmap {
    fn default() -> Self {
        SummaryBitmap::new(0)
    }
}

impl<'a> WithBitmapSlice<'a> for SummaryBitmap {
    type S = RefSlice<'a, Self>;
}

impl Bitmap for SummaryBitmap {
    fn mark_dirty(&self, offset: usize, len: usize) {
        if len == 0 {
            return;
        }
        let first = offset / PAGE_SIZE as usize;
        // Past-the-end ranges (an overflowing offset + len) mark up to the end, as
        // vm-memory's own bitmap does: a false positive, never a miss.
        let last = offset.saturating_add(len - 1) / PAGE_SIZE as usize;
        self.mark_pages(first, last);
    }

    fn dirty_at(&self, offset: usize) -> bool {
        self.is_page_set(offset / PAGE_SIZE as usize)
    }

    fn slice_at(&self, offset: usize) -> RefSlice<'_, Self> {
        RefSlice::new(self, offset)
    }
}

impl NewBitmap for SummaryBitmap {
    fn with_len(len: usize) -> Self {
        SummaryBitmap::new(len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drained(b: &SummaryBitmap) -> Vec<(usize, u64)> {
        let mut v = Vec::new();
        b.drain(|w, bits| v.push((w, bits)));
        v
    }

    #[test]
    fn marks_pages_words_and_summary() {
        // 300 MiB: 76,800 pages, 1,200 words, 19 summary words.
        let b = SummaryBitmap::new(300 << 20);
        assert_eq!(b.pages(), 76_800);
        assert!(drained(&b).is_empty());
        b.mark_dirty(0x1000, 1); // page 1
        b.mark_dirty(63 * 4096 + 4095, 2); // pages 63 and 64: two words
        b.mark_dirty(4096 * 4096 * 5 + 8, 4096); // pages 20480 and 20481 (summary word 5)
        assert!(b.dirty_at(0x1fff));
        assert!(!b.dirty_at(0x2000));
        assert_eq!(
            drained(&b),
            vec![
                (0, (1 << 1) | (1 << 63)),
                (1, 1),
                (320, 0b11) // 20480 / 64
            ]
        );
        // Taken once.
        assert!(drained(&b).is_empty());
        assert!(!b.dirty_at(0x1000));
    }

    #[test]
    fn long_ranges_and_the_tail_are_clamped() {
        let b = SummaryBitmap::new(130 * 4096);
        b.mark_dirty(10 * 4096, 200 * 4096); // pages 10.. past the end (129)
        let d = drained(&b);
        assert_eq!(d, vec![(0, u64::MAX << 10), (1, u64::MAX), (2, 0b11)]);
        let total: u32 = d.iter().map(|(_, w)| w.count_ones()).sum();
        assert_eq!(total, 120);
        b.mark_dirty(usize::MAX - 10, 100); // overflowing: ignored (beyond the end)
        b.mark_dirty(4096, 0); // empty
        assert!(drained(&b).is_empty());
    }

    #[test]
    fn reset_and_slices() {
        let b = SummaryBitmap::new(1 << 30);
        let s = b.slice_at(1 << 29);
        s.mark_dirty(4096, 1);
        assert!(b.dirty_at((1 << 29) + 4096));
        b.reset();
        assert!(drained(&b).is_empty());
        assert!(!b.dirty_at((1 << 29) + 4096));
    }

    #[test]
    fn concurrent_writers_lose_nothing() {
        // Writers mark disjoint pages while a harvester drains: the union of all drains
        // is exactly what was marked.
        let b = std::sync::Arc::new(SummaryBitmap::new(64 << 20));
        let pages = b.pages();
        let writers: Vec<_> = (0..2)
            .map(|t| {
                let b = b.clone();
                std::thread::spawn(move || {
                    for p in (t..pages).step_by(7) {
                        b.mark_dirty(p * 4096, 1);
                    }
                })
            })
            .collect();
        let mut seen = vec![0u64; pages.div_ceil(64)];
        let mut done = false;
        while !done {
            done = writers.iter().all(|w| w.is_finished());
            b.drain(|w, bits| {
                assert_eq!(seen[w] & bits, 0, "a page was reported twice");
                seen[w] |= bits;
            });
        }
        for w in writers {
            w.join().unwrap();
        }
        b.drain(|w, bits| seen[w] |= bits);
        for p in 0..pages {
            let want = p % 7 == 0 || p % 7 == 1;
            assert_eq!(seen[p / 64] & (1 << (p % 64)) != 0, want, "page {p}");
        }
    }
}
