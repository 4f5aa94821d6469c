//! The minimum-epoch sweep (section `ft-min-epoch`): the kv guest at the default epoch
//! length with several `--min-epoch-ms`, against the same guest unprotected.

use std::path::Path;

use crate::report::{Better, Figure};

use super::kv;
use super::sweep::{ratio, rps, SweepSizes};

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
