//! A-Link incarnations over loopback TCP: a bundle serves one peer instance. A link that
//! reaches a new peer instance ends the old session at once (an event and an error, not
//! a silent loss); a link of a stale instance is refused; a peer without incarnations
//! (the previous version) still pairs.

use alink::handshake::INCARNATION_SINCE;
use alink::{Alink, AlinkConfig, AlinkError, Event, LinkAddrs, WindowLimits};
use std::net::SocketAddr;
use std::thread;
use std::time::{Duration, Instant};

const SECRET: &[u8] = b"incarnation-test-cluster-secret";
const LONG: Duration = Duration::from_secs(20);

fn init_log() {
    let _ = env_logger::builder().is_test(true).try_init();
}

fn any() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

fn fast(mut c: AlinkConfig) -> AlinkConfig {
    c.health.interval = Duration::from_millis(50);
    c.health.misses = 5;
    c.reconnect_max = Duration::from_millis(200);
    c.window = WindowLimits {
        max_msgs: 256,
        max_bytes: 32 << 20,
    };
    c
}

/// The accepting end (node 2), listening on `at` (port 0: any); retried while the
/// previous instance's listener is still closing.
fn acceptor(at: &[SocketAddr]) -> Alink {
    acceptor_at(at, None)
}

/// [`acceptor`] announcing protocol `version` (None: this build's).
fn acceptor_at(at: &[SocketAddr], version: Option<u16>) -> Alink {
    let links: Vec<_> = at
        .iter()
        .map(|a| LinkAddrs {
            local: *a,
            remote: any(),
        })
        .collect();
    let t = Instant::now();
    loop {
        let mut c = fast(AlinkConfig::new(7, 2, 1, SECRET, links.clone()));
        if let Some(v) = version {
            c.protocol_version = v;
        }
        match Alink::start(c) {
            Ok(a) => return a,
            Err(e) => {
                assert!(t.elapsed() < LONG, "cannot listen again: {e}");
                thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

fn dialer(to: &[SocketAddr], version: Option<u16>) -> Alink {
    let links = to
        .iter()
        .map(|r| LinkAddrs {
            local: any(),
            remote: *r,
        })
        .collect();
    let mut c = fast(AlinkConfig::new(7, 1, 2, SECRET, links));
    if let Some(v) = version {
        c.protocol_version = v;
    }
    Alink::start(c).unwrap()
}

fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < LONG, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(5));
    }
}

fn wait_up(a: &Alink, n: usize) {
    wait_for("links up", || {
        a.link_status().iter().filter(|s| s.up).count() >= n
    });
}

/// Sends one message each way and checks it arrives.
fn exchange(a: &Alink, b: &Alink, n: u64) {
    a.send(&n, vec![]).unwrap();
    let m = b.recv(LONG).unwrap().expect("message");
    assert_eq!(m.head::<u64>().unwrap(), n);
    b.send(&(n + 1), vec![]).unwrap();
    let m = a.recv(LONG).unwrap().expect("message");
    assert_eq!(m.head::<u64>().unwrap(), n + 1);
}

/// Waits for an event matching `f`, returning it.
fn wait_event(a: &Alink, what: &str, f: impl Fn(&Event) -> bool) -> Event {
    let t = Instant::now();
    loop {
        assert!(t.elapsed() < LONG, "timed out waiting for {what}");
        if let Some(e) = a.poll_event(Duration::from_millis(20)) {
            if f(&e) {
                return e;
            }
        }
    }
}

fn refused_with(e: &Event, needle: &str) -> bool {
    matches!(e, Event::Refused { reason, .. } if reason.contains(needle))
}

/// The flapping case: the primary's next session (a fresh dialer) meets the standby's
/// OLD instance, still bound to the primary's previous instance. The old instance's
/// session ends at once with `PeerRestarted` (event and error), the new dialer refuses
/// it as stale, and its first message waits in its window: once the standby listens on a
/// fresh instance, the message reaches it, not the old one.
#[test]
fn a_new_peer_instance_ends_the_old_session_and_a_stale_one_is_refused() {
    init_log();
    let s1 = acceptor(&[any(), any()]);
    let addrs = s1.local_addrs().to_vec();
    let p1 = dialer(&addrs, None);
    wait_up(&p1, 2);
    wait_up(&s1, 2);
    exchange(&p1, &s1, 1);
    assert_eq!(s1.peer_incarnation(), Some(p1.incarnation()));
    assert_eq!(p1.peer_incarnation(), Some(s1.incarnation()));
    let (p1_inc, s1_inc) = (p1.incarnation(), s1.incarnation());
    drop(p1);

    // The primary's next session, while the standby's old instance still listens.
    let p2 = dialer(&addrs, None);
    assert_ne!(p2.incarnation(), p1_inc);
    p2.send(&100u64, vec![]).unwrap();
    let ev = wait_event(&s1, "the old instance's session to end", |e| {
        matches!(e, Event::PeerRestarted { .. })
    });
    assert_eq!(
        ev,
        Event::PeerRestarted {
            old: p1_inc,
            new: p2.incarnation()
        }
    );
    assert_eq!(s1.peer_restarted(), Some((p1_inc, p2.incarnation())));
    // Its layer above sees the distinct error, on receive and on send.
    match s1.recv(Duration::from_millis(100)) {
        Err(AlinkError::PeerRestarted { old, new }) => {
            assert_eq!((old, new), (p1_inc, p2.incarnation()))
        }
        other => panic!("expected PeerRestarted, got {other:?}"),
    }
    assert!(matches!(
        s1.send(&0u64, vec![]),
        Err(AlinkError::PeerRestarted { .. })
    ));
    // The new dialer refused the old instance: stale (bound to its predecessor).
    let ev = wait_event(&p2, "the stale instance refused", |e| {
        refused_with(e, "stale peer instance")
    });
    assert!(
        refused_with(&ev, &format!("{s1_inc:#018x}")),
        "names the stale instance: {ev:?}"
    );
    assert_eq!(
        p2.peer_incarnation(),
        None,
        "a stale instance binds nothing"
    );
    assert!(!p2.peer_reachable());

    // The standby listens on a fresh instance: the new session binds it, and the first
    // message (kept in the window meanwhile) arrives there.
    drop(s1);
    let s2 = acceptor(&addrs);
    let m = s2
        .recv(LONG)
        .unwrap()
        .expect("the first message of the new session");
    assert_eq!(m.head::<u64>().unwrap(), 100);
    assert_eq!(m.seq, 1);
    assert_eq!(p2.peer_incarnation(), Some(s2.incarnation()));
    assert_eq!(s2.peer_incarnation(), Some(p2.incarnation()));
    exchange(&p2, &s2, 200);
    assert_eq!((p2.peer_restarted(), s2.peer_restarted()), (None, None));
}

/// The other way round: the dialer's instance lives on while the acceptor's is replaced.
/// The fresh acceptor refuses the old dialer (stale: bound to the acceptor's previous
/// instance), and the old dialer's session ends with `PeerRestarted`: at once, not when
/// heartbeats time out.
#[test]
fn a_surviving_end_sees_its_peer_replaced() {
    init_log();
    let s1 = acceptor(&[any()]);
    let addrs = s1.local_addrs().to_vec();
    let p1 = dialer(&addrs, None);
    wait_up(&p1, 1);
    exchange(&p1, &s1, 1);
    let s1_inc = s1.incarnation();
    drop(s1);
    let s2 = acceptor(&addrs);
    let ev = wait_event(&p1, "the old dialer's session to end", |e| {
        matches!(e, Event::PeerRestarted { .. })
    });
    assert_eq!(
        ev,
        Event::PeerRestarted {
            old: s1_inc,
            new: s2.incarnation()
        }
    );
    assert!(matches!(
        p1.recv(Duration::from_millis(100)),
        Err(AlinkError::PeerRestarted { .. })
    ));
    wait_event(&s2, "the stale dialer refused", |e| {
        refused_with(e, "stale peer instance")
    });
    assert_eq!(s2.peer_incarnation(), None);
    // The dialer's next instance pairs with it.
    drop(p1);
    let p2 = dialer(&addrs, None);
    wait_up(&p2, 1);
    exchange(&p2, &s2, 10);
}

/// A peer of the version before the incarnations sends none: it pairs as before with a
/// node of the first version that has them (this build announcing it, as its
/// rolling-upgrade predecessor would: two versions apart never pair), and neither end
/// binds.
#[test]
fn a_peer_of_the_previous_version_pairs_without_incarnations() {
    init_log();
    let s = acceptor_at(&[any(), any()], Some(INCARNATION_SINCE));
    let p = dialer(s.local_addrs(), Some(INCARNATION_SINCE - 1));
    wait_up(&p, 2);
    wait_up(&s, 2);
    exchange(&p, &s, 1);
    assert_eq!(s.session_version(), INCARNATION_SINCE - 1);
    assert_eq!((s.peer_incarnation(), p.peer_incarnation()), (None, None));
    // Its links reconnect as before (no binding to refuse them).
    drop(p);
    let p = dialer(s.local_addrs(), Some(INCARNATION_SINCE - 1));
    wait_up(&p, 2);
    wait_up(&s, 2);
    assert_eq!(s.peer_restarted(), None);
}
