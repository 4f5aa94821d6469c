//! SIGTERM/SIGINT handling without async-signal handlers.
//!
//! The main thread blocks both signals before any other thread exists, so every thread
//! the VMM spawns inherits the mask and none of them is interrupted by them; one
//! dedicated thread takes them synchronously with `sigwait` and runs ordinary code
//! (logging, stopping the VM). The VMM's own vCPU kick signal is untouched.

use std::io;

const SIGNALS: [libc::c_int; 2] = [libc::SIGTERM, libc::SIGINT];

fn set() -> io::Result<libc::sigset_t> {
    // SAFETY: `sigset_t` is plain data; sigemptyset initialises it before any use.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid, exclusively borrowed sigset_t.
    if unsafe { libc::sigemptyset(&mut set) } != 0 {
        return Err(io::Error::last_os_error());
    }
    for s in SIGNALS {
        // SAFETY: as above; `s` is a valid signal number.
        if unsafe { libc::sigaddset(&mut set, s) } != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(set)
}

/// Blocks SIGTERM and SIGINT in the calling thread (and so in threads it spawns later).
pub fn block() -> io::Result<()> {
    let set = set()?;
    // SAFETY: `set` is initialised; a null old-set pointer is allowed.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if rc != 0 {
        return Err(io::Error::from_raw_os_error(rc));
    }
    Ok(())
}

/// Waits for SIGTERM or SIGINT (which must be blocked) and returns its name.
pub fn wait() -> io::Result<&'static str> {
    let set = set()?;
    let mut sig: libc::c_int = 0;
    // SAFETY: `set` is initialised and `sig` is a valid out-pointer.
    let rc = unsafe { libc::sigwait(&set, &mut sig) };
    if rc != 0 {
        return Err(io::Error::from_raw_os_error(rc));
    }
    Ok(if sig == libc::SIGINT {
        "SIGINT"
    } else {
        "SIGTERM"
    })
}
