//! Hooks the owner of a VM installs on its disks: told before writes reach the local
//! image, and given the chance to serve an operation the local image failed (from
//! another copy of the disk). Without hooks a failed operation is an I/O error for
//! the guest.
//!
//! Hooks run on the vCPU thread that notified the queue, with the device locked: they
//! must not call back into the VM's devices.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use twinrun_lock::MutexExt;

use super::faults::DiskFaults;

pub trait DiskHooks: Send + Sync {
    /// Called before a batch's writes are submitted to the local image, with (byte
    /// offset, len) of each. An error fails those writes (IOERR to the guest) and they
    /// are not submitted. (Used for a persistent write-intent bitmap that must be
    /// durable before the data write.)
    fn before_writes(&self, disk: usize, ranges: &[(u64, u64)]) -> io::Result<()>;
    /// A read failed on the local image (real error or injected): fill `buf` from
    /// elsewhere. Ok => the guest sees success.
    fn read_failed(
        &self,
        disk: usize,
        offset: u64,
        buf: &mut [u8],
        err: &io::Error,
    ) -> io::Result<()>;
    /// A write failed on the local image: Ok => counted as done (it is journalled like
    /// any successful write).
    fn write_failed(
        &self,
        disk: usize,
        offset: u64,
        data: &[u8],
        err: &io::Error,
    ) -> io::Result<()>;
    /// A flush failed on the local image: Ok => the guest sees success.
    fn flush_failed(&self, disk: usize, err: &io::Error) -> io::Result<()>;
    /// Whether [`DiskHooks::completed`] wants to see each batch (copying the written
    /// data out of guest memory costs: hooks that do not mirror synchronously say no).
    fn wants_completed(&self) -> bool {
        false
    }
    /// The batch's writes and flushes that succeeded, in completion order, before the
    /// guest is told: a synchronous mirror sends them to its peer and returns once the
    /// peer has them. Called for every batch `before_writes` saw (even if nothing
    /// succeeded) and for every batch with a flush. An error fails them all (IOERR).
    fn completed(&self, _disk: usize, _ops: &[DoneOp<'_>]) -> io::Result<()> {
        Ok(())
    }
}

/// One operation of a batch the local image completed (see [`DiskHooks::completed`]).
#[derive(Debug, PartialEq, Eq)]
pub enum DoneOp<'a> {
    Write { offset: u64, data: &'a [u8] },
    Flush,
}

/// The hooks of one disk with the disk's index, replaceable while the VM runs.
#[derive(Default)]
pub(crate) struct HookSlot {
    /// Mirrors `hooks.is_some()`: without hooks a batch costs one atomic load.
    installed: AtomicBool,
    hooks: Mutex<Option<(usize, Arc<dyn DiskHooks>)>>,
}

impl HookSlot {
    /// The installed hooks, for one batch.
    pub(crate) fn get(&self) -> Option<(usize, Arc<dyn DiskHooks>)> {
        if !self.installed.load(Ordering::Acquire) {
            return None;
        }
        self.hooks.lock_or_recover().clone()
    }

    pub(crate) fn set(&self, hooks: Option<(usize, Arc<dyn DiskHooks>)>) {
        let mut h = self.hooks.lock_or_recover();
        self.installed.store(hooks.is_some(), Ordering::Release);
        *h = hooks;
    }
}

/// Handles on a block device's fault injection and hooks, shared with the device.
#[derive(Clone, Default)]
pub struct DiskControls {
    pub faults: Arc<DiskFaults>,
    pub(crate) hooks: Arc<HookSlot>,
}

impl DiskControls {
    /// Installs (or with `None` removes) the hooks of this disk, which is `disk` in
    /// the VM config's `disks`. Takes effect from the next batch of requests.
    pub fn set_hooks(&self, disk: usize, hooks: Option<Arc<dyn DiskHooks>>) {
        self.hooks.set(hooks.map(|h| (disk, h)));
    }
}
