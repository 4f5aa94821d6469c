//! FT mode (issue 4): a primary and a standby in this process (the checkpoint drivers,
//! as `checkpoint/tests/failover.rs` runs them) over one A-Link on **loopback** TCP
//! (not between network namespaces: labelled so in every figure's note).
//!
//! Figures: epoch pause p50/p99 at several dirty rates; checkpoint throughput (the
//! initial synchronisation of a 256 MiB guest: all of its memory over the A-Link)
//! against raw TCP over the same loopback in the same run; the dirty workload's
//! pages/s in FT mode against the same guest unprotected; failover time from the
//! primary's "kill" to the first console line the standby releases. Not measured here
//! (no TAP path in this section): redis-benchmark requests/s and added request latency.
//!
//! Files, one concern each: [`pair`] (the in-process primary and standby), [`section`]
//! (the `ft` section's measurements), [`sweep`] (the epoch-length sweep, `ft-epoch`),
//! [`min_epoch`] (the minimum-epoch sweep, `ft-min-epoch`), [`kv`] (real `twinrun`
//! processes on the demo topology, for both sweeps), [`overhead`] (what a protected VM
//! costs in memory and CPU beyond the guest's own), [`epoch_copy`] (epoch pages copied
//! in the pause or after it, `ft-epoch-copy`).

mod epoch_copy;
mod kv;
mod min_epoch;
mod overhead;
mod pair;
mod section;
mod sweep;

use std::path::Path;
use std::time::Duration;

use vmm::config::{ConsoleConfig, Payload, VmConfig, Workloads};

pub use epoch_copy::run as epoch_copy;
pub use min_epoch::min_epoch_sweep;
pub use overhead::overhead;
pub use section::run;
pub use sweep::{sweep, SweepSizes};

pub(crate) const SECRET: &[u8] = b"twinrun-bench-ft-cluster-secret";
pub(crate) const LOOP: &str = "loopback A-Link (not namespaces)";

pub(crate) fn vm(elf: &Path, console: &Path, mem_mib: u64, w: Workloads) -> VmConfig {
    VmConfig {
        mem_mib,
        vcpus: 1,
        payload: Payload::TestGuest {
            elf: elf.to_owned(),
            workloads: w,
        },
        disks: vec![],
        nets: vec![],
        console: ConsoleConfig::File {
            path: console.to_owned(),
        },
    }
}

pub(crate) fn dirty(pages: u32, rate: u32) -> Workloads {
    Workloads {
        dirty: true,
        dirty_pages: pages,
        dirty_rate: rate,
        dirty_seed: 3,
        ..Workloads::default()
    }
}

/// Heartbeat misses before the standby declares the primary dead: 4 x 20 ms where
/// failover time is measured; the sweep, which measures no failover, uses a wide
/// window so that a busy 2-core machine (initial sync next to an unpaced dirtier)
/// cannot cause a false one.
pub(crate) const MISSES_FAILOVER: u32 = 4;
pub(crate) const MISSES_WIDE: u32 = 25;

/// Pages the throughput guest fills before its sync (128 MiB of 256: the dirty workload
/// takes at most half).
pub(crate) const FILL_PAGES: u32 = 32_768;

/// `D pass=` lines in `console` (one per pass over the dirty working set).
pub(crate) fn d_lines(console: &Path) -> u64 {
    std::fs::read(console)
        .map(|b| {
            b.split(|&c| c == b'\n')
                .filter(|l| l.starts_with(b"D pass="))
                .count() as u64
        })
        .unwrap_or(0)
}

pub(crate) fn pct(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i].as_secs_f64() * 1e6
}
