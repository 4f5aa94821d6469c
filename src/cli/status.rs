//! `twinrun vm status --name <vm> [--json]`: what a running VM reports on its control
//! socket, in words or as JSON.

use std::time::Duration;

use clap::Args;
use twinrun_control::{self as control, FtRole, FtState, FtStatus, VmStatus};

use crate::exit;

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Name of the running VM.
    #[arg(long, value_name = "NAME")]
    pub name: String,
    /// Print the status as one JSON object.
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: &StatusArgs) -> i32 {
    let sock = match control::socket_of(&a.name) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("twinrun: error: {e}");
            return exit::USAGE;
        }
    };
    let st = match control::status(&sock, Duration::from_secs(10)) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("twinrun: error: {}: {e}", a.name);
            return exit::GUEST_FAILED;
        }
    };
    if a.json {
        match serde_json::to_string_pretty(&st) {
            Ok(j) => println!("{j}"),
            Err(e) => {
                eprintln!("twinrun: error: encoding JSON: {e}");
                return exit::GUEST_FAILED;
            }
        }
    } else {
        print!("{}", describe(&st));
    }
    exit::OK
}

/// The status in words, one fact per line.
pub fn describe(st: &VmStatus) -> String {
    let mut out = format!("VM {} (pid {})\n", st.name, st.pid);
    let Some(ft) = &st.ft else {
        out += &format!(
            "running alone (no FT pair){}\n",
            if st.paused { ", PAUSED" } else { "" }
        );
        return out;
    };
    out += &describe_ft(ft);
    out
}

fn describe_ft(ft: &FtStatus) -> String {
    let state = match ft.state {
        FtState::WaitingForPeer => "waiting for its peer (no A-Link up)",
        FtState::Syncing => "syncing the standby (not protected yet)",
        FtState::Protected => "PROTECTED",
        FtState::Mirroring => "mirroring the primary",
    };
    let role = match ft.role {
        FtRole::Primary => "primary",
        FtRole::Standby => "standby",
    };
    let mut out = format!(
        "role: {role}, {state}; session {}, protected in {} session(s)\n",
        ft.session, ft.protections
    );
    out += &format!(
        "checkpoints committed this session: {}, last committed epoch: {}\n",
        ft.epochs_committed,
        ft.last_committed_epoch
            .map_or("none".to_string(), |e| e.to_string())
    );
    if let Some(f) = &ft.failover {
        out += &format!(
            "failover: took over in {} ms, resumed from epoch {} (primary released through \
             {:?}; {} console bytes released again; {} MAC announce(s))\n",
            f.time_ms, f.resumed_from_epoch, f.released_through, f.rereleased_bytes, f.announces
        );
    }
    for (k, l) in ft.links.iter().enumerate() {
        out += &format!(
            "a-link {k}: {} ({} connection(s), {} refused, {} bytes sent)\n",
            if l.up { "up" } else { "DOWN" },
            l.connections,
            l.refused,
            l.sent_bytes
        );
    }
    for (i, d) in ft.disks.iter().enumerate() {
        out += &format!("disk {i}: {} ({}): {}\n", d.path, d.source, d.state);
    }
    if let Some(q) = &ft.quorum {
        out += &format!(
            "quorum ({}): node {}, {} of generation {}, elected witness {}, output {}{}, guest {}, \
             peer {}\n",
            q.backend,
            q.node,
            q.role,
            q.generation,
            q.elected,
            q.gate,
            q.free_left_ms
                .map_or(String::new(), |ms| format!(" ({ms} ms left)")),
            q.guest,
            if q.peer_reachable {
                "reachable"
            } else {
                "UNREACHABLE on every path"
            }
        );
        let mut paths: Vec<String> = q
            .paths
            .iter()
            .enumerate()
            .map(|(i, up)| format!("a-link {i} {}", if *up { "alive" } else { "SILENT" }))
            .collect();
        if let Some(up) = q.priv0 {
            paths.push(format!("priv0 {}", if up { "alive" } else { "SILENT" }));
        }
        if !paths.is_empty() {
            out += &format!("  paths: {}\n", paths.join(", "));
        }
        if let Some(why) = &q.refused_session {
            out += &format!("  FENCED: {why}\n");
        }
        for a in &q.alerts {
            out += &format!("  alert: {a}\n");
        }
        for w in &q.witnesses {
            out += &format!(
                "  {} {}: {}{}\n",
                w.slot,
                w.service,
                if w.reachable {
                    "reachable"
                } else {
                    "UNREACHABLE"
                },
                w.lease_left_ms
                    .map_or(String::new(), |ms| format!(", lease {ms} ms left"))
            );
        }
    }
    if let Some(s) = &ft.last_session {
        out += &format!(
            "last session ({}): {} epochs captured, {} acknowledged, pause p50 {:?} us{}{}\n",
            s.session,
            s.epochs_captured,
            s.epochs_acked,
            s.pause_p50_us,
            if s.simplex { ", standby lost" } else { "" },
            s.refused
                .as_ref()
                .map_or(String::new(), |r| format!(", standby REFUSED: {r}"))
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use twinrun_control::{FailoverStatus, LinkState};

    #[test]
    fn words_for_a_survivor() {
        let st = VmStatus {
            name: "vm1".into(),
            pid: 7,
            paused: false,
            ft: Some(Box::new(FtStatus {
                protection: "ft".into(),
                role: FtRole::Primary,
                state: FtState::WaitingForPeer,
                vm_running: true,
                session: 1,
                protections: 0,
                epochs_committed: 0,
                last_committed_epoch: None,
                failover: Some(FailoverStatus {
                    time_ms: 12,
                    resumed_from_epoch: 812,
                    released_through: Some(811),
                    rereleased_bytes: 40,
                    announces: 1,
                }),
                last_session: None,
                links: vec![LinkState {
                    up: false,
                    connections: 1,
                    refused: 0,
                    sent_bytes: 9,
                }],
                disks: vec![],
                quorum: Some(twinrun_control::QuorumView {
                    backend: "witness".into(),
                    node: 2,
                    role: "primary".into(),
                    generation: 4,
                    elected: "preferred".into(),
                    gate: "free".into(),
                    free_left_ms: Some(120),
                    guest: "run".into(),
                    peer_reachable: false,
                    paths: vec![false],
                    protected: false,
                    witnesses: vec![twinrun_control::WitnessView {
                        slot: "preferred".into(),
                        service: "witness 10.0.0.3:4557".into(),
                        reachable: true,
                        lease_left_ms: Some(120),
                    }],
                    took_over: Some(4),
                    demoted_by: None,
                    refused_session: Some(
                        "session refused: the primary carries quorum generation 3".into(),
                    ),
                    alerts: vec!["WitnessUnreachable(Alternate): alternate unreachable".into()],
                    priv0: Some(true),
                }),
            })),
        };
        let d = describe(&st);
        assert!(
            d.contains("quorum (witness): node 2, primary of generation 4"),
            "{d}"
        );
        assert!(d.contains("output free (120 ms left)"), "{d}");
        assert!(d.contains("paths: a-link 0 SILENT, priv0 alive"), "{d}");
        assert!(
            d.contains("witness 10.0.0.3:4557: reachable, lease 120 ms left"),
            "{d}"
        );
        assert!(d.contains("role: primary, waiting for its peer"), "{d}");
        assert!(
            d.contains("FENCED: session refused: the primary carries quorum generation 3"),
            "{d}"
        );
        assert!(
            d.contains("alert: WitnessUnreachable(Alternate): alternate unreachable"),
            "{d}"
        );
        assert!(
            d.contains("took over in 12 ms, resumed from epoch 812"),
            "{d}"
        );
        assert!(d.contains("a-link 0: DOWN (1 connection(s)"), "{d}");
        let alone = VmStatus { ft: None, ..st };
        assert!(describe(&alone).contains("running alone"));
    }
}
