//! One end of an FT pair as a `twinrun vm run --role ...` process in its PM's
//! namespace of a [`Topology`], the files both ends share, and waiting on what its
//! control socket reports (role, protection, failover, links, disks): the tests ask
//! the status, not the log.
//!
//! Both VMs use the same MAC and guest address (the standby's copy only runs after a
//! failover, when it announces the MAC on its own port); each end is named after its
//! PM (`<topology prefix>-pm<n>`) unless the test names it (`--name`), and serves its
//! control socket in the test process's private run directory.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use twinrun_control::FtStatus;
use twinrun_lab::console::tail;
use twinrun_lab::{Proc, Topology};

use super::{guest_elf, private_dirs, twinrun_bin};

pub const DISK_BYTES: u64 = 8 << 20;

/// The workload flags of [`Pm::spawn`].
pub const DEFAULT_WORKLOAD: &[&str] = &[
    "--mem-mib",
    "64",
    "--workload",
    "kv,counter,dirty,disk",
    "--counter-rate",
    "500",
    "--dirty-pages",
    "512",
    "--dirty-rate",
    "20000",
    "--disk-rate",
    "200",
    "--disk-flush-every",
    "1",
];

/// Files of one FT pair.
pub struct PairFiles {
    pub dir: PathBuf,
    pub console: PathBuf,
    pub secret: PathBuf,
    pub disks: [PathBuf; 2],
}

impl PairFiles {
    /// Fresh disk images (the standby's a copy of the primary's), secret, console path.
    pub fn new(dir: &Path) -> PairFiles {
        let disks = [dir.join("pm1.img"), dir.join("pm2.img")];
        File::create(&disks[0])
            .unwrap()
            .set_len(DISK_BYTES)
            .unwrap();
        std::fs::copy(&disks[0], &disks[1]).unwrap();
        let secret = dir.join("secret");
        std::fs::write(&secret, b"ft-failover-test-cluster-secret-0123456789\n").unwrap();
        PairFiles {
            dir: dir.to_path_buf(),
            console: dir.join("console.log"),
            secret,
            disks,
        }
    }
}

/// A-Link heartbeat interval for the pair: `FT_HEARTBEAT_MS`, default 50 (the CLI's).
pub fn heartbeat_ms() -> String {
    std::env::var("FT_HEARTBEAT_MS").unwrap_or_else(|_| "50".into())
}

/// One PM's `twinrun vm run --role ...` process. SIGKILLed and reaped on drop.
pub struct Pm {
    proc: Proc,
    pub role: &'static str,
    /// The VM name its control socket answers to.
    pub name: String,
    pub stderr_path: PathBuf,
}

impl Pm {
    /// Starts PM `i` (0 = primary on pm1, 1 = standby on pm2).
    pub fn spawn(topo: &Topology, files: &PairFiles, i: usize, extra: &[&str]) -> Pm {
        Self::spawn_with(topo, files, i, DEFAULT_WORKLOAD, extra)
    }

    /// [`Pm::spawn`] with other workload flags than [`DEFAULT_WORKLOAD`].
    pub fn spawn_with(
        topo: &Topology,
        files: &PairFiles,
        i: usize,
        workload: &[&str],
        extra: &[&str],
    ) -> Pm {
        let role = if i == 0 { "primary" } else { "standby" };
        Self::spawn_as(topo, files, i, role, workload, extra)
    }

    /// PM `i` in `role` (e.g. the old primary's PM restarted as the standby).
    pub fn spawn_as(
        topo: &Topology,
        files: &PairFiles,
        i: usize,
        role: &'static str,
        workload: &[&str],
        extra: &[&str],
    ) -> Pm {
        // The control sockets go to this test process's run directory.
        private_dirs();
        let stderr_path = if (i == 0) == (role == "primary") {
            files.dir.join(format!("{role}.stderr"))
        } else {
            files.dir.join(format!("{role}-pm{}.stderr", i + 1))
        };
        let named = extra.iter().position(|a| *a == "--name");
        let name = match named.and_then(|p| extra.get(p + 1)) {
            Some(n) => n.to_string(),
            None => format!("{}-pm{}", topo.prefix, i + 1),
        };
        let mut cmd = topo.pms[i].ns.command(twinrun_bin());
        cmd.args(["vm", "run", "--role", role])
            .args(topo.alink_args(i))
            .arg("--cluster-secret-file")
            .arg(&files.secret)
            // 8 misses, not the CLI's 4: these tests check what failover preserves, not
            // how fast a silent link is noticed (SIGKILL closes the sockets at once), and
            // the suite runs beside other VMs on 2 cores where a 200 ms window is tight.
            .args(["--heartbeat-ms", &heartbeat_ms(), "--heartbeat-misses", "8"])
            .arg("--guest")
            .arg(guest_elf())
            .args(workload)
            .arg("--disk")
            .arg(format!("{},serial=ftdisk", files.disks[i].display()))
            .args(topo.vm_net_args(i))
            .arg("--console")
            .arg(format!("file:{}", files.console.display()))
            .args(extra)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or("info".into()),
            );
        if named.is_none() {
            cmd.args(["--name", &name]);
        }
        let proc = Proc::spawn_logged(role, &mut cmd, &stderr_path)
            .unwrap_or_else(|e| panic!("spawn twinrun: {e}"));
        Pm {
            proc,
            role,
            name,
            stderr_path,
        }
    }

    pub fn stderr(&self) -> String {
        self.proc.log()
    }

    /// The last `n` lines of its log.
    pub fn tail(&self, n: usize) -> String {
        tail(&self.stderr(), n)
    }

    /// Still running?
    pub fn alive(&mut self) -> bool {
        self.proc.alive()
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self) {
        self.proc.kill();
    }

    /// Sends `sig` (SIGSTOP, SIGCONT, ...).
    pub fn proc_signal(&self, sig: nix::sys::signal::Signal) {
        self.proc
            .signal(sig)
            .unwrap_or_else(|e| panic!("signal {sig} to the {}: {e}", self.role));
    }

    /// Waits up to `timeout` for it to exit; its exit code (None: still running, or
    /// killed by a signal).
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        self.proc.wait_timeout(timeout).and_then(|s| s.code())
    }

    /// What its control socket says now (`None` while it does not answer).
    pub fn status(&self) -> Option<FtStatus> {
        twinrun_control::ft_status(&twinrun_control::paths::control_socket(&self.name))
    }

    /// What its control socket says now; panics (with its log) if it does not answer.
    pub fn status_now(&self) -> FtStatus {
        self.status().unwrap_or_else(|| {
            panic!(
                "the {} ({}) does not answer on its control socket\n{}",
                self.role,
                self.name,
                self.tail(40)
            )
        })
    }

    /// Waits until its status satisfies `done` (checked every 5 ms); the time it took,
    /// or an error with the last status and its log when it exits or `timeout` passes.
    pub fn wait_status(
        &mut self,
        what: &str,
        timeout: Duration,
        done: impl Fn(&FtStatus) -> bool,
    ) -> Result<Duration, String> {
        self.wait_until(what, timeout, |pm| {
            let st = pm.status();
            (st.as_ref().is_some_and(&done), format!("status {st:?}"))
        })
    }

    /// Waits until its log contains `needle`, for what only the log says (checking the
    /// process is alive).
    pub fn wait_log(&mut self, needle: &str, timeout: Duration) -> Result<Duration, String> {
        self.wait_until(&format!("logging {needle:?}"), timeout, |pm| {
            (pm.stderr().contains(needle), String::new())
        })
    }

    /// Polls `check` (done?, what to say if not) every 5 ms while the process runs.
    fn wait_until(
        &mut self,
        what: &str,
        timeout: Duration,
        check: impl Fn(&Pm) -> (bool, String),
    ) -> Result<Duration, String> {
        let t0 = Instant::now();
        loop {
            let (done, seen) = check(self);
            if done {
                return Ok(t0.elapsed());
            }
            let gone = !self.alive();
            if gone || t0.elapsed() > timeout {
                return Err(format!(
                    "the {} {} {what}; {seen}; stderr:\n{}",
                    self.role,
                    if gone {
                        "exited before".to_string()
                    } else {
                        format!("was not done within {timeout:?}:")
                    },
                    self.tail(40)
                ));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

/// Listening for a primary: its A-Link is up and waiting.
pub fn listening(s: &FtStatus) -> bool {
    s.session >= 1
}

/// Protected: a standby committed a checkpoint of the current session.
pub fn protected(s: &FtStatus) -> bool {
    s.state == twinrun_control::FtState::Protected
}

/// Took over from a lost primary.
pub fn failed_over(s: &FtStatus) -> bool {
    s.failover.is_some()
}

/// One of its disks runs degraded (no standby in sync).
pub fn degraded(s: &FtStatus) -> bool {
    s.disks.iter().any(|d| d.kind == "degraded")
}

/// One of its local disks failed.
pub fn disk_failed(s: &FtStatus) -> bool {
    s.disks.iter().any(|d| d.failed)
}

/// Starts an FT pair: the standby (PM 1, `standby_args`) until it listens, then the
/// primary (PM 0, `primary_args`) until it reports protection and the guest's kv server
/// listens. Returns (primary, standby).
pub fn start_protected(
    topo: &Topology,
    files: &PairFiles,
    primary_args: &[&str],
    standby_args: &[&str],
) -> (Pm, Pm) {
    let mut standby = Pm::spawn(topo, files, 1, standby_args);
    standby
        .wait_status("listening", Duration::from_secs(30), listening)
        .unwrap_or_else(|e| panic!("{e}"));
    let mut primary = Pm::spawn(topo, files, 0, primary_args);
    primary
        .wait_status("protected", Duration::from_secs(60), protected)
        .unwrap_or_else(|e| panic!("{e}\nstandby:\n{}", standby.tail(30)));
    wait_console(
        &files.console,
        "KV listening",
        Duration::from_secs(60),
        &mut primary,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    (primary, standby)
}

/// Waits for the console line starting with `prefix`, as long as `pm` runs.
pub fn wait_console(
    path: &Path,
    prefix: &str,
    timeout: Duration,
    pm: &mut Pm,
) -> Result<(), String> {
    let mut log = twinrun_lab::console::ConsoleLog::new(path);
    log.wait_while(timeout, |l| l.starts_with(prefix), || pm.alive())
        .map(|_| ())
        .map_err(|e| format!("{e}\n{} stderr:\n{}", pm.role, pm.tail(40)))
}

/// A running pair: `pms[i]` runs on PM i (PM 0 starts as the primary). Fields drop in
/// order: processes, then the namespaces, then the files.
pub struct RunningPair {
    pub pms: [Pm; 2],
    pub topo: Topology,
    pub files: PairFiles,
    _dir: tempfile::TempDir,
}

impl RunningPair {
    /// [`start_protected`] with `extra` on both ends, in a fresh topology and directory.
    pub fn launch(extra: &[&str]) -> RunningPair {
        let dir = tempfile::tempdir().unwrap();
        let topo = super::topology(Topology::builder());
        let files = PairFiles::new(dir.path());
        let (primary, standby) = start_protected(&topo, &files, extra, extra);
        RunningPair {
            pms: [primary, standby],
            topo,
            files,
            _dir: dir,
        }
    }

    /// The last `n` lines of both ends' stderr.
    pub fn tails(&self, n: usize) -> String {
        format!(
            "--- pm1 stderr:\n{}\n--- pm2 stderr:\n{}",
            self.pms[0].tail(n),
            self.pms[1].tail(n)
        )
    }

    /// A RESP client on ONE connection to the guest, from the client namespace.
    pub fn client(&self) -> twinrun_lab::kvload::LoadClient {
        let addr =
            std::net::SocketAddr::from((self.topo.guest_ip(), twinrun_lab::topology::KV_PORT));
        twinrun_lab::kvload::LoadClient::start(twinrun_lab::kvload::LoadConfig::new(
            self.topo.client_ns(),
            addr,
        ))
        .unwrap()
    }

    /// PM `i`'s VMM control socket.
    pub fn socket(&self, i: usize) -> PathBuf {
        twinrun_control::socket_of(&self.pms[i].name).unwrap()
    }
}
