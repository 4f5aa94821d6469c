//! The kv network: a VM namespace with a TAP bridged to a veth whose peer sits in a
//! client namespace (the topology of tests/common/net.rs and scripts/demo.sh, which
//! are not a library, so the few `ip` commands are repeated here).
//!
//! ```text
//!  netns <p>-vm                                  netns <p>-cl
//!  [twinrun] -- <p>t (TAP) --+
//!                             <p>b (bridge, 10.77.0.3/24 for the host baseline)
//!                 <p>v (veth) +----- veth pair ----- <p>c  10.77.0.1/24
//!  guest 10.77.0.2/24 on the TAP's wire
//! ```
//!
//! Dropping [`KvNet`] deletes both namespaces and so every interface in them.
//!
//! Also the two ends of one TCP connection between namespaces ([`tcp_receiver`],
//! [`tcp_sender`]), for the raw transfer figures of `ft-net` and `mirror`.

use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::thread::JoinHandle;
use std::time::Duration;

use twinrun::demo::client::enter_netns;

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("cannot run `ip` (install iproute2): {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "`ip {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// A network namespace, deleted on drop.
pub struct NetNs {
    pub name: String,
}

impl NetNs {
    pub fn new(name: &str) -> Result<NetNs, String> {
        ip(&["netns", "add", name])?;
        let ns = NetNs { name: name.into() };
        ip(&["-n", name, "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// `program` run inside the namespace (`ip netns exec` execs it, so the child's
    /// pid is the program's).
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, program]);
        c
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        if let Err(e) = ip(&["netns", "del", &self.name]) {
            eprintln!("warning: {e}");
        }
    }
}

pub struct KvNet {
    pub tap: String,
    pub guest_ip: &'static str,
    /// On the bridge in the VM namespace: where the host baseline server listens, so
    /// its clients cross the same veth and bridge as the guest's.
    pub host_ip: &'static str,
    pub vm_ns: NetNs,
    pub client_ns: NetNs,
}

impl KvNet {
    pub fn new() -> Result<KvNet, String> {
        let p = format!("tb{}", std::process::id() % 100_000);
        let vm_ns = NetNs::new(&format!("{p}-vm"))?;
        let client_ns = NetNs::new(&format!("{p}-cl"))?;
        let (tap, br, veth, peer) = (
            format!("{p}t"),
            format!("{p}b"),
            format!("{p}v"),
            format!("{p}c"),
        );
        let vm = vm_ns.name.as_str();
        let cl = client_ns.name.as_str();
        ip(&[
            "-n", vm, "tuntap", "add", "dev", &tap, "mode", "tap", "vnet_hdr",
        ])?;
        ip(&["-n", vm, "link", "add", &br, "type", "bridge"])?;
        ip(&[
            "-n", vm, "link", "add", &veth, "type", "veth", "peer", "name", &peer, "netns", cl,
        ])?;
        ip(&["-n", vm, "link", "set", &tap, "master", &br])?;
        ip(&["-n", vm, "link", "set", &veth, "master", &br])?;
        for dev in [&tap, &br, &veth] {
            ip(&["-n", vm, "link", "set", dev, "up"])?;
        }
        ip(&["-n", vm, "addr", "add", "10.77.0.3/24", "dev", &br])?;
        ip(&["-n", cl, "addr", "add", "10.77.0.1/24", "dev", &peer])?;
        ip(&["-n", cl, "link", "set", &peer, "up"])?;
        Ok(KvNet {
            tap,
            guest_ip: "10.77.0.2",
            host_ip: "10.77.0.3",
            vm_ns,
            client_ns,
        })
    }
}

/// A thread in `ns` (`None`: this namespace) listening on `ip`: it accepts one
/// connection, gives it a 10 s read timeout and hands it to `serve`. Returns once the
/// listener is bound (10 s at most), with its address.
pub fn tcp_receiver<T: Send + 'static>(
    ns: Option<String>,
    ip: IpAddr,
    serve: impl FnOnce(TcpStream) -> Result<T, String> + Send + 'static,
) -> Result<(SocketAddr, JoinHandle<Result<T, String>>), String> {
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<SocketAddr, String>>();
    let rx = std::thread::spawn(move || -> Result<T, String> {
        let setup = (|| {
            if let Some(ns) = &ns {
                enter_netns(ns).map_err(|e| format!("setns {ns}: {e}"))?;
            }
            let l = TcpListener::bind((ip, 0)).map_err(|e| format!("bind {ip}: {e}"))?;
            let a = l.local_addr().map_err(|e| e.to_string())?;
            Ok::<_, String>((l, a))
        })();
        let l = match setup {
            Ok((l, a)) => {
                let _ = ready_tx.send(Ok(a));
                l
            }
            Err(e) => {
                let _ = ready_tx.send(Err(e.clone()));
                return Err(e);
            }
        };
        let (s, _) = l.accept().map_err(|e| format!("accept: {e}"))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .map_err(|e| e.to_string())?;
        serve(s)
    });
    let addr = ready_rx
        .recv_timeout(Duration::from_secs(10))
        .map_err(|_| "the TCP receiver did not start".to_string())??;
    Ok((addr, rx))
}

/// A thread in `ns` (`None`: this namespace) that connects to `addr` (5 s), gives the
/// connection a 10 s write timeout and hands it to `send`.
pub fn tcp_sender(
    ns: Option<String>,
    addr: SocketAddr,
    send: impl FnOnce(TcpStream) -> Result<(), String> + Send + 'static,
) -> JoinHandle<Result<(), String>> {
    std::thread::spawn(move || -> Result<(), String> {
        if let Some(ns) = &ns {
            enter_netns(ns).map_err(|e| format!("setns {ns}: {e}"))?;
        }
        let s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
            .map_err(|e| format!("connect {addr}: {e}"))?;
        s.set_write_timeout(Some(Duration::from_secs(10)))
            .map_err(|e| e.to_string())?;
        send(s)
    })
}

/// Waits for both ends; the sender's error first (the receiver's is then usually
/// only its consequence).
pub fn tcp_join<T>(
    tx: JoinHandle<Result<(), String>>,
    rx: JoinHandle<Result<T, String>>,
) -> Result<T, String> {
    let sent = tx.join().map_err(|_| "TCP sender panicked".to_string())?;
    let got = rx.join().map_err(|_| "TCP receiver panicked".to_string())?;
    sent?;
    got
}
