//! What protecting a VM costs beyond the guest itself (issue 17, item 4): the resident
//! memory of the primary and of the standby beyond what the same VM uses unprotected,
//! and the CPU time of their checkpoint threads per 1,000 dirty pages per epoch.
//!
//! Real `twinrun vm run` processes on loopback (the A-Link on 127.0.0.1, no network
//! devices): first the VM alone, then a standby and a primary, each measured the same way
//! once the pair is protected: `VmRSS` from `/proc/<pid>/status`, and per thread the CPU
//! time (`utime + stime` of `/proc/<pid>/task/<tid>/stat`) over a window. On the primary
//! the vCPU threads (`vcpu*`) and device emulation (`twinrun-devices`) are the guest's
//! own cost; every other thread is checkpointing (the driver on the main thread, the
//! A-Link's readers and writers). The standby runs no guest: all of its threads count.
//! (Half of a large epoch part is copied on vCPU 0's parked thread during the pause:
//! that bit is counted as the guest's.)

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use twinrun_lab::Proc;

use crate::report::{Better, Figure};

/// Threads of a twinrun process that run the guest, not the checkpointing.
fn is_guest_thread(name: &str) -> bool {
    name.starts_with("vcpu") || name == "twinrun-devices"
}

/// CPU seconds per thread name (threads of one name summed).
fn thread_cpu(pid: u32) -> BTreeMap<String, f64> {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let mut out = BTreeMap::new();
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for e in dir.flatten() {
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
            continue;
        };
        // "tid (comm) state ..." : the comm may hold spaces; fields after ')' .
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let name = stat[open + 1..close].to_string();
        let f: Vec<&str> = stat[close + 2..].split(' ').collect();
        // After the comm: state is field 0, utime field 11, stime field 12.
        let t = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
        *out.entry(name).or_insert(0.0) += (t(11) + t(12)) / hz;
    }
    out
}

fn rss_mib(pid: u32) -> Option<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: f64 = s
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some(kb / 1024.0)
}

fn pid(p: &Proc) -> Result<u32, String> {
    p.pid()
        .ok_or_else(|| format!("{} already exited", p.name()))
}

/// One side's sample over a window.
struct Sample {
    rss_mib: f64,
    /// CPU seconds per thread name over the window.
    cpu: BTreeMap<String, f64>,
}

fn sample(pids: &[u32], window: Duration) -> Vec<Sample> {
    let before: Vec<_> = pids.iter().map(|p| thread_cpu(*p)).collect();
    std::thread::sleep(window);
    pids.iter()
        .zip(before)
        .map(|(p, b)| {
            let after = thread_cpu(*p);
            let cpu = after
                .into_iter()
                .map(|(k, v)| {
                    let d = v - b.get(&k).copied().unwrap_or(0.0);
                    (k, d.max(0.0))
                })
                .collect();
            Sample {
                rss_mib: rss_mib(*p).unwrap_or(f64::NAN),
                cpu,
            }
        })
        .collect()
}

fn wait_for(path: &Path, needle: &str, within: Duration) -> Result<(), String> {
    let t = Instant::now();
    while t.elapsed() < within {
        if std::fs::read_to_string(path).is_ok_and(|s| s.contains(needle)) {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Err(format!(
        "no {needle:?} in {} within {within:?}",
        path.display()
    ))
}

/// Memory and CPU of a protected `mem_mib` guest dirtying `rate` pages/s over a working
/// set of `pages` (1,000 pages per 20 ms epoch at 50,000/s).
pub fn overhead(twinrun: &Path, dir: &Path, quick: bool) -> Result<Vec<Figure>, String> {
    let mem_mib: u64 = 1024;
    let (pages, rate) = (16_384u32, 50_000u32);
    let window = Duration::from_secs(if quick { 2 } else { 5 });
    let port = 20_000 + (std::process::id() % 2000) as u16 * 4;
    let secret = dir.join("overhead-secret");
    std::fs::write(&secret, b"twinrun-bench-overhead-secret-0123").map_err(|e| e.to_string())?;
    let vm_args = |console: &Path| -> Vec<String> {
        [
            "vm",
            "run",
            "--workload",
            "dirty",
            "--dirty-pages",
            &pages.to_string(),
            "--dirty-rate",
            &rate.to_string(),
            "--mem-mib",
            &mem_mib.to_string(),
            "--console",
            &format!("file:{}", console.display()),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let spawn = |args: Vec<String>, log: &Path| -> Result<Proc, String> {
        let err = std::fs::File::create(log).map_err(|e| e.to_string())?;
        let mut cmd = Command::new(twinrun);
        cmd.args(args)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(err);
        Proc::spawn("twinrun", &mut cmd).map_err(|e| format!("spawn {}: {e}", twinrun.display()))
    };
    // The VM alone.
    let (c0, l0) = (dir.join("ovh-alone.con"), dir.join("ovh-alone.log"));
    let mut alone = spawn(vm_args(&c0), &l0)?;
    wait_for(&c0, "D pass=", Duration::from_secs(60))?;
    std::thread::sleep(Duration::from_secs(1));
    let base = sample(&[pid(&alone)?], window).remove(0);
    alone.terminate(Duration::from_secs(10));
    drop(alone);
    // The pair.
    let (cs, ls) = (dir.join("ovh-standby.con"), dir.join("ovh-standby.log"));
    let (cp, lp) = (dir.join("ovh-primary.con"), dir.join("ovh-primary.log"));
    let ft = |role: &str, local: u16, peer: u16| -> Vec<String> {
        vec![
            "--role".into(),
            role.into(),
            "--alink".into(),
            format!("127.0.0.1:{local},127.0.0.1:{peer}"),
            "--cluster-secret-file".into(),
            secret.display().to_string(),
            "--heartbeat-misses".into(),
            "20".into(),
        ]
    };
    let mut sargs = vm_args(&cs);
    sargs.extend(ft("standby", port, port + 1));
    let mut standby = spawn(sargs, &ls)?;
    std::thread::sleep(Duration::from_millis(300));
    let mut pargs = vm_args(&cp);
    pargs.extend(ft("primary", port + 1, port));
    let mut primary = spawn(pargs, &lp)?;
    wait_for(&lp, "FT primary: protected", Duration::from_secs(120))?;
    std::thread::sleep(Duration::from_secs(1));
    let mut s = sample(&[pid(&primary)?, pid(&standby)?], window);
    let (ps, ss) = (s.remove(0), s.remove(0));
    // Standby first (so the primary does not fail over), then the primary, whose exit
    // logs its report line (dirty pages per epoch).
    standby.terminate(Duration::from_secs(10));
    primary.terminate(Duration::from_secs(20));
    drop((standby, primary));
    let log = std::fs::read_to_string(&lp).unwrap_or_default();
    let per_epoch = super::kv::parse_pages(&log);
    let secs = window.as_secs_f64();
    let ckpt_primary: f64 = ps
        .cpu
        .iter()
        .filter(|(k, _)| !is_guest_thread(k))
        .map(|(_, v)| v)
        .sum::<f64>()
        / secs;
    let ckpt_standby: f64 = ss.cpu.values().sum::<f64>() / secs;
    let guest_alone: f64 = base.cpu.values().sum::<f64>() / secs;
    let threads = |s: &Sample| {
        s.cpu
            .iter()
            .filter(|(_, v)| **v > 0.005 * secs)
            .map(|(k, v)| format!("{k} {:.2}", v / secs))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let guest_mib = mem_mib as f64;
    let note = format!(
        "{mem_mib} MiB guest, dirty {rate} pages/s over {pages} pages, 20 ms epochs, {} dirty pages/epoch measured; real processes, loopback A-Link; {}-s window",
        per_epoch.map_or("?".into(), |p| format!("{p:.0}")),
        window.as_secs()
    );
    crate::series::bars(
        "overhead-memory",
        "resident memory beyond the VM unprotected (% of the guest's size)",
        vec![
            (
                "primary".into(),
                100.0 * (ps.rss_mib - base.rss_mib) / mem_mib as f64,
            ),
            (
                "standby".into(),
                100.0 * (ss.rss_mib - base.rss_mib) / mem_mib as f64,
            ),
            ("target".into(), 5.0),
        ],
    );
    let mut figs = vec![
        Figure::new(
            "overhead",
            "primary: resident memory beyond the same VM unprotected",
            100.0 * (ps.rss_mib - base.rss_mib) / guest_mib,
            "% of guest",
            Better::Lower,
        )
        .target(5.0, false, "<= 5 % of the guest's size")
        .note(format!(
            "RSS {:.0} MiB vs {:.0} MiB unprotected; {note}",
            ps.rss_mib, base.rss_mib
        )),
        Figure::new(
            "overhead",
            "standby: resident memory beyond its mirror",
            100.0 * (ss.rss_mib - base.rss_mib) / guest_mib,
            "% of guest",
            Better::Lower,
        )
        .target(5.0, false, "<= 5 % of the guest's size")
        .note(format!(
            "RSS {:.0} MiB; the mirror counted as the unprotected VM's {:.0} MiB (guest memory as touched); {note}",
            ss.rss_mib, base.rss_mib
        )),
        Figure::new(
            "overhead",
            "checkpoint CPU, primary + standby",
            ckpt_primary + ckpt_standby,
            "cores",
            Better::Lower,
        )
        .target(1.0, false, "<= 1 core at 1,000 pages per 20 ms epoch")
        .note(format!(
            "primary {ckpt_primary:.2} ({}), standby {ckpt_standby:.2} ({}); the guest alone {guest_alone:.2} cores; {note}",
            threads(&ps),
            threads(&ss)
        )),
    ];
    if let Some(p) = per_epoch.filter(|p| *p > 0.0) {
        figs.push(
            Figure::new(
                "overhead",
                "checkpoint CPU per 1,000 dirty pages per epoch",
                (ckpt_primary + ckpt_standby) * 1000.0 / p,
                "cores",
                Better::Lower,
            )
            .note(format!(
                "both ends, scaled from {p:.0} pages per epoch; {note}"
            )),
        );
    }
    for f in [c0, l0, cs, ls, cp, lp, secret] {
        let _ = std::fs::remove_file(f);
    }
    Ok(figs)
}
