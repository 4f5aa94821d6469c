//! Round trip of a small message over an A-Link pair on loopback, against raw TCP
//! ping-pong on loopback: what the A-Link's threads add to a commit's wait.
//! `cargo run --release -p alink --example pingpong [rounds]`
use alink::{Alink, AlinkConfig, LinkAddrs};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

fn main() {
    let rounds: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(5000);
    let any: SocketAddr = "127.0.0.1:0".parse().expect("address literal");
    let secret = b"pingpong-example-cluster-secret";
    let b = Alink::start(AlinkConfig::new(
        3,
        2,
        1,
        secret,
        vec![LinkAddrs {
            local: any,
            remote: any,
        }],
    ))
    .expect("acceptor");
    let a = Alink::start(AlinkConfig::new(
        3,
        1,
        2,
        secret,
        vec![LinkAddrs {
            local: any,
            remote: b.local_addrs()[0],
        }],
    ))
    .expect("dialer");
    while !a.peer_reachable() || !b.peer_reachable() {
        std::thread::sleep(Duration::from_millis(5));
    }
    let echo = std::thread::spawn(move || {
        for _ in 0..rounds {
            let m = b.recv(Duration::from_secs(5)).expect("recv").expect("msg");
            let n: u64 = m.head().expect("head");
            b.send(&n, Vec::new()).expect("send");
        }
        b
    });
    let mut rtts = Vec::with_capacity(rounds);
    for i in 0..rounds as u64 {
        let t = Instant::now();
        a.send(&i, Vec::new()).expect("send");
        let m = a.recv(Duration::from_secs(5)).expect("recv").expect("msg");
        let n: u64 = m.head().expect("head");
        assert_eq!(n, i);
        rtts.push(t.elapsed());
    }
    let _b = echo.join();
    rtts.sort();
    // Raw TCP: same pattern, blocking reads and writes on both sides.
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = l.local_addr().expect("addr");
    let srv = std::thread::spawn(move || {
        let (mut s, _) = l.accept().expect("accept");
        s.set_nodelay(true).expect("nodelay");
        let mut buf = [0u8; 16];
        for _ in 0..rounds {
            s.read_exact(&mut buf).expect("read");
            s.write_all(&buf).expect("write");
        }
    });
    let mut c = TcpStream::connect(addr).expect("connect");
    c.set_nodelay(true).expect("nodelay");
    let mut raw = Vec::with_capacity(rounds);
    let mut buf = [0u8; 16];
    for _ in 0..rounds {
        let t = Instant::now();
        c.write_all(&buf).expect("write");
        c.read_exact(&mut buf).expect("read");
        raw.push(t.elapsed());
    }
    srv.join().expect("server");
    raw.sort();
    let p = |v: &[Duration], q: f64| v[((v.len() - 1) as f64 * q) as usize];
    println!(
        "A-Link round trip p50 {:?} p90 {:?}; raw TCP p50 {:?} p90 {:?}",
        p(&rtts, 0.5),
        p(&rtts, 0.9),
        p(&raw, 0.5),
        p(&raw, 0.9)
    );
}
