//! The primary's synchronous-mirroring machine (pure): which guest write batches are
//! out to the standby, in what order their acknowledgements must come, and what the
//! loss of the standby means for the writers still waiting.
//!
//! Every batch sent gets the next sequence number (they go out in that order over one
//! ordered stream, and the standby applies and acknowledges them in that order). A
//! writer waits until its number is acknowledged, or until the standby is lost: then
//! the batch completes *alone* (the caller has recorded its blocks for the peer's
//! delta before releasing it). An acknowledgement out of order is a protocol error
//! that detaches the standby.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Outstanding batches at most (a writer waits for room beyond it: each vCPU has one
/// batch out at a time per disk, so this is never reached by a sane guest).
pub const MAX_OUTSTANDING: usize = 4096;

/// What happened to a batch, as its writer sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Still waiting for the standby.
    Pending,
    /// The standby has it durably.
    Acked,
    /// The standby was lost first: the batch completed on this side alone.
    Alone,
}

/// Whether a new batch goes to the standby.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Submit {
    /// Send it with this sequence number, then wait for the number's outcome.
    Send(u64),
    /// No standby attached: complete at once (its blocks are in the bitmap).
    Alone,
    /// Too many batches out: wait and retry.
    Full,
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum SyncError {
    #[error("acknowledgement of batch {got} while {expected:?} was the oldest outstanding")]
    OutOfOrder { got: u64, expected: Option<u64> },
}

#[derive(Debug)]
pub struct SyncPrimary {
    attached: bool,
    /// The next sequence number (never reused across attachments: the standby's apply
    /// journal needs strictly increasing epochs, and a late acknowledgement of an old
    /// attachment is recognisable).
    next_seq: u64,
    /// Each batch out, with when it was sent (in number order).
    outstanding: VecDeque<(u64, Instant)>,
    /// Every batch at or below this is acknowledged (0: none).
    acked_through: u64,
    /// Every batch numbered below the next one when the standby was last lost is
    /// settled (late acknowledgements at or below it are ignored).
    alone_through: u64,
    /// The ranges of batches the last few losses released alone (a writer looks at
    /// its outcome as soon as it is woken).
    lost: VecDeque<(u64, u64)>,
}

/// Losses remembered for [`SyncPrimary::outcome`].
const LOSSES_KEPT: usize = 16;

impl SyncPrimary {
    /// `first_seq` > 0: sequence 0 is the resync's closing commit.
    pub fn new(first_seq: u64) -> SyncPrimary {
        assert!(first_seq > 0, "sequence 0 is reserved for the resync's end");
        SyncPrimary {
            attached: false,
            next_seq: first_seq,
            outstanding: VecDeque::new(),
            acked_through: 0,
            alone_through: 0,
            lost: VecDeque::new(),
        }
    }

    pub fn attached(&self) -> bool {
        self.attached
    }

    /// The standby is ready for synchronous writes (its resync plan is applied).
    pub fn attach(&mut self) {
        debug_assert!(self.outstanding.is_empty());
        self.attached = true;
    }

    /// A batch is to go out at `now`.
    pub fn submit(&mut self, now: Instant) -> Submit {
        if !self.attached {
            return Submit::Alone;
        }
        if self.outstanding.len() >= MAX_OUTSTANDING {
            return Submit::Full;
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        self.outstanding.push_back((seq, now));
        Submit::Send(seq)
    }

    /// The standby acknowledged `seq` (and so everything before it, which it
    /// acknowledged first). Returns the batches acknowledged, oldest first.
    pub fn on_ack(&mut self, seq: u64) -> Result<Vec<u64>, SyncError> {
        if !self.attached && seq <= self.alone_through {
            // A late answer of a standby already given up for lost.
            return Ok(Vec::new());
        }
        match self.outstanding.front().map(|o| o.0) {
            Some(first) if first == seq => {
                self.outstanding.pop_front();
                self.acked_through = seq;
                Ok(vec![seq])
            }
            expected => Err(SyncError::OutOfOrder { got: seq, expected }),
        }
    }

    /// The standby is lost (or detached after an error): every outstanding batch
    /// completes alone. Returns them (their blocks must be recorded before release).
    pub fn peer_lost(&mut self) -> Vec<u64> {
        self.attached = false;
        let lost: Vec<u64> = self.outstanding.drain(..).map(|o| o.0).collect();
        if let (Some(&a), Some(&b)) = (lost.first(), lost.last()) {
            if self.lost.len() == LOSSES_KEPT {
                self.lost.pop_front();
            }
            self.lost.push_back((a, b));
        }
        // Anything numbered before the next batch is settled either way.
        self.alone_through = self.next_seq - 1;
        lost
    }

    pub fn outcome(&self, seq: u64) -> Outcome {
        if self.outstanding.iter().any(|o| o.0 == seq) {
            Outcome::Pending
        } else if self.lost.iter().any(|&(a, b)| (a..=b).contains(&seq)) {
            Outcome::Alone
        } else {
            debug_assert!(seq <= self.acked_through || seq <= self.alone_through);
            Outcome::Acked
        }
    }

    /// The oldest batch still unacknowledged at `now`, and how long it has waited,
    /// when that is `limit` or more: the standby stopped acknowledging (its heartbeats
    /// may be fine). It acknowledges in order, so the oldest batch's wait is the
    /// standby's silence on the write stream.
    pub fn overdue(&self, now: Instant, limit: Duration) -> Option<(u64, Duration)> {
        let &(seq, sent) = self.outstanding.front()?;
        let waited = now.saturating_duration_since(sent);
        (waited >= limit).then_some((seq, waited))
    }

    pub fn outstanding(&self) -> usize {
        self.outstanding.len()
    }

    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t0() -> Instant {
        static T0: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
        *T0.get_or_init(Instant::now)
    }

    #[test]
    fn alone_without_a_standby() {
        let mut m = SyncPrimary::new(1);
        assert_eq!(m.submit(t0()), Submit::Alone);
        assert_eq!(m.outstanding(), 0);
    }

    #[test]
    fn acks_in_order_release_the_writers() {
        let mut m = SyncPrimary::new(1);
        m.attach();
        assert_eq!(m.submit(t0()), Submit::Send(1));
        assert_eq!(m.submit(t0()), Submit::Send(2));
        assert_eq!(m.outcome(1), Outcome::Pending);
        assert_eq!(m.on_ack(1), Ok(vec![1]));
        assert_eq!(m.outcome(1), Outcome::Acked);
        assert_eq!(m.outcome(2), Outcome::Pending);
        assert_eq!(m.on_ack(2), Ok(vec![2]));
        assert_eq!(m.outcome(2), Outcome::Acked);
        assert_eq!(m.outstanding(), 0);
    }

    #[test]
    fn an_ack_out_of_order_is_a_protocol_error() {
        let mut m = SyncPrimary::new(1);
        m.attach();
        m.submit(t0());
        m.submit(t0());
        assert_eq!(
            m.on_ack(2),
            Err(SyncError::OutOfOrder {
                got: 2,
                expected: Some(1)
            })
        );
        assert_eq!(
            m.on_ack(7),
            Err(SyncError::OutOfOrder {
                got: 7,
                expected: Some(1)
            })
        );
    }

    #[test]
    fn losing_the_standby_completes_the_outstanding_alone() {
        let mut m = SyncPrimary::new(1);
        m.attach();
        m.submit(t0());
        m.submit(t0());
        m.on_ack(1).unwrap();
        assert_eq!(m.peer_lost(), vec![2]);
        assert_eq!(m.outcome(1), Outcome::Acked);
        assert_eq!(m.outcome(2), Outcome::Alone);
        assert_eq!(m.submit(t0()), Submit::Alone);
        // A late acknowledgement of the lost standby changes nothing.
        assert_eq!(m.on_ack(2), Ok(vec![]));
        assert_eq!(m.outcome(2), Outcome::Alone);
    }

    #[test]
    fn numbers_are_never_reused_across_attachments() {
        let mut m = SyncPrimary::new(5);
        m.attach();
        assert_eq!(m.submit(t0()), Submit::Send(5));
        m.peer_lost();
        m.attach();
        assert_eq!(m.submit(t0()), Submit::Send(6));
        assert_eq!(m.on_ack(6), Ok(vec![6]));
        assert_eq!(m.outcome(6), Outcome::Acked);
        assert_eq!(m.outcome(5), Outcome::Alone);
    }

    #[test]
    fn the_window_is_bounded() {
        let mut m = SyncPrimary::new(1);
        m.attach();
        for _ in 0..MAX_OUTSTANDING {
            assert!(matches!(m.submit(t0()), Submit::Send(_)));
        }
        assert_eq!(m.submit(t0()), Submit::Full);
        m.on_ack(1).unwrap();
        assert!(matches!(m.submit(t0()), Submit::Send(_)));
    }

    #[test]
    fn a_standby_that_stops_acknowledging_is_overdue_after_the_limit() {
        let limit = Duration::from_secs(5);
        let t = t0();
        let mut m = SyncPrimary::new(1);
        m.attach();
        assert_eq!(m.overdue(t + limit * 9, limit), None, "nothing out");
        assert_eq!(m.submit(t), Submit::Send(1));
        assert_eq!(m.submit(t + Duration::from_secs(1)), Submit::Send(2));
        assert_eq!(m.overdue(t + Duration::from_millis(4999), limit), None);
        assert_eq!(m.overdue(t + limit, limit), Some((1, limit)));
        // Acknowledgements keep the clock on the oldest batch still out.
        m.on_ack(1).unwrap();
        assert_eq!(m.overdue(t + limit, limit), None);
        assert_eq!(
            m.overdue(t + Duration::from_secs(7), limit),
            Some((2, Duration::from_secs(6)))
        );
        // Declared failed: nothing is out any more, the batch completes alone.
        assert_eq!(m.peer_lost(), vec![2]);
        assert_eq!(m.outcome(2), Outcome::Alone);
        assert_eq!(m.overdue(t + limit * 9, limit), None);
        // A late acknowledgement of the failed standby changes nothing; a new
        // attachment starts its own clock.
        assert_eq!(m.on_ack(2), Ok(vec![]));
        m.attach();
        let t3 = t + Duration::from_secs(20);
        assert_eq!(m.submit(t3), Submit::Send(3));
        assert_eq!(m.overdue(t3 + Duration::from_secs(4), limit), None);
        assert!(m.overdue(t3 + limit, limit).is_some());
    }
}
