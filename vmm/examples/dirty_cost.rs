//! Measures the cost of one dirty harvest (KVM log + VMM bitmap) for 256 MiB and 1 GiB
//! guests with 0, 100, 1000 and 10000 pages dirtied by the guest between harvests,
//! with manual re-protect (KVM_CLEAR_DIRTY_LOG) and without it.
//!
//! Run as root: `cargo run --release --example dirty_cost -p vmm`. Prints figures;
//! asserts nothing about time.

#[path = "../tests/support/flat_dirty_guest.rs"]
#[allow(dead_code)]
mod flat;

use std::sync::atomic::Ordering;
use std::time::Duration;

use vmm::vstate::dirty::{BitmapSource, DirtySet};

const ROUNDS: usize = 30;
const WARMUP: usize = 3;

fn percentile(v: &mut [Duration], p: usize) -> Duration {
    v.sort();
    v[(v.len() - 1) * p / 100]
}

fn main() {
    println!(
        "{:>8} {:>7} {:>6} {:>7} | {:>10} {:>10} {:>10} {:>10} | {:>9}",
        "mem", "mode", "N", "pages", "p50 total", "p90 total", "p50 kvm", "p50 vmm", "p50 pause"
    );
    for mem_mib in [256u64, 1024] {
        for manual in [true, false] {
            run(mem_mib, manual);
        }
    }
}

fn run(mem_mib: u64, manual: bool) {
    let (mut vmm, ctl) = flat::build(mem_mib);
    if manual {
        vmm.start_dirty_tracking().expect("start tracking");
    } else {
        vmm.start_dirty_tracking_with(Box::new(BitmapSource::without_manual_protect()))
            .expect("start tracking");
    }
    let mut set = DirtySet::new(vmm.guest_memory());
    let sizes = [0u32, 100, 1000, 10_000];
    ctl.n.store(sizes[0], Ordering::SeqCst);
    vmm.start().expect("start");
    let mut round = 0u32;
    for (si, &n) in sizes.iter().enumerate() {
        let (mut total, mut kvm, mut vmmt, mut pause) = (vec![], vec![], vec![], vec![]);
        let mut pages = 0;
        for r in 0..ROUNDS + WARMUP {
            round += 1;
            flat::wait_done(&ctl, round);
            let p = vmm.pause().expect("pause");
            set.clear();
            let t0 = std::time::Instant::now();
            let st = vmm.harvest_dirty_into(&mut set).expect("harvest");
            let t = t0.elapsed();
            if r >= WARMUP {
                total.push(t);
                kvm.push(st.kvm_time);
                vmmt.push(st.vmm_time);
                pause.push(p);
                pages = st.total_pages;
            }
            // The next size starts with the next round the guest begins.
            let next = if r + 1 == ROUNDS + WARMUP {
                sizes.get(si + 1).copied().unwrap_or(0)
            } else {
                n
            };
            ctl.n.store(next, Ordering::SeqCst);
            ctl.go.store(round, Ordering::SeqCst);
            vmm.resume().expect("resume");
        }
        println!(
            "{:>5}MiB {:>7} {:>6} {:>7} | {:>10.1?} {:>10.1?} {:>10.1?} {:>10.1?} | {:>9.1?}",
            mem_mib,
            if manual { "manual" } else { "legacy" },
            n,
            pages,
            percentile(&mut total, 50),
            percentile(&mut total, 90),
            percentile(&mut kvm, 50),
            percentile(&mut vmmt, 50),
            percentile(&mut pause, 50),
        );
    }
    vmm.stopper().stop();
    let _ = vmm.wait_timeout(Duration::from_secs(10));
}
