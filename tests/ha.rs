//! HA mode at the process level: two `twinrun vm run --protection ha --role ...`
//! processes in their own network namespaces (`twinrun_lab::Topology`), the test guest
//! writing disk records with a flush after each (a record is durable once its `W` line
//! is printed). The pair's state comes from both ends' control sockets.
//!
//! `sigkill_primary_boot_on_survivor_failback_and_again`: protected (the standby's
//! replica in sync), SIGKILL the primary: the standby boots the guest from its replica
//! and every record flushed before the kill is intact there; the old primary returns
//! as the standby and is resynced with a delta; SIGKILL the survivor: the returned PM
//! boots the guest from its replica, every flushed record intact.
mod common;

use std::time::{Duration, Instant};

use common::pair::{failed_over, listening, protected, wait_console, PairFiles, Pm};
use common::{require_kvm, topology};
use twinrun_lab::console::{check_disk_records, read as read_console, written_seqs};
use twinrun_lab::Topology;

const CLUSTER: &str = "ha-test";

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

const EXTRA: &[&str] = &["--protection", "ha", "--cluster-id", CLUSTER];

/// Console lines starting with `BOOT`.
fn boots(console: &[u8]) -> usize {
    String::from_utf8_lossy(console)
        .lines()
        .filter(|l| l.starts_with("BOOT"))
        .count()
}

/// Waits until the console holds at least `n` BOOT lines and `w` more `W` lines than
/// `after`, while `pm` runs.
fn wait_records(files: &PairFiles, pm: &mut Pm, n_boots: usize, after: usize, w: usize) {
    let t0 = Instant::now();
    loop {
        let c = read_console(&files.console);
        if boots(&c) >= n_boots && written_seqs(&c).len() >= after + w {
            return;
        }
        assert!(pm.alive(), "the {} exited:\n{}", pm.role, pm.tail(40));
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "no {w} new disk records within 60 s; {} stderr:\n{}",
            pm.role,
            pm.tail(40)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Every record whose `W` line the console shows is intact on `img`.
fn check_replica(files: &PairFiles, img: usize, tag: &str) -> usize {
    let seqs = written_seqs(&read_console(&files.console));
    assert!(!seqs.is_empty(), "{tag}: no disk record was written");
    let data = std::fs::read(&files.disks[img]).unwrap();
    check_disk_records(&data, &seqs)
        .unwrap_or_else(|e| panic!("{tag}: replica pm{}: {e}", img + 1));
    seqs.len()
}

#[test]
fn sigkill_primary_boot_on_survivor_failback_and_again() {
    require_kvm();
    let dir = tempfile::tempdir().unwrap();
    let topo = topology(Topology::builder());
    let files = PairFiles::new(dir.path());

    // pm2 standby, pm1 primary.
    let mut pm2 = Pm::spawn_with(&topo, &files, 1, WORKLOAD, EXTRA);
    pm2.wait_status("listening", Duration::from_secs(30), listening)
        .unwrap_or_else(|e| panic!("{e}"));
    let mut pm1 = Pm::spawn_with(&topo, &files, 0, WORKLOAD, EXTRA);
    pm1.wait_status("protected", Duration::from_secs(60), protected)
        .unwrap_or_else(|e| panic!("{e}\nstandby:\n{}", pm2.tail(30)));
    let st = pm1.status_now();
    assert!(st.vm_running && st.failover.is_none(), "{st:?}");
    assert_eq!(st.protection, "ha");
    assert_eq!(pm2.status_now().protection, "ha");
    assert!(!pm2.status_now().vm_running, "an HA standby runs no guest");
    wait_console(&files.console, "BOOT", Duration::from_secs(30), &mut pm1).unwrap();
    wait_records(&files, &mut pm1, 1, 0, 20);

    // 1. SIGKILL the primary: the standby boots the guest from its replica.
    pm1.kill();
    let killed = Instant::now();
    let flushed = check_replica(&files, 1, "right after the kill");
    pm2.wait_status("failed over", Duration::from_secs(30), failed_over)
        .unwrap_or_else(|e| panic!("{e}"));
    wait_records(&files, &mut pm2, 2, 0, 0);
    eprintln!(
        "HA: {flushed} records flushed before the kill; the guest booted again on pm2 {:?} after it",
        killed.elapsed()
    );
    let st = pm2.status_now();
    assert!(st.vm_running, "{st:?}");
    assert_eq!(st.role, twinrun_control::FtRole::Primary);
    // The guest runs on the replica, which holds every record flushed before the kill.
    check_replica(&files, 1, "after the takeover");

    // 2. The old primary returns as the standby: resynced with a delta, protected.
    let mut pm1 = Pm::spawn_as(&topo, &files, 0, "standby", WORKLOAD, EXTRA);
    pm2.wait_status("protected again", Duration::from_secs(60), protected)
        .unwrap_or_else(|e| panic!("{e}\nreturning standby:\n{}", pm1.tail(30)));
    assert!(
        pm2.stderr().contains(": Delta:"),
        "the returning standby was not resynced with a delta:\n{}",
        pm2.tail(40)
    );
    let before = written_seqs(&read_console(&files.console)).len();
    wait_records(&files, &mut pm2, 2, before, 20);

    // 3. A second failover: SIGKILL the survivor; pm1 boots the guest from its replica.
    pm2.kill();
    let flushed = check_replica(&files, 0, "right after the second kill");
    pm1.wait_status("failed over", Duration::from_secs(30), failed_over)
        .unwrap_or_else(|e| panic!("{e}"));
    wait_records(&files, &mut pm1, 3, 0, 0);
    check_replica(&files, 0, "after the second takeover");
    eprintln!("HA: second failover: {flushed} records intact on pm1");
}
