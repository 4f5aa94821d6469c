//! Which peer instance a bundle of links serves: a pure rule over incarnations.
//!
//! Every A-Link endpoint instance (one [`crate::Alink`]) picks a random 64-bit
//! incarnation when it is created; each hello carries the sender's incarnation and the
//! peer incarnation its bundle is bound to (see [`crate::handshake::HelloExt`]). A
//! message stream (sequence numbers, window, acknowledgements) is only meaningful
//! between two instances, so a bundle accepts links of ONE peer instance:
//!
//! - the first authenticated link binds the bundle to its peer's incarnation;
//! - a link whose peer says it is bound to another instance of *this* node is stale (the
//!   peer's bundle serves an instance of ours that is gone, or another one of ours): it is
//!   refused, and the peer, told our incarnation, ends that session itself;
//! - a link of a NEW peer incarnation (not bound to another instance of ours) means the
//!   peer instance this bundle served is gone or replaced: the session ends at once
//!   ([`Verdict::NewPeer`]), visibly to the layer above, and the link is refused with it
//!   (the next session's bundle takes it);
//! - after the session ended, every link is refused.
//!
//! A peer of an older version sends no incarnation: its links are accepted as before.
//!
//! This is what a standby that listens on a fresh A-Link after a session without a
//! takeover needs: a primary's next session that reaches the standby's OLD instance on
//! one link and the new one on another is refused by the old one (bound to the primary's
//! previous instance), instead of losing its first messages there.

/// Why a link was refused for its incarnation (logged with the link).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error(
        "stale peer instance {peer:#018x}: it is bound to our instance {bound_to:#018x}, \
         not this one ({own:#018x})"
    )]
    Stale { peer: u64, bound_to: u64, own: u64 },
    #[error("new peer instance {new:#018x} (this session served {old:#018x}): the session ended")]
    NewPeer { old: u64, new: u64 },
    #[error(
        "this A-Link's session ended (the peer instance {old:#018x} was replaced by \
         {new:#018x}): instance {peer:#018x} refused"
    )]
    Ended { old: u64, new: u64, peer: u64 },
}

/// What to do with a newly authenticated link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Take it into the bundle.
    Accept,
    /// Refuse it; the session goes on.
    Refuse(Refusal),
    /// The peer instance this bundle served was replaced: the session ends now and the
    /// link is refused.
    NewPeer { old: u64, new: u64 },
}

/// One bundle's incarnations.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Incarnations {
    own: u64,
    peer: Option<u64>,
    /// (old, new) once a new peer instance ended the session.
    ended: Option<(u64, u64)>,
}

impl Incarnations {
    pub fn new(own: u64) -> Incarnations {
        Incarnations {
            own,
            peer: None,
            ended: None,
        }
    }

    /// This instance's incarnation.
    pub fn own(&self) -> u64 {
        self.own
    }

    /// The peer instance the bundle is bound to, if any (what our hellos carry).
    pub fn bound(&self) -> Option<u64> {
        self.peer
    }

    /// (old, new) once the session ended for a new peer instance.
    pub fn ended(&self) -> Option<(u64, u64)> {
        self.ended
    }

    /// Judges an authenticated link whose peer sent `ext` (None: a peer without
    /// incarnations). Binds the bundle on its first link.
    pub fn judge(&mut self, ext: Option<crate::handshake::HelloExt>) -> Verdict {
        let Some(x) = ext else {
            return match self.ended {
                Some((old, new)) => Verdict::Refuse(Refusal::Ended { old, new, peer: 0 }),
                None => Verdict::Accept,
            };
        };
        if let Some((old, new)) = self.ended {
            return Verdict::Refuse(Refusal::Ended {
                old,
                new,
                peer: x.incarnation,
            });
        }
        if x.peer_incarnation != 0 && x.peer_incarnation != self.own {
            return Verdict::Refuse(Refusal::Stale {
                peer: x.incarnation,
                bound_to: x.peer_incarnation,
                own: self.own,
            });
        }
        match self.peer {
            None => {
                self.peer = Some(x.incarnation);
                Verdict::Accept
            }
            Some(p) if p == x.incarnation => Verdict::Accept,
            Some(old) => {
                self.ended = Some((old, x.incarnation));
                Verdict::NewPeer {
                    old,
                    new: x.incarnation,
                }
            }
        }
    }
}

/// A random incarnation (never 0, which means "none" on the wire).
pub fn random_incarnation() -> u64 {
    let v = match crate::handshake::random_nonce() {
        Ok(n) => {
            let mut w = [0u8; 8];
            w.copy_from_slice(&n[..8]);
            u64::from_le_bytes(w)
        }
        // Only has to differ from the previous instance's.
        Err(_) => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64),
    };
    v.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::handshake::HelloExt;

    fn ext(incarnation: u64, bound: u64) -> Option<HelloExt> {
        Some(HelloExt {
            incarnation,
            peer_incarnation: bound,
        })
    }

    #[test]
    fn first_link_binds_and_the_same_instance_reconnects() {
        let mut b = Incarnations::new(10);
        assert_eq!(b.judge(ext(20, 0)), Verdict::Accept);
        assert_eq!(b.bound(), Some(20));
        // A reconnection of the same peer instance, now bound to us.
        assert_eq!(b.judge(ext(20, 10)), Verdict::Accept);
        assert_eq!(b.judge(ext(20, 0)), Verdict::Accept);
        assert_eq!(b.ended(), None);
    }

    #[test]
    fn a_new_peer_instance_ends_the_session_and_everything_after_is_refused() {
        let mut b = Incarnations::new(10);
        assert_eq!(b.judge(ext(20, 0)), Verdict::Accept);
        assert_eq!(b.judge(ext(21, 0)), Verdict::NewPeer { old: 20, new: 21 });
        assert_eq!(b.ended(), Some((20, 21)));
        // Neither the old instance nor the new one gets this bundle back.
        for x in [ext(20, 10), ext(21, 0), None] {
            assert!(matches!(b.judge(x), Verdict::Refuse(Refusal::Ended { .. })));
        }
    }

    #[test]
    fn a_peer_bound_to_another_instance_of_ours_is_stale() {
        // The flapping case: our fresh instance 11 meets the peer's old instance 20,
        // still bound to our previous instance 10.
        let mut b = Incarnations::new(11);
        let v = b.judge(ext(20, 10));
        assert_eq!(
            v,
            Verdict::Refuse(Refusal::Stale {
                peer: 20,
                bound_to: 10,
                own: 11
            })
        );
        // Not bound by it: the peer's new instance binds it.
        assert_eq!(b.bound(), None);
        assert_eq!(b.judge(ext(30, 0)), Verdict::Accept);
        // A stale one after binding is refused too, and the session goes on.
        assert!(matches!(
            b.judge(ext(20, 10)),
            Verdict::Refuse(Refusal::Stale { .. })
        ));
        assert_eq!((b.bound(), b.ended()), (Some(30), None));
    }

    #[test]
    fn a_peer_without_incarnations_is_accepted() {
        let mut b = Incarnations::new(10);
        assert_eq!(b.judge(None), Verdict::Accept);
        assert_eq!(b.judge(None), Verdict::Accept);
        assert_eq!(b.bound(), None);
    }

    #[test]
    fn random_incarnations_differ_and_are_never_zero() {
        let (a, c) = (random_incarnation(), random_incarnation());
        assert_ne!(a, c);
        assert!(a != 0 && c != 0);
    }
}
