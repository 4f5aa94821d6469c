//! What the drivers send over, as traits: the A-Link for real, the simulated network in
//! `tests/sim.rs`. Receiving is the caller's (the real loops take messages off the
//! A-Link and hand them to the drivers' step functions; the simulation delivers them
//! itself), so only sending needs an abstraction.

use std::time::Duration;

use alink::{Alink, AlinkError, Bytes};

use crate::messages::{ToPrimary, ToStandby};

/// Why a send to the standby did not complete.
#[derive(Debug)]
pub enum SendError {
    /// Every link to the peer is down (or the A-Link closed).
    PeerLost,
    Failed(AlinkError),
}

/// The primary's way to the standby.
pub trait ToStandbyLink {
    /// Sends one message, waiting for room in the window while the standby is
    /// reachable.
    fn send(&self, head: &ToStandby, payload: Vec<Bytes>) -> Result<(), SendError>;
}

/// The standby's way to the primary. Sends are best effort: a full window or a closed
/// link means the primary is gone, which the link events report.
pub trait ToPrimaryLink {
    fn send(&self, head: &ToPrimary, payload: Vec<Bytes>, wait: Duration)
        -> Result<(), AlinkError>;
}

impl<T: ToStandbyLink + ?Sized> ToStandbyLink for &T {
    fn send(&self, head: &ToStandby, payload: Vec<Bytes>) -> Result<(), SendError> {
        (**self).send(head, payload)
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
}

/// A send waits this long for window room before looking whether the standby is still
/// there.
const SEND_WAIT: Duration = Duration::from_millis(50);

impl ToStandbyLink for Alink {
    fn send(&self, head: &ToStandby, payload: Vec<Bytes>) -> Result<(), SendError> {
        loop {
            match self.send_timeout(head, payload.clone(), Some(SEND_WAIT)) {
                Ok(_) => return Ok(()),
                Err(AlinkError::Timeout) => {
                    if !self.peer_reachable() {
                        return Err(SendError::PeerLost);
                    }
                }
                Err(AlinkError::Closed) => return Err(SendError::PeerLost),
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
        match self.send_timeout(head, payload, Some(wait)) {
            Ok(_) | Err(AlinkError::Timeout) | Err(AlinkError::Closed) => Ok(()),
            Err(e) => Err(e),
        }
    }
}
