//! `kv`: a RESP key-value server on smoltcp over virtio-net. A fixed pool of TCP
//! sockets listens on the port; each connection has bounded input and output buffers,
//! commands are parsed and executed as they arrive (pipelining works naturally), and a
//! socket that closes goes back to listening.

use crate::hw::console::Console;
use crate::hw::net::Net;
use alloc::vec::Vec;
use core::ops::Range;
use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::socket::tcp;
use smoltcp::time::Instant;
use smoltcp::wire::{EthernetAddress, HardwareAddress, IpCidr, Ipv4Address};
use twinrun_guest::pace::tsc_to_micros;
use twinrun_guest::resp::{self, reply};
use twinrun_guest::store::{Args, Outcome, Store};

/// Sockets in the pool. redis-benchmark uses 50 clients by default and opens a fresh
/// 50 for each test while the previous 50 are still closing (LAST-ACK), so the pool
/// must hold both generations: with 72 sockets the second test's connections stalled.
const SOCKETS: usize = 128;
const SOCK_RX: usize = 8 * 1024;
const SOCK_TX: usize = 16 * 1024;
/// Buffered request bytes per connection: a whole command must fit.
const MAX_IN: usize = resp::MAX_BULK + 4096;
/// Stop executing commands while this many reply bytes wait to be sent.
const OUT_HIGH: usize = 64 * 1024;

/// The kv server's network settings (from `Params`).
pub struct KvConfig {
    pub ip: [u8; 4],
    pub prefix: u8,
    pub gateway: [u8; 4],
    pub port: u16,
    /// Budget for stored keys and values.
    pub store_bytes: usize,
}

#[derive(Default)]
struct Conn {
    input: Vec<u8>,
    out: Vec<u8>,
    sent: usize,
    ranges: Vec<Range<usize>>,
    /// Close once `out` is sent (QUIT or protocol error).
    closing: bool,
}

impl Conn {
    fn reset(&mut self) {
        self.input = Vec::new();
        self.out = Vec::new();
        self.sent = 0;
        self.ranges.clear();
        self.closing = false;
    }

    /// Executes every complete command in `input`, appending replies to `out`.
    fn process(&mut self, store: &mut Store) {
        let mut pos = 0;
        while !self.closing && self.out.len() - self.sent < OUT_HIGH {
            match resp::parse(&self.input[pos..], &mut self.ranges) {
                Ok(Some(used)) => {
                    let args = Args::new(&self.input[pos..], &self.ranges);
                    if store.exec(args, &mut self.out) == Outcome::Close {
                        self.closing = true;
                    }
                    pos += used;
                }
                Ok(None) => {
                    if self.input.len() - pos >= MAX_IN {
                        reply::error(&mut self.out, &[b"ERR Protocol error: request too large"]);
                        self.closing = true;
                    }
                    break;
                }
                Err(e) => {
                    reply::error(&mut self.out, &[b"ERR ", e.0.as_bytes()]);
                    self.closing = true;
                }
            }
        }
        self.input.drain(..pos);
    }
}

pub struct Kv {
    iface: Interface,
    sockets: SocketSet<'static>,
    handles: Vec<SocketHandle>,
    conns: Vec<Conn>,
    store: Store,
    port: u16,
    tsc_khz: u64,
}

impl Kv {
    pub fn new(net: &mut Net, cfg: &KvConfig, now: u64, tsc_khz: u64, con: &mut Console) -> Self {
        let ts = Instant::from_micros(tsc_to_micros(now, tsc_khz) as i64);
        let mut config = Config::new(HardwareAddress::Ethernet(EthernetAddress(net.mac)));
        config.random_seed = now ^ 0x9E37_79B9_7F4A_7C15;
        let mut iface = Interface::new(config, net, ts);
        let ip = cfg.ip;
        let addr = Ipv4Address::new(ip[0], ip[1], ip[2], ip[3]);
        iface.update_ip_addrs(|a| {
            if a.push(IpCidr::new(addr.into(), cfg.prefix.min(32)))
                .is_err()
            {
                panic!("cannot add kv address");
            }
        });
        let gw = cfg.gateway;
        if gw != [0; 4] {
            let gw = Ipv4Address::new(gw[0], gw[1], gw[2], gw[3]);
            if iface.routes_mut().add_default_ipv4_route(gw).is_err() {
                panic!("cannot add kv default route");
            }
        }
        let mut sockets = SocketSet::new(Vec::new());
        let mut handles = Vec::with_capacity(SOCKETS);
        let mut conns = Vec::with_capacity(SOCKETS);
        for _ in 0..SOCKETS {
            let rx = tcp::SocketBuffer::new(alloc::vec![0u8; SOCK_RX]);
            let tx = tcp::SocketBuffer::new(alloc::vec![0u8; SOCK_TX]);
            let mut s = tcp::Socket::new(rx, tx);
            s.set_nagle_enabled(false);
            if s.listen(cfg.port).is_err() {
                panic!("kv port {} cannot be listened on", cfg.port);
            }
            handles.push(sockets.add(s));
            conns.push(Conn::default());
        }
        con.line(format_args!(
            "KV listening {}.{}.{}.{}:{}",
            ip[0], ip[1], ip[2], ip[3], cfg.port
        ));
        Kv {
            iface,
            sockets,
            handles,
            conns,
            store: Store::new(cfg.store_bytes),
            port: cfg.port,
            tsc_khz,
        }
    }

    pub fn poll(&mut self, now: u64, net: &mut Net) {
        let ts = Instant::from_micros(tsc_to_micros(now, self.tsc_khz) as i64);
        self.iface.poll(ts, net, &mut self.sockets);
        for i in 0..self.handles.len() {
            self.service(i);
        }
        // Send the replies just queued without waiting for the next round.
        self.iface.poll(ts, net, &mut self.sockets);
        net.kick();
    }

    fn service(&mut self, i: usize) {
        let s = self.sockets.get_mut::<tcp::Socket>(self.handles[i]);
        let c = &mut self.conns[i];
        if !s.is_open() {
            // Closed (after a close or reset): back to the listening pool.
            c.reset();
            let _ = s.listen(self.port);
            return;
        }
        if s.state() == tcp::State::Listen {
            return;
        }
        while s.can_recv() && c.input.len() < MAX_IN && !c.closing {
            let room = MAX_IN - c.input.len();
            let got = s.recv(|b| {
                let n = b.len().min(room);
                c.input.extend_from_slice(&b[..n]);
                (n, n)
            });
            if !matches!(got, Ok(n) if n > 0) {
                break;
            }
        }
        c.process(&mut self.store);
        while c.sent < c.out.len() && s.can_send() {
            match s.send_slice(&c.out[c.sent..]) {
                Ok(n) if n > 0 => c.sent += n,
                _ => break,
            }
        }
        if c.sent == c.out.len() {
            c.out.clear();
            c.sent = 0;
            // We decided to close, or the peer finished sending and everything it sent
            // is answered (a partial command left then can never complete): send FIN
            // (queued data still goes out first).
            let st = s.state();
            let live = matches!(st, tcp::State::Established | tcp::State::CloseWait);
            if live && (c.closing || st == tcp::State::CloseWait) {
                s.close();
            }
        } else if c.sent > OUT_HIGH {
            c.out.drain(..c.sent);
            c.sent = 0;
        }
    }
}
