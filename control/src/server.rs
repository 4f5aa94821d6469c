//! Serving the control socket from the thread that waits for the VM: it polls the
//! listener between checks for the VM's end, and runs requests (pause, resume,
//! snapshot, disk faults) against the [`Vmm`] directly; either end of an FT pair serves
//! it from a thread of its own ([`Server::poll_ft`]), asking the pair's runtime for
//! what it needs through [`FtControl`]. One connection is served at a time.

use std::io::ErrorKind;
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::time::Duration;

use std::sync::Arc;

use log::{info, warn};
use storage_mirror::primary::PrimaryDisks;
use twinrun_snapshot::paths;
use twinrun_snapshot::take::Snapshotter;
use vmm::config::VmConfig;
use vmm::devices::virtio::block::DiskFaults;
use vmm::Vmm;

use super::{
    accepts, read_message, write_message, FtStatus, Op, Request, Response, VmStatus,
    PROTOCOL_VERSION,
};

/// What one end of an FT pair offers its control socket; the pair's runtime
/// implements it over its shared state (the answers change as the end goes through
/// its sessions and, for a standby, its failover).
pub trait FtControl: Send + Sync {
    /// The FT part of the status, now.
    fn status(&self) -> FtStatus;
    /// Fault injectors of the running VM's disks (none while no VM runs here).
    fn disk_faults(&self) -> Vec<Arc<DiskFaults>>;
    /// The mirrored disks of the running VM (none on a standby before a failover).
    fn disks(&self) -> Option<Arc<PrimaryDisks>>;
    /// A planned role swap (see [`Op::Swap`]): Ok((epoch, paused_us)) once the
    /// standby took the VM over.
    fn swap(&self) -> Result<(u64, u64), String> {
        Err("this FT runtime does not offer role swaps".into())
    }
    /// An online level change (see [`Op::SetLevel`]): Ok once made.
    fn set_level(&self, change: super::LevelChange) -> Result<(), String> {
        Err(format!(
            "this runtime cannot change its level to {} while it runs",
            change.name()
        ))
    }
}

/// The answer to the disk operations of an end that runs no VM.
pub const NO_VM_HERE: &str = "this end of the pair runs no VM (yet): a standby before a \
     failover holds only a replica, a primary is still starting; ask the primary";

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("VM name {name:?} is in use by a running VM (control socket {})", path.display())]
    InUse { name: String, path: PathBuf },
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Name(String),
}

pub struct Server {
    name: String,
    path: PathBuf,
    listener: UnixListener,
    paused: bool,
    snap: Snapshotter,
}

/// How long one request may keep the server waiting for its bytes.
const IO_TIMEOUT: Duration = Duration::from_secs(5);

impl Server {
    /// Binds the socket of VM `name`; fails if a live VM serves it (a stale socket of
    /// a VMM that died is replaced).
    pub fn bind(name: &str, cfg: &VmConfig) -> Result<Server, ServerError> {
        paths::check_vm_name(name).map_err(ServerError::Name)?;
        let dir = paths::run_dir();
        std::fs::create_dir_all(&dir).map_err(|source| ServerError::Io {
            path: dir.clone(),
            source,
        })?;
        let path = paths::control_socket(name);
        let listener = match UnixListener::bind(&path) {
            Ok(l) => l,
            Err(e) if e.kind() == ErrorKind::AddrInUse => {
                if UnixStream::connect(&path).is_ok() {
                    return Err(ServerError::InUse {
                        name: name.into(),
                        path,
                    });
                }
                let _ = std::fs::remove_file(&path);
                UnixListener::bind(&path).map_err(|source| ServerError::Io {
                    path: path.clone(),
                    source,
                })?
            }
            Err(source) => return Err(ServerError::Io { path, source }),
        };
        listener
            .set_nonblocking(true)
            .map_err(|source| ServerError::Io {
                path: path.clone(),
                source,
            })?;
        info!("control socket {}", path.display());
        Ok(Server {
            name: name.into(),
            path,
            listener,
            paused: false,
            snap: Snapshotter::new(name, cfg),
        })
    }

    /// One end of an FT pair: status, disk fault injection (on the running VM's disks'
    /// injectors) and the mirrored disks' state and verify (pausing or snapshotting
    /// would fight the checkpoints). Waits up to `timeout` for a connection.
    pub fn poll_ft(&mut self, ft: &dyn FtControl, timeout: Duration) {
        let Some(s) = self.accept(timeout) else {
            return;
        };
        let name = self.name.clone();
        serve_with(s, &mut |op| {
            match op {
            Op::Status => Response::Status(VmStatus {
                name: name.clone(),
                pid: std::process::id(),
                paused: false,
                ft: Some(Box::new(ft.status())),
            }),
            Op::DiskFault { disk, action } => match ft.disks() {
                None => Response::Error {
                    message: NO_VM_HERE.into(),
                },
                Some(_) => super::disk_fault::apply_to(&ft.disk_faults(), disk, &action),
            },
            Op::DiskStatus => match ft.disks() {
                Some(d) => super::disks::status(&d),
                None => Response::Error {
                    message: NO_VM_HERE.into(),
                },
            },
            Op::DiskVerify => match ft.disks() {
                Some(d) => super::disks::verify(&d),
                None => Response::Error {
                    message: NO_VM_HERE.into(),
                },
            },
            Op::Swap => match ft.swap() {
                Ok((epoch, paused_us)) => Response::Swapped { epoch, paused_us },
                Err(message) => Response::Error { message },
            },
            Op::SetLevel(change) => match ft.set_level(change) {
                Ok(()) => Response::Ok,
                Err(message) => Response::Error { message },
            },
            other => Response::Error {
                message: format!(
                    "{other:?} is not available on a member of an FT pair (it would fight the checkpoints)"
                ),
            },
        }
        });
    }

    fn accept(&mut self, timeout: Duration) -> Option<UnixStream> {
        let mut pfd = libc::pollfd {
            fd: self.listener.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the duration of the call.
        let n = unsafe { libc::poll(&mut pfd, 1, timeout.as_millis() as libc::c_int) };
        if n <= 0 {
            return None;
        }
        match self.listener.accept() {
            Ok((s, _)) => Some(s),
            Err(e) if e.kind() == ErrorKind::WouldBlock => None,
            Err(e) => {
                warn!("control socket accept: {e}");
                None
            }
        }
    }

    /// Waits up to `timeout` for a connection and serves it.
    pub fn poll(&mut self, vmm: &Vmm, timeout: Duration) {
        if let Some(s) = self.accept(timeout) {
            serve_with(s, &mut |op| self.handle(vmm, op));
        }
    }

    fn handle(&mut self, vmm: &Vmm, op: Op) -> Response {
        let err = |message: String| Response::Error { message };
        match op {
            Op::Status => Response::Status(VmStatus {
                name: self.name.clone(),
                pid: std::process::id(),
                paused: self.paused,
                ft: None,
            }),
            Op::Pause if self.paused => Response::Ok,
            Op::Pause => match vmm.pause() {
                Ok(t) => {
                    info!("paused by control request ({} us)", t.as_micros());
                    self.paused = true;
                    Response::Ok
                }
                Err(e) => err(format!("pause: {e}")),
            },
            Op::Resume if !self.paused => Response::Ok,
            Op::Resume => match vmm.resume() {
                Ok(()) => {
                    self.paused = false;
                    Response::Ok
                }
                Err(e) => err(format!("resume: {e}")),
            },
            Op::SnapshotCreate => match self.snap.take(vmm, self.paused) {
                Ok(t) => {
                    info!(
                        "snapshot generation {} ({}): paused {} us, {} bytes",
                        t.generation,
                        t.kind,
                        t.pause.as_micros(),
                        t.bytes
                    );
                    Response::Snapshot {
                        generation: t.generation,
                        kind: t.kind.to_string(),
                        pause_us: t.pause.as_micros() as u64,
                        bytes: t.bytes,
                        folded: t.folded,
                    }
                }
                Err(e) => err(format!("snapshot: {e}")),
            },
            Op::DiskFault { disk, action } => super::disk_fault::apply(vmm, disk, &action),
            Op::DiskStatus | Op::DiskVerify => err(super::disks::NOT_MIRRORED.into()),
            Op::Swap => err("a role swap needs an FT pair; this VM runs alone".into()),
            Op::SetLevel(_) => err(
                "this VM runs alone (`vm run` without --role): its level cannot change while \
                 it runs; stop it and start it as one end of a pair"
                    .into(),
            ),
        }
    }
}

/// Why a request of control protocol `theirs` is refused, naming both versions.
fn version_refusal(theirs: u32) -> String {
    format!(
        "control protocol version {theirs} is not supported: this VM speaks {PROTOCOL_VERSION} and accepts {} to {} (a VMM started by a build two versions older must be migrated or restarted, not driven)",
        PROTOCOL_VERSION.saturating_sub(1),
        PROTOCOL_VERSION + 1
    )
}

/// Serves the requests of one connection with `handle`.
fn serve_with(mut s: UnixStream, handle: &mut dyn FnMut(Op) -> Response) {
    let _ = s.set_nonblocking(false);
    let _ = s.set_read_timeout(Some(IO_TIMEOUT));
    let _ = s.set_write_timeout(Some(IO_TIMEOUT));
    loop {
        let msg = match read_message(&mut s) {
            Ok(Some(m)) => m,
            Ok(None) => return,
            Err(e) => {
                let r = Response::Error {
                    message: format!("bad request: {e}"),
                };
                reply(&mut s, &r);
                return;
            }
        };
        let resp = match postcard::from_bytes::<Request>(&msg) {
            Ok(req) if !accepts(PROTOCOL_VERSION, req.version) => Response::Error {
                message: version_refusal(req.version),
            },
            Ok(req) => handle(req.op),
            Err(e) => Response::Error {
                message: format!("request does not decode: {e}"),
            },
        };
        if !reply(&mut s, &resp) {
            return;
        }
    }
}

fn reply(s: &mut UnixStream, r: &Response) -> bool {
    match postcard::to_allocvec(r) {
        Ok(b) => write_message(s, &b).is_ok(),
        Err(_) => false,
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Sends one request of protocol `version` through a real socket to `serve_with`
    /// and returns the answer.
    fn ask(version: u32) -> Response {
        let (mut client, server) = UnixStream::pair().unwrap();
        let t = std::thread::spawn(move || {
            serve_with(server, &mut |op| match op {
                Op::Pause => Response::Ok,
                other => Response::Error {
                    message: format!("unexpected {other:?}"),
                },
            })
        });
        let req = Request {
            version,
            op: Op::Pause,
        };
        write_message(&mut client, &postcard::to_allocvec(&req).unwrap()).unwrap();
        let reply = read_message(&mut client).unwrap().unwrap();
        drop(client);
        t.join().unwrap();
        postcard::from_bytes(&reply).unwrap()
    }

    /// Rolling upgrade: a client one version older or newer is served; two apart is
    /// refused with both versions named.
    #[test]
    fn adjacent_versions_are_served_and_two_apart_refused() {
        let n = PROTOCOL_VERSION;
        for v in [n - 1, n, n + 1] {
            assert_eq!(ask(v), Response::Ok, "client at {v}, server at {n}");
        }
        for v in [n - 2, n + 2] {
            match ask(v) {
                Response::Error { message } => assert!(
                    message.contains(&format!(
                        "control protocol version {v} is not supported: this VM speaks {n}"
                    )),
                    "{message}"
                ),
                other => panic!("client at {v} was served: {other:?}"),
            }
        }
    }

    #[test]
    fn this_build_speaks_the_current_version_unless_built_as_the_previous() {
        let prev = option_env!("TWINRUN_PROTO_PREV") == Some("1");
        let want = if prev {
            crate::PROTOCOL_CURRENT - 1
        } else {
            crate::PROTOCOL_CURRENT
        };
        assert_eq!(PROTOCOL_VERSION, want);
    }
}
