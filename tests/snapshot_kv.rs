//! A `redis-cli` connection held open across snapshot, SIGKILL of the VMM and
//! `twinrun snapshot restore` (issue 3, Verify: "a `redis-cli` connection held open
//! across the save/kill/restore still works").
//!
//! One real `redis-cli` process runs in the client namespace of the kv topology
//! (`common/net.rs`). With no command arguments it runs its REPL, which also works with
//! a pipe as stdin: it connects once at start, reads one line at a time and prints each
//! reply (raw, one line for the simple replies used here) as soon as it arrives. So the
//! test writes a command, reads its reply, and so on, over ONE TCP connection. The REPL
//! silently reconnects (and re-sends) after an I/O error, so "the connection still
//! works" is checked with `ss`: the client's only connection to the guest keeps its
//! source port from the first command to the last, and redis-cli printed no error.
//!
//! TCP and restore: the snapshot holds the guest's TCP state (smoltcp in guest memory)
//! as of the snapshot; the client's kernel keeps its own. They agree only if nothing
//! moved on the connection between the snapshot and the kill. The main test keeps it
//! so (commands only before the snapshot; the connection idle until after the
//! restore), which is the strictly valid case. The second test sends a SET after the
//! snapshot, which the old guest acknowledges and the restored guest has never seen:
//! its sequence numbers then disagree with the client's, and that test records what
//! happens to the held connection rather than asserting that it works (it asserts
//! only what must hold: the restored store is the snapshot's, seen from a new
//! connection). Output commit (a later issue) is what removes this window for
//! checkpoints: replies leave only once the state that produced them is safe.
mod common;

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Output, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::time::{Duration, Instant};

use common::{guest_elf, require_kvm, require_tool, twinrun_bin, unique_prefix, ConsoleLog, KvNet};
use twinrun::control::{self, Op, Response};

const MAC: &str = "02:00:00:77:01:02";

/// Per-test run and state directories (control sockets, snapshots) plus logs; removed
/// on drop.
struct Dirs {
    tmp: tempfile::TempDir,
}

impl Dirs {
    fn new() -> Self {
        Dirs {
            tmp: tempfile::tempdir().expect("temp dir"),
        }
    }
    fn path(&self) -> &Path {
        self.tmp.path()
    }
    fn run(&self) -> PathBuf {
        self.path().join("run")
    }
    fn state(&self) -> PathBuf {
        self.path().join("state")
    }
    /// `twinrun` (in namespace `ns` if given) with this test's directories.
    fn twinrun(&self, ns: Option<&str>) -> Command {
        let mut c = match ns {
            // `ip netns exec` execs, so the child's pid is twinrun's and the
            // environment set here reaches it.
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(twinrun_bin());
                c
            }
            None => Command::new(twinrun_bin()),
        };
        c.env("TWINRUN_RUN_DIR", self.run())
            .env("TWINRUN_STATE_DIR", self.state())
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or("info".into()),
            );
        c
    }
}

fn text(o: &Output) -> String {
    format!(
        "status {}; stdout {:?}; stderr {:?}",
        o.status,
        String::from_utf8_lossy(&o.stdout).trim(),
        String::from_utf8_lossy(&o.stderr).trim()
    )
}

/// A VMM process (`vm run` or `snapshot restore`) with its console in a file; SIGKILLed
/// and reaped on drop if still running.
struct Vmm {
    child: Option<Child>,
    console: ConsoleLog,
    stderr: PathBuf,
    sock: PathBuf,
}

impl Vmm {
    fn spawn(dirs: &Dirs, ns: &str, name: &str, args: &[String], tag: &str) -> Vmm {
        let console = dirs.path().join(format!("{tag}.console"));
        let stderr = dirs.path().join(format!("{tag}.stderr"));
        let child = dirs
            .twinrun(Some(ns))
            .args(args)
            .arg("--console")
            .arg(format!("file:{}", console.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&stderr).expect("stderr file"))
            .spawn()
            .expect("spawn twinrun");
        Vmm {
            child: Some(child),
            console: ConsoleLog::new(&console),
            stderr,
            sock: dirs.run().join(format!("{name}.sock")),
        }
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// Waits until the control socket answers a status request from this process.
    fn wait_control(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        let pid = self.child.as_ref().map_or(0, Child::id);
        loop {
            if let Ok(Response::Status { pid: p, .. }) =
                control::call(&self.sock, Op::Status, Duration::from_secs(5))
            {
                if p == pid {
                    return;
                }
            }
            if let Some(Ok(Some(s))) = self.child.as_mut().map(Child::try_wait) {
                panic!("twinrun exited ({s}) early; stderr:\n{}", self.stderr());
            }
            assert!(
                Instant::now() < deadline,
                "no control socket answer from {}; stderr:\n{}",
                self.sock.display(),
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn sigkill(&mut self) {
        let mut c = self.child.take().expect("running");
        c.kill().expect("SIGKILL the VMM");
        let s = c.wait().expect("reap the VMM");
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&s),
            Some(libc::SIGKILL),
            "{s}"
        );
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// One long-lived `redis-cli` REPL in the client namespace; killed on drop.
struct RedisCli {
    child: Child,
    stdin: ChildStdin,
    replies: Receiver<String>,
    stderr: PathBuf,
}

impl RedisCli {
    fn spawn(net: &KvNet, dir: &Path, tag: &str) -> Self {
        let stderr = dir.join(format!("{tag}.redis-cli.stderr"));
        let mut child = net
            .client_ns
            .command("redis-cli")
            .args(["-h", &net.guest_ip, "-p", "6379"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(File::create(&stderr).expect("stderr file"))
            .spawn()
            .expect("spawn redis-cli");
        let stdin = child.stdin.take().expect("piped stdin");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, replies) = mpsc::channel();
        // A reader thread, so a reply that never comes is a timeout, not a hang. It
        // ends when redis-cli's stdout closes (redis-cli killed on drop).
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        RedisCli {
            child,
            stdin,
            replies,
            stderr,
        }
    }

    /// Sends one command line; its (one-line) reply, or `None` after `timeout`.
    fn try_cmd(&mut self, line: &str, timeout: Duration) -> Option<String> {
        writeln!(self.stdin, "{line}").expect("write to redis-cli");
        self.stdin.flush().expect("flush redis-cli stdin");
        self.replies.recv_timeout(timeout).ok()
    }

    fn cmd(&mut self, line: &str) -> String {
        self.try_cmd(line, Duration::from_secs(20))
            .unwrap_or_else(|| {
                panic!(
                    "no reply to {line:?} within 20 s; redis-cli stderr: {:?}",
                    self.stderr_text()
                )
            })
            .trim()
            .to_string()
    }

    fn stderr_text(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }
}

impl Drop for RedisCli {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The client namespace's TCP connections to the guest's port 6379 as
/// `(state, local address, ss details)`.
fn conns_to_guest(net: &KvNet) -> Vec<(String, String, String)> {
    let o = net
        .client_ns
        .command("ss")
        .args(["-Htani"])
        .output()
        .expect("run ss (iproute2)");
    assert!(o.status.success(), "ss: {}", text(&o));
    let peer = format!("{}:6379", net.guest_ip);
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    // With -i the details are on the line after each socket.
    let lines: Vec<&str> = out.lines().collect();
    let mut found = Vec::new();
    for (i, l) in lines.iter().enumerate() {
        let f: Vec<&str> = l.split_whitespace().collect();
        if f.len() >= 5 && f[4] == peer {
            let details = lines
                .get(i + 1)
                .filter(|d| d.starts_with(char::is_whitespace))
                .map_or(String::new(), |d| d.trim().to_string());
            found.push((f[0].to_string(), f[3].to_string(), details));
        }
    }
    found
}

/// The local address of the client's only established connection to the guest.
fn only_connection(net: &KvNet) -> String {
    let c = conns_to_guest(net);
    assert!(
        c.len() == 1 && c[0].0 == "ESTAB",
        "expected one established connection to the guest: {c:?}"
    );
    c[0].1.clone()
}

fn ping(net: &KvNet) {
    let o = net
        .client_ns
        .command("ping")
        .args(["-c", "3", "-i", "0.2", "-W", "2", &net.guest_ip])
        .output()
        .expect("run ping");
    assert!(o.status.success(), "ping the restored guest: {}", text(&o));
}

/// A fresh one-shot `redis-cli` (a new connection).
fn redis_once(net: &KvNet, args: &[&str]) -> String {
    let o = net
        .client_ns
        .command("redis-cli")
        .args(["-h", &net.guest_ip, "-p", "6379"])
        .args(args)
        .output()
        .expect("run redis-cli");
    assert!(o.status.success(), "redis-cli {args:?}: {}", text(&o));
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

/// Boots the kv workload named `name` in the VM namespace and waits for it to listen.
fn boot_kv(dirs: &Dirs, net: &KvNet, name: &str) -> Vmm {
    let mut args: Vec<String> = ["vm", "run", "--name", name, "--guest"]
        .map(String::from)
        .into();
    args.push(guest_elf().display().to_string());
    args.extend(["--mem-mib", "64", "--workload", "kv"].map(String::from));
    args.extend(net.vm_args(MAC));
    let mut vm = Vmm::spawn(dirs, &net.vm_ns.name, name, &args, "orig");
    // The control socket answers once the VM runs (and an early exit fails fast).
    vm.wait_control();
    let l = vm
        .console
        .wait_for(Duration::from_secs(60), |l| l.starts_with("KV listening"));
    let l = l.unwrap_or_else(|e| panic!("{e}\nstderr:\n{}", vm.stderr()));
    assert_eq!(l, format!("KV listening {}:6379", net.guest_ip));
    vm
}

fn snapshot_create(dirs: &Dirs, name: &str) {
    let o = dirs
        .twinrun(None)
        .args(["snapshot", "create", name])
        .output()
        .expect("run twinrun snapshot create");
    assert!(o.status.success(), "snapshot create: {}", text(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("generation 1 (full)"), "{out}");
}

/// `twinrun snapshot restore <name> 1` in the VM namespace: same VM name (its stale
/// control socket is replaced), and the snapshot's config attaches the same TAP by
/// name with the same MAC.
fn restore(dirs: &Dirs, net: &KvNet, name: &str) -> Vmm {
    let args: Vec<String> = ["snapshot", "restore", name, "1"].map(String::from).into();
    let mut vm = Vmm::spawn(dirs, &net.vm_ns.name, name, &args, "restored");
    vm.wait_control();
    assert!(
        vm.stderr().contains("restored VM"),
        "stderr:\n{}",
        vm.stderr()
    );
    vm
}

fn vm_name() -> String {
    // unique_prefix is unique among concurrently running test processes and tests.
    format!("skv{}", unique_prefix())
}

#[test]
fn redis_cli_connection_held_across_snapshot_sigkill_restore() {
    require_kvm();
    require_tool("redis-cli", "redis-tools");
    require_tool("ping", "iputils-ping");
    require_tool("ss", "iproute2");
    // Drop order is the reverse of declaration: redis-cli, then the VMMs, then the
    // namespaces, then the directories.
    let dirs = Dirs::new();
    let net = KvNet::new();
    let name = vm_name();
    let mut vm = boot_kv(&dirs, &net, &name);

    let mut cli = RedisCli::spawn(&net, dirs.path(), "held");
    assert_eq!(cli.cmd("PING"), "PONG");
    let port = only_connection(&net);
    let keys = [
        ("alpha", "one"),
        ("beta", "two two"),
        ("gamma", "3333333333"),
    ];
    for (k, v) in keys {
        assert_eq!(cli.cmd(&format!("SET {k} \"{v}\"")), "OK");
    }
    assert_eq!(cli.cmd("INCR n"), "1");
    // Let the client's (possibly delayed) ACK of the last reply reach the guest, so the
    // snapshot does not hold that reply as unacknowledged. (Had it, the restored guest
    // would retransmit it and the client would drop it as a duplicate: valid TCP, but
    // the plain case is clearer.)
    std::thread::sleep(Duration::from_millis(500));
    let before = conns_to_guest(&net);
    snapshot_create(&dirs, &name);
    // From here until after the restore nothing is sent on the held connection: the
    // client's TCP state stays exactly what the snapshot's guest state expects.
    vm.sigkill();
    drop(vm);
    assert_eq!(
        only_connection(&net),
        port,
        "the client's connection outlives the VMM"
    );

    let _restored = restore(&dirs, &net, &name);
    for (k, v) in keys {
        assert_eq!(cli.cmd(&format!("GET {k}")), v, "key {k} after restore");
    }
    assert_eq!(cli.cmd("INCR n"), "2");
    assert_eq!(cli.cmd("SET after restored"), "OK");
    assert_eq!(cli.cmd("GET after"), "restored");
    assert_eq!(cli.cmd("DBSIZE"), "5");
    let after = conns_to_guest(&net);
    assert_eq!(
        only_connection(&net),
        port,
        "redis-cli kept its one connection (same source port); before {before:?}, after {after:?}"
    );
    // The restored guest's TCP state matches the client's exactly, so the connection
    // carries on (same port, replies above). Whether the client also had to retransmit
    // a request once is timing, not correctness: on a loaded machine the restored
    // guest can take longer than the client's 200 ms RTO to answer its first request.
    if after[0].2.contains("retrans:") {
        eprintln!("note: the client retransmitted on the held connection: {after:?}");
    }
    let err = cli.stderr_text();
    assert!(
        err.trim().is_empty(),
        "redis-cli reported an error: {err:?}"
    );
    eprintln!("held connection {port}: before snapshot {before:?}; after restore {after:?}");

    // The restored VM answers ARP and ping.
    ping(&net);
    // And a second, new connection sees the same store.
    assert_eq!(redis_once(&net, &["GET", "beta"]), "two two");
}

/// Traffic after the snapshot: the restored guest's TCP state is behind the client's.
/// Records what the held connection does; asserts only the store's rollback.
#[test]
fn traffic_after_snapshot_rolls_back_and_desynchronises_the_held_connection() {
    require_kvm();
    require_tool("redis-cli", "redis-tools");
    require_tool("ss", "iproute2");
    let dirs = Dirs::new();
    let net = KvNet::new();
    let name = vm_name();
    let mut vm = boot_kv(&dirs, &net, &name);

    let mut cli = RedisCli::spawn(&net, dirs.path(), "held");
    assert_eq!(cli.cmd("SET kept before"), "OK");
    std::thread::sleep(Duration::from_millis(500));
    let port = only_connection(&net);
    snapshot_create(&dirs, &name);
    // Acknowledged by the running guest after the snapshot: lost by design, since the
    // restore goes back to the snapshot's state.
    assert_eq!(cli.cmd("SET lost after"), "OK");
    std::thread::sleep(Duration::from_millis(200));
    vm.sigkill();
    drop(vm);

    let _restored = restore(&dirs, &net, &name);
    // The held connection: the client's next sequence number is past the restored
    // guest's receive point, and the client acknowledges a reply ("+OK") the restored
    // guest never sent.
    let t = Instant::now();
    let reply = cli.try_cmd("GET kept", Duration::from_secs(10));
    let waited = t.elapsed();
    let conns = conns_to_guest(&net);
    eprintln!(
        "held connection {port} after a post-snapshot SET and restore: reply {reply:?} after \
         {waited:?}; connections {conns:?}; redis-cli stderr {:?}",
        cli.stderr_text()
    );
    drop(cli);

    // What must hold regardless: a new connection sees the snapshot's store, without
    // the post-snapshot key.
    assert_eq!(redis_once(&net, &["GET", "kept"]), "before");
    assert_eq!(redis_once(&net, &["EXISTS", "lost"]), "0");
}
