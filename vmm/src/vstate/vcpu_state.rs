//! The state of one vCPU as KVM holds it: CPUID, registers, special registers,
//! FPU/SSE/AVX (XSAVE), XCRs, debug registers, LAPIC, MSRs, multiprocessing state and
//! pending events.
//!
//! MSRs: the list is KVM's own (`KVM_GET_MSR_INDEX_LIST`) plus the MTRRs and PAT,
//! which KVM emulates but does not list. `KVM_GET_MSRS`/`KVM_SET_MSRS` stop at the first
//! MSR they cannot handle and return how many they did; every such MSR is skipped and
//! reported (readable on capture, settable on restore), never silently dropped: some
//! listed MSRs cannot be set on some hosts (e.g. `IA32_ARCH_CAPABILITIES`, 0x10a).
//!
//! Capture runs on a vCPU that KVM is not running (parked, after a `KVM_RUN` that
//! completed any half-done I/O exit). Restore goes in the order KVM needs: CPUID first
//! (it decides which registers and MSRs are valid), special registers before the LAPIC
//! (APIC base), the LAPIC before the MSRs (a TSC deadline is only kept in deadline
//! mode), and the vCPU events last.

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_debugregs, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs,
    kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, kvm_xsave2, CpuId, Msrs, Xsave,
    KVM_MAX_CPUID_ENTRIES, KVM_MAX_MSR_ENTRIES, KVM_VCPUEVENT_VALID_NMI_PENDING,
    KVM_VCPUEVENT_VALID_SIPI_VECTOR,
};
use std::sync::Arc;

use kvm_ioctls::{Cap, Kvm, VcpuFd};
use serde::{Deserialize, Serialize};
use vmm_sys_util::fam::FamStruct;

/// MSRs KVM emulates without listing them: the MTRRs and PAT. MTRRcap (0xfe) is
/// read-only and derived from CPUID, so it is not kept.
const UNLISTED_MSRS: &[u32] = &[
    0x200, 0x201, 0x202, 0x203, 0x204, 0x205, 0x206, 0x207, // variable MTRRs 0-3
    0x208, 0x209, 0x20a, 0x20b, 0x20c, 0x20d, 0x20e, 0x20f, // variable MTRRs 4-7
    0x250, 0x258, 0x259, // fixed MTRRs 64K, 16K
    0x268, 0x269, 0x26a, 0x26b, 0x26c, 0x26d, 0x26e, 0x26f, // fixed MTRRs 4K
    0x277, // PAT
    0x2ff, // MTRRdefType
];

/// Words in the legacy 4 KiB `kvm_xsave` region.
const XSAVE_REGION_WORDS: usize = 1024;

#[derive(Debug, thiserror::Error)]
pub enum VcpuStateError {
    #[error("vCPU {vcpu}: {what}: {source}")]
    Ioctl {
        vcpu: u8,
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("KVM_GET_MSR_INDEX_LIST: {0}")]
    MsrList(kvm_ioctls::Error),
    #[error("vCPU {vcpu}: building a KVM array for {what}: {source:?}")]
    Fam {
        vcpu: u8,
        what: &'static str,
        source: vmm_sys_util::fam::Error,
    },
    #[error(
        "vCPU {vcpu}: XSAVE state is {saved} bytes, this host's KVM handles {host} (different CPU features)"
    )]
    XsaveSize { vcpu: u8, saved: usize, host: usize },
    #[error("vCPU {vcpu}: the host has no KVM_CAP_XCRS but the state holds XCRs")]
    NoXcrs { vcpu: u8 },
}

/// One MSR and its value.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsrValue {
    pub index: u32,
    pub data: u64,
}

/// Everything KVM keeps for one vCPU.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VcpuState {
    pub index: u8,
    pub cpuid: Vec<kvm_cpuid_entry2>,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    /// The XSAVE area as `KVM_GET_XSAVE(2)` returns it: the 4 KiB region, plus more
    /// words where `KVM_CAP_XSAVE2` says the host's area is larger (AMX).
    pub xsave: Vec<u32>,
    /// `None` when the host has no `KVM_CAP_XCRS`.
    pub xcrs: Option<kvm_xcrs>,
    pub debug_regs: kvm_debugregs,
    pub lapic: kvm_lapic_state,
    pub msrs: Vec<MsrValue>,
    /// Listed MSRs KVM would not read for this vCPU (they are not in `msrs`).
    pub unreadable_msrs: Vec<u32>,
    pub mp_state: kvm_mp_state,
    pub events: kvm_vcpu_events,
    /// The vCPU's TSC frequency, when KVM knows it.
    pub tsc_khz: Option<u32>,
}

/// An MSR that KVM refused to set on restore.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RefusedMsr {
    pub vcpu: u8,
    pub index: u32,
    pub data: u64,
}

/// What a vCPU restore could not do exactly; the rest is restored.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VcpuRestoreReport {
    pub refused_msrs: Vec<RefusedMsr>,
    /// `(saved, host)` when the saved TSC frequency could not be set here: the guest
    /// then sees its TSC run at a different rate.
    pub tsc_khz_mismatch: Option<(u32, u32)>,
}

/// The MSRs to save: KVM's list plus [`UNLISTED_MSRS`], sorted, without duplicates.
pub fn msrs_to_save(kvm: &Kvm) -> Result<Vec<u32>, VcpuStateError> {
    let list = kvm.get_msr_index_list().map_err(VcpuStateError::MsrList)?;
    let mut v: Vec<u32> = list.as_slice().to_vec();
    v.extend_from_slice(UNLISTED_MSRS);
    v.sort_unstable();
    v.dedup();
    Ok(v)
}

/// What every capture needs from the host, probed once per VM: the MSR list, the
/// XSAVE area size and whether XCRs exist do not change while the process runs.
#[derive(Clone, Debug)]
pub struct CaptureSpec {
    pub msrs: Arc<[u32]>,
    pub xsave_bytes: usize,
    pub has_xcrs: bool,
}

impl CaptureSpec {
    pub fn probe(kvm: &Kvm) -> Result<CaptureSpec, VcpuStateError> {
        Ok(CaptureSpec {
            msrs: msrs_to_save(kvm)?.into(),
            xsave_bytes: xsave_size(kvm),
            has_xcrs: kvm.check_extension(Cap::Xcrs),
        })
    }
}

/// The part of a vCPU's state that cannot change once it has run: its CPUID (KVM
/// refuses a different one after the first `KVM_RUN`; the bits KVM derives at run
/// time, such as OSXSAVE, are derived again from CR4 and XCR0 on restore) and its TSC
/// frequency. A checkpoint reads them at the first capture and reuses them, which
/// saves two ioctls per vCPU per epoch.
#[derive(Clone, Debug)]
pub struct VcpuConstants {
    pub cpuid: Vec<kvm_cpuid_entry2>,
    pub tsc_khz: Option<u32>,
}

/// Size in bytes of the host's XSAVE area for `KVM_GET_XSAVE2`, or 0 when the legacy
/// 4 KiB `KVM_GET_XSAVE` covers it.
pub fn xsave_size(kvm: &Kvm) -> usize {
    let n = kvm.check_extension_int(Cap::Xsave2);
    usize::try_from(n).unwrap_or(0)
}

/// Extra `u32` words beyond the 4 KiB region for an XSAVE area of `bytes`.
fn xsave_fam_len(bytes: usize) -> usize {
    bytes
        .saturating_sub(std::mem::size_of::<kvm_xsave>())
        .div_ceil(std::mem::size_of::<<kvm_xsave2 as FamStruct>::Entry>())
}

fn ioctl(vcpu: u8, what: &'static str) -> impl Fn(kvm_ioctls::Error) -> VcpuStateError {
    move |source| VcpuStateError::Ioctl { vcpu, what, source }
}

fn fam(vcpu: u8, what: &'static str) -> impl Fn(vmm_sys_util::fam::Error) -> VcpuStateError {
    move |source| VcpuStateError::Fam { vcpu, what, source }
}

/// Reads the MSRs in `indices`; returns the values read and the indices KVM refused.
fn read_msrs(
    fd: &VcpuFd,
    vcpu: u8,
    indices: &[u32],
) -> Result<(Vec<MsrValue>, Vec<u32>), VcpuStateError> {
    let mut values = Vec::with_capacity(indices.len());
    let mut refused = Vec::new();
    let mut rest = indices;
    while !rest.is_empty() {
        let chunk = &rest[..rest.len().min(KVM_MAX_MSR_ENTRIES)];
        let entries: Vec<kvm_msr_entry> = chunk
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries).map_err(fam(vcpu, "KVM_GET_MSRS"))?;
        let n = fd
            .get_msrs(&mut msrs)
            .map_err(ioctl(vcpu, "KVM_GET_MSRS"))?;
        let n = n.min(chunk.len());
        values.extend(msrs.as_slice()[..n].iter().map(|e| MsrValue {
            index: e.index,
            data: e.data,
        }));
        // KVM stopped at entry n: it cannot read that one. Skip it and go on.
        let mut next = n;
        if n < chunk.len() {
            refused.push(chunk[n]);
            next += 1;
        }
        rest = &rest[next..];
    }
    Ok((values, refused))
}

/// Writes `values`; returns the ones KVM refused.
fn write_msrs(
    fd: &VcpuFd,
    vcpu: u8,
    values: &[MsrValue],
) -> Result<Vec<RefusedMsr>, VcpuStateError> {
    let mut refused = Vec::new();
    let mut rest = values;
    while !rest.is_empty() {
        let chunk = &rest[..rest.len().min(KVM_MAX_MSR_ENTRIES)];
        let entries: Vec<kvm_msr_entry> = chunk
            .iter()
            .map(|m| kvm_msr_entry {
                index: m.index,
                data: m.data,
                ..Default::default()
            })
            .collect();
        let msrs = Msrs::from_entries(&entries).map_err(fam(vcpu, "KVM_SET_MSRS"))?;
        let n = fd.set_msrs(&msrs).map_err(ioctl(vcpu, "KVM_SET_MSRS"))?;
        let n = n.min(chunk.len());
        let mut next = n;
        if n < chunk.len() {
            let m = chunk[n];
            log::warn!(
                "vCPU {vcpu}: KVM refused to restore MSR {:#x} = {:#x}; it keeps KVM's value",
                m.index,
                m.data
            );
            refused.push(RefusedMsr {
                vcpu,
                index: m.index,
                data: m.data,
            });
            next += 1;
        }
        rest = &rest[next..];
    }
    Ok(refused)
}

impl VcpuState {
    /// Reads the state of vCPU `index` from `fd`, which KVM must not be running.
    /// `constants` (from an earlier capture of the same vCPU, see [`VcpuConstants`])
    /// spares reading CPUID and the TSC frequency again.
    pub fn capture(
        fd: &VcpuFd,
        index: u8,
        spec: &CaptureSpec,
        constants: Option<&VcpuConstants>,
    ) -> Result<VcpuState, VcpuStateError> {
        let io = |what| ioctl(index, what);
        let (cpuid, tsc_khz) = match constants {
            Some(c) => (c.cpuid.clone(), c.tsc_khz),
            None => (
                fd.get_cpuid2(KVM_MAX_CPUID_ENTRIES)
                    .map_err(io("KVM_GET_CPUID2"))?
                    .as_slice()
                    .to_vec(),
                fd.get_tsc_khz().ok(),
            ),
        };
        let mp_state = fd.get_mp_state().map_err(io("KVM_GET_MP_STATE"))?;
        let regs = fd.get_regs().map_err(io("KVM_GET_REGS"))?;
        let sregs = fd.get_sregs().map_err(io("KVM_GET_SREGS"))?;
        let xsave = Self::get_xsave(fd, index, spec.xsave_bytes)?;
        let xcrs = if spec.has_xcrs {
            Some(fd.get_xcrs().map_err(io("KVM_GET_XCRS"))?)
        } else {
            None
        };
        let debug_regs = fd.get_debug_regs().map_err(io("KVM_GET_DEBUGREGS"))?;
        let lapic = fd.get_lapic().map_err(io("KVM_GET_LAPIC"))?;
        let (msrs, unreadable_msrs) = read_msrs(fd, index, &spec.msrs)?;
        if !unreadable_msrs.is_empty() {
            log::debug!("vCPU {index}: MSRs KVM lists but will not read: {unreadable_msrs:x?}");
        }
        // Last, as KVM's own order has it: reading the rest does not change the events.
        let events = fd.get_vcpu_events().map_err(io("KVM_GET_VCPU_EVENTS"))?;
        Ok(VcpuState {
            index,
            cpuid,
            regs,
            sregs,
            xsave,
            xcrs,
            debug_regs,
            lapic,
            msrs,
            unreadable_msrs,
            mp_state,
            events,
            tsc_khz,
        })
    }

    /// What later captures of this vCPU may reuse.
    pub fn constants(&self) -> VcpuConstants {
        VcpuConstants {
            cpuid: self.cpuid.clone(),
            tsc_khz: self.tsc_khz,
        }
    }

    fn get_xsave(fd: &VcpuFd, vcpu: u8, xsave_bytes: usize) -> Result<Vec<u32>, VcpuStateError> {
        let extra = xsave_fam_len(xsave_bytes);
        if extra == 0 {
            let x = fd.get_xsave().map_err(ioctl(vcpu, "KVM_GET_XSAVE"))?;
            return Ok(x.region.to_vec());
        }
        let mut x = Xsave::new(extra).map_err(fam(vcpu, "KVM_GET_XSAVE2"))?;
        // SAFETY: `x` has room for `xsave_bytes`, the size KVM_CAP_XSAVE2 reported for
        // this process, so the kernel writes inside it.
        unsafe { fd.get_xsave2(&mut x) }.map_err(ioctl(vcpu, "KVM_GET_XSAVE2"))?;
        let mut v = x.as_fam_struct_ref().xsave.region.to_vec();
        v.extend_from_slice(x.as_slice());
        Ok(v)
    }

    fn set_xsave(&self, fd: &VcpuFd, xsave_bytes: usize) -> Result<(), VcpuStateError> {
        let vcpu = self.index;
        let extra = self.xsave.len().saturating_sub(XSAVE_REGION_WORDS);
        let host_extra = xsave_fam_len(xsave_bytes);
        if self.xsave.len() < XSAVE_REGION_WORDS || extra > host_extra {
            return Err(VcpuStateError::XsaveSize {
                vcpu,
                saved: self.xsave.len() * 4,
                host: xsave_bytes.max(std::mem::size_of::<kvm_xsave>()),
            });
        }
        if host_extra == 0 {
            let mut x = kvm_xsave::default();
            x.region.copy_from_slice(&self.xsave[..XSAVE_REGION_WORDS]);
            // SAFETY: the host's XSAVE area fits the 4 KiB kvm_xsave (no
            // KVM_CAP_XSAVE2 size beyond it), so KVM reads only inside `x`.
            unsafe { fd.set_xsave(&x) }.map_err(ioctl(vcpu, "KVM_SET_XSAVE"))?;
            return Ok(());
        }
        // The host's area is larger: hand KVM a buffer of its size, zero beyond what
        // was saved (those components were in their init state on the source).
        let mut x = Xsave::new(host_extra).map_err(fam(vcpu, "KVM_SET_XSAVE2"))?;
        // SAFETY: only the fixed `region` is written; the FAM length the wrapper
        // relies on is left alone.
        unsafe { x.as_mut_fam_struct() }
            .xsave
            .region
            .copy_from_slice(&self.xsave[..XSAVE_REGION_WORDS]);
        x.as_mut_slice()[..extra].copy_from_slice(&self.xsave[XSAVE_REGION_WORDS..]);
        // SAFETY: `x` is as large as KVM_CAP_XSAVE2 says KVM reads.
        unsafe { fd.set_xsave2(&x) }.map_err(ioctl(vcpu, "KVM_SET_XSAVE2"))?;
        Ok(())
    }

    /// Loads this state into `fd`, a vCPU created for it and not yet run. MSRs KVM
    /// refuses are reported, not fatal; anything else KVM refuses is an error.
    pub fn restore(
        &self,
        fd: &VcpuFd,
        xsave_bytes: usize,
        has_xcrs: bool,
    ) -> Result<VcpuRestoreReport, VcpuStateError> {
        let vcpu = self.index;
        let io = |what| ioctl(vcpu, what);
        let mut report = VcpuRestoreReport::default();
        let cpuid = CpuId::from_entries(&self.cpuid).map_err(fam(vcpu, "KVM_SET_CPUID2"))?;
        fd.set_cpuid2(&cpuid).map_err(io("KVM_SET_CPUID2"))?;
        if let Some(saved) = self.tsc_khz {
            let host = fd.get_tsc_khz().unwrap_or(0);
            if host != saved && fd.set_tsc_khz(saved).is_err() {
                log::warn!(
                    "vCPU {vcpu}: TSC runs at {host} kHz here, {saved} kHz in the state, and KVM cannot scale it"
                );
                report.tsc_khz_mismatch = Some((saved, host));
            }
        }
        fd.set_sregs(&self.sregs).map_err(io("KVM_SET_SREGS"))?;
        fd.set_regs(&self.regs).map_err(io("KVM_SET_REGS"))?;
        self.set_xsave(fd, xsave_bytes)?;
        match (&self.xcrs, has_xcrs) {
            (Some(x), true) => fd.set_xcrs(x).map_err(io("KVM_SET_XCRS"))?,
            (Some(_), false) => return Err(VcpuStateError::NoXcrs { vcpu }),
            (None, _) => {}
        }
        fd.set_debug_regs(&self.debug_regs)
            .map_err(io("KVM_SET_DEBUGREGS"))?;
        fd.set_lapic(&self.lapic).map_err(io("KVM_SET_LAPIC"))?;
        report.refused_msrs = write_msrs(fd, vcpu, &self.msrs)?;
        fd.set_mp_state(self.mp_state)
            .map_err(io("KVM_SET_MP_STATE"))?;
        // KVM_GET_VCPU_EVENTS does not mark the NMI-pending and SIPI-vector fields
        // valid; set them too, so a pending NMI or SIPI vector is not lost.
        let mut events = self.events;
        events.flags |= KVM_VCPUEVENT_VALID_NMI_PENDING | KVM_VCPUEVENT_VALID_SIPI_VECTOR;
        fd.set_vcpu_events(&events)
            .map_err(io("KVM_SET_VCPU_EVENTS"))?;
        Ok(report)
    }
}
