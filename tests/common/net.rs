//! Network namespaces and the TAP/bridge/veth plumbing of the kv tests, as RAII guards.
//!
//! Topology (chosen so nothing is added to the root namespace):
//!
//! ```text
//!  netns <p>-vm                                  netns <p>-cl
//!  [twinrun] --fd-- <p>t (TAP) --+
//!                                 <p>b (bridge)
//!                     <p>v (veth) +----- veth pair ----- <p>c  10.77.0.1/24
//!  guest 10.77.0.2/24 on the TAP's wire
//! ```
//!
//! The TAP is created persistent by the harness before the VMM starts (so it can be
//! enslaved to the bridge first); the VMM, run in `<p>-vm` with `ip netns exec`, opens
//! it by name. Deleting the namespaces removes every interface in them.

use std::process::{Command, Output};

use super::unique_prefix;

/// Runs `ip <args>`, panicking with its stderr on failure.
pub fn ip(args: &[&str]) {
    let out = ip_output(args);
    assert!(
        out.status.success(),
        "`ip {}` failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
}

fn ip_output(args: &[&str]) -> Output {
    Command::new("ip")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run `ip` (install iproute2): {e}"))
}

/// A network namespace, deleted on drop.
pub struct NetNs {
    pub name: String,
}

impl NetNs {
    pub fn new(name: &str) -> Self {
        ip(&["netns", "add", name]);
        let ns = NetNs {
            name: name.to_string(),
        };
        ip(&["-n", name, "link", "set", "lo", "up"]);
        ns
    }

    /// A command run inside the namespace.
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, program]);
        c
    }

    pub fn exists(name: &str) -> bool {
        let out = ip_output(&["netns", "list"]);
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .any(|l| l.split_whitespace().next() == Some(name))
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let out = ip_output(&["netns", "del", &self.name]);
        if !out.status.success() && !std::thread::panicking() {
            eprintln!(
                "warning: deleting netns {}: {}",
                self.name,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
    }
}

/// The kv test network: a VM namespace with a TAP bridged to a veth whose peer is in a
/// client namespace. Dropping it deletes both namespaces and so every interface in
/// them (kill the VMM first: `VmProcess` declared after `KvNet` drops before it).
pub struct KvNet {
    pub tap: String,
    pub client_ip: String,
    pub guest_ip: String,
    pub prefix_len: u8,
    // Fields drop in declaration order: vm namespace, then client.
    pub vm_ns: NetNs,
    pub client_ns: NetNs,
}

impl KvNet {
    pub fn new() -> Self {
        let p = unique_prefix();
        let vm_ns = NetNs::new(&format!("{p}-vm"));
        let client_ns = NetNs::new(&format!("{p}-cl"));
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
        ]);
        ip(&["-n", vm, "link", "add", &br, "type", "bridge"]);
        ip(&[
            "-n", vm, "link", "add", &veth, "type", "veth", "peer", "name", &peer, "netns", cl,
        ]);
        ip(&["-n", vm, "link", "set", &tap, "master", &br]);
        ip(&["-n", vm, "link", "set", &veth, "master", &br]);
        for dev in [&tap, &br, &veth] {
            ip(&["-n", vm, "link", "set", dev, "up"]);
        }
        ip(&["-n", cl, "addr", "add", "10.77.0.1/24", "dev", &peer]);
        ip(&["-n", cl, "link", "set", &peer, "up"]);
        KvNet {
            tap,
            client_ip: "10.77.0.1".into(),
            guest_ip: "10.77.0.2".into(),
            prefix_len: 24,
            vm_ns,
            client_ns,
        }
    }

    /// `--net` and kv flags for a VM on this network.
    pub fn vm_args(&self, mac: &str) -> Vec<String> {
        vec![
            "--net".into(),
            format!("{},{mac}", self.tap),
            "--kv-addr".into(),
            format!("{}/{}", self.guest_ip, self.prefix_len),
        ]
    }
}

impl Default for KvNet {
    fn default() -> Self {
        Self::new()
    }
}
