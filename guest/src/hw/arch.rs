//! CPU primitives usable at CPL3 with IOPL=3: the TSC, the exit port, and the memory
//! functions the compiler expects (no libc here).

use core::arch::asm;
use twinrun_guest_abi::EXIT_PORT;

/// The time-stamp counter (allowed at CPL3 unless CR4.TSD is set, which the VMM leaves
/// clear).
#[inline]
pub fn rdtsc() -> u64 {
    // SAFETY: `rdtsc` only reads the TSC into registers; no memory is touched.
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// Ends the VM with `status` through the exit port. Never returns: if the VMM ignored
/// the write, spin (there is no `hlt` at CPL3).
pub fn exit(status: u32) -> ! {
    // SAFETY: IOPL=3 lets CPL3 code do port I/O; the write only ends the VM.
    unsafe {
        asm!("out dx, eax", in("dx") EXIT_PORT, in("eax") status, options(nomem, nostack, preserves_flags));
    }
    loop {
        core::hint::spin_loop();
    }
}

// The memory functions below are what rustc's generated code calls; they are written
// with `rep movsb`/`rep stosb` (fast on current CPUs) and plain loops that LLVM cannot
// turn back into calls to themselves.

/// # Safety
/// Standard C `memcpy` contract: valid, non-overlapping ranges of `n` bytes.
#[no_mangle]
pub unsafe extern "C" fn memcpy(dest: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    // SAFETY: the caller guarantees both ranges are valid for `n` bytes; DF is clear
    // (the ABI requires it at call boundaries).
    unsafe {
        asm!("rep movsb", inout("rcx") n => _, inout("rdi") dest => _, inout("rsi") src => _,
             options(nostack, preserves_flags));
    }
    dest
}

/// # Safety
/// Standard C `memmove` contract: valid ranges of `n` bytes, which may overlap.
#[no_mangle]
pub unsafe extern "C" fn memmove(dest: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    if (dest as usize).wrapping_sub(src as usize) >= n {
        // No harmful overlap: a forward copy never reads a byte it already overwrote.
        // SAFETY: as for memcpy.
        unsafe {
            asm!("rep movsb", inout("rcx") n => _, inout("rdi") dest => _, inout("rsi") src => _,
                 options(nostack, preserves_flags));
        }
    } else if n > 0 {
        // dest lies inside (src, src+n): copy backwards with DF set, then clear it again.
        // SAFETY: both ranges are valid for `n` bytes; DF is restored before returning.
        unsafe {
            asm!("std", "rep movsb", "cld",
                 inout("rcx") n => _,
                 inout("rdi") dest.add(n - 1) => _,
                 inout("rsi") src.add(n - 1) => _,
                 options(nostack));
        }
    }
    dest
}

/// # Safety
/// Standard C `memset` contract: `dest` valid for `n` bytes.
#[no_mangle]
pub unsafe extern "C" fn memset(dest: *mut u8, c: i32, n: usize) -> *mut u8 {
    // SAFETY: the caller guarantees `dest` is valid for `n` bytes.
    unsafe {
        asm!("rep stosb", inout("rcx") n => _, inout("rdi") dest => _, in("al") c as u8,
             options(nostack, preserves_flags));
    }
    dest
}

/// # Safety
/// Standard C `memcmp` contract: both pointers valid for `n` bytes.
#[no_mangle]
pub unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    let mut i = 0;
    while i < n {
        // SAFETY: i < n and both ranges are valid for n bytes. Volatile keeps LLVM from
        // recognising the loop as a memcmp call (which would recurse).
        let (x, y) = unsafe { (a.add(i).read_volatile(), b.add(i).read_volatile()) };
        if x != y {
            return x as i32 - y as i32;
        }
        i += 1;
    }
    0
}

/// # Safety
/// Standard `bcmp` contract: both pointers valid for `n` bytes.
#[no_mangle]
pub unsafe extern "C" fn bcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    // SAFETY: same contract as memcmp.
    unsafe { memcmp(a, b, n) }
}
