//! Live migration of an HA VM at the process level (`Op::Swap` asked of the HA
//! primary: `pair::ha::migrate`): two `twinrun vm run --protection ha --role ...`
//! processes in their PM namespaces, the test guest running kv + counter + dirty +
//! disk, a RESP client holding ONE TCP connection to the guest.
//!
//! - `ha_migrates_back_and_forth_under_load`: HA_MIGRATE_RUNS migrations (default 6),
//!   each asked of the current primary, each waiting until the other end protects the
//!   VM as the HA primary with the old one as its in-sync standby. Checked: the
//!   client's connection survives, no acknowledged write is lost, the INCR counter
//!   equals what was acknowledged, the console (one positioned file both PMs write)
//!   has no gap, duplicate or second BOOT, the dirty workload's self-check never
//!   fails, and both images hold every `W` record intact. The client-visible stall
//!   (the longest reply wait while the migration ran) and the guest's pause at the
//!   handover are printed for each.
//! - `ha_migration_target_killed_keeps_the_vm_on_the_source`: the target is SIGSTOPped
//!   and then SIGKILLed mid-migration: the request fails, the VM runs on at the source
//!   on the same connection; a restarted standby makes it HA-protected again, and a
//!   later migration succeeds.
//! - `ha_migration_links_cut_keeps_the_vm_on_the_source`: every A-Link cut while the
//!   pre-copy runs: the VM runs on at the source, and once the links are back it is
//!   HA-protected again by the same standby process, and a later migration succeeds.
//! - `ha_migration_with_a_witness_hands_the_lease_over`: the pair under a real
//!   `twinrun witness` (tests/common/quorum.rs): the migration hands the lease over
//!   (FT's planned-swap `Release` path): the target holds the next generation (its
//!   node's by parity) and the witness lease, the source none, both record it; with
//!   every A-Link cut the old source never takes the VM back on its own (no frame on its
//!   TAP, the client goes on) and is re-protected once the links are back, the client's
//!   one connection carrying the whole run; then a SIGKILL of the new primary's PM: the
//!   old source takes over with the witness's grant (the next generation) and boots the
//!   guest from its replica, which holds every disk record flushed before the kill.
mod common;

use std::time::{Duration, Instant};

use common::pair::{failed_over, protected, Pm, RunningPair};
use common::quorum::{quorum, quorum_is, tap_frames, QuorumPair};
use common::require_kvm;
use twinrun_control::{self as control, FtRole};
use twinrun_lab::console::{check_disk_records, count_c, read as read_console, written_seqs};
use twinrun_lab::kvload::LoadClient;
use twinrun_lab::verdict::{check_load, Expect};

const CLUSTER: &str = "ha-migrate";
const EXTRA: &[&str] = &[
    "--protection",
    "ha",
    "--cluster-id",
    CLUSTER,
    "--epoch-ms",
    "10",
];

type Pair = RunningPair;

impl Pair {
    fn start() -> Pair {
        let pair = RunningPair::launch(EXTRA);
        assert_eq!(pair.pms[0].status_now().protection, "ha");
        pair
    }

    fn logs(&self) -> String {
        self.tails(60)
    }

    /// Waits until PM `p` protects the VM as the HA primary and the other end is its
    /// standby.
    fn wait_protected_at(&mut self, p: usize, what: &str) {
        self.pms[p]
            .wait_status(what, Duration::from_secs(60), |s| {
                s.role == FtRole::Primary && s.vm_running && protected(s)
            })
            .unwrap_or_else(|e| panic!("{what}: {e}\n{}", self.logs()));
        self.pms[1 - p]
            .wait_status(what, Duration::from_secs(10), |s| {
                s.role == FtRole::Standby && !s.vm_running
            })
            .unwrap_or_else(|e| panic!("{what}: {e}\n{}", self.logs()));
    }
}

/// The pair stays as it is for `d` (the old primary, now the standby, never boots
/// the VM: its A-Links to the new primary stay up).
fn stays_protected_at(pair: &mut Pair, p: usize, d: Duration) {
    let t0 = Instant::now();
    while t0.elapsed() < d {
        let a = pair.pms[p].status_now();
        let b = pair.pms[1 - p].status_now();
        assert!(
            a.role == FtRole::Primary && a.vm_running && protected(&a),
            "PM{} is no longer the protected primary {:?} after the migration: {a:?}\n{}",
            p + 1,
            t0.elapsed(),
            pair.logs()
        );
        assert!(
            b.role == FtRole::Standby && !b.vm_running,
            "PM{} no longer the standby {:?} after the migration: {b:?}\n{}",
            2 - p,
            t0.elapsed(),
            pair.logs()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn runs() -> usize {
    std::env::var("HA_MIGRATE_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(6)
}

/// Asks PM `from` to migrate the VM; returns its answer and the longest client reply
/// wait while it ran.
fn migrate(
    pair: &Pair,
    client: &LoadClient,
    from: usize,
) -> (Result<(u64, u64), String>, Duration) {
    let sock = pair.socket(from);
    let job = std::thread::spawn(move || control::swap(&sock));
    let mut stall = Duration::ZERO;
    while !job.is_finished() {
        stall = stall.max(client.max_reply_during(Duration::from_millis(50)));
    }
    // The replies just after the handover count too.
    stall = stall.max(client.max_reply_during(Duration::from_millis(300)));
    (job.join().unwrap(), stall)
}

/// The guest's counter goes on (the console grows).
fn counter_goes_on(pair: &Pair, what: &str) {
    let c_before = count_c(&read_console(&pair.files.console));
    let t0 = Instant::now();
    while count_c(&read_console(&pair.files.console)) <= c_before + 5 {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "{what}: the guest's counter made no progress\n{}",
            pair.logs()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Freezes both ends, then checks the client's run, the console and both images.
fn final_verdict(mut pair: Pair, client: LoadClient) {
    let rep = client.finish().unwrap();
    let logs = pair.logs();
    // Both frozen at once: every record the console shows is then on both images
    // (HA: the guest's write completed only once the standby had it).
    for pm in &pair.pms {
        pm.proc_signal(nix::sys::signal::Signal::SIGSTOP);
    }
    let frozen = read_console(&pair.files.console);
    for pm in &mut pair.pms {
        pm.kill();
    }
    let cc = check_load(&rep, &frozen, Expect::MOVED)
        .unwrap_or_else(|e| panic!("across the migrations: {e}\n{logs}"));
    for (i, img) in pair.files.disks.iter().enumerate() {
        let img = std::fs::read(img).unwrap();
        check_disk_records(&img, &cc.w_seqs)
            .unwrap_or_else(|e| panic!("PM{} image: {e}\n{logs}", i + 1));
    }
}

#[test]
fn ha_migrates_back_and_forth_under_load() {
    require_kvm();
    let mut pair = Pair::start();
    let client = pair.client();
    client
        .wait_acks(100, Duration::from_secs(20))
        .unwrap_or_else(|e| panic!("{e}\n{}", pair.logs()));
    let mut primary = 0usize;
    let mut stalls = Vec::new();
    let mut pauses = Vec::new();
    for n in 0..runs() {
        let t0 = Instant::now();
        let (r, stall) = migrate(&pair, &client, primary);
        let took = t0.elapsed();
        let (epoch, paused_us) =
            r.unwrap_or_else(|e| panic!("migration {n}: {e}\n{}", pair.logs()));
        let new = 1 - primary;
        pair.wait_protected_at(new, &format!("migration {n}: HA again the other way round"));
        client
            .wait_acks(50, Duration::from_secs(15))
            .unwrap_or_else(|e| panic!("migration {n}: after it: {e}\n{}", pair.logs()));
        counter_goes_on(&pair, &format!("migration {n}"));
        eprintln!(
            "migration {n}: PM{} -> PM{} at epoch {epoch} in {took:?}: guest paused {:.1} ms \
             at the handover; longest client reply while it ran {stall:?}",
            primary + 1,
            new + 1,
            paused_us as f64 / 1e3
        );
        stalls.push(stall);
        pauses.push(paused_us);
        primary = new;
    }
    // Well past the A-Link's detection time and the ack timeout.
    stays_protected_at(&mut pair, primary, Duration::from_secs(8));
    let acked = client.acks();
    final_verdict(pair, client);
    stalls.sort();
    pauses.sort();
    eprintln!(
        "{} HA migrations: longest client reply while one ran p50 {:?} max {:?}; pause at \
         the handover p50 {} us max {} us; {acked} writes acknowledged",
        stalls.len(),
        stalls[stalls.len() / 2],
        stalls[stalls.len() - 1],
        pauses[pauses.len() / 2],
        pauses[pauses.len() - 1],
    );
}

/// After a failed migration: the VM runs on at PM 0 on the same connection.
fn still_at_source(pair: &Pair, client: &LoadClient) {
    let st = pair.pms[0].status_now();
    assert_eq!(st.role, FtRole::Primary, "{st:?}\n{}", pair.logs());
    assert!(st.vm_running, "{st:?}");
    client
        .wait_acks(100, Duration::from_secs(20))
        .unwrap_or_else(|e| panic!("after the failed migration: {e}\n{}", pair.logs()));
    counter_goes_on(pair, "after the failed migration");
}

#[test]
fn ha_migration_target_killed_keeps_the_vm_on_the_source() {
    require_kvm();
    let mut pair = Pair::start();
    let client = pair.client();
    client
        .wait_acks(100, Duration::from_secs(20))
        .unwrap_or_else(|e| panic!("{e}\n{}", pair.logs()));
    let sock = pair.socket(0);
    let job = std::thread::spawn(move || control::swap(&sock));
    // Mid-way: the standby is switching to (or running) the pre-copy's session.
    if let Err(e) =
        pair.pms[1].wait_log("live migration: receiving the VM", Duration::from_secs(20))
    {
        let r = job.join().unwrap();
        panic!("{e}; the migration request answered {r:?}\n{}", pair.logs());
    }
    pair.pms[1].proc_signal(nix::sys::signal::Signal::SIGSTOP);
    std::thread::sleep(Duration::from_millis(200));
    pair.pms[1].kill();
    let err = job
        .join()
        .unwrap()
        .expect_err("a migration whose target died must fail");
    eprintln!("migration with the target killed: {err}");
    still_at_source(&pair, &client);
    // A new standby (same disks): HA-protected again, and a migration succeeds.
    pair.pms[1] = Pm::spawn(&pair.topo, &pair.files, 1, EXTRA);
    pair.wait_protected_at(0, "re-protected by a restarted standby");
    let (r, stall) = migrate(&pair, &client, 0);
    r.unwrap_or_else(|e| panic!("the later migration: {e}\n{}", pair.logs()));
    pair.wait_protected_at(1, "HA at PM2 after the later migration");
    client
        .wait_acks(50, Duration::from_secs(15))
        .unwrap_or_else(|e| panic!("after the later migration: {e}\n{}", pair.logs()));
    eprintln!("later migration: longest client reply while it ran {stall:?}");
    final_verdict(pair, client);
}

#[test]
fn ha_migration_links_cut_keeps_the_vm_on_the_source() {
    require_kvm();
    let mut pair = Pair::start();
    let client = pair.client();
    client
        .wait_acks(100, Duration::from_secs(20))
        .unwrap_or_else(|e| panic!("{e}\n{}", pair.logs()));
    let sock = pair.socket(0);
    let job = std::thread::spawn(move || control::swap(&sock));
    pair.pms[1]
        .wait_log("live migration: receiving the VM", Duration::from_secs(20))
        .unwrap_or_else(|e| panic!("{e}\n{}", pair.logs()));
    for k in 0..pair.topo.alinks() {
        pair.topo.set_alink(1, k, false).unwrap();
    }
    let err = job
        .join()
        .unwrap()
        .expect_err("a migration whose links were cut must fail");
    eprintln!("migration with the links cut: {err}");
    still_at_source(&pair, &client);
    for k in 0..pair.topo.alinks() {
        pair.topo.set_alink(1, k, true).unwrap();
    }
    pair.wait_protected_at(
        0,
        "re-protected by the same standby once the links are back",
    );
    let (r, stall) = migrate(&pair, &client, 0);
    r.unwrap_or_else(|e| panic!("the later migration: {e}\n{}", pair.logs()));
    pair.wait_protected_at(1, "HA at PM2 after the later migration");
    client
        .wait_acks(50, Duration::from_secs(15))
        .unwrap_or_else(|e| panic!("after the later migration: {e}\n{}", pair.logs()));
    eprintln!("later migration: longest client reply while it ran {stall:?}");
    final_verdict(pair, client);
}

/// PM `i` of a witness pair (0: node 1, started as the primary; 1: node 2).
fn wpm(qp: &mut QuorumPair, i: usize) -> &mut Pm {
    if i == 0 {
        &mut qp.primary
    } else {
        &mut qp.standby
    }
}

/// PM `i`'s lease at the (one) witness, as its quorum view shows it.
fn lease_left(st: &control::FtStatus) -> Option<u64> {
    st.quorum
        .as_ref()
        .and_then(|q| q.witnesses.first())
        .and_then(|w| w.lease_left_ms)
}

#[test]
fn ha_migration_with_a_witness_hands_the_lease_over() {
    require_kvm();
    let (mut qp, client) = QuorumPair::loaded("hamw", 1, 100, &["--protection", "ha"]);
    assert_eq!(qp.primary.status_now().protection, "ha");
    let g0 = quorum(&qp.primary.status_now()).generation;
    assert!(
        quorum::types::held_by(g0, quorum::NodeId(1)),
        "node 1 holds the first generation: {g0}"
    );

    // 1. The migration PM1 -> PM2 with the witness granting the lease: PM1 releases
    //    it, PM2 takes the next generation (node 2's by parity) before it runs the VM.
    let (r, stall) = {
        let sock = control::socket_of(&qp.primary.name).unwrap();
        let job = std::thread::spawn(move || control::swap(&sock));
        let mut stall = Duration::ZERO;
        while !job.is_finished() {
            stall = stall.max(client.max_reply_during(Duration::from_millis(50)));
        }
        (job.join().unwrap(), stall)
    };
    let (epoch, paused_us) = r.unwrap_or_else(|e| panic!("the migration: {e}\n{}", qp.logs()));
    let want = quorum::types::next_generation(g0, quorum::NodeId(2)).unwrap();
    assert_eq!(want, g0 + 1);
    wpm(&mut qp, 1)
        .wait_status(
            "the HA primary of the next generation, holding the lease",
            Duration::from_secs(60),
            |s| {
                s.role == FtRole::Primary
                    && s.vm_running
                    && protected(s)
                    && quorum_is(s, |q| q.role == "primary" && q.generation == want)
                    && lease_left(s).is_some()
            },
        )
        .unwrap_or_else(|e| panic!("after the migration: {e}\n{}", qp.logs()));
    wpm(&mut qp, 0)
        .wait_status(
            "the old primary is the standby of the new generation, without a lease",
            Duration::from_secs(20),
            |s| {
                s.role == FtRole::Standby
                    && !s.vm_running
                    && quorum_is(s, |q| {
                        q.role == "standby" && q.generation == want && q.demoted_by.is_none()
                    })
                    && lease_left(s).is_none()
            },
        )
        .unwrap_or_else(|e| panic!("after the migration: {e}\n{}", qp.logs()));
    assert_eq!(
        quorum(&qp.standby.status_now()).took_over,
        Some(want),
        "PM2 was granted the swap's generation"
    );
    for node in [1, 2] {
        let t0 = Instant::now();
        while qp.recorded_generation(node) != want {
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "node {node} recorded generation {} (want {want})\n{}",
                qp.recorded_generation(node),
                qp.logs()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    qp.progress(&client, 50, "after the migration");
    eprintln!(
        "HA migration with a witness: PM1 -> PM2 at epoch {epoch}, generation {g0} -> {want}, \
         guest paused {:.1} ms at the handover, longest client reply {stall:?}",
        paused_us as f64 / 1e3
    );

    // 2. The old source cannot take the VM back on its own: every A-Link cut with both
    //    PMs alive, PM2 runs on alone under its lease (the client progresses), PM1
    //    waits for a grant it does not get and never runs the guest.
    let pm1_frames = tap_frames(&qp.topo, 0);
    let protections = qp.standby.status_now().protections;
    qp.set_alinks(0, false);
    qp.progress(&client, 100, "PM2 alone after the cut");
    qp.primary
        .wait_log("waiting for the quorum's grant", Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("{e}\n{}", qp.logs()));
    qp.standby
        .wait_status("simplex under its lease", Duration::from_secs(10), |s| {
            quorum_is(s, |q| q.gate == "free" && !q.peer_reachable) && lease_left(s).is_some()
        })
        .unwrap_or_else(|e| panic!("{e}\n{}", qp.logs()));
    // Well past detection and the lease.
    std::thread::sleep(Duration::from_secs(3));
    let st = qp.primary.status_now();
    assert!(
        st.role == FtRole::Standby && !st.vm_running,
        "the old source took the VM back with PM2 alive: {st:?}\n{}",
        qp.logs()
    );
    assert!(
        quorum_is(&st, |q| q.generation == want),
        "the old source holds a generation of its own: {st:?}"
    );
    assert_eq!(
        tap_frames(&qp.topo, 0),
        pm1_frames,
        "PM1's VMM wrote frames to its TAP: a second copy ran\n{}",
        qp.logs()
    );
    qp.set_alinks(0, true);
    qp.standby
        .wait_status("protected again by PM1", Duration::from_secs(90), |s| {
            protected(s) && s.protections > protections
        })
        .unwrap_or_else(|e| panic!("{e}\n{}", qp.logs()));
    qp.progress(&client, 50, "after the links came back");
    assert_eq!(tap_frames(&qp.topo, 0), pm1_frames, "PM1 wrote frames");

    // The client's one connection carried the whole run: nothing acknowledged lost,
    // the counter exact, the console one history.
    let rep = client.finish().unwrap();
    let console = read_console(&qp.files.console);
    let cc = check_load(&rep, &console, Expect::MOVED)
        .unwrap_or_else(|e| panic!("across the migration and the cut: {e}\n{}", qp.logs()));

    // 3. SIGKILL of the new primary's PM: the old source takes over with the witness's
    //    grant (the next generation, node 1's) and boots the guest from its replica,
    //    which holds every record flushed before the kill.
    qp.standby.kill();
    let flushed = written_seqs(&read_console(&qp.files.console));
    assert!(
        flushed.len() >= cc.w_seqs.len(),
        "the console lost W records"
    );
    let then = quorum::types::next_generation(want, quorum::NodeId(1)).unwrap();
    qp.primary
        .wait_status(
            "took over with the witness's grant",
            Duration::from_secs(30),
            |s| {
                failed_over(s)
                    && s.vm_running
                    && s.role == FtRole::Primary
                    && quorum_is(s, |q| q.took_over == Some(then) && q.generation == then)
                    && lease_left(s).is_some()
            },
        )
        .unwrap_or_else(|e| panic!("the takeover after the kill: {e}\n{}", qp.logs()));
    let t0 = Instant::now();
    while qp.recorded_generation(1) != then {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "node 1 recorded generation {} (want {then})",
            qp.recorded_generation(1)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // The guest booted again on PM1 and writes records there.
    let t0 = Instant::now();
    loop {
        let c = read_console(&qp.files.console);
        let boots = String::from_utf8_lossy(&c)
            .lines()
            .filter(|l| l.starts_with("BOOT"))
            .count();
        if boots >= 2 && written_seqs(&c).len() >= flushed.len() + 10 {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "the guest did not boot and write again on PM1\n{}",
            qp.primary.tail(40)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    qp.primary.proc_signal(nix::sys::signal::Signal::SIGSTOP);
    let all = written_seqs(&read_console(&qp.files.console));
    let img = std::fs::read(&qp.files.disks[0]).unwrap();
    check_disk_records(&img, &flushed)
        .unwrap_or_else(|e| panic!("PM1's image, records flushed before the kill: {e}"));
    check_disk_records(&img, &all)
        .unwrap_or_else(|e| panic!("PM1's image, records written after the takeover: {e}"));
    qp.primary.kill();
    eprintln!(
        "HA takeover after the migration: generation {want} -> {then}; {} records flushed \
         before the kill intact on PM1, {} in all",
        flushed.len(),
        all.len()
    );
}
