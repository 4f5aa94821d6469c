//! The `ft` section: epoch pause at several dirty rates, checkpoint throughput of the
//! initial sync against raw TCP, the dirty workload's slowdown, failover time.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use checkpoint::protocol::PrimaryConfig;
use checkpoint::standby::StandbyOutcome;
use vmm::build_vm;
use vmm::config::Workloads;

use crate::report::{Better, Figure};

use super::pair::{Links, Pair};
use super::{d_lines, dirty, pct, vm, FILL_PAGES, LOOP, MISSES_FAILOVER};

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
    // without data and would make the figure meaningless). Three ways, same run: the
    // sync's lent sends and placed receives (A-Link protocol 4) over one link and over
    // two, and the staged path a protocol-3 session keeps (copies on both sides).
    {
        let current = alink::PROTOCOL_VERSION;
        let ways = [
            (
                "lent+placed, 1 link",
                Links {
                    n: 1,
                    protocol: current,
                },
            ),
            (
                "staged (A-Link protocol 3), 1 link",
                Links {
                    n: 1,
                    protocol: current - 1,
                },
            ),
            (
                "lent+placed, 2 links",
                Links {
                    n: 2,
                    protocol: current,
                },
            ),
        ];
        let mut got = Vec::new();
        for (way, links) in ways {
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
                links,
                || d_lines(&p) >= 1,
            )?;
            pair.wait_protected(Duration::from_secs(30))?;
            let total = t.elapsed();
            let rep = pair.stop()?;
            let took = rep.sync_time.ok_or("the primary reported no sync time")?;
            let ckpt = rep.sync_bytes as f64 / took.as_secs_f64() / 1e6;
            got.push((way, ckpt, took, total, rep.sync_bytes, rep.sync_zero_pages));
            let _ = std::fs::remove_file(&p);
            let _ = std::fs::remove_file(&s);
        }
        let raw = raw_tcp(if quick { 0.5 } else { 1.0 })?;
        let mut bars: Vec<(String, f64)> = got
            .iter()
            .map(|(way, ckpt, ..)| (format!("twinrun initial sync (256 MiB), {way}"), *ckpt))
            .collect();
        bars.push(("raw TCP, 1 stream".into(), raw));
        crate::series::bars(
            "sync-loopback",
            "initial sync MB/s against raw TCP, loopback, same run (checkpoint path of this branch)",
            bars,
        );
        for (i, (way, ckpt, took, total, bytes, zero)) in got.into_iter().enumerate() {
            let name = if i == 0 {
                "checkpoint throughput (initial sync)".to_string()
            } else {
                format!("checkpoint throughput (initial sync), {way}")
            };
            figs.push(
                Figure::new("ft", &name, ckpt, "MB/s", Better::Higher)
                    .baseline("raw TCP, same loopback", raw)
                    .target(0.8, true, ">= 80 % of raw TCP")
                    .note(format!(
                        "{way}; 256 MiB guest, {:.0} MiB sent ({zero} zero pages not sent), from sync round 0 to epoch 0 acked ({took:?}; with VM build and fill {total:?}): includes reading guest memory, checksums, mirror writes; {LOOP}",
                        bytes as f64 / 1048576.0,
                    )),
            );
        }
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
    for (label, v) in [("64 MiB guest", &times), ("1 GiB guest", &big)] {
        let n = v.len() as f64;
        crate::series::line(
            "failover-cdf",
            "failover: kill -> first output (ms), cumulative share of runs",
            label,
            v.iter()
                .enumerate()
                .map(|(i, d)| (d.as_secs_f64() * 1e3, (i + 1) as f64 / n))
                .collect(),
        );
    }
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
