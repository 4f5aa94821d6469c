//! The HA standby: holds the disk replicas and runs no guest. It answers the disk
//! session (report, plan, chunks), applies each write batch through its apply journal
//! (durable before the acknowledgement) and the closing commit that makes it in sync.
//! When the primary is lost (every A-Link silent) after the replicas were in sync, it
//! boots the guest from them and runs on as an HA primary that waits for the peer to
//! return as its standby (delta resync by the disk session).

use std::sync::Arc;
use std::time::{Duration, Instant};

use alink::{Alink, AlinkConfig, Bytes, Event, LinkEvent};
use checkpoint::standby::FailoverReport;
use log::{error, info, warn};
use storage_mirror::standby::session::StandbySessionConfig;
use storage_mirror::standby::{StandbyDisks, StandbyEvent, StandbySession};
use storage_mirror::sync::wire::{self as hawire, HaToPrimary, HaToStandby};
use storage_mirror::wire;
use vmm::config::VmConfig;

use super::migrate::{MigrateSide, Received};
use super::Next;
use crate::exit;
use crate::ft::quorum::Quorum;
use crate::ft::shutdown::Shutdown;
use crate::ft::status::PairStatus;
use crate::settings::FtSettings;

/// How long an answer to the primary may wait for window room.
const ANSWER_WAIT: Duration = Duration::from_secs(5);

/// Logged when the standby boots the guest from its replica.
pub const TAKEOVER_LOG: &str = "HA standby: the primary is lost; booting the VM from the replica";

enum End {
    Stop,
    /// The primary is lost; the replicas were in sync with it.
    LostInSync,
    /// The primary is lost before the replicas were in sync: wait for one again.
    LostEarly,
    /// The primary came back while the standby waited for the quorum's grant.
    PrimaryBack,
    /// The primary begins a live migration to this end.
    Migrate,
    Failed(String),
}

pub fn run(
    cfg: &VmConfig,
    ft: &FtSettings,
    acfg: AlinkConfig,
    sd: &Shutdown,
    status: &PairStatus,
    q: Option<&Quorum>,
    side: &MigrateSide,
) -> Next {
    let images: Vec<_> = cfg.disks.iter().map(|d| d.path.clone()).collect();
    let open = || match StandbyDisks::open(&images) {
        Ok(d) => Ok(d),
        Err(e) => {
            error!("HA standby: cannot open the replicas: {e}");
            Err(Next::Exit(exit::START_FAILED))
        }
    };
    let mut disks = match open() {
        Ok(d) => d,
        Err(n) => return n,
    };
    if ft.discard_disk_data {
        warn!("HA standby: discarding the replicas' metadata: the primary will send full copies");
        if let Err(e) = disks.discard_all() {
            error!("HA standby: {e}");
            return Next::Exit(exit::START_FAILED);
        }
    }
    // A migration is asked of the primary, never of this end.
    let _ = side;
    let mut fault = StallAcks::from_env();
    let lost_at = loop {
        let link = match Alink::start(acfg.clone()) {
            Ok(l) => Arc::new(l),
            Err(e) => {
                error!("cannot start the A-Link: {e}");
                return Next::Exit(exit::START_FAILED);
            }
        };
        status.begin_session(link.clone(), None);
        if let Some(q) = q {
            q.begin_session(link.clone(), None);
        }
        let mut end = serve(&mut disks, &link, sd, q, &mut fault);
        if let (End::LostInSync, Some(q)) = (&end, q) {
            // The session (and its link) stays the quorum's view of the peer while
            // the standby waits: booting needs the grant, not silence alone.
            end = wait_for_grant(&link, sd, q);
        }
        status.end_session(None);
        if let Some(q) = q {
            q.end_session();
        }
        drop(link);
        match end {
            End::Stop => return Next::Exit(exit::OK),
            End::Migrate => {
                // The replicas close (the checkpoint session's standby opens them).
                drop(disks);
                match super::migrate::receive_vm(cfg, ft, sd, status, q) {
                    Received::Primary(vm, sync, hooks) => {
                        return Next::Primary(vm, sync, hooks);
                    }
                    Received::Stop => return Next::Exit(exit::OK),
                    Received::Back => {
                        disks = match open() {
                            Ok(d) => d,
                            Err(n) => return n,
                        };
                        continue;
                    }
                }
            }
            End::LostEarly => {
                warn!("HA standby: the primary was lost before the replicas were in sync; waiting for it");
                continue;
            }
            End::PrimaryBack => {
                info!("HA standby: the primary is back; a new session resyncs the replicas");
                continue;
            }
            End::LostInSync => break Instant::now(),
            End::Failed(why) => {
                error!("HA standby: {why}");
                return Next::Exit(exit::START_FAILED);
            }
        }
    };
    warn!("{TAKEOVER_LOG}");
    if q.is_none() {
        warn!("{}", super::NO_WITNESS_WARNING);
    }
    if let Err(e) = disks.prepare_failover() {
        error!("HA standby: cannot promote the replicas: {e}");
        return Next::Exit(exit::START_FAILED);
    }
    drop(disks);
    let (vm, sync, hooks) = match super::primary::start_vm(cfg) {
        Ok(v) => v,
        Err(code) => return Next::Exit(code),
    };
    let report = FailoverReport {
        last_committed: 0,
        released_through: None,
        rereleased_bytes: 0,
        rereleased_from: None,
        console_next: None,
        failover_time: lost_at.elapsed(),
        announces: 0,
        resent_frames: 0,
        resend_failed: 0,
        handed_in_frames: 0,
        planned: false,
    };
    info!(
        "HA standby: VM booted from the replica {:?} after the primary's loss; now the primary",
        report.failover_time
    );
    status.failed_over(&report, &vm, Some(sync.disks.clone()));
    // The role switch (`super::run_pair_with_migration`): the HA primary now.
    Next::Primary(Box::new(vm), sync, hooks)
}

/// The primary is lost with the replicas in sync: boot only once the quorum grants
/// this node the VM (`TakeOver`); if the primary comes back first, serve it again.
fn wait_for_grant(link: &Alink, sd: &Shutdown, q: &Quorum) -> End {
    warn!("HA standby: the primary is silent on every path; waiting for the quorum's grant");
    loop {
        if sd.requested() {
            return End::Stop;
        }
        if q.may_take_over() {
            return End::LostInSync;
        }
        while link.poll_event(Duration::ZERO).is_some() {}
        // A new instance of the primary's A-Link ended this one's session: it is back.
        if link.peer_reachable() || link.peer_restarted().is_some() {
            return End::PrimaryBack;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn answer(link: &Alink, m: &HaToPrimary, data: Vec<u8>) -> Result<(), String> {
    let payload = if data.is_empty() {
        Vec::new()
    } else {
        vec![Bytes::from(data)]
    };
    match link.send_timeout(m, payload, Some(ANSWER_WAIT)) {
        // A primary whose A-Link was replaced (it redialed with a new instance: its
        // new session resyncs the replicas) ends this session at the next read, as
        // PrimaryBack; it is no failure of this standby (which exited on it).
        Ok(_)
        | Err(alink::AlinkError::Timeout)
        | Err(alink::AlinkError::Closed)
        | Err(alink::AlinkError::PeerRestarted { .. }) => Ok(()),
        Err(e) => Err(format!("A-Link: {e}")),
    }
}

/// Feeds the disk session `ev` and performs its actions; the answers go out.
fn feed(
    ses: &mut StandbySession,
    disks: &mut StandbyDisks,
    ev: StandbyEvent,
    payload: &[u8],
    link: &Alink,
) -> Result<(), String> {
    let mut replies = Vec::new();
    let mut result = Ok(());
    for a in ses.on_event(ev, Instant::now()) {
        if let Err(e) = disks.perform(a, payload, &mut replies) {
            result = Err(e.to_string());
            break;
        }
    }
    for (m, data) in replies {
        let h = wire::encode(&m).map_err(|e| e.to_string())?;
        answer(link, &HaToPrimary::Session(h), data)?;
    }
    result
}

fn serve(
    disks: &mut StandbyDisks,
    link: &Arc<Alink>,
    sd: &Shutdown,
    q: Option<&Quorum>,
    fault: &mut StallAcks,
) -> End {
    let mut ses = StandbySession::new(StandbySessionConfig::default(), Instant::now());
    let mut seen_peer = false;
    let mut in_sync = false;
    let mut hellos = 0u64;
    // Every path to the primary is down (seen as PeerUnreachable): lost once nothing
    // it sent before is left to read.
    let mut gone = false;
    loop {
        if sd.requested() {
            return End::Stop;
        }
        let mut lost = false;
        while let Some(ev) = link.poll_event(Duration::ZERO) {
            match ev {
                Event::Link(LinkEvent::PeerUnreachable) => lost = true,
                Event::Link(LinkEvent::PeerReachable) => {
                    seen_peer = true;
                    info!("HA standby: primary connected");
                }
                Event::Link(e) => info!("HA standby: A-Link {e:?}"),
                Event::Refused { link, peer, reason } => {
                    warn!("HA standby: A-Link {link} refused {peer:?}: {reason}")
                }
                // The primary's A-Link was replaced (a new session of a live primary):
                // this session is over, without a takeover.
                Event::PeerRestarted { .. } => return End::PrimaryBack,
            }
        }
        // The primary lost: but what it sent before its links closed is read first.
        // Its last message may be the start of a live migration (after which it
        // closes this session's links at once): taken for a loss, this end would boot
        // the VM beside the running source (without a quorum) instead of receiving it.
        gone = (gone || (lost && seen_peer)) && !link.peer_reachable();
        let wait = if gone || ses.acks_waiting() {
            Duration::ZERO
        } else {
            Duration::from_millis(5)
        };
        let msg = match link.recv(wait) {
            Ok(Some(m)) => m,
            Ok(None) if gone => {
                return if in_sync {
                    End::LostInSync
                } else {
                    End::LostEarly
                };
            }
            Ok(None) => {
                if let Err(e) = feed(&mut ses, disks, StandbyEvent::Idle, &[], link) {
                    return End::Failed(e);
                }
                continue;
            }
            Err(alink::AlinkError::PeerRestarted { .. }) => return End::PrimaryBack,
            Err(e) => return End::Failed(format!("A-Link: {e}")),
        };
        let r = match hawire::decode::<HaToStandby>(msg.head_bytes()) {
            Ok(HaToStandby::Hello) => {
                seen_peer = true;
                hellos += 1;
                if hellos > 1 {
                    // The primary declared this standby failed (it left a write
                    // unacknowledged for the ack timeout) and begins a new disk
                    // session: the replicas are no longer in sync (no takeover from
                    // them) until its resync, a delta, ends.
                    warn!(
                        "HA standby: the primary declared this standby failed and starts a \
                         new disk session (delta resync); NOT in sync until it ends"
                    );
                    in_sync = false;
                    if let Some(q) = q {
                        q.begin_session(link.clone(), None);
                    }
                    ses = StandbySession::new(StandbySessionConfig::default(), Instant::now());
                }
                feed(&mut ses, disks, StandbyEvent::Hello, &[], link)
            }
            Ok(HaToStandby::Session(h)) => match wire::decode_to_standby(&h, msg.payload()) {
                Ok(m) => feed(&mut ses, disks, StandbyEvent::Msg(m), msg.payload(), link),
                Err(e) => {
                    error!("HA standby: bad disk message: {e}");
                    Ok(())
                }
            },
            Ok(HaToStandby::Writes { seq, writes }) => {
                if in_sync {
                    fault.batch_applied();
                }
                apply(disks, seq, &writes, msg.payload(), link).and_then(|()| {
                    // Paced by the session: records the last commit in the metadata.
                    feed(
                        &mut ses,
                        disks,
                        StandbyEvent::Committed { epoch: seq },
                        &[],
                        link,
                    )
                })
            }
            Ok(HaToStandby::Migrate) if in_sync => {
                info!("HA standby: the primary begins a live migration to this end");
                return End::Migrate;
            }
            Ok(HaToStandby::Migrate) => Err(
                "the primary began a live migration to this end while its replicas are not in sync"
                    .to_string(),
            ),
            Ok(HaToStandby::EndResync { seq, writes }) => {
                apply(disks, seq, &writes, msg.payload(), link)
                    .and_then(|()| {
                        feed(
                            &mut ses,
                            disks,
                            StandbyEvent::Committed { epoch: 0 },
                            &[],
                            link,
                        )
                    })
                    .and_then(|()| {
                        in_sync = true;
                        if let Some(q) = q {
                            q.set_committed();
                        }
                        info!("HA standby: replicas in sync with the primary");
                        answer(link, &HaToPrimary::InSync, Vec::new())
                    })
            }
            Err(e) => {
                error!("HA standby: bad message from the primary: {e}");
                Ok(())
            }
        };
        if let Err(e) = r {
            let _ = answer(
                link,
                &HaToPrimary::Failed {
                    reason: e.chars().take(1000).collect(),
                },
                Vec::new(),
            );
            return End::Failed(e);
        }
    }
}

/// A fault hook for tests (`TWINRUN_HA_FAULT_STALL_ACKS=N:MS`): once in sync, before
/// the Nth write batch is applied, this standby stops reading the write stream (no
/// apply, no acknowledgement) for MS milliseconds while its A-Link heartbeats go on:
/// a standby that stays reachable but stops acknowledging. Once only.
pub const STALL_ACKS_ENV: &str = "TWINRUN_HA_FAULT_STALL_ACKS";

#[derive(Debug, Default)]
pub struct StallAcks {
    /// (batches before the stall, its length)
    plan: Option<(u64, Duration)>,
    applied: u64,
}

impl StallAcks {
    fn from_env() -> StallAcks {
        let Ok(v) = std::env::var(STALL_ACKS_ENV) else {
            return StallAcks::default();
        };
        let parsed = v
            .split_once(':')
            .and_then(|(n, ms)| Some((n.parse().ok()?, ms.parse().ok()?)));
        match parsed {
            Some((n, ms)) => {
                warn!("HA standby: FAULT HOOK {STALL_ACKS_ENV}: acknowledgements stall for {ms} ms before batch {n} in sync");
                StallAcks {
                    plan: Some((n, Duration::from_millis(ms))),
                    applied: 0,
                }
            }
            None => {
                warn!("HA standby: {STALL_ACKS_ENV}={v:?} is not N:MS; ignored");
                StallAcks::default()
            }
        }
    }

    /// Before a write batch in sync is applied: stalls when its turn comes.
    fn batch_applied(&mut self) {
        let Some((n, d)) = self.plan else { return };
        self.applied += 1;
        if self.applied >= n {
            self.plan = None;
            warn!("HA standby: FAULT HOOK: not acknowledging for {d:?} (heartbeats go on)");
            std::thread::sleep(d);
            warn!("HA standby: FAULT HOOK: acknowledging again");
        }
    }
}

/// Applies a write batch durably (the apply journal: one append, one fdatasync), then
/// acknowledges it.
fn apply(
    disks: &mut StandbyDisks,
    seq: u64,
    writes: &[hawire::WriteHead],
    payload: &[u8],
    link: &Alink,
) -> Result<(), String> {
    let w = hawire::split_writes(writes, payload).map_err(|e| e.to_string())?;
    disks.commit(seq, &w).map_err(|e| e.to_string())?;
    answer(link, &HaToPrimary::Ack { seq }, Vec::new())
}
