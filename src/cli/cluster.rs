//! clap wiring of the cluster commands (`twinrun node ...`, `twinrun vm create|list|
//! show|start|shutdown|poweroff|restart|delete|set|failback|migrate|events`), which talk to a
//! node daemon's API; the commands themselves live in `twinrund::cli`.
//!
//! Exit codes: 0 done; 1 the API failed; 2 bad input; 3 no such VM or node; 4 not
//! possible in the VM's state (the message says what to do first); 5 missing, wrong or
//! read-only token; 6 the API cannot be reached.

use std::path::PathBuf;

use clap::{Args, Subcommand};
use twinrund::cli::{parse_failback, parse_protection, Cmd, Conn};
use twinrund::model::{Failback, Protection, VmSettings};

/// How to reach the API, and how to print.
#[derive(Debug, Default, Args)]
pub struct ApiArgs {
    /// API base URL (default: $TWINRUN_API, else http://127.0.0.1:7480).
    #[arg(long, value_name = "URL")]
    pub api: Option<String>,
    /// File holding the API token (default: $TWINRUN_TOKEN itself, else
    /// $TWINRUN_TOKEN_FILE, else /etc/twinrun/api-token).
    #[arg(long, value_name = "FILE")]
    pub token_file: Option<PathBuf>,
    /// Print exactly one JSON value on stdout.
    #[arg(long)]
    pub json: bool,
    /// Id of this change: sent again (to either node), it runs once and gets the
    /// first answer.
    #[arg(long, value_name = "ID")]
    pub command_id: Option<String>,
    /// CA (or self-signed certificate), PEM, of an https:// API (default:
    /// $TWINRUN_API_CA, else the system's roots).
    #[arg(long, value_name = "FILE")]
    pub ca_file: Option<PathBuf>,
}

impl ApiArgs {
    fn conn(&self) -> Conn {
        Conn {
            api: self.api.clone(),
            token_file: self.token_file.clone(),
            json: self.json,
            command_id: self.command_id.clone(),
            ca_file: self.ca_file.clone(),
        }
    }
}

/// `twinrun node ...`
#[derive(Debug, Subcommand)]
pub enum NodeCommand {
    /// Both nodes of the cluster: state, API address, VMs owned, why.
    List {
        #[command(flatten)]
        api: ApiArgs,
    },
    /// One node.
    Show {
        name: String,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Maintenance mode: move every VM off NODE (FT and HA VMs run simplex on the
    /// other node; unprotected VMs are shut down cleanly until finalize), then mark it
    /// in maintenance, where its daemon and VMMs may be stopped.
    Workon {
        node: String,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Bring NODE back from maintenance: FT and HA VMs are protected again (resync),
    /// the VMs workon shut down start again there, then failback per each VM's policy.
    Finalize {
        node: String,
        #[command(flatten)]
        api: ApiArgs,
    },
}

/// The `twinrun vm` commands that go through a node daemon.
#[derive(Debug, Subcommand)]
pub enum ClusterVmCommand {
    /// Define a VM from a TOML spec (name, vcpus, mem_mib, disks, nics, payload,
    /// protection, preferred_node, autostart, failback); it is created stopped.
    Create {
        /// The spec file.
        spec: PathBuf,
        /// Name of the VM (overrides the spec's).
        #[arg(long)]
        name: Option<String>,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Every VM: state, protection, owner, and why it is where it is.
    List {
        #[command(flatten)]
        api: ApiArgs,
    },
    /// One VM in full.
    Show {
        vm: String,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Start a VM (clears an error state).
    Start {
        vm: String,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Stop a VM: its VMMs flush their devices and exit.
    Shutdown {
        vm: String,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Stop a VM at once.
    Poweroff {
        vm: String,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Stop and start a running VM.
    Restart {
        vm: String,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Delete a stopped VM and its disk images on both nodes.
    Delete {
        vm: String,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Change a VM's protection level, preferred node, autostart or failback policy.
    Set {
        vm: String,
        /// ft, ha or unprotected. A running VM changes between unprotected and ft with
        /// no reboot (to ft: its VMM starts its quorum client, then the other node
        /// starts the standby; to unprotected: the standby is stopped, then the VMM
        /// runs alone), both nodes online; to or from ha it must be shut down first.
        #[arg(long, value_parser = parse_protection)]
        protection: Option<Protection>,
        #[arg(long, value_name = "NODE")]
        preferred_node: Option<String>,
        #[arg(long, value_name = "BOOL")]
        autostart: Option<bool>,
        /// auto or manual.
        #[arg(long, value_parser = parse_failback)]
        failback: Option<Failback>,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Move a VM back to its preferred node once that node is in sync.
    Failback {
        vm: String,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Live-migrate a running VM to the other node (or --to NODE): unprotected VMs by a
    /// pre-copy and a handover at a checkpoint, FT VMs by a planned role swap. Shows a
    /// progress bar (pre-copy rounds, bytes, dirty rate, ETA) until it is done or given
    /// up (the VM then runs on where it was); --no-wait returns at once.
    Migrate {
        vm: String,
        #[arg(long, value_name = "NODE")]
        to: Option<String>,
        #[arg(long)]
        no_wait: bool,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// The node's event log (of one VM, or all).
    Events {
        vm: Option<String>,
        #[arg(long, default_value_t = 50)]
        limit: u32,
        #[command(flatten)]
        api: ApiArgs,
    },
}

pub fn run_node(cmd: NodeCommand) -> i32 {
    match cmd {
        NodeCommand::List { api } => twinrund::cli::run(&api.conn(), Cmd::NodeList),
        NodeCommand::Show { name, api } => twinrund::cli::run(&api.conn(), Cmd::NodeShow(name)),
        NodeCommand::Workon { node, api } => {
            twinrund::cli::run(&api.conn(), Cmd::NodeAction { node, op: "workon" })
        }
        NodeCommand::Finalize { node, api } => twinrund::cli::run(
            &api.conn(),
            Cmd::NodeAction {
                node,
                op: "finalize",
            },
        ),
    }
}

pub fn run_vm(cmd: ClusterVmCommand) -> i32 {
    let action = |vm: String, op: &'static str, api: ApiArgs| {
        twinrund::cli::run(&api.conn(), Cmd::VmAction { vm, op })
    };
    match cmd {
        ClusterVmCommand::Create { spec, name, api } => {
            twinrund::cli::run(&api.conn(), Cmd::VmCreate { spec, name })
        }
        ClusterVmCommand::List { api } => twinrund::cli::run(&api.conn(), Cmd::VmList),
        ClusterVmCommand::Show { vm, api } => twinrund::cli::run(&api.conn(), Cmd::VmShow(vm)),
        ClusterVmCommand::Start { vm, api } => action(vm, "start", api),
        ClusterVmCommand::Shutdown { vm, api } => action(vm, "shutdown", api),
        ClusterVmCommand::Poweroff { vm, api } => action(vm, "poweroff", api),
        ClusterVmCommand::Restart { vm, api } => action(vm, "restart", api),
        ClusterVmCommand::Failback { vm, api } => action(vm, "failback", api),
        ClusterVmCommand::Delete { vm, api } => twinrund::cli::run(&api.conn(), Cmd::VmDelete(vm)),
        ClusterVmCommand::Set {
            vm,
            protection,
            preferred_node,
            autostart,
            failback,
            api,
        } => twinrund::cli::run(
            &api.conn(),
            Cmd::VmSet {
                vm,
                settings: VmSettings {
                    protection,
                    preferred_node,
                    autostart,
                    failback,
                },
            },
        ),
        ClusterVmCommand::Migrate {
            vm,
            to,
            no_wait,
            api,
        } => twinrund::cli::run(
            &api.conn(),
            Cmd::VmMigrate {
                vm,
                to,
                wait: !no_wait,
            },
        ),
        ClusterVmCommand::Events { vm, limit, api } => {
            twinrund::cli::run(&api.conn(), Cmd::Events { vm, limit })
        }
    }
}
