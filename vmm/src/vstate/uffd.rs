//! Write protection of guest memory with userfaultfd (`UFFDIO_REGISTER_MODE_WP`,
//! `UFFDIO_WRITEPROTECT`), as QEMU's background snapshot uses it: pages are made
//! read-only in this process's page tables; a write to one (by a vCPU through KVM, or
//! by any VMM thread) blocks the writer and queues a fault message on the descriptor,
//! until a handler un-protects the page (which wakes the writer).
//!
//! KVM sees the protection through its MMU notifier: write-protecting a range zaps
//! KVM's mappings of it, and a guest write then faults into KVM, whose write fault on
//! the host page (get_user_pages with FOLL_WRITE) reaches userfaultfd like any other.
//! The `uffd_wp_probe` example checks that on the machine at hand.
//!
//! Only private anonymous memory is supported by write protection on every kernel
//! since 5.7 (shmem and hugetlbfs need `UFFD_FEATURE_WP_HUGETLBFS_SHMEM`, 5.19); the
//! guest memory `create_guest_memory` maps is that.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;

use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};

use super::memory::GuestMemoryMmap;

#[derive(Debug, thiserror::Error)]
pub enum UffdError {
    #[error("userfaultfd(2): {0}")]
    Open(std::io::Error),
    #[error("UFFDIO_API: {0}")]
    Api(std::io::Error),
    #[error("the kernel's userfaultfd has no write protection (features {0:#x})")]
    NoWriteProtect(u64),
    #[error("UFFDIO_REGISTER (write-protect mode) of {len:#x} bytes at {start:#x}: {source}")]
    Register {
        start: u64,
        len: u64,
        source: std::io::Error,
    },
    #[error("UFFDIO_WRITEPROTECT ({what}) of {len:#x} bytes at {start:#x}: {source}")]
    WriteProtect {
        what: &'static str,
        start: u64,
        len: u64,
        source: std::io::Error,
    },
    #[error("reading the userfaultfd: {0}")]
    Read(std::io::Error),
    #[error("guest range {gpa:#x}+{len:#x} is not inside one memory region")]
    Range { gpa: u64, len: u64 },
}

// Linux uapi (include/uapi/linux/userfaultfd.h); libc does not define them.
const UFFD_API: u64 = 0xAA;
const UFFD_FEATURE_PAGEFAULT_FLAG_WP: u64 = 1 << 0;
const UFFD_FEATURE_WP_UNPOPULATED: u64 = 1 << 13;
const UFFDIO_REGISTER_MODE_WP: u64 = 1 << 1;
const UFFDIO_WRITEPROTECT_MODE_WP: u64 = 1 << 0;
const UFFDIO_WRITEPROTECT_MODE_DONTWAKE: u64 = 1 << 1;
const UFFD_EVENT_PAGEFAULT: u8 = 0x12;
const UFFD_PAGEFAULT_FLAG_WRITE: u64 = 1 << 0;
const UFFD_PAGEFAULT_FLAG_WP: u64 = 1 << 1;

#[repr(C)]
#[derive(Default)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Default, Clone, Copy)]
struct UffdioRange {
    start: u64,
    len: u64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioRegister {
    range: UffdioRange,
    mode: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioWriteprotect {
    range: UffdioRange,
    mode: u64,
}

/// `struct uffd_msg` (packed, 32 bytes), page-fault view.
#[repr(C, packed)]
#[derive(Default, Clone, Copy)]
struct UffdMsg {
    event: u8,
    reserved1: u8,
    reserved2: u16,
    reserved3: u32,
    flags: u64,
    address: u64,
    ptid: u32,
    pad: u32,
}

vmm_sys_util::ioctl_iowr_nr!(UFFDIO_API_IOCTL, 0xAA, 0x3F, UffdioApi);
vmm_sys_util::ioctl_iowr_nr!(UFFDIO_REGISTER_IOCTL, 0xAA, 0x00, UffdioRegister);
vmm_sys_util::ioctl_iowr_nr!(UFFDIO_WRITEPROTECT_IOCTL, 0xAA, 0x06, UffdioWriteprotect);

/// One page fault read from the descriptor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fault {
    /// Host virtual address of the fault (page-aligned by the kernel unless
    /// `UFFD_FEATURE_EXACT_ADDRESS`, which is not asked for).
    pub address: u64,
    pub write: bool,
    /// The fault is a write to a write-protected page.
    pub wp: bool,
}

/// A userfaultfd in write-protect mode.
#[derive(Debug)]
pub struct WriteProtector {
    fd: OwnedFd,
    features: u64,
}

impl WriteProtector {
    /// Opens a userfaultfd (faults from the kernel too: KVM's writes go through
    /// get_user_pages, so `UFFD_USER_MODE_ONLY` must not be set; that needs
    /// CAP_SYS_PTRACE or `vm.unprivileged_userfaultfd`) and asks for write protection
    /// (and for protecting unpopulated pages where the kernel has it, 6.4+).
    pub fn open() -> Result<WriteProtector, UffdError> {
        // SAFETY: a plain syscall with flags; it returns a new descriptor or -1.
        let fd =
            unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | libc::O_NONBLOCK) };
        if fd < 0 {
            return Err(UffdError::Open(std::io::Error::last_os_error()));
        }
        // SAFETY: `fd` was just returned by the kernel and is owned by nothing else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        // The handshake may be done once per descriptor: first learn what the kernel
        // has on a throwaway descriptor, then ask for it on the real one.
        let offered = Self::handshake_features()?;
        if offered & UFFD_FEATURE_PAGEFAULT_FLAG_WP == 0 {
            return Err(UffdError::NoWriteProtect(offered));
        }
        let mut api = UffdioApi {
            api: UFFD_API,
            features: offered & (UFFD_FEATURE_PAGEFAULT_FLAG_WP | UFFD_FEATURE_WP_UNPOPULATED),
            ioctls: 0,
        };
        // SAFETY: UFFDIO_API reads and writes a `struct uffdio_api`, which `api` is.
        let r = unsafe { libc::ioctl(fd.as_raw_fd(), UFFDIO_API_IOCTL(), &mut api) };
        if r < 0 {
            return Err(UffdError::Api(std::io::Error::last_os_error()));
        }
        Ok(WriteProtector {
            fd,
            features: api.features,
        })
    }

    fn handshake_features() -> Result<u64, UffdError> {
        // SAFETY: as in `open`.
        let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC) };
        if fd < 0 {
            return Err(UffdError::Open(std::io::Error::last_os_error()));
        }
        // SAFETY: as in `open`.
        let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        let mut api = UffdioApi {
            api: UFFD_API,
            ..Default::default()
        };
        // SAFETY: UFFDIO_API reads and writes a `struct uffdio_api`, which `api` is.
        let r = unsafe { libc::ioctl(fd.as_raw_fd(), UFFDIO_API_IOCTL(), &mut api) };
        if r < 0 {
            return Err(UffdError::Api(std::io::Error::last_os_error()));
        }
        Ok(api.features)
    }

    /// The features the handshake enabled (`UFFD_FEATURE_*`).
    pub fn features(&self) -> u64 {
        self.features
    }

    /// Whether pages never touched can be protected too (`UFFD_FEATURE_WP_UNPOPULATED`).
    pub fn protects_unpopulated(&self) -> bool {
        self.features & UFFD_FEATURE_WP_UNPOPULATED != 0
    }

    /// Registers every region of `mem` for write protection (nothing is protected yet).
    pub fn register_guest_memory(&self, mem: &GuestMemoryMmap) -> Result<(), UffdError> {
        for region in mem.iter() {
            let len = region.len();
            let host = region
                .get_host_address(MemoryRegionAddress(0))
                .map_err(|_| UffdError::Range {
                    gpa: region.start_addr().0,
                    len,
                })?;
            self.register(host as u64, len)?;
        }
        Ok(())
    }

    /// Registers `len` bytes of this process's memory at `start` (page-aligned).
    pub fn register(&self, start: u64, len: u64) -> Result<(), UffdError> {
        let mut reg = UffdioRegister {
            range: UffdioRange { start, len },
            mode: UFFDIO_REGISTER_MODE_WP,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_REGISTER reads and writes a `struct uffdio_register`, which
        // `reg` is; registering changes no memory contents.
        let r = unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_REGISTER_IOCTL(), &mut reg) };
        if r < 0 {
            return Err(UffdError::Register {
                start,
                len,
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    /// Write-protects `len` bytes at host address `start` (registered, page-aligned).
    pub fn protect(&self, start: u64, len: u64) -> Result<(), UffdError> {
        self.writeprotect(start, len, UFFDIO_WRITEPROTECT_MODE_WP, "protect")
    }

    /// Removes write protection from `len` bytes at `start` and wakes the threads
    /// blocked writing there.
    pub fn unprotect(&self, start: u64, len: u64) -> Result<(), UffdError> {
        self.writeprotect(start, len, 0, "unprotect")
    }

    /// [`WriteProtector::unprotect`] without waking anyone (nobody can be blocked
    /// there: no fault was reported in the range).
    pub fn unprotect_no_wake(&self, start: u64, len: u64) -> Result<(), UffdError> {
        self.writeprotect(start, len, UFFDIO_WRITEPROTECT_MODE_DONTWAKE, "unprotect")
    }

    fn writeprotect(
        &self,
        start: u64,
        len: u64,
        mode: u64,
        what: &'static str,
    ) -> Result<(), UffdError> {
        let mut wp = UffdioWriteprotect {
            range: UffdioRange { start, len },
            mode,
        };
        loop {
            // SAFETY: UFFDIO_WRITEPROTECT reads a `struct uffdio_writeprotect`, which
            // `wp` is; it changes page protections of registered memory only.
            let r =
                unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_WRITEPROTECT_IOCTL(), &mut wp) };
            if r == 0 {
                return Ok(());
            }
            let e = std::io::Error::last_os_error();
            // EAGAIN: the mm is changing under it (mmap_changing); try again.
            if e.raw_os_error() == Some(libc::EAGAIN) {
                std::thread::yield_now();
                continue;
            }
            return Err(UffdError::WriteProtect {
                what,
                start,
                len,
                source: e,
            });
        }
    }

    /// Waits up to `timeout` for the next fault message; None on timeout. Messages
    /// other than page faults (none are asked for) are skipped.
    pub fn next_fault(&self, timeout: Duration) -> Result<Option<Fault>, UffdError> {
        let mut pfd = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
        loop {
            // SAFETY: `pfd` is one valid pollfd.
            let r = unsafe { libc::poll(&mut pfd, 1, ms) };
            if r < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(UffdError::Read(e));
            }
            if r == 0 {
                return Ok(None);
            }
            let mut msg = UffdMsg::default();
            let size = std::mem::size_of::<UffdMsg>();
            // SAFETY: reads at most `size` bytes into `msg`, a plain-data struct of
            // that size.
            let n =
                unsafe { libc::read(self.fd.as_raw_fd(), (&mut msg as *mut UffdMsg).cast(), size) };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::Interrupted
                {
                    continue;
                }
                return Err(UffdError::Read(e));
            }
            if n as usize != size || msg.event != UFFD_EVENT_PAGEFAULT {
                continue;
            }
            let flags = msg.flags;
            return Ok(Some(Fault {
                address: msg.address,
                write: flags & UFFD_PAGEFAULT_FLAG_WRITE != 0,
                wp: flags & UFFD_PAGEFAULT_FLAG_WP != 0,
            }));
        }
    }
}

/// Host address of `len` bytes of guest memory at `gpa` (all inside one region).
pub fn host_range(mem: &GuestMemoryMmap, gpa: u64, len: u64) -> Result<u64, UffdError> {
    let bad = || UffdError::Range { gpa, len };
    let region = mem.find_region(GuestAddress(gpa)).ok_or_else(bad)?;
    let off = gpa - region.start_addr().0;
    if off.checked_add(len).is_none_or(|end| end > region.len()) {
        return Err(bad());
    }
    let host = region
        .get_host_address(MemoryRegionAddress(off))
        .map_err(|_| bad())?;
    Ok(host as u64)
}

/// Guest address of host address `host`, if it is inside `mem`.
pub fn guest_address(mem: &GuestMemoryMmap, host: u64) -> Option<u64> {
    mem.iter().find_map(|region| {
        let base = region.get_host_address(MemoryRegionAddress(0)).ok()? as u64;
        (host >= base && host - base < region.len()).then(|| region.start_addr().0 + (host - base))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAGE: usize = 4096;

    /// Private anonymous pages, as guest memory is mapped.
    struct Anon {
        ptr: *mut u8,
        len: usize,
    }

    impl Anon {
        fn new(pages: usize) -> Anon {
            let len = pages * PAGE;
            // SAFETY: a fresh private anonymous mapping; checked for failure below.
            let ptr = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                )
            };
            assert_ne!(ptr, libc::MAP_FAILED);
            Anon {
                ptr: ptr.cast(),
                len,
            }
        }
        fn addr(&self, page: usize) -> u64 {
            self.ptr as u64 + (page * PAGE) as u64
        }
    }

    impl Drop for Anon {
        fn drop(&mut self) {
            // SAFETY: unmaps the mapping made in `new`, used by nothing after this.
            unsafe { libc::munmap(self.ptr.cast(), self.len) };
        }
    }

    #[test]
    fn a_write_to_a_protected_page_waits_for_unprotect() {
        let m = Anon::new(8);
        for p in 0..8 {
            // SAFETY: inside the mapping.
            unsafe { *(m.addr(p) as *mut u64) = 1 };
        }
        let wp = WriteProtector::open().expect("userfaultfd (root or vm.unprivileged_userfaultfd)");
        wp.register(m.addr(0), (8 * PAGE) as u64).unwrap();
        wp.protect(m.addr(2), (2 * PAGE) as u64).unwrap();
        // A write outside the protected pages goes through.
        // SAFETY: inside the mapping.
        unsafe { *(m.addr(5) as *mut u64) = 5 };
        assert_eq!(wp.next_fault(Duration::from_millis(20)).unwrap(), None);
        let target = m.addr(3);
        let writer = std::thread::spawn(move || {
            // SAFETY: inside the mapping, which outlives the thread (joined below).
            unsafe { std::ptr::write_volatile(target as *mut u64, 7) };
        });
        let f = wp
            .next_fault(Duration::from_secs(5))
            .unwrap()
            .expect("a fault");
        assert_eq!(f.address & !(PAGE as u64 - 1), target);
        assert!(f.wp && f.write, "{f:?}");
        // The writer is blocked: the page still holds its old value.
        std::thread::sleep(Duration::from_millis(10));
        // SAFETY: inside the mapping; reading a protected page is allowed.
        assert_eq!(unsafe { std::ptr::read_volatile(target as *const u64) }, 1);
        assert!(!writer.is_finished());
        wp.unprotect(target, PAGE as u64).unwrap();
        writer.join().unwrap();
        // SAFETY: inside the mapping.
        assert_eq!(unsafe { std::ptr::read_volatile(target as *const u64) }, 7);
        // Page 2 is still protected; un-protecting it without waking is fine (no one
        // waits there) and writes then go through.
        wp.unprotect_no_wake(m.addr(2), PAGE as u64).unwrap();
        // SAFETY: inside the mapping.
        unsafe { *(m.addr(2) as *mut u64) = 2 };
        assert_eq!(wp.next_fault(Duration::from_millis(20)).unwrap(), None);
    }

    #[test]
    fn host_and_guest_addresses_round_trip() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let h = host_range(&mem, 0x3000, 0x2000).unwrap();
        assert_eq!(guest_address(&mem, h), Some(0x3000));
        assert_eq!(guest_address(&mem, h + 0x10), Some(0x3010));
        assert!(host_range(&mem, 0xff000, 0x2000).is_err());
        assert_eq!(guest_address(&mem, 0), None);
    }
}
