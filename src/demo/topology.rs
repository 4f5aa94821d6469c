//! The network of the FT demo (and of process-level failover tests), made of network
//! namespaces on one machine, removed on drop:
//!
//! ```text
//!  netns <p>-pm1                         netns <p>-pm2
//!   <p>a1 10.<x>.1.1 ===== A-Link 1 ===== <p>A1 10.<x>.1.2
//!   <p>a2 10.<x>.2.1 ===== A-Link 2 ===== <p>A2 10.<x>.2.2
//!   TAP <p>t1 -+- bridge <p>b1            TAP <p>t2 -+- bridge <p>b2
//!              +- <p>u1                              +- <p>u2
//!                   |      netns <p>-lan                   |
//!                   +---- <p>l1 -+- bridge <p>br -+- <p>l2 +
//!                                +- <p>lc
//!                                    |       netns <p>-cl
//!                                    +------ <p>c 10.<x>.0.1/24  (client)
//!  guest (either PM's VM, same MAC): 10.<x>.0.2/24
//! ```
//!
//! Each PM's VMM runs inside its namespace (`ip netns exec`) and opens its TAP there by
//! name. A TAP nobody has open has no carrier, so the standby's TAP takes no part in
//! the LAN until the standby's VM opens it at failover (and announces the MAC).

use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::process::Command;

/// TCP port of each A-Link on the standby's side.
pub const ALINK_PORT: u16 = 7440;

/// The namespaces and interfaces of one demo network.
pub struct Topology {
    pub prefix: String,
    /// Second octet of every address (distinct per topology, from the prefix).
    pub net: u8,
    pub pm1_ns: String,
    pub pm2_ns: String,
    pub lan_ns: String,
    pub client_ns: String,
    /// TAP of PM1's and PM2's VMM.
    pub pm1_tap: String,
    pub pm2_tap: String,
    /// Created namespaces (deleted on drop; deleting one removes its interfaces).
    created: Vec<String>,
}

/// Runs `ip <args>`; an error carries its stderr.
pub fn ip(args: &[&str]) -> io::Result<()> {
    let out = Command::new("ip").args(args).output()?;
    if out.status.success() {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "`ip {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

impl Topology {
    /// Builds the whole network. `prefix` must be at most 8 bytes (interface names
    /// are `<prefix>` + 3 bytes within Linux's 15).
    pub fn create(prefix: &str) -> io::Result<Topology> {
        if prefix.is_empty()
            || prefix.len() > 8
            || !prefix.bytes().all(|b| b.is_ascii_alphanumeric())
        {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "topology prefix: 1 to 8 ASCII letters or digits",
            ));
        }
        let p = prefix;
        // 10.100.x.x to 10.227.x.x, from the prefix: concurrent topologies rarely share
        // it, and they are in separate namespaces anyway.
        let net = 100 + (twinrun_guest_abi::fnv1a64(p.as_bytes()) % 128) as u8;
        let mut t = Topology {
            prefix: p.to_string(),
            net,
            pm1_ns: format!("{p}-pm1"),
            pm2_ns: format!("{p}-pm2"),
            lan_ns: format!("{p}-lan"),
            client_ns: format!("{p}-cl"),
            pm1_tap: format!("{p}t1"),
            pm2_tap: format!("{p}t2"),
            created: Vec::new(),
        };
        for ns in [&t.pm1_ns, &t.pm2_ns, &t.lan_ns, &t.client_ns].map(String::clone) {
            ip(&["netns", "add", &ns])?;
            t.created.push(ns.clone());
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        }
        let (pm1, pm2, lan, cl) = (&t.pm1_ns, &t.pm2_ns, &t.lan_ns, &t.client_ns);
        // Two A-Links, distinct subnets.
        for i in 1..=2u8 {
            let (a, b) = (format!("{p}a{i}"), format!("{p}A{i}"));
            ip(&[
                "-n", pm1, "link", "add", &a, "type", "veth", "peer", "name", &b, "netns", pm2,
            ])?;
            ip(&[
                "-n",
                pm1,
                "addr",
                "add",
                &format!("10.{net}.{i}.1/24"),
                "dev",
                &a,
            ])?;
            ip(&[
                "-n",
                pm2,
                "addr",
                "add",
                &format!("10.{net}.{i}.2/24"),
                "dev",
                &b,
            ])?;
            ip(&["-n", pm1, "link", "set", &a, "up"])?;
            ip(&["-n", pm2, "link", "set", &b, "up"])?;
        }
        // The LAN bridge.
        let br = format!("{p}br");
        ip(&["-n", lan, "link", "add", &br, "type", "bridge"])?;
        ip(&["-n", lan, "link", "set", &br, "up"])?;
        // Each PM: TAP + uplink veth on a local bridge; the uplink's peer on the LAN.
        for (i, ns, tap) in [(1, pm1, &t.pm1_tap), (2, pm2, &t.pm2_tap)] {
            let (b, u, l) = (format!("{p}b{i}"), format!("{p}u{i}"), format!("{p}l{i}"));
            ip(&[
                "-n", ns, "tuntap", "add", "dev", tap, "mode", "tap", "vnet_hdr",
            ])?;
            ip(&["-n", ns, "link", "add", &b, "type", "bridge"])?;
            ip(&[
                "-n", ns, "link", "add", &u, "type", "veth", "peer", "name", &l, "netns", lan,
            ])?;
            ip(&["-n", ns, "link", "set", tap, "master", &b])?;
            ip(&["-n", ns, "link", "set", &u, "master", &b])?;
            for d in [tap.as_str(), &b, &u] {
                ip(&["-n", ns, "link", "set", d, "up"])?;
            }
            ip(&["-n", lan, "link", "set", &l, "master", &br])?;
            ip(&["-n", lan, "link", "set", &l, "up"])?;
        }
        // The client.
        let (c, lc) = (format!("{p}c"), format!("{p}lc"));
        ip(&[
            "-n", cl, "link", "add", &c, "type", "veth", "peer", "name", &lc, "netns", lan,
        ])?;
        ip(&["-n", lan, "link", "set", &lc, "master", &br])?;
        ip(&["-n", lan, "link", "set", &lc, "up"])?;
        ip(&[
            "-n",
            cl,
            "addr",
            "add",
            &format!("{}/24", t.client_ip()),
            "dev",
            &c,
        ])?;
        ip(&["-n", cl, "link", "set", &c, "up"])?;
        Ok(t)
    }

    /// A-Link `i` (0 or 1) addresses: (PM1's end, PM2's end), port [`ALINK_PORT`].
    pub fn alink(&self, i: usize) -> (SocketAddr, SocketAddr) {
        let s = (i + 1) as u8;
        (
            SocketAddr::from((Ipv4Addr::new(10, self.net, s, 1), ALINK_PORT)),
            SocketAddr::from((Ipv4Addr::new(10, self.net, s, 2), ALINK_PORT)),
        )
    }

    /// `--alink` values for PM1 and PM2 (one per link, `LOCAL,PEER`).
    pub fn alink_args(&self) -> (Vec<String>, Vec<String>) {
        (0..2)
            .map(|i| {
                let (a, b) = self.alink(i);
                (format!("{a},{b}"), format!("{b},{a}"))
            })
            .unzip()
    }

    pub fn guest_ip(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, self.net, 0, 2)
    }

    pub fn client_ip(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, self.net, 0, 1)
    }

    /// `--kv-addr` of the guest.
    pub fn guest_cidr(&self) -> String {
        format!("{}/24", self.guest_ip())
    }

    /// The guest's MAC (the same on both PMs).
    pub fn guest_mac(&self) -> String {
        format!("02:00:00:{:02x}:00:02", self.net)
    }

    /// `/var/run/netns/<ns>` (what `setns` opens).
    pub fn netns_path(ns: &str) -> std::path::PathBuf {
        std::path::Path::new("/var/run/netns").join(ns)
    }

    /// A command run inside namespace `ns`.
    pub fn command_in(ns: &str, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", ns]).arg(program);
        c
    }

    /// Cuts A-Link `i` (0 or 1) by setting PM1's end down; `restore` brings it back.
    pub fn set_alink_up(&self, i: usize, up: bool) -> io::Result<()> {
        let dev = format!("{}a{}", self.prefix, i + 1);
        ip(&[
            "-n",
            &self.pm1_ns,
            "link",
            "set",
            &dev,
            if up { "up" } else { "down" },
        ])
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        for ns in self.created.drain(..).rev() {
            if let Err(e) = ip(&["netns", "del", &ns]) {
                log::warn!("cleanup: {e}");
            }
        }
    }
}
