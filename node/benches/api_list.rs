//! API latency of `vm list` with 50 VMs defined, against a real `twinrund` on loopback
//! (figures, not asserts). Baseline in the same run: `node list` on the same daemon,
//! which goes through the same HTTP, auth and lock path but builds two small objects.
//!
//! `cargo bench -p twinrund --bench api_list` (add `-- --quick` for fewer rounds).

use std::net::TcpListener;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use twinrund::client::Client;
use twinrund::model::{DiskSpec, Failback, NicSpec, PayloadSpec, Protection, VmSpec};

const VMS: usize = 50;
const ADMIN: &str = "bench-admin-token-0123456789";

fn port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("port")
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn measure(rounds: usize, mut f: impl FnMut()) -> Vec<f64> {
    for _ in 0..rounds / 10 {
        f(); // warm-up
    }
    let mut v: Vec<f64> = (0..rounds)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64() * 1e6
        })
        .collect();
    v.sort_by(f64::total_cmp);
    v
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let rounds = if quick { 200 } else { 2000 };
    let dir = tempfile::Builder::new()
        .prefix("twbench")
        .tempdir_in("/tmp")
        .expect("tempdir");
    let d = dir.path();
    std::fs::write(d.join("secret"), "bench-cluster-secret-0123456789").unwrap();
    std::fs::write(d.join("tokens"), format!("admin {ADMIN}\n")).unwrap();
    let (api, link, peer) = (port(), port(), port());
    // The VMs are only defined, never started: the VMM binary is not run.
    let cfg = format!(
        r#"cluster = "bench"
node = "pm1"
secret_file = "{d}/secret"
state_dir = "{d}/state"
run_dir = "{d}/run"
twinrun_bin = "/bin/true"
[api]
listen = "127.0.0.1:{api}"
tokens_file = "{d}/tokens"
[cluster_link]
listen = "127.0.0.1:{link}"
[peer]
name = "pm2"
addr = "127.0.0.1:{peer}"
api = "127.0.0.1:{peer}"
[alink]
links = [{{ local = "127.0.0.1", peer = "127.0.0.2" }}]
"#,
        d = d.display()
    );
    std::fs::write(d.join("node.toml"), cfg).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_twinrund"))
        .arg("--config")
        .arg(d.join("node.toml"))
        .env("RUST_LOG", "warn")
        .stderr(Stdio::null())
        .spawn()
        .expect("twinrund");
    let c = Client::new(&format!("http://127.0.0.1:{api}"), ADMIN);
    let deadline = Instant::now() + Duration::from_secs(30);
    while c.nodes().is_err() {
        assert!(Instant::now() < deadline, "twinrund did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    let t = Instant::now();
    for i in 0..VMS {
        let spec = VmSpec {
            name: format!("vm{i:02}"),
            vcpus: 2,
            mem_mib: 1024,
            disks: vec![DiskSpec { size_mib: 4096 }, DiskSpec { size_mib: 1024 }],
            nics: vec![NicSpec {
                mac: format!("02:00:00:00:01:{i:02x}"),
            }],
            payload: PayloadSpec::Linux {
                kernel: "/boot/vmlinux".into(),
                initrd: Some("/boot/initrd.img".into()),
                cmdline: Some("console=ttyS0".into()),
            },
            protection: [Protection::Ft, Protection::Ha, Protection::Unprotected][i % 3],
            preferred_node: Some(if i % 2 == 0 { "pm1" } else { "pm2" }.into()),
            autostart: i % 2 == 0,
            failback: Failback::Auto,
        };
        c.create(&spec, None).expect("create");
    }
    let create_ms = t.elapsed().as_secs_f64() * 1e3;
    let body = c.vms().expect("list");
    assert_eq!(body.len(), VMS);
    let bytes = serde_json::to_vec(&body).map(|b| b.len()).unwrap_or(0);
    let list = measure(rounds, || {
        let v = c.vms().expect("vm list");
        std::hint::black_box(v);
    });
    let nodes = measure(rounds, || {
        let v = c.nodes().expect("node list");
        std::hint::black_box(v);
    });
    let _ = child.kill();
    let _ = child.wait();
    println!("twinrund API latency, {rounds} calls each, one keep-alive connection, loopback");
    println!("{:<34} {:>9} {:>9} {:>9}", "", "p50 us", "p90 us", "p99 us");
    for (name, v) in [
        (
            format!("vm list ({VMS} VMs, {} KiB JSON)", bytes / 1024),
            &list,
        ),
        ("node list (baseline)".to_string(), &nodes),
    ] {
        println!(
            "{name:<34} {:>9.0} {:>9.0} {:>9.0}",
            percentile(v, 0.5),
            percentile(v, 0.9),
            percentile(v, 0.99)
        );
    }
    println!(
        "vm list / node list at p50: {:.2}x; {VMS} creates took {create_ms:.0} ms ({:.1} ms each, fsync'd)",
        percentile(&list, 0.5) / percentile(&nodes, 0.5),
        create_ms / VMS as f64
    );
    let _ = Path::new(d);
}
