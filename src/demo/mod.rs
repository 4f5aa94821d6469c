//! `twinrun demo`: FT mode end to end on one machine. A protected pair in network
//! namespaces (see [`topology`]), the test guest running kv + counter + dirty + disk,
//! a kv client on one TCP connection, SIGKILL of the primary mid-load, and a report of
//! what the outside saw. Everything it creates (namespaces, processes, files) goes
//! away at the end, on error, and on SIGINT/SIGTERM.

pub mod analyze;
pub mod client;
pub mod process;
pub mod topology;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::cli::guest_path::find_default_guest;
use crate::cli::DemoArgs;
use crate::signals;
use analyze::{check_console, records_lost};
use client::{ClientCtl, ClientReport};
use process::ChildGuard;
use topology::Topology;

/// What `twinrun vm run --role primary` logs once the first checkpoint is committed.
pub const PROTECTED_LOG: &str = "FT primary: protected";
/// What the standby logs when its VM runs after a failover.
pub const FAILOVER_LOG: &str = "FT standby: failover complete in";

const KV_PORT: u16 = 6379;
const DISK_BYTES: u64 = 16 << 20;

/// Exit code when interrupted (as a shell reports SIGINT).
const INTERRUPTED: i32 = 130;

#[derive(Debug, thiserror::Error)]
enum DemoError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Failed(String),
    #[error("interrupted")]
    Interrupted,
}

/// Removes the demo's work directory.
struct WorkDir(PathBuf);

impl Drop for WorkDir {
    fn drop(&mut self) {
        if std::env::var_os("TWINRUN_DEMO_KEEP").is_some() {
            eprintln!("demo files kept in {}", self.0.display());
            return;
        }
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub fn run(a: &DemoArgs) -> i32 {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("twinrun demo: needs root (KVM, network namespaces)");
        return crate::exit::USAGE;
    }
    // A shell starts background jobs with SIGINT ignored; an ignored signal never
    // reaches sigwait, and the demo must clean up on it: take both back.
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: installs the default disposition; no handler code is involved.
        unsafe { libc::signal(sig, libc::SIG_DFL) };
    }
    if let Err(e) = signals::block() {
        eprintln!("twinrun demo: cannot block SIGINT/SIGTERM: {e}");
        return 1;
    }
    let interrupted = Arc::new(AtomicBool::new(false));
    let flag = interrupted.clone();
    let _ = std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            if let Ok(name) = signals::wait() {
                eprintln!("twinrun demo: {name}: cleaning up");
                flag.store(true, Ordering::SeqCst);
            }
        });
    match demo(a, &interrupted) {
        Ok(r) => {
            if a.json {
                println!("{}", r.json());
            } else {
                r.print_human();
            }
            if r.ok() {
                0
            } else {
                1
            }
        }
        Err(DemoError::Interrupted) => {
            eprintln!("twinrun demo: interrupted; everything it made is removed");
            INTERRUPTED
        }
        Err(e) => {
            eprintln!("twinrun demo: error: {e}");
            1
        }
    }
}

/// The demo's findings.
#[derive(Debug, Default)]
pub struct DemoReport {
    pub failover_ms: Option<u64>,
    pub standby_restore_ms: Option<u64>,
    pub resumed_from_epoch: Option<u64>,
    pub console_records: u64,
    pub console_gaps: u64,
    pub console_duplicates: u64,
    pub console_boots: u64,
    pub counter_last: u64,
    pub kv: ClientReport,
    pub dirty_check_errors: u64,
    pub guest_panics: u64,
    pub disk_records_checked: u64,
    pub disk_records_lost: u64,
    pub standby_exit: Option<i32>,
    /// How the standby's disk was brought in sync before protection ("Full" on a first
    /// start: it had no replica metadata), and the bytes the resync copied.
    pub disk_plan: Option<String>,
    pub disk_resync_bytes: Option<u64>,
    pub pm1_ns: String,
    pub pm2_ns: String,
}

impl DemoReport {
    fn ok(&self) -> bool {
        self.failover_ms.is_some()
            && self.console_gaps == 0
            && self.console_duplicates == 0
            && self.console_boots == 1
            && self.kv.lost_writes == 0
            && self.kv.connection_survived
            && self.kv.incr_ok
            && self.dirty_check_errors == 0
            && self.guest_panics == 0
            && self.disk_records_lost == 0
    }

    /// One JSON object (hand-written: numbers, booleans and null only, plus the
    /// error strings escaped).
    pub fn json(&self) -> String {
        let opt = |v: Option<u64>| v.map_or("null".to_string(), |v| v.to_string());
        let errs: Vec<String> = self
            .kv
            .errors
            .iter()
            .map(|e| format!("\"{}\"", json_escape(e)))
            .collect();
        format!(
            "{{\"ok\":{},\"failover_ms\":{},\"standby_restore_ms\":{},\"resumed_from_epoch\":{},\
             \"epochs_committed\":{},\
             \"console_records\":{},\"console_gaps\":{},\"console_duplicates\":{},\
             \"console_boots\":{},\"counter_last\":{},\
             \"kv_acknowledged_writes\":{},\"kv_lost_writes\":{},\"kv_incr_acknowledged\":{},\
             \"kv_incr_ok\":{},\"kv_max_reply_ms\":{},\"kv_reconnects\":{},\
             \"tcp_connection_survived\":{},\"dirty_check_errors\":{},\"guest_panics\":{},\
             \"disk_records_checked\":{},\"disk_records_lost\":{},\"disk_plan\":{},\
             \"disk_resync_bytes\":{},\"kv_errors\":[{}]}}",
            self.ok(),
            opt(self.failover_ms),
            opt(self.standby_restore_ms),
            opt(self.resumed_from_epoch),
            opt(self.resumed_from_epoch.map(|e| e + 1)),
            self.console_records,
            self.console_gaps,
            self.console_duplicates,
            self.console_boots,
            self.counter_last,
            self.kv.acked_writes,
            self.kv.lost_writes,
            self.kv.incr_acked,
            self.kv.incr_ok,
            self.kv.max_reply_ms,
            self.kv.reconnects,
            self.kv.connection_survived,
            self.dirty_check_errors,
            self.guest_panics,
            self.disk_records_checked,
            self.disk_records_lost,
            self.disk_plan
                .as_ref()
                .map_or("null".to_string(), |p| format!("\"{}\"", json_escape(p))),
            opt(self.disk_resync_bytes),
            errs.join(",")
        )
    }

    fn print_human(&self) {
        let yes = |b: bool| if b { "yes" } else { "NO" };
        println!("\n== twinrun demo: result ==");
        println!(
            "failover: {} ms from SIGKILL of the primary to the first kv reply from the standby \
             (standby restore+start {} ms, resumed from epoch {:?})",
            self.failover_ms.map_or("?".into(), |v| v.to_string()),
            self.standby_restore_ms
                .map_or("?".into(), |v| v.to_string()),
            self.resumed_from_epoch
        );
        println!(
            "console:  {} lines, counter up to C {}, {} gaps, {} duplicates, {} boot(s)",
            self.console_records,
            self.counter_last,
            self.console_gaps,
            self.console_duplicates,
            self.console_boots
        );
        println!(
            "kv:       {} acknowledged writes, {} lost; {} INCRs acknowledged, counter {} ; \
             same TCP connection throughout: {}; longest reply {} ms",
            self.kv.acked_writes,
            self.kv.lost_writes,
            self.kv.incr_acked,
            if self.kv.incr_ok { "exact" } else { "WRONG" },
            yes(self.kv.connection_survived),
            self.kv.max_reply_ms
        );
        println!(
            "dirty:    {} self-check errors; disk: {} durable records checked on the \
             standby's image, {} lost",
            self.dirty_check_errors, self.disk_records_checked, self.disk_records_lost
        );
        println!(
            "mirror:   the standby's disk was brought in sync by a {} resync of {} bytes \
             before protection began",
            self.disk_plan.as_deref().unwrap_or("?"),
            self.disk_resync_bytes.map_or("?".into(), |v| v.to_string())
        );
        for e in &self.kv.errors {
            println!("  kv: {e}");
        }
        println!(
            "verdict:  {}",
            if self.ok() {
                "nothing lost"
            } else {
                "PROBLEMS (see above)"
            }
        );
    }
}

fn json_escape(s: &str) -> String {
    let mut o = String::new();
    for c in s.chars() {
        match c {
            '"' => o.push_str("\\\""),
            '\\' => o.push_str("\\\\"),
            c if (c as u32) < 0x20 => o.push_str(&format!("\\u{:04x}", c as u32)),
            c => o.push(c),
        }
    }
    o
}

/// Progress lines go to stderr (stdout holds only the JSON with --json).
fn say(s: &str) {
    eprintln!("twinrun demo: {s}");
}

/// Sleeps `d`, returning early with an error when interrupted.
fn nap(d: Duration, intr: &AtomicBool) -> Result<(), DemoError> {
    let t0 = Instant::now();
    while t0.elapsed() < d {
        if intr.load(Ordering::SeqCst) {
            return Err(DemoError::Interrupted);
        }
        std::thread::sleep(Duration::from_millis(10).min(d - t0.elapsed().min(d)));
    }
    Ok(())
}

fn log_has(path: &Path, needle: &str) -> Option<String> {
    let s = std::fs::read_to_string(path).ok()?;
    s.lines().find(|l| l.contains(needle)).map(str::to_string)
}

/// Number right after `key` in `line`.
fn number_after(line: &str, key: &str) -> Option<u64> {
    let rest = &line[line.find(key)? + key.len()..];
    let digits: String = rest
        .trim_start()
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

fn demo(a: &DemoArgs, intr: &AtomicBool) -> Result<DemoReport, DemoError> {
    let exe = std::env::current_exe()?;
    let guest = find_default_guest().map_err(|searched| {
        DemoError::Failed(format!(
            "the test guest is not built (looked at {searched:?}); run `cd guest && cargo build --release`"
        ))
    })?;
    let pid = std::process::id();
    let work = WorkDir(std::env::temp_dir().join(format!("twinrun-demo-{pid}")));
    std::fs::create_dir_all(&work.0)?;
    let w = |n: &str| work.0.join(n);
    let topo = Topology::create(&format!("td{}", pid % 1_000_000))?;
    say(&format!(
        "namespaces {} {} {} {}; A-Links {:?} {:?}; guest {} ({})",
        topo.pm1_ns,
        topo.pm2_ns,
        topo.lan_ns,
        topo.client_ns,
        topo.alink(0),
        topo.alink(1),
        topo.guest_ip(),
        topo.guest_mac()
    ));
    let (pdisk, sdisk, console, secret) =
        (w("pm1.img"), w("pm2.img"), w("console.log"), w("secret"));
    std::fs::File::create(&pdisk)?.set_len(DISK_BYTES)?;
    // The standby's image starts identical (the initial disk copy is the storage
    // issue's).
    std::fs::copy(&pdisk, &sdisk)?;
    let mut key = [0u8; 32];
    std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom")?, &mut key)?;
    let hex: String = key.iter().map(|b| format!("{b:02x}")).collect();
    std::fs::write(&secret, hex)?;

    let (l1, l2) = topo.alink_args();
    let vm_args = |role: &str, links: &[String], disk: &Path, tap: &str| -> Vec<String> {
        let mut v: Vec<String> = ["vm", "run", "--role", role, "--guest"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        v.push(guest.display().to_string());
        for l in links {
            v.push("--alink".into());
            v.push(l.clone());
        }
        v.extend([
            "--cluster-id".to_string(),
            format!("demo-{pid}"),
            "--cluster-secret-file".into(),
            secret.display().to_string(),
            "--mem-mib".into(),
            "64".into(),
            "--workload".into(),
            "counter,dirty,disk,kv".into(),
            "--counter-rate".into(),
            "100".into(),
            "--dirty-pages".into(),
            "512".into(),
            "--dirty-rate".into(),
            "10000".into(),
            "--disk-rate".into(),
            "50".into(),
            "--disk-flush-every".into(),
            "1".into(),
            "--kv-addr".into(),
            topo.guest_cidr(),
            "--net".into(),
            format!("{tap},{}", topo.guest_mac()),
            "--disk".into(),
            disk.display().to_string(),
            "--console".into(),
            format!("file:{}", console.display()),
        ]);
        v
    };
    let (plog, slog) = (w("pm1.log"), w("pm2.log"));
    say("starting the standby in PM2, then the primary in PM1");
    let mut standby = ChildGuard::spawn_in_netns(
        "standby",
        &topo.pm2_ns,
        &exe,
        &vm_args("standby", &l2, &sdisk, &topo.pm2_tap),
        &slog,
    )?;
    let mut primary = ChildGuard::spawn_in_netns(
        "primary",
        &topo.pm1_ns,
        &exe,
        &vm_args("primary", &l1, &pdisk, &topo.pm1_tap),
        &plog,
    )?;
    let t0 = Instant::now();
    while log_has(&plog, PROTECTED_LOG).is_none() {
        nap(Duration::from_millis(20), intr)?;
        for (c, log) in [(&mut primary, &plog), (&mut standby, &slog)] {
            if let Some(st) = c.try_status() {
                return Err(DemoError::Failed(format!(
                    "the {} exited early ({st}); its log:\n{}",
                    c.name,
                    std::fs::read_to_string(log).unwrap_or_default()
                )));
            }
        }
        if t0.elapsed() > Duration::from_secs(60) {
            return Err(DemoError::Failed("not protected after 60 s".into()));
        }
    }
    say(&format!(
        "protected after {} ms; starting the kv client",
        t0.elapsed().as_millis()
    ));

    let ctl = Arc::new(ClientCtl::default());
    let client = {
        let (ns, ctl) = (topo.client_ns.clone(), ctl.clone());
        let addr = std::net::SocketAddr::from((topo.guest_ip(), KV_PORT));
        std::thread::Builder::new()
            .name("kv-client".into())
            .spawn(move || client::run(&ns, addr, ctl))?
    };
    nap(Duration::from_millis(a.kill_after_ms), intr)?;
    if client.is_finished() {
        let r = client.join();
        return Err(DemoError::Failed(format!(
            "the kv client ended early: {r:?}"
        )));
    }
    let acked_before = ctl.acked.load(Ordering::SeqCst);
    say(&format!(
        "{acked_before} writes acknowledged; SIGKILL to the primary"
    ));
    let kill_at = Instant::now();
    primary.signal(libc::SIGKILL);
    primary.kill_now();
    // Only replies to requests sent once the primary is gone count: a reply the dying
    // primary released just before the signal landed says nothing about the failover.
    *ctl.killed_at.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
    nap(Duration::from_millis(a.keep_going_ms), intr)?;
    if let Some(st) = standby.try_status() {
        return Err(DemoError::Failed(format!(
            "the standby exited ({st}); its log:\n{}",
            std::fs::read_to_string(&slog).unwrap_or_default()
        )));
    }
    say(&format!(
        "{} writes acknowledged; stopping the client, reading everything back",
        ctl.acked.load(Ordering::SeqCst)
    ));
    ctl.stop.store(true, Ordering::SeqCst);
    // The read-back is bounded by the client's timeouts; check for interrupts meanwhile.
    while !client.is_finished() {
        nap(Duration::from_millis(20), intr)?;
    }
    let kv = client
        .join()
        .map_err(|_| DemoError::Failed("the kv client panicked".into()))??;
    let first = *ctl
        .first_reply_after_kill
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    let st = standby.terminate(Duration::from_secs(10));

    let mut r = DemoReport {
        failover_ms: first.map(|t| (t - kill_at).as_millis() as u64),
        standby_exit: st.and_then(|s| s.code()),
        pm1_ns: topo.pm1_ns.clone(),
        pm2_ns: topo.pm2_ns.clone(),
        ..DemoReport::default()
    };
    if let Some(l) = log_has(&slog, FAILOVER_LOG) {
        r.standby_restore_ms = number_after(&l, FAILOVER_LOG);
        r.resumed_from_epoch = number_after(&l, "resumed from epoch");
    } else {
        say("the standby never logged a failover");
    }
    if let Some(l) = log_has(&plog, "primary: disk resync done:") {
        r.disk_resync_bytes = number_after(&l, "chunks,");
    }
    if let Some(l) = log_has(&plog, "primary: disk /") {
        r.disk_plan = ["Full", "Delta", "InSync"]
            .iter()
            .find(|k| l.contains(&format!(": {k}:")))
            .map(|k| k.to_string());
    }
    let c = check_console(&std::fs::read(&console)?);
    let img = std::fs::read(&sdisk)?;
    r.console_records = c.records;
    r.console_gaps = c.gaps;
    r.console_duplicates = c.duplicates;
    r.console_boots = c.boots;
    r.counter_last = c.counter_last;
    r.dirty_check_errors = c.dirty_errors;
    r.guest_panics = c.panics + c.disk_errors;
    r.disk_records_checked = c.w_seqs.len() as u64;
    r.disk_records_lost = records_lost(&img, &c.w_seqs);
    r.kv = kv;
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_from_log_lines() {
        let l = "[INFO] FT standby: failover complete in 63 ms (restore ...): resumed from epoch 812, x";
        assert_eq!(number_after(l, FAILOVER_LOG), Some(63));
        assert_eq!(number_after(l, "resumed from epoch"), Some(812));
        assert_eq!(number_after(l, "nothing"), None);
    }

    #[test]
    fn json_is_one_object() {
        let mut r = DemoReport::default();
        r.kv.errors.push("a \"quoted\"\nline".into());
        let j = r.json();
        assert!(j.starts_with('{') && j.ends_with('}'));
        assert!(j.contains("\"tcp_connection_survived\":false"));
        assert!(j.contains("\\\"quoted\\\"\\u000a"));
        assert!(!j.contains('\n'));
    }
}
