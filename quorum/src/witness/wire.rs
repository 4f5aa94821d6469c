//! The witness's datagrams and their authentication, pure (bytes in, bytes out, time
//! passed in): the UDP server and client are thin loops around [`ServerWire`] and
//! [`ClientWire`], and the fuzz target drives the decoder and the server directly.
//!
//! Authentication follows the A-Link's handshake, over three datagrams:
//! 1. client: `Hello { version, cluster, node, client_nonce }`;
//! 2. witness: `Challenge { client_nonce, witness_nonce, mac_w }` with
//!    `mac_w = HMAC(secret, "witness" || transcript)`, where
//!    `transcript = SHA-256(label || version || cluster || node || client_nonce || witness_nonce)`;
//!    the client checks it (a witness without the secret cannot grant anything);
//! 3. client: `Auth { witness_nonce, mac_c = HMAC(secret, "client" || transcript) }`;
//!    the witness checks it, consumes the challenge (a replayed Auth finds none) and
//!    answers `Welcome { session, tag }`.
//!
//! Then every `Request { session, seq, op, tag }` carries a strictly increasing `seq`
//! and a tag `HMAC(key_c2w, session || seq || op)[..16]`; the `Response` echoes `seq`
//! with a tag under `key_w2c` (per-direction keys: nothing can be reflected). A request
//! whose `seq` is not above the session's last is a replay (or reordered: refused, so
//! the witness applies each node's requests in the order they were sent). A new session
//! of the same (cluster, node) replaces the old one, so datagrams of an earlier session
//! are refused too. Refusals that cannot be authenticated (unknown cluster, wrong
//! secret, unknown session) are sent as plain `Error` datagrams: a client only uses
//! them as a hint to start a new handshake.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::time::Duration;

use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::core::WitnessCore;
use super::ops::{Reply, Request};
use super::store::Store;
use crate::types::{check_name, NodeId};

/// Version of the datagram format.
pub const WIRE_VERSION: u8 = 1;
/// Largest datagram either side sends or accepts (fits any MTU).
pub const MAX_DATAGRAM: usize = 1024;
pub const NONCE_LEN: usize = 32;
const LABEL: &[u8] = b"twinrun-quorum-witness-v1";
/// Secrets shorter than this are refused (the A-Link's rule).
pub const MIN_SECRET: usize = 16;

type HmacSha256 = Hmac<Sha256>;

/// One datagram.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Packet {
    Hello {
        version: u8,
        cluster: String,
        node: NodeId,
        nonce: [u8; NONCE_LEN],
    },
    Challenge {
        client_nonce: [u8; NONCE_LEN],
        witness_nonce: [u8; NONCE_LEN],
        mac: [u8; 32],
    },
    Auth {
        witness_nonce: [u8; NONCE_LEN],
        mac: [u8; 32],
    },
    Welcome {
        client_nonce: [u8; NONCE_LEN],
        session: u64,
        tag: [u8; 16],
    },
    Request {
        session: u64,
        seq: u64,
        op: Request,
        tag: [u8; 16],
    },
    Response {
        session: u64,
        seq: u64,
        reply: Reply,
        tag: [u8; 16],
    },
    /// An unauthenticated refusal.
    Error {
        /// The client nonce of the refused hello, or zero.
        client_nonce: [u8; NONCE_LEN],
        /// The refused session, or zero.
        session: u64,
        refusal: Refusal,
    },
}

/// Why the witness refused a datagram (sent back in an `Error`, and logged).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum Refusal {
    #[error("unknown cluster {0:?}")]
    UnknownCluster(String),
    #[error("wrong cluster secret")]
    WrongSecret,
    #[error("replayed or expired handshake (challenge unknown)")]
    ReplayedAuth,
    #[error("replayed or reordered request (sequence {seq} not above {last})")]
    ReplayedRequest { seq: u64, last: u64 },
    #[error("unknown session (expired, replaced or witness restarted)")]
    UnknownSession,
    #[error("request tag does not verify")]
    BadTag,
    #[error("wire version {theirs} (this witness speaks {ours})")]
    Version { ours: u8, theirs: u8 },
    #[error("malformed datagram: {0}")]
    Malformed(String),
    #[error("bad name: {0}")]
    BadName(String),
    #[error("this datagram is not meant for a witness")]
    WrongDirection,
}

/// Why bytes are not a datagram.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("datagram of {0} bytes exceeds {MAX_DATAGRAM}")]
    TooLarge(usize),
    #[error("empty datagram")]
    Empty,
    #[error("undecodable datagram: {0}")]
    Undecodable(String),
    #[error("{0} trailing bytes after the datagram")]
    Trailing(usize),
}

/// Decodes one datagram, checking its size and that nothing trails it.
pub fn decode(bytes: &[u8]) -> Result<Packet, DecodeError> {
    if bytes.is_empty() {
        return Err(DecodeError::Empty);
    }
    if bytes.len() > MAX_DATAGRAM {
        return Err(DecodeError::TooLarge(bytes.len()));
    }
    let (p, rest) = postcard::take_from_bytes::<Packet>(bytes)
        .map_err(|e| DecodeError::Undecodable(e.to_string()))?;
    if !rest.is_empty() {
        return Err(DecodeError::Trailing(rest.len()));
    }
    Ok(p)
}

/// Encodes one datagram (None if it would exceed [`MAX_DATAGRAM`]).
pub fn encode(p: &Packet) -> Option<Vec<u8>> {
    postcard::to_stdvec(p)
        .ok()
        .filter(|b| b.len() <= MAX_DATAGRAM)
}

fn hmac(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    // HMAC accepts keys of any length.
    let mut m = match HmacSha256::new_from_slice(key) {
        Ok(m) => m,
        Err(_) => return [0; 32],
    };
    for p in parts {
        m.update(p);
    }
    m.finalize().into_bytes().into()
}

fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn transcript(cluster: &str, node: NodeId, cn: &[u8; NONCE_LEN], wn: &[u8; NONCE_LEN]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(LABEL);
    h.update([WIRE_VERSION]);
    h.update((cluster.len() as u32).to_le_bytes());
    h.update(cluster.as_bytes());
    h.update(node.0.to_le_bytes());
    h.update(cn);
    h.update(wn);
    h.finalize().into()
}

/// Session keys derived from the secret and the transcript.
#[derive(Clone)]
struct Keys {
    c2w: [u8; 32],
    w2c: [u8; 32],
}

fn keys(secret: &[u8], tr: &[u8; 32]) -> Keys {
    Keys {
        c2w: hmac(secret, &[b"key-c2w", tr]),
        w2c: hmac(secret, &[b"key-w2c", tr]),
    }
}

fn tag16(key: &[u8], parts: &[&[u8]]) -> [u8; 16] {
    let full = hmac(key, parts);
    let mut t = [0u8; 16];
    t.copy_from_slice(&full[..16]);
    t
}

fn request_tag(key: &[u8], session: u64, seq: u64, op: &Request) -> [u8; 16] {
    let body = postcard::to_stdvec(op).unwrap_or_default();
    tag16(
        key,
        &[b"req", &session.to_le_bytes(), &seq.to_le_bytes(), &body],
    )
}

fn response_tag(key: &[u8], session: u64, seq: u64, reply: &Reply) -> [u8; 16] {
    let body = postcard::to_stdvec(reply).unwrap_or_default();
    tag16(
        key,
        &[b"resp", &session.to_le_bytes(), &seq.to_le_bytes(), &body],
    )
}

/// Fills a nonce from the kernel's random source.
pub fn random_nonce() -> std::io::Result<[u8; NONCE_LEN]> {
    let mut n = [0u8; NONCE_LEN];
    getrandom::fill(&mut n).map_err(|e| std::io::Error::other(e.to_string()))?;
    Ok(n)
}

/// Memory bounds of the server side.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WireLimits {
    /// Authenticated sessions kept (least recently used evicted first).
    pub max_sessions: usize,
    /// Outstanding challenges (oldest evicted first).
    pub max_challenges: usize,
    /// A challenge must be answered within this.
    pub challenge_ttl: Duration,
    /// A session unused this long is forgotten.
    pub session_idle: Duration,
}

impl Default for WireLimits {
    fn default() -> WireLimits {
        WireLimits {
            max_sessions: 4096,
            max_challenges: 1024,
            challenge_ttl: Duration::from_secs(2),
            session_idle: Duration::from_secs(60),
        }
    }
}

struct ChallengeState {
    cluster: String,
    node: NodeId,
    client_nonce: [u8; NONCE_LEN],
    transcript: [u8; 32],
    expires: Duration,
}

struct SessionState {
    cluster: String,
    node: NodeId,
    keys: Keys,
    last_seq: u64,
    last_used: Duration,
}

/// Counters for the status view.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct WireCounters {
    pub datagrams: u64,
    pub requests: u64,
    pub sessions_opened: u64,
    pub malformed: u64,
    pub unknown_cluster: u64,
    pub wrong_secret: u64,
    pub replays: u64,
    pub unknown_session: u64,
    pub bad_tag: u64,
}

/// A log line the server should write (the caller rate-limits them).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refused {
    pub from: SocketAddr,
    pub why: Refusal,
    pub cluster: Option<String>,
    pub node: Option<NodeId>,
}

/// The server side of the wire: authentication and sessions for every cluster, then
/// the requests handed to the [`WitnessCore`].
pub struct ServerWire {
    secrets: HashMap<String, Vec<u8>>,
    limits: WireLimits,
    challenges: HashMap<[u8; NONCE_LEN], ChallengeState>,
    challenge_order: VecDeque<[u8; NONCE_LEN]>,
    sessions: HashMap<u64, SessionState>,
    by_node: HashMap<(String, NodeId), u64>,
    pub counters: WireCounters,
}

impl ServerWire {
    /// `secrets`: cluster id -> secret (each at least [`MIN_SECRET`] bytes; checked by
    /// the config loader).
    pub fn new(secrets: HashMap<String, Vec<u8>>, limits: WireLimits) -> ServerWire {
        ServerWire {
            secrets,
            limits,
            challenges: HashMap::new(),
            challenge_order: VecDeque::new(),
            sessions: HashMap::new(),
            by_node: HashMap::new(),
            counters: WireCounters::default(),
        }
    }

    pub fn session_count(&self) -> usize {
        self.sessions.len()
    }

    /// Handles one datagram from `from` at `now`: the datagram to send back (if any)
    /// and the refusal to log (if any). `nonce` is fresh randomness for a challenge.
    pub fn handle(
        &mut self,
        now: Duration,
        from: SocketAddr,
        bytes: &[u8],
        nonce: [u8; NONCE_LEN],
        core: &mut WitnessCore,
        store: &mut dyn Store,
    ) -> (Option<Vec<u8>>, Option<Refused>) {
        self.counters.datagrams += 1;
        let refuse = |why: Refusal,
                      cn: [u8; NONCE_LEN],
                      session: u64,
                      cluster: Option<String>,
                      node: Option<NodeId>| {
            let reply = encode(&Packet::Error {
                client_nonce: cn,
                session,
                refusal: why.clone(),
            });
            (
                reply,
                Some(Refused {
                    from,
                    why,
                    cluster,
                    node,
                }),
            )
        };
        let p = match decode(bytes) {
            Ok(p) => p,
            Err(e) => {
                self.counters.malformed += 1;
                return refuse(
                    Refusal::Malformed(e.to_string()),
                    [0; NONCE_LEN],
                    0,
                    None,
                    None,
                );
            }
        };
        self.expire(now);
        match p {
            Packet::Hello {
                version,
                cluster,
                node,
                nonce: cn,
            } => {
                if version != WIRE_VERSION {
                    self.counters.malformed += 1;
                    return refuse(
                        Refusal::Version {
                            ours: WIRE_VERSION,
                            theirs: version,
                        },
                        cn,
                        0,
                        Some(cluster),
                        Some(node),
                    );
                }
                if let Err(e) = check_name("cluster id", &cluster) {
                    self.counters.malformed += 1;
                    return refuse(Refusal::BadName(e), cn, 0, None, Some(node));
                }
                let Some(secret) = self.secrets.get(&cluster) else {
                    self.counters.unknown_cluster += 1;
                    return refuse(
                        Refusal::UnknownCluster(cluster.clone()),
                        cn,
                        0,
                        Some(cluster),
                        Some(node),
                    );
                };
                let tr = transcript(&cluster, node, &cn, &nonce);
                let mac = hmac(secret, &[b"witness", &tr]);
                if self.challenges.len() >= self.limits.max_challenges {
                    if let Some(old) = self.challenge_order.pop_front() {
                        self.challenges.remove(&old);
                    }
                }
                self.challenges.insert(
                    nonce,
                    ChallengeState {
                        cluster,
                        node,
                        client_nonce: cn,
                        transcript: tr,
                        expires: now + self.limits.challenge_ttl,
                    },
                );
                self.challenge_order.push_back(nonce);
                (
                    encode(&Packet::Challenge {
                        client_nonce: cn,
                        witness_nonce: nonce,
                        mac,
                    }),
                    None,
                )
            }
            Packet::Auth { witness_nonce, mac } => {
                let Some(ch) = self.challenges.remove(&witness_nonce) else {
                    self.counters.replays += 1;
                    return refuse(Refusal::ReplayedAuth, [0; NONCE_LEN], 0, None, None);
                };
                self.challenge_order.retain(|n| *n != witness_nonce);
                let Some(secret) = self.secrets.get(&ch.cluster) else {
                    return (None, None);
                };
                let want = hmac(secret, &[b"client", &ch.transcript]);
                if !ct_eq(&want, &mac) {
                    self.counters.wrong_secret += 1;
                    return refuse(
                        Refusal::WrongSecret,
                        ch.client_nonce,
                        0,
                        Some(ch.cluster),
                        Some(ch.node),
                    );
                }
                let keys = keys(secret, &ch.transcript);
                // A session id that is unpredictable and unused.
                let mut session =
                    u64::from_le_bytes(ch.transcript[..8].try_into().unwrap_or([1; 8])) | 1;
                while self.sessions.contains_key(&session) {
                    session = session.wrapping_add(2);
                }
                if let Some(old) = self.by_node.insert((ch.cluster.clone(), ch.node), session) {
                    self.sessions.remove(&old);
                }
                if self.sessions.len() >= self.limits.max_sessions {
                    self.evict_lru();
                }
                let tag = tag16(
                    &keys.w2c,
                    &[b"welcome", &session.to_le_bytes(), &ch.client_nonce],
                );
                self.sessions.insert(
                    session,
                    SessionState {
                        cluster: ch.cluster,
                        node: ch.node,
                        keys,
                        last_seq: 0,
                        last_used: now,
                    },
                );
                self.counters.sessions_opened += 1;
                (
                    encode(&Packet::Welcome {
                        client_nonce: ch.client_nonce,
                        session,
                        tag,
                    }),
                    None,
                )
            }
            Packet::Request {
                session,
                seq,
                op,
                tag,
            } => {
                let Some(s) = self.sessions.get_mut(&session) else {
                    self.counters.unknown_session += 1;
                    return refuse(Refusal::UnknownSession, [0; NONCE_LEN], session, None, None);
                };
                let want = request_tag(&s.keys.c2w, session, seq, &op);
                if !ct_eq(&want, &tag) {
                    self.counters.bad_tag += 1;
                    let (c, n) = (s.cluster.clone(), s.node);
                    return refuse(Refusal::BadTag, [0; NONCE_LEN], session, Some(c), Some(n));
                }
                if seq <= s.last_seq {
                    self.counters.replays += 1;
                    let why = Refusal::ReplayedRequest {
                        seq,
                        last: s.last_seq,
                    };
                    let (c, n) = (s.cluster.clone(), s.node);
                    // Authenticated but stale: no answer (the client moved on).
                    return (
                        None,
                        Some(Refused {
                            from,
                            why,
                            cluster: Some(c),
                            node: Some(n),
                        }),
                    );
                }
                s.last_seq = seq;
                s.last_used = now;
                self.counters.requests += 1;
                let cluster = s.cluster.clone();
                let key = s.keys.w2c;
                // The node in a request must be the authenticated one.
                let reply = match &op {
                    Request::Renew { node, .. } | Request::Acquire { node, .. }
                        if *node != s.node =>
                    {
                        Reply::Refused(super::ops::OpError::BadName(format!(
                            "request names {node} but the session is {}",
                            s.node
                        )))
                    }
                    _ => core.handle(now, &cluster, &op, store),
                };
                let tag = response_tag(&key, session, seq, &reply);
                (
                    encode(&Packet::Response {
                        session,
                        seq,
                        reply,
                        tag,
                    }),
                    None,
                )
            }
            Packet::Challenge { .. }
            | Packet::Welcome { .. }
            | Packet::Response { .. }
            | Packet::Error { .. } => {
                self.counters.malformed += 1;
                (
                    None,
                    Some(Refused {
                        from,
                        why: Refusal::WrongDirection,
                        cluster: None,
                        node: None,
                    }),
                )
            }
        }
    }

    fn expire(&mut self, now: Duration) {
        while let Some(n) = self.challenge_order.front().copied() {
            match self.challenges.get(&n) {
                Some(c) if c.expires > now => break,
                _ => {
                    self.challenges.remove(&n);
                    self.challenge_order.pop_front();
                }
            }
        }
        let idle = self.limits.session_idle;
        let before = self.sessions.len();
        self.sessions
            .retain(|_, s| now.saturating_sub(s.last_used) < idle);
        if self.sessions.len() != before {
            let live = &self.sessions;
            self.by_node.retain(|_, id| live.contains_key(id));
        }
    }

    fn evict_lru(&mut self) {
        if let Some((&id, _)) = self.sessions.iter().min_by_key(|(_, s)| s.last_used) {
            self.sessions.remove(&id);
            self.by_node.retain(|_, s| *s != id);
        }
    }
}

/// Why the client side gave up on a datagram or a session.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ClientError {
    #[error("the witness does not prove the cluster secret (wrong secret, or not our witness)")]
    WitnessNotAuthentic,
    #[error("the witness refused: {0}")]
    Refused(Refusal),
    #[error("{0}")]
    Decode(#[from] DecodeError),
}

enum ClientState {
    Idle,
    AwaitChallenge { nonce: [u8; NONCE_LEN] },
    AwaitWelcome { nonce: [u8; NONCE_LEN], keys: Keys },
    Ready { session: u64, keys: Keys },
}

/// What a datagram from the witness meant to the client.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClientEvent {
    /// Send this datagram (the handshake's next step).
    Send(Vec<u8>),
    /// The session is ready: requests can go.
    Ready,
    /// The authenticated answer to request `seq`.
    Reply { seq: u64, reply: Reply },
    /// Nothing to do (stale, foreign or unauthenticated datagram).
    Ignored,
}

/// The client side of the wire for one (cluster, node) and one witness.
pub struct ClientWire {
    cluster: String,
    node: NodeId,
    secret: Vec<u8>,
    state: ClientState,
    next_seq: u64,
}

impl ClientWire {
    pub fn new(cluster: &str, node: NodeId, secret: &[u8]) -> ClientWire {
        ClientWire {
            cluster: cluster.to_string(),
            node,
            secret: secret.to_vec(),
            state: ClientState::Idle,
            next_seq: 1,
        }
    }

    pub fn is_ready(&self) -> bool {
        matches!(self.state, ClientState::Ready { .. })
    }

    /// Starts (or restarts) the handshake: the hello to send.
    pub fn hello(&mut self, nonce: [u8; NONCE_LEN]) -> Vec<u8> {
        self.state = ClientState::AwaitChallenge { nonce };
        encode(&Packet::Hello {
            version: WIRE_VERSION,
            cluster: self.cluster.clone(),
            node: self.node,
            nonce,
        })
        .unwrap_or_default()
    }

    /// Encodes `op` as the next request; None while no session is ready. Returns the
    /// sequence number the answer will carry.
    pub fn request(&mut self, op: &Request) -> Option<(u64, Vec<u8>)> {
        let ClientState::Ready { session, keys } = &self.state else {
            return None;
        };
        let seq = self.next_seq;
        self.next_seq += 1;
        let tag = request_tag(&keys.c2w, *session, seq, op);
        let bytes = encode(&Packet::Request {
            session: *session,
            seq,
            op: op.clone(),
            tag,
        })?;
        Some((seq, bytes))
    }

    /// Handles a datagram from the witness.
    pub fn on_datagram(&mut self, bytes: &[u8]) -> Result<ClientEvent, ClientError> {
        let p = decode(bytes)?;
        match (p, &self.state) {
            (
                Packet::Challenge {
                    client_nonce,
                    witness_nonce,
                    mac,
                },
                ClientState::AwaitChallenge { nonce },
            ) if client_nonce == *nonce => {
                let tr = transcript(&self.cluster, self.node, nonce, &witness_nonce);
                if !ct_eq(&hmac(&self.secret, &[b"witness", &tr]), &mac) {
                    self.state = ClientState::Idle;
                    return Err(ClientError::WitnessNotAuthentic);
                }
                let auth = encode(&Packet::Auth {
                    witness_nonce,
                    mac: hmac(&self.secret, &[b"client", &tr]),
                })
                .unwrap_or_default();
                self.state = ClientState::AwaitWelcome {
                    nonce: *nonce,
                    keys: keys(&self.secret, &tr),
                };
                Ok(ClientEvent::Send(auth))
            }
            (
                Packet::Welcome {
                    client_nonce,
                    session,
                    tag,
                },
                ClientState::AwaitWelcome { nonce, keys },
            ) if client_nonce == *nonce => {
                let want = tag16(&keys.w2c, &[b"welcome", &session.to_le_bytes(), nonce]);
                if !ct_eq(&want, &tag) {
                    return Ok(ClientEvent::Ignored);
                }
                self.state = ClientState::Ready {
                    session,
                    keys: keys.clone(),
                };
                self.next_seq = 1;
                Ok(ClientEvent::Ready)
            }
            (
                Packet::Response {
                    session,
                    seq,
                    reply,
                    tag,
                },
                ClientState::Ready { session: s, keys },
            ) if session == *s => {
                if !ct_eq(&response_tag(&keys.w2c, session, seq, &reply), &tag) {
                    return Ok(ClientEvent::Ignored);
                }
                Ok(ClientEvent::Reply { seq, reply })
            }
            (
                Packet::Error {
                    client_nonce,
                    session,
                    refusal,
                },
                state,
            ) => {
                // Unauthenticated: act on it only if it names what we are waiting on.
                let ours = match state {
                    ClientState::AwaitChallenge { nonce }
                    | ClientState::AwaitWelcome { nonce, .. } => client_nonce == *nonce,
                    ClientState::Ready { session: s, .. } => session == *s,
                    ClientState::Idle => false,
                };
                if !ours {
                    return Ok(ClientEvent::Ignored);
                }
                self.state = ClientState::Idle;
                Err(ClientError::Refused(refusal))
            }
            _ => Ok(ClientEvent::Ignored),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::witness::core::CoreLimits;
    use crate::witness::store::MemStore;

    fn addr() -> SocketAddr {
        "127.0.0.1:9".parse().unwrap()
    }

    struct Rig {
        srv: ServerWire,
        core: WitnessCore,
        store: MemStore,
        n: u8,
    }

    impl Rig {
        fn new() -> Rig {
            let mut secrets = HashMap::new();
            secrets.insert("c1".to_string(), b"0123456789abcdef".to_vec());
            Rig {
                srv: ServerWire::new(secrets, WireLimits::default()),
                core: WitnessCore::new(CoreLimits::default(), [], Duration::ZERO),
                store: MemStore::default(),
                n: 0,
            }
        }
        fn send(&mut self, b: &[u8]) -> (Option<Vec<u8>>, Option<Refused>) {
            self.n += 1;
            self.srv.handle(
                Duration::from_millis(u64::from(self.n)),
                addr(),
                b,
                [self.n; 32],
                &mut self.core,
                &mut self.store,
            )
        }
        fn connect(&mut self, c: &mut ClientWire) -> Vec<Vec<u8>> {
            let mut sent = vec![c.hello([0xaa; 32])];
            let ch = self.send(&sent[0]).0.unwrap();
            let ClientEvent::Send(auth) = c.on_datagram(&ch).unwrap() else {
                panic!()
            };
            sent.push(auth.clone());
            let w = self.send(&auth).0.unwrap();
            assert_eq!(c.on_datagram(&w).unwrap(), ClientEvent::Ready);
            sent
        }
    }

    fn query() -> Request {
        Request::Query { vm: "vm0".into() }
    }

    #[test]
    fn handshake_request_and_response() {
        let mut r = Rig::new();
        let mut c = ClientWire::new("c1", NodeId(1), b"0123456789abcdef");
        r.connect(&mut c);
        let op = Request::Acquire {
            vm: "vm0".into(),
            node: NodeId(1),
            from: 0,
            lease_ms: 200,
        };
        let (seq, b) = c.request(&op).unwrap();
        let resp = r.send(&b).0.unwrap();
        assert_eq!(
            c.on_datagram(&resp).unwrap(),
            ClientEvent::Reply {
                seq,
                reply: Reply::Granted {
                    generation: 1,
                    lease_ms: 200
                }
            }
        );
        // Replaying the same request is refused (no answer, logged).
        let (none, why) = r.send(&b);
        assert!(none.is_none());
        assert!(matches!(why.unwrap().why, Refusal::ReplayedRequest { .. }));
        // Another node's name inside this session is refused.
        let (_, b) = c
            .request(&Request::Acquire {
                vm: "vm0".into(),
                node: NodeId(2),
                from: 1,
                lease_ms: 200,
            })
            .unwrap();
        let resp = r.send(&b).0.unwrap();
        assert!(matches!(
            c.on_datagram(&resp).unwrap(),
            ClientEvent::Reply {
                reply: Reply::Refused(_),
                ..
            }
        ));
    }

    #[test]
    fn wrong_secret_both_ways() {
        let mut r = Rig::new();
        // Client with the wrong secret: the witness's proof fails at the client...
        let mut c = ClientWire::new("c1", NodeId(1), b"wrong-secret-0000");
        let ch = r.send(&c.hello([1; 32])).0.unwrap();
        assert_eq!(c.on_datagram(&ch), Err(ClientError::WitnessNotAuthentic));
        // ...and a forged auth fails at the witness.
        let Packet::Challenge { witness_nonce, .. } = decode(&ch).unwrap() else {
            panic!()
        };
        let forged = encode(&Packet::Auth {
            witness_nonce,
            mac: [7; 32],
        })
        .unwrap();
        let (reply, why) = r.send(&forged);
        assert_eq!(why.unwrap().why, Refusal::WrongSecret);
        assert!(matches!(
            decode(&reply.unwrap()).unwrap(),
            Packet::Error {
                refusal: Refusal::WrongSecret,
                ..
            }
        ));
        assert_eq!(r.srv.session_count(), 0);
    }

    #[test]
    fn unknown_cluster_replayed_auth_and_old_sessions() {
        let mut r = Rig::new();
        let mut c = ClientWire::new("nope", NodeId(1), b"0123456789abcdef");
        let (reply, why) = r.send(&c.hello([1; 32]));
        assert_eq!(why.unwrap().why, Refusal::UnknownCluster("nope".into()));
        assert!(matches!(
            c.on_datagram(&reply.unwrap()),
            Err(ClientError::Refused(Refusal::UnknownCluster(_)))
        ));
        let mut c = ClientWire::new("c1", NodeId(1), b"0123456789abcdef");
        let sent = r.connect(&mut c);
        // A recorded auth cannot open another session.
        assert_eq!(r.send(&sent[1]).1.unwrap().why, Refusal::ReplayedAuth);
        let (_, old_req) = c.request(&query()).unwrap();
        // A new session of the same node replaces the old one.
        let mut c2 = ClientWire::new("c1", NodeId(1), b"0123456789abcdef");
        r.connect(&mut c2);
        assert_eq!(r.send(&old_req).1.unwrap().why, Refusal::UnknownSession);
        assert_eq!(r.srv.session_count(), 1);
        // A flipped byte in a live session's request breaks its tag.
        let (_, mut b) = c2.request(&query()).unwrap();
        let n = b.len();
        b[n - 1] ^= 1;
        assert_eq!(r.send(&b).1.unwrap().why, Refusal::BadTag);
    }

    #[test]
    fn malformed_and_oversized() {
        let mut r = Rig::new();
        for bad in [&[][..], &[0xff; 8][..], &[0u8; 2000][..]] {
            let (reply, why) = r.send(bad);
            assert!(matches!(why.unwrap().why, Refusal::Malformed(_)));
            assert!(reply.is_some());
        }
        let mut ok = encode(&Packet::Auth {
            witness_nonce: [0; 32],
            mac: [0; 32],
        })
        .unwrap();
        ok.push(0);
        assert_eq!(decode(&ok), Err(DecodeError::Trailing(1)));
        let hello = encode(&Packet::Hello {
            version: 9,
            cluster: "c1".into(),
            node: NodeId(1),
            nonce: [0; 32],
        })
        .unwrap();
        assert!(matches!(
            r.send(&hello).1.unwrap().why,
            Refusal::Version { theirs: 9, .. }
        ));
        let hello = encode(&Packet::Hello {
            version: WIRE_VERSION,
            cluster: "a/b".into(),
            node: NodeId(1),
            nonce: [0; 32],
        })
        .unwrap();
        assert!(matches!(r.send(&hello).1.unwrap().why, Refusal::BadName(_)));
    }

    #[test]
    fn bounded_challenges_and_sessions() {
        let mut secrets = HashMap::new();
        secrets.insert("c1".to_string(), b"0123456789abcdef".to_vec());
        let lim = WireLimits {
            max_sessions: 3,
            max_challenges: 2,
            ..WireLimits::default()
        };
        let mut srv = ServerWire::new(secrets, lim);
        let mut core = WitnessCore::new(CoreLimits::default(), [], Duration::ZERO);
        let mut st = MemStore::default();
        for node in 1..=10u64 {
            let mut c = ClientWire::new("c1", NodeId(node), b"0123456789abcdef");
            let t = Duration::from_millis(node);
            let h = c.hello([node as u8; 32]);
            let ch = srv
                .handle(t, addr(), &h, [node as u8; 32], &mut core, &mut st)
                .0
                .unwrap();
            let ClientEvent::Send(a) = c.on_datagram(&ch).unwrap() else {
                panic!()
            };
            srv.handle(t, addr(), &a, [0; 32], &mut core, &mut st);
            assert!(srv.session_count() <= 3);
            assert!(srv.challenges.len() <= 2);
        }
    }
}
