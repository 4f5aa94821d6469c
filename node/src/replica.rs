//! Replication rules of the cluster record, pure so both nodes (and the tests) apply
//! the same ones.
//!
//! Why last-writer-wins per record on Lamport versions rather than a single writer or a
//! shared log: with two nodes there is no majority, so a single writer (or a log needing
//! a leader) would make the surviving node read-only exactly when the operator needs it
//! (the peer is down). Per-record versions keep both nodes writable; every write carries
//! `clock = max(clock seen) + 1`, so causally later writes always win, and two writes
//! made while the nodes could not talk are ordered by (clock, node name) the same way
//! on both nodes: they converge to the same record whatever order messages arrive in.
//! What a conflict loses is one of two concurrent edits of the same VM, and the loser
//! is logged. One-shot commands are counters inside the record (see `VmRecord`), so a
//! command survives a merge as long as the record that carries it wins, and each node
//! performs each counter step once.

use std::collections::BTreeMap;

use crate::model::Version;

/// True if a record at version `theirs` replaces one at version `ours`.
pub fn wins(theirs: &Version, ours: &Version) -> bool {
    theirs > ours
}

/// Given our digest and the peer's (name -> version), the names whose record we must
/// send: those we have newer or the peer lacks.
pub fn to_send(ours: &[(String, Version)], theirs: &[(String, Version)]) -> Vec<String> {
    let theirs: BTreeMap<&str, &Version> = theirs.iter().map(|(n, v)| (n.as_str(), v)).collect();
    ours.iter()
        .filter(|(n, v)| theirs.get(n.as_str()).is_none_or(|t| wins(v, t)))
        .map(|(n, _)| n.clone())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(c: u64, n: &str) -> Version {
        Version {
            clock: c,
            node: n.into(),
        }
    }

    #[test]
    fn send_what_the_peer_lacks_or_has_older() {
        let ours = vec![
            ("a".into(), v(3, "pm1")),
            ("b".into(), v(1, "pm1")),
            ("c".into(), v(4, "pm1")),
        ];
        let theirs = vec![("a".into(), v(2, "pm2")), ("b".into(), v(5, "pm2"))];
        assert_eq!(
            to_send(&ours, &theirs),
            vec!["a".to_string(), "c".to_string()]
        );
        assert_eq!(to_send(&theirs, &ours), vec!["b".to_string()]);
    }
}
