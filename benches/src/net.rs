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

use std::process::Command;

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
