//! Mutual authentication of a new connection: a pure state machine (messages in, messages
//! out), driven by the TCP layer and by the simulation tests.
//!
//! 1. Both ends send `Hello { version, cluster_id, node_id, nonce }` (nonce: 32 fresh random
//!    bytes per connection).
//! 2. On the peer's hello each end checks version and cluster id, then sends
//!    `Auth { mac }` with `mac = HMAC-SHA256(secret, "auth" || role || transcript)`, where
//!    `transcript = SHA-256(label || hello_dialer || hello_acceptor)`.
//! 3. On the peer's auth each end recomputes the peer's mac and compares in constant time.
//!    Success yields per-direction session keys `HMAC(secret, "key-d2a"/"key-a2d" || transcript)`.
//!
//! Both nonces are in the transcript, so a recorded auth never verifies in a new session,
//! and the role byte stops an auth from being reflected back. The acceptor keeps a bounded
//! cache of nonces it has seen so a replayed hello is named as a replay.
//!
//! **Incarnations.** Each A-Link endpoint instance picks a random 64-bit incarnation when
//! it is created (see [`crate::incarnation`]). Its hello carries, after the postcard-encoded
//! [`HsMsg::Hello`], a [`HelloExt`]: its own incarnation and the peer incarnation its
//! bundle of links is bound to (0: none yet). An older peer decodes the hello with
//! `postcard::from_bytes`, which ignores the trailing bytes, and sends no extension
//! itself: the extension (and the incarnation checks) is used only when both hellos carry
//! one, and only then is it part of the transcript, so an extension stripped on the way
//! makes the auth fail rather than silently turning the checks off.

use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::VecDeque;
use std::time::Duration;

/// The newest protocol version this code speaks. Bump on any incompatible change above
/// the frame layer, keeping the previous version's messages (rolling upgrade: a node
/// accepts a peer one version either side of its own, see [`accepts`]).
/// 2: checkpoint parts lost their own CRC and gained zero-page runs. 3: checkpoint
/// parts and acks carry the quorum generation; the standby's `Fenced` refusal. 4:
/// segmented frames (lent sends, placed receives: the checkpoint layer's sync rounds);
/// the messages above the frames are protocol 3's.
pub const PROTOCOL_CURRENT: u16 = 4;
/// Protocol version carried in the hello: [`PROTOCOL_CURRENT`], or the one before it in
/// a build made with `TWINRUN_PROTO_PREV=1` (the rolling-upgrade tests' "old" node; the
/// frames are the same, only the number announced differs).
pub const PROTOCOL_VERSION: u16 = if proto_prev() {
    PROTOCOL_CURRENT - 1
} else {
    PROTOCOL_CURRENT
};

/// `TWINRUN_PROTO_PREV=1` at build time (cargo rebuilds when it changes).
const fn proto_prev() -> bool {
    match option_env!("TWINRUN_PROTO_PREV") {
        Some(v) => matches!(v.as_bytes(), b"1"),
        None => false,
    }
}

/// Whether a node speaking `ours` pairs with a peer speaking `theirs`: the same version
/// or one either side (the newer side speaks the older one's protocol: the session runs
/// at the lower of the two). Two versions apart is refused, so an upgrade goes one
/// version at a time, one node at a time.
pub const fn accepts(ours: u16, theirs: u16) -> bool {
    ours.abs_diff(theirs) <= 1
}
/// Nonce length.
pub const NONCE_LEN: usize = 32;
/// The first protocol version whose hello carries a [`HelloExt`] (the incarnations). A
/// build announcing an older version (the rolling-upgrade tests' previous node) sends
/// none and ignores the peer's, as a node of that version does.
pub const INCARNATION_SINCE: u16 = 3;
/// The first protocol version whose peers accept segmented frames (`frame::seg`): in a
/// session of an older version `Alink::send_segmented` and `Alink::send_lent` are
/// refused (an older peer would drop the link: "reserved bits set").
pub const SEGMENTED_SINCE: u16 = 4;
const TRANSCRIPT_LABEL: &[u8] = b"twinrun-alink-transcript-v1";

type HmacSha256 = Hmac<Sha256>;

/// Which end opened the TCP connection. The lower node id dials.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Dialer,
    Acceptor,
}

impl Role {
    fn byte(self) -> u8 {
        match self {
            Role::Dialer => b'd',
            Role::Acceptor => b'a',
        }
    }
    fn other(self) -> Role {
        match self {
            Role::Dialer => Role::Acceptor,
            Role::Acceptor => Role::Dialer,
        }
    }
}

/// Handshake messages (postcard-encoded in Hello/Auth frame bodies).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum HsMsg {
    Hello {
        version: u16,
        cluster_id: u64,
        node_id: u64,
        nonce: [u8; NONCE_LEN],
    },
    Auth {
        mac: [u8; 32],
    },
}

/// What a hello carries after the postcard-encoded [`HsMsg::Hello`] (itself postcard).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct HelloExt {
    /// The sender's A-Link instance.
    pub incarnation: u64,
    /// The peer instance the sender's bundle of links is bound to; 0: none yet.
    pub peer_incarnation: u64,
}

/// Why a handshake failed. Each one is logged by the TCP layer with the peer address.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandshakeError {
    #[error("wrong cluster secret: peer node {peer_node} sent an auth that does not verify")]
    WrongSecret { peer_node: u64 },
    #[error("protocol version mismatch: we speak {ours}, peer speaks {theirs} (a node pairs with the same version or one either side: upgrade one node, one version at a time)")]
    VersionMismatch { ours: u16, theirs: u16 },
    #[error("cluster id mismatch: ours {ours:#x}, peer's {theirs:#x}")]
    ClusterMismatch { ours: u64, theirs: u64 },
    #[error("unexpected peer node id {got} (expected {expected})")]
    WrongPeer { expected: u64, got: u64 },
    #[error("replayed handshake: nonce already seen")]
    Replay,
    #[error("malformed handshake: {0}")]
    Malformed(String),
    #[error("handshake timed out")]
    Timeout,
    /// The peer's A-Link instance is not the one this bundle serves (see
    /// [`crate::incarnation`]).
    #[error("{0}")]
    Incarnation(crate::incarnation::Refusal),
}

/// Static parameters of one end.
#[derive(Clone)]
pub struct HandshakeConfig {
    pub version: u16,
    pub cluster_id: u64,
    pub node_id: u64,
    /// The peer we expect (None accepts any node of the cluster; used by tests).
    pub peer_node_id: Option<u64>,
    pub secret: Vec<u8>,
    pub timeout: Duration,
}

impl std::fmt::Debug for HandshakeConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HandshakeConfig")
            .field("version", &self.version)
            .field("cluster_id", &self.cluster_id)
            .field("node_id", &self.node_id)
            .field("peer_node_id", &self.peer_node_id)
            .field("secret", &"<redacted>")
            .finish()
    }
}

/// Result of a successful handshake.
#[derive(Clone, PartialEq, Eq)]
pub struct Session {
    pub peer_node_id: u64,
    /// The protocol version of this session: the lower of the two hellos' (see
    /// [`accepts`]).
    pub version: u16,
    /// Key for frames we send.
    pub send_key: [u8; 32],
    /// Key for frames we receive.
    pub recv_key: [u8; 32],
    /// The peer's incarnation and the one of ours it is bound to (None: no incarnations
    /// in this session, an older peer).
    pub peer_ext: Option<HelloExt>,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("peer_node_id", &self.peer_node_id)
            .finish_non_exhaustive()
    }
}

/// Bounded memory of hello nonces already seen (FIFO eviction).
#[derive(Debug)]
pub struct ReplayCache {
    cap: usize,
    seen: VecDeque<[u8; NONCE_LEN]>,
}

impl ReplayCache {
    pub fn new(cap: usize) -> ReplayCache {
        assert!(cap > 0);
        ReplayCache {
            cap,
            seen: VecDeque::with_capacity(cap),
        }
    }

    /// Returns false if the nonce was seen before; remembers it otherwise.
    pub fn check_and_insert(&mut self, nonce: &[u8; NONCE_LEN]) -> bool {
        if self.seen.iter().any(|n| n == nonce) {
            return false;
        }
        if self.seen.len() == self.cap {
            self.seen.pop_front();
        }
        self.seen.push_back(*nonce);
        true
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    AwaitHello,
    AwaitAuth {
        transcript: [u8; 32],
        peer_node: u64,
        /// The session's version, agreed from the hellos.
        version: u16,
        peer_ext: Option<HelloExt>,
    },
    Done,
    Failed,
}

/// What to do after feeding a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HsStep {
    /// Send this message; keep going.
    Send(HsMsg),
    /// Authenticated.
    Done(Session),
}

/// The handshake state machine of one end.
#[derive(Debug)]
pub struct Handshake {
    cfg: HandshakeConfig,
    role: Role,
    hello: HsMsg,
    /// Our hello's extension (None: a legacy hello, see [`Handshake::with_incarnation`]).
    ext: Option<HelloExt>,
    nonce: [u8; NONCE_LEN],
    deadline: Duration,
    state: State,
}

fn hmac(secret: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    #[allow(clippy::expect_used)] // HMAC takes keys of any length: this cannot fail.
    let mut m = HmacSha256::new_from_slice(secret).expect("HMAC takes any key length");
    for p in parts {
        m.update(p);
    }
    m.finalize().into_bytes().into()
}

impl Handshake {
    /// Starts a handshake at time `now`; the returned hello must be sent first.
    pub fn new(
        cfg: HandshakeConfig,
        role: Role,
        nonce: [u8; NONCE_LEN],
        now: Duration,
    ) -> (Handshake, HsMsg) {
        let hello = HsMsg::Hello {
            version: cfg.version,
            cluster_id: cfg.cluster_id,
            node_id: cfg.node_id,
            nonce,
        };
        let deadline = now + cfg.timeout;
        (
            Handshake {
                cfg,
                role,
                hello: hello.clone(),
                ext: None,
                nonce,
                deadline,
                state: State::AwaitHello,
            },
            hello,
        )
    }

    /// Makes our hello carry our incarnation and the peer's we are bound to (None: not
    /// bound yet), when our version has them ([`INCARNATION_SINCE`]). Without this call
    /// the handshake is a legacy one: no extension sent, the peer's ignored.
    pub fn with_incarnation(mut self, own: u64, bound_peer: Option<u64>) -> Handshake {
        if self.cfg.version >= INCARNATION_SINCE {
            self.ext = Some(HelloExt {
                incarnation: own,
                peer_incarnation: bound_peer.unwrap_or(0),
            });
        }
        self
    }

    /// The body of our hello frame: the postcard-encoded hello, then its extension if any.
    pub fn hello_body(&self) -> Result<Vec<u8>, HandshakeError> {
        hello_bytes(&self.hello, self.ext.as_ref())
    }

    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// Fails with Timeout once `now` passes the deadline before completion.
    pub fn on_tick(&mut self, now: Duration) -> Result<(), HandshakeError> {
        if matches!(self.state, State::AwaitHello | State::AwaitAuth { .. }) && now >= self.deadline
        {
            self.state = State::Failed;
            return Err(HandshakeError::Timeout);
        }
        Ok(())
    }

    /// Decodes a frame body and feeds it.
    pub fn on_body(
        &mut self,
        body: &[u8],
        replay: Option<&mut ReplayCache>,
    ) -> Result<HsStep, HandshakeError> {
        let (msg, rest): (HsMsg, &[u8]) = match postcard::take_from_bytes(body) {
            Ok(m) => m,
            Err(e) => {
                self.state = State::Failed;
                return Err(HandshakeError::Malformed(format!(
                    "undecodable message: {e}"
                )));
            }
        };
        // A hello's extension; ignored (as an older node does) unless ours has one too.
        let ext = if matches!(msg, HsMsg::Hello { .. }) && self.ext.is_some() && !rest.is_empty() {
            match postcard::from_bytes::<HelloExt>(rest) {
                Ok(x) => Some(x),
                Err(e) => {
                    self.state = State::Failed;
                    return Err(HandshakeError::Malformed(format!(
                        "undecodable hello extension: {e}"
                    )));
                }
            }
        } else {
            None
        };
        let r = self.step(msg, ext, replay);
        if r.is_err() {
            self.state = State::Failed;
        }
        r
    }

    /// Feeds one message from the peer.
    pub fn on_message(
        &mut self,
        msg: HsMsg,
        replay: Option<&mut ReplayCache>,
    ) -> Result<HsStep, HandshakeError> {
        let r = self.step(msg, None, replay);
        if r.is_err() {
            self.state = State::Failed;
        }
        r
    }

    fn step(
        &mut self,
        msg: HsMsg,
        peer_ext: Option<HelloExt>,
        replay: Option<&mut ReplayCache>,
    ) -> Result<HsStep, HandshakeError> {
        match (&self.state, msg) {
            (
                State::AwaitHello,
                HsMsg::Hello {
                    version,
                    cluster_id,
                    node_id,
                    nonce,
                },
            ) => {
                if !accepts(self.cfg.version, version) {
                    return Err(HandshakeError::VersionMismatch {
                        ours: self.cfg.version,
                        theirs: version,
                    });
                }
                if cluster_id != self.cfg.cluster_id {
                    return Err(HandshakeError::ClusterMismatch {
                        ours: self.cfg.cluster_id,
                        theirs: cluster_id,
                    });
                }
                if let Some(expected) = self.cfg.peer_node_id {
                    if node_id != expected {
                        return Err(HandshakeError::WrongPeer {
                            expected,
                            got: node_id,
                        });
                    }
                }
                if node_id == self.cfg.node_id {
                    return Err(HandshakeError::Malformed(
                        "peer claims our own node id".into(),
                    ));
                }
                // Our own nonce coming back is a reflection.
                if nonce == self.nonce {
                    return Err(HandshakeError::Replay);
                }
                if let Some(cache) = replay {
                    if !cache.check_and_insert(&nonce) {
                        return Err(HandshakeError::Replay);
                    }
                }
                let peer_hello = HsMsg::Hello {
                    version,
                    cluster_id,
                    node_id,
                    nonce,
                };
                // The extensions count only when both hellos carry one (an older peer
                // rebuilds our hello without ours); then both are in the transcript.
                let (our_ext, peer_ext) = match (self.ext, peer_ext) {
                    (Some(o), Some(p)) => (Some(o), Some(p)),
                    _ => (None, None),
                };
                let ours = hello_bytes(&self.hello, our_ext.as_ref())?;
                let theirs = hello_bytes(&peer_hello, peer_ext.as_ref())?;
                let (d, a) = match self.role {
                    Role::Dialer => (&ours, &theirs),
                    Role::Acceptor => (&theirs, &ours),
                };
                let mut h = Sha256::new();
                h.update(TRANSCRIPT_LABEL);
                h.update((d.len() as u32).to_le_bytes());
                h.update(d);
                h.update(a);
                let transcript: [u8; 32] = h.finalize().into();
                let mac = hmac(
                    &self.cfg.secret,
                    &[b"auth", &[self.role.byte()], &transcript],
                );
                self.state = State::AwaitAuth {
                    transcript,
                    peer_node: node_id,
                    version: version.min(self.cfg.version),
                    peer_ext,
                };
                Ok(HsStep::Send(HsMsg::Auth { mac }))
            }
            (
                State::AwaitAuth {
                    transcript,
                    peer_node,
                    version,
                    peer_ext,
                },
                HsMsg::Auth { mac },
            ) => {
                let transcript = *transcript;
                let peer_node = *peer_node;
                let version = *version;
                let peer_ext = *peer_ext;
                #[allow(clippy::expect_used)] // HMAC takes keys of any length.
                let mut m = HmacSha256::new_from_slice(&self.cfg.secret)
                    .expect("HMAC takes any key length");
                m.update(b"auth");
                m.update(&[self.role.other().byte()]);
                m.update(&transcript);
                // verify_slice compares in constant time.
                if m.verify_slice(&mac).is_err() {
                    return Err(HandshakeError::WrongSecret { peer_node });
                }
                let d2a = hmac(&self.cfg.secret, &[b"key-d2a", &transcript]);
                let a2d = hmac(&self.cfg.secret, &[b"key-a2d", &transcript]);
                let (send_key, recv_key) = match self.role {
                    Role::Dialer => (d2a, a2d),
                    Role::Acceptor => (a2d, d2a),
                };
                self.state = State::Done;
                Ok(HsStep::Done(Session {
                    peer_node_id: peer_node,
                    version,
                    send_key,
                    recv_key,
                    peer_ext,
                }))
            }
            (State::Done, _) | (State::Failed, _) => Err(HandshakeError::Malformed(
                "message after the handshake ended".into(),
            )),
            (State::AwaitHello, HsMsg::Auth { .. }) => {
                Err(HandshakeError::Malformed("auth before hello".into()))
            }
            (State::AwaitAuth { .. }, HsMsg::Hello { .. }) => {
                Err(HandshakeError::Malformed("second hello".into()))
            }
        }
    }
}

/// A hello as it goes on the wire (and into the transcript): the postcard-encoded
/// message, then the extension if any.
fn hello_bytes(hello: &HsMsg, ext: Option<&HelloExt>) -> Result<Vec<u8>, HandshakeError> {
    let mut b = postcard::to_stdvec(hello).map_err(|e| HandshakeError::Malformed(e.to_string()))?;
    if let Some(x) = ext {
        let x = postcard::to_stdvec(x).map_err(|e| HandshakeError::Malformed(e.to_string()))?;
        b.extend_from_slice(&x);
    }
    Ok(b)
}

/// Fresh random nonce from the kernel.
pub fn random_nonce() -> std::io::Result<[u8; NONCE_LEN]> {
    let mut n = [0u8; NONCE_LEN];
    let mut filled = 0;
    while filled < NONCE_LEN {
        // SAFETY: the pointer and length describe the unfilled tail of `n`, which lives for
        // the whole call; getrandom writes at most that many bytes.
        let r = unsafe { libc::getrandom(n[filled..].as_mut_ptr().cast(), NONCE_LEN - filled, 0) };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        filled += r as usize;
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn cfg(node: u64, secret: &[u8]) -> HandshakeConfig {
        HandshakeConfig {
            version: PROTOCOL_VERSION,
            cluster_id: 0xC1,
            node_id: node,
            peer_node_id: None,
            secret: secret.to_vec(),
            timeout: Duration::from_secs(2),
        }
    }

    /// Runs both machines to completion over a perfect channel.
    fn run(
        a: HandshakeConfig,
        b: HandshakeConfig,
    ) -> (
        Result<Session, HandshakeError>,
        Result<Session, HandshakeError>,
    ) {
        let t = Duration::ZERO;
        let (mut d, hd) = Handshake::new(a, Role::Dialer, [1; 32], t);
        let (mut c, hc) = Handshake::new(b, Role::Acceptor, [2; 32], t);
        let mut cache = ReplayCache::new(8);
        // Acceptor's auth, in answer to the dialer's hello.
        let auth_c = match c.on_message(hd, Some(&mut cache)) {
            Ok(HsStep::Send(m)) => m,
            Ok(_) => unreachable!(),
            Err(e) => return (Err(HandshakeError::Timeout), Err(e)),
        };
        let auth_d = match d.on_message(hc, None) {
            Ok(HsStep::Send(m)) => m,
            Ok(_) => unreachable!(),
            Err(e) => return (Err(e), Err(HandshakeError::Timeout)),
        };
        let rd = d.on_message(auth_c, None).map(|s| match s {
            HsStep::Done(s) => s,
            _ => unreachable!(),
        });
        let rc = c.on_message(auth_d, None).map(|s| match s {
            HsStep::Done(s) => s,
            _ => unreachable!(),
        });
        (rd, rc)
    }

    #[test]
    fn good_handshake_derives_matching_directional_keys() {
        let (d, c) = run(cfg(1, b"s3cret"), cfg(2, b"s3cret"));
        let (d, c) = (d.unwrap(), c.unwrap());
        assert_eq!(d.send_key, c.recv_key);
        assert_eq!(d.recv_key, c.send_key);
        assert_ne!(d.send_key, d.recv_key);
        assert_eq!(d.peer_node_id, 2);
        assert_eq!(c.peer_node_id, 1);
    }

    #[test]
    fn wrong_secret_refused_on_both_ends() {
        let (d, c) = run(cfg(1, b"s3cret"), cfg(2, b"other"));
        assert_eq!(d, Err(HandshakeError::WrongSecret { peer_node: 2 }));
        assert_eq!(c, Err(HandshakeError::WrongSecret { peer_node: 1 }));
    }

    /// Rolling upgrade: a node at N pairs with one at N-1 (either end dialing), and the
    /// session runs at N-1; N and N-2 are refused by both ends, naming both versions.
    #[test]
    fn previous_version_pairs_and_two_apart_is_refused() {
        let n = PROTOCOL_CURRENT + 5; // any N: the rule is relative
        let at = |node, v| {
            let mut c = cfg(node, b"s");
            c.version = v;
            c
        };
        for (a, b) in [(n, n - 1), (n - 1, n)] {
            let (d, c) = run(at(1, a), at(2, b));
            assert_eq!(d.unwrap().version, n - 1);
            assert_eq!(c.unwrap().version, n - 1);
        }
        let (d, c) = run(at(1, n), at(2, n));
        assert_eq!((d.unwrap().version, c.unwrap().version), (n, n));
        // Each end sees the other's hello and refuses it on its own.
        let t = Duration::ZERO;
        let (mut d, hd) = Handshake::new(at(1, n), Role::Dialer, [1; 32], t);
        let (mut c, hc) = Handshake::new(at(2, n - 2), Role::Acceptor, [2; 32], t);
        let ed = d.on_message(hc, None).unwrap_err();
        let ec = c.on_message(hd, None).unwrap_err();
        assert_eq!(
            ed,
            HandshakeError::VersionMismatch {
                ours: n,
                theirs: n - 2
            }
        );
        assert_eq!(
            ec,
            HandshakeError::VersionMismatch {
                ours: n - 2,
                theirs: n
            }
        );
        let msg = ed.to_string();
        assert!(
            msg.contains(&format!("we speak {n}, peer speaks {}", n - 2)),
            "{msg}"
        );
        assert!(!accepts(n, n + 2) && accepts(n, n + 1) && accepts(n, n));
    }

    #[test]
    fn this_build_announces_the_current_version_unless_built_as_the_previous() {
        let prev = option_env!("TWINRUN_PROTO_PREV") == Some("1");
        let want = if prev {
            PROTOCOL_CURRENT - 1
        } else {
            PROTOCOL_CURRENT
        };
        assert_eq!(PROTOCOL_VERSION, want);
    }

    #[test]
    fn version_and_cluster_mismatch() {
        let mut b = cfg(2, b"s");
        b.version = 9;
        let (_, c) = run(cfg(1, b"s"), b);
        assert_eq!(
            c,
            Err(HandshakeError::VersionMismatch {
                ours: 9,
                theirs: PROTOCOL_VERSION
            })
        );
        let mut b = cfg(2, b"s");
        b.cluster_id = 7;
        let (_, c) = run(cfg(1, b"s"), b);
        assert_eq!(
            c,
            Err(HandshakeError::ClusterMismatch {
                ours: 7,
                theirs: 0xC1
            })
        );
        let mut b = cfg(2, b"s");
        b.peer_node_id = Some(5);
        let (_, c) = run(cfg(1, b"s"), b);
        assert_eq!(
            c,
            Err(HandshakeError::WrongPeer {
                expected: 5,
                got: 1
            })
        );
    }

    #[test]
    fn replayed_hello_and_recorded_auth_refused() {
        let t = Duration::ZERO;
        let mut cache = ReplayCache::new(4);
        // A legitimate session the attacker records.
        let (mut d, hd) = Handshake::new(cfg(1, b"s"), Role::Dialer, [1; 32], t);
        let (mut c, hc) = Handshake::new(cfg(2, b"s"), Role::Acceptor, [2; 32], t);
        let HsStep::Send(ad) = c.on_message(hd.clone(), Some(&mut cache)).unwrap() else {
            panic!()
        };
        let HsStep::Send(recorded_auth) = d.on_message(hc, None).unwrap() else {
            panic!()
        };
        let _ = ad;
        // Replaying the same hello to the acceptor is named a replay.
        let (mut c2, _) = Handshake::new(cfg(2, b"s"), Role::Acceptor, [3; 32], t);
        assert_eq!(
            c2.on_message(hd.clone(), Some(&mut cache)),
            Err(HandshakeError::Replay)
        );
        // Without the cache (other acceptor), the recorded auth does not verify against a new
        // nonce.
        let (mut c3, _) = Handshake::new(cfg(2, b"s"), Role::Acceptor, [4; 32], t);
        c3.on_message(hd, None).unwrap();
        assert_eq!(
            c3.on_message(recorded_auth, None),
            Err(HandshakeError::WrongSecret { peer_node: 1 })
        );
    }

    #[test]
    fn reflection_and_order_and_timeout() {
        let t = Duration::ZERO;
        let (mut d, hd) = Handshake::new(cfg(1, b"s"), Role::Dialer, [1; 32], t);
        // Our own hello reflected: same node id.
        assert!(matches!(
            d.on_message(hd, None),
            Err(HandshakeError::Malformed(_))
        ));
        let (mut d, _) = Handshake::new(cfg(1, b"s"), Role::Dialer, [1; 32], t);
        assert!(matches!(
            d.on_message(HsMsg::Auth { mac: [0; 32] }, None),
            Err(HandshakeError::Malformed(_))
        ));
        let (mut d, _) = Handshake::new(cfg(1, b"s"), Role::Dialer, [1; 32], t);
        assert!(d.on_tick(Duration::from_secs(1)).is_ok());
        assert_eq!(
            d.on_tick(Duration::from_secs(2)),
            Err(HandshakeError::Timeout)
        );
        let (mut d, _) = Handshake::new(cfg(1, b"s"), Role::Dialer, [1; 32], t);
        assert!(matches!(
            d.on_body(&[0xff, 0xff, 0xff], None),
            Err(HandshakeError::Malformed(_))
        ));
    }

    /// Runs both machines over bodies (as the TCP layer does), each with an optional
    /// incarnation (own, bound peer); None: a legacy end.
    fn run_bodies(
        a: HandshakeConfig,
        a_inc: Option<(u64, Option<u64>)>,
        b: HandshakeConfig,
        b_inc: Option<(u64, Option<u64>)>,
    ) -> (
        Result<Session, HandshakeError>,
        Result<Session, HandshakeError>,
    ) {
        let t = Duration::ZERO;
        let with = |h: Handshake, inc: Option<(u64, Option<u64>)>| match inc {
            Some((own, bound)) => h.with_incarnation(own, bound),
            None => h,
        };
        let mut d = with(Handshake::new(a, Role::Dialer, [1; 32], t).0, a_inc);
        let mut c = with(Handshake::new(b, Role::Acceptor, [2; 32], t).0, b_inc);
        let (hd, hc) = (d.hello_body().unwrap(), c.hello_body().unwrap());
        let body = |m: HsMsg| postcard::to_stdvec(&m).unwrap();
        let auth_c = match c.on_body(&hd, None) {
            Ok(HsStep::Send(m)) => m,
            Ok(_) => unreachable!(),
            Err(e) => return (Err(HandshakeError::Timeout), Err(e)),
        };
        let auth_d = match d.on_body(&hc, None) {
            Ok(HsStep::Send(m)) => m,
            Ok(_) => unreachable!(),
            Err(e) => return (Err(e), Err(HandshakeError::Timeout)),
        };
        let done = |r: Result<HsStep, HandshakeError>| {
            r.map(|s| match s {
                HsStep::Done(s) => s,
                _ => unreachable!(),
            })
        };
        (
            done(d.on_body(&body(auth_c), None)),
            done(c.on_body(&body(auth_d), None)),
        )
    }

    #[test]
    fn both_incarnations_reach_the_other_end_authenticated() {
        let (d, c) = run_bodies(
            cfg(1, b"s"),
            Some((0xAA, None)),
            cfg(2, b"s"),
            Some((0xBB, Some(0xA0))),
        );
        let (d, c) = (d.unwrap(), c.unwrap());
        assert_eq!(
            d.peer_ext,
            Some(HelloExt {
                incarnation: 0xBB,
                peer_incarnation: 0xA0
            })
        );
        assert_eq!(
            c.peer_ext,
            Some(HelloExt {
                incarnation: 0xAA,
                peer_incarnation: 0
            })
        );
        assert_eq!(d.send_key, c.recv_key);
    }

    /// A peer of the previous build (no extension in its hello, and it decodes ours with
    /// `from_bytes`, ignoring the extension) still pairs, either end dialing; the session
    /// has no incarnations.
    #[test]
    fn a_peer_without_incarnations_still_pairs() {
        for (a, b) in [(Some((0xAA, None)), None), (None, Some((0xBB, None)))] {
            let (d, c) = run_bodies(cfg(1, b"s"), a, cfg(2, b"s"), b);
            let (d, c) = (d.unwrap(), c.unwrap());
            assert_eq!((d.peer_ext, c.peer_ext), (None, None));
            assert_eq!(d.send_key, c.recv_key);
            assert_eq!(d.recv_key, c.send_key);
        }
        // What an older node does with our hello: postcard's from_bytes reads the hello
        // and leaves the extension's bytes unread.
        let (h, _) = Handshake::new(cfg(1, b"s"), Role::Dialer, [1; 32], Duration::ZERO);
        let h = h.with_incarnation(7, Some(9));
        let body = h.hello_body().unwrap();
        let old: HsMsg = postcard::from_bytes(&body).unwrap();
        assert_eq!(old, h.hello);
        assert!(body.len() > postcard::to_stdvec(&old).unwrap().len());
        // A build announcing a version before the incarnations sends none.
        let mut prev = cfg(1, b"s");
        prev.version = INCARNATION_SINCE - 1;
        let (h, hello) = Handshake::new(prev, Role::Dialer, [1; 32], Duration::ZERO);
        let h = h.with_incarnation(7, None);
        assert_eq!(
            h.hello_body().unwrap(),
            postcard::to_stdvec(&hello).unwrap()
        );
    }

    /// An extension stripped on the way does not quietly turn the checks off: the end
    /// that sent one puts both in its transcript, the other none, and the auths differ.
    #[test]
    fn a_stripped_extension_fails_the_auth() {
        let t = Duration::ZERO;
        let mut d = Handshake::new(cfg(1, b"s"), Role::Dialer, [1; 32], t)
            .0
            .with_incarnation(0xAA, None);
        let mut c = Handshake::new(cfg(2, b"s"), Role::Acceptor, [2; 32], t)
            .0
            .with_incarnation(0xBB, None);
        let stripped = postcard::to_stdvec(&d.hello).unwrap();
        let HsStep::Send(auth_c) = c.on_body(&stripped, None).unwrap() else {
            panic!()
        };
        let HsStep::Send(_) = d.on_body(&c.hello_body().unwrap(), None).unwrap() else {
            panic!()
        };
        assert_eq!(
            d.on_message(auth_c, None),
            Err(HandshakeError::WrongSecret { peer_node: 2 })
        );
        // A garbled extension is named.
        let mut c = Handshake::new(cfg(2, b"s"), Role::Acceptor, [3; 32], t)
            .0
            .with_incarnation(0xBB, None);
        let mut bad = stripped.clone();
        bad.push(0xff);
        assert!(matches!(
            c.on_body(&bad, None),
            Err(HandshakeError::Malformed(m)) if m.contains("extension")
        ));
    }

    #[test]
    fn nonces_are_random() {
        assert_ne!(random_nonce().unwrap(), random_nonce().unwrap());
    }
}
