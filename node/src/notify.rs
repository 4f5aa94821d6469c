//! systemd's notify protocol (`Type=notify`): READY=1 once the daemon serves, STATUS=
//! lines, WATCHDOG=1 pings, STOPPING=1. Without `NOTIFY_SOCKET` (not under systemd)
//! every call does nothing.

use std::time::Duration;

use sd_notify::NotifyState;

pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

pub fn status(status: &str) {
    send(&[NotifyState::Status(status)]);
}

pub fn stopping() {
    send(&[
        NotifyState::Stopping,
        NotifyState::Status("stopping (VMMs keep running)"),
    ]);
}

pub fn watchdog() {
    send(&[NotifyState::Watchdog]);
}

/// The ping period: a quarter of `WATCHDOG_USEC` (systemd's advice is half; a quarter
/// leaves room for a loaded machine), or None when no watchdog is asked for. As
/// libsystemd's sd_watchdog_enabled: `WATCHDOG_PID`, when set, must be this process.
pub fn watchdog_period() -> Option<Duration> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    if let Ok(pid) = std::env::var("WATCHDOG_PID") {
        if pid.parse::<u32>().ok()? != std::process::id() {
            return None;
        }
    }
    (usec > 0).then(|| Duration::from_micros(usec / 4).max(Duration::from_millis(10)))
}

fn send(states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(false, states) {
        log::warn!("systemd notify: {e}");
    }
}
