//! `twinrund`: the twinrun node daemon (run by systemd; see packaging/systemd/).

use std::path::PathBuf;

use clap::Parser;

/// The twinrun node daemon: one per PM.
#[derive(Parser)]
#[command(name = "twinrund", version, about)]
struct Args {
    /// The node's config file.
    #[arg(long, value_name = "FILE", default_value = "/etc/twinrun/node.toml")]
    config: PathBuf,
    /// Check the config, secret and tokens files and exit (0: fine; 2: the error is
    /// printed as file:line: message). Changes nothing.
    #[arg(long)]
    check_config: bool,
    /// Print the API's OpenAPI document and exit.
    #[arg(long)]
    openapi: bool,
}

fn main() {
    // Logs go to stderr, which systemd sends to the journal (no timestamps: the
    // journal adds its own).
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format_timestamp(None)
        .init();
    let a = Args::parse();
    if a.openapi {
        println!("{}", twinrund::api::doc::json());
        return;
    }
    if a.check_config {
        match twinrund::daemon::check(&a.config) {
            Ok(c) => {
                println!(
                    "{}: OK: node {} of cluster {}, peer {} at {}, API on {}",
                    a.config.display(),
                    c.cfg.node,
                    c.cfg.cluster,
                    c.cfg.peer.name,
                    c.cfg.peer.addr,
                    c.cfg.api.listen
                );
                std::process::exit(0);
            }
            Err(e) => {
                eprintln!("twinrund: {e}");
                std::process::exit(twinrund::daemon::exit::CONFIG);
            }
        }
    }
    std::process::exit(twinrund::daemon::run(&a.config));
}
