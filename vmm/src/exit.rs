//! How a VM ended, with the guest's registers when a vCPU stopped it.

use std::fmt;

use kvm_bindings::{kvm_regs, kvm_sregs};

/// A vCPU's registers at the moment it ended the VM.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RegsReport {
    pub rip: u64,
    pub rsp: u64,
    pub rflags: u64,
    pub rax: u64,
    pub rbx: u64,
    pub rcx: u64,
    pub rdx: u64,
    pub rsi: u64,
    pub rdi: u64,
    pub rbp: u64,
    pub r8: u64,
    pub r9: u64,
    pub r10: u64,
    pub r11: u64,
    pub r12: u64,
    pub r13: u64,
    pub r14: u64,
    pub r15: u64,
    pub cr0: u64,
    pub cr2: u64,
    pub cr3: u64,
    pub cr4: u64,
    pub efer: u64,
    pub cs: u16,
    pub ss: u16,
    /// Why the registers could not be read, if they could not (the other fields are
    /// then zero).
    pub unavailable: Option<String>,
}

impl RegsReport {
    pub fn new(r: &kvm_regs, s: &kvm_sregs) -> Self {
        RegsReport {
            rip: r.rip,
            rsp: r.rsp,
            rflags: r.rflags,
            rax: r.rax,
            rbx: r.rbx,
            rcx: r.rcx,
            rdx: r.rdx,
            rsi: r.rsi,
            rdi: r.rdi,
            rbp: r.rbp,
            r8: r.r8,
            r9: r.r9,
            r10: r.r10,
            r11: r.r11,
            r12: r.r12,
            r13: r.r13,
            r14: r.r14,
            r15: r.r15,
            cr0: s.cr0,
            cr2: s.cr2,
            cr3: s.cr3,
            cr4: s.cr4,
            efer: s.efer,
            cs: s.cs.selector,
            ss: s.ss.selector,
            unavailable: None,
        }
    }

    pub fn unavailable(why: String) -> Self {
        RegsReport {
            unavailable: Some(why),
            ..Default::default()
        }
    }
}

impl fmt::Display for RegsReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(why) = &self.unavailable {
            return write!(f, "  registers unavailable: {why}");
        }
        writeln!(
            f,
            "  rip={:#018x} rsp={:#018x} rflags={:#010x} cs={:#06x} ss={:#06x} (cpl {})",
            self.rip,
            self.rsp,
            self.rflags,
            self.cs,
            self.ss,
            self.cs & 3
        )?;
        let gprs = [
            ("rax", self.rax),
            ("rbx", self.rbx),
            ("rcx", self.rcx),
            ("rdx", self.rdx),
            ("rsi", self.rsi),
            ("rdi", self.rdi),
            ("rbp", self.rbp),
            ("r8", self.r8),
            ("r9", self.r9),
            ("r10", self.r10),
            ("r11", self.r11),
            ("r12", self.r12),
            ("r13", self.r13),
            ("r14", self.r14),
            ("r15", self.r15),
        ];
        for row in gprs.chunks(4) {
            write!(f, " ")?;
            for (name, v) in row {
                write!(f, " {name:>3}={v:#018x}")?;
            }
            writeln!(f)?;
        }
        write!(
            f,
            "  cr0={:#010x} cr2={:#018x} cr3={:#010x} cr4={:#010x} efer={:#06x}",
            self.cr0, self.cr2, self.cr3, self.cr4, self.efer
        )
    }
}

/// How a VM ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VmExit {
    /// The guest wrote `status` to the exit port.
    GuestExit { status: u32 },
    /// The VMM was asked to stop it.
    Stopped,
    /// A vCPU executed `hlt` with nothing to wake it (userspace-visible HLT exit).
    Hlt { vcpu: u8, regs: RegsReport },
    /// A vCPU hit an exception it could not deliver (without an IDT, any exception).
    TripleFault { vcpu: u8, regs: RegsReport },
    /// KVM could not emulate something (`KVM_EXIT_INTERNAL_ERROR`).
    InternalError {
        vcpu: u8,
        suberror: u32,
        data: Vec<u64>,
        regs: RegsReport,
    },
    /// The CPU refused to enter the guest (`KVM_EXIT_FAIL_ENTRY`).
    FailEntry { vcpu: u8, reason: u64 },
    /// `KVM_RUN` failed, or an exit the VMM does not handle.
    VcpuError { vcpu: u8, error: String },
    /// The guest reset the machine through the i8042 (command 0xFE on port 0x64, what
    /// Linux does on reboot with `reboot=k`). twinrun does not restart the guest: a
    /// reset ends the VM, cleanly.
    GuestReset,
}

impl VmExit {
    /// True for an orderly end: the guest exited with status 0 or reset the machine, or
    /// the VMM stopped it.
    pub fn is_clean(&self) -> bool {
        matches!(
            self,
            VmExit::GuestExit { status: 0 } | VmExit::Stopped | VmExit::GuestReset
        )
    }
}

/// Names of `KVM_INTERNAL_ERROR_*` suberrors.
fn suberror_name(s: u32) -> &'static str {
    match s {
        1 => "emulation failure",
        2 => "simultaneous exceptions",
        3 => "delivery event (exception during event delivery)",
        4 => "unexpected exit reason",
        _ => "unknown suberror",
    }
}

impl fmt::Display for VmExit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            VmExit::GuestExit { status } => write!(f, "guest exited with status {status:#x}"),
            VmExit::Stopped => write!(f, "VM stopped by the VMM"),
            VmExit::Hlt { vcpu, regs } => write!(f, "vCPU {vcpu} halted (hlt):\n{regs}"),
            VmExit::TripleFault { vcpu, regs } => write!(
                f,
                "vCPU {vcpu}: triple fault (KVM_EXIT_SHUTDOWN; an exception the guest cannot \
                 handle):\n{regs}"
            ),
            VmExit::InternalError {
                vcpu,
                suberror,
                data,
                regs,
            } => {
                write!(
                    f,
                    "vCPU {vcpu}: KVM internal error, suberror {suberror} ({})",
                    suberror_name(*suberror)
                )?;
                if !data.is_empty() {
                    write!(f, ", data:")?;
                    for d in data {
                        write!(f, " {d:#x}")?;
                    }
                }
                write!(f, "\n{regs}")
            }
            VmExit::FailEntry { vcpu, reason } => write!(
                f,
                "vCPU {vcpu}: VM entry failed, hardware entry failure reason {reason:#x}"
            ),
            VmExit::VcpuError { vcpu, error } => write!(f, "vCPU {vcpu}: {error}"),
            VmExit::GuestReset => write!(f, "guest reset the machine (i8042 reset)"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_names_registers() {
        let regs = RegsReport {
            rip: 0x40_1000,
            cs: 0x1b,
            r15: 0xdead,
            ..Default::default()
        };
        let e = VmExit::TripleFault { vcpu: 0, regs };
        let s = e.to_string();
        assert!(s.contains("triple fault"), "{s}");
        assert!(s.contains("rip=0x0000000000401000"), "{s}");
        assert!(s.contains("r15=0x000000000000dead"), "{s}");
        assert!(s.contains("cpl 3"), "{s}");
        assert!(!e.is_clean());
        assert!(VmExit::GuestExit { status: 0 }.is_clean());
        assert!(VmExit::Stopped.is_clean());
        assert!(!VmExit::GuestExit { status: 1 }.is_clean());
    }
}
