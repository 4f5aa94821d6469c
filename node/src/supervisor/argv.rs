//! The command line of a VMM process, derived from the node's config and the VM's
//! record: the operator never types a role, an A-Link address, a secret file, a disk
//! path or a TAP name. Pure, so the derivation is unit-tested.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use crate::config::NodeConfig;
use crate::model::{PayloadSpec, Protection, Role, VmRecord};

/// The derived pieces of one VMM (also shown by `vm show --json` via the API).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmmPlan {
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    /// Disk images this node keeps for the VM, with their sizes in bytes.
    pub disks: Vec<(PathBuf, u64)>,
    /// TAPs to create (and bridge) before the VMM starts.
    pub taps: Vec<String>,
    pub log: PathBuf,
    pub console: PathBuf,
}

/// This node's A-Link addresses for the VM: (local, peer) per link.
pub fn alinks(cfg: &NodeConfig, rec: &VmRecord) -> Vec<(SocketAddr, SocketAddr)> {
    let n = cfg.alink.links.len() as u32;
    cfg.alink
        .links
        .iter()
        .enumerate()
        .map(|(i, l)| {
            let port = u32::from(cfg.alink.port_base) + u32::from(rec.slot) * n + i as u32;
            // Config validation keeps port_base >= 1024; slots are bounded by MAX_VMS.
            let port = u16::try_from(port).unwrap_or(u16::MAX);
            (
                SocketAddr::new(l.local, port),
                SocketAddr::new(l.peer, port),
            )
        })
        .collect()
}

pub fn tap_name(cfg: &NodeConfig, rec: &VmRecord, nic: usize) -> String {
    format!("{}{}n{}", cfg.network.tap_prefix, rec.slot, nic)
}

pub fn plan(
    cfg: &NodeConfig,
    rec: &VmRecord,
    role: Role,
    twinrun_bin: &Path,
) -> Result<VmmPlan, String> {
    let spec = &rec.spec;
    let dir = cfg.vm_dir(&spec.name);
    let mut a: Vec<String> = vec![
        twinrun_bin.display().to_string(),
        "vm".into(),
        "run".into(),
        "--name".into(),
        spec.name.clone(),
        "--vcpus".into(),
        spec.vcpus.to_string(),
        "--mem-mib".into(),
        spec.mem_mib.to_string(),
    ];
    match &spec.payload {
        PayloadSpec::TestGuest {
            elf,
            workloads,
            counter_rate,
            kv_addr,
        } => {
            let elf = elf.clone().or_else(|| cfg.guest_elf.clone()).ok_or(
                "the VM's payload names no test guest ELF and the node config has no guest_elf",
            )?;
            a.extend(["--guest".into(), elf.display().to_string()]);
            if !workloads.is_empty() {
                a.extend(["--workload".into(), workloads.join(",")]);
            }
            if let Some(r) = counter_rate {
                a.extend(["--counter-rate".into(), r.to_string()]);
            }
            if let Some(k) = kv_addr {
                a.extend(["--kv-addr".into(), k.clone()]);
            }
        }
        PayloadSpec::Linux {
            kernel,
            initrd,
            cmdline,
        } => {
            a.extend(["--kernel".into(), kernel.display().to_string()]);
            if let Some(i) = initrd {
                a.extend(["--initrd".into(), i.display().to_string()]);
            }
            if let Some(c) = cmdline {
                a.extend(["--cmdline".into(), c.clone()]);
            }
        }
    }
    let mut disks = Vec::new();
    for (i, d) in spec.disks.iter().enumerate() {
        let p = dir.join(format!("disk{i}.img"));
        a.extend(["--disk".into(), p.display().to_string()]);
        disks.push((p, d.size_mib << 20));
    }
    let mut taps = Vec::new();
    for (i, n) in spec.nics.iter().enumerate() {
        let tap = tap_name(cfg, rec, i);
        a.extend(["--net".into(), format!("{tap},{}", n.mac)]);
        taps.push(tap);
    }
    let console = dir.join("console.log");
    a.extend(["--console".into(), format!("file:{}", console.display())]);
    // An unprotected VM's VMM is the primary of a pair with no standby
    // (`--protection unprotected`: no quorum, no dirty logging, no epochs: the guest at
    // full speed, its disk writes recorded), so that it can be live migrated: the
    // target's receiving VMM is its standby (`--migration-target`, never a takeover),
    // the FT session the pre-copy, the planned swap the handover
    // (cluster/step/migrate.rs).
    let unprotected = spec.protection == Protection::Unprotected;
    let role = if role == Role::Solo {
        Role::Primary
    } else {
        role
    };
    {
        {
            a.extend([
                "--role".into(),
                role.to_string(),
                "--cluster-id".into(),
                cfg.cluster.clone(),
                "--cluster-secret-file".into(),
                cfg.secret_file.display().to_string(),
            ]);
            for (local, peer) in alinks(cfg, rec) {
                a.extend(["--alink".into(), format!("{local},{peer}")]);
            }
            // HA: the same pair of processes, disks mirrored, no memory checkpoints
            // (plan/CONTRACT.md); FT is the runtime's default.
            if spec.protection == Protection::Ha {
                a.extend(["--protection".into(), "ha".into()]);
            }
            // Unprotected: the runtime knows it (no quorum warning, status
            // "unprotected", no dirty logging or epochs until a migration's receiving
            // VMM connects); its standby is only ever that receiving VMM.
            if unprotected {
                a.extend(["--protection".into(), "unprotected".into()]);
                if role == Role::Standby {
                    a.push("--migration-target".into());
                }
            }
            // The pair's VMMs hold the VM's quorum key themselves (gate.rs); an
            // unprotected VM's none (the daemon's `-alone` key covers it).
            if let (Some(q), false) = (quorum_flags(cfg, rec), unprotected) {
                a.extend([
                    "--quorum-config".into(),
                    q.config,
                    "--quorum-node-id".into(),
                    q.node_id.to_string(),
                ]);
                if let Some((local, peer)) = q.priv0 {
                    a.extend(["--priv0".into(), format!("{local},{peer}")]);
                }
            }
        }
    }
    let env = vec![
        (
            "TWINRUN_RUN_DIR".to_string(),
            cfg.vmm_run_dir().display().to_string(),
        ),
        (
            "TWINRUN_STATE_DIR".to_string(),
            cfg.state_dir.join("vmm-state").display().to_string(),
        ),
        ("RUST_LOG".to_string(), "info".to_string()),
    ];
    Ok(VmmPlan {
        args: a,
        env,
        disks,
        taps,
        log: dir.join("vmm.log"),
        console,
    })
}

/// The quorum flags of the VM's FT/HA VMMs (None: the node runs no quorum service).
fn quorum_flags(cfg: &NodeConfig, rec: &VmRecord) -> Option<twinrun_control::QuorumFlags> {
    cfg.quorum_table()?;
    // The private network as a heartbeat path too (a takeover needs every path
    // silent): UDP on the VM's first A-Link port number (TCP and UDP ports do not
    // clash), at the priv0 addresses.
    let priv0 = match (&cfg.priv0, alinks(cfg, rec).first()) {
        (Some(p0), Some((first, _))) => {
            let port = first.port();
            Some((
                SocketAddr::new(p0.addr, port).to_string(),
                SocketAddr::new(p0.peer, port).to_string(),
            ))
        }
        _ => None,
    };
    Some(twinrun_control::QuorumFlags {
        config: cfg.quorum_file().display().to_string(),
        node_id: cfg.quorum_node_id(),
        vm: rec.spec.name.clone(),
        priv0,
    })
}

/// The online level change that makes the running VMM of `rec` what a VMM started at
/// level `to` would be: FT or HA with the same quorum flags its command line would
/// carry (see [`plan`]), or unprotected.
pub fn level_change(
    cfg: &NodeConfig,
    rec: &VmRecord,
    to: Protection,
) -> Result<twinrun_control::LevelChange, String> {
    match to {
        Protection::Ft => Ok(twinrun_control::LevelChange::Ft(quorum_flags(cfg, rec))),
        Protection::Unprotected => Ok(twinrun_control::LevelChange::Unprotected),
        Protection::Ha => Ok(twinrun_control::LevelChange::Ha(quorum_flags(cfg, rec))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::*;

    fn cfg() -> NodeConfig {
        NodeConfig::parse(Path::new("n.toml"), crate::config::tests::GOOD).unwrap()
    }

    fn rec(protection: Protection) -> VmRecord {
        VmRecord {
            spec: VmSpec {
                name: "db".into(),
                vcpus: 2,
                mem_mib: 128,
                disks: vec![DiskSpec { size_mib: 8 }],
                nics: vec![NicSpec {
                    mac: "02:00:00:00:00:07".into(),
                }],
                payload: PayloadSpec::TestGuest {
                    elf: Some("/g.elf".into()),
                    workloads: vec!["disk".into(), "kv".into()],
                    counter_rate: None,
                    kv_addr: Some("10.0.0.2/24".into()),
                },
                protection,
                preferred_node: Some("pm1".into()),
                autostart: true,
                failback: Failback::Auto,
            },
            desired: Desired::Running,
            owner: Some("pm1".into()),
            slot: 3,
            restart_seq: 0,
            failback_seq: 0,
            clear_seq: 0,
            deleted: false,
            stopped_because: None,
            migrate_to: None,
            created: Version::default(),
            version: Version::default(),
        }
    }

    #[test]
    fn ft_standby_gets_role_links_secret_and_own_files() {
        let p = plan(
            &cfg(),
            &rec(Protection::Ft),
            Role::Standby,
            Path::new("/usr/bin/twinrun"),
        )
        .unwrap();
        let line = p.args.join(" ");
        assert!(line.starts_with("/usr/bin/twinrun vm run --name db --vcpus 2 --mem-mib 128 --guest /g.elf --workload disk,kv"), "{line}");
        assert!(line.contains("--role standby --cluster-id plant-a --cluster-secret-file /etc/twinrun/cluster.secret"), "{line}");
        // Two links, slot 3: ports 7500 + 3*2 + i.
        assert!(
            line.contains(
                "--alink 10.88.0.1:7506,10.88.0.2:7506 --alink 10.88.1.1:7507,10.88.1.2:7507"
            ),
            "{line}"
        );
        assert!(
            line.contains("--disk /var/lib/twinrund/vms/db/disk0.img"),
            "{line}"
        );
        assert!(line.contains("--net twr3n0,02:00:00:00:00:07"), "{line}");
        assert!(
            line.contains("--console file:/var/lib/twinrund/vms/db/console.log"),
            "{line}"
        );
        assert_eq!(
            p.disks,
            vec![("/var/lib/twinrund/vms/db/disk0.img".into(), 8 << 20)]
        );
        assert_eq!(p.taps, vec!["twr3n0".to_string()]);
        assert!(p
            .env
            .contains(&("TWINRUN_RUN_DIR".into(), "/run/twinrund/vmm".into())));
    }

    #[test]
    fn ha_gets_protection_ha_and_quorum_flags_with_a_witness() {
        let p = plan(&cfg(), &rec(Protection::Ha), Role::Primary, Path::new("t")).unwrap();
        let line = p.args.join(" ");
        assert!(
            line.contains("--role primary --cluster-id plant-a"),
            "{line}"
        );
        assert!(line.contains("--protection ha"), "{line}");
        // mode = "none": no quorum flags (the pair runs as before, with its warning).
        assert!(!line.contains("--quorum-config"), "{line}");
        assert!(
            !line.contains("--priv0"),
            "priv0 goes with a quorum: {line}"
        );
        let ft = plan(&cfg(), &rec(Protection::Ft), Role::Primary, Path::new("t")).unwrap();
        assert!(!ft.args.iter().any(|a| a == "--protection"), "{ft:?}");

        let text = format!(
            "{}\n[quorum]\nmode = \"witness\"\npreferred = \"10.0.9.1:4557\"\n",
            crate::config::tests::GOOD
        );
        let wcfg = NodeConfig::parse(Path::new("n.toml"), &text).unwrap();
        for (prot, role) in [
            (Protection::Ft, Role::Primary),
            (Protection::Ft, Role::Standby),
            (Protection::Ha, Role::Standby),
        ] {
            let line = plan(&wcfg, &rec(prot), role, Path::new("t"))
                .unwrap()
                .args
                .join(" ");
            assert!(
                line.contains("--quorum-config /var/lib/twinrund/quorum.toml --quorum-node-id 1"),
                "{line}"
            );
            // [priv0] is configured: its heartbeat path, UDP on the first A-Link's port.
            let port = alinks(&wcfg, &rec(prot))[0].0.port();
            assert!(
                line.contains(&format!("--priv0 10.0.0.1:{port},10.0.0.2:{port}")),
                "{line}"
            );
        }
        // An unprotected VM's VMM holds no key (the daemon does, when alone).
        let solo = plan(
            &wcfg,
            &rec(Protection::Unprotected),
            Role::Solo,
            Path::new("t"),
        )
        .unwrap();
        assert!(
            !solo.args.iter().any(|a| a == "--quorum-config"),
            "{solo:?}"
        );
    }

    #[test]
    fn solo_is_an_unprotected_primary_alone_and_missing_guest_is_an_error() {
        let p = plan(
            &cfg(),
            &rec(Protection::Unprotected),
            Role::Solo,
            Path::new("t"),
        )
        .unwrap();
        // Migratable: a primary with its A-Links and no standby, no quorum, that
        // knows its VM is unprotected.
        let line = p.args.join(" ");
        assert!(
            line.contains("--role primary --cluster-id plant-a"),
            "{line}"
        );
        assert!(
            line.contains("--alink 10.88.0.1:7506,10.88.0.2:7506"),
            "{line}"
        );
        assert!(line.contains("--protection unprotected"), "{line}");
        assert!(!line.contains("--migration-target"), "{line}");
        // The receiving end of its live migration never takes the VM over.
        let t = plan(
            &cfg(),
            &rec(Protection::Unprotected),
            Role::Standby,
            Path::new("t"),
        )
        .unwrap()
        .args
        .join(" ");
        assert!(t.contains("--role standby --cluster-id plant-a"), "{t}");
        assert!(t.contains("--migration-target"), "{t}");
        assert!(t.contains("--protection unprotected"), "{t}");
        let ft = plan(&cfg(), &rec(Protection::Ft), Role::Standby, Path::new("t")).unwrap();
        assert!(!ft.args.iter().any(|a| a == "--migration-target"), "{ft:?}");
        let mut r = rec(Protection::Unprotected);
        r.spec.payload = PayloadSpec::TestGuest {
            elf: None,
            workloads: vec![],
            counter_rate: None,
            kv_addr: None,
        };
        assert!(plan(&cfg(), &r, Role::Solo, Path::new("t"))
            .unwrap_err()
            .contains("guest_elf"));
    }
}
