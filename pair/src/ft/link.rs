//! The A-Link configuration of one end of the pair: both ends derive the same window,
//! heartbeat and cluster id from the same settings.

use std::time::Duration;

use alink::{AlinkConfig, HealthConfig, LinkAddrs};

use crate::settings::{FtSettings, Role};

/// Node ids on the A-Link: the primary dials, the standby accepts.
const PRIMARY_NODE: u64 = 1;
const STANDBY_NODE: u64 = 2;

/// The A-Link configuration of this end; both ends derive the same window, heartbeat
/// and cluster id from the same flags.
pub fn alink_config(ft: &FtSettings) -> AlinkConfig {
    alink_config_as(ft, ft.role)
}

/// [`alink_config`] for this end acting as `role` (a failover survivor becomes the
/// primary: it dials, the restarted old primary listens as the standby).
pub fn alink_config_as(ft: &FtSettings, role: Role) -> AlinkConfig {
    let (me, peer) = match role {
        Role::Primary => (PRIMARY_NODE, STANDBY_NODE),
        Role::Standby => (STANDBY_NODE, PRIMARY_NODE),
    };
    let links = ft
        .alinks
        .iter()
        .map(|l| LinkAddrs {
            local: l.local,
            remote: l.peer,
        })
        .collect();
    let mut c = AlinkConfig::new(ft.cluster_id_u64(), me, peer, &ft.secret, links);
    c.health = HealthConfig {
        interval: Duration::from_millis(ft.heartbeat_ms),
        misses: ft.heartbeat_misses,
    };
    // Reconnect quickly: a link that comes back should be in use again within a
    // heartbeat or two.
    c.reconnect_max = Duration::from_millis(250);
    if let Some(ms) = std::env::var("TWINRUN_ALINK_REFUSED_RETRY_MS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    {
        // A before/after comparison (benches/README.md, `migrate`): 0 is the old
        // back-off for refused dials too.
        c.refused_retry = Duration::from_millis(ms);
    }
    if let Some(v) = announced_version() {
        c.protocol_version = v;
    }
    c
}

/// `TWINRUN_ALINK_PROTOCOL=N`: this VMM announces A-Link protocol N instead of its
/// own, and then speaks N's messages (the rolling-upgrade test's previous-version node,
/// without a second build). Only a version this build speaks is taken.
fn announced_version() -> Option<u16> {
    let raw = std::env::var("TWINRUN_ALINK_PROTOCOL").ok()?;
    match raw.parse::<u16>() {
        Ok(v) if v == alink::PROTOCOL_CURRENT || v + 1 == alink::PROTOCOL_CURRENT => {
            log::info!("A-Link: announcing protocol {v} (TWINRUN_ALINK_PROTOCOL)");
            Some(v)
        }
        _ => {
            log::error!(
                "TWINRUN_ALINK_PROTOCOL={raw} ignored: this build speaks A-Link protocol {} or {}",
                alink::PROTOCOL_CURRENT - 1,
                alink::PROTOCOL_CURRENT
            );
            None
        }
    }
}
