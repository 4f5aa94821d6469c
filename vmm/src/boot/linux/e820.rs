//! The e820 memory map a Linux guest is given.
//!
//! Low RAM below the EBDA, the EBDA and the BIOS area (where the ACPI tables are)
//! reserved, RAM from 1 MiB to the end of low RAM, the 32-bit MMIO gap (virtio-mmio
//! windows, IOAPIC, LAPIC) reserved, and RAM above 4 GiB.

use twinrun_guest_abi as abi;

pub const E820_RAM: u32 = 1;
pub const E820_RESERVED: u32 = 2;

/// Start of the Extended BIOS Data Area: low RAM ends here.
pub const EBDA_START: u64 = 0x9_fc00;
/// End of the legacy video / option ROM hole.
pub const LEGACY_END: u64 = 0xa_0000;
/// The BIOS area, where the ACPI tables live (the RSDP at its start).
pub const BIOS_START: u64 = 0xe_0000;
/// Where the kernel and everything above the legacy area go.
pub const HIMEM_START: u64 = 0x10_0000;

/// One e820 range: `[start, start + len)` of `kind` ([`E820_RAM`], [`E820_RESERVED`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct E820Entry {
    pub start: u64,
    pub len: u64,
    pub kind: u32,
}

/// The map for guest RAM ending at `low_end` below the gap and at `high_end` above
/// 4 GiB (0 when there is none).
pub fn map(low_end: u64, high_end: u64) -> Vec<E820Entry> {
    let e = |start: u64, end: u64, kind| E820Entry {
        start,
        len: end - start,
        kind,
    };
    let mut m = vec![
        e(0, EBDA_START, E820_RAM),
        e(EBDA_START, LEGACY_END, E820_RESERVED),
        e(BIOS_START, HIMEM_START, E820_RESERVED),
    ];
    if low_end > HIMEM_START {
        m.push(e(HIMEM_START, low_end, E820_RAM));
    }
    m.push(e(abi::RAM_GAP_START, abi::RAM_HIGH_START, E820_RESERVED));
    if high_end > abi::RAM_HIGH_START {
        m.push(e(abi::RAM_HIGH_START, high_end, E820_RAM));
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn map_of_small_and_large_guests() {
        let m = map(256 << 20, 0);
        let r: Vec<_> = m
            .iter()
            .map(|e| (e.start, e.start + e.len, e.kind))
            .collect();
        assert_eq!(
            r,
            vec![
                (0, 0x9fc00, 1),
                (0x9fc00, 0xa0000, 2),
                (0xe0000, 0x100000, 2),
                (0x100000, 0x1000_0000, 1),
                (0xc000_0000, 0x1_0000_0000, 2),
            ]
        );
        let m = map(abi::RAM_GAP_START, 0x1_4000_0000);
        assert_eq!(
            m.last().map(|e| (e.start, e.len)),
            Some((0x1_0000_0000, 1 << 30))
        );
        // Sorted and non-overlapping, as Linux expects.
        assert!(m.windows(2).all(|w| w[0].start + w[0].len <= w[1].start));
    }
}
