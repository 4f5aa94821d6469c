//! `twinrun vm migrate VM [--to NODE]`: the command, then a progress bar fed by
//! `GET /vms/{name}/migration` (pre-copy rounds, bytes sent, the guest's dirty rate,
//! the estimated time to the final pause) until the VM runs on the target, or the
//! migration is given up (the VM runs on where it was: an error with the reason).

use std::io::Write;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

use crate::cli::{api, exit};
use crate::client::Client;
use crate::cluster::MIGRATE_TIMEOUT_MS;
use crate::model::{MigrationView, Protection, VmView};

/// How often the progress is asked.
const POLL: Duration = Duration::from_millis(200);

/// Follows the migration of `vm` (as it was `before` the command) to its end.
pub fn follow(
    c: &Client,
    vm: &str,
    before: &VmView,
    out: &mut impl Write,
) -> Result<(), (i32, String)> {
    let from = before.owner.clone();
    let swap = before.spec.protection != Protection::Unprotected;
    let bar = ProgressBar::new(before.spec.mem_mib << 20);
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} {elapsed_precise} [{bar:30}] {bytes}/{total_bytes} {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    bar.enable_steady_tick(Duration::from_millis(120));
    let t0 = Instant::now();
    let limit = Duration::from_millis(MIGRATE_TIMEOUT_MS + 60_000);
    let mut last: Option<MigrationView> = None;
    loop {
        let m = api(c.migration(vm))?;
        if m.owner != from && m.owner.is_some() && !m.active {
            bar.finish_and_clear();
            let figures = last.as_ref().map(figures).unwrap_or_default();
            let _ = writeln!(
                out,
                "{vm}: migrated to {} in {:.1} s{figures}",
                m.owner.as_deref().unwrap_or("?"),
                t0.elapsed().as_secs_f64()
            );
            return Ok(());
        }
        let given_up = if swap {
            m.reason.contains("failback not done")
        } else {
            !m.active
        };
        if given_up {
            bar.abandon();
            return Err((
                exit::FAILED,
                format!(
                    "{vm}: the migration was given up; it runs on {}: {}",
                    m.owner.as_deref().unwrap_or("no node"),
                    m.reason
                ),
            ));
        }
        if t0.elapsed() > limit {
            bar.abandon();
            return Err((
                exit::FAILED,
                format!(
                    "{vm}: not migrated after {} s ({}); see `twinrun vm show {vm}`",
                    limit.as_secs(),
                    m.reason
                ),
            ));
        }
        let sent = m.bytes_sent.unwrap_or(0);
        bar.set_length(m.memory_bytes.max(sent));
        bar.set_position(sent);
        bar.set_message(format!("{}{}", m.reason, figures(&m)));
        last = Some(m);
        std::thread::sleep(POLL);
    }
}

/// The pre-copy's figures, where the node answering has them.
fn figures(m: &MigrationView) -> String {
    let mut s = String::new();
    if let Some(r) = m.rounds {
        s += &format!(" | {r} round(s)");
    }
    if let Some(d) = m.dirty_pages_per_s {
        s += &format!(" | {d} pages/s dirtied");
    }
    if let Some(e) = m.eta_ms {
        s += &format!(" | ETA {:.1} s", e as f64 / 1e3);
    }
    if m.in_sync {
        s += " | in sync";
    }
    s
}
