//! etcd as the quorum backend of a real FT pair (issue 14, item 7, "the same takeover
//! and isolation cases against a real etcd"): two `twinrun vm run` PMs in namespaces
//! whose `[quorum]` config names a real etcd (Debian's etcd-server, started by the test
//! on a host of the management network, 1 s leases), kv load from a client on ONE
//! connection. Checks as tests/split_brain.rs: TAP frames of the node that must not
//! run, the one console history, every acknowledged write read back.
//!
//! - `etcd_primary_killed_standby_takes_over_without_losing_a_write`: SIGKILL of the
//!   primary; the standby takes over with etcd's grant of generation g + 1 (once the
//!   primary's lease expired at etcd), nothing acknowledged is lost.
//! - `etcd_every_alink_cut_both_alive_runs_one_copy`: every A-Link cut with both PMs
//!   alive: the primary has etcd mark the standby's replica outdated and runs alone;
//!   the standby is never granted (Busy while the primary renews), writes no frame;
//!   the A-Links back: the
//!   pair is protected again at the same generation.
mod common;

use std::time::Duration;

use common::pair::{failed_over, protected};
use common::quorum::{frames_during, quorum, quorum_is, tap_frames, QuorumPair};
use common::require_kvm;

/// Hang guard for states the pair reaches in a second or two when idle.
const STATE: Duration = Duration::from_secs(30);
/// Long past heartbeat detection (8 x 50 ms) and etcd's 1 s lease: the window a
/// "nothing happens" check watches.
const WATCH: Duration = Duration::from_secs(4);

#[test]
fn etcd_primary_killed_standby_takes_over_without_losing_a_write() {
    require_kvm();
    let (mut qp, client) = QuorumPair::start_with_etcd("qe0k", &[]).load(40);
    let q = quorum(&qp.primary.status_now()).clone();
    assert_eq!(q.backend, "etcd", "{q:?}");
    let g = q.generation;
    assert!(
        g > 0,
        "the primary holds a generation granted by etcd: {q:?}"
    );
    let t_kill = std::time::Instant::now();
    qp.primary.kill();
    client.mark();
    qp.standby
        .wait_status("failed over", STATE, failed_over)
        .unwrap_or_else(|e| panic!("{e}\n{}", qp.logs()));
    let q = quorum(&qp.standby.status_now()).clone();
    assert_eq!(
        q.took_over,
        Some(g + 1),
        "etcd granted the next generation: {q:?}"
    );
    assert_eq!(qp.recorded_generation(2), g + 1);
    qp.progress(&client, 40, "after the takeover through etcd");
    // A figure, not a bound (the machine is shared and loaded).
    if let Some(t) = client.first_reply_after_mark() {
        eprintln!(
            "etcd takeover (debug build, 1 s lease, 8 x 50 ms heartbeats): SIGKILL -> first \
             reply from the standby {:?}",
            t.saturating_duration_since(t_kill)
        );
    }
    qp.check_client_and_console(client, "etcd: primary killed");
}

#[test]
fn etcd_every_alink_cut_both_alive_runs_one_copy() {
    require_kvm();
    let (qp, client) = QuorumPair::start_with_etcd("qe0c", &[]).load(40);
    let g = quorum(&qp.primary.status_now()).generation;
    let standby_frames = tap_frames(&qp.topo, 1);
    let t0 = std::time::Instant::now();
    qp.set_alinks(0, false);
    // Expected: the primary runs alone once etcd recorded the standby as outdated (its
    // gate "free" under the lease); the client keeps getting answers.
    let mut qp = qp;
    qp.primary
        .wait_status("simplex through etcd", STATE, |s| {
            quorum_is(s, |q| q.gate == "free" && !q.peer_reachable)
        })
        .unwrap_or_else(|e| panic!("{e}\n{}", qp.logs()));
    eprintln!("simplex through etcd {:?} after the cut", t0.elapsed());
    qp.progress(&client, 40, "the primary alone");
    // The standby lost its primary on every path: it asks etcd, which refuses (the
    // primary's lease lives, and its replica is marked outdated), so it never runs:
    // no frame on its TAP.
    qp.standby
        .wait_log("waiting for the quorum's grant", STATE)
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        frames_during(&qp.topo, 1, WATCH),
        0,
        "the standby released output: two copies\n{}",
        qp.logs()
    );
    let st = qp.standby.status_now();
    assert!(
        st.failover.is_none() && quorum(&st).took_over.is_none(),
        "the standby took over with its primary alive: {st:?}\n{}",
        qp.logs()
    );
    assert_eq!(tap_frames(&qp.topo, 1), standby_frames);
    assert!(
        !quorum(&st).peer_reachable,
        "the standby saw every path silent: {:?}",
        quorum(&st)
    );
    // The A-Links back: the standby is resynced and the pair protected again, same
    // generation (no takeover happened).
    qp.set_alinks(0, true);
    let t1 = std::time::Instant::now();
    qp.primary
        .wait_status("protected again", Duration::from_secs(60), |s| {
            protected(s) && quorum_is(s, |q| q.gate == "acked")
        })
        .unwrap_or_else(|e| panic!("{e}\n{}", qp.logs()));
    eprintln!(
        "protected again {:?} after the A-Links came back",
        t1.elapsed()
    );
    assert_eq!(quorum(&qp.primary.status_now()).generation, g);
    qp.progress(&client, 40, "protected again");
    qp.check_client_and_console(client, "etcd: every A-Link cut");
}
