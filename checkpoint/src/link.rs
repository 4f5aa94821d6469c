//! What the drivers send over, as traits: the A-Link for real, the simulated network in
//! `tests/sim.rs`. Receiving is the caller's (the real loops take messages off the
//! A-Link and hand them to the drivers' step functions; the simulation delivers them
//! itself), so only sending needs an abstraction.

use std::time::Duration;

use alink::{Alink, AlinkError, Bytes};

use crate::messages::legacy::{ToPrimaryV2, ToStandbyV2};
use crate::messages::{ToPrimary, ToStandby, WIRE_VERSION};

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
}

impl<T: ToStandbyLink + ?Sized> ToStandbyLink for &T {
    fn send(&self, head: &ToStandby, payload: Vec<Bytes>) -> Result<(), SendError> {
        (**self).send(head, payload)
    }

    fn version(&self) -> u16 {
        (**self).version()
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
}

/// A send waits this long for window room before looking whether the standby is still
/// there.
const SEND_WAIT: Duration = Duration::from_millis(50);

impl ToStandbyLink for Alink {
    fn version(&self) -> u16 {
        self.session_version()
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
}
