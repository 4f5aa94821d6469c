//! Epoch pages copied out of the pause (issue 17 item 2): the pause harvests the dirty
//! pages and write-protects them with userfaultfd (one ioctl per run), the guest
//! resumes, and the capture thread copies the pages into staging while a handler
//! thread copies any page the guest (or a device) writes first, as QEMU's background
//! snapshot does. A page is un-protected only once its copy is done, so every staged
//! page holds its bytes as they were at the cut.
//!
//! Each page of the epoch has a state, pending, copying or done; whoever moves it from
//! pending to copying (the copier, a chunk at a time, or the handler, on a fault)
//! copies it, marks it done and un-protects it. The handler, faulting on a page the
//! copier is copying, waits for it to be done before un-protecting it. The table of
//! the epoch's pages is installed (under a lock the handler holds while serving a
//! fault) before the pages are protected, and removed after every page is done: a
//! fault message that arrives after its epoch (the copier woke the writer first) finds
//! either no table or the next epoch's, and is served by the same rule, which is right
//! for either (a page protected at the next cut holds that cut's bytes until served).
//!
//! Liveness does not depend on the handler: the copier claims every page it finds
//! pending, so each page is copied and un-protected by the end of the capture.
//!
//! Measured against the copy in the pause in benches/README.md, "Epoch pages out of
//! the pause".

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use alink::{Buf, BufPool};
use vm_memory::{Bytes as _, GuestAddress};
use vmm::vstate::memory::GuestMemoryMmap;
use vmm::vstate::uffd::{guest_address, host_range, UffdError, WriteProtector};

use super::capture::PartPages;
use crate::messages::{split_runs, PageRun, PAGE_SIZE};

/// Where an epoch's dirty pages are copied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EpochCopy {
    /// While the guest is paused (the default).
    #[default]
    InPause,
    /// After it resumes, the pages write-protected with userfaultfd until copied.
    WriteProtect,
}

impl std::str::FromStr for EpochCopy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "pause" | "in-pause" => Ok(EpochCopy::InPause),
            "wp" | "write-protect" | "uffd" => Ok(EpochCopy::WriteProtect),
            _ => Err(format!("epoch copy mode {s:?}: pause or write-protect")),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum EpochCopyError {
    #[error("userfaultfd: {0}")]
    Uffd(#[from] UffdError),
    #[error("reading guest memory at {gpa:#x}: {source}")]
    Memory {
        gpa: u64,
        source: vm_memory::GuestMemoryError,
    },
    #[error("the fault handler failed to copy a page: {0}")]
    Handler(String),
    #[error("page copies not done after {0:?}")]
    Stuck(Duration),
}

const PENDING: u8 = 0;
const COPYING: u8 = 1;
const DONE: u8 = 2;

/// Pages the copier claims, copies and un-protects at a time.
const CHUNK_PAGES: u32 = 128;

/// The longest the copier waits for the handler's copies at the end of an epoch.
const HANDLER_LIMIT: Duration = Duration::from_secs(2);

/// One run of an epoch's pages, inside one part.
struct Seg {
    gpa: u64,
    host: u64,
    pages: u32,
    /// Index of its first page in the epoch's state table.
    first: usize,
    /// Where its first page goes in its part's staging buffer.
    dst: *mut u8,
}

/// The pages of the epoch being copied.
struct Table {
    /// In guest-address order (the harvest's order).
    segs: Vec<Seg>,
    state: Vec<AtomicU8>,
}

// SAFETY: `dst` points into staging buffers that the `Pending` holding this table owns
// and keeps (unmoved: they are heap allocations) until every page is done and the
// table is uninstalled; each page's destination is written by the one thread that
// moved the page's state from pending to copying, so writes never overlap.
unsafe impl Send for Table {}
// SAFETY: as for Send: shared access is to atomics and to disjoint destinations.
unsafe impl Sync for Table {}

impl Table {
    /// Segment and page index of guest page `gpa`, if it is in the epoch.
    fn find(&self, gpa: u64) -> Option<(&Seg, usize)> {
        let i = self.segs.partition_point(|s| s.gpa <= gpa).checked_sub(1)?;
        let s = &self.segs[i];
        let k = (gpa - s.gpa) / PAGE_SIZE as u64;
        (k < u64::from(s.pages)).then_some((s, s.first + k as usize))
    }
}

/// Copies `pages` pages from guest memory at `gpa` to `dst`.
///
/// # Safety
/// `dst` must be valid for writes of `pages` pages and written by no one else meanwhile.
unsafe fn copy_to(
    mem: &GuestMemoryMmap,
    gpa: u64,
    pages: usize,
    dst: *mut u8,
) -> Result<(), EpochCopyError> {
    // SAFETY: per this function's contract.
    let out = unsafe { std::slice::from_raw_parts_mut(dst, pages * PAGE_SIZE) };
    mem.read_slice(out, GuestAddress(gpa))
        .map_err(|source| EpochCopyError::Memory { gpa, source })
}

struct Shared {
    wp: WriteProtector,
    mem: GuestMemoryMmap,
    current: Mutex<Option<Arc<Table>>>,
    stop: AtomicBool,
    /// Pages the handler copied (the guest wrote them before the copier got there).
    handler_copies: AtomicU64,
    /// Faults on pages already being copied by the copier, or outside any epoch.
    other_faults: AtomicU64,
    /// UFFDIO_WRITEPROTECT calls (protect and un-protect).
    ioctls: AtomicU64,
    failed: Mutex<Option<String>>,
}

/// Epoch pages copied out of the pause (see the module doc).
pub struct BackgroundCopy {
    shared: Arc<Shared>,
    handler: Option<JoinHandle<()>>,
}

/// An epoch whose pages are protected and not all copied yet.
pub struct Pending {
    shared: Arc<Shared>,
    table: Arc<Table>,
    groups: Vec<Vec<PageRun>>,
    bufs: Vec<Buf>,
}

/// Counters of the background copies so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EpochCopyStats {
    pub handler_copies: u64,
    pub other_faults: u64,
    /// UFFDIO_WRITEPROTECT calls, protecting and un-protecting: each one is an MMU
    /// notifier invalidation for KVM.
    pub ioctls: u64,
}

impl BackgroundCopy {
    /// Registers `mem` for write protection and starts the fault handler.
    pub fn new(mem: &GuestMemoryMmap) -> Result<BackgroundCopy, EpochCopyError> {
        let wp = WriteProtector::open()?;
        wp.register_guest_memory(mem)?;
        let shared = Arc::new(Shared {
            wp,
            mem: mem.clone(),
            current: Mutex::new(None),
            stop: AtomicBool::new(false),
            handler_copies: AtomicU64::new(0),
            other_faults: AtomicU64::new(0),
            ioctls: AtomicU64::new(0),
            failed: Mutex::new(None),
        });
        let s = shared.clone();
        let handler = std::thread::Builder::new()
            .name("epoch-wp".into())
            .spawn(move || handler_loop(&s))
            .map_err(|e| EpochCopyError::Handler(format!("spawning the handler: {e}")))?;
        Ok(BackgroundCopy {
            shared,
            handler: Some(handler),
        })
    }

    pub fn stats(&self) -> EpochCopyStats {
        EpochCopyStats {
            handler_copies: self.shared.handler_copies.load(Ordering::Relaxed),
            other_faults: self.shared.other_faults.load(Ordering::Relaxed),
            ioctls: self.shared.ioctls.load(Ordering::Relaxed),
        }
    }

    /// While paused: stages buffers for the parts (`max_part_pages` each) of `runs`
    /// and write-protects the pages. On error nothing stays protected.
    pub fn begin(
        &self,
        pool: &BufPool,
        runs: &[PageRun],
        max_part_pages: u32,
    ) -> Result<Pending, EpochCopyError> {
        let groups = split_runs(runs.iter().copied(), max_part_pages);
        let mut bufs = Vec::with_capacity(groups.len());
        let mut segs = Vec::new();
        let mut first = 0usize;
        for g in &groups {
            let n: usize = g.iter().map(|r| r.pages as usize).sum();
            let mut buf = pool.take(n * PAGE_SIZE);
            let base = buf.as_mut_ptr();
            let mut at = 0usize;
            for r in g {
                let len = u64::from(r.pages) * PAGE_SIZE as u64;
                segs.push(Seg {
                    gpa: r.gpa,
                    host: host_range(&self.shared.mem, r.gpa, len)?,
                    pages: r.pages,
                    first,
                    // SAFETY: `at` stays within the buffer (`n` pages, the group's).
                    dst: unsafe { base.add(at) },
                });
                first += r.pages as usize;
                at += len as usize;
            }
            bufs.push(buf);
        }
        let table = Arc::new(Table {
            segs,
            state: (0..first).map(|_| AtomicU8::new(PENDING)).collect(),
        });
        // Installed before anything is protected: a fault never finds a protected
        // page of this epoch without its table.
        let mut cur = self
            .shared
            .current
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        *cur = Some(table.clone());
        for r in runs {
            let len = u64::from(r.pages) * PAGE_SIZE as u64;
            let r = host_range(&self.shared.mem, r.gpa, len)
                .map_err(EpochCopyError::from)
                .and_then(|host| Ok(self.shared.wp.protect(host, len)?));
            self.shared.ioctls.fetch_add(1, Ordering::Relaxed);
            if let Err(e) = r {
                for s in &table.segs {
                    let _ = self
                        .shared
                        .wp
                        .unprotect(s.host, u64::from(s.pages) * PAGE_SIZE as u64);
                }
                *cur = None;
                return Err(e);
            }
        }
        drop(cur);
        Ok(Pending {
            shared: self.shared.clone(),
            table,
            groups,
            bufs,
        })
    }
}

impl Pending {
    /// After resuming: copies every page not copied by the handler yet, waits for
    /// the handler's, and returns the parts (runs and staging buffer). Every page is
    /// un-protected when this returns, error or not.
    pub fn finish(mut self) -> Result<Vec<PartPages>, EpochCopyError> {
        let r = self.copy_all(&self.table);
        // Every page left protected by an error is released (the guest must never wait
        // on a page nobody will copy); a page copied is un-protected already.
        self.release(r.is_err());
        r?;
        if let Some(e) = self
            .shared
            .failed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            return Err(EpochCopyError::Handler(e));
        }
        let groups = std::mem::take(&mut self.groups);
        let bufs = std::mem::take(&mut self.bufs);
        Ok(groups
            .into_iter()
            .zip(bufs)
            .map(|(g, b)| (g, vec![b]))
            .collect())
    }

    /// Uninstalls the table if it is still installed (un-protecting every page first if
    /// `unprotect`). The handler serves faults under this lock: once the table is gone,
    /// nothing writes into the buffers any more.
    fn release(&self, unprotect: bool) {
        let mut cur = self
            .shared
            .current
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if !cur.as_ref().is_some_and(|t| Arc::ptr_eq(t, &self.table)) {
            return;
        }
        if unprotect {
            for s in &self.table.segs {
                let _ = self
                    .shared
                    .wp
                    .unprotect(s.host, u64::from(s.pages) * PAGE_SIZE as u64);
            }
        }
        *cur = None;
    }

    fn copy_all(&self, t: &Table) -> Result<(), EpochCopyError> {
        let sh = &*self.shared;
        for s in &t.segs {
            let mut k = 0u32;
            while k < s.pages {
                let end = (k + CHUNK_PAGES).min(s.pages);
                // Claim the pages of the chunk still pending; copy and release each
                // run of claimed pages (pages the handler holds are its to release).
                let mut i = k;
                while i < end {
                    let mut j = i;
                    while j < end
                        && t.state[s.first + j as usize]
                            .compare_exchange(PENDING, COPYING, Ordering::AcqRel, Ordering::Acquire)
                            .is_ok()
                    {
                        j += 1;
                    }
                    if j > i {
                        let off = i as usize * PAGE_SIZE;
                        // SAFETY: pages i..j of the segment were claimed by this
                        // thread; their destination is inside the part's buffer.
                        let r = unsafe {
                            copy_to(
                                &sh.mem,
                                s.gpa + off as u64,
                                (j - i) as usize,
                                s.dst.add(off),
                            )
                        };
                        for q in i..j {
                            t.state[s.first + q as usize].store(DONE, Ordering::Release);
                        }
                        r?;
                        sh.wp
                            .unprotect(s.host + off as u64, u64::from(j - i) * PAGE_SIZE as u64)?;
                        i = j;
                    } else {
                        // Held by the handler.
                        i += 1;
                    }
                }
                k = end;
            }
        }
        // The handler's pages.
        let t0 = Instant::now();
        for st in &t.state {
            while st.load(Ordering::Acquire) != DONE {
                if t0.elapsed() > HANDLER_LIMIT {
                    return Err(EpochCopyError::Stuck(HANDLER_LIMIT));
                }
                std::thread::yield_now();
            }
        }
        Ok(())
    }
}

impl Drop for Pending {
    /// An epoch dropped unfinished (an error or a panic between the pause and
    /// [`Pending::finish`]): nothing may stay protected, and the handler must not
    /// write into the buffers freed after this.
    fn drop(&mut self) {
        self.release(true);
    }
}

impl Drop for BackgroundCopy {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.handler.take() {
            let _ = h.join();
        }
    }
}

fn handler_loop(sh: &Shared) {
    while !sh.stop.load(Ordering::Relaxed) {
        let f = match sh.wp.next_fault(Duration::from_millis(10)) {
            Ok(Some(f)) => f,
            Ok(None) => continue,
            Err(e) => {
                log::error!("epoch copy: reading faults: {e}");
                *sh.failed.lock().unwrap_or_else(|e| e.into_inner()) = Some(e.to_string());
                // The copier still un-protects every page; back off and try again.
                std::thread::sleep(Duration::from_millis(1));
                continue;
            }
        };
        let host = f.address & !(PAGE_SIZE as u64 - 1);
        if let Err(e) = serve(sh, host) {
            log::error!("epoch copy: fault at {host:#x}: {e}");
            *sh.failed.lock().unwrap_or_else(|e| e.into_inner()) = Some(e.to_string());
        }
    }
}

/// Serves a write fault on the page at host address `host`: copy it if it is an
/// epoch's page still pending, wait for it if being copied, then un-protect it.
fn serve(sh: &Shared, host: u64) -> Result<(), EpochCopyError> {
    let cur = sh.current.lock().unwrap_or_else(|e| e.into_inner());
    let mut copied = Ok(());
    let found = cur.as_ref().and_then(|t| {
        let gpa = guest_address(&sh.mem, host)?;
        t.find(gpa).map(|(s, i)| (t, s, i, gpa))
    });
    match found {
        Some((t, s, i, gpa)) => {
            let st = &t.state[i];
            if st
                .compare_exchange(PENDING, COPYING, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                let off = (gpa - s.gpa) as usize;
                // SAFETY: this thread claimed the page; its destination is inside the
                // part's buffer, kept alive while the table is installed (held lock).
                copied = unsafe { copy_to(&sh.mem, gpa, 1, s.dst.add(off)) };
                st.store(DONE, Ordering::Release);
                sh.handler_copies.fetch_add(1, Ordering::Relaxed);
            } else {
                while st.load(Ordering::Acquire) != DONE {
                    std::hint::spin_loop();
                }
                sh.other_faults.fetch_add(1, Ordering::Relaxed);
            }
        }
        None => {
            sh.other_faults.fetch_add(1, Ordering::Relaxed);
        }
    }
    // Still under the lock: the next epoch cannot protect this page meanwhile.
    sh.ioctls.fetch_add(1, Ordering::Relaxed);
    sh.wp.unprotect(host, PAGE_SIZE as u64)?;
    drop(cur);
    copied
}
