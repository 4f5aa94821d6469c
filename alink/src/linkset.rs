//! Sending side of the message layer: the window of unacknowledged messages and the set of
//! links they are spread over. Pure (no I/O, no clock); the TCP layer wraps it in a mutex.
//!
//! Every message gets a global sequence number and stays in the window until the peer's
//! cumulative acknowledgement passes it. It is assigned to the healthy link with the fewest
//! queued bytes (ties broken round-robin). When a link goes down, every unacknowledged
//! message assigned to it (queued or already written into the dead socket) is reassigned to
//! the remaining healthy links; the receiver drops duplicates by sequence number. With no
//! healthy link, messages wait in `pending` until one comes up. The window is bounded in
//! messages and bytes: a full window is backpressure for the caller.

use bytes::Bytes;
use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

/// Maximum number of links per A-Link (explicit limit).
pub const MAX_LINKS: usize = 8;

/// How a segmented message is framed (see `frame`): its payload segment size, whether
/// its memory may change while it is sent (then every segment is checked again after
/// its write and the changed ones marked torn), and the message it may be placed after
/// at the receiver (0 = none; see `reorder`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegOpts {
    pub seg_size: u32,
    pub volatile: bool,
    pub barrier: u64,
}

impl Default for SegOpts {
    /// 4 KiB segments (pages), stable memory, no barrier.
    fn default() -> Self {
        SegOpts {
            seg_size: 4096,
            volatile: false,
            barrier: 0,
        }
    }
}

/// A message as the writer threads see it. Payload chunks are reference-counted views of the
/// caller's buffers: sending and retransmitting never copies them. A lent payload is the
/// caller's memory itself, for the time of its blocking send (`lent`).
#[derive(Debug)]
pub struct OutMsg {
    pub seq: u64,
    pub head: Vec<u8>,
    pub payload: Vec<Bytes>,
    /// Segmented framing (always, for a lent payload).
    pub seg: Option<SegOpts>,
    pub lent: Option<Arc<crate::lent::Lent>>,
    /// Reported lost once already (a void frame can be sent again on another link).
    pub lost_reported: std::sync::atomic::AtomicBool,
}

impl OutMsg {
    pub fn wire_len(&self) -> usize {
        self.head.len()
            + self.payload.iter().map(|p| p.len()).sum::<usize>()
            + self.lent.as_ref().map_or(0, |l| l.len())
    }
}

/// Window limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WindowLimits {
    pub max_msgs: usize,
    pub max_bytes: usize,
}

/// Link and peer events.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkEvent {
    LinkUp(usize),
    LinkDown(usize),
    /// Every link is down.
    PeerUnreachable,
    /// The first link came up after PeerUnreachable (or at start).
    PeerReachable,
}

#[derive(Debug)]
struct Entry {
    msg: Arc<OutMsg>,
    link: Option<usize>,
}

#[derive(Debug, Default)]
struct LinkTx {
    up: bool,
    queue: VecDeque<u64>,
    queued_bytes: usize,
    sent_msgs: u64,
    sent_bytes: u64,
}

/// Per-link counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LinkTxStats {
    pub up: bool,
    pub queued_msgs: usize,
    pub queued_bytes: usize,
    pub sent_msgs: u64,
    pub sent_bytes: u64,
}

#[derive(Debug)]
pub struct TxWindow {
    limits: WindowLimits,
    next_seq: u64,
    acked: u64,
    unacked: BTreeMap<u64, Entry>,
    unacked_bytes: usize,
    links: Vec<LinkTx>,
    pending: VecDeque<u64>,
    rr: usize,
    reachable: bool,
}

impl TxWindow {
    /// `nlinks` links, all down. Sequence numbers start at 1 (an ack of 1 = nothing consumed).
    pub fn new(nlinks: usize, limits: WindowLimits) -> TxWindow {
        assert!((1..=MAX_LINKS).contains(&nlinks), "1..={MAX_LINKS} links");
        assert!(limits.max_msgs > 0 && limits.max_bytes > 0);
        TxWindow {
            limits,
            next_seq: 1,
            acked: 1,
            unacked: BTreeMap::new(),
            unacked_bytes: 0,
            links: (0..nlinks).map(|_| LinkTx::default()).collect(),
            pending: VecDeque::new(),
            rr: 0,
            reachable: false,
        }
    }

    pub fn limits(&self) -> WindowLimits {
        self.limits
    }

    /// Whether a message of `bytes` fits now. A message larger than the byte window fits
    /// when the window is empty, so that it can never deadlock.
    pub fn has_room(&self, bytes: usize) -> bool {
        self.unacked.len() < self.limits.max_msgs
            && (self.unacked.is_empty() || self.unacked_bytes + bytes <= self.limits.max_bytes)
    }

    pub fn unacked_len(&self) -> usize {
        self.unacked.len()
    }

    /// Everything sent has been acknowledged.
    pub fn is_drained(&self) -> bool {
        self.unacked.is_empty()
    }

    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Enqueues a message. Returns its sequence or None when the window is full.
    pub fn push(&mut self, head: Vec<u8>, payload: Vec<Bytes>) -> Option<u64> {
        self.push_msg(head, payload, None, None)
    }

    /// Enqueues a message with segmented framing, its payload in `payload` or lent.
    pub fn push_msg(
        &mut self,
        head: Vec<u8>,
        payload: Vec<Bytes>,
        seg: Option<SegOpts>,
        lent: Option<Arc<crate::lent::Lent>>,
    ) -> Option<u64> {
        let bytes = head.len()
            + payload.iter().map(|p| p.len()).sum::<usize>()
            + lent.as_ref().map_or(0, |l| l.len());
        if !self.has_room(bytes) {
            return None;
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        let seg = if lent.is_some() {
            Some(seg.unwrap_or_default())
        } else {
            seg
        };
        let msg = Arc::new(OutMsg {
            seq,
            head,
            payload,
            seg,
            lent,
            lost_reported: Default::default(),
        });
        self.unacked.insert(seq, Entry { msg, link: None });
        self.unacked_bytes += bytes;
        self.assign(seq);
        self.check_invariants();
        Some(seq)
    }

    fn pick(&mut self) -> Option<usize> {
        let n = self.links.len();
        let mut best: Option<usize> = None;
        for i in 0..n {
            let l = (self.rr + i) % n;
            if !self.links[l].up {
                continue;
            }
            match best {
                None => best = Some(l),
                Some(b) if self.links[l].queued_bytes < self.links[b].queued_bytes => {
                    best = Some(l)
                }
                _ => {}
            }
        }
        if let Some(b) = best {
            self.rr = (b + 1) % n;
        }
        best
    }

    fn assign(&mut self, seq: u64) {
        let Some(entry) = self.unacked.get(&seq) else {
            return;
        };
        let bytes = entry.msg.wire_len();
        match self.pick() {
            Some(l) => {
                self.links[l].queue.push_back(seq);
                self.links[l].queued_bytes += bytes;
                if let Some(e) = self.unacked.get_mut(&seq) {
                    e.link = Some(l);
                }
            }
            None => {
                if let Some(e) = self.unacked.get_mut(&seq) {
                    e.link = None;
                }
                self.pending.push_back(seq);
            }
        }
    }

    /// Next message for `link`'s writer, if any.
    pub fn next_for(&mut self, link: usize) -> Option<Arc<OutMsg>> {
        while let Some(seq) = self.links[link].queue.pop_front() {
            let Some(e) = self.unacked.get(&seq) else {
                // Acknowledged while queued (it also went over another link).
                continue;
            };
            if e.link != Some(link) {
                continue;
            }
            let msg = e.msg.clone();
            let lt = &mut self.links[link];
            lt.queued_bytes = lt.queued_bytes.saturating_sub(msg.wire_len());
            lt.sent_msgs += 1;
            lt.sent_bytes += msg.wire_len() as u64;
            return Some(msg);
        }
        self.links[link].queued_bytes = 0;
        None
    }

    pub fn has_queued(&self, link: usize) -> bool {
        !self.links[link].queue.is_empty()
    }

    /// Cumulative acknowledgement: every seq below `next_unconsumed` was consumed by the peer.
    /// Returns true if the window moved.
    pub fn on_ack(&mut self, next_unconsumed: u64) -> bool {
        if next_unconsumed <= self.acked {
            return false;
        }
        // An ack for messages never sent is a protocol violation; clamp rather than trust it.
        let upto = next_unconsumed.min(self.next_seq);
        while let Some((&seq, _)) = self.unacked.first_key_value() {
            if seq >= upto {
                break;
            }
            if let Some(e) = self.unacked.remove(&seq) {
                self.unacked_bytes -= e.msg.wire_len();
            }
        }
        self.acked = upto;
        self.pending.retain(|s| *s >= upto);
        self.check_invariants();
        true
    }

    pub fn is_up(&self, link: usize) -> bool {
        self.links[link].up
    }

    pub fn any_up(&self) -> bool {
        self.links.iter().any(|l| l.up)
    }

    /// A link became usable.
    pub fn link_up(&mut self, link: usize) -> Vec<LinkEvent> {
        let mut ev = Vec::new();
        if self.links[link].up {
            return ev;
        }
        self.links[link].up = true;
        ev.push(LinkEvent::LinkUp(link));
        if !self.reachable {
            self.reachable = true;
            ev.push(LinkEvent::PeerReachable);
        }
        let pending: Vec<u64> = self.pending.drain(..).collect();
        for seq in pending {
            self.assign(seq);
        }
        self.check_invariants();
        ev
    }

    /// A link failed: its unacknowledged messages move to the other links.
    pub fn link_down(&mut self, link: usize) -> Vec<LinkEvent> {
        let mut ev = Vec::new();
        if !self.links[link].up {
            return ev;
        }
        let lt = &mut self.links[link];
        lt.up = false;
        lt.queue.clear();
        lt.queued_bytes = 0;
        ev.push(LinkEvent::LinkDown(link));
        let moved: Vec<u64> = self
            .unacked
            .iter()
            .filter(|(_, e)| e.link == Some(link))
            .map(|(s, _)| *s)
            .collect();
        for seq in moved {
            self.assign(seq);
        }
        if !self.any_up() && self.reachable {
            self.reachable = false;
            ev.push(LinkEvent::PeerUnreachable);
        }
        self.check_invariants();
        ev
    }

    pub fn stats(&self) -> Vec<LinkTxStats> {
        self.links
            .iter()
            .map(|l| LinkTxStats {
                up: l.up,
                queued_msgs: l.queue.len(),
                queued_bytes: l.queued_bytes,
                sent_msgs: l.sent_msgs,
                sent_bytes: l.sent_bytes,
            })
            .collect()
    }

    fn check_invariants(&self) {
        debug_assert!(self.unacked.len() <= self.limits.max_msgs);
        debug_assert!(self.acked <= self.next_seq);
        debug_assert!(self
            .unacked
            .keys()
            .all(|s| *s >= self.acked && *s < self.next_seq));
        debug_assert_eq!(
            self.unacked_bytes,
            self.unacked
                .values()
                .map(|e| e.msg.wire_len())
                .sum::<usize>()
        );
        // Every unacked message is either assigned to an up link or pending.
        debug_assert!(self.unacked.iter().all(|(s, e)| match e.link {
            Some(l) => self.links[l].up,
            None => self.pending.contains(s),
        }));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lim() -> WindowLimits {
        WindowLimits {
            max_msgs: 4,
            max_bytes: 1000,
        }
    }

    fn p(n: usize) -> Vec<Bytes> {
        vec![Bytes::from(vec![0u8; n])]
    }

    #[test]
    fn spreads_over_up_links_and_backpressures() {
        let mut w = TxWindow::new(2, lim());
        assert_eq!(
            w.link_up(0),
            vec![LinkEvent::LinkUp(0), LinkEvent::PeerReachable]
        );
        assert_eq!(w.link_up(1), vec![LinkEvent::LinkUp(1)]);
        for _ in 0..4 {
            w.push(vec![], p(100)).unwrap();
        }
        assert!(w.push(vec![], p(1)).is_none(), "message window full");
        let s = w.stats();
        assert_eq!(s[0].queued_msgs, 2);
        assert_eq!(s[1].queued_msgs, 2);
        assert!(w.on_ack(3));
        assert_eq!(w.unacked_len(), 2);
        assert!(!w.has_room(901), "byte window");
        assert!(w.has_room(800));
    }

    #[test]
    fn link_down_moves_unacked_to_survivor() {
        let mut w = TxWindow::new(2, lim());
        w.link_up(0);
        w.link_up(1);
        let a = w.push(vec![], p(10)).unwrap();
        let b = w.push(vec![], p(10)).unwrap();
        // Both written (popped) by their writers but not acked.
        let m0 = w.next_for(0).unwrap();
        let m1 = w.next_for(1).unwrap();
        assert_eq!((m0.seq, m1.seq), (a, b));
        assert_eq!(w.link_down(1), vec![LinkEvent::LinkDown(1)]);
        // b is resent on link 0.
        assert_eq!(w.next_for(0).unwrap().seq, b);
        assert!(w.next_for(1).is_none());
        assert_eq!(
            w.link_down(0),
            vec![LinkEvent::LinkDown(0), LinkEvent::PeerUnreachable]
        );
        // Both wait in pending, then go out on the first link that comes back, in order.
        let c = w.push(vec![], p(10)).unwrap();
        w.link_up(1);
        let got: Vec<u64> = std::iter::from_fn(|| w.next_for(1))
            .map(|m| m.seq)
            .collect();
        assert_eq!(got, vec![a, b, c]);
        w.on_ack(c + 1);
        assert!(w.is_drained());
    }

    #[test]
    fn oversized_message_fits_an_empty_window_only() {
        let mut w = TxWindow::new(1, lim());
        w.push(vec![], p(5000)).unwrap();
        assert!(w.push(vec![], p(1)).is_none());
        w.on_ack(2);
        w.push(vec![], p(1)).unwrap();
    }

    #[test]
    fn bogus_ack_is_clamped() {
        let mut w = TxWindow::new(1, lim());
        w.push(vec![], p(1)).unwrap();
        w.on_ack(u64::MAX);
        assert!(w.is_drained());
        assert_eq!(w.push(vec![], p(1)), Some(2));
    }
}
