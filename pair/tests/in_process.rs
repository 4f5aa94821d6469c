//! The pair runtime as a library, in one process, on real KVM: a primary and a standby
//! (`run_pair_with`, each on its own thread, one loopback A-Link, the test guest's
//! counter and disk workloads on their own images and console files) get protected;
//! the primary is stopped (as SIGTERM stops it: VM stopped, links closed); the standby
//! takes over, and its role switch makes it a primary whose disks record the guest's
//! writes from the first instruction (degraded, waiting for a standby); then it is
//! stopped too. Both end with exit code 0; the console stream outside has no gap.

use std::path::{Path, PathBuf};
use std::time::Duration;

use twinrun_control::server::FtControl;
use twinrun_control::{FtRole, FtState};
use twinrun_pair::{run_pair_with, AlinkSpec, FtSettings, PairStatus, Role, Shutdown};
use vmm::config::{ConsoleConfig, DiskConfig, IoEngine, Payload, VmConfig, Workloads};

struct Files(Vec<PathBuf>);

impl Drop for Files {
    fn drop(&mut self) {
        for f in &self.0 {
            let _ = std::fs::remove_file(f);
            let mut meta = f.clone().into_os_string();
            meta.push(".twinrun");
            let _ = std::fs::remove_dir_all(PathBuf::from(meta));
        }
    }
}

fn temp(tag: &str) -> PathBuf {
    std::env::temp_dir().join(format!("twinrun-pair-{}-{tag}", std::process::id()))
}

fn config(elf: &Path, console: &Path, disk: &Path) -> VmConfig {
    VmConfig {
        mem_mib: 64,
        vcpus: 1,
        payload: Payload::TestGuest {
            elf: elf.to_owned(),
            workloads: Workloads {
                counter: true,
                counter_rate: 200,
                disk: true,
                disk_rate: 100,
                disk_flush_every: 1,
                ..Workloads::default()
            },
        },
        disks: vec![DiskConfig {
            path: disk.to_owned(),
            read_only: false,
            io_engine: IoEngine::default(),
            serial: Some("pairdisk".into()),
        }],
        nets: vec![],
        console: ConsoleConfig::File {
            path: console.to_owned(),
        },
    }
}

fn free_port() -> std::net::SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
    l.local_addr().expect("its address")
}

fn settings(role: Role, local: std::net::SocketAddr, peer: std::net::SocketAddr) -> FtSettings {
    FtSettings {
        role,
        alinks: vec![AlinkSpec { local, peer }],
        cluster_id: "pair-in-process".into(),
        secret: b"pair-in-process-cluster-secret".to_vec(),
        epoch_ms: Some(10),
        min_epoch: None,
        coalesce_bytes: None,
        hot_pages: None,
        heartbeat_ms: 50,
        heartbeat_misses: 10,
        resync_rate: None,
        discard_disk_data: false,
        quorum: None,
        migration_target: false,
        unprotected: false,
    }
}

/// `C n` lines of a console log, in order.
fn counters(text: &str) -> Vec<u64> {
    text.lines()
        .filter_map(|l| l.strip_prefix("C ").and_then(|n| n.trim().parse().ok()))
        .collect()
}

#[test]
fn a_pair_protects_fails_over_and_the_survivor_records_its_writes() {
    let _ = env_logger::builder().is_test(true).try_init();
    let elf = twinrun_lab::guest::guest_elf().expect("the test guest");
    let (pcon, scon) = (temp("primary.log"), temp("standby.log"));
    let (pdisk, sdisk) = (temp("primary.img"), temp("standby.img"));
    let _files = Files(vec![
        pcon.clone(),
        scon.clone(),
        pdisk.clone(),
        sdisk.clone(),
    ]);
    for d in [&pdisk, &sdisk] {
        std::fs::File::create(d)
            .and_then(|f| f.set_len(4 << 20))
            .expect("image");
    }
    let (sa, pa) = (free_port(), free_port());
    let pcfg = config(&elf, &pcon, &pdisk);
    let scfg = config(&elf, &scon, &sdisk);
    let pset = settings(Role::Primary, pa, sa);
    let sset = settings(Role::Standby, sa, pa);
    let pstatus = PairStatus::new(Role::Primary, &pcfg);
    let sstatus = PairStatus::new(Role::Standby, &scfg);
    let (psd, ssd) = (Shutdown::new(), Shutdown::new());

    let standby = {
        let (st, sd) = (sstatus.clone(), ssd.clone());
        std::thread::spawn(move || run_pair_with(&scfg, &sset, &sd, &st))
    };
    let primary = {
        let (st, sd) = (pstatus.clone(), psd.clone());
        std::thread::spawn(move || run_pair_with(&pcfg, &pset, &sd, &st))
    };
    let protected = twinrun_lab::poll(Duration::from_secs(60), Duration::from_millis(20), || {
        let s = pstatus.status();
        (s.state == FtState::Protected && s.epochs_committed > 20).then_some(s)
    });
    let Some(p) = protected else {
        psd.request();
        ssd.request();
        let _ = (primary.join(), standby.join());
        panic!("the pair never got protected: {:?}", pstatus.status());
    };
    assert!(p.vm_running);
    assert_eq!(sstatus.status().state, FtState::Mirroring);

    // Stop the primary: its VM stops, its A-Link closes; the standby takes over.
    psd.request();
    assert_eq!(primary.join().expect("primary thread"), 0);
    let failed_over = twinrun_lab::poll(Duration::from_secs(30), Duration::from_millis(20), || {
        let s = sstatus.status();
        s.failover.clone().map(|f| (s, f))
    });
    let Some((s, f)) = failed_over else {
        ssd.request();
        let _ = standby.join();
        panic!("the standby never took over: {:?}", sstatus.status());
    };
    // The role switch: a primary now, running the VM, its disks opened as a primary's
    // and recording (degraded) while it waits for a standby.
    assert_eq!(s.role, FtRole::Primary);
    assert!(s.vm_running);
    assert_eq!(s.disks.len(), 1);
    assert_eq!(s.disks[0].source, "live", "{:?}", s.disks);
    assert_eq!(s.disks[0].kind, "degraded", "{:?}", s.disks);
    // The guest runs on: its console continues after the failover.
    let at = std::fs::read_to_string(&scon).map_or(0, |t| counters(&t).len());
    let ran_on = twinrun_lab::poll(Duration::from_secs(10), Duration::from_millis(20), || {
        let n = std::fs::read_to_string(&scon).map_or(0, |t| counters(&t).len());
        (n > at + 5).then_some(())
    });
    ssd.request();
    assert_eq!(standby.join().expect("standby thread"), 0);
    assert!(ran_on.is_some(), "the survivor's guest did not run on");
    // The stream outside: the primary's console up to where the standby took over,
    // then the standby's (positioned files: the same bytes at the same offsets, the
    // standby's file a hole before its first write). Merged as bytes, not lines: the
    // takeover point can fall inside a console line, so neither file alone holds it.
    let a = std::fs::read(&pcon).unwrap_or_default();
    let b = std::fs::read(&scon).unwrap_or_default();
    let from = b
        .iter()
        .position(|&c| c != 0)
        .expect("the survivor wrote its console");
    assert!(
        from <= a.len(),
        "the survivor's console starts past the primary's end"
    );
    let both = a.len().min(b.len());
    assert_eq!(
        a[from..both],
        b[from..both],
        "the two consoles disagree where both wrote"
    );
    let mut merged = a[..from].to_vec();
    merged.extend_from_slice(&b[from..]);
    let seen = counters(&String::from_utf8_lossy(&merged));
    assert!(seen.len() > 10, "{} counter lines", seen.len());
    for w in seen.windows(2) {
        assert_eq!(w[1], w[0] + 1, "a gap or duplicate in the console stream");
    }
    assert!(f.resumed_from_epoch > 0);
}
