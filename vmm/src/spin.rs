//! Bounded spinning before sleeping, for the hand-offs of a checkpoint pause.
//!
//! Why: a pause passes control between threads several times (kick the vCPUs, wait
//! until they park, run the state capture on each vCPU's thread, resume). Waking a
//! thread that sleeps on a futex costs tens of microseconds on a virtualised host (an
//! IPI between host CPUs), as much as the work handed over, and a pause runs every few
//! milliseconds. A parked vCPU thread has nothing else to do during the pause's few
//! hundred microseconds, and the controller waits for it, so both spin first, for at
//! most [`HANDOFF_SPIN`], then sleep exactly as before: spinning only decides how fast
//! a wait that would succeed anyway notices it.
//!
//! Not the device thread: measured on a 2-CPU host, a device thread spinning for the
//! resume took the CPU the controller and the vCPU needed and doubled the pause.

use std::time::{Duration, Instant};

/// How long a pause hand-off spins before it sleeps.
pub const HANDOFF_SPIN: Duration = Duration::from_micros(250);

/// Calls `done` until it says true or `limit` has passed; true when it did.
pub fn spin_until(limit: Duration, mut done: impl FnMut() -> bool) -> bool {
    let t0 = Instant::now();
    loop {
        if done() {
            return true;
        }
        if t0.elapsed() >= limit {
            return false;
        }
        for _ in 0..32 {
            std::hint::spin_loop();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    #[test]
    fn stops_at_the_limit_when_nothing_happens() {
        let t0 = Instant::now();
        assert!(!spin_until(Duration::from_millis(2), || false));
        assert!(t0.elapsed() >= Duration::from_millis(2));
    }

    #[test]
    fn sees_another_threads_store() {
        let flag = Arc::new(AtomicBool::new(false));
        let f = flag.clone();
        let t = std::thread::spawn(move || f.store(true, Ordering::Release));
        assert!(spin_until(Duration::from_secs(10), || flag.load(Ordering::Acquire)));
        t.join().unwrap();
    }
}
