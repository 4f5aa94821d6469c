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

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use alink::{Alink, AlinkConfig, LinkAddrs, WindowLimits};
use checkpoint::primary::{run_primary, PrimaryDriverConfig, PrimaryReport};
use checkpoint::protocol::{PrimaryConfig, StandbyConfig};
use checkpoint::standby::{run_standby, StandbyOutcome};
use vmm::config::{ConsoleConfig, Payload, VmConfig, Workloads};
use vmm::{build_vm, Vmm};

use crate::report::{Better, Figure};

const SECRET: &[u8] = b"twinrun-bench-ft-cluster-secret";
const LOOP: &str = "loopback A-Link (not namespaces)";

fn vm(elf: &Path, console: &Path, mem_mib: u64, w: Workloads) -> VmConfig {
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

fn dirty(pages: u32, rate: u32) -> Workloads {
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
const MISSES_FAILOVER: u32 = 4;
const MISSES_WIDE: u32 = 25;

fn link_cfg(node: u64, peer: u64, remote: SocketAddr, misses: u32) -> AlinkConfig {
    let any: SocketAddr = "127.0.0.1:0".parse().expect("address literal");
    let mut c = AlinkConfig::new(
        21,
        node,
        peer,
        SECRET,
        vec![LinkAddrs { local: any, remote }],
    );
    // 20 ms heartbeats: with 4 misses the standby declares the primary dead after 80 ms.
    c.health.interval = Duration::from_millis(20);
    c.health.misses = misses;
    c.window = WindowLimits {
        max_msgs: 1024,
        max_bytes: 128 << 20,
    };
    c
}

/// A protected pair running in this process.
struct Pair {
    pvmm: Arc<Vmm>,
    pstop: Arc<AtomicBool>,
    sstop: Arc<AtomicBool>,
    acked: Arc<AtomicU64>,
    primary: Option<std::thread::JoinHandle<(Result<PrimaryReport, String>, Alink)>>,
    standby: std::thread::JoinHandle<(Result<StandbyOutcome, String>, Alink)>,
}

impl Pair {
    fn start(
        pcfg: &VmConfig,
        scfg: VmConfig,
        epoch: Duration,
        misses: u32,
    ) -> Result<Pair, String> {
        Pair::start_when(pcfg, scfg, epoch, misses, || true)
    }

    /// As [`Pair::start`], the primary's driver (hence the initial sync) starting only
    /// once `ready` says so (polled for at most 30 s).
    fn start_when(
        pcfg: &VmConfig,
        scfg: VmConfig,
        epoch: Duration,
        misses: u32,
        ready: impl Fn() -> bool,
    ) -> Result<Pair, String> {
        let any: SocketAddr = "127.0.0.1:0".parse().expect("address literal");
        let slink =
            Alink::start(link_cfg(2, 1, any, misses)).map_err(|e| format!("A-Link: {e}"))?;
        let plink = Alink::start(link_cfg(1, 2, slink.local_addrs()[0], misses))
            .map_err(|e| format!("A-Link: {e}"))?;
        let sstop = Arc::new(AtomicBool::new(false));
        let standby = {
            let sstop = sstop.clone();
            std::thread::spawn(move || {
                let r = run_standby(&slink, &scfg, StandbyConfig { max_staged: 4 }, &sstop)
                    .map_err(|e| e.to_string());
                (r, slink)
            })
        };
        let mut pvmm = build_vm(pcfg).map_err(|e| format!("build: {e}"))?;
        pvmm.set_console_positioned(None)
            .map_err(|e| format!("console: {e}"))?;
        pvmm.start().map_err(|e| format!("start: {e}"))?;
        let t = Instant::now();
        while !ready() {
            if t.elapsed() > Duration::from_secs(30) {
                return Err("the primary's guest never got ready".into());
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        let pvmm = Arc::new(pvmm);
        let pstop = Arc::new(AtomicBool::new(false));
        let acked = Arc::new(AtomicU64::new(0));
        let primary = {
            let (pstop, pvmm, acked) = (pstop.clone(), pvmm.clone(), acked.clone());
            std::thread::spawn(move || {
                let cfg = PrimaryDriverConfig {
                    protocol: PrimaryConfig {
                        epoch_len: epoch,
                        ..PrimaryConfig::default()
                    },
                    acked: Some(acked),
                    ..PrimaryDriverConfig::default()
                };
                let r = run_primary(&pvmm, &plink, &cfg, &pstop).map_err(|e| e.to_string());
                (r, plink)
            })
        };
        Ok(Pair {
            pvmm,
            pstop,
            sstop,
            acked,
            primary: Some(primary),
            standby,
        })
    }

    fn wait_protected(&mut self, limit: Duration) -> Result<Duration, String> {
        let t = Instant::now();
        while self.acked.load(Ordering::SeqCst) == 0 {
            let dead = self.primary.as_ref().is_none_or(|p| p.is_finished());
            if dead {
                // Say why: the primary's own error (or that it stopped without one).
                let why = match self.primary.take().map(|p| p.join()) {
                    Some(Ok((Err(e), _))) => e,
                    Some(Ok((Ok(_), _))) => "it stopped without an error".into(),
                    Some(Err(_)) => "its thread panicked".into(),
                    None => "it was already stopped".into(),
                };
                return Err(format!("the pair never committed epoch 0: primary: {why}"));
            }
            if t.elapsed() > limit {
                return Err(format!(
                    "the pair never committed epoch 0 within {:.1} s",
                    limit.as_secs_f64()
                ));
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        Ok(t.elapsed())
    }

    /// Stops the primary ("kill": driver stopped where it is, links dropped, VM
    /// stopped with its held output never released). Returns its report and the
    /// moment of the kill.
    fn kill_primary(&mut self) -> Result<(PrimaryReport, Instant), String> {
        self.pstop.store(true, Ordering::SeqCst);
        let pri = self.primary.take().ok_or("primary already stopped")?;
        let (r, plink) = pri.join().map_err(|_| "primary thread panicked")?;
        drop(plink);
        let t = Instant::now();
        self.pvmm.stopper().stop();
        Ok((r?, t))
    }

    /// Stops everything: standby first (it then stops rather than failing over).
    fn stop(self) -> Result<PrimaryReport, String> {
        self.sstop.store(true, Ordering::SeqCst);
        let Pair {
            standby,
            mut primary,
            pstop,
            pvmm,
            ..
        } = self;
        let (s, slink) = standby.join().map_err(|_| "standby panicked")?;
        if let StandbyOutcome::NoReplica = s? {
            return Err("the standby lost the primary before epoch 0 committed".into());
        }
        pstop.store(true, Ordering::SeqCst);
        let pri = primary.take().ok_or("primary already stopped")?;
        let (r, plink) = pri.join().map_err(|_| "primary thread panicked")?;
        drop((plink, slink));
        pvmm.stopper().stop();
        if let Ok(mut v) = Arc::try_unwrap(pvmm) {
            v.wait();
        }
        r
    }
}

/// Pages the throughput guest fills before its sync (128 MiB of 256: the dirty workload
/// takes at most half).
const FILL_PAGES: u32 = 32_768;

/// `D pass=` lines in `console` (one per pass over the dirty working set).
fn d_lines(console: &Path) -> u64 {
    std::fs::read(console)
        .map(|b| {
            b.split(|&c| c == b'\n')
                .filter(|l| l.starts_with(b"D pass="))
                .count() as u64
        })
        .unwrap_or(0)
}

fn pct(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i].as_secs_f64() * 1e6
}

pub fn run(elf: &Path, dir: &Path, quick: bool) -> Result<Vec<Figure>, String> {
    let mut figs = Vec::new();
    let f = |tag: &str| -> PathBuf { dir.join(format!("ft-{tag}.log")) };
    let secs = if quick { 1.5 } else { 3.0 };
    let default_epoch = PrimaryConfig::default().epoch_len;

    // Pause per epoch against dirty pages per epoch (nominal: rate x epoch length).
    for rate in [5_000u32, 50_000, 200_000] {
        let (p, s) = (f("pp"), f("ps"));
        let mut pair = Pair::start(
            &vm(elf, &p, 256, dirty(16_384, rate)),
            vm(elf, &s, 256, dirty(16_384, rate)),
            default_epoch,
            MISSES_FAILOVER,
        )?;
        pair.wait_protected(Duration::from_secs(20))?;
        std::thread::sleep(Duration::from_secs_f64(secs));
        let rep = pair.stop()?;
        // Epoch 0 is the stop-and-copy of the initial sync: not a steady-state pause.
        let mut pauses = rep.pauses.clone();
        pauses.sort();
        let per_epoch = f64::from(rate) * default_epoch.as_secs_f64();
        let name = format!("epoch pause at ~{per_epoch:.0} dirty pages/epoch");
        let note = format!(
            "256 MiB, dirty {rate} pages/s, {} ms epochs, {} epochs, {} throttles; {LOOP}",
            default_epoch.as_millis(),
            pauses.len(),
            rep.throttles
        );
        let mut p50 = Figure::new(
            "ft",
            &format!("{name} p50"),
            pct(&pauses, 0.5),
            "us",
            Better::Lower,
        )
        .note(note.clone());
        if rate == 50_000 {
            p50 = p50.target(1000.0, false, "< 1 ms at 1,000 pages/epoch");
        }
        figs.push(p50);
        figs.push(
            Figure::new(
                "ft",
                &format!("{name} p99"),
                pct(&pauses, 0.99),
                "us",
                Better::Lower,
            )
            .note(note),
        );
        let _ = std::fs::remove_file(&p);
        let _ = std::fs::remove_file(&s);
    }

    // Checkpoint throughput: the initial sync until epoch 0 commits, against raw TCP
    // over the same loopback. The guest first writes 128 MiB of its 256 with seeded
    // (non-zero) pages, once, so that the sync ships them (all-zero pages go as runs
    // without data and would make the figure meaningless).
    {
        let (p, s) = (f("tp"), f("ts"));
        let t = Instant::now();
        let fill = Workloads {
            counter: true,
            counter_rate: 10,
            dirty_passes: 1,
            ..dirty(FILL_PAGES, 0)
        };
        let mut pair = Pair::start_when(
            &vm(elf, &p, 256, fill.clone()),
            vm(elf, &s, 256, fill),
            default_epoch,
            MISSES_FAILOVER,
            || d_lines(&p) >= 1,
        )?;
        pair.wait_protected(Duration::from_secs(30))?;
        let total = t.elapsed();
        let rep = pair.stop()?;
        let took = rep.sync_time.ok_or("the primary reported no sync time")?;
        let ckpt = rep.sync_bytes as f64 / took.as_secs_f64() / 1e6;
        let raw = raw_tcp(if quick { 0.5 } else { 1.0 })?;
        figs.push(
            Figure::new("ft", "checkpoint throughput (initial sync)", ckpt, "MB/s", Better::Higher)
                .baseline("raw TCP, same loopback", raw)
                .target(0.8, true, ">= 80 % of raw TCP")
                .note(format!(
                    "256 MiB guest, {:.0} MiB sent ({} zero pages not sent), from sync round 0 to epoch 0 acked ({took:?}; with VM build and fill {total:?}): includes reading guest memory, checksums, mirror writes; {LOOP}",
                    rep.sync_bytes as f64 / 1048576.0,
                    rep.sync_zero_pages
                )),
        );
        let _ = std::fs::remove_file(&p);
        let _ = std::fs::remove_file(&s);
    }

    // Guest slowdown: dirty pages/s (D lines x working set) FT vs unprotected.
    {
        let pages = 2048u32;
        let w = dirty(pages, 0);
        let p = f("su");
        let mut alone = build_vm(&vm(elf, &p, 64, w.clone())).map_err(|e| e.to_string())?;
        alone.start().map_err(|e| e.to_string())?;
        std::thread::sleep(Duration::from_millis(300));
        let d0 = d_lines(&p);
        let t0 = Instant::now();
        std::thread::sleep(Duration::from_secs_f64(secs));
        let base = (d_lines(&p) - d0) as f64 * f64::from(pages) / t0.elapsed().as_secs_f64();
        alone.stopper().stop();
        alone.wait();
        drop(alone);
        let (fp, fs) = (f("sp"), f("ss"));
        let mut pair = Pair::start(
            &vm(elf, &fp, 64, w.clone()),
            vm(elf, &fs, 64, w),
            default_epoch,
            MISSES_FAILOVER,
        )?;
        pair.wait_protected(Duration::from_secs(20))?;
        std::thread::sleep(Duration::from_millis(300));
        let d0 = d_lines(&fp);
        let t0 = Instant::now();
        std::thread::sleep(Duration::from_secs_f64(secs));
        let ft = (d_lines(&fp) - d0) as f64 * f64::from(pages) / t0.elapsed().as_secs_f64();
        let rep = pair.stop()?;
        figs.push(
            Figure::new("ft", "dirty workload throughput in FT mode", ft, "pages/s", Better::Higher)
                .baseline("same guest unprotected", base)
                .target(0.8, true, ">= 80 % of unprotected at the default epoch")
                .note(format!(
                    "64 MiB, 2048-page working set, unpaced; {} ms epochs, {} throttles; D lines released by output commit; {LOOP}",
                    default_epoch.as_millis(),
                    rep.throttles
                )),
        );
        for x in [p, fp, fs] {
            let _ = std::fs::remove_file(x);
        }
    }

    // Failover: kill -> first console line the standby releases.
    let failover_once = |mem_mib: u64, run: u64| -> Result<Duration, String> {
        let (p, s) = (
            f(&format!("fp{mem_mib}-{run}")),
            f(&format!("fs{mem_mib}-{run}")),
        );
        let w = Workloads {
            counter: true,
            counter_rate: 1000,
            ..dirty(512, 20_000)
        };
        let mut pair = Pair::start(
            &vm(elf, &p, mem_mib, w.clone()),
            vm(elf, &s, mem_mib, w),
            default_epoch,
            MISSES_FAILOVER,
        )?;
        pair.wait_protected(Duration::from_secs(60))?;
        std::thread::sleep(Duration::from_millis(300 + 97 * run));
        let (_, t_kill) = pair.kill_primary()?;
        // The standby's console file gets its first byte when the failed-over VM (or
        // the re-release of committed output) writes it.
        let mut first = None;
        while t_kill.elapsed() < Duration::from_secs(5) {
            if std::fs::metadata(&s).map(|m| m.len() > 0).unwrap_or(false) {
                first = Some(t_kill.elapsed());
                break;
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        let (out, slink) = pair.standby.join().map_err(|_| "standby panicked")?;
        drop(slink);
        match out? {
            StandbyOutcome::FailedOver(mut v, _) => {
                v.stopper().stop();
                v.wait();
            }
            _ => return Err("the standby did not fail over".into()),
        }
        if let Ok(mut v) = Arc::try_unwrap(pair.pvmm) {
            v.wait();
        }
        let _ = std::fs::remove_file(&p);
        let _ = std::fs::remove_file(&s);
        first.ok_or_else(|| "the standby released no output within 5 s".to_string())
    };
    let mut times = Vec::new();
    for run in 0..if quick { 3 } else { 7 } {
        times.push(failover_once(64, run)?);
    }
    // A larger guest: the failed-over VM runs in the standby's mirror memory, so the
    // time must not grow with the guest's size.
    let mut big = Vec::new();
    for run in 0..if quick { 1 } else { 3 } {
        big.push(failover_once(1024, run)?);
    }
    big.sort();
    figs.push(
        Figure::new(
            "ft",
            "failover of a 1 GiB guest: kill -> first output max",
            pct(&big, 1.0) / 1e3,
            "ms",
            Better::Lower,
        )
        .target(1000.0, false, "never over 1 s")
        .note(format!(
            "{} runs; as below, 1 GiB guest (the VM takes over the mirror's memory, no copy); {LOOP}",
            big.len()
        )),
    );
    times.sort();
    let note = format!(
        "{} runs; 20 ms heartbeats x 4 misses (80 ms detection); console file, 64 MiB counter+dirty; {LOOP}",
        times.len()
    );
    figs.push(
        Figure::new(
            "ft",
            "failover: kill -> first output from the standby p50",
            pct(&times, 0.5) / 1e3,
            "ms",
            Better::Lower,
        )
        .target(500.0, false, "< 500 ms")
        .note(note.clone()),
    );
    figs.push(
        Figure::new(
            "ft",
            "failover: kill -> first output from the standby max",
            pct(&times, 1.0) / 1e3,
            "ms",
            Better::Lower,
        )
        .target(1000.0, false, "never over 1 s")
        .note(note),
    );
    Ok(figs)
}

/// Raw TCP throughput over loopback, one connection, `secs` seconds (MB/s).
fn raw_tcp(secs: f64) -> Result<f64, String> {
    let l = TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    let addr = l.local_addr().map_err(|e| e.to_string())?;
    let rx = std::thread::spawn(move || {
        let Ok((mut s, _)) = l.accept() else {
            return (0u64, Duration::ZERO);
        };
        let mut buf = vec![0u8; 1 << 20];
        let mut total = 0u64;
        let t = Instant::now();
        while let Ok(n) = s.read(&mut buf) {
            if n == 0 {
                break;
            }
            total += n as u64;
        }
        (total, t.elapsed())
    });
    let mut s = TcpStream::connect(addr).map_err(|e| e.to_string())?;
    let buf = vec![0x5au8; 1 << 20];
    let end = Instant::now() + Duration::from_secs_f64(secs);
    while Instant::now() < end {
        s.write_all(&buf).map_err(|e| e.to_string())?;
    }
    drop(s);
    let (total, took) = rx.join().map_err(|_| "receiver panicked")?;
    Ok(total as f64 / took.as_secs_f64() / 1e6)
}

// ---------------------------------------------------------------------------------
// Epoch-length sweep (section `ft-epoch`): the figures the default epoch length is
// chosen from, every epoch length measured in the same run against the same
// unprotected baselines.

/// Epoch lengths the sweep measures and how long it measures each.
#[derive(Clone)]
pub struct SweepSizes {
    pub epochs_ms: Vec<u64>,
    /// `--min-epoch-ms` values tried for the kv guest at the default epoch length (an
    /// epoch with output waiting ends after this: the knob that sets how many replies
    /// one checkpoint carries).
    pub min_epochs_ms: Vec<f64>,
    /// Seconds of each dirty-workload measurement.
    pub dirty_secs: f64,
    /// `redis-benchmark -n` per pipeline depth.
    pub bench_n: u32,
    /// SET round trips for the latency percentiles.
    pub latency_samples: usize,
    /// `redis-benchmark -c` of the kv rows.
    pub clients: u32,
    /// Also measure the kv guest (unprotected and FT at the default epoch) with this
    /// many clients: redis-benchmark's own default, 50.
    pub many_clients: u32,
}

impl SweepSizes {
    pub fn new(quick: bool) -> SweepSizes {
        if quick {
            SweepSizes {
                epochs_ms: vec![5, 20, 40],
                min_epochs_ms: vec![0.0, 0.5, 2.0],
                dirty_secs: 1.0,
                bench_n: 2_000,
                latency_samples: 200,
                clients: crate::redis::CLIENTS,
                many_clients: 50,
            }
        } else {
            SweepSizes {
                epochs_ms: vec![5, 10, 20, 40, 80],
                min_epochs_ms: vec![0.0, 0.25, 0.5, 1.0, 2.0, 5.0],
                dirty_secs: 2.0,
                bench_n: 5_000,
                latency_samples: 500,
                clients: crate::redis::CLIENTS,
                many_clients: 50,
            }
        }
    }
}

/// Unpaced dirtier: the worst case for dirty tracking (every page written every pass).
const SWEEP_UNPACED_PAGES: u32 = 2048;
/// Paced dirtier: a guest that keeps up unprotected; pages per epoch grow with the
/// epoch length (50 at 5 ms, 800 at 80 ms, all distinct in the 1,024-page working
/// set), so its pause shows what a longer epoch costs in stall per checkpoint. Its
/// 10 passes/s make a fine-grained rate.
const SWEEP_PACED_PAGES: u32 = 1024;
const SWEEP_PACED_RATE: u32 = 10_000;
const SWEEP_GROUP: &str = "ft-epoch";

/// Pages/s of the dirty workload from its `D pass=` lines over about `secs`: the file
/// is polled every 2 ms and the rate taken between the first and the last new line
/// seen, so a partial pass at either end does not count (in FT mode the lines come
/// out an epoch late, by output commit, which shifts both ends alike).
fn d_rate(console: &Path, pages: u32, secs: f64) -> f64 {
    let end = Instant::now() + Duration::from_secs_f64(secs);
    let mut last = d_lines(console);
    let mut first: Option<(u64, Instant)> = None;
    let mut latest: Option<(u64, Instant)> = None;
    while Instant::now() < end {
        std::thread::sleep(Duration::from_millis(2));
        let n = d_lines(console);
        if n != last {
            let now = (n, Instant::now());
            first.get_or_insert(now);
            latest = Some(now);
            last = n;
        }
    }
    match (first, latest) {
        (Some((n0, t0)), Some((n1, t1))) if n1 > n0 => {
            (n1 - n0) as f64 * f64::from(pages) / (t1 - t0).as_secs_f64()
        }
        _ => 0.0,
    }
}

/// The dirty workload's pages/s, unprotected, 64 MiB.
fn dirty_alone(elf: &Path, console: &Path, w: &Workloads, secs: f64) -> Result<f64, String> {
    let mut v = build_vm(&vm(elf, console, 64, w.clone())).map_err(|e| e.to_string())?;
    v.start().map_err(|e| e.to_string())?;
    std::thread::sleep(Duration::from_millis(300));
    let r = d_rate(console, w.dirty_pages, secs);
    v.stopper().stop();
    v.wait();
    let _ = std::fs::remove_file(console);
    Ok(r)
}

/// One FT run of the dirty workload (64 MiB, in-process pair over loopback).
struct FtDirty {
    pages_s: f64,
    /// Sum of the epoch pauses over the protected wall time.
    pause_share: f64,
    p50_us: f64,
    p99_us: f64,
    epochs: usize,
    throttles: u64,
    /// Protected wall time the pauses are counted over.
    window: Duration,
}

fn dirty_ft(
    elf: &Path,
    dir: &Path,
    w: &Workloads,
    epoch: Duration,
    secs: f64,
) -> Result<FtDirty, String> {
    let (p, s) = (dir.join("ft-sweep-p.log"), dir.join("ft-sweep-s.log"));
    let mut pair = Pair::start(
        &vm(elf, &p, 64, w.clone()),
        vm(elf, &s, 64, w.clone()),
        epoch,
        MISSES_WIDE,
    )?;
    if let Err(e) = pair.wait_protected(Duration::from_secs(20)) {
        // The drivers' own errors say why.
        let why = match pair.stop() {
            Ok(_) => "both drivers stopped cleanly".to_string(),
            Err(d) => d,
        };
        return Err(format!("{} ms epochs: {e} ({why})", epoch.as_millis()));
    }
    let t_prot = Instant::now();
    std::thread::sleep(Duration::from_millis(300));
    let pages_s = d_rate(&p, w.dirty_pages, secs);
    let window = t_prot.elapsed();
    let rep = pair.stop()?;
    let _ = std::fs::remove_file(&p);
    let _ = std::fs::remove_file(&s);
    let mut pauses = rep.pauses;
    pauses.sort();
    let paused: Duration = pauses.iter().sum();
    Ok(FtDirty {
        pages_s,
        pause_share: paused.as_secs_f64() / window.as_secs_f64(),
        p50_us: pct(&pauses, 0.5),
        p99_us: pct(&pauses, 0.99),
        epochs: pauses.len(),
        throttles: rep.throttles,
        window,
    })
}

/// One sweep row: everything measured at one epoch length.
struct SweepRow {
    epoch_ms: u64,
    unpaced_base: f64,
    unpaced: FtDirty,
    paced_base: f64,
    paced: FtDirty,
    kv: kv::Side,
}

/// Runs the sweep: per epoch length, the unpaced and paced dirty workloads (in-process
/// pair over loopback, each against the same guest unprotected just before it) and the
/// kv guest (real `twinrun` processes on the demo topology, against the same guest
/// unprotected at the start and at the end of the sweep). Prints a table.
pub fn sweep(
    twinrun: &Path,
    elf: &Path,
    dir: &Path,
    sz: &SweepSizes,
) -> Result<Vec<Figure>, String> {
    let unpaced = dirty(SWEEP_UNPACED_PAGES, 0);
    let paced = dirty(SWEEP_PACED_PAGES, SWEEP_PACED_RATE);
    let con = dir.join("ft-sweep-u.log");
    let topo = kv::topology()?;
    eprintln!("   kv unprotected (before) ...");
    let kv_before = kv::unprotected(twinrun, elf, dir, &topo, sz)?;
    let mut rows = Vec::new();
    for &ms in &sz.epochs_ms {
        let epoch = Duration::from_millis(ms);
        eprintln!("   epoch {ms} ms: dirty workloads ...");
        let unpaced_base = dirty_alone(elf, &con, &unpaced, sz.dirty_secs)?;
        let unpaced_ft = dirty_ft(elf, dir, &unpaced, epoch, sz.dirty_secs)?;
        let paced_base = dirty_alone(elf, &con, &paced, sz.dirty_secs)?;
        let paced_ft = dirty_ft(elf, dir, &paced, epoch, sz.dirty_secs)?;
        eprintln!("   epoch {ms} ms: kv FT pair ...");
        let kv_ft = kv::protected(twinrun, elf, dir, &topo, sz, ms)?;
        rows.push(SweepRow {
            epoch_ms: ms,
            unpaced_base,
            unpaced: unpaced_ft,
            paced_base,
            paced: paced_ft,
            kv: kv_ft,
        });
    }
    eprintln!("   kv unprotected (after) ...");
    let kv_after = kv::unprotected(twinrun, elf, dir, &topo, sz)?;
    drop(topo);
    let kv_base = kv::Side::mean(&kv_before, &kv_after);
    println!("{}", sweep_table(&rows, &kv_base, &kv_before, &kv_after));
    Ok(sweep_figures(&rows, &kv_base, sz))
}

/// The minimum-epoch sweep (`--only ft-min-epoch`): the kv guest at the default epoch
/// length with each `--min-epoch-ms` of `sz`, with `sz.clients` and with
/// `sz.many_clients` clients, against the same guest unprotected with as many clients
/// (measured before and after the FT runs; mean).
pub fn min_epoch_sweep(
    twinrun: &Path,
    elf: &Path,
    dir: &Path,
    sz: &SweepSizes,
) -> Result<Vec<Figure>, String> {
    let topo = kv::topology()?;
    let mut tables = Vec::new();
    let mut figs = Vec::new();
    for clients in [sz.clients, sz.many_clients] {
        let at = SweepSizes {
            clients,
            ..sz.clone()
        };
        eprintln!("   {clients} clients: kv unprotected (before) ...");
        let before = kv::unprotected(twinrun, elf, dir, &topo, &at)?;
        let mut rows = Vec::new();
        for &min in &sz.min_epochs_ms {
            eprintln!("   {clients} clients: kv FT pair, min epoch {min} ms ...");
            let args = ["--min-epoch-ms".to_string(), min.to_string()];
            rows.push((
                min,
                kv::protected_with(twinrun, elf, dir, &topo, &at, &args)?,
            ));
        }
        eprintln!("   {clients} clients: kv unprotected (after) ...");
        let after = kv::unprotected(twinrun, elf, dir, &topo, &at)?;
        let base = kv::Side::mean(&before, &after);
        tables.push(format!(
            "{clients} clients, unprotected: -P 1 {:.0} / {:.0} req/s (before / after), SET p50 {:.2} ms\n{}",
            rps(&before, 0),
            rps(&after, 0),
            kv::pct(&base.lat_ms, 0.5),
            min_epoch_table(&rows, &base)
        ));
        figs.extend(min_epoch_figures(&rows, &base, clients));
    }
    drop(topo);
    for t in tables {
        println!("{t}");
    }
    Ok(figs)
}

/// kv figures per `--min-epoch-ms` (default epoch length).
fn min_epoch_table(rows: &[(f64, kv::Side)], base: &kv::Side) -> String {
    let mut t = String::from(
        "kv guest per min epoch (epoch 20 ms); ratios are FT / unprotected, same run\n \
         min ms |     P1    P16 | lat p50 ms  p99 ms | added p50 ms | epochs/s  pause p50 us  pages/epoch  commit p50 us\n",
    );
    let base_p50 = kv::pct(&base.lat_ms, 0.5);
    for (min, s) in rows {
        let p50 = kv::pct(&s.lat_ms, 0.5);
        t.push_str(&format!(
            " {min:>6} | {:>6.2} {:>6.2} | {:>10.2} {:>7.2} | {:>12.2} | {:>8.0} {:>12.0} {:>12.1} {:>14.0}\n",
            ratio(rps(s, 0), rps(base, 0)),
            ratio(rps(s, 1), rps(base, 1)),
            p50,
            kv::pct(&s.lat_ms, 0.99),
            p50 - base_p50,
            s.epochs.map_or(f64::NAN, |e| e as f64 / s.window.as_secs_f64()),
            s.pause_p50.map_or(f64::NAN, |d| d.as_secs_f64() * 1e6),
            s.epoch_pages.unwrap_or(f64::NAN),
            s.commit_p50.map_or(f64::NAN, |d| d.as_secs_f64() * 1e6),
        ));
    }
    t
}

fn min_epoch_figures(rows: &[(f64, kv::Side)], base: &kv::Side, clients: u32) -> Vec<Figure> {
    let mut out = Vec::new();
    for (min, s) in rows {
        out.push(
            Figure::new(
                "ft-min-epoch",
                &format!("kv SET/GET -P 1 -c {clients} at min epoch {min} ms"),
                rps(s, 0),
                "req/s",
                Better::Higher,
            )
            .baseline("same guest unprotected, same clients", rps(base, 0))
            .target(0.8, true, ">= 80 % of unprotected"),
        );
        out.push(
            Figure::new(
                "ft-min-epoch",
                &format!("kv added SET latency p50 -c {clients} at min epoch {min} ms"),
                kv::pct(&s.lat_ms, 0.5) - kv::pct(&base.lat_ms, 0.5),
                "ms",
                Better::Lower,
            )
            .note("target: within the epoch length (20 ms) + 2 ms"),
        );
    }
    out
}

/// Mean of SET and GET requests/s at pipeline index `i`.
fn rps(s: &kv::Side, i: usize) -> f64 {
    (s.rps[i].0 + s.rps[i].1) / 2.0
}

fn ratio(v: f64, base: f64) -> f64 {
    if base > 0.0 {
        v / base
    } else {
        f64::NAN
    }
}

fn sweep_table(rows: &[SweepRow], base: &kv::Side, before: &kv::Side, after: &kv::Side) -> String {
    use std::fmt::Write as _;
    let mut t = String::new();
    let default_ms = PrimaryConfig::default().epoch_len.as_millis();
    let _ = writeln!(
        t,
        "epoch-length sweep (default now {default_ms} ms); ratios are FT / unprotected, same run"
    );
    let _ = writeln!(
        t,
        "kv unprotected: -P 1 {:.0} / {:.0} req/s (before / after), -P 16 {:.0} / {:.0}, SET p50 {:.2} ms",
        rps(before, 0),
        rps(after, 0),
        rps(before, 1),
        rps(after, 1),
        kv::pct(&base.lat_ms, 0.5)
    );
    let _ = writeln!(
        t,
        "{:>6} | {:>8} {:>8} {:>7} | {:>8} {:>8} {:>8} {:>7} | {:>6} {:>6} {:>7} {:>7} {:>7} {:>7}",
        "epoch",
        "unpaced",
        "pause",
        "epochs",
        "paced",
        "pause",
        "pause",
        "pause",
        "kv",
        "kv",
        "lat",
        "lat",
        "added",
        "kv"
    );
    let _ = writeln!(
        t,
        "{:>6} | {:>8} {:>8} {:>7} | {:>8} {:>8} {:>8} {:>7} | {:>6} {:>6} {:>7} {:>7} {:>7} {:>7}",
        "ms",
        "ratio",
        "share",
        "/s",
        "ratio",
        "p50 us",
        "p99 us",
        "share",
        "P1",
        "P16",
        "p50 ms",
        "p99 ms",
        "p50 ms",
        "pause~"
    );
    for r in rows {
        let _ = writeln!(
            t,
            "{:>6} | {:>8.2} {:>7.1}% {:>7.0} | {:>8.2} {:>8.0} {:>8.0} {:>6.1}% | {:>6.2} {:>6.2} {:>7.2} {:>7.2} {:>7.2} {:>6.1}%",
            r.epoch_ms,
            ratio(r.unpaced.pages_s, r.unpaced_base),
            r.unpaced.pause_share * 100.0,
            r.unpaced.epochs as f64 / r.unpaced.window.as_secs_f64(),
            ratio(r.paced.pages_s, r.paced_base),
            r.paced.p50_us,
            r.paced.p99_us,
            r.paced.pause_share * 100.0,
            ratio(rps(&r.kv, 0), rps(base, 0)),
            ratio(rps(&r.kv, 1), rps(base, 1)),
            kv::pct(&r.kv.lat_ms, 0.5),
            kv::pct(&r.kv.lat_ms, 0.99),
            kv::pct(&r.kv.lat_ms, 0.5) - kv::pct(&base.lat_ms, 0.5),
            r.kv.pause_share().map_or(f64::NAN, |s| s * 100.0),
        );
    }
    t
}

fn sweep_figures(rows: &[SweepRow], base: &kv::Side, sz: &SweepSizes) -> Vec<Figure> {
    let g = SWEEP_GROUP;
    let mut figs = Vec::new();
    let (up50, up99) = (kv::pct(&base.lat_ms, 0.5), kv::pct(&base.lat_ms, 0.99));
    for r in rows {
        let e = r.epoch_ms;
        let (u, p) = (&r.unpaced, &r.paced);
        figs.push(
            Figure::new(g, &format!("{e} ms: unpaced dirty"), u.pages_s, "pages/s", Better::Higher)
                .baseline("same guest unprotected, just before", r.unpaced_base)
                .target(0.8, true, ">= 80 % of unprotected")
                .note(format!(
                    "64 MiB, {SWEEP_UNPACED_PAGES}-page working set, unpaced; {} epochs, {} throttles; {LOOP}",
                    u.epochs, u.throttles
                )),
        );
        figs.push(
            Figure::new(g, &format!("{e} ms: unpaced pause share"), u.pause_share * 100.0, "%", Better::Lower)
                .note(format!(
                    "sum of epoch pauses / protected wall time ({:.1} s); pause p50 {:.0} us p99 {:.0} us",
                    u.window.as_secs_f64(), u.p50_us, u.p99_us
                )),
        );
        let nominal = f64::from(SWEEP_PACED_RATE) * e as f64 / 1e3;
        let pnote = format!(
            "64 MiB, dirty {SWEEP_PACED_RATE} pages/s over {SWEEP_PACED_PAGES} pages (~{nominal:.0} pages/epoch nominal); {} epochs, {} throttles, pause share {:.1} %; {LOOP}",
            p.epochs, p.throttles, p.pause_share * 100.0
        );
        figs.push(
            Figure::new(
                g,
                &format!("{e} ms: paced dirty"),
                p.pages_s,
                "pages/s",
                Better::Higher,
            )
            .baseline("same guest unprotected, just before", r.paced_base)
            .target(0.8, true, ">= 80 % of unprotected")
            .note(pnote.clone()),
        );
        figs.push(
            Figure::new(
                g,
                &format!("{e} ms: paced pause p50"),
                p.p50_us,
                "us",
                Better::Lower,
            )
            .note(pnote.clone()),
        );
        figs.push(
            Figure::new(
                g,
                &format!("{e} ms: paced pause p99"),
                p.p99_us,
                "us",
                Better::Lower,
            )
            .note(pnote),
        );
        for (i, depth) in kv::PIPELINES.iter().enumerate() {
            figs.push(
                Figure::new(
                    g,
                    &format!("{e} ms: kv -P {depth} (mean of SET, GET)"),
                    rps(&r.kv, i),
                    "req/s",
                    Better::Higher,
                )
                .baseline(kv::UNPROT, rps(base, i))
                .target(0.8, true, ">= 80 % of unprotected")
                .note(format!(
                    "redis-benchmark -t set,get -c 10 -n {}; real processes on the demo topology, 2 A-Links",
                    sz.bench_n
                )),
            );
        }
        let lnote = format!(
            "SET round trip, one at a time, {} samples; real processes on the demo topology",
            r.kv.lat_ms.len()
        );
        let fp50 = kv::pct(&r.kv.lat_ms, 0.5);
        figs.push(
            Figure::new(
                g,
                &format!("{e} ms: request latency p50"),
                fp50,
                "ms",
                Better::Lower,
            )
            .baseline(kv::UNPROT, up50)
            .note(lnote.clone()),
        );
        figs.push(
            Figure::new(
                g,
                &format!("{e} ms: request latency p99"),
                kv::pct(&r.kv.lat_ms, 0.99),
                "ms",
                Better::Lower,
            )
            .baseline(kv::UNPROT, up99)
            .note(lnote),
        );
        figs.push(
            Figure::new(
                g,
                &format!("{e} ms: added request latency p50"),
                fp50 - up50,
                "ms",
                Better::Lower,
            )
            .target(e as f64 + 2.0, false, &format!("< epoch {e} ms + 2 ms"))
            .note("FT p50 - unprotected p50; a reply leaves when the standby acks its epoch"),
        );
        figs.push(
            Figure::new(
                g,
                &format!("{e} ms: kv pause share (estimate)"),
                r.kv.pause_share().map_or(f64::NAN, |s| s * 100.0),
                "%",
                Better::Lower,
            )
            .note(format!(
                "epochs captured x pause p50 (from the primary's exit log: {} epochs, p50 {:?}) / protected wall time {:.1} s",
                r.kv.epochs.map_or("?".to_string(), |n| n.to_string()),
                r.kv.pause_p50.unwrap_or_default(),
                r.kv.window.as_secs_f64()
            )),
        );
    }
    figs
}

/// The kv guest as real `twinrun` processes on the demo topology (the `ft-net`
/// set-up), with the epoch length given on the command line.
mod kv {
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
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::kv::{parse_debug_duration, parse_report};

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
