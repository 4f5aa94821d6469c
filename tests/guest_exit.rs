//! How the VM ends maps to the exit code: tiny hand-assembled guests exit with a status
//! through the exit port, or crash, and a file that is no ELF cannot start.
mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{require_kvm, twinrun_bin};
use twinrun_guest_abi::{EXIT_PORT, IMAGE_BASE};

/// A minimal static ELF64 executable: one PT_LOAD segment at IMAGE_BASE holding the
/// headers and `code`, entered at `code`.
fn tiny_elf(dir: &Path, name: &str, code: &[u8]) -> PathBuf {
    const EHDR: usize = 64;
    const PHDR: usize = 56;
    let code_off = (EHDR + PHDR) as u64;
    let total = code_off + code.len() as u64;
    let mut e = Vec::new();
    e.extend_from_slice(&[0x7f, b'E', b'L', b'F', 2, 1, 1, 0]);
    e.extend_from_slice(&[0; 8]);
    e.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    e.extend_from_slice(&0x3eu16.to_le_bytes()); // EM_X86_64
    e.extend_from_slice(&1u32.to_le_bytes());
    e.extend_from_slice(&(IMAGE_BASE + code_off).to_le_bytes()); // entry
    e.extend_from_slice(&(EHDR as u64).to_le_bytes()); // phoff
    e.extend_from_slice(&0u64.to_le_bytes()); // shoff
    e.extend_from_slice(&0u32.to_le_bytes()); // flags
    e.extend_from_slice(&(EHDR as u16).to_le_bytes());
    e.extend_from_slice(&(PHDR as u16).to_le_bytes());
    e.extend_from_slice(&1u16.to_le_bytes()); // phnum
    e.extend_from_slice(&64u16.to_le_bytes()); // shentsize
    e.extend_from_slice(&0u16.to_le_bytes()); // shnum
    e.extend_from_slice(&0u16.to_le_bytes()); // shstrndx
    assert_eq!(e.len(), EHDR);
    e.extend_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    e.extend_from_slice(&5u32.to_le_bytes()); // R+X
    e.extend_from_slice(&0u64.to_le_bytes()); // offset
    e.extend_from_slice(&IMAGE_BASE.to_le_bytes()); // vaddr
    e.extend_from_slice(&IMAGE_BASE.to_le_bytes()); // paddr
    e.extend_from_slice(&total.to_le_bytes()); // filesz
    e.extend_from_slice(&total.to_le_bytes()); // memsz
    e.extend_from_slice(&0x1000u64.to_le_bytes()); // align
    e.extend_from_slice(code);
    let path = dir.join(name);
    std::fs::write(&path, e).unwrap();
    path
}

fn run(guest: &Path) -> std::process::Output {
    let mut cmd = std::process::Command::new(twinrun_bin());
    cmd.args(["vm", "run", "--mem-mib", "32", "--guest"])
        .arg(guest);
    // The VMM must never hang on these guests.
    twinrun_lab::process::output_timeout(&mut cmd, Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("twinrun hung on {}: {e}", guest.display()))
}

#[test]
fn guest_exit_status_nonzero_gives_exit_1() {
    require_kvm();
    let dir = tempfile::tempdir().unwrap();
    let [lo, hi] = EXIT_PORT.to_le_bytes();
    let code = [
        0xba, lo, hi, 0, 0, // mov edx, EXIT_PORT
        0xb8, 5, 0, 0, 0,    // mov eax, 5
        0xef, // out dx, eax
        0xeb, 0xfe, // jmp $
    ];
    let out = run(&tiny_elf(dir.path(), "exit5", &code));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("status 5"), "{err}");
}

#[test]
fn guest_exit_status_zero_gives_exit_0() {
    require_kvm();
    let dir = tempfile::tempdir().unwrap();
    let [lo, hi] = EXIT_PORT.to_le_bytes();
    let code = [0xba, lo, hi, 0, 0, 0x31, 0xc0, 0xef, 0xeb, 0xfe]; // xor eax,eax
    let out = run(&tiny_elf(dir.path(), "exit0", &code));
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn guest_crash_gives_exit_3_with_registers() {
    require_kvm();
    let dir = tempfile::tempdir().unwrap();
    // ud2: #UD with no IDT -> triple fault.
    let out = run(&tiny_elf(dir.path(), "ud2", &[0x0f, 0x0b]));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert!(err.contains("VM crashed"), "{err}");
    assert!(err.to_lowercase().contains("rip"), "register report: {err}");
}

#[test]
fn non_elf_guest_cannot_start() {
    let dir = tempfile::tempdir().unwrap();
    let junk = dir.path().join("junk");
    std::fs::write(&junk, b"not an elf at all").unwrap();
    let out = run(&junk);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(4), "{err}");
    assert!(err.contains("cannot build the VM"), "{err}");
}
