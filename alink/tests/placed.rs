//! The zero-copy data path over loopback TCP: lent sends (the sender's memory written
//! straight into the sockets, spread over two links), payloads placed straight into the
//! receiver's memory, and what the rules around them guarantee when frames are
//! corrupted, truncated or duplicated on the way: a page is never counted as received
//! unless its bytes were checked, and whatever was lost is known to the sender.
//!
//! The "memory" is a set of 4 KiB pages on each side, the way the checkpoint layer
//! uses it: the sender sends rounds of parts (each part a scattered list of pages,
//! parts of one round disjoint, each round placed after the previous one: barrier =
//! its last message), the receiver's placer maps a part's pages to its own copy.

use alink::{Alink, AlinkConfig, Bytes, InMsg, LinkAddrs, PayloadAt, Placement, SegOpts};
use alink::{PlaceRequest, WindowLimits};
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

const SECRET: &[u8] = b"placed-test-cluster-secret";
const PAGE: usize = 4096;

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
struct PartHead {
    round: u32,
    pages: Vec<u32>,
}

fn init_log() {
    let _ = env_logger::builder().is_test(true).try_init();
}

fn any() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

fn cfg(node: u64, peer: u64, links: Vec<LinkAddrs>) -> AlinkConfig {
    let mut c = AlinkConfig::new(9, node, peer, SECRET, links);
    c.health.interval = Duration::from_millis(50);
    c.health.misses = 5;
    c.window = WindowLimits {
        max_msgs: 256,
        max_bytes: 64 << 20,
    };
    c
}

/// Memory of `n` pages whose bytes other threads write through raw pointers (the
/// receiver's placements, a guest-like mutator).
struct Pages {
    ptr: *mut u8,
    n: usize,
    _buf: Box<[u8]>,
}

// SAFETY: the buffer is owned for the struct's life; concurrent access goes through raw
// pointers into disjoint pages, or is a test's deliberate race on page contents only.
unsafe impl Send for Pages {}
// SAFETY: as for Send: shared use only writes through raw pointers into disjoint pages
// (or races on page contents on purpose, which the test reads as bytes only).
unsafe impl Sync for Pages {}

impl Pages {
    fn new(n: usize, fill: impl Fn(usize) -> u8) -> Pages {
        let mut buf: Box<[u8]> = (0..n * PAGE).map(fill).collect();
        Pages {
            ptr: buf.as_mut_ptr(),
            n,
            _buf: buf,
        }
    }
    fn page(&self, i: u32) -> &[u8] {
        assert!((i as usize) < self.n);
        // SAFETY: inside the buffer; contents may be racing writes (see the type).
        unsafe { std::slice::from_raw_parts(self.ptr.add(i as usize * PAGE), PAGE) }
    }
    fn page_ptr(&self, i: u32) -> *mut u8 {
        assert!((i as usize) < self.n);
        // SAFETY: inside the buffer.
        unsafe { self.ptr.add(i as usize * PAGE) }
    }
    fn write(&self, i: u32, bytes: &[u8]) {
        // SAFETY: inside the buffer (page() checks), `bytes` is one page at most.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.page_ptr(i), bytes.len()) }
    }
}

fn pattern(i: u32, salt: u32) -> u8 {
    (i.wrapping_mul(2_654_435_761) >> 11 ^ salt) as u8
}

/// A scattered permutation of `0..n` (the lab's seeded RNG: the same every run).
fn scattered(n: u32) -> Vec<u32> {
    let mut v: Vec<u32> = (0..n).collect();
    twinrun_lab::Rng::new(0x9e37_79b9_7f4a_7c15).shuffle(&mut v);
    v
}

/// The receiving side: a mirror of the pages, a placer over it, and the consumer's
/// bookkeeping.
struct Receiver {
    link: Alink,
    mirror: Arc<Pages>,
    placed: u64,
    in_body: u64,
    lost: Vec<PartHead>,
    torn_pages: BTreeSet<u32>,
}

impl Receiver {
    fn new(link: Alink, pages: usize) -> Receiver {
        let mirror = Arc::new(Pages::new(pages, |_| 0));
        let m = mirror.clone();
        link.set_placer(move |r: &PlaceRequest<'_>| {
            let head: PartHead = postcard::from_bytes(r.head).ok()?;
            if head.pages.len() * PAGE != r.payload_len {
                return None;
            }
            let dests = head.pages.iter().map(|p| (m.page_ptr(*p), PAGE)).collect();
            // SAFETY: the mirror lives as long as the Alink's readers (the Arc is held by
            // this closure, owned by the Alink); a round's parts are disjoint and each
            // round is placed after the previous one (barrier), so no two messages being
            // written in place share a page, and the test reads a part's pages only once
            // it was delivered.
            Some(unsafe { Placement::new(dests) })
        });
        Receiver {
            link,
            mirror,
            placed: 0,
            in_body: 0,
            lost: Vec::new(),
            torn_pages: BTreeSet::new(),
        }
    }

    /// Consumes one message: copies an in-body payload into the mirror, records the
    /// rest. `check` is called with each delivered part whose pages count as received.
    fn consume(&mut self, m: InMsg, check: &mut dyn FnMut(&PartHead, &Pages, &BTreeSet<u32>)) {
        let head: PartHead = m.head().unwrap();
        let torn: BTreeSet<u32> = m.torn.iter().map(|s| head.pages[*s as usize]).collect();
        match m.at {
            PayloadAt::InBody => {
                for (k, p) in head.pages.iter().enumerate() {
                    self.mirror
                        .write(*p, &m.payload()[k * PAGE..(k + 1) * PAGE]);
                }
                self.in_body += 1;
            }
            PayloadAt::Placed => self.placed += 1,
            PayloadAt::Lost => {
                self.lost.push(head);
                return;
            }
        }
        self.torn_pages.extend(&torn);
        check(&head, &self.mirror, &torn);
    }
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

/// A pair over `n` links; `via(i, addr)` may put a proxy in front of link i's listener.
fn pair(n: usize, via: impl Fn(usize, SocketAddr) -> SocketAddr) -> (Alink, Alink) {
    let links = (0..n)
        .map(|_| LinkAddrs {
            local: any(),
            remote: any(),
        })
        .collect();
    let rx = Alink::start(cfg(2, 1, links)).unwrap();
    let to: Vec<SocketAddr> = rx
        .local_addrs()
        .iter()
        .enumerate()
        .map(|(i, a)| via(i, *a))
        .collect();
    let links = to
        .iter()
        .map(|r| LinkAddrs {
            local: any(),
            remote: *r,
        })
        .collect();
    let tx = Alink::start(cfg(1, 2, links)).unwrap();
    wait_up(&tx, n);
    wait_up(&rx, n);
    (tx, rx)
}

/// Splits `pages` into parts of `per` pages.
fn parts(round: u32, pages: &[u32], per: usize) -> Vec<PartHead> {
    pages
        .chunks(per)
        .map(|c| PartHead {
            round,
            pages: c.to_vec(),
        })
        .collect()
}

/// Sends `parts` lent from `src`, placed after `barrier`; returns the last sequence.
fn send_round(tx: &Alink, src: &Pages, parts: &[PartHead], barrier: u64, volatile: bool) -> u64 {
    *send_parts(tx, src, parts, barrier, volatile)
        .last()
        .unwrap()
}

/// As [`send_round`], returning every part's sequence.
fn send_parts(
    tx: &Alink,
    src: &Pages,
    parts: &[PartHead],
    barrier: u64,
    volatile: bool,
) -> Vec<u64> {
    let slices: Vec<Vec<&[u8]>> = parts
        .iter()
        .map(|p| p.pages.iter().map(|i| src.page(*i)).collect())
        .collect();
    let batch: Vec<(&PartHead, &[&[u8]])> = parts
        .iter()
        .zip(&slices)
        .map(|(h, s)| (h, s.as_slice()))
        .collect();
    let opts = SegOpts {
        seg_size: PAGE as u32,
        volatile,
        barrier,
    };
    tx.send_lent(&batch, opts, Duration::from_secs(30)).unwrap()
}

/// Receives `count` messages (or until `deadline`).
fn receive(
    rx: &mut Receiver,
    count: usize,
    check: &mut dyn FnMut(&PartHead, &Pages, &BTreeSet<u32>),
) -> usize {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut got = 0;
    while got < count {
        assert!(Instant::now() < deadline, "received {got} of {count}");
        if let Some(m) = rx.link.recv(Duration::from_millis(20)).unwrap() {
            rx.consume(m, check);
            got += 1;
        }
    }
    got
}

/// Every page of a delivered part must hold the source's bytes, torn pages excepted.
fn exact(src: &Pages) -> impl FnMut(&PartHead, &Pages, &BTreeSet<u32>) + '_ {
    move |h, mirror, torn| {
        for p in &h.pages {
            if !torn.contains(p) {
                assert!(
                    mirror.page(*p) == src.page(*p),
                    "round {} page {p} counted as received with wrong bytes",
                    h.round
                );
            }
        }
    }
}

#[test]
fn lent_sends_over_two_links_are_placed_in_the_receivers_memory() {
    init_log();
    let n = 4096u32; // 16 MiB
    let src = Pages::new(n as usize, |i| pattern(i as u32, 1));
    let (tx, rx) = pair(2, |_, a| a);
    let mut rx = Receiver::new(rx, n as usize);
    let order = scattered(n);
    // Round 1: every page, parts of 64 scattered pages; round 2 rewrites a quarter of
    // the pages and sends them again, placed after round 1.
    let r1 = parts(1, &order, 64);
    let mut check = exact(&src);
    let sender = thread::scope(|s| {
        let h = s.spawn(|| send_round(&tx, &src, &r1, 0, false));
        receive(&mut rx, r1.len(), &mut check);
        h.join().unwrap()
    });
    for i in (0..n).step_by(4) {
        src.write(i, &[pattern(i, 2); PAGE]);
    }
    let again: Vec<u32> = (0..n).step_by(4).collect();
    let r2 = parts(2, &again, 32);
    let mut check = exact(&src);
    thread::scope(|s| {
        let h = s.spawn(|| send_round(&tx, &src, &r2, sender, false));
        receive(&mut rx, r2.len(), &mut check);
        h.join().unwrap();
    });
    for i in 0..n {
        assert!(rx.mirror.page(i) == src.page(i), "page {i}");
    }
    // Most parts went straight into place; both links carried them.
    assert!(
        rx.placed > (r1.len() + r2.len()) as u64 / 2,
        "placed {}",
        rx.placed
    );
    assert_eq!(rx.placed + rx.in_body, (r1.len() + r2.len()) as u64);
    let st = tx.link_status();
    assert!(st.iter().all(|s| s.sent_msgs > 0), "{st:?}");
    assert!(rx.lost.is_empty() && tx.take_lost().is_empty());
    assert_eq!(rx.link.placing(), 0);
}

/// Memory rewritten while it is being sent (a guest during a sync round): segments that
/// changed under their write come back torn, never as wrong bytes counted as received,
/// and resending what a write log recorded makes both sides equal. (Whether a write
/// lands inside a segment's send here depends on scheduling; the writer's unit test
/// `memory_changed_during_the_write_is_marked_torn` makes it happen every time.)
#[test]
fn memory_written_during_the_send_is_torn_and_sent_again() {
    init_log();
    let n = 2048u32;
    let src = Arc::new(Pages::new(n as usize, |i| pattern(i as u32, 3)));
    // The write log: a page is marked after it is written (as KVM logs a write once
    // it happened), so a write during a send is in the next harvest.
    let log: Arc<Vec<AtomicBool>> = Arc::new((0..n).map(|_| AtomicBool::new(false)).collect());
    let stop = Arc::new(AtomicBool::new(false));
    let writes = Arc::new(AtomicU64::new(0));
    let mutator = {
        let (src, log, stop, writes) = (src.clone(), log.clone(), stop.clone(), writes.clone());
        thread::spawn(move || {
            let hot = scattered(n);
            let mut k = 0usize;
            while !stop.load(Ordering::Relaxed) {
                // A small hot set rewritten over and over, one word at a time.
                let p = hot[k % 16];
                let off = (k * 8) % PAGE;
                // SAFETY: inside page p; the race with the sender's reads is the point.
                unsafe { src.page_ptr(p).add(off).write_volatile(k as u8) };
                log[p as usize].store(true, Ordering::Release);
                writes.fetch_add(1, Ordering::Relaxed);
                k += 1;
                if k.is_multiple_of(4096) {
                    thread::yield_now();
                }
            }
        })
    };
    let (tx, rx) = pair(2, |_, a| a);
    let mut rx = Receiver::new(rx, n as usize);
    let mut round = 1;
    let mut pages: Vec<u32> = scattered(n);
    let mut barrier = 0;
    let mut torn_total = 0;
    loop {
        if round == 6 {
            stop.store(true, Ordering::Relaxed);
        }
        let ps = parts(round, &pages, 32);
        // Checked against what the sender holds: a non-torn page must equal the source,
        // unless the mutator wrote it after the send (then it is in the log).
        let mut check = |h: &PartHead, mirror: &Pages, torn: &BTreeSet<u32>| {
            for p in &h.pages {
                if !torn.contains(p) && mirror.page(*p) != src.page(*p) {
                    assert!(
                        log[*p as usize].load(Ordering::Acquire) || !stop.load(Ordering::Relaxed),
                        "page {p} differs and is not in the write log"
                    );
                }
            }
        };
        barrier = thread::scope(|s| {
            let h = s.spawn(|| send_round(&tx, &src, &ps, barrier, true));
            receive(&mut rx, ps.len(), &mut check);
            h.join().unwrap()
        });
        torn_total += rx.torn_pages.len();
        rx.torn_pages.clear();
        // Harvest the log for the next round.
        pages = (0..n)
            .filter(|p| log[*p as usize].swap(false, Ordering::AcqRel))
            .collect();
        if pages.is_empty() && stop.load(Ordering::Relaxed) {
            break;
        }
        if pages.is_empty() {
            pages.push(0);
        }
        round += 1;
        assert!(round < 50, "did not converge");
    }
    mutator.join().unwrap();
    for i in 0..n {
        assert!(
            rx.mirror.page(i) == src.page(i),
            "page {i} after {round} rounds"
        );
    }
    eprintln!(
        "{round} rounds, {} guest writes, {torn_total} torn pages reported",
        writes.load(Ordering::Relaxed)
    );
}

/// What a faulty link does to the sender's byte stream, per connection (in order).
#[derive(Clone, Copy, Debug)]
enum Fault {
    /// Flip one byte in the payload of the `n`th data frame.
    Corrupt(usize),
    /// Close the connection in the middle of the `n`th data frame's payload.
    Truncate(usize),
    /// Send the `n`th data frame twice.
    Duplicate(usize),
    Pass,
}

/// Reads one whole frame (header, body, segment trailer) from `r`, or None at the end.
fn read_frame(r: &mut impl Read) -> Option<(Vec<u8>, bool)> {
    let mut hdr = [0u8; 56];
    r.read_exact(&mut hdr).ok()?;
    let flags = u16::from_le_bytes([hdr[6], hdr[7]]);
    let head_len = u32::from_le_bytes(hdr[24..28].try_into().unwrap()) as usize;
    let body_len = u32::from_le_bytes(hdr[28..32].try_into().unwrap()) as usize;
    let mut f = hdr.to_vec();
    let mut body = vec![0u8; body_len];
    r.read_exact(&mut body).ok()?;
    f.extend_from_slice(&body);
    let data = hdr[5] == 3;
    if flags & 1 != 0 && flags & 2 == 0 {
        let seg = 512usize << ((flags >> 4) & 0xf);
        let nseg = (body_len - head_len).div_ceil(seg);
        let mut fixed = vec![0u8; 4 * nseg + 4];
        r.read_exact(&mut fixed).ok()?;
        let torn = u32::from_le_bytes(fixed[4 * nseg..].try_into().unwrap()) as usize;
        f.extend_from_slice(&fixed);
        let mut rest = vec![0u8; 4 * torn + 4];
        r.read_exact(&mut rest).ok()?;
        f.extend_from_slice(&rest);
    }
    Some((f, data && body_len > head_len))
}

/// A proxy in front of `target`: its k-th accepted connection gets `faults[k]` on the
/// dialer-to-acceptor direction (then Pass). Returns its address.
fn faulty_proxy(target: SocketAddr, faults: Vec<Fault>, stop: Arc<AtomicBool>) -> SocketAddr {
    let l = TcpListener::bind(any()).unwrap();
    let addr = l.local_addr().unwrap();
    l.set_nonblocking(true).unwrap();
    thread::spawn(move || {
        let mut k = 0;
        while !stop.load(Ordering::Relaxed) {
            let Ok((down, _)) = l.accept() else {
                thread::sleep(Duration::from_millis(5));
                continue;
            };
            down.set_nonblocking(false).unwrap();
            let Ok(up) = TcpStream::connect(target) else {
                continue;
            };
            let fault = faults.get(k).copied().unwrap_or(Fault::Pass);
            k += 1;
            // Acceptor to dialer: as is.
            let (mut a, mut b) = (up.try_clone().unwrap(), down.try_clone().unwrap());
            thread::spawn(move || {
                let mut buf = vec![0u8; 64 << 10];
                while let Ok(n) = a.read(&mut buf) {
                    if n == 0 || b.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
                let _ = b.shutdown(std::net::Shutdown::Both);
            });
            // Dialer to acceptor: frame by frame, with the fault.
            let (mut down, mut up) = (down, up);
            thread::spawn(move || {
                let mut data = 0;
                while let Some((mut f, is_data)) = read_frame(&mut down) {
                    if is_data {
                        data += 1;
                    }
                    let hit = is_data
                        && matches!(fault, Fault::Corrupt(n) | Fault::Truncate(n) | Fault::Duplicate(n) if n == data);
                    let ok = match fault {
                        Fault::Corrupt(_) if hit => {
                            let at = 56 + (f.len() - 56) / 2;
                            f[at] ^= 0x10;
                            up.write_all(&f).is_ok()
                        }
                        Fault::Truncate(_) if hit => {
                            let _ = up.write_all(&f[..56 + (f.len() - 56) / 2]);
                            false
                        }
                        Fault::Duplicate(_) if hit => {
                            up.write_all(&f).is_ok() && up.write_all(&f).is_ok()
                        }
                        _ => up.write_all(&f).is_ok(),
                    };
                    if !ok {
                        break;
                    }
                }
                let _ = up.shutdown(std::net::Shutdown::Both);
                let _ = down.shutdown(std::net::Shutdown::Both);
            });
        }
    });
    addr
}

/// Link 0 corrupts a frame, then truncates one, then duplicates one, across three
/// connections, while parts flow over both links (lent and, in between, segmented
/// `Bytes` messages, which are resent rather than lost). Every part delivered as
/// received holds exactly the sender's bytes; lost parts are known to both ends;
/// sending them again makes the copies equal.
#[test]
fn corrupted_truncated_and_duplicated_frames_never_count_bad_pages() {
    init_log();
    let n = 4096u32;
    let src = Pages::new(n as usize, |i| pattern(i as u32, 5));
    let stop = Arc::new(AtomicBool::new(false));
    let faults = vec![
        Fault::Corrupt(3),
        Fault::Truncate(1),
        Fault::Duplicate(1),
        Fault::Pass,
    ];
    let (tx, rx) = pair(2, |i, a| {
        if i == 0 {
            faulty_proxy(a, faults.clone(), stop.clone())
        } else {
            a
        }
    });
    let mut rx = Receiver::new(rx, n as usize);
    let mut check = exact(&src);
    let order = scattered(n);
    let mut barrier = 0;
    let mut total = 0;
    // Lent parts by sequence (what the sender knows it lent).
    let mut sent: std::collections::BTreeMap<u64, PartHead> = Default::default();
    // Eight rounds of 512 pages in parts of 16 (2 of them as Bytes messages per round).
    for (r, chunk) in order.chunks(512).enumerate() {
        // Each round starts with both links up, so that every fault meets traffic.
        wait_up(&tx, 2);
        wait_up(&rx.link, 2);
        let ps = parts(r as u32 + 1, chunk, 16);
        let (bytes_parts, lent_parts) = ps.split_at(2);
        barrier = thread::scope(|s| {
            let h = s.spawn(|| {
                let opts = SegOpts {
                    seg_size: PAGE as u32,
                    volatile: false,
                    barrier,
                };
                for p in bytes_parts {
                    let payload = p
                        .pages
                        .iter()
                        .map(|i| Bytes::copy_from_slice(src.page(*i)))
                        .collect();
                    tx.send_segmented(p, payload, opts).unwrap();
                }
                send_parts(&tx, &src, lent_parts, barrier, false)
            });
            receive(&mut rx, ps.len(), &mut check);
            let seqs = h.join().unwrap();
            for (s, p) in seqs.iter().zip(lent_parts) {
                sent.insert(*s, p.clone());
            }
            *seqs.last().unwrap()
        });
        total += ps.len();
    }
    // Lost parts: every one the receiver got as lost is known to the sender (which may
    // list more: a part delivered whole whose acknowledgement died with the link).
    let t = Instant::now();
    let mut lost_tx: BTreeSet<u64> = BTreeSet::new();
    loop {
        lost_tx.extend(tx.take_lost());
        let known = rx
            .lost
            .iter()
            .all(|h| sent.iter().any(|(s, p)| p == h && lost_tx.contains(s)));
        if known {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "a part lost at the receiver is unknown to the sender"
        );
        thread::sleep(Duration::from_millis(10));
    }
    if !lost_tx.is_empty() {
        let again: Vec<u32> = lost_tx.iter().flat_map(|s| sent[s].pages.clone()).collect();
        let ps = parts(100, &again, 16);
        thread::scope(|s| {
            let h = s.spawn(|| send_round(&tx, &src, &ps, barrier, false));
            receive(&mut rx, ps.len(), &mut check);
            h.join().unwrap();
        });
    }
    for i in 0..n {
        assert!(rx.mirror.page(i) == src.page(i), "page {i}");
    }
    let st = rx.link.link_status();
    eprintln!(
        "{total} parts: {} placed, {} in buffers, {} lost; link 0: {} connections, {} refused; {} duplicates dropped",
        rx.placed,
        rx.in_body,
        rx.lost.len(),
        st[0].connections,
        st[0].refused,
        rx.link.duplicates_dropped()
    );
    // The three faults each cost link 0 its connection; the receiver refused the
    // corrupted and the duplicated frame.
    assert!(st[0].connections >= 4, "{st:?}");
    assert!(st[0].refused >= 2, "{st:?}");
    stop.store(true, Ordering::Relaxed);
}

/// Placement waits for its barrier: with the consumer not consuming, a part whose
/// barrier is not through goes into a buffer, one whose barrier is through (or none) is
/// placed, and no part is ever both.
#[test]
fn placement_waits_for_the_barrier_to_be_consumed() {
    init_log();
    let src = Pages::new(64, |i| pattern(i as u32, 7));
    let (tx, rx) = pair(1, |_, a| a);
    let mut rx = Receiver::new(rx, 64);
    let order: Vec<u32> = (0..64).collect();
    let first = parts(1, &order[..32], 32);
    let second = parts(2, &order[32..], 32);
    let s1 = send_round(&tx, &src, &first, 0, false);
    // Barrier s1 is not consumed yet when the second part arrives (nothing is consumed
    // before both are in): buffered.
    let s2 = send_round(&tx, &src, &second, s1, false);
    let t = Instant::now();
    while rx.link.ready_to_recv() < 2 {
        assert!(t.elapsed() < Duration::from_secs(10), "both parts arrive");
        thread::sleep(Duration::from_millis(2));
    }
    let mut got = Vec::new();
    while got.len() < 2 {
        assert!(t.elapsed() < Duration::from_secs(10));
        if let Some(m) = rx.link.recv(Duration::from_millis(20)).unwrap() {
            got.push(m);
        }
    }
    assert_eq!((got[0].seq, got[1].seq), (s1, s2));
    assert_eq!(got[0].at, PayloadAt::Placed);
    assert_eq!(got[1].at, PayloadAt::InBody);
    let mut check = exact(&src);
    for m in got {
        rx.consume(m, &mut check);
    }
    // Consumed now: a third part placed after s2 goes in place.
    let third = parts(3, &order[..16], 16);
    let s3 = send_round(&tx, &src, &third, s2, false);
    let m = loop {
        if let Some(m) = rx.link.recv(Duration::from_millis(20)).unwrap() {
            break m;
        }
    };
    assert_eq!((m.seq, m.at), (s3, PayloadAt::Placed));
}

#[test]
fn plain_sends_still_arrive_in_buffers_with_a_placer_installed() {
    init_log();
    let (tx, rx) = pair(1, |_, a| a);
    rx.set_placer(|_| panic!("plain messages are never placed"));
    let h = PartHead {
        round: 0,
        pages: vec![],
    };
    tx.send(&h, vec![Bytes::from_static(b"payload")]).unwrap();
    let m = loop {
        if let Some(m) = rx.recv(Duration::from_millis(20)).unwrap() {
            break m;
        }
    };
    assert_eq!(m.at, PayloadAt::InBody);
    assert_eq!(m.payload(), b"payload");
    let _ = Mutex::new(0);
}
