//! Maintenance mode with two real daemons and real VMMs (issue 16 item 2): work on PM1
//! while an FT, an HA and an unprotected VM run there; the FT and HA VMs go on on PM2
//! alone (their guests' consoles grow), the unprotected one is live migrated to PM2 (the
//! same guest: one BOOT, its counter goes on without a gap); work on PM2 as well is
//! refused; PM1's daemon is stopped and started again (an "upgrade") and stays in
//! maintenance; finalize protects the FT and HA VMs again, and the unprotected VM (manual
//! failback) is migrated back to PM1 by `vm failback`, still the same guest.

mod common;

use std::time::Duration;

use common::*;
use twinrun_lab::console::check_console;
use twinrund::client::ClientError;
use twinrund::model::{Role, VmState, VmView};

const LONG: Duration = Duration::from_secs(120);

fn console_len(plan: &ClusterPlan, node: usize, vm: &str) -> u64 {
    std::fs::metadata(
        plan.node_dir(node)
            .join(format!("state/vms/{vm}/console.log")),
    )
    .map_or(0, |m| m.len())
}

/// Waits until the console of `vm` on `node` grows (the guest runs there).
fn console_grows(plan: &ClusterPlan, node: usize, vm: &str, ctx: &dyn Fn() -> String) {
    let before = console_len(plan, node, vm);
    wait_for(
        LONG,
        &format!("{vm}'s console on node {} to grow", node + 1),
        || (console_len(plan, node, vm) > before).then_some(()),
        ctx,
    );
}

fn vmm(v: &VmView, node: &str) -> Option<(Role, bool)> {
    v.vmms
        .iter()
        .find(|m| m.node == node)
        .map(|m| (m.role, m.protected))
}

/// `twinrun ARGS` against node `i`'s API as admin; its stdout (exit status 0 asserted).
fn cli(plan: &ClusterPlan, i: usize, args: &[&str]) -> String {
    let tok = plan.dir.path().join("admin.token");
    std::fs::write(&tok, ADMIN).unwrap();
    let out = std::process::Command::new(twinrun_bin())
        .args(args)
        .args(["--api", &format!("http://{}", plan.api[i]), "--token-file"])
        .arg(&tok)
        .output()
        .unwrap();
    let (o, e) = (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    assert_eq!(out.status.code(), Some(0), "twinrun {args:?}: {o}{e}");
    o
}

/// The last lines of `vm`'s VMM log on both nodes (newest first), for failure reports.
fn vmm_logs(plan: &ClusterPlan, vm: &str) -> String {
    (0..2)
        .map(|i| {
            let p = plan.node_dir(i).join(format!("state/vms/{vm}/vmm.log"));
            let t = std::fs::read_to_string(&p).unwrap_or_default();
            let tail: Vec<&str> = t.lines().rev().take(40).collect();
            format!(
                "--- {} (last lines, newest first):\n{}",
                p.display(),
                tail.join("\n")
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// `vm`'s console stream: each node's file holds the bytes its VMM released at their
/// stream positions (a hole is NULs), so the union is the guest's whole output.
fn console_stream(plan: &ClusterPlan, vm: &str) -> Vec<u8> {
    let files: Vec<Vec<u8>> = (0..2)
        .map(|i| {
            std::fs::read(plan.node_dir(i).join(format!("state/vms/{vm}/console.log")))
                .unwrap_or_default()
        })
        .collect();
    let len = files.iter().map(Vec::len).max().unwrap_or(0);
    (0..len)
        .map(|k| {
            files
                .iter()
                .filter_map(|f| f.get(k).copied())
                .find(|&b| b != 0)
                .unwrap_or(0)
        })
        .collect()
}

/// The unprotected VM was moved, not restarted: one BOOT in its whole console stream,
/// no counter value missing or repeated, and its counter goes on on `node`.
fn same_guest_goes_on(plan: &ClusterPlan, node: usize, what: &str, ctx: &dyn Fn() -> String) {
    let before = check_console(&console_stream(plan, "un1"))
        .unwrap_or_else(|e| panic!("{what}: un1's console: {e}\n{}", ctx()));
    assert_eq!(before.boots, 1, "{what}: un1 booted again\n{}", ctx());
    let last = before.counter_last;
    wait_for(
        LONG,
        &format!("{what}: un1's counter to go on on node {}", node + 1),
        || {
            let r = check_console(&console_stream(plan, "un1")).ok()?;
            (r.counter_last > last + 5 && console_len(plan, node, "un1") > 0).then_some(r)
        },
        ctx,
    );
    console_grows(plan, node, "un1", ctx);
    let after = check_console(&console_stream(plan, "un1"))
        .unwrap_or_else(|e| panic!("{what}: un1's console: {e}\n{}", ctx()));
    assert_eq!(after.boots, 1, "{what}: un1 booted again\n{}", ctx());
}

#[test]
fn work_on_pm1_with_ft_and_unprotected_vms_upgrade_its_daemon_and_finalize() {
    work_on_upgrade_finalize(&["ft1"]);
}

#[test]
fn work_on_pm1_with_ft_ha_and_unprotected_vms_upgrade_its_daemon_and_finalize() {
    work_on_upgrade_finalize(&["ft1", "ha1"]);
}

/// `paired`: the FT/HA VMs (`ft*` FT, `ha*` HA), all preferring pm1, with an
/// unprotected VM `un1`.
fn work_on_upgrade_finalize(paired: &[&str]) {
    let plan = ClusterPlan::new();
    let _reaper = VmmReaper(&plan);
    let (mut d1, d2) = start_both(&plan, LONG);
    let (c1, c2) = (plan.client(0, ADMIN), plan.client(1, ADMIN));
    for &vm in paired {
        let level = if vm.starts_with("ha") { "ha" } else { "ft" };
        c1.create(&spec(vm, level, "pm1", &["counter", "disk"], true), None)
            .unwrap();
    }
    c1.create(
        &spec("un1", "unprotected", "pm1", &["counter"], false),
        None,
    )
    .unwrap();
    let all: Vec<&str> = paired.iter().copied().chain(["un1"]).collect();
    for &vm in &all {
        c1.action(vm, "start", None).unwrap();
    }
    for &vm in paired {
        wait_for(
            LONG,
            &format!("{vm} protected"),
            || (c2.vm(vm).ok()?.state == VmState::Protected).then_some(()),
            || logs(&d1, &d2),
        );
    }
    wait_for(
        LONG,
        "un1 running on pm1",
        || (vmm(&c1.vm("un1").ok()?, "pm1")?.0 == Role::Solo).then_some(()),
        || logs(&d1, &d2),
    );
    for &vm in &all {
        console_grows(&plan, 0, vm, &|| logs(&d1, &d2));
    }

    // Work on pm1, asked on pm2 with the CLI.
    let out = cli(&plan, 1, &["node", "workon", "pm1"]);
    assert!(out.contains("pm1 is in maintenance"), "{out}");
    for &vm in paired {
        let vmm_logs = || vmm_logs(&plan, vm);
        let v = wait_for(
            LONG,
            &format!("{vm} simplex on pm2"),
            || {
                let v = c2.vm(vm).ok()?;
                (v.owner.as_deref() == Some("pm2")
                    && v.state == VmState::Simplex
                    && vmm(&v, "pm2").map(|m| m.0) == Some(Role::Primary)
                    && vmm(&v, "pm1").is_none())
                .then_some(v)
            },
            || format!("{}\n{}", logs(&d1, &d2), vmm_logs()),
        );
        assert!(v.reason.contains("pm1 is in maintenance"), "{}", v.reason);
        console_grows(&plan, 1, vm, &|| logs(&d1, &d2));
    }
    // The unprotected VM was live migrated: it runs on pm2 alone (the receiving VMM,
    // swapped in), the same guest, its counter going on.
    let un = wait_for(
        LONG,
        "un1 migrated to pm2",
        || {
            let v = c1.vm("un1").ok()?;
            (v.owner.as_deref() == Some("pm2")
                && v.state == VmState::Running
                && vmm(&v, "pm1").is_none()
                && vmm(&v, "pm2").is_some())
            .then_some(v)
        },
        || format!("{}\n{}", logs(&d1, &d2), vmm_logs(&plan, "un1")),
    );
    assert_eq!(un.desired, twinrund::model::Desired::Running);
    same_guest_goes_on(&plan, 1, "after workon", &|| {
        format!("{}\n{}", logs(&d1, &d2), vmm_logs(&plan, "un1"))
    });
    // Its VMM knew it was unprotected: no quorum warning, no checkpoints before the
    // migration's receiving VMM connected.
    let un_log = std::fs::read_to_string(plan.node_dir(0).join("state/vms/un1/vmm.log")).unwrap();
    assert!(!un_log.contains("WITHOUT QUORUM"), "{un_log}");
    assert!(un_log.contains("unprotected VM running alone"), "{un_log}");
    // Cleanly: every VMM pm1 ran got SIGTERM and ended; none runs there.
    let pm1_log = d1.log_text();
    for &vm in paired {
        assert!(
            pm1_log.contains(&format!("{vm}: its primary VMM stopped")),
            "{pm1_log}"
        );
    }
    wait_for(
        LONG,
        "no VMM on pm1",
        || {
            vmm_pids(&plan, 0)
                .into_iter()
                .all(|p| !alive(p))
                .then_some(())
        },
        || logs(&d1, &d2),
    );
    let out = cli(&plan, 0, &["node", "list"]);
    assert!(out.contains("in maintenance: work on"), "{out}");
    for c in [&c1, &c2] {
        let n = c.node("pm1").unwrap();
        assert!(
            n.maintenance.as_deref().is_some_and(|m| m.contains("un1")),
            "{n:?}"
        );
    }
    // Both nodes in maintenance: refused with the reason.
    match c1.node_action("pm2", "workon", None) {
        Err(ClientError::Api { status, error, .. }) => {
            assert_eq!(status, 409);
            assert!(error.contains("both nodes in maintenance"), "{error}");
        }
        other => panic!("workon pm2 was not refused: {other:?}"),
    }

    // The "upgrade": pm1's daemon stops and starts again; the guests go on on pm2.
    d1.terminate();
    console_grows(&plan, 1, "ft1", &|| d2.log_text());
    d1 = Daemon::start(&plan, 0);
    wait_for(
        LONG,
        "the daemons to meet again",
        || peer_online(&c1).then_some(()),
        || logs(&d1, &d2),
    );
    let n = c1.node("pm1").unwrap();
    assert!(
        n.maintenance.is_some(),
        "maintenance lost at restart: {n:?}"
    );
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        vmm_pids(&plan, 0).into_iter().all(|p| !alive(p)),
        "pm1 started a VMM in maintenance\n{}",
        logs(&d1, &d2)
    );

    // Finalize: protected again; the unprotected VM (manual failback) stays on pm2
    // until `vm failback`, which migrates it back to pm1.
    let r = c1.node_action("pm1", "finalize", None).unwrap();
    assert!(r.message.contains("left maintenance"), "{}", r.message);
    for &vm in paired {
        wait_for(
            LONG,
            &format!("{vm} protected again"),
            || {
                let v = c1.vm(vm).ok()?;
                (v.state == VmState::Protected
                    && vmm(&v, "pm1").map(|m| m.0) == Some(Role::Standby))
                .then_some(())
            },
            || format!("{}\n{}", logs(&d1, &d2), vmm_logs(&plan, vm)),
        );
        console_grows(&plan, 1, vm, &|| logs(&d1, &d2));
    }
    assert!(
        r.message
            .contains("stay on pm2 until `twinrun vm failback`"),
        "{}",
        r.message
    );
    let out = cli(&plan, 1, &["vm", "failback", "un1"]);
    assert!(out.contains("migrating to pm1"), "{out}");
    wait_for(
        LONG,
        "un1 migrated back to pm1",
        || {
            let v = c2.vm("un1").ok()?;
            (v.owner.as_deref() == Some("pm1")
                && v.state == VmState::Running
                && vmm(&v, "pm2").is_none()
                && vmm(&v, "pm1").is_some())
            .then_some(())
        },
        || format!("{}\n{}", logs(&d1, &d2), vmm_logs(&plan, "un1")),
    );
    same_guest_goes_on(&plan, 0, "after failback", &|| {
        format!("{}\n{}", logs(&d1, &d2), vmm_logs(&plan, "un1"))
    });
    assert!(c2.node("pm1").unwrap().maintenance.is_none());
}
