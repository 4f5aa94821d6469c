//! `twinrun disk`: the replication state of mirrored disks and online verify.
//!
//! - `twinrun disk status (--name N | --image PATH...) [--json]`: live from the running
//!   FT primary N (its control socket), or offline from the replica metadata beside
//!   each image (e.g. on a PM whose VM is stopped).
//! - `twinrun disk verify --name N [--wait] [--timeout-secs S]`: asks the running
//!   primary for an online verify of every disk; with `--wait`, waits for it to end and
//!   prints the result.
//!
//! Exit codes: 0 done (verify: no range differs); 1 the VM could not be reached or
//! answered oddly, a verify was cut short or timed out; 2 bad input (flags, unknown VM,
//! no such image, a VM that does not mirror its disks, no standby in sync); 3 the
//! verify found differing ranges (marked for resync, not fixed).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use clap::{ArgGroup, Args, Subcommand};

use crate::exit;
use twinrun_control::disks::{self, DiskView, VERIFY_RUNNING};
use twinrun_control::{self as control, Op, Response};

/// Exit code of `twinrun disk verify --wait` when ranges differ.
pub const VERIFY_DIFFERS: i32 = 3;

const CALL_TIMEOUT: Duration = Duration::from_secs(10);
const POLL_INTERVAL: Duration = Duration::from_millis(200);

#[derive(Debug, Subcommand)]
pub enum DiskCommand {
    /// Replication state of each disk: state, generations, blocks to copy, resync
    /// progress, last verify, unclean flag.
    ///
    /// Exit codes: 0 shown; 1 the VM could not be reached; 2 bad input.
    Status(StatusArgs),
    /// Online verify: both replicas' digests compared range by range while the guest
    /// runs; differences are marked for resync, never silently fixed.
    ///
    /// Exit codes: 0 started (or, with --wait, no range differs); 1 the VM could not be
    /// reached, the verify was cut short or timed out; 2 bad input or no standby in
    /// sync; 3 ranges differ.
    Verify(VerifyArgs),
}

/// Flags of `twinrun disk status`: exactly one source.
#[derive(Debug, Args)]
#[command(group(ArgGroup::new("source").required(true).multiple(false)
    .args(["name", "images"])))]
pub struct StatusArgs {
    /// Name of a running FT primary (live view through its control socket).
    #[arg(long, value_name = "NAME")]
    pub name: Option<String>,
    /// Disk images to read the replica metadata of (offline view; repeatable).
    #[arg(long = "image", value_name = "PATH", num_args = 1..)]
    pub images: Vec<PathBuf>,
    /// Print one JSON array (one object per disk) instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// Name of the running FT primary.
    #[arg(long, value_name = "NAME")]
    pub name: String,
    /// Wait until the verify ends and print its result (exit 3 if ranges differ).
    #[arg(long)]
    pub wait: bool,
    /// With --wait: give up after this many seconds (exit 1).
    #[arg(long, value_name = "S", default_value_t = 3600, requires = "wait")]
    pub timeout_secs: u64,
}

/// A failure: (exit code, message).
type Failure = (i32, String);

fn usage(m: String) -> Failure {
    (exit::USAGE, m)
}

pub fn run(cmd: &DiskCommand) -> i32 {
    let r = match cmd {
        DiskCommand::Status(a) => status(a),
        DiskCommand::Verify(a) => verify(a),
    };
    match r {
        Ok(code) => code,
        Err((code, msg)) => {
            eprintln!("twinrun: error: {msg}");
            code
        }
    }
}

fn status(a: &StatusArgs) -> Result<i32, Failure> {
    let (title, views) = match &a.name {
        Some(name) => (
            format!("VM {name} (live, from the running primary)"),
            live(name)?.iter().map(DiskView::live).collect::<Vec<_>>(),
        ),
        None => (
            "offline (replica metadata)".to_string(),
            offline(&a.images)?,
        ),
    };
    if a.json {
        let j = serde_json::to_string_pretty(&views)
            .map_err(|e| (exit::GUEST_FAILED, format!("encoding JSON: {e}")))?;
        println!("{j}");
    } else {
        print!("{}", describe(&title, &views));
    }
    Ok(exit::OK)
}

/// Every image exists before any is read: a typo is bad input, not a state.
fn offline(images: &[PathBuf]) -> Result<Vec<DiskView>, Failure> {
    for p in images {
        match std::fs::metadata(p) {
            Ok(md) if md.is_dir() => {
                return Err(usage(format!(
                    "{} is a directory, not a disk image",
                    p.display()
                )))
            }
            Ok(_) => {}
            Err(e) => return Err(usage(format!("no such image {}: {e}", p.display()))),
        }
    }
    images
        .iter()
        .map(|p| disks::offline(p).map_err(|e| (exit::GUEST_FAILED, e)))
        .collect()
}

/// The control socket of the running VM `name`, checked to exist.
fn socket(name: &str) -> Result<PathBuf, Failure> {
    control::socket_of(name).map_err(usage)
}

fn live(name: &str) -> Result<Vec<storage_mirror::primary::DiskStatus>, Failure> {
    let sock = socket(name)?;
    live_at(name, &sock)
}

fn live_at(name: &str, sock: &Path) -> Result<Vec<storage_mirror::primary::DiskStatus>, Failure> {
    match control::call(sock, Op::DiskStatus, CALL_TIMEOUT) {
        Ok(Response::Disks { disks }) => Ok(disks),
        // The VM refuses only a VM that does not mirror its disks.
        Ok(Response::Error { message }) => Err(usage(format!("{name}: {message}"))),
        Ok(other) => Err((
            exit::GUEST_FAILED,
            format!("unexpected reply from {name}: {other:?}"),
        )),
        Err(e) => Err((exit::GUEST_FAILED, e)),
    }
}

fn verify(a: &VerifyArgs) -> Result<i32, Failure> {
    let sock = socket(&a.name)?;
    // What the last verify of each disk was, to recognise the one asked for here.
    let before = live_at(&a.name, &sock)?;
    let already = match control::call(&sock, Op::DiskVerify, CALL_TIMEOUT) {
        Ok(Response::Ok) => false,
        Ok(Response::Error { message }) if message == VERIFY_RUNNING && a.wait => true,
        Ok(Response::Error { message }) if message == VERIFY_RUNNING => {
            return Err((exit::GUEST_FAILED, format!("{}: {message}", a.name)))
        }
        Ok(Response::Error { message }) => return Err(usage(format!("{}: {message}", a.name))),
        Ok(other) => {
            return Err((
                exit::GUEST_FAILED,
                format!("unexpected reply from {}: {other:?}", a.name),
            ))
        }
        Err(e) => return Err((exit::GUEST_FAILED, e)),
    };
    if !a.wait {
        println!(
            "verify of {} disk(s) of {} started; see `twinrun disk status --name {}`",
            before.len(),
            a.name,
            a.name
        );
        return Ok(exit::OK);
    }
    if already {
        eprintln!(
            "twinrun: a verify is already running on {}; waiting for it",
            a.name
        );
    }
    let deadline = Instant::now() + Duration::from_secs(a.timeout_secs);
    loop {
        std::thread::sleep(POLL_INTERVAL);
        let now = live_at(&a.name, &sock)?;
        match verify_outcome(&before, &now) {
            Outcome::Running => {}
            Outcome::CutShort(why) => {
                return Err((
                    exit::GUEST_FAILED,
                    format!("the verify of {} was cut short: {why}", a.name),
                ))
            }
            Outcome::Done => {
                print!("{}", describe_verify(&a.name, &now));
                let differs = now
                    .iter()
                    .filter_map(|d| d.verify)
                    .any(|v| v.ranges_differing > 0);
                return Ok(if differs { VERIFY_DIFFERS } else { exit::OK });
            }
        }
        if Instant::now() >= deadline {
            return Err((
                exit::GUEST_FAILED,
                format!(
                    "the verify of {} did not end within {} s (still running: see `twinrun disk status --name {}`)",
                    a.name, a.timeout_secs, a.name
                ),
            ));
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    Running,
    Done,
    CutShort(String),
}

/// Where a verify asked for when the disks were `before` stands now: done when no disk
/// is being verified and every disk that was verifiable (not failed) has a new report;
/// cut short when nothing runs any more but a disk has no new report (the standby was
/// lost, or the disk failed).
fn verify_outcome(
    before: &[storage_mirror::primary::DiskStatus],
    now: &[storage_mirror::primary::DiskStatus],
) -> Outcome {
    if now.iter().any(|d| d.verify_running.is_some()) {
        return Outcome::Running;
    }
    let pending: Vec<&storage_mirror::primary::DiskStatus> = before
        .iter()
        .zip(now)
        .filter(|(b, n)| !b.failed && n.verify == b.verify)
        .map(|(_, n)| n)
        .collect();
    if pending.is_empty() {
        return Outcome::Done;
    }
    // The request waits for the driver to pick it up while the disks stay protected.
    if pending.iter().all(|d| d.mode == "protected" && !d.failed) {
        return Outcome::Running;
    }
    Outcome::CutShort(
        pending
            .iter()
            .map(|d| {
                if d.failed {
                    format!("{} failed", d.path)
                } else {
                    format!(
                        "{} is {} (the standby is no longer in sync)",
                        d.path, d.mode
                    )
                }
            })
            .collect::<Vec<_>>()
            .join(", "),
    )
}

fn describe_verify(name: &str, now: &[storage_mirror::primary::DiskStatus]) -> String {
    let mut out = format!("verify of {name} done\n");
    for (i, d) in now.iter().enumerate() {
        out += &format!("disk {i}: {}\n", d.path);
        match d.verify {
            Some(v) => out += &format!("  {}\n", verify_line(&v)),
            None => out += "  not verified (the local disk failed)\n",
        }
    }
    out
}

fn verify_line(v: &storage_mirror::meta::VerifyReport) -> String {
    format!(
        "{}: {} ranges compared, {} differing, {} blocks marked for resync",
        utc(v.finished_unix_ms),
        v.ranges_compared,
        v.ranges_differing,
        v.blocks_marked
    )
}

/// The text of `twinrun disk status`: a title, then one paragraph per disk.
pub fn describe(title: &str, views: &[DiskView]) -> String {
    let mut out = format!("disks: {title}\n");
    if views.is_empty() {
        out += "  (no disks)\n";
    }
    for (i, v) in views.iter().enumerate() {
        out += &format!("disk {i}: {}\n", v.path);
        out += &format!("  state: {}\n", v.state);
        let Some(gen) = &v.current_gen else {
            continue;
        };
        out += &format!(
            "  generation: {gen}, bitmap base: {}",
            v.bitmap_base_gen.as_deref().unwrap_or("none")
        );
        if let Some(src) = &v.sync_source_gen {
            out += &format!(", resync source: {src}");
        }
        out += "\n";
        if !v.history.is_empty() {
            out += &format!("  history: {}\n", v.history.join(" "));
        }
        if let (Some(blocks), Some(bs)) = (v.blocks, v.block_size) {
            let size = blocks.saturating_mul(u64::from(bs));
            match (v.dirty_blocks, &v.bitmap_problem) {
                (Some(d), _) => {
                    out += &format!(
                        "  dirty: {d} of {blocks} blocks of {bs} B ({} of {})\n",
                        bytes(d.saturating_mul(u64::from(bs))),
                        bytes(size)
                    )
                }
                (None, why) => {
                    out += &format!(
                        "  dirty: unknown ({}), disk {blocks} blocks of {bs} B ({})\n",
                        why.as_deref().unwrap_or("bitmap unreadable"),
                        bytes(size)
                    )
                }
            }
        }
        match v.resync {
            Some(r) => {
                out += &format!(
                    "  resync: {}/{} blocks ({}), {}{}\n",
                    r.done_blocks,
                    r.total_blocks,
                    percent(r.done_blocks, r.total_blocks),
                    if r.full { "full" } else { "delta" },
                    if r.done_blocks >= r.total_blocks {
                        ", finished"
                    } else {
                        ""
                    }
                )
            }
            None => out += "  resync: none\n",
        }
        if let Some(r) = v.verify_running {
            out += &format!(
                "  verify running: {}/{} ranges ({})\n",
                r.compared,
                r.total,
                percent(r.compared, r.total)
            );
        }
        match &v.verify {
            Some(r) => out += &format!("  last verify: {}\n", verify_line(r)),
            None => out += "  last verify: never\n",
        }
        if let Some(u) = v.unclean_primary {
            out += &format!(
                "  unclean: {}\n",
                if u {
                    "yes (ran as primary or alone and was not shut down cleanly)"
                } else {
                    "no"
                }
            );
        }
        if let Some(e) = v.last_committed_epoch {
            out += &format!("  last committed epoch: {e}\n");
        }
    }
    out
}

fn percent(done: u64, total: u64) -> String {
    if total == 0 {
        return "100.0%".into();
    }
    // Per mille in integers: no float rounding shows 100.0% before the end.
    let pm = u128::from(done) * 1000 / u128::from(total);
    format!("{}.{}%", pm / 10, pm % 10)
}

/// `n` bytes in the largest binary unit that keeps a whole part.
fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut unit = 0;
    let mut scale = 1024u64;
    while unit + 1 < UNITS.len() && n / scale >= 1024 {
        unit += 1;
        scale *= 1024;
    }
    let tenths = u128::from(n) * 10 / u128::from(scale);
    format!("{}.{} {}", tenths / 10, tenths % 10, UNITS[unit])
}

/// Milliseconds since the Unix epoch as `YYYY-MM-DD HH:MM:SS UTC`.
fn utc(ms: u64) -> String {
    let secs = ms / 1000;
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Proleptic Gregorian date of day `days` since 1970-01-01 (H. Hinnant's algorithm,
/// for days >= 0).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + u64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::{Cli, Command};
    use clap::Parser;
    use storage_mirror::meta::VerifyReport;
    use storage_mirror::primary::DiskStatus;

    fn parse(args: &[&str]) -> Result<DiskCommand, clap::Error> {
        let mut full = vec!["twinrun", "disk"];
        full.extend_from_slice(args);
        match Cli::try_parse_from(full)?.command {
            Command::Disk(c) => Ok(c),
            other => panic!("parsed {other:?}"),
        }
    }

    #[test]
    fn status_needs_exactly_one_source() {
        match parse(&["status", "--image", "a", "b", "--json"]).unwrap() {
            DiskCommand::Status(a) => {
                assert_eq!(a.images, [PathBuf::from("a"), PathBuf::from("b")]);
                assert!(a.json);
            }
            other => panic!("{other:?}"),
        }
        for bad in [
            &["status"][..],
            &["status", "--name", "x", "--image", "a"],
            &["status", "--image"],
            &["verify"],
            &["verify", "--name", "x", "--timeout-secs", "5"],
        ] {
            assert_eq!(parse(bad).unwrap_err().exit_code(), 2, "{bad:?}");
        }
    }

    #[test]
    fn numbers() {
        assert_eq!(percent(0, 0), "100.0%");
        assert_eq!(percent(1, 3), "33.3%");
        assert_eq!(percent(999, 1000), "99.9%");
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(12 << 10), "12.0 KiB");
        assert_eq!(bytes(3 << 29), "1.5 GiB");
        assert_eq!(utc(0), "1970-01-01 00:00:00 UTC");
        // 2024-02-29 12:34:56 UTC (a leap day).
        assert_eq!(utc(1_709_210_096_000), "2024-02-29 12:34:56 UTC");
    }

    fn st(mode: &str, failed: bool, verify: Option<u64>, running: bool) -> DiskStatus {
        DiskStatus {
            path: "/d.img".into(),
            mode: mode.into(),
            failed,
            current_gen: 1,
            bitmap_base_gen: 0,
            dirty_blocks: 0,
            blocks: 16,
            block_size: 4096,
            resync: None,
            verify_running: running.then_some((1, 4)),
            verify: verify.map(|t| VerifyReport {
                finished_unix_ms: t,
                ranges_compared: 4,
                ranges_differing: 0,
                blocks_marked: 0,
            }),
        }
    }

    #[test]
    fn verify_outcomes() {
        let before = [st("protected", false, Some(5), false)];
        // Not picked up yet, then running, then a new report.
        assert_eq!(verify_outcome(&before, &before), Outcome::Running);
        let run = [st("protected", false, Some(5), true)];
        assert_eq!(verify_outcome(&before, &run), Outcome::Running);
        let done = [st("protected", false, Some(9), false)];
        assert_eq!(verify_outcome(&before, &done), Outcome::Done);
        // The standby went away before a report.
        let lost = [st("degraded", false, Some(5), false)];
        assert!(matches!(
            verify_outcome(&before, &lost),
            Outcome::CutShort(w) if w.contains("degraded")
        ));
        // A disk failed before the request is not waited for.
        let before = [
            st("protected", true, None, false),
            st("protected", false, None, false),
        ];
        let done = [
            st("protected", true, None, false),
            st("protected", false, Some(1), false),
        ];
        assert_eq!(verify_outcome(&before, &done), Outcome::Done);
    }
}
