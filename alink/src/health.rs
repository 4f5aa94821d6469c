//! Per-link heartbeat and failure detection: a pure state machine on a caller-supplied
//! clock (a `Duration` since an arbitrary origin), so tests drive it with simulated time.
//!
//! A link is up from the moment its handshake completes. Every `interval` without an
//! outgoing frame asks for a heartbeat; `misses` intervals without any incoming frame (data
//! or heartbeat) declare the link down. After LinkDown the machine stays down until
//! [`LinkHealth::on_up`] (a new connection authenticated).

use std::time::Duration;

/// Heartbeat timing. References: heartbeat every 100-250 ms per link, down after 3-5 misses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HealthConfig {
    pub interval: Duration,
    pub misses: u32,
}

impl Default for HealthConfig {
    fn default() -> Self {
        HealthConfig {
            interval: Duration::from_millis(100),
            misses: 4,
        }
    }
}

impl HealthConfig {
    /// Silence after which the link is declared down.
    pub fn dead_after(&self) -> Duration {
        self.interval * self.misses
    }
}

/// Actions requested by the health machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HealthAction {
    SendHeartbeat,
    LinkDown,
}

/// Heartbeat state of one link.
#[derive(Debug, Clone)]
pub struct LinkHealth {
    cfg: HealthConfig,
    up: bool,
    last_rx: Duration,
    last_tx: Duration,
}

impl LinkHealth {
    pub fn new(cfg: HealthConfig) -> LinkHealth {
        assert!(cfg.misses >= 1, "heartbeat misses must be at least 1");
        assert!(
            !cfg.interval.is_zero(),
            "heartbeat interval must be positive"
        );
        LinkHealth {
            cfg,
            up: false,
            last_rx: Duration::ZERO,
            last_tx: Duration::ZERO,
        }
    }

    pub fn config(&self) -> HealthConfig {
        self.cfg
    }

    pub fn is_up(&self) -> bool {
        self.up
    }

    /// A connection was authenticated at `now`.
    pub fn on_up(&mut self, now: Duration) {
        self.up = true;
        self.last_rx = now;
        self.last_tx = Duration::ZERO;
    }

    /// The link was torn down for another reason (I/O error, peer closed).
    pub fn on_down(&mut self) {
        self.up = false;
    }

    pub fn on_frame_received(&mut self, now: Duration) {
        if now > self.last_rx {
            self.last_rx = now;
        }
    }

    pub fn on_frame_sent(&mut self, now: Duration) {
        if now > self.last_tx {
            self.last_tx = now;
        }
    }

    /// Time until the next tick can have an effect (for sleeping).
    pub fn next_deadline(&self, now: Duration) -> Duration {
        if !self.up {
            return self.cfg.interval;
        }
        let hb = (self.last_tx + self.cfg.interval).saturating_sub(now);
        let dead = (self.last_rx + self.cfg.dead_after()).saturating_sub(now);
        hb.min(dead)
    }

    /// True when the next [`on_tick`](Self::on_tick) at `now` would declare the link
    /// down: the I/O edge uses it to look for unread bytes first.
    pub fn is_overdue(&self, now: Duration) -> bool {
        self.up && now.saturating_sub(self.last_rx) >= self.cfg.dead_after()
    }

    /// Advances the clock. At most one action: LinkDown wins over a heartbeat.
    pub fn on_tick(&mut self, now: Duration) -> Option<HealthAction> {
        if !self.up {
            return None;
        }
        if now.saturating_sub(self.last_rx) >= self.cfg.dead_after() {
            self.up = false;
            return Some(HealthAction::LinkDown);
        }
        if now.saturating_sub(self.last_tx) >= self.cfg.interval {
            self.last_tx = now;
            return Some(HealthAction::SendHeartbeat);
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(v: u64) -> Duration {
        Duration::from_millis(v)
    }

    #[test]
    fn overdue_exactly_when_a_tick_would_take_the_link_down() {
        let mut h = LinkHealth::new(HealthConfig {
            interval: ms(50),
            misses: 4,
        });
        h.on_up(ms(0));
        assert!(!h.is_overdue(ms(199)));
        assert!(h.is_overdue(ms(200)));
        // Late bytes found in the socket count as life: the link stays up.
        h.on_frame_received(ms(200));
        assert!(!h.is_overdue(ms(200)));
        assert_ne!(h.on_tick(ms(201)), Some(HealthAction::LinkDown));
        assert_eq!(h.on_tick(ms(400)), Some(HealthAction::LinkDown));
        assert!(!h.is_overdue(ms(400)), "a down link is not overdue");
    }

    #[test]
    fn heartbeats_every_interval_and_down_after_misses() {
        let mut h = LinkHealth::new(HealthConfig {
            interval: ms(100),
            misses: 3,
        });
        assert_eq!(h.on_tick(ms(0)), None);
        h.on_up(ms(0));
        assert_eq!(h.on_tick(ms(0)), None);
        assert_eq!(h.on_tick(ms(50)), None);
        assert_eq!(h.on_tick(ms(100)), Some(HealthAction::SendHeartbeat));
        h.on_frame_received(ms(150));
        assert_eq!(h.on_tick(ms(200)), Some(HealthAction::SendHeartbeat));
        // Sending data postpones heartbeats.
        h.on_frame_sent(ms(250));
        assert_eq!(h.on_tick(ms(300)), None);
        assert_eq!(h.on_tick(ms(449)), Some(HealthAction::SendHeartbeat));
        // 150 + 300 = 450: down.
        assert_eq!(h.on_tick(ms(450)), Some(HealthAction::LinkDown));
        assert!(!h.is_up());
        assert_eq!(h.on_tick(ms(10_000)), None);
        h.on_up(ms(10_000));
        assert!(h.is_up());
        assert_eq!(h.on_tick(ms(10_100)), Some(HealthAction::SendHeartbeat));
    }

    #[test]
    fn receiving_keeps_link_up() {
        let mut h = LinkHealth::new(HealthConfig {
            interval: ms(10),
            misses: 5,
        });
        h.on_up(ms(0));
        for t in 1..1000 {
            h.on_frame_received(ms(t * 40));
            assert_ne!(h.on_tick(ms(t * 40 + 5)), Some(HealthAction::LinkDown));
        }
        assert!(h.next_deadline(ms(39_965)) <= ms(10));
    }
}
