//! `disk`: finds the durable records on the disk, then appends records at a fixed rate,
//! flushing every `flush_every` records and printing `W <seq>` only once a record is
//! flushed. One request is in flight at a time; a write carries up to `MAX_BATCH`
//! records when the workload is catching up.

use crate::hw::blk::{Blk, S_OK, T_FLUSH, T_IN, T_OUT};
use crate::hw::console::Console;
use alloc::vec::Vec;
use twinrun_guest::pace::Pacer;
use twinrun_guest::record::{self, Scan, SECTOR};
use twinrun_guest_abi::DISK_FIRST_SECTOR;

/// Most sectors in one request.
const MAX_BATCH: u64 = 64;

enum State {
    /// A read of `count` sectors starting at `sector` is in flight.
    Scanning {
        sector: u64,
        count: u64,
    },
    Idle,
    /// A write of records `first..first + count` is in flight.
    Writing {
        first: u64,
        count: u64,
    },
    /// A flush covering every record before `next_seq` is in flight.
    Flushing,
    Finished,
}

pub struct Disk {
    blk: Blk,
    state: State,
    buf: Vec<u8>,
    scan: Scan,
    pacer: Pacer,
    tsc_khz: u64,
    rate: u32,
    flush_every: u64,
    limit: u64,
    /// Next record to write.
    next_seq: u64,
    /// Last record reported with `W`.
    flushed: u64,
    /// Records written in this boot.
    written: u64,
}

impl Disk {
    pub fn new(blk: Blk, rate: u32, flush_every: u32, limit: u64, now: u64, tsc_khz: u64) -> Self {
        Disk {
            blk,
            state: State::Idle,
            buf: alloc::vec![0u8; MAX_BATCH as usize * SECTOR],
            scan: Scan::new(),
            pacer: Pacer::new(now, rate, tsc_khz),
            tsc_khz,
            rate,
            flush_every: flush_every.max(1) as u64,
            limit,
            next_seq: 1,
            flushed: 0,
            written: 0,
        }
    }

    pub fn done(&self) -> bool {
        matches!(self.state, State::Finished)
    }

    /// Starts the recovery scan.
    pub fn start(&mut self, con: &mut Console) {
        self.scan_from(DISK_FIRST_SECTOR, con);
    }

    fn scan_from(&mut self, sector: u64, con: &mut Console) {
        let count = self.blk.capacity.saturating_sub(sector).min(MAX_BATCH);
        if count == 0 {
            self.scan_done(con);
            return;
        }
        let data = self.buf.as_mut_ptr();
        match self
            .blk
            .submit(T_IN, sector, data, (count as usize * SECTOR) as u32)
        {
            Some(_) => self.state = State::Scanning { sector, count },
            None => self.fail(con, "read", sector, 0xff),
        }
    }

    fn scan_done(&mut self, con: &mut Console) {
        self.next_seq = self.scan.next_seq();
        self.flushed = self.next_seq - 1;
        con.line(format_args!(
            "DISK recovered={} corrupt={} next={}",
            self.scan.recovered, self.scan.corrupt, self.next_seq
        ));
        self.pacer = Pacer::new(crate::hw::arch::rdtsc(), self.rate, self.tsc_khz);
        self.state = State::Idle;
    }

    fn fail(&mut self, con: &mut Console, what: &str, sector: u64, status: u8) {
        con.line(format_args!(
            "DISK-ERROR {what} sector={sector} status={status}"
        ));
        self.state = State::Finished;
    }

    fn unflushed(&self) -> u64 {
        self.next_seq - 1 - self.flushed
    }

    fn limit_reached(&self) -> bool {
        self.limit != 0 && self.written >= self.limit
    }

    fn full(&self) -> bool {
        record::sector_of(self.next_seq) >= self.blk.capacity
    }

    pub fn poll(&mut self, now: u64, con: &mut Console) {
        match self.state {
            State::Finished => {}
            State::Idle => self.idle(now, con),
            State::Scanning { sector, count } => {
                let Some((_, st)) = self.blk.poll() else {
                    return;
                };
                if st != S_OK {
                    return self.fail(con, "read", sector, st);
                }
                let mut more = true;
                for i in 0..count as usize {
                    more = self.scan.feed(&self.buf[i * SECTOR..(i + 1) * SECTOR]);
                    if !more {
                        break;
                    }
                }
                if more {
                    self.scan_from(sector + count, con);
                } else {
                    self.scan_done(con);
                }
            }
            State::Writing { first, count } => {
                let Some((_, st)) = self.blk.poll() else {
                    return;
                };
                if st != S_OK {
                    return self.fail(con, "write", record::sector_of(first), st);
                }
                self.written += count;
                self.next_seq = first + count;
                if self.unflushed() >= self.flush_every || self.limit_reached() || self.full() {
                    self.flush(con);
                } else {
                    self.state = State::Idle;
                }
            }
            State::Flushing => {
                let Some((_, st)) = self.blk.poll() else {
                    return;
                };
                if st != S_OK {
                    return self.fail(con, "flush", 0, st);
                }
                for seq in self.flushed + 1..self.next_seq {
                    con.line(format_args!("W {seq}"));
                }
                self.flushed = self.next_seq - 1;
                self.state = State::Idle;
                self.idle(now, con);
            }
        }
    }

    fn flush(&mut self, con: &mut Console) {
        match self.blk.submit(T_FLUSH, 0, core::ptr::null_mut(), 0) {
            Some(_) => self.state = State::Flushing,
            None => self.fail(con, "flush", 0, 0xff),
        }
    }

    fn idle(&mut self, now: u64, con: &mut Console) {
        if self.limit_reached() || self.full() {
            if self.unflushed() > 0 {
                return self.flush(con);
            }
            if !self.limit_reached() {
                con.line(format_args!("DISK-FULL"));
            }
            self.state = State::Finished;
            return;
        }
        let due = self.pacer.due(now).saturating_sub(self.written);
        let room = self.blk.capacity - record::sector_of(self.next_seq);
        let mut n = due
            .min(MAX_BATCH)
            .min(self.flush_every - self.unflushed())
            .min(room);
        if self.limit != 0 {
            n = n.min(self.limit - self.written);
        }
        if n == 0 {
            return;
        }
        for i in 0..n {
            let at = i as usize * SECTOR;
            record::encode(self.next_seq + i, &mut self.buf[at..at + SECTOR]);
        }
        let data = self.buf.as_mut_ptr();
        let sector = record::sector_of(self.next_seq);
        match self
            .blk
            .submit(T_OUT, sector, data, (n as usize * SECTOR) as u32)
        {
            Some(_) => {
                self.state = State::Writing {
                    first: self.next_seq,
                    count: n,
                }
            }
            None => self.fail(con, "write", sector, 0xff),
        }
    }
}
