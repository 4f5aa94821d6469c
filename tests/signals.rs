//! SIGTERM/SIGINT stop a running VM cleanly: exit code 0, the console keeps everything
//! the guest wrote up to then.
mod common;

use std::time::Duration;

use common::{require_kvm, VmRun};

fn stop_with(signal: i32, name: &str) {
    require_kvm();
    let dir = tempfile::tempdir().unwrap();
    // Unbounded counter: only the signal ends this VM.
    let mut vm = VmRun::new(dir.path(), name)
        .args([
            "--mem-mib",
            "64",
            "--workload",
            "counter",
            "--counter-rate",
            "200",
        ])
        .spawn();
    vm.console
        .wait_for(Duration::from_secs(60), |l| l == "C 20")
        .unwrap_or_else(|e| panic!("{e}\nstderr:\n{}", vm.stderr()));
    vm.signal(signal);
    let status = vm.wait_timeout(Duration::from_secs(20));
    let stderr = vm.stderr();
    assert_eq!(status.and_then(|s| s.code()), Some(0), "stderr:\n{stderr}");
    assert!(stderr.contains(&format!("received {name}")), "{stderr}");
    vm.console.poll();
    let counts: Vec<u64> = vm
        .console
        .seen
        .iter()
        .filter_map(|l| l.strip_prefix("C "))
        .map(|s| s.parse().unwrap())
        .collect();
    assert!(counts.len() >= 20, "{counts:?}");
    let expected: Vec<u64> = (1..=counts.len() as u64).collect();
    assert_eq!(
        counts, expected,
        "console holds every line up to the stop, in order"
    );
}

#[test]
fn sigterm_stops_cleanly() {
    stop_with(libc::SIGTERM, "SIGTERM");
}

#[test]
fn sigint_stops_cleanly() {
    stop_with(libc::SIGINT, "SIGINT");
}
