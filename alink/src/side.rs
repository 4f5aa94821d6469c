//! Side messages: small, best-effort messages of the layer above (the quorum's peer
//! messages: status, witness election) carried in the body of Heartbeat frames, on
//! every healthy link, outside the message window.
//!
//! Why not the message stream: a Data message waits for window room and for the
//! messages before it (a busy checkpoint stream, a resync), and it is delivered once,
//! on one link. A side message goes out with the next heartbeat of each link (the
//! writers send heartbeats before data), so it reaches the peer while any path is alive,
//! whatever the stream does. The price: side messages may be lost (a link dying, a queue
//! full) and are never resent; their users resend on their own schedule.
//!
//! A body is `instance` (8 bytes, random per sender), `seq` (8 bytes, from 1) and the
//! message; little endian. The receiver delivers each `seq` of an instance at most once
//! (the first copy, from any link) and drops an older one that arrives after a newer.

use std::collections::VecDeque;

/// Largest side message, in bytes (a quorum status is a few dozen).
pub const MAX_SIDE_LEN: usize = 1024;
/// Side messages kept for links that have not sent them yet (oldest dropped first).
pub const SIDE_TX_QUEUE: usize = 16;
/// Side messages received and not yet taken by the consumer (oldest dropped first).
pub const SIDE_RX_QUEUE: usize = 64;
const SIDE_HEADER: usize = 16;

/// The sending side: the queue and how far each link got.
#[derive(Debug)]
pub struct SideTx {
    instance: u64,
    next: u64,
    queue: VecDeque<(u64, Vec<u8>)>,
    /// Per link: the highest seq written (or skipped) on it.
    sent: Vec<u64>,
}

impl SideTx {
    pub fn new(nlinks: usize, instance: u64) -> SideTx {
        SideTx {
            instance,
            next: 1,
            queue: VecDeque::new(),
            sent: vec![0; nlinks],
        }
    }

    /// Queues `msg` for every link; false if it is too long (not queued).
    pub fn push(&mut self, msg: &[u8]) -> bool {
        if msg.len() > MAX_SIDE_LEN {
            return false;
        }
        let seq = self.next;
        self.next += 1;
        let mut body = Vec::with_capacity(SIDE_HEADER + msg.len());
        body.extend_from_slice(&self.instance.to_le_bytes());
        body.extend_from_slice(&seq.to_le_bytes());
        body.extend_from_slice(msg);
        if self.queue.len() >= SIDE_TX_QUEUE {
            self.queue.pop_front();
        }
        self.queue.push_back((seq, body));
        true
    }

    /// The bodies `link` has not written yet, oldest first (marked written).
    pub fn take_for(&mut self, link: usize) -> Vec<Vec<u8>> {
        let Some(sent) = self.sent.get_mut(link) else {
            return Vec::new();
        };
        let out: Vec<Vec<u8>> = self
            .queue
            .iter()
            .filter(|(s, _)| *s > *sent)
            .map(|(_, b)| b.clone())
            .collect();
        *sent = self.next - 1;
        out
    }

    /// A link (re)connected: it carries only messages queued from now on (an old status
    /// arriving late would mislead more than help).
    pub fn link_up(&mut self, link: usize) {
        if let Some(s) = self.sent.get_mut(link) {
            *s = self.next - 1;
        }
    }

    /// Whether `link` has a message to write.
    pub fn has_for(&self, link: usize) -> bool {
        self.sent
            .get(link)
            .is_some_and(|s| self.queue.back().is_some_and(|(q, _)| q > s))
    }
}

/// The receiving side: duplicate filter and the queue for the consumer.
#[derive(Debug, Default)]
pub struct SideRx {
    instance: Option<u64>,
    last: u64,
    queue: VecDeque<Vec<u8>>,
    dropped: u64,
}

impl SideRx {
    /// A Heartbeat body (non-empty). Err: malformed (the sender is not a twinrun A-Link).
    pub fn on_body(&mut self, body: &[u8]) -> Result<(), String> {
        if body.len() < SIDE_HEADER || body.len() > SIDE_HEADER + MAX_SIDE_LEN {
            return Err(format!("side message of {} bytes", body.len()));
        }
        let mut w = [0u8; 8];
        w.copy_from_slice(&body[..8]);
        let instance = u64::from_le_bytes(w);
        w.copy_from_slice(&body[8..16]);
        let seq = u64::from_le_bytes(w);
        if self.instance != Some(instance) {
            // A new sender (the peer restarted its A-Link): its sequence starts again.
            self.instance = Some(instance);
            self.last = 0;
        }
        if seq <= self.last {
            return Ok(());
        }
        self.last = seq;
        if self.queue.len() >= SIDE_RX_QUEUE {
            self.queue.pop_front();
            self.dropped += 1;
        }
        self.queue.push_back(body[SIDE_HEADER..].to_vec());
        Ok(())
    }

    /// The messages received since the last call, oldest first.
    pub fn drain(&mut self) -> Vec<Vec<u8>> {
        self.queue.drain(..).collect()
    }

    /// Messages dropped because the consumer did not take them in time.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_link_carries_each_message_once_and_the_receiver_delivers_it_once() {
        let mut tx = SideTx::new(2, 7);
        let mut rx = SideRx::default();
        assert!(!tx.has_for(0));
        assert!(tx.push(b"a"));
        assert!(tx.push(b"b"));
        assert!(tx.has_for(0) && tx.has_for(1));
        let l0 = tx.take_for(0);
        assert_eq!(l0.len(), 2);
        assert!(!tx.has_for(0));
        assert!(tx.take_for(0).is_empty());
        let l1 = tx.take_for(1);
        for b in l0.iter().chain(&l1) {
            rx.on_body(b).unwrap();
        }
        assert_eq!(rx.drain(), vec![b"a".to_vec(), b"b".to_vec()]);
        // An older copy after a newer one is dropped.
        assert!(tx.push(b"c"));
        assert!(tx.push(b"d"));
        let l0 = tx.take_for(0);
        rx.on_body(&l0[1]).unwrap();
        rx.on_body(&l0[0]).unwrap();
        assert_eq!(rx.drain(), vec![b"d".to_vec()]);
        // A link that comes up carries only what is queued after.
        tx.link_up(1);
        assert!(tx.take_for(1).is_empty());
        assert!(tx.take_for(5).is_empty());
    }

    #[test]
    fn bounds_and_malformed_bodies() {
        let mut tx = SideTx::new(1, 1);
        assert!(!tx.push(&vec![0; MAX_SIDE_LEN + 1]));
        for i in 0..(SIDE_TX_QUEUE + 5) {
            assert!(tx.push(&[i as u8]));
        }
        assert_eq!(tx.take_for(0).len(), SIDE_TX_QUEUE);
        let mut rx = SideRx::default();
        assert!(rx.on_body(&[0; 15]).is_err());
        assert!(rx
            .on_body(&vec![0; SIDE_HEADER + MAX_SIDE_LEN + 1])
            .is_err());
        // More than the receiver keeps, fed one by one: the oldest are dropped.
        let mut n = 0;
        let mut tx = SideTx::new(1, 3);
        for i in 0..(SIDE_RX_QUEUE + 3) {
            tx.push(&[i as u8]);
            for b in tx.take_for(0) {
                rx.on_body(&b).unwrap();
                n += 1;
            }
        }
        assert_eq!(n, SIDE_RX_QUEUE + 3);
        assert_eq!(rx.drain().len(), SIDE_RX_QUEUE);
        assert_eq!(rx.dropped(), 3);
        // A restarted sender (new instance) starts its sequence again.
        let mut tx = SideTx::new(1, 4);
        tx.push(b"x");
        for b in tx.take_for(0) {
            rx.on_body(&b).unwrap();
        }
        assert_eq!(rx.drain(), vec![b"x".to_vec()]);
    }
}
