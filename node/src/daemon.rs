//! The daemon's life: check the config, bind the API and the peer channel, adopt the
//! VMMs, tell systemd READY=1, tick (VMM supervision and watchdog pings) until SIGTERM,
//! then STOPPING=1 and exit, leaving every VMM running.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use log::{error, info};
use tokio::net::TcpListener;

use crate::api::{ApiState, Tokens};
use crate::config::NodeConfig;
use crate::core::{Core, TICK};
use crate::gate::{NoWitness, ServiceGate};
use crate::peer::{LinkSettings, Outbox, Replica};

/// Exit codes of `twinrund`.
pub mod exit {
    pub const OK: i32 = 0;
    /// The daemon failed while running (listener, store).
    pub const FAILED: i32 = 1;
    /// Bad config, secret or tokens file: fix the file (systemd does not restart it,
    /// see the unit's RestartPreventExitStatus).
    pub const CONFIG: i32 = 2;
}

/// Everything `--check-config` checks, without touching anything.
pub struct Checked {
    pub cfg: NodeConfig,
    pub secret: Vec<u8>,
    pub tokens: Tokens,
    pub twinrun_bin: PathBuf,
    pub tls: Option<tokio_rustls::TlsAcceptor>,
}

pub fn check(config: &Path) -> Result<Checked, String> {
    let cfg = NodeConfig::load(config).map_err(|e| e.to_string())?;
    let secret = cfg.read_secret()?;
    let tokens = Tokens::load(&cfg.api.tokens_file)?;
    let twinrun_bin = match &cfg.twinrun_bin {
        Some(p) => p.clone(),
        None => std::env::current_exe()
            .ok()
            .and_then(|e| e.parent().map(|d| d.join("twinrun")))
            .unwrap_or_else(|| PathBuf::from("/usr/bin/twinrun")),
    };
    if !twinrun_bin.is_file() {
        return Err(format!(
            "{}: the twinrun binary {} does not exist (set twinrun_bin in the config)",
            config.display(),
            twinrun_bin.display()
        ));
    }
    if let Some(g) = &cfg.guest_elf {
        if !g.is_file() {
            return Err(format!(
                "{}: guest_elf {} does not exist",
                config.display(),
                g.display()
            ));
        }
    }
    let tls = match (&cfg.api.tls_cert, &cfg.api.tls_key) {
        (Some(c), Some(k)) => Some(crate::api::tls::acceptor(c, k)?),
        _ => None,
    };
    Ok(Checked {
        cfg,
        secret,
        tokens,
        twinrun_bin,
        tls,
    })
}

/// Runs the daemon; returns the exit code.
pub fn run(config: &Path) -> i32 {
    let c = match check(config) {
        Ok(c) => c,
        Err(e) => {
            error!("{e}");
            return exit::CONFIG;
        }
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("twinrund")
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            error!("cannot start the runtime: {e}");
            return exit::FAILED;
        }
    };
    rt.block_on(serve(c))
}

async fn serve(c: Checked) -> i32 {
    let Checked {
        cfg,
        secret,
        tokens,
        twinrun_bin,
        tls,
    } = c;
    let api_listener = match TcpListener::bind(cfg.api.listen).await {
        Ok(l) => l,
        Err(e) => {
            error!("cannot serve the API on {}: {e}", cfg.api.listen);
            return exit::FAILED;
        }
    };
    let link_listener = match TcpListener::bind(cfg.cluster_link.listen).await {
        Ok(l) => l,
        Err(e) => {
            error!(
                "cannot listen for the peer on {}: {e}",
                cfg.cluster_link.listen
            );
            return exit::FAILED;
        }
    };
    let outbox = Outbox::default();
    let gate: Arc<dyn crate::gate::QuorumGate> = match cfg.quorum_table() {
        None => Arc::new(NoWitness),
        Some(t) => match ServiceGate::open(&t, cfg.quorum_node_id(), cfg.peer_quorum_node_id()) {
            Ok(g) => Arc::new(g),
            Err(e) => {
                error!("{e}");
                return exit::CONFIG;
            }
        },
    };
    info!("quorum: {}", gate.describe());
    let core = match Core::open(cfg.clone(), gate, twinrun_bin, outbox.clone()) {
        Ok(c) => c,
        Err(e) => {
            error!("{e}");
            return exit::FAILED;
        }
    };
    let link = LinkSettings {
        cluster: cfg.cluster.clone(),
        me: cfg.node.clone(),
        peer: cfg.peer.name.clone(),
        peer_addr: cfg.peer.addr,
        secret,
        heartbeat: cfg.heartbeat(),
        timeout: cfg.peer_timeout(),
        protocol: protocol_override().unwrap_or(crate::peer::wire::PROTOCOL),
    };
    let replica: Arc<dyn Replica> = core.clone();
    tokio::spawn(async move {
        if let Err(e) = crate::peer::run(link, link_listener, replica, outbox).await {
            error!("peer channel: {e}");
        }
    });
    let state = Arc::new(ApiState {
        core: core.clone(),
        tokens,
    });
    tokio::spawn(async move {
        if let Err(e) = crate::api::serve(api_listener, tls, state).await {
            error!("API: {e}");
        }
    });
    let stop = Arc::new(AtomicBool::new(false));
    let ticker = {
        let (core, stop) = (core.clone(), stop.clone());
        std::thread::Builder::new()
            .name("tick".into())
            .spawn(move || tick_loop(&core, &stop))
    };
    if let Err(e) = ticker {
        error!("cannot start the supervision thread: {e}");
        return exit::FAILED;
    }
    core.boot();
    let line = core.status_line();
    info!("{line}");
    crate::notify::ready(&line);
    let why = wait_for_signal().await;
    info!("{why}: stopping; the VMMs keep running and the next start adopts them");
    crate::notify::stopping();
    stop.store(true, Ordering::SeqCst);
    exit::OK
}

/// Supervision and the watchdog: a core that stops ticking stops the pings too, so
/// systemd restarts a hung daemon (which then adopts the VMMs).
fn tick_loop(core: &Core, stop: &AtomicBool) {
    let period = crate::notify::watchdog_period();
    let mut last_ping = Instant::now();
    let mut last_status = String::new();
    let mut last_status_at = Instant::now();
    if period.is_some() {
        crate::notify::watchdog();
    }
    while !stop.load(Ordering::SeqCst) {
        core.tick();
        if let Some(p) = period {
            if last_ping.elapsed() >= p {
                crate::notify::watchdog();
                last_ping = Instant::now();
            }
        }
        if last_status_at.elapsed().as_secs() >= 5 {
            let s = core.status_line();
            if s != last_status {
                crate::notify::status(&s);
                last_status = s;
            }
            last_status_at = Instant::now();
        }
        let sleep = period.map_or(TICK, |p| p.min(TICK));
        std::thread::sleep(sleep);
    }
}

async fn wait_for_signal() -> &'static str {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        error!("cannot install signal handlers; running until killed");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    }
}

/// `TWINRUND_PROTOCOL` announces another daemon protocol version: the tests of the
/// version check (and, in issue 16, a previous-version build) use it.
fn protocol_override() -> Option<u32> {
    std::env::var("TWINRUND_PROTOCOL").ok()?.parse().ok()
}
