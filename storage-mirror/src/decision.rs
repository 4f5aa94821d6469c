//! The resync decision: a PURE function of both replicas' metadata, their dirty-bit
//! counts and the side the VM runs on now. No I/O, no clock.
//!
//! A side is *unusable* when its metadata is Missing, Damaged, Replaced or says
//! `failed`; *inconsistent* when it is an interrupted resync target; otherwise
//! *consistent*. Rules, first match wins ("X" is one side, "Y" the other):
//!
//! | rule | condition | decision |
//! | --- | --- | --- |
//! | a | neither side consistent | Refuse: no copy to trust |
//! | h1 | both metadata readable, disk size or block size differ | Refuse: geometry |
//! | b | X unusable, Y consistent | Full Y -> X |
//! | c | X inconsistent, Y consistent, Y.current_gen == X.sync_source_gen | Delta Y -> X (resume) |
//! | c | X demoted (below), Y consistent, Y.bitmap_base_gen = S != 0 is X.current_gen or X.bitmap_base_gen | Delta Y -> X |
//! | c | X inconsistent, Y consistent, otherwise | Full Y -> X |
//! | d | same current_gen, no dirty bit on either side | InSync |
//! | d | same current_gen, dirty bits | Delta from the preferred side (below) |
//! | e | X.bitmap_base_gen == Y.current_gen (and not also the reverse) | Delta X -> Y |
//! | e' | both of rule e's conditions hold (a cycle) | Refuse: split brain |
//! | f | bitmap bases equal and nonzero, currents differ | Refuse: split brain |
//! | g | Y.current_gen in X.history (and not also the reverse) | Full X -> Y |
//! | h2 | anything else | Refuse: unrelated disks |
//!
//! Then the `running` check: the VM's side must end up the source. A Delta or Full
//! *to* the running side becomes Refuse, naming the side with the newer data — except
//! when the running side's disk is `failed` (its guest I/O is already served from the
//! partner's replica, which therefore is the current copy).
//!
//! Notes:
//! - A Delta copies the UNION of both sides' bitmaps: the target's own bits are the
//!   blocks of its last uncommitted epochs and of writes the source never saw, which
//!   must be overwritten with the source's version.
//! - A *demoted* replica is one its node marked when it lost the VM to the quorum's
//!   newer generation (`ReplicaMeta::mark_demoted`: inconsistent, source unknown, the
//!   winner's quorum generation recorded). Its bitmap holds every block it wrote since
//!   the generation S both sides last shared (the activity log's extents, narrowed to
//!   the unacknowledged writes when it lost its standby alive, and every write it made
//!   alone after, each marked durably before the write). The winner's bitmap, based at
//!   S, holds every block it wrote since (the standby writes nothing of its own before
//!   a takeover: all it applied, the loser wrote first). So the union of both bitmaps
//!   is every block where the two may differ, as in rule e; the loser's own writes are
//!   overwritten with the winner's. Without that shared S (the loser's metadata from
//!   an older session, or the winner's from a later one), a full copy, as before.
//! - Geometry (h1) is checked before any copy is chosen rather than last: copying
//!   between disks of different size is never right, whatever the generations say. A
//!   side whose image changed size is already `Replaced` (the metadata store checks).
//! - Rule d's preferred source when the generations are equal: the running side; else
//!   the only side with `unclean_primary` (it was primary when both went down, so its
//!   disk may hold writes of epochs the standby never applied); else the side with
//!   the later `last_committed_epoch`; else A. Equal generations mean both disks were
//!   identical except for the blocks in the two bitmaps, so copying that union either
//!   way leaves identical replicas; the preference only keeps the newest writes.

use std::fmt;

use crate::meta::{MetaState, ReplicaMeta, SOURCE_UNKNOWN};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Side {
    A,
    B,
}

impl Side {
    pub fn other(self) -> Side {
        match self {
            Side::A => Side::B,
            Side::B => Side::A,
        }
    }
}

impl fmt::Display for Side {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Side::A => "A",
            Side::B => "B",
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    InSync,
    /// Copy the union of both sides' dirty bitmaps from `from` to `to`.
    Delta {
        from: Side,
        to: Side,
    },
    /// Copy every block from `from` to `to`.
    Full {
        from: Side,
        to: Side,
    },
    /// Do not copy anything: an operator must decide (the reason says why).
    Refuse,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verdict {
    pub decision: Decision,
    pub reason: String,
}

/// What the decision needs from one replica.
#[derive(Clone, Copy, Debug)]
pub struct ReplicaView<'a> {
    pub meta: &'a MetaState,
    /// Set bits of its dirty bitmap (0 when the bitmap is unreadable: such a side's
    /// metadata should then not be `Ok` for a delta, see the crate README).
    pub dirty_blocks: u64,
}

enum Class<'a> {
    Unusable(String),
    Inconsistent(&'a ReplicaMeta),
    Consistent(&'a ReplicaMeta),
}

fn classify(s: &MetaState) -> Class<'_> {
    match s {
        MetaState::Missing => Class::Unusable("has no metadata".into()),
        MetaState::Damaged(r) => Class::Unusable(format!("has damaged metadata ({r})")),
        MetaState::Replaced { reason } => Class::Unusable(format!("disk was replaced ({reason})")),
        MetaState::Ok(m) if m.failed => Class::Unusable("disk failed".into()),
        MetaState::Ok(m) if m.inconsistent => Class::Inconsistent(m),
        MetaState::Ok(m) => Class::Consistent(m),
    }
}

fn verdict(decision: Decision, reason: String) -> Verdict {
    Verdict { decision, reason }
}

fn refuse(reason: String) -> Verdict {
    verdict(Decision::Refuse, reason)
}

/// Decides how replicas `a` and `b` come back in sync; `running` is the side the VM
/// runs on now (None: it runs nowhere).
pub fn decide(a: &ReplicaView<'_>, b: &ReplicaView<'_>, running: Option<Side>) -> Verdict {
    let v = decide_data(a, b, running);
    let to = match v.decision {
        Decision::Delta { to, .. } | Decision::Full { to, .. } => to,
        Decision::InSync | Decision::Refuse => return v,
    };
    if running != Some(to) {
        return v;
    }
    let to_meta = match to {
        Side::A => a.meta,
        Side::B => b.meta,
    };
    if matches!(to_meta, MetaState::Ok(m) if m.failed) {
        return verdict(
            v.decision,
            format!(
                "{}; the VM runs on {to} but its disk failed, so {} already serves its I/O",
                v.reason,
                to.other()
            ),
        );
    }
    refuse(format!(
        "the VM runs on {to}, but {} must be the source: {}",
        to.other(),
        v.reason
    ))
}

/// The rules of the module table, without the `running` check.
fn decide_data(a: &ReplicaView<'_>, b: &ReplicaView<'_>, running: Option<Side>) -> Verdict {
    let (ca, cb) = (classify(a.meta), classify(b.meta));

    // a. Nothing consistent to copy from.
    let describe = |side: Side, c: &Class<'_>| match c {
        Class::Unusable(r) => format!("{side} {r}"),
        Class::Inconsistent(_) => format!("{side} is an interrupted resync target"),
        Class::Consistent(_) => format!("{side} is consistent"),
    };
    if !matches!(ca, Class::Consistent(_)) && !matches!(cb, Class::Consistent(_)) {
        return refuse(format!(
            "no consistent replica: {} and {}",
            describe(Side::A, &ca),
            describe(Side::B, &cb)
        ));
    }

    // h1. Geometry, whenever both sides' metadata can be read.
    if let (MetaState::Ok(ma), MetaState::Ok(mb)) = (a.meta, b.meta) {
        if (ma.disk_size, ma.block_size) != (mb.disk_size, mb.block_size) {
            return refuse(format!(
                "disk geometry differs: A is {} B in {} B blocks, B is {} B in {} B blocks",
                ma.disk_size, ma.block_size, mb.disk_size, mb.block_size
            ));
        }
    }

    let (ma, mb) = match (&ca, &cb) {
        // b. One side unusable: full copy from the (consistent) other.
        (Class::Unusable(r), _) => {
            return full(Side::B, format!("A {r}"));
        }
        (_, Class::Unusable(r)) => {
            return full(Side::A, format!("B {r}"));
        }
        // c. One side an interrupted resync target.
        (Class::Inconsistent(t), Class::Consistent(s)) => return resume(Side::B, s, t),
        (Class::Consistent(s), Class::Inconsistent(t)) => return resume(Side::A, s, t),
        (Class::Consistent(ma), Class::Consistent(mb)) => (*ma, *mb),
        (Class::Inconsistent(_), Class::Inconsistent(_)) => {
            unreachable!("rule a handles two inconsistent sides")
        }
    };

    // d. Same generation.
    if ma.current_gen == mb.current_gen {
        if a.dirty_blocks == 0 && b.dirty_blocks == 0 {
            return verdict(
                Decision::InSync,
                format!("same generation {:#x} and no dirty block", ma.current_gen),
            );
        }
        let (from, why) = match running {
            Some(s) => (s, "the VM runs there"),
            None => same_gen_source(ma, mb),
        };
        return verdict(
            Decision::Delta {
                from,
                to: from.other(),
            },
            format!(
                "same generation {:#x} with {} + {} dirty blocks; {from} is the source: {why}",
                ma.current_gen, a.dirty_blocks, b.dirty_blocks
            ),
        );
    }

    // e. One side ran on alone since the other's (unchanged) generation.
    let a_ahead = ma.bitmap_base_gen != 0 && ma.bitmap_base_gen == mb.current_gen;
    let b_ahead = mb.bitmap_base_gen != 0 && mb.bitmap_base_gen == ma.current_gen;
    match (a_ahead, b_ahead) {
        (true, true) => {
            return refuse(format!(
                "split brain: each side's bitmap starts at the other's generation \
                 (A {:#x} base {:#x}, B {:#x} base {:#x})",
                ma.current_gen, ma.bitmap_base_gen, mb.current_gen, mb.bitmap_base_gen
            ))
        }
        (true, false) => return ahead(Side::A, ma),
        (false, true) => return ahead(Side::B, mb),
        (false, false) => {}
    }

    // f. Both ran alone from the same shared generation.
    if ma.bitmap_base_gen != 0 && ma.bitmap_base_gen == mb.bitmap_base_gen {
        return refuse(format!(
            "split brain: both sides ran alone since generation {:#x} (A is now {:#x}, B {:#x})",
            ma.bitmap_base_gen, ma.current_gen, mb.current_gen
        ));
    }

    // g. One side holds an older generation of the other, with no bitmap relating them.
    let b_older = ma.history.contains(&mb.current_gen);
    let a_older = mb.history.contains(&ma.current_gen);
    match (b_older, a_older) {
        (true, true) => {
            return refuse(format!(
                "split brain: each side's generation is in the other's history \
                 (A {:#x}, B {:#x})",
                ma.current_gen, mb.current_gen
            ))
        }
        (true, false) => return older(Side::A, mb.current_gen),
        (false, true) => return older(Side::B, ma.current_gen),
        (false, false) => {}
    }

    // h2.
    refuse(format!(
        "unrelated disks: generations A {:#x} and B {:#x} share no history",
        ma.current_gen, mb.current_gen
    ))
}

fn full(from: Side, why: String) -> Verdict {
    verdict(
        Decision::Full {
            from,
            to: from.other(),
        },
        format!("{why}: full copy from {from}"),
    )
}

/// Rule c, demoted target: the generation S both bitmaps start at (see the module's
/// notes), when `tgt` is a demoted replica and `src`'s bitmap begins where `tgt`'s
/// data or bitmap does.
fn demoted_since(src: &ReplicaMeta, tgt: &ReplicaMeta) -> Option<u64> {
    if tgt.sync_source_gen != SOURCE_UNKNOWN || tgt.quorum_generation == 0 {
        return None;
    }
    let s = src.bitmap_base_gen;
    (s != 0 && (tgt.current_gen == s || tgt.bitmap_base_gen == s)).then_some(s)
}

/// Rule c: `src` is consistent, `tgt` (the other side) an interrupted resync target.
fn resume(src_side: Side, src: &ReplicaMeta, tgt: &ReplicaMeta) -> Verdict {
    let to = src_side.other();
    if let Some(shared) = demoted_since(src, tgt) {
        return verdict(
            Decision::Delta { from: src_side, to },
            format!(
                "{to} lost the VM (demoted at quorum generation {}); both bitmaps start at \
                 generation {shared:#x}: delta of their union",
                tgt.quorum_generation
            ),
        );
    }
    if src.current_gen == tgt.sync_source_gen {
        verdict(
            Decision::Delta { from: src_side, to },
            format!(
                "{to} is an interrupted resync target of {src_side}'s generation {:#x}: resume",
                src.current_gen
            ),
        )
    } else {
        verdict(
            Decision::Full { from: src_side, to },
            format!(
                "{to} is an interrupted resync target of generation {:#x}, but {src_side} now \
                 holds {:#x}: full copy",
                tgt.sync_source_gen, src.current_gen
            ),
        )
    }
}

/// Rule e: `side` (meta `m`) ran on alone since the other side's current generation.
fn ahead(side: Side, m: &ReplicaMeta) -> Verdict {
    verdict(
        Decision::Delta {
            from: side,
            to: side.other(),
        },
        format!(
            "{side} ran without {} since generation {:#x}, which {} still holds",
            side.other(),
            m.bitmap_base_gen,
            side.other()
        ),
    )
}

/// Rule g: `side`'s history holds the other's current generation `gen`.
fn older(side: Side, gen: u64) -> Verdict {
    verdict(
        Decision::Full {
            from: side,
            to: side.other(),
        },
        format!(
            "{} holds {side}'s older generation {gen:#x}, but no bitmap covers the changes since",
            side.other()
        ),
    )
}

fn same_gen_source(ma: &ReplicaMeta, mb: &ReplicaMeta) -> (Side, &'static str) {
    match (ma.unclean_primary, mb.unclean_primary) {
        (true, false) => return (Side::A, "it was the unclean primary"),
        (false, true) => return (Side::B, "it was the unclean primary"),
        _ => {}
    }
    match ma.last_committed_epoch.cmp(&mb.last_committed_epoch) {
        std::cmp::Ordering::Less => (Side::B, "it committed later epochs"),
        std::cmp::Ordering::Greater => (Side::A, "it committed later epochs"),
        std::cmp::Ordering::Equal => (Side::A, "no side is newer; A by convention"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::meta::{DEFAULT_BLOCK_SIZE, HISTORY_LEN};

    fn m(cur: u64) -> ReplicaMeta {
        ReplicaMeta {
            disk_size: 1 << 30,
            block_size: DEFAULT_BLOCK_SIZE,
            current_gen: cur,
            bitmap_base_gen: 0,
            history: Vec::new(),
            unclean_primary: false,
            inconsistent: false,
            sync_source_gen: 0,
            failed: false,
            last_committed_epoch: None,
            resync: None,
            verify: None,
            image: crate::meta::ImageId::Legacy { dev: 1, ino: 2 },
            quorum_generation: 0,
        }
    }

    fn ok(meta: ReplicaMeta) -> MetaState {
        MetaState::Ok(meta)
    }

    /// Decides for (a, bits a), (b, bits b) and checks the mirror image gives the
    /// mirrored decision.
    fn both_ways(a: &MetaState, da: u64, b: &MetaState, db: u64, running: Option<Side>) -> Verdict {
        let va = ReplicaView {
            meta: a,
            dirty_blocks: da,
        };
        let vb = ReplicaView {
            meta: b,
            dirty_blocks: db,
        };
        let v = decide(&va, &vb, running);
        let mirrored = decide(&vb, &va, running.map(Side::other));
        let flip = |d: Decision| match d {
            Decision::Delta { from, to } => Decision::Delta {
                from: from.other(),
                to: to.other(),
            },
            Decision::Full { from, to } => Decision::Full {
                from: from.other(),
                to: to.other(),
            },
            d => d,
        };
        // Rule d's "A by convention" tie is the one deliberate asymmetry.
        if !v.reason.contains("by convention") {
            assert_eq!(mirrored.decision, flip(v.decision), "{v:?} vs {mirrored:?}");
        }
        v
    }

    fn delta(from: Side) -> Decision {
        Decision::Delta {
            from,
            to: from.other(),
        }
    }

    fn full(from: Side) -> Decision {
        Decision::Full {
            from,
            to: from.other(),
        }
    }

    fn unusable() -> Vec<MetaState> {
        let mut failed = m(7);
        failed.failed = true;
        vec![
            MetaState::Missing,
            MetaState::Damaged("bad crc".into()),
            MetaState::Replaced {
                reason: "inode".into(),
            },
            ok(failed),
        ]
    }

    fn inconsistent(source: u64) -> ReplicaMeta {
        let mut t = m(99);
        t.inconsistent = true;
        t.sync_source_gen = source;
        t
    }

    #[test]
    fn rule_a_no_consistent_side_refuses() {
        let inc = ok(inconsistent(5));
        for x in unusable() {
            for y in unusable().into_iter().chain([inc.clone()]) {
                let v = both_ways(&x, 0, &y, 0, None);
                assert_eq!(v.decision, Decision::Refuse, "{x:?} / {y:?}");
                assert!(v.reason.contains("no consistent replica"), "{}", v.reason);
            }
        }
        let v = both_ways(&inc, 3, &inc, 3, Some(Side::A));
        assert_eq!(v.decision, Decision::Refuse);
    }

    #[test]
    fn rule_b_unusable_side_gets_a_full_copy() {
        let good = ok(m(5));
        for x in unusable() {
            let v = both_ways(&good, 10, &x, 0, None);
            assert_eq!(v.decision, full(Side::A), "{x:?}");
            let v = both_ways(&x, 0, &good, 10, Some(Side::B));
            assert_eq!(v.decision, full(Side::B), "{x:?}");
        }
        assert!(both_ways(&good, 0, &MetaState::Missing, 0, None)
            .reason
            .contains("B has no metadata"));
    }

    #[test]
    fn rule_b_running_on_the_unusable_side() {
        let good = ok(m(5));
        // Missing/damaged/replaced metadata under the running VM: copying onto it
        // would destroy what the VM runs on.
        for x in unusable().into_iter().take(3) {
            let v = both_ways(&good, 0, &x, 0, Some(Side::B));
            assert_eq!(v.decision, Decision::Refuse, "{x:?}");
            assert!(v.reason.contains("the VM runs on B"), "{}", v.reason);
        }
        // A failed disk under the running VM: its I/O is served by A already.
        let mut failed = m(5);
        failed.failed = true;
        let v = both_ways(&good, 0, &ok(failed), 0, Some(Side::B));
        assert_eq!(v.decision, full(Side::A));
        assert!(v.reason.contains("disk failed"), "{}", v.reason);
    }

    #[test]
    fn rule_c_interrupted_target_resumes_or_restarts() {
        let src = ok(m(5));
        let v = both_ways(&src, 40, &ok(inconsistent(5)), 12, None);
        assert_eq!(v.decision, delta(Side::A));
        assert!(v.reason.contains("resume"), "{}", v.reason);
        // The source moved on to another generation since: the target's progress
        // means nothing any more.
        let v = both_ways(&ok(inconsistent(4)), 12, &src, 40, Some(Side::B));
        assert_eq!(v.decision, full(Side::B));
        // The VM never runs on an inconsistent replica.
        let v = both_ways(&src, 40, &ok(inconsistent(5)), 12, Some(Side::B));
        assert_eq!(v.decision, Decision::Refuse);
    }

    #[test]
    fn rule_c_demoted_target_takes_a_delta_only_from_a_shared_generation() {
        // The winner ran alone since generation 5 (its takeover).
        let winner = ok(ReplicaMeta {
            bitmap_base_gen: 5,
            ..m(9)
        });
        // The loser lost its standby alive: it ran alone since 5 too, then was demoted.
        let mut lost_alone = ReplicaMeta {
            bitmap_base_gen: 5,
            ..m(7)
        };
        lost_alone.mark_demoted(3);
        let v = both_ways(&winner, 30, &ok(lost_alone.clone()), 4, Some(Side::A));
        assert_eq!(v.decision, delta(Side::A), "{}", v.reason);
        assert!(v.reason.contains("demoted"), "{}", v.reason);
        // Demoted while still protected (its activity log marks the unacknowledged
        // writes; its data generation is the shared one).
        let mut lost_protected = m(5);
        lost_protected.mark_demoted(3);
        let v = both_ways(&winner, 30, &ok(lost_protected), 4, None);
        assert_eq!(v.decision, delta(Side::A), "{}", v.reason);
        // No shared generation (the loser's bitmap starts elsewhere): full copy.
        let mut unrelated = ReplicaMeta {
            bitmap_base_gen: 4,
            ..m(7)
        };
        unrelated.mark_demoted(3);
        let v = both_ways(&winner, 30, &ok(unrelated), 4, None);
        assert_eq!(v.decision, full(Side::A), "{}", v.reason);
        // A winner with no bitmap base (back in sync with someone since): full copy.
        let v = both_ways(&ok(m(9)), 0, &ok(lost_alone.clone()), 4, None);
        assert_eq!(v.decision, full(Side::A), "{}", v.reason);
        // An ordinary interrupted target (no quorum generation) is not a demoted one.
        let mut plain = ReplicaMeta {
            bitmap_base_gen: 5,
            ..m(7)
        };
        plain.inconsistent = true;
        plain.sync_source_gen = SOURCE_UNKNOWN;
        let v = both_ways(&winner, 30, &ok(plain), 4, None);
        assert_eq!(v.decision, full(Side::A), "{}", v.reason);
        // Never to the running side.
        let v = both_ways(&winner, 30, &ok(lost_alone), 4, Some(Side::B));
        assert_eq!(v.decision, Decision::Refuse);
    }

    #[test]
    fn rule_d_same_generation() {
        let (a, b) = (ok(m(5)), ok(m(5)));
        let v = both_ways(&a, 0, &b, 0, None);
        assert_eq!(v.decision, Decision::InSync);
        assert_eq!(
            both_ways(&a, 0, &b, 0, Some(Side::B)).decision,
            Decision::InSync
        );
        // Dirty bits: the running side is the source.
        assert_eq!(
            both_ways(&a, 3, &b, 0, Some(Side::B)).decision,
            delta(Side::B)
        );
        assert_eq!(
            both_ways(&a, 0, &b, 3, Some(Side::A)).decision,
            delta(Side::A)
        );
        // Nothing runs: the unclean primary is the source.
        let mut up = m(5);
        up.unclean_primary = true;
        let v = both_ways(&a, 0, &ok(up.clone()), 8, None);
        assert_eq!(v.decision, delta(Side::B));
        assert!(v.reason.contains("unclean primary"), "{}", v.reason);
        // Neither or both unclean: the later committed epoch.
        let (mut e1, mut e2) = (up.clone(), up);
        e1.last_committed_epoch = Some(10);
        e2.last_committed_epoch = Some(11);
        assert_eq!(
            both_ways(&ok(e1), 1, &ok(e2), 1, None).decision,
            delta(Side::B)
        );
        // No preference at all: A by convention.
        let v = both_ways(&a, 1, &b, 1, None);
        assert_eq!(v.decision, delta(Side::A));
        assert_eq!(
            decide(
                &ReplicaView {
                    meta: &b,
                    dirty_blocks: 1
                },
                &ReplicaView {
                    meta: &a,
                    dirty_blocks: 1
                },
                None
            )
            .decision,
            delta(Side::A)
        );
    }

    /// B was primary, A standby; B crashed, A failed over and ran alone.
    fn failover_pair() -> (ReplicaMeta, ReplicaMeta) {
        let mut a = m(5);
        a.advance_generation(6);
        let mut b = m(5);
        b.unclean_primary = true;
        (a, b)
    }

    #[test]
    fn rule_e_survivor_deltas_to_the_returning_side() {
        let (a, b) = failover_pair();
        assert_eq!(a.bitmap_base_gen, 5);
        // B's own bits are its last uncommitted epochs; A runs.
        let v = both_ways(&ok(a.clone()), 100, &ok(b.clone()), 4, Some(Side::A));
        assert_eq!(v.decision, delta(Side::A));
        assert!(v.reason.contains("A ran without B"), "{}", v.reason);
        let v = both_ways(&ok(b.clone()), 4, &ok(a.clone()), 100, None);
        assert_eq!(v.decision, delta(Side::B));
        // Several restarts alone keep the base.
        let mut a2 = a.clone();
        a2.advance_generation(7);
        a2.advance_generation(8);
        assert_eq!(
            both_ways(&ok(a2), 100, &ok(b.clone()), 4, None).decision,
            delta(Side::A)
        );
        // The VM was started on the stale side meanwhile: refuse, name the source.
        let v = both_ways(&ok(a), 100, &ok(b), 4, Some(Side::B));
        assert_eq!(v.decision, Decision::Refuse);
        assert!(
            v.reason
                .contains("the VM runs on B, but A must be the source"),
            "{}",
            v.reason
        );
    }

    #[test]
    fn rule_e_cycle_is_split_brain() {
        let (mut a, mut b) = (m(5), m(6));
        a.bitmap_base_gen = 6;
        b.bitmap_base_gen = 5;
        let v = both_ways(&ok(a), 1, &ok(b), 1, None);
        assert_eq!(v.decision, Decision::Refuse);
        assert!(v.reason.contains("split brain"), "{}", v.reason);
    }

    #[test]
    fn rule_f_both_ran_alone_is_split_brain() {
        let (mut a, mut b) = (m(5), m(5));
        a.advance_generation(6);
        b.advance_generation(7);
        for running in [None, Some(Side::A), Some(Side::B)] {
            let v = both_ways(&ok(a.clone()), 10, &ok(b.clone()), 10, running);
            assert_eq!(v.decision, Decision::Refuse);
            assert!(v.reason.contains("split brain"), "{}", v.reason);
        }
    }

    #[test]
    fn rule_g_older_generation_gets_a_full_copy() {
        // A moved on twice; its bitmap was reset (by a resync with some third state),
        // so only the history relates B to A.
        let mut a = m(5);
        a.advance_generation(6);
        a.advance_generation(7);
        a.bitmap_base_gen = 0;
        let b = m(5);
        let v = both_ways(&ok(a.clone()), 0, &ok(b.clone()), 0, None);
        assert_eq!(v.decision, full(Side::A));
        assert!(v.reason.contains("older generation"), "{}", v.reason);
        assert_eq!(
            both_ways(&ok(b.clone()), 0, &ok(a.clone()), 0, Some(Side::B)).decision,
            full(Side::B)
        );
        assert_eq!(
            both_ways(&ok(a.clone()), 0, &ok(b.clone()), 0, Some(Side::B)).decision,
            Decision::Refuse
        );
        // Fallen out of the bounded history: unrelated.
        for g in 8..8 + HISTORY_LEN as u64 {
            a.advance_generation(g);
        }
        a.bitmap_base_gen = 0;
        let v = both_ways(&ok(a), 0, &ok(b), 0, None);
        assert_eq!(v.decision, Decision::Refuse);
        assert!(v.reason.contains("unrelated"), "{}", v.reason);
    }

    #[test]
    fn rule_g_mutual_history_refuses() {
        let (mut a, mut b) = (m(5), m(6));
        a.history = vec![6];
        b.history = vec![5];
        assert_eq!(
            both_ways(&ok(a), 0, &ok(b), 0, None).decision,
            Decision::Refuse
        );
    }

    #[test]
    fn rule_h_geometry_and_unrelated_disks_refuse() {
        let (a, mut b) = failover_pair();
        b.disk_size *= 2;
        let v = both_ways(&ok(a.clone()), 1, &ok(b.clone()), 1, None);
        assert_eq!(v.decision, Decision::Refuse);
        assert!(v.reason.contains("geometry"), "{}", v.reason);
        let mut c = a.clone();
        c.block_size = 512;
        assert_eq!(
            both_ways(&ok(a), 0, &ok(c), 0, None).decision,
            Decision::Refuse
        );
        let v = both_ways(&ok(m(5)), 0, &ok(m(6)), 0, None);
        assert_eq!(v.decision, Decision::Refuse);
        assert!(v.reason.contains("unrelated disks"), "{}", v.reason);
    }
}
