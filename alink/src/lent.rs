//! Lent payloads: memory a caller lends to the A-Link for the duration of one blocking
//! send ([`crate::Alink::send_lent`]), written by the links' writer threads straight
//! from where it lies (guest memory), with no staging copy.
//!
//! The writer threads reach the memory through raw slices, so the rules that keep it
//! sound are here: a writer *borrows* the slices (a count under a lock) for the time of
//! one frame's writes; the lending call, once every message was written once (or its
//! time ran out), *revokes* them: it waits until no writer holds them and drops them.
//! After that a message that must be sent again (its link died before the peer
//! acknowledged it) has no payload any more: the writer sends a void frame in its place
//! and reports the message lost; the receiver delivers it as lost, and the sender, which
//! knows what it lent, sends that memory again in a later message.

use std::sync::{Condvar, Mutex};
use std::time::Instant;
use twinrun_lock::{CondvarExt, MutexExt};

/// A slice of lent memory, as an address.
#[derive(Debug, Clone, Copy)]
struct RawSlice {
    ptr: usize,
    len: usize,
}

#[derive(Debug)]
struct State {
    slices: Option<Vec<RawSlice>>,
    /// Writers holding the slices now.
    borrowers: u32,
    /// Written whole into a socket at least once.
    written: bool,
}

/// The payload of one lent message.
#[derive(Debug)]
pub struct Lent {
    state: Mutex<State>,
    cv: Condvar,
    len: usize,
}

/// A writer's hold on a lent payload; releases it when dropped.
pub struct LentBorrow<'a> {
    lent: &'a Lent,
    slices: Vec<RawSlice>,
    written: bool,
}

impl Lent {
    /// Lends `slices`.
    ///
    /// # Safety
    ///
    /// The memory of every slice must stay valid for reads until [`Lent::revoke`]
    /// returns (the lending call blocks until then). Its contents may change meanwhile
    /// (guest memory): the frames say so (see `frame::seg`).
    pub unsafe fn new(slices: &[&[u8]]) -> Lent {
        Lent {
            state: Mutex::new(State {
                slices: Some(
                    slices
                        .iter()
                        .map(|s| RawSlice {
                            ptr: s.as_ptr() as usize,
                            len: s.len(),
                        })
                        .collect(),
                ),
                borrowers: 0,
                written: false,
            }),
            cv: Condvar::new(),
            len: slices.iter().map(|s| s.len()).sum(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock_or_recover()
    }

    /// Payload bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The slices for one frame's writes, or None once revoked.
    pub fn borrow(&self) -> Option<LentBorrow<'_>> {
        let mut s = self.lock();
        let slices = s.slices.clone()?;
        s.borrowers += 1;
        Some(LentBorrow {
            lent: self,
            slices,
            written: false,
        })
    }

    /// Whether the payload was written whole at least once.
    pub fn written(&self) -> bool {
        self.lock().written
    }

    /// Waits until the payload was written once, or `deadline`; returns whether it was.
    pub fn wait_written(&self, deadline: Instant) -> bool {
        let mut s = self.lock();
        while !s.written {
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            s = self.cv.wait_timeout_or_recover(s, deadline - now).0;
        }
        true
    }

    /// Ends the loan: waits until no writer holds the slices, then drops them.
    pub fn revoke(&self) {
        let mut s = self.lock();
        while s.borrowers > 0 {
            s = self.cv.wait_or_recover(s);
        }
        s.slices = None;
    }
}

impl LentBorrow<'_> {
    /// The lent memory, as slices.
    pub fn slices(&self) -> Vec<&[u8]> {
        self.slices
            .iter()
            .map(|r| {
                // SAFETY: the lender promised the memory stays valid until `revoke`
                // returns (`Lent::new`), and `revoke` waits for this borrow to drop.
                unsafe { std::slice::from_raw_parts(r.ptr as *const u8, r.len) }
            })
            .collect()
    }

    /// The whole payload went into the socket.
    pub fn set_written(&mut self) {
        self.written = true;
    }
}

impl Drop for LentBorrow<'_> {
    fn drop(&mut self) {
        let mut s = self.lent.lock();
        s.borrowers -= 1;
        s.written |= self.written;
        self.lent.cv.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    #[test]
    fn revoke_waits_for_writers_and_ends_the_loan() {
        let data = [7u8; 100];
        // SAFETY: `data` outlives the revoke below.
        let lent = Arc::new(unsafe { Lent::new(&[&data[..60], &data[60..]]) });
        assert_eq!(lent.len(), 100);
        let mut b = lent.borrow().unwrap();
        assert_eq!(b.slices().iter().map(|s| s.len()).sum::<usize>(), 100);
        let l2 = lent.clone();
        let revoker = std::thread::spawn(move || {
            l2.revoke();
            Instant::now()
        });
        std::thread::sleep(Duration::from_millis(50));
        assert!(!revoker.is_finished(), "revoke must wait for the borrow");
        b.set_written();
        let dropped = Instant::now();
        drop(b);
        assert!(revoker.join().unwrap() >= dropped);
        assert!(lent.written());
        assert!(lent.borrow().is_none());
        assert!(lent.wait_written(Instant::now()));
    }

    #[test]
    fn a_borrow_dropped_unwritten_does_not_count() {
        let data = [1u8; 8];
        // SAFETY: `data` outlives the Lent.
        let lent = unsafe { Lent::new(&[&data[..]]) };
        drop(lent.borrow());
        assert!(!lent.written());
        assert!(!lent.wait_written(Instant::now() + Duration::from_millis(10)));
        lent.revoke();
    }
}
