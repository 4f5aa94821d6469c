//! Booting a stock Linux kernel: the x86 64-bit boot protocol.
//!
//! The kernel (`vmlinux` ELF or `bzImage`) is loaded with linux-loader, the initramfs
//! goes at the top of low RAM (below the kernel's `initrd_addr_max`), the command line
//! and the zero page (`boot_params`, with the e820 map and `acpi_rsdp_addr`) below
//! 640 KiB, the ACPI tables in the BIOS area. The boot vCPU enters in 64-bit mode at
//! CPL0 with identity-mapped page tables covering low RAM and a GDT holding
//! `__BOOT_CS` (0x10) and `__BOOT_DS` (0x18), `rsi` = the zero page, interrupts off —
//! what Documentation/arch/x86/boot.rst asks of a 64-bit boot loader.

pub mod acpi;
pub mod e820;

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use kvm_bindings::{kvm_fpu, kvm_msr_entry, kvm_regs, Msrs};
use kvm_ioctls::VcpuFd;
use linux_loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::{BzImage, Elf, KernelLoader};
use twinrun_guest_abi as abi;
use vm_memory::{Bytes, GuestAddress};

use super::gdt;
use super::paging::{self, MapRange, PagingError};
use crate::vstate::memory::{ram_bounds, GuestMemoryMmap};
use crate::vstate::vcpu::VcpuError;

pub use acpi::{AcpiError, AcpiTables, VirtioWindow};

/// The zero page (`struct boot_params`).
pub const ZERO_PAGE_ADDR: u64 = 0x7000;
/// Initial stack (grows down, below the page tables at 0x9000).
pub const BOOT_STACK: u64 = 0x8ff0;
/// The command line, NUL-terminated.
pub const CMDLINE_ADDR: u64 = 0x2_0000;
/// GDT selectors the 64-bit boot protocol names.
pub const BOOT_CS: u16 = 0x10;
pub const BOOT_DS: u16 = 0x18;
/// `setup_header.header`, "HdrS".
const HDRS_MAGIC: u32 = 0x5372_6448;
const BOOT_FLAG: u16 = 0xaa55;
/// type_of_loader: "undefined" boot loader.
const LOADER_UNDEFINED: u8 = 0xff;
/// xloadflags: the kernel has the 64-bit entry point at +0x200.
const XLF_KERNEL_64: u16 = 1 << 0;
/// Default `initrd_addr_max` for kernels that do not say (boot protocol < 2.03).
const DEFAULT_INITRD_ADDR_MAX: u64 = 0x37ff_ffff;
/// For an ELF vmlinux (no setup header): below 2 GiB, as the protocol allows for
/// 64-bit kernels.
const ELF_INITRD_ADDR_MAX: u64 = 0x7fff_ffff;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;

#[derive(Debug, thiserror::Error)]
pub enum LinuxBootError {
    #[error("kernel {path}: {source}")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("kernel {0}: neither an ELF vmlinux nor a bzImage (no ELF magic, no HdrS)")]
    UnknownFormat(PathBuf),
    #[error("kernel {path}: {source}")]
    Load {
        path: PathBuf,
        source: linux_loader::loader::Error,
    },
    #[error("bzImage {0} has no 64-bit entry point (xloadflags.XLF_KERNEL_64 clear)")]
    No64BitEntry(PathBuf),
    #[error("initrd {path}: {source}")]
    Initrd {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("initrd of {size:#x} bytes does not fit between the kernel end {kernel_end:#x} and {limit:#x}")]
    InitrdTooLarge {
        size: u64,
        kernel_end: u64,
        limit: u64,
    },
    #[error("command line of {len} bytes exceeds the kernel's limit of {max}")]
    CmdlineTooLong { len: usize, max: usize },
    #[error("guest memory too small for a Linux guest: {0:#x} bytes of low RAM")]
    MemoryTooSmall(u64),
    #[error("ACPI tables: {0}")]
    Acpi(#[from] AcpiError),
    #[error("page tables: {0}")]
    Paging(#[from] PagingError),
    #[error("writing boot structures: {0}")]
    Memory(#[from] vm_memory::GuestMemoryError),
}

/// What to boot.
#[derive(Clone, Debug)]
pub struct LinuxImage<'a> {
    pub kernel: &'a Path,
    pub initrd: Option<&'a Path>,
    pub cmdline: &'a str,
}

/// Where the loaded kernel is entered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinuxEntry {
    /// 64-bit entry point (physical = virtual: identity map).
    pub rip: u64,
    pub kernel_end: u64,
    pub initrd: Option<(u64, u64)>,
}

enum Format {
    Elf,
    BzImage,
}

fn detect(f: &mut File, path: &Path) -> Result<Format, LinuxBootError> {
    let io = |source| LinuxBootError::Open {
        path: path.to_path_buf(),
        source,
    };
    let mut head = [0u8; 0x206];
    let n = f.read(&mut head).map_err(io)?;
    f.seek(SeekFrom::Start(0)).map_err(io)?;
    if n >= 4 && head[..4] == *b"\x7fELF" {
        return Ok(Format::Elf);
    }
    if n >= 0x206
        && u32::from_le_bytes([head[0x202], head[0x203], head[0x204], head[0x205]]) == HDRS_MAGIC
    {
        return Ok(Format::BzImage);
    }
    Err(LinuxBootError::UnknownFormat(path.to_path_buf()))
}

/// Loads kernel, initrd, command line, zero page, ACPI tables, GDT and page tables into
/// `mem`. `windows` are the virtio-mmio windows with their GSIs, `vcpus` the vCPU count.
pub fn load(
    mem: &GuestMemoryMmap,
    image: &LinuxImage<'_>,
    vcpus: usize,
    windows: &[VirtioWindow],
) -> Result<LinuxEntry, LinuxBootError> {
    let (low_end, high_end) = ram_bounds(mem);
    // The kernel is linked at 16 MiB and needs room above it.
    if low_end < 64 << 20 {
        return Err(LinuxBootError::MemoryTooSmall(low_end));
    }
    let path = image.kernel;
    let mut f = File::open(path).map_err(|source| LinuxBootError::Open {
        path: path.to_path_buf(),
        source,
    })?;
    let load_err = |source| LinuxBootError::Load {
        path: path.to_path_buf(),
        source,
    };
    let himem = Some(GuestAddress(e820::HIMEM_START));
    let mut params = boot_params::default();
    let (rip, kernel_end, initrd_max, cmdline_max) = match detect(&mut f, path)? {
        Format::Elf => {
            let r = Elf::load(mem, None, &mut f, himem).map_err(load_err)?;
            (r.kernel_load.0, r.kernel_end, ELF_INITRD_ADDR_MAX, 2048)
        }
        Format::BzImage => {
            let r = BzImage::load(mem, None, &mut f, himem).map_err(load_err)?;
            let hdr = r.setup_header.unwrap_or_default();
            if hdr.xloadflags & XLF_KERNEL_64 == 0 {
                return Err(LinuxBootError::No64BitEntry(path.to_path_buf()));
            }
            params.hdr = hdr;
            let max = match hdr.initrd_addr_max {
                0 => DEFAULT_INITRD_ADDR_MAX,
                m => u64::from(m),
            };
            let cmax = match hdr.cmdline_size {
                0 => 255,
                n => n as usize,
            };
            (r.kernel_load.0 + 0x200, r.kernel_end, max, cmax)
        }
    };

    if image.cmdline.len() > cmdline_max {
        return Err(LinuxBootError::CmdlineTooLong {
            len: image.cmdline.len(),
            max: cmdline_max,
        });
    }
    let mut cmd = image.cmdline.as_bytes().to_vec();
    cmd.push(0);
    mem.write_slice(&cmd, GuestAddress(CMDLINE_ADDR))?;

    let initrd = match image.initrd {
        Some(p) => Some(load_initrd(
            mem,
            p,
            kernel_end,
            low_end.min(initrd_max + 1),
        )?),
        None => None,
    };

    let hdr = &mut params.hdr;
    hdr.type_of_loader = LOADER_UNDEFINED;
    hdr.boot_flag = BOOT_FLAG;
    hdr.header = HDRS_MAGIC;
    if hdr.kernel_alignment == 0 {
        hdr.kernel_alignment = 0x0100_0000;
    }
    hdr.cmd_line_ptr = CMDLINE_ADDR as u32;
    hdr.cmdline_size = image.cmdline.len() as u32;
    if let Some((addr, size)) = initrd {
        hdr.ramdisk_image = addr as u32;
        hdr.ramdisk_size = size as u32;
    }
    let map = e820::map(low_end, high_end);
    for (slot, e) in params.e820_table.iter_mut().zip(&map) {
        *slot = boot_e820_entry {
            addr: e.start,
            size: e.len,
            r#type: e.kind,
        };
    }
    params.e820_entries = map.len() as u8;
    params.acpi_rsdp_addr = acpi::RSDP_ADDR;
    write_zero_page(mem, &params)?;

    AcpiTables::build(vcpus, windows)?.write(mem)?;

    let table = linux_gdt();
    for (i, e) in table.iter().enumerate() {
        mem.write_obj(*e, GuestAddress(abi::GDT_ADDR + 8 * i as u64))?;
    }
    // Identity map of low RAM: enough for the kernel image, zero page, command line and
    // initrd, all of which live there. The kernel builds its own tables at once.
    paging::write(
        mem,
        &[MapRange {
            start: 0,
            end: low_end,
            uncached: false,
        }],
    )?;
    Ok(LinuxEntry {
        rip,
        kernel_end,
        initrd,
    })
}

fn load_initrd(
    mem: &GuestMemoryMmap,
    path: &Path,
    kernel_end: u64,
    limit: u64,
) -> Result<(u64, u64), LinuxBootError> {
    let io = |source| LinuxBootError::Initrd {
        path: path.to_path_buf(),
        source,
    };
    let bytes = std::fs::read(path).map_err(io)?;
    let size = bytes.len() as u64;
    let too_large = LinuxBootError::InitrdTooLarge {
        size,
        kernel_end,
        limit,
    };
    let addr = limit.checked_sub(size).ok_or(too_large)? & !(abi::PAGE_SIZE - 1);
    if addr < kernel_end {
        return Err(LinuxBootError::InitrdTooLarge {
            size,
            kernel_end,
            limit,
        });
    }
    mem.write_slice(&bytes, GuestAddress(addr))?;
    Ok((addr, size))
}

fn write_zero_page(mem: &GuestMemoryMmap, params: &boot_params) -> Result<(), LinuxBootError> {
    // SAFETY: boot_params is a repr(C, packed) plain-old-data struct (integers and arrays
    // of them) with no padding, fully initialised from `default()`; viewing it as bytes
    // for its size reads only initialised memory, and the borrow outlives the slice.
    let bytes = unsafe {
        std::slice::from_raw_parts(
            (params as *const boot_params).cast::<u8>(),
            std::mem::size_of::<boot_params>(),
        )
    };
    mem.write_slice(bytes, GuestAddress(ZERO_PAGE_ADDR))?;
    Ok(())
}

/// Null, null, `__BOOT_CS` (64-bit code, DPL0), `__BOOT_DS` (data, DPL0).
pub fn linux_gdt() -> [u64; 4] {
    let t = gdt::entries();
    // entries(): [null, kernel code, kernel data, user code, user data].
    [0, 0, t[1], t[2]]
}

/// Puts the boot vCPU at the 64-bit entry of the kernel, at CPL0.
pub fn setup_boot_vcpu(fd: &VcpuFd, entry: &LinuxEntry) -> Result<(), VcpuError> {
    let io = |what| {
        move |source| VcpuError::Ioctl {
            vcpu: 0,
            what,
            source,
        }
    };
    let mut sregs = fd.get_sregs().map_err(io("KVM_GET_SREGS"))?;
    let table = linux_gdt();
    let code = gdt::kvm_segment(&table, BOOT_CS);
    let data = gdt::kvm_segment(&table, BOOT_DS);
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.gdt.base = abi::GDT_ADDR;
    sregs.gdt.limit = (std::mem::size_of_val(&table) - 1) as u16;
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
    const CR0_PE: u64 = 1;
    const CR0_ET: u64 = 1 << 4;
    const CR0_PG: u64 = 1 << 31;
    const CR4_PAE: u64 = 1 << 5;
    const EFER_LME: u64 = 1 << 8;
    const EFER_LMA: u64 = 1 << 10;
    sregs.cr0 = CR0_PE | CR0_ET | CR0_PG;
    sregs.cr3 = abi::PML4_ADDR;
    sregs.cr4 = CR4_PAE;
    sregs.efer = EFER_LME | EFER_LMA;
    fd.set_sregs(&sregs).map_err(io("KVM_SET_SREGS"))?;

    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    fd.set_fpu(&fpu).map_err(io("KVM_SET_FPU"))?;

    // Fast strings on; MTRRs enabled with write-back as the default type (no variable
    // ranges), as firmware leaves them, so the kernel does not map RAM uncached.
    let msr = |index, data| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    };
    let msrs = Msrs::from_entries(&[
        msr(MSR_IA32_MISC_ENABLE, 1),
        msr(MSR_MTRR_DEF_TYPE, (1 << 11) | 6),
    ])
    .map_err(|e| VcpuError::BuildCpuid(0, e))?;
    let set = fd.set_msrs(&msrs).map_err(io("KVM_SET_MSRS"))?;
    if set != msrs.as_slice().len() {
        log::warn!("vCPU 0: KVM set only {set} of the boot MSRs");
    }

    let regs = kvm_regs {
        rip: entry.rip,
        rsp: BOOT_STACK,
        rbp: BOOT_STACK,
        rsi: ZERO_PAGE_ADDR,
        // Reserved bit 1 only: interrupts off, IOPL 0.
        rflags: 0x2,
        ..Default::default()
    };
    fd.set_regs(&regs).map_err(io("KVM_SET_REGS"))?;
    Ok(())
}
