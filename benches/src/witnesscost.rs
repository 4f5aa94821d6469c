//! `ft-witness-cost`: what the quorum's lease renewals cost the guest (issue 14): kv
//! throughput (`redis-benchmark` SET/GET from the client namespace, as `ft-net`
//! measures it) of an FT pair on the lab topology without a quorum and with a
//! `twinrun witness` on the management network, in the same run, alternating which goes
//! first round by round so that drift in the machine's load hits both alike. Target: no
//! measurable difference. Figures, not asserts.

use std::path::Path;

use crate::ftwitness::{lab, start_pair};
use crate::redis::{kv_median, kv_rounds, kv_set_get, PIPELINES};
use crate::report::{Better, Figure};

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
    let out = kv_set_get(topo, n, || primary.log_tail(20));
    primary.kill();
    standby.kill();
    out
}

pub fn run(twinrun: &Path, elf: &Path, dir: &Path, quick: bool) -> Result<Vec<Figure>, String> {
    let rounds = if quick { 2 } else { 3 };
    let n = if quick { 2_000 } else { 5_000 };
    let dir = dir.join("ft-witness-cost");
    let (topo, waddr, wsecret, _witness) = lab(twinrun, &dir, "bc")?;
    let samples = kv_rounds(
        rounds,
        &[false, true],
        |with| if with { "with witness" } else { "no quorum" }.to_string(),
        |r, with| {
            let key = format!("bc-{}-{r}", if with { "w" } else { "n" });
            let witness = with.then_some((waddr, wsecret.as_path()));
            measure(twinrun, elf, &dir, &topo, witness, &key, n)
        },
    )?;
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
            let (w, wo) = (
                kv_median(&samples, true, i, what),
                kv_median(&samples, false, i, what),
            );
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
