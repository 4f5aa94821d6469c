//! Requests the primary's disks make of the standby while protected, and their
//! answers: reads of a failed local disk (on a vCPU thread, inside a device exit) and
//! online verify digests (on the verify thread). Each request gets an id, goes out
//! through the sender the session installed, and its answer (handed over by whoever
//! receives the standby's messages) wakes the thread waiting for it.
//!
//! Why a rendezvous and not a state machine step: the vCPU that asked must not return
//! to the guest before the data is there, and it cannot run the session's loop. The
//! bookkeeping (ids, which answers are awaited, what a lost standby does to them) is
//! here; what a read needs laid over it is [`overlay`].

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};
use twinrun_lock::lock;
use twinrun_lock::CondvarExt;

use crate::wire::DiskToStandby;

/// The writes of one captured epoch to one disk, as the checkpoint holds them (laid
/// over a read the standby serves: it may not have applied them yet).
pub trait EpochWrites: Send + Sync {
    fn is_empty(&self) -> bool;
    /// Calls `f(byte offset, data)` for each write, in order.
    fn for_each_write(&self, f: &mut dyn FnMut(u64, &[u8]));
}

/// Sends a request to the standby; false when none is connected or the send failed.
pub type PeerSend = Box<dyn Fn(DiskToStandby) -> bool + Send + Sync>;

/// The standby's answer: success and its payload.
pub type PeerReply = (bool, Vec<u8>);

#[derive(Default)]
pub struct PeerRequests {
    tx: Mutex<Option<PeerSend>>,
    next_id: AtomicU64,
    /// Requests out: None until answered.
    replies: Mutex<HashMap<u64, Option<PeerReply>>>,
    cv: Condvar,
}

impl PeerRequests {
    /// Where requests go (None: no standby connected). Forgets the requests out: their
    /// waiters get no answer.
    pub fn set_sender(&self, tx: Option<PeerSend>) {
        *lock(&self.tx) = tx;
        lock(&self.replies).clear();
        self.cv.notify_all();
    }

    /// The standby answered request `id` (unknown ids are ignored: a late answer to a
    /// request that timed out).
    pub fn reply(&self, id: u64, ok: bool, data: &[u8]) {
        let mut r = lock(&self.replies);
        if let Some(slot) = r.get_mut(&id) {
            *slot = Some((ok, data.to_vec()));
            self.cv.notify_all();
        }
    }

    /// Sends the request `make(id)` with a fresh id, registered for its answer; None if
    /// no standby took it.
    pub fn request(&self, make: impl FnOnce(u64) -> DiskToStandby) -> Option<u64> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        lock(&self.replies).insert(id, None);
        let sent = lock(&self.tx).as_ref().is_some_and(|tx| tx(make(id)));
        if !sent {
            lock(&self.replies).remove(&id);
            return None;
        }
        Some(id)
    }

    /// Waits for the answer to request `id` (None: timeout, or the standby went away).
    pub fn wait(&self, id: u64, timeout: Duration) -> Option<PeerReply> {
        let mut r = lock(&self.replies);
        let t0 = Instant::now();
        loop {
            match r.get(&id) {
                Some(Some(_)) => return r.remove(&id).flatten(),
                // Forgotten: the standby went away.
                None => return None,
                Some(None) => {}
            }
            let left = timeout.saturating_sub(t0.elapsed());
            if left.is_zero() {
                r.remove(&id);
                return None;
            }
            r = self.cv.wait_timeout_or_recover(r, left).0;
        }
    }
}

/// Lays the writes of `epochs` (oldest first, each in write order) over `buf`, which
/// holds the bytes of a replica from byte `offset`: the standby's copy may lack them.
pub fn overlay(buf: &mut [u8], offset: u64, epochs: &[std::sync::Arc<dyn EpochWrites>]) {
    let end = offset + buf.len() as u64;
    for e in epochs {
        e.for_each_write(&mut |at, data| {
            let w_end = at + data.len() as u64;
            let (lo, hi) = (at.max(offset), w_end.min(end));
            if lo >= hi {
                return;
            }
            let dst = (lo - offset) as usize..(hi - offset) as usize;
            let src = (lo - at) as usize..(hi - at) as usize;
            buf[dst].copy_from_slice(&data[src]);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    struct W(Vec<(u64, Vec<u8>)>);
    impl EpochWrites for W {
        fn is_empty(&self) -> bool {
            self.0.is_empty()
        }
        fn for_each_write(&self, f: &mut dyn FnMut(u64, &[u8])) {
            for (o, d) in &self.0 {
                f(*o, d);
            }
        }
    }

    #[test]
    fn later_writes_win_and_only_the_overlap_is_copied() {
        let mut buf = vec![0u8; 8];
        let e1: Arc<dyn EpochWrites> = Arc::new(W(vec![(98, vec![1; 4]), (104, vec![2; 10])]));
        let e2: Arc<dyn EpochWrites> = Arc::new(W(vec![(103, vec![3; 2])]));
        overlay(&mut buf, 100, &[e1, e2]);
        assert_eq!(buf, [1, 1, 0, 3, 3, 2, 2, 2]);
    }

    #[test]
    fn answers_reach_their_waiter_and_a_lost_standby_ends_the_wait() {
        let p = Arc::new(PeerRequests::default());
        assert!(p
            .request(|_| DiskToStandby::ResyncDone {
                rounds: 0,
                blocks: 0
            })
            .is_none());
        let sent = Arc::new(Mutex::new(Vec::new()));
        let s2 = sent.clone();
        p.set_sender(Some(Box::new(move |m| {
            s2.lock().unwrap().push(m);
            true
        })));
        let id = p
            .request(|id| DiskToStandby::Read {
                id,
                disk: 0,
                offset: 0,
                len: 1,
            })
            .unwrap();
        let p2 = p.clone();
        let t = std::thread::spawn(move || p2.wait(id, Duration::from_secs(10)));
        std::thread::sleep(Duration::from_millis(20));
        p.reply(id + 100, true, b"no");
        p.reply(id, true, b"x");
        assert_eq!(t.join().unwrap(), Some((true, b"x".to_vec())));
        assert_eq!(sent.lock().unwrap().len(), 1);
        let id = p
            .request(|_| DiskToStandby::ResyncDone {
                rounds: 0,
                blocks: 0,
            })
            .unwrap();
        let p2 = p.clone();
        let t = std::thread::spawn(move || p2.wait(id, Duration::from_secs(10)));
        std::thread::sleep(Duration::from_millis(20));
        p.set_sender(None);
        assert_eq!(t.join().unwrap(), None);
    }
}
