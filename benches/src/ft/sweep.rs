//! Epoch-length sweep (section `ft-epoch`): the figures the default epoch length is
//! chosen from, every epoch length measured in the same run against the same
//! unprotected baselines.

use std::path::Path;
use std::time::{Duration, Instant};

use checkpoint::protocol::PrimaryConfig;
use vmm::build_vm;
use vmm::config::Workloads;

use crate::report::{Better, Figure};

use super::kv;
use super::pair::Pair;
use super::{d_lines, dirty, pct, vm, LOOP, MISSES_WIDE};

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
pub(super) fn d_rate(console: &Path, pages: u32, secs: f64) -> f64 {
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

/// Mean of SET and GET requests/s at pipeline index `i`.
pub(super) fn rps(s: &kv::Side, i: usize) -> f64 {
    (s.rps[i].0 + s.rps[i].1) / 2.0
}

pub(super) fn ratio(v: f64, base: f64) -> f64 {
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
