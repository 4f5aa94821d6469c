//! What one end of an A-Link is configured with.

use crate::frame::MAX_BODY_CEILING;
use crate::handshake::{Role, PROTOCOL_VERSION};
use crate::health::HealthConfig;
use crate::linkset::{WindowLimits, MAX_LINKS};
use std::net::SocketAddr;
use std::time::Duration;

use super::error::AlinkError;

/// Addresses of one link. The accepting end listens on `local`; the dialing end binds its
/// socket to `local`'s IP (port 0 = any) and connects to `remote`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinkAddrs {
    pub local: SocketAddr,
    pub remote: SocketAddr,
}

/// Configuration of one end.
#[derive(Clone)]
pub struct AlinkConfig {
    pub cluster_id: u64,
    pub node_id: u64,
    pub peer_node_id: u64,
    pub secret: Vec<u8>,
    pub links: Vec<LinkAddrs>,
    pub health: HealthConfig,
    pub handshake_timeout: Duration,
    /// Must be equal on both ends (the receiver sizes its reorder buffer from it).
    pub window: WindowLimits,
    pub max_frame_body: u32,
    /// Overridable for tests of version refusal.
    pub protocol_version: u16,
    pub reconnect_max: Duration,
    /// A dial the peer's host refused (nothing listens there yet: its process is
    /// starting, e.g. a migration target) is tried again after this, without the
    /// growing back-off: a refusal costs one SYN and its RST, and the peer should be
    /// reached as soon as it listens (a back-off at `reconnect_max` made every
    /// migration wait up to that long for its first connection). Zero: a refusal
    /// waits the back-off as any failed dial does.
    pub refused_retry: Duration,
}

impl std::fmt::Debug for AlinkConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AlinkConfig")
            .field("cluster_id", &self.cluster_id)
            .field("node_id", &self.node_id)
            .field("peer_node_id", &self.peer_node_id)
            .field("links", &self.links)
            .field("health", &self.health)
            .finish_non_exhaustive()
    }
}

impl AlinkConfig {
    /// Defaults: heartbeat 100 ms, down after 4 misses, 2 s handshake timeout, window of
    /// 1024 messages / 256 MiB, frames up to 64 MiB.
    pub fn new(
        cluster_id: u64,
        node_id: u64,
        peer_node_id: u64,
        secret: &[u8],
        links: Vec<LinkAddrs>,
    ) -> AlinkConfig {
        AlinkConfig {
            cluster_id,
            node_id,
            peer_node_id,
            secret: secret.to_vec(),
            links,
            health: HealthConfig::default(),
            handshake_timeout: Duration::from_secs(2),
            window: WindowLimits {
                max_msgs: 1024,
                max_bytes: 256 << 20,
            },
            max_frame_body: 64 << 20,
            protocol_version: PROTOCOL_VERSION,
            reconnect_max: Duration::from_secs(1),
            refused_retry: Duration::from_millis(10),
        }
    }

    pub(super) fn validate(&self) -> Result<(), AlinkError> {
        let bad = |m: &str| Err(AlinkError::Config(m.to_string()));
        if self.links.is_empty() || self.links.len() > MAX_LINKS {
            return bad("between 1 and 8 links");
        }
        if self.node_id == self.peer_node_id {
            return bad("node id and peer node id must differ");
        }
        if self.secret.len() < 16 {
            return bad("cluster secret must be at least 16 bytes");
        }
        if self.health.misses == 0 || self.health.interval.is_zero() {
            return bad("heartbeat interval and misses must be positive");
        }
        if self.window.max_msgs == 0 || self.window.max_bytes == 0 {
            return bad("window limits must be positive");
        }
        if self.max_frame_body == 0 || self.max_frame_body > MAX_BODY_CEILING {
            return bad("max_frame_body must be in 1..=1 GiB");
        }
        Ok(())
    }

    pub(super) fn role(&self) -> Role {
        if self.node_id < self.peer_node_id {
            Role::Dialer
        } else {
            Role::Acceptor
        }
    }
}
