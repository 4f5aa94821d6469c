//! vCPUs: creation, the boot state of the test guest, and the exit loop each vCPU
//! thread runs.

use std::collections::HashSet;
use std::sync::Arc;

use kvm_bindings::{
    kvm_fpu, kvm_mp_state, kvm_regs, kvm_segment, CpuId, KVM_EXIT_DIRTY_RING_FULL,
    KVM_MP_STATE_RUNNABLE, KVM_MP_STATE_UNINITIALIZED,
};
use kvm_ioctls::{VcpuExit, VcpuFd};
use twinrun_guest_abi as abi;

use super::control::{Next, RunControl};
use super::cpuid;
use super::dirty::DirtyRings;
use super::vm::Vm;
use crate::boot::gdt;
use crate::devices::bus::Bus;
use crate::exit::{RegsReport, VmExit};

const CR0_PE: u64 = 1 << 0;
const CR0_MP: u64 = 1 << 1;
const CR0_ET: u64 = 1 << 4;
const CR0_NE: u64 = 1 << 5;
const CR0_WP: u64 = 1 << 16;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const CR4_OSFXSR: u64 = 1 << 9;
const CR4_OSXMMEXCPT: u64 = 1 << 10;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
const EFER_NXE: u64 = 1 << 11;
/// RFLAGS: reserved bit 1, IOPL = 3 (port I/O allowed at CPL3), IF = 0.
pub const BOOT_RFLAGS: u64 = 0x3002;

#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    #[error("KVM_CREATE_VCPU {0}: {1}")]
    Create(u8, kvm_ioctls::Error),
    #[error("KVM_GET_SUPPORTED_CPUID: {0}")]
    SupportedCpuid(kvm_ioctls::Error),
    #[error("building CPUID for vCPU {0}: {1:?}")]
    BuildCpuid(u8, vmm_sys_util::fam::Error),
    #[error("vCPU {vcpu}: {what}: {source}")]
    Ioctl {
        vcpu: u8,
        what: &'static str,
        source: kvm_ioctls::Error,
    },
}

/// Creates vCPU `index` of `count` with its CPUID. vCPU 0 is the boot processor;
/// the others are left in `KVM_MP_STATE_UNINITIALIZED`, where the in-kernel LAPIC keeps
/// them blocked inside `KVM_RUN` until an INIT/SIPI (which the test guest never sends),
/// so they cost no CPU.
pub fn create_vcpu(vm: &Vm, base_cpuid: &CpuId, index: u8, count: u8) -> Result<VcpuFd, VcpuError> {
    let fd = vm
        .fd()
        .create_vcpu(u64::from(index))
        .map_err(|e| VcpuError::Create(index, e))?;
    let cpuid =
        cpuid::for_vcpu(base_cpuid, index, count).map_err(|e| VcpuError::BuildCpuid(index, e))?;
    let io = |what| {
        move |source| VcpuError::Ioctl {
            vcpu: index,
            what,
            source,
        }
    };
    fd.set_cpuid2(&cpuid).map_err(io("KVM_SET_CPUID2"))?;
    let mp_state = if index == 0 {
        KVM_MP_STATE_RUNNABLE
    } else {
        KVM_MP_STATE_UNINITIALIZED
    };
    fd.set_mp_state(kvm_mp_state { mp_state })
        .map_err(io("KVM_SET_MP_STATE"))?;
    Ok(fd)
}

/// Puts the boot vCPU in 64-bit mode at CPL3 at `entry`, as the guest ABI describes.
pub fn setup_boot_vcpu(fd: &VcpuFd, entry: u64) -> Result<(), VcpuError> {
    let io = |what| {
        move |source| VcpuError::Ioctl {
            vcpu: 0,
            what,
            source,
        }
    };
    let mut sregs = fd.get_sregs().map_err(io("KVM_GET_SREGS"))?;
    let table = gdt::entries();
    let code: kvm_segment = gdt::kvm_segment(&table, abi::GDT_USER_CODE);
    let data: kvm_segment = gdt::kvm_segment(&table, abi::GDT_USER_DATA);
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.gdt.base = abi::GDT_ADDR;
    sregs.gdt.limit = (std::mem::size_of_val(&table) - 1) as u16;
    // No IDT: every exception becomes a triple fault, which the exit loop reports.
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
    sregs.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_PG;
    sregs.cr3 = abi::PML4_ADDR;
    sregs.cr4 = CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT;
    sregs.efer = EFER_LME | EFER_LMA | EFER_NXE;
    fd.set_sregs(&sregs).map_err(io("KVM_SET_SREGS"))?;

    // x87 control word and MXCSR at their reset values (all exceptions masked), so the
    // guest's SSE and floating point behave as on any x86-64.
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    fd.set_fpu(&fpu).map_err(io("KVM_SET_FPU"))?;

    let regs = kvm_regs {
        rip: entry,
        rsp: abi::STACK_TOP,
        rdi: abi::PARAMS_ADDR,
        rflags: BOOT_RFLAGS,
        ..Default::default()
    };
    fd.set_regs(&regs).map_err(io("KVM_SET_REGS"))?;
    Ok(())
}

/// Reads the registers for an exit report; never fails (says why instead).
pub fn regs_report(fd: &VcpuFd) -> RegsReport {
    match (fd.get_regs(), fd.get_sregs()) {
        (Ok(r), Ok(s)) => RegsReport::new(&r, &s),
        (Err(e), _) | (_, Err(e)) => RegsReport::unavailable(e.to_string()),
    }
}

/// At most this many distinct unclaimed addresses are logged per vCPU.
const MAX_UNCLAIMED_LOGGED: usize = 32;

/// Logs each unclaimed MMIO/PIO address once, up to a limit, so a guest hammering a
/// hole cannot flood the log.
#[derive(Default)]
struct UnclaimedLog {
    seen: HashSet<(bool, u64)>,
    saturated: bool,
}

impl UnclaimedLog {
    fn note(&mut self, vcpu: u8, pio: bool, addr: u64, write: bool) {
        if self.saturated || self.seen.contains(&(pio, addr)) {
            return;
        }
        if self.seen.len() >= MAX_UNCLAIMED_LOGGED {
            self.saturated = true;
            log::warn!("vCPU {vcpu}: more unclaimed accesses; no longer logging them");
            return;
        }
        self.seen.insert((pio, addr));
        let space = if pio { "port" } else { "MMIO" };
        let dir = if write { "write to" } else { "read from" };
        log::warn!("vCPU {vcpu}: unclaimed {space} {dir} {addr:#x} (reads return 0)");
    }
}

/// What one `KVM_RUN` came back with, once the exit data is handled.
enum Step {
    Continue,
    End(Box<VmExit>),
    Hlt,
    Shutdown,
    Internal,
    FailEntry(u64, u32),
    /// Ends the VM with `VcpuError`; the registers are appended to the message.
    Error(String),
}

/// One vCPU as its thread runs it.
pub struct VcpuRunner {
    pub index: u8,
    pub fd: VcpuFd,
    pub mmio: Arc<Bus>,
    pub pio: Arc<Bus>,
    pub control: Arc<RunControl>,
    unclaimed: UnclaimedLog,
    /// The VM's dirty rings, when it was built with them (ring-full exits).
    rings: Option<Arc<DirtyRings>>,
}

/// Decodes the value a guest wrote to the exit port (1, 2 or 4 bytes, little endian).
fn exit_status(data: &[u8]) -> u32 {
    let mut b = [0u8; 4];
    let n = data.len().min(4);
    b[..n].copy_from_slice(&data[..n]);
    u32::from_le_bytes(b)
}

impl VcpuRunner {
    pub fn new(
        index: u8,
        fd: VcpuFd,
        mmio: Arc<Bus>,
        pio: Arc<Bus>,
        control: Arc<RunControl>,
    ) -> Self {
        VcpuRunner {
            index,
            fd,
            mmio,
            pio,
            control,
            unclaimed: UnclaimedLog::default(),
            rings: None,
        }
    }

    /// Gives the runner the VM's dirty rings, so that it can drain its own when KVM
    /// stops it with `KVM_EXIT_DIRTY_RING_FULL`.
    pub fn with_dirty_rings(mut self, rings: Option<Arc<DirtyRings>>) -> Self {
        self.rings = rings;
        self
    }

    /// Runs until the VM ends or the thread is told to exit; records the end reason in
    /// the run control when this vCPU is the one that ended the VM.
    pub fn run(&mut self) {
        super::control::set_vcpu_control(self.control.clone());
        if let Some(exit) = self.run_loop() {
            self.control.end(exit);
        }
        self.control.vcpu_exited();
    }

    fn run_loop(&mut self) -> Option<VmExit> {
        let vcpu = self.index;
        // Set once a KVM_RUN has returned EINTR since the last check-in: KVM completes
        // a half-done I/O exit before it looks at immediate_exit or signals, so none is
        // left for this vCPU.
        let mut settled = false;
        loop {
            // A settled vCPU checks in even without a request: that clears a stale
            // immediate_exit (left by a pause that gave up) under the control lock.
            if self.control.pending() || settled {
                if settled {
                    settled = false;
                    if self.control.check_in(usize::from(vcpu), &mut self.fd) == Next::Exit {
                        return None;
                    }
                    continue;
                }
                // An MMIO/PIO read exit is only completed (the value put in the guest's
                // register, RIP advanced) by the next KVM_RUN. Before parking, where
                // state may be captured, run once with immediate_exit so KVM finishes it
                // and returns EINTR without entering the guest.
                self.fd.set_kvm_immediate_exit(1);
            }
            let step = match self.fd.run() {
                Ok(VcpuExit::MmioRead(addr, data)) => {
                    if !self.mmio.read(addr, data) {
                        self.unclaimed.note(vcpu, false, addr, false);
                    }
                    Step::Continue
                }
                Ok(VcpuExit::MmioWrite(addr, data)) => {
                    if !self.mmio.write(addr, data) {
                        self.unclaimed.note(vcpu, false, addr, true);
                    }
                    Step::Continue
                }
                Ok(VcpuExit::IoOut(port, data)) => {
                    if port == abi::EXIT_PORT {
                        Step::End(Box::new(VmExit::GuestExit {
                            status: exit_status(data),
                        }))
                    } else {
                        if !self.pio.write(u64::from(port), data) {
                            self.unclaimed.note(vcpu, true, u64::from(port), true);
                        }
                        Step::Continue
                    }
                }
                Ok(VcpuExit::IoIn(port, data)) => {
                    if !self.pio.read(u64::from(port), data) && port != abi::EXIT_PORT {
                        self.unclaimed.note(vcpu, true, u64::from(port), false);
                    }
                    Step::Continue
                }
                Ok(VcpuExit::Hlt) => Step::Hlt,
                Ok(VcpuExit::Shutdown) => Step::Shutdown,
                Ok(VcpuExit::InternalError) => Step::Internal,
                Ok(VcpuExit::FailEntry(reason, cpu)) => Step::FailEntry(reason, cpu),
                // A signal arrived while KVM was about to exit for it: just loop.
                Ok(VcpuExit::Intr) => Step::Continue,
                Ok(VcpuExit::Unknown) => {
                    // SAFETY: the exit reason is KVM_EXIT_UNKNOWN, whose data is `hw`.
                    let hw = unsafe { self.fd.get_kvm_run().__bindgen_anon_1.hw };
                    Step::Error(format!(
                        "KVM_EXIT_UNKNOWN, hardware exit reason {:#x}",
                        hw.hardware_exit_reason
                    ))
                }
                // KVM_EXIT_DIRTY_RING_FULL (kvm-ioctls 0.25 has no variant for it): the
                // ring of this vCPU is nearly full. Drain it into the pending set the
                // next harvest returns, reset, and re-enter: nothing is lost.
                Ok(VcpuExit::Unsupported(KVM_EXIT_DIRTY_RING_FULL)) => match &self.rings {
                    Some(rings) => match rings.drain_full(usize::from(vcpu)) {
                        Ok(_) => Step::Continue,
                        Err(e) => Step::Error(format!("dirty ring full: {e}")),
                    },
                    None => Step::Error("KVM_EXIT_DIRTY_RING_FULL without a dirty ring".into()),
                },
                Ok(other) => Step::Error(format!("unhandled KVM exit {other:?}")),
                Err(e) if e.errno() == libc::EINTR => {
                    settled = true;
                    Step::Continue
                }
                Err(e) if e.errno() == libc::EAGAIN => Step::Continue,
                Err(e) => Step::Error(format!("KVM_RUN failed: {e}")),
            };
            match step {
                Step::Continue => {}
                Step::End(exit) => return Some(*exit),
                Step::Hlt => {
                    return Some(VmExit::Hlt {
                        vcpu,
                        regs: regs_report(&self.fd),
                    })
                }
                Step::Error(what) => {
                    return Some(VmExit::VcpuError {
                        vcpu,
                        error: format!("{what}\n{}", regs_report(&self.fd)),
                    })
                }
                Step::FailEntry(reason, cpu) => {
                    // The VmExit variant carries no registers; log them here.
                    log::error!(
                        "vCPU {vcpu}: VM entry failed on host CPU {cpu}, reason {reason:#x}\n{}",
                        regs_report(&self.fd)
                    );
                    return Some(VmExit::FailEntry { vcpu, reason });
                }
                Step::Shutdown => {
                    return Some(VmExit::TripleFault {
                        vcpu,
                        regs: regs_report(&self.fd),
                    })
                }
                Step::Internal => {
                    // SAFETY: the exit reason is KVM_EXIT_INTERNAL_ERROR, so the kernel
                    // filled the `internal` member of the union.
                    let internal = unsafe { self.fd.get_kvm_run().__bindgen_anon_1.internal };
                    let n = (internal.ndata as usize).min(internal.data.len());
                    return Some(VmExit::InternalError {
                        vcpu,
                        suberror: internal.suberror,
                        data: internal.data[..n].to_vec(),
                        regs: regs_report(&self.fd),
                    });
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_status_widths() {
        assert_eq!(exit_status(&[0x71]), 0x71);
        assert_eq!(exit_status(&[0x34, 0x12]), 0x1234);
        assert_eq!(exit_status(&[1, 0, 0, 0x80]), 0x8000_0001);
    }

    #[test]
    fn unclaimed_log_is_bounded() {
        let mut l = UnclaimedLog::default();
        for a in 0..1000 {
            l.note(0, false, a, true);
        }
        assert!(l.saturated);
        assert_eq!(l.seen.len(), MAX_UNCLAIMED_LOGGED);
    }
}
