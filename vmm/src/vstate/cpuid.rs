//! Per-vCPU CPUID: what KVM supports, with a consistent topology and APIC ids.
//!
//! Topology: one socket, one thread per core, `vcpus` cores. vCPU `i` has (x2)APIC id
//! `i`. Every leaf that describes topology says the same thing, so a guest OS that
//! enumerates CPUs from CPUID agrees with what the VMM created.

use kvm_bindings::{kvm_cpuid_entry2, CpuId, KVM_CPUID_FLAG_SIGNIFCANT_INDEX};
use twinrun_guest_abi as abi;

/// CPUID.1:ECX bit 31 — running under a hypervisor.
const LEAF1_ECX_HYPERVISOR: u32 = 1 << 31;
/// CPUID.1:EDX bit 28 — more than one logical processor per package.
const LEAF1_EDX_HTT: u32 = 1 << 28;
/// Level types of leaves 0xB / 0x1F.
const LEVEL_TYPE_SMT: u32 = 1;
const LEVEL_TYPE_CORE: u32 = 2;

/// Bits needed to number `n` items (`ceil(log2(n))`).
fn id_bits(n: u32) -> u32 {
    if n <= 1 {
        0
    } else {
        32 - (n - 1).leading_zeros()
    }
}

/// Adjusts `base` (from `KVM_GET_SUPPORTED_CPUID`) for vCPU `index` of `vcpus`.
pub fn for_vcpu(base: &CpuId, index: u8, vcpus: u8) -> Result<CpuId, vmm_sys_util::fam::Error> {
    let apic_id = u32::from(index);
    let n = u32::from(vcpus.max(1));
    let core_bits = id_bits(n);
    let max_basic = base
        .as_slice()
        .iter()
        .find(|e| e.function == 0)
        .map_or(0, |e| e.eax);

    let mut entries: Vec<kvm_cpuid_entry2> = base
        .as_slice()
        .iter()
        .filter(|e| e.function != 0xb && e.function != 0x1f)
        .copied()
        .collect();

    for e in entries.iter_mut() {
        match e.function {
            1 => {
                // EBX[31:24] initial APIC id, EBX[23:16] logical processors per package
                // (rounded to a power of two, as the id space is).
                let logical = (1u32 << core_bits).min(255);
                e.ebx = (e.ebx & 0x0000_ffff) | (apic_id << 24) | (logical << 16);
                if n > 1 {
                    e.edx |= LEAF1_EDX_HTT;
                } else {
                    e.edx &= !LEAF1_EDX_HTT;
                }
                e.ecx |= LEAF1_ECX_HYPERVISOR;
            }
            4 => {
                // Deterministic cache parameters: EAX[31:26] = cores per package - 1;
                // EAX[25:14] = threads sharing this cache - 1 (1 thread per core, so
                // per-core caches are not shared; level-3 is shared by all).
                let cache_level = (e.eax >> 5) & 0x7;
                let sharing = if cache_level >= 3 {
                    (1 << core_bits) - 1
                } else {
                    0
                };
                let cores = (1u32 << core_bits) - 1;
                e.eax = (e.eax & 0x3fff) | (sharing << 14) | (cores.min(63) << 26);
            }
            0x8000_0008 => {
                // AMD: ECX[7:0] cores - 1, ECX[15:12] APIC id bits for the core id.
                e.ecx = (e.ecx & !0xf0ff) | (n - 1) | (core_bits << 12);
            }
            0x8000_001e => {
                // AMD extended APIC id, core id, one thread per core.
                e.eax = apic_id;
                e.ebx = apic_id & 0xff;
                e.ecx = 0;
            }
            _ => {}
        }
    }

    // Extended topology (0xB, and 0x1F where the max basic leaf reaches it): SMT level
    // with one thread, then a core level with all vCPUs, then the invalid terminator.
    // EDX always holds the x2APIC id.
    for leaf in [0xbu32, 0x1f] {
        if max_basic < leaf {
            continue;
        }
        let levels = [
            (0u32, 1u32, LEVEL_TYPE_SMT),
            (core_bits, n, LEVEL_TYPE_CORE),
            (0, 0, 0),
        ];
        for (sub, (shift, count, kind)) in levels.into_iter().enumerate() {
            let sub = sub as u32;
            entries.push(kvm_cpuid_entry2 {
                function: leaf,
                index: sub,
                flags: KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
                eax: shift,
                ebx: count,
                ecx: sub | (kind << 8),
                edx: apic_id,
                ..Default::default()
            });
        }
    }
    entries.push(twinrun_leaf());
    CpuId::from_entries(&entries)
}

/// The leaf that names this VMM ([`abi::CPUID_TWINRUN_LEAF`]): lets guest code tell
/// whether its CPUID is answered by this table or (unintercepted CPL3 `cpuid` on some
/// software KVMs) by the host CPU.
fn twinrun_leaf() -> kvm_cpuid_entry2 {
    let sig = abi::CPUID_TWINRUN_SIGNATURE;
    let word = |i: usize| u32::from_le_bytes([sig[i], sig[i + 1], sig[i + 2], sig[i + 3]]);
    kvm_cpuid_entry2 {
        function: abi::CPUID_TWINRUN_LEAF,
        index: 0,
        flags: 0,
        eax: abi::CPUID_TWINRUN_LEAF,
        ebx: word(0),
        ecx: word(4),
        edx: word(8),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            ..Default::default()
        }
    }

    #[test]
    fn apic_ids_and_topology_are_per_vcpu() {
        let mut leaf0 = entry(0, 0);
        leaf0.eax = 0x1c;
        let base = CpuId::from_entries(&[leaf0, entry(1, 0), entry(0xb, 0)]).unwrap();
        let c = for_vcpu(&base, 5, 6).unwrap();
        let l1 = c.as_slice().iter().find(|e| e.function == 1).unwrap();
        assert_eq!(l1.ebx >> 24, 5);
        assert_eq!((l1.ebx >> 16) & 0xff, 8);
        assert_ne!(l1.edx & LEAF1_EDX_HTT, 0);
        let xb: Vec<_> = c.as_slice().iter().filter(|e| e.function == 0xb).collect();
        assert_eq!(xb.len(), 3);
        assert!(xb.iter().all(|e| e.edx == 5));
        assert_eq!((xb[1].eax, xb[1].ebx, xb[1].ecx), (3, 6, 1 | (2 << 8)));
        assert_eq!(xb[2].ecx >> 8, 0);
        // 0x1F is beyond this CPU's max leaf: not invented.
        assert!(!c.as_slice().iter().any(|e| e.function == 0x1f));
        assert_eq!(id_bits(1), 0);
        assert_eq!(id_bits(2), 1);
        assert_eq!(id_bits(32), 5);
        // The twinrun leaf, once, with its signature.
        let tw: Vec<_> = c
            .as_slice()
            .iter()
            .filter(|e| e.function == abi::CPUID_TWINRUN_LEAF)
            .collect();
        assert_eq!(tw.len(), 1);
        let mut sig = Vec::new();
        for r in [tw[0].ebx, tw[0].ecx, tw[0].edx] {
            sig.extend_from_slice(&r.to_le_bytes());
        }
        assert_eq!(sig, abi::CPUID_TWINRUN_SIGNATURE);
        assert_eq!(tw[0].eax, abi::CPUID_TWINRUN_LEAF);
    }
}
