//! Where one VM's quorum state lives in etcd, and what its values say.
//!
//! Under `<prefix>/<cluster>/<vm>/` (prefix, cluster and VM names checked, so a key
//! never escapes its directory):
//!
//! | key | lease | value | written by |
//! | --- | --- | --- | --- |
//! | `generation` | none (durable) | `{"generation":g,"holder":n}` | the transaction that grants (or adopts) `g` |
//! | `owner` | the holder's | `{"generation":g,"holder":n}` | the same transaction; gone when the lease lapses |
//! | `outdated` | none (durable) | `{"generation":g,"holder":n,"peer_outdated":b}` | every grant, and the holder while its owner key stands |
//!
//! Every transaction compares the `mod_revision` of all three keys with what its
//! author read (0: absent), so it commits only over exactly the state it decided on.
//! `generation` is written only when the generation (or its holder) changes, so its
//! `mod_revision` is the revision of the grant: generations and these revisions grow
//! together (the revision maps monotonically onto the generation). The values are JSON
//! so an operator can read them with `etcdctl get --prefix`.

use serde::{Deserialize, Serialize};

use crate::types::{check_name, Generation, NodeId};

/// Longest key prefix accepted.
pub const MAX_PREFIX_LEN: usize = 200;
/// Largest value this backend reads (its own are under 100 bytes).
pub const MAX_VALUE_LEN: usize = 1024;

/// Checks a key prefix: `/` then segments of `[A-Za-z0-9._-]` separated by single
/// slashes, no trailing slash, at most [`MAX_PREFIX_LEN`] bytes.
pub fn check_prefix(p: &str) -> Result<(), String> {
    if !p.starts_with('/') || p.len() < 2 || p.len() > MAX_PREFIX_LEN {
        return Err(format!(
            "etcd key prefix {p:?} must start with '/' and be 2 to {MAX_PREFIX_LEN} bytes"
        ));
    }
    for seg in p[1..].split('/') {
        if seg.is_empty() {
            return Err(format!(
                "etcd key prefix {p:?} has an empty segment (\"//\" or a trailing '/')"
            ));
        }
        if seg == "." || seg == ".." {
            return Err(format!("etcd key prefix {p:?} has a {seg:?} segment"));
        }
        if let Some(c) = seg
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
        {
            return Err(format!(
                "etcd key prefix {p:?} has the character {c:?} (allowed: A-Z a-z 0-9 . _ - /)"
            ));
        }
    }
    Ok(())
}

/// One of a VM's three keys.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Key {
    Generation,
    Owner,
    Outdated,
}

impl Key {
    pub const ALL: [Key; 3] = [Key::Generation, Key::Owner, Key::Outdated];

    fn name(self) -> &'static str {
        match self {
            Key::Generation => "generation",
            Key::Owner => "owner",
            Key::Outdated => "outdated",
        }
    }
}

/// The keys of one VM of one cluster.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmKeys {
    /// `<prefix>/<cluster>/<vm>/`: every key of the VM starts with it.
    pub dir: String,
}

impl VmKeys {
    /// The keys of `vm` of `cluster` under `prefix` (all three checked).
    pub fn new(prefix: &str, cluster: &str, vm: &str) -> Result<VmKeys, String> {
        check_prefix(prefix)?;
        check_name("cluster id", cluster)?;
        check_name("VM name", vm)?;
        Ok(VmKeys {
            dir: format!("{prefix}/{cluster}/{vm}/"),
        })
    }

    pub fn key(&self, k: Key) -> Vec<u8> {
        format!("{}{}", self.dir, k.name()).into_bytes()
    }

    /// Which of the three keys `bytes` is (None: another key under the directory).
    pub fn which(&self, bytes: &[u8]) -> Option<Key> {
        Key::ALL.into_iter().find(|k| self.key(*k) == bytes)
    }

    /// The end of the range that holds exactly the keys under `dir`.
    pub fn range_end(&self) -> Vec<u8> {
        // The directory ends with '/'; '0' is the next byte.
        let mut e = self.dir.clone().into_bytes();
        if let Some(last) = e.last_mut() {
            *last += 1;
        }
        e
    }
}

/// The value of `generation` and `owner`: a generation and who holds it (None: a
/// generation adopted from a node's request whose holder is unknown).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Holder {
    pub generation: Generation,
    pub holder: Option<u64>,
}

/// The value of `outdated`: at `generation`, held by `holder`, whether the holder's
/// peer has a stale replica (the holder released output without it).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Outdated {
    pub generation: Generation,
    pub holder: Option<u64>,
    pub peer_outdated: bool,
}

impl Holder {
    pub fn holder(&self) -> Option<NodeId> {
        self.holder.map(NodeId)
    }
}

/// Encodes a value (JSON).
pub fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    // Serializing these plain structs cannot fail.
    serde_json::to_vec(v).unwrap_or_default()
}

/// Decodes a value, with a clear error naming the key.
pub fn decode<T: for<'de> Deserialize<'de>>(key: &[u8], v: &[u8]) -> Result<T, String> {
    if v.len() > MAX_VALUE_LEN {
        return Err(format!(
            "{}: value of {} bytes (at most {MAX_VALUE_LEN})",
            String::from_utf8_lossy(key),
            v.len()
        ));
    }
    serde_json::from_slice(v).map_err(|e| {
        format!(
            "{}: unreadable value {:?}: {e}",
            String::from_utf8_lossy(key),
            String::from_utf8_lossy(v)
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes() {
        assert!(check_prefix("/twinrun").is_ok());
        assert!(check_prefix("/a/b-c/d.e_f").is_ok());
        for bad in ["", "/", "twinrun", "/a/", "/a//b", "/a/../b", "/a b", "/ä"] {
            assert!(check_prefix(bad).is_err(), "{bad:?}");
        }
        assert!(check_prefix(&format!("/{}", "x".repeat(MAX_PREFIX_LEN))).is_err());
    }

    #[test]
    fn layout() {
        let k = VmKeys::new("/twinrun/quorum", "plant-a", "vm0").unwrap();
        assert_eq!(k.key(Key::Owner), b"/twinrun/quorum/plant-a/vm0/owner");
        assert_eq!(k.range_end(), b"/twinrun/quorum/plant-a/vm00");
        assert_eq!(
            k.which(b"/twinrun/quorum/plant-a/vm0/outdated"),
            Some(Key::Outdated)
        );
        assert_eq!(k.which(b"/twinrun/quorum/plant-a/vm0/other"), None);
        // "vm0/" cannot be a prefix of another VM's directory ("vm01/").
        assert!(!"/twinrun/quorum/plant-a/vm01/owner".starts_with(&k.dir));
        assert!(VmKeys::new("/t", "c", "../x").is_err());
        assert!(VmKeys::new("/t", "c/d", "x").is_err());
    }

    #[test]
    fn values() {
        let h = Holder {
            generation: 3,
            holder: Some(1),
        };
        let b = encode(&h);
        assert_eq!(b, br#"{"generation":3,"holder":1}"#);
        assert_eq!(decode::<Holder>(b"k", &b), Ok(h));
        assert!(decode::<Holder>(b"k", b"garbage").is_err());
        assert!(decode::<Holder>(b"k", br#"{"generation":3,"holder":1,"x":2}"#).is_err());
        assert!(decode::<Outdated>(b"k", &vec![b' '; 2000]).is_err());
    }
}
