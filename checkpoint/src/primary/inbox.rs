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

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::time::Duration;

use alink::{Alink, AlinkError};
use storage_mirror::primary::PrimaryDisks;
use storage_mirror::wire::{self, DiskToPrimary, DiskToStandby};

use crate::messages::{decode_to_primary_at, PrimaryboundMsg, ToStandby};

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
    /// The standby knows quorum generation `generation`, newer than this primary's:
    /// it lost the VM (nothing more is released; the driver ends with
    /// `DriverError::Fenced`).
    Fenced {
        generation: u64,
    },
    /// An acknowledgement of an older generation than this primary's session: not
    /// this generation's standby (nothing was released on it; the driver ends the
    /// session as if the standby were lost).
    Stale {
        generation: u64,
    },
    /// The standby took the VM over at `epoch` (planned role swap).
    SwapAccepted {
        epoch: u64,
    },
    /// The standby did not take the VM over at `epoch` (no quorum grant).
    SwapRefused {
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

/// Which quorum generations were granted to this primary's node (the pair's quorum
/// names a generation's holder: `quorum::types::held_by`). None: nobody's (no quorum,
/// or a caller that cannot tell: every newer generation fences).
pub type OwnGenerations = Arc<dyn Fn(u64) -> bool + Send + Sync>;

/// The fencing check on every message from the standby, before anything is released
/// on it: the refusal the driver gets instead of the message when it carries another
/// generation than this primary's. Newer than `current` (the primary's generation now,
/// which may have grown since its session began: a first grant after the `Hello`) and
/// not one of `own` (granted to this primary's node): this primary lost the VM. A
/// newer generation of its own is this primary's fresh grant, which the standby learned
/// (from the witness or the peer messages) before this primary's quorum thread handed
/// it over: no other node holds anything newer, so it fences nothing. An ack older
/// than `session` (the one its `Hello` carried): not this generation's standby. None:
/// the message passes.
pub fn screen(
    m: &PrimaryboundMsg<'_>,
    session: u64,
    current: u64,
    own: &dyn Fn(u64) -> bool,
) -> Option<FromStandby> {
    if let Some(generation) = m.fences(current.max(session)).filter(|&g| !own(g)) {
        return Some(FromStandby::Fenced { generation });
    }
    m.stale(session)
        .map(|generation| FromStandby::Stale { generation })
}

/// Runs until `quit` or the link closes. `on_ack` is called with each acknowledged
/// epoch before the driver hears of it: the driver's copy of the acknowledgement
/// waits for this thread to hand it over and for the driver to wake, so releasing the
/// epoch's held output here takes those thread switches off every reply's path.
/// `generation` is this primary's (the pair's quorum; None: no quorum), read when the
/// pump starts for the session's and at every message for the current one: a message
/// from a standby that knows a newer one fences it ([`PrimaryboundMsg::fences`]), and
/// from then on no acknowledgement releases anything; an ack of an older one than the
/// session's is refused ([`PrimaryboundMsg::stale`]: released on by nobody, the
/// session ends); `own` tells this primary's own generations apart. See [`screen`].
#[allow(clippy::too_many_arguments)]
pub fn pump(
    link: &Alink,
    disks: Option<&PrimaryDisks>,
    generation: Option<&AtomicU64>,
    own: Option<&OwnGenerations>,
    on_ack: &(dyn Fn(u64) + Sync),
    tx: Sender<Inbound>,
    quit: &AtomicBool,
) {
    let now = || generation.map_or(0, |g| g.load(Ordering::SeqCst));
    let session = now();
    let mut fenced = false;
    while !quit.load(Ordering::Relaxed) {
        match link.recv(PUMP_POLL) {
            Ok(Some(m)) => {
                // A protocol-2 ack carries no generation: it stands for the current one
                // (neither stale nor fencing; protocol 2 fenced at the Hello only).
                let decoded = decode_to_primary_at(
                    link.session_version(),
                    now(),
                    m.head_bytes(),
                    m.payload(),
                );
                if let Some(refusal) = decoded
                    .as_ref()
                    .ok()
                    .and_then(|d| screen(d, session, now(), &|g| own.is_some_and(|o| o(g))))
                {
                    fenced |= matches!(refusal, FromStandby::Fenced { .. });
                    if tx.send(Inbound::Msg(refusal)).is_err() {
                        return;
                    }
                    continue;
                }
                let msg = match decoded {
                    Ok(PrimaryboundMsg::Ack { epoch, .. }) => {
                        if !fenced {
                            on_ack(epoch);
                        }
                        FromStandby::Ack { epoch }
                    }
                    // Not newer than ours, or one of our own (else `screen` took it):
                    // a confused standby.
                    Ok(PrimaryboundMsg::Fenced { generation: g }) => {
                        log::error!(
                            "primary: the standby refused generation {} citing {g}",
                            now()
                        );
                        continue;
                    }
                    Ok(PrimaryboundMsg::SwapAccepted { epoch }) => {
                        FromStandby::SwapAccepted { epoch }
                    }
                    Ok(PrimaryboundMsg::SwapRefused { epoch }) => {
                        FromStandby::SwapRefused { epoch }
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
            Err(e @ AlinkError::PeerRestarted { .. }) => {
                log::warn!("primary: {e}");
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
                // `ToStandby::Disk` is the same on the wire in protocol 2 (messages.rs
                // tests `disk_messages_are_the_same_in_both_versions`): no conversion.
                if let Err(e) = link.send_timeout(&head, Vec::new(), Some(Duration::from_secs(1))) {
                    log::warn!("primary: sending {m:?} to the standby: {e}");
                }
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::messages::{decode_to_primary, encode, ToPrimary};

    fn ack(generation: u64) -> Vec<u8> {
        encode(&ToPrimary::Ack {
            epoch: 1,
            generation,
        })
        .unwrap()
    }

    fn check(head: &[u8], session: u64, current: u64) -> Option<(bool, u64)> {
        check_own(head, session, current, &|_| false)
    }

    fn check_own(
        head: &[u8],
        session: u64,
        current: u64,
        own: &dyn Fn(u64) -> bool,
    ) -> Option<(bool, u64)> {
        let m = decode_to_primary(head, &[]).unwrap();
        screen(&m, session, current, own).map(|r| match r {
            FromStandby::Fenced { generation } => (true, generation),
            FromStandby::Stale { generation } => (false, generation),
            _ => panic!("not a refusal"),
        })
    }

    /// A primary whose session began before its first grant (generation 0 in the
    /// `Hello`, 1 now) is not fenced by its standby's ack carrying that 1; a newer
    /// one fences it; an ack older than the session's is stale.
    #[test]
    fn screening_uses_the_current_generation_for_fencing_and_the_sessions_for_staleness() {
        assert_eq!(check(&ack(1), 0, 1), None);
        assert_eq!(check(&ack(1), 0, 0), Some((true, 1)));
        assert_eq!(check(&ack(2), 0, 1), Some((true, 2)));
        assert_eq!(check(&ack(3), 3, 3), None);
        assert_eq!(check(&ack(2), 3, 3), Some((false, 2)));
        let refusal = encode(&ToPrimary::Fenced { generation: 4 }).unwrap();
        assert_eq!(check(&refusal, 3, 3), Some((true, 4)));
        assert_eq!(check(&refusal, 3, 4), None);
    }

    /// Issue 14's race: the standby learned this primary's fresh grant (odd: node 1's)
    /// before the primary's quorum thread handed it over. Its ack citing it fences
    /// nothing; a newer generation of the other node (even) still does, also when the
    /// standby knows one of ours above it (a newest own grant supersedes it).
    #[test]
    fn a_generation_of_the_primarys_own_node_never_fences_it() {
        let node1 = |g: u64| g != 0 && g % 2 == 1;
        assert_eq!(check_own(&ack(1), 0, 0, &node1), None, "own first grant");
        assert_eq!(check_own(&ack(5), 3, 3, &node1), None, "own re-grant");
        assert_eq!(check_own(&ack(2), 0, 0, &node1), Some((true, 2)));
        assert_eq!(check_own(&ack(4), 3, 3, &node1), Some((true, 4)));
        assert_eq!(
            check_own(&ack(2), 3, 3, &node1),
            Some((false, 2)),
            "stale still"
        );
        let refusal = encode(&ToPrimary::Fenced { generation: 4 }).unwrap();
        assert_eq!(check_own(&refusal, 3, 3, &node1), Some((true, 4)));
        // Without the quorum's word every newer generation fences (the old rule).
        assert_eq!(check_own(&ack(1), 0, 0, &|_| false), Some((true, 1)));
    }
}
