//! A `redis-cli` connection held open across snapshot, SIGKILL of the VMM and
//! `twinrun snapshot restore` (issue 3, Verify: "a `redis-cli` connection held open
//! across the save/kill/restore still works").
//!
//! One real `redis-cli` process runs in the client namespace of a one-PM topology
//! (`twinrun_lab::Topology::builder().single()`). With no command arguments it runs its REPL, which also works with
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
use std::process::{ChildStdin, Command, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::time::{Duration, Instant};

use common::{
    output_text, require_kvm, require_tool, topology, twinrun_bin, unique_prefix, VmProcess, VmRun,
};
use twinrun_lab::{Proc, Topology};

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
    /// `twinrun` with this test's directories.
    fn twinrun(&self) -> Command {
        let mut c = Command::new(twinrun_bin());
        c.env("TWINRUN_RUN_DIR", self.run())
            .env("TWINRUN_STATE_DIR", self.state());
        c
    }

    /// A VMM (`vm run` or `snapshot restore` in `run`) in namespace `ns` with this
    /// test's directories, its files tagged `tag`.
    fn vm(&self, run: VmRun, ns: &str) -> VmProcess {
        run.in_netns(ns)
            .env("TWINRUN_RUN_DIR", self.run())
            .env("TWINRUN_STATE_DIR", self.state())
            .spawn()
    }
}

/// One long-lived `redis-cli` REPL in the client namespace; killed on drop.
struct RedisCli {
    // Field order is drop order: stdin closes, then the process is killed.
    stdin: ChildStdin,
    _proc: Proc,
    replies: Receiver<String>,
    stderr: PathBuf,
}

impl RedisCli {
    fn spawn(net: &Topology, dir: &Path, tag: &str) -> Self {
        let stderr = dir.join(format!("{tag}.redis-cli.stderr"));
        let mut cmd = net.client.ns.command("redis-cli");
        cmd.args(["-h", &net.guest_ip().to_string(), "-p", "6379"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(File::create(&stderr).expect("stderr file"));
        let mut proc = Proc::spawn("redis-cli", &mut cmd).expect("spawn redis-cli");
        let child = proc.child().expect("redis-cli runs");
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
            stdin,
            _proc: proc,
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

/// The client namespace's TCP connections to the guest's port 6379 as
/// `(state, local address, ss details)`.
fn conns_to_guest(net: &Topology) -> Vec<(String, String, String)> {
    let o = net
        .client
        .ns
        .command("ss")
        .args(["-Htani"])
        .output()
        .expect("run ss (iproute2)");
    assert!(o.status.success(), "ss: {}", output_text(&o));
    let peer = format!("{}:6379", net.guest_ip());
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
fn only_connection(net: &Topology) -> String {
    let c = conns_to_guest(net);
    assert!(
        c.len() == 1 && c[0].0 == "ESTAB",
        "expected one established connection to the guest: {c:?}"
    );
    c[0].1.clone()
}

fn ping(net: &Topology) {
    let o = net
        .client
        .ns
        .command("ping")
        .args([
            "-c",
            "3",
            "-i",
            "0.2",
            "-W",
            "2",
            &net.guest_ip().to_string(),
        ])
        .output()
        .expect("run ping");
    assert!(
        o.status.success(),
        "ping the restored guest: {}",
        output_text(&o)
    );
}

/// A fresh one-shot `redis-cli` (a new connection).
fn redis_once(net: &Topology, args: &[&str]) -> String {
    let o = net
        .client
        .ns
        .command("redis-cli")
        .args(["-h", &net.guest_ip().to_string(), "-p", "6379"])
        .args(args)
        .output()
        .expect("run redis-cli");
    assert!(
        o.status.success(),
        "redis-cli {args:?}: {}",
        output_text(&o)
    );
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

/// Boots the kv workload named `name` in the VM namespace and waits for it to listen.
fn boot_kv(dirs: &Dirs, net: &Topology, name: &str) -> VmProcess {
    let run = VmRun::new(dirs.path(), "orig")
        .args(["--name", name, "--mem-mib", "64", "--workload", "kv"])
        .args(net.vm_net_args(0));
    let mut vm = dirs.vm(run, net.pm_ns(0));
    // The control socket answers once the VM runs (and an early exit fails fast).
    vm.wait_control(&dirs.run().join(format!("{name}.sock")));
    let l = vm
        .console
        .wait_for(Duration::from_secs(60), |l| l.starts_with("KV listening"));
    let l = l.unwrap_or_else(|e| panic!("{e}\nstderr:\n{}", vm.stderr()));
    assert_eq!(l, format!("KV listening {}:6379", net.guest_ip()));
    vm
}

fn snapshot_create(dirs: &Dirs, name: &str) {
    let o = dirs
        .twinrun()
        .args(["snapshot", "create", name])
        .output()
        .expect("run twinrun snapshot create");
    assert!(o.status.success(), "snapshot create: {}", output_text(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("generation 1 (full)"), "{out}");
}

/// `twinrun snapshot restore <name> 1` in the VM namespace: same VM name (its stale
/// control socket is replaced), and the snapshot's config attaches the same TAP by
/// name with the same MAC.
fn restore(dirs: &Dirs, net: &Topology, name: &str) -> VmProcess {
    let run = VmRun::restore(dirs.path(), "restored", &[name, "1"]);
    let mut vm = dirs.vm(run, net.pm_ns(0));
    vm.wait_control(&dirs.run().join(format!("{name}.sock")));
    assert!(
        vm.stderr().contains("restored VM"),
        "stderr:\n{}",
        vm.stderr()
    );
    vm
}

fn vm_name() -> String {
    // unique_prefix is unique among concurrently running test processes and tests.
    format!("skv{}", unique_prefix("k"))
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
    let net = topology(Topology::builder().single());
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
    let net = topology(Topology::builder().single());
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
