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
mod common;

use std::time::{Duration, Instant};

use common::pair::{protected, Pm, RunningPair};
use common::require_kvm;
use twinrun_control::{self as control, FtRole};
use twinrun_lab::console::{check_disk_records, count_c, read as read_console};
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
