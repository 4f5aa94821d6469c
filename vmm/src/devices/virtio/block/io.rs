//! Moving data between the image file and guest memory: io_uring or plain syscalls.
//!
//! A batch of operations is run to completion before returning: the device submits every
//! request it took from the queue, waits for all of them, then fills the used ring. Guest
//! buffers are reached through host pointers obtained from vm-memory slices; because the
//! kernel (not vm-memory) then writes into guest RAM for reads, the caller marks those
//! slices dirty in the vm-memory bitmap itself (see `mark_dirty`).

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

use io_uring::{opcode, types, IoUring};
use vm_memory::bitmap::Bitmap;
use vm_memory::{GuestAddress, GuestMemoryBackend};

use crate::config::IoEngine;
use crate::vstate::memory::GuestMemoryMmap;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpKind {
    Read,
    Write,
    Flush,
}

/// One file operation over a list of guest buffers.
pub struct IoOp {
    pub kind: OpKind,
    pub offset: u64,
    pub iovecs: Vec<libc::iovec>,
    /// Bytes the operation must move.
    pub len: u64,
    /// Filled in by [`Engine::run`]: Ok on full success. An operation that is already
    /// Err when the batch runs (failed by fault injection or a hook) is not submitted.
    pub result: io::Result<()>,
    /// Filled in by [`Engine::run`]: rank of this operation's completion in its batch
    /// (the disk journal records writes in this order).
    pub completed: u32,
}

impl IoOp {
    /// Builds an operation over guest buffers, which must lie in guest memory (they
    /// were range-checked when the chain was popped). Returns `None` if they don't.
    pub fn new(
        mem: &GuestMemoryMmap,
        kind: OpKind,
        offset: u64,
        bufs: &[(GuestAddress, u32)],
    ) -> Option<IoOp> {
        let mut iovecs = Vec::new();
        let mut len = 0u64;
        for &(addr, n) in bufs {
            for s in mem.get_slices(addr, n as usize) {
                let s = s.ok()?;
                iovecs.push(libc::iovec {
                    iov_base: s.ptr_guard_mut().as_ptr().cast(),
                    iov_len: s.len(),
                });
            }
            len += u64::from(n);
        }
        Some(IoOp {
            kind,
            offset,
            iovecs,
            len,
            result: Ok(()),
            completed: 0,
        })
    }
}

/// Marks guest buffers dirty in vm-memory's bitmap after the kernel wrote them.
pub fn mark_dirty(mem: &GuestMemoryMmap, bufs: &[(GuestAddress, u32)]) {
    for &(addr, n) in bufs {
        for s in mem.get_slices(addr, n as usize).flatten() {
            s.bitmap().mark_dirty(0, s.len());
        }
    }
}

pub enum Engine {
    Uring(Box<IoUring>),
    Sync,
}

/// Entries in each disk's ring: one per descriptor chain of the largest queue.
const RING_ENTRIES: u32 = 256;

impl Engine {
    pub fn new(kind: IoEngine) -> io::Result<Engine> {
        Ok(match kind {
            IoEngine::IoUring => Engine::Uring(Box::new(IoUring::new(RING_ENTRIES)?)),
            IoEngine::Sync => Engine::Sync,
        })
    }

    /// Runs every operation in `ops` whose result is still Ok against `file` to
    /// completion; returns how many ran (their `completed` ranks are `0..n`).
    pub fn run(&mut self, file: &File, ops: &mut [IoOp]) -> u32 {
        let mut rank = 0u32;
        match self {
            Engine::Sync => {
                for op in ops.iter_mut().filter(|op| op.result.is_ok()) {
                    op.result = run_sync(file, op);
                    op.completed = rank;
                    rank += 1;
                }
            }
            Engine::Uring(ring) => {
                for chunk in ops.chunks_mut(RING_ENTRIES as usize) {
                    let live: Vec<bool> = chunk.iter().map(|op| op.result.is_ok()).collect();
                    match run_uring(ring, file, chunk, rank) {
                        Ok(n) => rank += n,
                        Err(e) => {
                            // The ring itself failed (not one request): fall back to
                            // plain syscalls for this batch so the guest still gets
                            // answers.
                            log::warn!(
                                "virtio-blk: io_uring failed ({e}); using sync I/O for this batch"
                            );
                            for (op, _) in chunk.iter_mut().zip(live).filter(|(_, l)| *l) {
                                op.result = run_sync(file, op);
                                op.completed = rank;
                                rank += 1;
                            }
                        }
                    }
                }
            }
        }
        rank
    }
}

/// Submits the operations of `ops` whose result is Ok and waits for them; returns how
/// many there were. On Err nothing was submitted and `ops` is unchanged.
fn run_uring(ring: &mut IoUring, file: &File, ops: &mut [IoOp], base: u32) -> io::Result<u32> {
    let fd = types::Fd(file.as_raw_fd());
    let mut count = 0usize;
    {
        let mut sq = ring.submission();
        for (i, op) in ops.iter().enumerate() {
            if op.result.is_err() {
                continue;
            }
            count += 1;
            let entry = match op.kind {
                OpKind::Read => opcode::Readv::new(fd, op.iovecs.as_ptr(), op.iovecs.len() as u32)
                    .offset(op.offset)
                    .build(),
                OpKind::Write => {
                    opcode::Writev::new(fd, op.iovecs.as_ptr(), op.iovecs.len() as u32)
                        .offset(op.offset)
                        .build()
                }
                OpKind::Flush => opcode::Fsync::new(fd)
                    .flags(types::FsyncFlags::DATASYNC)
                    .build(),
            };
            // SAFETY: the iovec arrays and the guest memory they point into outlive the
            // operations: `ops` is borrowed for this whole function, guest memory for
            // the caller's, and we wait below for every completion before returning.
            // The chunk is at most RING_ENTRIES long, so the queue cannot be full.
            unsafe { sq.push(&entry.user_data(i as u64)) }
                .map_err(|_| io::Error::other("io_uring submission queue full"))?;
        }
    }
    let mut done: Vec<bool> = ops.iter().map(|op| op.result.is_err()).collect();
    let mut left = count;
    while left > 0 {
        match ring.submit_and_wait(1) {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
            Err(e) => {
                if left == count {
                    return Err(e);
                }
                // Some completed: we cannot resubmit the rest safely while the kernel
                // may still own their buffers, so wait them out.
                continue;
            }
        }
        for cqe in ring.completion() {
            let i = cqe.user_data() as usize;
            if i >= ops.len() || done[i] {
                continue;
            }
            done[i] = true;
            left -= 1;
            let res = cqe.result();
            let op = &mut ops[i];
            op.completed = base + (count - left - 1) as u32;
            op.result = if res < 0 {
                Err(io::Error::from_raw_os_error(-res))
            } else if op.kind != OpKind::Flush && (res as u64) < op.len {
                // A short transfer on a regular file happens only at its end, which
                // validation excludes; finish it with plain syscalls to be sure.
                run_sync(file, op)
            } else {
                Ok(())
            };
        }
    }
    Ok(count as u32)
}

fn run_sync(file: &File, op: &IoOp) -> io::Result<()> {
    let fd = file.as_raw_fd();
    if op.kind == OpKind::Flush {
        // SAFETY: fdatasync on a file descriptor we own; no memory is involved.
        let r = unsafe { libc::fdatasync(fd) };
        return if r < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        };
    }
    let mut offset = op.offset;
    for iov in &op.iovecs {
        let mut done = 0usize;
        while done < iov.iov_len {
            // SAFETY: `iov` points into guest memory that vm-memory validated and keeps
            // mapped for the caller's lifetime; the range [done, iov_len) is inside it.
            let ptr = unsafe { iov.iov_base.cast::<u8>().add(done) };
            let n = iov.iov_len - done;
            let r = match op.kind {
                // SAFETY: see above; pread writes at most `n` bytes at `ptr`.
                OpKind::Read => unsafe { libc::pread(fd, ptr.cast(), n, offset as i64) },
                // SAFETY: see above; pwrite reads at most `n` bytes at `ptr`.
                _ => unsafe { libc::pwrite(fd, ptr.cast(), n, offset as i64) },
            };
            if r < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if r == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "image ended early",
                ));
            }
            done += r as usize;
            offset += r as u64;
        }
    }
    Ok(())
}
