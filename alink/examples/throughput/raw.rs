//! Raw TCP between the two ends, no A-Link: the baselines, and the send mechanisms the
//! A-Link writer could use, each moving the same scattered 4 KiB pages of "guest memory"
//! over the same number of streams:
//!
//! - `write`: a contiguous 1 MiB buffer written again and again (the classic raw figure);
//! - `writev`: 256 scattered pages per vectored write (what the A-Link writer does);
//! - `zerocopy`: the same with `sendmsg(MSG_ZEROCOPY)` (completions reaped from the error
//!   queue; the kernel reports when it had to copy after all);
//! - `uring`: the same as `IORING_OP_SENDMSG`, 4 in flight per stream;
//! - `uring-zc`: `IORING_OP_SENDMSG_ZC`, 4 in flight, slots reused after their
//!   notification.
//!
//! The receivers read into a 1 MiB buffer (`read`), or with `readv` straight into
//! scattered pages of a mirror (the receiving half of a page data path).

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::net::{scattered, Net, Pages, PAGE};

/// Pages per send call (1 MiB).
const BATCH: usize = 256;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Send {
    Write,
    Writev,
    ZeroCopy,
    Uring,
    UringZc,
}

impl Send {
    pub fn name(self) -> &'static str {
        match self {
            Send::Write => "write",
            Send::Writev => "writev",
            Send::ZeroCopy => "zerocopy",
            Send::Uring => "uring",
            Send::UringZc => "uring-zc",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Recv {
    Read,
    ReadvPages,
}

pub struct Outcome {
    pub bytes_per_s: f64,
    /// MSG_ZEROCOPY: share of sends the kernel reported as copied anyway.
    pub zc_copied: Option<f64>,
}

/// The memory a run moves: pages sent from `src`, received into `dst`.
pub struct Mem<'a> {
    pub src: &'a Arc<Pages>,
    pub dst: &'a Arc<Pages>,
}

/// `streams` parallel connections (stream `i` on link `i`), `secs` seconds.
pub fn run(
    net: &Net,
    streams: usize,
    (send, recv): (Send, Recv),
    secs: f64,
    mem: Mem<'_>,
    port: u16,
) -> Result<Outcome, String> {
    let (src, dst) = (mem.src, mem.dst);
    let mut receivers = Vec::new();
    let mut ready = Vec::new();
    for l in 0..streams {
        let addr = net.addr(l, 1, port + l as u16);
        let (tx, rx) = std::sync::mpsc::channel();
        ready.push(rx);
        let dst = dst.clone();
        receivers.push(net.run_in(1, move || -> Result<(u64, Duration), String> {
            let lsn = TcpListener::bind(addr).map_err(|e| format!("bind {addr}: {e}"))?;
            let _ = tx.send(());
            let (s, _) = lsn.accept().map_err(|e| e.to_string())?;
            Ok(receive(s, recv, &dst, l))
        }));
    }
    for r in &ready {
        r.recv()
            .map_err(|_| "receiver failed to start".to_string())?;
    }
    let mut senders = Vec::new();
    for l in 0..streams {
        let addr = net.addr(l, 1, port + l as u16);
        let src = src.clone();
        senders.push(
            net.run_in(0, move || -> Result<Option<(u64, u64)>, String> {
                let s = TcpStream::connect(addr).map_err(|e| format!("connect {addr}: {e}"))?;
                let end = Instant::now() + Duration::from_secs_f64(secs);
                let order = scattered(src.pages());
                let offset = l * src.pages() / 2;
                match send {
                    Send::Write => send_write(s, end).map(|_| None),
                    Send::Writev => send_writev(s, end, &src, &order, offset).map(|_| None),
                    Send::ZeroCopy => send_zerocopy(s, end, &src, &order, offset).map(Some),
                    Send::Uring => send_uring(s, end, &src, &order, offset, false).map(|_| None),
                    Send::UringZc => send_uring(s, end, &src, &order, offset, true).map(|_| None),
                }
                .map_err(|e| format!("{}: {e}", send.name()))
            }),
        );
    }
    let mut zc = (0u64, 0u64);
    for s in senders {
        if let Some((copied, total)) = s.join().map_err(|_| "sender panicked")?? {
            zc.0 += copied;
            zc.1 += total;
        }
    }
    let mut bytes = 0u64;
    let mut time = Duration::ZERO;
    for r in receivers {
        let (b, t) = r.join().map_err(|_| "receiver panicked")??;
        bytes += b;
        time = time.max(t);
    }
    Ok(Outcome {
        bytes_per_s: bytes as f64 / time.as_secs_f64(),
        zc_copied: (zc.1 > 0).then(|| zc.0 as f64 / zc.1 as f64),
    })
}

fn receive(mut s: TcpStream, recv: Recv, dst: &Pages, stream: usize) -> (u64, Duration) {
    let mut total = 0u64;
    let mut first = None;
    match recv {
        Recv::Read => {
            let mut buf = vec![0u8; 1 << 20];
            while let Ok(n) = s.read(&mut buf) {
                if n == 0 {
                    break;
                }
                first.get_or_insert_with(Instant::now);
                total += n as u64;
            }
        }
        Recv::ReadvPages => {
            // Into the mirror's pages in scattered order, 64 per call, as a placed
            // payload is read.
            let order = scattered(dst.pages());
            let mut k = stream * dst.pages() / 2;
            let mut off = 0usize;
            loop {
                let mut iov = [libc::iovec {
                    iov_base: std::ptr::null_mut(),
                    iov_len: 0,
                }; 64];
                for (j, v) in iov.iter_mut().enumerate() {
                    let p = order[(k + j) % order.len()] as usize;
                    let o = if j == 0 { off } else { 0 };
                    *v = libc::iovec {
                        iov_base: dst.page_ptr(p).wrapping_add(o).cast(),
                        iov_len: PAGE - o,
                    };
                }
                // SAFETY: the iovecs are pages of the leaked mirror buffer.
                let n = unsafe { libc::readv(s.as_raw_fd(), iov.as_ptr(), 64) };
                if n <= 0 {
                    break;
                }
                first.get_or_insert_with(Instant::now);
                total += n as u64;
                let adv = off + n as usize;
                k += adv / PAGE;
                off = adv % PAGE;
            }
        }
    }
    (total, first.map_or(Duration::ZERO, |f| f.elapsed()))
}

fn send_write(mut s: TcpStream, end: Instant) -> std::io::Result<()> {
    let buf = vec![0x5au8; 1 << 20];
    while Instant::now() < end {
        s.write_all(&buf)?;
    }
    Ok(())
}

/// The next batch of scattered pages from position `k`.
fn batch<'a>(src: &'a Pages, order: &[u32], k: &mut usize) -> Vec<&'a [u8]> {
    let v = (0..BATCH)
        .map(|j| src.page(order[(*k + j) % order.len()] as usize))
        .collect();
    *k += BATCH;
    v
}

fn send_writev(
    mut s: TcpStream,
    end: Instant,
    src: &Pages,
    order: &[u32],
    mut k: usize,
) -> std::io::Result<()> {
    while Instant::now() < end {
        let pages = batch(src, order, &mut k);
        let mut iov: Vec<std::io::IoSlice<'_>> =
            pages.iter().map(|p| std::io::IoSlice::new(p)).collect();
        let mut bufs = &mut iov[..];
        while !bufs.is_empty() {
            let n = s.write_vectored(bufs)?;
            std::io::IoSlice::advance_slices(&mut bufs, n);
        }
    }
    Ok(())
}

fn iovecs(pages: &[&[u8]]) -> Vec<libc::iovec> {
    pages
        .iter()
        .map(|p| libc::iovec {
            iov_base: p.as_ptr() as *mut libc::c_void,
            iov_len: p.len(),
        })
        .collect()
}

/// MSG_ZEROCOPY. Returns (sends reported copied, sends completed).
fn send_zerocopy(
    s: TcpStream,
    end: Instant,
    src: &Pages,
    order: &[u32],
    mut k: usize,
) -> std::io::Result<(u64, u64)> {
    let fd = s.as_raw_fd();
    let one: libc::c_int = 1;
    // SAFETY: setsockopt reads one c_int from `one`, alive for the call.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_ZEROCOPY,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let (mut sent, mut done, mut copied) = (0u64, 0u64, 0u64);
    while Instant::now() < end {
        let pages = batch(src, order, &mut k);
        let mut iov = iovecs(&pages);
        let mut first = 0usize;
        while first < iov.len() {
            // SAFETY: msghdr points at `iov[first..]`, alive for the call; the pages are
            // the leaked source buffer, which outlives every completion.
            let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
            msg.msg_iov = iov[first..].as_mut_ptr();
            msg.msg_iovlen = iov.len() - first;
            // SAFETY: as above; the return value is checked.
            let n = unsafe { libc::sendmsg(fd, &msg, libc::MSG_ZEROCOPY) };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if e.raw_os_error() == Some(libc::ENOBUFS) {
                    // Too many completions outstanding: reap, waiting for some.
                    reap_zerocopy(fd, true, &mut done, &mut copied)?;
                    continue;
                }
                return Err(e);
            }
            sent += 1;
            let mut n = n as usize;
            while n > 0 && first < iov.len() {
                let take = n.min(iov[first].iov_len);
                iov[first].iov_base = iov[first].iov_base.wrapping_add(take);
                iov[first].iov_len -= take;
                n -= take;
                if iov[first].iov_len == 0 {
                    first += 1;
                }
            }
            reap_zerocopy(fd, false, &mut done, &mut copied)?;
        }
    }
    let t = Instant::now();
    while done < sent && t.elapsed() < Duration::from_secs(5) {
        reap_zerocopy(fd, true, &mut done, &mut copied)?;
    }
    Ok((copied, done))
}

/// Reads MSG_ZEROCOPY completions from the error queue.
fn reap_zerocopy(
    fd: libc::c_int,
    wait: bool,
    done: &mut u64,
    copied: &mut u64,
) -> std::io::Result<()> {
    if wait {
        let mut p = libc::pollfd {
            fd,
            events: 0,
            revents: 0,
        };
        // SAFETY: one pollfd, alive for the call (POLLERR is always reported).
        unsafe { libc::poll(&mut p, 1, 100) };
    }
    loop {
        let mut control = [0u8; 128];
        // SAFETY: a msghdr with only a control buffer, alive for the call.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = control.len();
        // SAFETY: as above; the return value is checked.
        let r = unsafe { libc::recvmsg(fd, &mut msg, libc::MSG_ERRQUEUE | libc::MSG_DONTWAIT) };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            return if e.kind() == std::io::ErrorKind::WouldBlock {
                Ok(())
            } else {
                Err(e)
            };
        }
        // SAFETY: walking the control messages the kernel wrote into `control`.
        let mut c = unsafe { libc::CMSG_FIRSTHDR(&msg) };
        while !c.is_null() {
            // SAFETY: `c` is a control message header inside `control`; a
            // sock_extended_err follows an IP(V6)_RECVERR header.
            let serr = unsafe { &*(libc::CMSG_DATA(c) as *const libc::sock_extended_err) };
            const SO_EE_ORIGIN_ZEROCOPY: u8 = 5;
            const SO_EE_CODE_ZEROCOPY_COPIED: u8 = 1;
            if serr.ee_origin == SO_EE_ORIGIN_ZEROCOPY {
                // ee_info..=ee_data: the range of send calls completed.
                let n = u64::from(serr.ee_data.wrapping_sub(serr.ee_info)) + 1;
                *done += n;
                if serr.ee_code & SO_EE_CODE_ZEROCOPY_COPIED != 0 {
                    *copied += n;
                }
            }
            // SAFETY: next header within the same control buffer.
            c = unsafe { libc::CMSG_NXTHDR(&msg, c) };
        }
    }
}

/// io_uring sendmsg (optionally zero-copy), 4 in flight.
fn send_uring(
    s: TcpStream,
    end: Instant,
    src: &Pages,
    order: &[u32],
    mut k: usize,
    zc: bool,
) -> std::io::Result<()> {
    use io_uring::{cqueue, opcode, types, IoUring};
    const DEPTH: usize = 4;
    let mut ring = IoUring::new(16)?;
    let fd = types::Fd(s.as_raw_fd());
    // Per slot: its iovecs and msghdr (alive until its completion and, for zero copy,
    // its notification), and what is outstanding on it.
    let mut iovs: Vec<Vec<libc::iovec>> = vec![Vec::new(); DEPTH];
    // SAFETY: zeroed msghdrs are valid (null pointers, zero lengths).
    let mut msgs: Vec<libc::msghdr> = (0..DEPTH).map(|_| unsafe { std::mem::zeroed() }).collect();
    let mut busy = [0u8; DEPTH];
    let submit_slot = |ring: &mut IoUring,
                       slot: usize,
                       iovs: &mut Vec<Vec<libc::iovec>>,
                       msgs: &mut Vec<libc::msghdr>,
                       k: &mut usize|
     -> std::io::Result<()> {
        iovs[slot] = iovecs(&batch(src, order, k));
        msgs[slot].msg_iov = iovs[slot].as_mut_ptr();
        msgs[slot].msg_iovlen = iovs[slot].len();
        let e = if zc {
            opcode::SendMsgZc::new(fd, &msgs[slot]).build()
        } else {
            opcode::SendMsg::new(fd, &msgs[slot]).build()
        }
        .user_data(slot as u64);
        // SAFETY: the entry points at msgs[slot] and its iovecs, which stay untouched
        // until this slot's completion (and notification) are reaped below.
        unsafe { ring.submission().push(&e) }
            .map_err(|_| std::io::Error::other("submission queue full"))?;
        Ok(())
    };
    for (slot, b) in busy.iter_mut().enumerate() {
        submit_slot(&mut ring, slot, &mut iovs, &mut msgs, &mut k)?;
        *b = if zc { 2 } else { 1 };
    }
    loop {
        ring.submit_and_wait(1)?;
        let done: Vec<(u64, i32, u32)> = ring
            .completion()
            .map(|c| (c.user_data(), c.result(), c.flags()))
            .collect();
        for (slot, res, flags) in done {
            let slot = slot as usize;
            if res < 0 && !cqueue::notif(flags) {
                return Err(std::io::Error::from_raw_os_error(-res));
            }
            if zc && !cqueue::notif(flags) && !cqueue::more(flags) {
                // No notification will follow.
                busy[slot] = 1;
            }
            busy[slot] -= 1;
            if busy[slot] == 0 && Instant::now() < end {
                submit_slot(&mut ring, slot, &mut iovs, &mut msgs, &mut k)?;
                busy[slot] = if zc { 2 } else { 1 };
            }
        }
        if busy.iter().all(|b| *b == 0) {
            return Ok(());
        }
    }
}
