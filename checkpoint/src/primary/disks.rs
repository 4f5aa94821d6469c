//! Mirrored disks on the primary, as the checkpoint sees them: storage-mirror's
//! [`PrimaryDisks`] and its session machine, tied to the VM and the link. This file only
//! adapts:
//!
//! - [`MirroredDisks`] answers the VMM's disk hooks (vmm knows nothing of replication,
//!   storage-mirror nothing of the VMM) and is the capture's [`EpochObserver`];
//! - [`DiskSide`] runs the disk session before the memory sync: it feeds the machine
//!   the standby's messages and ticks, performs the disk actions through
//!   [`PrimaryDisks::perform`], resets the VM's written-block maps when the machine
//!   says so, and carries the messages, opaque, in [`ToStandby::Disk`].

use std::io;
use std::sync::Arc;
use std::time::Instant;

use storage_mirror::primary::{
    EpochWrites, Performed, PrimaryDisks, PrimarySession, SessionAction, SessionConfig, SessionEnd,
    SessionEvent,
};
use storage_mirror::wire::{self, DiskToPrimary, DiskToStandby};
use vmm::devices::virtio::block::{DiskHooks, DiskJournal};

use super::capture::EpochObserver;
use super::vm::PrimaryVm;
use crate::link::{SendError, ToStandbyLink};
use crate::messages::ToStandby;

/// An epoch's journal of one disk, as storage-mirror's [`EpochWrites`] (shared with
/// the capture's payload: no copy).
struct JournalWrites(Arc<DiskJournal>);

impl EpochWrites for JournalWrites {
    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
    fn for_each_write(&self, f: &mut dyn FnMut(u64, &[u8])) {
        for (offset, data) in self.0.writes() {
            f(offset, data);
        }
    }
}

/// [`PrimaryDisks`] as the VMM's disk hooks and the capture's observer.
#[derive(Clone, Debug)]
pub struct MirroredDisks(pub Arc<PrimaryDisks>);

impl DiskHooks for MirroredDisks {
    fn before_writes(&self, disk: usize, ranges: &[(u64, u64)]) -> io::Result<()> {
        self.0.before_writes(disk, ranges)
    }
    fn read_failed(
        &self,
        disk: usize,
        offset: u64,
        buf: &mut [u8],
        err: &io::Error,
    ) -> io::Result<()> {
        self.0.read_failed(disk, offset, buf, err)
    }
    fn write_failed(
        &self,
        disk: usize,
        _offset: u64,
        _data: &[u8],
        err: &io::Error,
    ) -> io::Result<()> {
        self.0.write_failed(disk, err)
    }
    fn flush_failed(&self, disk: usize, err: &io::Error) -> io::Result<()> {
        // Protected: every epoch is durable on the standby once acknowledged.
        self.0.write_failed(disk, err)
    }
}

impl EpochObserver for MirroredDisks {
    fn read_back(&self) -> Vec<Vec<(u64, u64)>> {
        self.0.unsynced_ranges()
    }
    fn captured(&self, epoch: u64, journals: &[Arc<DiskJournal>]) {
        let writes = (0..self.0.len())
            .map(|i| {
                journals
                    .iter()
                    .find(|j| j.disk_index == i)
                    .map(|j| Arc::new(JournalWrites(j.clone())) as Arc<dyn EpochWrites>)
            })
            .collect();
        self.0.captured(epoch, writes);
    }
}

/// Wraps a disk message for the A-Link.
pub fn disk_msg(m: &DiskToStandby) -> Result<ToStandby, wire::WireError> {
    Ok(ToStandby::Disk(wire::encode(m)?))
}

/// How a step of the disk session went.
pub enum Step {
    Running,
    Ended(SessionEnd),
    PeerLost,
    /// This side cannot go on (the link or its disks failed).
    Failed(String),
}

/// The disk session of one standby connection.
pub struct DiskSide {
    pub disks: Arc<PrimaryDisks>,
    session: PrimarySession,
}

impl DiskSide {
    pub fn new(disks: Arc<PrimaryDisks>, cfg: SessionConfig, now: Instant) -> DiskSide {
        DiskSide {
            disks,
            session: PrimarySession::new(cfg, now),
        }
    }

    pub fn next_wakeup(&self, now: Instant) -> Option<Instant> {
        self.session.next_wakeup(now)
    }

    /// A message from the standby (decoded by `storage_mirror::wire`).
    pub fn on_msg(
        &mut self,
        m: DiskToPrimary,
        payload: &[u8],
        now: Instant,
        vm: &impl PrimaryVm,
        link: &impl ToStandbyLink,
    ) -> Step {
        match SessionEvent::from_msg(m, payload) {
            Some(ev) => self.feed(ev, now, vm, link),
            None => Step::Running,
        }
    }

    pub fn tick(&mut self, now: Instant, vm: &impl PrimaryVm, link: &impl ToStandbyLink) -> Step {
        self.feed(SessionEvent::Tick, now, vm, link)
    }

    pub fn peer_lost(&mut self, now: Instant, vm: &impl PrimaryVm, link: &impl ToStandbyLink) {
        let _ = self.feed(SessionEvent::PeerLost, now, vm, link);
    }

    fn feed(
        &mut self,
        ev: SessionEvent,
        now: Instant,
        vm: &impl PrimaryVm,
        link: &impl ToStandbyLink,
    ) -> Step {
        let mut queue = std::collections::VecDeque::from([ev]);
        let mut prepared = Vec::new();
        while let Some(ev) = queue.pop_front() {
            for a in self.session.on_event(ev, now, &*self.disks) {
                match &a {
                    SessionAction::Send(m) => {
                        if let Some(s) = send(link, m, Vec::new()) {
                            return s;
                        }
                        continue;
                    }
                    SessionAction::End(end) => return Step::Ended(end.clone()),
                    _ => {}
                }
                let performed = self.disks.perform(&a, &mut prepared);
                // The disks note writes as touched from here on; what the guest writes
                // from here on is in the written-block maps epoch 0 reads back.
                match &a {
                    SessionAction::BeginResync => vm.reset_written_blocks(None),
                    SessionAction::NewPass { disk } => vm.reset_written_blocks(Some(*disk)),
                    _ => {}
                }
                match performed {
                    Performed::Done => {}
                    Performed::Event(ev) => queue.push_back(ev),
                    Performed::Chunk(m, data) => {
                        if let Some(s) = send(link, &m, vec![alink::Bytes::from(data)]) {
                            return s;
                        }
                    }
                    Performed::Failed(why) => return Step::Failed(why),
                }
            }
        }
        Step::Running
    }
}

/// Sends a disk message; Some(step) when the session cannot go on.
fn send(link: &impl ToStandbyLink, m: &DiskToStandby, payload: Vec<alink::Bytes>) -> Option<Step> {
    let head = match disk_msg(m) {
        Ok(h) => h,
        Err(e) => return Some(Step::Failed(format!("encoding a disk message: {e}"))),
    };
    match link.send(&head, payload) {
        Ok(()) => None,
        Err(SendError::PeerLost) => Some(Step::PeerLost),
        Err(SendError::Failed(e)) => Some(Step::Failed(format!("A-Link: {e}"))),
        Err(SendError::Unsupported { version, what }) => Some(Step::Failed(format!(
            "the standby speaks A-Link protocol {version}, which has no such {what}"
        ))),
    }
}
