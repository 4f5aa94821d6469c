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

fn link_cfg(node: u64, peer: u64, remote: SocketAddr) -> AlinkConfig {
    let any: SocketAddr = "127.0.0.1:0".parse().expect("address literal");
    let mut c = AlinkConfig::new(
        21,
        node,
        peer,
        SECRET,
        vec![LinkAddrs { local: any, remote }],
    );
    // 20 ms heartbeats, 4 misses: the standby declares the primary dead after 80 ms.
    c.health.interval = Duration::from_millis(20);
    c.health.misses = 4;
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
    fn start(pcfg: &VmConfig, scfg: VmConfig, epoch: Duration) -> Result<Pair, String> {
        let any: SocketAddr = "127.0.0.1:0".parse().expect("address literal");
        let slink = Alink::start(link_cfg(2, 1, any)).map_err(|e| format!("A-Link: {e}"))?;
        let plink = Alink::start(link_cfg(1, 2, slink.local_addrs()[0]))
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

    fn wait_protected(&self, limit: Duration) -> Result<Duration, String> {
        let t = Instant::now();
        while self.acked.load(Ordering::SeqCst) == 0 {
            let dead = self.primary.as_ref().is_none_or(|p| p.is_finished());
            if t.elapsed() > limit || dead {
                return Err("the pair never committed epoch 0".into());
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
        s?;
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
        let pair = Pair::start(
            &vm(elf, &p, 256, dirty(16_384, rate)),
            vm(elf, &s, 256, dirty(16_384, rate)),
            default_epoch,
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

    // Checkpoint throughput: the initial sync (all 256 MiB) until epoch 0 commits,
    // against raw TCP over the same loopback.
    {
        let (p, s) = (f("tp"), f("ts"));
        let t = Instant::now();
        let pair = Pair::start(
            &vm(elf, &p, 256, dirty(64, 1000)),
            vm(elf, &s, 256, dirty(64, 1000)),
            default_epoch,
        )?;
        let took = pair.wait_protected(Duration::from_secs(30))?;
        let total = t.elapsed();
        pair.stop()?;
        let bytes = 256.0 * 1048576.0;
        let ckpt = bytes / took.as_secs_f64() / 1e6;
        let raw = raw_tcp(if quick { 0.5 } else { 1.0 })?;
        figs.push(
            Figure::new("ft", "checkpoint throughput (initial sync)", ckpt, "MB/s", Better::Higher)
                .baseline("raw TCP, same loopback", raw)
                .target(0.8, true, ">= 80 % of raw TCP")
                .note(format!(
                    "256 MiB from the drivers' start to epoch 0 acked ({took:?}; with VM build {total:?}): includes reading guest memory, checksums, mirror writes; {LOOP}"
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
        let pair = Pair::start(
            &vm(elf, &fp, 64, w.clone()),
            vm(elf, &fs, 64, w),
            default_epoch,
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
    let mut times = Vec::new();
    for run in 0..if quick { 3 } else { 7 } {
        let (p, s) = (f(&format!("fp{run}")), f(&format!("fs{run}")));
        let w = Workloads {
            counter: true,
            counter_rate: 1000,
            ..dirty(512, 20_000)
        };
        let mut pair = Pair::start(
            &vm(elf, &p, 64, w.clone()),
            vm(elf, &s, 64, w),
            default_epoch,
        )?;
        pair.wait_protected(Duration::from_secs(20))?;
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
        times.push(first.ok_or("the standby released no output within 5 s")?);
        let _ = std::fs::remove_file(&p);
        let _ = std::fs::remove_file(&s);
    }
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
