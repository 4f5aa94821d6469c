//! Planned role swap of an FT pair at the process level (`twinrun vm swap`): two
//! `twinrun vm run --role ...` processes in their PM namespaces (`twinrun_lab::Topology`),
//! the test guest running kv + counter + dirty + disk, a RESP client holding ONE TCP
//! connection to the guest.
//!
//! - `swap_back_and_forth_under_load`: SWAP_RUNS swaps (default 10), each asked of the
//!   current primary, each waiting for the pair to be protected again the other way
//!   round. Checked: the client's connection survives, no acknowledged write is lost,
//!   the INCR counter equals what was acknowledged, the console (one positioned file
//!   both PMs write) has no gap, duplicate or second BOOT, the dirty workload's
//!   self-check never fails, an online verify at the end finds the replicas equal,
//!   and both images hold every `W` record intact. The client-visible stall of each
//!   swap (the longest reply wait around it) is printed.
//! - `standby_killed_mid_swap_keeps_the_vm_on_the_primary`: the standby's process is
//!   SIGSTOPped (it can no longer accept), a swap is asked, the standby is SIGKILLed
//!   while the primary waits: the swap fails with an error, the VM runs on at the old
//!   primary with the client's connection and every acknowledged write.
//! - `swap_refused_when_not_in_sync`: asked of the standby, or of a primary whose
//!   standby is gone, the swap is refused with a clear error and nothing changes.
//! - `swaps_with_a_witness_under_load` (issue 15): the pair runs with a real
//!   `twinrun witness`; each swap hands the lease over (the old primary releases it,
//!   the new one takes the next generation by compare-and-set): the generation grows
//!   by one at every change of primary and names the new primary's node (parity), both
//!   ends record it, the witness's holder is the new primary; the client's connection
//!   and every acknowledged write survive.
//! - `swap_refused_while_the_witness_is_down`: the witness killed, a swap is refused
//!   (the lease cannot be released) and the VM runs on at the primary, protected, with
//!   the same generation; with the witness back the same swap goes through.
mod common;

use std::time::{Duration, Instant};

use common::pair::{protected, Pm, RunningPair};
use common::require_kvm;
use twinrun_control::{self as control, FtRole, Op, Response};
use twinrun_lab::console::{check_disk_records, count_c, read as read_console};
use twinrun_lab::verdict::{check_load, Expect};

const CLUSTER: &str = "ft-swap";

type Pair = RunningPair;

impl Pair {
    fn start() -> Pair {
        RunningPair::launch(&["--cluster-id", CLUSTER, "--epoch-ms", "10"])
    }

    fn logs(&self) -> String {
        self.tails(40)
    }
}

/// The new primary protects the VM with the old one as its standby.
fn primary_protected(s: &control::FtStatus) -> bool {
    s.role == FtRole::Primary && s.vm_running && protected(s)
}

fn standby_of_pair(s: &control::FtStatus) -> bool {
    s.role == FtRole::Standby && !s.vm_running
}

/// Runs an online verify on the primary `pm` and waits for its report: the replicas
/// must not differ in any range.
fn verify_replicas(pair: &Pair, i: usize) {
    let sock = pair.socket(i);
    let since = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    match control::call(&sock, Op::DiskVerify, Duration::from_secs(10)).unwrap() {
        Response::Ok => {}
        other => panic!("verify request: {other:?}\n{}", pair.logs()),
    }
    let t0 = Instant::now();
    loop {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "no verify report within 60 s\n{}",
            pair.logs()
        );
        if let Ok(Response::Disks { disks }) =
            control::call(&sock, Op::DiskStatus, Duration::from_secs(10))
        {
            if let Some(v) = disks[0].verify.as_ref() {
                if v.finished_unix_ms >= since && disks[0].verify_running.is_none() {
                    assert!(v.ranges_compared > 0, "verify compared nothing: {v:?}");
                    assert_eq!(
                        v.ranges_differing,
                        0,
                        "the replicas differ after the swaps: {v:?}\n{}",
                        pair.logs()
                    );
                    return;
                }
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn runs() -> usize {
    std::env::var("SWAP_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10)
}

#[test]
fn swap_back_and_forth_under_load() {
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
        let sock = pair.socket(primary);
        let c_before = count_c(&read_console(&pair.files.console));
        // The longest reply wait in a window that holds the swap.
        let swap = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            control::swap(&sock)
        });
        let stall = client.max_reply_during(Duration::from_millis(1500));
        let (epoch, paused_us) = swap
            .join()
            .unwrap()
            .unwrap_or_else(|e| panic!("swap {n}: {e}\n{}", pair.logs()));
        let new = 1 - primary;
        pair.pms[new]
            .wait_status(
                "protected as the new primary",
                Duration::from_secs(60),
                primary_protected,
            )
            .unwrap_or_else(|e| panic!("swap {n}: {e}\n{}", pair.logs()));
        pair.pms[primary]
            .wait_status(
                "the old primary is the standby",
                Duration::from_secs(10),
                standby_of_pair,
            )
            .unwrap_or_else(|e| panic!("swap {n}: {e}\n{}", pair.logs()));
        // The client and the guest go on at the new primary.
        client
            .wait_acks(50, Duration::from_secs(15))
            .unwrap_or_else(|e| panic!("swap {n}: after the swap: {e}\n{}", pair.logs()));
        let t0 = Instant::now();
        while count_c(&read_console(&pair.files.console)) <= c_before + 5 {
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "swap {n}: the guest's counter made no progress\n{}",
                pair.logs()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!(
            "swap {n}: PM{} -> PM{} at epoch {epoch}: guest paused {:.1} ms on the old \
             primary until the acceptance; longest client reply around it {stall:?}",
            primary + 1,
            new + 1,
            paused_us as f64 / 1e3
        );
        stalls.push(stall);
        pauses.push(paused_us);
        primary = new;
    }
    verify_replicas(&pair, primary);
    let rep = client.finish().unwrap();
    let logs = pair.logs();
    // Both ends frozen at once: a killed primary's standby would fail over and write
    // records the other image never gets. Every record the console shows then is
    // committed on both ends (released output is committed on the standby).
    for pm in &pair.pms {
        pm.proc_signal(nix::sys::signal::Signal::SIGSTOP);
    }
    let frozen = read_console(&pair.files.console);
    for pm in &mut pair.pms {
        pm.kill();
    }
    let cc = check_load(&rep, &frozen, Expect::MOVED)
        .unwrap_or_else(|e| panic!("across the swaps: {e}\n{logs}"));
    for (i, img) in pair.files.disks.iter().enumerate() {
        let img = std::fs::read(img).unwrap();
        // Each image holds every record the console showed when both were frozen.
        check_disk_records(&img, &cc.w_seqs)
            .unwrap_or_else(|e| panic!("PM{} image: {e}\n{logs}", i + 1));
    }
    stalls.sort();
    pauses.sort();
    eprintln!(
        "{} swaps: longest client reply around a swap p50 {:?} max {:?}; old primary's \
         pause until acceptance p50 {} us max {} us; {} writes acknowledged",
        stalls.len(),
        stalls[stalls.len() / 2],
        stalls[stalls.len() - 1],
        pauses[pauses.len() / 2],
        pauses[pauses.len() - 1],
        rep.sets_acked.len() as u64 + rep.incrs_acked as u64
    );
}

#[test]
fn standby_killed_mid_swap_keeps_the_vm_on_the_primary() {
    require_kvm();
    let mut pair = Pair::start();
    let client = pair.client();
    client
        .wait_acks(100, Duration::from_secs(20))
        .unwrap_or_else(|e| panic!("{e}\n{}", pair.logs()));
    // The standby can no longer apply or accept: the swap stops after the final
    // epoch is sent, with the guest paused on the primary.
    pair.pms[1].proc_signal(nix::sys::signal::Signal::SIGSTOP);
    let sock = pair.socket(0);
    let swap = std::thread::spawn(move || control::swap(&sock));
    std::thread::sleep(Duration::from_millis(150));
    pair.pms[1].kill();
    let r = swap.join().unwrap();
    let err = r.expect_err("a swap whose standby died must fail");
    assert!(
        err.contains("standby was lost") || err.contains("not in sync"),
        "unexpected error: {err}\n{}",
        pair.logs()
    );
    let st = pair.pms[0].status_now();
    assert_eq!(st.role, FtRole::Primary, "{st:?}");
    assert!(st.vm_running, "{st:?}");
    // The VM keeps running here and answers on the same connection.
    let c_before = count_c(&read_console(&pair.files.console));
    client
        .wait_acks(100, Duration::from_secs(20))
        .unwrap_or_else(|e| panic!("after the failed swap: {e}\n{}", pair.logs()));
    let t0 = Instant::now();
    while count_c(&read_console(&pair.files.console)) <= c_before + 5 {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "the guest's counter made no progress\n{}",
            pair.logs()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let rep = client.finish().unwrap();
    let logs = pair.logs();
    pair.pms[0].kill();
    let console = read_console(&pair.files.console);
    check_load(
        &rep,
        &console,
        Expect {
            one_connection: true,
            ..Expect::BASIC
        },
    )
    .unwrap_or_else(|e| panic!("{e}\n{logs}"));
}

#[test]
fn swap_refused_when_not_in_sync() {
    require_kvm();
    let mut pair = Pair::start();
    let err = control::swap(&pair.socket(1)).expect_err("the standby cannot swap");
    assert!(err.contains("standby"), "{err}");
    pair.pms[1].kill();
    pair.pms[0]
        .wait_status("standby lost", Duration::from_secs(10), |s| !protected(s))
        .unwrap_or_else(|e| panic!("{e}\n{}", pair.logs()));
    let err = control::swap(&pair.socket(0)).expect_err("no standby: no swap");
    assert!(err.contains("not in sync"), "{err}");
    let st = pair.pms[0].status_now();
    assert_eq!(st.role, FtRole::Primary);
    assert!(st.vm_running);
}

/// The witness pair's PM `i` (0: node 1, started as the primary; 1: node 2).
fn qpm(qp: &mut common::quorum::QuorumPair, i: usize) -> &mut Pm {
    if i == 0 {
        &mut qp.primary
    } else {
        &mut qp.standby
    }
}

/// One swap asked of PM `from` of a pair with a witness; waits until PM `1 - from`
/// protects the VM as the primary of the next generation (its node's by parity) and
/// `from` is its standby. Returns the new generation.
fn witness_swap(qp: &mut common::quorum::QuorumPair, from: usize, n: usize) -> u64 {
    use common::quorum::quorum_is;
    let to = 1 - from;
    let g0 = common::quorum::quorum(&qpm(qp, from).status_now()).generation;
    let sock = control::socket_of(&qpm(qp, from).name).unwrap();
    let (epoch, paused_us) =
        control::swap(&sock).unwrap_or_else(|e| panic!("swap {n}: {e}\n{}", qp.logs()));
    let want = quorum::types::next_generation(g0, quorum::NodeId(to as u64 + 1)).unwrap();
    assert_eq!(
        want,
        g0 + 1,
        "the next generation is the new primary's by parity"
    );
    qpm(qp, to)
        .wait_status(
            "protected as the new primary of the next generation",
            Duration::from_secs(60),
            |s| {
                primary_protected(s)
                    && quorum_is(s, |q| q.role == "primary" && q.generation == want)
            },
        )
        .unwrap_or_else(|e| panic!("swap {n}: {e}\n{}", qp.logs()));
    qpm(qp, from)
        .wait_status(
            "the old primary is the standby and knows the new generation",
            Duration::from_secs(20),
            |s| {
                standby_of_pair(s)
                    && quorum_is(s, |q| {
                        q.role == "standby" && q.generation == want && q.demoted_by.is_none()
                    })
            },
        )
        .unwrap_or_else(|e| panic!("swap {n}: {e}\n{}", qp.logs()));
    assert!(quorum::types::held_by(want, quorum::NodeId(to as u64 + 1)));
    // Both ends recorded it durably.
    for node in [1, 2] {
        let t0 = Instant::now();
        while qp.recorded_generation(node) != want {
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "swap {n}: node {node} recorded generation {} (want {want})\n{}",
                qp.recorded_generation(node),
                qp.logs()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    eprintln!(
        "witness swap {n}: PM{} -> PM{} at epoch {epoch}, generation {g0} -> {want}, guest \
         paused {:.1} ms on the old primary until the acceptance",
        from + 1,
        to + 1,
        paused_us as f64 / 1e3
    );
    want
}

#[test]
fn swaps_with_a_witness_under_load() {
    require_kvm();
    let (mut qp, client) = common::quorum::QuorumPair::loaded("fsw", 1, 100, &[]);
    let swaps = runs().min(6);
    let mut primary = 0usize;
    let mut g = 0;
    for n in 0..swaps {
        g = witness_swap(&mut qp, primary, n);
        primary = 1 - primary;
        qp.progress(&client, 50, &format!("after witness swap {n}"));
    }
    assert_eq!(g, 1 + swaps as u64, "one generation per change of primary");
    // The witness's record says the same: the new primary holds it.
    let holder = qpm(&mut qp, primary).status_now();
    let q = common::quorum::quorum(&holder);
    assert!(
        q.witnesses.iter().all(|w| w.reachable),
        "the witness is reachable: {q:?}"
    );
    qp.check_client_and_console(client, "witness swaps");
}

#[test]
fn swap_refused_while_the_witness_is_down() {
    require_kvm();
    let (mut qp, client) = common::quorum::QuorumPair::loaded("fswd", 1, 60, &[]);
    let g0 = common::quorum::quorum(&qp.primary.status_now()).generation;
    qp.witnesses[0].kill();
    let sock = control::socket_of(&qp.primary.name).unwrap();
    let err = match control::swap(&sock) {
        Ok(r) => panic!(
            "a swap went through without the witness: {r:?}\n{}",
            qp.logs()
        ),
        Err(e) => e,
    };
    assert!(
        err.contains("refused") && err.contains("runs on here"),
        "the refusal says why: {err}"
    );
    // The VM runs on at the primary, protected, with the same generation: the client
    // goes on.
    qp.primary
        .wait_status(
            "still the protected primary of the same generation",
            Duration::from_secs(20),
            |s| {
                primary_protected(s)
                    && common::quorum::quorum_is(s, |q| q.role == "primary" && q.generation == g0)
            },
        )
        .unwrap_or_else(|e| panic!("{e}\n{}", qp.logs()));
    qp.progress(&client, 50, "after the refused swap");
    assert_eq!(
        common::quorum::quorum(&qp.standby.status_now()).role,
        "standby",
        "the standby took nothing over"
    );
    // With the witness back, the same swap goes through.
    qp.witnesses[0].start();
    let t0 = Instant::now();
    while !common::quorum::quorum_is(&qp.primary.status_now(), |q| {
        q.witnesses.iter().all(|w| w.reachable)
    }) {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "the witness is not reachable again\n{}",
            qp.logs()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let g = witness_swap(&mut qp, 0, 0);
    assert_eq!(g, g0 + 1);
    qp.progress(&client, 50, "after the swap with the witness back");
    qp.check_client_and_console(client, "refused then done swap");
}
