//! A-Link over loopback TCP in one process: delivery, and refusal of bad connections while a
//! good stream keeps flowing.

use alink::frame::{FrameEncoder, Kind};
use alink::{Alink, AlinkConfig, AlinkError, Bytes, Event, LinkAddrs, WindowLimits};
use serde::{Deserialize, Serialize};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

const SECRET: &[u8] = b"loopback-test-cluster-secret";

#[derive(Serialize, Deserialize, Debug, PartialEq)]
struct Head {
    n: u64,
    pages: u32,
}

fn init_log() {
    let _ = env_logger::builder().is_test(true).try_init();
}

fn any() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

fn fast(mut c: AlinkConfig) -> AlinkConfig {
    // Short, but not so short that a loaded 2-core CI machine misses heartbeats.
    c.health.interval = Duration::from_millis(50);
    c.health.misses = 5;
    c.window = WindowLimits {
        max_msgs: 256,
        max_bytes: 32 << 20,
    };
    c
}

/// Starts the accepting end (node 2) with `n` links on ephemeral ports and a dialer (node 1)
/// pointed at the given addresses (possibly through proxies).
fn acceptor(n: usize) -> Alink {
    let links = (0..n)
        .map(|_| LinkAddrs {
            local: any(),
            remote: any(),
        })
        .collect();
    Alink::start(fast(AlinkConfig::new(7, 2, 1, SECRET, links))).unwrap()
}

fn dialer(to: &[SocketAddr], secret: &[u8], cluster: u64, version: u16) -> Alink {
    let links = to
        .iter()
        .map(|r| LinkAddrs {
            local: any(),
            remote: *r,
        })
        .collect();
    let mut c = fast(AlinkConfig::new(cluster, 1, 2, secret, links));
    c.protocol_version = version;
    Alink::start(c).unwrap()
}

fn wait_up(a: &Alink, n: usize) {
    let t = Instant::now();
    while a.link_status().iter().filter(|s| s.up).count() < n {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "links did not come up"
        );
        thread::sleep(Duration::from_millis(5));
    }
}

fn page(n: u64, i: u32) -> Bytes {
    let mut v = vec![0u8; 4096];
    for (k, b) in v.iter_mut().enumerate() {
        *b = (n as usize * 31 + i as usize * 7 + k) as u8;
    }
    Bytes::from(v)
}

fn check(m: &alink::InMsg, expect: u64) {
    let h: Head = m.head().unwrap();
    assert_eq!(h.n, expect, "in order");
    assert_eq!(m.payload().len(), h.pages as usize * 4096);
    for i in 0..h.pages {
        let p = &m.payload()[i as usize * 4096..(i as usize + 1) * 4096];
        assert_eq!(p, &page(h.n, i)[..], "payload of message {} page {i}", h.n);
    }
}

#[test]
fn ordered_complete_delivery_over_two_links() {
    init_log();
    let b = acceptor(2);
    let a = dialer(b.local_addrs(), SECRET, 7, alink::PROTOCOL_VERSION);
    wait_up(&a, 2);
    wait_up(&b, 2);
    let total = 3000u64;
    let recv = thread::spawn(move || {
        for n in 0..total {
            let m = b.recv(Duration::from_secs(10)).unwrap().expect("message");
            check(&m, n);
        }
        b
    });
    for n in 0..total {
        let pages = (n % 5) as u32;
        let payload = (0..pages).map(|i| page(n, i)).collect();
        a.send(&Head { n, pages }, payload).unwrap();
    }
    a.flush(Duration::from_secs(10)).unwrap();
    let _b = recv.join().unwrap();
    let st = a.link_status();
    assert!(
        st[0].sent_msgs > 0 && st[1].sent_msgs > 0,
        "both links used: {st:?}"
    );
    assert_eq!(st[0].sent_msgs + st[1].sent_msgs, total);
}

/// Forwards one TCP connection at a time and records the client-to-server bytes.
struct RecordingProxy {
    addr: SocketAddr,
    recorded: Arc<Mutex<Vec<u8>>>,
    stop: Arc<AtomicBool>,
}

impl RecordingProxy {
    fn start(target: SocketAddr) -> RecordingProxy {
        let l = TcpListener::bind(any()).unwrap();
        let addr = l.local_addr().unwrap();
        let recorded = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (rec, st) = (recorded.clone(), stop.clone());
        l.set_nonblocking(true).unwrap();
        thread::spawn(move || {
            while !st.load(Ordering::Relaxed) {
                let Ok((c, _)) = l.accept() else {
                    thread::sleep(Duration::from_millis(5));
                    continue;
                };
                c.set_nonblocking(false).unwrap();
                let Ok(s) = TcpStream::connect(target) else {
                    continue;
                };
                let (mut c2, mut s2) = (c.try_clone().unwrap(), s.try_clone().unwrap());
                let rec = rec.clone();
                thread::spawn(move || {
                    let mut c = c;
                    let mut buf = [0u8; 65536];
                    while let Ok(n) = c.read(&mut buf) {
                        if n == 0 {
                            break;
                        }
                        let mut r = rec.lock().unwrap();
                        if r.len() < (1 << 20) {
                            r.extend_from_slice(&buf[..n]);
                        }
                        if s2.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                });
                thread::spawn(move || {
                    let mut s = s;
                    let _ = std::io::copy(&mut s, &mut c2);
                });
            }
        });
        RecordingProxy {
            addr,
            recorded,
            stop,
        }
    }
}

impl Drop for RecordingProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn wait_refusal(b: &Alink, what: &str) -> String {
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(10) {
        if let Some(Event::Refused { reason, .. }) = b.poll_event(Duration::from_millis(50)) {
            if reason.contains(what) {
                return reason;
            }
        }
    }
    panic!("no refusal containing {what:?}");
}

/// Sends raw bytes to the A-Link port and checks the acceptor drops the connection.
fn raw_attack(to: SocketAddr, bytes: &[u8]) {
    let mut s = TcpStream::connect(to).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let _ = s.write_all(bytes);
    // The acceptor sends its hello, then closes on us.
    let mut sink = Vec::new();
    let _ = s.read_to_end(&mut sink);
}

#[test]
fn bad_connections_refused_while_stream_continues() {
    init_log();
    let b = Arc::new(acceptor(1));
    // Link 0 of the good dialer goes through a recording proxy so we hold a captured session.
    let proxy = RecordingProxy::start(b.local_addrs()[0]);
    let a = dialer(&[proxy.addr], SECRET, 7, alink::PROTOCOL_VERSION);
    wait_up(&a, 1);

    // A steady good stream throughout.
    let stop = Arc::new(AtomicBool::new(false));
    // Number of messages the producer sent in all, once it stopped.
    let sent_total = Arc::new(AtomicU64::new(u64::MAX));
    let (bs, total) = (b.clone(), sent_total.clone());
    let consumer = thread::spawn(move || {
        let mut n = 0u64;
        while n < total.load(Ordering::Acquire) {
            if let Some(m) = bs.recv(Duration::from_millis(50)).unwrap() {
                check(&m, n);
                n += 1;
            }
        }
        n
    });
    let (st, total) = (stop.clone(), sent_total.clone());
    let producer = thread::spawn(move || {
        let mut n = 0u64;
        while !st.load(Ordering::Relaxed) {
            a.send(&Head { n, pages: 1 }, vec![page(n, 0)]).unwrap();
            n += 1;
            thread::sleep(Duration::from_millis(1));
        }
        total.store(n, Ordering::Release);
        a.flush(Duration::from_secs(10)).unwrap();
        (a, n)
    });
    thread::sleep(Duration::from_millis(200));
    let port = b.local_addrs()[0];

    // 1. Garbage.
    raw_attack(port, &[0x5a; 300]);
    println!("refused: {}", wait_refusal(&b, "bad magic"));

    // 2. A well-formed but unauthenticated data frame, without a handshake.
    let mut enc = FrameEncoder::new(1 << 20);
    let f = enc.encode(Kind::Data, 1, b"", b"inject").unwrap();
    raw_attack(port, &f);
    println!("refused: {}", wait_refusal(&b, "not allowed in this phase"));

    // 3. Data frame keyed with a guessed session key after a hello.
    let mut enc = FrameEncoder::new(1 << 20);
    enc.set_session_key(&[0u8; 32]);
    let f = enc.encode(Kind::Data, 1, b"", b"inject").unwrap();
    raw_attack(port, &f);
    println!("refused: {}", wait_refusal(&b, "tag does not verify"));

    // 4. Replay of the captured session (hello, auth, authenticated data frames).
    let captured = proxy.recorded.lock().unwrap().clone();
    assert!(captured.len() > 1000, "captured a real session");
    raw_attack(port, &captured);
    println!("refused: {}", wait_refusal(&b, "replayed handshake"));

    // 5. Wrong secret, wrong cluster id, wrong version: real A-Link dialers with one thing wrong.
    for (secret, cluster, version, what) in [
        (
            &b"a-different-cluster-secret!!"[..],
            7,
            alink::PROTOCOL_VERSION,
            "wrong cluster secret",
        ),
        (SECRET, 8, alink::PROTOCOL_VERSION, "cluster id mismatch"),
        (SECRET, 7, 99, "protocol version mismatch"),
    ] {
        let rogue = dialer(&[port], secret, cluster, version);
        println!("refused: {}", wait_refusal(&b, what));
        assert!(!rogue.peer_reachable());
        drop(rogue);
    }

    stop.store(true, Ordering::Relaxed);
    let (a, sent) = producer.join().unwrap();
    let received = consumer.join().unwrap();
    assert_eq!(sent, received, "nothing lost");
    // The good link was never replaced or dropped by the attacks.
    assert_eq!(a.link_status()[0].connections, 1, "good link stayed up");
    assert!(b.link_status()[0].refused >= 7);
}

#[test]
fn large_messages_of_many_pages() {
    init_log();
    let b = acceptor(2);
    let a = dialer(b.local_addrs(), SECRET, 7, alink::PROTOCOL_VERSION);
    wait_up(&a, 2);
    let staging = Bytes::from(
        (0..(8u32 << 20))
            .map(|i| (i * 7 + i / 4096) as u8)
            .collect::<Vec<u8>>(),
    );
    let total = 200u64;
    let st = staging.clone();
    let recv = thread::spawn(move || {
        for n in 0..total {
            let m = b.recv(Duration::from_secs(20)).unwrap().expect("message");
            assert_eq!(m.head::<u64>().unwrap(), n);
            let off = (n as usize * 4096 * 7) % (st.len() - 256 * 4096);
            assert_eq!(m.payload(), &st[off..off + 256 * 4096], "message {n}");
        }
        b
    });
    for n in 0..total {
        let off = (n as usize * 4096 * 7) % (staging.len() - 256 * 4096);
        let pages = (0..256)
            .map(|p| staging.slice(off + p * 4096..off + (p + 1) * 4096))
            .collect();
        a.send(&n, pages).unwrap();
    }
    a.flush(Duration::from_secs(30)).unwrap();
    let b = recv.join().unwrap();
    assert!(
        a.link_status().iter().all(|s| s.refused == 0),
        "{:?}",
        a.link_status()
    );
    // The consumer dropped each message before taking the next: the readers got their
    // receive buffers back instead of mapping new ones for every frame (at most the
    // frames in flight, two links, a window's worth, are new).
    let pool = b.rx_pool_stats();
    assert!(
        pool.reused >= total / 2 && pool.allocated <= total / 2,
        "{pool:?}"
    );
}

/// Rolling upgrade over real TCP: an acceptor at version N pairs with a dialer at N-1
/// (messages flow), and refuses dialers at N-2 and N+2 with both versions named.
#[test]
fn previous_protocol_version_pairs_and_two_apart_is_refused() {
    init_log();
    let n = alink::PROTOCOL_VERSION.max(2);
    let links = vec![LinkAddrs {
        local: any(),
        remote: any(),
    }];
    let mut c = fast(AlinkConfig::new(7, 2, 1, SECRET, links));
    c.protocol_version = n;
    let b = Alink::start(c).unwrap();

    let old = dialer(b.local_addrs(), SECRET, 7, n - 1);
    wait_up(&old, 1);
    wait_up(&b, 1);
    for k in 0..50u64 {
        old.send(&Head { n: k, pages: 1 }, vec![page(k, 0)])
            .unwrap();
    }
    // The window (256 messages) holds all 50: take them, then the sender sees them
    // consumed (flush waits for the peer's acks).
    for k in 0..50u64 {
        let m = b.recv(Duration::from_secs(10)).unwrap().expect("message");
        check(&m, k);
    }
    old.flush(Duration::from_secs(10)).unwrap();
    // Segmented frames are new in protocol 4: a session below it refuses them on both
    // sides before anything goes out (the older peer would drop the link).
    if n - 1 < alink::SEGMENTED_SINCE {
        assert_eq!(b.session_version(), n - 1);
        let data = [1u8; 4096];
        for (who, l) in [("old", &old), ("new", &b)] {
            let e = l
                .send_lent(
                    &[(&Head { n: 99, pages: 1 }, &[&data[..]][..])],
                    alink::SegOpts::default(),
                    Duration::from_secs(1),
                )
                .expect_err(who);
            assert!(
                matches!(e, AlinkError::SegmentedUnsupported { version, need }
                    if version == n - 1 && need == alink::SEGMENTED_SINCE),
                "{who}: {e}"
            );
            assert!(l
                .send_segmented(
                    &Head { n: 99, pages: 1 },
                    vec![page(99, 0)],
                    alink::SegOpts::default()
                )
                .is_err());
        }
        // The session goes on.
        old.send(&Head { n: 50, pages: 1 }, vec![page(50, 0)])
            .unwrap();
        check(
            &b.recv(Duration::from_secs(10)).unwrap().expect("message"),
            50,
        );
    }
    drop(old);

    for v in [n - 2, n + 2] {
        let rogue = dialer(b.local_addrs(), SECRET, 7, v);
        let why = wait_refusal(&b, "protocol version mismatch");
        assert!(
            why.contains(&format!("we speak {n}, peer speaks {v}")),
            "{why}"
        );
        assert!(!rogue.peer_reachable());
        drop(rogue);
    }
}
