//! Split brain made impossible by the quorum (issue 14), with real processes: two
//! `twinrun vm run --role ...` PMs in their namespaces (two A-Links, a TAP each on the
//! LAN, a management network), a `twinrun witness` on its own host on the management
//! network, kv load from a client on ONE TCP connection.
//!
//! "Never two copies" is checked where the outside would see it (see
//! tests/common/quorum.rs, the setup these tests share with tests/quorum_cases.rs).
//!
//! - `all_alinks_cut_with_both_alive_runs_one_copy`: every A-Link cut with both PMs
//!   alive: the primary runs on alone under its witness lease (the client progresses),
//!   the standby waits without the grant and never runs; links restored: the standby
//!   is resynced and protects the VM again.
//! - `primary_frozen_past_detection_releases_nothing`: the primary SIGSTOPped past the
//!   detection time: the standby takes over with the witness's grant; SIGCONT: the
//!   resumed primary releases nothing of its lost history (before the quorum: 65
//!   frames; it may still release an epoch the standby had committed, whose frames the
//!   new primary also sent: checked frame by frame), learns the higher generation,
//!   stops and exits DEMOTED (5).
//! - `primary_isolated_pauses_and_is_demoted`: the primary cut off from everything
//!   (A-Links, LAN, management): it pauses before its lease could lapse, the standby
//!   takes over with the grant; reconnected, the old primary is demoted without
//!   releasing anything.
//! - `sigkill_with_witness_takes_over_without_losing_a_write`: SIGKILL of the primary:
//!   the standby takes over through the witness; no acknowledged write is lost.
mod common;

use std::time::{Duration, Instant};

use common::pair::{failed_over, protected};
use common::quorum::{
    assert_loser_wrote_only_committed_frames, quorum, record_vm_frames, recorded, tap_frames,
    QuorumPair, DEMOTED,
};
use common::require_kvm;

#[test]
fn all_alinks_cut_with_both_alive_runs_one_copy() {
    all_alinks_cut("sbcut", &[]);
}

/// The same cut for an HA pair: its standby boots the VM only with the grant.
#[test]
fn ha_all_alinks_cut_with_both_alive_runs_one_copy() {
    all_alinks_cut("sbhacut", &["--protection", "ha"]);
}

fn all_alinks_cut(prefix: &str, extra: &[&str]) {
    require_kvm();
    let (mut sb, client) = QuorumPair::loaded(prefix, 1, 40, extra);
    let st = sb.primary.status_now();
    let q = quorum(&st);
    assert_eq!(q.backend, "witness");
    assert!(q.generation > 0, "the primary holds a generation: {q:?}");
    assert_eq!(q.gate, "acked");
    let standby_frames = tap_frames(&sb.topo, 1);
    sb.set_alinks(0, false);
    // The primary runs on alone under its lease: the client progresses (100 more).
    client
        .wait_acks(100, Duration::from_secs(20))
        .unwrap_or_else(|e| panic!("after the cut: {e}\n{}", sb.logs()));
    sb.standby
        .wait_log("waiting for the quorum's grant", Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("{e}"));
    sb.primary
        .wait_status("simplex under its lease", Duration::from_secs(10), |s| {
            s.quorum
                .as_ref()
                .is_some_and(|q| q.gate == "free" && !q.peer_reachable)
        })
        .unwrap_or_else(|e| panic!("{e}"));
    // Well past detection and any lease: still one copy.
    std::thread::sleep(Duration::from_secs(3));
    let st = sb.standby.status_now();
    assert!(
        st.failover.is_none(),
        "the standby took over with the primary alive\n{}",
        sb.logs()
    );
    assert_eq!(
        tap_frames(&sb.topo, 1),
        standby_frames,
        "the standby's VMM wrote frames to its TAP: a second copy ran\n{}",
        sb.logs()
    );
    // Links back: the standby is resynced and protects the VM again.
    sb.set_alinks(0, true);
    sb.primary
        .wait_status("protected again", Duration::from_secs(90), |s| {
            protected(s) && s.protections >= 2
        })
        .unwrap_or_else(|e| panic!("{e}\n{}", sb.standby.tail(40)));
    client
        .wait_acks(40, Duration::from_secs(20))
        .unwrap_or_else(|e| panic!("after the links came back: {e}\n{}", sb.logs()));
    assert_eq!(
        tap_frames(&sb.topo, 1),
        standby_frames,
        "the standby wrote frames"
    );
    sb.check_client_and_console(client, "cut");
}

#[test]
fn primary_frozen_past_detection_releases_nothing() {
    require_kvm();
    let (mut sb, client) = QuorumPair::loaded("sbstop", 1, 40, &[]);
    // Everything the standby's VMM writes from before it could take over.
    let winner = record_vm_frames(&sb.topo, 1);
    sb.primary.proc_signal(nix::sys::signal::Signal::SIGSTOP);
    let t0 = Instant::now();
    sb.standby
        .wait_status("failed over", Duration::from_secs(20), failed_over)
        .unwrap_or_else(|e| panic!("{e}"));
    let st = sb.standby.status_now();
    let q = quorum(&st);
    assert!(q.took_over.is_some(), "the takeover was granted: {q:?}");
    client
        .wait_acks(40, Duration::from_secs(20))
        .unwrap_or_else(|e| panic!("after the takeover: {e}\n{}", sb.logs()));
    // From here the resumed primary may write only what the new primary also wrote: an
    // acknowledgement waiting in its socket when it froze releases a committed epoch's
    // output, which the new primary sent again at its takeover (see
    // assert_loser_wrote_only_committed_frames).
    let loser = record_vm_frames(&sb.topo, 0);
    eprintln!("takeover {:?} after SIGSTOP", t0.elapsed());
    sb.primary.proc_signal(nix::sys::signal::Signal::SIGCONT);
    let code = sb.primary.wait_exit(Duration::from_secs(20));
    assert_eq!(
        code,
        Some(DEMOTED),
        "the resumed primary exits demoted\n{}",
        sb.primary.tail(40)
    );
    assert!(
        sb.primary.stderr().contains("DEMOTED"),
        "{}",
        sb.primary.tail(40)
    );
    assert_loser_wrote_only_committed_frames(
        &recorded(loser),
        &recorded(winner),
        "the resumed primary",
    );
    client
        .wait_acks(40, Duration::from_secs(20))
        .unwrap_or_else(|e| panic!("after SIGCONT: {e}\n{}", sb.logs()));
    sb.check_client_and_console(client, "sigstop");
}

#[test]
fn primary_isolated_pauses_and_is_demoted() {
    require_kvm();
    let (mut sb, client) = QuorumPair::loaded("sbiso", 1, 40, &[]);
    sb.set_alinks(0, false);
    sb.topo.set_lan(0, false).unwrap();
    sb.topo.set_mgmt(0, false).unwrap();
    // Before its lease could lapse at the witness it holds its output and pauses.
    sb.primary
        .wait_status("paused", Duration::from_secs(10), |s| {
            s.quorum
                .as_ref()
                .is_some_and(|q| q.guest == "paused" && q.gate == "hold")
        })
        .unwrap_or_else(|e| panic!("{e}"));
    let frames = tap_frames(&sb.topo, 0);
    sb.standby
        .wait_status("failed over", Duration::from_secs(20), failed_over)
        .unwrap_or_else(|e| panic!("{e}"));
    client
        .wait_acks(40, Duration::from_secs(20))
        .unwrap_or_else(|e| panic!("after the takeover: {e}\n{}", sb.logs()));
    // Reconnected: it learns the higher generation from the witness and is demoted.
    sb.topo.set_mgmt(0, true).unwrap();
    sb.topo.set_lan(0, true).unwrap();
    sb.set_alinks(0, true);
    let code = sb.primary.wait_exit(Duration::from_secs(20));
    assert_eq!(code, Some(DEMOTED), "{}", sb.primary.tail(40));
    assert_eq!(
        tap_frames(&sb.topo, 0),
        frames,
        "the isolated primary released held output\n{}",
        sb.primary.tail(40)
    );
    client
        .wait_acks(40, Duration::from_secs(20))
        .unwrap_or_else(|e| panic!("after the reconnection: {e}\n{}", sb.logs()));
    sb.check_client_and_console(client, "isolated");
}

#[test]
fn sigkill_with_witness_takes_over_without_losing_a_write() {
    require_kvm();
    let (mut sb, client) = QuorumPair::loaded("sbkill", 1, 40, &[]);
    let t_kill = Instant::now();
    sb.primary.kill();
    // Requests sent from now on can only be answered by the standby.
    client.mark();
    sb.standby
        .wait_status("failed over", Duration::from_secs(20), failed_over)
        .unwrap_or_else(|e| panic!("{e}"));
    let st = sb.standby.status_now();
    let q = quorum(&st);
    assert!(q.took_over.is_some_and(|g| g > 0), "{q:?}");
    client
        .wait_acks(40, Duration::from_secs(20))
        .unwrap_or_else(|e| panic!("after the takeover: {e}\n{}", sb.logs()));
    // A figure, not a bound (timed asserts fail on a loaded machine): the bench
    // `ft-witness` measures it over many runs, optimized.
    if let Some(t) = client.first_reply_after_mark() {
        eprintln!(
            "failover through the witness (debug build, 8 x 50 ms heartbeats): SIGKILL -> \
             first reply from the standby {:?}",
            t.saturating_duration_since(t_kill)
        );
    }
    sb.check_client_and_console(client, "sigkill");
}
