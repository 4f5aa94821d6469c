//! A RESP (Redis protocol) client for the guest's kv server: one TCP connection,
//! commands sent as arrays of bulk strings, one reply read per command.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

/// A RESP reply (the kinds the kv server sends).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    Simple(String),
    Error(String),
    Int(i64),
    /// `None`: the null bulk string (no such key).
    Bulk(Option<Vec<u8>>),
}

impl Reply {
    /// The bulk string as text, if that is what it is.
    pub fn text(&self) -> Option<String> {
        match self {
            Reply::Bulk(Some(v)) => Some(String::from_utf8_lossy(v).into_owned()),
            _ => None,
        }
    }
}

/// Largest bulk reply accepted.
const MAX_BULK: usize = 64 << 20;

/// One RESP connection.
#[derive(Debug)]
pub struct Resp {
    addr: SocketAddr,
    w: TcpStream,
    r: BufReader<TcpStream>,
}

impl Resp {
    /// Connects within `timeout`; each reply is then awaited `timeout` at most.
    pub fn connect(addr: SocketAddr, timeout: Duration) -> io::Result<Resp> {
        Self::connect_with(addr, timeout, timeout)
    }

    /// Connects within `connect`; each reply is then awaited `read` at most.
    pub fn connect_with(addr: SocketAddr, connect: Duration, read: Duration) -> io::Result<Resp> {
        let s = TcpStream::connect_timeout(&addr, connect)?;
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(read))?;
        Ok(Resp {
            addr,
            r: BufReader::new(s.try_clone()?),
            w: s,
        })
    }

    /// [`Resp::connect_with`] again and again (every 100 ms) until it works or `for_`
    /// has passed: for a server that is still coming up. Only the connect is retried.
    pub fn connect_retry(
        addr: SocketAddr,
        connect: Duration,
        read: Duration,
        for_: Duration,
    ) -> io::Result<Resp> {
        let t0 = Instant::now();
        loop {
            match Self::connect_with(addr, connect, read) {
                Ok(c) => return Ok(c),
                Err(e) if t0.elapsed() > for_ => return Err(e),
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }

    /// The server's address.
    pub fn peer(&self) -> SocketAddr {
        self.addr
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.w.local_addr()
    }

    /// Sends one command and reads its reply.
    pub fn cmd(&mut self, args: &[&[u8]]) -> io::Result<Reply> {
        let mut buf = format!("*{}\r\n", args.len()).into_bytes();
        for a in args {
            buf.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
            buf.extend_from_slice(a);
            buf.extend_from_slice(b"\r\n");
        }
        self.w.write_all(&buf)?;
        self.reply()
    }

    /// [`Resp::cmd`] with text arguments.
    pub fn call(&mut self, args: &[&str]) -> io::Result<Reply> {
        let args: Vec<&[u8]> = args.iter().map(|a| a.as_bytes()).collect();
        self.cmd(&args)
    }

    fn line(&mut self) -> io::Result<String> {
        let mut l = String::new();
        if self.r.read_line(&mut l)? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "connection closed by the server",
            ));
        }
        match l.strip_suffix("\r\n") {
            Some(s) => Ok(s.to_string()),
            None => Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("reply line not ended by CRLF: {l:?}"),
            )),
        }
    }

    fn reply(&mut self) -> io::Result<Reply> {
        let l = self.line()?;
        let bad = || io::Error::new(io::ErrorKind::InvalidData, format!("bad reply {l:?}"));
        let (t, rest) = l.split_at_checked(1).ok_or_else(bad)?;
        match t {
            "+" => Ok(Reply::Simple(rest.into())),
            "-" => Ok(Reply::Error(rest.into())),
            ":" => Ok(Reply::Int(rest.parse().map_err(|_| bad())?)),
            "$" => {
                let n: i64 = rest.parse().map_err(|_| bad())?;
                if n < 0 {
                    return Ok(Reply::Bulk(None));
                }
                let n = usize::try_from(n)
                    .ok()
                    .filter(|&n| n <= MAX_BULK)
                    .ok_or_else(bad)?;
                let mut v = vec![0u8; n + 2];
                self.r.read_exact(&mut v)?;
                if !v.ends_with(b"\r\n") {
                    return Err(bad());
                }
                v.truncate(n);
                Ok(Reply::Bulk(Some(v)))
            }
            _ => Err(bad()),
        }
    }
}
