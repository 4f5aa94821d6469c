//! The kv guest as real `twinrun` processes on the demo topology (the `ft-net` set-up:
//! netns pm1, pm2, lan, client), unprotected and as an FT pair with the epoch length
//! given on the command line, for the two sweeps.

use std::path::Path;
use std::time::{Duration, Instant};

use twinrun_lab::Topology;

use super::SweepSizes;
use crate::ftnet::{self, read_log, Load, Pair};

pub(crate) use crate::ftnet::{pct, PIPELINES};
pub const UNPROT: &str = "same guest unprotected, same topology (mean of before and after)";
/// The prefix of this sweep's files (`ftsweep-u.log`, ...), apart from `ft-net`'s.
const TAG: &str = "ftsweep";

/// One guest configuration's results.
pub struct Side {
    /// (SET, GET) requests/s per entry of [`PIPELINES`].
    pub rps: Vec<(f64, f64)>,
    /// Sorted SET round trips, ms.
    pub lat_ms: Vec<f64>,
    /// From the FT primary's exit log: epochs captured and pause p50.
    pub epochs: Option<u64>,
    pub pause_p50: Option<Duration>,
    /// Mean dirty pages per epoch, from the same line.
    pub epoch_pages: Option<f64>,
    /// Commit wait p50 (capture end to ack), from the same line.
    pub commit_p50: Option<Duration>,
    /// Protected wall time (FT) or measurement time (unprotected).
    pub window: Duration,
}

impl Side {
    fn measured(m: ftnet::Side) -> Side {
        Side {
            rps: m.rps,
            lat_ms: m.lat_ms,
            epochs: None,
            pause_p50: None,
            epoch_pages: None,
            commit_p50: None,
            window: m.window,
        }
    }

    /// Two unprotected measurements as one baseline: mean requests/s, latencies
    /// pooled.
    pub fn mean(a: &Side, b: &Side) -> Side {
        let rps = a
            .rps
            .iter()
            .zip(&b.rps)
            .map(|(x, y)| ((x.0 + y.0) / 2.0, (x.1 + y.1) / 2.0))
            .collect();
        let mut lat_ms: Vec<f64> = a.lat_ms.iter().chain(&b.lat_ms).copied().collect();
        lat_ms.sort_by(f64::total_cmp);
        Side {
            rps,
            lat_ms,
            epochs: None,
            pause_p50: None,
            epoch_pages: None,
            commit_p50: None,
            window: a.window + b.window,
        }
    }

    /// Estimated share of wall time the guest spent paused for checkpoints.
    pub fn pause_share(&self) -> Option<f64> {
        let (n, p50) = (self.epochs?, self.pause_p50?);
        let w = self.window.as_secs_f64();
        (w > 0.0).then(|| n as f64 * p50.as_secs_f64() / w)
    }
}

pub fn topology() -> Result<Topology, String> {
    Topology::create(&format!("be{}", std::process::id() % 1_000_000))
        .map_err(|e| format!("demo topology: {e}"))
}

fn load(sz: &SweepSizes) -> Load {
    Load {
        bench_n: sz.bench_n,
        latency_samples: sz.latency_samples,
        clients: sz.clients,
    }
}

pub fn unprotected(
    twinrun: &Path,
    elf: &Path,
    dir: &Path,
    topo: &Topology,
    sz: &SweepSizes,
) -> Result<Side, String> {
    ftnet::unprotected(twinrun, elf, dir, topo, TAG, &load(sz)).map(Side::measured)
}

/// An FT pair with `--epoch-ms epoch_ms`, measured once the primary is protected.
pub fn protected(
    twinrun: &Path,
    elf: &Path,
    dir: &Path,
    topo: &Topology,
    sz: &SweepSizes,
    epoch_ms: u64,
) -> Result<Side, String> {
    let extra = ["--epoch-ms".to_string(), epoch_ms.to_string()];
    protected_with(twinrun, elf, dir, topo, sz, &extra)
}

/// An FT pair whose primary gets `extra` flags, measured once it is protected.
pub fn protected_with(
    twinrun: &Path,
    elf: &Path,
    dir: &Path,
    topo: &Topology,
    sz: &SweepSizes,
    extra: &[String],
) -> Result<Side, String> {
    let id = format!(
        "sweep-{}-{}",
        std::process::id(),
        extra.join("").replace('-', "")
    );
    let mut pair = Pair::start(twinrun, elf, dir, topo, TAG, &id, extra)?;
    let t_prot = Instant::now();
    let r = ftnet::measure(topo, &load(sz));
    let window = t_prot.elapsed();
    // The primary's report (epochs, pauses) is what this sweep reads from it.
    pair.stop(Duration::from_secs(3))?;
    let m = r.map_err(|e| format!("FT: {e}\nprimary log:\n{}", read_log(&pair.plog)))?;
    let mut side = Side::measured(m);
    let (epochs, p50) = parse_report(&read_log(&pair.plog));
    if epochs.is_none() || p50.is_none() {
        let log = read_log(&pair.plog);
        let tail: Vec<&str> = log.lines().rev().take(5).collect();
        eprintln!("   no epoch report in the primary's log; its last lines: {tail:?}");
    }
    side.epochs = epochs;
    side.pause_p50 = p50;
    side.epoch_pages = parse_pages(&read_log(&pair.plog));
    side.commit_p50 = parse_commit_wait(&read_log(&pair.plog));
    side.window = window;
    for p in [&pair.secret, &pair.plog, &pair.slog, &pair.pcon, &pair.scon] {
        let _ = std::fs::remove_file(p);
    }
    Ok(side)
}

/// Epochs captured and pause p50 from the primary's first report line, the one of
/// the measured session (`... N epochs captured, ... pause p50 Some(412.5µs) ...`;
/// once its standby is gone the primary opens a session 2 and, stopped, reports
/// that one too, empty).
pub fn parse_report(log: &str) -> (Option<u64>, Option<Duration>) {
    let Some(line) = log.lines().find(|l| l.contains("epochs captured")) else {
        return (None, None);
    };
    let epochs = line
        .split(" epochs captured")
        .next()
        .and_then(|s| s.rsplit(' ').next())
        .and_then(|n| n.parse().ok());
    let p50 = line
        .split("pause p50 Some(")
        .nth(1)
        .and_then(|s| s.split(')').next())
        .and_then(parse_debug_duration);
    (epochs, p50)
}

/// Mean dirty pages per epoch from the primary's report line (`... 41.5 dirty
/// pages per epoch ...`).
pub fn parse_pages(log: &str) -> Option<f64> {
    let line = log.lines().find(|l| l.contains("epochs captured"))?;
    line.split(" dirty pages per epoch")
        .next()
        .and_then(|s| s.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
}

/// Commit wait p50 from the primary's report line (`commit wait p50 Some(..)`).
pub fn parse_commit_wait(log: &str) -> Option<Duration> {
    let line = log.lines().find(|l| l.contains("epochs captured"))?;
    line.split("commit wait p50 Some(")
        .nth(1)
        .and_then(|s| s.split(')').next())
        .and_then(parse_debug_duration)
}

/// A `Duration`'s `Debug` text (`12ns`, `412.5µs`, `1.2ms`, `3s`).
pub fn parse_debug_duration(s: &str) -> Option<Duration> {
    let split = s.find(|c: char| !(c.is_ascii_digit() || c == '.'))?;
    let (num, unit) = s.split_at(split);
    let v: f64 = num.parse().ok()?;
    let ns_per_unit = match unit {
        "ns" => 1.0,
        "µs" | "us" => 1e3,
        "ms" => 1e6,
        "s" => 1e9,
        _ => return None,
    };
    let ns = (v * ns_per_unit).round();
    (0.0..1e18)
        .contains(&ns)
        .then(|| Duration::from_nanos(ns as u64))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::{parse_debug_duration, parse_report};

    #[test]
    fn debug_durations() {
        let d = |s| parse_debug_duration(s);
        assert_eq!(d("12ns"), Some(Duration::from_nanos(12)));
        assert_eq!(d("412.5µs"), Some(Duration::from_nanos(412_500)));
        assert_eq!(d("3ms"), Some(Duration::from_millis(3)));
        assert_eq!(d("2s"), Some(Duration::from_secs(2)));
        assert_eq!(d("5 parsecs"), None);
        assert_eq!(d("ms"), None);
    }

    #[test]
    fn primary_report_line() {
        let log = "INFO FT primary: protected\n\
                   INFO FT primary: 2 sync rounds, 345 epochs captured, 344 acknowledged, \
                   released through Some(343), pause p50 Some(412.5µs) p99 Some(1.2ms), 0 throttles\n\
                   INFO FT primary: waiting for a standby (session 2)\n\
                   INFO FT primary: 0 sync rounds, 0 epochs captured, 0 acknowledged, \
                   released through None, pause p50 None p99 None, 0 throttles\n";
        assert_eq!(
            parse_report(log),
            (Some(345), Some(Duration::from_nanos(412_500)))
        );
        assert_eq!(parse_report("nothing here"), (None, None));
    }
}
