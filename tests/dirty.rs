//! The dirty workload's self-check under the real VMM: every pass verifies clean.
mod common;

use std::time::Duration;

use common::{require_kvm, VmRun};

fn field(line: &str, key: &str) -> u64 {
    line.split_whitespace()
        .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {key}= in {line:?}"))
}

#[test]
fn dirty_workload_verifies_clean() {
    require_kvm();
    let dir = tempfile::tempdir().unwrap();
    const PASSES: u64 = 4;
    let r = VmRun::new(dir.path(), "dirty")
        .args(["--mem-mib", "64", "--workload", "dirty"])
        .args([
            "--dirty-pages",
            "2048",
            "--dirty-rate",
            "0",
            "--dirty-seed",
            "42",
        ])
        .args(["--dirty-passes", &PASSES.to_string()])
        .run(Duration::from_secs(180));
    r.expect_code(0);
    let errors: Vec<_> = r
        .lines
        .iter()
        .filter(|l| l.starts_with("DIRTY-ERROR"))
        .collect();
    assert!(errors.is_empty(), "guest memory corrupted: {errors:?}");
    let d: Vec<_> = r.lines.iter().filter(|l| l.starts_with("D ")).collect();
    assert_eq!(d.len() as u64, PASSES, "one D line per pass: {d:?}");
    let mut last_pass = None;
    for l in &d {
        assert_eq!(field(l, "errors"), 0, "{l}");
        assert!(field(l, "writes") > 0, "{l}");
        let pass = field(l, "pass");
        assert!(last_pass.is_none_or(|p| pass > p), "passes increase: {d:?}");
        last_pass = Some(pass);
    }
    // Every pass after the first reads back what the previous one wrote.
    assert!(d.iter().skip(1).all(|l| field(l, "verified") > 0), "{d:?}");
    assert_eq!(r.lines.last().map(String::as_str), Some("DONE"));
}
