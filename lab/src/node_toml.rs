//! One node's `twinrund` configuration (node.toml), rendered in one place for the demo,
//! node's tests and anything else that starts daemons on the lab: what differs between
//! them (addresses, paths, the supervision limits, TLS, a quorum table) is a field,
//! the file's layout is written once here.

use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use crate::topology::Topology;

/// The settings of one node's file. `render` writes them in node.toml's layout.
#[derive(Clone, Debug)]
pub struct NodeToml {
    pub cluster: String,
    /// This node's name and its peer's.
    pub node: String,
    pub peer: String,
    /// The node's own directory: `state` and `run` below it.
    pub dir: PathBuf,
    pub secret_file: PathBuf,
    pub tokens_file: PathBuf,
    pub twinrun_bin: PathBuf,
    pub guest_elf: PathBuf,
    /// This node's API and cluster-link listen addresses, and the peer's.
    pub api: SocketAddr,
    pub link: SocketAddr,
    pub peer_api: SocketAddr,
    pub peer_link: SocketAddr,
    /// A-Links: (local, peer) address pairs, and the first port of their range.
    pub alinks: Vec<(IpAddr, IpAddr)>,
    pub port_base: u16,
    /// `[network]`: the bridge VM TAPs join, and their name prefix.
    pub network: Option<(String, String)>,
    pub max_restart: u32,
    pub restart_window_s: Option<u64>,
    pub boot_grace_ms: u64,
    /// `[api]`'s TLS certificate and key.
    pub tls: Option<(PathBuf, PathBuf)>,
    /// Further tables, appended as they are (a `[quorum]` table, say).
    pub extra: String,
}

impl NodeToml {
    /// Node `i` (`pm{i+1}`) of a lab topology with a management network: the API and
    /// the cluster link on its management address at `api_port` / `link_port`, every
    /// A-Link of the topology, VM TAPs on its LAN bridge with `tap_prefix`. The paths
    /// and limits are the caller's to set.
    #[allow(clippy::too_many_arguments)]
    pub fn on_topology(
        topo: &Topology,
        i: usize,
        cluster: &str,
        dir: PathBuf,
        api_port: u16,
        link_port: u16,
        tap_prefix: &str,
    ) -> Option<NodeToml> {
        let me = IpAddr::V4(topo.mgmt_ip(i)?);
        let peer = IpAddr::V4(topo.mgmt_ip(1 - i)?);
        Some(NodeToml {
            cluster: cluster.to_string(),
            node: format!("pm{}", i + 1),
            peer: format!("pm{}", 2 - i),
            secret_file: dir.join("secret"),
            tokens_file: dir.join("tokens"),
            dir,
            twinrun_bin: PathBuf::new(),
            guest_elf: PathBuf::new(),
            api: SocketAddr::new(me, api_port),
            link: SocketAddr::new(me, link_port),
            peer_api: SocketAddr::new(peer, api_port),
            peer_link: SocketAddr::new(peer, link_port),
            alinks: (0..topo.alinks())
                .map(|k| (topo.alink_addr(i, k).ip(), topo.alink_addr(1 - i, k).ip()))
                .collect(),
            port_base: 7500,
            network: Some((topo.pms[i].bridge.clone(), tap_prefix.to_string())),
            max_restart: 2,
            restart_window_s: None,
            boot_grace_ms: 1500,
            tls: None,
            extra: String::new(),
        })
    }

    /// The file's text.
    pub fn render(&self) -> String {
        let links: Vec<String> = self
            .alinks
            .iter()
            .map(|(l, p)| format!("{{ local = \"{l}\", peer = \"{p}\" }}"))
            .collect();
        let mut t = String::new();
        // Writing to a String cannot fail.
        let _ = write!(
            t,
            r#"cluster = "{cluster}"
node = "{node}"
secret_file = "{secret}"
state_dir = "{dir}/state"
run_dir = "{dir}/run"
twinrun_bin = "{bin}"
guest_elf = "{guest}"

[api]
listen = "{api}"
tokens_file = "{tokens}"
"#,
            cluster = self.cluster,
            node = self.node,
            secret = self.secret_file.display(),
            dir = self.dir.display(),
            bin = self.twinrun_bin.display(),
            guest = self.guest_elf.display(),
            api = self.api,
            tokens = self.tokens_file.display(),
        );
        if let Some((cert, key)) = &self.tls {
            let _ = writeln!(
                t,
                "tls_cert = \"{}\"\ntls_key = \"{}\"",
                cert.display(),
                key.display()
            );
        }
        let _ = write!(
            t,
            r#"
[cluster_link]
listen = "{link}"
heartbeat_ms = 100
peer_timeout_ms = 1000

[peer]
name = "{peer}"
addr = "{peer_link}"
api = "{peer_api}"

[alink]
links = [{links}]
port_base = {base}
"#,
            link = self.link,
            peer = self.peer,
            peer_link = self.peer_link,
            peer_api = self.peer_api,
            links = links.join(", "),
            base = self.port_base,
        );
        if let Some((bridge, prefix)) = &self.network {
            let _ = write!(
                t,
                "\n[network]\nbridge = \"{bridge}\"\ntap_prefix = \"{prefix}\"\n"
            );
        }
        let _ = write!(t, "\n[supervision]\nmax_restart = {}\n", self.max_restart);
        if let Some(w) = self.restart_window_s {
            let _ = writeln!(t, "restart_window_s = {w}");
        }
        let _ = write!(
            t,
            "boot_grace_ms = {}\nscope = \"never\"\n{}\n",
            self.boot_grace_ms, self.extra
        );
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn optional_tables_appear_only_when_set() {
        let ip: IpAddr = "127.0.0.1".parse().unwrap_or_else(|e| panic!("{e}"));
        let mut n = NodeToml {
            cluster: "c".into(),
            node: "pm1".into(),
            peer: "pm2".into(),
            dir: "/d".into(),
            secret_file: "/d/secret".into(),
            tokens_file: "/d/tokens".into(),
            twinrun_bin: "/bin/twinrun".into(),
            guest_elf: "/g".into(),
            api: SocketAddr::new(ip, 1),
            link: SocketAddr::new(ip, 2),
            peer_api: SocketAddr::new(ip, 3),
            peer_link: SocketAddr::new(ip, 4),
            alinks: vec![(ip, ip)],
            port_base: 7000,
            network: None,
            max_restart: 2,
            restart_window_s: None,
            boot_grace_ms: 1500,
            tls: None,
            extra: String::new(),
        };
        let t = n.render();
        assert!(!t.contains("[network]") && !t.contains("tls_cert"), "{t}");
        assert!(t.contains("links = [{ local = \"127.0.0.1\", peer = \"127.0.0.1\" }]"));
        n.network = Some(("br0".into(), "mg".into()));
        n.tls = Some(("/c".into(), "/k".into()));
        n.restart_window_s = Some(600);
        n.extra = "[quorum]\nwitness = \"x\"".into();
        let t = n.render();
        for want in [
            "[network]\nbridge = \"br0\"\ntap_prefix = \"mg\"",
            "tokens_file = \"/d/tokens\"\ntls_cert = \"/c\"\ntls_key = \"/k\"",
            "max_restart = 2\nrestart_window_s = 600\nboot_grace_ms = 1500",
            "scope = \"never\"\n[quorum]",
        ] {
            assert!(t.contains(want), "{want:?} not in\n{t}");
        }
    }
}
