//! `ft-swap`: the planned role swap's client-visible stall (issue 15 item 5): an FT
//! pair of `twinrun vm run` processes on the lab topology (no witness), the kv guest
//! under a client's load on ONE connection, swapped back and forth with
//! `control::swap` (what `twinrun vm swap` sends). Measured per swap: the longest kv
//! reply wait in a window holding the swap; the baseline is the same window's longest
//! reply wait without a swap, measured in the same run on the same pair. Also the old
//! primary's guest pause until the standby's acceptance. Figures, not asserts.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use twinrun_control::{FtRole, FtState, FtStatus};
use twinrun_lab::kvload::{LoadClient, LoadConfig};
use twinrun_lab::topology::KV_PORT;
use twinrun_lab::{Proc, Topology};

use crate::report::{Better, Figure};

const CLUSTER: &str = "bench-swap";
/// The window around one swap (the swap is asked 100 ms into it).
const WINDOW: Duration = Duration::from_millis(1000);

fn status(sock: &Path) -> Option<FtStatus> {
    twinrun_control::ft_status(sock)
}

fn wait(
    sock: &Path,
    what: &str,
    t: Duration,
    ok: impl Fn(&FtStatus) -> bool,
) -> Result<(), String> {
    let t0 = Instant::now();
    while !status(sock).is_some_and(|s| ok(&s)) {
        if t0.elapsed() > t {
            return Err(format!("{what}: not within {t:?}"));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

/// `HH:MM:SS.uuuuuu` (UTC) of `t`, as the VMMs' log lines print it.
fn utc_time(t: std::time::SystemTime) -> String {
    let d = t.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let s = d.as_secs() % 86_400;
    format!(
        "{:02}:{:02}:{:02}.{:06}",
        s / 3600,
        s / 60 % 60,
        s % 60,
        d.subsec_micros()
    )
}

/// `TWINRUN_BENCH_KEEP_LOGS=DIR`: the VMMs' logs are copied there (the scratch
/// directory goes at the end): the swaps' timelines on both ends.
fn keep_logs(dir: &Path) {
    let Some(to) = std::env::var_os("TWINRUN_BENCH_KEEP_LOGS") else {
        return;
    };
    let to = PathBuf::from(to);
    let _ = std::fs::create_dir_all(&to);
    for pm in ["bswap-pm1", "bswap-pm2"] {
        let f = format!("{pm}.log");
        if let Err(e) = std::fs::copy(dir.join(&f), to.join(&f)) {
            eprintln!("   ft-swap: cannot keep {f}: {e}");
        }
    }
}

fn p(v: &mut [f64], q: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    v[((v.len() as f64 - 1.0) * q).round() as usize]
}

/// The section: `runs` swaps (and as many baseline windows).
pub fn run(twinrun: &Path, elf: &Path, dir: &Path, quick: bool) -> Result<Vec<Figure>, String> {
    let runs = if quick { 6 } else { 20 };
    let topo = Topology::builder()
        .prefix("bs")
        .build()
        .map_err(|e| format!("topology: {e}"))?;
    let dir = dir.join("ft-swap");
    std::fs::create_dir_all(dir.join("run")).map_err(|e| e.to_string())?;
    let secret = dir.join("cluster.secret");
    std::fs::write(&secret, b"bench-swap-cluster-secret-0123456789").map_err(|e| e.to_string())?;
    let spawn = |role: &str, pm: usize| -> Result<(Proc, PathBuf), String> {
        let name = format!("bswap-pm{}", pm + 1);
        let console = dir.join(format!("{name}.console"));
        let mut cmd = topo.pms[pm].ns.command(twinrun);
        cmd.env("TWINRUN_RUN_DIR", dir.join("run"))
            .args(["vm", "run", "--guest"])
            .arg(elf)
            .args(["--mem-mib", "64", "--workload", "kv", "--console"])
            .arg(format!("file:{}", console.display()))
            .args(topo.vm_net_args(pm))
            .args(["--role", role, "--name", &name])
            .args(topo.alink_args(pm))
            .args(["--cluster-id", CLUSTER, "--cluster-secret-file"])
            .arg(&secret);
        let p = Proc::spawn_logged(role, &mut cmd, &dir.join(format!("{name}.log")))
            .map_err(|e| format!("spawn {role}: {e}"))?;
        Ok((p, dir.join("run").join(format!("{name}.sock"))))
    };
    let (mut pm2, sock2) = spawn("standby", 1)?;
    wait(
        &sock2,
        "the standby listens",
        Duration::from_secs(30),
        |s| s.session >= 1,
    )
    .map_err(|e| format!("{e}\n{}", pm2.log_tail(30)))?;
    let (mut pm1, sock1) = spawn("primary", 0)?;
    let protected = |s: &FtStatus| s.role == FtRole::Primary && s.state == FtState::Protected;
    wait(&sock1, "protected", Duration::from_secs(90), protected)
        .map_err(|e| format!("{e}\n{}\n{}", pm1.log_tail(30), pm2.log_tail(30)))?;
    let addr = SocketAddr::from((topo.guest_ip(), KV_PORT));
    let client = LoadClient::start(LoadConfig::new(topo.client_ns(), addr))
        .map_err(|e| format!("load client: {e}"))?;
    client
        .wait_acks(200, Duration::from_secs(30))
        .map_err(|e| format!("load: {e}\n{}", pm1.log_tail(30)))?;
    let socks = [sock1, sock2];
    let mut primary = 0usize;
    let (mut base, mut stall, mut pause) = (Vec::new(), Vec::new(), Vec::new());
    let mut result = Ok(());
    for r in 0..runs {
        let b = client.max_reply_during(WINDOW);
        let sock = socks[primary].clone();
        let swap = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            twinrun_control::swap(&sock)
        });
        let (s, s_at) = client.max_reply_during_at(WINDOW);
        let (epoch, paused_us) = match swap.join() {
            Ok(Ok(v)) => v,
            Ok(Err(e)) => {
                result = Err(format!("swap {r}: {e}"));
                break;
            }
            Err(_) => {
                result = Err(format!("swap {r}: the request thread panicked"));
                break;
            }
        };
        let new = 1 - primary;
        if let Err(e) = wait(
            &socks[new],
            "protected again",
            Duration::from_secs(60),
            protected,
        ) {
            result = Err(format!("swap {r}: {e}"));
            break;
        }
        if let Err(e) = client.wait_acks(50, Duration::from_secs(15)) {
            result = Err(format!("swap {r}: after the swap: {e}"));
            break;
        }
        eprintln!(
            "   swap {r}: PM{} -> PM{} at epoch {epoch}: longest reply {:.0} ms (baseline \
             window {:.0} ms), old primary paused {:.2} ms until the acceptance; that \
             request sent at {} UTC",
            primary + 1,
            new + 1,
            s.as_secs_f64() * 1e3,
            b.as_secs_f64() * 1e3,
            paused_us as f64 / 1e3,
            s_at.map_or_else(|| "?".into(), utc_time)
        );
        base.push(b.as_secs_f64() * 1e3);
        stall.push(s.as_secs_f64() * 1e3);
        pause.push(paused_us as f64 / 1e3);
        primary = new;
    }
    let rep = client.finish();
    keep_logs(&dir);
    let logs = format!("{}\n{}", pm1.log_tail(30), pm2.log_tail(30));
    pm1.kill();
    pm2.kill();
    result.map_err(|e| format!("{e}\n{logs}"))?;
    let rep = rep.map_err(|e| format!("client: {e}"))?;
    if !rep.errors.is_empty() || !rep.connection_survived() || !rep.lost.is_empty() {
        return Err(format!(
            "the client saw errors {:?}, {} reconnects, {} acknowledged writes lost",
            rep.errors,
            rep.reconnects,
            rep.lost.len()
        ));
    }
    let note = format!(
        "{runs} swaps back and forth, no witness; kv guest, 64 MiB, one client connection \
         (it survived, nothing acknowledged lost); longest reply wait in a {WINDOW:?} \
         window holding the swap, baseline: the same window without one (ms resolution)"
    );
    let fig = |name: &str, v: f64, unit: &str| {
        Figure::new("ft-swap", name, v, unit, Better::Lower).note(note.clone())
    };
    Ok(vec![
        fig("swap: client-visible stall p50", p(&mut stall, 0.5), "ms").target(
            5.0,
            false,
            "p50 <= 5 ms",
        ),
        fig("swap: client-visible stall p99", p(&mut stall, 0.99), "ms"),
        fig(
            "no swap (baseline): longest reply p50",
            p(&mut base, 0.5),
            "ms",
        ),
        fig(
            "no swap (baseline): longest reply p99",
            p(&mut base, 0.99),
            "ms",
        ),
        fig(
            "swap: old primary paused until accepted p50",
            p(&mut pause, 0.5),
            "ms",
        ),
    ])
}
