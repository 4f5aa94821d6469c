//! Heartbeats on a path that is not an A-Link (the private network, priv0): a pure
//! state machine (packets in, packets out, time passed in) that says whether the peer
//! is alive on that path, and carries the side messages (`side`) on it too.
//!
//! Why a second kind of heartbeat: a takeover must need EVERY path between the PMs
//! silent (issue 14, item 5). The A-Links are the checkpoint stream's own connections
//! and live per session; priv0 is watched for the whole life of the process, by
//! datagrams, so it says "the peer is alive" also between sessions and while every
//! A-Link is cut. It carries no checkpoint data: a pair whose A-Links are all cut is
//! unprotected whatever priv0 says; priv0 only keeps the standby from taking over (and
//! lets the quorum's peer messages through).
//!
//! A packet proves the peer alive only by a round trip: each packet carries the
//! sender's instance (random per process) and sequence number, and echoes the newest
//! (instance, seq) it received from the other end. The peer counts as alive while the
//! newest echo of one of OUR packets is recent: measured from when we SENT the echoed
//! packet, so the proof never outlives what it proves. A recorded packet replayed on
//! the wire echoes an old sequence number and proves nothing; a packet from a host
//! without the secret, of another cluster or for another node fails the check.
//!
//! Wire format (little endian), at most [`MAX_PACKET`] bytes:
//!
//! | offset | size | field |
//! | --- | --- | --- |
//! | 0 | 4 | magic `"TRP0"` |
//! | 4 | 1 | version, 1 |
//! | 5 | 3 | reserved, 0 |
//! | 8 | 8 | cluster id |
//! | 16 | 8 | sender node id |
//! | 24 | 8 | receiver node id |
//! | 32 | 8 | sender instance |
//! | 40 | 8 | sender seq (from 1) |
//! | 48 | 8 | echoed instance (0: none yet) |
//! | 56 | 8 | echoed seq |
//! | 64 | 2 | body length (a side message body, or 0) |
//! | 66 | n | body |
//! | 66+n | 16 | tag: HMAC-SHA256 of bytes 0..66+n, keyed with a key derived from the cluster secret, truncated |

use std::collections::VecDeque;
use std::time::Duration;

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::health::HealthConfig;
use crate::side::MAX_SIDE_LEN;

type HmacSha256 = Hmac<Sha256>;

const MAGIC: &[u8; 4] = b"TRP0";
const VERSION: u8 = 1;
const HEADER: usize = 66;
const TAG: usize = 16;
/// A side body carries its own 16-byte header (`side`).
const MAX_BODY: usize = 16 + MAX_SIDE_LEN;
/// Largest packet: fits any datagram path.
pub const MAX_PACKET: usize = HEADER + MAX_BODY + TAG;
/// Send times of our own packets kept for echoes (a newer echo always supersedes).
const SENT_KEPT: usize = 256;
const KEY_LABEL: &[u8] = b"twinrun-priv0-heartbeat-v1";

/// What a beacon needs to know.
#[derive(Clone)]
pub struct BeaconConfig {
    pub cluster_id: u64,
    /// This end's and the peer's node ids (stable across role changes).
    pub me: u64,
    pub peer: u64,
    /// The cluster secret (the key is derived from it and the cluster id).
    pub secret: Vec<u8>,
    /// Send a packet every `interval`; the peer is silent after `misses` intervals
    /// without a fresh round trip (as an A-Link's heartbeats).
    pub health: HealthConfig,
}

impl std::fmt::Debug for BeaconConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BeaconConfig")
            .field("cluster_id", &self.cluster_id)
            .field("me", &self.me)
            .field("peer", &self.peer)
            .field("health", &self.health)
            .finish_non_exhaustive()
    }
}

/// Why a packet was refused (the edge logs these, rate-limited).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BeaconError {
    #[error("malformed packet: {0}")]
    Malformed(&'static str),
    #[error("packet of protocol version {0} (we speak {VERSION})")]
    Version(u8),
    #[error("packet of cluster {0:#x}")]
    Cluster(u64),
    #[error("packet from node {from} to node {to} (we are {me}, the peer {peer})")]
    Node {
        from: u64,
        to: u64,
        me: u64,
        peer: u64,
    },
    #[error("tag does not verify (wrong cluster secret, or corrupted)")]
    Tag,
    #[error("stale packet (seq {seq} after {last} of the same instance)")]
    Stale { seq: u64, last: u64 },
}

/// A packet accepted: its body, if any (a side message for `side::SideRx`).
#[derive(Debug, PartialEq, Eq)]
pub struct Accepted {
    pub body: Option<Vec<u8>>,
}

/// The heartbeat state of one datagram path.
#[derive(Debug)]
pub struct Beacon {
    cfg: BeaconConfig,
    key: [u8; 32],
    instance: u64,
    next_seq: u64,
    /// Our recent packets: (seq, sent at), oldest first.
    sent: VecDeque<(u64, Duration)>,
    last_tx: Option<Duration>,
    /// The peer's newest packet: (instance, seq).
    peer_last: Option<(u64, u64)>,
    /// The send time of the newest of our packets the peer echoed.
    proof: Option<Duration>,
    refused: u64,
}

impl Beacon {
    /// `instance`: random per process (a restarted peer is told apart).
    pub fn new(cfg: BeaconConfig, instance: u64) -> Beacon {
        assert!(cfg.health.misses >= 1 && !cfg.health.interval.is_zero());
        let key = hmac(&cfg.secret, &[KEY_LABEL, &cfg.cluster_id.to_le_bytes()]);
        Beacon {
            cfg,
            key,
            instance: instance.max(1),
            next_seq: 1,
            sent: VecDeque::new(),
            last_tx: None,
            peer_last: None,
            proof: None,
            refused: 0,
        }
    }

    /// How long a round-trip proof lasts: the A-Link's detection time plus one
    /// interval (the peer answers with its next periodic packet, not at once).
    pub fn proof_lasts(&self) -> Duration {
        self.cfg.health.dead_after() + self.cfg.health.interval
    }

    /// The peer answered one of our packets sent less than [`Self::proof_lasts`] ago.
    pub fn alive(&self, now: Duration) -> bool {
        self.proof
            .is_some_and(|p| now.saturating_sub(p) < self.proof_lasts())
    }

    /// How long ago the peer last proved alive (None: never).
    pub fn proof_age(&self, now: Duration) -> Option<Duration> {
        self.proof.map(|p| now.saturating_sub(p))
    }

    /// Packets refused so far.
    pub fn refused(&self) -> u64 {
        self.refused
    }

    /// A periodic packet is due at `now`.
    pub fn due(&self, now: Duration) -> bool {
        self.last_tx
            .is_none_or(|t| now.saturating_sub(t) >= self.cfg.health.interval)
    }

    /// Time until the next periodic packet.
    pub fn next_deadline(&self, now: Duration) -> Duration {
        match self.last_tx {
            None => Duration::ZERO,
            Some(t) => (t + self.cfg.health.interval).saturating_sub(now),
        }
    }

    /// A packet to send now, carrying `body` (a side message body; None: a plain
    /// heartbeat). A body longer than a side body is refused (None).
    pub fn packet(&mut self, now: Duration, body: Option<&[u8]>) -> Option<Vec<u8>> {
        let body = body.unwrap_or(&[]);
        if body.len() > MAX_BODY {
            return None;
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        if self.sent.len() >= SENT_KEPT {
            self.sent.pop_front();
        }
        self.sent.push_back((seq, now));
        self.last_tx = Some(now);
        let (ei, es) = self.peer_last.unwrap_or((0, 0));
        let mut p = Vec::with_capacity(HEADER + body.len() + TAG);
        p.extend_from_slice(MAGIC);
        p.push(VERSION);
        p.extend_from_slice(&[0; 3]);
        for w in [
            self.cfg.cluster_id,
            self.cfg.me,
            self.cfg.peer,
            self.instance,
            seq,
            ei,
            es,
        ] {
            p.extend_from_slice(&w.to_le_bytes());
        }
        p.extend_from_slice(&(body.len() as u16).to_le_bytes());
        p.extend_from_slice(body);
        let tag = hmac(&self.key, &[&p]);
        p.extend_from_slice(&tag[..TAG]);
        Some(p)
    }

    /// A datagram from the peer's address at `now`.
    pub fn on_packet(&mut self, now: Duration, p: &[u8]) -> Result<Accepted, BeaconError> {
        let r = self.check(now, p);
        if r.is_err() {
            self.refused += 1;
        }
        r
    }

    fn check(&mut self, now: Duration, p: &[u8]) -> Result<Accepted, BeaconError> {
        if p.len() < HEADER + TAG || p.len() > MAX_PACKET {
            return Err(BeaconError::Malformed("length"));
        }
        if &p[..4] != MAGIC {
            return Err(BeaconError::Malformed("magic"));
        }
        if p[4] != VERSION {
            return Err(BeaconError::Version(p[4]));
        }
        let w = |i: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&p[8 + 8 * i..16 + 8 * i]);
            u64::from_le_bytes(b)
        };
        let blen = usize::from(u16::from_le_bytes([p[64], p[65]]));
        if HEADER + blen + TAG != p.len() {
            return Err(BeaconError::Malformed("body length"));
        }
        // The tag first: nothing of an unauthenticated packet is trusted or kept.
        let tag = hmac(&self.key, &[&p[..HEADER + blen]]);
        if !ct_eq(&tag[..TAG], &p[HEADER + blen..]) {
            return Err(BeaconError::Tag);
        }
        let (cluster, from, to) = (w(0), w(1), w(2));
        if cluster != self.cfg.cluster_id {
            return Err(BeaconError::Cluster(cluster));
        }
        if from != self.cfg.peer || to != self.cfg.me {
            return Err(BeaconError::Node {
                from,
                to,
                me: self.cfg.me,
                peer: self.cfg.peer,
            });
        }
        let (instance, seq, ei, es) = (w(3), w(4), w(5), w(6));
        if let Some((li, ls)) = self.peer_last {
            if li == instance && seq <= ls {
                return Err(BeaconError::Stale { seq, last: ls });
            }
        }
        self.peer_last = Some((instance, seq));
        if ei == self.instance {
            if let Some(&(_, at)) = self.sent.iter().find(|(s, _)| *s == es) {
                if self.proof.is_none_or(|p| at > p) {
                    self.proof = Some(at);
                }
            }
        }
        let _ = now;
        Ok(Accepted {
            body: (blen > 0).then(|| p[HEADER..HEADER + blen].to_vec()),
        })
    }
}

fn hmac(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    #[allow(clippy::expect_used)] // HMAC takes keys of any length: this cannot fail.
    let mut m = HmacSha256::new_from_slice(key).expect("HMAC takes any key length");
    for p in parts {
        m.update(p);
    }
    m.finalize().into_bytes().into()
}

fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(v: u64) -> Duration {
        Duration::from_millis(v)
    }

    fn cfg(me: u64, peer: u64) -> BeaconConfig {
        BeaconConfig {
            cluster_id: 7,
            me,
            peer,
            secret: b"0123456789abcdef-secret".to_vec(),
            health: HealthConfig {
                interval: ms(50),
                misses: 4,
            },
        }
    }

    /// Two ends exchanging packets every 50 ms with `delay` one way, until `until`.
    fn exchange(a: &mut Beacon, b: &mut Beacon, from: u64, until: u64, delay: u64) {
        let mut t = from;
        while t < until {
            let pa = a.packet(ms(t), None).unwrap();
            b.on_packet(ms(t + delay), &pa).unwrap();
            let pb = b.packet(ms(t + delay), None).unwrap();
            a.on_packet(ms(t + 2 * delay), &pb).unwrap();
            t += 50;
        }
    }

    #[test]
    fn alive_only_by_a_round_trip_and_silent_after_the_detection_time() {
        let mut a = Beacon::new(cfg(1, 2), 11);
        let mut b = Beacon::new(cfg(2, 1), 22);
        assert!(!a.alive(ms(0)));
        // B's first packet echoes nothing of A's: no proof yet.
        let pb = b.packet(ms(0), None).unwrap();
        a.on_packet(ms(1), &pb).unwrap();
        assert!(!a.alive(ms(1)));
        exchange(&mut a, &mut b, 10, 500, 1);
        assert!(a.alive(ms(500)) && b.alive(ms(500)));
        // The last proof: A's packet of t=460, echoed. Alive until 460 + 200 + 50.
        assert!(a.alive(ms(709)));
        assert!(!a.alive(ms(710)));
        assert_eq!(a.proof_age(ms(710)), Some(ms(250)));
        assert!(a.due(ms(710)) && a.next_deadline(ms(480)) == ms(30));
    }

    #[test]
    fn replays_strangers_and_garbage_prove_nothing() {
        let mut a = Beacon::new(cfg(1, 2), 11);
        let mut b = Beacon::new(cfg(2, 1), 22);
        exchange(&mut a, &mut b, 0, 200, 1);
        let old = b.packet(ms(200), Some(b"side")).unwrap();
        assert_eq!(
            a.on_packet(ms(201), &old).unwrap().body,
            Some(b"side".to_vec())
        );
        // Replayed: same instance, old seq.
        assert!(matches!(
            a.on_packet(ms(202), &old),
            Err(BeaconError::Stale { .. })
        ));
        // B dies: whatever of its packets is replayed echoes an old seq of A, so A goes
        // silent on time (the last proof, A's packet of t=150, lasts 250 ms).
        assert!(a.alive(ms(399)) && !a.alive(ms(400)));
        // Wrong secret, wrong cluster, wrong node, flipped bit, garbage.
        let mut other = cfg(2, 1);
        other.secret = b"another-secret-0123456".to_vec();
        let mut x = Beacon::new(other, 33);
        assert_eq!(
            a.on_packet(ms(203), &x.packet(ms(203), None).unwrap()),
            Err(BeaconError::Tag)
        );
        let mut c = cfg(2, 1);
        c.cluster_id = 8;
        let mut x = Beacon::new(c, 34);
        assert_eq!(
            a.on_packet(ms(204), &x.packet(ms(204), None).unwrap()),
            Err(BeaconError::Tag),
            "the key is bound to the cluster id"
        );
        let mut x = Beacon::new(cfg(3, 1), 35);
        assert!(matches!(
            a.on_packet(ms(205), &x.packet(ms(205), None).unwrap()),
            Err(BeaconError::Node { from: 3, .. })
        ));
        let mut p = b.packet(ms(206), None).unwrap();
        p[40] ^= 1;
        assert_eq!(a.on_packet(ms(206), &p), Err(BeaconError::Tag));
        assert!(a.on_packet(ms(207), &[0; 10]).is_err());
        assert!(a.on_packet(ms(207), &vec![0; MAX_PACKET + 1]).is_err());
        let mut p = b.packet(ms(208), None).unwrap();
        p[64] = 200;
        assert_eq!(
            a.on_packet(ms(208), &p),
            Err(BeaconError::Malformed("body length"))
        );
        assert_eq!(a.refused(), 8);
        assert!(b.packet(ms(209), Some(&[0; MAX_BODY + 1])).is_none());
    }

    #[test]
    fn a_restarted_peer_is_a_new_instance() {
        let mut a = Beacon::new(cfg(1, 2), 11);
        let mut b = Beacon::new(cfg(2, 1), 22);
        exchange(&mut a, &mut b, 0, 200, 1);
        let mut b2 = Beacon::new(cfg(2, 1), 23);
        exchange(&mut a, &mut b2, 600, 800, 1);
        assert!(a.alive(ms(800)));
    }
}
