//! Probe: does userfaultfd write protection work on guest memory as the VMM maps it
//! (private anonymous), with dirty logging on, for writes made by the guest through
//! KVM (and by a VMM thread)? Issue 17 item 2, session 25.
//!
//! A hand-assembled CPL3 guest writes the round number into N pages per round. After
//! round 1 the VM is paused, dirty pages harvested, the N pages write-protected with
//! UFFDIO_WRITEPROTECT, and the guest released for round 2. Each of its writes must
//! reach a handler thread as a write-protect fault; the handler copies the page (which
//! must still hold round 1's value), un-protects it, and the guest must finish round 2
//! with every page holding 2. The dirty log must still see the N pages. Then the same
//! round without protection, to compare the time per page.
//!
//! Run as root: `cargo run --release --example uffd_wp_probe -p vmm [N]`. Exits non-zero
//! with the reason if anything does not hold.

#[path = "../tests/support/flat_dirty_guest.rs"]
#[allow(dead_code)]
mod flat;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress};
use vmm::vstate::dirty::DirtySet;
use vmm::vstate::uffd::{guest_address, host_range, WriteProtector};

/// A fault the handler served: guest page, its first word before the write, whether it
/// was a write-protect write fault, the handler's time.
type Seen = (u64, u64, bool, Duration);

fn fail(msg: String) -> ! {
    eprintln!("PROBE FAILED: {msg}");
    std::process::exit(1);
}

fn wait_done(ctl: &flat::Control, round: u32, limit: Duration) -> Result<Duration, String> {
    let t0 = Instant::now();
    while ctl.done.load(Ordering::SeqCst) != round {
        if t0.elapsed() > limit {
            return Err(format!(
                "guest did not finish round {round} within {limit:?} (done = {})",
                ctl.done.load(Ordering::SeqCst)
            ));
        }
        std::hint::spin_loop();
    }
    Ok(t0.elapsed())
}

fn main() {
    let n: u32 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(1000);
    println!("kernel {}", kernel());
    let (mut vmm, ctl) = flat::build(256);
    vmm.start_dirty_tracking().expect("dirty tracking");
    let wp = Arc::new(WriteProtector::open().unwrap_or_else(|e| fail(e.to_string())));
    println!(
        "userfaultfd features {:#x} (wp unpopulated: {})",
        wp.features(),
        wp.protects_unpopulated()
    );
    wp.register_guest_memory(vmm.guest_memory())
        .unwrap_or_else(|e| fail(e.to_string()));
    let mem = vmm.guest_memory().clone();
    let base = flat::DIRTY_BASE;
    let len = u64::from(n) * 4096;
    let host = host_range(&mem, base, len).unwrap_or_else(|e| fail(e.to_string()));
    let mut set = DirtySet::new(&mem);

    ctl.n.store(n, Ordering::SeqCst);
    vmm.start().expect("start");
    wait_done(&ctl, 1, Duration::from_secs(20)).unwrap_or_else(|e| fail(e));
    vmm.pause().expect("pause");
    set.clear();
    vmm.harvest_dirty_into(&mut set).expect("harvest");
    let t0 = Instant::now();
    wp.protect(host, len)
        .unwrap_or_else(|e| fail(e.to_string()));
    let protect_time = t0.elapsed();

    // Handler: copy the page, then un-protect it (which wakes the writer).
    let stop = Arc::new(AtomicBool::new(false));
    let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
    let handler = {
        let (wp, mem, stop, seen) = (wp.clone(), mem.clone(), stop.clone(), seen.clone());
        std::thread::spawn(move || -> Result<(), String> {
            let mut page = vec![0u8; 4096];
            while !stop.load(Ordering::SeqCst) {
                let Some(f) = wp
                    .next_fault(Duration::from_millis(20))
                    .map_err(|e| e.to_string())?
                else {
                    continue;
                };
                let t = Instant::now();
                let gpa = guest_address(&mem, f.address)
                    .ok_or_else(|| format!("fault at {:#x}, not guest memory", f.address))?;
                let gpa = gpa & !4095;
                mem.read_slice(&mut page, GuestAddress(gpa))
                    .map_err(|e| e.to_string())?;
                let v = u64::from_le_bytes(page[..8].try_into().map_err(|_| "short")?);
                wp.unprotect(f.address & !4095, 4096)
                    .map_err(|e| e.to_string())?;
                seen.lock()
                    .map_err(|_| "poisoned")?
                    .push((gpa, v, f.wp && f.write, t.elapsed()));
            }
            Ok(())
        })
    };
    ctl.go.store(1, Ordering::SeqCst);
    vmm.resume().expect("resume");
    let wp_round = wait_done(&ctl, 2, Duration::from_secs(20)).unwrap_or_else(|e| fail(e));
    vmm.pause().expect("pause");
    set.clear();
    let st = vmm.harvest_dirty_into(&mut set).expect("harvest");
    {
        let seen = seen.lock().expect("lock");
        if seen.len() != n as usize {
            fail(format!(
                "{} faults reported for {n} protected pages",
                seen.len()
            ));
        }
        for (i, &(gpa, v, is_wp, _)) in seen.iter().enumerate() {
            let want = base + i as u64 * 4096;
            if gpa != want || v != 1 || !is_wp {
                fail(format!(
                    "fault {i}: gpa {gpa:#x} (want {want:#x}), value before {v} (want 1), wp write {is_wp}"
                ));
            }
        }
        let mut h: Vec<Duration> = seen.iter().map(|s| s.3).collect();
        h.sort();
        println!(
            "round with {n} protected pages: {} faults, all write-protect faults in order, page held round 1's value at each; handler copy+unprotect p50 {:?}",
            seen.len(),
            h[h.len() / 2]
        );
    }
    for i in 0..u64::from(n) {
        let v: u64 = mem.read_obj(GuestAddress(base + i * 4096)).expect("read");
        if v != 2 {
            fail(format!("page {i} holds {v} after round 2, want 2"));
        }
    }
    if st.total_pages < n as usize {
        fail(format!(
            "dirty log saw {} pages, fewer than the {n} written",
            st.total_pages
        ));
    }
    println!(
        "guest finished round 2, every page holds 2; dirty log saw {} pages",
        st.total_pages
    );

    // A VMM thread writing a protected page blocks until the handler un-protects it.
    wp.protect(host, 4096)
        .unwrap_or_else(|e| fail(e.to_string()));
    mem.write_obj(7u64, GuestAddress(base))
        .unwrap_or_else(|e| fail(e.to_string()));
    let v: u64 = mem.read_obj(GuestAddress(base)).expect("read");
    // The handler records a fault after un-protecting (which let the write through).
    let t = Instant::now();
    while seen.lock().expect("lock").len() != n as usize + 1 && t.elapsed() < Duration::from_secs(2)
    {
        std::thread::sleep(Duration::from_millis(1));
    }
    if v != 7 || seen.lock().expect("lock").len() != n as usize + 1 {
        fail("a VMM thread's write to a protected page was not handled".into());
    }
    println!("a VMM thread's write to a protected page went through the handler");

    // The same round unprotected, for the cost per page.
    ctl.go.store(2, Ordering::SeqCst);
    vmm.resume().expect("resume");
    let plain_round = wait_done(&ctl, 3, Duration::from_secs(20)).unwrap_or_else(|e| fail(e));
    println!(
        "{n} pages: protect ioctl {protect_time:?}; guest round with protection {wp_round:?} ({:.1} us/page), without {plain_round:?} ({:.1} us/page; KVM's dirty-log fault only)",
        wp_round.as_secs_f64() * 1e6 / f64::from(n),
        plain_round.as_secs_f64() * 1e6 / f64::from(n)
    );

    // Pages KVM maps writable (round 3 wrote them, no harvest since re-protected them):
    // write protection must still catch the guest's writes (KVM's MMU notifier drops
    // its writable mappings when the protection changes), as it must for the pages
    // the hot-page policy leaves writable in the dirty log.
    vmm.pause().expect("pause");
    let before = seen.lock().expect("lock").len();
    wp.protect(host, len)
        .unwrap_or_else(|e| fail(e.to_string()));
    ctl.go.store(3, Ordering::SeqCst);
    vmm.resume().expect("resume");
    wait_done(&ctl, 4, Duration::from_secs(20)).unwrap_or_else(|e| fail(e));
    {
        let seen = seen.lock().expect("lock");
        let new = &seen[before..];
        if new.len() != n as usize || new.iter().any(|s| s.1 != 3 || !s.2) {
            fail(format!(
                "pages mapped writable by KVM: {} faults for {n} protected pages (or a page changed before its fault)",
                new.len()
            ));
        }
    }
    println!("pages KVM had mapped writable: all {n} writes faulted, each page still held round 3's value");

    // What protecting and un-protecting other memory costs a guest that never touches
    // it: rounds 5.. unprotected, first alone, then while another thread protects and
    // un-protects one page far from the guest's every 200 us (as an epoch's copier
    // does). Dirty logging off its pages by a harvest before each round.
    let far = host_range(&mem, 128 << 20, 4096).unwrap_or_else(|e| fail(e.to_string()));
    let mut round = 4u32;
    let mut timed = |churn: bool, cycle: bool| -> Duration {
        vmm.pause().expect("pause");
        set.clear();
        vmm.harvest_dirty_into(&mut set).expect("harvest");
        if cycle {
            // The guest's pages protected and un-protected again before it runs: what
            // an epoch's copy leaves behind for the pages it covered.
            wp.protect(host, len)
                .unwrap_or_else(|e| fail(e.to_string()));
            wp.unprotect(host, len)
                .unwrap_or_else(|e| fail(e.to_string()));
        }
        let stop_churn = Arc::new(AtomicBool::new(false));
        let churner = churn.then(|| {
            let (wp, stop_churn) = (wp.clone(), stop_churn.clone());
            std::thread::spawn(move || {
                let mut k = 0u64;
                while !stop_churn.load(Ordering::SeqCst) {
                    let _ = wp.protect(far, 4096);
                    let _ = wp.unprotect(far, 4096);
                    k += 1;
                    std::thread::sleep(Duration::from_micros(200));
                }
                k
            })
        });
        ctl.go.store(round, Ordering::SeqCst);
        vmm.resume().expect("resume");
        round += 1;
        let t = wait_done(&ctl, round, Duration::from_secs(60)).unwrap_or_else(|e| fail(e));
        stop_churn.store(true, Ordering::SeqCst);
        if let Some(c) = churner {
            let k = c.join().unwrap_or(0);
            println!("  (churn: {k} protect+unprotect pairs of a far page during the round)");
        }
        t
    };
    let quiet = timed(false, false);
    let churned = timed(true, false);
    let quiet2 = timed(false, false);
    println!(
        "guest round of {n} pages, nothing of it protected: {quiet:?} / {quiet2:?} alone, {churned:?} while a far page is protected and un-protected every 200 us"
    );
    let cycled = timed(false, true);
    let quiet3 = timed(false, false);
    let cycled2 = timed(false, true);
    println!(
        "guest round of {n} pages after a harvest: {quiet3:?}; after a harvest and a protect + un-protect of its pages: {cycled:?} / {cycled2:?} ({:.1} us/page more)",
        ((cycled + cycled2).as_secs_f64() / 2.0 - quiet3.as_secs_f64()) * 1e6 / f64::from(n)
    );
    stop.store(true, Ordering::SeqCst);
    match handler.join() {
        Ok(Ok(())) => {}
        Ok(Err(e)) => fail(e),
        Err(_) => fail("handler panicked".into()),
    }
    vmm.stopper().stop();
    let _ = vmm.wait_timeout(Duration::from_secs(10));
    reads(n);
    println!("PROBE OK");
}

/// What a protect + un-protect costs a guest that then only reads the pages: KVM's
/// mappings of the range are dropped (not only write access, as the dirty log's
/// re-protect does), so each read faults again.
fn reads(n: u32) {
    let (mut vmm, ctl) = flat::build_reading(256);
    vmm.start_dirty_tracking().expect("dirty tracking");
    let wp = WriteProtector::open().unwrap_or_else(|e| fail(e.to_string()));
    wp.register_guest_memory(vmm.guest_memory())
        .unwrap_or_else(|e| fail(e.to_string()));
    let mem = vmm.guest_memory().clone();
    let len = u64::from(n) * 4096;
    let host = host_range(&mem, flat::DIRTY_BASE, len).unwrap_or_else(|e| fail(e.to_string()));
    for i in 0..u64::from(n) {
        mem.write_obj(i + 1, GuestAddress(flat::DIRTY_BASE + i * 4096))
            .unwrap_or_else(|e| fail(e.to_string()));
    }
    let mut set = DirtySet::new(&mem);
    ctl.n.store(n, Ordering::SeqCst);
    vmm.start().expect("start");
    wait_done(&ctl, 1, Duration::from_secs(20)).unwrap_or_else(|e| fail(e));
    let mut round = 1u32;
    let mut timed = |harvest: bool, cycle: bool| -> Duration {
        vmm.pause().expect("pause");
        if harvest {
            set.clear();
            vmm.harvest_dirty_into(&mut set).expect("harvest");
        }
        if cycle {
            wp.protect(host, len)
                .unwrap_or_else(|e| fail(e.to_string()));
            wp.unprotect(host, len)
                .unwrap_or_else(|e| fail(e.to_string()));
        }
        ctl.go.store(round, Ordering::SeqCst);
        vmm.resume().expect("resume");
        round += 1;
        wait_done(&ctl, round, Duration::from_secs(60)).unwrap_or_else(|e| fail(e))
    };
    let plain = [timed(false, false), timed(false, false)];
    let harvested = [timed(true, false), timed(true, false)];
    let cycled = [timed(true, true), timed(true, true)];
    let per = |d: [Duration; 2]| (d[0] + d[1]).as_secs_f64() / 2.0 * 1e6 / f64::from(n);
    println!(
        "reading guest, {n} pages per round: {:.1} us/page with nothing done between rounds, {:.1} after a harvest, {:.1} after a harvest and a protect + un-protect of the pages",
        per(plain),
        per(harvested),
        per(cycled)
    );
    vmm.stopper().stop();
    let _ = vmm.wait_timeout(Duration::from_secs(10));
}

fn kernel() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "?".into())
}
