//! `dirty`: rewrites pages of a working set at a fixed rate, each page with the
//! contents of its next version (`abi::dirty_word`), and keeps verifying pages written
//! earlier, so lost or stale memory after a checkpoint/restore shows as DIRTY-ERROR.

use crate::hw::console::Console;
use alloc::vec::Vec;
use twinrun_guest::dirtyfill::{self, WORDS};
use twinrun_guest::pace::FillPacer;

/// Most pages written per poll, so other workloads keep running when unpaced.
const BURST: u64 = 64;
/// Pages verified for every page written.
const VERIFY_PER_WRITE: u64 = 2;
/// DIRTY-ERROR lines printed per pass at most (errors are still counted).
const MAX_ERROR_LINES: u64 = 16;

pub struct Dirty {
    base: *mut u64,
    pages: u64,
    seed: u64,
    versions: Vec<u64>,
    pacer: FillPacer,
    write_cursor: u64,
    verify_cursor: u64,
    writes: u64,
    verified: u64,
    errors: u64,
    error_lines: u64,
    pass: u64,
    passes: u64,
    done: bool,
}

impl Dirty {
    /// `pacer`: the write rate, after an unpaced fill of the working set or not.
    ///
    /// # Safety
    /// `[base, base + pages * 4096)` must be RAM used by nothing else.
    pub unsafe fn new(base: u64, pages: u64, seed: u64, passes: u64, pacer: FillPacer) -> Self {
        Dirty {
            base: base as *mut u64,
            pages,
            seed,
            versions: alloc::vec![0; pages as usize],
            pacer,
            write_cursor: 0,
            verify_cursor: 0,
            writes: 0,
            verified: 0,
            errors: 0,
            error_lines: 0,
            pass: 0,
            passes,
            done: pages == 0,
        }
    }

    pub fn done(&self) -> bool {
        self.done
    }

    fn page_ptr(&self, p: u64) -> *mut u64 {
        // SAFETY: p < pages, so the offset stays inside the working set.
        unsafe { self.base.add(p as usize * WORDS) }
    }

    fn write_page(&mut self, p: u64) {
        let v = self.versions[p as usize] + 1;
        self.versions[p as usize] = v;
        // SAFETY: the page is inside the working set (constructor contract), aligned and
        // only ever accessed through this workload.
        let words = unsafe { &mut *(self.page_ptr(p) as *mut [u64; WORDS]) };
        dirtyfill::fill(words, self.seed, p, v);
        self.writes += 1;
    }

    fn verify_page(&mut self, p: u64, con: &mut Console) {
        let v = self.versions[p as usize];
        if v == 0 {
            return;
        }
        let ptr = self.page_ptr(p);
        // SAFETY: word index w < 512 stays inside page p; volatile so the check reads
        // what memory holds now, not what the compiler remembers writing.
        let bad = dirtyfill::verify(|w| unsafe { ptr.add(w).read_volatile() }, self.seed, p, v);
        self.verified += 1;
        if let Some(m) = bad {
            self.errors += 1;
            if self.error_lines < MAX_ERROR_LINES {
                self.error_lines += 1;
                con.line(format_args!(
                    "DIRTY-ERROR page={} version={} word={} expected={:#018x} found={:#018x}",
                    p, v, m.word, m.expected, m.found
                ));
            }
        }
    }

    pub fn poll(&mut self, now: u64, con: &mut Console) {
        let mut burst = 0;
        while !self.done && burst < BURST && self.writes < self.pacer.due(now, self.writes) {
            burst += 1;
            self.write_page(self.write_cursor);
            for _ in 0..VERIFY_PER_WRITE {
                let p = self.verify_cursor;
                self.verify_cursor = (self.verify_cursor + 1) % self.pages;
                // The page just written is checked when the verify walk reaches it.
                self.verify_page(p, con);
            }
            self.write_cursor += 1;
            if self.write_cursor == self.pages {
                self.write_cursor = 0;
                self.pass += 1;
                self.error_lines = 0;
                con.line(format_args!(
                    "D pass={} writes={} verified={} errors={}",
                    self.pass, self.writes, self.verified, self.errors
                ));
                if self.passes != 0 && self.pass >= self.passes {
                    self.done = true;
                }
            }
        }
    }
}
