//! `twinrun demo` (the front door) as a user runs it: two daemons in PM namespaces, a
//! witness, FT, HA and unprotected VMs under kv load, PM1 killed; its JSON report is
//! checked per VM, and nothing of it is left behind.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;

fn run_demo() -> serde_json::Value {
    let mut cmd = Command::new(twinrun_bin());
    cmd.args([
        "demo",
        "--json",
        "--kill-after-ms",
        "2000",
        "--keep-going-ms",
        "3000",
    ])
    .env("TWINRUN_GUEST", guest_elf());
    let out = twinrun_lab::process::output_timeout(&mut cmd, Duration::from_secs(400))
        .expect("twinrun demo ran");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("one JSON object on stdout ({e}); stderr:\n{stderr}"));
    // Everything it made is gone: its namespaces and its work directory.
    let pid = v["pid"].as_u64().expect("pid in the report");
    let ns = String::from_utf8_lossy(
        &Command::new("ip")
            .args(["netns", "list"])
            .output()
            .expect("ip netns list")
            .stdout,
    )
    .to_string();
    assert!(
        !ns.contains(&format!("tc{}-", pid % 1_000_000)),
        "namespaces left: {ns}"
    );
    assert!(!std::path::Path::new(&format!("/tmp/twd{pid}")).exists());
    println!("{v:#}\nstderr:\n{stderr}");
    v
}

fn vm<'a>(v: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    v["vms"]
        .as_array()
        .and_then(|a| a.iter().find(|x| x["name"] == name))
        .unwrap_or_else(|| panic!("no {name} in {v}"))
}

/// The front door: the FT VM loses nothing and keeps its TCP connection across PM1's
/// death, the HA VM boots again on PM2, the unprotected VM is down on PM2.
#[test]
fn demo_every_vm_does_what_its_level_promises() {
    let v = run_demo();
    let ft = vm(&v, "ft");
    assert_eq!(ft["ok"], true, "{ft}");
    assert_eq!(ft["kv"]["lost_writes"], 0, "{ft}");
    assert_eq!(ft["kv"]["tcp_connection_survived"], true, "{ft}");
    assert!(ft["kv"]["acknowledged_writes"].as_u64() > Some(0), "{ft}");
    assert_eq!(ft["before"]["state"], "protected", "{ft}");
    let plain = vm(&v, "plain");
    assert_eq!(plain["ok"], true, "{plain}");
    assert_eq!(plain["after"]["state"], "down", "{plain}");
    // HA: booted again on PM2 from its replica (a fresh boot: a new connection, the
    // guest's in-memory kv store starts empty; its disk records are the replica's).
    let ha = vm(&v, "ha");
    assert!(ha["problem"].is_null(), "{ha}");
    assert_eq!(ha["ok"], true, "{ha}");
    assert_eq!(v["ok"], true, "{v}");
}
