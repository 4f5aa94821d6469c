//! The demo's kv client: one TCP connection from inside the client's network namespace
//! (a thread that `setns`es into it), speaking RESP to the guest's kv server. It writes
//! `SET k<i> v<i>` in a loop (and an `INCR` every tenth request), remembers every
//! acknowledged write, keeps going across the failover on the same connection
//! (reconnecting only if the connection really broke), then reads everything back.

use std::io::{self, BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Reply wait: a failover takes well under a second; the guest's TCP retransmits.
const READ_TIMEOUT: Duration = Duration::from_secs(20);
const CONNECT_FOR: Duration = Duration::from_secs(20);
const INCR_KEY: &str = "demo-counter";

/// Shared with the demo's main thread.
#[derive(Default)]
pub struct ClientCtl {
    /// Stop writing and read back.
    pub stop: AtomicBool,
    /// Acknowledged SETs so far.
    pub acked: AtomicU64,
    /// When the primary was killed, and the first reply completed after it.
    pub killed_at: Mutex<Option<Instant>>,
    pub first_reply_after_kill: Mutex<Option<Instant>>,
}

/// What the client saw.
#[derive(Clone, Debug, Default)]
pub struct ClientReport {
    pub acked_writes: u64,
    pub lost_writes: u64,
    pub incr_acked: u64,
    /// The counter's value read back, and whether it matched the acknowledged INCRs.
    pub incr_final: Option<i64>,
    pub incr_ok: bool,
    pub connection_survived: bool,
    pub reconnects: u32,
    /// Longest wait for one reply.
    pub max_reply_ms: u64,
    pub errors: Vec<String>,
}

struct Conn {
    addr: SocketAddr,
    r: BufReader<TcpStream>,
    w: TcpStream,
}

impl Conn {
    fn open(addr: SocketAddr) -> io::Result<Conn> {
        let t0 = Instant::now();
        loop {
            match TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
                Ok(s) => {
                    s.set_nodelay(true)?;
                    s.set_read_timeout(Some(READ_TIMEOUT))?;
                    return Ok(Conn {
                        addr,
                        r: BufReader::new(s.try_clone()?),
                        w: s,
                    });
                }
                Err(e) if t0.elapsed() > CONNECT_FOR => return Err(e),
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }

    fn call(&mut self, args: &[&str]) -> io::Result<Reply> {
        let mut req = format!("*{}\r\n", args.len());
        for a in args {
            req.push_str(&format!("${}\r\n{a}\r\n", a.len()));
        }
        self.w.write_all(req.as_bytes())?;
        self.read_reply()
    }

    fn line(&mut self) -> io::Result<String> {
        let mut l = String::new();
        if self.r.read_line(&mut l)? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "connection closed",
            ));
        }
        if !l.ends_with("\r\n") {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("bad reply line {l:?}"),
            ));
        }
        l.truncate(l.len() - 2);
        Ok(l)
    }

    fn read_reply(&mut self) -> io::Result<Reply> {
        let l = self.line()?;
        let bad = || io::Error::new(io::ErrorKind::InvalidData, format!("bad reply {l:?}"));
        match l.as_bytes().first() {
            Some(b'+') => Ok(Reply::Simple(l[1..].to_string())),
            Some(b'-') => Ok(Reply::Error(l[1..].to_string())),
            Some(b':') => l[1..].parse().map(Reply::Int).map_err(|_| bad()),
            Some(b'$') => {
                let n: i64 = l[1..].parse().map_err(|_| bad())?;
                if n < 0 {
                    return Ok(Reply::Nil);
                }
                let mut buf = vec![0u8; n as usize + 2];
                io::Read::read_exact(&mut self.r, &mut buf)?;
                buf.truncate(n as usize);
                Ok(Reply::Bulk(String::from_utf8_lossy(&buf).into_owned()))
            }
            _ => Err(bad()),
        }
    }
}

#[derive(Debug, PartialEq)]
enum Reply {
    Simple(String),
    Error(String),
    Int(i64),
    Bulk(String),
    Nil,
}

/// Enters network namespace `ns` (this thread only).
pub fn enter_netns(ns: &str) -> io::Result<()> {
    let f = std::fs::File::open(super::topology::Topology::netns_path(ns))?;
    nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET).map_err(io::Error::from)
}

/// Runs the client to the end (until `ctl.stop`, then the read-back). Call it on a
/// thread of its own: it moves that thread into `ns`.
pub fn run(ns: &str, addr: SocketAddr, ctl: Arc<ClientCtl>) -> io::Result<ClientReport> {
    enter_netns(ns)?;
    let mut c = Conn::open(addr)?;
    let mut rep = ClientReport {
        connection_survived: true,
        ..ClientReport::default()
    };
    let mut acked_keys: Vec<u64> = Vec::new();
    let mut incr_uncertain = false;
    let mut i = 0u64;
    while !ctl.stop.load(Ordering::SeqCst) {
        i += 1;
        let incr = i.is_multiple_of(10);
        let key = format!("k{i}");
        let val = format!("v{i}");
        let t = Instant::now();
        let r = if incr {
            c.call(&["INCR", INCR_KEY])
        } else {
            c.call(&["SET", &key, &val])
        };
        let done = Instant::now();
        rep.max_reply_ms = rep.max_reply_ms.max((done - t).as_millis() as u64);
        let dead_at = *ctl.killed_at.lock().unwrap_or_else(|p| p.into_inner());
        if dead_at.is_some_and(|k| t >= k) {
            let mut f = ctl
                .first_reply_after_kill
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            if f.is_none() && r.is_ok() {
                *f = Some(done);
            }
        }
        match r {
            Ok(Reply::Simple(s)) if !incr && s == "OK" => {
                acked_keys.push(i);
                ctl.acked.store(acked_keys.len() as u64, Ordering::SeqCst);
            }
            Ok(Reply::Int(_)) if incr => rep.incr_acked += 1,
            Ok(other) => rep
                .errors
                .push(format!("request {i}: unexpected reply {other:?}")),
            Err(e) => {
                // The connection broke: the request's fate is unknown.
                rep.errors.push(format!("request {i}: {e}; reconnecting"));
                rep.connection_survived = false;
                rep.reconnects += 1;
                incr_uncertain |= incr;
                c = Conn::open(c.addr)?;
            }
        }
    }
    // Read back every acknowledged write, on the same connection if it survived.
    for &k in &acked_keys {
        let r = c.call(&["GET", &format!("k{k}")]);
        match r {
            Ok(Reply::Bulk(v)) if v == format!("v{k}") => {}
            Ok(other) => {
                rep.lost_writes += 1;
                if rep.errors.len() < 20 {
                    rep.errors.push(format!("k{k}: read back {other:?}"));
                }
            }
            Err(e) => {
                rep.errors.push(format!("read-back of k{k}: {e}"));
                rep.connection_survived = false;
                rep.lost_writes += 1;
                c = Conn::open(c.addr)?;
            }
        }
    }
    rep.acked_writes = acked_keys.len() as u64;
    match c.call(&["GET", INCR_KEY]) {
        Ok(Reply::Bulk(v)) => rep.incr_final = v.parse().ok(),
        Ok(Reply::Int(v)) => rep.incr_final = Some(v),
        Ok(Reply::Nil) => rep.incr_final = Some(0),
        Ok(other) => rep.errors.push(format!("GET {INCR_KEY}: {other:?}")),
        Err(e) => rep.errors.push(format!("GET {INCR_KEY}: {e}")),
    }
    rep.incr_ok = match rep.incr_final {
        Some(v) if incr_uncertain => v == rep.incr_acked as i64 || v == rep.incr_acked as i64 + 1,
        Some(v) => v == rep.incr_acked as i64,
        None => false,
    };
    Ok(rep)
}
