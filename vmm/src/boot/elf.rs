//! A small, strict loader for the static test-guest ELF.
//!
//! linux-loader's ELF loader is written for vmlinux: it does not check that segments
//! stay clear of the VMM's boot structures or inside RAM, and leaves bss to the caller.
//! The guest image is untrusted input to the VMM, so this loader checks every header
//! field it uses and every segment range before writing any guest memory.

use std::path::{Path, PathBuf};

use twinrun_guest_abi as abi;
use vm_memory::{Bytes, GuestAddress};

use crate::vstate::memory::GuestMemoryMmap;

/// Largest guest ELF file accepted (debug info included).
pub const MAX_ELF_FILE: u64 = 256 << 20;

const EHDR_SIZE: usize = 64;
const PHDR_SIZE: usize = 56;
const ET_EXEC: u16 = 2;
const EM_X86_64: u16 = 62;
const PT_LOAD: u32 = 1;
const PT_DYNAMIC: u32 = 2;
const PT_INTERP: u32 = 3;
const PF_X: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum ElfError {
    #[error("cannot read guest ELF {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("guest ELF is {size} bytes; at most {MAX_ELF_FILE} are accepted")]
    FileTooLarge { size: u64 },
    #[error("not an ELF file (bad magic)")]
    BadMagic,
    #[error("not a 64-bit little-endian ELF version 1")]
    BadClass,
    #[error("ELF type {0} is not a static executable (ET_EXEC)")]
    NotExecutable(u16),
    #[error("ELF machine {0} is not x86-64")]
    BadMachine(u16),
    #[error("ELF header is truncated or its program header table is out of bounds")]
    Truncated,
    #[error("program header size {0} is not {PHDR_SIZE}")]
    BadPhentsize(u16),
    #[error(
        "the ELF is dynamically linked (has PT_INTERP or PT_DYNAMIC); the guest must be static"
    )]
    Dynamic,
    #[error("segment {index}: file range {offset:#x}+{filesz:#x} is outside the {len}-byte file")]
    SegmentOutsideFile {
        index: usize,
        offset: u64,
        filesz: u64,
        len: usize,
    },
    #[error("segment {index}: file size {filesz:#x} exceeds memory size {memsz:#x}")]
    FileszExceedsMemsz {
        index: usize,
        filesz: u64,
        memsz: u64,
    },
    #[error(
        "segment {index}: virtual {vaddr:#x} != physical {paddr:#x}; the guest is identity mapped"
    )]
    NotIdentity {
        index: usize,
        vaddr: u64,
        paddr: u64,
    },
    #[error(
        "segment {index}: [{start:#x}, {end:#x}) is outside guest RAM for the image \
         [{min:#x}, {max:#x}) (below is the VMM's boot area, above is the end of low RAM)"
    )]
    SegmentOutsideRam {
        index: usize,
        start: u64,
        end: u64,
        min: u64,
        max: u64,
    },
    #[error("segments {0} and {1} overlap")]
    Overlap(usize, usize),
    #[error("no loadable segment")]
    NoSegments,
    #[error("entry point {0:#x} is not inside an executable segment")]
    BadEntry(u64),
    #[error("writing the image into guest memory: {0}")]
    Memory(#[from] vm_memory::GuestMemoryError),
}

/// Where the image landed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoadedImage {
    pub entry: u64,
    /// First byte after the highest segment (bss included).
    pub end: u64,
}

#[derive(Clone, Copy, Debug)]
struct Segment {
    offset: u64,
    paddr: u64,
    filesz: u64,
    memsz: u64,
    exec: bool,
}

fn u16_at(b: &[u8], off: usize) -> Result<u16, ElfError> {
    b.get(off..off + 2)
        .map(|s| u16::from_le_bytes([s[0], s[1]]))
        .ok_or(ElfError::Truncated)
}

fn u32_at(b: &[u8], off: usize) -> Result<u32, ElfError> {
    let s = b.get(off..off + 4).ok_or(ElfError::Truncated)?;
    let mut a = [0u8; 4];
    a.copy_from_slice(s);
    Ok(u32::from_le_bytes(a))
}

fn u64_at(b: &[u8], off: usize) -> Result<u64, ElfError> {
    let s = b.get(off..off + 8).ok_or(ElfError::Truncated)?;
    let mut a = [0u8; 8];
    a.copy_from_slice(s);
    Ok(u64::from_le_bytes(a))
}

/// Reads the ELF at `path` (bounded in size).
pub fn read_file(path: &Path) -> Result<Vec<u8>, ElfError> {
    let read_err = |source| ElfError::Read {
        path: path.to_owned(),
        source,
    };
    let meta = std::fs::metadata(path).map_err(read_err)?;
    if meta.len() > MAX_ELF_FILE {
        return Err(ElfError::FileTooLarge { size: meta.len() });
    }
    std::fs::read(path).map_err(read_err)
}

/// Validates `image` and loads it into `mem`. Segments must lie within
/// `[abi::IMAGE_BASE, ram_low_end)`; bss is zero-filled.
pub fn load(
    mem: &GuestMemoryMmap,
    image: &[u8],
    ram_low_end: u64,
) -> Result<LoadedImage, ElfError> {
    let segments = parse(image, ram_low_end)?;
    let mut end = 0;
    for s in &segments {
        let file = &image[s.offset as usize..(s.offset + s.filesz) as usize];
        mem.write_slice(file, GuestAddress(s.paddr))?;
        // bss: guest memory is fresh, but the image contract should not depend on it
        // (a reloaded image after a reset would otherwise see stale data).
        let mut addr = s.paddr + s.filesz;
        let seg_end = s.paddr + s.memsz;
        let zeros = [0u8; 4096];
        while addr < seg_end {
            let n = (seg_end - addr).min(zeros.len() as u64);
            mem.write_slice(&zeros[..n as usize], GuestAddress(addr))?;
            addr += n;
        }
        end = end.max(seg_end);
    }
    Ok(LoadedImage {
        entry: u64_at(image, 24)?,
        end,
    })
}

fn parse(b: &[u8], ram_low_end: u64) -> Result<Vec<Segment>, ElfError> {
    if b.len() < 4 || &b[..4] != b"\x7fELF" {
        return Err(ElfError::BadMagic);
    }
    if b.len() < EHDR_SIZE {
        return Err(ElfError::Truncated);
    }
    // EI_CLASS = 2 (64-bit), EI_DATA = 1 (little endian), EI_VERSION = 1.
    if b[4] != 2 || b[5] != 1 || b[6] != 1 {
        return Err(ElfError::BadClass);
    }
    let e_type = u16_at(b, 16)?;
    if e_type != ET_EXEC {
        return Err(ElfError::NotExecutable(e_type));
    }
    let machine = u16_at(b, 18)?;
    if machine != EM_X86_64 {
        return Err(ElfError::BadMachine(machine));
    }
    let entry = u64_at(b, 24)?;
    let phoff = u64_at(b, 32)?;
    let phentsize = u16_at(b, 54)?;
    let phnum = u16_at(b, 56)?;
    if phentsize as usize != PHDR_SIZE {
        return Err(ElfError::BadPhentsize(phentsize));
    }
    let table_end = phoff
        .checked_add(u64::from(phnum) * PHDR_SIZE as u64)
        .ok_or(ElfError::Truncated)?;
    if table_end > b.len() as u64 {
        return Err(ElfError::Truncated);
    }

    let (min, max) = (abi::IMAGE_BASE, ram_low_end);
    let mut segs: Vec<(usize, Segment)> = Vec::new();
    for index in 0..usize::from(phnum) {
        let h = phoff as usize + index * PHDR_SIZE;
        let p_type = u32_at(b, h)?;
        if p_type == PT_INTERP || p_type == PT_DYNAMIC {
            return Err(ElfError::Dynamic);
        }
        if p_type != PT_LOAD {
            continue;
        }
        let flags = u32_at(b, h + 4)?;
        let offset = u64_at(b, h + 8)?;
        let vaddr = u64_at(b, h + 16)?;
        let paddr = u64_at(b, h + 24)?;
        let filesz = u64_at(b, h + 32)?;
        let memsz = u64_at(b, h + 40)?;
        if memsz == 0 {
            continue;
        }
        if offset
            .checked_add(filesz)
            .is_none_or(|e| e > b.len() as u64)
        {
            return Err(ElfError::SegmentOutsideFile {
                index,
                offset,
                filesz,
                len: b.len(),
            });
        }
        if filesz > memsz {
            return Err(ElfError::FileszExceedsMemsz {
                index,
                filesz,
                memsz,
            });
        }
        if vaddr != paddr {
            return Err(ElfError::NotIdentity {
                index,
                vaddr,
                paddr,
            });
        }
        let end = paddr.checked_add(memsz);
        if paddr < min || end.is_none_or(|e| e > max) {
            return Err(ElfError::SegmentOutsideRam {
                index,
                start: paddr,
                end: end.unwrap_or(u64::MAX),
                min,
                max,
            });
        }
        segs.push((
            index,
            Segment {
                offset,
                paddr,
                filesz,
                memsz,
                exec: flags & PF_X != 0,
            },
        ));
    }
    if segs.is_empty() {
        return Err(ElfError::NoSegments);
    }
    segs.sort_by_key(|(_, s)| s.paddr);
    for w in segs.windows(2) {
        if w[0].1.paddr + w[0].1.memsz > w[1].1.paddr {
            return Err(ElfError::Overlap(w[0].0, w[1].0));
        }
    }
    if !segs
        .iter()
        .any(|(_, s)| s.exec && (s.paddr..s.paddr + s.memsz).contains(&entry))
    {
        return Err(ElfError::BadEntry(entry));
    }
    Ok(segs.into_iter().map(|(_, s)| s).collect())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::vstate::memory::create_guest_memory;

    /// A minimal static x86-64 ELF: one RX segment at `paddr` holding `code` with
    /// `bss` extra zero bytes, entered at its start.
    pub fn tiny_elf(paddr: u64, code: &[u8], bss: u64) -> Vec<u8> {
        let mut b = vec![0u8; EHDR_SIZE + PHDR_SIZE];
        b[..4].copy_from_slice(b"\x7fELF");
        b[4] = 2;
        b[5] = 1;
        b[6] = 1;
        b[16..18].copy_from_slice(&ET_EXEC.to_le_bytes());
        b[18..20].copy_from_slice(&EM_X86_64.to_le_bytes());
        b[20..24].copy_from_slice(&1u32.to_le_bytes());
        b[24..32].copy_from_slice(&paddr.to_le_bytes());
        b[32..40].copy_from_slice(&(EHDR_SIZE as u64).to_le_bytes());
        b[52..54].copy_from_slice(&(EHDR_SIZE as u16).to_le_bytes());
        b[54..56].copy_from_slice(&(PHDR_SIZE as u16).to_le_bytes());
        b[56..58].copy_from_slice(&1u16.to_le_bytes());
        let h = EHDR_SIZE;
        let off = (EHDR_SIZE + PHDR_SIZE) as u64;
        b[h..h + 4].copy_from_slice(&PT_LOAD.to_le_bytes());
        b[h + 4..h + 8].copy_from_slice(&(PF_X | 4).to_le_bytes());
        b[h + 8..h + 16].copy_from_slice(&off.to_le_bytes());
        b[h + 16..h + 24].copy_from_slice(&paddr.to_le_bytes());
        b[h + 24..h + 32].copy_from_slice(&paddr.to_le_bytes());
        b[h + 32..h + 40].copy_from_slice(&(code.len() as u64).to_le_bytes());
        b[h + 40..h + 48].copy_from_slice(&(code.len() as u64 + bss).to_le_bytes());
        b.extend_from_slice(code);
        b
    }

    #[test]
    fn loads_segments_and_zeroes_bss() {
        let mem = create_guest_memory(16 << 20).unwrap();
        // Dirty the bss area first to prove it gets cleared.
        mem.write_slice(&[0xaa; 64], GuestAddress(abi::IMAGE_BASE + 4))
            .unwrap();
        let elf = tiny_elf(abi::IMAGE_BASE, &[0x90, 0x90, 0xf4, 0xcc], 100);
        let img = load(&mem, &elf, 16 << 20).unwrap();
        assert_eq!(img.entry, abi::IMAGE_BASE);
        assert_eq!(img.end, abi::IMAGE_BASE + 104);
        let mut got = [0u8; 8];
        mem.read_slice(&mut got, GuestAddress(abi::IMAGE_BASE))
            .unwrap();
        assert_eq!(got, [0x90, 0x90, 0xf4, 0xcc, 0, 0, 0, 0]);
    }

    #[test]
    fn rejects_garbage_and_bad_headers() {
        let mem = create_guest_memory(16 << 20).unwrap();
        let end = 16 << 20;
        assert!(matches!(
            load(&mem, b"hello world", end),
            Err(ElfError::BadMagic)
        ));
        assert!(matches!(
            load(&mem, b"\x7fELF", end),
            Err(ElfError::Truncated)
        ));
        let good = tiny_elf(abi::IMAGE_BASE, &[0xf4], 0);
        let mut e = good.clone();
        e[4] = 1;
        assert!(matches!(load(&mem, &e, end), Err(ElfError::BadClass)));
        let mut e = good.clone();
        e[18] = 3;
        assert!(matches!(load(&mem, &e, end), Err(ElfError::BadMachine(3))));
        let mut e = good.clone();
        e[16] = 3;
        assert!(matches!(
            load(&mem, &e, end),
            Err(ElfError::NotExecutable(3))
        ));
        let mut e = good.clone();
        e[56] = 0xff; // 255 program headers: table beyond the file
        assert!(matches!(load(&mem, &e, end), Err(ElfError::Truncated)));
        let mut e = good.clone();
        e[24..32].copy_from_slice(&0x1234u64.to_le_bytes());
        assert!(matches!(
            load(&mem, &e, end),
            Err(ElfError::BadEntry(0x1234))
        ));
        let mut e = good.clone();
        e[EHDR_SIZE + 32..EHDR_SIZE + 40].copy_from_slice(&0x10_0000u64.to_le_bytes());
        assert!(matches!(
            load(&mem, &e, end),
            Err(ElfError::SegmentOutsideFile { .. })
        ));
        // Truncated file: last code byte missing.
        let e = &good[..good.len() - 1];
        assert!(matches!(
            load(&mem, e, end),
            Err(ElfError::SegmentOutsideFile { .. })
        ));
    }

    #[test]
    fn rejects_segments_outside_the_image_area() {
        let mem = create_guest_memory(16 << 20).unwrap();
        // Over the page tables.
        let e = tiny_elf(abi::PML4_ADDR, &[0xf4], 0);
        assert!(matches!(
            load(&mem, &e, 16 << 20),
            Err(ElfError::SegmentOutsideRam { .. })
        ));
        // Oversized: bss runs past the end of RAM.
        let e = tiny_elf(abi::IMAGE_BASE, &[0xf4], 64 << 20);
        assert!(matches!(
            load(&mem, &e, 16 << 20),
            Err(ElfError::SegmentOutsideRam { .. })
        ));
        // Wrapping size.
        let e = tiny_elf(abi::IMAGE_BASE, &[0xf4], u64::MAX - 4);
        assert!(matches!(
            load(&mem, &e, 16 << 20),
            Err(ElfError::SegmentOutsideRam { .. })
        ));
    }

    #[test]
    fn missing_file_is_a_read_error() {
        let r = read_file(Path::new("/nonexistent/twinrun-guest"));
        assert!(matches!(r, Err(ElfError::Read { .. })));
    }
}
