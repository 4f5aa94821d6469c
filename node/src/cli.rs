//! The cluster commands of the `twinrun` CLI (`twinrun node ...`, `twinrun vm
//! create|list|show|...`), in the manner of everRun's AVCLI: each is one API call,
//! prints a table or, with `--json`, exactly one JSON value, and exits with a code
//! that says what kind of failure it was. The clap wiring lives in the root crate
//! (`src/cli/cluster.rs`); this module runs the commands.

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::client::{Client, ClientError, DEFAULT_API, DEFAULT_TOKEN_FILE};
use crate::core::CommandResponse;
use crate::model::{Failback, NodeView, Protection, VmSettings, VmSpec, VmView};

/// Exit codes of the cluster commands.
pub mod exit {
    pub const OK: i32 = 0;
    /// The API failed (HTTP 5xx) or answered something unexpected.
    pub const FAILED: i32 = 1;
    /// Bad input: usage, spec file, invalid values (HTTP 400).
    pub const USAGE: i32 = 2;
    /// No such VM or node (HTTP 404).
    pub const NOT_FOUND: i32 = 3;
    /// Not possible in the VM's current state (HTTP 409); the message says what first.
    pub const CONFLICT: i32 = 4;
    /// Missing, wrong or read-only token (HTTP 401/403).
    pub const AUTH: i32 = 5;
    /// The API cannot be reached.
    pub const UNREACHABLE: i32 = 6;
}

/// How to reach the API.
#[derive(Clone, Debug, Default)]
pub struct Conn {
    /// `--api`, else `$TWINRUN_API`, else [`DEFAULT_API`].
    pub api: Option<String>,
    /// `--token-file`, else `$TWINRUN_TOKEN` (the token itself), else
    /// `$TWINRUN_TOKEN_FILE`, else [`DEFAULT_TOKEN_FILE`].
    pub token_file: Option<PathBuf>,
    pub json: bool,
    /// `--command-id`: makes a change run once even if the command is sent again.
    pub command_id: Option<String>,
    /// `--ca-file`, else `$TWINRUN_API_CA`: the CA (or self-signed certificate) of an
    /// HTTPS API.
    pub ca_file: Option<PathBuf>,
}

/// One cluster command.
#[derive(Clone, Debug)]
pub enum Cmd {
    NodeList,
    NodeShow(String),
    /// `twinrun node workon|finalize NODE` (`op`: "workon" or "finalize").
    NodeAction {
        node: String,
        op: &'static str,
    },
    VmList,
    VmShow(String),
    VmCreate {
        spec: PathBuf,
        name: Option<String>,
    },
    VmAction {
        vm: String,
        op: &'static str,
    },
    VmDelete(String),
    VmSet {
        vm: String,
        settings: VmSettings,
    },
    Events {
        vm: Option<String>,
        limit: u32,
    },
    /// `twinrun vm migrate VM [--to NODE]`; `wait`: follow it to its end.
    VmMigrate {
        vm: String,
        to: Option<String>,
        wait: bool,
    },
}

impl Conn {
    fn client(&self) -> Result<Client, (i32, String)> {
        let api = self
            .api
            .clone()
            .or_else(|| std::env::var("TWINRUN_API").ok())
            .unwrap_or_else(|| DEFAULT_API.to_string());
        let token = match (&self.token_file, std::env::var("TWINRUN_TOKEN")) {
            (Some(f), _) => read_token(f)?,
            (None, Ok(t)) => t,
            (None, Err(_)) => {
                let f = std::env::var_os("TWINRUN_TOKEN_FILE")
                    .map_or_else(|| PathBuf::from(DEFAULT_TOKEN_FILE), PathBuf::from);
                read_token(&f)?
            }
        };
        let ca = self
            .ca_file
            .clone()
            .or_else(|| std::env::var_os("TWINRUN_API_CA").map(PathBuf::from));
        match ca {
            Some(ca) => Client::with_ca(&api, &token, &ca).map_err(|e| (exit::USAGE, e)),
            None => Ok(Client::new(&api, &token)),
        }
    }
}

fn read_token(f: &Path) -> Result<String, (i32, String)> {
    std::fs::read_to_string(f)
        .map(|t| t.trim().to_string())
        .map_err(|e| {
            (
                exit::AUTH,
                format!(
                    "cannot read the API token from {}: {e} (give --token-file, or set $TWINRUN_TOKEN)",
                    f.display()
                ),
            )
        })
}

/// Reads a VM spec file (TOML with the fields of `VmSpec`); errors are `file:line`.
pub fn load_spec(path: &Path) -> Result<VmSpec, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    toml::from_str(&text).map_err(|e| {
        let line = e.span().map_or(1, |s| {
            text[..s.start.min(text.len())].matches('\n').count() + 1
        });
        format!("{}:{line}: {}", path.display(), e.message().trim())
    })
}

/// Runs `cmd`; returns the exit code. Output on stdout, errors on stderr.
pub fn run(conn: &Conn, cmd: Cmd) -> i32 {
    let mut out = std::io::stdout().lock();
    match run_to(conn, cmd, &mut out) {
        Ok(()) => exit::OK,
        Err((code, msg)) => {
            if conn.json {
                let _ = writeln!(
                    out,
                    "{}",
                    serde_json::json!({"error": msg, "exit_code": code})
                );
            }
            eprintln!("twinrun: error: {msg}");
            code
        }
    }
}

fn code_of(e: &ClientError) -> i32 {
    match e {
        ClientError::Unreachable { .. } => exit::UNREACHABLE,
        _ => match e.status() {
            Some(400) => exit::USAGE,
            Some(401 | 403) => exit::AUTH,
            Some(404) => exit::NOT_FOUND,
            Some(409) => exit::CONFLICT,
            _ => exit::FAILED,
        },
    }
}

pub(crate) fn api<T>(r: Result<T, ClientError>) -> Result<T, (i32, String)> {
    r.map_err(|e| (code_of(&e), e.to_string()))
}

pub fn run_to(conn: &Conn, cmd: Cmd, out: &mut impl Write) -> Result<(), (i32, String)> {
    let c = conn.client()?;
    let id = conn.command_id.as_deref();
    let json = |out: &mut dyn Write, v: &dyn erased::Json| {
        let _ = writeln!(out, "{}", v.to_json());
    };
    match cmd {
        Cmd::NodeList => {
            let nodes = api(c.nodes())?;
            if conn.json {
                json(out, &nodes);
            } else {
                node_table(out, &nodes);
            }
        }
        Cmd::NodeShow(n) => {
            let node = api(c.node(&n))?;
            if conn.json {
                json(out, &node);
            } else {
                node_table(out, std::slice::from_ref(&node));
                let _ = writeln!(out, "\n{}: {}", node.name, node.reason);
                if let Some(m) = &node.maintenance {
                    let _ = writeln!(out, "{}: IN MAINTENANCE: {m}", node.name);
                }
            }
        }
        Cmd::NodeAction { node, op } => done(out, conn, api(c.node_action(&node, op, id))?),
        Cmd::VmList => {
            let vms = api(c.vms())?;
            if conn.json {
                json(out, &vms);
            } else {
                vm_table(out, &vms);
            }
        }
        Cmd::VmShow(vm) => {
            let v = api(c.vm(&vm))?;
            if conn.json {
                json(out, &v);
            } else {
                vm_details(out, &v);
            }
        }
        Cmd::VmCreate { spec, name } => {
            let mut s = load_spec(&spec).map_err(|e| (exit::USAGE, e))?;
            if let Some(n) = name {
                s.name = n;
            }
            done(out, conn, api(c.create(&s, id))?);
        }
        Cmd::VmAction { vm, op } => done(out, conn, api(c.action(&vm, op, id))?),
        Cmd::VmDelete(vm) => done(out, conn, api(c.delete(&vm, id))?),
        Cmd::VmSet { vm, settings } => {
            if settings == VmSettings::default() {
                return Err((
                    exit::USAGE,
                    "nothing to set: give --protection, --preferred-node, --autostart or --failback".into(),
                ));
            }
            done(out, conn, api(c.set(&vm, &settings, id))?);
        }
        Cmd::VmMigrate { vm, to, wait } => {
            let before = api(c.vm(&vm))?;
            let r = api(c.migrate(&vm, to.as_deref(), id))?;
            let follow = wait && !conn.json && !r.message.starts_with("already runs");
            done(out, conn, r);
            if follow {
                crate::migrate_cli::follow(&c, &vm, &before, out)?;
            }
        }
        Cmd::Events { vm, limit } => {
            let ev = api(c.events(vm.as_deref(), limit))?;
            if conn.json {
                json(out, &ev);
            } else {
                for e in ev {
                    let _ = writeln!(
                        out,
                        "{} {:>12} {}",
                        e.seq,
                        e.vm.as_deref().unwrap_or("-"),
                        e.message
                    );
                }
            }
        }
    }
    Ok(())
}

fn done(out: &mut impl Write, conn: &Conn, r: CommandResponse) {
    if conn.json {
        let _ = writeln!(out, "{}", serde_json::to_string(&r).unwrap_or_default());
    } else {
        let _ = writeln!(
            out,
            "{} {}: {}{}",
            r.vm,
            r.op,
            r.message,
            if r.replayed {
                " (answer to an earlier identical command)"
            } else {
                ""
            }
        );
    }
}

fn node_table(out: &mut impl Write, nodes: &[NodeView]) {
    let _ = writeln!(
        out,
        "{:<12} {:<8} {:<22} {:>4}  REASON",
        "NAME", "STATE", "API", "VMS"
    );
    for n in nodes {
        let _ = writeln!(
            out,
            "{:<12} {:<8} {:<22} {:>4}  {}",
            n.name,
            serde_json::to_value(n.state)
                .ok()
                .and_then(|v| v.as_str().map(str::to_owned))
                .unwrap_or_default(),
            n.api_addr,
            n.vms_owned,
            match &n.maintenance {
                Some(m) => format!("in maintenance: {m}"),
                None => n.reason.clone(),
            }
        );
    }
}

fn vm_table(out: &mut impl Write, vms: &[VmView]) {
    let _ = writeln!(
        out,
        "{:<16} {:<10} {:<11} {:<8} {:<11}  REASON",
        "NAME", "STATE", "PROTECTION", "OWNER", "DESIRED"
    );
    for v in vms {
        let _ = writeln!(
            out,
            "{:<16} {:<10} {:<11} {:<8} {:<11}  {}",
            v.spec.name,
            v.state.to_string(),
            v.spec.protection.to_string(),
            v.owner.as_deref().unwrap_or("-"),
            v.desired.to_string(),
            v.reason
        );
    }
}

fn vm_details(out: &mut impl Write, v: &VmView) {
    let s = &v.spec;
    let lines = [
        ("name", s.name.clone()),
        ("state", v.state.to_string()),
        ("why", v.reason.clone()),
        ("desired", v.desired.to_string()),
        ("owner", v.owner.clone().unwrap_or_else(|| "-".into())),
        ("protection", s.protection.to_string()),
        (
            "preferred node",
            s.preferred_node.clone().unwrap_or_else(|| "-".into()),
        ),
        (
            "failback",
            match s.failback {
                Failback::Auto => "auto".into(),
                Failback::Manual => "manual".into(),
            },
        ),
        ("autostart", s.autostart.to_string()),
        ("vcpus", s.vcpus.to_string()),
        ("memory", format!("{} MiB", s.mem_mib)),
        (
            "disks",
            s.disks
                .iter()
                .map(|d| format!("{} MiB", d.size_mib))
                .collect::<Vec<_>>()
                .join(", "),
        ),
        (
            "nics",
            s.nics
                .iter()
                .map(|n| n.mac.clone())
                .collect::<Vec<_>>()
                .join(", "),
        ),
        ("crash restarts", v.restarts.to_string()),
        ("version", v.version.to_string()),
    ];
    for (k, val) in lines {
        let _ = writeln!(out, "{k:>15}: {val}");
    }
    for m in &v.vmms {
        let _ = writeln!(
            out,
            "{:>15}: {} on {} pid {}{}{}",
            "vmm",
            m.role,
            m.node,
            m.pid,
            if m.protected { ", protected" } else { "" },
            if m.failed_over { ", took over" } else { "" }
        );
    }
}

/// Parses `ft|ha|unprotected` for `--protection`.
pub fn parse_protection(s: &str) -> Result<Protection, String> {
    match s {
        "ft" => Ok(Protection::Ft),
        "ha" => Ok(Protection::Ha),
        "unprotected" => Ok(Protection::Unprotected),
        _ => Err(format!(
            "unknown protection {s:?} (expected ft, ha or unprotected)"
        )),
    }
}

/// Parses `auto|manual` for `--failback`.
pub fn parse_failback(s: &str) -> Result<Failback, String> {
    match s {
        "auto" => Ok(Failback::Auto),
        "manual" => Ok(Failback::Manual),
        _ => Err(format!(
            "unknown failback policy {s:?} (expected auto or manual)"
        )),
    }
}

mod erased {
    /// Anything printable as one JSON value.
    pub trait Json {
        fn to_json(&self) -> String;
    }
    impl<T: serde::Serialize> Json for T {
        fn to_json(&self) -> String {
            serde_json::to_string(self).unwrap_or_default()
        }
    }
}
