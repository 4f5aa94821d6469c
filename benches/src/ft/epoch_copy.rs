//! The `ft-epoch-copy` section (issue 17 item 2): epoch pages copied in the pause (the
//! default) against copied after it with the pages write-protected by userfaultfd
//! (`EpochCopy::WriteProtect`), same run, runs of the two modes interleaved: epoch
//! pause p50/p99 and the dirty workload's pages/s at ~100, ~1,000 and ~4,000 dirty
//! pages per epoch (paced), and unpaced against the same guest unprotected.

use std::path::{Path, PathBuf};
use std::time::Duration;

use checkpoint::primary::EpochCopy;
use checkpoint::protocol::PrimaryConfig;
use vmm::build_vm;

use crate::report::{Better, Figure};

use super::pair::Pair;
use super::sweep::d_rate;
use super::{dirty, pct, vm, LOOP, MISSES_WIDE};

fn mode_name(m: EpochCopy) -> &'static str {
    match m {
        EpochCopy::InPause => "copy in pause",
        EpochCopy::WriteProtect => "copy after pause (uffd-wp)",
    }
}

/// One FT run: pauses (sorted), pages/s, pages per epoch, throttles, handler copies.
struct Run {
    pauses: Vec<Duration>,
    rate: f64,
    per_epoch: f64,
    throttles: u64,
    handler_copies: u64,
    other_faults: u64,
    hot_per_epoch: f64,
    ioctls_per_epoch: f64,
}

/// `files`: the primary's and the standby's console.
fn ft_run(
    elf: &Path,
    (p, s): (&Path, &Path),
    mem_mib: u64,
    ws: u32,
    rate: u32,
    secs: f64,
    mode: (EpochCopy, bool),
) -> Result<Run, String> {
    let epoch = PrimaryConfig::default().epoch_len;
    let mut pair = Pair::start_copy(
        &vm(elf, p, mem_mib, dirty(ws, rate)),
        vm(elf, s, mem_mib, dirty(ws, rate)),
        epoch,
        MISSES_WIDE,
        mode,
    )?;
    pair.wait_protected(Duration::from_secs(30))?;
    std::thread::sleep(Duration::from_millis(300));
    let r = d_rate(p, ws, secs);
    let rep = pair.stop()?;
    let mut pauses = rep.pauses.clone();
    // Epoch 0 is the stop-and-copy of the initial sync: not a steady-state pause.
    if !pauses.is_empty() {
        pauses.remove(0);
    }
    pauses.sort();
    let n = rep.epochs_captured.saturating_sub(1).max(1);
    Ok(Run {
        pauses,
        rate: r,
        per_epoch: rep.epoch_pages as f64 / n as f64,
        throttles: rep.throttles,
        handler_copies: rep.epoch_copy_handler_copies,
        other_faults: rep.epoch_copy_other_faults,
        hot_per_epoch: rep.hot_pages as f64 / n as f64,
        ioctls_per_epoch: rep.epoch_copy_ioctls as f64 / n as f64,
    })
}

pub fn run(elf: &Path, dir: &Path, quick: bool) -> Result<Vec<Figure>, String> {
    let mut figs = Vec::new();
    let f = |tag: &str| -> PathBuf { dir.join(format!("ftec-{tag}.log")) };
    let secs = if quick { 2.0 } else { 4.0 };
    let reps = if quick { 1 } else { 2 };
    let modes = [EpochCopy::InPause, EpochCopy::WriteProtect];
    let epoch_ms = PrimaryConfig::default().epoch_len.as_millis();
    let mut table = String::from(
        "| pages/epoch (nominal) | mode | pause p50 us | pause p99 us | pages/epoch seen (hot) | guest pages/s | throttles | handler copies / other faults | uffd ioctls/epoch |\n| --- | --- | --- | --- | --- | --- | --- | --- | --- |\n",
    );
    // Paced: ~100, ~1,000, ~4,000 pages per 20 ms epoch. Working set: a pass about
    // every 200 ms (the rate is read from its per-pass lines), at most 64 MiB.
    for rate in [5_000u32, 50_000, 200_000] {
        let ws = (rate / 5).clamp(1024, 16_384);
        let nominal = f64::from(rate) * PrimaryConfig::default().epoch_len.as_secs_f64();
        let mut per_mode: Vec<Vec<Run>> = vec![Vec::new(), Vec::new()];
        for k in 0..reps {
            // Alternate which mode goes first.
            for i in 0..2 {
                let m = (i + k) % 2;
                let (p, s) = (f("p"), f("s"));
                per_mode[m].push(ft_run(
                    elf,
                    (&p, &s),
                    256,
                    ws,
                    rate,
                    secs,
                    (modes[m], true),
                )?);
                let _ = std::fs::remove_file(&p);
                let _ = std::fs::remove_file(&s);
            }
        }
        let mut p50s = [0.0; 2];
        for (m, runs) in per_mode.iter().enumerate() {
            let mut all: Vec<Duration> = runs.iter().flat_map(|r| r.pauses.clone()).collect();
            all.sort();
            let rate_seen = runs.iter().map(|r| r.rate).sum::<f64>() / runs.len() as f64;
            let per_epoch = runs.iter().map(|r| r.per_epoch).sum::<f64>() / runs.len() as f64;
            let throttles: u64 = runs.iter().map(|r| r.throttles).sum();
            let hc: u64 = runs.iter().map(|r| r.handler_copies).sum();
            let of: u64 = runs.iter().map(|r| r.other_faults).sum();
            let hot = runs.iter().map(|r| r.hot_per_epoch).sum::<f64>() / runs.len() as f64;
            let io = runs.iter().map(|r| r.ioctls_per_epoch).sum::<f64>() / runs.len() as f64;
            let (p50, p99) = (pct(&all, 0.5), pct(&all, 0.99));
            p50s[m] = p50;
            table.push_str(&format!(
                "| {nominal:.0} | {} | {p50:.0} | {p99:.0} | {per_epoch:.0} ({hot:.0}) | {rate_seen:.0} | {throttles} | {hc} / {of} | {io:.0} |\n",
                mode_name(modes[m])
            ));
            let note = format!(
                "256 MiB, dirty {rate} pages/s over {ws} pages, {epoch_ms} ms epochs, {} epochs in {} runs, {per_epoch:.0} pages/epoch seen, {throttles} throttles, {hc} pages copied by the fault handler; {LOOP}",
                all.len(),
                runs.len()
            );
            let name = format!("~{nominal:.0} pages/epoch, {}", mode_name(modes[m]));
            figs.push(
                Figure::new(
                    "ft-epoch-copy",
                    &format!("pause p50 {name}"),
                    p50,
                    "us",
                    Better::Lower,
                )
                .note(note.clone()),
            );
            figs.push(
                Figure::new(
                    "ft-epoch-copy",
                    &format!("pause p99 {name}"),
                    p99,
                    "us",
                    Better::Lower,
                )
                .note(note.clone()),
            );
            figs.push(
                Figure::new(
                    "ft-epoch-copy",
                    &format!("guest pages/s {name}"),
                    rate_seen,
                    "pages/s",
                    Better::Higher,
                )
                .baseline("paced rate", f64::from(rate))
                .note(note),
            );
        }
        eprintln!(
            "ft-epoch-copy: ~{nominal:.0} pages/epoch: pause p50 {:.0} us in pause, {:.0} us after",
            p50s[0], p50s[1]
        );
    }
    // Unpaced: as fast as the guest can write, 64 MiB, 2048-page working set (the `ft`
    // section's slowdown figure), against the same guest unprotected.
    {
        let ws = 2048u32;
        let p = f("alone");
        let mut alone = build_vm(&vm(elf, &p, 64, dirty(ws, 0))).map_err(|e| e.to_string())?;
        alone.start().map_err(|e| e.to_string())?;
        std::thread::sleep(Duration::from_millis(300));
        let base = d_rate(&p, ws, secs);
        alone.stopper().stop();
        alone.wait();
        drop(alone);
        let _ = std::fs::remove_file(&p);
        // With the hot-page policy (the default) and without it: hot pages stay
        // writable in KVM's dirty log, and write protection takes that away each epoch.
        let variants = [
            (EpochCopy::InPause, true),
            (EpochCopy::WriteProtect, true),
            (EpochCopy::InPause, false),
            (EpochCopy::WriteProtect, false),
        ];
        for (mode, hot) in variants {
            let (p, s) = (f("up"), f("us"));
            let r = ft_run(elf, (&p, &s), 64, ws, 0, secs, (mode, hot))?;
            let _ = std::fs::remove_file(&p);
            let _ = std::fs::remove_file(&s);
            let (p50, p99) = (pct(&r.pauses, 0.5), pct(&r.pauses, 0.99));
            table.push_str(&format!(
                "| unpaced{} | {} | {p50:.0} | {p99:.0} | {:.0} ({:.0}) | {:.0} (unprotected {base:.0}) | {} | {} / {} | {:.0} |\n",
                if hot { "" } else { ", no hot pages" },
                mode_name(mode),
                r.per_epoch,
                r.hot_per_epoch,
                r.rate,
                r.throttles,
                r.handler_copies,
                r.other_faults,
                r.ioctls_per_epoch
            ));
            let name = format!(
                "unpaced{}, {}",
                if hot { "" } else { " no hot pages" },
                mode_name(mode)
            );
            let note = format!(
                "64 MiB, 2048-page working set, unpaced; {epoch_ms} ms epochs, {} epochs, {:.0} pages/epoch seen, {} throttles, {} handler copies; {LOOP}",
                r.pauses.len(),
                r.per_epoch,
                r.throttles,
                r.handler_copies
            );
            figs.push(
                Figure::new(
                    "ft-epoch-copy",
                    &format!("guest pages/s {name}"),
                    r.rate,
                    "pages/s",
                    Better::Higher,
                )
                .baseline("same guest unprotected", base)
                .note(note.clone()),
            );
            figs.push(
                Figure::new(
                    "ft-epoch-copy",
                    &format!("pause p50 {name}"),
                    p50,
                    "us",
                    Better::Lower,
                )
                .note(note.clone()),
            );
            figs.push(
                Figure::new(
                    "ft-epoch-copy",
                    &format!("pause p99 {name}"),
                    p99,
                    "us",
                    Better::Lower,
                )
                .note(note),
            );
        }
    }
    eprintln!("ft-epoch-copy table:\n{table}");
    Ok(figs)
}
