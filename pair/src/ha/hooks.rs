//! The VMM's disk hooks of an HA primary: `storage_mirror::sync::SyncDisks` answers
//! them (vmm knows nothing of replication, storage-mirror nothing of the VMM).

use std::io;
use std::sync::Arc;

use storage_mirror::sync::SyncDisks;
use vmm::devices::virtio::block::{DiskHooks, DoneOp};

#[derive(Debug)]
pub struct SyncHooks(pub Arc<SyncDisks>);

impl DiskHooks for SyncHooks {
    // Both may wait long (a resync's closing gate; the standby's acknowledgement, or
    // the quorum's leave for a write to complete alone): the vCPU waits as a host wait,
    // so the quorum's pause of the guest does not wait for the write (the vCPU parks
    // before its next guest instruction, the guest seeing its request still pending).
    fn before_writes(&self, disk: usize, ranges: &[(u64, u64)]) -> io::Result<()> {
        vmm::vstate::control::host_wait(|| self.0.before_writes(disk, ranges))
    }
    fn read_failed(
        &self,
        _disk: usize,
        _offset: u64,
        _buf: &mut [u8],
        err: &io::Error,
    ) -> io::Result<()> {
        // Serving a failed local disk from the standby is FT's (peer reads); HA fails
        // the I/O and the operator replaces the disk.
        Err(io::Error::new(err.kind(), err.to_string()))
    }
    fn write_failed(
        &self,
        _disk: usize,
        _offset: u64,
        _data: &[u8],
        err: &io::Error,
    ) -> io::Result<()> {
        Err(io::Error::new(err.kind(), err.to_string()))
    }
    fn flush_failed(&self, _disk: usize, err: &io::Error) -> io::Result<()> {
        Err(io::Error::new(err.kind(), err.to_string()))
    }
    fn wants_completed(&self) -> bool {
        true
    }
    fn completed(&self, disk: usize, ops: &[DoneOp<'_>]) -> io::Result<()> {
        let writes: Vec<(u64, &[u8])> = ops
            .iter()
            .filter_map(|o| match o {
                DoneOp::Write { offset, data } => Some((*offset, *data)),
                DoneOp::Flush => None,
            })
            .collect();
        vmm::vstate::control::host_wait(|| self.0.completed(disk, &writes))
    }
}

/// The disk hooks an HA primary's VM runs with: [`SyncHooks`] (synchronous mirroring),
/// switched to FT's [`MirroredDisks`] while a live migration's checkpoint session
/// runs (its pre-copy and handover: `super::migrate`) and back when it ends without
/// the handover. The device takes its hooks once per batch, so a batch is answered
/// whole by the mode it began in; [`HaHooks::quiesce`] closes a gate in front of
/// both (a new batch waits there, as a host wait) and reports when no batch is
/// between `before_writes` and `completed`: only then does the mode change.
#[derive(Debug)]
pub struct HaHooks {
    sync: Arc<SyncDisks>,
    ft: checkpoint::primary::MirroredDisks,
    st: std::sync::Mutex<Switch>,
    cv: std::sync::Condvar,
}

#[derive(Debug)]
struct Switch {
    /// FT's hooks answer new batches.
    ft: bool,
    /// New batches wait (a mode change is coming).
    closed: bool,
    /// Per disk: the mode of the batch between `before_writes` and `completed`.
    open: Vec<Option<bool>>,
}

impl HaHooks {
    pub fn new(sync: Arc<SyncDisks>) -> Arc<HaHooks> {
        let n = sync.disks.len();
        Arc::new(HaHooks {
            ft: checkpoint::primary::MirroredDisks(sync.disks.clone()),
            sync,
            st: std::sync::Mutex::new(Switch {
                ft: false,
                closed: false,
                open: vec![None; n],
            }),
            cv: std::sync::Condvar::new(),
        })
    }

    fn st(&self) -> std::sync::MutexGuard<'_, Switch> {
        self.st.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Closes the gate: batches not yet begun wait. True once no batch is open (call
    /// again until it is; acknowledgements must go on being taken meanwhile).
    pub fn quiesce(&self) -> bool {
        let mut s = self.st();
        s.closed = true;
        s.open.iter().all(Option::is_none)
    }

    /// Sets the mode (FT's hooks or HA's) and opens the gate. Only after
    /// [`HaHooks::quiesce`] returned true.
    pub fn switch(&self, ft: bool) {
        let mut s = self.st();
        debug_assert!(
            s.open.iter().all(Option::is_none),
            "switch with a batch open"
        );
        s.ft = ft;
        s.closed = false;
        drop(s);
        self.cv.notify_all();
    }

    /// Opens the gate without a change.
    pub fn reopen(&self) {
        self.st().closed = false;
        self.cv.notify_all();
    }

    pub fn is_ft(&self) -> bool {
        self.st().ft
    }

    fn close(&self, disk: usize) {
        let mut s = self.st();
        if let Some(o) = s.open.get_mut(disk) {
            if o.take().is_some() {
                drop(s);
                self.cv.notify_all();
            }
        }
    }

    /// The mode of `disk`'s open batch, else the current one.
    fn mode_of(&self, disk: usize) -> bool {
        let s = self.st();
        s.open.get(disk).copied().flatten().unwrap_or(s.ft)
    }
}

impl DiskHooks for HaHooks {
    fn before_writes(&self, disk: usize, ranges: &[(u64, u64)]) -> io::Result<()> {
        let ft = loop {
            let mut s = self.st();
            if !s.closed {
                let ft = s.ft;
                if let Some(o) = s.open.get_mut(disk) {
                    *o = Some(ft);
                }
                break ft;
            }
            drop(s);
            // A mode change is coming: wait as a host wait (the vCPU counts as paused;
            // no checkpoint capture runs while the gate is closed).
            vmm::vstate::control::host_wait(|| {
                let mut s = self.st();
                while s.closed {
                    s = self.cv.wait(s).unwrap_or_else(|p| p.into_inner());
                }
            });
        };
        // FT's hooks never wait, and must not be a host wait: a checkpoint's capture
        // reads the vCPU's state, which a vCPU in a host wait does not give.
        let r = if ft {
            self.ft.before_writes(disk, ranges)
        } else {
            vmm::vstate::control::host_wait(|| self.sync.before_writes(disk, ranges))
        };
        if r.is_err() {
            self.close(disk);
        }
        r
    }
    fn read_failed(
        &self,
        disk: usize,
        offset: u64,
        buf: &mut [u8],
        err: &io::Error,
    ) -> io::Result<()> {
        if self.mode_of(disk) {
            self.ft.read_failed(disk, offset, buf, err)
        } else {
            Err(io::Error::new(err.kind(), err.to_string()))
        }
    }
    fn write_failed(
        &self,
        disk: usize,
        offset: u64,
        data: &[u8],
        err: &io::Error,
    ) -> io::Result<()> {
        if self.mode_of(disk) {
            self.ft.write_failed(disk, offset, data, err)
        } else {
            Err(io::Error::new(err.kind(), err.to_string()))
        }
    }
    fn flush_failed(&self, disk: usize, err: &io::Error) -> io::Result<()> {
        if self.mode_of(disk) {
            self.ft.flush_failed(disk, err)
        } else {
            Err(io::Error::new(err.kind(), err.to_string()))
        }
    }
    fn wants_completed(&self) -> bool {
        // Always: the batch is closed here (FT's hooks need nothing more).
        true
    }
    fn completed(&self, disk: usize, ops: &[DoneOp<'_>]) -> io::Result<()> {
        let r = if self.mode_of(disk) {
            Ok(())
        } else {
            SyncHooks(self.sync.clone()).completed(disk, ops)
        };
        self.close(disk);
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Duration;
    use storage_mirror::primary::PrimaryDisks;

    /// The switch an online level change away from HA makes (and a live migration):
    /// a batch begun in HA's mode is answered by it, a batch that arrives while the
    /// gate is closed waits and is answered by the new mode, and the disk's bitmap
    /// holds the writes of both modes (the next standby's delta).
    #[test]
    fn the_mode_changes_only_between_batches_and_the_bitmap_carries_over() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("disk.img");
        std::fs::File::create(&img)
            .unwrap()
            .set_len(1 << 20)
            .unwrap();
        let disks = PrimaryDisks::open(std::slice::from_ref(&img)).unwrap();
        let hooks = HaHooks::new(SyncDisks::new(disks.clone()));
        let bs = u64::from(disks.status()[0].block_size);
        let (a, b) = (bs, 3 * bs);

        // A batch in HA's mode (no standby: it completes alone, its block marked).
        hooks.before_writes(0, &[(a, 512)]).unwrap();
        assert!(!hooks.quiesce(), "a batch is open: the mode may not change");
        let entered = AtomicBool::new(false);
        std::thread::scope(|s| {
            let h = &hooks;
            let e = &entered;
            let late = s.spawn(move || {
                // Arrives while the gate is closed: waits for the switch.
                h.before_writes(0, &[(b, 512)]).unwrap();
                e.store(true, Ordering::SeqCst);
                let mode = h.is_ft();
                h.completed(
                    0,
                    &[DoneOp::Write {
                        offset: b,
                        data: &[2u8; 512],
                    }],
                )
                .unwrap();
                mode
            });
            std::thread::sleep(Duration::from_millis(50));
            assert!(
                !entered.load(Ordering::SeqCst),
                "a new batch waits at the closed gate"
            );
            hooks
                .completed(
                    0,
                    &[DoneOp::Write {
                        offset: a,
                        data: &[1u8; 512],
                    }],
                )
                .unwrap();
            assert!(
                hooks.quiesce(),
                "no batch open once the first one completed"
            );
            hooks.switch(true);
            assert!(
                late.join().unwrap(),
                "the waiting batch is answered by FT's hooks"
            );
        });
        assert!(hooks.is_ft());
        assert_eq!(
            disks.status()[0].dirty_blocks,
            2,
            "both writes marked for the next standby's resync"
        );
    }
}
