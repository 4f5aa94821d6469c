//! A TAP interface, opened or created by name through `/dev/net/tun`.
//!
//! Opened with `IFF_TAP | IFF_NO_PI` and without `IFF_VNET_HDR`: the device offers no
//! offloads, so frames cross the TAP as plain Ethernet and the device adds or strips the
//! 12-byte virtio-net header itself. The descriptor is non-blocking.
//!
//! If the interface did not exist, the kernel creates it (not persistent) and we bring
//! it up; it disappears when the last descriptor closes, i.e. when this `Tap` drops. An
//! existing (persistent) interface is attached to and left as it was.

use std::ffi::CStr;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;

#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error("TAP name {0:?} must be 1 to 15 bytes without NUL")]
    BadName(String),
    #[error("cannot open /dev/net/tun: {0}")]
    OpenTun(io::Error),
    #[error("TUNSETIFF {name}: {source}")]
    SetIff { name: String, source: io::Error },
    #[error("bringing TAP {name} up: {source}")]
    Up { name: String, source: io::Error },
}

/// `struct ifreq` with the flags member of its union (40 bytes on x86_64).
#[repr(C)]
struct IfReqFlags {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

impl IfReqFlags {
    fn new(name: &str) -> Result<IfReqFlags, TapError> {
        let b = name.as_bytes();
        if b.is_empty() || b.len() >= libc::IFNAMSIZ || b.contains(&0) {
            return Err(TapError::BadName(name.into()));
        }
        let mut r = IfReqFlags {
            name: [0; libc::IFNAMSIZ],
            flags: 0,
            _pad: [0; 22],
        };
        r.name[..b.len()].copy_from_slice(b);
        Ok(r)
    }
}

pub struct Tap {
    file: File,
    name: String,
    created: bool,
}

impl Tap {
    /// Opens TAP `name`, creating it if it does not exist.
    pub fn open(name: &str) -> Result<Tap, TapError> {
        let mut req = IfReqFlags::new(name)?;
        let existed = std::path::Path::new("/sys/class/net").join(name).exists();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(TapError::OpenTun)?;
        req.flags = IFF_TAP | IFF_NO_PI;
        // SAFETY: TUNSETIFF reads and writes a `struct ifreq`; `req` is one, laid out as
        // the kernel expects, and lives across the call.
        let r = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF as _, &mut req) };
        if r < 0 {
            return Err(TapError::SetIff {
                name: name.into(),
                source: io::Error::last_os_error(),
            });
        }
        let tap = Tap {
            file,
            name: name.into(),
            created: !existed,
        };
        if tap.created {
            set_up(name).map_err(|source| TapError::Up {
                name: name.into(),
                source,
            })?;
        }
        Ok(tap)
    }

    /// Wraps any packet-oriented descriptor (e.g. one end of a `SOCK_SEQPACKET`
    /// socketpair) as the frame source and sink; used by tests and fuzzing.
    pub fn from_fd(fd: OwnedFd, name: &str) -> Tap {
        Tap {
            file: File::from(fd),
            name: name.into(),
            created: false,
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// True when opening created the interface (it vanishes when we close it).
    pub fn created(&self) -> bool {
        self.created
    }

    /// Reads one frame; `WouldBlock` when none is queued.
    pub fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.file.read(buf)
    }

    /// Writes one frame.
    pub fn write_frame(&mut self, frame: &[u8]) -> io::Result<usize> {
        self.file.write(frame)
    }
}

impl Tap {
    /// A second descriptor for the same interface (`dup`), so another thread can write
    /// frames (released output) without the device.
    pub fn try_clone_writer(&self) -> io::Result<File> {
        self.file.try_clone()
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

/// Sets IFF_UP on interface `name`.
fn set_up(name: &str) -> io::Result<()> {
    // SAFETY: plain socket creation; the result is checked and owned right away.
    let s = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if s < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `s` is a fresh descriptor nobody else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(s) };
    let mut req = IfReqFlags::new(name).map_err(|e| io::Error::other(e.to_string()))?;
    // SAFETY: SIOCGIFFLAGS fills the flags of a `struct ifreq` we own.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS as _, &mut req) } < 0 {
        return Err(io::Error::last_os_error());
    }
    req.flags |= libc::IFF_UP as libc::c_short;
    // SAFETY: SIOCSIFFLAGS reads a `struct ifreq` we own.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS as _, &req) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Interface index of `name`, 0 if there is none.
pub fn if_index(name: &str) -> u32 {
    let Ok(c) = std::ffi::CString::new(name) else {
        return 0;
    };
    let c: &CStr = &c;
    // SAFETY: `c` is a valid NUL-terminated string for the call's duration.
    unsafe { libc::if_nametoindex(c.as_ptr()) }
}
