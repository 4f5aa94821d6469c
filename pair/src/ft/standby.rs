//! The standby: keeps the replica until the primary is lost, then runs the VM from the
//! last committed checkpoint on its own devices until it ends or SIGTERM/SIGINT.

use crate::exit;
use crate::settings::FtSettings;
use alink::{Alink, AlinkConfig};
use checkpoint::protocol::StandbyConfig;
use checkpoint::standby::{
    run_standby_with, StandbyDriverConfig, StandbyDriverError, StandbyOutcome,
};
use log::{error, info, warn};
use vmm::config::{ConsoleConfig, VmConfig};

use super::quorum::Quorum;
use super::shutdown::Shutdown;
use super::status::PairStatus;
use super::Next;
use crate::alone::exit_code;

/// Logged when the standby's VM runs (tools ask the control socket's status, whose
/// `failover` says the same).
const FAILOVER_LOG: &str = "FT standby: failover complete in";

/// Starts the A-Link of a session. The previous session's link may still be closing
/// (its last holder, e.g. the quorum thread between two looks, lets go within a few
/// ms), so its listen addresses are retried for up to a second.
fn start_alink(acfg: &AlinkConfig) -> Result<Alink, alink::AlinkError> {
    let mut tries = 0;
    loop {
        match Alink::start(acfg.clone()) {
            Err(e) if tries < 50 => {
                log::debug!("A-Link start: {e}; retrying");
                tries += 1;
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            r => return r,
        }
    }
}

pub fn run(
    cfg: &VmConfig,
    ft: &FtSettings,
    acfg: AlinkConfig,
    sd: &Shutdown,
    status: &PairStatus,
    quorum: Option<&Quorum>,
) -> Next {
    if !matches!(cfg.console, ConsoleConfig::File { .. }) {
        warn!(
            "the console is not a file: output released again after a failover may be duplicated"
        );
    }
    // Attach to the TAPs now, long before a failover builds the VM on them: a TAP with
    // no process attached has no carrier and its bridge port only forwards again up to
    // about a second after one attaches (linkwatch), which would swallow the announce
    // and the re-sent frames. The VM built at failover takes these descriptors over.
    for (i, n) in cfg.nets.iter().enumerate() {
        if let Err(e) = vmm::devices::virtio::net::tap::preopen(&n.tap) {
            error!("FT standby: net {i}: cannot open TAP {}: {e}", n.tap);
            return exit::START_FAILED.into();
        }
    }
    info!(
        "FT standby: listening for the primary on {} A-Link(s): {:?}",
        acfg.links.len(),
        acfg.links.iter().map(|l| l.local).collect::<Vec<_>>()
    );
    let (before_start, survivor) = super::role::survivor_hook(cfg, quorum.is_some());
    let mut opts = StandbyDriverConfig {
        protocol: StandbyConfig::default(),
        mirror_disks: true,
        discard_disk_data: ft.discard_disk_data,
        before_start: Some(before_start),
        takeover_gate: quorum.map(Quorum::takeover_gate),
        ..StandbyDriverConfig::default()
    };
    if ft.migration_target {
        info!("FT standby: the receiving end of a live migration: it never fails over");
        opts.takeover_gate = Some(super::migration::NoTakeover::gate(opts.takeover_gate));
    }
    // A primary lost before the first checkpoint committed left nothing to take over:
    // wait for it (or another primary) again, on a fresh A-Link (the next primary's
    // messages are numbered from the start again). The replica's disks keep what the
    // interrupted resync wrote: their metadata says inconsistent, and the next session
    // resumes or redoes the copy.
    let outcome = loop {
        let link = match start_alink(&acfg) {
            Ok(l) => std::sync::Arc::new(l),
            Err(e) => {
                error!("cannot start the A-Link: {e}");
                return exit::START_FAILED.into();
            }
        };
        status.begin_session(link.clone(), None);
        if let Some(q) = quorum {
            q.begin_session(link.clone(), None);
        }
        let outcome = run_standby_with(&link, cfg, &opts, sd.flag());
        // The old primary must not reach this VM's replica machinery again.
        status.end_session(None);
        if let Some(q) = quorum {
            q.end_session();
        }
        drop(link);
        // Discarding is for the first session only: later ones resume what it began.
        opts.discard_disk_data = false;
        match outcome {
            Ok(StandbyOutcome::NoReplica) if !sd.requested() => {
                warn!(
                    "FT standby: the primary was lost before the first checkpoint committed; \
                     there is nothing to take over: waiting for a primary again"
                );
            }
            Err(e @ StandbyDriverError::Fenced { .. }) if !sd.requested() => {
                // A primary that lost the VM (an older generation) gets no session:
                // nothing of its history reaches this replica. Wait for the next one.
                error!("FT standby: {e}");
                if let Some(q) = quorum {
                    q.session_refused(e.to_string());
                }
            }
            Ok(StandbyOutcome::PrimaryBack { .. }) if !sd.requested() => {
                warn!(
                    "FT standby: the primary is back without a takeover (it ran on): waiting \
                     for its next session, which resyncs this replica"
                );
            }
            other => break other,
        }
    };
    match outcome {
        Ok(StandbyOutcome::FailedOver(vm, r)) => {
            let mut vm = *vm;
            info!(
                "{FAILOVER_LOG} {} ms ({}): resumed from epoch {}, primary released through \
                 {:?}, {} console bytes released again from position {:?}, console continues \
                 at {:?}, {} RARP announce(s)",
                r.failover_time.as_millis(),
                if r.planned {
                    "PLANNED ROLE SWAP: the primary handed the VM over at the epoch boundary"
                } else {
                    "restore and start after the primary was declared lost"
                },
                r.last_committed,
                r.released_through,
                r.rereleased_bytes,
                r.rereleased_from,
                r.console_next,
                r.announces
            );
            if r.planned {
                info!(
                    "FT standby: this end is the primary now; the old primary listens as its \
                     standby and this end dials it (as after a failover)"
                );
            } else if quorum.is_some() {
                warn!(
                    "FT standby: this VM now runs UNPROTECTED, as granted by the quorum, until \
                     a standby joins (restart the old primary as --role standby)"
                );
            } else {
                warn!(
                    "FT standby: this VM now runs UNPROTECTED until a standby joins (start one \
                     on the other PM: it is resynced with a delta and protects the VM again); \
                     if the primary is in fact alive behind cut A-Links, two copies run"
                );
            }
            sd.hand_vm(vm.stopper());
            let disks = survivor.take();
            status.failed_over(&r, &vm, disks.clone());
            match disks {
                // The role switch (`super::run_pair_with`): this end protects the VM as
                // the primary now.
                Some(disks) => Next::Primary {
                    vm: Box::new(vm),
                    disks,
                },
                None => {
                    let end = vm.wait();
                    exit_code(&end, sd.requested()).into()
                }
            }
        }
        Ok(StandbyOutcome::NoReplica) => {
            info!("FT standby: stopped before anything was committed");
            exit::OK.into()
        }
        Ok(StandbyOutcome::Stopped { committed })
        | Ok(StandbyOutcome::PrimaryBack { committed }) => {
            info!("FT standby: stopped (last committed epoch {committed:?})");
            exit::OK.into()
        }
        Err(e) => {
            error!("FT standby: {e}");
            exit::START_FAILED.into()
        }
    }
}
