//! The guest's global descriptor table: flat 64-bit segments, kernel and user.
//!
//! The same table is written into guest memory and turned into the `kvm_segment`s
//! loaded into the vCPU, so the hidden segment state always matches the table.

use kvm_bindings::kvm_segment;
use twinrun_guest_abi as abi;
use vm_memory::{Bytes, GuestAddress};

use crate::vstate::memory::GuestMemoryMmap;

/// Builds a descriptor from its fields: `flags` are the G, D/B, L, AVL nibble,
/// `access` the P, DPL, S, type byte.
const fn descriptor(flags: u64, access: u64, base: u64, limit: u64) -> u64 {
    ((base & 0xff00_0000) << 32)
        | ((flags & 0xf) << 52)
        | ((limit & 0xf_0000) << 32)
        | ((access & 0xff) << 40)
        | ((base & 0x00ff_ffff) << 16)
        | (limit & 0xffff)
}

/// G=1, L=1: 64-bit code. G=1, D/B=1: 32-bit-sized data (ignored in long mode).
const FLAGS_CODE64: u64 = 0xa;
const FLAGS_DATA: u64 = 0xc;
/// P=1, S=1, execute/read (accessed); read/write (accessed); DPL in bits 5-6.
const ACCESS_CODE: u64 = 0x9b;
const ACCESS_DATA: u64 = 0x93;
const DPL3: u64 = 3 << 5;

/// Null, kernel code, kernel data, user code (DPL3), user data (DPL3), in the order of
/// the ABI's selectors.
pub const fn entries() -> [u64; 5] {
    [
        0,
        descriptor(FLAGS_CODE64, ACCESS_CODE, 0, 0xfffff),
        descriptor(FLAGS_DATA, ACCESS_DATA, 0, 0xfffff),
        descriptor(FLAGS_CODE64, ACCESS_CODE | DPL3, 0, 0xfffff),
        descriptor(FLAGS_DATA, ACCESS_DATA | DPL3, 0, 0xfffff),
    ]
}

/// The `kvm_segment` for `selector` as the CPU would load it from `table`.
pub fn kvm_segment(table: &[u64], selector: u16) -> kvm_segment {
    let d = table.get(usize::from(selector >> 3)).copied().unwrap_or(0);
    let base = ((d >> 16) & 0x00ff_ffff) | ((d >> 32) & 0xff00_0000);
    let raw_limit = (d & 0xffff) | ((d >> 32) & 0xf_0000);
    let g = ((d >> 55) & 1) as u8;
    // With G=1 the limit counts 4 KiB pages; KVM wants it in bytes.
    let limit = if g == 1 {
        ((raw_limit << 12) | 0xfff) as u32
    } else {
        raw_limit as u32
    };
    kvm_segment {
        base,
        limit,
        selector,
        type_: ((d >> 40) & 0xf) as u8,
        present: ((d >> 47) & 1) as u8,
        dpl: ((d >> 45) & 3) as u8,
        db: ((d >> 54) & 1) as u8,
        s: ((d >> 44) & 1) as u8,
        l: ((d >> 53) & 1) as u8,
        g,
        avl: ((d >> 52) & 1) as u8,
        unusable: u8::from((d >> 47) & 1 == 0),
        padding: 0,
    }
}

/// Writes the table at [`abi::GDT_ADDR`].
pub fn write(mem: &GuestMemoryMmap) -> Result<(), vm_memory::GuestMemoryError> {
    for (i, e) in entries().iter().enumerate() {
        mem.write_obj(*e, GuestAddress(abi::GDT_ADDR + 8 * i as u64))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptors_match_known_encodings() {
        let t = entries();
        assert_eq!(t[1], 0x00af_9b00_0000_ffff);
        assert_eq!(t[2], 0x00cf_9300_0000_ffff);
        assert_eq!(t[3], 0x00af_fb00_0000_ffff);
        assert_eq!(t[4], 0x00cf_f300_0000_ffff);
    }

    #[test]
    fn user_segments_decode() {
        let t = entries();
        let cs = kvm_segment(&t, abi::GDT_USER_CODE);
        assert_eq!(
            (cs.dpl, cs.l, cs.db, cs.type_, cs.present),
            (3, 1, 0, 11, 1)
        );
        assert_eq!(cs.limit, 0xffff_ffff);
        assert_eq!(cs.selector, 0x1b);
        let ds = kvm_segment(&t, abi::GDT_USER_DATA);
        assert_eq!((ds.dpl, ds.l, ds.db, ds.type_, ds.s), (3, 0, 1, 3, 1));
        assert_eq!(ds.unusable, 0);
    }
}
