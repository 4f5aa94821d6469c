//! The VMM processes of this node: spawned so that they outlive the daemon (own session;
//! a systemd scope where systemd is PID 1), recorded in pid files, found again and
//! adopted by a restarted daemon, watched for their end and for what they log
//! (protected, standby lost, failover), stopped on request.
//!
//! A restarted daemon never touches a running guest: adoption only reads `/proc`, the
//! pid file and the control socket.

pub mod argv;
mod procfs;

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use log::{info, warn};
use serde::{Deserialize, Serialize};

use crate::cluster::ExitKind;
use crate::config::{NodeConfig, ScopeMode};
use crate::model::{Protection, Role, VmRecord};

/// Lines of `twinrun vm run`'s log that the daemon follows (FT's; an HA pair logs the
/// same lines with "HA" for "FT", see [`marker`]).
pub const PROTECTED_LOG: &str = "FT primary: protected";
pub const WAITING_LOG: &str = "FT primary: waiting for a standby";
pub const FAILOVER_LOG: &str = "FT standby: failover complete";
/// The FT primary handed the VM to its standby in a planned role swap (it stays on as
/// the standby of the same pair).
pub const SWAPPED_OUT_LOG: &str = "FT primary: role swap done";
/// Carried by the new primary's [`FAILOVER_LOG`] line after a planned role swap.
pub const SWAPPED_IN_LOG: &str = "PLANNED ROLE SWAP";
/// An HA standby's takeover: it logs this line (not FT's) once the guest booted from
/// its replica (`twinrun_pair::ha::standby`).
pub const HA_BOOTED_LOG: &str = "HA standby: VM booted from the replica";

/// The FT primary's pre-copy (the initial sync of a session), one line per round:
/// "... initial sync round {round}: {pages} pages in {parts} parts".
pub const SYNC_ROUND_LOG: &str = "primary: initial sync round ";

/// (round, pages) of a [`SYNC_ROUND_LOG`] line.
fn sync_round(line: &str) -> Option<(u32, u64)> {
    let rest = &line[line.find(SYNC_ROUND_LOG)? + SYNC_ROUND_LOG.len()..];
    let (round, rest) = rest.split_once(": ")?;
    let pages = rest.split_whitespace().next()?;
    Some((round.trim().parse().ok()?, pages.parse().ok()?))
}

/// Does `line` carry `marker` (an FT marker) from an FT or an HA pair?
fn marker(line: &str, marker: &str) -> bool {
    line.contains(marker)
        || marker
            .strip_prefix("FT ")
            .is_some_and(|rest| line.contains(&format!("HA {rest}")))
}
/// Longest log line kept while looking for the markers.
const MAX_LINE: usize = 64 << 10;

/// What the pid file of a VMM holds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PidFile {
    pub pid: u32,
    /// Field 22 of /proc/<pid>/stat: tells a reused pid from ours.
    pub start_time: u64,
    pub role: Role,
    pub log: PathBuf,
}

/// Something a VMM did, noticed by [`Supervisor::poll`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VmmEvent {
    Exited {
        vm: String,
        exit: ExitKind,
    },
    Protected {
        vm: String,
    },
    Unprotected {
        vm: String,
    },
    FailedOver {
        vm: String,
    },
    SwappedOut {
        vm: String,
    },
    SwappedIn {
        vm: String,
    },
    /// The FT primary sent a pre-copy round (live migration's progress).
    SyncRound {
        vm: String,
        round: u32,
        pages: u64,
    },
}

struct Proc {
    role: Role,
    pid: u32,
    start_time: u64,
    /// Our child (spawned by this daemon); None when adopted.
    child: Option<Child>,
    log: PathBuf,
    log_offset: u64,
    partial: Vec<u8>,
}

pub struct Supervisor {
    cfg: NodeConfig,
    bin: PathBuf,
    scope: bool,
    procs: BTreeMap<String, Proc>,
}

/// True when systemd runs this machine (PID 1): VMMs then get their own scope, so a
/// `systemctl restart twinrund` does not reach them.
pub fn systemd_is_pid1() -> bool {
    Path::new("/run/systemd/system").is_dir()
        && std::fs::read_to_string("/proc/1/comm").is_ok_and(|c| c.trim() == "systemd")
}

impl Supervisor {
    pub fn new(cfg: NodeConfig, bin: PathBuf) -> Supervisor {
        let scope = match cfg.supervision.scope {
            ScopeMode::Always => true,
            ScopeMode::Never => false,
            ScopeMode::Auto => systemd_is_pid1(),
        };
        Supervisor {
            cfg,
            bin,
            scope,
            procs: BTreeMap::new(),
        }
    }

    pub fn uses_scopes(&self) -> bool {
        self.scope
    }

    /// (role, pid) of the VM's VMM here.
    pub fn running(&self, vm: &str) -> Option<(Role, u32)> {
        self.procs.get(vm).map(|p| (p.role, p.pid))
    }

    /// Finds the VMMs a previous daemon left running, from their pid files; removes
    /// stale pid files. Returns (vm, role, pid, the level its status says it runs at)
    /// of each adopted one.
    pub fn adopt_all(&mut self) -> Vec<(String, Role, u32, Option<Protection>)> {
        let dir = self.cfg.run_dir.join("pids");
        let Ok(entries) = std::fs::read_dir(&dir) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for e in entries.flatten() {
            let path = e.path();
            let Some(vm) = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_suffix(".pid"))
                .map(str::to_owned)
            else {
                continue;
            };
            match self.adopt(&vm, &path) {
                Ok((role, pid, level)) => out.push((vm, role, pid, level)),
                Err(why) => {
                    info!("{vm}: not adopting ({why}); removing {}", path.display());
                    let _ = std::fs::remove_file(&path);
                }
            }
        }
        out
    }

    fn adopt(&mut self, vm: &str, path: &Path) -> Result<(Role, u32, Option<Protection>), String> {
        let text = std::fs::read_to_string(path).map_err(|e| e.to_string())?;
        let pf: PidFile = serde_json::from_str(&text).map_err(|e| format!("bad pid file: {e}"))?;
        let st = procfs::stat(pf.pid).ok_or("the process is gone")?;
        if st.start_time != pf.start_time {
            return Err(format!("pid {} now belongs to another process", pf.pid));
        }
        if st.ended() {
            return Err("the process has ended".into());
        }
        let cmdline = procfs::cmdline(pf.pid).unwrap_or_default();
        let named = cmdline.windows(2).any(|w| w[0] == "--name" && w[1] == vm);
        if !named || !cmdline.iter().any(|a| a == "run") {
            return Err(format!(
                "pid {} is not `twinrun vm run --name {vm}`",
                pf.pid
            ));
        }
        // The control socket confirms (every `twinrun vm run --name` serves one, both
        // ends of a pair included). /proc already showed this is our VM's process, so a
        // socket that disagrees or does not answer is logged, never a reason to start
        // a second copy.
        let sock = self.cfg.vmm_run_dir().join(format!("{vm}.sock"));
        let status = twinrun_control::status(&sock, Duration::from_secs(2));
        match &status {
            Ok(s) if s.name == vm && s.pid == pf.pid => {}
            Ok(s) => warn!(
                "{vm}: its control socket answers as {} pid {}, not pid {}",
                s.name, s.pid, pf.pid
            ),
            Err(e) => {
                warn!("{vm}: control socket: {e} (adopting on the pid file's and /proc's word)")
            }
        }
        // The level it runs at, from its own status: the pid file's role may predate
        // an online level change that was under way when the last daemon ended (the
        // VMM made it, the daemon never heard the answer).
        let level = status
            .ok()
            .and_then(|s| s.ft)
            .and_then(|st| match st.protection.as_str() {
                "ft" => Some(Protection::Ft),
                "ha" => Some(Protection::Ha),
                "unprotected" => Some(Protection::Unprotected),
                _ => None,
            });
        let mut pf = pf;
        let role = match (pf.role, level) {
            (Role::Solo, Some(Protection::Ft | Protection::Ha)) => Role::Primary,
            (Role::Primary, Some(Protection::Unprotected)) => Role::Solo,
            (r, _) => r,
        };
        let fix = role != pf.role;
        pf.role = role;
        info!(
            "{vm}: adopted running {} VMM pid {}{}",
            pf.role,
            pf.pid,
            level.map_or(String::new(), |l| format!(" at level {l} (its status)"))
        );
        self.procs.insert(
            vm.to_string(),
            Proc {
                role: pf.role,
                pid: pf.pid,
                start_time: pf.start_time,
                child: None,
                log: pf.log.clone(),
                log_offset: 0,
                partial: Vec::new(),
            },
        );
        if fix {
            // The pid file follows (as `set_role` does after a level change).
            self.set_role(vm, role);
        }
        Ok((pf.role, pf.pid, level))
    }

    /// Starts the VMM of `rec` as `role`; its pid.
    pub fn spawn(&mut self, rec: &VmRecord, role: Role) -> Result<u32, String> {
        let vm = rec.spec.name.clone();
        if self.procs.contains_key(&vm) {
            return Err("a VMM for it runs already".into());
        }
        let plan = argv::plan(&self.cfg, rec, role, &self.bin)?;
        let dir = self.cfg.vm_dir(&vm);
        for d in [
            &dir,
            &self.cfg.vmm_run_dir(),
            &self.cfg.run_dir.join("pids"),
        ] {
            std::fs::create_dir_all(d).map_err(|e| format!("{}: {e}", d.display()))?;
        }
        for (path, size) in &plan.disks {
            ensure_disk(path, *size)?;
        }
        if let Some(br) = &self.cfg.network.bridge {
            for tap in &plan.taps {
                attach_tap(tap, br)?;
            }
        }
        // Each start gets a fresh log (the previous one is kept as .1).
        let _ = std::fs::rename(&plan.log, plan.log.with_extension("log.1"));
        let log = File::create(&plan.log).map_err(|e| format!("{}: {e}", plan.log.display()))?;
        let log2 = log.try_clone().map_err(|e| e.to_string())?;
        let mut cmd = if self.scope {
            let mut c = Command::new("systemd-run");
            c.args(["--scope", "--quiet", "--collect", "--unit"])
                .arg(format!("twinrun-vm-{vm}"))
                .arg("--")
                .args(&plan.args);
            c
        } else {
            let mut c = Command::new(&plan.args[0]);
            c.args(&plan.args[1..]);
            c
        };
        // The daemon's systemd variables are its own, not the VMM's.
        for k in [
            "NOTIFY_SOCKET",
            "WATCHDOG_USEC",
            "WATCHDOG_PID",
            "LISTEN_FDS",
            "LISTEN_PID",
        ] {
            cmd.env_remove(k);
        }
        cmd.envs(plan.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2);
        // SAFETY: setsid is async-signal-safe and touches nothing of the parent; it
        // puts the VMM in its own session so that signals aimed at the daemon's
        // process group or terminal (Ctrl-C, a unit stop) do not reach it.
        unsafe {
            cmd.pre_exec(|| {
                if libc::setsid() < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .map_err(|e| format!("cannot run {}: {e}", plan.args[0]))?;
        let pid = child.id();
        let start_time = procfs::stat(pid).map_or(0, |s| s.start_time);
        let pf = PidFile {
            pid,
            start_time,
            role,
            log: plan.log.clone(),
        };
        write_atomic(
            &self.cfg.pid_file(&vm),
            serde_json::to_string(&pf)
                .map_err(|e| e.to_string())?
                .as_bytes(),
        )?;
        info!(
            "{vm}: started {role} VMM pid {pid}: {}",
            plan.args.join(" ")
        );
        self.procs.insert(
            vm,
            Proc {
                role,
                pid,
                start_time,
                child: Some(child),
                log: plan.log,
                log_offset: 0,
                partial: Vec::new(),
            },
        );
        Ok(pid)
    }

    /// The VMM of `vm` runs in another role now (an online level change: `Solo` for
    /// unprotected, `Primary` for FT): recorded here and in its pid file, so a
    /// restarted daemon adopts it in that role.
    pub fn set_role(&mut self, vm: &str, role: Role) {
        let Some(p) = self.procs.get_mut(vm) else {
            return;
        };
        p.role = role;
        let pf = PidFile {
            pid: p.pid,
            start_time: p.start_time,
            role,
            log: p.log.clone(),
        };
        let r = serde_json::to_string(&pf)
            .map_err(|e| e.to_string())
            .and_then(|j| write_atomic(&self.cfg.pid_file(vm), j.as_bytes()));
        if let Err(e) = r {
            warn!("{vm}: cannot record its VMM's new role {role} in its pid file: {e}");
        }
    }

    /// SIGTERM (the VMM flushes its devices and exits) or SIGKILL.
    pub fn stop(&mut self, vm: &str, force: bool) {
        let Some(p) = self.procs.get(vm) else { return };
        let sig = if force { libc::SIGKILL } else { libc::SIGTERM };
        // Our pid only while its start time matches (never signal a reused pid).
        if procfs::stat(p.pid).is_some_and(|s| s.start_time == p.start_time) {
            // SAFETY: kill(2) with a pid we checked is still our VMM.
            unsafe { libc::kill(p.pid as libc::pid_t, sig) };
        }
    }

    /// Reaps ended VMMs and reads their logs; what happened, in order.
    pub fn poll(&mut self) -> Vec<VmmEvent> {
        let mut out = Vec::new();
        let mut ended = Vec::new();
        for (vm, p) in &mut self.procs {
            scan_log(vm, p, &mut out);
            let exit = match p.child.as_mut() {
                Some(c) => match c.try_wait() {
                    Ok(Some(st)) => Some(exit_kind(
                        st.code(),
                        std::os::unix::process::ExitStatusExt::signal(&st),
                    )),
                    Ok(None) => None,
                    Err(e) => Some(ExitKind::Crashed(format!("cannot wait for it: {e}"))),
                },
                None => match procfs::stat(p.pid) {
                    // Ended only once every thread is gone (its socket closed with it).
                    Some(s) if s.start_time == p.start_time && !s.ended() => None,
                    _ => Some(ExitKind::Crashed(format!(
                        "ended while adopted (status unknown; see {})",
                        p.log.display()
                    ))),
                },
            };
            if let Some(exit) = exit {
                ended.push((vm.clone(), exit));
            }
        }
        for (vm, exit) in ended {
            if let Some(mut p) = self.procs.remove(&vm) {
                scan_log(&vm, &mut p, &mut out);
            }
            let _ = std::fs::remove_file(self.cfg.pid_file(&vm));
            out.push(VmmEvent::Exited { vm, exit });
        }
        out
    }

    /// Removes a deleted VM's files on this node.
    pub fn remove_files(&self, vm: &str) {
        let dir = self.cfg.vm_dir(vm);
        if let Err(e) = std::fs::remove_dir_all(&dir) {
            if e.kind() != std::io::ErrorKind::NotFound {
                warn!("{vm}: cannot remove {}: {e}", dir.display());
            }
        }
        let _ = std::fs::remove_file(self.cfg.pid_file(vm));
    }
}

/// What a VMM's exit status means to the step function. Exit code 5 is `vm run`'s
/// "demoted by the quorum" (twinrun-pair's `exit::DEMOTED`): the peer took the VM
/// over, this node becomes its standby; not a crash.
fn exit_kind(code: Option<i32>, signal: Option<i32>) -> ExitKind {
    match (code, signal) {
        (Some(0), _) => ExitKind::Clean,
        (Some(5), _) => ExitKind::Demoted,
        (Some(c), _) => ExitKind::Crashed(format!("exit code {c}{}", exit_hint(c))),
        (None, Some(s)) => ExitKind::Crashed(format!("killed by signal {s}")),
        (None, None) => ExitKind::Crashed("ended".into()),
    }
}

fn exit_hint(code: i32) -> &'static str {
    match code {
        1 => " (the guest failed)",
        2 => " (bad VMM configuration)",
        3 => " (the VM crashed)",
        4 => " (the VM could not be built or started)",
        _ => "",
    }
}

/// Reads what the VMM logged since the last call and turns marker lines into events.
fn scan_log(vm: &str, p: &mut Proc, out: &mut Vec<VmmEvent>) {
    let Ok(mut f) = File::open(&p.log) else {
        return;
    };
    if f.seek(SeekFrom::Start(p.log_offset)).is_err() {
        return;
    }
    let mut buf = Vec::new();
    let Ok(n) = f.take(4 << 20).read_to_end(&mut buf) else {
        return;
    };
    p.log_offset += n as u64;
    p.partial.extend_from_slice(&buf);
    while let Some(nl) = p.partial.iter().position(|&b| b == b'\n') {
        let line: Vec<u8> = p.partial.drain(..=nl).collect();
        let line = String::from_utf8_lossy(&line);
        let ev = if marker(&line, PROTECTED_LOG) {
            Some(VmmEvent::Protected { vm: vm.into() })
        } else if marker(&line, WAITING_LOG) {
            Some(VmmEvent::Unprotected { vm: vm.into() })
        } else if marker(&line, FAILOVER_LOG) && line.contains(SWAPPED_IN_LOG) {
            Some(VmmEvent::SwappedIn { vm: vm.into() })
        } else if marker(&line, FAILOVER_LOG) || line.contains(HA_BOOTED_LOG) {
            Some(VmmEvent::FailedOver { vm: vm.into() })
        } else if marker(&line, SWAPPED_OUT_LOG) {
            Some(VmmEvent::SwappedOut { vm: vm.into() })
        } else if let Some((round, pages)) = sync_round(&line) {
            Some(VmmEvent::SyncRound {
                vm: vm.into(),
                round,
                pages,
            })
        } else {
            None
        };
        out.extend(ev);
    }
    if p.partial.len() > MAX_LINE {
        p.partial.clear();
    }
}

fn ensure_disk(path: &Path, size: u64) -> Result<(), String> {
    if path.exists() {
        return Ok(());
    }
    let f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(|e| format!("cannot create disk image {}: {e}", path.display()))?;
    f.set_len(size)
        .map_err(|e| format!("cannot size disk image {}: {e}", path.display()))
}

/// Creates TAP `tap` if needed and puts it on bridge `br`.
fn attach_tap(tap: &str, br: &str) -> Result<(), String> {
    let ip = |args: &[&str]| -> Result<std::process::Output, String> {
        Command::new("ip")
            .args(args)
            .output()
            .map_err(|e| format!("cannot run ip: {e}"))
    };
    let o = ip(&["tuntap", "add", "dev", tap, "mode", "tap"])?;
    if !o.status.success() && !ip(&["link", "show", tap])?.status.success() {
        return Err(format!(
            "cannot create TAP {tap}: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        ));
    }
    let o = ip(&["link", "set", tap, "master", br, "up"])?;
    if !o.status.success() {
        return Err(format!(
            "cannot put TAP {tap} on bridge {br}: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        ));
    }
    Ok(())
}

pub fn write_atomic(path: &Path, data: &[u8]) -> Result<(), String> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, data).map_err(|e| format!("{}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, path).map_err(|e| format!("{}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_code_5_is_a_demotion_not_a_crash() {
        assert_eq!(exit_kind(Some(0), None), ExitKind::Clean);
        assert_eq!(exit_kind(Some(5), None), ExitKind::Demoted);
        assert_eq!(
            exit_kind(Some(3), None),
            ExitKind::Crashed("exit code 3 (the VM crashed)".into())
        );
        assert_eq!(
            exit_kind(None, Some(9)),
            ExitKind::Crashed("killed by signal 9".into())
        );
    }

    #[test]
    fn pre_copy_round_lines_are_parsed() {
        let l = "[2026-12-07T15:00:00Z INFO  checkpoint::primary::driver] primary: initial sync round 2: 317 pages in 3 parts";
        assert_eq!(sync_round(l), Some((2, 317)));
        assert_eq!(sync_round("primary: initial sync round x: 1 pages"), None);
        assert_eq!(sync_round("FT primary: protected"), None);
    }

    #[test]
    fn role_swap_lines_become_swap_events() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("vmm.log");
        std::fs::write(
            &log,
            "INFO FT primary: role swap done: the peer runs the VM from epoch 7\n\
             INFO FT standby: failover complete in 9 ms (PLANNED ROLE SWAP: ...): resumed\n\
             INFO FT standby: failover complete in 90 ms (restore and start ...)\n",
        )
        .unwrap();
        let mut p = Proc {
            role: Role::Primary,
            pid: 1,
            start_time: 0,
            child: None,
            log,
            log_offset: 0,
            partial: Vec::new(),
        };
        let mut out = Vec::new();
        scan_log("a", &mut p, &mut out);
        assert_eq!(
            out,
            vec![
                VmmEvent::SwappedOut { vm: "a".into() },
                VmmEvent::SwappedIn { vm: "a".into() },
                VmmEvent::FailedOver { vm: "a".into() }
            ]
        );
    }

    #[test]
    fn log_markers_become_events_across_partial_reads() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("vmm.log");
        std::fs::write(&log, "x\nINFO FT primary: protec").unwrap();
        let mut p = Proc {
            role: Role::Primary,
            pid: 1,
            start_time: 0,
            child: None,
            log: log.clone(),
            log_offset: 0,
            partial: Vec::new(),
        };
        let mut out = Vec::new();
        scan_log("a", &mut p, &mut out);
        assert!(out.is_empty());
        let mut f = OpenOptions::new().append(true).open(&log).unwrap();
        std::io::Write::write_all(
            &mut f,
            b"ted: the standby\nFT primary: waiting for a standby (session 2)\nHA standby: failover complete\n\
              HA standby: VM booted from the replica 18ms after the primary's loss; now the primary\n",
        )
        .unwrap();
        scan_log("a", &mut p, &mut out);
        assert_eq!(
            out,
            vec![
                VmmEvent::Protected { vm: "a".into() },
                VmmEvent::Unprotected { vm: "a".into() },
                VmmEvent::FailedOver { vm: "a".into() },
                VmmEvent::FailedOver { vm: "a".into() }
            ]
        );
    }
}
