//! Hot pages: guest pages written in consecutive harvests are left writable and
//! copied at every harvest, instead of being write-protected again each time.
//!
//! Why: with manual re-protect, a harvest write-protects every page it reports, so
//! the guest's next write to each of them exits to KVM. A guest that keeps writing the
//! same pages (its stack, a network stack's control blocks, a queue's ring) pays one
//! such exit per page per epoch: tens of microseconds each on a shadow-paging KVM, a
//! few on hardware KVM without PML, for pages that are dirty again anyway. A page KVM
//! did not re-protect stays set in its dirty log (`KVM_CLEAR_DIRTY_LOG` is what clears
//! a bit), so every later harvest still reports it: nothing is missed, the page is
//! simply copied at each checkpoint whether or not the guest changed it.
//!
//! Policy (pure, one instance per dirty log):
//! - a page reported by a harvest and by one of the `window` harvests before it is
//!   *hot*: not re-protected (a page the guest rewrites every few epochs costs a copy
//!   per epoch instead of an exit per rewrite);
//! - at most `max_pages` pages are hot at a time (each costs a copy per epoch);
//! - every `cool_every`-th harvest re-protects everything, so pages the guest stopped
//!   writing leave the hot set (and return at their next rewrite if it writes them
//!   still).
//!
//! When it pays: keeping a page hot costs a 4 KiB copy (and its transfer) per epoch,
//! about 1 + 4 us at memory and 10 Gb/s link speed; a write exit on this
//! shadow-paging KVM costs about 20-35 us, so a page rewritten every 4 epochs is still
//! cheaper hot. With hardware dirty logging (PML) exits are nearly free: a window of 0
//! (never hot) is the right setting there.

/// Tunables of the hot-page policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HotPageConfig {
    /// Pages left writable at most (a copy of each per harvest).
    pub max_pages: usize,
    /// Every this many harvests, every page is re-protected (>= 1; 1 = never hot).
    pub cool_every: u32,
    /// A page is hot when it was also reported by one of this many previous harvests
    /// (0 = never hot).
    pub window: u32,
}

impl Default for HotPageConfig {
    fn default() -> Self {
        // 2048 pages: 8 MiB copied per epoch at most, under 2 ms of extra pause at
        // memory bandwidth. Cooling every 16 harvests (320 ms at the
        // default 20 ms epochs, tens of ms when replies end epochs early): a page
        // written once in a burst is copied for at most that long, and a page the
        // guest keeps writing takes one write exit per cooling instead of one per
        // epoch.
        HotPageConfig {
            max_pages: 2048,
            cool_every: 16,
            window: 4,
        }
    }
}

/// The policy's state for one dirty log (all its slots). Everything it does per
/// harvest costs per dirty word (the words the log reported and the words of the
/// harvest that leaves the window), not per GiB of guest memory.
#[derive(Debug)]
pub struct HotPages {
    cfg: HotPageConfig,
    /// Per slot, the non-zero words `(index, bits)` each of the last `window` harvests
    /// reported (oldest first, ascending indices).
    history: Vec<std::collections::VecDeque<Vec<(usize, u64)>>>,
    /// Per slot, the OR of `history` (dense: one word per 64 pages).
    recent: Vec<Vec<u64>>,
    /// An evicted history entry, reused for the next harvest.
    spare: Vec<(usize, u64)>,
    harvests: u64,
    /// Pages kept hot by the harvest in progress (or the last one).
    hot: usize,
    cooling: bool,
}

impl HotPages {
    pub fn new(cfg: HotPageConfig) -> HotPages {
        HotPages {
            cfg: HotPageConfig {
                cool_every: cfg.cool_every.max(1),
                ..cfg
            },
            history: Vec::new(),
            recent: Vec::new(),
            spare: Vec::new(),
            harvests: 0,
            hot: 0,
            cooling: false,
        }
    }

    pub fn config(&self) -> HotPageConfig {
        self.cfg
    }

    /// Starts a harvest over slots of `words_per_slot` u64 words each.
    pub fn begin(&mut self, words_per_slot: impl Iterator<Item = usize>) {
        let sizes: Vec<usize> = words_per_slot.collect();
        let same = self.recent.len() == sizes.len()
            && self.recent.iter().zip(&sizes).all(|(r, n)| r.len() == *n);
        if !same {
            // New layout (or first harvest): nothing is known to be hot.
            self.recent = sizes.iter().map(|n| vec![0; *n]).collect();
            self.history = sizes.iter().map(|_| Default::default()).collect();
        }
        self.harvests += 1;
        self.cooling = self.harvests.is_multiple_of(u64::from(self.cfg.cool_every));
        self.hot = 0;
    }

    /// For slot `slot`, whose log reported `bits`, of which `words` are the indices of
    /// the non-zero words (ascending): rewrites each of those words of `bits` to the
    /// pages to re-protect (a subset of what was reported); the other reported pages
    /// stay writable and reported. Words not named are neither read nor written.
    pub fn select(&mut self, slot: usize, words: &[usize], bits: &mut [u64]) {
        let (Some(recent), Some(history)) = (self.recent.get_mut(slot), self.history.get_mut(slot))
        else {
            return; // unknown slot: re-protect everything reported
        };
        assert_eq!(recent.len(), bits.len());
        let never = self.cooling || self.cfg.window == 0;
        let mut record = std::mem::take(&mut self.spare);
        record.clear();
        for &i in words {
            let d = bits[i];
            if d == 0 {
                continue;
            }
            record.push((i, d));
            let mut keep = if never { 0 } else { d & recent[i] };
            let room = self.cfg.max_pages - self.hot;
            if keep.count_ones() as usize > room {
                // Keep the lowest `room` pages of this word, drop the rest.
                let mut trimmed = 0u64;
                for _ in 0..room {
                    let low = keep & keep.wrapping_neg();
                    trimmed |= low;
                    keep &= !low;
                }
                keep = trimmed;
            }
            self.hot += keep.count_ones() as usize;
            bits[i] = d & !keep;
        }
        debug_assert!(self.hot <= self.cfg.max_pages);
        if self.cfg.window == 0 {
            self.spare = record;
            return;
        }
        // Slide the window: this harvest in, the oldest out; `recent` changes only at
        // the words of those two.
        let evicted = if history.len() as u32 >= self.cfg.window {
            history.pop_front()
        } else {
            None
        };
        for &(i, d) in &record {
            recent[i] |= d;
        }
        history.push_back(record);
        if let Some(old) = evicted {
            for &(i, _) in &old {
                recent[i] = history
                    .iter()
                    .filter_map(|h| h.binary_search_by_key(&i, |e| e.0).ok().map(|k| h[k].1))
                    .fold(0, |a, b| a | b);
            }
            self.spare = old;
        }
    }

    /// Of `bits` (word `w` of slot `slot`), the pages the next harvest may keep hot
    /// (reported by one of the last `window` harvests): an early re-protect leaves
    /// them writable, so the policy decides at the harvest as it would without it.
    pub fn candidates(&self, slot: usize, w: usize, bits: u64) -> u64 {
        if self.cfg.window == 0 {
            return 0;
        }
        self.recent
            .get(slot)
            .and_then(|r| r.get(w))
            .map_or(0, |r| r & bits)
    }

    /// Forgets what earlier harvests saw: the next harvest starts a new history (after
    /// the baseline harvest that turns logging on, which reports every page).
    pub fn reset(&mut self) {
        self.recent.clear();
        self.history.clear();
        self.harvests = 0;
        self.hot = 0;
    }

    /// Pages the last harvest left writable.
    pub fn hot(&self) -> usize {
        self.hot
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The words of `dirty` that are non-zero, as the log's scan finds them.
    fn nonzero(dirty: &[u64]) -> Vec<usize> {
        (0..dirty.len()).filter(|i| dirty[*i] != 0).collect()
    }

    fn select(h: &mut HotPages, slot: usize, dirty: &[u64], clear: &mut [u64]) {
        clear.copy_from_slice(dirty);
        h.select(slot, &nonzero(dirty), clear);
    }

    fn harvest(h: &mut HotPages, dirty: &[u64]) -> Vec<u64> {
        h.begin(std::iter::once(dirty.len()));
        let mut clear = vec![0; dirty.len()];
        select(h, 0, dirty, &mut clear);
        clear
    }

    #[test]
    fn a_page_dirty_twice_in_a_row_stays_writable_until_the_cooling_harvest() {
        let mut h = HotPages::new(HotPageConfig {
            max_pages: 100,
            cool_every: 4,
            window: 1,
        });
        // Harvest 1: first sighting, re-protected.
        assert_eq!(harvest(&mut h, &[0b1010]), vec![0b1010]);
        // Harvest 2: page 1 again (hot), page 3 not written; page 0 new.
        assert_eq!(harvest(&mut h, &[0b0011]), vec![0b0001]);
        assert_eq!(h.hot(), 1);
        // Harvest 3: the log still reports page 1 (never cleared): still hot.
        assert_eq!(harvest(&mut h, &[0b0010]), vec![0]);
        // Harvest 4 cools: everything re-protected.
        assert_eq!(harvest(&mut h, &[0b0010]), vec![0b0010]);
        assert_eq!(h.hot(), 0);
        // Harvest 5: written again since the cooling: hot again.
        assert_eq!(harvest(&mut h, &[0b0010]), vec![0]);
    }

    #[test]
    fn the_hot_set_is_bounded_over_all_slots() {
        let mut h = HotPages::new(HotPageConfig {
            max_pages: 70,
            cool_every: 1000,
            window: 1,
        });
        let all = [u64::MAX, u64::MAX];
        for _ in 0..2 {
            h.begin([2usize, 2].into_iter());
            let mut c0 = [0u64; 2];
            let mut c1 = [0u64; 2];
            select(&mut h, 0, &all, &mut c0);
            select(&mut h, 1, &all, &mut c1);
            // Cleared pages are exactly those not kept, and every reported page is
            // either cleared or counted hot.
            let cleared: u32 = c0.iter().chain(&c1).map(|w| w.count_ones()).sum();
            assert_eq!(cleared as usize + h.hot(), 256);
        }
        assert_eq!(h.hot(), 70);
    }

    #[test]
    fn cool_every_one_never_keeps_anything() {
        let mut h = HotPages::new(HotPageConfig {
            max_pages: 100,
            cool_every: 0,
            window: 4,
        });
        for _ in 0..5 {
            assert_eq!(harvest(&mut h, &[0xff]), vec![0xff]);
        }
        let mut h = HotPages::new(HotPageConfig {
            window: 0,
            ..HotPageConfig::default()
        });
        for _ in 0..5 {
            assert_eq!(harvest(&mut h, &[0xff]), vec![0xff]);
        }
    }

    #[test]
    fn a_page_rewritten_within_the_window_becomes_hot() {
        let mut h = HotPages::new(HotPageConfig {
            max_pages: 100,
            cool_every: 1000,
            window: 3,
        });
        // Page 0 is written every third harvest: seen at 1, again at 4 (within 3).
        assert_eq!(harvest(&mut h, &[1]), vec![1]);
        assert_eq!(harvest(&mut h, &[0]), vec![0]);
        assert_eq!(harvest(&mut h, &[0]), vec![0]);
        assert_eq!(harvest(&mut h, &[1]), vec![0]);
        // Page 1 written every fifth harvest: never within the window.
        let mut h = HotPages::new(HotPageConfig {
            max_pages: 100,
            cool_every: 1000,
            window: 3,
        });
        for round in 0..10 {
            let d = if round % 5 == 0 { 2 } else { 0 };
            assert_eq!(harvest(&mut h, &[d]), vec![d]);
        }
    }

    #[test]
    fn reset_forgets_the_baseline() {
        let mut h = HotPages::new(HotPageConfig::default());
        harvest(&mut h, &[u64::MAX]);
        h.reset();
        assert_eq!(harvest(&mut h, &[0b11]), vec![0b11]);
        assert_eq!(harvest(&mut h, &[0b11]), vec![0]);
    }

    #[test]
    fn a_layout_change_forgets_the_history() {
        let mut h = HotPages::new(HotPageConfig::default());
        harvest(&mut h, &[1]);
        assert_eq!(harvest(&mut h, &[1, 0]), vec![1, 0]);
    }

    /// The sparse history against the dense rule it implements: a page is kept when it
    /// was reported by one of the `window` previous harvests (bounded, cooled).
    #[test]
    fn sparse_history_matches_the_dense_rule() {
        let cfg = HotPageConfig {
            max_pages: 40,
            cool_every: 7,
            window: 3,
        };
        let mut h = HotPages::new(cfg);
        let mut past: std::collections::VecDeque<Vec<u64>> = Default::default();
        let mut rng = twinrun_lab::Rng::new(0x9e37_79b9_7f4a_7c15);
        for n in 1..=200u64 {
            let dirty: Vec<u64> = (0..8)
                .map(|_| {
                    let x = rng.next();
                    // Mostly sparse words, some empty.
                    if x.is_multiple_of(3) {
                        0
                    } else {
                        x & (x >> 7) & (x >> 19)
                    }
                })
                .collect();
            let got = harvest(&mut h, &dirty);
            let mut room = cfg.max_pages;
            let cooling = n % u64::from(cfg.cool_every) == 0;
            let want: Vec<u64> = dirty
                .iter()
                .enumerate()
                .map(|(i, d)| {
                    let recent = past.iter().fold(0, |a, p| a | p[i]);
                    let mut keep = if cooling { 0 } else { d & recent };
                    while keep.count_ones() as usize > room {
                        keep &= !(1u64 << (63 - keep.leading_zeros()));
                    }
                    room -= keep.count_ones() as usize;
                    d & !keep
                })
                .collect();
            assert_eq!(got, want, "harvest {n}");
            if past.len() == cfg.window as usize {
                past.pop_front();
            }
            past.push_back(dirty);
        }
    }
}
