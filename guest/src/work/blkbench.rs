//! `blkbench`: sequential throughput of the first virtio-blk disk, for the benchmark
//! suite (benches/). Writes `bytes` from sector 0 in requests of `req_bytes` with up to
//! `depth` in flight, flushes once, and prints `B write ...`; then reads the same range
//! back the same way and prints `B read ...`. Time is guest TSC time, so it is what the
//! guest sees, VMM exits included.
//!
//! Each write request's buffer starts with the request index (8 bytes, little endian);
//! the read pass checks it, so a read that returned the wrong sectors is counted `bad`.
//! The rest of each buffer keeps a fixed pattern: filling it would measure the guest's
//! memset, not the disk.

use crate::hw::arch::rdtsc;
use crate::hw::blk::{Blk, S_OK, T_FLUSH, T_IN, T_OUT};
use crate::hw::console::Console;
use alloc::vec::Vec;

/// Most requests the block driver keeps in flight (its slot count).
pub const MAX_DEPTH: u32 = 4;
const SECTOR: u64 = 512;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Phase {
    Write,
    Flush,
    Read,
    Finished,
}

pub struct BlkBench {
    blk: Blk,
    phase: Phase,
    /// One buffer of `req` bytes per slot.
    bufs: Vec<u8>,
    req: u64,
    total: u64,
    depth: u32,
    tsc_khz: u64,
    /// Next byte offset to submit, and requests submitted/completed in this phase.
    next: u64,
    submitted: u64,
    completed: u64,
    /// Request index held by each slot (to check reads on completion).
    slot_req: [u64; MAX_DEPTH as usize],
    /// Slots in flight, as bits.
    busy_mask: u32,
    in_flight: u32,
    start: u64,
    bad: u64,
}

impl BlkBench {
    /// `bytes` is clamped to the disk; `req_bytes` rounded down to whole sectors (at
    /// least one); `depth` to `1..=MAX_DEPTH`.
    pub fn new(blk: Blk, bytes: u64, req_bytes: u32, depth: u32, tsc_khz: u64) -> Self {
        let req = (req_bytes as u64 / SECTOR).max(1) * SECTOR;
        let total = (bytes / SECTOR * SECTOR).min(blk.capacity.saturating_mul(SECTOR));
        let depth = depth.clamp(1, MAX_DEPTH);
        let mut bufs = alloc::vec![0u8; (req * depth as u64) as usize];
        for (i, b) in bufs.iter_mut().enumerate() {
            *b = (i as u8).wrapping_mul(31).wrapping_add(7);
        }
        BlkBench {
            blk,
            phase: Phase::Write,
            bufs,
            req,
            total,
            depth,
            tsc_khz: tsc_khz.max(1),
            next: 0,
            submitted: 0,
            completed: 0,
            slot_req: [0; MAX_DEPTH as usize],
            busy_mask: 0,
            in_flight: 0,
            start: rdtsc(),
            bad: 0,
        }
    }

    pub fn done(&self) -> bool {
        self.phase == Phase::Finished
    }

    fn ns_since(&self, start: u64) -> u64 {
        let ticks = rdtsc().saturating_sub(start) as u128;
        (ticks * 1_000_000 / self.tsc_khz as u128) as u64
    }

    fn fail(&mut self, con: &mut Console, what: &str, sector: u64, status: u8) {
        con.line(format_args!(
            "B-ERROR {what} sector={sector} status={status}"
        ));
        self.phase = Phase::Finished;
    }

    /// Submits requests of the current phase until the queue is full or the range is
    /// covered.
    fn fill(&mut self, con: &mut Console) {
        let kind = if self.phase == Phase::Write {
            T_OUT
        } else {
            T_IN
        };
        while self.in_flight < self.depth && self.next < self.total {
            let len = (self.total - self.next).min(self.req);
            let idx = self.submitted;
            // The buffer must be named before the driver picks the slot; it picks the
            // lowest free one, which is checked below.
            let Some(slot) = self.free_slot_hint() else {
                return;
            };
            let buf = &mut self.bufs[slot * self.req as usize..][..self.req as usize];
            if kind == T_OUT {
                buf[..8].copy_from_slice(&idx.to_le_bytes());
            }
            let ptr = buf.as_mut_ptr();
            let sector = self.next / SECTOR;
            match self.blk.submit(kind, sector, ptr, len as u32) {
                Some(s) if s as usize == slot => {}
                _ => {
                    return self.fail(
                        con,
                        if kind == T_OUT { "write" } else { "read" },
                        sector,
                        0xff,
                    )
                }
            }
            self.slot_req[slot] = idx;
            self.busy_mask |= 1 << slot;
            self.in_flight += 1;
            self.submitted += 1;
            self.next += len;
        }
    }

    /// The slot the driver will pick next: it takes the lowest free one, which is the
    /// lowest index not in flight among ours (we are its only user).
    fn free_slot_hint(&self) -> Option<usize> {
        (0..self.depth as usize).find(|&s| !self.slot_busy(s))
    }

    fn slot_busy(&self, s: usize) -> bool {
        self.busy_mask & (1 << s) != 0
    }

    pub fn poll(&mut self, con: &mut Console) {
        match self.phase {
            Phase::Finished => {}
            Phase::Write | Phase::Read => {
                if self.submitted == 0 {
                    self.start = rdtsc();
                }
                self.fill(con);
                while let Some((slot, st)) = self.blk.poll() {
                    let phase_name = if self.phase == Phase::Write {
                        "write"
                    } else {
                        "read"
                    };
                    if st != S_OK || slot as u32 >= self.depth {
                        return self.fail(con, phase_name, 0, st);
                    }
                    let s = slot as usize;
                    self.busy_mask &= !(1 << s);
                    self.in_flight -= 1;
                    self.completed += 1;
                    if self.phase == Phase::Read {
                        let at = s * self.req as usize;
                        let mut w = [0u8; 8];
                        w.copy_from_slice(&self.bufs[at..at + 8]);
                        if u64::from_le_bytes(w) != self.slot_req[s] {
                            self.bad += 1;
                        }
                    }
                }
                if self.phase == Phase::Finished {
                    return;
                }
                self.fill(con);
                if self.in_flight == 0 && self.next >= self.total {
                    self.end_phase(con);
                }
            }
            Phase::Flush => {
                let Some((_, st)) = self.blk.poll() else {
                    return;
                };
                if st != S_OK {
                    return self.fail(con, "flush", 0, st);
                }
                self.in_flight = 0;
                con.line(format_args!(
                    "B write bytes={} ns={} reqs={}",
                    self.total,
                    self.ns_since(self.start),
                    self.submitted
                ));
                self.next = 0;
                self.submitted = 0;
                self.completed = 0;
                self.phase = Phase::Read;
            }
        }
    }

    fn end_phase(&mut self, con: &mut Console) {
        match self.phase {
            Phase::Write => match self.blk.submit(T_FLUSH, 0, core::ptr::null_mut(), 0) {
                Some(_) => {
                    self.in_flight = 1;
                    self.phase = Phase::Flush;
                }
                None => self.fail(con, "flush", 0, 0xff),
            },
            Phase::Read => {
                con.line(format_args!(
                    "B read bytes={} ns={} reqs={} bad={}",
                    self.total,
                    self.ns_since(self.start),
                    self.submitted,
                    self.bad
                ));
                self.phase = Phase::Finished;
            }
            _ => {}
        }
    }
}
