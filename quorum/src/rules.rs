//! The grant rules, shared by both quorum backends: the UDP witness
//! (`witness::core`, which keeps the state in its own memory and store) and etcd
//! (`etcd::session`, which reads the state from etcd and writes the decision back by a
//! transaction conditioned on every revision it read). One function decides for both,
//! so the two backends cannot drift apart.
//!
//! Pure: no clock (the holder's remaining lease is given), no storage. The caller makes
//! the decided record durable before it sends the reply.

use std::time::Duration;

use crate::timing::{MAX_LEASE, MIN_LEASE};
use crate::types::{check_name, next_generation, Generation, NodeId};
use crate::witness::ops::{OpError, Reply, Request};
use crate::witness::store::VmRecord;

/// Test-only deliberate bugs, to show that the simulation catches them.
#[cfg(feature = "mutations")]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CoreMutations {
    /// Grant the next generation even while the holder's lease runs.
    pub grant_without_lapse: bool,
    /// Forget the leases' grace after a restart (leases start lapsed).
    pub no_restart_grace: bool,
    /// Ignore the peer-outdated flag.
    pub ignore_outdated: bool,
}

/// What a backend knows of one VM when it decides.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Known {
    pub rec: VmRecord,
    /// The lease of `rec.holder` (or of an unknown holder) is still running, for this
    /// long (an estimate where the backend cannot tell: etcd only says the owner key
    /// still exists); None: lapsed or never granted.
    pub live: Option<Duration>,
}

/// The answer and what the VM's state becomes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    pub reply: Reply,
    /// Some: the record afterwards, and a lease of `lease_ms` for its holder (or for an
    /// unknown holder) starts now. It must be durable before `reply` is sent.
    pub next: Option<VmRecord>,
}

/// Checks the values of a request that do not depend on the VM's state.
pub fn validate(req: &Request) -> Result<(), OpError> {
    check_name("VM name", req.vm()).map_err(OpError::BadName)?;
    if let Request::Renew { lease_ms, .. } | Request::Acquire { lease_ms, .. } = req {
        let d = Duration::from_millis(u64::from(*lease_ms));
        if !(MIN_LEASE..=MAX_LEASE).contains(&d) {
            return Err(OpError::BadLease(*lease_ms));
        }
    }
    if matches!(
        req,
        Request::Renew { generation: 0, .. } | Request::Release { generation: 0, .. }
    ) {
        return Err(OpError::ZeroGeneration);
    }
    Ok(())
}

fn ms(d: Duration) -> u32 {
    u32::try_from(d.as_millis()).unwrap_or(u32::MAX)
}

/// The rules, with the simulation's deliberate bugs when built with them.
#[derive(Clone, Copy, Debug, Default)]
pub struct Rules {
    #[cfg(feature = "mutations")]
    pub mutations: CoreMutations,
}

impl Rules {
    /// Decides `req` (already [`validate`]d) given what is known of its VM.
    pub fn decide(&self, known: Option<&Known>, req: &Request) -> Decision {
        match req {
            Request::Query { .. } => Decision {
                reply: match known {
                    None => Reply::State {
                        generation: 0,
                        holder: None,
                        peer_outdated: false,
                        lease_left_ms: 0,
                    },
                    Some(k) => Reply::State {
                        generation: k.rec.generation,
                        holder: k.rec.holder,
                        peer_outdated: k.rec.peer_outdated,
                        lease_left_ms: k.live.map_or(0, ms),
                    },
                },
                next: None,
            },
            Request::Renew {
                node,
                generation,
                lease_ms,
                peer_outdated,
                ..
            } => renew(known, *node, *generation, *lease_ms, *peer_outdated),
            Request::Acquire {
                node,
                from,
                lease_ms,
                ..
            } => self.acquire(known, *node, *from, *lease_ms),
            Request::Release {
                node, generation, ..
            } => release(known, *node, *generation),
        }
    }

    fn acquire(
        &self,
        e: Option<&Known>,
        node: NodeId,
        from: Generation,
        lease_ms: u32,
    ) -> Decision {
        let Some(next_gen) = next_generation(from, node) else {
            return refuse(Reply::Refused(OpError::GenerationOverflow(from)));
        };
        let grant = |peer_outdated: bool| Decision {
            reply: Reply::Granted {
                generation: next_gen,
                lease_ms,
            },
            next: Some(VmRecord {
                generation: next_gen,
                holder: Some(node),
                peer_outdated,
                lease_ms,
            }),
        };
        // A generation this service has not seen: its holder is unknown and may be
        // renewing elsewhere or may have renewed here before a lost disk; treat it as
        // live for one lease from now.
        let unknown = |generation: Generation| Decision {
            reply: Reply::Busy {
                generation,
                holder: None,
                retry_after_ms: lease_ms,
            },
            next: Some(VmRecord {
                generation,
                holder: None,
                peer_outdated: false,
                lease_ms,
            }),
        };
        let Some(e) = e else {
            return if from == 0 {
                grant(false)
            } else {
                unknown(from)
            };
        };
        if e.rec.generation > from {
            return refuse(Reply::Lost {
                generation: e.rec.generation,
                holder: e.rec.holder,
            });
        }
        if e.rec.generation < from {
            // What is known of the requester's replica carries over: it was stale at an
            // older generation and nothing here says it was resynced since (a holder
            // that renews here states it afresh).
            if e.rec.peer_outdated && e.rec.holder != Some(node) {
                return refuse(Reply::Outdated {
                    generation: e.rec.generation,
                });
            }
            return unknown(from);
        }
        #[cfg(feature = "mutations")]
        let lapse_ignored = self.mutations.grant_without_lapse;
        #[cfg(not(feature = "mutations"))]
        let lapse_ignored = false;
        if let Some(left) = e.live.filter(|_| !lapse_ignored) {
            return refuse(Reply::Busy {
                generation: e.rec.generation,
                holder: e.rec.holder,
                retry_after_ms: ms(left).max(1),
            });
        }
        #[cfg(feature = "mutations")]
        let outdated_ignored = self.mutations.ignore_outdated;
        #[cfg(not(feature = "mutations"))]
        let outdated_ignored = false;
        let requester_is_holder = e.rec.holder == Some(node);
        if e.rec.peer_outdated && !requester_is_holder && !outdated_ignored {
            return refuse(Reply::Outdated {
                generation: e.rec.generation,
            });
        }
        if e.rec.generation == 0 && e.rec.holder.is_none() {
            return grant(false);
        }
        // The old holder may have run ahead of the new one (epochs it never got
        // acknowledged, writes of its last moments): its replica is stale now. A holder
        // re-acquiring after its own restart keeps the peer's status.
        grant(if requester_is_holder {
            e.rec.peer_outdated
        } else {
            true
        })
    }
}

/// A holder gives its lease up (planned role swap): the record stays (generation,
/// holder, peer mark) with a lease of 0 ms, so it has lapsed from now on and the peer's
/// compare-and-set from `generation` is decided as after a lapse. Nothing of another
/// node's is ever released: a newer generation, or the same one held by the other
/// node, answers `Lost`.
fn release(e: Option<&Known>, node: NodeId, generation: Generation) -> Decision {
    let released = Reply::Released { generation };
    match e {
        // Not known here (or only an older generation): no lease of it runs here. A
        // peer's acquire from `generation` is answered `Busy` for a lease (unknown
        // holder), so the swap is refused, never granted wrongly.
        None => refuse(released),
        Some(e) if e.rec.generation < generation => refuse(released),
        Some(e) if e.rec.generation > generation => refuse(Reply::Lost {
            generation: e.rec.generation,
            holder: e.rec.holder,
        }),
        Some(e) if e.rec.holder == Some(node) => Decision {
            reply: released,
            next: Some(VmRecord {
                lease_ms: 0,
                ..e.rec
            }),
        },
        Some(e) => refuse(Reply::Lost {
            generation: e.rec.generation,
            holder: e.rec.holder,
        }),
    }
}

fn refuse(reply: Reply) -> Decision {
    Decision { reply, next: None }
}

fn renew(
    e: Option<&Known>,
    node: NodeId,
    generation: Generation,
    lease_ms: u32,
    peer_outdated: bool,
) -> Decision {
    if generation == 0 {
        return refuse(Reply::Refused(OpError::ZeroGeneration));
    }
    let granted = Decision {
        reply: Reply::Granted {
            generation,
            lease_ms,
        },
        next: Some(VmRecord {
            generation,
            holder: Some(node),
            peer_outdated,
            lease_ms,
        }),
    };
    match e {
        // Unknown here, or known at an older generation: the pair got `generation` from
        // the other witness (or this one lost its disk); adopt it, but never over another
        // node's running lease (it may still be acting on it).
        None => granted,
        Some(e) if e.rec.generation < generation => match e.live {
            Some(left) if e.rec.holder != Some(node) => refuse(Reply::Busy {
                generation: e.rec.generation,
                holder: e.rec.holder,
                retry_after_ms: ms(left).max(1),
            }),
            _ => granted,
        },
        Some(e) if e.rec.generation > generation => refuse(Reply::Lost {
            generation: e.rec.generation,
            holder: e.rec.holder,
        }),
        // Same generation, held by this node (or adopted with an unknown holder).
        Some(e) if e.rec.holder.is_none_or(|h| h == node) => granted,
        Some(e) => refuse(Reply::Lost {
            generation: e.rec.generation,
            holder: e.rec.holder,
        }),
    }
}
