//! A primary and a standby in this process (the checkpoint drivers, as
//! `checkpoint/tests/failover.rs` runs them) over one A-Link on loopback TCP.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use alink::{Alink, AlinkConfig, LinkAddrs, WindowLimits};
use checkpoint::primary::{run_primary, EpochCopy, PrimaryDriverConfig, PrimaryReport};
use checkpoint::protocol::{PrimaryConfig, StandbyConfig};
use checkpoint::standby::{run_standby, StandbyOutcome};
use vmm::config::VmConfig;
use vmm::{build_vm, Vmm};

use super::SECRET;

/// The A-Link configuration of a pair's end: one loopback link per remote address.
pub(crate) fn links_cfg(node: u64, peer: u64, remotes: &[SocketAddr], misses: u32) -> AlinkConfig {
    let any: SocketAddr = "127.0.0.1:0".parse().expect("address literal");
    let mut c = AlinkConfig::new(
        21,
        node,
        peer,
        SECRET,
        remotes
            .iter()
            .map(|&remote| LinkAddrs { local: any, remote })
            .collect(),
    );
    // 20 ms heartbeats: with 4 misses the standby declares the primary dead after 80 ms.
    c.health.interval = Duration::from_millis(20);
    c.health.misses = misses;
    c.window = WindowLimits {
        max_msgs: 1024,
        max_bytes: 128 << 20,
    };
    c
}

/// The A-Link between a pair's two ends: links (loopback) and the protocol version
/// both announce (the previous one runs the sync's staged path).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Links {
    pub(crate) n: usize,
    pub(crate) protocol: u16,
}

impl Default for Links {
    fn default() -> Self {
        Links {
            n: 1,
            protocol: alink::PROTOCOL_VERSION,
        }
    }
}

/// A protected pair running in this process.
pub(crate) struct Pair {
    pub(crate) pvmm: Arc<Vmm>,
    pub(crate) pstop: Arc<AtomicBool>,
    pub(crate) sstop: Arc<AtomicBool>,
    pub(crate) acked: Arc<AtomicU64>,
    pub(crate) primary: Option<std::thread::JoinHandle<(Result<PrimaryReport, String>, Alink)>>,
    pub(crate) standby: std::thread::JoinHandle<(Result<StandbyOutcome, String>, Alink)>,
}

impl Pair {
    pub(crate) fn start(
        pcfg: &VmConfig,
        scfg: VmConfig,
        epoch: Duration,
        misses: u32,
    ) -> Result<Pair, String> {
        Pair::start_when(pcfg, scfg, epoch, misses, Links::default(), || true)
    }

    /// As [`Pair::start`], the primary's driver (hence the initial sync) starting only
    /// once `ready` says so (polled for at most 30 s).
    pub(crate) fn start_when(
        pcfg: &VmConfig,
        scfg: VmConfig,
        epoch: Duration,
        misses: u32,
        links: Links,
        ready: impl Fn() -> bool,
    ) -> Result<Pair, String> {
        Pair::start_full(
            pcfg,
            scfg,
            epoch,
            misses,
            links,
            ready,
            (EpochCopy::InPause, true),
        )
    }

    /// As [`Pair::start`], epoch pages copied as `copy` says, without the hot-page
    /// policy unless `hot`.
    pub(crate) fn start_copy(
        pcfg: &VmConfig,
        scfg: VmConfig,
        epoch: Duration,
        misses: u32,
        (copy, hot): (EpochCopy, bool),
    ) -> Result<Pair, String> {
        Pair::start_full(
            pcfg,
            scfg,
            epoch,
            misses,
            Links::default(),
            || true,
            (copy, hot),
        )
    }

    fn start_full(
        pcfg: &VmConfig,
        scfg: VmConfig,
        epoch: Duration,
        misses: u32,
        links: Links,
        ready: impl Fn() -> bool,
        (copy, hot): (EpochCopy, bool),
    ) -> Result<Pair, String> {
        let any: SocketAddr = "127.0.0.1:0".parse().expect("address literal");
        let mut scfg_link = links_cfg(2, 1, &[any].repeat(links.n.max(1)), misses);
        scfg_link.protocol_version = links.protocol;
        let slink = Alink::start(scfg_link).map_err(|e| format!("A-Link: {e}"))?;
        let mut pcfg_link = links_cfg(1, 2, slink.local_addrs(), misses);
        pcfg_link.protocol_version = links.protocol;
        let plink = Alink::start(pcfg_link).map_err(|e| format!("A-Link: {e}"))?;
        let sstop = Arc::new(AtomicBool::new(false));
        let standby = {
            let sstop = sstop.clone();
            std::thread::spawn(move || {
                let r = run_standby(&slink, &scfg, StandbyConfig { max_staged: 4 }, &sstop)
                    .map_err(|e| e.to_string());
                (r, slink)
            })
        };
        let mut pvmm = build_vm(pcfg).map_err(|e| format!("build: {e}"))?;
        pvmm.set_console_positioned(None)
            .map_err(|e| format!("console: {e}"))?;
        pvmm.start().map_err(|e| format!("start: {e}"))?;
        let t = Instant::now();
        while !ready() {
            if t.elapsed() > Duration::from_secs(30) {
                return Err("the primary's guest never got ready".into());
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        let pvmm = Arc::new(pvmm);
        let pstop = Arc::new(AtomicBool::new(false));
        let acked = Arc::new(AtomicU64::new(0));
        let primary = {
            let (pstop, pvmm, acked) = (pstop.clone(), pvmm.clone(), acked.clone());
            std::thread::spawn(move || {
                let defaults = PrimaryDriverConfig::default();
                let cfg = PrimaryDriverConfig {
                    protocol: PrimaryConfig {
                        epoch_len: epoch,
                        ..PrimaryConfig::default()
                    },
                    acked: Some(acked),
                    epoch_copy: copy,
                    hot_pages: if hot { defaults.hot_pages } else { None },
                    ..defaults
                };
                let r = run_primary(&pvmm, &plink, &cfg, &pstop).map_err(|e| e.to_string());
                (r, plink)
            })
        };
        Ok(Pair {
            pvmm,
            pstop,
            sstop,
            acked,
            primary: Some(primary),
            standby,
        })
    }

    pub(crate) fn wait_protected(&mut self, limit: Duration) -> Result<Duration, String> {
        let t = Instant::now();
        while self.acked.load(Ordering::SeqCst) == 0 {
            let dead = self.primary.as_ref().is_none_or(|p| p.is_finished());
            if dead {
                // Say why: the primary's own error (or that it stopped without one).
                let why = match self.primary.take().map(|p| p.join()) {
                    Some(Ok((Err(e), _))) => e,
                    Some(Ok((Ok(_), _))) => "it stopped without an error".into(),
                    Some(Err(_)) => "its thread panicked".into(),
                    None => "it was already stopped".into(),
                };
                return Err(format!("the pair never committed epoch 0: primary: {why}"));
            }
            if t.elapsed() > limit {
                return Err(format!(
                    "the pair never committed epoch 0 within {:.1} s",
                    limit.as_secs_f64()
                ));
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        Ok(t.elapsed())
    }

    /// Stops the primary ("kill": driver stopped where it is, links dropped, VM
    /// stopped with its held output never released). Returns its report and the
    /// moment of the kill.
    pub(crate) fn kill_primary(&mut self) -> Result<(PrimaryReport, Instant), String> {
        self.pstop.store(true, Ordering::SeqCst);
        let pri = self.primary.take().ok_or("primary already stopped")?;
        let (r, plink) = pri.join().map_err(|_| "primary thread panicked")?;
        drop(plink);
        let t = Instant::now();
        self.pvmm.stopper().stop();
        Ok((r?, t))
    }

    /// Stops everything: standby first (it then stops rather than failing over).
    pub(crate) fn stop(self) -> Result<PrimaryReport, String> {
        self.sstop.store(true, Ordering::SeqCst);
        let Pair {
            standby,
            mut primary,
            pstop,
            pvmm,
            ..
        } = self;
        let (s, slink) = standby.join().map_err(|_| "standby panicked")?;
        if let StandbyOutcome::NoReplica = s? {
            return Err("the standby lost the primary before epoch 0 committed".into());
        }
        pstop.store(true, Ordering::SeqCst);
        let pri = primary.take().ok_or("primary already stopped")?;
        let (r, plink) = pri.join().map_err(|_| "primary thread panicked")?;
        drop((plink, slink));
        pvmm.stopper().stop();
        if let Ok(mut v) = Arc::try_unwrap(pvmm) {
            v.wait();
        }
        r
    }
}
