//! A TAP interface, opened or created by name through `/dev/net/tun`.
//!
//! Opened with `IFF_TAP | IFF_NO_PI` and without `IFF_VNET_HDR`: the device offers no
//! offloads, so frames cross the TAP as plain Ethernet and the device adds or strips the
//! 12-byte virtio-net header itself. The descriptor is non-blocking.
//!
//! If the interface did not exist, the kernel creates it (not persistent) and we bring
//! it up; it disappears when the last descriptor closes, i.e. when this `Tap` drops. An
//! existing (persistent) interface is attached to and left as it was.
//!
//! Pre-opening ([`preopen`]): a process may open a TAP long before it builds the VM that
//! uses it (the FT standby does so at start). While no descriptor is attached a TAP has
//! no carrier and its bridge port is disabled; the carrier change reaches the bridge
//! through the kernel's linkwatch, up to about a second later. Frames written in that
//! window (the announce right after a failover) are lost. A pre-opened descriptor keeps
//! the carrier up meanwhile, and [`Tap::open`] takes it over instead of reopening: a
//! non-multiqueue TAP refuses a second `TUNSETIFF` while attached (`EBUSY`).

use std::collections::BTreeMap;
use std::ffi::CStr;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::sync::{Mutex, MutexGuard};
use twinrun_lock::MutexExt;

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

/// TAPs opened ahead of use by [`preopen`], by interface name, until [`Tap::open`] takes
/// them.
static PREOPENED: Mutex<BTreeMap<String, Tap>> = Mutex::new(BTreeMap::new());

fn preopened() -> MutexGuard<'static, BTreeMap<String, Tap>> {
    // A panic while holding the lock leaves the map itself consistent (every operation
    // on it is a single insert or remove).
    PREOPENED.lock_or_recover()
}

/// Opens TAP `name` now (creating it if it does not exist) and keeps the descriptor for
/// the next [`Tap::open`] of that name in this process, so the interface has carrier
/// (and its bridge port forwards) from now on rather than from when the VM is built.
/// A name already pre-opened is left as it is.
pub fn preopen(name: &str) -> Result<(), TapError> {
    let mut map = preopened();
    if !map.contains_key(name) {
        let tap = Tap::open_fresh(name)?;
        map.insert(name.to_owned(), tap);
    }
    Ok(())
}

/// Closes a pre-opened TAP nobody took (a created one vanishes). True if there was one.
pub fn forget_preopened(name: &str) -> bool {
    let tap = preopened().remove(name);
    tap.is_some()
}

/// The descriptor of pre-opened TAP `name`, if any (to watch it before the handover).
pub fn preopened_fd(name: &str) -> Option<RawFd> {
    preopened().get(name).map(|t| t.as_raw_fd())
}

impl Tap {
    /// Opens TAP `name`, creating it if it does not exist. A descriptor [`preopen`]ed for
    /// `name` is taken instead, after discarding every frame queued on it: they reached
    /// the TAP before this VM existed (a standby's resumed guest must not see the LAN's
    /// traffic from before the failover, which its state never saw).
    pub fn open(name: &str) -> Result<Tap, TapError> {
        let taken = preopened().remove(name);
        match taken {
            Some(mut tap) => {
                let dropped = tap.drain();
                if dropped > 0 {
                    log::debug!(
                        "TAP {name}: {dropped} frame(s) queued before the handover dropped"
                    );
                }
                Ok(tap)
            }
            None => Tap::open_fresh(name),
        }
    }

    /// Reads and discards queued frames until none is left; returns how many. Bounded
    /// well above a TAP's queue (`txqueuelen`, 1000 by default), so frames that keep
    /// arriving cannot hold the caller here.
    fn drain(&mut self) -> u64 {
        const MAX_DRAIN: u64 = 1 << 16;
        let mut buf = vec![0u8; 65536];
        let mut n = 0;
        while n < MAX_DRAIN {
            match self.file.read(&mut buf) {
                Ok(_) => n += 1,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                // WouldBlock: the queue is empty (the descriptor is non-blocking). Any
                // other error would repeat; the device reports it on its first read.
                Err(_) => break,
            }
        }
        n
    }

    fn open_fresh(name: &str) -> Result<Tap, TapError> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::time::{Duration, Instant};
    use twinrun_lab::tap::PacketSocket;

    /// A unique TAP name; whatever is left pre-opened under it is closed on drop.
    struct Name(String);

    impl Name {
        fn new() -> Name {
            static N: AtomicU32 = AtomicU32::new(0);
            Name(format!(
                "twyp{}{}",
                std::process::id() % 1_000_000,
                N.fetch_add(1, Ordering::Relaxed)
            ))
        }
    }

    impl Drop for Name {
        fn drop(&mut self) {
            forget_preopened(&self.0);
        }
    }

    /// An AF_PACKET socket bound to an interface (the lab's): what it sends leaves
    /// through the interface, i.e. reaches the TAP's descriptor.
    fn packet_socket(ifname: &str) -> PacketSocket {
        PacketSocket::bind(ifname).unwrap()
    }

    fn send(sock: &PacketSocket, frame: &[u8]) {
        assert!(sock.send(frame), "{}", io::Error::last_os_error());
    }

    /// Waits until `fd` has something to read, without reading it.
    fn readable(fd: RawFd, within: Duration) -> bool {
        let end = Instant::now() + within;
        while Instant::now() < end {
            let mut p = libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd for the call's duration.
            if unsafe { libc::poll(&mut p, 1, 10) } > 0 && p.revents & libc::POLLIN != 0 {
                return true;
            }
        }
        false
    }

    fn test_frame(tag: u8) -> Vec<u8> {
        let mut f = vec![0xff; 6];
        f.extend_from_slice(&[0x02, 0, 0, 0, 0x77, tag]);
        // IEEE local experimental EtherType: nothing else on the link uses it.
        f.extend_from_slice(&[0x88, 0xb5]);
        f.resize(60, tag);
        f
    }

    /// Reads frames until one of ours with `tag` (other traffic, e.g. IPv6 router
    /// solicitations, may come first).
    fn read_test_frame(tap: &mut Tap, tag: u8) -> bool {
        let mut buf = vec![0u8; 65536];
        let end = Instant::now() + Duration::from_secs(5);
        while Instant::now() < end {
            match tap.read_frame(&mut buf) {
                Ok(n) if n >= 60 && buf[12..14] == [0x88, 0xb5] && buf[11] == tag => return true,
                Ok(_) => {}
                Err(_) => std::thread::sleep(Duration::from_millis(2)),
            }
        }
        false
    }

    #[test]
    fn preopened_tap_is_handed_over_drained() {
        let name = Name::new();
        preopen(&name.0).unwrap();
        // Idempotent: the second call keeps the first descriptor.
        let fd = preopened_fd(&name.0).unwrap();
        preopen(&name.0).unwrap();
        assert_eq!(preopened_fd(&name.0), Some(fd));
        let _ = std::fs::write(
            format!("/proc/sys/net/ipv6/conf/{}/disable_ipv6", name.0),
            "1",
        );
        let host = packet_socket(&name.0);

        // A frame from the LAN before the handover is queued on the pre-opened fd...
        send(&host, &test_frame(1));
        assert!(readable(fd, Duration::from_secs(5)), "frame never queued");

        // ...the normal open path takes that same descriptor (no second TUNSETIFF,
        // which an attached TAP would refuse) and drops what was queued.
        let mut tap = Tap::open(&name.0).unwrap();
        assert_eq!(tap.as_raw_fd(), fd);
        assert!(tap.created());
        assert_eq!(preopened_fd(&name.0), None);
        let mut buf = [0u8; 2048];
        let r = tap.read_frame(&mut buf);
        assert!(
            matches!(&r, Err(e) if e.kind() == io::ErrorKind::WouldBlock),
            "stale frame not drained: {r:?}"
        );

        // The device works after the handover, both ways.
        send(&host, &test_frame(2));
        assert!(read_test_frame(&mut tap, 2));
        tap.write_frame(&test_frame(3)).unwrap();

        // Taken once: a later open is a fresh one (the interface exists, attached
        // by `tap`, so the kernel refuses it).
        assert!(matches!(Tap::open(&name.0), Err(TapError::SetIff { .. })));
        drop(tap);
        assert_eq!(if_index(&name.0), 0, "created TAP left behind");
    }

    #[test]
    fn preopen_rejects_bad_names_and_forget_closes() {
        assert!(matches!(preopen(""), Err(TapError::BadName(_))));
        let name = Name::new();
        preopen(&name.0).unwrap();
        assert_ne!(if_index(&name.0), 0);
        assert!(forget_preopened(&name.0));
        assert!(!forget_preopened(&name.0));
        assert_eq!(if_index(&name.0), 0);
    }
}
