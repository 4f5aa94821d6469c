//! `counter`: `C <seq>` lines at a fixed rate, seq from 1 without gaps.

use crate::hw::console::Console;
use twinrun_guest::pace::Pacer;

/// Most lines per poll when unpaced, so other workloads keep running.
const BURST: u64 = 256;

pub struct Counter {
    pacer: Pacer,
    /// Next sequence number to print.
    next: u64,
    limit: u64,
    done: bool,
}

impl Counter {
    pub fn new(now: u64, rate: u32, limit: u64, tsc_khz: u64) -> Self {
        Counter {
            pacer: Pacer::new(now, rate, tsc_khz),
            next: 1,
            limit,
            done: false,
        }
    }

    pub fn done(&self) -> bool {
        self.done
    }

    pub fn poll(&mut self, now: u64, con: &mut Console) {
        let due = self.pacer.due(now);
        let mut burst = 0;
        while !self.done && self.next <= due && burst < BURST {
            con.line(format_args!("C {}", self.next));
            if self.limit != 0 && self.next >= self.limit {
                self.done = true;
            }
            self.next += 1;
            burst += 1;
        }
    }
}
