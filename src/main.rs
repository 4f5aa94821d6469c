//! `twinrun`: the fault-tolerant hypervisor layer's command-line front end.
mod run;
mod signals;

use clap::Parser;
use twinrun::cli::{resolve_run_config, Cli, Command, SnapshotCommand, VmCommand};
use twinrun::exit;

fn main() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let cli = Cli::parse();
    let code = match cli.command {
        Command::Vm(VmCommand::Run(args)) => match resolve_run_config(&args) {
            Ok(cfg) => run::run_vm(&cfg, args.name.as_deref()),
            Err(e) => {
                eprintln!("twinrun: error: {e}");
                exit::USAGE
            }
        },
        Command::Snapshot(SnapshotCommand::Restore(a)) => run::restore_vm(&a),
        Command::Snapshot(cmd) => twinrun::cli::snapshot::run(&cmd),
    };
    std::process::exit(code);
}
