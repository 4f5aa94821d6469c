//! The device manager: layout, bus attachment, the backend thread and pause/resume.

use std::io::Read;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use super::*;
use crate::config::{ConsoleConfig, DiskConfig, IoEngine, NetConfig, Payload, Workloads};
use crate::devices::virtio::mmio::*;
use vm_memory::GuestAddress;

struct Cleanup(Vec<std::path::PathBuf>);
impl Drop for Cleanup {
    fn drop(&mut self) {
        for p in &self.0 {
            let _ = std::fs::remove_file(p);
        }
    }
}

fn unique(tag: &str) -> std::path::PathBuf {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    std::env::temp_dir().join(format!("twinrun-mgr-{}-{tag}-{n}", std::process::id()))
}

fn cfg(console: ConsoleConfig, disks: Vec<DiskConfig>, nets: Vec<NetConfig>) -> VmConfig {
    VmConfig {
        mem_mib: 16,
        vcpus: 1,
        payload: Payload::TestGuest {
            elf: "g".into(),
            workloads: Workloads::default(),
        },
        disks,
        nets,
        console,
    }
}

fn memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
}

#[test]
fn layout_descriptors_and_bus() {
    let log = unique("log");
    let d1 = unique("d1");
    let d2 = unique("d2");
    let _c = Cleanup(vec![log.clone(), d1.clone(), d2.clone()]);
    std::fs::write(&d1, vec![0u8; 4096]).unwrap();
    std::fs::write(&d2, vec![0u8; 1024]).unwrap();
    let disk = |p: &std::path::Path| DiskConfig {
        path: p.into(),
        read_only: false,
        io_engine: IoEngine::IoUring,
        serial: None,
    };
    let tap = format!("twtm{}", std::process::id() % 1_000_000);
    let c = cfg(
        ConsoleConfig::File { path: log.clone() },
        vec![disk(&d1), disk(&d2)],
        vec![NetConfig {
            tap: tap.clone(),
            mac: "02:00:00:00:00:07".into(),
        }],
    );
    let mem = memory();
    let mut m = DeviceManager::new(&mem, &c).unwrap();
    let d = m.descriptors();
    let ids: Vec<u32> = d.iter().map(|d| d.device_id).collect();
    assert_eq!(
        ids,
        [
            abi::VIRTIO_ID_CONSOLE,
            abi::VIRTIO_ID_BLOCK,
            abi::VIRTIO_ID_BLOCK,
            abi::VIRTIO_ID_NET
        ]
    );
    for (i, d) in d.iter().enumerate() {
        assert_eq!(
            d.mmio_base,
            abi::MMIO_BASE + i as u64 * abi::MMIO_WINDOW_SIZE
        );
    }
    let mut bus = Bus::new();
    m.attach(&mut bus).unwrap();
    let mut b = [0u8; 4];
    for (i, want) in ids.iter().enumerate() {
        let base = abi::MMIO_BASE + i as u64 * abi::MMIO_WINDOW_SIZE;
        assert!(bus.read(base + REG_MAGIC, &mut b));
        assert_eq!(u32::from_le_bytes(b), MMIO_MAGIC);
        bus.read(base + REG_DEVICE_ID, &mut b);
        assert_eq!(u32::from_le_bytes(b), *want);
    }
    // Disk 2 capacity: 1024 bytes = 2 sectors.
    let mut cap = [0u8; 8];
    bus.read(
        abi::MMIO_BASE + 2 * abi::MMIO_WINDOW_SIZE + CONFIG_SPACE,
        &mut cap,
    );
    assert_eq!(u64::from_le_bytes(cap), 2);
    m.start().unwrap();
    m.pause();
    m.resume();
    m.shutdown();
    m.shutdown();
    drop(m);
    // The bus holds the transports too; the TAP closes with the last of them.
    drop(bus);
    assert_eq!(
        crate::devices::virtio::net::tap::if_index(&tap),
        0,
        "TAP we created must be gone"
    );
}

#[test]
fn errors_name_the_device() {
    let mem = memory();
    let c = cfg(
        ConsoleConfig::Stdout,
        vec![DiskConfig {
            path: "/nonexistent/x.img".into(),
            read_only: false,
            io_engine: IoEngine::Sync,
            serial: None,
        }],
        vec![],
    );
    let e = DeviceManager::new(&mem, &c).err().unwrap();
    assert!(e.to_string().starts_with("disks[0]:"), "{e}");
    let c = cfg(
        ConsoleConfig::File {
            path: "/nonexistent/dir/log".into(),
        },
        vec![],
        vec![],
    );
    assert!(matches!(
        DeviceManager::new(&mem, &c),
        Err(DeviceError::Console(_))
    ));
}

#[test]
fn backend_thread_serves_console_socket_and_pauses_quickly() {
    let sock = unique("sock");
    let _c = Cleanup(vec![sock.clone()]);
    let mem = memory();
    let c = cfg(ConsoleConfig::Socket { path: sock.clone() }, vec![], vec![]);
    let mut m = DeviceManager::new(&mem, &c).unwrap();
    m.start().unwrap();
    let t = m.transport(0).unwrap();
    // Drive a TX through the transport as a guest would, before anyone connects:
    // the output is kept until a reader comes.
    use crate::devices::virtio::testutil::Driver;
    let mut drv = Driver::new(&mem, 16);
    {
        use crate::devices::virtio::mmio::tests::*;
        let mut t = t.lock().unwrap();
        init(&mut t, crate::devices::virtio::VIRTIO_F_VERSION_1);
        setup_queue(&mut t, 1, &drv, 16);
        driver_ok(&mut t);
        vm_memory::Bytes::write_slice(&mem, b"early\n", GuestAddress(0x10000)).unwrap();
        drv.chain(0, &[(0x10000, 6, false)]);
        w(&mut t, REG_QUEUE_NOTIFY, 1);
    }
    let mut reader = UnixStream::connect(&sock).unwrap();
    reader
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut got = [0u8; 6];
    reader.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"early\n");

    // Pause/resume is fast and repeatable.
    let mut worst = Duration::ZERO;
    for _ in 0..200 {
        let s = Instant::now();
        m.pause();
        worst = worst.max(s.elapsed());
        m.resume();
    }
    eprintln!("worst pause latency over 200 rounds: {worst:?}");
    assert!(worst < Duration::from_millis(50), "pause took {worst:?}");

    // While paused, a new reader is not served; after resume it is.
    m.pause();
    drop(reader);
    let mut reader = UnixStream::connect(&sock).unwrap();
    {
        use crate::devices::virtio::mmio::tests::*;
        let mut t = t.lock().unwrap();
        vm_memory::Bytes::write_slice(&mem, b"late\n", GuestAddress(0x11000)).unwrap();
        drv.chain(1, &[(0x11000, 5, false)]);
        w(&mut t, REG_QUEUE_NOTIFY, 1);
    }
    m.resume();
    reader
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut got = [0u8; 5];
    reader.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"late\n");
    m.shutdown();
    drop(t);
    drop(m);
    assert!(!sock.exists(), "socket removed with the manager");
}

#[test]
fn backend_thread_delivers_net_rx_after_notify() {
    use crate::devices::virtio::mmio::tests::*;
    use crate::devices::virtio::net::{tap::Tap, Net, RX_QUEUE};
    use crate::devices::virtio::testutil::Driver;
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

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
    let (a, peer) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    let mem = memory();
    let net = Net::new(Tap::from_fd(a, "pair"), [2, 0, 0, 0, 0, 9]).unwrap();
    let mut m = DeviceManager::from_devices(&mem, vec![Box::new(net)]).unwrap();
    m.start().unwrap();
    let t = m.transport(0).unwrap();
    let mut drv = Driver::new(&mem, 16);
    {
        let mut t = t.lock().unwrap();
        init(&mut t, crate::devices::virtio::VIRTIO_F_VERSION_1);
        setup_queue(&mut t, RX_QUEUE as u32, &drv, 16);
        driver_ok(&mut t);
    }
    // A frame waits in the "TAP" before any buffer exists.
    let f = [0x5Au8; 60];
    // SAFETY: writing a valid buffer to our socket.
    unsafe { libc::write(peer.as_raw_fd(), f.as_ptr().cast(), f.len()) };
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(drv.used_idx(), 0);
    // Paused: nothing is delivered even when buffers arrive.
    m.pause();
    {
        let mut t = t.lock().unwrap();
        drv.chain(0, &[(0x20000, 2048, true)]);
        w(&mut t, REG_QUEUE_NOTIFY, RX_QUEUE as u32);
    }
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(drv.used_idx(), 0);
    m.resume();
    let deadline = Instant::now() + Duration::from_secs(5);
    while drv.used_idx() == 0 {
        assert!(Instant::now() < deadline, "RX never delivered");
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(drv.used(0), (0, 72));
    let mut got = [0u8; 60];
    vm_memory::Bytes::read_slice(&mem, &mut got, GuestAddress(0x20000 + 12)).unwrap();
    assert_eq!(got, f);
    assert_ne!(
        t.lock().unwrap().interrupt_status() & crate::devices::virtio::INTERRUPT_USED_RING,
        0
    );
    m.shutdown();
}
