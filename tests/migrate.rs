//! Live migration of a VM that runs without a standby, at the process level: the
//! mechanism `twinrun vm migrate` drives (node/README.md, "Live migration").
//!
//! The source is `twinrun vm run --role primary` with no standby (an FT primary alone:
//! the guest runs at full speed, its disk writes recorded); the target is a standby
//! started with `--migration-target` on the other PM. The FT session is the pre-copy
//! (memory rounds while the guest runs, then a final pause with vCPU and device state,
//! the disks resynced), the planned swap hands the VM over at an epoch boundary (held
//! output released by the target, MAC announced), and the old end, now the standby,
//! is stopped: the VM runs on alone on the target.
//!
//! - `migrate_back_and_forth_under_load`: MIGRATE_RUNS migrations (default 6) under a
//!   RESP client holding ONE TCP connection. The target PM's image starts as garbage
//!   (no replica: a full copy); later targets get a delta. Checked: the connection
//!   survives, no acknowledged write is lost, the INCR counter is exact, the console has
//!   no gap, duplicate or second BOOT, the disk image the VM ends on holds every `W`
//!   record. The client-visible stall and the guest's pause of each migration are
//!   printed.
//! - `target_killed_or_links_cut_mid_way_keeps_the_vm_on_the_source`: the target is
//!   SIGKILLed during the pre-copy; then every A-Link is cut after the target is in
//!   sync: the target never takes over (it waits, refused by its gate), the VM runs on
//!   at the source on the same connection; with the links back the same migration
//!   completes.
mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::pair::{listening, protected, wait_console, PairFiles, Pm, DEFAULT_WORKLOAD};
use common::{require_kvm, topology};
use twinrun_control::{self as control, FtRole};
use twinrun_lab::console::{check_disk_records, count_c, read as read_console};
use twinrun_lab::kvload::{LoadClient, LoadConfig};
use twinrun_lab::topology::KV_PORT;
use twinrun_lab::verdict::{check_load, Expect};
use twinrun_lab::Topology;

const CLUSTER: &str = "migrate";

/// The VM on one PM at a time (`pms[i]`: PM i's process, if any). Fields drop in
/// order: processes, then the namespaces, then the files.
struct Moving {
    pms: [Option<Pm>; 2],
    /// The PM the VM runs on.
    at: usize,
    topo: Topology,
    files: PairFiles,
    _dir: tempfile::TempDir,
}

fn extra(name: &str, target: bool) -> Vec<String> {
    let mut a: Vec<String> = ["--cluster-id", CLUSTER, "--epoch-ms", "10", "--name", name]
        .iter()
        .map(|s| s.to_string())
        .collect();
    if target {
        a.push("--migration-target".into());
    }
    a
}

impl Moving {
    /// The VM alone on PM 0; PM 1's image is garbage (it never held a replica).
    fn start() -> Moving {
        let dir = tempfile::tempdir().unwrap();
        let topo = topology(Topology::builder());
        let files = PairFiles::new(dir.path());
        let junk = vec![0xa5u8; common::pair::DISK_BYTES as usize];
        std::fs::write(&files.disks[1], junk).unwrap();
        let name = format!("{}-vm", topo.prefix);
        let args = extra(&name, false);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let mut src = Pm::spawn_as(&topo, &files, 0, "primary", DEFAULT_WORKLOAD, &args);
        wait_console(
            &files.console,
            "KV listening",
            Duration::from_secs(60),
            &mut src,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        Moving {
            pms: [Some(src), None],
            at: 0,
            topo,
            files,
            _dir: dir,
        }
    }

    fn logs(&self) -> String {
        let mut s = String::new();
        for (i, pm) in self.pms.iter().enumerate() {
            if let Some(pm) = pm {
                s += &format!("--- pm{} ({}):\n{}\n", i + 1, pm.name, pm.tail(40));
            }
        }
        s
    }

    fn client(&self) -> LoadClient {
        let addr = SocketAddr::from((self.topo.guest_ip(), KV_PORT));
        LoadClient::start(LoadConfig::new(self.topo.client_ns(), addr)).unwrap()
    }

    fn pm(&mut self, i: usize) -> &mut Pm {
        self.pms[i].as_mut().expect("a process on that PM")
    }

    /// Starts the receiving end on the other PM and waits until it listens.
    fn start_target(&mut self) -> usize {
        let to = 1 - self.at;
        assert!(self.pms[to].is_none());
        // Each process has its own name: the old end's control socket may linger.
        let name = format!("{}-in{}", self.topo.prefix, to + 1);
        let args = extra(&name, true);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let mut pm = Pm::spawn_as(
            &self.topo,
            &self.files,
            to,
            "standby",
            DEFAULT_WORKLOAD,
            &args,
        );
        pm.wait_status("listening", Duration::from_secs(30), listening)
            .unwrap_or_else(|e| panic!("{e}"));
        self.pms[to] = Some(pm);
        to
    }

    /// Waits until the source's pre-copy is done (the target committed a checkpoint).
    fn wait_in_sync(&mut self) {
        let at = self.at;
        let logs = self.logs();
        self.pm(at)
            .wait_status("in sync", Duration::from_secs(90), protected)
            .unwrap_or_else(|e| panic!("{e}\n{logs}"));
    }

    /// The swap and the old end's stop; returns the guest's pause (us) on the source.
    fn hand_over(&mut self, to: usize) -> u64 {
        let from = self.at;
        let sock = control::socket_of(&self.pm(from).name).unwrap();
        let (_, paused_us) = control::swap(&sock).unwrap_or_else(|e| {
            panic!("swap: {e}\n{}", self.logs());
        });
        let logs = self.logs();
        self.pm(to)
            .wait_status("running the VM", Duration::from_secs(30), |s| {
                s.role == FtRole::Primary && s.vm_running
            })
            .unwrap_or_else(|e| panic!("{e}\n{logs}"));
        self.pm(from)
            .wait_status("swapped out", Duration::from_secs(30), |s| {
                s.role == FtRole::Standby && !s.vm_running
            })
            .unwrap_or_else(|e| panic!("{e}\n{logs}"));
        // The old end, a standby now, is stopped cleanly: the VM runs on alone.
        let mut old = self.pms[from].take().unwrap();
        old.proc_signal(nix::sys::signal::Signal::SIGTERM);
        let code = old.wait_exit(Duration::from_secs(30));
        assert_eq!(code, Some(0), "the old end's exit\n{}", old.tail(40));
        self.at = to;
        let logs = self.logs();
        self.pm(to)
            .wait_status("alone", Duration::from_secs(30), |s| {
                s.role == FtRole::Primary && s.vm_running && !protected(s)
            })
            .unwrap_or_else(|e| panic!("{e}\n{logs}"));
        paused_us
    }

    /// The guest's counter advances by more than 5 on the console.
    fn wait_progress(&self, what: &str) {
        let c0 = count_c(&read_console(&self.files.console));
        let t0 = Instant::now();
        while count_c(&read_console(&self.files.console)) <= c0 + 5 {
            assert!(
                t0.elapsed() < Duration::from_secs(15),
                "{what}: the guest's counter made no progress\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops the VM where it runs; checks the client's report, the console and the
    /// image it ran on last.
    fn finish(mut self, client: LoadClient) {
        let rep = client.finish().unwrap();
        let logs = self.logs();
        let at = self.at;
        self.pm(at).proc_signal(nix::sys::signal::Signal::SIGSTOP);
        let console = read_console(&self.files.console);
        let image = std::fs::read(&self.files.disks[at]).unwrap();
        for pm in self.pms.iter_mut().flatten() {
            pm.kill();
        }
        let cc = check_load(&rep, &console, Expect::MOVED)
            .unwrap_or_else(|e| panic!("across the migrations: {e}\n{logs}"));
        // Flushed records: the disk workload flushes after every write, and the
        // console line follows the flush.
        check_disk_records(&image, &cc.w_seqs)
            .unwrap_or_else(|e| panic!("PM{} image: {e}\n{logs}", at + 1));
        eprintln!(
            "{} writes acknowledged, {} W records on the final image",
            rep.sets_acked.len() as u64 + rep.incrs_acked as u64,
            cc.w_seqs.len()
        );
    }
}

fn runs() -> usize {
    std::env::var("MIGRATE_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(6)
}

#[test]
fn migrate_back_and_forth_under_load() {
    require_kvm();
    let mut m = Moving::start();
    let client = m.client();
    client
        .wait_acks(100, Duration::from_secs(20))
        .unwrap_or_else(|e| panic!("{e}\n{}", m.logs()));
    let mut stalls = Vec::new();
    let mut pauses = Vec::new();
    for n in 0..runs() {
        let from = m.at;
        let t0 = Instant::now();
        let to = m.start_target();
        m.wait_in_sync();
        let synced = t0.elapsed();
        // The longest reply wait in a window that holds the handover.
        let stall = std::thread::scope(|s| {
            let probe = s.spawn(|| client.max_reply_during(Duration::from_millis(1500)));
            std::thread::sleep(Duration::from_millis(100));
            pauses.push(m.hand_over(to));
            probe.join().unwrap()
        });
        client
            .wait_acks(50, Duration::from_secs(15))
            .unwrap_or_else(|e| panic!("migration {n}: after it: {e}\n{}", m.logs()));
        m.wait_progress(&format!("migration {n}"));
        eprintln!(
            "migration {n}: PM{} -> PM{}: in sync after {synced:?}, total {:?}; guest \
             paused {:.1} ms on the source until the acceptance; longest client reply \
             around the swap {stall:?}",
            from + 1,
            to + 1,
            t0.elapsed(),
            pauses[n] as f64 / 1e3
        );
        stalls.push(stall);
    }
    stalls.sort();
    let mut p = pauses.clone();
    p.sort();
    eprintln!(
        "{} migrations: longest client reply around the swap p50 {:?} max {:?}; source \
         pause until acceptance p50 {} us max {} us",
        stalls.len(),
        stalls[stalls.len() / 2],
        stalls[stalls.len() - 1],
        p[p.len() / 2],
        p[p.len() - 1]
    );
    m.finish(client);
}

#[test]
fn target_killed_or_links_cut_mid_way_keeps_the_vm_on_the_source() {
    require_kvm();
    let mut m = Moving::start();
    let client = m.client();
    client
        .wait_acks(100, Duration::from_secs(20))
        .unwrap_or_else(|e| panic!("{e}\n{}", m.logs()));

    // 1. The target dies during the pre-copy (its session begun, not yet in sync).
    let to = m.start_target();
    let logs = m.logs();
    m.pm(0)
        .wait_status("pre-copy begun", Duration::from_secs(30), |s| {
            s.session >= 1 && !s.links.is_empty() && s.links.iter().any(|l| l.up)
        })
        .unwrap_or_else(|e| panic!("{e}\n{logs}"));
    let mut target = m.pms[to].take().unwrap();
    target.kill();
    drop(target);
    let st = m.pm(0).status_now();
    assert_eq!(st.role, FtRole::Primary, "{st:?}");
    assert!(st.vm_running, "{st:?}");
    client
        .wait_acks(100, Duration::from_secs(20))
        .unwrap_or_else(|e| panic!("after the target died: {e}\n{}", m.logs()));
    m.wait_progress("after the target died");

    // 2. Every A-Link cut once the target is in sync: the target must not take over.
    let to = m.start_target();
    m.wait_in_sync();
    for k in 0..m.topo.alinks() {
        m.topo.set_alink(to, k, false).unwrap();
    }
    let logs = m.logs();
    m.pm(0)
        .wait_status("the target lost", Duration::from_secs(30), |s| {
            s.vm_running && !protected(s)
        })
        .unwrap_or_else(|e| panic!("{e}\n{logs}"));
    // The target saw the source lost and was refused the takeover by its gate.
    m.pm(to)
        .wait_log(
            "waiting for the quorum's grant before taking over",
            Duration::from_secs(30),
        )
        .unwrap_or_else(|e| panic!("{e}\n{logs}"));
    let st = m.pm(to).status_now();
    assert!(
        !st.vm_running && st.failover.is_none(),
        "the migration target took the VM over: {st:?}\n{}",
        m.logs()
    );
    client
        .wait_acks(100, Duration::from_secs(20))
        .unwrap_or_else(|e| panic!("with the links cut: {e}\n{}", m.logs()));
    m.wait_progress("with the links cut");

    // 3. Links back: the same target is resynced and the migration completes.
    for k in 0..m.topo.alinks() {
        m.topo.set_alink(to, k, true).unwrap();
    }
    m.wait_in_sync();
    m.hand_over(to);
    client
        .wait_acks(100, Duration::from_secs(20))
        .unwrap_or_else(|e| panic!("after the migration: {e}\n{}", m.logs()));
    m.wait_progress("after the migration");
    m.finish(client);
}
