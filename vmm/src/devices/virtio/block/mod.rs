//! virtio-blk on a raw image file.
//!
//! One request queue. A notify is handled on the vCPU thread that wrote it: every
//! available chain is parsed, the valid ones are submitted to the I/O engine as one
//! batch, and once all have completed their status bytes and used entries are written.
//!
//! Between parsing and submission, injected faults ([`faults`]) fail operations without
//! submitting them and the owner's [`hooks`] see the batch's writes; after the batch,
//! operations the local image failed are offered to the hooks, which may serve them
//! from elsewhere (another copy of the disk) so the guest sees success.

pub mod faults;
pub mod hooks;
pub mod io;
pub mod journal;
mod persist;
pub mod request;
pub mod written;

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::Arc;

use log::warn;
use virtio_queue::Queue;
use vm_memory::Bytes;

pub use self::faults::{DiskFaults, FaultOps};
pub use self::hooks::{DiskControls, DiskHooks, DoneOp};
use self::io::{Engine, IoOp, OpKind};
pub use self::journal::{apply_journal, DiskJournal, JournalExtent};
use self::request::*;
use self::written::WrittenBlocks;
use super::*;
use crate::config::{DiskConfig, IoEngine};
use crate::vstate::memory::GuestMemoryMmap;

pub const VIRTIO_BLK_F_RO: u64 = 1 << 5;
pub const VIRTIO_BLK_F_FLUSH: u64 = 1 << 9;

const QUEUE_SIZES: [u16; 1] = [QUEUE_MAX_SIZE];

#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    #[error("disk image {path}: cannot open: {source}")]
    Open {
        path: String,
        source: std::io::Error,
    },
    #[error("disk image {path} is in use by another process (flock: {source})")]
    Locked {
        path: String,
        source: std::io::Error,
    },
    #[error("disk image {path} is {size} bytes, not a multiple of 512")]
    BadSize { path: String, size: u64 },
    #[error("disk image {path}: cannot set up {engine:?} I/O: {source}")]
    Engine {
        path: String,
        engine: IoEngine,
        source: std::io::Error,
    },
}

pub struct Block {
    file: File,
    engine: Engine,
    disk: DiskGeometry,
    id: [u8; ID_BYTES],
    /// The image as opened (path, mode, engine, serial), for state capture.
    attachment: DiskConfig,
    /// Blocks written since the last [`VirtioDevice::take_written_blocks`].
    written: WrittenBlocks,
    /// Data of completed writes since the last take, while journalling is on.
    journal: Option<DiskJournal>,
    /// Fault injection and the owner's hooks, shared with the device manager.
    controls: DiskControls,
    /// Whether the hooks are serving failed operations now (logged on each change).
    degraded: bool,
}

impl Block {
    /// Opens the image of `cfg`: read-write (or read-only), locked against other
    /// writers with flock (exclusive for read-write, shared for read-only).
    pub fn open(cfg: &DiskConfig) -> Result<Block, BlockError> {
        let path = cfg.path.display().to_string();
        let file = OpenOptions::new()
            .read(true)
            .write(!cfg.read_only)
            .custom_flags(libc::O_CLOEXEC)
            .open(&cfg.path)
            .map_err(|source| BlockError::Open {
                path: path.clone(),
                source,
            })?;
        let op = if cfg.read_only {
            libc::LOCK_SH
        } else {
            libc::LOCK_EX
        };
        // SAFETY: flock on a descriptor we own; no memory is passed.
        if unsafe { libc::flock(file.as_raw_fd(), op | libc::LOCK_NB) } < 0 {
            return Err(BlockError::Locked {
                path,
                source: std::io::Error::last_os_error(),
            });
        }
        let serial = match &cfg.serial {
            Some(s) => s.clone(),
            None => file_name(&cfg.path),
        };
        Self::with_file(file, &path, cfg.read_only, cfg.io_engine, &serial)
    }

    /// A device on an already open (and locked, if wanted) image file.
    pub fn with_file(
        file: File,
        path: &str,
        read_only: bool,
        engine: IoEngine,
        serial: &str,
    ) -> Result<Block, BlockError> {
        let size = image_size(&file).map_err(|source| BlockError::Open {
            path: path.into(),
            source,
        })?;
        if !size.is_multiple_of(SECTOR_SIZE) {
            return Err(BlockError::BadSize {
                path: path.into(),
                size,
            });
        }
        let engine_kind = engine;
        let engine = Engine::new(engine).map_err(|source| BlockError::Engine {
            path: path.into(),
            engine,
            source,
        })?;
        let mut id = [0u8; ID_BYTES];
        let n = serial.len().min(ID_BYTES);
        id[..n].copy_from_slice(&serial.as_bytes()[..n]);
        Ok(Block {
            file,
            engine,
            disk: DiskGeometry {
                capacity_bytes: size,
                read_only,
            },
            id,
            written: WrittenBlocks::new(size),
            journal: None,
            controls: DiskControls::default(),
            degraded: false,
            attachment: DiskConfig {
                path: path.into(),
                read_only,
                io_engine: engine_kind,
                serial: Some(serial.to_owned()),
            },
        })
    }

    pub fn capacity_sectors(&self) -> u64 {
        self.disk.capacity_bytes / SECTOR_SIZE
    }

    /// Handles on this disk's fault injection and hooks.
    pub fn controls(&self) -> DiskControls {
        self.controls.clone()
    }
}

/// Bytes of a disk image: a regular file or a block device (whose metadata length is
/// 0: its size is where a seek to the end lands).
pub fn image_size(file: &File) -> std::io::Result<u64> {
    use std::io::{Seek, SeekFrom};
    let md = file.metadata()?;
    if md.is_file() {
        return Ok(md.len());
    }
    let mut f = file;
    let size = f.seek(SeekFrom::End(0))?;
    f.seek(SeekFrom::Start(0))?;
    Ok(size)
}

fn file_name(p: &Path) -> String {
    p.file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// A parsed request waiting for its I/O, or one already answered.
struct Pending {
    head: u16,
    status: vm_memory::GuestAddress,
    /// Index into the batch of I/O operations, if it has one.
    op: Option<usize>,
    /// Status to report when there is no I/O (GET_ID, rejected requests).
    code: u8,
    /// Bytes written into guest buffers (excluding the status byte).
    written: u32,
    /// Guest buffers the kernel writes (reads), to mark dirty afterwards.
    dirty: Vec<(vm_memory::GuestAddress, u32)>,
    /// Byte offset and guest buffers of a write, kept for the journal and the hooks.
    journal: Option<(u64, Vec<(vm_memory::GuestAddress, u32)>)>,
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        twinrun_guest_abi::VIRTIO_ID_BLOCK
    }

    fn avail_features(&self) -> u64 {
        let ro = if self.disk.read_only {
            VIRTIO_BLK_F_RO
        } else {
            0
        };
        VIRTIO_F_VERSION_1 | VIRTIO_BLK_F_FLUSH | ro
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn save_state(&self) -> super::persist::DeviceState {
        self.persist()
    }

    fn take_written_blocks(&mut self) -> Option<WrittenBlocks> {
        Some(self.written.take())
    }

    fn read_back_written(&mut self, also: &[(u64, u64)]) -> Option<std::io::Result<DiskJournal>> {
        let mut w = self.written.take();
        for &(offset, len) in also {
            w.mark(offset, len);
        }
        Some(journal::read_back(&self.file, self.disk.capacity_bytes, &w))
    }

    fn set_disk_journal(&mut self, on: bool) -> bool {
        match (on, self.journal.is_some()) {
            (true, false) => self.journal = Some(DiskJournal::default()),
            (false, _) => self.journal = None,
            _ => {}
        }
        true
    }

    fn take_disk_journal(&mut self) -> Option<DiskJournal> {
        self.journal.as_mut().map(std::mem::take)
    }

    fn disk_controls(&self) -> Option<DiskControls> {
        Some(self.controls())
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // struct virtio_blk_config: only `capacity` (le64 at 0) is meaningful with the
        // features offered; the rest reads as zero.
        let cfg = self.capacity_sectors().to_le_bytes();
        read_config_bytes(&cfg, offset, data);
    }

    fn process_queue(
        &mut self,
        mem: &GuestMemoryMmap,
        queues: &mut [Queue],
        index: usize,
    ) -> Result<bool, VirtioError> {
        let queue = &mut queues[index];
        let mut pending = Vec::new();
        let mut ops = Vec::new();
        let mut failed = None;
        loop {
            let chain = match pop_chain(queue, mem, index) {
                Ok(Some(c)) => c,
                Ok(None) => break,
                Err(e) => {
                    // Answer what was already taken, then report the broken driver.
                    failed = Some(e);
                    break;
                }
            };
            match parse(mem, &chain, self.disk) {
                Err(RequestError::NoStatus { head }) => {
                    failed = Some(VirtioError::Malformed {
                        head,
                        why: "no device-writable status byte",
                    });
                    break;
                }
                Err(RequestError::Rejected {
                    head, status, code, ..
                }) => pending.push(Pending {
                    head,
                    status,
                    op: None,
                    code,
                    written: 0,
                    dirty: Vec::new(),
                    journal: None,
                }),
                Ok(req) => pending.push(self.prepare(mem, req, &mut ops)),
            }
        }
        let hooks = self.controls.hooks.get();
        let vetoed = self.before_submit(&pending, &mut ops, hooks.as_ref());
        let ran = self.engine.run(&self.file, &mut ops);
        if let Some(hooks) = &hooks {
            self.serve_failed(mem, &pending, &mut ops, &vetoed, hooks, ran);
        }
        self.journal_writes(mem, &pending, &ops);
        if let Some((disk, hooks)) = hooks.as_ref().filter(|(_, h)| h.wants_completed()) {
            complete_through_hooks(mem, &pending, &mut ops, *disk, hooks.as_ref());
        }
        let any = !pending.is_empty();
        for p in pending {
            mark_dirty_if(mem, &p.dirty);
            let (code, written) = match p.op {
                Some(i) => match &ops[i].result {
                    Ok(()) => (VIRTIO_BLK_S_OK, p.written),
                    Err(e) => {
                        warn!("virtio-blk: request {} failed: {e}", p.head);
                        (VIRTIO_BLK_S_IOERR, 0)
                    }
                },
                None => (p.code, p.written),
            };
            if mem.write_obj(code, p.status).is_err() {
                failed.get_or_insert(VirtioError::BufferOutsideMemory {
                    head: p.head,
                    addr: p.status.0,
                    len: 1,
                });
                continue;
            }
            add_used(queue, mem, index, p.head, written + 1)?;
        }
        match failed {
            Some(e) => Err(e),
            None => Ok(any),
        }
    }
}

fn mark_dirty_if(mem: &GuestMemoryMmap, bufs: &[(vm_memory::GuestAddress, u32)]) {
    if !bufs.is_empty() {
        io::mark_dirty(mem, bufs);
    }
}

impl Block {
    fn prepare(&mut self, mem: &GuestMemoryMmap, req: Request, ops: &mut Vec<IoOp>) -> Pending {
        let mut p = Pending {
            head: req.head,
            status: req.status,
            op: None,
            code: VIRTIO_BLK_S_OK,
            written: 0,
            dirty: Vec::new(),
            journal: None,
        };
        let kind = match req.kind {
            RequestType::GetId => {
                // Through vm-memory, so the bitmap sees it.
                let mut left = &self.id[..];
                for &(addr, len) in &req.data {
                    let n = (len as usize).min(left.len());
                    if mem.write_slice(&left[..n], addr).is_err() {
                        p.code = VIRTIO_BLK_S_IOERR;
                        return p;
                    }
                    p.written += n as u32;
                    left = &left[n..];
                }
                return p;
            }
            RequestType::In => OpKind::Read,
            RequestType::Out => {
                // Before submission: see `written` for why this order keeps it exact.
                self.written.mark(req.offset, req.data_len);
                OpKind::Write
            }
            RequestType::Flush => OpKind::Flush,
        };
        match IoOp::new(mem, kind, req.offset, &req.data) {
            Some(op) => {
                p.op = Some(ops.len());
                ops.push(op);
                if kind == OpKind::Read {
                    // At most MAX_DATA_BYTES, so it fits.
                    p.written = req.data_len as u32;
                    p.dirty = req.data;
                } else if kind == OpKind::Write {
                    p.journal = Some((req.offset, req.data));
                }
            }
            None => p.code = VIRTIO_BLK_S_IOERR,
        }
        p
    }

    /// Applies injected faults and delay to the batch and shows its writes to the
    /// hooks; operations that must not run get an Err result (the engine skips them).
    /// Returns the writes the hooks refused (failed for the guest, not to be served).
    fn before_submit(
        &self,
        pending: &[Pending],
        ops: &mut [IoOp],
        hooks: Option<&(usize, Arc<dyn DiskHooks>)>,
    ) -> Vec<usize> {
        let faults = &self.controls.faults;
        if faults.is_active() && !ops.is_empty() {
            if let Some(d) = faults.delay() {
                // A slow disk: the vCPU that submitted waits, as it would for the I/O.
                std::thread::sleep(d);
            }
            for op in ops.iter_mut() {
                if let Some(e) = faults.check(op.kind, op.offset, op.len) {
                    op.result = Err(e);
                }
            }
        }
        let Some((disk, hooks)) = hooks else {
            return Vec::new();
        };
        let writes: Vec<usize> = pending
            .iter()
            .filter_map(|p| p.op)
            .filter(|&i| ops[i].kind == OpKind::Write && ops[i].result.is_ok())
            .collect();
        if writes.is_empty() {
            return writes;
        }
        let ranges: Vec<(u64, u64)> = writes
            .iter()
            .map(|&i| (ops[i].offset, ops[i].len))
            .collect();
        if let Err(e) = hooks.before_writes(*disk, &ranges) {
            warn!(
                "virtio-blk: disk {disk}: before_writes hook failed: {e}; failing {} writes",
                writes.len()
            );
            for &i in &writes {
                ops[i].result = Err(std::io::Error::new(e.kind(), e.to_string()));
            }
            return writes;
        }
        Vec::new()
    }

    /// Offers each operation the local image (or an injected fault) failed to the
    /// hooks; the ones they serve become successes, completing after the `ran`
    /// operations the engine ran (the journal records writes in that order).
    fn serve_failed(
        &mut self,
        mem: &GuestMemoryMmap,
        pending: &[Pending],
        ops: &mut [IoOp],
        vetoed: &[usize],
        (disk, hooks): &(usize, Arc<dyn DiskHooks>),
        ran: u32,
    ) {
        let (disk, hooks) = (*disk, hooks.as_ref());
        let mut rank = ran;
        let mut failures = 0usize;
        let mut served = 0usize;
        for p in pending {
            let Some(i) = p.op.filter(|i| !vetoed.contains(i)) else {
                continue;
            };
            let op = &mut ops[i];
            let Err(err) = &op.result else { continue };
            failures += 1;
            let r = match op.kind {
                OpKind::Read => serve_read(
                    mem,
                    hooks,
                    disk,
                    (op.offset, op.len),
                    &p.dirty,
                    err,
                    self.journal.as_ref(),
                ),
                OpKind::Write => match &p.journal {
                    Some((offset, bufs)) => {
                        serve_write(mem, hooks, disk, *offset, op.len, bufs, err)
                    }
                    None => Err(std::io::Error::other("write without its buffers")),
                },
                OpKind::Flush => hooks.flush_failed(disk, err),
            };
            match r {
                Ok(()) => {
                    if !self.degraded {
                        warn!("virtio-blk: disk {disk}: local image failed ({err}); serving I/O through the disk hooks");
                        self.degraded = true;
                    }
                    op.result = Ok(());
                    op.completed = rank;
                    rank += 1;
                    served += 1;
                }
                Err(e) => warn!("virtio-blk: disk {disk}: {:?} at {} failed ({err}) and the hook could not serve it: {e}", op.kind, op.offset),
            }
        }
        if self.degraded && failures == 0 && ran > 0 {
            warn!("virtio-blk: disk {disk}: local image serves I/O again");
            self.degraded = false;
        }
        debug_assert!(served <= failures);
    }

    /// Copies the data of the batch's successful writes into the journal, in the
    /// order they completed.
    fn journal_writes(&mut self, mem: &GuestMemoryMmap, pending: &[Pending], ops: &[IoOp]) {
        let Some(journal) = &mut self.journal else {
            return;
        };
        let mut done: Vec<(u32, usize)> = pending
            .iter()
            .enumerate()
            .filter_map(|(k, p)| {
                let op = &ops[p.op?];
                (p.journal.is_some() && op.result.is_ok()).then_some((op.completed, k))
            })
            .collect();
        done.sort_unstable();
        for (_, k) in done {
            if let Some((offset, bufs)) = &pending[k].journal {
                if !journal.record(mem, *offset, bufs) {
                    warn!(
                        "virtio-blk: write {} could not be journalled",
                        pending[k].head
                    );
                }
            }
        }
    }
}

/// Has the hooks fill a failed read's `len` bytes at `offset`, then copies them into the
/// guest buffers `bufs` through vm-memory (so the dirty bitmap sees them). The writes
/// in `journal` (this device's writes since the journal was last taken, which only it
/// knows yet) are laid over what the hooks returned, in order.
fn serve_read(
    mem: &GuestMemoryMmap,
    hooks: &dyn DiskHooks,
    disk: usize,
    (offset, len): (u64, u64),
    bufs: &[(vm_memory::GuestAddress, u32)],
    err: &std::io::Error,
    journal: Option<&DiskJournal>,
) -> std::io::Result<()> {
    let len = usize::try_from(len).map_err(std::io::Error::other)?;
    let mut buf = vec![0u8; len];
    hooks.read_failed(disk, offset, &mut buf, err)?;
    if let Some(j) = journal {
        overlay_writes(&mut buf, offset, j.writes());
    }
    let mut at = 0usize;
    for &(addr, n) in bufs {
        let n = n as usize;
        let chunk = buf
            .get(at..at + n)
            .ok_or_else(|| std::io::Error::other("read buffers longer than the request"))?;
        mem.write_slice(chunk, addr)
            .map_err(std::io::Error::other)?;
        at += n;
    }
    Ok(())
}

/// Lays `writes` (`(byte offset, data)`, in order) over `buf`, which holds the image
/// bytes from `offset`: the parts that overlap.
pub fn overlay_writes<'a>(
    buf: &mut [u8],
    offset: u64,
    writes: impl Iterator<Item = (u64, &'a [u8])>,
) {
    let end = offset + buf.len() as u64;
    for (at, data) in writes {
        let w_end = at + data.len() as u64;
        let (lo, hi) = (at.max(offset), w_end.min(end));
        if lo >= hi {
            continue;
        }
        let dst = (lo - offset) as usize..(hi - offset) as usize;
        let src = (lo - at) as usize..(hi - at) as usize;
        buf[dst].copy_from_slice(&data[src]);
    }
}

/// Shows the batch's successful writes (data copied out of guest memory) and flushes
/// to the hooks, in completion order; if they fail, every one of them fails for the
/// guest (a synchronous mirror could not get them to its peer).
fn complete_through_hooks(
    mem: &GuestMemoryMmap,
    pending: &[Pending],
    ops: &mut [IoOp],
    disk: usize,
    hooks: &dyn DiskHooks,
) {
    let mut done: Vec<(u32, usize)> = pending
        .iter()
        .filter_map(|p| p.op)
        .filter(|&i| matches!(ops[i].kind, OpKind::Write | OpKind::Flush))
        .map(|i| (ops[i].completed, i))
        .collect();
    if done.is_empty() {
        return;
    }
    done.sort_unstable();
    let mut datas: Vec<(usize, Vec<u8>)> = Vec::new();
    for p in pending {
        let (Some(i), Some((_, bufs))) = (p.op, &p.journal) else {
            continue;
        };
        if ops[i].result.is_err() {
            continue;
        }
        match read_guest(mem, ops[i].len, bufs) {
            Ok(d) => datas.push((i, d)),
            Err(e) => ops[i].result = Err(e),
        }
    }
    let list: Vec<DoneOp<'_>> = done
        .iter()
        .filter(|&&(_, i)| ops[i].result.is_ok())
        .filter_map(|&(_, i)| match ops[i].kind {
            OpKind::Flush => Some(DoneOp::Flush),
            _ => datas
                .iter()
                .find(|(j, _)| *j == i)
                .map(|(_, d)| DoneOp::Write {
                    offset: ops[i].offset,
                    data: d,
                }),
        })
        .collect();
    if let Err(e) = hooks.completed(disk, &list) {
        warn!("virtio-blk: disk {disk}: completion hook failed: {e}; failing the batch's writes and flushes");
        for &(_, i) in &done {
            if ops[i].result.is_ok() {
                ops[i].result = Err(std::io::Error::new(e.kind(), e.to_string()));
            }
        }
    }
}

/// A write's data, copied out of guest memory.
fn read_guest(
    mem: &GuestMemoryMmap,
    len: u64,
    bufs: &[(vm_memory::GuestAddress, u32)],
) -> std::io::Result<Vec<u8>> {
    let len = usize::try_from(len).map_err(std::io::Error::other)?;
    let mut data = vec![0u8; len];
    let mut at = 0usize;
    for &(addr, n) in bufs {
        let n = n as usize;
        let chunk = data
            .get_mut(at..at + n)
            .ok_or_else(|| std::io::Error::other("write buffers longer than the request"))?;
        mem.read_slice(chunk, addr).map_err(std::io::Error::other)?;
        at += n;
    }
    Ok(data)
}

/// Copies a failed write's data out of guest memory and has the hooks store it.
fn serve_write(
    mem: &GuestMemoryMmap,
    hooks: &dyn DiskHooks,
    disk: usize,
    offset: u64,
    len: u64,
    bufs: &[(vm_memory::GuestAddress, u32)],
    err: &std::io::Error,
) -> std::io::Result<()> {
    let data = read_guest(mem, len, bufs)?;
    hooks.write_failed(disk, offset, &data, err)
}

/// Copies the part of `cfg` at `offset` into `data`; the rest of `data` is zero.
pub(crate) fn read_config_bytes(cfg: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    for (i, b) in data.iter_mut().enumerate() {
        if let Some(v) = usize::try_from(offset)
            .ok()
            .and_then(|o| o.checked_add(i))
            .and_then(|o| cfg.get(o))
        {
            *b = *v;
        }
    }
}

#[cfg(test)]
mod tests;
