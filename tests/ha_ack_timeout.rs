//! HA ack timeout at the process level: an HA standby that stays reachable (its A-Link
//! heartbeats go on) but stops acknowledging mirrored writes, by the standby's fault
//! hook (`TWINRUN_HA_FAULT_STALL_ACKS`: its write stream is not read for a while). The
//! primary, with a short ack timeout (`TWINRUN_HA_ACK_TIMEOUT_MS`), declares it failed:
//! the event is logged, the disks are degraded with the reason in the status, and the
//! guest's flushed writes go on while the standby still stalls (no quorum here: the
//! writes may complete alone at once). Once the standby reads again, a new disk
//! session on the same link resyncs it by a delta and the pair is protected again; a
//! SIGKILL of the primary then boots the guest from the standby's replica with every
//! flushed record intact.
//!
//! With a witness (`..._with_a_witness_...`): the writes complete alone only once the
//! witness recorded the standby outdated (the primary's quorum gate is `free` while
//! the standby is still reachable), and the gate is `acked` again after the resync.
//!
//! Its own binary: the two variables are set for this process's children only.
mod common;

use std::time::{Duration, Instant};

use common::pair::{failed_over, listening, protected, wait_console, PairFiles, Pm};
use common::quorum::QuorumPair;
use common::{require_kvm, topology};
use twinrun_lab::console::{check_disk_records, read as read_console, written_seqs};
use twinrun_lab::Topology;

const WORKLOAD: &[&str] = &[
    "--mem-mib",
    "64",
    "--workload",
    "counter,disk",
    "--counter-rate",
    "200",
    "--disk-rate",
    "200",
    "--disk-flush-every",
    "1",
];

const EXTRA: &[&str] = &["--protection", "ha", "--cluster-id", "ha-ack-timeout"];

/// The primary's ack timeout in this test, and how long the standby stalls (well
/// beyond it, so that the guest's writes must go on while it stalls).
const ACK_TIMEOUT_MS: &str = "3000";
const STALL: &str = "40:12000";

const FAILED: &str = "HA primary: the standby is declared FAILED";

/// Waits until the standby's stall begins, then until the primary declares it failed
/// (a declaration before the stall, by a load spike beyond the ack timeout, is not the
/// one this test is about: the one after the stall's start is waited for).
fn declared_failed_during_the_stall(primary: &mut Pm, standby: &mut Pm) {
    standby
        .wait_log("FAULT HOOK: not acknowledging", Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("{e}\nprimary:\n{}", primary.tail(30)));
    let before = primary.stderr().matches(FAILED).count();
    let t0 = Instant::now();
    while primary.stderr().matches(FAILED).count() == before {
        assert!(primary.alive(), "the primary exited:\n{}", primary.tail(40));
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "the primary did not declare the stalled standby failed:\n{}\nstandby:\n{}",
            primary.tail(40),
            standby.tail(30)
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(
        !standby.stderr().contains("FAULT HOOK: acknowledging again"),
        "declared failed only after the stall:\n{}",
        standby.tail(30)
    );
}

fn records(files: &PairFiles) -> usize {
    written_seqs(&read_console(&files.console)).len()
}

/// Waits (deadline 60 s) until the console shows `n` more records than `after`.
fn wait_records(files: &PairFiles, pm: &mut Pm, after: usize, n: usize) {
    let t0 = Instant::now();
    while records(files) < after + n {
        assert!(pm.alive(), "the {} exited:\n{}", pm.role, pm.tail(40));
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "no {n} new disk records within 60 s; {} stderr:\n{}",
            pm.role,
            pm.tail(40)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The two variables, for the children of this test's process (nextest runs each test
/// in its own process).
fn fault_env() {
    std::env::set_var("TWINRUN_HA_ACK_TIMEOUT_MS", ACK_TIMEOUT_MS);
    std::env::set_var("TWINRUN_HA_FAULT_STALL_ACKS", STALL);
}

#[test]
fn a_standby_that_stops_acknowledging_is_declared_failed_and_resynced_by_a_delta() {
    require_kvm();
    fault_env();
    let dir = tempfile::tempdir().unwrap();
    let topo = topology(Topology::builder());
    let files = PairFiles::new(dir.path());

    let mut pm2 = Pm::spawn_with(&topo, &files, 1, WORKLOAD, EXTRA);
    pm2.wait_status("listening", Duration::from_secs(30), listening)
        .unwrap_or_else(|e| panic!("{e}"));
    let mut pm1 = Pm::spawn_with(&topo, &files, 0, WORKLOAD, EXTRA);
    pm1.wait_status("protected", Duration::from_secs(60), protected)
        .unwrap_or_else(|e| panic!("{e}\nstandby:\n{}", pm2.tail(30)));
    wait_console(&files.console, "BOOT", Duration::from_secs(30), &mut pm1).unwrap();

    // The standby stalls after 40 batches; the primary declares it failed.
    declared_failed_during_the_stall(&mut pm1, &mut pm2);
    // The status says so, beside the degraded disk (until the standby is in sync).
    pm1.wait_status("degraded with the reason", Duration::from_secs(5), |s| {
        s.disks
            .iter()
            .any(|d| d.kind == "degraded" && d.state.contains("standby declared failed"))
    })
    .unwrap_or_else(|e| panic!("{e}"));
    // The guest's flushed writes go on while the standby still stalls.
    let before = records(&files);
    wait_records(&files, &mut pm1, before, 20);
    assert!(
        !pm2.stderr().contains("FAULT HOOK: acknowledging again"),
        "the writes went on only once the standby acknowledged again:\n{}",
        pm2.tail(30)
    );

    // It reads again: a new disk session resyncs it by a delta; protected again.
    pm2.wait_log("starts a new disk session", Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("{e}\nprimary:\n{}", pm1.tail(30)));
    pm1.wait_status("protected again", Duration::from_secs(60), |s| {
        protected(s) && s.disks.iter().all(|d| d.kind == "protected")
    })
    .unwrap_or_else(|e| panic!("{e}\nstandby:\n{}", pm2.tail(30)));
    let log = pm1.stderr();
    let resync = log
        .lines()
        .rfind(|l| l.contains(": Delta:") || l.contains(": Full:"))
        .unwrap_or_default()
        .to_string();
    assert!(
        resync.contains(": Delta:"),
        "the failed standby was not resynced by a delta: {resync:?}\n{}",
        pm1.tail(40)
    );
    assert!(pm1
        .status_now()
        .disks
        .iter()
        .all(|d| !d.state.contains("declared failed")));
    let before = records(&files);
    wait_records(&files, &mut pm1, before, 20);

    // The replica is whole: the standby boots the guest from it with every record
    // flushed before the primary's SIGKILL.
    pm1.kill();
    let seqs = written_seqs(&read_console(&files.console));
    pm2.wait_status("failed over", Duration::from_secs(30), failed_over)
        .unwrap_or_else(|e| panic!("{e}"));
    let data = std::fs::read(&files.disks[1]).unwrap();
    check_disk_records(&data, &seqs).unwrap_or_else(|e| panic!("replica pm2: {e}"));
    eprintln!("HA ack timeout: {} records intact on pm2", seqs.len());
}

#[test]
fn with_a_witness_the_writes_go_on_once_the_witness_recorded_the_failed_standby_outdated() {
    require_kvm();
    fault_env();
    let mut qp = QuorumPair::start("hackq", 1, &["--protection", "ha"]);
    declared_failed_during_the_stall(&mut qp.primary, &mut qp.standby);
    // The standby is still reachable, yet the gate is free: the witness recorded it
    // outdated (the primary renewed its lease with the peer marked outdated).
    qp.primary
        .wait_status(
            "free gate with the standby reachable",
            Duration::from_secs(10),
            |s| {
                s.quorum
                    .as_ref()
                    .is_some_and(|q| q.gate == "free" && q.peer_reachable)
            },
        )
        .unwrap_or_else(|e| panic!("{e}\n{}", qp.standby.tail(30)));
    let before = records(&qp.files);
    wait_records(&qp.files, &mut qp.primary, before, 20);
    assert!(
        !qp.standby
            .stderr()
            .contains("FAULT HOOK: acknowledging again"),
        "the writes went on only once the standby acknowledged again:\n{}",
        qp.logs()
    );
    assert!(qp.standby.status_now().failover.is_none(), "{}", qp.logs());
    // Resynced (a delta) and protected again; the gate follows the acknowledgements.
    qp.primary
        .wait_status("protected again", Duration::from_secs(60), |s| {
            protected(s)
                && s.disks.iter().all(|d| d.kind == "protected")
                && s.quorum.as_ref().is_some_and(|q| q.gate == "acked")
        })
        .unwrap_or_else(|e| panic!("{e}\n{}", qp.logs()));
    let log = qp.primary.stderr();
    let resync = log
        .lines()
        .rfind(|l| l.contains(": Delta:") || l.contains(": Full:"))
        .unwrap_or_default()
        .to_string();
    assert!(resync.contains(": Delta:"), "{resync:?}\n{}", qp.logs());
}
