//! The daemons' channel on the wire: length-prefixed postcard frames; a handshake that
//! checks cluster, version and node name and proves both sides hold the cluster
//! secret (HMAC-SHA256 over both nonces, never the secret itself); then every frame
//! carries an HMAC under a per-connection key over its direction and sequence number,
//! so frames cannot be forged, replayed, reordered or reflected.

use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

type HmacSha256 = Hmac<Sha256>;

/// The newest version of this protocol this code speaks. A change that bumps it keeps
/// the previous version's frames (new [`Msg`] variants go last, sent only to a peer of
/// the new version), so the daemons of a rolling upgrade still pair (see [`accepts`]).
pub const PROTOCOL_CURRENT: u32 = 1;
/// The version this daemon announces: [`PROTOCOL_CURRENT`], or the one before it in a
/// build made with `TWINRUN_PROTO_PREV=1` (the rolling-upgrade tests' "old" node; the
/// frames are the same, only the number differs). `TWINRUND_PROTOCOL` overrides it at
/// run time (tests).
pub const PROTOCOL: u32 = PROTOCOL_CURRENT - twinrun_control::BUILT_AS_PREVIOUS as u32;

/// Whether a daemon speaking `ours` pairs with a peer speaking `theirs`: the same
/// version or one either side (the newer one speaks the older one's protocol; both
/// sides apply the same rule, so both agree). Two versions apart is refused: upgrade
/// one node, one version at a time. The rule of the VMM control socket.
pub const fn accepts(ours: u32, theirs: u32) -> bool {
    twinrun_control::accepts(ours, theirs)
}
pub const MAGIC: [u8; 4] = *b"TWRD";
/// Largest frame (a full sync of 64 VMs' records is far below).
pub const MAX_FRAME: usize = 16 << 20;
const MAC_LEN: usize = 32;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    pub magic: [u8; 4],
    pub protocol: u32,
    pub cluster: String,
    pub node: String,
    pub nonce: [u8; 32],
}

/// The second handshake frame: the proof, or why the connection is refused.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Auth {
    Proof([u8; 32]),
    Refused(String),
}

/// Messages after the handshake. Records, commands and reports travel as JSON (their
/// types use serde features postcard cannot decode).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Msg {
    /// What the sender holds: each record's name and version, and its command ids.
    Digest {
        records: Vec<(String, u64, String)>,
        commands: Vec<String>,
    },
    /// Records (JSON `VmRecord`s), sent in answer to a digest or as they change.
    Records(Vec<String>),
    /// Applied commands (JSON `CommandRecord`s).
    Commands(Vec<String>),
    /// The sender has sent everything the receiver's digest lacked.
    SyncDone,
    /// The sender's VMMs (JSON map vm -> `PeerVmm`).
    Report(String),
    Heartbeat,
}

#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("frame of {0} bytes is over the limit")]
    TooLong(usize),
    #[error("message does not decode: {0}")]
    Decode(#[from] postcard::Error),
    #[error("not a twinrund peer (bad magic)")]
    Magic,
    #[error("refused: {0}")]
    Refused(String),
    #[error("frame authentication failed (wrong key, or a forged or replayed frame)")]
    BadMac,
}

pub async fn write_frame<W: AsyncWriteExt + Unpin>(
    w: &mut W,
    body: &[u8],
) -> Result<(), WireError> {
    if body.len() > MAX_FRAME {
        return Err(WireError::TooLong(body.len()));
    }
    let mut buf = Vec::with_capacity(4 + body.len());
    buf.extend_from_slice(&(body.len() as u32).to_le_bytes());
    buf.extend_from_slice(body);
    w.write_all(&buf).await?;
    Ok(())
}

pub async fn read_frame<R: AsyncReadExt + Unpin>(r: &mut R) -> Result<Vec<u8>, WireError> {
    let mut len = [0u8; 4];
    r.read_exact(&mut len).await?;
    let len = u32::from_le_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(WireError::TooLong(len));
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).await?;
    Ok(body)
}

fn mac(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    // HMAC takes keys of any length; new_from_slice cannot fail for HMAC.
    #[allow(clippy::expect_used)]
    let mut m = <HmacSha256 as Mac>::new_from_slice(key).expect("HMAC accepts any key length");
    for p in parts {
        m.update(&(p.len() as u32).to_le_bytes());
        m.update(p);
    }
    m.finalize().into_bytes().into()
}

/// The proof that `from` (who sent `from_nonce`) holds the secret, bound to both
/// nonces and both names so it cannot be replayed or reflected.
pub fn proof(
    secret: &[u8],
    cluster: &str,
    from: &str,
    to: &str,
    from_nonce: &[u8; 32],
    to_nonce: &[u8; 32],
) -> [u8; 32] {
    mac(
        secret,
        &[
            b"twinrund-auth-v1",
            cluster.as_bytes(),
            from.as_bytes(),
            to.as_bytes(),
            from_nonce,
            to_nonce,
        ],
    )
}

/// The connection's frame key, the same on both ends.
pub fn session_key(secret: &[u8], a: (&str, &[u8; 32]), b: (&str, &[u8; 32])) -> [u8; 32] {
    let (lo, hi) = if a.0 < b.0 { (a, b) } else { (b, a) };
    mac(
        secret,
        &[
            b"twinrund-session-v1",
            lo.0.as_bytes(),
            lo.1,
            hi.0.as_bytes(),
            hi.1,
        ],
    )
}

/// Constant-time comparison of two MACs.
pub fn same_mac(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Seals and opens the frames of one direction of one connection.
pub struct Sealer {
    key: [u8; 32],
    /// Name of the sending node: frames of the other direction do not verify.
    from: String,
    seq: u64,
}

impl Sealer {
    pub fn new(key: [u8; 32], from: &str) -> Sealer {
        Sealer {
            key,
            from: from.into(),
            seq: 0,
        }
    }

    pub fn seal(&mut self, msg: &Msg) -> Result<Vec<u8>, WireError> {
        let mut body = postcard::to_allocvec(msg)?;
        self.seq += 1;
        let tag = mac(
            &self.key,
            &[self.from.as_bytes(), &self.seq.to_le_bytes(), &body],
        );
        body.extend_from_slice(&tag);
        Ok(body)
    }

    pub fn open(&mut self, frame: &[u8]) -> Result<Msg, WireError> {
        if frame.len() < MAC_LEN {
            return Err(WireError::BadMac);
        }
        let (body, tag) = frame.split_at(frame.len() - MAC_LEN);
        let next = self.seq + 1;
        let want = mac(
            &self.key,
            &[self.from.as_bytes(), &next.to_le_bytes(), body],
        );
        let tag: [u8; 32] = tag.try_into().map_err(|_| WireError::BadMac)?;
        if !same_mac(&want, &tag) {
            return Err(WireError::BadMac);
        }
        self.seq = next;
        Ok(postcard::from_bytes(body)?)
    }
}

pub fn nonce() -> [u8; 32] {
    let mut n = [0u8; 32];
    // getrandom fails only without a kernel RNG; a zero nonce would still be safe
    // against forgery (the secret keys the MAC) but not replay, so refuse loudly.
    if let Err(e) = getrandom::fill(&mut n) {
        panic!("the kernel random number generator is unavailable: {e}");
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_verify_in_order_only() {
        let key = [7u8; 32];
        let mut tx = Sealer::new(key, "pm1");
        let mut rx = Sealer::new(key, "pm1");
        let a = tx.seal(&Msg::Heartbeat).unwrap();
        let b = tx.seal(&Msg::SyncDone).unwrap();
        // Out of order, replayed, reflected or tampered frames fail.
        assert!(matches!(
            Sealer::new(key, "pm1").open(&b),
            Err(WireError::BadMac)
        ));
        assert_eq!(rx.open(&a).unwrap(), Msg::Heartbeat);
        assert!(matches!(rx.open(&a), Err(WireError::BadMac)));
        assert!(matches!(
            Sealer::new(key, "pm2").open(&a),
            Err(WireError::BadMac)
        ));
        let mut t = b.clone();
        t[0] ^= 1;
        assert!(matches!(rx.open(&t), Err(WireError::BadMac)));
        assert_eq!(rx.open(&b).unwrap(), Msg::SyncDone);
    }

    #[test]
    fn the_version_window_is_one_either_side_and_the_switch_picks_the_previous() {
        for n in [1u32, 7] {
            assert!(accepts(n, n) && accepts(n, n - 1) && accepts(n - 1, n));
            assert!(accepts(n, n + 1) && !accepts(n, n + 2) && !accepts(n + 2, n));
        }
        assert!(!accepts(3, 1) && !accepts(1, 3));
        let prev = option_env!("TWINRUN_PROTO_PREV") == Some("1");
        let want = PROTOCOL_CURRENT - u32::from(prev);
        assert_eq!(PROTOCOL, want);
    }

    #[test]
    fn proofs_bind_names_and_nonces() {
        let (n1, n2) = ([1u8; 32], [2u8; 32]);
        let p = proof(b"secret-secret-16", "c", "pm1", "pm2", &n1, &n2);
        assert_eq!(p, proof(b"secret-secret-16", "c", "pm1", "pm2", &n1, &n2));
        assert_ne!(p, proof(b"secret-secret-16", "c", "pm2", "pm1", &n2, &n1));
        assert_ne!(p, proof(b"other-secret-16!", "c", "pm1", "pm2", &n1, &n2));
        assert_eq!(
            session_key(b"s", ("pm1", &n1), ("pm2", &n2)),
            session_key(b"s", ("pm2", &n2), ("pm1", &n1))
        );
    }
}
