//! Rolling upgrade (issue 16 item 3): two daemons a protocol version apart still form a
//! pair and protect FT VMs across it (a primary on each side); the old node's daemon is
//! then replaced by the current build, which adopts the VMMs the old one started and
//! keeps them protected; two versions apart the daemons refuse each other, each naming
//! both versions.
//!
//! The "previous version" node is, by default, this build announcing version N-1
//! (`TWINRUND_PROTOCOL`, read at start). With `TWINRUN_PREV_DIR` set to the target
//! directory of a build made with `TWINRUN_PROTO_PREV=1` (scripts/rolling-upgrade.sh
//! builds one), node 2 runs that build's `twinrund` and `twinrun` instead: a daemon, its
//! VMMs and their A-Link all announcing the previous versions, as an old node would.

mod common;

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use twinrund::model::{NodeState, Role, VmState};
use twinrund::peer::wire::PROTOCOL;

const LONG: Duration = Duration::from_secs(90);

/// A previous-version build's binaries, if the caller made one.
fn prev_dir() -> Option<PathBuf> {
    std::env::var_os("TWINRUN_PREV_DIR").map(PathBuf::from)
}

/// Starts node `i` as the previous-version node: the other build's binaries when
/// `TWINRUN_PREV_DIR` is set, else this build announcing `PROTOCOL - 1`.
fn start_previous(plan: &ClusterPlan, i: usize) -> Daemon {
    let Some(dir) = prev_dir() else {
        let v = (PROTOCOL - 1).to_string();
        // Its VMMs (they inherit the daemon's environment) speak the previous A-Link
        // protocol's messages.
        let a = (alink::PROTOCOL_CURRENT - 1).to_string();
        return Daemon::start_with(
            plan,
            i,
            &[
                ("TWINRUND_PROTOCOL", v.as_str()),
                ("TWINRUN_ALINK_PROTOCOL", a.as_str()),
            ],
        );
    };
    let cfg = plan.write_config(i);
    let text = std::fs::read_to_string(&cfg).unwrap().replace(
        &format!("twinrun_bin = \"{}\"", twinrun_bin().display()),
        &format!("twinrun_bin = \"{}\"", dir.join("twinrun").display()),
    );
    assert!(text.contains(&dir.display().to_string()), "{text}");
    std::fs::write(&cfg, text).unwrap();
    let log = plan.node_dir(i).join("twinrund.log");
    let f = std::fs::File::create(&log).unwrap();
    let child = Command::new(dir.join("twinrund"))
        .arg("--config")
        .arg(&cfg)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(f.try_clone().unwrap())
        .stderr(f)
        .spawn()
        .expect("the previous build's twinrund");
    let d = Daemon {
        child: Some(child),
        log,
    };
    let c = plan.client(i, READER);
    let deadline = Instant::now() + Duration::from_secs(30);
    while c.nodes().is_err() {
        assert!(Instant::now() < deadline, "no API:\n{}", d.log_text());
        std::thread::sleep(Duration::from_millis(50));
    }
    d
}

/// Waits until `vm` is protected with its primary on `primary` and its standby on the
/// other node, in both daemons' views; returns the (primary, standby) VMM pids.
fn wait_protected(
    c: [&Client; 2],
    vm: &str,
    primary: &str,
    ctx: &dyn Fn() -> String,
) -> (u32, u32) {
    let standby = if primary == "pm1" { "pm2" } else { "pm1" };
    wait_for(
        LONG,
        &format!("{vm} protected, primary on {primary}, standby on {standby}"),
        || {
            let (a, b) = (c[0].vm(vm).ok()?, c[1].vm(vm).ok()?);
            let p = vmm(&a, primary)?;
            let s = vmm(&a, standby)?;
            (a.state == VmState::Protected
                && b.state == VmState::Protected
                && p.0 == Role::Primary
                && p.2
                && s.0 == Role::Standby
                && a.reason.contains(&format!("standby on {standby} in sync")))
            .then_some((p.1, s.1))
        },
        ctx,
    )
}

#[test]
fn daemons_one_version_apart_pair_and_two_apart_refuse_each_other() {
    let plan = ClusterPlan::new();
    let _reaper = VmmReaper(&plan);
    let d1 = Daemon::start(&plan, 0);
    let mut d2 = start_previous(&plan, 1);
    let (c1, c2) = (plan.client(0, ADMIN), plan.client(1, ADMIN));
    let logs = |d2: &Daemon| format!("--- pm1:\n{}\n--- pm2:\n{}", d1.log_text(), d2.log_text());

    // N and N-1 meet; each shows the version the other announced.
    wait_for(
        LONG,
        "the daemons (N and N-1) to meet",
        || {
            let (n1, n2) = (c1.nodes().ok()?, c2.nodes().ok()?);
            (n1[1].state == NodeState::Online && n2[1].state == NodeState::Online).then_some(())
        },
        || logs(&d2),
    );
    assert_eq!(c1.nodes().unwrap()[1].protocol, Some(PROTOCOL - 1));
    assert_eq!(c2.nodes().unwrap()[1].protocol, Some(PROTOCOL));

    // Two FT VMs protected across the pair, one primary on each side: ft1's primary on
    // the N node, ft2's on the N-1 node (with TWINRUN_PREV_DIR, VMMs of the previous
    // build on pm2, so each A-Link is N against N-1, dialed from either side).
    c1.create(&spec("ft1", "ft", "pm1", &["counter", "disk"], true), None)
        .unwrap();
    c2.create(&spec("ft2", "ft", "pm2", &["counter", "disk"], true), None)
        .unwrap();
    c1.action("ft1", "start", None).unwrap();
    c2.action("ft2", "start", None).unwrap();
    let ft1 = wait_protected([&c1, &c2], "ft1", "pm1", &|| logs(&d2));
    let ft2 = wait_protected([&c1, &c2], "ft2", "pm2", &|| logs(&d2));
    console_grows(&plan, 0, "ft1", &|| logs(&d2));
    console_grows(&plan, 1, "ft2", &|| logs(&d2));
    if let Some(dir) = prev_dir() {
        // pm2's VMMs are the previous build's.
        for pid in [ft1.1, ft2.0] {
            let exe = std::fs::read_link(format!("/proc/{pid}/exe")).unwrap();
            assert_eq!(exe, dir.join("twinrun"), "VMM {pid} on pm2");
        }
    }
    // Each A-Link session runs at the previous protocol, in its messages (the pm1
    // primary of ft1 and standby of ft2 say so; both are in sync and running above).
    let session_at = format!(
        "session at {} (ours {})",
        alink::PROTOCOL_CURRENT - 1,
        alink::PROTOCOL_CURRENT
    );
    for vm in ["ft1", "ft2"] {
        let log = plan.node_dir(0).join(format!("state/vms/{vm}/vmm.log"));
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        assert!(
            text.contains(&session_at),
            "{vm} on pm1: no A-Link session at the previous protocol in {}:\n{text}",
            log.display()
        );
    }

    // "Replace the binaries" on pm2: its old daemon stops (the VMMs keep running), the
    // current build starts and adopts them (same pids, confirmed over their control
    // sockets, which speak the previous control version with TWINRUN_PREV_DIR); both
    // VMs stay protected with their primaries where they were, guests running.
    assert_eq!(d2.terminate(), Some(0), "{}", logs(&d2));
    let old_log = d2.log_text();
    let d2 = Daemon::start(&plan, 1);
    assert_eq!(
        wait_protected([&c1, &c2], "ft1", "pm1", &|| logs(&d2)),
        ft1,
        "ft1's VMMs were restarted instead of adopted"
    );
    assert_eq!(
        wait_protected([&c1, &c2], "ft2", "pm2", &|| logs(&d2)),
        ft2,
        "ft2's VMMs were restarted instead of adopted"
    );
    console_grows(&plan, 1, "ft2", &|| logs(&d2));
    console_grows(&plan, 0, "ft1", &|| logs(&d2));
    let new_log = d2.log_text();
    let new_log = new_log.strip_prefix(old_log.as_str()).unwrap_or(&new_log);
    assert!(
        new_log.contains("ft1: adopted running standby VMM")
            && new_log.contains("ft2: adopted running primary VMM"),
        "{new_log}"
    );
    assert!(!new_log.contains("control socket"), "{new_log}");
    wait_for(
        LONG,
        "both daemons at N",
        || {
            let (n1, n2) = (c1.nodes().ok()?, c2.nodes().ok()?);
            (n1[1].protocol == Some(PROTOCOL) && n2[1].protocol == Some(PROTOCOL)).then_some(())
        },
        || logs(&d2),
    );

    // Node 2 comes back two versions ahead of node 1 (node 1 is N-2 to it): both refuse.
    let mut d2 = d2;
    d2.kill();
    let ahead = (PROTOCOL + 2).to_string();
    let d2 = Daemon::start_with(&plan, 1, &[("TWINRUND_PROTOCOL", ahead.as_str())]);
    let n = PROTOCOL;
    let pm1_says = format!("it speaks daemon protocol {}, this node {n}", n + 2);
    let pm2_says = format!("it speaks daemon protocol {n}, this node {}", n + 2);
    for (c, want) in [(&c1, &pm1_says), (&c2, &pm2_says)] {
        wait_for(
            LONG,
            want,
            || {
                let p = &c.nodes().ok()?[1];
                (p.state != NodeState::Online && p.reason.contains(want.as_str())).then_some(())
            },
            || logs(&d2),
        );
    }
}
