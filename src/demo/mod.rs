//! `twinrun demo`: the whole system on one machine (`cluster`: two daemons, a witness,
//! FT, HA and unprotected VMs, PM1 killed); `twinrun demo --pair`: FT mode end to end on
//! one machine, below the daemons. A protected pair in network
//! namespaces (`twinrun_lab::Topology`: PM1, PM2, LAN, client, two A-Links), the test
//! guest running kv + counter + dirty + disk, a kv client on one TCP connection,
//! SIGKILL of the primary mid-load, and a report of what the outside saw. The pair's
//! state (protection, failover) comes from both ends' control sockets. Everything it
//! creates (namespaces, processes, files) goes away at the end, on error, and on
//! SIGINT/SIGTERM.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use twinrun_control::{FtState, FtStatus};
use twinrun_lab::console::{analyze, records_lost};
use twinrun_lab::kvload::{LoadClient, LoadConfig, LoadReport};
use twinrun_lab::topology::KV_PORT;
use twinrun_lab::{Proc, Topology};

use crate::cli::DemoArgs;
use crate::signals;

mod cluster;

const DISK_BYTES: u64 = 16 << 20;
/// The INCR key of the kv client, and how often it increments (every tenth request).
const INCR_KEY: &str = "demo-counter";
const INCR_EVERY: u64 = 10;
/// The primary logs these when it made its disk plan and finished the resync: the
/// plan and the bytes copied are not in its control socket's status yet (the disk
/// session's report comes only at the end of a session).
const PLAN_LOG: &str = "primary: disk /";
const RESYNC_LOG: &str = "primary: disk resync done:";

/// Exit code when interrupted (as a shell reports SIGINT).
const INTERRUPTED: i32 = 130;

#[derive(Debug, thiserror::Error)]
enum DemoError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Lab(#[from] twinrun_lab::LabError),
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
    if !a.pair {
        return match cluster::run(a, &interrupted) {
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
        };
    }
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

/// What the kv client saw.
#[derive(Clone, Debug, Default)]
pub struct KvFigures {
    pub acked_writes: u64,
    pub lost_writes: u64,
    pub incr_acked: u64,
    /// The counter read back, and whether it matched the acknowledged INCRs.
    pub incr_final: Option<i64>,
    pub incr_ok: bool,
    pub connection_survived: bool,
    pub reconnects: u32,
    /// Longest wait for one reply.
    pub max_reply_ms: u64,
    pub errors: Vec<String>,
}

impl From<&LoadReport> for KvFigures {
    fn from(r: &LoadReport) -> Self {
        KvFigures {
            acked_writes: r.sets_acked.len() as u64,
            lost_writes: r.lost.len() as u64,
            incr_acked: r.incrs_acked.max(0) as u64,
            incr_final: r.counter_final,
            incr_ok: r.incr_ok(),
            connection_survived: r.connection_survived(),
            reconnects: r.reconnects,
            max_reply_ms: r.max_reply.as_millis() as u64,
            errors: r.errors.clone(),
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
    pub kv: KvFigures,
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

/// One end of the pair: its process and its control socket.
struct End {
    proc: Proc,
    sock: PathBuf,
}

impl End {
    /// The FT part of its status (`None` while its socket does not answer yet).
    fn status(&self) -> Option<FtStatus> {
        twinrun_control::ft_status(&self.sock)
    }

    /// An error if it exited.
    fn check_alive(&mut self) -> Result<(), DemoError> {
        match self.proc.try_wait() {
            None => Ok(()),
            Some(st) => Err(DemoError::Failed(format!(
                "the {} exited early ({st}); its log:\n{}",
                self.proc.name(),
                self.proc.log()
            ))),
        }
    }
}

/// Polls `end`'s status every 20 ms until `done` says yes (its value), checking that
/// it (and `other`) still run and for interrupts; an error after `limit`.
fn wait_status<T>(
    end: &mut End,
    mut other: Option<&mut End>,
    limit: Duration,
    what: &str,
    intr: &AtomicBool,
    mut done: impl FnMut(&FtStatus) -> Option<T>,
) -> Result<T, DemoError> {
    let t0 = Instant::now();
    loop {
        if let Some(v) = end.status().as_ref().and_then(&mut done) {
            return Ok(v);
        }
        end.check_alive()?;
        if let Some(o) = other.as_deref_mut() {
            o.check_alive()?;
        }
        if t0.elapsed() > limit {
            return Err(DemoError::Failed(format!(
                "{what}: not within {limit:?}; last status {:?}",
                end.status()
            )));
        }
        nap(Duration::from_millis(20), intr)?;
    }
}

fn demo(a: &DemoArgs, intr: &AtomicBool) -> Result<DemoReport, DemoError> {
    let exe = std::env::current_exe()?;
    let guest = twinrun_lab::guest::find_built().map_err(|searched| {
        DemoError::Failed(format!(
            "the test guest is not built (looked at {searched:?}); run `cd guest && cargo build --release`"
        ))
    })?;
    let pid = std::process::id();
    let work = WorkDir(std::env::temp_dir().join(format!("twinrun-demo-{pid}")));
    let run_dir = work.0.join("run");
    std::fs::create_dir_all(&run_dir)?;
    let w = |n: &str| work.0.join(n);
    let topo = Topology::create(&format!("td{}", pid % 1_000_000))?;
    say(&format!(
        "namespaces {} {} {} {}; A-Links {:?} {:?}; guest {} ({})",
        topo.pm_ns(0),
        topo.pm_ns(1),
        topo.switch_ns(),
        topo.client_ns(),
        topo.alink(0),
        topo.alink(1),
        topo.guest_ip(),
        topo.guest_mac()
    ));
    let (pdisk, sdisk, console, secret) =
        (w("pm1.img"), w("pm2.img"), w("console.log"), w("secret"));
    std::fs::File::create(&pdisk)?.set_len(DISK_BYTES)?;
    // The standby's image starts as a copy; the first session resyncs it anyway (no
    // replica metadata yet: a full copy).
    std::fs::copy(&pdisk, &sdisk)?;
    let mut key = [0u8; 32];
    std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom")?, &mut key)?;
    let hex: String = key.iter().map(|b| format!("{b:02x}")).collect();
    std::fs::write(&secret, hex)?;

    let vm_args = |i: usize, role: &str, disk: &Path| -> Vec<String> {
        let mut v: Vec<String> = ["vm", "run", "--role", role, "--guest"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        v.push(guest.display().to_string());
        v.extend(topo.alink_args(i));
        v.extend(topo.vm_net_args(i));
        v.extend([
            "--name".to_string(),
            format!("demo{pid}-pm{}", i + 1),
            "--cluster-id".into(),
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
            "--disk".into(),
            disk.display().to_string(),
            "--console".into(),
            format!("file:{}", console.display()),
        ]);
        v
    };
    let start = |i: usize, role: &str, disk: &Path| -> Result<End, DemoError> {
        let mut cmd = topo.pms[i].ns.command(&exe);
        // The control sockets live in the demo's own directory.
        cmd.args(vm_args(i, role, disk))
            .env("TWINRUN_RUN_DIR", &run_dir);
        let log = w(&format!("pm{}.log", i + 1));
        Ok(End {
            proc: Proc::spawn_logged(role, &mut cmd, &log)?,
            sock: run_dir.join(format!("demo{pid}-pm{}.sock", i + 1)),
        })
    };
    say("starting the standby in PM2, then the primary in PM1");
    let mut standby = start(1, "standby", &sdisk)?;
    let mut primary = start(0, "primary", &pdisk)?;
    let t0 = Instant::now();
    wait_status(
        &mut primary,
        Some(&mut standby),
        Duration::from_secs(60),
        "protection",
        intr,
        |s| (s.state == FtState::Protected).then_some(()),
    )?;
    say(&format!(
        "protected after {} ms; starting the kv client",
        t0.elapsed().as_millis()
    ));

    let mut load = LoadConfig::new(
        topo.client_ns(),
        SocketAddr::from((topo.guest_ip(), KV_PORT)),
    );
    load.counter_key = INCR_KEY.into();
    load.incr_every = INCR_EVERY;
    // Keep going across the failover; reconnect (and say so) only if the connection
    // really broke. A failover takes well under a second; the guest's TCP retransmits.
    load.reconnect = true;
    load.connect_for = Duration::from_secs(20);
    load.connect_timeout = Duration::from_secs(2);
    load.read_timeout = Duration::from_secs(20);
    let client = LoadClient::start(load)?;
    nap(Duration::from_millis(a.kill_after_ms), intr)?;
    if client.is_finished() {
        let r = client.finish();
        return Err(DemoError::Failed(format!(
            "the kv client ended early: {r:?}"
        )));
    }
    say(&format!(
        "{} writes acknowledged; SIGKILL to the primary",
        client.acks()
    ));
    let kill_at = Instant::now();
    primary.proc.kill();
    // Only replies to requests sent once the primary is gone count: a reply the dying
    // primary released just before the signal landed says nothing about the failover.
    client.mark();
    let failover = wait_status(
        &mut standby,
        None,
        Duration::from_secs(30),
        "failover",
        intr,
        |s| s.failover.clone(),
    );
    // The primary is gone on purpose: only the standby's end matters now.
    let failover = match failover {
        Ok(f) => Some(f),
        Err(DemoError::Interrupted) => return Err(DemoError::Interrupted),
        Err(e) if standby.proc.try_wait().is_some() => return Err(e),
        Err(e) => {
            say(&format!("the standby never reported a failover: {e}"));
            None
        }
    };
    nap(
        Duration::from_millis(a.keep_going_ms).saturating_sub(kill_at.elapsed()),
        intr,
    )?;
    standby.check_alive()?;
    say(&format!(
        "{} writes acknowledged; stopping the client, reading everything back",
        client.acks()
    ));
    // The read-back is bounded by the client's timeouts; check for interrupts meanwhile.
    let first = client.first_reply_after_mark();
    let finishing = std::thread::spawn(move || client.finish());
    while !finishing.is_finished() {
        nap(Duration::from_millis(20), intr)?;
    }
    let kv = finishing
        .join()
        .map_err(|_| DemoError::Failed("the kv client panicked".into()))??;
    let st = standby.proc.terminate(Duration::from_secs(10));

    let plog = primary
        .proc
        .log_path()
        .map(Path::to_path_buf)
        .unwrap_or_default();
    let mut r = DemoReport {
        failover_ms: first.map(|t| (t - kill_at).as_millis() as u64),
        standby_restore_ms: failover.as_ref().map(|f| f.time_ms),
        resumed_from_epoch: failover.as_ref().map(|f| f.resumed_from_epoch),
        standby_exit: st.and_then(|s| s.code()),
        pm1_ns: topo.pm_ns(0).to_string(),
        pm2_ns: topo.pm_ns(1).to_string(),
        ..DemoReport::default()
    };
    if let Some(l) = log_has(&plog, RESYNC_LOG) {
        r.disk_resync_bytes = number_after(&l, "chunks,");
    }
    if let Some(l) = log_has(&plog, PLAN_LOG) {
        r.disk_plan = ["Full", "Delta", "InSync"]
            .iter()
            .find(|k| l.contains(&format!(": {k}:")))
            .map(|k| k.to_string());
    }
    let c = analyze(&std::fs::read(&console)?);
    let img = std::fs::read(&sdisk)?;
    r.console_records = c.records;
    r.console_gaps = c.gaps;
    r.console_duplicates = c.duplicates;
    r.console_boots = c.boots;
    r.counter_last = c.counter_last;
    r.dirty_check_errors = c.dirty_errors + c.d_failed;
    r.guest_panics = c.panics + c.disk_errors;
    r.disk_records_checked = c.w_seqs.len() as u64;
    r.disk_records_lost = records_lost(&img, &c.w_seqs);
    r.kv = KvFigures::from(&kv);
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_from_log_lines() {
        let l = "[INFO] primary: disk resync done: 64 chunks, 16777216 bytes, 1 passes in 3ms";
        assert_eq!(number_after(l, "chunks,"), Some(16_777_216));
        assert_eq!(number_after(l, RESYNC_LOG), Some(64));
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
