//! Two real daemons on this machine (own state and run directories, ports, loopback
//! addresses) running real `twinrun vm run` VMMs with the test guest: an unprotected
//! and an FT VM run; a SIGKILLed daemon leaves its guests running and the restarted one
//! adopts them; a crashing VMM is restarted up to the limit, then held in error until
//! the operator starts it; a node that was away catches up; a peer of another cluster,
//! protocol version or secret is refused with the reason.

mod common;

use std::time::Duration;

use common::*;
use twinrund::model::{NodeState, Role, VmSettings, VmState, VmView};

const LONG: Duration = Duration::from_secs(90);

fn peer_state(c: &Client) -> Option<NodeState> {
    c.nodes().ok().map(|n| n[1].state)
}

#[test]
fn vms_run_survive_a_daemon_sigkill_and_crashes_follow_the_restart_policy() {
    let plan = ClusterPlan::new();
    let _reaper = VmmReaper(&plan);
    let (mut d1, d2) = start_both(&plan, LONG);
    let (c1, c2) = (plan.client(0, ADMIN), plan.client(1, ADMIN));

    // An unprotected and an FT VM, created on pm1, started from either node.
    c1.create(
        &spec("un1", "unprotected", "pm1", &["counter"], false),
        None,
    )
    .unwrap();
    c1.create(&spec("ft1", "ft", "pm1", &["counter", "disk"], true), None)
        .unwrap();
    wait_for(
        LONG,
        "pm2 to see both VMs",
        || (c2.vms().ok()?.len() == 2).then_some(()),
        || logs(&d1, &d2),
    );
    c1.action("un1", "start", None).unwrap();
    c2.action("ft1", "start", Some("start-ft1")).unwrap();

    let un1 = wait_for(
        LONG,
        "un1 running on pm1",
        || {
            let v = c1.vm("un1").ok()?;
            (v.state == VmState::Running && vmm(&v, "pm1").is_some()).then_some(v)
        },
        || logs(&d1, &d2),
    );
    assert_eq!(un1.owner.as_deref(), Some("pm1"));
    assert!(un1.reason.contains("running on pm1"), "{}", un1.reason);
    let ft1 = wait_for(
        LONG,
        "ft1 protected",
        || {
            let v = c1.vm("ft1").ok()?;
            let p = vmm(&v, "pm1")?;
            let s = vmm(&v, "pm2")?;
            (v.state == VmState::Protected && p.0 == Role::Primary && p.2 && s.0 == Role::Standby)
                .then_some(v)
        },
        || logs(&d1, &d2),
    );
    assert!(
        ft1.reason.contains("standby on pm2 in sync"),
        "{}",
        ft1.reason
    );
    // pm2's view agrees.
    let v2 = c2.vm("ft1").unwrap();
    assert_eq!(v2.state, VmState::Protected, "{}", v2.reason);
    console_grows(&plan, 0, "un1", &|| logs(&d1, &d2));
    console_grows(&plan, 0, "ft1", &|| logs(&d1, &d2));

    // SIGKILL pm1's daemon: its guests keep running.
    let pids: Vec<u32> = vmm_pids(&plan, 0);
    assert_eq!(pids.len(), 2, "two VMMs on pm1");
    d1.kill();
    for p in &pids {
        assert!(alive(*p), "VMM {p} died with its daemon");
    }
    console_grows(&plan, 0, "un1", &|| logs(&d1, &d2));
    wait_for(
        LONG,
        "pm2 to notice pm1's daemon is gone",
        || (peer_state(&c2) == Some(NodeState::Lost)).then_some(()),
        || logs(&d1, &d2),
    );
    // The FT pair itself is untouched: no failover, the standby still on pm2.
    let v2 = c2.vm("ft1").unwrap();
    assert_eq!(
        vmm(&v2, "pm2").map(|m| m.0),
        Some(Role::Standby),
        "{}",
        v2.reason
    );

    // The restarted daemon adopts both VMMs (same pids) and restarts nothing.
    let d1 = Daemon::start(&plan, 0);
    let un1 = wait_for(
        LONG,
        "un1 adopted",
        || {
            let v = c1.vm("un1").ok()?;
            (v.state == VmState::Running).then_some(v)
        },
        || logs(&d1, &d2),
    );
    assert_eq!(
        vmm(&un1, "pm1").map(|m| m.1),
        Some(un1_pid(&un1)),
        "{:?}",
        un1.vmms
    );
    assert!(
        pids.contains(&un1_pid(&un1)),
        "un1's VMM was restarted instead of adopted"
    );
    let ft1 = wait_for(
        LONG,
        "ft1 adopted and protected",
        || {
            let v = c1.vm("ft1").ok()?;
            (v.state == VmState::Protected).then_some(v)
        },
        || logs(&d1, &d2),
    );
    assert!(
        pids.contains(&vmm(&ft1, "pm1").unwrap().1),
        "ft1's primary was restarted instead of adopted"
    );
    let events: Vec<String> = c1
        .events(Some("un1"), 100)
        .unwrap()
        .into_iter()
        .map(|e| e.message)
        .collect();
    assert!(
        events
            .iter()
            .any(|m| m.starts_with("adopted its running solo VMM")),
        "{events:?}"
    );
    // Both adoptions were confirmed by the VMMs' control sockets.
    let log = d1.log_text();
    assert!(!log.contains("control socket"), "{log}");

    // A crashing VMM: restarted twice (max_restart = 2), then held in error.
    for round in 1..=3 {
        let v = c1.vm("un1").unwrap();
        let pid = un1_pid(&v);
        // SAFETY: kill(2) on the VMM our daemon started (its pid from the API).
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        if round < 3 {
            let v = wait_for(
                LONG,
                "un1 restarted",
                || {
                    let v = c1.vm("un1").ok()?;
                    let p = vmm(&v, "pm1")?.1;
                    (p != pid && v.state == VmState::Running).then_some(v)
                },
                || logs(&d1, &d2),
            );
            assert_eq!(v.restarts, round, "{}", v.reason);
            assert!(
                v.reason.contains(&format!("({round} of 2)")),
                "{}",
                v.reason
            );
        }
    }
    let v = wait_for(
        LONG,
        "un1 held in error",
        || {
            let v = c1.vm("un1").ok()?;
            (v.state == VmState::Error).then_some(v)
        },
        || logs(&d1, &d2),
    );
    assert!(
        v.reason.contains("crashed 3 times") && v.reason.contains("twinrun vm start un1"),
        "{}",
        v.reason
    );
    assert!(v.vmms.is_empty());
    // pm2 shows the error too, with where it is held.
    wait_for(
        LONG,
        "pm2 to show the error",
        || {
            let v = c2.vm("un1").ok()?;
            (v.state == VmState::Error && v.reason.contains("on pm1")).then_some(())
        },
        || logs(&d1, &d2),
    );
    // The operator clears it (from the other node).
    c2.action("un1", "start", None).unwrap();
    let v = wait_for(
        LONG,
        "un1 running again",
        || {
            let v = c1.vm("un1").ok()?;
            (v.state == VmState::Running).then_some(v)
        },
        || logs(&d1, &d2),
    );
    assert_eq!(v.restarts, 0);
    console_grows(&plan, 0, "un1", &|| logs(&d1, &d2));

    // Shut everything down through the API; the VMMs exit.
    c1.action("un1", "shutdown", None).unwrap();
    c1.action("ft1", "poweroff", None).unwrap();
    wait_for(
        LONG,
        "every VMM gone",
        || (vmm_pids(&plan, 0).is_empty() && vmm_pids(&plan, 1).is_empty()).then_some(()),
        || logs(&d1, &d2),
    );
    // The node that stopped it records Stopped once both VMMs are gone, and pm2 learns
    // the record by replication: a moment after the pid files are gone, not at once.
    wait_for(
        LONG,
        "ft1 stopped as pm2 sees it",
        || (c2.vm("ft1").ok()?.state == VmState::Stopped).then_some(()),
        || {
            format!(
                "{:?}\n{}",
                c2.vm("ft1").map(|v| (v.state, v.reason)),
                logs(&d1, &d2)
            )
        },
    );
}

fn un1_pid(v: &VmView) -> u32 {
    vmm(v, "pm1").map_or(0, |m| m.1)
}

#[test]
fn a_node_that_was_away_catches_up_both_ways() {
    let plan = ClusterPlan::new();
    let _reaper = VmmReaper(&plan);
    let (mut d1, mut d2) = start_both(&plan, LONG);
    let (c1, c2) = (plan.client(0, ADMIN), plan.client(1, ADMIN));
    let ctx = || String::new();
    c1.create(&spec("a", "unprotected", "pm1", &["counter"], false), None)
        .unwrap();
    wait_for(LONG, "pm2 to see a", || c2.vm("a").ok(), ctx);

    // pm2 away: changes on pm1.
    assert_eq!(d2.terminate(), Some(0));
    c1.create(&spec("b", "ha", "pm2", &["counter"], false), None)
        .unwrap();
    c1.set(
        "a",
        &VmSettings {
            autostart: Some(false),
            ..Default::default()
        },
        None,
    )
    .unwrap();
    let d2 = Daemon::start(&plan, 1);
    wait_for(
        LONG,
        "pm2 to catch up",
        || {
            let b = c2.vm("b").ok()?;
            let a = c2.vm("a").ok()?;
            (!a.spec.autostart && b.spec.preferred_node.as_deref() == Some("pm2")).then_some(())
        },
        || d2.log_text(),
    );

    // pm1 away: changes on pm2, including a delete.
    assert_eq!(d1.terminate(), Some(0));
    c2.create(&spec("c", "ft", "pm1", &["counter"], false), None)
        .unwrap();
    c2.delete("b", None).unwrap();
    let d1 = Daemon::start(&plan, 0);
    wait_for(
        LONG,
        "pm1 to catch up",
        || {
            let names: Vec<String> = c1.vms().ok()?.into_iter().map(|v| v.spec.name).collect();
            (names == ["a", "c"]).then_some(())
        },
        || d1.log_text(),
    );
    // Both hold the same records, at the same versions.
    let same = |c: &Client| -> Vec<(String, String)> {
        c.vms()
            .unwrap()
            .into_iter()
            .map(|v| (v.spec.name, v.version.to_string()))
            .collect()
    };
    assert_eq!(same(&c1), same(&c2));
}

#[test]
fn a_peer_of_another_cluster_version_or_secret_is_refused_with_the_reason() {
    let plan = ClusterPlan::new();
    let d1 = Daemon::start(&plan, 0);
    let c1 = plan.client(0, READER);
    let reason_contains = |d2: &Daemon, want: &str| {
        wait_for(
            LONG,
            want,
            || {
                let n = c1.nodes().ok()?;
                (n[1].state == NodeState::Unknown && n[1].reason.contains(want)).then_some(())
            },
            || format!("{}\n{}", d1.log_text(), d2.log_text()),
        );
    };
    // Another protocol version.
    let mut d2 = Daemon::start_with(&plan, 1, &[("TWINRUND_PROTOCOL", "9")]);
    reason_contains(&d2, "it speaks daemon protocol 9, this node 1");
    d2.kill();
    // Another cluster.
    plan.write_config(1);
    let cfg = plan.config_path(1);
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace(&plan.cluster, "other-cluster");
    let d2 = start_raw(&plan, 1, &text);
    reason_contains(&d2, "it belongs to cluster \"other-cluster\"");
    drop(d2);
    // Another secret.
    let text = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(
        plan.node_dir(1).join("secret2"),
        "another-secret-of-this-length",
    )
    .unwrap();
    let text = text.replace("/secret\"", "/secret2\"");
    let d2 = start_raw(&plan, 1, &text);
    reason_contains(&d2, "the cluster secrets differ");
}

/// Starts node `i` with config text `text` as is.
fn start_raw(plan: &ClusterPlan, i: usize, text: &str) -> Daemon {
    let cfg = plan.node_dir(i).join("raw.toml");
    std::fs::write(&cfg, text).unwrap();
    let log = plan.node_dir(i).join("twinrund-raw.log");
    let child = std::process::Command::new(twinrund_bin())
        .arg("--config")
        .arg(&cfg)
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    plan.reaper.pid_of(child.id()).expect("reaper");
    Daemon {
        child: Some(child),
        log,
    }
}

#[test]
fn an_ft_vm_goes_on_when_its_node_dies_and_is_protected_again_when_it_returns() {
    let plan = ClusterPlan::new();
    let _reaper = VmmReaper(&plan);
    let (mut d1, d2) = start_both(&plan, LONG);
    let (c1, c2) = (plan.client(0, ADMIN), plan.client(1, ADMIN));
    c1.create(&spec("ft1", "ft", "pm1", &["counter", "disk"], true), None)
        .unwrap();
    c1.action("ft1", "start", None).unwrap();
    wait_for(
        LONG,
        "ft1 protected",
        || (c2.vm("ft1").ok()?.state == VmState::Protected).then_some(()),
        || logs(&d1, &d2),
    );

    // PM1 dies: its daemon and its VMMs are SIGKILLed.
    let pm1_vmms = vmm_pids(&plan, 0);
    d1.kill();
    for p in &pm1_vmms {
        // SAFETY: kill(2) on the VMM pm1's daemon started (from its pid file).
        unsafe { libc::kill(*p as i32, libc::SIGKILL) };
    }
    // The standby on pm2 takes over; pm2's daemon sees it, asks the quorum gate, and
    // records itself as the owner; the guest goes on on pm2.
    let v = wait_for(
        LONG,
        "pm2 to own ft1",
        || {
            let v = c2.vm("ft1").ok()?;
            (v.owner.as_deref() == Some("pm2") && v.state == VmState::Simplex).then_some(v)
        },
        || logs(&d1, &d2),
    );
    let m = vmm(&v, "pm2").expect("the VMM on pm2");
    assert_eq!(
        m.0,
        Role::Primary,
        "the standby acts as the primary now: {:?}",
        v.vmms
    );
    assert!(v.vmms.iter().any(|m| m.failed_over));
    let events: Vec<String> = c2
        .events(Some("ft1"), 100)
        .unwrap()
        .into_iter()
        .map(|e| e.message)
        .collect();
    assert!(
        events
            .iter()
            .any(|e| e.starts_with("quorum granted to take over")),
        "{events:?}"
    );
    console_grows(&plan, 1, "ft1", &|| logs(&d1, &d2));

    // PM1 returns: it catches up (pm2 owns ft1), starts a standby, the pair is protected
    // again; failback is manual, and the reason says how.
    let d1 = Daemon::start(&plan, 0);
    let v = wait_for(
        LONG,
        "ft1 protected again",
        || {
            let v = c1.vm("ft1").ok()?;
            (v.state == VmState::Protected && vmm(&v, "pm1").map(|m| m.0) == Some(Role::Standby))
                .then_some(v)
        },
        || logs(&d1, &d2),
    );
    assert_eq!(v.owner.as_deref(), Some("pm2"));
    let v2 = c2.vm("ft1").unwrap();
    assert!(
        v2.reason.contains("twinrun vm failback ft1"),
        "{}",
        v2.reason
    );
    // Failback by a planned role swap: pm1's standby takes the VM over at a checkpoint
    // boundary, its daemon becomes the owner, pm2's VMM goes on as the standby.
    c1.action("ft1", "failback", None).unwrap();
    let v = wait_for(
        LONG,
        "ft1 failed back to pm1 and protected",
        || {
            let v = c1.vm("ft1").ok()?;
            (v.owner.as_deref() == Some("pm1")
                && v.state == VmState::Protected
                && vmm(&v, "pm1").map(|m| m.0) == Some(Role::Primary)
                && vmm(&v, "pm2").map(|m| m.0) == Some(Role::Standby))
            .then_some(v)
        },
        || logs(&d1, &d2),
    );
    // The same processes: nothing was restarted for the swap.
    assert_eq!(vmm(&v, "pm2").map(|m| m.1), Some(m.1), "{:?}", v.vmms);
    let events: Vec<String> = c1
        .events(Some("ft1"), 100)
        .unwrap()
        .into_iter()
        .map(|e| e.message)
        .collect();
    assert!(
        events.iter().any(|e| e.contains("planned role swap")),
        "{events:?}"
    );
    console_grows(&plan, 0, "ft1", &|| logs(&d1, &d2));
}
