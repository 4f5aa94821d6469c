//! What the drivers send over, as traits: the A-Link for real, the simulated network in
//! `tests/sim.rs`. Receiving is the caller's (the real loops take messages off the
//! A-Link and hand them to the drivers' step functions; the simulation delivers them
//! itself), so only sending needs an abstraction.

use std::time::Duration;

use alink::{Alink, AlinkError, Bytes, SegOpts};

use crate::messages::legacy::{ToPrimaryV2, ToStandbyV2};
use crate::messages::{ToPrimary, ToStandby, LENT_SYNC_VERSION, PAGE_SIZE, WIRE_VERSION};
use crate::standby::SyncPlacer;

/// Why a send to the standby did not complete.
#[derive(Debug)]
pub enum SendError {
    /// Every link to the peer is down (or the A-Link closed).
    PeerLost,
    Failed(AlinkError),
    /// The peer speaks an older protocol (`version`) that has no such message.
    Unsupported {
        version: u16,
        what: &'static str,
    },
}

/// The primary's way to the standby.
pub trait ToStandbyLink {
    /// Sends one message, waiting for room in the window while the standby is
    /// reachable.
    fn send(&self, head: &ToStandby, payload: Vec<Bytes>) -> Result<(), SendError>;

    /// The protocol version of the session (received messages are decoded in it).
    fn version(&self) -> u16 {
        WIRE_VERSION
    }

    /// Whether initial-sync parts go lent ([`ToStandbyLink::send_lent_parts`]): the
    /// session speaks [`LENT_SYNC_VERSION`] and the link can lend. Else the driver
    /// copies each part into a staging buffer and sends it with `send`.
    fn lends(&self) -> bool {
        false
    }

    /// Like `send`, returning the message's sequence number on the link (what a lent
    /// part's barrier names; 0 where the link does not number messages).
    fn send_numbered(&self, head: &ToStandby, payload: Vec<Bytes>) -> Result<u64, SendError> {
        self.send(head, payload).map(|()| 0)
    }

    /// Sends initial-sync parts whose page data is *lent*: each head with the slices of
    /// guest memory its pages are, written from there (no copy) over every healthy
    /// link, while the memory may change (pages changed under their write reach the
    /// standby marked torn: they are dirty here, and a later round or epoch 0 sends
    /// them again). Returns once each was written (or went void), with their sequence
    /// numbers; the standby places them once message `barrier` was consumed there.
    fn send_lent_parts(
        &self,
        parts: &[(ToStandby, Vec<&[u8]>)],
        barrier: u64,
    ) -> Result<Vec<u64>, SendError> {
        let _ = (parts, barrier);
        Err(SendError::Unsupported {
            version: self.version(),
            what: "lent send",
        })
    }

    /// Waits until the standby consumed everything sent so far; returns the sequence
    /// numbers of lent parts that went void meanwhile (their pages must be sent again).
    fn settle(&self) -> Result<Vec<u64>, SendError> {
        Ok(Vec::new())
    }
}

/// The standby's way to the primary. Sends are best effort: a full window or a closed
/// link means the primary is gone, which the link events report.
pub trait ToPrimaryLink {
    fn send(&self, head: &ToPrimary, payload: Vec<Bytes>, wait: Duration)
        -> Result<(), AlinkError>;

    /// The protocol version of the session (received messages are decoded in it).
    fn version(&self) -> u16 {
        WIRE_VERSION
    }

    /// Has initial-sync parts' page data read straight into the mirror at the places
    /// `placer` gives (None: no more), when the session's protocol has segmented
    /// frames; returns whether it does.
    fn set_sync_placer(&self, placer: Option<SyncPlacer>) -> bool {
        let _ = placer;
        false
    }
}

impl<T: ToStandbyLink + ?Sized> ToStandbyLink for &T {
    fn send(&self, head: &ToStandby, payload: Vec<Bytes>) -> Result<(), SendError> {
        (**self).send(head, payload)
    }

    fn version(&self) -> u16 {
        (**self).version()
    }

    fn lends(&self) -> bool {
        (**self).lends()
    }

    fn send_numbered(&self, head: &ToStandby, payload: Vec<Bytes>) -> Result<u64, SendError> {
        (**self).send_numbered(head, payload)
    }

    fn send_lent_parts(
        &self,
        parts: &[(ToStandby, Vec<&[u8]>)],
        barrier: u64,
    ) -> Result<Vec<u64>, SendError> {
        (**self).send_lent_parts(parts, barrier)
    }

    fn settle(&self) -> Result<Vec<u64>, SendError> {
        (**self).settle()
    }
}

impl<T: ToPrimaryLink + ?Sized> ToPrimaryLink for &T {
    fn send(
        &self,
        head: &ToPrimary,
        payload: Vec<Bytes>,
        wait: Duration,
    ) -> Result<(), AlinkError> {
        (**self).send(head, payload, wait)
    }

    fn version(&self) -> u16 {
        (**self).version()
    }

    fn set_sync_placer(&self, placer: Option<SyncPlacer>) -> bool {
        (**self).set_sync_placer(placer)
    }
}

/// A send waits this long for window room before looking whether the standby is still
/// there.
const SEND_WAIT: Duration = Duration::from_millis(50);

/// A lent send waits this long for its parts to be written (and for window room); a
/// standby that consumes nothing for so long while reachable fails the session.
const LENT_WAIT: Duration = Duration::from_secs(30);

/// What a send error means to the primary.
fn send_error(link: &Alink, e: AlinkError) -> SendError {
    match e {
        AlinkError::Timeout if !link.peer_reachable() => SendError::PeerLost,
        AlinkError::Closed | AlinkError::PeerRestarted { .. } => SendError::PeerLost,
        e => SendError::Failed(e),
    }
}

impl ToStandbyLink for Alink {
    fn version(&self) -> u16 {
        self.session_version()
    }

    fn lends(&self) -> bool {
        self.session_version() >= LENT_SYNC_VERSION
    }

    fn send_numbered(&self, head: &ToStandby, payload: Vec<Bytes>) -> Result<u64, SendError> {
        if self.session_version() < WIRE_VERSION {
            return ToStandbyLink::send(self, head, payload).map(|()| 0);
        }
        loop {
            match self.send_timeout(head, payload.clone(), Some(SEND_WAIT)) {
                Ok(seq) => return Ok(seq),
                Err(AlinkError::Timeout) if self.peer_reachable() => {}
                Err(e) => return Err(send_error(self, e)),
            }
        }
    }

    fn send_lent_parts(
        &self,
        parts: &[(ToStandby, Vec<&[u8]>)],
        barrier: u64,
    ) -> Result<Vec<u64>, SendError> {
        let batch: Vec<(&ToStandby, &[&[u8]])> =
            parts.iter().map(|(h, s)| (h, s.as_slice())).collect();
        let opts = SegOpts {
            seg_size: PAGE_SIZE as u32,
            volatile: true,
            barrier,
        };
        self.send_lent(&batch, opts, LENT_WAIT)
            .map_err(|e| send_error(self, e))
    }

    fn settle(&self) -> Result<Vec<u64>, SendError> {
        loop {
            match self.flush(SEND_WAIT) {
                Ok(()) => return Ok(self.take_lost()),
                Err(AlinkError::Timeout) if self.peer_reachable() => {}
                Err(e) => return Err(send_error(self, e)),
            }
        }
    }

    fn send(&self, head: &ToStandby, payload: Vec<Bytes>) -> Result<(), SendError> {
        let version = self.session_version();
        let old = if version < WIRE_VERSION {
            match ToStandbyV2::from_current(head) {
                Some(m) => Some(m),
                None => {
                    return Err(SendError::Unsupported {
                        version,
                        what: "message",
                    })
                }
            }
        } else {
            None
        };
        loop {
            let sent = match &old {
                Some(m) => self.send_timeout(m, payload.clone(), Some(SEND_WAIT)),
                None => self.send_timeout(head, payload.clone(), Some(SEND_WAIT)),
            };
            match sent {
                Ok(_) => return Ok(()),
                Err(AlinkError::Timeout) => {
                    if !self.peer_reachable() {
                        return Err(SendError::PeerLost);
                    }
                }
                Err(AlinkError::Closed | AlinkError::PeerRestarted { .. }) => {
                    return Err(SendError::PeerLost)
                }
                Err(e) => return Err(SendError::Failed(e)),
            }
        }
    }
}

impl ToPrimaryLink for Alink {
    fn send(
        &self,
        head: &ToPrimary,
        payload: Vec<Bytes>,
        wait: Duration,
    ) -> Result<(), AlinkError> {
        let sent = if self.session_version() < WIRE_VERSION {
            match ToPrimaryV2::from_current(head) {
                Some(m) => self.send_timeout(&m, payload, Some(wait)),
                // Protocol 2 has no such message (a `Fenced` refusal: an older primary
                // learns it at its next `Hello`).
                None => return Ok(()),
            }
        } else {
            self.send_timeout(head, payload, Some(wait))
        };
        match sent {
            Ok(_)
            | Err(AlinkError::Timeout)
            | Err(AlinkError::Closed)
            | Err(AlinkError::PeerRestarted { .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }

    fn version(&self) -> u16 {
        self.session_version()
    }

    fn set_sync_placer(&self, placer: Option<SyncPlacer>) -> bool {
        match placer {
            Some(p) if self.session_version() >= LENT_SYNC_VERSION => {
                self.set_placer(move |req| {
                    p.place(req.msg_seq, req.head, req.payload_len, req.seg_size)
                });
                true
            }
            _ => {
                self.clear_placer();
                false
            }
        }
    }
}
