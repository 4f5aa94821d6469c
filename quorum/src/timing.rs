//! The lease and detection times, and the arithmetic that makes a node stop acting
//! before the witness could think it stopped.
//!
//! Safety argument (README, "Timing"): the witness starts a lease when a renewal
//! *arrives* and ends it `lease_ttl` later on its own clock; the node measures its own
//! lease from the moment it *sent* that renewal (never later than the arrival), on its
//! own monotonic clock. Clocks run at rates within `1 ± rho` of real time (offsets do
//! not matter: only durations are compared). The node treats the lease as valid for
//!
//! ```text
//!   local_validity = lease_ttl * (1 - rho) / (1 + rho) - margin
//! ```
//!
//! of its own time. In real time that is at most `lease_ttl / (1 + rho) - margin /
//! (1 - rho)`, while the witness's lease lasts at least `lease_ttl / (1 + rho)` of real
//! time from a later start. So the node's permission ends at least `margin` before the
//! witness can grant the next generation; `margin` covers the time the runtime needs
//! to enforce the end (a release in progress, a thread that wakes late).

use std::time::Duration;

/// The defaults, sized for the failover target (p50 <= 300 ms from SIGKILL of the
/// primary to the standby's first released output, never over 1 s): see the README.
pub const LEASE_TTL: Duration = Duration::from_millis(200);
pub const RENEW_INTERVAL: Duration = Duration::from_millis(40);
pub const MARGIN: Duration = Duration::from_millis(30);
/// Clock rate bound: 1 % (NTP slews CLOCK_MONOTONIC by at most 0.05 %; 1 % leaves room
/// for a misbehaving virtual clock).
pub const MAX_DRIFT_PPM: u32 = 10_000;
/// An unanswered witness request is sent again after this long.
pub const RETRY: Duration = Duration::from_millis(20);
/// A witness with no authenticated answer for this long is unreachable.
pub const REACH_TIMEOUT: Duration = Duration::from_millis(150);
/// The preferred witness must be reachable from both PMs this long before the pair
/// moves back to it (no flapping between witnesses).
pub const PREFERRED_STABLE: Duration = Duration::from_secs(2);
/// The PMs tell each other their quorum view this often.
pub const STATUS_INTERVAL: Duration = Duration::from_millis(100);

/// Shortest and longest lease a witness accepts.
pub const MIN_LEASE: Duration = Duration::from_millis(50);
pub const MAX_LEASE: Duration = Duration::from_secs(60);

/// The times one node works with. Both nodes of a pair must use the same values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timing {
    /// Lease length at the witness (sent with every request: the witness uses it).
    pub lease_ttl: Duration,
    /// How often the holder renews (and every node probes each witness).
    pub renew_interval: Duration,
    /// Time kept in hand before the lease could lapse at the witness.
    pub margin: Duration,
    /// Bound on any clock's rate error, in parts per million.
    pub max_drift_ppm: u32,
    /// Resend an unanswered request after this long.
    pub retry: Duration,
    /// No answer from a witness for this long: unreachable.
    pub reach_timeout: Duration,
    /// Hysteresis before moving back to the preferred witness.
    pub preferred_stable: Duration,
    /// Quorum status to the peer this often.
    pub status_interval: Duration,
}

impl Default for Timing {
    fn default() -> Timing {
        Timing {
            lease_ttl: LEASE_TTL,
            renew_interval: RENEW_INTERVAL,
            margin: MARGIN,
            max_drift_ppm: MAX_DRIFT_PPM,
            retry: RETRY,
            reach_timeout: REACH_TIMEOUT,
            preferred_stable: PREFERRED_STABLE,
            status_interval: STATUS_INTERVAL,
        }
    }
}

/// Why a [`Timing`] cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TimingError {
    #[error("lease TTL {0:?} is outside {MIN_LEASE:?}..={MAX_LEASE:?}")]
    Lease(Duration),
    #[error("renew interval {renew:?} must be positive and leave at least two renewals inside the lease's local validity {validity:?}")]
    Renew { renew: Duration, validity: Duration },
    #[error("margin {0:?} must be at least 5 ms")]
    Margin(Duration),
    #[error("clock drift bound {0} ppm must be below 100000 (10 %)")]
    Drift(u32),
    #[error("{0} must be positive")]
    Zero(&'static str),
}

impl Timing {
    /// Checks the relations the safety argument and liveness need.
    pub fn validate(&self) -> Result<(), TimingError> {
        if self.lease_ttl < MIN_LEASE || self.lease_ttl > MAX_LEASE {
            return Err(TimingError::Lease(self.lease_ttl));
        }
        if self.max_drift_ppm >= 100_000 {
            return Err(TimingError::Drift(self.max_drift_ppm));
        }
        if self.margin < Duration::from_millis(5) {
            return Err(TimingError::Margin(self.margin));
        }
        let validity = self.local_validity();
        if self.renew_interval.is_zero() || self.renew_interval * 2 > validity {
            return Err(TimingError::Renew {
                renew: self.renew_interval,
                validity,
            });
        }
        for (d, what) in [
            (self.retry, "retry"),
            (self.reach_timeout, "reach timeout"),
            (self.status_interval, "status interval"),
        ] {
            if d.is_zero() {
                return Err(TimingError::Zero(what));
            }
        }
        Ok(())
    }

    /// How long after *sending* a renewal that the witness granted the node may act
    /// on it, on its own clock (see the module docs). Zero if the margin eats it all.
    pub fn local_validity(&self) -> Duration {
        let rho = u128::from(self.max_drift_ppm);
        let ttl = self.lease_ttl.as_nanos();
        let scaled = ttl * (1_000_000 - rho) / (1_000_000 + rho);
        let scaled = Duration::from_nanos(u64::try_from(scaled).unwrap_or(u64::MAX));
        scaled.saturating_sub(self.margin)
    }

    /// The lease in whole milliseconds, as carried on the wire.
    pub fn lease_ms(&self) -> u32 {
        u32::try_from(self.lease_ttl.as_millis()).unwrap_or(u32::MAX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_validate() {
        let t = Timing::default();
        t.validate().unwrap();
        // 200 ms * 0.99 / 1.01 = 196.04 ms, minus 30 ms.
        let v = t.local_validity();
        assert!(
            v > Duration::from_millis(166) && v < Duration::from_millis(167),
            "{v:?}"
        );
    }

    #[test]
    fn validity_ends_margin_before_the_witness_in_real_time() {
        // Worst case: node clock slow (its local duration stretches in real time),
        // witness clock fast (its lease shrinks in real time).
        for ppm in [0u32, 100, 10_000, 50_000] {
            let t = Timing {
                max_drift_ppm: ppm,
                ..Timing::default()
            };
            let rho = f64::from(ppm) / 1e6;
            let node_real = t.local_validity().as_secs_f64() / (1.0 - rho);
            let witness_real = t.lease_ttl.as_secs_f64() / (1.0 + rho);
            assert!(
                node_real + t.margin.as_secs_f64() <= witness_real + 1e-9,
                "ppm {ppm}: {node_real} + margin > {witness_real}"
            );
        }
    }

    #[test]
    fn bad_timings() {
        let d = Timing::default();
        let e = Timing {
            lease_ttl: Duration::from_millis(10),
            ..d
        }
        .validate();
        assert!(matches!(e, Err(TimingError::Lease(_))));
        let e = Timing {
            margin: Duration::ZERO,
            ..d
        }
        .validate();
        assert!(matches!(e, Err(TimingError::Margin(_))));
        let e = Timing {
            renew_interval: Duration::from_millis(100),
            ..d
        }
        .validate();
        assert!(matches!(e, Err(TimingError::Renew { .. })), "{e:?}");
        let e = Timing {
            max_drift_ppm: 200_000,
            ..d
        }
        .validate();
        assert!(matches!(e, Err(TimingError::Drift(_))));
        let e = Timing {
            retry: Duration::ZERO,
            ..d
        }
        .validate();
        assert!(matches!(e, Err(TimingError::Zero("retry"))));
    }
}
