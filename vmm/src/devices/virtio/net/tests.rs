//! virtio-net through its transport: a real TAP for the happy path (the test side uses
//! an AF_PACKET socket on the interface), a socketpair for the guest-error cases.

use std::os::fd::{FromRawFd, OwnedFd};

use std::time::{Duration, Instant};
use twinrun_lab::tap::PacketSocket;

use vm_memory::{Bytes, GuestAddress};

use super::super::mmio::tests::*;
use super::super::mmio::*;
use super::super::testutil::*;
use super::tap::if_index;
use super::*;
use crate::devices::bus::BusDevice;

/// A unique TAP name; the interface (created by the device, not persistent) goes
/// away when the device's descriptor closes. Drop also deletes it in case a test
/// made it persistent some other way.
struct TapName(String);

impl TapName {
    fn new() -> TapName {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        TapName(format!("twtc{}{}", std::process::id() % 1_000_000, n))
    }
}

impl Drop for TapName {
    fn drop(&mut self) {
        if std::path::Path::new("/sys/class/net")
            .join(&self.0)
            .exists()
        {
            let _ = std::process::Command::new("ip")
                .args(["link", "del", &self.0])
                .status();
        }
    }
}

/// Waits for a frame with our test EtherType on `host` (the lab's raw packet socket on
/// the TAP: what the host network sees).
fn recv_test_frame(host: &PacketSocket) -> Vec<u8> {
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut buf = vec![0u8; 70000];
    while Instant::now() < deadline {
        if let Some(n) = host.recv_timeout(&mut buf, Duration::from_millis(50)) {
            if n > 14 && buf[12..14] == ETHERTYPE {
                return buf[..n].to_vec();
            }
        }
    }
    panic!("no test frame seen");
}

/// IEEE local experimental EtherType: nothing else on the link uses it.
const ETHERTYPE: [u8; 2] = [0x88, 0xb5];
const MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x42];

fn frame(payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&[0xff; 6]);
    f.extend_from_slice(&[0x02, 1, 2, 3, 4, 5]);
    f.extend_from_slice(&ETHERTYPE);
    f.extend_from_slice(payload);
    f
}

fn ready_both<'a>(t: &mut MmioTransport, mem: &'a GuestMemoryMmap) -> (Driver<'a>, Driver<'a>) {
    // RX rings at 0, TX rings at 0x4000.
    let rx = Driver::new(mem, 16);
    let tx = Driver {
        mock: virtio_queue::mock::MockSplitQueue::create(mem, GuestAddress(0x4000), 16),
        avail: 0,
    };
    init(t, VIRTIO_F_VERSION_1 | VIRTIO_NET_F_MAC);
    setup_queue(t, RX_QUEUE as u32, &rx, 16);
    setup_queue(t, TX_QUEUE as u32, &tx, 16);
    driver_ok(t);
    (rx, tx)
}

fn fd_of(t: &MmioTransport, not: RawFd) -> Vec<RawFd> {
    t.backend_fds()
        .into_iter()
        .map(|(f, _)| f)
        .filter(|&f| f != not)
        .collect()
}

#[test]
fn tx_and_rx_through_a_real_tap() {
    let name = TapName::new();
    let tap = Tap::open(&name.0).unwrap();
    assert!(tap.created());
    let _ = std::fs::write(
        format!("/proc/sys/net/ipv6/conf/{}/disable_ipv6", name.0),
        "1",
    );
    let tap_fd = tap.as_raw_fd();
    let mem = memory();
    let net = Net::new(tap, MAC).unwrap();
    let rx_evt = net.rx_evt.as_raw_fd();
    let mut t = MmioTransport::new(mem.clone(), Box::new(net)).unwrap();
    let mut mac = [0u8; 6];
    t.read(0, CONFIG_SPACE, &mut mac);
    assert_eq!(mac, MAC);
    assert_ne!(r(&mut t, REG_DEVICE_FEATURES) as u64 & VIRTIO_NET_F_MAC, 0);
    let (mut rx, mut tx) = ready_both(&mut t, &mem);
    let host = PacketSocket::bind(&name.0).unwrap();

    // TX: header + frame split over two descriptors.
    let f = frame(b"guest to host");
    mem.write_slice(&[0u8; NET_HDR_LEN], GuestAddress(0x10000))
        .unwrap();
    mem.write_slice(&f, GuestAddress(0x11000)).unwrap();
    tx.chain(
        0,
        &[
            (0x10000, NET_HDR_LEN as u32, false),
            (0x11000, f.len() as u32, false),
        ],
    );
    w(&mut t, REG_QUEUE_NOTIFY, TX_QUEUE as u32);
    assert_eq!(tx.used_idx(), 1);
    assert_eq!(recv_test_frame(&host), f);

    // RX: the guest offers a buffer and notifies; the host sends a frame.
    rx.chain(0, &[(0x20000, 2048, true)]);
    w(&mut t, REG_QUEUE_NOTIFY, RX_QUEUE as u32);
    t.backend_event(rx_evt, libc::EPOLLIN as u32);
    assert!(fd_of(&t, rx_evt).contains(&tap_fd));
    let f = frame(b"host to guest");
    assert!(host.send(&f));
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        t.backend_event(tap_fd, libc::EPOLLIN as u32);
        if rx.used_idx() == 1 {
            let mut got = vec![0u8; NET_HDR_LEN + f.len()];
            mem.read_slice(&mut got, GuestAddress(0x20000)).unwrap();
            if got[NET_HDR_LEN + 12..NET_HDR_LEN + 14] == ETHERTYPE {
                assert_eq!(rx.used(0), (0, (NET_HDR_LEN + f.len()) as u32));
                assert_eq!(&got[..NET_HDR_LEN], &[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0]);
                assert_eq!(&got[NET_HDR_LEN..], &f[..]);
                break;
            }
            // Some other host frame took the buffer: offer another.
            rx.chain(rx.avail, &[(0x20000, 2048, true)]);
        }
        assert!(Instant::now() < deadline, "frame never delivered");
        std::thread::sleep(Duration::from_millis(2));
    }
    assert_ne!(r(&mut t, REG_INTERRUPT_STATUS) & INTERRUPT_USED_RING, 0);
    drop(t);
    // We created it, so it is gone now.
    assert_eq!(if_index(&name.0), 0);
}

fn pair_net(mem: &GuestMemoryMmap) -> (MmioTransport, OwnedFd, RawFd, RawFd) {
    let mut fds = [0; 2];
    // SAFETY: socketpair fills two descriptors we then own.
    let r = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    };
    assert_eq!(r, 0);
    // SAFETY: fresh descriptors from socketpair.
    let (a, b) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    let tap = Tap::from_fd(a, "pair");
    let tap_fd = tap.as_raw_fd();
    let net = Net::new(tap, MAC).unwrap();
    let rx_evt = net.rx_evt.as_raw_fd();
    (
        MmioTransport::new(mem.clone(), Box::new(net)).unwrap(),
        b,
        tap_fd,
        rx_evt,
    )
}

fn needs_reset(t: &mut MmioTransport) -> bool {
    r(t, REG_STATUS) & STATUS_DEVICE_NEEDS_RESET != 0
}

#[test]
fn tx_errors_need_reset() {
    let cases: Vec<Vec<(u64, u32, bool)>> = vec![
        vec![(0x10000, 4, false)], // shorter than header
        vec![(0x10000, MAX_FRAME_WITH_HDR as u32 + 1, false)], // too long
        vec![(0x10000, 64, true)], // device-writable
        vec![(0xFFFF0, 64, false)], // outside memory
    ];
    for bufs in cases {
        let mem = memory();
        let (mut t, _peer, _, _) = pair_net(&mem);
        let (_rx, mut tx) = ready_both(&mut t, &mem);
        tx.chain(0, &bufs);
        w(&mut t, REG_QUEUE_NOTIFY, TX_QUEUE as u32);
        assert!(needs_reset(&mut t), "{bufs:?}");
        assert_eq!(tx.used_idx(), 0);
    }
}

#[test]
fn rx_stalls_without_buffers_and_resumes_on_notify() {
    let mem = memory();
    let (mut t, peer, tap_fd, rx_evt) = pair_net(&mem);
    let (mut rx, _tx) = ready_both(&mut t, &mem);
    let f = frame(b"queued");
    // SAFETY: writing a valid buffer to our socket.
    unsafe { libc::write(peer.as_raw_fd(), f.as_ptr().cast(), f.len()) };
    // No buffers: the device stops watching the TAP, the frame stays queued.
    t.backend_event(tap_fd, libc::EPOLLIN as u32);
    assert!(!fd_of(&t, rx_evt).contains(&tap_fd));
    assert_eq!(rx.used_idx(), 0);
    rx.chain(0, &[(0x20000, 100, true)]);
    w(&mut t, REG_QUEUE_NOTIFY, RX_QUEUE as u32);
    t.backend_event(rx_evt, libc::EPOLLIN as u32);
    assert_eq!(rx.used_idx(), 1);
    assert_eq!(rx.used(0), (0, (NET_HDR_LEN + f.len()) as u32));
    // Too small a buffer: the frame is dropped and the buffer returned empty.
    let big = frame(&[7u8; 500]);
    // SAFETY: as above.
    unsafe { libc::write(peer.as_raw_fd(), big.as_ptr().cast(), big.len()) };
    rx.chain(1, &[(0x20000, 100, true)]);
    w(&mut t, REG_QUEUE_NOTIFY, RX_QUEUE as u32);
    t.backend_event(rx_evt, libc::EPOLLIN as u32);
    assert_eq!(rx.used(1), (1, 0));
    assert!(!needs_reset(&mut t));
}

#[test]
fn rx_errors_need_reset() {
    // Device-readable RX buffer; RX buffer outside memory.
    for bufs in [
        vec![(0x20000u64, 2048u32, false)],
        vec![(0x2_0000_0000u64, 2048, true)],
    ] {
        let mem = memory();
        let (mut t, peer, _tap_fd, rx_evt) = pair_net(&mem);
        let (mut rx, _tx) = ready_both(&mut t, &mem);
        let f = frame(b"x");
        // SAFETY: writing a valid buffer to our socket.
        unsafe { libc::write(peer.as_raw_fd(), f.as_ptr().cast(), f.len()) };
        rx.chain(0, &bufs);
        w(&mut t, REG_QUEUE_NOTIFY, RX_QUEUE as u32);
        t.backend_event(rx_evt, libc::EPOLLIN as u32);
        assert!(needs_reset(&mut t), "{bufs:?}");
        assert_eq!(rx.used_idx(), 0);
    }
}

#[test]
fn rx_ignored_until_driver_ok() {
    let mem = memory();
    let (mut t, peer, tap_fd, rx_evt) = pair_net(&mem);
    let f = frame(b"early");
    // SAFETY: writing a valid buffer to our socket.
    unsafe { libc::write(peer.as_raw_fd(), f.as_ptr().cast(), f.len()) };
    t.backend_event(tap_fd, libc::EPOLLIN as u32);
    assert!(!fd_of(&t, rx_evt).contains(&tap_fd));
    assert!(!needs_reset(&mut t));
}

#[test]
fn bad_tap_names_are_rejected() {
    assert!(matches!(Tap::open(""), Err(tap::TapError::BadName(_))));
    assert!(matches!(
        Tap::open("a-name-that-is-too-long"),
        Err(tap::TapError::BadName(_))
    ));
}
