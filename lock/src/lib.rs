//! The one way twinrun takes a `std::sync` lock whose last holder panicked.
//!
//! A `Mutex` is *poisoned* when a thread panics while holding it; `lock()` then returns
//! `Err(PoisonError)` carrying the guard. twinrun recovers the guard and goes on, at
//! every lock of its library and daemon code, for these reasons:
//!
//! - **The panic already reported the bug.** A panic in twinrun is a bug, logged by the
//!   panic hook with its backtrace; cascading it into every other thread that touches
//!   the same lock (the vCPUs, the A-Link writers, the checkpoint driver) turns one
//!   failed thread into a dead VMM, which for a fault-tolerant VM is the worst outcome:
//!   the guest's output and its standby's copy would stop together.
//! - **The data under these locks stays valid after a panic.** Each lock guards state
//!   whose invariants hold between statements that can panic (queues, counters, maps,
//!   bitmaps updated by single assignments or `std` collection calls, which are panic
//!   safe), not multi-step transactions left half done. Where a half-done update would
//!   matter, the code that owns it validates on use (checkpoint parts carry CRCs, the
//!   disk bitmaps and the apply journal are re-read and checked at recovery), so a
//!   recovered guard never publishes unchecked state beyond the process.
//! - **Stopping is decided elsewhere.** A thread whose work became impossible reports
//!   it through its typed error or exit code (the checkpoint drivers' errors, the pair
//!   runtime's exit codes), not by poisoning a lock for others to trip on.
//!
//! Where recovering would not be right, a site does not use this crate: tests keep
//! `lock().unwrap()` (a panic in a helper thread should fail the test), and code that
//! must not go on after a peer's panic checks the peer's outcome (a joined thread's
//! `Result`) instead of a lock's poison flag.
//!
//! The crate has no dependencies and sits below every twinrun crate that takes a lock,
//! so using it keeps dependencies pointing one way.

#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

use std::sync::{Condvar, Mutex, MutexGuard, PoisonError, WaitTimeoutResult};
use std::time::Duration;

/// [`Mutex::lock`] that recovers the guard of a poisoned lock (see the crate docs).
pub trait MutexExt<T: ?Sized> {
    /// Locks, taking the guard even when a previous holder panicked.
    fn lock_or_recover(&self) -> MutexGuard<'_, T>;
}

impl<T: ?Sized> MutexExt<T> for Mutex<T> {
    fn lock_or_recover(&self) -> MutexGuard<'_, T> {
        self.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// [`MutexExt::lock_or_recover`] as a function, for code that reads `lock(&m)`.
pub fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock_or_recover()
}

/// [`Condvar`] waits that recover the guard of a poisoned lock (see the crate docs).
pub trait CondvarExt {
    /// [`Condvar::wait`], taking the guard back even when the lock was poisoned.
    fn wait_or_recover<'a, T>(&self, guard: MutexGuard<'a, T>) -> MutexGuard<'a, T>;
    /// [`Condvar::wait_timeout`], taking the guard back even when the lock was poisoned.
    fn wait_timeout_or_recover<'a, T>(
        &self,
        guard: MutexGuard<'a, T>,
        dur: Duration,
    ) -> (MutexGuard<'a, T>, WaitTimeoutResult);
}

impl CondvarExt for Condvar {
    fn wait_or_recover<'a, T>(&self, guard: MutexGuard<'a, T>) -> MutexGuard<'a, T> {
        self.wait(guard).unwrap_or_else(PoisonError::into_inner)
    }

    fn wait_timeout_or_recover<'a, T>(
        &self,
        guard: MutexGuard<'a, T>,
        dur: Duration,
    ) -> (MutexGuard<'a, T>, WaitTimeoutResult) {
        self.wait_timeout(guard, dur)
            .unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn poisoned() -> Arc<Mutex<u32>> {
        let m = Arc::new(Mutex::new(7));
        let m2 = m.clone();
        let _ = std::thread::spawn(move || {
            let _g = m2.lock_or_recover();
            panic!("poisons the lock (expected in this test)");
        })
        .join();
        assert!(m.is_poisoned());
        m
    }

    #[test]
    fn a_poisoned_mutex_still_gives_its_guard_and_value() {
        let m = poisoned();
        let mut g = m.lock_or_recover();
        assert_eq!(*g, 7);
        *g = 8;
        drop(g);
        assert_eq!(*m.lock_or_recover(), 8);
    }

    #[test]
    fn waits_on_a_poisoned_mutex_return_the_guard() {
        let m = poisoned();
        let cv = Condvar::new();
        let g = m.lock_or_recover();
        let (g, r) = cv.wait_timeout_or_recover(g, Duration::from_millis(1));
        assert!(r.timed_out());
        assert_eq!(*g, 7);
        let m2 = m.clone();
        let cv = Arc::new(cv);
        let cv2 = cv.clone();
        let t = std::thread::spawn(move || {
            *m2.lock_or_recover() = 9;
            cv2.notify_all();
        });
        let mut g = g;
        while *g != 9 {
            g = cv.wait_or_recover(g);
        }
        drop(g);
        t.join().unwrap();
    }
}
