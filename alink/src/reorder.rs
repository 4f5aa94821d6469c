//! Receiving side of the message layer: puts messages that arrived over several links back
//! into sequence order, drops duplicates (a message resent after a link failure may arrive
//! twice) and bounds what it buffers. Pure; the TCP layer wraps it in a mutex.

use std::collections::{BTreeMap, VecDeque};

/// A received message: `body[..head_len]` is the postcard head, the rest is the payload,
/// read from the socket straight into this buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InMsg {
    pub seq: u64,
    pub head_len: usize,
    /// The frame body as received (a pooled buffer: dropping it recycles the memory).
    pub body: crate::buf::Buf,
}

impl InMsg {
    pub fn head_bytes(&self) -> &[u8] {
        &self.body[..self.head_len]
    }
    pub fn payload(&self) -> &[u8] {
        &self.body[self.head_len..]
    }
    /// Decodes the head.
    pub fn head<'a, T: serde::Deserialize<'a>>(&'a self) -> Result<T, postcard::Error> {
        postcard::from_bytes(self.head_bytes())
    }
}

/// What happened to an arriving message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arrival {
    /// Buffered; `ready` messages are now deliverable in order.
    Accepted,
    /// Already delivered or already buffered.
    Duplicate,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RxError {
    #[error("message {seq} is beyond the receive window (next {next}, window {window})")]
    BeyondWindow { seq: u64, next: u64, window: u64 },
}

#[derive(Debug)]
pub struct RxReorder {
    window: u64,
    /// Next sequence to move into `ready`.
    next: u64,
    /// Next sequence the application will consume; the cumulative ack we send.
    consumed: u64,
    early: BTreeMap<u64, InMsg>,
    ready: VecDeque<InMsg>,
    duplicates: u64,
}

impl RxReorder {
    /// `window` must equal the sender's message window: the sender never has more than that
    /// many unconsumed messages out, so anything further ahead is a protocol violation.
    pub fn new(window: u64) -> RxReorder {
        assert!(window > 0);
        RxReorder {
            window,
            next: 1,
            consumed: 1,
            early: BTreeMap::new(),
            ready: VecDeque::new(),
            duplicates: 0,
        }
    }

    pub fn on_message(&mut self, msg: InMsg) -> Result<Arrival, RxError> {
        if msg.seq < self.next || self.early.contains_key(&msg.seq) {
            self.duplicates += 1;
            return Ok(Arrival::Duplicate);
        }
        if msg.seq >= self.consumed + self.window {
            return Err(RxError::BeyondWindow {
                seq: msg.seq,
                next: self.next,
                window: self.window,
            });
        }
        self.early.insert(msg.seq, msg);
        while let Some(m) = self.early.remove(&self.next) {
            self.ready.push_back(m);
            self.next += 1;
        }
        debug_assert!(self.ready.len() + self.early.len() <= self.window as usize);
        Ok(Arrival::Accepted)
    }

    /// Next in-order message, if any.
    pub fn pop(&mut self) -> Option<InMsg> {
        let m = self.ready.pop_front()?;
        debug_assert_eq!(m.seq, self.consumed);
        self.consumed = m.seq + 1;
        Some(m)
    }

    pub fn has_ready(&self) -> bool {
        !self.ready.is_empty()
    }

    /// Cumulative acknowledgement: the next sequence not yet consumed.
    pub fn ack(&self) -> u64 {
        self.consumed
    }

    pub fn duplicates(&self) -> u64 {
        self.duplicates
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(seq: u64) -> InMsg {
        InMsg {
            seq,
            head_len: 0,
            body: seq.to_le_bytes().to_vec().into(),
        }
    }

    #[test]
    fn reorders_and_dedups() {
        let mut r = RxReorder::new(8);
        assert_eq!(r.on_message(m(3)), Ok(Arrival::Accepted));
        assert!(!r.has_ready());
        assert_eq!(r.on_message(m(1)), Ok(Arrival::Accepted));
        assert_eq!(r.on_message(m(3)), Ok(Arrival::Duplicate));
        assert_eq!(r.pop().unwrap().seq, 1);
        assert!(r.pop().is_none());
        assert_eq!(r.on_message(m(1)), Ok(Arrival::Duplicate));
        r.on_message(m(2)).unwrap();
        assert_eq!(r.pop().unwrap().seq, 2);
        assert_eq!(r.pop().unwrap().seq, 3);
        assert_eq!(r.ack(), 4);
        assert_eq!(r.duplicates(), 2);
    }

    #[test]
    fn window_is_enforced_against_consumption() {
        let mut r = RxReorder::new(4);
        for s in 1..=4 {
            r.on_message(m(s)).unwrap();
        }
        assert!(r.on_message(m(5)).is_err());
        r.pop();
        r.on_message(m(5)).unwrap();
    }
}
