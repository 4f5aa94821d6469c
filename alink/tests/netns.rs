//! A-Link between two PMs (network namespaces of `twinrun_lab::Topology`) over two veth
//! pairs: cutting one link mid-stream loses nothing and does not interrupt delivery;
//! restoring it brings it back into use. Needs root (skips with a message otherwise).

use std::net::SocketAddr;
use std::thread;
use std::time::{Duration, Instant};

use alink::linkset::LinkEvent;
use alink::{Alink, AlinkConfig, Bytes, Event, LinkAddrs, WindowLimits};
use serde::{Deserialize, Serialize};
use twinrun_lab::netns::in_netns;
use twinrun_lab::{can_build_namespaces, Topology};

const SECRET: &[u8] = b"netns-test-cluster-secret-0123";
const PORT: u16 = 7411;

#[derive(Serialize, Deserialize)]
struct Head {
    n: u64,
}

/// PM `side`'s address on link `link`, port `port`.
fn addr(topo: &Topology, link: usize, side: usize, port: u16) -> SocketAddr {
    SocketAddr::new(topo.alink_addr(side, link).ip(), port)
}

fn cfg(topo: &Topology, side: usize) -> AlinkConfig {
    let links = (0..2)
        .map(|l| {
            if side == 0 {
                LinkAddrs {
                    local: addr(topo, l, 0, 0),
                    remote: addr(topo, l, 1, PORT),
                }
            } else {
                LinkAddrs {
                    local: addr(topo, l, 1, PORT),
                    remote: addr(topo, l, 0, 0),
                }
            }
        })
        .collect();
    let (me, peer) = if side == 0 { (1, 2) } else { (2, 1) };
    let mut c = AlinkConfig::new(0x7717, me, peer, SECRET, links);
    c.health.interval = Duration::from_millis(50);
    c.health.misses = 6;
    c.reconnect_max = Duration::from_millis(200);
    c.window = WindowLimits {
        max_msgs: 512,
        max_bytes: 64 << 20,
    };
    c
}

fn payload(n: u64) -> Vec<Bytes> {
    (0..4u8)
        .map(|i| Bytes::from(vec![(n as u8).wrapping_add(i); 4096]))
        .collect()
}

fn wait_links(a: &Alink, want: impl Fn(&[alink::LinkStatus]) -> bool, what: &str) {
    let t = Instant::now();
    while !want(&a.link_status()) {
        assert!(
            t.elapsed() < Duration::from_secs(15),
            "timed out waiting: {what}"
        );
        thread::sleep(Duration::from_millis(5));
    }
}

/// Two PMs with two A-Links, or `None` (with a message) where namespaces cannot be made.
fn topology() -> Option<Topology> {
    let _ = env_logger::builder().is_test(true).try_init();
    if !can_build_namespaces() {
        eprintln!("SKIP: needs root and iproute2 for network namespaces");
        return None;
    }
    Some(Topology::builder().alinks(2).build().expect("namespaces"))
}

/// Both ends, each started inside its PM's namespace (the listening side first); once
/// both links are up.
fn start_pair(topo: &Topology) -> (Alink, Alink) {
    let start = |side: usize| {
        let c = cfg(topo, side);
        in_netns(topo.pm_ns(side), move || Alink::start(c))
            .and_then(|t| t.join())
            .unwrap()
            .unwrap()
    };
    let b = start(1);
    let a = start(0);
    wait_links(&a, |s| s.iter().all(|l| l.up), "both links up");
    (a, b)
}

#[test]
fn cut_one_of_two_links_mid_stream_then_restore() {
    let Some(topo) = topology() else { return };
    let (a, b) = start_pair(&topo);

    let total = 6000u64;
    let consumer = thread::spawn(move || {
        let mut max_gap = Duration::ZERO;
        let mut last = Instant::now();
        for n in 0..total {
            let m = b
                .recv(Duration::from_secs(10))
                .unwrap()
                .expect("stream stalled");
            let h: Head = m.head().unwrap();
            assert_eq!(h.n, n, "in order, nothing lost");
            let want: Vec<u8> = payload(n).iter().flat_map(|p| p.to_vec()).collect();
            assert_eq!(m.payload(), &want[..]);
            let now = Instant::now();
            max_gap = max_gap.max(now - last);
            last = now;
        }
        (b, max_gap)
    });

    let mut sent_on_1_after_restore = None;
    for n in 0..total {
        if n == 1500 {
            topo.set_alink(0, 1, false).unwrap();
        }
        if n == 3500 {
            topo.set_alink(0, 1, true).unwrap();
        }
        if n == 4000 {
            wait_links(&a, |s| s[1].up, "link 1 back up");
            sent_on_1_after_restore = Some(a.link_status()[1].sent_msgs);
        }
        a.send(&Head { n }, payload(n)).unwrap();
        thread::sleep(Duration::from_micros(500));
    }
    a.flush(Duration::from_secs(15)).unwrap();
    let (b, max_gap) = consumer.join().unwrap();

    let st = a.link_status();
    println!("link status: {st:?}; max gap between deliveries {max_gap:?}; duplicates dropped by receiver {}", b.duplicates_dropped());
    assert!(
        st[1].sent_msgs > sent_on_1_after_restore.unwrap() + 100,
        "restored link carries traffic again: {st:?}"
    );
    assert!(st[1].connections >= 2, "link 1 reconnected");
    assert_eq!(st[0].connections, 1, "link 0 never dropped");
    assert!(
        max_gap < Duration::from_secs(1),
        "no interruption: max gap {max_gap:?}"
    );

    let mut events = Vec::new();
    while let Some(e) = a.poll_event(Duration::ZERO) {
        events.push(e);
    }
    assert!(
        events.contains(&Event::Link(LinkEvent::LinkDown(1))),
        "{events:?}"
    );
    assert!(
        !events.contains(&Event::Link(LinkEvent::PeerUnreachable)),
        "peer stayed reachable: {events:?}"
    );
    drop(a);
    drop(b);
}

#[test]
fn all_links_cut_reports_peer_unreachable_then_recovers() {
    let Some(topo) = topology() else { return };
    let (a, b) = start_pair(&topo);
    for n in 0..10 {
        a.send(&Head { n }, payload(n)).unwrap();
    }
    topo.set_alink(0, 0, false).unwrap();
    topo.set_alink(0, 1, false).unwrap();
    let t = Instant::now();
    let mut unreachable = None;
    while t.elapsed() < Duration::from_secs(5) {
        if let Some(Event::Link(LinkEvent::PeerUnreachable)) =
            a.poll_event(Duration::from_millis(20))
        {
            unreachable = Some(t.elapsed());
            break;
        }
    }
    let detect = unreachable.expect("PeerUnreachable reported");
    println!("peer unreachable detected {detect:?} after cutting both links");
    assert!(detect < Duration::from_secs(1));
    assert!(!a.peer_reachable());
    // Messages sent while unreachable wait, then flow when a link returns.
    for n in 10..20 {
        a.send(&Head { n }, payload(n)).unwrap();
    }
    topo.set_alink(0, 0, true).unwrap();
    for n in 0..20 {
        let m = b
            .recv(Duration::from_secs(10))
            .unwrap()
            .expect("delivery after recovery");
        assert_eq!(m.head::<Head>().unwrap().n, n);
    }
    assert!(a.peer_reachable());
}
