//! Shared support for the integration tests that give the test guest a NIC: a unique
//! TAP name deleted on drop, a raw packet socket on the TAP (the host side of the
//! link), and the ARP frames the tests exchange with the guest (10.0.0.2).

// Each test binary includes this module on its own (`#[path] mod tap;`) and uses only
// part of it, so what one binary leaves unused is not dead code.
#![allow(dead_code)]

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::process::Command;

/// A TAP name unique to this process (`prefix` tells the tests apart, since they run in
/// parallel); the interface is deleted on drop, also when the test fails.
pub struct Tap(String);

impl Tap {
    /// `prefix` plus up to six digits stays within IFNAMSIZ for a prefix of up to 9.
    pub fn new(prefix: &str) -> Tap {
        Tap(format!("{prefix}{}", std::process::id() % 1_000_000))
    }

    pub fn name(&self) -> &str {
        &self.0
    }
}

impl Drop for Tap {
    fn drop(&mut self) {
        if Path::new("/sys/class/net").join(&self.0).exists() {
            let _ = Command::new("ip").args(["link", "del", &self.0]).status();
        }
    }
}

/// Non-blocking raw packet socket bound to an interface: frames sent here reach the
/// VM's RX queue, frames the VM transmits can be read here.
pub struct PacketSock(OwnedFd);

impl PacketSock {
    pub fn new(ifname: &str) -> PacketSock {
        let c = std::ffi::CString::new(ifname).unwrap();
        // SAFETY: `c` is a valid NUL-terminated string.
        let idx = unsafe { libc::if_nametoindex(c.as_ptr()) };
        assert_ne!(idx, 0, "no interface {ifname}");
        let proto = (libc::ETH_P_ALL as u16).to_be();
        // SAFETY: plain socket creation, checked below.
        let fd = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
                i32::from(proto),
            )
        };
        assert!(fd >= 0, "{}", std::io::Error::last_os_error());
        // SAFETY: `fd` is a fresh descriptor nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: an all-zero sockaddr_ll is valid; the fields used are set below.
        let mut sa: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sa.sll_family = libc::AF_PACKET as u16;
        sa.sll_protocol = proto;
        sa.sll_ifindex = idx as i32;
        // SAFETY: `sa` is a valid sockaddr_ll of the size passed.
        let r = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&sa as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        assert_eq!(r, 0, "{}", std::io::Error::last_os_error());
        PacketSock(fd)
    }

    /// Sends one frame; false if it did not go out whole.
    pub fn send(&self, frame: &[u8]) -> bool {
        // SAFETY: sends from a valid buffer of the given length on a bound socket.
        let r = unsafe { libc::send(self.0.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
        r == frame.len() as isize
    }

    /// Calls `f` with each frame waiting on the socket, until none is left.
    pub fn drain(&self, buf: &mut [u8], mut f: impl FnMut(&[u8])) {
        loop {
            // SAFETY: receives into a valid buffer of the given length.
            let r =
                unsafe { libc::recv(self.0.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if r < 0 {
                return;
            }
            f(&buf[..r as usize]);
        }
    }
}

/// A broadcast ARP request for the guest's address (10.0.0.2) from 10.0.0.1 at
/// `host_mac`.
pub fn arp_request(host_mac: [u8; 6]) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&[0xff; 6]);
    f.extend_from_slice(&host_mac);
    f.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 1]);
    f.extend_from_slice(&host_mac);
    f.extend_from_slice(&[10, 0, 0, 1]);
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&[10, 0, 0, 2]);
    f
}

/// Whether `frame` is an Ethernet frame sent from `mac`.
pub fn is_from(frame: &[u8], mac: [u8; 6]) -> bool {
    frame.len() >= 14 && frame[6..12] == mac
}

/// Whether `frame` is an ARP reply (EtherType 0x0806, operation 2).
pub fn is_arp_reply(frame: &[u8]) -> bool {
    frame.len() >= 22 && frame[12..14] == [0x08, 0x06] && frame[20..22] == [0, 2]
}
