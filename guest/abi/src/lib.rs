//! The contract between the twinrun VMM and its freestanding test guest.
//!
//! The VMM builds the guest's world itself (there is no firmware and no guest kernel):
//! it loads the guest ELF at [`IMAGE_BASE`], writes flat 64-bit segments into a GDT at
//! [`GDT_ADDR`], identity-maps all guest RAM and the virtio-mmio windows with
//! user-accessible pages, writes a [`Params`] block at [`PARAMS_ADDR`], and enters the
//! ELF entry point at CPL3 with `rsp = STACK_TOP`, `rdi = PARAMS_ADDR`, interrupts off
//! and IOPL=3 (so the guest may use port I/O, see [`EXIT_PORT`]).
//!
//! Guest-physical memory map (identity-mapped, so these are also guest-virtual):
//!
//! | range                         | what                                           |
//! |-------------------------------|------------------------------------------------|
//! | `0x500..0x528`                | GDT: null, kernel code/data, user code/data    |
//! | `0x5000..0x6000`              | [`Params`]                                     |
//! | `0x9000..0x4B000`             | page tables (PML4, PDPT, one PD per GiB)       |
//! | `STACK_TOP - STACK_SIZE..STACK_TOP` | guest stack                              |
//! | `IMAGE_BASE..`                | guest ELF image, then free RAM from `free_base`|
//! | `..RAM_GAP_START`             | end of low RAM (at most 3 GiB)                 |
//! | `MMIO_BASE..`                 | virtio-mmio windows, [`MMIO_WINDOW_SIZE`] each |
//! | `RAM_HIGH_START..`            | RAM beyond 3 GiB, if any                       |
//!
//! # Console line formats
//!
//! Every line the test guest writes to its virtio-console ends with `\n` and starts with
//! a tag word, so tests and the demo can parse the stream:
//!
//! - `BOOT workloads=<list> tsc_khz=<n>` once at start (list: comma-separated names).
//! - `C <seq>`: counter line; `seq` counts from 1 with no gap, decimal.
//! - `D pass=<n> writes=<n> verified=<n> errors=<n>`: dirty workload summary, printed
//!   after every pass over the working set.
//! - `DIRTY-ERROR page=<idx> version=<v> word=<w> expected=<hex> found=<hex>`: a page
//!   read back with content it was never given. Any such line is a failure.
//! - `DISK recovered=<n> corrupt=<n> next=<seq>`: at start, what the disk held: `n`
//!   valid records (sequence 1..=n, contiguous), `corrupt` non-zero sectors among the
//!   64 after them (a torn tail of unflushed writes, possible after a crash, since the
//!   guest writes up to 64 records per request; never one that was reported with `W`),
//!   and the sequence to write next.
//! - `W <seq>`: disk record `seq` is written and flushed (durable).
//! - `DISK-ERROR <what>`: the block device failed a request.
//! - `KV listening <ip>:<port>`: the kv server is ready.
//! - `B write bytes=<n> ns=<n> reqs=<n>`: the `blkbench` workload wrote `bytes` from
//!   sector 0 in `reqs` requests of `blkbench_req_bytes` (the last may be shorter), with
//!   up to `blkbench_depth` in flight, then one flush; `ns` is guest TSC time from the
//!   first submit to the flush's completion.
//! - `B read bytes=<n> ns=<n> reqs=<n> bad=<n>`: the same range read back the same way
//!   (no flush); `bad` counts requests whose first 8 bytes did not hold the request
//!   index the write pass stamped there (any nonzero value is a failure).
//! - `B-ERROR <write|read|flush> sector=<s> status=<st>`: a request failed; the
//!   workload stops.
//! - `PANIC <message>`: the guest hit a bug; it then exits with status [`EXIT_PANIC`].
//! - `DONE`: every bounded workload finished; the guest then exits with status 0.
//!
//! # Disk record format
//!
//! The `disk` workload writes one record per 512-byte sector starting at sector
//! [`DISK_FIRST_SECTOR`]: [`DiskRecord`] (little endian), the rest of the sector filled
//! with a byte pattern derived from the sequence number (byte `i` of the sector, for
//! `i >= 24`, is `(seq as u8).wrapping_add(i as u8)`), and a checksum over the whole
//! sector with the checksum field zeroed (FNV-1a 64).
#![no_std]
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

/// Size of a guest page as the VMM tracks it.
pub const PAGE_SIZE: u64 = 4096;

/// Global descriptor table: 5 entries of 8 bytes.
pub const GDT_ADDR: u64 = 0x500;
/// GDT selectors the VMM loads: kernel code and data (unused by the guest, present so
/// the table is conventional), user code and data (RPL 3).
pub const GDT_KERNEL_CODE: u16 = 0x08;
pub const GDT_KERNEL_DATA: u16 = 0x10;
pub const GDT_USER_CODE: u16 = 0x18 | 3;
pub const GDT_USER_DATA: u16 = 0x20 | 3;

/// Where the VMM writes [`Params`]. One page.
pub const PARAMS_ADDR: u64 = 0x5000;

/// Page-table pages: PML4, one PDPT, then one page directory (2 MiB pages) per GiB.
pub const PML4_ADDR: u64 = 0x9000;
pub const PDPT_ADDR: u64 = 0xA000;
pub const PD_ADDR: u64 = 0xB000;
/// Page directories available: guest-physical space mapped is at most this many GiB.
pub const MAX_MAPPED_GIB: u64 = 64;

/// The guest ELF is linked to run here (see `guest/link.ld`).
pub const IMAGE_BASE: u64 = 0x40_0000;
/// Initial stack pointer; the stack grows down from the image base.
pub const STACK_TOP: u64 = IMAGE_BASE;
pub const STACK_SIZE: u64 = 0x10_0000;

/// Low RAM ends here at most; the hole up to 4 GiB holds device windows.
pub const RAM_GAP_START: u64 = 0xC000_0000;
/// RAM beyond [`RAM_GAP_START`] bytes continues here.
pub const RAM_HIGH_START: u64 = 0x1_0000_0000;

/// First virtio-mmio window; device `i` sits at `MMIO_BASE + i * MMIO_WINDOW_SIZE`.
pub const MMIO_BASE: u64 = 0xD000_0000;
pub const MMIO_WINDOW_SIZE: u64 = 0x1000;
/// At most this many virtio-mmio devices are described in [`Params`].
pub const MAX_DEVICES: usize = 8;

/// Writing a 32-bit value to this I/O port ends the VM with that exit status
/// (in the manner of QEMU's isa-debug-exit). The guest runs with IOPL=3.
pub const EXIT_PORT: u16 = 0xf4;
/// Exit status for a clean end.
pub const EXIT_OK: u32 = 0;
/// Exit status after a guest panic.
pub const EXIT_PANIC: u32 = 0x70;
/// Exit status when the parameter block is missing or of another version.
pub const EXIT_BAD_PARAMS: u32 = 0x71;

/// A hypervisor CPUID leaf only twinrun's CPUID table has: EAX is the highest leaf of
/// its range (the leaf itself), EBX:ECX:EDX spell [`CPUID_TWINRUN_SIGNATURE`]. It sits
/// in the 0x4000_0100 slot so that KVM's own leaves at 0x4000_0000 (which a Linux
/// guest looks for) stay where they are.
///
/// Guest code that reads CPUID at CPL3 uses it to tell whether CPUID is virtualized:
/// on some software KVMs user-mode `cpuid` is not intercepted and runs on the host
/// CPU, which returns the host's values (no twinrun signature, the host's APIC ids).
/// On hardware KVM CPUID always exits and the VMM's table answers.
pub const CPUID_TWINRUN_LEAF: u32 = 0x4000_0100;
/// `"twinrunTWRN"` padded to 12 bytes: EBX, ECX, EDX of [`CPUID_TWINRUN_LEAF`].
pub const CPUID_TWINRUN_SIGNATURE: [u8; 12] = *b"twinrunTWRN\0";

/// `b"TWRNPRM1"` as a little-endian u64.
pub const PARAMS_MAGIC: u64 = u64::from_le_bytes(*b"TWRNPRM1");
pub const PARAMS_VERSION: u32 = 1;

/// Workload bits for [`Params::workloads`].
pub const WORKLOAD_COUNTER: u32 = 1 << 0;
pub const WORKLOAD_DIRTY: u32 = 1 << 1;
pub const WORKLOAD_DISK: u32 = 1 << 2;
pub const WORKLOAD_KV: u32 = 1 << 3;
/// Sequential write-then-read throughput test of the first virtio-blk disk (it
/// overwrites the disk from sector 0: never combine with `WORKLOAD_DISK`).
pub const WORKLOAD_BLKBENCH: u32 = 1 << 4;

/// Virtio device ids used in [`DeviceDesc::device_id`] (virtio 1.x numbering).
pub const VIRTIO_ID_NET: u32 = 1;
pub const VIRTIO_ID_BLOCK: u32 = 2;
pub const VIRTIO_ID_CONSOLE: u32 = 3;

/// First sector the `disk` workload uses (sector 0 is left alone).
pub const DISK_FIRST_SECTOR: u64 = 8;
/// `b"TWRNREC1"` as a little-endian u64.
pub const DISK_RECORD_MAGIC: u64 = u64::from_le_bytes(*b"TWRNREC1");

/// One virtio-mmio device as the guest should find it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DeviceDesc {
    /// Guest-physical base of the 4 KiB virtio-mmio window.
    pub mmio_base: u64,
    /// Virtio device id (`VIRTIO_ID_*`).
    pub device_id: u32,
    pub _pad: u32,
}

/// The parameter block the VMM writes at [`PARAMS_ADDR`] before the first vCPU entry.
///
/// Plain old data, `repr(C)`, every field explicitly sized: both sides read and write it
/// as bytes. Rates of 0 mean "as fast as possible"; limits of 0 mean "no limit".
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Params {
    pub magic: u64,
    pub version: u32,
    /// `size_of::<Params>()` as the VMM saw it.
    pub size: u32,
    /// TSC frequency in kHz, so the guest can pace itself with `rdtsc`.
    pub tsc_khz: u64,
    /// Low RAM is `[0, ram_low_end)`.
    pub ram_low_end: u64,
    /// High RAM is `[RAM_HIGH_START, ram_high_end)`; 0 when there is none.
    pub ram_high_end: u64,
    /// First free byte of low RAM after the guest image (2 MiB aligned). The guest may use
    /// `[free_base, ram_low_end)` for its heap and working sets.
    pub free_base: u64,
    pub vcpus: u32,
    pub device_count: u32,
    pub devices: [DeviceDesc; MAX_DEVICES],
    /// `WORKLOAD_*` bits.
    pub workloads: u32,
    /// Counter lines per second.
    pub counter_rate: u32,
    /// Stop the counter after this many lines.
    pub counter_limit: u64,
    /// Pages dirtied per second by the `dirty` workload.
    pub dirty_rate: u32,
    /// Working-set size of the `dirty` workload, in pages.
    pub dirty_pages: u32,
    /// Seed for the `dirty` workload's page contents.
    pub dirty_seed: u64,
    /// Stop the `dirty` workload after this many passes over the working set.
    pub dirty_passes: u64,
    /// Disk records appended per second.
    pub disk_rate: u32,
    /// Flush after every this many records (at least 1).
    pub disk_flush_every: u32,
    /// Stop the `disk` workload after this many records written in this boot.
    pub disk_limit: u64,
    /// The `kv` server's address, prefix length, gateway (0.0.0.0 for none) and port.
    pub kv_ipv4: [u8; 4],
    pub kv_prefix: u8,
    pub _pad0: [u8; 3],
    pub kv_gateway: [u8; 4],
    pub kv_port: u16,
    pub _pad1: u16,
    /// Bytes the `blkbench` workload writes and then reads (from sector 0).
    pub blkbench_bytes: u64,
    /// Bytes per request (a multiple of 512).
    pub blkbench_req_bytes: u32,
    /// Requests in flight at most (at least 1).
    pub blkbench_depth: u32,
    /// 1: the `dirty` workload writes its first pass over the working set unpaced (a
    /// fill) and paces the later passes at `dirty_rate` from the end of the fill.
    pub dirty_fill: u32,
    pub _pad2: u32,
}

impl Params {
    /// A block with the header filled in and every workload off.
    pub const fn new() -> Self {
        Params {
            magic: PARAMS_MAGIC,
            version: PARAMS_VERSION,
            size: core::mem::size_of::<Params>() as u32,
            tsc_khz: 0,
            ram_low_end: 0,
            ram_high_end: 0,
            free_base: 0,
            vcpus: 1,
            device_count: 0,
            devices: [DeviceDesc {
                mmio_base: 0,
                device_id: 0,
                _pad: 0,
            }; MAX_DEVICES],
            workloads: 0,
            counter_rate: 0,
            counter_limit: 0,
            dirty_rate: 0,
            dirty_pages: 0,
            dirty_seed: 0,
            dirty_passes: 0,
            disk_rate: 0,
            disk_flush_every: 1,
            disk_limit: 0,
            kv_ipv4: [0; 4],
            kv_prefix: 24,
            _pad0: [0; 3],
            kv_gateway: [0; 4],
            kv_port: 6379,
            _pad1: 0,
            blkbench_bytes: 0,
            blkbench_req_bytes: 0,
            blkbench_depth: 1,
            dirty_fill: 0,
            _pad2: 0,
        }
    }

    /// True when the header matches this build of the ABI.
    pub fn is_valid(&self) -> bool {
        self.magic == PARAMS_MAGIC
            && self.version == PARAMS_VERSION
            && self.size as usize == core::mem::size_of::<Params>()
            && self.device_count as usize <= MAX_DEVICES
    }

    /// The block as bytes, for the VMM to write into guest memory.
    pub fn as_bytes(&self) -> &[u8] {
        // SAFETY: `Params` is `repr(C)`, `Copy`, and every field is an integer or an
        // array of integers with explicit padding fields, so all its bytes are
        // initialised; the slice borrows `self` for its whole life.
        unsafe {
            core::slice::from_raw_parts(
                (self as *const Params).cast::<u8>(),
                core::mem::size_of::<Params>(),
            )
        }
    }
}

impl Default for Params {
    fn default() -> Self {
        Self::new()
    }
}

// The block must fit in its page.
const _: () = assert!(core::mem::size_of::<Params>() <= PAGE_SIZE as usize);
// No implicit padding (`as_bytes` relies on every byte being a field): the appended
// `blkbench` fields start 8-aligned right after `_pad1` and end the struct.
const _: () = assert!(
    core::mem::offset_of!(Params, blkbench_bytes) == core::mem::offset_of!(Params, _pad1) + 2
);
const _: () = assert!(
    core::mem::offset_of!(Params, dirty_fill) == core::mem::offset_of!(Params, blkbench_depth) + 4
);
const _: () = assert!(core::mem::size_of::<Params>() == core::mem::offset_of!(Params, _pad2) + 4);

/// Header of one disk record (the start of its sector).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DiskRecord {
    pub magic: u64,
    /// Sequence number, from 1; record `n` lives at sector `DISK_FIRST_SECTOR + n - 1`.
    pub seq: u64,
    /// FNV-1a 64 over the whole 512-byte sector with this field zeroed.
    pub checksum: u64,
}

/// FNV-1a 64, the checksum of disk records (simple, and the same on both sides).
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// The content word `word` of page `page` at `version` for the `dirty` workload.
/// Both the guest (to write and verify) and host-side tests (to check a memory image)
/// derive page contents from this.
pub fn dirty_word(seed: u64, page: u64, version: u64, word: u64) -> u64 {
    // splitmix64 over a mix of the inputs: cheap and well spread.
    let mut z = seed
        ^ page.wrapping_mul(0x9E37_79B9_7F4A_7C15)
        ^ version.wrapping_mul(0xBF58_476D_1CE4_E5B9)
        ^ word.wrapping_mul(0x94D0_49BB_1331_11EB);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn params_header_round_trips() {
        let p = Params::new();
        assert!(p.is_valid());
        assert_eq!(p.as_bytes().len(), core::mem::size_of::<Params>());
        assert_eq!(&p.as_bytes()[..8], b"TWRNPRM1");
    }

    #[test]
    fn invalid_headers_are_rejected() {
        let mut p = Params::new();
        p.version = 2;
        assert!(!p.is_valid());
        let mut p = Params::new();
        p.device_count = MAX_DEVICES as u32 + 1;
        assert!(!p.is_valid());
    }

    #[test]
    fn dirty_words_differ_by_version() {
        assert_ne!(dirty_word(1, 2, 3, 4), dirty_word(1, 2, 4, 4));
        assert_eq!(dirty_word(1, 2, 3, 4), dirty_word(1, 2, 3, 4));
    }

    #[test]
    fn fnv_known_value() {
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
    }
}
