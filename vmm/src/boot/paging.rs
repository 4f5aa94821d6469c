//! Identity-mapped page tables with 2 MiB pages, user-accessible at every level.
//!
//! One PML4 and one PDPT; page directory `i` (at `PD_ADDR + i * 4 KiB`) maps GiB `i`.
//! Only guest RAM and the virtio-mmio windows are mapped, so a stray access anywhere
//! else faults (and is reported as a triple fault) instead of silently reading zeros.

use twinrun_guest_abi as abi;
use vm_memory::{Bytes, GuestAddress};

use crate::vstate::memory::GuestMemoryMmap;

const PRESENT: u64 = 1 << 0;
const WRITABLE: u64 = 1 << 1;
const USER: u64 = 1 << 2;
const PWT: u64 = 1 << 3;
const PCD: u64 = 1 << 4;
const PAGE_SIZE_2M: u64 = 1 << 7;
const TABLE: u64 = PRESENT | WRITABLE | USER;
const TWO_MIB: u64 = 2 << 20;
const GIB: u64 = 1 << 30;

#[derive(Debug, thiserror::Error)]
pub enum PagingError {
    #[error("{0:#x} is beyond the {max} GiB the page tables can map", max = abi::MAX_MAPPED_GIB)]
    OutOfRange(u64),
    #[error("writing page tables: {0}")]
    Write(#[from] vm_memory::GuestMemoryError),
}

/// One range to identity-map, and whether it is device memory (uncached).
#[derive(Clone, Copy, Debug)]
pub struct MapRange {
    pub start: u64,
    pub end: u64,
    pub uncached: bool,
}

/// Writes PML4, PDPT and page directories mapping `ranges` (rounded out to 2 MiB).
pub fn write(mem: &GuestMemoryMmap, ranges: &[MapRange]) -> Result<(), PagingError> {
    let limit = abi::MAX_MAPPED_GIB * GIB;
    let mut pdpt = [0u64; 512];
    for r in ranges {
        if r.end > limit {
            return Err(PagingError::OutOfRange(r.end));
        }
        let mut page = r.start & !(TWO_MIB - 1);
        while page < r.end {
            let gib = page / GIB;
            let pd = abi::PD_ADDR + gib * abi::PAGE_SIZE;
            let mut flags = PRESENT | WRITABLE | USER | PAGE_SIZE_2M;
            if r.uncached {
                flags |= PCD | PWT;
            }
            let slot = (page % GIB) / TWO_MIB;
            mem.write_obj(page | flags, GuestAddress(pd + slot * 8))?;
            pdpt[gib as usize] = pd | TABLE;
            page += TWO_MIB;
        }
    }
    for (i, e) in pdpt.iter().enumerate() {
        mem.write_obj(*e, GuestAddress(abi::PDPT_ADDR + 8 * i as u64))?;
    }
    mem.write_obj(abi::PDPT_ADDR | TABLE, GuestAddress(abi::PML4_ADDR))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vstate::memory::create_guest_memory;

    #[test]
    fn maps_ram_and_mmio() {
        let mem = create_guest_memory(64 << 20).unwrap();
        let ranges = [
            MapRange {
                start: 0,
                end: 64 << 20,
                uncached: false,
            },
            MapRange {
                start: abi::MMIO_BASE,
                end: abi::MMIO_BASE + 0x8000,
                uncached: true,
            },
        ];
        write(&mem, &ranges).unwrap();
        let rd = |a: u64| mem.read_obj::<u64>(GuestAddress(a)).unwrap();
        assert_eq!(rd(abi::PML4_ADDR), abi::PDPT_ADDR | 7);
        assert_eq!(rd(abi::PDPT_ADDR), abi::PD_ADDR | 7);
        assert_eq!(rd(abi::PDPT_ADDR + 8), 0);
        assert_eq!(rd(abi::PDPT_ADDR + 24), (abi::PD_ADDR + 3 * 4096) | 7);
        assert_eq!(rd(abi::PD_ADDR + 8 * 31), (31 * TWO_MIB) | 0x87);
        assert_eq!(rd(abi::PD_ADDR + 8 * 32), 0);
        let slot = (abi::MMIO_BASE % GIB) / TWO_MIB;
        assert_eq!(
            rd(abi::PD_ADDR + 3 * 4096 + 8 * slot),
            abi::MMIO_BASE | 0x9f
        );
        let too_far = [MapRange {
            start: 0,
            end: 65 * GIB,
            uncached: false,
        }];
        assert!(matches!(
            write(&mem, &too_far),
            Err(PagingError::OutOfRange(_))
        ));
    }
}
