//! Names shared by the node, the witness and the etcd backend.

use serde::{Deserialize, Serialize};

/// A VM's fencing generation: grows by one at every takeover, 0 = never granted.
/// Stamped on the A-Link session, every checkpoint and the storage-mirror metadata;
/// whoever holds the highest one is the only node allowed to act for the VM.
pub type Generation = u64;

/// The generation a takeover by `node` from `from` gets: the next one whose parity is
/// the node id's. The two PMs of a pair have ids of different parity (checked by
/// `NodeConfig::validate`), so two witnesses that each grant "the next generation" to a
/// different node (the nodes' elected witnesses differ after a half-finished switch)
/// never hand out the same number: a generation names its holder, and stays a fencing
/// token. None on overflow.
pub fn next_generation(from: Generation, node: NodeId) -> Option<Generation> {
    let g = from.checked_add(1)?;
    if g % 2 == node.0 % 2 {
        Some(g)
    } else {
        g.checked_add(1)
    }
}

/// Whether `generation` was granted to `node` (the parity rule of [`next_generation`]:
/// only `node` ever asks for a generation of its parity). 0 is nobody's. What the
/// fencing checks need: a generation newer than a peer's stamp fences the peer only if
/// the peer does not hold it (its own fresh grant may reach the other node first).
pub fn held_by(generation: Generation, node: NodeId) -> bool {
    generation != 0 && generation % 2 == node.0 % 2
}

/// One of the two PMs of a pair (the A-Link node id: 1 or 2 today).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct NodeId(pub u64);

impl std::fmt::Display for NodeId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "node {}", self.0)
    }
}

/// Which configured witness: the preferred or the alternate.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Slot {
    Preferred,
    Alternate,
}

impl Slot {
    pub const ALL: [Slot; 2] = [Slot::Preferred, Slot::Alternate];

    pub fn index(self) -> usize {
        match self {
            Slot::Preferred => 0,
            Slot::Alternate => 1,
        }
    }
}

impl std::fmt::Display for Slot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Slot::Preferred => "preferred witness",
            Slot::Alternate => "alternate witness",
        })
    }
}

/// The role a node plays for one VM.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Role {
    /// Runs the VM (checkpoints it to the standby while there is one).
    Primary,
    /// Keeps the replica; may take over only with a grant.
    Standby,
}

/// Longest cluster id or VM name on the wire and in the witness's store.
pub const MAX_NAME_LEN: usize = 64;

/// Checks a cluster id or VM name: 1..=64 bytes of `[A-Za-z0-9._-]`, so it is safe
/// as a file name and in a log line.
pub fn check_name(what: &str, s: &str) -> Result<(), String> {
    if s.is_empty() || s.len() > MAX_NAME_LEN {
        return Err(format!(
            "{what} must be 1 to {MAX_NAME_LEN} bytes (got {})",
            s.len()
        ));
    }
    if let Some(c) = s
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(format!(
            "{what} {s:?} has the character {c:?} (allowed: A-Z a-z 0-9 . _ -)"
        ));
    }
    if s.starts_with('.') {
        return Err(format!("{what} {s:?} must not start with '.'"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generations_name_their_holder() {
        assert_eq!(next_generation(0, NodeId(1)), Some(1));
        assert_eq!(next_generation(0, NodeId(2)), Some(2));
        assert_eq!(next_generation(1, NodeId(1)), Some(3));
        assert_eq!(next_generation(1, NodeId(2)), Some(2));
        assert_eq!(next_generation(u64::MAX - 1, NodeId(2)), None);
        for from in 0..20 {
            for node in [NodeId(1), NodeId(2)] {
                let g = next_generation(from, node).unwrap();
                assert!(held_by(g, node), "{g} is {node}'s");
                let other = NodeId(3 - node.0);
                assert!(!held_by(g, other), "{g} is not {other}'s");
            }
        }
        assert!(
            !held_by(0, NodeId(1)) && !held_by(0, NodeId(2)),
            "0 is nobody's"
        );
    }

    #[test]
    fn names() {
        assert!(check_name("vm", "vm0").is_ok());
        assert!(check_name("vm", "a.b_c-D9").is_ok());
        assert!(check_name("vm", "").is_err());
        assert!(check_name("vm", &"x".repeat(65)).is_err());
        assert!(check_name("vm", "a/b").is_err());
        assert!(check_name("vm", "..").is_err());
        assert!(check_name("vm", "é").is_err());
    }
}
