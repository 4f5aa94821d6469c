//! Loading the test guest: ELF segments, GDT, page tables and the parameter block.

pub mod elf;
pub mod gdt;
pub mod linux;
pub mod paging;
pub mod params;

use twinrun_guest_abi as abi;
use vm_memory::{Bytes, GuestAddress};

use crate::vstate::memory::{ram_bounds, GuestMemoryMmap};

pub use elf::{ElfError, LoadedImage};
pub use paging::PagingError;
pub use params::{BootFacts, ParamsError};

const TWO_MIB: u64 = 2 << 20;

#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error(transparent)]
    Elf(#[from] ElfError),
    #[error("page tables: {0}")]
    Paging(#[from] PagingError),
    #[error("parameter block: {0}")]
    Params(#[from] ParamsError),
    #[error("guest memory too small: needs at least {need:#x} bytes of low RAM, has {have:#x}")]
    MemoryTooSmall { need: u64, have: u64 },
    #[error("image is empty")]
    EmptyImage,
    #[error("writing boot structures: {0}")]
    Memory(#[from] vm_memory::GuestMemoryError),
}

/// What to boot.
#[derive(Clone, Copy, Debug)]
pub enum Image<'a> {
    /// A static x86-64 ELF (the test guest), as file bytes.
    Elf(&'a [u8]),
    /// Flat code loaded at [`abi::IMAGE_BASE`] and entered there (hand-assembled test
    /// guests).
    Flat(&'a [u8]),
}

/// Loads the image and writes the GDT and page tables. Returns where the image is.
/// The parameter block is written separately ([`write_params`]) once the devices and
/// TSC frequency are known.
pub fn load(mem: &GuestMemoryMmap, image: Image<'_>) -> Result<LoadedImage, BootError> {
    let (low_end, high_end) = ram_bounds(mem);
    // Boot area, stack, and at least one 2 MiB page for the image.
    let need = abi::IMAGE_BASE + TWO_MIB;
    if low_end < need {
        return Err(BootError::MemoryTooSmall {
            need,
            have: low_end,
        });
    }
    let loaded = match image {
        Image::Elf(bytes) => elf::load(mem, bytes, low_end)?,
        Image::Flat(code) => {
            if code.is_empty() {
                return Err(BootError::EmptyImage);
            }
            let end = abi::IMAGE_BASE + code.len() as u64;
            if end > low_end {
                return Err(BootError::MemoryTooSmall {
                    need: end,
                    have: low_end,
                });
            }
            mem.write_slice(code, GuestAddress(abi::IMAGE_BASE))?;
            LoadedImage {
                entry: abi::IMAGE_BASE,
                end,
            }
        }
    };
    gdt::write(mem)?;
    let mut ranges = vec![paging::MapRange {
        start: 0,
        end: low_end,
        uncached: false,
    }];
    if high_end > 0 {
        ranges.push(paging::MapRange {
            start: abi::RAM_HIGH_START,
            end: high_end,
            uncached: false,
        });
    }
    ranges.push(paging::MapRange {
        start: abi::MMIO_BASE,
        end: abi::MMIO_BASE + abi::MAX_DEVICES as u64 * abi::MMIO_WINDOW_SIZE,
        uncached: true,
    });
    paging::write(mem, &ranges)?;
    Ok(loaded)
}

/// First free byte after the image, 2 MiB aligned.
pub fn free_base(image: &LoadedImage) -> u64 {
    image.end.div_ceil(TWO_MIB) * TWO_MIB
}

/// Writes the parameter block at [`abi::PARAMS_ADDR`].
pub fn write_params(mem: &GuestMemoryMmap, params: &abi::Params) -> Result<(), BootError> {
    mem.write_slice(params.as_bytes(), GuestAddress(abi::PARAMS_ADDR))?;
    Ok(())
}
