//! Synchronous disk mirroring for an HA pair: a guest write completes only once the
//! local image AND the standby's replica have it (durably: the standby applies each
//! batch through its apply journal, one fdatasync, before acknowledging). A flush is
//! then complete when the local image is flushed: every write before it was
//! acknowledged, so it is already durable on the standby.
//!
//! | module | concern | I/O |
//! | --- | --- | --- |
//! | [`machine`] | batches out, acknowledgement order, the standby's loss | none (pure) |
//! | [`wire`] | the HA disk link's messages, bounded | none |
//! | (this) | [`SyncDisks`]: the disk hooks' answers on the primary, the gate that ends a resync | files, the sender given |
//!
//! Marks: the primary's [`PrimaryDisks`] keeps doing what it does for FT. Degraded (no
//! standby) and syncing, every written block is set in the persistent bitmap before the
//! write; protected, the activity log marks the written 4 MiB extents before the write
//! and each batch is one "epoch" of it, captured and acknowledged as its
//! acknowledgement arrives. Losing the standby narrows the marks to the unacknowledged
//! writes and begins a new generation; the returning standby is resynced (delta) by the
//! existing disk session ([`crate::primary::PrimarySession`]), during which guest
//! writes are already mirrored synchronously; [`SyncDisks::end_resync`] then closes a
//! gate on new writes for the time it takes to send the blocks still marked as epoch 0.
//!
//! Completing alone is the pair's quorum's call, made here on the guest's I/O path (not
//! by a runtime loop that looks now and then): with an [`AloneGate`] set, a write the
//! standby did not acknowledge completes only while the gate says this node may act
//! alone (the holder with a valid witness lease, the same rule as FT's output commit);
//! otherwise its completion is held (the write is on the local image and marked, the
//! guest does not see it done) until the gate opens, a returning standby is in sync
//! (its resync carried the marked blocks), or the node is fenced ([`SyncDisks::fence`]: the held writers fail). The gate is a closure so
//! that this crate knows nothing of the quorum.
//!
//! A standby that stays reachable (heartbeats fine) but stops acknowledging would hold
//! the guest's writes forever: [`SyncDisks::ack_overdue`] tells the runtime when the
//! oldest batch out waited longer than its bound ([`ACK_TIMEOUT`] by default), and
//! [`SyncDisks::standby_failed`] then treats it as lost (the same marks and new
//! generation as [`SyncDisks::peer_lost`], the writers completing alone under the
//! same [`AloneGate`]), with the reason kept for the status until a standby is in sync
//! again.
//!
//! Stopping ([`SyncDisks::stop`], the VM stopped on request or ended): the writers
//! still waiting fail (the guest never sees them done) and the disks are left as they
//! are, WITHOUT a new generation: the bitmap already holds every block the standby did
//! not acknowledge, so a returning standby gets a delta (or nothing), and a standby
//! that took over meanwhile is the delta's source (its new generation is based on this
//! one). Only a node that goes on writing without its standby begins a generation; so
//! a loss reported after the stop ([`SyncDisks::peer_lost`]: a writer whose send the
//! runtime cut at the stop, a session that saw the standby go at that moment) is a
//! stop too.

pub mod machine;
pub mod wire;

use std::io;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use twinrun_lock::{CondvarExt, MutexExt};

use crate::primary::PrimaryDisks;
use machine::{Outcome, Submit, SyncPrimary};
use wire::{HaToStandby, WriteHead};

/// Sends a message with its payload to the standby; false when it cannot (lost).
pub type SyncSend = Box<dyn Fn(&HaToStandby, Vec<u8>) -> bool + Send + Sync>;

/// Whether this node may complete guest writes without the standby now (the pair's
/// quorum behind it: holder with a valid lease). Called on every completion the
/// standby did not acknowledge, so it must be cheap (a lock and a clock read).
pub type AloneGate = Box<dyn Fn() -> bool + Send + Sync>;

/// How often a write held by the [`AloneGate`] looks at it again.
const ALONE_SLICE: Duration = Duration::from_millis(2);

/// How long a writer sleeps between looks at a silent standby (the pair's runtime
/// declares it lost by the A-Link's heartbeats and releases the writers at once).
const WAIT_SLICE: Duration = Duration::from_millis(50);

/// How long the oldest write batch out may wait for the standby's acknowledgement
/// before the runtime declares the standby failed (it may still answer heartbeats):
/// far above a loaded standby's apply time (one journal append and fdatasync), and
/// bounded, so that a stuck standby holds the guest's writes for this long at most
/// (then the quorum's rule for completing alone applies).
pub const ACK_TIMEOUT: Duration = Duration::from_secs(5);

/// Bytes the closing commit of a resync may carry at most.
pub const MAX_END_RESYNC_BYTES: u64 = 32 << 20;

struct State {
    machine: SyncPrimary,
    send: Option<Arc<SyncSend>>,
    /// A resync is ending: new write batches wait.
    gate_closed: bool,
    /// Write batches between `before_writes` and `completed`.
    in_flight: usize,
    /// Per disk: a batch is between `before_writes` and `completed` (the device is
    /// locked meanwhile, so at most one).
    open: Vec<bool>,
}

/// Counters for the status and the benchmarks.
#[derive(Debug, Default)]
pub struct SyncStats {
    pub batches_acked: AtomicU64,
    pub batches_alone: AtomicU64,
    pub bytes_mirrored: AtomicU64,
    /// Completions the [`AloneGate`] held (each counted once).
    pub batches_held: AtomicU64,
}

/// The primary's disks mirrored synchronously: what its VMM's disk hooks call.
pub struct SyncDisks {
    pub disks: Arc<PrimaryDisks>,
    state: Mutex<State>,
    cv: Condvar,
    /// Held while a batch is numbered and sent: batches leave in number order.
    send_order: Mutex<()>,
    /// None: completing alone needs nobody's leave (no quorum).
    alone: Mutex<Option<AloneGate>>,
    /// This node lost the VM: no held completion is ever given.
    fenced: std::sync::atomic::AtomicBool,
    /// This end stops ([`SyncDisks::stop`]): no completion without the standby.
    stopping: std::sync::atomic::AtomicBool,
    /// How many times a standby became in sync ([`SyncDisks::in_sync`]): a write held
    /// alone completes once it grows (that standby has every marked block).
    synced: AtomicU64,
    pub stats: SyncStats,
}

impl std::fmt::Debug for SyncDisks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SyncDisks")
            .field("disks", &self.disks.len())
            .finish_non_exhaustive()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum EndResyncError {
    #[error("{0} bytes are still to copy (more than {MAX_END_RESYNC_BYTES})")]
    TooLarge(u64),
    #[error("reading disk {disk}: {source}")]
    Read { disk: usize, source: io::Error },
}

impl SyncDisks {
    pub fn new(disks: Arc<PrimaryDisks>) -> Arc<SyncDisks> {
        let n = disks.len();
        Arc::new(SyncDisks {
            disks,
            state: Mutex::new(State {
                machine: SyncPrimary::new(1),
                send: None,
                gate_closed: false,
                in_flight: 0,
                open: vec![false; n],
            }),
            cv: Condvar::new(),
            send_order: Mutex::new(()),
            alone: Mutex::new(None),
            fenced: std::sync::atomic::AtomicBool::new(false),
            stopping: std::sync::atomic::AtomicBool::new(false),
            synced: AtomicU64::new(0),
            stats: SyncStats::default(),
        })
    }

    /// Sets (or clears) the rule for completing writes without the standby.
    pub fn set_alone_gate(&self, gate: Option<AloneGate>) {
        *self.alone.lock_or_recover() = gate;
        self.cv.notify_all();
    }

    /// This node lost the VM to its peer: every completion the gate holds, and every
    /// later one without the standby, fails with an I/O error (the guest is being
    /// stopped; none of these writes may be reported done).
    pub fn fence(&self) {
        self.fenced.store(true, Ordering::SeqCst);
        self.cv.notify_all();
    }

    /// This end stops (the VM was stopped on request, or it ended): every writer
    /// still waiting for the standby, and every later one, fails (the guest never sees
    /// it done: it is stopping) and nothing more is sent. Unlike
    /// [`SyncDisks::peer_lost`] the disks are left as they are, with no new generation
    /// (see the module's comment). Call before joining the VM's threads: a vCPU may be
    /// waiting here for an acknowledgement only the caller's thread would take.
    pub fn stop(&self) {
        // Set under the state lock: `peer_lost` decides loss or stop under it too.
        let mut s = self.state();
        self.stopping.store(true, Ordering::SeqCst);
        s.send = None;
        if s.machine.attached() {
            s.machine.peer_lost();
        }
        s.gate_closed = false;
        drop(s);
        self.cv.notify_all();
    }

    fn may_complete_alone(&self) -> io::Result<bool> {
        if self.fenced.load(Ordering::SeqCst) {
            return Err(io::Error::other(
                "this node lost the VM to its peer (fenced): the write is not completed",
            ));
        }
        if self.stopping.load(Ordering::SeqCst) {
            return Err(io::Error::other(
                "the VM is stopping: a write its standby did not acknowledge is not completed",
            ));
        }
        Ok(self.alone.lock_or_recover().as_ref().is_none_or(|g| g()))
    }

    /// A write of `disk` the standby did not acknowledge (lost, or never attached)
    /// completes once the [`AloneGate`] allows it, or once a standby became in sync
    /// after it (its blocks are on the image and marked already: a returning standby
    /// gets them by the resync, whose closing commit reads every block still marked).
    /// Fails when the node is fenced. Its batch is closed first: the data is on the
    /// image, so the resync's drain need not wait for it (it could not end otherwise).
    fn complete_alone(&self, disk: usize) -> io::Result<()> {
        let synced = self.synced.load(Ordering::SeqCst);
        self.close_batch(disk);
        let mut counted = false;
        while !self.may_complete_alone()? && self.synced.load(Ordering::SeqCst) == synced {
            if !counted {
                counted = true;
                self.stats.batches_held.fetch_add(1, Ordering::Relaxed);
            }
            let s = self.state();
            let _ = self.cv.wait_timeout(s, ALONE_SLICE);
        }
        Ok(())
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock_or_recover()
    }

    /// A standby is attached (its resync plan applied): write batches go to it from
    /// here on.
    pub fn attach(&self, send: SyncSend) {
        let _order = self.send_order.lock_or_recover();
        let mut s = self.state();
        s.send = Some(Arc::new(send));
        s.machine.attach();
    }

    pub fn attached(&self) -> bool {
        self.state().machine.attached()
    }

    /// The standby is lost (or misbehaved): its writers complete alone, after their
    /// blocks are marked for its return (the disks narrow the activity log to the
    /// unacknowledged writes, durably, and begin a new generation).
    ///
    /// Once this end stops ([`SyncDisks::stop`]) it is a stop, not a loss: a writer whose
    /// send failed because the runtime cut it at the stop, or a session that saw the
    /// standby go in the same moment, must not begin a generation (the finalize after a
    /// planned stop would then find both replicas on new generations: split brain).
    pub fn peer_lost(&self) {
        let mut s = self.state();
        if self.stopping.load(Ordering::SeqCst) {
            drop(s);
            self.stop();
            return;
        }
        s.send = None;
        if !s.machine.attached() {
            drop(s);
            self.disks.peer_lost();
            return;
        }
        // Marks first (under the state lock: no writer is released before them).
        self.disks.peer_lost();
        let lost = s.machine.peer_lost();
        self.stats
            .batches_alone
            .fetch_add(lost.len() as u64, Ordering::Relaxed);
        s.gate_closed = false;
        drop(s);
        self.cv.notify_all();
    }

    /// The oldest write batch out, and how long it has waited, once that is `limit`
    /// or more (the runtime looks now and then; see [`ACK_TIMEOUT`]).
    pub fn ack_overdue(&self, limit: Duration) -> Option<(u64, Duration)> {
        self.state().machine.overdue(Instant::now(), limit)
    }

    /// The standby stays reachable but stopped acknowledging (`why`): declared failed
    /// for every disk. Its writers complete alone as at its loss (marked, a new
    /// generation, the [`AloneGate`] deciding), and `why` is kept for the status until
    /// a standby is in sync again.
    pub fn standby_failed(&self, why: String) {
        self.disks.set_standby_failed(Some(why));
        self.peer_lost();
    }

    /// The standby acknowledged batch `seq`. An acknowledgement out of order detaches
    /// it (returned as an error for the runtime to end the session).
    pub fn on_ack(&self, seq: u64) -> Result<(), machine::SyncError> {
        let r = self.state().machine.on_ack(seq);
        self.cv.notify_all();
        r.map(|_| ())
    }

    /// A write batch of `disk` is about to be issued (the VMM's `before_writes`).
    pub fn before_writes(&self, disk: usize, ranges: &[(u64, u64)]) -> io::Result<()> {
        {
            let mut s = self.state();
            while s.gate_closed {
                s = self.cv.wait_or_recover(s);
            }
            if let Some(o) = s.open.get_mut(disk) {
                if !*o {
                    *o = true;
                    s.in_flight += 1;
                }
            }
        }
        let r = self.disks.before_writes(disk, ranges);
        if r.is_err() {
            self.close_batch(disk);
        }
        r
    }

    fn close_batch(&self, disk: usize) {
        let mut s = self.state();
        if let Some(o) = s.open.get_mut(disk) {
            if *o {
                *o = false;
                s.in_flight -= 1;
                drop(s);
                self.cv.notify_all();
            }
        }
    }

    /// The batch's successful writes of `disk` (offset, data), done on the local image:
    /// returns once the standby has them durably, or at once without a standby (the
    /// blocks are marked). Flushes need nothing more (see the module's comment).
    pub fn completed(&self, disk: usize, writes: &[(u64, &[u8])]) -> io::Result<()> {
        let r = self.mirror(disk, writes);
        self.close_batch(disk);
        r
    }

    fn mirror(&self, disk: usize, writes: &[(u64, &[u8])]) -> io::Result<()> {
        if writes.is_empty() {
            return Ok(());
        }
        let d = u16::try_from(disk).map_err(io::Error::other)?;
        let seq = {
            let _order = self.send_order.lock_or_recover();
            let (seq, send) = loop {
                let mut s = self.state();
                match s.machine.submit(Instant::now()) {
                    Submit::Alone => {
                        // Not under the send order: a returning standby attaches.
                        drop(s);
                        drop(_order);
                        return self.complete_alone(disk);
                    }
                    Submit::Send(seq) => break (seq, s.send.clone()),
                    Submit::Full => {
                        let _ = self.cv.wait_timeout(s, WAIT_SLICE);
                    }
                }
            };
            let mut heads: Vec<WriteHead> = Vec::with_capacity(writes.len());
            let mut payload = Vec::with_capacity(writes.iter().map(|w| w.1.len()).sum());
            for &(off, data) in writes {
                let len = u32::try_from(data.len()).map_err(io::Error::other)?;
                heads.push((d, off, len));
                payload.extend_from_slice(data);
            }
            let n = payload.len() as u64;
            let sent =
                send.is_some_and(|f| f(&HaToStandby::Writes { seq, writes: heads }, payload));
            if !sent {
                drop(_order);
                self.peer_lost();
            } else {
                self.stats.bytes_mirrored.fetch_add(n, Ordering::Relaxed);
            }
            seq
        };
        let mut s = self.state();
        loop {
            match s.machine.outcome(seq) {
                Outcome::Pending => {
                    s = self.cv.wait_timeout_or_recover(s, WAIT_SLICE).0;
                }
                Outcome::Acked => {
                    drop(s);
                    self.stats.batches_acked.fetch_add(1, Ordering::Relaxed);
                    let mut pd = self.disks.lock(disk);
                    pd.captured(seq, None);
                    pd.acked(seq);
                    return Ok(());
                }
                Outcome::Alone => {
                    drop(s);
                    return self.complete_alone(disk);
                }
            }
        }
    }

    /// The resync passes are over: closes the gate on new write batches. The caller
    /// goes on taking acknowledgements (the batches in flight wait for theirs) until
    /// [`SyncDisks::drained`], then calls [`SyncDisks::end_resync`]. The gate stays
    /// closed until [`SyncDisks::in_sync`] or [`SyncDisks::peer_lost`].
    pub fn close_gate(&self) {
        self.state().gate_closed = true;
    }

    /// The gate is closed and no write batch is in flight.
    pub fn drained(&self) -> bool {
        let s = self.state();
        s.gate_closed && s.in_flight == 0
    }

    /// Once [`SyncDisks::drained`]: the blocks still marked (read from the images) for
    /// the standby to commit as the resync's end (the disk session's epoch 0).
    pub fn end_resync(&self) -> Result<(Vec<WriteHead>, Vec<u8>), EndResyncError> {
        debug_assert!(self.drained(), "end_resync with writes in flight");
        let mut heads = Vec::new();
        let mut payload = Vec::new();
        for (i, ranges) in self.disks.unsynced_ranges().into_iter().enumerate() {
            let total: u64 = ranges.iter().map(|r| r.1).sum();
            if payload.len() as u64 + total > MAX_END_RESYNC_BYTES {
                self.open_gate();
                return Err(EndResyncError::TooLarge(payload.len() as u64 + total));
            }
            let image = self.disks.lock(i).image.try_clone();
            let image = image.map_err(|source| EndResyncError::Read { disk: i, source })?;
            for (off, len) in ranges {
                let at = payload.len();
                payload.resize(at + len as usize, 0);
                image
                    .read_exact_at(&mut payload[at..], off)
                    .map_err(|source| EndResyncError::Read { disk: i, source })?;
                // Disk indexes are bounded by the wire's MAX_DISKS.
                heads.push((i as u16, off, len as u32));
            }
        }
        Ok((heads, payload))
    }

    /// Sends the closing commit through the ordered sender, numbered like a batch
    /// (its acknowledgement comes before the standby's `InSync`); false: lost.
    pub fn send_end_resync(&self, heads: Vec<WriteHead>, payload: Vec<u8>) -> bool {
        let _order = self.send_order.lock_or_recover();
        let (seq, send) = {
            let mut s = self.state();
            match s.machine.submit(Instant::now()) {
                Submit::Send(seq) => (seq, s.send.clone()),
                Submit::Alone | Submit::Full => return false,
            }
        };
        send.is_some_and(|f| f(&HaToStandby::EndResync { seq, writes: heads }, payload))
    }

    /// The standby committed epoch 0: every disk is protected and in sync; the gate
    /// opens.
    pub fn in_sync(&self) {
        for i in 0..self.disks.len() {
            let mut d = self.disks.lock(i);
            d.captured(0, None);
            d.acked(0);
        }
        self.synced.fetch_add(1, Ordering::SeqCst);
        self.disks.set_standby_failed(None);
        self.open_gate();
    }

    fn open_gate(&self) {
        self.state().gate_closed = false;
        self.cv.notify_all();
    }
}

#[cfg(test)]
mod tests;
