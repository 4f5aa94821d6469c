//! `ft-witness`: failover with the quorum witness in the path (issue 14): an FT pair of
//! `twinrun vm run` processes on the lab topology with a `twinrun witness` on the
//! management network; the kv guest under a client's load on one connection; the
//! primary SIGKILLed; measured: from the kill to the first kv reply the client gets
//! to a request sent after the kill (only the standby can answer it: it took over with
//! the witness's grant). Default A-Link detection (50 ms heartbeats x 4 misses). The
//! roles alternate between the PMs from run to run, so that the LAN bridge already
//! points at the next primary's port. Figures, not asserts.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use twinrun_control::FtState;
use twinrun_lab::kvload::{LoadClient, LoadConfig};
use twinrun_lab::topology::KV_PORT;
use twinrun_lab::{Proc, Topology};

use crate::report::{Better, Figure};

const CLUSTER: &str = "bench-witness";
const WITNESS_PORT: u16 = 4557;

fn status(sock: &Path) -> Option<twinrun_control::FtStatus> {
    twinrun_control::ft_status(sock)
}

/// The witness a pair uses: its address and secret file.
pub(crate) type WitnessRef<'a> = (SocketAddr, &'a Path);

/// Starts an FT pair of the kv guest (`key` names its processes and quorum state;
/// without `witness`, no quorum) with its primary on PM `ppm`, `extra` arguments on
/// both, and waits until it is protected: (primary, standby).
#[allow(clippy::too_many_arguments)] // the pair's parts, each a plain value
pub(crate) fn start_pair(
    twinrun: &Path,
    elf: &Path,
    dir: &Path,
    topo: &Topology,
    witness: Option<WitnessRef<'_>>,
    key: &str,
    ppm: usize,
    extra: &[&str],
) -> Result<(Proc, Proc), String> {
    let secret = dir.join("cluster.secret");
    let spm = 1 - ppm;
    let spawn = |role: &str, pm: usize, node: u64| -> Result<(Proc, std::path::PathBuf), String> {
        let name = format!("{key}-{role}");
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
            .arg(&secret)
            .args(extra);
        if let Some((waddr, wsecret)) = witness {
            cmd.args(["--quorum-key", key])
                .args(["--witness", &waddr.to_string(), "--witness-secret-file"])
                .arg(wsecret)
                .args(["--quorum-node-id", &node.to_string(), "--quorum-state"])
                .arg(dir.join(format!("{key}-node{node}.state")));
        }
        let p = Proc::spawn_logged(role, &mut cmd, &dir.join(format!("{name}.log")))
            .map_err(|e| format!("spawn {role}: {e}"))?;
        Ok((p, dir.join("run").join(format!("{name}.sock"))))
    };
    let (mut standby, ssock) = spawn("standby", spm, spm as u64 + 1)?;
    let t0 = Instant::now();
    while status(&ssock).is_none_or(|s| s.session < 1) {
        if t0.elapsed() > Duration::from_secs(30) || !standby.alive() {
            return Err(format!(
                "the standby did not listen:\n{}",
                standby.log_tail(30)
            ));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let (mut primary, psock) = spawn("primary", ppm, ppm as u64 + 1)?;
    while status(&psock).is_none_or(|s| s.state != FtState::Protected) {
        if t0.elapsed() > Duration::from_secs(90) || !primary.alive() || !standby.alive() {
            return Err(format!(
                "not protected:\n{}\n{}",
                primary.log_tail(30),
                standby.log_tail(30)
            ));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok((primary, standby))
}

/// One failover: the pair started, loaded, the primary killed; the time from the kill
/// to the first reply from the standby.
fn one_run(
    twinrun: &Path,
    elf: &Path,
    dir: &Path,
    topo: &Topology,
    waddr: SocketAddr,
    wsecret: &Path,
    run: usize,
) -> Result<Duration, String> {
    let key = format!("bw-run{run}");
    // Run 0: primary on PM1; run 1: on PM2 (where run 0's survivor announced the MAC).
    let ppm = run % 2;
    let (mut primary, mut standby) = start_pair(
        twinrun,
        elf,
        dir,
        topo,
        Some((waddr, wsecret)),
        &key,
        ppm,
        &[],
    )?;
    let addr = SocketAddr::from((topo.guest_ip(), KV_PORT));
    let client = LoadClient::start(LoadConfig::new(topo.client_ns(), addr))
        .map_err(|e| format!("load client: {e}"))?;
    client
        .wait_acks(20, Duration::from_secs(30))
        .map_err(|e| format!("load: {e}\n{}", primary.log_tail(30)))?;
    let t_kill = Instant::now();
    primary.kill();
    // Requests sent from now on can only be answered by the standby.
    client.mark();
    let first = loop {
        if let Some(t) = client.first_reply_after_mark() {
            break t;
        }
        if t_kill.elapsed() > Duration::from_secs(10) || client.is_finished() {
            return Err(format!(
                "no reply from the standby within 10 s:\n{}",
                standby.log_tail(30)
            ));
        }
        std::thread::sleep(Duration::from_millis(1));
    };
    let _ = client.finish();
    standby.kill();
    Ok(first.saturating_duration_since(t_kill))
}

/// The lab for the witness sections: the topology with a witness on the management
/// network, the secrets written in `dir`, the witness running: (topology, witness
/// address, witness secret file, the witness process).
pub(crate) fn lab(
    twinrun: &Path,
    dir: &Path,
    prefix: &str,
) -> Result<(Topology, SocketAddr, std::path::PathBuf, Proc), String> {
    let topo = Topology::builder()
        .prefix(prefix)
        .witnesses(1)
        .management()
        .build()
        .map_err(|e| format!("topology: {e}"))?;
    std::fs::create_dir_all(dir.join("run")).map_err(|e| e.to_string())?;
    std::fs::write(
        dir.join("cluster.secret"),
        b"bench-witness-cluster-secret-0123456789",
    )
    .map_err(|e| e.to_string())?;
    let wsecret = dir.join("witness.secret");
    std::fs::write(&wsecret, b"bench-witness-secret-0123456789").map_err(|e| e.to_string())?;
    let w = topo.witness(0).map_err(|e| e.to_string())?;
    let waddr = SocketAddr::from((w.ip, WITNESS_PORT));
    let mut cmd = w.ns.command(twinrun);
    cmd.args(["witness", "--listen", &waddr.to_string(), "--state-dir"])
        .arg(dir.join("witness-state"))
        .arg("--cluster")
        .arg(format!("{CLUSTER}={}", wsecret.display()))
        .stdout(Stdio::null());
    let witness = Proc::spawn_logged("witness", &mut cmd, &dir.join("witness.log"))
        .map_err(|e| format!("spawn the witness: {e}"))?;
    Ok((topo, waddr, wsecret, witness))
}

/// The section: `runs` failovers through the witness.
pub fn run(twinrun: &Path, elf: &Path, dir: &Path, quick: bool) -> Result<Vec<Figure>, String> {
    let runs = if quick { 5 } else { 20 };
    let dir = dir.join("ft-witness");
    let (topo, waddr, wsecret, _witness) = lab(twinrun, &dir, "bw")?;
    let mut times = Vec::new();
    for r in 0..runs {
        let t = one_run(twinrun, elf, &dir, &topo, waddr, &wsecret, r)?;
        eprintln!(
            "   run {r}: kill -> first reply from the standby {:.1} ms",
            t.as_secs_f64() * 1e3
        );
        times.push(t.as_secs_f64() * 1e3);
    }
    times.sort_by(f64::total_cmp);
    let p50 = times[times.len() / 2];
    let max = times[times.len() - 1];
    let note = format!(
        "{runs} runs; UDP witness on the management network; 50 ms heartbeats x 4 misses; \
         kv guest, 64 MiB, one client connection; time to the first reply to a request sent \
         after the SIGKILL"
    );
    Ok(vec![
        Figure::new(
            "ft-witness",
            "failover with witness: kill -> first reply from the standby p50",
            p50,
            "ms",
            Better::Lower,
        )
        .target(300.0, false, "p50 <= 300 ms")
        .note(note.clone()),
        Figure::new(
            "ft-witness",
            "failover with witness: kill -> first reply from the standby max",
            max,
            "ms",
            Better::Lower,
        )
        .target(1000.0, false, "never over 1 s")
        .note(note),
    ])
}
