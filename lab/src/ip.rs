//! Running iproute2's `ip`, and the few link operations every topology is made of.

use std::process::{Command, Output};

use crate::LabError;

/// Runs `ip <args>`; an error carries its stderr.
pub fn ip(args: &[&str]) -> Result<(), LabError> {
    let out = ip_output(args)?;
    if out.status.success() {
        Ok(())
    } else {
        Err(LabError::Command {
            cmd: format!("ip {}", args.join(" ")),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

/// Runs `ip <args>` and returns what it printed, whatever its exit status.
pub fn ip_output(args: &[&str]) -> Result<Output, LabError> {
    Command::new("ip")
        .args(args)
        .output()
        .map_err(LabError::io("cannot run `ip` (install iproute2)"))
}

/// A TAP device `name` in namespace `ns`, persistent (it outlives the descriptor of
/// whoever opens it, so it can be bridged before the VMM starts), with a virtio-net
/// header.
pub fn add_tap(ns: &str, name: &str) -> Result<(), LabError> {
    ip(&[
        "-n", ns, "tuntap", "add", "dev", name, "mode", "tap", "vnet_hdr",
    ])
}

/// A bridge `name` in namespace `ns`, up.
pub fn add_bridge(ns: &str, name: &str) -> Result<(), LabError> {
    ip(&["-n", ns, "link", "add", name, "type", "bridge"])?;
    set_up(ns, name, true)
}

/// A veth pair: `a` in namespace `ns_a`, `b` in namespace `ns_b` (both down).
pub fn add_veth(ns_a: &str, a: &str, ns_b: &str, b: &str) -> Result<(), LabError> {
    ip(&[
        "-n", ns_a, "link", "add", a, "type", "veth", "peer", "name", b, "netns", ns_b,
    ])
}

/// Puts `dev` of namespace `ns` on bridge `bridge` and sets it up.
pub fn enslave(ns: &str, dev: &str, bridge: &str) -> Result<(), LabError> {
    ip(&["-n", ns, "link", "set", dev, "master", bridge])?;
    set_up(ns, dev, true)
}

/// Sets `dev` of namespace `ns` up or down (a veth's peer then loses its carrier too).
pub fn set_up(ns: &str, dev: &str, up: bool) -> Result<(), LabError> {
    ip(&["-n", ns, "link", "set", dev, if up { "up" } else { "down" }])
}

/// Adds address `cidr` (e.g. `10.1.2.3/24`) to `dev` of namespace `ns` and sets it up.
pub fn add_addr(ns: &str, dev: &str, cidr: &str) -> Result<(), LabError> {
    ip(&["-n", ns, "addr", "add", cidr, "dev", dev])?;
    set_up(ns, dev, true)
}
