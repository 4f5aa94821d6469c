//! Throughput of the A-Link against raw TCP between the same two network namespaces (two
//! veth pairs), in the same run. Needs root.
//!
//!   cargo run --release -p alink --example netns_throughput [seconds] [pages-per-message]
//!
//! Prints a table and one JSON line.

use alink::{Alink, AlinkConfig, Bytes, LinkAddrs, WindowLimits};
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use twinrun_lab::netns::{in_netns, NsThread};
use twinrun_lab::Topology;

const SECRET: &[u8] = b"throughput-example-secret-0123";

/// PM `side`'s address on link `link`, port `port`.
fn addr(t: &Topology, link: usize, side: usize, port: u16) -> SocketAddr {
    SocketAddr::new(t.alink_addr(side, link).ip(), port)
}

/// `f` on a thread inside PM `side`'s namespace.
fn run_in<T: Send + 'static>(
    t: &Topology,
    side: usize,
    f: impl FnOnce() -> T + Send + 'static,
) -> NsThread<T> {
    in_netns(t.pm_ns(side), f).expect("enter the PM's namespace")
}

/// Raw TCP over `links` parallel streams (one per veth pair), `secs` seconds. Returns bytes/s
/// seen by the receiver.
fn raw_tcp(pair: &Topology, links: usize, secs: f64) -> f64 {
    let mut receivers = Vec::new();
    let mut ready = Vec::new();
    for l in 0..links {
        let addr = addr(pair, l, 1, 7600 + l as u16);
        let (tx, rx) = std::sync::mpsc::channel();
        ready.push(rx);
        receivers.push(run_in(pair, 1, move || {
            let lsn = TcpListener::bind(addr).unwrap();
            tx.send(()).unwrap();
            let (mut s, _) = lsn.accept().unwrap();
            let mut buf = vec![0u8; 1 << 20];
            let mut total = 0u64;
            let start = Instant::now();
            loop {
                match s.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => total += n as u64,
                }
            }
            (total, start.elapsed())
        }));
    }
    for r in &ready {
        r.recv().unwrap();
    }
    let mut senders = Vec::new();
    for l in 0..links {
        let addr = addr(pair, l, 1, 7600 + l as u16);
        senders.push(run_in(pair, 0, move || {
            let mut s = TcpStream::connect(addr).unwrap();
            let buf = vec![0x5au8; 1 << 20];
            let end = Instant::now() + Duration::from_secs_f64(secs);
            while Instant::now() < end {
                s.write_all(&buf).unwrap();
            }
        }));
    }
    for s in senders {
        s.join().unwrap();
    }
    let mut bytes = 0u64;
    let mut time = Duration::ZERO;
    for r in receivers {
        let (b, t) = r.join().unwrap();
        bytes += b;
        time = time.max(t);
    }
    bytes as f64 / time.as_secs_f64()
}

fn alink_cfg(pair: &Topology, side: usize, links: usize) -> AlinkConfig {
    let addrs = (0..links)
        .map(|l| LinkAddrs {
            local: addr(pair, l, side, if side == 1 { 7700 } else { 0 }),
            remote: addr(pair, l, 1 - side, if side == 0 { 7700 } else { 0 }),
        })
        .collect();
    let (me, peer) = if side == 0 { (1, 2) } else { (2, 1) };
    let mut c = AlinkConfig::new(1, me, peer, SECRET, addrs);
    c.window = WindowLimits {
        max_msgs: 1024,
        max_bytes: 128 << 20,
    };
    c
}

/// A-Link with `links` links, messages of `pages` 4 KiB pages (one iovec per page).
fn alink(pair: &Topology, links: usize, pages: usize, secs: f64) -> f64 {
    let (cb, ca) = (alink_cfg(pair, 1, links), alink_cfg(pair, 0, links));
    let b = run_in(pair, 1, move || Alink::start(cb))
        .join()
        .unwrap()
        .unwrap();
    let a = run_in(pair, 0, move || Alink::start(ca))
        .join()
        .unwrap()
        .unwrap();
    let t = Instant::now();
    while a.link_status().iter().any(|s| !s.up) {
        assert!(t.elapsed() < Duration::from_secs(10), "links up");
        std::thread::sleep(Duration::from_millis(5));
    }
    // A staging area like the checkpoint code would have; messages are views into it.
    let staging = Bytes::from(vec![0xa5u8; 64 << 20]);
    let done = Arc::new(AtomicBool::new(false));
    let d = done.clone();
    let receiver = std::thread::spawn(move || {
        let mut bytes = 0u64;
        let mut first = None;
        let mut last = Instant::now();
        loop {
            match b.recv(Duration::from_millis(100)).unwrap() {
                Some(m) => {
                    first.get_or_insert_with(Instant::now);
                    bytes += m.body.len() as u64;
                    last = Instant::now();
                }
                None if d.load(Ordering::Relaxed) => break,
                None => {}
            }
        }
        (bytes, last - first.unwrap_or(last))
    });
    let end = Instant::now() + Duration::from_secs_f64(secs);
    let mut off = 0usize;
    let mut n = 0u64;
    while Instant::now() < end {
        let mut chunk = Vec::with_capacity(pages);
        for _ in 0..pages {
            if off + 4096 > staging.len() {
                off = 0;
            }
            chunk.push(staging.slice(off..off + 4096));
            off += 4096;
        }
        a.send(&n, chunk).unwrap();
        n += 1;
    }
    a.flush(Duration::from_secs(30)).unwrap();
    done.store(true, Ordering::Relaxed);
    let (bytes, time) = receiver.join().unwrap();
    while let Some(e) = a.poll_event(Duration::ZERO) {
        eprintln!("  event during the {links}-link run: {e:?}");
    }
    drop(a);
    bytes as f64 / time.as_secs_f64()
}

fn main() {
    env_logger::init();
    let args: Vec<String> = std::env::args().collect();
    let secs: f64 = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(3.0);
    let pages: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(256);
    if !twinrun_lab::can_build_namespaces() {
        eprintln!("needs root and iproute2");
        std::process::exit(2);
    }
    let pair = Topology::builder().alinks(2).build().expect("namespaces");
    let gb = |x: f64| x / 1e9;
    let raw1 = raw_tcp(&pair, 1, secs);
    let raw2 = raw_tcp(&pair, 2, secs);
    let al1 = alink(&pair, 1, pages, secs);
    let al2 = alink(&pair, 2, pages, secs);
    println!("raw TCP, 1 stream          : {:6.3} GB/s", gb(raw1));
    println!("raw TCP, 2 streams (2 links): {:6.3} GB/s", gb(raw2));
    println!(
        "A-Link, 1 link             : {:6.3} GB/s ({:.0} % of raw 1 stream)",
        gb(al1),
        100.0 * al1 / raw1
    );
    println!(
        "A-Link, 2 links            : {:6.3} GB/s ({:.0} % of raw 2 streams)",
        gb(al2),
        100.0 * al2 / raw2
    );
    println!(
        "{{\"pages_per_message\":{pages},\"raw_tcp_1_gbps\":{:.3},\"raw_tcp_2_gbps\":{:.3},\"alink_1_gbps\":{:.3},\"alink_2_gbps\":{:.3},\"ratio_1\":{:.3},\"ratio_2\":{:.3}}}",
        gb(raw1),
        gb(raw2),
        gb(al1),
        gb(al2),
        al1 / raw1,
        al2 / raw2
    );
}
