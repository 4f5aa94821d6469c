//! build_vm on missing, garbage and oversized guest ELFs gives typed errors.

use std::path::PathBuf;

use vmm::boot::{BootError, ElfError};
use vmm::config::{ConsoleConfig, Payload, VmConfig, Workloads};
use vmm::{build_vm, BuildError};

/// A file removed on drop, unique per test and process.
struct TempFile(PathBuf);

impl TempFile {
    fn new(tag: &str, bytes: &[u8]) -> TempFile {
        let p = std::env::temp_dir().join(format!("twinrun-elf-{tag}-{}", std::process::id()));
        std::fs::write(&p, bytes).unwrap();
        TempFile(p)
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn config(elf: PathBuf) -> VmConfig {
    VmConfig {
        mem_mib: 16,
        vcpus: 1,
        payload: Payload::TestGuest {
            elf,
            workloads: Workloads::default(),
        },
        disks: vec![],
        nets: vec![],
        console: ConsoleConfig::Stdout,
    }
}

fn elf_error(r: Result<vmm::Vmm, BuildError>) -> ElfError {
    match r {
        Err(BuildError::Boot(BootError::Elf(e))) => e,
        Err(e) => panic!("expected an ELF error, got {e}"),
        Ok(_) => panic!("expected an ELF error, the VM was built"),
    }
}

/// A static x86-64 ELF with one RX segment of `code` + `bss` bytes at 4 MiB.
fn elf(code: &[u8], bss: u64) -> Vec<u8> {
    let mut b = vec![0u8; 120];
    b[..7].copy_from_slice(b"\x7fELF\x02\x01\x01");
    b[16] = 2; // ET_EXEC
    b[18] = 62; // x86-64
    b[20] = 1;
    b[24..32].copy_from_slice(&0x40_0000u64.to_le_bytes());
    b[32..40].copy_from_slice(&64u64.to_le_bytes());
    b[52] = 64;
    b[54] = 56;
    b[56] = 1;
    b[64] = 1; // PT_LOAD
    b[68] = 5; // R|X
    b[72..80].copy_from_slice(&120u64.to_le_bytes());
    b[80..88].copy_from_slice(&0x40_0000u64.to_le_bytes());
    b[88..96].copy_from_slice(&0x40_0000u64.to_le_bytes());
    b[96..104].copy_from_slice(&(code.len() as u64).to_le_bytes());
    b[104..112].copy_from_slice(&(code.len() as u64 + bss).to_le_bytes());
    b.extend_from_slice(code);
    b
}

#[test]
fn missing_elf() {
    let e = elf_error(build_vm(&config("/nonexistent/twinrun-guest".into())));
    assert!(matches!(e, ElfError::Read { .. }), "{e}");
    assert!(e.to_string().contains("/nonexistent/twinrun-guest"));
}

#[test]
fn garbage_elf() {
    let f = TempFile::new("garbage", b"#!/bin/sh\necho not an elf\n");
    let e = elf_error(build_vm(&config(f.0.clone())));
    assert!(matches!(e, ElfError::BadMagic), "{e}");
}

#[test]
fn oversized_elf() {
    // bss of 32 MiB in a 16 MiB VM.
    let f = TempFile::new("oversized", &elf(&[0xf4], 32 << 20));
    let e = elf_error(build_vm(&config(f.0.clone())));
    assert!(matches!(e, ElfError::SegmentOutsideRam { .. }), "{e}");
}

#[test]
fn good_elf_builds_and_runs() {
    // mov eax, 3; out 0xf4, eax
    let f = TempFile::new("good", &elf(&[0xb8, 3, 0, 0, 0, 0xe7, 0xf4], 4096));
    let mut vm = build_vm(&config(f.0.clone())).expect("build");
    // The parameter block is in guest memory.
    use vm_memory::{Bytes, GuestAddress};
    let p: twinrun_guest_abi::Params = {
        let mut buf = [0u8; std::mem::size_of::<twinrun_guest_abi::Params>()];
        vm.guest_memory()
            .read_slice(&mut buf, GuestAddress(twinrun_guest_abi::PARAMS_ADDR))
            .unwrap();
        // SAFETY: Params is repr(C) plain old data; every bit pattern of its integer
        // fields is valid.
        unsafe { std::ptr::read_unaligned(buf.as_ptr().cast()) }
    };
    assert!(p.is_valid());
    assert_eq!(p.ram_low_end, 16 << 20);
    assert_eq!(p.free_base, 0x60_0000);
    assert!(p.tsc_khz > 0);
    vm.start().unwrap();
    let exit = vm
        .wait_timeout(std::time::Duration::from_secs(20))
        .expect("ended");
    assert_eq!(exit, vmm::VmExit::GuestExit { status: 3 });
}
