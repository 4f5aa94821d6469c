//! The counter workload under the real VMM: every line arrives, in order, then DONE and
//! a clean exit.
mod common;

use std::time::Duration;

use common::{require_kvm, VmRun};

#[test]
fn counter_lines_arrive_in_order_then_done() {
    require_kvm();
    let dir = tempfile::tempdir().unwrap();
    const N: u64 = 300;
    let r = VmRun::new(dir.path(), "counter")
        .args(["--mem-mib", "64", "--workload", "counter"])
        .args(["--counter-rate", "0", "--counter-limit", &N.to_string()])
        .run(Duration::from_secs(120));
    r.expect_code(0);
    let lines = &r.lines;
    assert!(
        lines
            .first()
            .is_some_and(|l| l.starts_with("BOOT workloads=counter")),
        "first line: {:?}",
        lines.first()
    );
    let counts: Vec<u64> = lines
        .iter()
        .filter_map(|l| l.strip_prefix("C "))
        .map(|s| s.parse().expect("C <seq>"))
        .collect();
    assert_eq!(
        counts,
        (1..=N).collect::<Vec<_>>(),
        "C lines 1..={N} in order"
    );
    assert_eq!(lines.last().map(String::as_str), Some("DONE"));
    assert!(
        !lines.iter().any(|l| l.starts_with("PANIC")),
        "guest panicked"
    );
    assert!(
        r.stderr.contains("guest exited with status 0"),
        "{}",
        r.stderr
    );
}
