//! `ft-witness-cost`: what the quorum's lease renewals cost the guest (issue 14): kv
//! throughput (`redis-benchmark` SET/GET from the client namespace, as `ft-net`
//! measures it) of an FT pair on the lab topology without a quorum and with a
//! `twinrun witness` on the management network, in the same run, alternating which goes
//! first round by round so that drift in the machine's load hits both alike. Target: no
//! measurable difference. Figures, not asserts.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use crate::ftwitness::{lab, start_pair};
use crate::report::{Better, Figure};

/// Median of `v` (sorted here).
fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// (SET, GET) requests/s per pipeline depth of one protected pair.
fn measure(
    twinrun: &Path,
    elf: &Path,
    dir: &Path,
    topo: &twinrun_lab::Topology,
    witness: Option<crate::ftwitness::WitnessRef<'_>>,
    key: &str,
    n: u32,
) -> Result<Vec<(f64, f64)>, String> {
    // A wide detection window, as `ft-net`: a false failover on the busy machine would
    // measure a takeover, not the lease renewals.
    let wide = ["--heartbeat-misses", "20"];
    let (mut primary, mut standby) = start_pair(twinrun, elf, dir, topo, witness, key, 0, &wide)?;
    let host = topo.guest_ip().to_string();
    let mut out = Vec::new();
    for p in PIPELINES {
        let c = topo.client.ns.command("redis-benchmark");
        let r = crate::redis::set_get(
            c,
            &host,
            n,
            p,
            crate::redis::CLIENTS,
            Duration::from_secs(120),
        )
        .map_err(|e| format!("{e}\n{}", primary.log_tail(20)))?;
        out.push(r);
    }
    primary.kill();
    standby.kill();
    Ok(out)
}

const PIPELINES: [u32; 2] = [1, 16];

pub fn run(twinrun: &Path, elf: &Path, dir: &Path, quick: bool) -> Result<Vec<Figure>, String> {
    let rounds = if quick { 2 } else { 3 };
    let n = if quick { 2_000 } else { 5_000 };
    let dir = dir.join("ft-witness-cost");
    let (topo, waddr, wsecret, _witness) = lab(twinrun, &dir, "bc")?;
    // (with a witness, pipeline index, SET or GET) -> requests/s of each round.
    let mut samples: BTreeMap<(bool, usize, &str), Vec<f64>> = BTreeMap::new();
    for r in 0..rounds {
        let order = if r % 2 == 0 {
            [false, true]
        } else {
            [true, false]
        };
        for with in order {
            let key = format!("bc-{}-{r}", if with { "w" } else { "n" });
            let witness = with.then_some((waddr, wsecret.as_path()));
            let got = measure(twinrun, elf, &dir, &topo, witness, &key, n)?;
            for (i, (set, get)) in got.into_iter().enumerate() {
                eprintln!(
                    "   round {r} {}: -P{} SET {set:.0} GET {get:.0} req/s",
                    if with { "with witness" } else { "no quorum" },
                    PIPELINES[i]
                );
                samples.entry((with, i, "SET")).or_default().push(set);
                samples.entry((with, i, "GET")).or_default().push(get);
            }
        }
    }
    let note = format!(
        "median of {rounds} rounds, each a fresh pair (order alternating); redis-benchmark \
         -n {n} -c {} from the client namespace; kv guest, 64 MiB; witness: UDP on the \
         management network, default lease; --heartbeat-misses 20 on both; no quorum: the \
         same pair without --witness",
        crate::redis::CLIENTS
    );
    let mut figs = Vec::new();
    for (i, p) in PIPELINES.iter().enumerate() {
        for what in ["SET", "GET"] {
            let mut med = |with: bool| median(samples.entry((with, i, what)).or_default());
            let (w, wo) = (med(true), med(false));
            figs.push(
                Figure::new(
                    "ft-witness-cost",
                    &format!("FT kv {what} -P{p} with a witness"),
                    w,
                    "req/s",
                    Better::Higher,
                )
                .baseline("no quorum", wo)
                .note(note.clone()),
            );
        }
    }
    Ok(figs)
}
