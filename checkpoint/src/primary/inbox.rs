//! The primary's receive side: one thread takes every message off the A-Link, decodes
//! it (once), hands the answers to reads served by the standby straight to the waiting
//! vCPU (see `storage_mirror::primary::PrimaryDisks::read_failed`) and queues
//! everything else, decoded, for the driver.
//!
//! Why a thread: a vCPU whose local disk failed waits inside a device exit for the
//! standby's answer, while the driver may be waiting for that very vCPU to park for a
//! capture. If the driver were also the only reader of the link, neither would move.
//! The vCPU's request goes out through [`outbox`] for the same reason: the link
//! handle lives in the driver's scope, not in the `'static` disk hooks.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::time::Duration;

use alink::{Alink, AlinkError};
use storage_mirror::primary::PrimaryDisks;
use storage_mirror::wire::{self, DiskToPrimary, DiskToStandby};

use crate::messages::{decode_to_primary, PrimaryboundMsg, ToStandby};

/// How often the pump looks at its quit flag.
const PUMP_POLL: Duration = Duration::from_millis(5);

/// A message from the standby, decoded once (by the receive pump, or the simulation).
#[derive(Debug)]
pub enum FromStandby {
    Ack {
        epoch: u64,
    },
    Disk {
        msg: DiskToPrimary,
        payload: Vec<u8>,
    },
    /// The standby took the VM over at `epoch` (planned role swap).
    SwapAccepted {
        epoch: u64,
    },
}

pub enum Inbound {
    Msg(FromStandby),
    Closed,
    /// Output began to wait in the open epoch (the VMM's notifier): the driver looks
    /// at once instead of at its next poll.
    Wake,
}

/// The driver's end.
pub struct Inbox {
    rx: Receiver<Inbound>,
}

impl Inbox {
    pub fn new(rx: Receiver<Inbound>) -> Inbox {
        Inbox { rx }
    }

    /// The next message for the driver, waiting at most `wait` (None: the wait ran
    /// out or a wake-up came).
    pub fn recv(&self, wait: Duration) -> Result<Option<FromStandby>, AlinkError> {
        match self.rx.recv_timeout(wait) {
            Ok(Inbound::Msg(m)) => Ok(Some(m)),
            Ok(Inbound::Wake) => Ok(None),
            Ok(Inbound::Closed) | Err(RecvTimeoutError::Disconnected) => Err(AlinkError::Closed),
            Err(RecvTimeoutError::Timeout) => Ok(None),
        }
    }
}

/// Runs until `quit` or the link closes. `on_ack` is called with each acknowledged
/// epoch before the driver hears of it: the driver's copy of the acknowledgement
/// waits for this thread to hand it over and for the driver to wake, so releasing the
/// epoch's held output here takes those thread switches off every reply's path.
pub fn pump(
    link: &Alink,
    disks: Option<&PrimaryDisks>,
    on_ack: &(dyn Fn(u64) + Sync),
    tx: Sender<Inbound>,
    quit: &AtomicBool,
) {
    while !quit.load(Ordering::Relaxed) {
        match link.recv(PUMP_POLL) {
            Ok(Some(m)) => {
                let msg = match decode_to_primary(m.head_bytes(), m.payload()) {
                    Ok(PrimaryboundMsg::Ack { epoch }) => {
                        on_ack(epoch);
                        FromStandby::Ack { epoch }
                    }
                    Ok(PrimaryboundMsg::SwapAccepted { epoch }) => {
                        FromStandby::SwapAccepted { epoch }
                    }
                    Ok(PrimaryboundMsg::Disk { head, payload }) => {
                        match wire::decode_to_primary(&head, payload) {
                            // Answers a vCPU or the verifier waits for.
                            Ok(
                                DiskToPrimary::ReadDone { id, ok }
                                | DiskToPrimary::Digests { id, ok, .. },
                            ) => {
                                if let Some(d) = disks {
                                    d.peer_reply(id, ok, payload);
                                }
                                continue;
                            }
                            Ok(msg) => FromStandby::Disk {
                                msg,
                                payload: payload.to_vec(),
                            },
                            Err(e) => {
                                log::error!(
                                    "primary: undecodable disk message from the standby: {e}"
                                );
                                continue;
                            }
                        }
                    }
                    Err(e) => {
                        log::error!("primary: undecodable message from the standby: {e}");
                        continue;
                    }
                };
                if tx.send(Inbound::Msg(msg)).is_err() {
                    return;
                }
            }
            Ok(None) => {}
            Err(AlinkError::Closed) => {
                let _ = tx.send(Inbound::Closed);
                return;
            }
            Err(e) => {
                log::error!("primary: A-Link receive: {e}");
                let _ = tx.send(Inbound::Closed);
                return;
            }
        }
    }
}

/// Sends what the vCPU threads and the verifier ask the standby (reads of a failed
/// disk, digests) until `quit`.
pub fn outbox(link: &Alink, rx: Receiver<DiskToStandby>, quit: &AtomicBool) {
    while !quit.load(Ordering::Relaxed) {
        match rx.recv_timeout(PUMP_POLL) {
            Ok(m) => {
                let head = match wire::encode(&m) {
                    Ok(h) => ToStandby::Disk(h),
                    Err(e) => {
                        log::error!("primary: encoding {m:?}: {e}");
                        continue;
                    }
                };
                if let Err(e) = link.send_timeout(&head, Vec::new(), Some(Duration::from_secs(1))) {
                    log::warn!("primary: sending {m:?} to the standby: {e}");
                }
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => return,
        }
    }
}
