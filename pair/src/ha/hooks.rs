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
