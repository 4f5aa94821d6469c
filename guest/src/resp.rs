//! RESP (REdis Serialization Protocol) request parsing and reply encoding.
//!
//! Requests are arrays of bulk strings (`*2\r\n$3\r\nGET\r\n$1\r\nk\r\n`) or inline
//! commands (`PING\r\n`). The parser works on a connection's input buffer and returns
//! argument ranges into it, so nothing is copied; it is incremental (returns
//! "incomplete" until a whole command is buffered) and bounded (oversized or malformed
//! input is an error, after which the server replies `-ERR` and closes).

use alloc::vec::Vec;
use core::ops::Range;

/// Most arguments in one command.
pub const MAX_ARGS: usize = 1024;
/// Longest bulk string accepted.
pub const MAX_BULK: usize = 64 * 1024;
/// Longest inline command line accepted.
pub const MAX_INLINE: usize = 16 * 1024;
/// Longest `*<n>` / `$<n>` header line.
const MAX_HEADER_LINE: usize = 32;

/// Why a request could not be parsed. The text goes into the `-ERR` reply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProtoError(pub &'static str);

/// Parses one command from the front of `buf`.
///
/// On success returns `Some(consumed)` and leaves the argument ranges (into `buf`) in
/// `args`; a command with no arguments (empty inline line, `*0`) is valid and should
/// be ignored. `None` means more input is needed.
pub fn parse(buf: &[u8], args: &mut Vec<Range<usize>>) -> Result<Option<usize>, ProtoError> {
    args.clear();
    match buf.first() {
        None => Ok(None),
        Some(b'*') => parse_multibulk(buf, args),
        Some(_) => parse_inline(buf, args),
    }
}

/// Finds `\r\n` at or after `from`; returns the index of `\r`.
fn find_crlf(buf: &[u8], from: usize) -> Option<usize> {
    buf.get(from..)?
        .windows(2)
        .position(|w| w == b"\r\n")
        .map(|p| from + p)
}

/// Reads a `<prefix><integer>\r\n` header at `at`; returns (value, index after it).
fn header(buf: &[u8], at: usize, prefix: u8) -> Result<Option<(i64, usize)>, ProtoError> {
    match buf.get(at) {
        None => return Ok(None),
        Some(&b) if b != prefix => {
            return Err(if prefix == b'$' {
                ProtoError("Protocol error: expected '$'")
            } else {
                ProtoError("Protocol error: expected '*'")
            })
        }
        Some(_) => {}
    }
    let Some(end) = find_crlf(buf, at + 1) else {
        if buf.len() - at > MAX_HEADER_LINE {
            return Err(ProtoError("Protocol error: too big count"));
        }
        return Ok(None);
    };
    if end - at > MAX_HEADER_LINE {
        return Err(ProtoError("Protocol error: too big count"));
    }
    let n = parse_int(&buf[at + 1..end]).ok_or(ProtoError("Protocol error: invalid count"))?;
    Ok(Some((n, end + 2)))
}

fn parse_multibulk(buf: &[u8], args: &mut Vec<Range<usize>>) -> Result<Option<usize>, ProtoError> {
    let Some((n, mut pos)) = header(buf, 0, b'*')? else {
        return Ok(None);
    };
    if n <= 0 {
        return Ok(Some(pos));
    }
    if n as u64 > MAX_ARGS as u64 {
        return Err(ProtoError("Protocol error: invalid multibulk length"));
    }
    for _ in 0..n {
        let Some((len, start)) = header(buf, pos, b'$')? else {
            return Ok(None);
        };
        if len < 0 || len as u64 > MAX_BULK as u64 {
            return Err(ProtoError("Protocol error: invalid bulk length"));
        }
        let end = start + len as usize;
        if buf.len() < end + 2 {
            return Ok(None);
        }
        if &buf[end..end + 2] != b"\r\n" {
            return Err(ProtoError("Protocol error: bulk string not terminated"));
        }
        args.push(start..end);
        pos = end + 2;
    }
    Ok(Some(pos))
}

fn parse_inline(buf: &[u8], args: &mut Vec<Range<usize>>) -> Result<Option<usize>, ProtoError> {
    let Some(nl) = buf.iter().position(|&b| b == b'\n') else {
        if buf.len() > MAX_INLINE {
            return Err(ProtoError("Protocol error: too big inline request"));
        }
        return Ok(None);
    };
    if nl > MAX_INLINE {
        return Err(ProtoError("Protocol error: too big inline request"));
    }
    let line_end = if nl > 0 && buf[nl - 1] == b'\r' {
        nl - 1
    } else {
        nl
    };
    let mut i = 0;
    while i < line_end {
        while i < line_end && matches!(buf[i], b' ' | b'\t') {
            i += 1;
        }
        let start = i;
        while i < line_end && !matches!(buf[i], b' ' | b'\t') {
            i += 1;
        }
        if i > start {
            if args.len() == MAX_ARGS {
                return Err(ProtoError("Protocol error: too many arguments"));
            }
            args.push(start..i);
        }
    }
    Ok(Some(nl + 1))
}

/// Strict decimal integer (optional leading '-'), as Redis accepts them.
pub fn parse_int(s: &[u8]) -> Option<i64> {
    let (neg, digits) = match s.split_first() {
        Some((b'-', rest)) => (true, rest),
        _ => (false, s),
    };
    if digits.is_empty() || digits.len() > 19 {
        return None;
    }
    let mut v: i64 = 0;
    for &d in digits {
        if !d.is_ascii_digit() {
            return None;
        }
        v = v.checked_mul(10)?;
        v = if neg {
            v.checked_sub((d - b'0') as i64)?
        } else {
            v.checked_add((d - b'0') as i64)?
        };
    }
    Some(v)
}

/// Reply encoders.
pub mod reply {
    use alloc::vec::Vec;

    fn push_int(out: &mut Vec<u8>, v: i64) {
        let mut tmp = [0u8; 20];
        let mut i = tmp.len();
        let neg = v < 0;
        let mut u = v.unsigned_abs();
        loop {
            i -= 1;
            tmp[i] = b'0' + (u % 10) as u8;
            u /= 10;
            if u == 0 {
                break;
            }
        }
        if neg {
            out.push(b'-');
        }
        out.extend_from_slice(&tmp[i..]);
    }

    pub fn simple(out: &mut Vec<u8>, s: &[u8]) {
        out.push(b'+');
        out.extend_from_slice(s);
        out.extend_from_slice(b"\r\n");
    }

    /// `-<msg>\r\n`; `msg` should start with an error code such as `ERR`.
    pub fn error(out: &mut Vec<u8>, parts: &[&[u8]]) {
        out.push(b'-');
        for p in parts {
            // CR/LF inside an error would break framing.
            out.extend(
                p.iter()
                    .map(|&b| if b == b'\r' || b == b'\n' { b' ' } else { b }),
            );
        }
        out.extend_from_slice(b"\r\n");
    }

    pub fn integer(out: &mut Vec<u8>, v: i64) {
        out.push(b':');
        push_int(out, v);
        out.extend_from_slice(b"\r\n");
    }

    pub fn bulk(out: &mut Vec<u8>, s: &[u8]) {
        out.push(b'$');
        push_int(out, s.len() as i64);
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(s);
        out.extend_from_slice(b"\r\n");
    }

    pub fn null(out: &mut Vec<u8>) {
        out.extend_from_slice(b"$-1\r\n");
    }

    pub fn array(out: &mut Vec<u8>, n: usize) {
        out.push(b'*');
        push_int(out, n as i64);
        out.extend_from_slice(b"\r\n");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;

    fn args_of<'a>(buf: &'a [u8], r: &[Range<usize>]) -> Vec<&'a [u8]> {
        r.iter().map(|r| &buf[r.clone()]).collect()
    }

    #[test]
    fn multibulk_command() {
        let buf = b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$5\r\nhello\r\n";
        let mut a = Vec::new();
        assert_eq!(parse(buf, &mut a), Ok(Some(buf.len())));
        assert_eq!(args_of(buf, &a), vec![&b"SET"[..], b"k", b"hello"]);
    }

    #[test]
    fn binary_safe_bulk() {
        let buf = b"*2\r\n$4\r\nECHO\r\n$4\r\na\r\nb\r\n";
        let mut a = Vec::new();
        assert_eq!(parse(buf, &mut a), Ok(Some(buf.len())));
        assert_eq!(args_of(buf, &a)[1], b"a\r\nb");
    }

    #[test]
    fn every_prefix_is_incomplete() {
        let buf = b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$5\r\nhello\r\n";
        let mut a = Vec::new();
        for cut in 0..buf.len() {
            assert_eq!(parse(&buf[..cut], &mut a), Ok(None), "cut at {cut}");
        }
    }

    #[test]
    fn pipelined_commands_parse_one_at_a_time() {
        let mut buf = Vec::new();
        for _ in 0..16 {
            buf.extend_from_slice(b"*1\r\n$4\r\nPING\r\n");
        }
        buf.extend_from_slice(b"PING\r\n*2\r\n$3\r\nGET");
        let mut a = Vec::new();
        let mut pos = 0;
        let mut n = 0;
        while let Some(used) = parse(&buf[pos..], &mut a).unwrap() {
            assert_eq!(a.len(), 1);
            assert_eq!(&buf[pos..][a[0].clone()], b"PING");
            pos += used;
            n += 1;
        }
        assert_eq!(n, 17);
        assert_eq!(&buf[pos..], b"*2\r\n$3\r\nGET");
    }

    #[test]
    fn inline_commands() {
        let mut a = Vec::new();
        let buf = b"  SET  key\tvalue \r\n";
        assert_eq!(parse(buf, &mut a), Ok(Some(buf.len())));
        assert_eq!(args_of(buf, &a), vec![&b"SET"[..], b"key", b"value"]);
        // Bare LF works too, and an empty line is an empty command.
        assert_eq!(parse(b"PING\n", &mut a), Ok(Some(5)));
        assert_eq!(parse(b"\r\n", &mut a), Ok(Some(2)));
        assert!(a.is_empty());
        assert_eq!(parse(b"PIN", &mut a), Ok(None));
    }

    #[test]
    fn empty_multibulk_is_a_noop() {
        let mut a = Vec::new();
        assert_eq!(parse(b"*0\r\n", &mut a), Ok(Some(4)));
        assert!(a.is_empty());
        assert_eq!(parse(b"*-1\r\n", &mut a), Ok(Some(5)));
    }

    #[test]
    fn bad_input_is_an_error() {
        let mut a = Vec::new();
        assert!(parse(b"*x\r\n", &mut a).is_err());
        assert!(parse(b"*1\r\n:5\r\n", &mut a).is_err());
        assert!(parse(b"*1\r\n$-5\r\n", &mut a).is_err());
        assert!(parse(b"*1\r\n$3\r\nabcde\r\n", &mut a).is_err());
        assert!(parse(b"*99999999\r\n", &mut a).is_err());
        assert!(parse(b"*1\r\n$99999999\r\n", &mut a).is_err());
        // A count line that never ends is rejected once it is too long.
        assert!(parse(b"*11111111111111111111111111111111111111", &mut a).is_err());
        // So is an inline line without newline beyond the limit.
        let long = vec![b'a'; MAX_INLINE + 1];
        assert!(parse(&long, &mut a).is_err());
    }

    #[test]
    fn integers_are_strict() {
        assert_eq!(parse_int(b"0"), Some(0));
        assert_eq!(parse_int(b"-42"), Some(-42));
        assert_eq!(parse_int(b"9223372036854775807"), Some(i64::MAX));
        assert_eq!(parse_int(b"-9223372036854775808"), Some(i64::MIN));
        assert_eq!(parse_int(b"9223372036854775808"), None);
        assert_eq!(parse_int(b""), None);
        assert_eq!(parse_int(b"-"), None);
        assert_eq!(parse_int(b"1a"), None);
        assert_eq!(parse_int(b" 1"), None);
    }

    #[test]
    fn replies_encode() {
        let mut o = Vec::new();
        reply::simple(&mut o, b"OK");
        reply::integer(&mut o, -12);
        reply::integer(&mut o, i64::MIN);
        reply::bulk(&mut o, b"hi");
        reply::null(&mut o);
        reply::array(&mut o, 0);
        reply::error(&mut o, &[b"ERR bad\r\nthing"]);
        assert_eq!(
            o,
            b"+OK\r\n:-12\r\n:-9223372036854775808\r\n$2\r\nhi\r\n$-1\r\n*0\r\n-ERR bad  thing\r\n"
        );
    }
}
