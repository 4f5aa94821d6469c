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
}
