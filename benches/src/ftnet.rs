//! FT mode with real processes on the demo topology (issue 4): what `ft` (an
//! in-process pair over loopback) cannot show.
//!
//! The network is `twinrun_lab::Topology` (namespaces pm1, pm2, the switch with the
//! LAN, client; two A-Link veths between the PMs; a TAP per PM bridged to the LAN).
//! The guest runs the `kv` workload, 64 MiB, in `twinrun vm run` processes:
//!
//! - unprotected: `twinrun vm run` (no `--role`) in pm1 on PM1's TAP;
//! - FT: `--role standby` in pm2 and `--role primary` in pm1, default epoch, both
//!   A-Links, measured once the primary's control socket says it is protected.
//!
//! Against each, from the client namespace: `redis-benchmark -t set,get -c 10 -q` with
//! `-P 1` and `-P 16` (requests/s, target FT >= 80 % of unprotected), then a RESP
//! ping-pong client on one connection (`SET` and wait for `+OK`, one at a time) for
//! the request latency p50/p99 (target: added p50 within the epoch length + 2 ms).
//! Last, raw TCP throughput over A-Link 1 (a sender thread in pm1, a receiver in
//! pm2, no VM), next to the same over loopback in this run: the figure to put beside
//! `ft: checkpoint throughput` (whose baseline is loopback).
//!
//! Every count and wait is bounded; the namespaces and processes go away on drop.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use twinrun_control::{FtState, SessionStatus};
use twinrun_lab::resp::{Reply, Resp};
use twinrun_lab::tcp::{tcp_join, tcp_receiver, tcp_sender};
use twinrun_lab::topology::KV_PORT;
use twinrun_lab::{Proc, Topology};

use crate::report::{Better, Figure};

const UNPROT: &str = "same guest unprotected, same topology";

/// How much to measure.
pub struct Sizes {
    pub bench_n: u32,
    pub latency_samples: usize,
    pub tcp_secs: f64,
}

/// How much kv load one measurement puts on a guest (shared with the `ft-epoch`
/// sweep, which measures the same guest the same way).
pub(crate) struct Load {
    /// `redis-benchmark -n` per pipeline depth.
    pub bench_n: u32,
    /// SET round trips for the latency percentiles.
    pub latency_samples: usize,
    /// `redis-benchmark -c` (concurrent clients).
    pub clients: u32,
}

/// Results of one guest configuration (FT or unprotected).
pub(crate) struct Side {
    /// (SET, GET) requests/s per entry of [`PIPELINES`].
    pub rps: Vec<(f64, f64)>,
    /// Sorted round-trip times in ms.
    pub lat_ms: Vec<f64>,
    /// From the first PONG to the last latency sample.
    pub window: Duration,
}

pub(crate) const PIPELINES: [u32; 2] = [1, 16];

fn redis_bench(topo: &Topology, n: u32, pipeline: u32, clients: u32) -> Result<(f64, f64), String> {
    let host = topo.guest_ip().to_string();
    let c = topo.client.ns.command("redis-benchmark");
    crate::redis::set_get(c, &host, n, pipeline, clients, Duration::from_secs(120))
}

/// `SET lat:<i> <i>` one at a time on one connection from the client namespace;
/// `warmup` untimed requests first. Returns the sorted round trips in ms. Bounded by
/// a 2 s read timeout per reply and a 60 s deadline overall.
fn latency(ns: &str, addr: SocketAddr, samples: usize, warmup: usize) -> Result<Vec<f64>, String> {
    let worker = twinrun_lab::netns::in_netns(ns, move || -> Result<Vec<f64>, String> {
        let mut c = Resp::connect_with(addr, Duration::from_secs(5), Duration::from_secs(2))
            .map_err(|e| format!("connect {addr}: {e}"))?;
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut out = Vec::with_capacity(samples);
        for i in 0..samples + warmup {
            if Instant::now() > deadline {
                break;
            }
            let (k, v) = (format!("lat:{i}"), i.to_string());
            let t = Instant::now();
            let r = c
                .call(&["SET", &k, &v])
                .map_err(|e| format!("reply {i}: {e}"))?;
            let dt = t.elapsed();
            if r != Reply::Simple("OK".into()) {
                return Err(format!("reply {i}: unexpected {r:?}"));
            }
            if i >= warmup {
                out.push(dt.as_secs_f64() * 1e3);
            }
        }
        Ok(out)
    })
    .map_err(|e| e.to_string())?;
    let mut v = worker.join().map_err(|e| e.to_string())??;
    if v.len() < samples / 2 {
        return Err(format!(
            "only {} of {samples} latency samples within the deadline",
            v.len()
        ));
    }
    v.sort_by(f64::total_cmp);
    Ok(v)
}

pub(crate) fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// Once the kv guest answers PING: `redis-benchmark` at each of [`PIPELINES`], then
/// the latency client (20 untimed requests first).
pub(crate) fn measure(topo: &Topology, load: &Load) -> Result<Side, String> {
    crate::redis::wait_ping(topo, &topo.guest_ip().to_string(), Duration::from_secs(30))?;
    let t0 = Instant::now();
    let mut rps = Vec::new();
    for p in PIPELINES {
        rps.push(redis_bench(topo, load.bench_n, p, load.clients)?);
    }
    let addr = SocketAddr::from((topo.guest_ip(), KV_PORT));
    let lat_ms = latency(topo.client_ns(), addr, load.latency_samples, 20)?;
    Ok(Side {
        rps,
        lat_ms,
        window: t0.elapsed(),
    })
}

/// `twinrun vm run` of the 64 MiB kv guest on `tap`, console to `console`.
/// Pages the guest fills at boot (32 MiB of its 64: the dirty workload takes at most half).
const FILL_PAGES: u32 = 8192;

pub(crate) fn vm_args(elf: &Path, topo: &Topology, console: &Path, pm: usize) -> Vec<String> {
    let mut v: Vec<String> = ["vm", "run", "--guest"].map(String::from).to_vec();
    v.push(elf.display().to_string());
    v.extend([
        "--mem-mib".into(),
        "64".into(),
        // The dirty workload writes 32 MiB of seeded (non-zero) pages once at boot, then
        // only kv runs: the guest's RAM is mostly not zero, like a server's with its
        // page cache, so the initial sync really ships it (zero pages are not sent).
        "--workload".into(),
        "kv,dirty".into(),
        "--dirty-pages".into(),
        FILL_PAGES.to_string(),
        "--dirty-rate".into(),
        "0".into(),
        "--dirty-passes".into(),
        "1".into(),
        "--console".into(),
        format!("file:{}", console.display()),
    ]);
    v.extend(topo.vm_net_args(pm));
    v
}

/// Waits (30 s at most) for the guest's line saying it wrote its fill pages once.
pub(crate) fn wait_filled(vm: &mut Proc, console: &Path) -> Result<(), String> {
    let mut con = twinrun_lab::console::ConsoleLog::new(console).every(Duration::from_millis(5));
    con.wait_while(
        Duration::from_secs(30),
        |l| l.starts_with("D pass=1 "),
        || vm.alive(),
    )
    .map_err(|e| {
        format!(
            "the {} guest did not fill its memory: {e}\n{}",
            vm.name(),
            vm.log()
        )
    })
    .map(|_| ())
}

pub(crate) fn read_log(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_default()
}

/// `twinrun` in PM `pm`'s namespace, its control socket (if named) in `dir/run`.
pub(crate) fn twinrun_in(
    topo: &Topology,
    pm: usize,
    twinrun: &Path,
    dir: &Path,
) -> std::process::Command {
    let mut c = topo.pms[pm].ns.command(twinrun);
    c.env("TWINRUN_RUN_DIR", dir.join("run"));
    c
}

/// The kv guest unprotected in pm1 on PM1's TAP, measured; its files are
/// `<tag>-u.console` and `<tag>-u.log` in `dir`.
pub(crate) fn unprotected(
    twinrun: &Path,
    elf: &Path,
    dir: &Path,
    topo: &Topology,
    tag: &str,
    load: &Load,
) -> Result<Side, String> {
    let (console, log) = (
        dir.join(format!("{tag}-u.console")),
        dir.join(format!("{tag}-u.log")),
    );
    let _ = std::fs::remove_file(&console);
    let mut cmd = twinrun_in(topo, 0, twinrun, dir);
    cmd.args(vm_args(elf, topo, &console, 0));
    let mut vm = Proc::spawn_logged("unprotected VM", &mut cmd, &log)
        .map_err(|e| format!("spawn unprotected VM: {e}"))?;
    // As the FT pair's primary: measured once the guest has filled its memory (first
    // writes to guest pages are slow on a software KVM; they must not land in the
    // measurement).
    wait_filled(&mut vm, &console)?;
    let r = measure(topo, load);
    if let Some(st) = vm.try_wait() {
        return Err(format!("the unprotected VM exited ({st}):\n{}", vm.log()));
    }
    vm.terminate(Duration::from_secs(5));
    r.map_err(|e| format!("unprotected: {e}\nVM log:\n{}", vm.log()))
}

/// A running FT pair of the kv guest: standby in pm2, primary in pm1, both A-Links.
/// Its files in `dir` are `<tag>.secret`, `<tag>-{p,s}.log` and `<tag>-{p,s}.console`;
/// its control sockets are in `dir/run`.
pub(crate) struct Pair {
    primary: Proc,
    standby: Proc,
    /// The control sockets of the primary and the standby.
    psock: PathBuf,
    ssock: PathBuf,
    pub secret: PathBuf,
    pub plog: PathBuf,
    pub slog: PathBuf,
    pub pcon: PathBuf,
    pub scon: PathBuf,
}

impl Pair {
    /// Starts the pair (`primary_args` added to the primary's command line, e.g.
    /// `--epoch-ms`) and returns once the primary's status says protected (60 s at
    /// most; an exit of either side first is an error).
    pub(crate) fn start(
        twinrun: &Path,
        elf: &Path,
        dir: &Path,
        topo: &Topology,
        tag: &str,
        cluster_id: &str,
        primary_args: &[String],
    ) -> Result<Pair, String> {
        let secret = dir.join(format!("{tag}.secret"));
        let mut key = [0u8; 32];
        std::fs::File::open("/dev/urandom")
            .and_then(|mut f| f.read_exact(&mut key))
            .map_err(|e| format!("/dev/urandom: {e}"))?;
        let hex: String = key.iter().map(|b| format!("{b:02x}")).collect();
        std::fs::write(&secret, hex).map_err(|e| format!("secret file: {e}"))?;
        let (plog, slog) = (
            dir.join(format!("{tag}-p.log")),
            dir.join(format!("{tag}-s.log")),
        );
        let (pcon, scon) = (
            dir.join(format!("{tag}-p.console")),
            dir.join(format!("{tag}-s.console")),
        );
        let spawn = |role: &'static str, pm: usize, console: &Path, log: &Path| {
            let name = format!("{tag}-{cluster_id}-{role}");
            let _ = std::fs::remove_file(console);
            let mut cmd = twinrun_in(topo, pm, twinrun, dir);
            cmd.args(vm_args(elf, topo, console, pm))
                .args(["--role", role, "--name", &name])
                .args(topo.alink_args(pm))
                .args(["--cluster-id", cluster_id, "--cluster-secret-file"])
                .arg(&secret)
                // Failover is not measured here: a wide detection window keeps a busy
                // 2-core machine (initial sync, redis-benchmark) from a false failover.
                .args(["--heartbeat-misses", "20"]);
            if role == "primary" {
                cmd.args(primary_args);
            }
            let proc = Proc::spawn_logged(role, &mut cmd, log)
                .map_err(|e| format!("spawn {role}: {e}"))?;
            Ok::<_, String>((proc, dir.join("run").join(format!("{name}.sock"))))
        };
        // The primary first (it runs unprotected until a standby connects), the
        // standby once the guest has filled its memory: the initial sync then ships
        // what a server's RAM would hold, not zero pages.
        let (mut primary, psock) = spawn("primary", 0, &pcon, &plog)?;
        wait_filled(&mut primary, &pcon)?;
        let (mut standby, ssock) = spawn("standby", 1, &scon, &slog)?;
        let t0 = Instant::now();
        while twinrun_control::ft_status(&psock).is_none_or(|s| s.state != FtState::Protected) {
            for end in [&mut primary, &mut standby] {
                if let Some(st) = end.try_wait() {
                    return Err(format!(
                        "the {} exited before protection ({st}):\n{}",
                        end.name(),
                        end.log()
                    ));
                }
            }
            if t0.elapsed() > Duration::from_secs(60) {
                return Err(format!(
                    "not protected within 60 s (status {:?}); primary log:\n{}",
                    twinrun_control::ft_status(&psock),
                    primary.log()
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(Pair {
            primary,
            standby,
            psock,
            ssock,
            secret,
            plog,
            slog,
            pcon,
            scon,
        })
    }

    /// Stops the pair after a measurement; an error if the primary exited or the
    /// standby failed over meanwhile (then the standby served part of the run).
    /// The standby stops first: a primary stopped first would let it fail over, and
    /// its gratuitous ARP would point the LAN bridge at PM2's TAP for the next guest
    /// on PM1. Then up to `report_wait` for the primary to end its session (it notices
    /// the standby gone at once when its links close, or after 20 heartbeat misses,
    /// about 1 s) and report it in its status (and log), which is returned; a primary
    /// stopped before that logs its report when it stops.
    pub(crate) fn stop(&mut self, report_wait: Duration) -> Result<Option<SessionStatus>, String> {
        let still = self.primary.alive();
        let failed_over =
            twinrun_control::ft_status(&self.ssock).is_some_and(|s| s.failover.is_some());
        self.standby.terminate(Duration::from_secs(5));
        let report = twinrun_lab::poll(report_wait, Duration::from_millis(20), || {
            twinrun_control::ft_status(&self.psock).and_then(|s| s.last_session)
        });
        self.primary.terminate(Duration::from_secs(5));
        if !still {
            return Err(format!(
                "the primary exited during the measurement:\n{}",
                read_log(&self.plog)
            ));
        }
        if failed_over {
            return Err("the standby failed over during the measurement".into());
        }
        Ok(report)
    }
}

/// The FT pair measured like the unprotected guest, and the checkpoint throughput of
/// its initial synchronisation (MB/s: the bytes the sync rounds sent from round 0 to
/// epoch 0 committed, from the session's report) across the namespaces.
fn protected(
    twinrun: &Path,
    elf: &Path,
    dir: &Path,
    topo: &Topology,
    load: &Load,
) -> Result<(Side, Option<f64>), String> {
    let id = format!("bench-{}", std::process::id());
    let mut pair = Pair::start(twinrun, elf, dir, topo, "ftnet", &id, &[])?;
    let r = measure(topo, load);
    let report = pair.stop(Duration::from_secs(5))?;
    let sync = report.as_ref().and_then(sync_throughput);
    r.map(|side| (side, sync))
        .map_err(|e| format!("FT: {e}\nprimary log:\n{}", read_log(&pair.plog)))
}

/// MB/s of a session's initial synchronisation.
fn sync_throughput(s: &SessionStatus) -> Option<f64> {
    let us = s.sync_us.filter(|&u| u > 0)?;
    Some(s.sync_bytes as f64 / us as f64)
}

/// One TCP connection: a receiver (in `rx_ns`, or this namespace) and a sender (in
/// `tx_ns`) writing 1 MiB chunks for `secs`; bytes / time at the receiver, MB/s.
fn raw_tcp(
    rx_ns: Option<String>,
    tx_ns: Option<String>,
    ip: Ipv4Addr,
    secs: f64,
) -> Result<f64, String> {
    let (addr, rx) = tcp_receiver(rx_ns, IpAddr::V4(ip), |mut s| {
        let mut buf = vec![0u8; 1 << 20];
        let mut total = 0u64;
        let mut t0 = None;
        loop {
            let n = s.read(&mut buf).map_err(|e| format!("recv: {e}"))?;
            if n == 0 {
                break;
            }
            t0.get_or_insert_with(Instant::now);
            total += n as u64;
        }
        let dt = t0.map_or(0.0, |t| t.elapsed().as_secs_f64());
        if dt <= 0.0 {
            return Err("the receiver got nothing".into());
        }
        Ok(total as f64 / dt / 1e6)
    })?;
    let tx = tcp_sender(tx_ns, addr, move |mut s| {
        let chunk = vec![0x5au8; 1 << 20];
        let t0 = Instant::now();
        while t0.elapsed().as_secs_f64() < secs {
            s.write_all(&chunk).map_err(|e| format!("send: {e}"))?;
        }
        Ok(())
    });
    tcp_join(tx, rx)
}

pub fn run(twinrun: &Path, elf: &Path, dir: &Path, s: &Sizes) -> Result<Vec<Figure>, String> {
    let topo = Topology::create(&format!("bx{}", std::process::id() % 1_000_000))
        .map_err(|e| format!("pair topology: {e}"))?;
    let dir: PathBuf = dir.to_path_buf();
    let epoch_ms = checkpoint::protocol::PrimaryConfig::default()
        .epoch_len
        .as_secs_f64()
        * 1e3;
    let load = Load {
        bench_n: s.bench_n,
        latency_samples: s.latency_samples,
        clients: crate::redis::CLIENTS,
    };
    eprintln!("   unprotected guest in {} ...", topo.pm_ns(0));
    let u = unprotected(twinrun, elf, &dir, &topo, "ftnet", &load)?;
    eprintln!("   FT pair in {} / {} ...", topo.pm_ns(0), topo.pm_ns(1));
    let (f, sync_mbs) = protected(twinrun, elf, &dir, &topo, &load)?;
    eprintln!("   raw TCP over A-Link 1 and loopback ...");
    let alink_ip = topo.alink(0).1.ip();
    let std::net::IpAddr::V4(alink_ip) = alink_ip else {
        return Err("A-Link address is not IPv4".into());
    };
    let veth = raw_tcp(
        Some(topo.pm_ns(1).to_string()),
        Some(topo.pm_ns(0).to_string()),
        alink_ip,
        s.tcp_secs,
    )?;
    let lo = raw_tcp(None, None, Ipv4Addr::LOCALHOST, s.tcp_secs)?;
    drop(topo);

    let g = "ft-net (redis-benchmark)";
    let mut figs = Vec::new();
    for (i, p) in PIPELINES.iter().enumerate() {
        for (t, fv, uv) in [
            ("SET", f.rps[i].0, u.rps[i].0),
            ("GET", f.rps[i].1, u.rps[i].1),
        ] {
            figs.push(
                Figure::new(g, &format!("FT {t} -P {p}"), fv, "req/s", Better::Higher)
                    .baseline(UNPROT, uv)
                    .target(0.8, true, ">= 80 % of unprotected")
                    .note(format!(
                        "-n {} -c 10 from the client netns; default {epoch_ms:.0} ms epoch, 2 A-Links",
                        s.bench_n
                    )),
            );
        }
    }
    let g = "ft-net (request latency)";
    let n = format!(
        "SET round trip, one at a time on one connection, {} samples (FT) / {} (unprotected)",
        f.lat_ms.len(),
        u.lat_ms.len()
    );
    let (fp50, up50) = (pct(&f.lat_ms, 0.5), pct(&u.lat_ms, 0.5));
    figs.push(
        Figure::new(g, "FT p50", fp50, "ms", Better::Lower)
            .baseline(UNPROT, up50)
            .note(n.clone()),
    );
    figs.push(
        Figure::new(g, "FT p99", pct(&f.lat_ms, 0.99), "ms", Better::Lower)
            .baseline(UNPROT, pct(&u.lat_ms, 0.99))
            .note(n),
    );
    figs.push(
        Figure::new(
            g,
            "added p50 (FT - unprotected)",
            fp50 - up50,
            "ms",
            Better::Lower,
        )
        .target(
            epoch_ms + 2.0,
            false,
            &format!("< epoch {epoch_ms:.0} ms + 2 ms"),
        )
        .note("output commit: a reply leaves when the standby acks its epoch"),
    );
    figs.push(
        Figure::new(
            "ft-net (raw TCP)",
            "A-Link 1 veth pm1 -> pm2",
            veth,
            "MB/s",
            Better::Higher,
        )
        .baseline("raw TCP over loopback, same run", lo)
        .note(format!(
            "one connection, 1 MiB writes, {:.1} s, no VM running; the baseline of the \
             checkpoint throughput below",
            s.tcp_secs
        )),
    );
    if let Some(mbs) = sync_mbs {
        figs.push(
            Figure::new(
                "ft-net (raw TCP)",
                "checkpoint throughput (initial sync, pm1 -> pm2)",
                mbs,
                "MB/s",
                Better::Higher,
            )
            .baseline("raw TCP over A-Link 1, same namespaces, same run", veth)
            .target(0.8, true, ">= 80 % of raw TCP")
            .note(
                "64 MiB kv guest (32 MiB of it written at boot), real processes: the bytes the \
                 sync rounds sent (all-zero pages go without data) from round 0 to epoch 0 \
                 committed (capture, checksums, A-Link, standby staging and apply), from the \
                 primary's log",
            ),
        );
    }
    Ok(figs)
}

#[cfg(test)]
mod tests {
    #[test]
    fn sync_figure() {
        let s = twinrun_control::SessionStatus {
            session: 1,
            sync_rounds: 2,
            epochs_captured: 10,
            epochs_acked: 9,
            pause_p50_us: None,
            pause_p99_us: None,
            commit_wait_p50_us: None,
            epoch_pages: 0,
            throttles: 0,
            sync_bytes: 67_108_864,
            sync_us: Some(250_300),
            resync_bytes: None,
            refused: None,
            simplex: true,
        };
        let mbs = super::sync_throughput(&s).unwrap();
        assert!((mbs - 268.1).abs() < 0.1, "{mbs}");
        let none = twinrun_control::SessionStatus { sync_us: None, ..s };
        assert_eq!(super::sync_throughput(&none), None);
    }

    #[test]
    fn percentiles() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(super::pct(&v, 0.5), 51.0);
        assert_eq!(super::pct(&v, 0.99), 99.0);
        assert!(super::pct(&[], 0.5).is_nan());
    }
}
