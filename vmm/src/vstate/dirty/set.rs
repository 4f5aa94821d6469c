//! [`DirtySet`]: a set of guest pages laid out like guest memory, one bit per page with a
//! summary level (one bit per 64-page word), so that everything a checkpoint does with
//! it (fill, count, iterate, clear) costs per dirty word, not per GiB of guest memory.
//!
//! Invariant: a non-zero word has its summary bit set. A summary bit may be set for a
//! word that is zero again (after [`DirtySet::unmark`]); iteration skips such words and
//! [`DirtySet::clear`] drops them.

use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use super::{DirtyError, PAGE_SHIFT, PAGE_SIZE};
use crate::vstate::memory::GuestMemoryMmap;

/// Dirty pages of one guest memory region: one bit per page, in u64 words.
#[derive(Clone, Debug)]
pub struct RegionDirty {
    start: GuestAddress,
    pages: usize,
    words: Vec<u64>,
    /// Bit `w % 64` of `summary[w / 64]`: `words[w]` may be non-zero.
    summary: Vec<u64>,
}

impl PartialEq for RegionDirty {
    fn eq(&self, other: &Self) -> bool {
        // The summary may keep stale bits: equal sets are equal pages.
        self.start == other.start && self.pages == other.pages && self.words == other.words
    }
}

impl Eq for RegionDirty {}

impl RegionDirty {
    pub(super) fn new(start: GuestAddress, len: u64) -> RegionDirty {
        let pages = len.div_ceil(PAGE_SIZE) as usize;
        let words = pages.div_ceil(64);
        RegionDirty {
            start,
            pages,
            words: vec![0; words],
            summary: vec![0; words.div_ceil(64)],
        }
    }

    pub fn start(&self) -> GuestAddress {
        self.start
    }

    /// Pages in the region.
    pub fn pages(&self) -> usize {
        self.pages
    }

    /// The bitmap: bit `i % 64` of word `i / 64` is page `i` of the region.
    pub fn words(&self) -> &[u64] {
        &self.words
    }

    /// Words in the bitmap.
    pub fn word_count(&self) -> usize {
        self.words.len()
    }

    /// ORs `bits` into word `w` (bits past the region's last page are dropped).
    /// Returns the bits that were not set before.
    pub(super) fn or_word(&mut self, w: usize, bits: u64) -> u64 {
        let bits = bits & self.valid_mask(w);
        if bits == 0 {
            return 0;
        }
        let new = bits & !self.words[w];
        self.words[w] |= bits;
        self.summary[w / 64] |= 1 << (w % 64);
        new
    }

    fn valid_mask(&self, w: usize) -> u64 {
        let tail = self.pages % 64;
        if w + 1 == self.words.len() && tail != 0 {
            (1u64 << tail) - 1
        } else {
            u64::MAX
        }
    }

    /// Non-zero words in ascending order, as `(index, bits)`: visits the summary (one
    /// word per 4,096 pages) and the words it names.
    pub fn dirty_words(&self) -> impl Iterator<Item = (usize, u64)> + '_ {
        self.summary
            .iter()
            .enumerate()
            .filter(|(_, s)| **s != 0)
            .flat_map(move |(si, s)| {
                Bits(*s).filter_map(move |b| {
                    let w = si * 64 + b;
                    let v = self.words[w];
                    (v != 0).then_some((w, v))
                })
            })
    }

    fn clear(&mut self) {
        for si in 0..self.summary.len() {
            let mut s = std::mem::take(&mut self.summary[si]);
            while s != 0 {
                self.words[si * 64 + s.trailing_zeros() as usize] = 0;
                s &= s - 1;
            }
        }
    }

    fn fill(&mut self) {
        self.words.fill(u64::MAX);
        if let Some(last) = self.words.len().checked_sub(1) {
            self.words[last] &= self.valid_mask(last);
        }
        let n = self.words.len();
        for (si, s) in self.summary.iter_mut().enumerate() {
            let here = (n - si * 64).min(64);
            *s = if here == 64 {
                u64::MAX
            } else {
                (1u64 << here) - 1
            };
        }
    }
}

/// A set of dirty guest pages, laid out like the guest memory it was made for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirtySet {
    pub(super) regions: Vec<RegionDirty>,
}

impl DirtySet {
    /// An empty set for the regions of `mem`.
    pub fn new(mem: &GuestMemoryMmap) -> DirtySet {
        DirtySet {
            regions: mem
                .iter()
                .map(|r| RegionDirty::new(r.start_addr(), r.len()))
                .collect(),
        }
    }

    /// Every page of `mem` (e.g. the first transfer of a checkpoint).
    pub fn full(mem: &GuestMemoryMmap) -> DirtySet {
        let mut s = DirtySet::new(mem);
        for r in &mut s.regions {
            r.fill();
        }
        s
    }

    pub fn regions(&self) -> &[RegionDirty] {
        &self.regions
    }

    /// Empties the set; costs per dirty word.
    pub fn clear(&mut self) {
        for r in &mut self.regions {
            r.clear();
        }
    }

    /// Number of dirty pages.
    pub fn count(&self) -> usize {
        self.regions
            .iter()
            .flat_map(|r| r.dirty_words())
            .map(|(_, w)| w.count_ones() as usize)
            .sum()
    }

    pub fn is_empty(&self) -> bool {
        self.regions
            .iter()
            .all(|r| r.dirty_words().next().is_none())
    }

    fn locate(&self, addr: GuestAddress) -> Option<(usize, usize)> {
        self.regions.iter().enumerate().find_map(|(i, r)| {
            let off = addr.0.checked_sub(r.start.0)?;
            let page = (off >> PAGE_SHIFT) as usize;
            (page < r.pages).then_some((i, page))
        })
    }

    /// Whether the page holding `addr` is dirty.
    pub fn contains(&self, addr: GuestAddress) -> bool {
        self.locate(addr)
            .is_some_and(|(i, p)| self.regions[i].words[p / 64] & (1 << (p % 64)) != 0)
    }

    /// Marks the pages of `[addr, addr + len)` dirty (parts outside guest memory are
    /// ignored).
    pub fn mark(&mut self, addr: GuestAddress, len: u64) {
        if len == 0 {
            return;
        }
        let first = addr.0 & !(PAGE_SIZE - 1);
        let last = addr.0.saturating_add(len - 1) & !(PAGE_SIZE - 1);
        let mut a = first;
        while a <= last {
            if let Some((i, p)) = self.locate(GuestAddress(a)) {
                self.regions[i].or_word(p / 64, 1 << (p % 64));
            }
            match a.checked_add(PAGE_SIZE) {
                Some(n) => a = n,
                None => break,
            }
        }
    }

    /// Removes one page (e.g. to fold back everything but what a transfer sent).
    pub fn unmark(&mut self, addr: GuestAddress) {
        if let Some((i, p)) = self.locate(addr) {
            self.regions[i].words[p / 64] &= !(1 << (p % 64));
        }
    }

    /// ORs `other` in (e.g. folding back the pages of a transfer that failed).
    pub fn union(&mut self, other: &DirtySet) -> Result<(), DirtyError> {
        if self.regions.len() != other.regions.len()
            || self
                .regions
                .iter()
                .zip(&other.regions)
                .any(|(a, b)| a.start != b.start || a.pages != b.pages)
        {
            return Err(DirtyError::Layout("union of sets for different memory"));
        }
        for (a, b) in self.regions.iter_mut().zip(&other.regions) {
            for (w, bits) in b.dirty_words() {
                a.or_word(w, bits);
            }
        }
        Ok(())
    }

    /// Guest addresses of the dirty pages, ascending within each region.
    pub fn pages(&self) -> impl Iterator<Item = GuestAddress> + '_ {
        self.regions.iter().flat_map(|r| {
            r.dirty_words().flat_map(move |(wi, w)| {
                Bits(w)
                    .map(move |b| GuestAddress(r.start.0 + (((wi * 64 + b) as u64) << PAGE_SHIFT)))
            })
        })
    }

    /// Maximal runs of contiguous dirty pages, as `(start, bytes)`; a run never spans
    /// two regions.
    pub fn runs(&self) -> impl Iterator<Item = (GuestAddress, u64)> + '_ {
        Runs {
            pages: Box::new(self.pages()),
            pending: None,
        }
    }
}

/// Set bit positions of a word, lowest first.
pub(super) struct Bits(pub(super) u64);

impl Iterator for Bits {
    type Item = usize;
    fn next(&mut self) -> Option<usize> {
        if self.0 == 0 {
            return None;
        }
        let b = self.0.trailing_zeros() as usize;
        self.0 &= self.0 - 1;
        Some(b)
    }
}

struct Runs<'a> {
    pages: Box<dyn Iterator<Item = GuestAddress> + 'a>,
    pending: Option<(GuestAddress, u64)>,
}

impl Iterator for Runs<'_> {
    type Item = (GuestAddress, u64);
    fn next(&mut self) -> Option<(GuestAddress, u64)> {
        for p in self.pages.by_ref() {
            match &mut self.pending {
                Some((start, len)) if start.0 + *len == p.0 => *len += PAGE_SIZE,
                _ => {
                    if let Some(done) = self.pending.replace((p, PAGE_SIZE)) {
                        return Some(done);
                    }
                }
            }
        }
        self.pending.take()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vstate::memory::create_guest_memory;

    #[test]
    fn set_iterates_pages_and_runs() {
        let mem = create_guest_memory(16 << 20).unwrap();
        let mut s = DirtySet::new(&mem);
        assert!(s.is_empty());
        s.mark(GuestAddress(0x1000), 1);
        s.mark(GuestAddress(0x2fff), 2); // pages 2 and 3
        s.mark(GuestAddress(0x40_0000), 4096 * 70); // crosses a word boundary
        s.mark(GuestAddress(0xff_f000), 4096);
        s.mark(GuestAddress(0x100_0000), 4096); // outside: ignored
        assert_eq!(s.count(), 3 + 70 + 1);
        assert!(s.contains(GuestAddress(0x3abc)));
        assert!(!s.contains(GuestAddress(0x4000)));
        let runs: Vec<_> = s.runs().collect();
        assert_eq!(
            runs,
            vec![
                (GuestAddress(0x1000), 3 * 4096),
                (GuestAddress(0x40_0000), 70 * 4096),
                (GuestAddress(0xff_f000), 4096)
            ]
        );
        assert_eq!(s.pages().count(), s.count());
        assert_eq!(s.pages().nth(3), Some(GuestAddress(0x40_0000)));
        s.unmark(GuestAddress(0x2000));
        assert_eq!(s.runs().next(), Some((GuestAddress(0x1000), 4096)));
        let full = DirtySet::full(&mem);
        assert_eq!(full.count(), 4096);
        assert_eq!(
            full.runs().collect::<Vec<_>>(),
            vec![(GuestAddress(0), 16 << 20)]
        );
        let mut u = DirtySet::new(&mem);
        u.union(&s).unwrap();
        assert_eq!(u, s);
        let other = DirtySet::new(&create_guest_memory(32 << 20).unwrap());
        assert!(u.union(&other).is_err());
    }

    /// The summary level against a plain model: random marks, unmarks, unions and
    /// clears over a guest with two regions (4 GiB + 2 MiB: 1,048,576 + 512 pages, a
    /// partial last summary word), compared after every step.
    #[test]
    fn summary_matches_a_plain_bitmap_model() {
        let mem = create_guest_memory((3 << 30) + (1 << 30) + (2 << 20)).unwrap();
        let regions: Vec<(u64, u64)> = mem.iter().map(|r| (r.start_addr().0, r.len())).collect();
        assert_eq!(regions.len(), 2);
        let total_pages: u64 = regions.iter().map(|(_, l)| l / PAGE_SIZE).sum();
        let page_addr = |mut i: u64| {
            for (s, l) in &regions {
                if i < l / PAGE_SIZE {
                    return GuestAddress(s + i * PAGE_SIZE);
                }
                i -= l / PAGE_SIZE;
            }
            unreachable!()
        };
        let mut model = std::collections::BTreeSet::new();
        let mut s = DirtySet::new(&mem);
        let mut rng = twinrun_lab::Rng::new(0x2545_f491_4f6c_dd1d);
        let mut rnd = |n: u64| rng.below(n);
        for step in 0..3000 {
            match rnd(100) {
                0..=59 => {
                    // A run inside one region (mark ignores the gap between them).
                    let (start, len) = regions[rnd(2) as usize];
                    let rp = len / PAGE_SIZE;
                    let p = rnd(rp);
                    let n = 1 + rnd(130).min(rp - 1 - p);
                    s.mark(GuestAddress(start + p * PAGE_SIZE), n * PAGE_SIZE);
                    for q in p..p + n {
                        model.insert(start + q * PAGE_SIZE);
                    }
                }
                60..=84 => {
                    if let Some(&a) = model.iter().nth(rnd(model.len().max(1) as u64) as usize) {
                        s.unmark(GuestAddress(a));
                        model.remove(&a);
                    }
                }
                85..=97 => {
                    let mut o = DirtySet::new(&mem);
                    let p = rnd(total_pages);
                    o.mark(page_addr(p), PAGE_SIZE);
                    model.insert(page_addr(p).0);
                    s.union(&o).unwrap();
                }
                _ => {
                    s.clear();
                    model.clear();
                }
            }
            if step % 50 == 0 || step > 2950 {
                let got: Vec<u64> = s.pages().map(|a| a.0).collect();
                let want: Vec<u64> = model.iter().copied().collect();
                assert_eq!(got, want, "step {step}");
                assert_eq!(s.count(), model.len());
                assert_eq!(s.is_empty(), model.is_empty());
                for r in s.regions() {
                    for (w, bits) in r.words().iter().enumerate() {
                        if *bits != 0 {
                            assert_ne!(r.summary[w / 64] & (1 << (w % 64)), 0, "summary bit");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn full_set_has_every_summary_bit_and_clear_empties_it() {
        // 3 GiB + 100 MiB high: a partial word and a partial summary word at the ends.
        let mem = create_guest_memory((3 << 30) + (100 << 20)).unwrap();
        let mut s = DirtySet::full(&mem);
        let pages: usize = mem.iter().map(|r| (r.len() / PAGE_SIZE) as usize).sum();
        assert_eq!(s.count(), pages);
        assert_eq!(s.runs().count(), 2);
        s.clear();
        assert!(s.is_empty());
        assert_eq!(s, DirtySet::new(&mem));
        assert!(s
            .regions()
            .iter()
            .all(|r| r.summary.iter().all(|w| *w == 0)));
    }
}
