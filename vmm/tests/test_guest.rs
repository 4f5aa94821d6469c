//! Runs the real test guest (guest/, built here with cargo) with the counter workload
//! and checks its console output.

mod support;
use support::guest;

use std::time::{Duration, Instant};

use guest::{check_counter_lines, counter_config, TempFile};
use vmm::{build_vm, VmExit};

#[test]
fn counter_workload_runs_to_done() {
    let log = TempFile::new("vmm-counter.log");
    let mut vm = build_vm(&counter_config(log.path(), 0, 200)).expect("build");
    vm.start().unwrap();
    let exit = vm
        .wait_timeout(Duration::from_secs(60))
        .expect("guest did not finish in 60 s");
    assert_eq!(exit, VmExit::GuestExit { status: 0 }, "{exit}");
    assert_eq!(check_counter_lines(&log.text(), true), 200);
}

#[test]
fn counter_survives_pausing_every_two_ms() {
    let log = TempFile::new("vmm-counter-paused.log");
    // 1000 lines/s for 400 lines: ~0.4 s of guest time, paused ~every 2 ms.
    let mut vm = build_vm(&counter_config(log.path(), 1000, 400)).expect("build");
    vm.start().unwrap();
    let mut times = Vec::new();
    let t0 = Instant::now();
    let exit = loop {
        if let Some(e) = vm.wait_timeout(Duration::from_millis(2)) {
            break e;
        }
        match vm.pause() {
            Ok(t) => times.push(t),
            // The guest may exit between the check and the pause.
            Err(_) => continue,
        }
        vm.resume().unwrap();
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "guest did not finish"
        );
    };
    assert_eq!(exit, VmExit::GuestExit { status: 0 }, "{exit}");
    assert_eq!(check_counter_lines(&log.text(), true), 400);
    times.sort();
    assert!(times.len() > 50, "only {} pauses", times.len());
    println!(
        "real guest + devices, {} pauses: p50 {:?} p90 {:?} p99 {:?} max {:?}",
        times.len(),
        times[times.len() / 2],
        times[times.len() * 9 / 10],
        times[times.len() * 99 / 100],
        times[times.len() - 1]
    );
}
