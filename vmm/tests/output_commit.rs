//! Output commit and the disk journal with the real test guest on real KVM: console
//! output held until released epoch by epoch, discarded epochs never appear, a full
//! gate stalls the guest without loss, net TX frames reach a real TAP only on release,
//! and a second disk image rebuilt from journals equals the first.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use vmm::config::{ConsoleConfig, DiskConfig, IoEngine, NetConfig, Payload, VmConfig, Workloads};
use vmm::devices::virtio::block::apply_journal;
use vmm::{build_vm, VmExit, Vmm};

/// Builds the guest once per test process (`$TWINRUN_GUEST` skips the build).
fn guest_elf() -> PathBuf {
    static ELF: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    ELF.get_or_init(|| {
        if let Some(p) = std::env::var_os("TWINRUN_GUEST") {
            return Ok(PathBuf::from(p));
        }
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../guest");
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let out = Command::new(cargo)
            .args(["build", "--release"])
            .current_dir(&dir)
            .env("CARGO_TARGET_DIR", dir.join("target"))
            .env_remove("RUSTFLAGS")
            .env_remove("CARGO_ENCODED_RUSTFLAGS")
            .output()
            .map_err(|e| format!("cannot run cargo: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "guest build failed:\n{}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        Ok(dir.join("target/x86_64-unknown-linux-gnu/release/twinrun-guest"))
    })
    .clone()
    .unwrap_or_else(|e| panic!("{e}"))
}

/// Files and a TAP removed on drop (also when the test fails).
struct Cleanup {
    files: Vec<PathBuf>,
    tap: Option<String>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        for f in &self.files {
            let _ = std::fs::remove_file(f);
        }
        if let Some(t) = &self.tap {
            if Path::new("/sys/class/net").join(t).exists() {
                let _ = Command::new("ip").args(["link", "del", t]).status();
            }
        }
    }
}

fn temp(tag: &str) -> PathBuf {
    std::env::temp_dir().join(format!("twinrun-oc-{tag}-{}", std::process::id()))
}

fn counter_config(log: &Path, rate: u32, limit: u64) -> VmConfig {
    VmConfig {
        mem_mib: 64,
        vcpus: 1,
        payload: Payload::TestGuest {
            elf: guest_elf(),
            workloads: Workloads {
                counter: true,
                counter_rate: rate,
                counter_limit: limit,
                ..Workloads::default()
            },
        },
        disks: vec![],
        nets: vec![],
        console: ConsoleConfig::File {
            path: log.to_owned(),
        },
    }
}

fn read(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap_or_default()
}

/// Checks BOOT, then `C 1..` without gap or duplicate, then (if `done`) DONE; returns
/// the last counter value.
fn check_counter_prefix(text: &str, done: bool) -> u64 {
    let mut lines = text.lines();
    let boot = lines.next().unwrap_or_default();
    assert!(boot.starts_with("BOOT workloads=counter"), "{text}");
    let mut next = 1;
    let mut saw_done = false;
    for l in lines {
        assert!(!saw_done, "output after DONE:\n{text}");
        if let Some(n) = l.strip_prefix("C ") {
            assert_eq!(n.parse::<u64>().unwrap(), next, "gap or duplicate:\n{text}");
            next += 1;
        } else {
            assert_eq!(l, "DONE", "unexpected line in:\n{text}");
            saw_done = true;
        }
    }
    assert_eq!(saw_done, done, "{text}");
    assert!(
        text.ends_with('\n'),
        "released output ends mid-line:\n{text}"
    );
    next - 1
}

/// Pauses, closes `epoch`, resumes; returns the epoch's console bytes and whether the
/// guest still runs (if not, the epoch is closed after the end).
fn close(vmm: &mut Vmm, epoch: u64) -> (u64, bool) {
    let running = vmm.wait_timeout(Duration::ZERO).is_none() && vmm.pause().is_ok();
    if !running {
        // Ended: join the vCPU threads so that nothing can emit output any more.
        vmm.wait();
    }
    let s = vmm.close_epoch(epoch).expect("close_epoch");
    if running {
        vmm.resume().unwrap();
    }
    (s.console_bytes, running)
}

#[test]
fn console_output_appears_only_on_release_in_epoch_order() {
    let log = temp("console.log");
    let _c = Cleanup {
        files: vec![log.clone()],
        tap: None,
    };
    let mut vmm = build_vm(&counter_config(&log, 2000, 600)).expect("build");
    vmm.enable_output_commit().unwrap();
    vmm.start().unwrap();
    // Cumulative console bytes of closed epochs, by epoch.
    let mut cumulative = vec![0u64];
    let mut epoch = 0u64;
    let t0 = Instant::now();
    loop {
        std::thread::sleep(Duration::from_millis(15));
        assert!(
            vmm.close_epoch(99).is_err(),
            "close_epoch must refuse a running VM"
        );
        epoch += 1;
        let (bytes, running) = close(&mut vmm, epoch);
        cumulative.push(cumulative[epoch as usize - 1] + bytes);
        if epoch <= 3 {
            // Nothing released yet: nothing may have reached the file.
            assert!(read(&log).is_empty(), "output leaked before any release");
        } else {
            // Release with a lag of three epochs, as acknowledgements would.
            let through = epoch - 3;
            vmm.release_output(through).unwrap();
            let out = read(&log);
            assert_eq!(
                out.len() as u64,
                cumulative[through as usize],
                "after release({through}) the file must hold exactly epochs <= {through}"
            );
            if !out.is_empty() {
                check_counter_prefix(&String::from_utf8(out).unwrap(), false);
            }
        }
        if !running {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "guest did not finish"
        );
    }
    assert_eq!(vmm.wait(), VmExit::GuestExit { status: 0 });
    let r = vmm.release_output(epoch).unwrap();
    assert_eq!(r.held_bytes, 0);
    assert_eq!(vmm.held_output_bytes(), 0);
    let text = String::from_utf8(read(&log)).unwrap();
    assert_eq!(text.len() as u64, cumulative[epoch as usize]);
    assert_eq!(check_counter_prefix(&text, true), 600);
    println!("{epoch} epochs, {} bytes", text.len());
}

#[test]
fn discarded_epochs_never_appear() {
    let log = temp("discard.log");
    let _c = Cleanup {
        files: vec![log.clone()],
        tap: None,
    };
    let mut vmm = build_vm(&counter_config(&log, 2000, 0)).expect("build");
    vmm.enable_output_commit().unwrap();
    vmm.start().unwrap();
    let mut committed = 0;
    for e in 1..=3 {
        std::thread::sleep(Duration::from_millis(40));
        vmm.pause().unwrap();
        let s = vmm.close_epoch(e).unwrap();
        if e == 1 {
            committed = s.console_bytes;
        }
        vmm.resume().unwrap();
    }
    std::thread::sleep(Duration::from_millis(40));
    vmm.pause().unwrap();
    assert!(vmm.output_waiting(), "the open epoch should hold output");
    // Epochs 2, 3 and the open one did not commit.
    vmm.discard_output_after(1);
    assert!(!vmm.output_waiting());
    assert_eq!(vmm.held_output_bytes(), committed);
    vmm.release_output(u64::MAX).unwrap();
    assert_eq!(vmm.held_output_bytes(), 0);
    vmm.stopper().stop();
    assert_eq!(vmm.wait(), VmExit::Stopped);
    let text = String::from_utf8(read(&log)).unwrap();
    assert!(committed > 0);
    assert_eq!(text.len() as u64, committed);
    let last = check_counter_prefix(&text, false);
    assert!(last > 0, "{text}");
}

#[test]
fn full_gate_stalls_the_guest_without_loss() {
    let log = temp("full.log");
    let _c = Cleanup {
        files: vec![log.clone()],
        tap: None,
    };
    const LINES: u64 = 4000;
    let mut vmm = build_vm(&counter_config(&log, 0, LINES)).expect("build");
    vmm.enable_output_commit().unwrap();
    vmm.set_output_limit(2048);
    vmm.start().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    vmm.pause().unwrap();
    let held = vmm.held_output_bytes();
    // At the limit, overshooting by at most one chain (the guest's 4 KiB buffers).
    assert!((2048..2048 + 4096).contains(&held), "held {held}");
    vmm.close_epoch(1).unwrap();
    vmm.resume().unwrap();
    std::thread::sleep(Duration::from_millis(200));
    vmm.pause().unwrap();
    let s = vmm.close_epoch(2).unwrap();
    assert_eq!(
        s.console_bytes, 0,
        "a full gate must stall the guest's output"
    );
    assert_eq!(vmm.held_output_bytes(), held);
    assert!(vmm.wait_timeout(Duration::ZERO).is_none(), "guest ended");
    vmm.resume().unwrap();
    // Releasing lets the guest go on; keep releasing until it is done.
    let mut epoch = 2;
    let t0 = Instant::now();
    let mut stalls_released = 0;
    loop {
        let r = vmm.release_output(epoch).unwrap();
        if r.console_bytes > 0 {
            stalls_released += 1;
        }
        std::thread::sleep(Duration::from_millis(5));
        epoch += 1;
        let (_, running) = close(&mut vmm, epoch);
        if !running {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "guest did not finish"
        );
    }
    assert_eq!(vmm.wait(), VmExit::GuestExit { status: 0 });
    vmm.release_output(epoch).unwrap();
    let text = String::from_utf8(read(&log)).unwrap();
    assert_eq!(check_counter_prefix(&text, true), LINES);
    assert!(
        stalls_released > 5,
        "only {stalls_released} releases moved output"
    );
    println!("{epoch} epochs, {stalls_released} releases with output");
}

const GUEST_MAC: [u8; 6] = [0x02, 0x78, 0, 0, 0, 0x02];
const HOST_MAC: [u8; 6] = [0x02, 0x78, 0, 0, 0, 0x01];

/// Raw packet socket on the TAP.
struct PacketSock(OwnedFd);

impl PacketSock {
    fn new(ifname: &str) -> PacketSock {
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

    fn send(&self, frame: &[u8]) -> bool {
        // SAFETY: sends from a valid buffer of the given length on a bound socket.
        let r = unsafe { libc::send(self.0.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
        r == frame.len() as isize
    }

    /// Frames from the guest's MAC waiting on the socket: (all, ARP replies).
    fn drain_from_guest(&self) -> (u64, u64) {
        let mut buf = vec![0u8; 65536];
        let (mut all, mut arp) = (0, 0);
        loop {
            // SAFETY: receives into a valid buffer of the given length.
            let r =
                unsafe { libc::recv(self.0.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if r < 0 {
                return (all, arp);
            }
            let f = &buf[..r as usize];
            if f.len() >= 14 && f[6..12] == GUEST_MAC {
                all += 1;
                if f.len() >= 22 && f[12..14] == [0x08, 0x06] && f[20..22] == [0, 2] {
                    arp += 1;
                }
            }
        }
    }
}

/// A broadcast ARP request for the guest's address (10.0.0.2) from 10.0.0.1.
fn arp_request() -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&[0xff; 6]);
    f.extend_from_slice(&HOST_MAC);
    f.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 1]);
    f.extend_from_slice(&HOST_MAC);
    f.extend_from_slice(&[10, 0, 0, 1]);
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&[10, 0, 0, 2]);
    f
}

#[test]
fn net_tx_frames_reach_the_tap_only_on_release() {
    let tap = format!("twoc{}", std::process::id() % 1_000_000);
    let log = temp("net.log");
    let _c = Cleanup {
        files: vec![log.clone()],
        tap: Some(tap.clone()),
    };
    let cfg = VmConfig {
        mem_mib: 64,
        vcpus: 1,
        payload: Payload::TestGuest {
            elf: guest_elf(),
            workloads: Workloads {
                kv: true,
                ..Workloads::default()
            },
        },
        disks: vec![],
        nets: vec![NetConfig {
            tap: tap.clone(),
            mac: "02:78:00:00:00:02".into(),
        }],
        console: ConsoleConfig::File { path: log.clone() },
    };
    let mut vmm = build_vm(&cfg).expect("build");
    let sock = PacketSock::new(&tap);
    vmm.enable_output_commit().unwrap();
    vmm.start().unwrap();
    // ARP requests until the guest has answered some (held, so we see none).
    let t0 = Instant::now();
    let arp = arp_request();
    let mut held_frames = 0;
    let mut epoch = 0;
    while held_frames < 5 {
        assert!(sock.send(&arp));
        std::thread::sleep(Duration::from_millis(20));
        epoch += 1;
        vmm.pause().unwrap();
        held_frames += vmm.close_epoch(epoch).unwrap().net_frames;
        vmm.resume().unwrap();
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "guest never answered ARP"
        );
    }
    assert_eq!(
        sock.drain_from_guest(),
        (0, 0),
        "a held frame reached the TAP"
    );
    assert!(read(&log).is_empty(), "console output leaked");
    let r = vmm.release_output(epoch).unwrap();
    assert_eq!(r.net_frames, held_frames);
    assert_eq!(r.net_dropped, 0);
    std::thread::sleep(Duration::from_millis(50));
    let (all, replies) = sock.drain_from_guest();
    assert_eq!(
        all, held_frames,
        "every released frame reaches the TAP once"
    );
    assert!(replies >= 5, "{replies} ARP replies");
    assert!(String::from_utf8(read(&log)).unwrap().starts_with("BOOT "));
    vmm.stopper().stop();
    assert_eq!(vmm.wait(), VmExit::Stopped);
}

#[test]
fn disk_rebuilt_from_journals_equals_the_original() {
    let log = temp("disk.log");
    let img = temp("disk.img");
    let mirror = temp("mirror.img");
    let _c = Cleanup {
        files: vec![log.clone(), img.clone(), mirror.clone()],
        tap: None,
    };
    // Some old content that the guest partly overwrites.
    let mut base = vec![0u8; 2 << 20];
    for (i, b) in base.iter_mut().enumerate() {
        *b = (i % 251) as u8;
    }
    std::fs::write(&img, &base).unwrap();
    std::fs::write(&mirror, &base).unwrap();
    const RECORDS: u64 = 1500;
    let cfg = VmConfig {
        mem_mib: 64,
        vcpus: 1,
        payload: Payload::TestGuest {
            elf: guest_elf(),
            workloads: Workloads {
                disk: true,
                disk_rate: 0,
                disk_flush_every: 1,
                disk_limit: RECORDS,
                ..Workloads::default()
            },
        },
        disks: vec![DiskConfig {
            path: img.clone(),
            read_only: false,
            io_engine: IoEngine::IoUring,
            serial: None,
        }],
        nets: vec![],
        console: ConsoleConfig::File { path: log.clone() },
    };
    let mut vmm = build_vm(&cfg).expect("build");
    assert!(vmm.take_disk_journal().is_err(), "journal not enabled yet");
    assert_eq!(vmm.enable_disk_journal().unwrap(), 1);
    let mirror_file = std::fs::OpenOptions::new()
        .write(true)
        .open(&mirror)
        .unwrap();
    vmm.start().unwrap();
    let (mut takes, mut extents, mut bytes, mut compared) = (0u64, 0u64, 0u64, 0u64);
    let t0 = Instant::now();
    loop {
        std::thread::sleep(Duration::from_millis(3));
        let running = vmm.wait_timeout(Duration::ZERO).is_none() && vmm.pause().is_ok();
        if !running {
            vmm.wait();
        }
        let js = vmm.take_disk_journal().unwrap();
        assert_eq!(js.len(), 1);
        assert_eq!(js[0].disk_index, 0);
        takes += 1;
        extents += js[0].extents.len() as u64;
        bytes += js[0].bytes();
        apply_journal(&mirror_file, &js[0]).unwrap();
        // While paused every completed write is on the image: both must be equal.
        if takes.is_multiple_of(10) || !running {
            assert!(read(&img) == read(&mirror), "images differ at take {takes}");
            compared += 1;
        }
        if !running {
            break;
        }
        vmm.resume().unwrap();
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "guest did not finish"
        );
    }
    assert_eq!(vmm.wait(), VmExit::GuestExit { status: 0 });
    let js = vmm.take_disk_journal().unwrap();
    assert!(js[0].is_empty(), "writes after the guest ended?");
    let text = String::from_utf8(read(&log)).unwrap();
    assert!(
        text.contains(&format!("W {RECORDS}\n")),
        "disk workload did not finish:\n{text}"
    );
    let a = read(&img);
    assert!(a == read(&mirror), "final images differ");
    assert!(a != base, "the guest wrote nothing");
    assert!(extents > 0 && takes > 10, "{takes} takes, {extents} writes");
    println!("{takes} takes ({compared} compared), {extents} writes, {bytes} bytes journalled");
}
