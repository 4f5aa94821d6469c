//! Rate pacing against the TSC: how many events are due after some elapsed ticks.

/// Paces a stream of events at `rate` per second, measured in TSC ticks.
#[derive(Clone, Copy, Debug)]
pub struct Pacer {
    start: u64,
    rate: u32,
    ticks_per_sec: u64,
}

impl Pacer {
    /// `rate` 0 means "as fast as possible": every call to [`Pacer::due`] says unbounded.
    pub fn new(start_tsc: u64, rate: u32, tsc_khz: u64) -> Self {
        Pacer {
            start: start_tsc,
            rate,
            ticks_per_sec: tsc_khz.saturating_mul(1000).max(1),
        }
    }

    /// Events that should have happened by `now_tsc`, counted from the start (first
    /// event due immediately, so a caller that has done `n` events may do one more when
    /// `due > n`). `u64::MAX` when unpaced.
    pub fn due(&self, now_tsc: u64) -> u64 {
        if self.rate == 0 {
            return u64::MAX;
        }
        let elapsed = now_tsc.saturating_sub(self.start) as u128;
        let n = elapsed * self.rate as u128 / self.ticks_per_sec as u128;
        (n as u64).saturating_add(1)
    }
}

/// Microseconds since TSC 0, for smoltcp's clock.
pub fn tsc_to_micros(tsc: u64, tsc_khz: u64) -> u64 {
    (tsc as u128 * 1000 / tsc_khz.max(1) as u128) as u64
}

/// TSC ticks in `ms` milliseconds.
pub fn millis_to_tsc(ms: u64, tsc_khz: u64) -> u64 {
    ms.saturating_mul(tsc_khz)
}

/// A [`Pacer`] after a head start: the first `fill` events are due at once (unpaced),
/// and the pacing at `rate` starts when the last of them is done. `fill` 0 is a plain
/// [`Pacer`] started at `start_tsc`.
#[derive(Clone, Copy, Debug)]
pub struct FillPacer {
    fill: u64,
    rate: u32,
    tsc_khz: u64,
    paced: Option<Pacer>,
}

impl FillPacer {
    pub fn new(start_tsc: u64, rate: u32, tsc_khz: u64, fill: u64) -> Self {
        FillPacer {
            fill,
            rate,
            tsc_khz,
            paced: (fill == 0).then(|| Pacer::new(start_tsc, rate, tsc_khz)),
        }
    }

    /// Events that should have happened by `now_tsc` when `done` have: unbounded
    /// while filling; the pacer starts at the first call with the fill done.
    pub fn due(&mut self, now_tsc: u64, done: u64) -> u64 {
        if done < self.fill {
            return u64::MAX;
        }
        let (rate, khz) = (self.rate, self.tsc_khz);
        let p = self
            .paced
            .get_or_insert_with(|| Pacer::new(now_tsc, rate, khz));
        self.fill.saturating_add(p.due(now_tsc))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paced_counts_follow_rate() {
        // 1 GHz TSC, 10 events/s.
        let p = Pacer::new(1000, 10, 1_000_000);
        assert_eq!(p.due(1000), 1);
        assert_eq!(p.due(1000 + 99_999_999), 1);
        assert_eq!(p.due(1000 + 100_000_000), 2);
        assert_eq!(p.due(1000 + 1_000_000_000), 11);
        // A clock before the start does not underflow.
        assert_eq!(p.due(0), 1);
    }

    #[test]
    fn unpaced_is_unbounded() {
        let p = Pacer::new(0, 0, 2_000_000);
        assert_eq!(p.due(5), u64::MAX);
    }

    #[test]
    fn huge_elapsed_does_not_overflow() {
        let p = Pacer::new(0, u32::MAX, 1);
        assert!(p.due(u64::MAX) > 0);
        assert_eq!(tsc_to_micros(3_000_000, 3_000_000), 1000);
        assert_eq!(millis_to_tsc(2, 3_000_000), 6_000_000);
    }

    #[test]
    fn fill_is_unpaced_then_paced_from_its_end() {
        // 1 GHz TSC, 10 events/s after a fill of 3.
        let mut p = FillPacer::new(0, 10, 1_000_000, 3);
        assert_eq!(p.due(5, 0), u64::MAX);
        assert_eq!(
            p.due(7_000_000_000, 2),
            u64::MAX,
            "a slow fill stays unpaced"
        );
        // The fill ended at t = 7 s: one more event due at once, the next 0.1 s later.
        assert_eq!(p.due(7_000_000_000, 3), 4);
        assert_eq!(p.due(7_099_999_999, 4), 4);
        assert_eq!(p.due(7_100_000_000, 4), 5);
        assert_eq!(p.due(8_000_000_000, 5), 14);
    }

    #[test]
    fn no_fill_is_a_plain_pacer() {
        let mut f = FillPacer::new(1000, 10, 1_000_000, 0);
        let p = Pacer::new(1000, 10, 1_000_000);
        for t in [0, 1000, 100_000_999, 1_000_001_000] {
            assert_eq!(f.due(t, 0), p.due(t));
        }
        let mut u = FillPacer::new(0, 0, 1_000_000, 4);
        assert_eq!(u.due(1, 9), u64::MAX, "unpaced after the fill too");
    }
}
