//! Section `migrate` (issue 16, "Benchmarks"): live migration of an unprotected VM,
//! downtime and total time, for a 256 MiB and a 1 GiB guest at 0, 1,000 and 10,000
//! dirty pages/s; and Debian's QEMU live-migrating, uncapped, a guest of the same size
//! and dirty rate in the same run (one stream, and multifd with 2 channels).
//! Targets: twinrun's downtime p50 <= 20 ms, its total time <= QEMU's at every point.
//!
//! twinrun: real `twinrun vm run` processes on loopback, the mechanism of
//! `tests/migrate.rs` (what `twinrun vm migrate` and the node daemon drive): the source
//! is `--role primary --protection unprotected` (the VM alone, no dirty logging), the
//! target `--role standby --protection unprotected` (a migration target). The target's
//! session is the pre-copy (memory rounds while the guest runs, then epochs until the
//! target committed one); the planned role swap then hands the VM over.
//! - downtime: the guest's final pause, as the swap measured it (the source's vCPUs
//!   stopped until the target accepted the VM: `control::swap`'s `paused_us`);
//! - total: from the target listening (its control socket reports its session) to the
//!   VM running on the target (its status: primary, VM running), polled every 2 ms.
//!   This counts what QEMU's `total-time` counts (connection, setup, every round, the
//!   downtime) plus up to 250 ms of the source's A-Link reconnect back-off and the poll.
//!
//! The guests: twinrun's test guest with the `dirty` workload over a working set of
//! half the guest's memory, filled once at once (`--dirty-fill`), then rewritten at the
//! rate (rate 0: the fill only, `--dirty-passes 1`; a counter workload at 10 lines/s
//! keeps that guest running); QEMU's `benches/peers/guest.c`
//! with the same working set, filled at boot, then the same rate. Both move the same
//! non-zero memory (zero pages travel without data on both sides). The migration starts
//! 1 s after the fill. QEMU's guest is booted once per point and handed from QEMU to a
//! fresh QEMU by every migration; at the end it checks its working set, which must have
//! arrived intact. Its fill would run emulated here (3-16 MB/s: minutes for 512 MiB),
//! so its memory starts as a private mapping of a file the bench wrote with the fill's
//! contents (`filled=1`).
//!
//! Runs are interleaved (twinrun, QEMU one stream, QEMU multifd, per repetition) so
//! that the machine's load drifts over all alike; the load average is recorded per run.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use twinrun_control::{self as control, FtRole, FtState, FtStatus};
use twinrun_lab::Proc;

use crate::peers::qemu::{self, GuestSpec, Mode, Qemu};
use crate::peers::qmp::Migration;
use crate::report::{Better, Figure};

const GROUP: &str = "migrate";
const SIZES_MIB: [u64; 2] = [256, 1024];
const RATES: [u32; 3] = [0, 1_000, 10_000];
const MODES: [Mode; 2] = [Mode::OneStream, Mode::Multifd(2)];
/// Target: twinrun's downtime p50 (ms).
const DOWNTIME_TARGET_MS: f64 = 20.0;
const POLL: Duration = Duration::from_millis(2);

/// One twinrun migration.
#[derive(Clone, Debug)]
struct Run {
    /// None when the swap reported no pause: the primary driver measures the pause
    /// from `PauseForSwap` and reports 0 when the final epoch's capture paused the
    /// guest without it (seen in 2 of 18 runs); not a real 0.
    downtime_ms: Option<f64>,
    total_ms: f64,
    /// Target spawned to listening, listening to the source in sync, to the swap's end.
    spawn_ms: f64,
    sync_ms: f64,
    /// The phases from both ends' logs (ms after the target's spawn).
    phases: String,
}

/// Runs of one point.
#[derive(Default)]
struct PointRuns {
    twinrun: Vec<Run>,
    qemu: [Vec<Migration>; 2],
    load: Vec<f64>,
}

/// p50 and max.
fn p50_max(v: &[f64]) -> Option<(f64, f64)> {
    if v.is_empty() {
        return None;
    }
    let (p50, _) = crate::report::median_p90(v);
    Some((p50, v.iter().copied().fold(f64::MIN, f64::max)))
}

pub fn load_average() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(f64::NAN)
}

/// Two free loopback ports (bound and released: a small race with other programs).
fn free_ports() -> Result<(u16, u16), String> {
    let a = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    let b = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    let p = |l: &std::net::TcpListener| l.local_addr().map(|a| a.port()).map_err(|e| e.to_string());
    Ok((p(&a)?, p(&b)?))
}

/// The working set: half the guest's memory.
fn wset_pages(mem_mib: u64) -> u32 {
    (mem_mib * 256 / 2) as u32
}

fn wait_until<T>(
    what: &str,
    within: Duration,
    mut f: impl FnMut() -> Result<Option<T>, String>,
) -> Result<T, String> {
    let t = Instant::now();
    loop {
        if let Some(v) = f()? {
            return Ok(v);
        }
        if t.elapsed() > within {
            return Err(format!("{what}: not within {within:?}"));
        }
        std::thread::sleep(POLL);
    }
}

/// One end of a twinrun migration: the process, its name (control socket), its log.
struct End {
    proc: Proc,
    name: String,
    log: PathBuf,
}

impl End {
    fn status(&self) -> Option<FtStatus> {
        let sock = control::socket_of(&self.name).ok()?;
        control::ft_status(&sock)
    }

    fn check_alive(&mut self) -> Result<(), String> {
        match self.proc.try_wait() {
            Some(st) => Err(format!(
                "{} exited ({st}):\n{}",
                self.name,
                twinrun_lab::console::tail(
                    &std::fs::read_to_string(&self.log).unwrap_or_default(),
                    15
                )
            )),
            None => Ok(()),
        }
    }
}

/// twinrun's side of one point.
struct Twinrun<'a> {
    twinrun: &'a Path,
    dir: &'a Path,
    secret: PathBuf,
    tag: String,
}

impl Twinrun<'_> {
    fn vm_args(&self, mem_mib: u64, rate: u32, console: &Path) -> Vec<String> {
        let mut a: Vec<String> = [
            "vm",
            "run",
            // The counter (10 lines/s) keeps the guest running once a rate-0 fill is
            // done (a guest with no workload left exits).
            "--workload",
            "dirty,counter",
            "--counter-rate",
            "10",
            "--dirty-pages",
            &wset_pages(mem_mib).to_string(),
            "--mem-mib",
            &mem_mib.to_string(),
            "--console",
            &format!("file:{}", console.display()),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        if rate == 0 {
            a.extend(["--dirty-rate", "0", "--dirty-passes", "1"].map(String::from));
        } else {
            a.extend([
                "--dirty-fill".into(),
                "--dirty-rate".into(),
                rate.to_string(),
            ]);
        }
        a
    }

    fn spawn(
        &self,
        mut args: Vec<String>,
        role: &str,
        name: &str,
        local: u16,
        peer: u16,
    ) -> Result<End, String> {
        args.extend(
            [
                "--name",
                name,
                "--role",
                role,
                "--protection",
                "unprotected",
                "--cluster-id",
                "bench-migrate",
                "--heartbeat-misses",
                "20",
            ]
            .map(String::from),
        );
        args.extend([
            "--alink".into(),
            format!("127.0.0.1:{local},127.0.0.1:{peer}"),
            "--cluster-secret-file".into(),
            self.secret.display().to_string(),
        ]);
        let log = self.dir.join(format!("{name}.log"));
        let err = std::fs::File::create(&log).map_err(|e| e.to_string())?;
        let mut cmd = Command::new(self.twinrun);
        cmd.args(&args)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(err);
        let proc = Proc::spawn(name, &mut cmd)
            .map_err(|e| format!("spawn {}: {e}", self.twinrun.display()))?;
        Ok(End {
            proc,
            name: name.to_string(),
            log,
        })
    }

    /// One migration of a fresh `mem_mib` guest dirtying `rate` pages/s.
    fn migrate(&self, mem_mib: u64, rate: u32, n: usize) -> Result<Run, String> {
        let (a, b) = free_ports()?;
        let console = self.dir.join(format!("mig-{mem_mib}-{rate}-{n}.con"));
        let src_name = format!("{}-{mem_mib}-{rate}-{n}-src", self.tag);
        let dst_name = format!("{}-{mem_mib}-{rate}-{n}-dst", self.tag);
        let mut src = self.spawn(
            self.vm_args(mem_mib, rate, &console),
            "primary",
            &src_name,
            a,
            b,
        )?;
        // The fill done (the first pass), then a second of paced writes.
        wait_until(
            "the guest's fill (D pass=1)",
            Duration::from_secs(180),
            || {
                src.check_alive()?;
                Ok(std::fs::read_to_string(&console)
                    .is_ok_and(|c| c.contains("D pass=1 "))
                    .then_some(()))
            },
        )?;
        std::thread::sleep(Duration::from_secs(1));
        let dconsole = self.dir.join(format!("mig-{mem_mib}-{rate}-{n}-dst.con"));
        let t0 = Instant::now();
        let wall0 = std::time::SystemTime::now();
        let mut dst = self.spawn(
            self.vm_args(mem_mib, rate, &dconsole),
            "standby",
            &dst_name,
            b,
            a,
        )?;
        wait_until("the target listening", Duration::from_secs(60), || {
            dst.check_alive()?;
            Ok(dst.status().filter(|s| s.session >= 1).map(|_| ()))
        })?;
        let t_listen = Instant::now();
        wait_until("the source in sync", Duration::from_secs(180), || {
            src.check_alive()?;
            dst.check_alive()?;
            Ok(src
                .status()
                .filter(|s| s.state == FtState::Protected)
                .map(|_| ()))
        })?;
        let t_sync = Instant::now();
        let sock = control::socket_of(&src.name)?;
        let (_, paused_us) = control::swap(&sock).map_err(|e| format!("swap: {e}"))?;
        wait_until(
            "the VM running on the target",
            Duration::from_secs(30),
            || {
                dst.check_alive()?;
                Ok(dst
                    .status()
                    .filter(|s| s.role == FtRole::Primary && s.vm_running)
                    .map(|_| ()))
            },
        )?;
        let t_run = Instant::now();
        src.proc.terminate(Duration::from_secs(10));
        dst.proc.terminate(Duration::from_secs(20));
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        let phases = phases(
            wall0,
            &[
                ("listening", ms(t_listen - t0)),
                ("in sync seen", ms(t_sync - t0)),
                ("running seen", ms(t_run - t0)),
            ],
            &std::fs::read_to_string(&src.log).unwrap_or_default(),
            &std::fs::read_to_string(&dst.log).unwrap_or_default(),
        );
        Ok(Run {
            downtime_ms: (paused_us > 0).then(|| paused_us as f64 / 1e3),
            total_ms: ms(t_run - t_listen),
            spawn_ms: ms(t_listen - t0),
            sync_ms: ms(t_sync - t_listen),
            phases,
        })
    }
}

/// Seconds of the day (UTC) of a log line's `[2026-12-08T01:02:03.456789Z ...`.
fn log_time(line: &str) -> Option<f64> {
    let t = line.get(line.find('T')? + 1..)?;
    let t = t.get(..t.find('Z')?)?;
    let mut it = t.split(':');
    let (h, m, s) = (it.next()?, it.next()?, it.next()?);
    Some(h.parse::<f64>().ok()? * 3600.0 + m.parse::<f64>().ok()? * 60.0 + s.parse::<f64>().ok()?)
}

/// The migration's phases, ms after the target's spawn (`wall0`), from the first log
/// line of each (end, text) below, and the bench's own observations (`seen`): where
/// the total goes.
fn phases(wall0: std::time::SystemTime, seen: &[(&str, f64)], src: &str, dst: &str) -> String {
    let t0 = wall0
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| {
            (d.as_secs() % 86_400) as f64 + f64::from(d.subsec_micros()) / 1e6
        });
    const MARKS: [(&str, bool, &str); 10] = [
        ("target log", false, ""),
        ("target A-Link up", false, "authenticated connection"),
        ("source A-Link up", true, "authenticated connection"),
        ("sync start", true, "starting the initial synchronisation"),
        ("round 0 sent", true, "initial sync round 0:"),
        ("epoch 0 captured", true, "epoch 0 captured"),
        ("protected", true, "the VM is protected"),
        ("swap asked", true, "planned role swap requested"),
        ("swap accepted", true, "the standby took the VM over"),
        ("target runs VM", false, "the VM runs here now"),
    ];
    let mut out: Vec<(f64, String)> = seen
        .iter()
        .map(|(n, v)| (*v, format!("{n} (bench)")))
        .collect();
    for (name, on_src, text) in MARKS {
        let log = if on_src { src } else { dst };
        // The source's log began long before: only lines after the target's spawn.
        if let Some(t) = log
            .lines()
            .filter(|l| l.contains(text))
            .filter_map(log_time)
            .map(|t| (t - t0) * 1e3)
            .find(|&t| t > -1.0)
        {
            out.push((t, name.to_string()));
        }
    }
    out.sort_by(|a, b| a.0.total_cmp(&b.0));
    out.iter()
        .map(|(t, n)| format!("{n} {t:.1}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// QEMU's side of one point: its guest booted and filled, moved by each migration.
struct QemuSide {
    guest: Option<Qemu>,
    elf: PathBuf,
    spec: GuestSpec,
    dir: PathBuf,
    hops: usize,
}

impl QemuSide {
    fn boot(elf: &Path, dir: &Path, mem_mib: u64, rate: u32) -> Result<QemuSide, String> {
        let spec = GuestSpec {
            mem_mib,
            wset_pages: wset_pages(mem_mib),
            rate,
            seed: 7,
            filled: true,
        };
        let name = format!("qemu-{mem_mib}-{rate}-0");
        // The working set's contents come with the memory (the guest's own fill runs
        // emulated here: minutes for 512 MiB); the file is dropped once QEMU mapped it.
        let mem = dir.join(format!("{name}.mem"));
        qemu::write_memory_file(&mem, &spec)?;
        let g = Qemu::start(
            Command::new(qemu::QEMU),
            &name,
            dir,
            elf,
            &spec,
            false,
            Some(&mem),
        );
        let filled = g.and_then(|mut g| {
            g.wait_line("PEER filled", 0, Duration::from_secs(120))?;
            Ok(g)
        });
        let _ = std::fs::remove_file(&mem);
        let g = filled?;
        std::thread::sleep(Duration::from_secs(1));
        Ok(QemuSide {
            guest: Some(g),
            elf: elf.to_path_buf(),
            spec,
            dir: dir.to_path_buf(),
            hops: 0,
        })
    }

    fn migrate(&mut self, mode: Mode) -> Result<Migration, String> {
        self.hops += 1;
        let name = format!(
            "qemu-{}-{}-{}",
            self.spec.mem_mib, self.spec.rate, self.hops
        );
        let mut dst = Qemu::start(
            Command::new(qemu::QEMU),
            &name,
            &self.dir,
            &self.elf,
            &self.spec,
            true,
            None,
        )?;
        let (port, _) = free_ports()?;
        let mut src = self.guest.take().ok_or("no QEMU guest")?;
        let r = qemu::migrate(
            &mut src,
            &mut dst,
            &format!("tcp:127.0.0.1:{port}"),
            mode,
            Duration::from_secs(300),
        );
        match r {
            Ok(m) => {
                src.stop();
                self.guest = Some(dst);
                // Let the guest settle (and its rate resume) before the next hop.
                std::thread::sleep(Duration::from_millis(500));
                Ok(m)
            }
            Err(e) => {
                dst.stop();
                self.guest = Some(src);
                Err(e)
            }
        }
    }

    /// The guest checks its working set after the hops: the bad page count.
    fn verify(mut self) -> Result<u64, String> {
        let mut g = self.guest.take().ok_or("no QEMU guest")?;
        let bad = g.verify(Duration::from_secs(300));
        g.stop();
        bad
    }
}

/// Runs the section. `install`: install Debian's QEMU when missing (`--peers`).
pub fn run(twinrun: &Path, dir: &Path, quick: bool, install: bool) -> Result<Vec<Figure>, String> {
    let reps = if quick { 1 } else { 3 };
    let sizes: &[u64] = if quick { &SIZES_MIB[..1] } else { &SIZES_MIB };
    let secret = dir.join("migrate-secret");
    std::fs::write(&secret, b"twinrun-bench-migrate-secret-0123").map_err(|e| e.to_string())?;
    let tw = Twinrun {
        twinrun,
        dir,
        secret,
        tag: format!("bm{}", std::process::id()),
    };
    let qemu_elf = qemu::ensure(install).and_then(|v| {
        eprintln!("   {v}");
        qemu::build_guest(dir)
    });
    if let Err(e) = &qemu_elf {
        eprintln!("   QEMU side NOT MEASURED: {e}");
    }
    let mut figs = Vec::new();
    let mut table = String::new();
    let _ = writeln!(
        table,
        "   {:<9} {:>6}  {:>22}  {:>22}  {:>22}  {:>22}  {:>9}",
        "guest",
        "pages/s",
        "twinrun down p50/max",
        "twinrun total p50/max",
        "QEMU 1 down / total",
        "QEMU mfd2 down / total",
        "load"
    );
    for &mem in sizes {
        for &rate in &RATES {
            eprintln!("   {mem} MiB at {rate} dirty pages/s ...");
            let mut runs = PointRuns::default();
            let mut qside = match &qemu_elf {
                Ok(elf) => Some(QemuSide::boot(elf, dir, mem, rate)),
                Err(_) => None,
            };
            let mut qerr: Option<String> = None;
            if let Some(Err(e)) = &qside {
                qerr = Some(e.clone());
            }
            for n in 0..reps {
                runs.load.push(load_average());
                let r = tw.migrate(mem, rate, n)?;
                eprintln!(
                    "     twinrun: downtime {} ms, total {:.0} ms (target start {:.0} ms, to in sync {:.0} ms); load {:.1}",
                    r.downtime_ms.map_or("(none reported)".into(), |d| format!("{d:.1}")), r.total_ms, r.spawn_ms, r.sync_ms, load_average()
                );
                eprintln!("       phases (ms after the target's spawn): {}", r.phases);
                runs.twinrun.push(r);
                if let Some(Ok(q)) = qside.as_mut() {
                    for (i, mode) in MODES.iter().enumerate() {
                        runs.load.push(load_average());
                        match q.migrate(*mode) {
                            Ok(m) => {
                                eprintln!(
                                    "     QEMU {}: downtime {} ms, total {} ms, {:.0} MB/s; load {:.1}",
                                    mode.label(),
                                    m.downtime.unwrap_or(0),
                                    m.total_time.unwrap_or(0),
                                    m.mb_per_s().unwrap_or(0.0),
                                    load_average()
                                );
                                runs.qemu[i].push(m);
                            }
                            Err(e) => {
                                eprintln!("     QEMU {}: {e}", mode.label());
                                qerr.get_or_insert(e);
                            }
                        }
                    }
                }
            }
            if let Some(Ok(q)) = qside {
                match q.verify() {
                    Ok(0) => {}
                    Ok(bad) => {
                        return Err(format!(
                            "QEMU's guest ({mem} MiB, {rate} pages/s) found {bad} bad pages after its migrations"
                        ))
                    }
                    Err(e) => {
                        qerr.get_or_insert(format!("verify: {e}"));
                    }
                }
            }
            figs.extend(point_figures(mem, rate, &runs, qerr.as_deref(), &mut table));
        }
    }
    eprint!("{table}");
    Ok(figs)
}

fn point_figures(
    mem: u64,
    rate: u32,
    runs: &PointRuns,
    qerr: Option<&str>,
    table: &mut String,
) -> Vec<Figure> {
    let point = format!("{mem} MiB, {rate} pages/s");
    let (lmin, lmax) = runs
        .load
        .iter()
        .fold((f64::MAX, f64::MIN), |(a, b), &l| (a.min(l), b.max(l)));
    let load = format!("load avg {lmin:.1}-{lmax:.1}");
    let down: Vec<f64> = runs.twinrun.iter().filter_map(|r| r.downtime_ms).collect();
    let unreported = runs.twinrun.len() - down.len();
    let unreported = if unreported > 0 {
        format!("; {unreported} run(s) whose swap reported no pause (0 us) left out")
    } else {
        String::new()
    };
    let total: Vec<f64> = runs.twinrun.iter().map(|r| r.total_ms).collect();
    let sync: Vec<f64> = runs.twinrun.iter().map(|r| r.sync_ms).collect();
    let q = |i: usize, f: fn(&Migration) -> Option<u64>| -> Vec<f64> {
        runs.qemu[i]
            .iter()
            .filter_map(f)
            .map(|v| v as f64)
            .collect()
    };
    let qdown = [q(0, |m| m.downtime), q(1, |m| m.downtime)];
    let qtotal = [q(0, |m| m.total_time), q(1, |m| m.total_time)];
    // QEMU's best configuration at this point: the lower total p50.
    let best = (0..MODES.len())
        .filter_map(|i| p50_max(&qtotal[i]).map(|(p, _)| (i, p)))
        .min_by(|a, b| a.1.total_cmp(&b.1));
    let qnote = qerr.map_or(String::new(), |e| {
        format!("; QEMU: {}", e.lines().next().unwrap_or(""))
    });
    let mut figs = Vec::new();
    let pm = |v: &[f64]| p50_max(v).map_or("-".to_string(), |(p, m)| format!("{p:.1}/{m:.1}"));
    let pq = |d: &[f64], t: &[f64]| match (p50_max(d), p50_max(t)) {
        (Some((d, _)), Some((t, _))) => format!("{d:.0} / {t:.0}"),
        _ => "-".into(),
    };
    let _ = writeln!(
        table,
        "   {:<9} {:>6}  {:>22}  {:>22}  {:>22}  {:>22}  {:>9}",
        format!("{mem} MiB"),
        rate,
        pm(&down),
        pm(&total),
        pq(&qdown[0], &qtotal[0]),
        pq(&qdown[1], &qtotal[1]),
        format!("{lmin:.1}-{lmax:.1}")
    );
    if let Some((p50, max)) = p50_max(&down) {
        let mut f = Figure::new(
            GROUP,
            &format!("{point}: twinrun downtime p50"),
            p50,
            "ms",
            Better::Lower,
        )
        .target(DOWNTIME_TARGET_MS, false, "<= 20 ms")
        .note(format!(
            "max {max:.1} ms of {} runs (the swap's guest pause){unreported}; {load}",
            down.len()
        ));
        if let Some((p, _)) = p50_max(&qdown[best.map_or(0, |b| b.0)]) {
            f = f.baseline(
                &format!(
                    "QEMU {} downtime p50",
                    MODES[best.map_or(0, |b| b.0)].label()
                ),
                p,
            );
        }
        figs.push(f);
    }
    if let Some((p50, max)) = p50_max(&total) {
        let (sp, _) = p50_max(&sync).unwrap_or_default();
        let mut f = Figure::new(GROUP, &format!("{point}: twinrun total p50"), p50, "ms", Better::Lower)
            .note(format!(
                "max {max:.0} ms of {} runs; target listening to VM running on it (to in sync p50 {sp:.0} ms); {load}{qnote}",
                total.len()
            ));
        if let Some((i, p)) = best {
            f = f
                .baseline(&format!("QEMU {} total p50, uncapped", MODES[i].label()), p)
                .target(1.0, true, "<= QEMU's");
        }
        figs.push(f);
    }
    for (i, mode) in MODES.iter().enumerate() {
        let mbs: Vec<f64> = runs.qemu[i]
            .iter()
            .filter_map(Migration::mb_per_s)
            .collect();
        let mbs = p50_max(&mbs).map_or(String::new(), |(p, _)| format!(", {p:.0} MB/s p50"));
        if let Some((p50, max)) = p50_max(&qdown[i]) {
            figs.push(
                Figure::new(
                    GROUP,
                    &format!("{point}: QEMU {} downtime p50", mode.label()),
                    p50,
                    "ms",
                    Better::Lower,
                )
                .note(format!(
                    "max {max:.0} ms of {} runs (query-migrate); {load}",
                    qdown[i].len()
                )),
            );
        }
        if let Some((p50, max)) = p50_max(&qtotal[i]) {
            figs.push(
                Figure::new(
                    GROUP,
                    &format!("{point}: QEMU {} total p50", mode.label()),
                    p50,
                    "ms",
                    Better::Lower,
                )
                .note(format!(
                    "max {max:.0} ms of {} runs, uncapped{mbs}; {load}",
                    qtotal[i].len()
                )),
            );
        }
    }
    figs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn p50_and_max() {
        assert_eq!(p50_max(&[]), None);
        assert_eq!(p50_max(&[3.0, 1.0, 2.0]), Some((2.0, 3.0)));
        assert_eq!(p50_max(&[4.0, 1.0]), Some((2.5, 4.0)));
    }

    #[test]
    fn working_set_is_half_the_guest() {
        assert_eq!(wset_pages(256), 32_768);
        assert_eq!(wset_pages(1024), 131_072);
    }
}
