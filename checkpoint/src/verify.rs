//! Replica-equality test mode: hashes of guest memory and of the VM state's canonical
//! parts, computed by the primary while the guest is paused at each capture and by the
//! standby on its mirror after each apply, recorded per epoch.
//!
//! Off by default and free when off (the drivers hold an `Option<Arc<HashLog>>`).
//!
//! # The memory hash
//!
//! A CRC-32C per guest page, folded into one CRC-32C over the page CRCs in address
//! order ([`PageHashes::digest`]). Hashing all of guest memory at every epoch costs a
//! pass over it (tens of ms per 32 MiB in a debug build), so each side keeps its page
//! table up to date incrementally and rebuilds it from the whole of memory every
//! [`FULL_EVERY`] epochs:
//!
//! - the primary updates the pages of the epoch's dirty set from the very bytes it
//!   copied into the epoch's staging buffers while paused (off the pause); at a full
//!   epoch it rehashes all of guest memory while still paused;
//! - the standby updates, after the apply, the pages the epoch's parts listed, reading
//!   them back from the mirror; at a full epoch it rehashes its whole mirror.
//!
//! So every epoch checks what was sent and applied (a page left out, a page written
//! with other bytes or at another address than the one hashed), and every full epoch
//! also checks what the incremental path cannot see: a page the guest wrote that the
//! dirty tracking missed (both sides' incremental tables would agree on it), or a stray
//! write into the mirror.
//!
//! # What the state hash covers, and what it leaves out
//!
//! Covered (must be equal on both sides at a committed epoch): the memory layout, every
//! virtio-mmio transport (feature selection, status, interrupt status, NEEDS_RESET,
//! every queue's addresses, size, ready flag and `next_avail`/`next_used`) and its device
//! attachment, the UART, and per vCPU the general and special registers, the XSAVE area
//! and XCRs, debug registers, MP state, pending events, TSC frequency, and every MSR
//! except the clock MSRs below.
//!
//! Left out because their value is derived from host time at the moment of the capture,
//! so two captures of the *same* guest state differ in them (a standby that restores the
//! state and captures it again sees other values): the kvmclock (`KvmVmState::clock`),
//! the in-kernel PIT (its channels' `count_load_time` is a host ktime), the PIC and
//! IOAPIC (kept with the PIT as the in-kernel interrupt controller state, which the test
//! guest never programs: it runs without interrupts), the local APIC (its timer
//! current-count register is computed from host time on every read), and the MSRs
//! IA32_TSC (0x10), IA32_TSC_ADJUST (0x3b), IA32_TSC_DEADLINE (0x6e0) and the kvmclock
//! MSRs (0x11, 0x12, 0x4b564d00, 0x4b564d01: their system-time page moves with the
//! clock). Guest memory is hashed whole (the kvmclock page the guest reads is ordinary
//! RAM and is copied like any other page).

use std::collections::BTreeMap;
use std::sync::Mutex;
use twinrun_lock::MutexExt;

use serde::Serialize;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
use vmm::vstate::memory::GuestMemoryMmap;
use vmm::VmState;

/// Every this many epochs (epoch 0 included) both sides rehash all of memory.
pub const FULL_EVERY: u64 = 64;

/// Whether `epoch` is one where both sides rehash all of memory.
pub fn is_full_epoch(epoch: u64) -> bool {
    epoch.is_multiple_of(FULL_EVERY)
}

/// MSRs whose values follow host time (see the module comment).
pub const CLOCK_MSRS: [u32; 7] = [0x10, 0x3b, 0x6e0, 0x11, 0x12, 0x4b56_4d00, 0x4b56_4d01];

/// Hashes of one side's view of the VM at one epoch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReplicaHash {
    /// [`PageHashes::digest`] of guest RAM.
    pub memory: u32,
    /// CRC-32C over the canonical parts of the VM state.
    pub state: u32,
}

/// Hashes recorded per epoch (shared between a driver and the test that reads them).
#[derive(Debug, Default)]
pub struct HashLog {
    map: Mutex<BTreeMap<u64, ReplicaHash>>,
}

impl HashLog {
    pub fn record(&self, epoch: u64, h: ReplicaHash) {
        self.lock().insert(epoch, h);
    }

    /// Every recorded epoch and its hashes.
    pub fn snapshot(&self) -> BTreeMap<u64, ReplicaHash> {
        self.lock().clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, ReplicaHash>> {
        // A panicking recorder leaves a map that is still consistent (inserts are atomic).
        self.map.lock_or_recover()
    }
}

const PAGE: usize = crate::messages::PAGE_SIZE;

/// One CRC-32C per guest page, by region (see the module comment).
#[derive(Clone, Debug)]
pub struct PageHashes {
    /// `(region start, CRC per page)`, in address order.
    regions: Vec<(u64, Vec<u32>)>,
}

impl PageHashes {
    /// A table for `layout` (`(gpa, len)` per region), every page hashed as zeroes.
    pub fn new(layout: &[(u64, u64)]) -> PageHashes {
        let zero = crc32c::crc32c(&[0u8; PAGE]);
        let mut regions: Vec<_> = layout
            .iter()
            .map(|&(start, len)| (start, vec![zero; (len / PAGE as u64) as usize]))
            .collect();
        regions.sort_unstable_by_key(|r| r.0);
        PageHashes { regions }
    }

    fn slot(&mut self, gpa: u64) -> Option<&mut u32> {
        self.regions.iter_mut().find_map(|(start, v)| {
            let i = gpa.checked_sub(*start)? / PAGE as u64;
            v.get_mut(usize::try_from(i).ok()?)
        })
    }

    /// Rehashes the page at `gpa` (page-aligned) with content `data`. Pages outside the
    /// layout are ignored (the digest then cannot match the other side's).
    pub fn update(&mut self, gpa: u64, data: &[u8]) {
        if let Some(s) = self.slot(gpa) {
            *s = crc32c::crc32c(data);
        }
    }

    /// Rehashes the pages of `runs` from `chunks` (their bytes, back to back in run
    /// order across the chunks, as an epoch part's staging buffers hold them).
    pub fn update_runs<C: AsRef<[u8]>>(&mut self, runs: &[crate::messages::PageRun], chunks: &[C]) {
        let gpas = runs
            .iter()
            .flat_map(|r| (0..u64::from(r.pages)).map(move |k| r.gpa + k * PAGE as u64));
        let pages = chunks.iter().flat_map(|c| c.as_ref().chunks_exact(PAGE));
        for (gpa, page) in gpas.zip(pages) {
            self.update(gpa, page);
        }
    }

    /// Rehashes every page of `mem`. Call with the guest paused.
    pub fn rebuild_from_guest(
        &mut self,
        mem: &GuestMemoryMmap,
    ) -> Result<(), vm_memory::GuestMemoryError> {
        let mut buf = vec![0u8; CHUNK];
        for (start, v) in &mut self.regions {
            let len = v.len() * PAGE;
            let mut off = 0;
            while off < len {
                let n = (len - off).min(CHUNK);
                mem.read_slice(&mut buf[..n], GuestAddress(*start + off as u64))?;
                for (k, page) in buf[..n].chunks_exact(PAGE).enumerate() {
                    v[off / PAGE + k] = crc32c::crc32c(page);
                }
                off += n;
            }
        }
        Ok(())
    }

    /// Rehashes every page from `regions` (`(start, bytes)`: the mirror's RAM).
    pub fn rebuild_from<'a>(&mut self, regions: impl Iterator<Item = (u64, &'a [u8])>) {
        for (start, bytes) in regions {
            for (k, page) in bytes.chunks_exact(PAGE).enumerate() {
                self.update(start + (k * PAGE) as u64, page);
            }
        }
    }

    /// CRC-32C over the region starts, lengths and page CRCs, in address order.
    pub fn digest(&self) -> u32 {
        let pages: usize = self.regions.iter().map(|r| r.1.len()).sum();
        let mut bytes = Vec::with_capacity(16 * self.regions.len() + 4 * pages);
        for (start, v) in &self.regions {
            bytes.extend_from_slice(&start.to_le_bytes());
            bytes.extend_from_slice(&(v.len() as u64).to_le_bytes());
            for c in v {
                bytes.extend_from_slice(&c.to_le_bytes());
            }
        }
        crc32c::crc32c(&bytes)
    }
}

/// Chunk through which guest memory is read (vm-memory reads volatile memory by copy).
const CHUNK: usize = 1 << 20;

/// [`PageHashes::digest`] of all of `mem`, from scratch. Call with the guest paused.
pub fn hash_guest_memory(mem: &GuestMemoryMmap) -> Result<u32, vm_memory::GuestMemoryError> {
    let layout: Vec<_> = mem.iter().map(|r| (r.start_addr().0, r.len())).collect();
    let mut t = PageHashes::new(&layout);
    t.rebuild_from_guest(mem)?;
    Ok(t.digest())
}

/// Folds the postcard encoding of `v` into `crc`.
fn put<T: Serialize + ?Sized>(crc: u32, v: &T) -> u32 {
    // Encoding plain data into a Vec cannot fail; if it did, the field would still be
    // marked by the length prefix below.
    let bytes = postcard::to_allocvec(v).unwrap_or_default();
    let crc = crc32c::crc32c_append(crc, &(bytes.len() as u64).to_le_bytes());
    crc32c::crc32c_append(crc, &bytes)
}

/// CRC-32C of the canonical (clock-free) parts of `state`; see the module comment.
pub fn hash_state(state: &VmState) -> u32 {
    let mut h = put(0, &state.memory);
    for v in &state.vcpus {
        h = put(h, &v.index);
        h = put(h, &v.regs);
        h = put(h, &v.sregs);
        h = put(h, &v.xsave);
        h = put(h, &v.xcrs);
        h = put(h, &v.debug_regs);
        let msrs: Vec<_> = v
            .msrs
            .iter()
            .filter(|m| !CLOCK_MSRS.contains(&m.index))
            .collect();
        h = put(h, &msrs);
        h = put(h, &v.mp_state);
        h = put(h, &v.events);
        h = put(h, &v.tsc_khz);
    }
    h = put(h, &state.devices);
    put(h, &state.serial)
}
