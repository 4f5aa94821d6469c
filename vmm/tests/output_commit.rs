//! Output commit and the disk journal with the real test guest on real KVM: console
//! output held until released epoch by epoch, discarded epochs never appear, a full
//! gate stalls the guest without loss, net TX frames reach a real TAP only on release,
//! and a second disk image rebuilt from journals equals the first.

mod support;
use support::{guest, tap};

use std::time::{Duration, Instant};

use guest::{check_counter_lines, counter_config, disk, guest_config, TempFile};
use tap::{arp_request, is_arp_reply, is_from, PacketSocket, Tap};
use vmm::config::{NetConfig, VmConfig, Workloads};
use vmm::devices::virtio::block::apply_journal;
use vmm::{build_vm, VmExit, Vmm};

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
    let log = TempFile::new("oc-console.log");
    let mut vmm = build_vm(&counter_config(log.path(), 2000, 600)).expect("build");
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
            assert!(log.bytes().is_empty(), "output leaked before any release");
        } else {
            // Release with a lag of three epochs, as acknowledgements would.
            let through = epoch - 3;
            vmm.release_output(through).unwrap();
            let out = log.bytes();
            assert_eq!(
                out.len() as u64,
                cumulative[through as usize],
                "after release({through}) the file must hold exactly epochs <= {through}"
            );
            if !out.is_empty() {
                check_counter_lines(&String::from_utf8(out).unwrap(), false);
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
    let text = String::from_utf8(log.bytes()).unwrap();
    assert_eq!(text.len() as u64, cumulative[epoch as usize]);
    assert_eq!(check_counter_lines(&text, true), 600);
    println!("{epoch} epochs, {} bytes", text.len());
}

/// Waits until the open epoch holds console output. A fixed sleep is not enough: on a
/// loaded machine (CI runs suites in parallel on two CPUs) the guest's vCPU may not be
/// scheduled for 40 ms, and an epoch closed empty made the test fail (`committed > 0`).
fn wait_for_output(vmm: &Vmm) {
    wait_until(|| vmm.output_waiting());
}

/// Polls `cond` every 5 ms; fails the test after 30 s.
fn wait_until(mut cond: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !cond() {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "the guest's console output did not come in 30 s"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn discarded_epochs_never_appear() {
    let log = TempFile::new("oc-discard.log");
    let mut vmm = build_vm(&counter_config(log.path(), 2000, 0)).expect("build");
    vmm.enable_output_commit().unwrap();
    vmm.start().unwrap();
    let mut committed = 0;
    for e in 1..=3 {
        wait_for_output(&vmm);
        if e == 1 {
            // Epoch 1 must hold a counter line, not only the BOOT line: wait for one
            // more console write after the first.
            let first = vmm.held_output_bytes();
            wait_until(|| vmm.held_output_bytes() > first);
        }
        vmm.pause().unwrap();
        let s = vmm.close_epoch(e).unwrap();
        if e == 1 {
            committed = s.console_bytes;
        }
        vmm.resume().unwrap();
    }
    wait_for_output(&vmm);
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
    let text = String::from_utf8(log.bytes()).unwrap();
    assert!(committed > 0);
    assert_eq!(text.len() as u64, committed);
    let last = check_counter_lines(&text, false);
    assert!(last > 0, "{text}");
}

#[test]
fn full_gate_stalls_the_guest_without_loss() {
    let log = TempFile::new("oc-full.log");
    const LINES: u64 = 4000;
    let mut vmm = build_vm(&counter_config(log.path(), 0, LINES)).expect("build");
    vmm.enable_output_commit().unwrap();
    vmm.set_output_limit(2048);
    vmm.start().unwrap();
    // Until the gate is full (a fixed sleep is not enough on a loaded machine), then a
    // little longer: a full gate must hold the guest at the limit.
    wait_until(|| vmm.held_output_bytes() >= 2048);
    std::thread::sleep(Duration::from_millis(100));
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
    let text = String::from_utf8(log.bytes()).unwrap();
    assert_eq!(check_counter_lines(&text, true), LINES);
    assert!(
        stalls_released > 5,
        "only {stalls_released} releases moved output"
    );
    println!("{epoch} epochs, {stalls_released} releases with output");
}

const GUEST_MAC: [u8; 6] = [0x02, 0x78, 0, 0, 0, 0x02];
const HOST_MAC: [u8; 6] = [0x02, 0x78, 0, 0, 0, 0x01];

/// Frames from the guest's MAC waiting on the socket: (all, ARP replies).
fn drain_from_guest(sock: &PacketSocket) -> (u64, u64) {
    let mut buf = vec![0u8; 65536];
    let (mut all, mut arp) = (0, 0);
    sock.drain(&mut buf, |f| {
        if is_from(f, GUEST_MAC) {
            all += 1;
            if is_arp_reply(f) {
                arp += 1;
            }
        }
    });
    (all, arp)
}

#[test]
fn net_tx_frames_reach_the_tap_only_on_release() {
    let tap = Tap::new("twoc");
    let log = TempFile::new("oc-net.log");
    let workloads = Workloads {
        kv: true,
        ..Workloads::default()
    };
    let cfg = VmConfig {
        nets: vec![NetConfig {
            tap: tap.name().to_owned(),
            mac: "02:78:00:00:00:02".into(),
        }],
        ..guest_config(workloads, log.path())
    };
    let mut vmm = build_vm(&cfg).expect("build");
    let sock = PacketSocket::bind(tap.name()).unwrap();
    vmm.enable_output_commit().unwrap();
    vmm.start().unwrap();
    // ARP requests until the guest has answered some (held, so we see none).
    let t0 = Instant::now();
    let arp = arp_request(HOST_MAC);
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
        drain_from_guest(&sock),
        (0, 0),
        "a held frame reached the TAP"
    );
    assert!(log.bytes().is_empty(), "console output leaked");
    let r = vmm.release_output(epoch).unwrap();
    assert_eq!(r.net_frames, held_frames);
    assert_eq!(r.net_dropped, 0);
    // Released frames reach the socket through the kernel's receive path: drain until
    // they are all in (or 30 s), then a little longer to catch any duplicate.
    let (mut all, mut replies) = (0, 0);
    wait_until(|| {
        let (a, r) = drain_from_guest(&sock);
        all += a;
        replies += r;
        all >= held_frames
    });
    std::thread::sleep(Duration::from_millis(50));
    let (a, r) = drain_from_guest(&sock);
    all += a;
    replies += r;
    assert_eq!(
        all, held_frames,
        "every released frame reaches the TAP once"
    );
    assert!(replies >= 5, "{replies} ARP replies");
    assert!(String::from_utf8(log.bytes()).unwrap().starts_with("BOOT "));
    vmm.stopper().stop();
    assert_eq!(vmm.wait(), VmExit::Stopped);
}

#[test]
fn disk_rebuilt_from_journals_equals_the_original() {
    let log = TempFile::new("oc-disk.log");
    let img = TempFile::new("oc-disk.img");
    let mirror = TempFile::new("oc-mirror.img");
    // Some old content that the guest partly overwrites.
    let mut base = vec![0u8; 2 << 20];
    for (i, b) in base.iter_mut().enumerate() {
        *b = (i % 251) as u8;
    }
    std::fs::write(img.path(), &base).unwrap();
    std::fs::write(mirror.path(), &base).unwrap();
    const RECORDS: u64 = 1500;
    let workloads = Workloads {
        disk: true,
        disk_rate: 0,
        disk_flush_every: 1,
        disk_limit: RECORDS,
        ..Workloads::default()
    };
    let cfg = VmConfig {
        disks: vec![disk(img.path())],
        ..guest_config(workloads, log.path())
    };
    let mut vmm = build_vm(&cfg).expect("build");
    assert!(vmm.take_disk_journal().is_err(), "journal not enabled yet");
    assert_eq!(vmm.enable_disk_journal().unwrap(), 1);
    let mirror_file = std::fs::OpenOptions::new()
        .write(true)
        .open(mirror.path())
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
            assert!(
                img.bytes() == mirror.bytes(),
                "images differ at take {takes}"
            );
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
    let text = String::from_utf8(log.bytes()).unwrap();
    assert!(
        text.contains(&format!("W {RECORDS}\n")),
        "disk workload did not finish:\n{text}"
    );
    let a = img.bytes();
    assert!(a == mirror.bytes(), "final images differ");
    assert!(a != base, "the guest wrote nothing");
    assert!(extents > 0 && takes > 10, "{takes} takes, {extents} writes");
    println!("{takes} takes ({compared} compared), {extents} writes, {bytes} bytes journalled");
}
