//! The planned role swap's request port: an operator's `swap` (the control socket)
//! asks the primary's running session to hand the VM to its standby and waits for
//! the answer. The session loop takes the request between two steps of the driver
//! ([`crate::primary::PrimaryDriver::request_swap`]) and answers once the standby
//! accepted (or the swap was refused or failed).

use std::sync::mpsc::{channel, RecvTimeoutError, Sender};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;
use twinrun_lock::MutexExt;

/// A completed handover, as the old primary saw it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SwapDone {
    /// The swap point: the standby resumed the VM from this epoch.
    pub epoch: u64,
    /// From the guest's pause here to the standby's acceptance.
    pub paused_for: Duration,
}

/// One request's answer channel.
pub struct SwapReply(Sender<Result<SwapDone, String>>);

impl SwapReply {
    pub fn answer(self, r: Result<SwapDone, String>) {
        // The requester may have given up waiting: nothing to tell then.
        let _ = self.0.send(r);
    }
}

#[derive(Default)]
struct Slot {
    /// A primary session that can swap runs now.
    active: bool,
    pending: Option<SwapReply>,
}

/// The receive pump's early release on ack, and a swap's hold on it.
#[derive(Default)]
struct Hold {
    /// While a swap is requested: the first epoch whose output is held (the standby
    /// releases it).
    from: Option<u64>,
    /// The newest epoch the pump released through in this session.
    released: Option<u64>,
}

/// Shared between the control thread and the primary's sessions.
#[derive(Default)]
pub struct SwapPort {
    slot: Mutex<Slot>,
    hold: Mutex<Hold>,
}

impl SwapPort {
    fn lock(&self) -> MutexGuard<'_, Slot> {
        self.slot.lock_or_recover()
    }

    /// Asks the running session to swap and waits up to `timeout` for the answer.
    pub fn request(&self, timeout: Duration) -> Result<SwapDone, String> {
        let (tx, rx) = channel();
        {
            let mut s = self.lock();
            if !s.active {
                return Err(
                    "the pair is not in sync: no standby session runs (this end is no \
                     primary, or its standby is lost or not yet connected)"
                        .into(),
                );
            }
            if s.pending.is_some() {
                return Err("a swap is requested already".into());
            }
            s.pending = Some(SwapReply(tx));
        }
        match rx.recv_timeout(timeout) {
            Ok(r) => r,
            Err(RecvTimeoutError::Timeout) => {
                self.lock().pending = None;
                Err(format!("no answer within {timeout:?}"))
            }
            Err(RecvTimeoutError::Disconnected) => {
                Err("the session ended before the swap completed".into())
            }
        }
    }

    /// A session begins (true) or ends (false); an unanswered request is dropped
    /// (its requester hears that the session ended).
    pub fn set_active(&self, active: bool) {
        let mut s = self.lock();
        s.active = active;
        *self.hold.lock_or_recover() = Hold::default();
        if !active {
            s.pending = None;
        }
    }

    /// A swap is requested: from here the output of `first_held` and later epochs is
    /// not released on its ack (the standby releases it after its MAC announce).
    /// Returns the newest epoch the pump released through (it may be ahead of the
    /// protocol, which has not yet seen that ack): the standby releases only what
    /// comes after it, so nothing leaves twice.
    pub fn hold_from(&self, first_held: u64) -> Option<u64> {
        let mut h = self.hold.lock_or_recover();
        h.from = Some(first_held);
        h.released
    }

    /// The swap did not happen (the standby's quorum refused it): acks release
    /// everything again.
    pub fn clear_hold(&self) {
        self.hold.lock_or_recover().from = None;
    }

    /// What an ack of `epoch` may release here: through `epoch`, or only up to the
    /// epoch before the first held one (None: nothing).
    fn release_limit(h: &Hold, epoch: u64) -> Option<u64> {
        match h.from {
            None => Some(epoch),
            Some(first_held) if epoch < first_held => Some(epoch),
            Some(first_held) => first_held.checked_sub(1),
        }
    }

    /// The receive pump's early release on the ack of `epoch`: calls `release` with
    /// the epoch to release through, if any, under the hold's lock (a swap's
    /// [`SwapPort::hold_from`] sees every release made before it, none after).
    pub fn release_on_ack(&self, epoch: u64, release: impl FnOnce(u64)) {
        let mut h = self.hold.lock_or_recover();
        if let Some(through) = Self::release_limit(&h, epoch) {
            release(through);
            h.released = h.released.max(Some(through));
        }
    }

    /// The request waiting, if any (the session loop).
    pub fn take(&self) -> Option<SwapReply> {
        self.lock().pending.take()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn released_on_ack(p: &SwapPort, epoch: u64) -> Option<u64> {
        let mut got = None;
        p.release_on_ack(epoch, |t| got = Some(t));
        got
    }

    #[test]
    fn nothing_held_is_released_on_its_ack() {
        let p = SwapPort::default();
        assert_eq!(released_on_ack(&p, 7), Some(7));
        // The pump was ahead of the protocol: the hold says how far.
        assert_eq!(p.hold_from(5), Some(7));
        assert_eq!(released_on_ack(&p, 4), Some(4));
        assert_eq!(released_on_ack(&p, 5), Some(4));
        assert_eq!(released_on_ack(&p, 6), Some(4));
        assert_eq!(p.hold_from(0), Some(7));
        assert_eq!(released_on_ack(&p, 0), None);
        p.set_active(false);
        assert_eq!(p.hold_from(9), None);
        p.set_active(true);
        assert_eq!(released_on_ack(&p, 3), Some(3));
    }

    #[test]
    fn requests_need_an_active_session_and_get_their_answer() {
        let p = std::sync::Arc::new(SwapPort::default());
        assert!(p
            .request(Duration::from_millis(10))
            .unwrap_err()
            .contains("not in sync"));
        p.set_active(true);
        let q = p.clone();
        let t = std::thread::spawn(move || q.request(Duration::from_secs(10)));
        let reply = loop {
            if let Some(r) = p.take() {
                break r;
            }
            std::thread::sleep(Duration::from_millis(1));
        };
        reply.answer(Ok(SwapDone {
            epoch: 9,
            paused_for: Duration::from_millis(2),
        }));
        assert_eq!(t.join().unwrap().unwrap().epoch, 9);
        // A session that ends drops the request: its requester hears so.
        let q = p.clone();
        let t = std::thread::spawn(move || q.request(Duration::from_secs(10)));
        while p.lock().pending.is_none() {
            std::thread::sleep(Duration::from_millis(1));
        }
        p.set_active(false);
        assert!(t.join().unwrap().unwrap_err().contains("session ended"));
    }
}
