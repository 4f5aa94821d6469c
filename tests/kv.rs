//! The kv workload under the real VMM: redis-cli and ping from a client namespace reach
//! the guest's RESP server over virtio-net and a TAP (one PM and a client:
//! `twinrun_lab::Topology::builder().single()`).
mod common;

use std::time::Duration;

use common::{output_text, require_kvm, require_tool, topology, Topology, VmRun};

#[test]
fn redis_cli_set_get_and_ping_through_the_guest() {
    require_kvm();
    require_tool("redis-cli", "redis-tools");
    require_tool("ping", "iputils-ping");
    let dir = tempfile::tempdir().unwrap();
    let net = topology(Topology::builder().single());
    let guest_ip = net.guest_ip().to_string();
    let mut vm = VmRun::new(dir.path(), "kv")
        .args(["--mem-mib", "64", "--workload", "kv"])
        .args(net.vm_net_args(0))
        .in_netns(net.pm_ns(0))
        .spawn();
    let listening = vm
        .console
        .wait_for(Duration::from_secs(60), |l| l.starts_with("KV listening"));
    let listening = listening.unwrap_or_else(|e| panic!("{e}\nstderr:\n{}", vm.stderr()));
    assert_eq!(listening, format!("KV listening {guest_ip}:6379"));

    let ping = net
        .client
        .ns
        .command("ping")
        .args(["-c", "3", "-i", "0.2", "-W", "2", &guest_ip])
        .output()
        .unwrap();
    assert!(ping.status.success(), "ping: {}", output_text(&ping));

    let redis = |args: &[&str]| -> String {
        let o = net
            .client
            .ns
            .command("redis-cli")
            .args(["-h", &guest_ip, "-p", "6379"])
            .args(args)
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "redis-cli {args:?}: {}",
            output_text(&o)
        );
        String::from_utf8_lossy(&o.stdout).trim().to_string()
    };
    assert_eq!(redis(&["PING"]), "PONG");
    assert_eq!(redis(&["SET", "greeting", "hello twinrun"]), "OK");
    assert_eq!(redis(&["GET", "greeting"]), "hello twinrun");
    assert_eq!(redis(&["INCR", "n"]), "1");
    assert_eq!(redis(&["INCR", "n"]), "2");
    assert_eq!(redis(&["DBSIZE"]), "2");

    vm.signal(libc::SIGTERM);
    let status = vm.wait_timeout(Duration::from_secs(20));
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(0),
        "clean stop; stderr:\n{}",
        vm.stderr()
    );
}
