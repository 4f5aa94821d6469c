//! `twinrun witness`: the quorum witness service (run it on a third machine on the
//! management network) and its status view. The server itself is `quorum::witness`.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};

use clap::{Args, Subcommand};
use quorum::witness::server::{self, parse_cluster_flag, ClusterEntry, Server};

/// Flags of `twinrun witness` (flags override the TOML file; `--cluster` adds).
#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct WitnessArgs {
    #[command(subcommand)]
    pub command: Option<WitnessCommand>,
    /// TOML config: listen, state_dir, [[cluster]] id + secret_file, max_vms,
    /// max_vms_per_cluster, max_sessions.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// UDP address to serve on (default 0.0.0.0:4557).
    #[arg(long, value_name = "IP:PORT")]
    pub listen: Option<String>,
    /// Where the witness keeps its durable records and status.json.
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// A cluster served: ID=SECRET_FILE (repeatable; the secret is the pair's cluster
    /// secret, at least 16 bytes).
    #[arg(long = "cluster", value_name = "ID=SECRET_FILE", value_parser = parse_cluster_flag)]
    pub clusters: Vec<ClusterEntry>,
}

#[derive(Debug, Subcommand)]
pub enum WitnessCommand {
    /// What the witness knows: per (cluster, VM) the generation, its holder, the peer's
    /// replica state and the lease left; counters of refused datagrams.
    Status {
        #[arg(long, value_name = "DIR")]
        state_dir: PathBuf,
        /// One JSON object on stdout.
        #[arg(long)]
        json: bool,
    },
}

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::Relaxed);
}

/// Runs `twinrun witness ...`; returns the exit code (0 stopped by SIGTERM/SIGINT,
/// 1 failure at run time, 2 bad configuration).
pub fn run(a: &WitnessArgs) -> i32 {
    if let Some(WitnessCommand::Status { state_dir, json }) = &a.command {
        return match server::status_text(state_dir, *json) {
            Ok(s) => {
                print!("{s}");
                if *json {
                    println!();
                }
                0
            }
            Err(e) => {
                eprintln!("twinrun: error: {e}");
                e.exit_code()
            }
        };
    }
    let opts = match server::resolve(
        a.config.as_deref(),
        a.listen.as_deref(),
        a.state_dir.as_deref(),
        &a.clusters,
    ) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("twinrun: error: {e}");
            return e.exit_code();
        }
    };
    let handler = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        libc::signal(libc::SIGTERM, handler);
        libc::signal(libc::SIGINT, handler);
    }
    let result = Server::bind(opts).and_then(|mut s| s.run(&STOP));
    match result {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("twinrun: error: {e}");
            e.exit_code()
        }
    }
}
