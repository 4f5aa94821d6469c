//! Two network namespaces joined by N veth pairs (one subnet per pair), removed on drop
//! (also when a test panics). Shared by the netns tests and the throughput example.

#![allow(dead_code)]

use std::fs::File;
use std::net::{Ipv4Addr, SocketAddr};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

static COUNTER: AtomicU32 = AtomicU32::new(0);

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("ip {args:?}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "ip {args:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(())
}

/// Whether this process can create namespaces (root with `ip`).
pub fn available() -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    root && Command::new("ip").arg("-V").output().is_ok()
}

pub struct NetnsPair {
    pub ns: [String; 2],
    /// veth names: veths[link][side].
    pub veths: Vec<[String; 2]>,
    /// Addresses: addrs[link][side].
    pub addrs: Vec<[Ipv4Addr; 2]>,
}

impl NetnsPair {
    pub fn new(links: usize) -> Result<NetnsPair, String> {
        let id = std::process::id() % 10000;
        let k = COUNTER.fetch_add(1, Ordering::Relaxed) % 100;
        let ns = [format!("tal{id}n{k}a"), format!("tal{id}n{k}b")];
        let mut p = NetnsPair {
            ns: ns.clone(),
            veths: Vec::new(),
            addrs: Vec::new(),
        };
        // From here on Drop cleans up whatever was made.
        ip(&["netns", "add", &ns[0]])?;
        ip(&["netns", "add", &ns[1]])?;
        for n in &ns {
            ip(&["-n", n, "link", "set", "lo", "up"])?;
        }
        for l in 0..links {
            // "tl" + 4 + 2 + 1 + 1 + 1 <= 15 bytes.
            let v = [format!("tl{id}{k}l{l}a"), format!("tl{id}{k}l{l}b")];
            ip(&["link", "add", &v[0], "type", "veth", "peer", "name", &v[1]])?;
            p.veths.push(v.clone());
            let sub = 100 + l as u8;
            let a = [
                Ipv4Addr::new(10, 201, sub, 1),
                Ipv4Addr::new(10, 201, sub, 2),
            ];
            for side in 0..2 {
                ip(&["link", "set", &v[side], "netns", &ns[side]])?;
                ip(&[
                    "-n",
                    &ns[side],
                    "addr",
                    "add",
                    &format!("{}/24", a[side]),
                    "dev",
                    &v[side],
                ])?;
                ip(&["-n", &ns[side], "link", "set", &v[side], "up"])?;
            }
            p.addrs.push(a);
        }
        Ok(p)
    }

    pub fn addr(&self, link: usize, side: usize, port: u16) -> SocketAddr {
        SocketAddr::new(self.addrs[link][side].into(), port)
    }

    /// Takes a link down or up from side 0 (both directions stop: the peer loses carrier).
    pub fn set_link(&self, link: usize, up: bool) -> Result<(), String> {
        ip(&[
            "-n",
            &self.ns[0],
            "link",
            "set",
            &self.veths[link][0],
            if up { "up" } else { "down" },
        ])
    }

    /// Runs `f` on a new thread inside namespace `side`. Threads and sockets that `f`
    /// creates stay in that namespace.
    pub fn run_in<T: Send + 'static>(
        &self,
        side: usize,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> std::thread::JoinHandle<T> {
        let path = format!("/var/run/netns/{}", self.ns[side]);
        std::thread::spawn(move || {
            let file = File::open(&path).expect("open netns");
            nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
            f()
        })
    }
}

impl Drop for NetnsPair {
    fn drop(&mut self) {
        // Deleting a namespace destroys the veths inside it.
        for n in &self.ns {
            let _ = ip(&["netns", "del", n]);
        }
        // A veth that never made it into a namespace is still in ours.
        for v in &self.veths {
            let _ = Command::new("ip")
                .args(["link", "del", &v[0]])
                .stderr(std::process::Stdio::null())
                .status();
        }
    }
}
