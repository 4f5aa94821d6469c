//! Tests of the test harness itself: the network guards create what they promise and
//! remove it on drop, also when the test panics.
mod common;

use std::panic;

use common::{ConsoleLog, KvNet, NetNs};

fn link_exists(ns: &str, dev: &str) -> bool {
    std::process::Command::new("ip")
        .args(["-n", ns, "link", "show", dev])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

#[test]
fn kv_net_builds_and_removes_plumbing() {
    let (vm, cl) = {
        let net = KvNet::new();
        assert!(
            link_exists(&net.vm_ns.name, &net.tap),
            "TAP in the VM namespace"
        );
        assert!(net.tap.len() <= 15);
        let out = net
            .client_ns
            .command("ip")
            .args(["-4", "addr", "show"])
            .output()
            .unwrap();
        assert!(String::from_utf8_lossy(&out.stdout).contains("10.77.0.1/24"));
        (net.vm_ns.name.clone(), net.client_ns.name.clone())
    };
    assert!(
        !NetNs::exists(&vm) && !NetNs::exists(&cl),
        "namespaces removed"
    );
}

#[test]
fn guards_clean_up_when_a_test_panics() {
    let names = std::sync::Mutex::new(None);
    let r = panic::catch_unwind(|| {
        let net = KvNet::new();
        *names.lock().unwrap() = Some((net.vm_ns.name.clone(), net.client_ns.name.clone()));
        panic!("simulated test failure");
    });
    assert!(r.is_err());
    let (vm, cl) = names.into_inner().unwrap().expect("guard was built");
    assert!(!NetNs::exists(&vm) && !NetNs::exists(&cl));
}

#[test]
fn console_log_follows_a_growing_file() {
    use std::io::Write;
    use std::time::Duration;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.log");
    let mut log = ConsoleLog::new(&path);
    assert_eq!(
        log.next_line(Duration::from_millis(50)),
        None,
        "no file yet"
    );
    let mut f = std::fs::File::create(&path).unwrap();
    f.write_all(b"BOOT x\nC 1\nC").unwrap();
    assert_eq!(
        log.next_line(Duration::from_secs(1)).as_deref(),
        Some("BOOT x")
    );
    assert_eq!(
        log.next_line(Duration::from_secs(1)).as_deref(),
        Some("C 1")
    );
    assert_eq!(
        log.next_line(Duration::from_millis(50)),
        None,
        "partial line held"
    );
    f.write_all(b" 2\n").unwrap();
    assert_eq!(
        log.wait_for(Duration::from_secs(1), |l| l.starts_with("C "))
            .as_deref(),
        Ok("C 2")
    );
}
