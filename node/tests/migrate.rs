//! Live migration by the daemons (`twinrun vm migrate`), real daemons and VMMs: two
//! `twinrund` in PM namespaces (`twinrun_lab::Topology` with a management network, the
//! guests' TAPs on each PM's bridge), an unprotected VM of the test guest (kv +
//! counter + disk) with a RESP client on ONE TCP connection from the client namespace.
//!
//! - `unprotected_vm_migrates_back_and_forth_under_kv_load`: MIGRATE_RUNS migrations
//!   (default 4), each by the CLI (`twinrun vm migrate`, its progress bar fed by the
//!   API) asked of the node the VM runs on, alternately with and without `--to`.
//!   Checked after each: the CLI says it migrated, the record names the target the
//!   owner, exactly one VMM runs it (on the target), the guest's counter goes on, the
//!   client gets answers on its connection. At the end: the connection survived, no
//!   acknowledged write lost, the INCR counter exact, and the console stream (each
//!   node's console file holds the bytes at their stream positions) has no gap, no
//!   duplicate and one BOOT.
//! - `failed_migrations_leave_the_vm_on_the_source`: the receiving VMM killed during the
//!   pre-copy, and every A-Link cut during it (the migration given up when the source
//!   loses sync or is not in sync in time is the step function's, see the goldens; here
//!   the A-Links stay down until the receiving VMM's session is lost): the VM runs on at
//!   the source on the same connection, and a later migration succeeds.
//! - `ft_vm_migrates_by_a_planned_role_swap`: an FT VM moved to pm2 and back by
//!   `twinrun vm migrate` (a planned role swap each way, the target its new preferred
//!   node, protected again the other way round).
//! - `ha_vm_migrates_back_and_forth_under_kv_load`: an HA VM with the kv client moved
//!   MIGRATE_RUNS times by `twinrun vm migrate` (its primary's VMM: pre-copy to the
//!   in-sync standby, then the handover): protected again the other way round after
//!   each, the connection, every acknowledged write, one BOOT and a whole console.
//! - `ft_vm_migrates_with_a_witness` (issue 15): the same FT migrations with a real
//!   `twinrun witness` as the pair's quorum: each swap hands the lease over (the
//!   target's VMM takes the next generation by compare-and-set), so the migration is
//!   no longer refused for a VM with a witness.
mod common;

use std::time::{Duration, Instant};

use common::lab_cluster::LabCluster;
use common::{twinrun_bin, wait_for};
use twinrun_lab::console::count_c;
use twinrun_lab::kvload::LoadClient;
use twinrun_lab::verdict::{check_load, Expect};
use twinrund::model::Role;

const VM: &str = "mover";

type Cluster = LabCluster;

impl Cluster {
    fn start() -> Cluster {
        Self::start_opts(false)
    }

    /// With a `twinrun witness` on the management network as the pair's quorum.
    fn start_opts(witness: bool) -> Cluster {
        LabCluster::launch("mg", VM, witness)
    }

    /// Every A-Link of pm2 down or up.
    fn set_alinks(&self, up: bool) {
        for k in 0..self.topo.alinks() {
            self.topo.set_alink(1, k, up).unwrap();
        }
    }

    /// Creates and starts an FT VM `name` (no NIC) on pm1, waits until it is protected.
    fn create_ft_vm(&self, name: &'static str) {
        let toml = format!(
            r#"name = "{name}"
vcpus = 1
mem_mib = 64
protection = "ft"
preferred_node = "pm1"
autostart = true
failback = "manual"
disks = [{{ size_mib = 8 }}]
[payload]
kind = "test-guest"
workloads = ["counter", "disk"]
counter_rate = 200
"#
        );
        self.create_and_start(&toml);
        wait_for(
            Duration::from_secs(90),
            "the FT VM protected on pm1",
            || {
                self.api(0, move |c| c.vm(name).ok())
                    .filter(|v| v.state == twinrund::model::VmState::Protected)
            },
            || self.logs(),
        );
    }

    /// Creates and starts the VM on pm1, waits until it serves kv.
    fn create_vm(&self) {
        self.create_vm_as("unprotected");
    }

    /// [`Cluster::create_vm`] at protection level `protection`.
    fn create_vm_as(&self, protection: &str) {
        self.create_kv_vm(protection);
    }

    /// `twinrun vm migrate` run in node `i`'s namespace against its API.
    fn migrate_cli(&self, i: usize, to: Option<&str>) -> (i32, String) {
        self.migrate_cli_of(VM, i, to)
    }

    fn migrate_cli_of(&self, vm: &str, i: usize, to: Option<&str>) -> (i32, String) {
        let mut cmd = self.topo.pms[i].ns.command(twinrun_bin());
        cmd.args([
            "vm",
            "migrate",
            vm,
            "--api",
            &self.api_url(i),
            "--token-file",
        ])
        .arg(self.token_file());
        if let Some(t) = to {
            cmd.args(["--to", t]);
        }
        let out = twinrun_lab::process::output_timeout(&mut cmd, Duration::from_secs(400))
            .expect("twinrun vm migrate ran");
        (
            out.status.code().unwrap_or(-1),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    }

    /// The VM runs on node `i` only: the record says so on both nodes, and one VMM runs
    /// it, there.
    fn wait_runs_on(&self, i: usize, what: &str) {
        let node = format!("pm{}", i + 1);
        wait_for(
            Duration::from_secs(60),
            what,
            || {
                let v = self.view(1 - i)?;
                let w = self.view(i)?;
                let here = w.vmms.iter().any(|m| m.node == node);
                let one = w.vmms.len() == 1 && v.vmms.len() == 1;
                (v.owner.as_deref() == Some(node.as_str())
                    && w.owner.as_deref() == Some(node.as_str())
                    && v.migrating_to.is_none()
                    && here
                    && one)
                    .then_some(())
            },
            || format!("{:?}\n{:?}\n{}", self.view(0), self.view(1), self.logs()),
        );
    }

    /// The guest's counter goes on (its console grows by C lines on node `i`).
    fn counter_goes_on(&self, i: usize, what: &str) {
        let c0 = count_c(&self.console_stream());
        wait_for(
            Duration::from_secs(30),
            what,
            || (count_c(&self.console_stream()) > c0 + 5).then_some(()),
            || format!("node {i}\n{}", self.logs()),
        );
    }

    fn vmm_pid_on(&self, i: usize) -> Option<u32> {
        let node = format!("pm{}", i + 1);
        self.view(i)?
            .vmms
            .iter()
            .find(|m| m.node == node)
            .map(|m| m.pid)
    }
}

fn finish(c: &Cluster, client: LoadClient) {
    let rep = client.finish().unwrap();
    let logs = c.logs();
    let expect = Expect {
        dirty_passes: false,
        ..Expect::MOVED
    };
    let cc = check_load(&rep, &c.console_stream(), expect)
        .unwrap_or_else(|e| panic!("across the migrations: {e}\n{logs}"));
    eprintln!(
        "{} writes acknowledged; console: {} W records, no gap or duplicate",
        rep.sets_acked.len() as u64 + rep.incrs_acked as u64,
        cc.w_seqs.len()
    );
}

fn runs() -> usize {
    std::env::var("MIGRATE_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(4)
}

#[test]
fn unprotected_vm_migrates_back_and_forth_under_kv_load() {
    let c = Cluster::start();
    c.create_vm();
    let client = c.client("mig-counter");
    client
        .wait_acks(100, Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("{e}\n{}", c.logs()));
    let mut at = 0usize;
    for n in 0..runs() {
        let to = 1 - at;
        let t0 = Instant::now();
        let target = format!("pm{}", to + 1);
        // The longest reply wait of the kv client in a window that holds the migration
        // (a figure, not an assertion: the machines are noisy).
        let ((code, out), stall) = std::thread::scope(|s| {
            let probe = s.spawn(|| client.max_reply_during(Duration::from_millis(2500)));
            let r = c.migrate_cli(at, (n % 2 == 0).then_some(target.as_str()));
            (r, probe.join().unwrap())
        });
        assert_eq!(code, 0, "migration {n}: {out}\n{}", c.logs());
        assert!(
            out.contains(&format!("migrated to {target}")),
            "migration {n}: {out}"
        );
        c.wait_runs_on(to, &format!("migration {n}: the VM on {target} only"));
        client
            .wait_acks(50, Duration::from_secs(20))
            .unwrap_or_else(|e| panic!("migration {n}: after it: {e}\n{}", c.logs()));
        c.counter_goes_on(to, &format!("migration {n}: the counter on {target}"));
        // The source's daemon logs the guest's pause until the target accepted.
        let log = std::fs::read_to_string(c.dirs[at].join("twinrund.log")).unwrap_or_default();
        let pause = log
            .lines()
            .rev()
            .find(|l| l.contains("role swap done at checkpoint"))
            .and_then(|l| l.rsplit("guest paused ").next())
            .unwrap_or("?")
            .trim_end_matches(')')
            .to_string();
        eprintln!(
            "migration {n}: pm{} -> {target} in {:?}; guest paused {pause} on the source; \
             longest kv reply around it {stall:?} (CLI: {})",
            at + 1,
            t0.elapsed(),
            out.lines().last().unwrap_or("")
        );
        at = to;
    }
    finish(&c, client);
}

#[test]
fn failed_migrations_leave_the_vm_on_the_source() {
    let c = Cluster::start();
    c.create_vm();
    let client = c.client("mig-counter");
    client
        .wait_acks(100, Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("{e}\n{}", c.logs()));
    let src_pid = c.vmm_pid_on(0).expect("the VMM on pm1");

    // 1. The receiving VMM is killed during the pre-copy: every A-Link is down, so the
    //    pre-copy cannot end before the kill.
    c.set_alinks(false);
    let r = c.api(0, |cl| {
        cl.migrate(VM, Some("pm2"), None).map_err(|e| e.to_string())
    });
    r.unwrap_or_else(|e| panic!("migrate: {e}\n{}", c.logs()));
    let target_pid = wait_for(
        Duration::from_secs(30),
        "the receiving VMM on pm2",
        || c.vmm_pid_on(1),
        || c.logs(),
    );
    // SAFETY: kill(2) of the receiving VMM this test's pm2 daemon started.
    unsafe { libc::kill(target_pid as i32, libc::SIGKILL) };
    wait_for(
        Duration::from_secs(30),
        "the migration given up",
        || c.view(0).filter(|v| v.migrating_to.is_none()),
        || c.logs(),
    );
    c.set_alinks(true);
    c.wait_runs_on(0, "the VM on pm1 only after the target died");
    assert_eq!(c.vmm_pid_on(0), Some(src_pid), "the source VMM is the same");
    client
        .wait_acks(50, Duration::from_secs(20))
        .unwrap_or_else(|e| panic!("after the target died: {e}\n{}", c.logs()));
    c.counter_goes_on(0, "the counter on pm1 after the target died");
    // The node that gave it up logged why (the receiving VMM's end, on pm2).
    let events: Vec<String> = (0..2)
        .flat_map(|i| c.api(i, |cl| cl.events(Some(VM), 100).unwrap_or_default()))
        .map(|e| e.message)
        .collect();
    assert!(
        events
            .iter()
            .any(|m| m.contains("given up") && m.contains("receiving VMM")),
        "no event says the migration was given up: {events:#?}"
    );

    // 2. Every A-Link cut during the pre-copy (this small guest's ends in milliseconds
    //    once it runs, so the links go down first): the receiving VMM waits and never
    //    takes over, the VM runs on at the source on the same connection; with the
    //    links back the same migration completes.
    c.set_alinks(false);
    let r = c.api(0, |cl| {
        cl.migrate(VM, None, None).map_err(|e| e.to_string())
    });
    r.unwrap_or_else(|e| panic!("migrate: {e}\n{}", c.logs()));
    wait_for(
        Duration::from_secs(30),
        "the receiving VMM on pm2",
        || c.vmm_pid_on(1),
        || c.logs(),
    );
    // The VM runs on at the source meanwhile, on the same connection.
    client
        .wait_acks(100, Duration::from_secs(20))
        .unwrap_or_else(|e| panic!("links cut: {e}\n{}", c.logs()));
    assert_eq!(c.vmm_pid_on(0), Some(src_pid));
    let v = c.view(1).expect("view on pm2");
    assert!(
        v.vmms
            .iter()
            .any(|m| m.node == "pm2" && m.role == Role::Standby && !m.failed_over),
        "the receiving VMM never takes over: {v:?}"
    );
    c.set_alinks(true);
    c.wait_runs_on(1, "the migration completes once the links are back");
    client
        .wait_acks(50, Duration::from_secs(20))
        .unwrap_or_else(|e| panic!("after the migration: {e}\n{}", c.logs()));
    c.counter_goes_on(1, "the counter on pm2");
    finish(&c, client);
}

#[test]
fn ft_vm_migrates_by_a_planned_role_swap() {
    let c = Cluster::start();
    c.create_ft_vm("ftm");
    for (from, to) in [(0usize, 1usize), (1, 0)] {
        let target = format!("pm{}", to + 1);
        let (code, out) = c.migrate_cli_of("ftm", from, None);
        assert_eq!(code, 0, "{out}\n{}", c.logs());
        assert!(out.contains(&format!("migrated to {target}")), "{out}");
        // Protected again the other way round, the same VMMs (a swap, no restart).
        wait_for(
            Duration::from_secs(60),
            "protected with its primary on the target",
            || {
                c.api(to, |cl| cl.vm("ftm").ok()).filter(|v| {
                    v.state == twinrund::model::VmState::Protected
                        && v.owner.as_deref() == Some(target.as_str())
                        && v.spec.preferred_node.as_deref() == Some(target.as_str())
                })
            },
            || c.logs(),
        );
    }
}

/// An HA VM under kv load moves back and forth by live migration (its primary's VMM
/// runs the pre-copy to its in-sync standby, then the handover): HA again the other
/// way round after each, the same guest (one BOOT across both consoles, the counter
/// without gap), the client's one connection and every acknowledged write kept.
#[test]
fn ha_vm_migrates_back_and_forth_under_kv_load() {
    let c = Cluster::start();
    c.create_vm_as("ha");
    wait_for(
        Duration::from_secs(90),
        "the HA VM protected on pm1",
        || {
            c.api(0, |cl| cl.vm(VM).ok())
                .filter(|v| v.state == twinrund::model::VmState::Protected)
        },
        || c.logs(),
    );
    let client = c.client("mig-counter");
    client
        .wait_acks(100, Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("{e}\n{}", c.logs()));
    let mut at = 0usize;
    for n in 0..runs() {
        let to = 1 - at;
        let t0 = Instant::now();
        let target = format!("pm{}", to + 1);
        let ((code, out), stall) = std::thread::scope(|s| {
            let probe = s.spawn(|| client.max_reply_during(Duration::from_millis(2500)));
            let r = c.migrate_cli(at, (n % 2 == 0).then_some(target.as_str()));
            (r, probe.join().unwrap())
        });
        assert_eq!(code, 0, "migration {n}: {out}\n{}", c.logs());
        assert!(
            out.contains(&format!("migrated to {target}")),
            "migration {n}: {out}"
        );
        // HA again the other way round: the target's VMM the primary, the source's its
        // in-sync standby (the same two VMMs: no restart).
        wait_for(
            Duration::from_secs(60),
            "protected with its primary on the target",
            || {
                c.api(to, |cl| cl.vm(VM).ok()).filter(|v| {
                    v.state == twinrund::model::VmState::Protected
                        && v.owner.as_deref() == Some(target.as_str())
                        && v.spec.preferred_node.as_deref() == Some(target.as_str())
                })
            },
            || c.logs(),
        );
        client
            .wait_acks(50, Duration::from_secs(20))
            .unwrap_or_else(|e| panic!("migration {n}: after it: {e}\n{}", c.logs()));
        c.counter_goes_on(to, &format!("migration {n}: the counter on {target}"));
        eprintln!(
            "HA migration {n}: pm{} -> {target} in {:?}; longest kv reply around it {stall:?}",
            at + 1,
            t0.elapsed(),
        );
        at = to;
    }
    let boots = String::from_utf8_lossy(&c.console_stream())
        .lines()
        .filter(|l| l.starts_with("BOOT"))
        .count();
    assert_eq!(boots, 1, "the guest booted again\n{}", c.logs());
    finish(&c, client);
}

#[test]
fn ft_vm_migrates_with_a_witness() {
    let c = Cluster::start_opts(true);
    c.create_ft_vm("ftw");
    for (from, to) in [(0usize, 1usize), (1, 0)] {
        let target = format!("pm{}", to + 1);
        let (code, out) = c.migrate_cli_of("ftw", from, None);
        assert_eq!(code, 0, "{out}\n{}", c.logs());
        assert!(out.contains(&format!("migrated to {target}")), "{out}");
        wait_for(
            Duration::from_secs(60),
            "protected with its primary on the target",
            || {
                c.api(to, |cl| cl.vm("ftw").ok()).filter(|v| {
                    v.state == twinrund::model::VmState::Protected
                        && v.owner.as_deref() == Some(target.as_str())
                })
            },
            || c.logs(),
        );
    }
    // The witness really decided: its record of the VM is at the third generation
    // (1 at the start, one per change of primary), held by pm1's node (odd: parity).
    let status = c.dir.path().join("witness/status.json");
    wait_for(
        Duration::from_secs(20),
        "the witness's record at generation 3, held by node 1",
        || {
            let v: serde_json::Value =
                serde_json::from_slice(&std::fs::read(&status).ok()?).ok()?;
            v["vms"]
                .as_array()?
                .iter()
                .any(|r| r["generation"] == 3 && r["holder"] == 1)
                .then_some(())
        },
        || {
            format!(
                "{}\n--- witness status: {}",
                c.logs(),
                std::fs::read_to_string(&status).unwrap_or_default()
            )
        },
    );
}
