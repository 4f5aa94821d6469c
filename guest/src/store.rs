//! The kv server's data and command executor: a byte-string map and the subset of
//! Redis commands that redis-cli and redis-benchmark need.

use crate::resp::{parse_int, reply};
use alloc::collections::BTreeMap;
use alloc::vec::Vec;
use core::ops::Range;

/// What the connection should do after a command.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Continue,
    /// Send what was written, then close (QUIT).
    Close,
}

/// The key space, with a memory budget so clients cannot exhaust the guest heap.
pub struct Store {
    map: BTreeMap<Vec<u8>, Vec<u8>>,
    bytes: usize,
    max_bytes: usize,
}

/// Per-entry bookkeeping counted against the budget besides key and value bytes.
const ENTRY_OVERHEAD: usize = 64;

/// One command's arguments: ranges into the connection's input buffer.
#[derive(Clone, Copy)]
pub struct Args<'a> {
    buf: &'a [u8],
    ranges: &'a [Range<usize>],
}

impl<'a> Args<'a> {
    pub fn new(buf: &'a [u8], ranges: &'a [Range<usize>]) -> Self {
        Args { buf, ranges }
    }
    pub fn len(&self) -> usize {
        self.ranges.len()
    }
    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }
    pub fn get(&self, i: usize) -> &'a [u8] {
        &self.buf[self.ranges[i].clone()]
    }
}

fn is(a: &[u8], name: &str) -> bool {
    a.eq_ignore_ascii_case(name.as_bytes())
}

fn wrong_args(out: &mut Vec<u8>, cmd: &[u8]) {
    reply::error(
        out,
        &[b"ERR wrong number of arguments for '", cmd, b"' command"],
    );
}

fn entry_cost(k: &[u8], v: &[u8]) -> usize {
    k.len() + v.len() + ENTRY_OVERHEAD
}

impl Store {
    pub fn new(max_bytes: usize) -> Self {
        Store {
            map: BTreeMap::new(),
            bytes: 0,
            max_bytes,
        }
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    pub fn get(&self, k: &[u8]) -> Option<&[u8]> {
        self.map.get(k).map(|v| v.as_slice())
    }

    /// Stores `k = v` if the budget allows; false when out of memory.
    fn put(&mut self, k: &[u8], v: &[u8]) -> bool {
        let old = self.map.get(k).map(|o| entry_cost(k, o)).unwrap_or(0);
        let new = entry_cost(k, v);
        if self.bytes - old + new > self.max_bytes {
            return false;
        }
        self.bytes = self.bytes - old + new;
        match self.map.get_mut(k) {
            Some(slot) => {
                slot.clear();
                slot.extend_from_slice(v);
            }
            None => {
                self.map.insert(k.to_vec(), v.to_vec());
            }
        }
        true
    }

    fn remove(&mut self, k: &[u8]) -> bool {
        match self.map.remove(k) {
            Some(v) => {
                self.bytes -= entry_cost(k, &v);
                true
            }
            None => false,
        }
    }

    fn oom(out: &mut Vec<u8>) {
        reply::error(
            out,
            &[b"OOM command not allowed when used memory > 'maxmemory'"],
        );
    }

    fn incr_by(&mut self, k: &[u8], by: i64, out: &mut Vec<u8>) {
        let cur = match self.map.get(k) {
            None => 0,
            Some(v) => match parse_int(v) {
                Some(n) => n,
                None => {
                    return reply::error(out, &[b"ERR value is not an integer or out of range"])
                }
            },
        };
        let Some(n) = cur.checked_add(by) else {
            return reply::error(out, &[b"ERR increment or decrement would overflow"]);
        };
        let mut tmp = Vec::new();
        reply::integer(&mut tmp, n);
        // tmp is ":<n>\r\n": the decimal digits are the value to store.
        if !self.put(k, &tmp[1..tmp.len() - 2]) {
            return Self::oom(out);
        }
        out.extend_from_slice(&tmp);
    }

    /// Executes one command (`args` non-empty), appending its reply to `out`.
    pub fn exec(&mut self, args: Args<'_>, out: &mut Vec<u8>) -> Outcome {
        if args.is_empty() {
            return Outcome::Continue;
        }
        let cmd = args.get(0);
        let n = args.len();
        if is(cmd, "PING") {
            match n {
                1 => reply::simple(out, b"PONG"),
                2 => reply::bulk(out, args.get(1)),
                _ => wrong_args(out, cmd),
            }
        } else if is(cmd, "ECHO") {
            if n != 2 {
                wrong_args(out, cmd);
            } else {
                reply::bulk(out, args.get(1));
            }
        } else if is(cmd, "SET") {
            self.set(args, out);
        } else if is(cmd, "GET") {
            if n != 2 {
                wrong_args(out, cmd);
            } else {
                match self.map.get(args.get(1)) {
                    Some(v) => reply::bulk(out, v),
                    None => reply::null(out),
                }
            }
        } else if is(cmd, "INCR") || is(cmd, "DECR") {
            if n != 2 {
                wrong_args(out, cmd);
            } else {
                let by = if is(cmd, "INCR") { 1 } else { -1 };
                self.incr_by(args.get(1), by, out);
            }
        } else if is(cmd, "INCRBY") || is(cmd, "DECRBY") {
            if n != 3 {
                wrong_args(out, cmd);
            } else {
                match parse_int(args.get(2)) {
                    Some(by) if is(cmd, "INCRBY") => self.incr_by(args.get(1), by, out),
                    Some(by) if by != i64::MIN => self.incr_by(args.get(1), -by, out),
                    _ => reply::error(out, &[b"ERR value is not an integer or out of range"]),
                }
            }
        } else if is(cmd, "DEL") || is(cmd, "UNLINK") {
            if n < 2 {
                wrong_args(out, cmd);
            } else {
                let removed = (1..n).filter(|&i| self.remove(args.get(i))).count();
                reply::integer(out, removed as i64);
            }
        } else if is(cmd, "EXISTS") {
            if n < 2 {
                wrong_args(out, cmd);
            } else {
                let found = (1..n)
                    .filter(|&i| self.map.contains_key(args.get(i)))
                    .count();
                reply::integer(out, found as i64);
            }
        } else if is(cmd, "MSET") {
            if n < 3 || n.is_multiple_of(2) {
                wrong_args(out, cmd);
            } else {
                let mut ok = true;
                for i in (1..n).step_by(2) {
                    ok &= self.put(args.get(i), args.get(i + 1));
                }
                if ok {
                    reply::simple(out, b"OK");
                } else {
                    Self::oom(out);
                }
            }
        } else if is(cmd, "MGET") {
            if n < 2 {
                wrong_args(out, cmd);
            } else {
                reply::array(out, n - 1);
                for i in 1..n {
                    match self.map.get(args.get(i)) {
                        Some(v) => reply::bulk(out, v),
                        None => reply::null(out),
                    }
                }
            }
        } else if is(cmd, "DBSIZE") {
            reply::integer(out, self.map.len() as i64);
        } else if is(cmd, "FLUSHDB") || is(cmd, "FLUSHALL") {
            self.map.clear();
            self.bytes = 0;
            reply::simple(out, b"OK");
        } else if is(cmd, "SELECT") {
            if n != 2 {
                wrong_args(out, cmd);
            } else if parse_int(args.get(1)) == Some(0) {
                reply::simple(out, b"OK");
            } else {
                reply::error(out, &[b"ERR DB index is out of range"]);
            }
        } else if is(cmd, "COMMAND") {
            // redis-cli asks `COMMAND DOCS` for its hints; an empty table is valid.
            if n >= 2 && is(args.get(1), "COUNT") {
                reply::integer(out, 0);
            } else {
                reply::array(out, 0);
            }
        } else if is(cmd, "CONFIG") {
            self.config(args, out);
        } else if is(cmd, "INFO") {
            reply::bulk(
                out,
                b"# Server\r\nredis_version:7.0.0\r\nredis_mode:standalone\r\nserver_name:twinrun-guest\r\n",
            );
        } else if is(cmd, "QUIT") {
            reply::simple(out, b"OK");
            return Outcome::Close;
        } else {
            reply::error(out, &[b"ERR unknown command '", cmd, b"'"]);
        }
        Outcome::Continue
    }

    fn set(&mut self, args: Args<'_>, out: &mut Vec<u8>) {
        let n = args.len();
        if n < 3 {
            return wrong_args(out, args.get(0));
        }
        let (mut nx, mut xx) = (false, false);
        for i in 3..n {
            let o = args.get(i);
            if is(o, "NX") {
                nx = true;
            } else if is(o, "XX") {
                xx = true;
            } else {
                // Expiry options are not implemented: say so rather than ignore them.
                return reply::error(out, &[b"ERR syntax error"]);
            }
        }
        if nx && xx {
            return reply::error(out, &[b"ERR syntax error"]);
        }
        let (k, v) = (args.get(1), args.get(2));
        let exists = self.map.contains_key(k);
        if (nx && exists) || (xx && !exists) {
            return reply::null(out);
        }
        if self.put(k, v) {
            reply::simple(out, b"OK");
        } else {
            Self::oom(out);
        }
    }

    fn config(&mut self, args: Args<'_>, out: &mut Vec<u8>) {
        if args.len() < 2 {
            return wrong_args(out, args.get(0));
        }
        let sub = args.get(1);
        if is(sub, "GET") {
            // redis-benchmark reads `save` and `appendonly`: this server keeps nothing
            // on disk, which is what "" and "no" mean.
            let mut pairs: Vec<(&[u8], &[u8])> = Vec::new();
            for i in 2..args.len() {
                let p = args.get(i);
                if is(p, "save") {
                    pairs.push((b"save", b""));
                } else if is(p, "appendonly") {
                    pairs.push((b"appendonly", b"no"));
                }
            }
            reply::array(out, pairs.len() * 2);
            for (k, v) in pairs {
                reply::bulk(out, k);
                reply::bulk(out, v);
            }
        } else if is(sub, "RESETSTAT") {
            reply::simple(out, b"OK");
        } else {
            reply::error(out, &[b"ERR CONFIG subcommand not supported"]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resp::parse;

    /// Runs every command in `input` and returns the concatenated replies.
    fn run(store: &mut Store, input: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut ranges = Vec::new();
        let mut pos = 0;
        while let Some(used) = parse(&input[pos..], &mut ranges).unwrap() {
            store.exec(Args::new(&input[pos..], &ranges), &mut out);
            pos += used;
        }
        assert_eq!(pos, input.len(), "trailing input");
        out
    }

    #[test]
    fn set_get_del() {
        let mut s = Store::new(1 << 20);
        let out = run(
            &mut s,
            b"SET a 1\r\nGET a\r\nGET b\r\n*3\r\n$3\r\nDEL\r\n$1\r\na\r\n$1\r\nb\r\nGET a\r\nDBSIZE\r\n",
        );
        assert_eq!(out, b"+OK\r\n$1\r\n1\r\n$-1\r\n:1\r\n$-1\r\n:0\r\n");
    }

    #[test]
    fn incr_and_errors() {
        let mut s = Store::new(1 << 20);
        let out = run(
            &mut s,
            b"INCR n\r\nINCR n\r\nDECR n\r\nINCRBY n 10\r\nGET n\r\n",
        );
        assert_eq!(out, b":1\r\n:2\r\n:1\r\n:11\r\n$2\r\n11\r\n");
        let out = run(&mut s, b"SET s abc\r\nINCR s\r\n");
        assert_eq!(
            out,
            b"+OK\r\n-ERR value is not an integer or out of range\r\n".to_vec()
        );
        let out = run(&mut s, b"SET m 9223372036854775807\r\nINCR m\r\n");
        assert_eq!(
            out,
            b"+OK\r\n-ERR increment or decrement would overflow\r\n"
        );
    }

    #[test]
    fn ping_echo_unknown_and_arity() {
        let mut s = Store::new(1 << 20);
        let out = run(&mut s, b"PING\r\nping hi\r\nECHO x\r\nFOO bar\r\nGET\r\n");
        assert_eq!(
            out,
            b"+PONG\r\n$2\r\nhi\r\n$1\r\nx\r\n-ERR unknown command 'FOO'\r\n-ERR wrong number of arguments for 'GET' command\r\n".to_vec()
        );
    }

    #[test]
    fn client_startup_commands() {
        let mut s = Store::new(1 << 20);
        let out = run(
            &mut s,
            b"COMMAND DOCS\r\nCONFIG GET save\r\nCONFIG GET appendonly\r\nCONFIG GET nope\r\n",
        );
        assert_eq!(
            out,
            b"*0\r\n*2\r\n$4\r\nsave\r\n$0\r\n\r\n*2\r\n$10\r\nappendonly\r\n$2\r\nno\r\n*0\r\n"
                .to_vec()
        );
    }

    #[test]
    fn set_options_and_quit() {
        let mut s = Store::new(1 << 20);
        let out = run(
            &mut s,
            b"SET k v NX\r\nSET k w NX\r\nSET k w XX\r\nGET k\r\nSET k v EX 10\r\n",
        );
        assert_eq!(
            out,
            b"+OK\r\n$-1\r\n+OK\r\n$1\r\nw\r\n-ERR syntax error\r\n".to_vec()
        );
        let mut o = Vec::new();
        let r = [core::ops::Range { start: 0, end: 4 }];
        assert_eq!(s.exec(Args::new(b"QUIT", &r), &mut o), Outcome::Close);
    }

    #[test]
    fn memory_budget_is_enforced_and_released() {
        let mut s = Store::new(200);
        let out = run(
            &mut s,
            b"SET a 0123456789\r\nSET b 0123456789\r\nSET c 0123456789\r\n",
        );
        assert_eq!(
            out,
            b"+OK\r\n+OK\r\n-OOM command not allowed when used memory > 'maxmemory'\r\n".to_vec()
        );
        let out = run(&mut s, b"DEL a\r\nSET c 0123456789\r\nMGET a b c\r\n");
        assert_eq!(
            out,
            b":1\r\n+OK\r\n*3\r\n$-1\r\n$10\r\n0123456789\r\n$10\r\n0123456789\r\n".to_vec()
        );
    }
}
