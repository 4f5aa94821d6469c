//! Disk mirroring of a real pair (two `twinrun vm run --role` processes in network
//! namespaces, real image files):
//!
//! - `delta_resync_after_the_standby_returns`: the first session copies the whole disk
//!   (no metadata yet); the standby is SIGKILLed and the primary runs on degraded,
//!   recording written blocks; the standby comes back and gets a delta of only the
//!   recorded blocks; once the guest's disk workload ends, both images are
//!   byte-identical and every record is intact.
//! - `interrupted_resync_resumes`: a rate-limited full resync is cut by SIGKILL of the
//!   standby; its metadata says inconsistent (never promotable); the next standby
//!   resumes from what was left (a delta, not a new full copy) and converges.
//!
//! The pair's state (listening, protected, degraded, failed disk, failover, a refused
//! standby) comes from the control sockets; the resync plan of a session (full or
//! delta) and the bytes it copied from the primary's log, the only place the disk
//! session reports them while the session runs.
mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::pair::{degraded, disk_failed, failed_over, listening, PairFiles, Pm, DISK_BYTES};
use common::{require_kvm, topology};
use storage_mirror::meta::{MetaState, MetaStore};
use twinrun_lab::console::{check_disk_records, read as read_console, written_seqs};
use twinrun_lab::Topology;

const RESYNC_DONE: &str = "primary: disk resync done: ";

/// A fresh pair's namespaces and files (disks resized to `bytes` if given).
fn setup(bytes: Option<u64>) -> (tempfile::TempDir, Topology, PairFiles) {
    require_kvm();
    // Control sockets (`--name`) and block devices' metadata go to this process's own
    // directories, removed when it exits.
    common::private_dirs();
    let dir = tempfile::tempdir().unwrap();
    let topo = topology(Topology::builder());
    let files = PairFiles::new(dir.path());
    if let Some(b) = bytes {
        for d in &files.disks {
            std::fs::OpenOptions::new()
                .write(true)
                .open(d)
                .unwrap()
                .set_len(b)
                .unwrap();
        }
    }
    (dir, topo, files)
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// The standby on PM2, listening.
fn start_standby(topo: &Topology, files: &PairFiles, wl: &[&str], extra: &[&str]) -> Pm {
    let mut s = Pm::spawn_with(topo, files, 1, wl, extra);
    s.wait_status("listening", Duration::from_secs(30), listening)
        .unwrap();
    s
}

/// Starts a pair whose first (full, rate-limited) resync is under way for 1.5 s.
fn full_resync_under_way(
    topo: &Topology,
    files: &PairFiles,
    wl: &[&str],
    extra: &[&str],
) -> (Pm, Pm) {
    let standby = start_standby(topo, files, wl, extra);
    let mut primary = Pm::spawn_with(topo, files, 0, wl, extra);
    primary
        .wait_status("copying a full resync", Duration::from_secs(30), |s| {
            s.disks
                .iter()
                .any(|d| d.kind == "syncing" && d.resync.is_some_and(|r| r.full))
        })
        .unwrap_or_else(|e| panic!("{e}"));
    std::thread::sleep(Duration::from_millis(1500));
    (standby, primary)
}

/// The last session of `primary` resumed a resync of a `disk_bytes` disk with a delta
/// instead of a new full copy.
fn assert_resumed_with_delta(primary: &Pm, disk_bytes: u64) {
    assert!(
        primary
            .stderr()
            .lines()
            .any(|l| l.contains("primary: disk ") && l.contains("Delta")),
        "resumed with a delta, not a new full copy\n{}",
        tail(primary)
    );
    let copied = resyncs(primary).last().unwrap().1;
    assert!(
        copied < disk_bytes,
        "resumed, not restarted: {copied} bytes copied"
    );
}

/// Starts a protected pair whose primary serves the control socket of a VM named
/// `dm-<tag>-<pid>`; returns the name, the standby and the primary.
fn named_pair(topo: &Topology, files: &PairFiles, wl: &[&str], tag: &str) -> (String, Pm, Pm) {
    let name = format!("dm-{tag}-{}", std::process::id());
    let (standby, primary) = protected_pair(topo, files, wl, &["--name", &name]);
    (name, standby, primary)
}

/// Starts a pair (10 ms epochs; `pextra` for the primary only) and waits until it is
/// protected; returns the standby and the primary.
fn protected_pair(topo: &Topology, files: &PairFiles, wl: &[&str], pextra: &[&str]) -> (Pm, Pm) {
    let extra = ["--epoch-ms", "10"];
    let standby = start_standby(topo, files, wl, &extra);
    let mut pargs = extra.to_vec();
    pargs.extend_from_slice(pextra);
    let mut primary = Pm::spawn_with(topo, files, 0, wl, &pargs);
    wait_protected(&mut primary, &standby, 1, "first session");
    (standby, primary)
}

/// Once the guest wrote its last record (`limit - 1`) on `running`'s side: both images
/// are equal and `check`'s image holds every record the guest saw durable.
fn assert_converged(files: &PairFiles, limit: u64, running: &mut Pm, other: &Pm, check: usize) {
    wait_last_record(&files.console, limit - 1, Duration::from_secs(60), running);
    assert_images_equal(files, running, other);
    let img = std::fs::read(&files.disks[check]).unwrap();
    check_disk_records(&img, &written_seqs(&read_console(&files.console)))
        .unwrap_or_else(|e| panic!("image {check}: {e}"));
}

/// Waits for the `n`-th protection of `p` (60 s at most).
fn wait_protected(p: &mut Pm, other: &Pm, n: u64, why: &str) {
    p.wait_status(
        &format!("protected {n} time(s)"),
        Duration::from_secs(60),
        |s| s.protections >= n,
    )
    .unwrap_or_else(|e| panic!("{why}: {e}\n--- {}:\n{}", other.role, tail(other)));
}

/// Times `p` was protected so far.
fn protections(p: &Pm) -> u64 {
    p.status_now().protections
}

/// Runs the `twinrun` CLI.
fn twinrun(args: &[&str]) -> std::process::Output {
    std::process::Command::new(common::twinrun_bin())
        .args(args)
        .output()
        .unwrap()
}

/// Counter keeps the guest alive after the disk workload's last record.
fn workload(limit: u64, rate: u32) -> Vec<String> {
    [
        "--mem-mib",
        "64",
        "--workload",
        "counter,disk",
        "--counter-rate",
        "100",
        "--disk-flush-every",
        "1",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([
        "--disk-rate".to_string(),
        rate.to_string(),
        "--disk-limit".to_string(),
        limit.to_string(),
    ])
    .collect()
}

fn tail(p: &Pm) -> String {
    p.tail(40)
}

/// `(chunks, bytes)` of each "disk resync done" line, in order.
fn resyncs(p: &Pm) -> Vec<(u64, u64)> {
    p.stderr()
        .lines()
        .filter_map(|l| {
            let rest = &l[l.find(RESYNC_DONE)? + RESYNC_DONE.len()..];
            let mut it = rest
                .split(|c: char| !c.is_ascii_digit())
                .filter(|s| !s.is_empty());
            Some((it.next()?.parse().ok()?, it.next()?.parse().ok()?))
        })
        .collect()
}

fn wait_last_record(console: &Path, last: u64, timeout: Duration, p: &mut Pm) {
    let t0 = Instant::now();
    while !written_seqs(&read_console(console)).contains(&last) {
        assert!(p.alive(), "the primary exited\n{}", tail(p));
        assert!(
            t0.elapsed() < timeout,
            "record {last} not written within {timeout:?}\n{}",
            tail(p)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Both images equal (the guest no longer writes; every epoch since is committed).
fn assert_images_equal(files: &PairFiles, primary: &Pm, standby: &Pm) {
    // Epochs keep committing; give the last disk writes' epoch time to be applied.
    let t0 = Instant::now();
    loop {
        let a = std::fs::read(&files.disks[0]).unwrap();
        let b = std::fs::read(&files.disks[1]).unwrap();
        if a == b {
            return;
        }
        if t0.elapsed() > Duration::from_secs(10) {
            let differ = a
                .chunks(4096)
                .zip(b.chunks(4096))
                .enumerate()
                .filter(|(_, (x, y))| x != y)
                .map(|(i, _)| i)
                .take(20)
                .collect::<Vec<_>>();
            panic!(
                "images differ in blocks {differ:?}\n--- primary:\n{}\n--- standby:\n{}",
                tail(primary),
                tail(standby)
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn delta_resync_after_the_standby_returns() {
    let (_dir, topo, files) = setup(None);
    const LIMIT: u64 = 2000;
    let wl = workload(LIMIT, 250);
    let wl = strs(&wl);
    let extra = ["--epoch-ms", "10"];
    let (mut standby, mut primary) = protected_pair(&topo, &files, &wl, &[]);
    // No metadata existed: the standby got the whole disk.
    let first = resyncs(&primary);
    assert_eq!(first.len(), 1, "{}", tail(&primary));
    assert_eq!(first[0].1, DISK_BYTES, "first session copies the disk");

    std::thread::sleep(Duration::from_millis(800));
    standby.kill();
    primary
        .wait_status("degraded", Duration::from_secs(10), degraded)
        .unwrap_or_else(|e| panic!("{e}"));
    let at_loss = written_seqs(&read_console(&files.console));
    std::thread::sleep(Duration::from_secs(2));
    let before_return = written_seqs(&read_console(&files.console));
    let degraded_records = before_return.len() - at_loss.len();
    assert!(
        degraded_records > 100,
        "the guest kept writing ({degraded_records})"
    );

    let mut standby = Pm::spawn_with(&topo, &files, 1, &wl, &extra);
    wait_protected(&mut primary, &standby, 2, "second session");
    let log = primary.stderr();
    assert!(
        log.contains("Delta"),
        "the returning standby gets a delta\n{}",
        tail(&primary)
    );
    let all = resyncs(&primary);
    assert_eq!(all.len(), 2, "{}", tail(&primary));
    let (_, delta_bytes) = all[1];
    // Records are 512 bytes, one per sector, in order: the degraded period (plus the
    // epochs in flight at the loss and the writes during the resync) touched few
    // blocks; the delta copies those, not the disk.
    let records_since_loss = written_seqs(&read_console(&files.console)).len() - at_loss.len();
    let bound = ((records_since_loss as u64 + 64) * 512).div_ceil(4096) * 4096 + 8 * 4096;
    assert!(
        delta_bytes > 0 && delta_bytes <= bound,
        "delta copied {delta_bytes} bytes; {records_since_loss} records written since the loss (bound {bound})"
    );
    assert!(delta_bytes < DISK_BYTES / 4);

    assert_converged(&files, LIMIT, &mut primary, &standby, 1);
    // The standby's metadata says in sync: same generation as the primary, consistent.
    let meta = |p: &Path| match MetaStore::for_image(p).load().unwrap() {
        MetaState::Ok(m) => m,
        other => panic!("metadata of {}: {other:?}", p.display()),
    };
    let (pm, sm) = (meta(&files.disks[0]), meta(&files.disks[1]));
    assert!(!sm.inconsistent);
    assert_eq!(pm.current_gen, sm.current_gen);
    // Both record how far they got (the standby about once a second).
    assert!(pm.last_committed_epoch.is_some() && sm.last_committed_epoch.is_some());
    assert!(standby.alive() && primary.alive());
}

#[test]
fn interrupted_resync_resumes() {
    // A 64 MiB disk at 16 MiB/s: the first (full) resync takes about 4 s.
    let (_dir, topo, files) = setup(Some(64 << 20));
    const LIMIT: u64 = 1500;
    let wl = workload(LIMIT, 200);
    let wl = strs(&wl);
    let extra = ["--epoch-ms", "10", "--resync-rate", "16"];
    let (mut standby, mut primary) = full_resync_under_way(&topo, &files, &wl, &extra);
    standby.kill();
    assert_eq!(protections(&primary), 0, "killed mid-resync");
    // The cut replica is marked inconsistent: never promotable.
    match MetaStore::for_image(&files.disks[1]).load().unwrap() {
        MetaState::Ok(m) => assert!(m.inconsistent, "{m:?}"),
        other => panic!("standby metadata: {other:?}"),
    }
    let standby = Pm::spawn_with(&topo, &files, 1, &wl, &extra);
    wait_protected(&mut primary, &standby, 1, "resumed");
    assert_resumed_with_delta(&primary, 64 << 20);
    wait_last_record(
        &files.console,
        LIMIT - 1,
        Duration::from_secs(60),
        &mut primary,
    );
    assert_images_equal(&files, &primary, &standby);
}

/// `B read bytes=<n> ns=<n> reqs=<n> bad=<n>` -> bad.
fn blkbench_bad(console: &[u8]) -> Option<u64> {
    String::from_utf8_lossy(console).lines().find_map(|l| {
        let rest = l.strip_prefix("B read ")?;
        rest.split_whitespace()
            .find_map(|kv| kv.strip_prefix("bad="))?
            .parse()
            .ok()
    })
}

#[test]
fn primary_disk_failure_is_served_by_the_standby() {
    let (_dir, topo, files) = setup(Some(80 << 20));
    // blkbench writes 64 MiB then reads it back and counts bad blocks; the primary's
    // disk fails during the writes, so the rest of the writes, the flush and every
    // read are served through the standby's replica.
    let wl = [
        "--mem-mib",
        "64",
        "--workload",
        "blkbench,counter",
        "--counter-rate",
        "50",
        "--blkbench-mib",
        "64",
        "--blkbench-req-kib",
        "64",
    ];
    let name = format!("dm-fail-{}", std::process::id());
    let extra = ["--epoch-ms", "10"];
    let mut standby = start_standby(&topo, &files, &wl, &extra);
    let pextra = ["--epoch-ms", "10", "--name", &name];
    let mut primary = Pm::spawn_with(&topo, &files, 0, &wl, &pextra);
    let fault = |args: &[&str]| {
        let mut a = vec!["vm", "fault", "--name", &name, "--disk", "0"];
        a.extend_from_slice(args);
        twinrun(&a)
    };
    // A slow local disk first (20 ms per batch), so that blkbench is still writing
    // when the pair is protected and the disk fails.
    let t0 = Instant::now();
    while !fault(&["--delay-ms", "20"]).status.success() {
        assert!(t0.elapsed() < Duration::from_secs(10), "no control socket");
        std::thread::sleep(Duration::from_millis(20));
    }
    wait_protected(&mut primary, &standby, 1, "protected");
    let out = fault(&["--fail"]);
    assert!(
        out.status.success(),
        "twinrun vm fault: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(fault(&["--delay-ms", "0"]).status.success());
    primary
        .wait_status(
            "running on a failed local disk",
            Duration::from_secs(30),
            disk_failed,
        )
        .unwrap_or_else(|e| panic!("{e}"));
    let t0 = Instant::now();
    let bad = loop {
        let console = read_console(&files.console);
        if let Some(b) = blkbench_bad(&console) {
            break b;
        }
        assert!(
            !String::from_utf8_lossy(&console).contains("ERROR"),
            "the guest saw a disk error:\n{}",
            String::from_utf8_lossy(&console)
        );
        assert!(primary.alive(), "primary exited\n{}", tail(&primary));
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "blkbench did not finish\n{}\n--- standby:\n{}",
            tail(&primary),
            tail(&standby)
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let console = String::from_utf8_lossy(&read_console(&files.console)).to_string();
    assert_eq!(
        bad,
        0,
        "reads served by the standby were wrong:\n{}\n--- primary:\n{}\n--- standby:\n{}",
        console
            .lines()
            .filter(|l| !l.starts_with("C "))
            .collect::<Vec<_>>()
            .join("\n"),
        primary.tail(200),
        standby.tail(60)
    );
    assert!(!console.contains("ERROR"), "{console}");
    // The failed replica is marked so in its metadata (never trusted again).
    match MetaStore::for_image(&files.disks[0]).load().unwrap() {
        MetaState::Ok(m) => assert!(m.failed, "{m:?}"),
        other => panic!("primary metadata: {other:?}"),
    }
    assert!(standby.alive());
}

#[test]
fn disk_workload_survives_the_primary_disk_failure() {
    let (_dir, topo, files) = setup(None);
    const LIMIT: u64 = 1200;
    let wl = workload(LIMIT, 250);
    let wl = strs(&wl);
    let (name, mut standby, mut primary) = named_pair(&topo, &files, &wl, "wl");
    std::thread::sleep(Duration::from_millis(500));
    let out = twinrun(&["vm", "fault", "--name", &name, "--disk", "0", "--fail"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    primary
        .wait_status(
            "running on a failed local disk",
            Duration::from_secs(30),
            disk_failed,
        )
        .unwrap_or_else(|e| panic!("{e}"));
    let failed_at = written_seqs(&read_console(&files.console)).len();
    wait_last_record(
        &files.console,
        LIMIT - 1,
        Duration::from_secs(60),
        &mut primary,
    );
    let console = read_console(&files.console);
    let text = String::from_utf8_lossy(&console);
    assert!(
        !text.contains("DISK-ERROR"),
        "the guest saw a disk error:\n{text}"
    );
    let seqs = written_seqs(&console);
    assert!(
        seqs.len() - failed_at > 100,
        "records written after the failure"
    );
    // Every record the guest saw durable is on the standby's replica (the only good
    // one): kill the primary, the standby takes over with all of them.
    primary.kill();
    standby
        .wait_status("failed over", Duration::from_secs(15), failed_over)
        .unwrap_or_else(|e| panic!("{e}\n{}", tail(&standby)));
    let img = std::fs::read(&files.disks[1]).unwrap();
    check_disk_records(&img, &seqs).unwrap_or_else(|e| panic!("standby replica: {e}"));
}

#[test]
fn failback_resyncs_the_old_primary_with_a_delta() {
    let (_dir, topo, files) = setup(None);
    const LIMIT: u64 = 2000;
    let wl = workload(LIMIT, 250);
    let wl = strs(&wl);
    let extra = ["--epoch-ms", "10"];
    let (mut standby, mut primary) = protected_pair(&topo, &files, &wl, &[]);
    std::thread::sleep(Duration::from_millis(800));
    // PM1 dies; PM2 takes over and runs the VM alone, recording what it writes.
    primary.kill();
    standby
        .wait_status("failed over", Duration::from_secs(15), failed_over)
        .unwrap_or_else(|e| panic!("{e}\n{}", tail(&standby)));
    let at_failover = written_seqs(&read_console(&files.console)).len();
    std::thread::sleep(Duration::from_millis(1500));
    // PM1 comes back as the standby of the survivor.
    let old = Pm::spawn_as(&topo, &files, 0, "standby", &wl, &extra);
    wait_protected(&mut standby, &old, 1, "failback");
    let log = standby.stderr();
    assert!(
        log.lines()
            .any(|l| l.contains("primary: disk ") && l.contains("Delta")),
        "the old primary gets a delta\n{}",
        tail(&standby)
    );
    let (_, delta_bytes) = *resyncs(&standby).last().unwrap();
    let since = written_seqs(&read_console(&files.console)).len() - at_failover;
    // The survivor's writes since the failover plus the old primary's active extents
    // (4 MiB each) of its unacknowledged epochs: far less than the disk... for an 8 MiB
    // disk, at most the extents the records lie in.
    assert!(delta_bytes > 0, "{}", tail(&standby));
    assert!(
        delta_bytes <= (4 << 20) + ((since as u64 + 64) * 512).div_ceil(4096) * 4096,
        "delta of {delta_bytes} bytes"
    );
    // Images: disks[1] is the survivor's (now primary), disks[0] the old primary's.
    assert_converged(&files, LIMIT, &mut standby, &old, 0);
}

#[test]
fn online_verify_reports_and_marks_a_difference() {
    let (_dir, topo, files) = setup(None);
    const LIMIT: u64 = 300;
    let wl = workload(LIMIT, 300);
    let wl = strs(&wl);
    let (name, mut standby, mut primary) = named_pair(&topo, &files, &wl, "verify");
    wait_last_record(
        &files.console,
        LIMIT - 1,
        Duration::from_secs(60),
        &mut primary,
    );
    // Damage the standby's replica behind the pair's back (far from the records).
    let at = 6u64 << 20;
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&files.disks[1])
            .unwrap();
        f.write_all_at(&[0xAB; 4096], at).unwrap();
        f.sync_all().unwrap();
    }
    let out = twinrun(&[
        "disk",
        "verify",
        "--name",
        &name,
        "--wait",
        "--timeout-secs",
        "60",
    ]);
    assert_eq!(
        out.status.code(),
        Some(3),
        "verify finds the difference\nstdout: {}\nstderr: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        tail(&primary)
    );
    assert!(primary.stderr().contains("replicas DIFFER"));
    // Marked for resync, not repaired.
    let out = twinrun(&["disk", "status", "--name", &name, "--json"]);
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let dirty = v[0]["dirty_blocks"].as_u64().unwrap_or(0);
    assert!(dirty >= 1, "marked blocks: {v}");
    let mut byte = [0u8; 1];
    {
        use std::os::unix::fs::FileExt;
        std::fs::File::open(&files.disks[1])
            .unwrap()
            .read_exact_at(&mut byte, at)
            .unwrap();
    }
    assert_eq!(byte[0], 0xAB, "verify never repairs");
    // The next standby session copies the marked blocks: the replicas are equal again.
    standby.kill();
    primary
        .wait_status("degraded", Duration::from_secs(10), degraded)
        .unwrap_or_else(|e| panic!("{e}"));
    let standby = Pm::spawn_with(&topo, &files, 1, &wl, &["--epoch-ms", "10"]);
    wait_protected(&mut primary, &standby, 2, "after verify");
    assert_images_equal(&files, &primary, &standby);
}

#[test]
fn a_resync_cut_by_the_primary_crash_resumes() {
    let (_dir, topo, files) = setup(Some(64 << 20));
    const LIMIT: u64 = 600;
    let wl = workload(LIMIT, 200);
    let wl = strs(&wl);
    let extra = ["--epoch-ms", "10", "--resync-rate", "16"];
    let (mut standby, mut primary) = full_resync_under_way(&topo, &files, &wl, &extra);
    // The primary dies mid-resync: the standby has nothing committed to take over and
    // waits for a primary again.
    primary.kill();
    standby
        .wait_status(
            "waiting for a primary again",
            Duration::from_secs(15),
            |s| s.session >= 2,
        )
        .unwrap_or_else(|e| panic!("{e}\n{}", tail(&standby)));
    assert!(standby.alive());
    // The primary comes back: the resync resumes from its bitmap.
    let mut primary = Pm::spawn_with(&topo, &files, 0, &wl, &extra);
    wait_protected(&mut primary, &standby, 1, "resumed");
    assert_resumed_with_delta(&primary, 64 << 20);
    // The guest (rebooted on the primary's disk) keeps writing records; once done the
    // replicas are equal.
    wait_last_record(
        &files.console,
        LIMIT - 1,
        Duration::from_secs(60),
        &mut primary,
    );
    assert_images_equal(&files, &primary, &standby);
}

#[test]
fn split_brain_is_refused_until_one_side_discards_its_data() {
    let (_dir, topo, files) = setup(None);
    let wl = workload(3000, 200);
    let wl = strs(&wl);
    let (mut standby, mut primary) = protected_pair(&topo, &files, &wl, &[]);
    // Every A-Link cut with both PMs alive (no quorum witness yet): the standby takes
    // over, the primary runs on alone: both write, two copies of the disk diverge.
    for k in 0..2 {
        topo.set_alink(0, k, false).unwrap();
    }
    standby
        .wait_status("failed over", Duration::from_secs(15), failed_over)
        .unwrap_or_else(|e| panic!("{e}\n{}", tail(&standby)));
    primary
        .wait_status("degraded", Duration::from_secs(15), degraded)
        .unwrap_or_else(|e| panic!("{e}\n{}", tail(&primary)));
    std::thread::sleep(Duration::from_millis(500));
    // PM1's process is restarted as the standby of the copy running on PM2: the disks
    // have both moved on from the same generation, so no resync direction can be
    // trusted; the pair refuses and says why.
    primary.kill();
    for k in 0..2 {
        topo.set_alink(0, k, true).unwrap();
    }
    let extra = ["--epoch-ms", "10"];
    let mut old = Pm::spawn_as(&topo, &files, 0, "standby", &wl, &extra);
    standby
        .wait_status("refusing a split brain", Duration::from_secs(30), |s| {
            s.last_session
                .as_ref()
                .and_then(|l| l.refused.as_deref())
                .is_some_and(|r| r.contains("split brain"))
        })
        .unwrap_or_else(|e| panic!("{e}\n{}\n--- old primary:\n{}", tail(&standby), tail(&old)));
    let t0 = Instant::now();
    while old.alive() {
        assert!(
            t0.elapsed() < Duration::from_secs(15),
            "the refused standby exits"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(old.stderr().contains("refused"), "{}", tail(&old));
    assert_eq!(protections(&standby), 0);
    // The operator discards PM1's data: a full copy, then protection.
    let old = Pm::spawn_as(
        &topo,
        &files,
        0,
        "standby",
        &wl,
        &["--epoch-ms", "10", "--discard-disk-data"],
    );
    wait_protected(&mut standby, &old, 1, "after discarding");
    assert!(
        resyncs(&standby).last().unwrap().1 == DISK_BYTES,
        "a full copy"
    );
}

/// A loop block device over a file, detached on drop.
struct Loop(PathBuf);

impl Loop {
    fn over(file: &Path) -> Loop {
        let out = std::process::Command::new("losetup")
            .args(["-f", "--show"])
            .arg(file)
            .output()
            .expect("losetup");
        assert!(
            out.status.success(),
            "losetup: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Loop(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = std::process::Command::new("losetup")
            .arg("-d")
            .arg(&self.0)
            .status();
    }
}

#[test]
fn block_devices_are_mirrored_with_their_metadata_in_the_state_dir() {
    let (_dir, topo, mut files) = setup(None);
    let state = common::private_dirs().join("state");
    let loops = [Loop::over(&files.disks[0]), Loop::over(&files.disks[1])];
    files.disks = [loops[0].0.clone(), loops[1].0.clone()];
    const LIMIT: u64 = 1200;
    let wl = workload(LIMIT, 250);
    let wl = strs(&wl);
    let (mut standby, mut primary) = protected_pair(&topo, &files, &wl, &[]);
    // Sized from the device (a block device's file length is 0): the whole 8 MiB.
    assert_eq!(resyncs(&primary)[0].1, DISK_BYTES, "{}", tail(&primary));
    // Metadata is not written into /dev.
    for d in &files.disks {
        let store = MetaStore::for_image(d);
        assert!(
            store.dir().starts_with(state.join("mirror")),
            "{:?}",
            store.dir()
        );
        assert!(matches!(store.load().unwrap(), MetaState::Ok(_)));
    }
    standby.kill();
    primary
        .wait_status("degraded", Duration::from_secs(10), degraded)
        .unwrap_or_else(|e| panic!("{e}"));
    std::thread::sleep(Duration::from_millis(1000));
    let standby = start_standby(&topo, &files, &wl, &["--epoch-ms", "10"]);
    wait_protected(&mut primary, &standby, 2, "second session");
    assert_resumed_with_delta(&primary, DISK_BYTES);
    assert_converged(&files, LIMIT, &mut primary, &standby, 1);
    drop((primary, standby));
}
