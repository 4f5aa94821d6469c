//! Network namespaces as RAII guards, and running programs and threads inside one.
//!
//! A program runs in a namespace through `ip netns exec`, which execs it: the child's
//! pid is the program's (signals reach it directly) and it sees the namespace's own
//! `/sys/class/net`. A thread joins one with setns(2), which moves only that thread.

use std::ffi::OsStr;
use std::path::PathBuf;
use std::process::Command;
use std::thread::JoinHandle;

use crate::ip::{ip, ip_output};
use crate::LabError;

/// A network namespace with its loopback up, deleted on drop (which removes every
/// interface in it; kill the processes inside first).
#[derive(Debug)]
pub struct NetNs {
    name: String,
}

impl NetNs {
    pub fn new(name: &str) -> Result<NetNs, LabError> {
        ip(&["netns", "add", name])?;
        // From here on Drop removes it.
        let ns = NetNs {
            name: name.to_string(),
        };
        ip(&["-n", name, "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `program` run inside this namespace.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        command_in(&self.name, program)
    }

    /// `f` on a new thread inside this namespace.
    pub fn thread<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<NsThread<T>, LabError> {
        in_netns(&self.name, f)
    }

    /// Whether a namespace `name` exists.
    pub fn exists(name: &str) -> bool {
        ip_output(&["netns", "list"]).is_ok_and(|out| {
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .any(|l| l.split_whitespace().next() == Some(name))
        })
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        if let Err(e) = ip(&["netns", "del", &self.name]) {
            if !std::thread::panicking() {
                eprintln!("warning: deleting network namespace {}: {e}", self.name);
            }
        }
    }
}

/// `program` run inside namespace `ns` (`ip netns exec ns program`).
pub fn command_in(ns: &str, program: impl AsRef<OsStr>) -> Command {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", ns]).arg(program);
    c
}

/// What setns(2) opens for namespace `ns`.
pub fn path(ns: &str) -> PathBuf {
    PathBuf::from("/var/run/netns").join(ns)
}

/// Moves the calling thread into namespace `ns` (sockets it opens from now on live
/// there; other threads stay where they are).
pub fn enter(ns: &str) -> Result<(), LabError> {
    let p = path(ns);
    let f = std::fs::File::open(&p).map_err(LabError::io(format!("open {}", p.display())))?;
    nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET).map_err(|e| LabError::Io {
        what: format!("setns {ns}"),
        source: e.into(),
    })
}

/// A thread running inside a namespace.
pub struct NsThread<T> {
    ns: String,
    /// `None` only if it could not enter the namespace, and then no `NsThread` is
    /// handed out.
    handle: JoinHandle<Option<T>>,
}

impl<T> NsThread<T> {
    /// Its result; an error if it panicked.
    pub fn join(self) -> Result<T, LabError> {
        match self.handle.join() {
            Ok(Some(v)) => Ok(v),
            Ok(None) => Err(LabError::Invalid(format!(
                "the thread never entered namespace {}",
                self.ns
            ))),
            Err(_) => Err(LabError::Invalid(format!(
                "a thread in namespace {} panicked",
                self.ns
            ))),
        }
    }

    pub fn is_finished(&self) -> bool {
        self.handle.is_finished()
    }
}

/// Runs `f` on a new thread that first joins namespace `ns`; returns once it is there
/// (an error if it could not get there: then `f` never runs).
pub fn in_netns<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<NsThread<T>, LabError> {
    let (tx, rx) = std::sync::mpsc::sync_channel::<Result<(), LabError>>(1);
    let name = ns.to_string();
    let handle = std::thread::Builder::new()
        .name(format!("in-{ns}"))
        .spawn(move || {
            let entered = enter(&name);
            let ok = entered.is_ok();
            let _ = tx.send(entered);
            ok.then(f)
        })
        .map_err(LabError::io("spawning a thread"))?;
    match rx.recv() {
        Ok(Ok(())) => Ok(NsThread {
            ns: ns.to_string(),
            handle,
        }),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(LabError::Invalid(format!(
            "the thread for namespace {ns} ended before entering it"
        ))),
    }
}
