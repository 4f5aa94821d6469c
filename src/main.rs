//! `twinrun`: the fault-tolerant hypervisor layer's command-line front end.

use clap::Parser;
use twinrun::cli::ft::resolve_ft_named;
use twinrun::cli::{resolve_run_config, Cli, Command, SnapshotCommand, VmCommand};
use twinrun::exit;

fn main() {
    // Microseconds: the logs of two processes are the timeline of a swap or a
    // migration (benches/README.md's phase breakdowns are read from them).
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format_timestamp_micros()
        .init();
    let cli = Cli::parse();
    let code = match cli.command {
        Command::Vm(VmCommand::Run(args)) => {
            match resolve_run_config(&args)
                .map_err(|e| e.to_string())
                .and_then(|cfg| {
                    resolve_ft_named(&args.ft, args.name.as_deref())
                        .map(|ft| (cfg, ft))
                        .map_err(|e| e.to_string())
                }) {
                Ok((cfg, None)) => twinrun_pair::run_vm(&cfg, args.name.as_deref()),
                Ok((cfg, Some(ft)))
                    if args.ft.protection == twinrun_pair::settings::Protection::Ha =>
                {
                    twinrun_pair::ha::run_pair(&cfg, &ft, args.name.as_deref())
                }
                Ok((cfg, Some(ft))) => twinrun_pair::run_pair(&cfg, &ft, args.name.as_deref()),
                Err(e) => {
                    eprintln!("twinrun: error: {e}");
                    exit::USAGE
                }
            }
        }
        Command::Vm(VmCommand::Fault(a)) => twinrun::cli::fault::run(&a),
        Command::Vm(VmCommand::Status(a)) => twinrun::cli::status::run(&a),
        Command::Vm(VmCommand::Swap(a)) => twinrun::cli::swap::run(&a),
        Command::Vm(VmCommand::Cluster(c)) => twinrun::cli::cluster::run_vm(c),
        Command::Node(c) => twinrun::cli::cluster::run_node(c),
        Command::Snapshot(SnapshotCommand::Restore(a)) => {
            twinrun_pair::restore_vm(&twinrun_pair::RestoreOptions {
                vm: a.vm,
                generation: a.generation,
                name: a.name,
                console: a.console,
                disk_paths: a.disk_paths,
            })
        }
        Command::Snapshot(cmd) => twinrun::cli::snapshot::run(&cmd),
        Command::Disk(cmd) => twinrun::cli::disk::run(&cmd),
        Command::Demo(a) => twinrun::demo::run(&a),
        Command::Witness(a) => twinrun::cli::witness::run(&a),
    };
    std::process::exit(code);
}
