//! The witness's decisions, pure (time passed in, state changes made durable through a
//! [`Store`] before the reply is returned). The server and the simulation run this same
//! code.
//!
//! Per (cluster, VM) the witness keeps a [`VmRecord`] (durable) and the holder's lease
//! end (in memory, on the witness's own monotonic clock). After a restart every known
//! holder is assumed to have renewed just before the crash: its lease runs a full
//! `lease_ms` from the restart.

use std::collections::HashMap;
use std::time::Duration;

use super::ops::{OpError, Reply, Request};
use super::store::{Store, VmRecord};
use crate::rules::{self, Decision, Known, Rules};

/// Memory bounds of one witness.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CoreLimits {
    /// VMs over all clusters.
    pub max_vms: u32,
    /// VMs of one cluster.
    pub max_vms_per_cluster: u32,
}

impl Default for CoreLimits {
    fn default() -> CoreLimits {
        CoreLimits {
            max_vms: 65_536,
            max_vms_per_cluster: 4096,
        }
    }
}

#[cfg(feature = "mutations")]
pub use crate::rules::CoreMutations;

#[derive(Clone, Debug)]
struct Entry {
    rec: VmRecord,
    /// End of the holder's lease (witness clock); None: lapsed or never held.
    lease_until: Option<Duration>,
}

/// One witness's state for all the clusters it serves.
#[derive(Debug)]
pub struct WitnessCore {
    limits: CoreLimits,
    vms: HashMap<(String, String), Entry>,
    per_cluster: HashMap<String, u32>,
    #[cfg(feature = "mutations")]
    pub mutations: CoreMutations,
}

/// Status of one VM, for `twinrun witness status` and tests.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct VmStatus {
    pub cluster: String,
    pub vm: String,
    pub generation: u64,
    pub holder: Option<u64>,
    pub peer_outdated: bool,
    pub lease_ms: u32,
    pub lease_left_ms: u32,
}

fn ms(d: Duration) -> u32 {
    u32::try_from(d.as_millis()).unwrap_or(u32::MAX)
}

impl WitnessCore {
    /// A witness starting at `now` with the records found in its store.
    pub fn new(
        limits: CoreLimits,
        records: impl IntoIterator<Item = (String, String, VmRecord)>,
        now: Duration,
    ) -> WitnessCore {
        let mut core = WitnessCore {
            limits,
            vms: HashMap::new(),
            per_cluster: HashMap::new(),
            #[cfg(feature = "mutations")]
            mutations: CoreMutations::default(),
        };
        for (c, v, rec) in records {
            *core.per_cluster.entry(c.clone()).or_default() += 1;
            // The holder may have renewed just before the crash.
            let lease_until = rec
                .holder
                .map(|_| now + Duration::from_millis(u64::from(rec.lease_ms)));
            core.vms.insert((c, v), Entry { rec, lease_until });
        }
        core
    }

    /// Applies the restart grace a second time (mutation support: the simulation builds
    /// the core from the store; with `no_restart_grace` the leases start lapsed).
    #[cfg(feature = "mutations")]
    pub fn drop_leases(&mut self) {
        for e in self.vms.values_mut() {
            e.lease_until = None;
        }
    }

    pub fn vm_count(&self) -> usize {
        self.vms.len()
    }

    /// Every VM's status at `now`, sorted.
    pub fn status(&self, now: Duration) -> Vec<VmStatus> {
        let mut v: Vec<VmStatus> = self
            .vms
            .iter()
            .map(|((c, vm), e)| VmStatus {
                cluster: c.clone(),
                vm: vm.clone(),
                generation: e.rec.generation,
                holder: e.rec.holder.map(|n| n.0),
                peer_outdated: e.rec.peer_outdated,
                lease_ms: e.rec.lease_ms,
                lease_left_ms: e.lease_until.map_or(0, |u| ms(u.saturating_sub(now))),
            })
            .collect();
        v.sort_by(|a, b| (&a.cluster, &a.vm).cmp(&(&b.cluster, &b.vm)));
        v
    }

    fn live(e: &Entry, now: Duration) -> Option<Duration> {
        e.lease_until.filter(|&u| u > now).map(|u| u - now)
    }

    /// Serves one request of an authenticated member of `cluster` at `now`. A change of
    /// the durable record is saved through `store` first; if that fails nothing
    /// changes and the answer is `Refused(StorageFailed)`.
    pub fn handle(
        &mut self,
        now: Duration,
        cluster: &str,
        req: &Request,
        store: &mut dyn Store,
    ) -> Reply {
        if let Err(e) = rules::validate(req) {
            return Reply::Refused(e);
        }
        let key = (cluster.to_string(), req.vm().to_string());
        let existing = self.vms.get(&key).cloned();
        if existing.is_none() && !matches!(req, Request::Query { .. }) {
            if self.vms.len() as u64 >= u64::from(self.limits.max_vms) {
                return Reply::Refused(OpError::TooManyVms(self.limits.max_vms));
            }
            let n = self.per_cluster.get(cluster).copied().unwrap_or(0);
            if n >= self.limits.max_vms_per_cluster {
                return Reply::Refused(OpError::TooManyVms(self.limits.max_vms_per_cluster));
            }
        }
        // The decision (shared with the etcd backend): the reply and the record
        // afterwards, whose holder's lease starts now.
        let known = existing.as_ref().map(|e| Known {
            rec: e.rec,
            live: Self::live(e, now),
        });
        let Decision { reply, next } = self.rules().decide(known.as_ref(), req);
        let next = next.map(|rec| Entry {
            rec,
            lease_until: Some(now + Duration::from_millis(u64::from(rec.lease_ms))),
        });
        if let Some(next) = next {
            let changed = existing.as_ref().map(|e| e.rec) != Some(next.rec);
            if changed && next.rec.holder.is_some() {
                if let Err(e) = store.save(cluster, req.vm(), &next.rec) {
                    log::error!(
                        "witness: cannot store {cluster}/{}: {e}: refusing the request",
                        req.vm()
                    );
                    return Reply::Refused(OpError::StorageFailed);
                }
            }
            if existing.is_none() {
                *self.per_cluster.entry(cluster.to_string()).or_default() += 1;
            }
            self.vms.insert(key, next);
        }
        reply
    }

    fn rules(&self) -> Rules {
        Rules {
            #[cfg(feature = "mutations")]
            mutations: self.mutations,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::NodeId;
    use crate::witness::store::MemStore;

    const A: NodeId = NodeId(1);
    const B: NodeId = NodeId(2);

    fn ms_(n: u64) -> Duration {
        Duration::from_millis(n)
    }
    fn renew(node: NodeId, g: u64, outdated: bool) -> Request {
        Request::Renew {
            vm: "vm0".into(),
            node,
            generation: g,
            lease_ms: 200,
            peer_outdated: outdated,
        }
    }
    fn acquire(node: NodeId, from: u64) -> Request {
        Request::Acquire {
            vm: "vm0".into(),
            node,
            from,
            lease_ms: 200,
        }
    }

    #[test]
    fn first_grant_renew_lapse_and_takeover() {
        let mut s = MemStore::default();
        let mut w = WitnessCore::new(CoreLimits::default(), [], ms_(0));
        let g = |generation| Reply::Granted {
            generation,
            lease_ms: 200,
        };
        assert_eq!(w.handle(ms_(0), "c", &acquire(A, 0), &mut s), g(1));
        assert_eq!(s.records.len(), 1, "durable before the answer");
        // B cannot take over while A renews.
        assert_eq!(w.handle(ms_(100), "c", &renew(A, 1, false), &mut s), g(1));
        assert!(matches!(
            w.handle(ms_(250), "c", &acquire(B, 1), &mut s),
            Reply::Busy {
                retry_after_ms: 50,
                holder: Some(A),
                ..
            }
        ));
        // Lapsed: granted by compare-and-set, A's replica marked stale.
        assert_eq!(w.handle(ms_(301), "c", &acquire(B, 1), &mut s), g(2));
        let r = s.records[&("c".into(), "vm0".into())];
        assert_eq!(
            (r.generation, r.holder, r.peer_outdated),
            (2, Some(B), true)
        );
        // A's renewal and a second acquire from 1 learn the loss.
        assert_eq!(
            w.handle(ms_(302), "c", &renew(A, 1, false), &mut s),
            Reply::Lost {
                generation: 2,
                holder: Some(B)
            }
        );
        assert!(matches!(
            w.handle(ms_(303), "c", &acquire(A, 1), &mut s),
            Reply::Lost { generation: 2, .. }
        ));
    }

    #[test]
    fn outdated_peer_cannot_take_over() {
        let mut s = MemStore::default();
        let mut w = WitnessCore::new(CoreLimits::default(), [], ms_(0));
        w.handle(ms_(0), "c", &acquire(A, 0), &mut s);
        w.handle(ms_(10), "c", &renew(A, 1, true), &mut s);
        assert!(s.records.values().all(|r| r.peer_outdated));
        assert_eq!(
            w.handle(ms_(500), "c", &acquire(B, 1), &mut s),
            Reply::Outdated { generation: 1 }
        );
        // Once A says the peer is current again, B may take over after the lapse.
        w.handle(ms_(600), "c", &renew(A, 1, false), &mut s);
        assert!(matches!(
            w.handle(ms_(900), "c", &acquire(B, 1), &mut s),
            Reply::Granted { generation: 2, .. }
        ));
    }

    #[test]
    fn restart_keeps_generation_and_waits_a_lease() {
        let mut s = MemStore::default();
        let mut w = WitnessCore::new(CoreLimits::default(), [], ms_(0));
        w.handle(ms_(0), "c", &acquire(A, 0), &mut s);
        w.handle(ms_(1000), "c", &acquire(B, 1), &mut s);
        let recs = s
            .records
            .iter()
            .map(|((c, v), r)| (c.clone(), v.clone(), *r));
        // Restarted witness with a clock that starts over.
        let mut w = WitnessCore::new(CoreLimits::default(), recs, ms_(5));
        assert!(matches!(
            w.handle(ms_(6), "c", &acquire(A, 1), &mut s),
            Reply::Lost { generation: 2, .. }
        ));
        assert!(matches!(
            w.handle(ms_(100), "c", &acquire(A, 2), &mut s),
            Reply::Busy {
                retry_after_ms: 105,
                ..
            }
        ));
        // After the grace: A's replica is outdated (B's takeover said so).
        assert_eq!(
            w.handle(ms_(300), "c", &acquire(A, 2), &mut s),
            Reply::Outdated { generation: 2 }
        );
    }

    #[test]
    fn adoption_and_unknown_generations() {
        let mut s = MemStore::default();
        let mut w = WitnessCore::new(CoreLimits::default(), [], ms_(0));
        // Another node's running lease is never overridden by an adoption.
        w.handle(ms_(0), "c2", &acquire(A, 0), &mut s);
        assert!(matches!(
            w.handle(ms_(1), "c2", &renew(B, 4, false), &mut s),
            Reply::Busy { generation: 1, .. }
        ));
        assert!(matches!(
            w.handle(ms_(201), "c2", &renew(B, 4, false), &mut s),
            Reply::Granted { generation: 4, .. }
        ));
        // The pair comes here at generation 7 (it used the other witness before).
        assert!(matches!(
            w.handle(ms_(0), "c", &renew(B, 7, false), &mut s),
            Reply::Granted { generation: 7, .. }
        ));
        assert!(matches!(
            w.handle(ms_(1), "c", &renew(A, 6, false), &mut s),
            Reply::Lost {
                generation: 7,
                holder: Some(B)
            }
        ));
        // A standby asking from a generation this witness never saw waits one lease.
        assert!(matches!(
            w.handle(ms_(10), "c", &acquire(A, 9), &mut s),
            Reply::Busy { holder: None, .. }
        ));
        assert!(matches!(
            w.handle(ms_(211), "c", &acquire(A, 9), &mut s),
            Reply::Granted { generation: 11, .. }
        ));
    }

    #[test]
    fn storage_failure_changes_nothing() {
        let mut s = MemStore {
            fail: true,
            ..MemStore::default()
        };
        let mut w = WitnessCore::new(CoreLimits::default(), [], ms_(0));
        assert_eq!(
            w.handle(ms_(0), "c", &acquire(A, 0), &mut s),
            Reply::Refused(OpError::StorageFailed)
        );
        assert_eq!(w.vm_count(), 0);
        s.fail = false;
        assert!(matches!(
            w.handle(ms_(0), "c", &acquire(A, 0), &mut s),
            Reply::Granted { generation: 1, .. }
        ));
    }

    #[test]
    fn limits_and_bad_values() {
        let mut s = MemStore::default();
        let lim = CoreLimits {
            max_vms: 3,
            max_vms_per_cluster: 2,
        };
        let mut w = WitnessCore::new(lim, [], ms_(0));
        let acq = |vm: &str| Request::Acquire {
            vm: vm.into(),
            node: A,
            from: 0,
            lease_ms: 200,
        };
        assert!(matches!(
            w.handle(ms_(0), "c", &acq("a"), &mut s),
            Reply::Granted { .. }
        ));
        assert!(matches!(
            w.handle(ms_(0), "c", &acq("b"), &mut s),
            Reply::Granted { .. }
        ));
        assert_eq!(
            w.handle(ms_(0), "c", &acq("c"), &mut s),
            Reply::Refused(OpError::TooManyVms(2))
        );
        assert!(matches!(
            w.handle(ms_(0), "d", &acq("c"), &mut s),
            Reply::Granted { .. }
        ));
        assert_eq!(
            w.handle(ms_(0), "e", &acq("x"), &mut s),
            Reply::Refused(OpError::TooManyVms(3))
        );
        assert!(matches!(
            w.handle(ms_(0), "c", &acq("../x"), &mut s),
            Reply::Refused(OpError::BadName(_))
        ));
        let bad_lease = Request::Acquire {
            vm: "a".into(),
            node: A,
            from: 0,
            lease_ms: 1,
        };
        assert_eq!(
            w.handle(ms_(0), "c", &bad_lease, &mut s),
            Reply::Refused(OpError::BadLease(1))
        );
        assert_eq!(
            w.handle(ms_(0), "c", &renew(A, 0, false), &mut s),
            Reply::Refused(OpError::ZeroGeneration)
        );
        // A query of an unknown VM creates nothing.
        w.handle(ms_(0), "c", &Request::Query { vm: "zz".into() }, &mut s);
        assert_eq!(w.vm_count(), 3);
    }
}
