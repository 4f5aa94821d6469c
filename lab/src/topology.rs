//! PMs as network namespaces: the pair topology of the demo, the FT tests and the
//! benchmarks, built from a few options.
//!
//! ```text
//!  <p>-p1 (PM1)                                                         <p>-p2 (PM2)
//!   <p>a0 10.N.1.1 ================ A-Link 0 ================= <p>z0 10.N.1.2
//!   <p>a1 10.N.2.1 ================ A-Link 1 ================= <p>z1 10.N.2.2
//!   TAP <p>t1 -+- bridge <p>b1                             TAP <p>t2 -+- bridge <p>b2
//!              +- <p>u1 ----+                                         +- <p>u2 ---+
//!   <p>m1 10.N.200.1 --+    |        <p>-sw (switch)                <p>m2 ---+    |
//!                      |    +- <p>l1 -+- LAN bridge <p>L -+- <p>l2 -----------|----+
//!                      |              +- <p>lc            |                   |
//!                      +------ <p>n1 -+- mgmt bridge <p>M -+- <p>n2 -----------+
//!                                     +- <p>x1  +- <p>x2
//!  <p>-cl (client)                       |          |
//!   <p>c 10.N.0.1 ---- (LAN)     <p>-w1: <p>w1 10.N.200.10    <p>-w2: <p>w2 10.N.200.11
//!
//!  guest (either PM's VM, same MAC 02:00:00:NN:00:02): 10.N.0.2/24 on the LAN
//! ```
//!
//! Every topology has PM1, the switch namespace with the LAN bridge, and a client on
//! the LAN; by default also PM2 and two A-Links (veth pairs on distinct subnets). The
//! witnesses (the quorum service's hosts) and the management network that reaches
//! them are options, as is an address for each PM's own stack on the LAN (the host
//! baseline of the benchmarks). `N` is derived from the prefix, so concurrent
//! topologies rarely share addresses (they are in separate namespaces anyway).
//!
//! A TAP is created persistent before any VMM starts, so that it is bridged first; the
//! VMM, run in its PM's namespace, opens it by name. A TAP nobody has open has no
//! carrier: a standby's TAP takes no part in the LAN until its VM opens it.
//!
//! Dropping a [`Topology`] deletes every namespace it made, and so every interface in
//! them (kill the processes inside first: declare them after the topology). If the
//! test process is killed instead (no destructor runs), the topology's
//! [`Reaper`] kills every process in its namespaces and deletes them.

use std::net::{Ipv4Addr, SocketAddr};

use crate::ip::{add_addr, add_bridge, add_tap, add_veth, enslave, set_up};
use crate::netns::NetNs;
use crate::reaper::Reaper;
use crate::LabError;

/// TCP port of every A-Link on the listening (standby's) side.
pub const ALINK_PORT: u16 = 7440;
/// Where the guest's kv server listens.
pub const KV_PORT: u16 = 6379;

/// Third octet of the management network.
const MGMT_SUBNET: u8 = 200;
/// At most this many A-Links (one digit in their interface names).
const MAX_ALINKS: usize = 10;
/// At most this many witnesses.
const MAX_WITNESSES: usize = 8;
/// Interface names are `<prefix>` + at most 3 bytes, within Linux's 15.
const MAX_PREFIX: usize = 12;

/// One PM: its namespace and its interfaces.
#[derive(Debug)]
pub struct PmNet {
    pub ns: NetNs,
    /// The TAP the PM's VMM opens, on the PM's local bridge.
    pub tap: String,
    pub bridge: String,
    /// The PM's uplink to the LAN (on its local bridge) and the LAN-side port of it.
    pub uplink: String,
    pub lan_port: String,
    /// PM1's or PM2's end of each A-Link.
    pub alink_ifs: Vec<String>,
    /// The PM's management interface and its port on the management bridge.
    pub mgmt: Option<(String, String)>,
    /// The PM's own address on the LAN (on its local bridge), if asked for.
    pub host_ip: Option<Ipv4Addr>,
}

/// A host on a bridge of the switch: the client, a witness.
#[derive(Debug)]
pub struct Host {
    pub ns: NetNs,
    /// Its interface, and that interface's port on the bridge.
    pub ifname: String,
    pub port: String,
    pub ip: Ipv4Addr,
}

/// The namespaces and interfaces of one topology (see the module's picture).
#[derive(Debug)]
pub struct Topology {
    pub prefix: String,
    /// Second octet of every address.
    pub net: u8,
    // Fields drop in declaration order: the PMs, the witnesses, the client, the switch.
    pub pms: Vec<PmNet>,
    pub witnesses: Vec<Host>,
    pub client: Host,
    /// The switch namespace: the LAN bridge and the management bridge.
    pub switch: NetNs,
    pub lan_bridge: String,
    pub mgmt_bridge: Option<String>,
    /// Cleans up the namespaces (and every process in them) if the test process is
    /// killed before this drops; last, so it is told to quit after the rest dropped.
    pub reaper: Reaper,
}

/// Options of a [`Topology`].
#[derive(Clone, Debug)]
pub struct Builder {
    prefix: Option<String>,
    pms: usize,
    alinks: usize,
    witnesses: usize,
    management: bool,
    host_addrs: bool,
}

impl Default for Builder {
    fn default() -> Self {
        Builder {
            prefix: None,
            pms: 2,
            alinks: 2,
            witnesses: 0,
            management: false,
            host_addrs: false,
        }
    }
}

impl Builder {
    /// Names start with `prefix` (1 to 12 ASCII letters or digits); default
    /// [`crate::unique_prefix`]`("tw")`.
    pub fn prefix(mut self, prefix: &str) -> Self {
        self.prefix = Some(prefix.to_string());
        self
    }

    /// One PM and the client, no A-Link: a VM alone on a LAN.
    pub fn single(mut self) -> Self {
        self.pms = 1;
        self.alinks = 0;
        self
    }

    /// `n` A-Links between the two PMs (default 2).
    pub fn alinks(mut self, n: usize) -> Self {
        self.alinks = n;
        self
    }

    /// `n` witness hosts on the management network (1: the witness, 2: and an
    /// alternate witness); implies [`Builder::management`].
    pub fn witnesses(mut self, n: usize) -> Self {
        self.witnesses = n;
        self.management = n > 0 || self.management;
        self
    }

    /// A management network joining the PMs (and the witnesses), apart from the LAN
    /// and the A-Links.
    pub fn management(mut self) -> Self {
        self.management = true;
        self
    }

    /// An address for each PM's own stack on the LAN (10.N.0.3 for PM1, .4 for PM2),
    /// on its local bridge: what a host-side baseline server listens on.
    pub fn host_addrs(mut self) -> Self {
        self.host_addrs = true;
        self
    }

    pub fn build(self) -> Result<Topology, LabError> {
        let p = self.prefix.unwrap_or_else(|| crate::unique_prefix("tw"));
        if p.is_empty() || p.len() > MAX_PREFIX || !p.bytes().all(|b| b.is_ascii_alphanumeric()) {
            return Err(LabError::Invalid(format!(
                "topology prefix {p:?}: 1 to {MAX_PREFIX} ASCII letters or digits"
            )));
        }
        if self.alinks > MAX_ALINKS || self.witnesses > MAX_WITNESSES {
            return Err(LabError::Invalid(format!(
                "at most {MAX_ALINKS} A-Links and {MAX_WITNESSES} witnesses"
            )));
        }
        if self.pms == 1 && self.alinks > 0 {
            return Err(LabError::Invalid("A-Links need two PMs".into()));
        }
        let net = 100 + (twinrun_guest_abi::fnv1a64(p.as_bytes()) % 128) as u8;
        // Before the first namespace: a test killed while building leaves nothing.
        let reaper = Reaper::start()?;
        reaper.namespaces_starting(&format!("{p}-"))?;
        let switch = NetNs::new(&format!("{p}-sw"))?;
        let sw = switch.name().to_string();
        let lan_bridge = format!("{p}L");
        add_bridge(&sw, &lan_bridge)?;
        let mgmt_bridge = if self.management {
            let b = format!("{p}M");
            add_bridge(&sw, &b)?;
            Some(b)
        } else {
            None
        };
        let mut pms = Vec::with_capacity(self.pms);
        for i in 0..self.pms {
            let n = i + 1;
            let ns = NetNs::new(&format!("{p}-p{n}"))?;
            let host_ip = self.host_addrs.then(|| lan_ip(net, 3 + i as u8));
            let mut pm = attach_pm(ns, &p, n, &sw, &lan_bridge, host_ip)?;
            if let Some(mb) = &mgmt_bridge {
                let (ifname, port) = (format!("{p}m{n}"), format!("{p}n{n}"));
                let mgmt = Bridge {
                    switch: &sw,
                    name: mb,
                };
                mgmt.attach(pm.ns.name(), &ifname, &port, mgmt_ip_of(net, i as u8 + 1))?;
                pm.mgmt = Some((ifname, port));
            }
            pms.push(pm);
        }
        for k in 0..self.alinks {
            let (a, z) = (format!("{p}a{k}"), format!("{p}z{k}"));
            let (n1, n2) = (pms[0].ns.name(), pms[1].ns.name());
            add_veth(n1, &a, n2, &z)?;
            let (x, y) = alink_ips(net, k);
            add_addr(n1, &a, &format!("{x}/24"))?;
            add_addr(n2, &z, &format!("{y}/24"))?;
            pms[0].alink_ifs.push(a);
            pms[1].alink_ifs.push(z);
        }
        let lan = Bridge {
            switch: &sw,
            name: &lan_bridge,
        };
        let client = lan.host(
            &format!("{p}-cl"),
            &format!("{p}c"),
            &format!("{p}lc"),
            lan_ip(net, 1),
        )?;
        let mut witnesses = Vec::with_capacity(self.witnesses);
        if let Some(mb) = &mgmt_bridge {
            let mgmt = Bridge {
                switch: &sw,
                name: mb,
            };
            for j in 0..self.witnesses {
                let w = j + 1;
                witnesses.push(mgmt.host(
                    &format!("{p}-w{w}"),
                    &format!("{p}w{w}"),
                    &format!("{p}x{w}"),
                    mgmt_ip_of(net, 10 + j as u8),
                )?);
            }
        }
        Ok(Topology {
            prefix: p,
            net,
            pms,
            witnesses,
            client,
            switch,
            lan_bridge,
            mgmt_bridge,
            reaper,
        })
    }
}

fn lan_ip(net: u8, host: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, net, 0, host)
}

fn mgmt_ip_of(net: u8, host: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, net, MGMT_SUBNET, host)
}

/// PM1's and PM2's address on A-Link `k`.
fn alink_ips(net: u8, k: usize) -> (Ipv4Addr, Ipv4Addr) {
    let s = k as u8 + 1;
    (Ipv4Addr::new(10, net, s, 1), Ipv4Addr::new(10, net, s, 2))
}

/// A bridge of the switch namespace.
#[derive(Clone, Copy)]
struct Bridge<'a> {
    switch: &'a str,
    name: &'a str,
}

impl Bridge<'_> {
    /// Joins `ifname` in namespace `ns` to this bridge through a veth pair whose
    /// switch end is `port`, with address `ip`/24.
    fn attach(self, ns: &str, ifname: &str, port: &str, ip: Ipv4Addr) -> Result<(), LabError> {
        add_veth(ns, ifname, self.switch, port)?;
        enslave(self.switch, port, self.name)?;
        add_addr(ns, ifname, &format!("{ip}/24"))
    }

    /// A host namespace `ns` on this bridge.
    fn host(self, ns: &str, ifname: &str, port: &str, ip: Ipv4Addr) -> Result<Host, LabError> {
        let ns = NetNs::new(ns)?;
        self.attach(ns.name(), ifname, port, ip)?;
        Ok(Host {
            ns,
            ifname: ifname.to_string(),
            port: port.to_string(),
            ip,
        })
    }
}

/// PM `n` (1 or 2): its TAP and its uplink to the LAN on a local bridge.
fn attach_pm(
    ns: NetNs,
    p: &str,
    n: usize,
    switch: &str,
    lan_bridge: &str,
    host_ip: Option<Ipv4Addr>,
) -> Result<PmNet, LabError> {
    let (tap, bridge, uplink, lan_port) = (
        format!("{p}t{n}"),
        format!("{p}b{n}"),
        format!("{p}u{n}"),
        format!("{p}l{n}"),
    );
    let name = ns.name();
    add_tap(name, &tap)?;
    add_bridge(name, &bridge)?;
    add_veth(name, &uplink, switch, &lan_port)?;
    enslave(name, &tap, &bridge)?;
    enslave(name, &uplink, &bridge)?;
    enslave(switch, &lan_port, lan_bridge)?;
    if let Some(ip) = host_ip {
        add_addr(name, &bridge, &format!("{ip}/24"))?;
    }
    Ok(PmNet {
        ns,
        tap,
        bridge,
        uplink,
        lan_port,
        alink_ifs: Vec::new(),
        mgmt: None,
        host_ip,
    })
}

impl Topology {
    /// Options, starting from the default pair topology (two PMs, two A-Links, a
    /// client).
    pub fn builder() -> Builder {
        Builder::default()
    }

    /// The default pair topology with names starting with `prefix`.
    pub fn create(prefix: &str) -> Result<Topology, LabError> {
        Topology::builder().prefix(prefix).build()
    }

    fn pm(&self, i: usize) -> Result<&PmNet, LabError> {
        self.pms
            .get(i)
            .ok_or_else(|| LabError::Invalid(format!("the topology has no PM {}", i + 1)))
    }

    /// Namespace of PM `i` (0: PM1, 1: PM2). Panics if there is no such PM.
    pub fn pm_ns(&self, i: usize) -> &str {
        self.pms[i].ns.name()
    }

    /// TAP of PM `i`. Panics if there is no such PM.
    pub fn tap(&self, i: usize) -> &str {
        &self.pms[i].tap
    }

    pub fn client_ns(&self) -> &str {
        self.client.ns.name()
    }

    pub fn switch_ns(&self) -> &str {
        self.switch.name()
    }

    /// Number of A-Links.
    pub fn alinks(&self) -> usize {
        self.pms.first().map_or(0, |p| p.alink_ifs.len())
    }

    /// The guest's address on the LAN (either PM's VM: they are one VM).
    pub fn guest_ip(&self) -> Ipv4Addr {
        lan_ip(self.net, 2)
    }

    pub fn client_ip(&self) -> Ipv4Addr {
        self.client.ip
    }

    /// `--kv-addr` of the guest.
    pub fn guest_cidr(&self) -> String {
        format!("{}/24", self.guest_ip())
    }

    /// The guest's MAC (the same on both PMs).
    pub fn guest_mac(&self) -> String {
        format!("02:00:00:{:02x}:00:02", self.net)
    }

    /// `--net` and `--kv-addr` of the guest on PM `i`.
    pub fn vm_net_args(&self, i: usize) -> Vec<String> {
        vec![
            "--net".into(),
            format!("{},{}", self.tap(i), self.guest_mac()),
            "--kv-addr".into(),
            self.guest_cidr(),
        ]
    }

    /// PM `i`'s own address on the LAN ([`Builder::host_addrs`]).
    pub fn host_ip(&self, i: usize) -> Option<Ipv4Addr> {
        self.pms.get(i).and_then(|p| p.host_ip)
    }

    /// A-Link `k`'s two ends (PM1's, PM2's), port [`ALINK_PORT`].
    pub fn alink(&self, k: usize) -> (SocketAddr, SocketAddr) {
        let (a, b) = alink_ips(self.net, k);
        (
            SocketAddr::from((a, ALINK_PORT)),
            SocketAddr::from((b, ALINK_PORT)),
        )
    }

    /// PM `i`'s end of A-Link `k`.
    pub fn alink_addr(&self, i: usize, k: usize) -> SocketAddr {
        let (a, b) = self.alink(k);
        if i == 0 {
            a
        } else {
            b
        }
    }

    /// `--alink LOCAL,PEER` flags of PM `i`, one per link.
    pub fn alink_args(&self, i: usize) -> Vec<String> {
        (0..self.alinks())
            .flat_map(|k| {
                [
                    "--alink".to_string(),
                    format!("{},{}", self.alink_addr(i, k), self.alink_addr(1 - i, k)),
                ]
            })
            .collect()
    }

    /// Sets PM `i`'s end of A-Link `k` down or up (the other end loses its carrier).
    pub fn set_alink(&self, i: usize, k: usize, up: bool) -> Result<(), LabError> {
        let pm = self.pm(i)?;
        let dev = pm
            .alink_ifs
            .get(k)
            .ok_or_else(|| LabError::Invalid(format!("no A-Link {k}")))?;
        set_up(pm.ns.name(), dev, up)
    }

    /// Sets PM `i`'s uplink to the LAN down or up.
    pub fn set_lan(&self, i: usize, up: bool) -> Result<(), LabError> {
        let pm = self.pm(i)?;
        set_up(pm.ns.name(), &pm.uplink, up)
    }

    /// PM `i`'s address on the management network.
    pub fn mgmt_ip(&self, i: usize) -> Option<Ipv4Addr> {
        self.mgmt_bridge
            .as_ref()
            .filter(|_| i < self.pms.len())
            .map(|_| mgmt_ip_of(self.net, i as u8 + 1))
    }

    /// Sets PM `i`'s management interface down or up.
    pub fn set_mgmt(&self, i: usize, up: bool) -> Result<(), LabError> {
        let pm = self.pm(i)?;
        let (dev, _) = pm
            .mgmt
            .as_ref()
            .ok_or_else(|| LabError::Invalid("no management network".into()))?;
        set_up(pm.ns.name(), dev, up)
    }

    /// Witness `j` (0: the witness, 1: the alternate one).
    pub fn witness(&self, j: usize) -> Result<&Host, LabError> {
        self.witnesses
            .get(j)
            .ok_or_else(|| LabError::Invalid(format!("the topology has no witness {j}")))
    }

    /// Sets witness `j`'s interface down or up (it drops off the management network).
    pub fn set_witness(&self, j: usize, up: bool) -> Result<(), LabError> {
        let w = self.witness(j)?;
        set_up(w.ns.name(), &w.ifname, up)
    }

    /// Bytes sent so far on A-Link `k` by PM `i`.
    pub fn alink_tx_bytes(&self, i: usize, k: usize) -> Result<u64, LabError> {
        let pm = self.pm(i)?;
        let dev = pm
            .alink_ifs
            .get(k)
            .ok_or_else(|| LabError::Invalid(format!("no A-Link {k}")))?;
        tx_bytes(pm.ns.name(), dev)
    }
}

/// Bytes sent so far by interface `dev` of namespace `ns` (its own `/sys`, as
/// `ip netns exec` mounts it).
pub fn tx_bytes(ns: &str, dev: &str) -> Result<u64, LabError> {
    let path = format!("/sys/class/net/{dev}/statistics/tx_bytes");
    let out = crate::netns::command_in(ns, "cat")
        .arg(&path)
        .output()
        .map_err(LabError::io(format!("reading {path} in {ns}")))?;
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .map_err(|_| LabError::Command {
            cmd: format!("cat {path} in {ns}"),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
}
