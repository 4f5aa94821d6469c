#![no_main]
//! virtio-net TX (and RX into fuzzed buffers) with a socketpair standing in for the TAP.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use libfuzzer_sys::fuzz_target;
use vmm::devices::virtio::net::tap::Tap;
use vmm::devices::virtio::net::{Net, RX_QUEUE, TX_QUEUE, VIRTIO_NET_F_MAC};
use vmm_fuzz::{run_queue, VERSION_1};

fn pair() -> (OwnedFd, OwnedFd) {
    let mut fds = [0; 2];
    // SAFETY: socketpair fills two descriptors that we take ownership of.
    let r = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    };
    assert_eq!(r, 0);
    // SAFETY: fresh descriptors.
    unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
}

fuzz_target!(|data: &[u8]| {
    if data.is_empty() {
        return;
    }
    let rx = data[0] & 0x80 != 0;
    let (a, peer) = pair();
    let tap = Tap::from_fd(a, "fuzz");
    let tap_fd = tap.as_raw_fd();
    let Ok(net) = Net::new(tap, [2, 0, 0, 0, 0, 1]) else {
        return;
    };
    let queue = if rx { RX_QUEUE } else { TX_QUEUE } as u32;
    let Some((mut t, _mem)) = run_queue(data, Box::new(net), VERSION_1 | VIRTIO_NET_F_MAC, queue)
    else {
        return;
    };
    if rx {
        // A frame from the host side, then what the backend thread would do.
        let frame = [0xAAu8; 100];
        // SAFETY: writing a valid buffer to our socket.
        unsafe { libc::write(peer.as_raw_fd(), frame.as_ptr().cast(), frame.len()) };
        t.backend_event(tap_fd, libc::EPOLLIN as u32);
    }
});
