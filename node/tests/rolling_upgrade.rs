//! Rolling upgrade (issue 16 item 3): two daemons a protocol version apart still form a
//! pair and protect an FT VM across it; two versions apart they refuse each other, each
//! naming both versions.
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
use twinrund::model::{NodeState, VmState};
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
        return Daemon::start_with(plan, i, &[("TWINRUND_PROTOCOL", v.as_str())]);
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

    // An FT VM is protected across the pair: its primary on the N node, its standby on
    // the N-1 node (with TWINRUN_PREV_DIR, a VMM of the previous build, so the A-Link
    // is N against N-1 too).
    c1.create(&spec("ft1", "ft", "pm1", &["counter", "disk"], true), None)
        .unwrap();
    c1.action("ft1", "start", None).unwrap();
    wait_for(
        LONG,
        "ft1 protected across the N / N-1 pair",
        || {
            let (a, b) = (c1.vm("ft1").ok()?, c2.vm("ft1").ok()?);
            (a.state == VmState::Protected && b.state == VmState::Protected).then_some(())
        },
        || logs(&d2),
    );

    // Node 2 comes back two versions ahead of node 1 (node 1 is N-2 to it): both refuse.
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
