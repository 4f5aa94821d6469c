//! Figure 4: requests/s of the guest's kv server (RESP over smoltcp on virtio-net on a
//! TAP) measured with `redis-benchmark` from a client namespace, against the same kv
//! engine (`guest/examples/kv_host.rs`) served by the host kernel's TCP stack on the
//! bridge of the same namespace path, in the same run.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use twinrun_lab::console::ConsoleLog;
use twinrun_lab::process::output_timeout;
use twinrun_lab::{Proc, Topology};

use crate::report::{Better, Figure};

/// `redis-benchmark -q` prints `SET: 1234.56 requests per second, ...` after progress
/// lines separated by `\r`; the last such segment per test is the result.
pub fn parse_rps(out: &str, test: &str) -> Option<f64> {
    let prefix = format!("{test}: ");
    out.split(['\r', '\n'])
        .filter_map(|seg| seg.trim().strip_prefix(&prefix))
        .filter(|rest| rest.contains("requests per second"))
        .filter_map(|rest| rest.split_whitespace().next()?.parse().ok())
        .next_back()
}

/// `redis-benchmark -t set,get -c 10 -q -n <n> -P <pipeline>` against `host:6379`,
/// `c` being the program already placed in the client's namespace; (SET, GET)
/// requests/s. Shared by every kv figure so they all measure the same way.
/// Concurrent `redis-benchmark` clients of the kv figures (`-c`).
pub const CLIENTS: u32 = 10;

pub fn set_get(
    mut c: Command,
    host: &str,
    n: u32,
    pipeline: u32,
    clients: u32,
    timeout: Duration,
) -> Result<(f64, f64), String> {
    c.args(["-h", host, "-p", "6379", "-t", "set,get", "-q"])
        .args(["-c", &clients.to_string()])
        .args(["-n", &n.to_string(), "-P", &pipeline.to_string()]);
    let out = output_timeout(&mut c, timeout).map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    match (parse_rps(&text, "SET"), parse_rps(&text, "GET")) {
        (Some(s), Some(g)) if out.status.success() => Ok((s, g)),
        _ => Err(format!(
            "redis-benchmark -P {pipeline} against {host} failed ({}):\n{text}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        )),
    }
}

fn bench(net: &Topology, host: &str, n: u32, pipeline: u32) -> Result<(f64, f64), String> {
    let c = net.client.ns.command("redis-benchmark");
    set_get(c, host, n, pipeline, CLIENTS, Duration::from_secs(90))
}

/// Waits (up to `timeout`) until a kv server answers `redis-cli PING` from the client
/// namespace of `net`.
/// The pipeline depths of the kv cost sections (`ft-witness-cost`, `unprotected-cost`).
pub const PIPELINES: [u32; 2] = [1, 16];

/// (SET, GET) req/s at each depth of [`PIPELINES`]: `redis-benchmark -n n -c CLIENTS`
/// from `topo`'s client namespace against its guest; `log` (the VM's log) is added to
/// an error.
pub fn kv_set_get(
    topo: &Topology,
    n: u32,
    log: impl Fn() -> String,
) -> Result<Vec<(f64, f64)>, String> {
    let host = topo.guest_ip().to_string();
    let mut out = Vec::new();
    for p in PIPELINES {
        let c = topo.client.ns.command("redis-benchmark");
        let r = set_get(c, &host, n, p, CLIENTS, Duration::from_secs(120))
            .map_err(|e| format!("{e}\n{}", log()))?;
        out.push(r);
    }
    Ok(out)
}

/// Requests/s per round, keyed by (kind, index into [`PIPELINES`], "SET" or "GET").
pub type KvSamples<K> = BTreeMap<(K, usize, &'static str), Vec<f64>>;

/// `rounds` rounds of `measure(round, kind)` ((SET, GET) per depth, as [`kv_set_get`])
/// over every kind, the order reversed every other round so that drift in the
/// machine's load hits every kind alike; progress printed with `label`.
pub fn kv_rounds<K: Copy + Ord>(
    rounds: usize,
    kinds: &[K],
    label: impl Fn(K) -> String,
    mut measure: impl FnMut(usize, K) -> Result<Vec<(f64, f64)>, String>,
) -> Result<KvSamples<K>, String> {
    let mut samples = KvSamples::new();
    for r in 0..rounds {
        let mut order = kinds.to_vec();
        if r % 2 == 1 {
            order.reverse();
        }
        for kind in order {
            for (i, (set, get)) in measure(r, kind)?.into_iter().enumerate() {
                eprintln!(
                    "   round {r} {}: -P{} SET {set:.0} GET {get:.0} req/s",
                    label(kind),
                    PIPELINES[i]
                );
                samples.entry((kind, i, "SET")).or_default().push(set);
                samples.entry((kind, i, "GET")).or_default().push(get);
            }
        }
    }
    Ok(samples)
}

/// The median of `kind`'s samples at depth index `i` of `what` (NaN when none).
pub fn kv_median<K: Copy + Ord>(s: &KvSamples<K>, kind: K, i: usize, what: &'static str) -> f64 {
    let mut v = s.get(&(kind, i, what)).cloned().unwrap_or_default();
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

pub fn wait_ping(net: &Topology, host: &str, timeout: Duration) -> Result<(), String> {
    let pong = || {
        let mut c = net.client.ns.command("redis-cli");
        c.args(["-h", host, "-p", "6379", "PING"]);
        output_timeout(&mut c, Duration::from_secs(5))
            .ok()
            .filter(|o| String::from_utf8_lossy(&o.stdout).trim() == "PONG")
    };
    twinrun_lab::poll(timeout, Duration::from_millis(100), pong)
        .map(|_| ())
        .ok_or_else(|| format!("kv server at {host} never answered PING within {timeout:?}"))
}

pub fn run(
    twinrun: &Path,
    elf: &Path,
    kv_host: &Path,
    dir: &Path,
    n: u32,
) -> Result<Vec<Figure>, String> {
    // One PM with a client; the host baseline listens on the PM's own LAN address, so
    // its clients cross the same veths and bridges as the guest's.
    let net = Topology::builder()
        .prefix(&format!("tb{}", std::process::id() % 100_000))
        .single()
        .host_addrs()
        .build()
        .map_err(|e| format!("kv topology: {e}"))?;
    let guest_ip = net.guest_ip().to_string();
    let host_ip = net
        .host_ip(0)
        .ok_or("the kv topology has no host address")?
        .to_string();
    let pipelines = [1u32, 16];

    // The guest.
    let console = dir.join("kv.console");
    let _ = std::fs::remove_file(&console);
    let mut cmd = net.pms[0].ns.command(twinrun);
    cmd.args(["vm", "run", "--mem-mib", "128", "--workload", "kv"])
        .arg("--guest")
        .arg(elf)
        .args(net.vm_net_args(0))
        .arg("--console")
        .arg(format!("file:{}", console.display()));
    let mut vm = Proc::spawn_quiet("kv guest", &mut cmd).map_err(|e| e.to_string())?;
    let mut con = ConsoleLog::new(&console);
    con.wait_while(
        Duration::from_secs(30),
        |l| l.starts_with("KV listening"),
        || vm.alive(),
    )?;
    wait_ping(&net, &guest_ip, Duration::from_secs(10))?;
    let mut guest = Vec::new();
    for p in pipelines {
        guest.push(bench(&net, &guest_ip, n, p)?);
    }
    vm.terminate(Duration::from_secs(5));
    let _ = std::fs::remove_file(&console);

    // The host baseline: same engine, host TCP, same client path.
    let mut cmd = net.pms[0].ns.command(kv_host);
    cmd.arg(format!("{host_ip}:6379"));
    let mut server = Proc::spawn_quiet("kv_host", &mut cmd).map_err(|e| e.to_string())?;
    wait_ping(&net, &host_ip, Duration::from_secs(10))?;
    let mut host = Vec::new();
    for p in pipelines {
        host.push(bench(&net, &host_ip, n, p)?);
    }
    server.terminate(Duration::from_secs(2));

    let mut figs = Vec::new();
    for (i, p) in pipelines.iter().enumerate() {
        for (t, g, h) in [
            ("SET", guest[i].0, host[i].0),
            ("GET", guest[i].1, host[i].1),
        ] {
            figs.push(
                Figure::new(
                    "kv (redis-benchmark)",
                    &format!("guest {t} -P {p}"),
                    g,
                    "req/s",
                    Better::Higher,
                )
                .baseline("kv_host on host TCP, same netns path", h)
                .note(format!(
                    "-n {n} -c 10, TAP + bridge + veth from a client netns"
                )),
            );
        }
    }
    drop(net);
    Ok(figs)
}

#[cfg(test)]
mod tests {
    #[test]
    fn parses_quiet_output() {
        let out = "SET: rps=0.0 (overall: nan) avg_msec=nan (overall: nan)\r\
                   SET: 4321.00 requests per second, p50=2.1 msec\n\
                   GET: 5000.50 requests per second, p50=1.9 msec\n";
        assert_eq!(super::parse_rps(out, "SET"), Some(4321.0));
        assert_eq!(super::parse_rps(out, "GET"), Some(5000.5));
        assert_eq!(super::parse_rps(out, "INCR"), None);
    }
}
