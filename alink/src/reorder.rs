//! Receiving side of the message layer: puts messages that arrived over several links back
//! into sequence order, drops duplicates (a message resent after a link failure may arrive
//! twice) and bounds what it buffers. Pure; the TCP layer wraps it in a mutex.
//!
//! **Placed payloads.** A segmented message may have its payload written by a link's
//! reader straight into its final place (the receiver's [`crate::frame::Placement`])
//! before it is delivered. Writing in place is what the rules below make safe, so that a
//! place never holds stale bytes of a message counted as delivered after a newer one:
//!
//! - A reader must *claim* a message before writing its payload in place
//!   ([`RxReorder::try_claim`]). A claim is granted only for a message not yet
//!   resolved (neither buffered nor delivered), not claimed by another link, and whose
//!   *barrier* (the last message its destinations may overlap, named by the sender) has
//!   been consumed: everything the consumer copies from buffers it copies in order, so
//!   a later message may only write in place once the earlier overlapping ones are
//!   through. Messages the sender puts under one barrier must not overlap each other.
//! - While a message is claimed, any other arrival of it (a resend on another link, a
//!   void) is *parked*, not accepted: the claimant may still be writing, and what it
//!   writes must not land after the message counts as resolved.
//! - The claim ends when the claimant delivers the message (parked copies are then
//!   duplicates) or abandons it (its connection died mid-frame, or the frame failed its
//!   checks: [`RxReorder::abandon`]); then the first parked copy, if any, resolves it.
//!   Until then nothing later can be delivered (delivery is in order), and a later
//!   message whose barrier covers this one cannot be placed.

use std::collections::{BTreeMap, VecDeque};

/// Where a received message's payload is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PayloadAt {
    /// In `body`, after the head.
    InBody,
    /// Written straight into the places the receiver's placer gave, checked segment by
    /// segment (torn segments excepted); `body` holds the head only.
    Placed,
    /// Lost: the sender lent this payload (a borrowed send) and could no longer send it
    /// when the link that carried it failed. `body` holds the head; places a placer gave
    /// for it may hold part of it. The sender reported it as lost too.
    Lost,
}

/// A received message: `body[..head_len]` is the postcard head, the rest is the payload,
/// read from the socket straight into this buffer (see [`PayloadAt`] for the others).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InMsg {
    pub seq: u64,
    pub head_len: usize,
    /// The frame body as received (a pooled buffer: dropping it recycles the memory).
    pub body: crate::buf::Buf,
    pub at: PayloadAt,
    /// Segments (of `seg_size` bytes from the payload's start) the sender saw change
    /// while it sent them: their bytes were not checked and are stale; the sender sends
    /// that memory again. Empty for plain messages.
    pub torn: Vec<u32>,
    /// Segment size of a segmented message, else 0.
    pub seg_size: u32,
    /// Payload bytes written in place (0 unless placed).
    pub placed_len: usize,
}

impl InMsg {
    /// A plain message whose payload is in `body`.
    pub fn new(seq: u64, head_len: usize, body: crate::buf::Buf) -> InMsg {
        InMsg {
            seq,
            head_len,
            body,
            at: PayloadAt::InBody,
            torn: Vec::new(),
            seg_size: 0,
            placed_len: 0,
        }
    }

    pub fn head_bytes(&self) -> &[u8] {
        &self.body[..self.head_len]
    }
    /// The payload when it is in the body (empty when placed or lost).
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
    /// Another link is placing this message: kept until that ends.
    Parked,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RxError {
    #[error("message {seq} is beyond the receive window (next {next}, window {window})")]
    BeyondWindow { seq: u64, next: u64, window: u64 },
    #[error("too many copies of messages being placed ({0}) wait")]
    TooManyParked(usize),
}

/// Which link a message arrived on, for claims (plain messages may use [`NO_LINK`]).
pub const NO_LINK: usize = usize::MAX;

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
    /// Messages being placed, and by which link.
    claims: BTreeMap<u64, usize>,
    /// Other copies of claimed messages, waiting for the claim to end.
    parked: BTreeMap<u64, Vec<InMsg>>,
    parked_count: usize,
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
            claims: BTreeMap::new(),
            parked: BTreeMap::new(),
            parked_count: 0,
        }
    }

    fn resolved(&self, seq: u64) -> bool {
        seq < self.next || self.early.contains_key(&seq)
    }

    /// Whether `link` may write message `seq`'s payload in place now (see the module
    /// docs); if so the message is claimed by `link` until it arrives or is abandoned.
    pub fn try_claim(&mut self, seq: u64, barrier: u64, link: usize) -> bool {
        if self.resolved(seq)
            || self.claims.contains_key(&seq)
            || seq >= self.consumed + self.window
            || barrier >= self.consumed
        {
            return false;
        }
        self.claims.insert(seq, link);
        true
    }

    /// Messages claimed now.
    pub fn claimed(&self) -> usize {
        self.claims.len()
    }

    /// A message arrived whole and checked (its payload in its body, in place, or lost),
    /// from no particular link.
    pub fn on_message(&mut self, msg: InMsg) -> Result<Arrival, RxError> {
        self.on_message_from(msg, NO_LINK)
    }

    /// A message arrived whole and checked on `link`.
    pub fn on_message_from(&mut self, msg: InMsg, link: usize) -> Result<Arrival, RxError> {
        match self.claims.get(&msg.seq) {
            Some(&owner) if owner == link => {
                // The claimant finished: resolve it; parked copies are duplicates.
                self.claims.remove(&msg.seq);
                if let Some(p) = self.parked.remove(&msg.seq) {
                    self.parked_count -= p.len();
                    self.duplicates += p.len() as u64;
                }
            }
            Some(_) => {
                if self.parked_count >= self.window as usize {
                    return Err(RxError::TooManyParked(self.parked_count));
                }
                self.parked_count += 1;
                self.parked.entry(msg.seq).or_default().push(msg);
                return Ok(Arrival::Parked);
            }
            None => {}
        }
        self.accept(msg)
    }

    fn accept(&mut self, msg: InMsg) -> Result<Arrival, RxError> {
        if self.resolved(msg.seq) {
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

    /// `link` stopped placing message `seq` without finishing it (connection lost, bad
    /// frame, or the placer declined after the claim): the first parked copy, if any,
    /// resolves the message now. Returns what happened to it.
    pub fn abandon(&mut self, seq: u64, link: usize) -> Result<Option<Arrival>, RxError> {
        if self.claims.get(&seq) != Some(&link) {
            return Ok(None);
        }
        self.claims.remove(&seq);
        let Some(mut copies) = self.parked.remove(&seq) else {
            return Ok(None);
        };
        self.parked_count -= copies.len();
        let first = copies.remove(0);
        self.duplicates += copies.len() as u64;
        self.accept(first).map(Some)
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

    /// Messages deliverable in order now.
    pub fn ready_len(&self) -> usize {
        self.ready.len()
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
        InMsg::new(seq, 0, seq.to_le_bytes().to_vec().into())
    }

    fn placed(seq: u64) -> InMsg {
        InMsg {
            at: PayloadAt::Placed,
            ..m(seq)
        }
    }

    fn lost(seq: u64) -> InMsg {
        InMsg {
            at: PayloadAt::Lost,
            ..m(seq)
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

    #[test]
    fn claims_need_an_unresolved_message_and_a_consumed_barrier() {
        let mut r = RxReorder::new(8);
        r.on_message(m(1)).unwrap();
        // Resolved (buffered, not consumed): no claim.
        assert!(!r.try_claim(1, 0, 0));
        // Barrier 1 not consumed yet: no claim for 2; barrier 0 is always through.
        assert!(!r.try_claim(2, 1, 0));
        assert!(r.try_claim(3, 0, 0));
        // Claimed by link 0: not by link 1, not twice.
        assert!(!r.try_claim(3, 0, 1));
        assert!(!r.try_claim(3, 0, 0));
        assert_eq!(r.pop().unwrap().seq, 1);
        assert!(r.try_claim(2, 1, 1));
        // Beyond the window: no claim.
        assert!(!r.try_claim(2 + 8, 0, 0));
        assert_eq!(r.claimed(), 2);
    }

    #[test]
    fn other_copies_wait_while_a_message_is_being_placed() {
        let mut r = RxReorder::new(8);
        assert!(r.try_claim(1, 0, 0));
        // A resend on link 1 and a void: parked, nothing delivered.
        assert_eq!(r.on_message_from(m(1), 1), Ok(Arrival::Parked));
        assert_eq!(r.on_message_from(lost(1), 1), Ok(Arrival::Parked));
        assert!(!r.has_ready());
        // The claimant finishes: its copy is delivered, the parked ones are duplicates.
        assert_eq!(r.on_message_from(placed(1), 0), Ok(Arrival::Accepted));
        let got = r.pop().unwrap();
        assert_eq!(got.at, PayloadAt::Placed);
        assert_eq!(r.duplicates(), 2);
        // Abandoned claim: the first parked copy resolves the message.
        assert!(r.try_claim(2, 0, 0));
        assert_eq!(r.on_message_from(lost(2), 1), Ok(Arrival::Parked));
        assert_eq!(r.on_message_from(m(2), 1), Ok(Arrival::Parked));
        assert_eq!(r.abandon(2, 1), Ok(None)); // not link 1's claim
        assert_eq!(r.abandon(2, 0), Ok(Some(Arrival::Accepted)));
        assert_eq!(r.pop().unwrap().at, PayloadAt::Lost);
        // A late copy from the dead claimant is a duplicate now.
        assert_eq!(r.on_message_from(placed(2), 0), Ok(Arrival::Duplicate));
        // Abandoned with nothing parked: the message is simply unresolved again.
        assert!(r.try_claim(3, 0, 0));
        assert_eq!(r.abandon(3, 0), Ok(None));
        assert!(r.try_claim(3, 0, 1));
    }

    #[test]
    fn parked_copies_are_bounded() {
        let mut r = RxReorder::new(2);
        assert!(r.try_claim(1, 0, 0));
        r.on_message_from(m(1), 1).unwrap();
        r.on_message_from(m(1), 1).unwrap();
        assert_eq!(r.on_message_from(m(1), 1), Err(RxError::TooManyParked(2)));
    }
}
