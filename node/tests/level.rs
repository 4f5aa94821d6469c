//! Changing a running VM's protection level (`twinrun vm set VM --protection`, issue 15
//! item 4) with real daemons, VMMs and a `twinrun witness`: two `twinrund` in PM
//! namespaces (`twinrun_lab::Topology` with a management network and one witness), an
//! unprotected VM of the test guest (kv + counter + disk) and a RESP client on ONE TCP
//! connection from the client namespace.
//!
//! - `unprotected_vm_becomes_ft_and_survives_its_node_loss`: `vm set --protection ft`
//!   under load: the same VMM (pid) becomes the FT primary (status `ft`, a quorum),
//!   pm2 starts the standby, the VM shows protected; then pm1's daemon and VMM are
//!   SIGKILLed: the VM goes on on pm2 on the same connection, and no acknowledged write
//!   is lost (`check_load`).
//! - `ft_to_unprotected_and_back_online`: unprotected -> FT -> unprotected -> FT under
//!   load, always the same VMM on pm1: going unprotected stops pm2's standby, the VMM's
//!   status says `unprotected` with no quorum, and its log has no quorum warning; back
//!   to FT it is protected again. The client's connection survives, nothing is lost.
//! - `unprotected_to_ha_to_ft_under_load_then_node_loss`: unprotected -> HA -> FT under
//!   load, the same VMM on pm1 throughout: at HA its status says `ha` with a quorum,
//!   pm2 runs an HA standby and the VM shows protected only with it (never before);
//!   at FT pm2's HA standby has been replaced by an FT standby (another process) and
//!   the VM is protected again; then pm1's daemon and VMM are SIGKILLed: pm2's FT
//!   standby takes over (the witness's grant) on the same connection, nothing
//!   acknowledged lost.
//! - `ft_to_ha_to_unprotected_online`: unprotected -> FT -> HA -> unprotected under
//!   load, the same VMM on pm1 throughout: at HA (from FT: the quorum client runs on,
//!   HA's hooks installed) pm2 runs a new HA standby and the VM is protected; back to
//!   unprotected the standby is stopped, the status says `unprotected` with no quorum.
//!   Nothing acknowledged is lost, the connection survives.
//! - `daemon_killed_during_ha_to_ft_goes_on_from_the_vmms_level`: an HA VM (changed
//!   online from unprotected) is set to FT and pm1's daemon is SIGKILLed right after
//!   the command's answer, then started again: wherever the kill landed (before its
//!   VMM took the change or after), the new daemon reads the level from the adopted
//!   VMM's status and the change completes: the same VMM at FT, an FT standby on pm2,
//!   protected, nothing acknowledged lost.
//!
//! The tests of this file share names (namespaces, TAPs): run them with
//! `--test-threads 1`.
mod common;

use std::time::Duration;

use common::lab_cluster::{vmm_pids, LabCluster};
use common::wait_for;
use twinrun_lab::kvload::LoadClient;
use twinrun_lab::verdict::{check_load, Expect};
use twinrund::model::{Protection, Role, VmSettings, VmState};

const VM: &str = "lvl";

type Cluster = LabCluster;

impl Cluster {
    fn start() -> Cluster {
        LabCluster::launch("lv", VM, true)
    }

    /// `vm set VM --protection to`, asked of node `i`; the answer's message.
    fn set_level(&self, i: usize, to: Protection) -> String {
        let r = self.api(i, move |c| {
            let s = VmSettings {
                protection: Some(to),
                ..Default::default()
            };
            c.set(VM, &s, None).map_err(|e| e.to_string())
        });
        let r = r.unwrap_or_else(|e| panic!("vm set --protection {to}: {e}\n{}", self.logs()));
        format!("{r:?}")
    }

    /// The VMM of the VM on node `i` (from that node's view): (role, pid).
    fn vmm_on(&self, i: usize) -> Option<(Role, u32)> {
        let node = format!("pm{}", i + 1);
        self.view(i)?
            .vmms
            .iter()
            .find(|m| m.node == node)
            .map(|m| (m.role, m.pid))
    }

    /// The control socket's FT status of the VMM on node `i`.
    fn ft_status(&self, i: usize) -> Option<twinrun_control::FtStatus> {
        twinrun_control::ft_status(&self.dirs[i].join(format!("run/vmm/{VM}.sock")))
    }

    fn wait_protected(&self, what: &str) {
        wait_for(
            Duration::from_secs(120),
            what,
            || {
                let v = self.view(0)?;
                (v.state == VmState::Protected).then_some(())
            },
            || format!("{:?}\n{}", self.view(0), self.logs()),
        );
    }

    /// Waits until pm1's VMM runs at `level` with the VM protected by a new standby on
    /// pm2 (not the process `old_standby`) that runs at `level` too.
    fn wait_new_standby(&self, level: &str, old_standby: u32, what: &str) {
        wait_for(
            Duration::from_secs(120),
            what,
            || {
                let st = self.ft_status(0)?;
                let v = self.view(0)?;
                let standby = self.vmm_on(1)?;
                (st.protection == level
                    && v.state == VmState::Protected
                    && standby.0 == Role::Standby
                    && standby.1 != old_standby
                    && self.ft_status(1)?.protection == level)
                    .then_some(())
            },
            || {
                format!(
                    "{:?}\n{:?}\n{}",
                    self.ft_status(0),
                    self.view(0),
                    self.logs()
                )
            },
        );
    }
}

impl Cluster {
    /// The cluster with the unprotected VM on pm1 and a client with 100 writes
    /// acknowledged.
    fn under_load() -> (Cluster, LoadClient) {
        let c = Cluster::start();
        c.create_kv_vm("unprotected");
        let client = c.client("lvl-counter");
        client
            .wait_acks(100, Duration::from_secs(30))
            .unwrap_or_else(|e| panic!("{e}\n{}", c.logs()));
        (c, client)
    }
}

/// The lines of `log` that hold any of `what` (printed as the run's evidence).
fn lines(log: &str, what: &[&str]) -> String {
    log.lines()
        .filter(|l| what.iter().any(|w| l.contains(w)))
        .collect::<Vec<_>>()
        .join("\n")
}

/// SIGKILL of pm1's daemon and VMM; returns both VMMs' logs once pm2 owns the VM and
/// the client's writes are acknowledged again.
fn kill_pm1_and_wait_for_the_takeover(c: &mut Cluster, client: &LoadClient) -> (String, String) {
    c.daemons[0].kill();
    for p in vmm_pids(&c.dirs[0]) {
        // SAFETY: kill(2) of the VMM this test's pm1 daemon started.
        unsafe { libc::kill(p, libc::SIGKILL) };
    }
    wait_for(
        Duration::from_secs(60),
        "the VM taken over on pm2",
        || {
            let v = c.view(1)?;
            (v.owner.as_deref() == Some("pm2")).then_some(())
        },
        || format!("{:?}\n{}", c.view(1), c.logs()),
    );
    client
        .wait_acks(100, Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("after pm1's loss: {e}\n{}", c.logs()));
    (c.vmm_log(0), c.vmm_log(1))
}

fn finish(c: &Cluster, client: LoadClient, what: &str) {
    let rep = client.finish().unwrap();
    let expect = Expect {
        dirty_passes: false,
        ..Expect::MOVED
    };
    let cc = check_load(&rep, &c.console_stream(), expect)
        .unwrap_or_else(|e| panic!("{what}: {e}\n{}", c.logs()));
    eprintln!(
        "{what}: {} writes acknowledged; console: {} W records, no gap or duplicate",
        rep.sets_acked.len() as u64 + rep.incrs_acked as u64,
        cc.w_seqs.len()
    );
}

#[test]
fn unprotected_vm_becomes_ft_and_survives_its_node_loss() {
    let (c, client) = Cluster::under_load();
    let (role, pid) = c.vmm_on(0).expect("the VMM on pm1");
    assert_eq!(role, Role::Solo);
    assert_eq!(
        c.ft_status(0).map(|s| s.protection),
        Some("unprotected".into())
    );

    let answer = c.set_level(1, Protection::Ft);
    assert!(answer.contains("no reboot"), "{answer}");
    c.wait_protected("the VM protected after vm set --protection ft");
    let (role, same) = c.vmm_on(0).expect("the VMM on pm1");
    assert_eq!(
        (role, same),
        (Role::Primary, pid),
        "the same VMM, now the primary"
    );
    let st = c.ft_status(0).expect("status of pm1's VMM");
    assert_eq!(st.protection, "ft");
    assert!(st.quorum.is_some(), "the FT primary runs its quorum client");
    assert!(
        c.vmm_on(1).is_some_and(|(r, _)| r == Role::Standby),
        "{:?}",
        c.view(1)
    );
    client
        .wait_acks(100, Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("protected: {e}\n{}", c.logs()));

    // pm1 dies: its daemon and its VMM, SIGKILL.
    let mut c = c;
    let (pm1, pm2) = kill_pm1_and_wait_for_the_takeover(&mut c, &client);
    assert!(
        pm1.contains("protection level changed online: unprotected -> ft"),
        "{pm1}"
    );
    assert!(!pm1.contains("WITHOUT QUORUM"), "{pm1}");
    eprintln!(
        "pm1 VMM:\n{}\npm2 VMM:\n{}",
        lines(
            &pm1,
            &[
                "level change",
                "quorum: backend",
                "FT primary: protected",
                "PAUSED",
                "resumed"
            ]
        ),
        lines(&pm2, &["GRANTED", "failover complete"])
    );
    assert!(pm2.contains("failover complete"), "{pm2}");
    finish(&c, client, "unprotected -> ft, then pm1 lost");
}

#[test]
fn ft_to_unprotected_and_back_online() {
    let (c, client) = Cluster::under_load();
    let (_, pid) = c.vmm_on(0).expect("the VMM on pm1");
    c.set_level(0, Protection::Ft);
    c.wait_protected("protected (first time)");

    let answer = c.set_level(0, Protection::Unprotected);
    assert!(answer.contains("no reboot"), "{answer}");
    wait_for(
        Duration::from_secs(60),
        "the VMM on pm1 unprotected, no standby on pm2",
        || {
            let st = c.ft_status(0)?;
            let alone = c.view(0)?.vmms.len() == 1;
            (st.protection == "unprotected" && st.quorum.is_none() && alone).then_some(())
        },
        || format!("{:?}\n{:?}\n{}", c.ft_status(0), c.view(0), c.logs()),
    );
    assert_eq!(
        c.vmm_on(0),
        Some((Role::Solo, pid)),
        "the same VMM runs on alone"
    );
    assert!(c.vmm_on(1).is_none(), "{:?}", c.view(1));
    client
        .wait_acks(100, Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("unprotected again: {e}\n{}", c.logs()));
    let log = c.vmm_log(0);
    assert!(!log.contains("WITHOUT QUORUM"), "a quorum warning:\n{log}");
    assert!(
        log.contains("protection level changed online: ft -> unprotected"),
        "{log}"
    );
    eprintln!(
        "pm1 VMM:\n{}",
        lines(
            &log,
            &[
                "level change",
                "lease",
                "dirty logging",
                "quorum: backend",
                "PAUSED",
                "resumed"
            ]
        )
    );

    c.set_level(0, Protection::Ft);
    c.wait_protected("protected again");
    assert_eq!(
        c.vmm_on(0),
        Some((Role::Primary, pid)),
        "still the same VMM"
    );
    client
        .wait_acks(100, Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("ft again: {e}\n{}", c.logs()));
    finish(&c, client, "unprotected -> ft -> unprotected -> ft");
    drop(c);
}

#[test]
fn unprotected_to_ha_to_ft_under_load_then_node_loss() {
    let (c, client) = Cluster::under_load();
    let (role, pid) = c.vmm_on(0).expect("the VMM on pm1");
    assert_eq!(role, Role::Solo);

    // unprotected -> HA, asked of pm2.
    let answer = c.set_level(1, Protection::Ha);
    assert!(answer.contains("no reboot"), "{answer}");
    wait_for(
        Duration::from_secs(120),
        "the VM protected at HA (pm2's HA standby in sync)",
        || {
            let v = c.view(0)?;
            if v.state == VmState::Protected {
                // Never protected without the standby.
                assert!(
                    v.vmms
                        .iter()
                        .any(|m| m.node == "pm2" && m.role == Role::Standby),
                    "protected with no standby on pm2: {v:?}"
                );
                return Some(());
            }
            None
        },
        || format!("{:?}\n{}", c.view(0), c.logs()),
    );
    assert_eq!(
        c.vmm_on(0),
        Some((Role::Primary, pid)),
        "the same VMM, now the HA primary"
    );
    let st = c.ft_status(0).expect("status of pm1's VMM");
    assert_eq!(st.protection, "ha");
    assert!(st.quorum.is_some(), "the HA primary runs its quorum client");
    let (srole, ha_standby) = c.vmm_on(1).expect("pm2's standby");
    assert_eq!(srole, Role::Standby);
    assert_eq!(c.ft_status(1).map(|s| s.protection), Some("ha".into()));
    client
        .wait_acks(100, Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("at HA: {e}\n{}", c.logs()));

    // HA -> FT, asked of pm1.
    let answer = c.set_level(0, Protection::Ft);
    assert!(answer.contains("no reboot"), "{answer}");
    c.wait_new_standby(
        "ft",
        ha_standby,
        "the VM protected at FT by a new (FT) standby on pm2",
    );
    assert_eq!(
        c.vmm_on(0),
        Some((Role::Primary, pid)),
        "still the same VMM"
    );
    assert_eq!(c.ft_status(1).map(|s| s.protection), Some("ft".into()));
    client
        .wait_acks(100, Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("at FT: {e}\n{}", c.logs()));

    // pm1 dies: its daemon and its VMM, SIGKILL.
    let mut c = c;
    let (pm1, pm2) = kill_pm1_and_wait_for_the_takeover(&mut c, &client);
    for change in ["unprotected -> ha", "ha -> ft"] {
        assert!(
            pm1.contains(&format!("protection level changed online: {change}")),
            "{pm1}"
        );
    }
    assert!(!pm1.contains("WITHOUT QUORUM"), "{pm1}");
    eprintln!(
        "pm1 VMM:\n{}\npm2 VMM:\n{}",
        lines(
            &pm1,
            &[
                "level change",
                "quorum: backend",
                "HA primary: protected",
                "HA primary: resync done",
                "FT primary: protected",
                "disk resync of the session",
                "PAUSED",
                "resumed"
            ]
        ),
        lines(&pm2, &["GRANTED", "failover complete"])
    );
    assert!(pm2.contains("failover complete"), "{pm2}");
    finish(&c, client, "unprotected -> ha -> ft, then pm1 lost");
}

#[test]
fn ft_to_ha_to_unprotected_online() {
    let (c, client) = Cluster::under_load();
    let (_, pid) = c.vmm_on(0).expect("the VMM on pm1");
    c.set_level(0, Protection::Ft);
    c.wait_protected("protected at FT");
    let (_, ft_standby) = c.vmm_on(1).expect("pm2's FT standby");

    let answer = c.set_level(1, Protection::Ha);
    assert!(answer.contains("no reboot"), "{answer}");
    c.wait_new_standby(
        "ha",
        ft_standby,
        "the VM protected at HA by a new (HA) standby on pm2",
    );
    assert_eq!(
        c.vmm_on(0),
        Some((Role::Primary, pid)),
        "the same VMM at HA"
    );
    assert!(c.ft_status(0).and_then(|s| s.quorum).is_some());
    client
        .wait_acks(100, Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("at HA: {e}\n{}", c.logs()));

    let answer = c.set_level(0, Protection::Unprotected);
    assert!(answer.contains("no reboot"), "{answer}");
    wait_for(
        Duration::from_secs(60),
        "the VMM on pm1 unprotected, no standby on pm2",
        || {
            let st = c.ft_status(0)?;
            let alone = c.view(0)?.vmms.len() == 1;
            (st.protection == "unprotected" && st.quorum.is_none() && alone).then_some(())
        },
        || format!("{:?}\n{:?}\n{}", c.ft_status(0), c.view(0), c.logs()),
    );
    assert_eq!(
        c.vmm_on(0),
        Some((Role::Solo, pid)),
        "the same VMM runs on alone"
    );
    client
        .wait_acks(100, Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("unprotected again: {e}\n{}", c.logs()));
    let log = c.vmm_log(0);
    for change in ["unprotected -> ft", "ft -> ha", "ha -> unprotected"] {
        assert!(
            log.contains(&format!("protection level changed online: {change}")),
            "{log}"
        );
    }
    assert!(!log.contains("WITHOUT QUORUM"), "a quorum warning:\n{log}");
    eprintln!(
        "pm1 VMM:\n{}",
        lines(
            &log,
            &[
                "level change",
                "HA primary: protected",
                "lease",
                "PAUSED",
                "resumed"
            ]
        )
    );
    finish(&c, client, "unprotected -> ft -> ha -> unprotected");
}

#[test]
fn daemon_killed_during_ha_to_ft_goes_on_from_the_vmms_level() {
    let (c, client) = Cluster::under_load();
    let (_, pid) = c.vmm_on(0).expect("the VMM on pm1");
    c.set_level(0, Protection::Ha);
    wait_for(
        Duration::from_secs(120),
        "protected at HA",
        || {
            let v = c.view(0)?;
            (v.state == VmState::Protected && c.ft_status(0)?.protection == "ha").then_some(())
        },
        || format!("{:?}\n{}", c.view(0), c.logs()),
    );
    let (_, ha_standby) = c.vmm_on(1).expect("pm2's HA standby");

    let mut c = c;
    let answer = c.set_level(0, Protection::Ft);
    assert!(answer.contains("no reboot"), "{answer}");
    c.daemons[0].kill();
    let at_kill = c.ft_status(0).map(|s| s.protection);
    c.restart_daemon(0);
    c.wait_new_standby(
        "ft",
        ha_standby,
        "the change completed by the restarted daemon: FT, a new FT standby, protected",
    );
    assert_eq!(
        c.vmm_on(0),
        Some((Role::Primary, pid)),
        "the same VMM, adopted"
    );
    client
        .wait_acks(100, Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("at FT: {e}\n{}", c.logs()));
    let daemon = std::fs::read_to_string(c.dirs[0].join("twinrund.log")).unwrap_or_default();
    eprintln!(
        "pm1's VMM at the kill: {at_kill:?}\nrestarted pm1 daemon:\n{}",
        lines(&daemon, &["adopted", "level"])
    );
    finish(
        &c,
        client,
        "ha -> ft with pm1's daemon killed and restarted mid-change",
    );
}
