//! What the primary and the standby say to each other over the A-Link.
//!
//! Every message is a small postcard-encoded head plus, for page-carrying messages, a
//! raw payload that is never re-encoded: the sender hands the A-Link its staging buffers
//! as reference-counted chunks, the receiver reads the payload straight out of the
//! received frame as borrowed slices ([`PartView`]).
//!
//! A checkpoint epoch (or an initial-sync round) is split into *parts* so that no message
//! exceeds [`MAX_MESSAGE_BYTES`]. The payload of one part is laid out as
//! `[vm state][disk extent data, in extent order][console bytes][net frames, in frame
//! order][pages, in run order]`; the VM state and the output (console bytes, frames) are
//! carried only by the last part of an epoch.
//! Integrity is the A-Link's: its frame CRC-32C covers head and payload, computed over
//! the very buffers the primary sends and checked on the buffer the standby then stages
//! (a part-level checksum on top cost one more pass over every byte on each side and
//! caught nothing the frame check does not).
//!
//! Every count and size is bounded by an explicit limit, checked on encode and on
//! decode: a malformed or hostile head gives a typed [`DecodeError`], never a panic or an
//! unbounded allocation.
//!
//! Disk-mirroring messages travel in an opaque kind ([`ToStandby::Disk`],
//! [`ToPrimary::Disk`]): their own head as bytes (bounded by [`MAX_DISK_HEAD_BYTES`])
//! plus the payload (bounded by [`MAX_DISK_PAYLOAD_BYTES`]); what is inside is
//! `storage_mirror::wire`'s business.
//!
//! The standby decodes each message once ([`decode_standbound`]): a part keeps its
//! checked head beside the received buffer ([`ReceivedPart`]) and hands out borrowed
//! views of it ([`ReceivedPart::view`]) without checking again.

use std::borrow::Cow;

use serde::{Deserialize, Serialize};

/// Guest page size (x86-64; what KVM's dirty log and vm-memory's bitmap use).
pub const PAGE_SIZE: usize = 4096;
/// Pages in one part (16 MiB of page data).
pub const MAX_PAGES_PER_PART: u32 = 4096;
/// Contiguous page runs described by one part's head.
pub const MAX_RUNS_PER_PART: usize = 4096;
/// Pages in one epoch (4 GiB): an epoch dirtying more is refused by the encoder (the
/// primary must end epochs sooner); the standby refuses it as a protocol violation.
pub const MAX_PAGES_PER_EPOCH: u64 = 1 << 20;
/// Parts in one epoch.
pub const MAX_PARTS: u32 = (MAX_PAGES_PER_EPOCH / MAX_PAGES_PER_PART as u64) as u32 + 16;
/// Parts in one initial-sync round: 1 TiB of guest memory (round 0 sends all of it; the
/// standby keeps no per-part state for sync parts, it writes them in order).
pub const MAX_SYNC_PARTS: u32 = 1 << 16;
/// Encoded VM state (vCPUs, irqchip, devices): a few hundred KiB in practice.
pub const MAX_STATE_BYTES: u32 = 8 << 20;
/// Disk extents written in one part.
pub const MAX_DISK_EXTENTS_PER_PART: usize = 4096;
/// Disk data in one part.
pub const MAX_DISK_BYTES_PER_PART: u64 = 16 << 20;
/// Console bytes of one epoch (the output gate holds at most 32 MiB over all epochs).
pub const MAX_CONSOLE_BYTES_PER_EPOCH: u32 = 8 << 20;
/// Net frames of one epoch shipped for re-sending after a failover (see [`FrameOut`]).
/// Bounds the head (a few bytes per frame); an epoch that sent more ships only its
/// first frames.
pub const MAX_FRAMES_PER_EPOCH: usize = 4096;
/// Bytes of net frames of one epoch shipped; an epoch that sent more ships only the
/// frames that fit.
pub const MAX_FRAME_BYTES_PER_EPOCH: u32 = 4 << 20;
/// One frame (Ethernet header included): the virtio-net device's largest TX frame.
pub const MAX_FRAME_LEN: u32 = 65562;
/// Encoded head of one message.
pub const MAX_HEAD_BYTES: usize = 256 << 10;
/// Head bytes of one disk-mirroring message carried in [`ToStandby::Disk`] /
/// [`ToPrimary::Disk`].
pub const MAX_DISK_HEAD_BYTES: usize = 256 << 10;
/// Payload of one disk-mirroring message.
pub const MAX_DISK_PAYLOAD_BYTES: usize = 48 << 20;
/// Head plus payload of one message; below the A-Link's default frame limit (64 MiB).
pub const MAX_MESSAGE_BYTES: usize = MAX_HEAD_BYTES
    + MAX_STATE_BYTES as usize
    + MAX_DISK_BYTES_PER_PART as usize
    + MAX_CONSOLE_BYTES_PER_EPOCH as usize
    + MAX_FRAME_BYTES_PER_EPOCH as usize
    + MAX_PAGES_PER_PART as usize * PAGE_SIZE;

/// `pages` contiguous guest pages starting at guest-physical address `gpa`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PageRun {
    pub gpa: u64,
    pub pages: u32,
}

/// `len` bytes written at byte `offset` of disk `device` (index among the VM's block
/// devices) during the epoch; the data is in the payload.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskExtent {
    pub device: u16,
    pub offset: u64,
    pub len: u32,
}

/// The console output of an epoch: bytes `[pos, pos + len)` of the guest's console
/// stream (the data is in the payload).
///
/// Why it travels with the checkpoint: the primary may die after the standby committed
/// an epoch but before the primary released that epoch's output (the ack was in
/// flight). The standby's guest resumes *after* that output was produced, so it will not
/// produce it again: the standby must release it. It cannot know whether the primary
/// already did, so it releases it again at the same stream positions; a positional sink
/// (a file written at offsets) makes that idempotent — no gap, no duplicate. Network
/// frames travel too ([`FrameOut`]), with weaker rules.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsoleOut {
    pub pos: u64,
    pub len: u32,
}

/// One network frame the epoch sent on net device `net` (index among the VM's NICs):
/// `len` bytes, Ethernet header included, in the payload after the console bytes.
///
/// Why: as for [`ConsoleOut`], the primary may die after the standby committed an
/// epoch but before the primary released its frames. The resumed guest believes it
/// sent them; if they never reach the wire its TCP waits for its retransmission timeout
/// (at least 1 s in smoltcp) before sending them again. The standby sends them again
/// instead, right after the failover. A frame cannot be written "at a position", so a
/// frame the primary did release goes out twice: harmless on an Ethernet (TCP discards
/// a duplicate segment and ACKs again, ARP and ICMP answers are idempotent, UDP is
/// allowed duplicates). Best effort: an epoch that sent more than
/// [`MAX_FRAMES_PER_EPOCH`] frames or [`MAX_FRAME_BYTES_PER_EPOCH`] bytes ships only the
/// first that fit; the others are, to the guest, lost by the network (its TCP
/// retransmits them from the committed state).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FrameOut {
    pub net: u16,
    pub len: u32,
}

/// What a part belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PartOf {
    /// A round of the initial synchronisation, sent while the guest runs. Its pages go
    /// straight into the standby's mirror (which is not a valid replica before epoch 0).
    Sync { round: u32 },
    /// A checkpoint epoch: staged, then applied atomically once complete. `sync_rounds`
    /// is how many initial-sync rounds came before (meaningful in epoch 0, the final
    /// stop-and-copy: the standby applies it only once every round is complete).
    Epoch { epoch: u64, sync_rounds: u32 },
}

/// Head of a page-carrying message.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartHead {
    pub of: PartOf,
    /// Index of this part, `0..parts`.
    pub part: u32,
    pub parts: u32,
    /// Bytes of encoded VM state at the start of the payload (last part of an epoch
    /// only; 0 otherwise).
    pub state_len: u32,
    pub runs: Vec<PageRun>,
    pub disk: Vec<DiskExtent>,
    /// Console output the epoch produced (last part of an epoch only).
    pub console: Option<ConsoleOut>,
    /// Net frames the epoch sent, in order per NIC (last part of an epoch only).
    pub frames: Vec<FrameOut>,
    /// The primary had released the output of every epoch through this one when it sent
    /// this part (the standby then forgets that output).
    pub released_through: Option<u64>,
    /// Initial-sync parts only: pages that were all zero, sent as runs without data
    /// (a guest's free memory mostly is). Disjoint from `runs`; the standby zeroes them
    /// (in round 0 its mirror is still untouched zero memory and it skips them, so they
    /// cost neither the wire nor the standby's memory).
    pub zero: Vec<PageRun>,
    /// The sender's quorum generation (its fencing token; 0 = no quorum), the one its
    /// session's `Hello` carried: a standby that knows a higher one refuses the part
    /// (A-Link protocol 3). Set by the driver when it sends, not during the capture.
    pub generation: u64,
}

/// Primary to standby.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ToStandby {
    /// First message: the guest memory layout `(gpa, len)` the mirror must match, and
    /// the primary's quorum generation (its fencing token; 0 = no quorum): a standby
    /// that knows a higher one refuses the session (the primary lost the VM).
    Hello {
        layout: Vec<(u64, u64)>,
        generation: u64,
    },
    Part(PartHead),
    /// The initial synchronisation sent `pages` in `round` (progress report).
    SyncRoundDone {
        round: u32,
        pages: u64,
    },
    /// A disk-mirroring message: its own encoded head (opaque here); its payload is
    /// the message's.
    Disk(Vec<u8>),
    // New variants go last: postcard encodes the variant index.
    /// Planned role swap: the guest is paused at the end of `epoch`, which the standby
    /// acknowledged, and the primary released every output through `released_through`
    /// (= `epoch`). The standby answers [`ToPrimary::SwapAccepted`] and resumes the VM
    /// from `epoch`; the primary never resumes it once the acceptance arrived.
    Swap {
        epoch: u64,
        released_through: Option<u64>,
    },
}

/// Standby to primary.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ToPrimary {
    /// Every epoch up to and including `epoch` is applied on the standby (cumulative).
    /// `generation`: the highest quorum generation the standby knows; a primary that
    /// holds a lower one lost the VM (it releases nothing more and is demoted).
    Ack { epoch: u64, generation: u64 },
    /// A disk-mirroring message: its own encoded head (opaque here); its payload is
    /// the message's.
    Disk(Vec<u8>),
    /// The standby refused the session or a checkpoint: the primary's generation is
    /// older than `generation`, the one the standby knows (the primary lost the VM).
    Fenced { generation: u64 },
    // New variants go last: postcard encodes the variant index.
    /// The standby takes the VM over at `epoch` (answer to [`ToStandby::Swap`]): the
    /// handover point, after which the old primary must not resume its guest.
    SwapAccepted { epoch: u64 },
    /// The standby does not take the VM over at `epoch` (answer to [`ToStandby::Swap`]):
    /// the quorum did not grant it the next generation. The old primary resumes its
    /// guest and releases the swap point's output (acknowledged) itself.
    SwapRefused { epoch: u64 },
}

/// The A-Link protocol version whose messages [`ToStandby`] and [`ToPrimary`] are; a
/// session with a peer of the version before ([`legacy`]) is carried on in that
/// version's messages (rolling upgrade: one node upgraded at a time).
pub const WIRE_VERSION: u16 = 3;

/// The A-Link protocol version from which the initial sync's page data travels in
/// segmented frames: the primary lends each part's pages straight from guest memory
/// (`Alink::send_lent`) and the standby has them read straight into its mirror (a
/// placer). The messages are [`WIRE_VERSION`]'s; a session of protocol 3 (a peer of
/// the previous version) keeps the staged path: copies on both sides, plain frames.
pub const LENT_SYNC_VERSION: u16 = 4;

/// The messages of A-Link protocol 2, the version before [`WIRE_VERSION`]: a node that
/// was upgraded speaks them to a peer that was not yet. Protocol 3 added the quorum
/// generation to every part and ack, the standby's `Fenced` refusal and the planned role
/// swap (`Swap`, `SwapAccepted`: refused in a protocol-2 session); in a protocol-2
/// session the generation is the one the session's `Hello` carried (protocol 2 had it
/// there already) and a fenced primary is refused as protocol 2 did: at the `Hello`.
pub mod legacy {
    use super::{
        ConsoleOut, DiskExtent, FrameOut, PageRun, PartHead, PartOf, ToPrimary, ToStandby,
    };
    use serde::{Deserialize, Serialize};

    /// The protocol these messages are.
    pub const VERSION: u16 = super::WIRE_VERSION - 1;

    /// [`PartHead`] without the generation (field order kept: postcard is positional).
    #[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
    pub struct PartHeadV2 {
        pub of: PartOf,
        pub part: u32,
        pub parts: u32,
        pub state_len: u32,
        pub runs: Vec<PageRun>,
        pub disk: Vec<DiskExtent>,
        pub console: Option<ConsoleOut>,
        pub frames: Vec<FrameOut>,
        pub released_through: Option<u64>,
        pub zero: Vec<PageRun>,
    }

    /// [`ToStandby`] of protocol 2 (variant order kept).
    #[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
    pub enum ToStandbyV2 {
        Hello {
            layout: Vec<(u64, u64)>,
            generation: u64,
        },
        Part(PartHeadV2),
        SyncRoundDone {
            round: u32,
            pages: u64,
        },
        Disk(Vec<u8>),
    }

    /// [`ToPrimary`] of protocol 2 (variant order kept).
    #[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
    pub enum ToPrimaryV2 {
        Ack { epoch: u64 },
        Disk(Vec<u8>),
    }

    impl ToStandbyV2 {
        /// The protocol-2 form of `m`; None when protocol 2 has no such message.
        pub fn from_current(m: &ToStandby) -> Option<ToStandbyV2> {
            Some(match m {
                ToStandby::Hello { layout, generation } => ToStandbyV2::Hello {
                    layout: layout.clone(),
                    generation: *generation,
                },
                ToStandby::Part(h) => ToStandbyV2::Part(PartHeadV2 {
                    of: h.of,
                    part: h.part,
                    parts: h.parts,
                    state_len: h.state_len,
                    runs: h.runs.clone(),
                    disk: h.disk.clone(),
                    console: h.console,
                    frames: h.frames.clone(),
                    released_through: h.released_through,
                    zero: h.zero.clone(),
                }),
                ToStandby::SyncRoundDone { round, pages } => ToStandbyV2::SyncRoundDone {
                    round: *round,
                    pages: *pages,
                },
                ToStandby::Disk(h) => ToStandbyV2::Disk(h.clone()),
                // Protocol 3's planned role swap: a pair with an older node cannot swap
                // (the swap is refused before it starts, see `PrimaryDriver`).
                ToStandby::Swap { .. } => return None,
            })
        }

        /// The current form; a part is stamped with `session_generation` (the one the
        /// session's `Hello` carried: protocol 2 stamped only the `Hello`).
        pub fn into_current(self, session_generation: u64) -> ToStandby {
            match self {
                ToStandbyV2::Hello { layout, generation } => {
                    ToStandby::Hello { layout, generation }
                }
                ToStandbyV2::Part(h) => ToStandby::Part(PartHead {
                    of: h.of,
                    part: h.part,
                    parts: h.parts,
                    state_len: h.state_len,
                    runs: h.runs,
                    disk: h.disk,
                    console: h.console,
                    frames: h.frames,
                    released_through: h.released_through,
                    zero: h.zero,
                    generation: session_generation,
                }),
                ToStandbyV2::SyncRoundDone { round, pages } => {
                    ToStandby::SyncRoundDone { round, pages }
                }
                ToStandbyV2::Disk(h) => ToStandby::Disk(h),
            }
        }
    }

    impl ToPrimaryV2 {
        /// The protocol-2 form of `m`; None when protocol 2 has no such message (a
        /// `Fenced` refusal: a protocol-2 primary learns it at its next `Hello`).
        pub fn from_current(m: &ToPrimary) -> Option<ToPrimaryV2> {
            match m {
                ToPrimary::Ack { epoch, .. } => Some(ToPrimaryV2::Ack { epoch: *epoch }),
                ToPrimary::Disk(h) => Some(ToPrimaryV2::Disk(h.clone())),
                ToPrimary::Fenced { .. }
                | ToPrimary::SwapAccepted { .. }
                | ToPrimary::SwapRefused { .. } => None,
            }
        }

        /// The current form; an ack carries `session_generation` (the primary's own: a
        /// protocol-2 standby acknowledges only the session it accepted).
        pub fn into_current(self, session_generation: u64) -> ToPrimary {
            match self {
                ToPrimaryV2::Ack { epoch } => ToPrimary::Ack {
                    epoch,
                    generation: session_generation,
                },
                ToPrimaryV2::Disk(h) => ToPrimary::Disk(h),
            }
        }
    }
}

/// The head of a primary-to-standby message sent in a session of protocol `version`.
fn standby_head_at(
    version: u16,
    session_generation: u64,
    head: &[u8],
) -> Result<ToStandby, DecodeError> {
    if version >= WIRE_VERSION {
        decode_head::<ToStandby>(head)
    } else {
        decode_head::<legacy::ToStandbyV2>(head).map(|m| m.into_current(session_generation))
    }
}

/// The head of a standby-to-primary message sent in a session of protocol `version`.
fn primary_head_at(
    version: u16,
    session_generation: u64,
    head: &[u8],
) -> Result<ToPrimary, DecodeError> {
    if version >= WIRE_VERSION {
        decode_head::<ToPrimary>(head)
    } else {
        decode_head::<legacy::ToPrimaryV2>(head).map(|m| m.into_current(session_generation))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LimitError {
    #[error("{what}: {have} exceeds the limit of {max}")]
    Exceeded {
        what: &'static str,
        have: u64,
        max: u64,
    },
    #[error("page run at {gpa:#x} is not page aligned or is empty")]
    BadRun { gpa: u64 },
    #[error("payload is {have} bytes, the head describes {want}")]
    PayloadLen { have: u64, want: u64 },
    #[error("part {part} of {parts} is out of range")]
    PartIndex { part: u32, parts: u32 },
    #[error("VM state in part {part} of {parts}: only the last part of an epoch carries it")]
    StatePlacement { part: u32, parts: u32 },
    #[error("zero-page runs in an epoch part (only initial-sync parts carry them)")]
    ZeroRunsInEpoch,
}

/// A run must be non-empty, page aligned and end inside the address space.
fn check_run(r: &PageRun) -> Result<(), LimitError> {
    let end = u64::from(r.pages)
        .checked_mul(PAGE_SIZE as u64)
        .and_then(|l| r.gpa.checked_add(l));
    if r.pages == 0 || !r.gpa.is_multiple_of(PAGE_SIZE as u64) || end.is_none() {
        return Err(LimitError::BadRun { gpa: r.gpa });
    }
    Ok(())
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("message head of {0} bytes exceeds {MAX_HEAD_BYTES}")]
    HeadTooLarge(usize),
    #[error("message head does not decode: {0}")]
    Postcard(#[from] postcard::Error),
    #[error("message head has {0} trailing bytes")]
    Trailing(usize),
    #[error(transparent)]
    Limit(#[from] LimitError),
    #[error("payload checksum mismatch (head {stored:#010x}, computed {computed:#010x})")]
    Checksum { stored: u32, computed: u32 },
    #[error("a {0} message carries a payload")]
    UnexpectedPayload(&'static str),
    /// A message whose payload the A-Link placed or lost although it is no initial-sync
    /// part with page data only, or whose placement does not match its head.
    #[error("placed or lost payload: {0}")]
    Placement(&'static str),
}

fn exceeded(what: &'static str, have: u64, max: u64) -> Result<(), LimitError> {
    if have > max {
        return Err(LimitError::Exceeded { what, have, max });
    }
    Ok(())
}

impl PartHead {
    /// Whether the A-Link may carry this part's payload placed (or lose it): an
    /// initial-sync part within the limits whose payload is page data only, its runs
    /// in increasing address order without overlap (so its pages' places never
    /// overlap either).
    pub fn placeable(&self) -> bool {
        let mut end = 0u64;
        matches!(self.of, PartOf::Sync { .. })
            && self.check().is_ok()
            && self.state_len == 0
            && self.disk.is_empty()
            && self.console.is_none()
            && self.frames.is_empty()
            && self.runs.iter().all(|r| {
                let ok = r.gpa >= end && r.pages > 0;
                end = r.gpa.saturating_add(u64::from(r.pages) * PAGE_SIZE as u64);
                ok
            })
    }

    /// Sets the all-zero pages of an initial-sync part (see [`PartHead::zero`]),
    /// checking the limits again.
    pub fn with_zero_runs(mut self, zero: Vec<PageRun>) -> Result<PartHead, LimitError> {
        self.zero = zero;
        self.check()?;
        Ok(self)
    }

    /// All-zero pages of this part (no data in the payload).
    pub fn zero_page_count(&self) -> u64 {
        self.zero.iter().map(|r| u64::from(r.pages)).sum()
    }

    /// Total pages in this part.
    pub fn page_count(&self) -> u64 {
        self.runs.iter().map(|r| u64::from(r.pages)).sum()
    }

    /// Total disk bytes in this part.
    pub fn disk_bytes(&self) -> u64 {
        self.disk.iter().map(|d| u64::from(d.len)).sum()
    }

    /// Console bytes in this part.
    pub fn console_bytes(&self) -> u64 {
        self.console.map_or(0, |c| u64::from(c.len))
    }

    /// Net frame bytes in this part.
    pub fn frame_bytes(&self) -> u64 {
        self.frames.iter().map(|f| u64::from(f.len)).sum()
    }

    /// Payload length the head describes.
    pub fn payload_len(&self) -> u64 {
        u64::from(self.state_len)
            + self.disk_bytes()
            + self.console_bytes()
            + self.frame_bytes()
            + self.page_count() * PAGE_SIZE as u64
    }

    /// Checks every limit and the internal consistency of the head (not the payload).
    pub fn check(&self) -> Result<(), LimitError> {
        let max_parts = match self.of {
            PartOf::Sync { .. } => MAX_SYNC_PARTS,
            PartOf::Epoch { .. } => MAX_PARTS,
        };
        exceeded("parts", u64::from(self.parts), u64::from(max_parts))?;
        if self.parts == 0 || self.part >= self.parts {
            return Err(LimitError::PartIndex {
                part: self.part,
                parts: self.parts,
            });
        }
        exceeded("runs", self.runs.len() as u64, MAX_RUNS_PER_PART as u64)?;
        let mut pages = 0u64;
        for r in &self.runs {
            check_run(r)?;
            pages += u64::from(r.pages);
        }
        exceeded("pages in a part", pages, u64::from(MAX_PAGES_PER_PART))?;
        if !self.zero.is_empty() && !matches!(self.of, PartOf::Sync { .. }) {
            return Err(LimitError::ZeroRunsInEpoch);
        }
        exceeded(
            "zero runs",
            self.zero.len() as u64,
            MAX_RUNS_PER_PART as u64,
        )?;
        let mut zero_pages = 0u64;
        for r in &self.zero {
            check_run(r)?;
            zero_pages += u64::from(r.pages);
        }
        exceeded(
            "zero pages in a part",
            zero_pages,
            u64::from(MAX_PAGES_PER_PART),
        )?;
        exceeded(
            "disk extents",
            self.disk.len() as u64,
            MAX_DISK_EXTENTS_PER_PART as u64,
        )?;
        exceeded("disk bytes", self.disk_bytes(), MAX_DISK_BYTES_PER_PART)?;
        exceeded(
            "VM state bytes",
            u64::from(self.state_len),
            u64::from(MAX_STATE_BYTES),
        )?;
        let last = self.part + 1 == self.parts;
        let is_epoch = matches!(self.of, PartOf::Epoch { .. });
        exceeded(
            "console bytes",
            self.console_bytes(),
            u64::from(MAX_CONSOLE_BYTES_PER_EPOCH),
        )?;
        exceeded(
            "net frames",
            self.frames.len() as u64,
            MAX_FRAMES_PER_EPOCH as u64,
        )?;
        exceeded(
            "net frame bytes",
            self.frame_bytes(),
            u64::from(MAX_FRAME_BYTES_PER_EPOCH),
        )?;
        for f in &self.frames {
            if f.len == 0 {
                return Err(LimitError::Exceeded {
                    what: "net frame of no bytes",
                    have: 0,
                    max: 0,
                });
            }
            exceeded(
                "net frame length",
                u64::from(f.len),
                u64::from(MAX_FRAME_LEN),
            )?;
        }
        // An epoch's last part always carries the state; nothing else carries state or
        // output.
        if (self.state_len > 0) != (last && is_epoch)
            || ((self.console.is_some() || !self.frames.is_empty()) && !(last && is_epoch))
        {
            return Err(LimitError::StatePlacement {
                part: self.part,
                parts: self.parts,
            });
        }
        Ok(())
    }

    /// Builds a head for `payload` (the chunks in wire order), checking every limit and
    /// (integrity is the A-Link frame's checksum).
    #[allow(clippy::too_many_arguments)]
    pub fn new<C: AsRef<[u8]>>(
        of: PartOf,
        part: u32,
        parts: u32,
        state_len: u32,
        runs: Vec<PageRun>,
        disk: Vec<DiskExtent>,
        console: Option<ConsoleOut>,
        frames: Vec<FrameOut>,
        released_through: Option<u64>,
        payload: &[C],
    ) -> Result<PartHead, LimitError> {
        let h = PartHead {
            of,
            part,
            parts,
            state_len,
            runs,
            disk,
            console,
            frames,
            released_through,
            zero: Vec::new(),
            generation: 0,
        };
        h.check()?;
        let have: u64 = payload.iter().map(|c| c.as_ref().len() as u64).sum();
        if have != h.payload_len() {
            return Err(LimitError::PayloadLen {
                have,
                want: h.payload_len(),
            });
        }
        Ok(h)
    }
}

/// A part checked against its payload, borrowing the payload.
#[derive(Debug)]
pub struct PartView<'a> {
    pub head: Cow<'a, PartHead>,
    pub state: &'a [u8],
    /// Console bytes (see [`ConsoleOut`]).
    pub console: &'a [u8],
    frame_data: &'a [u8],
    disk_data: &'a [u8],
    page_data: &'a [u8],
}

impl<'a> PartView<'a> {
    /// Checks `head` (limits, payload length) against `payload`.
    pub fn new(head: PartHead, payload: &'a [u8]) -> Result<PartView<'a>, DecodeError> {
        check_part(&head, payload)?;
        Ok(PartView::split(Cow::Owned(head), payload))
    }

    /// The view of a head already checked against `payload` (see [`check_part`]).
    fn split(head: Cow<'a, PartHead>, payload: &'a [u8]) -> PartView<'a> {
        // The lengths were checked against the payload: these splits are in range, and
        // `split_at_checked` keeps a broken invariant from panicking.
        let cut = |rest: &'a [u8], n: u64| {
            rest.split_at_checked(n as usize)
                .unwrap_or((rest, &rest[rest.len()..]))
        };
        let (state, rest) = cut(payload, u64::from(head.state_len));
        let (disk_data, rest) = cut(rest, head.disk_bytes());
        let (console, rest) = cut(rest, head.console_bytes());
        let (frame_data, page_data) = cut(rest, head.frame_bytes());
        PartView {
            head,
            state,
            console,
            frame_data,
            disk_data,
            page_data,
        }
    }

    /// Every page as `(gpa, 4 KiB of data)`, in run order.
    pub fn pages(&self) -> impl Iterator<Item = (u64, &'a [u8])> + '_ {
        let data = self.page_data;
        self.head
            .runs
            .iter()
            .flat_map(|r| (0..u64::from(r.pages)).map(move |i| r.gpa + i * PAGE_SIZE as u64))
            .zip(data.chunks_exact(PAGE_SIZE))
    }

    /// The guest-physical address of every all-zero page (initial-sync parts only).
    pub fn zero_pages(&self) -> impl Iterator<Item = u64> + '_ {
        self.head
            .zero
            .iter()
            .flat_map(|r| (0..u64::from(r.pages)).map(move |i| r.gpa + i * PAGE_SIZE as u64))
    }

    /// Every net frame as `(net device index, frame)`, in order.
    pub fn frames(&self) -> impl Iterator<Item = (u16, &'a [u8])> + '_ {
        let mut off = 0usize;
        let data = self.frame_data;
        self.head.frames.iter().map(move |f| {
            let s = &data[off..off + f.len as usize];
            off += f.len as usize;
            (f.net, s)
        })
    }

    /// Every disk write as `(extent, data)`, in order.
    pub fn disk_writes(&self) -> impl Iterator<Item = (DiskExtent, &'a [u8])> + '_ {
        let mut off = 0usize;
        let data = self.disk_data;
        self.head.disk.iter().map(move |d| {
            let s = &data[off..off + d.len as usize];
            off += d.len as usize;
            (*d, s)
        })
    }
}

fn decode_head<'a, T: Deserialize<'a>>(head: &'a [u8]) -> Result<T, DecodeError> {
    if head.len() > MAX_HEAD_BYTES {
        return Err(DecodeError::HeadTooLarge(head.len()));
    }
    let (v, rest) = postcard::take_from_bytes::<T>(head)?;
    if !rest.is_empty() {
        return Err(DecodeError::Trailing(rest.len()));
    }
    Ok(v)
}

/// Checks a part's head (limits) and its payload's length.
pub fn check_part(head: &PartHead, payload: &[u8]) -> Result<(), DecodeError> {
    head.check()?;
    let want = head.payload_len();
    if payload.len() as u64 != want {
        return Err(LimitError::PayloadLen {
            have: payload.len() as u64,
            want,
        }
        .into());
    }
    Ok(())
}

/// A decoded primary-to-standby message (a transient value: the view of a part is the
/// large variant, and boxing it would cost an allocation per message).
#[derive(Debug)]
#[allow(clippy::large_enum_variant)]
pub enum StandboundMsg<'a> {
    Hello {
        layout: Vec<(u64, u64)>,
        generation: u64,
    },
    Part(PartView<'a>),
    SyncRoundDone {
        round: u32,
        pages: u64,
    },
    /// A disk-mirroring message: its head (opaque here) and its payload.
    Disk {
        head: Vec<u8>,
        payload: &'a [u8],
    },
    Swap {
        epoch: u64,
        released_through: Option<u64>,
        /// Frames the old primary's TAPs received after its guest's final pause.
        rx_frames: Vec<(u16, Vec<u8>)>,
    },
}

/// Frames a `Swap` carries, at most (a paused guest's TAP queues about 1,000).
pub const MAX_SWAP_RX_FRAMES: usize = 2048;
/// Bytes of one carried frame, at most (a 64 KiB frame plus its Ethernet header).
pub const MAX_SWAP_RX_FRAME: usize = 65550;

/// The payload of a `Swap`: the frames the old primary's TAPs received after its
/// guest's final pause, which the new primary's guest receives first (they would
/// otherwise die with the old VM and the client resend them only after its TCP
/// retransmission timeout). Each: net index (u16 LE), length (u32 LE), the frame.
pub fn encode_rx_frames(frames: &[(u16, Vec<u8>)]) -> Vec<u8> {
    let mut out = Vec::with_capacity(frames.iter().map(|(_, f)| f.len() + 6).sum());
    for (net, f) in frames {
        out.extend_from_slice(&net.to_le_bytes());
        out.extend_from_slice(&(f.len() as u32).to_le_bytes());
        out.extend_from_slice(f);
    }
    out
}

/// Decodes [`encode_rx_frames`]' payload, checking every limit.
pub fn decode_rx_frames(mut p: &[u8]) -> Result<Vec<(u16, Vec<u8>)>, DecodeError> {
    let mut out = Vec::new();
    while !p.is_empty() {
        exceeded(
            "swap frames",
            out.len() as u64 + 1,
            MAX_SWAP_RX_FRAMES as u64,
        )?;
        if p.len() < 6 {
            return Err(DecodeError::UnexpectedPayload("swap frame head"));
        }
        let net = u16::from_le_bytes([p[0], p[1]]);
        let len = u32::from_le_bytes([p[2], p[3], p[4], p[5]]) as usize;
        exceeded("swap frame bytes", len as u64, MAX_SWAP_RX_FRAME as u64)?;
        let Some(f) = p.get(6..6 + len) else {
            return Err(DecodeError::UnexpectedPayload("swap frame"));
        };
        out.push((net, f.to_vec()));
        p = &p[6 + len..];
    }
    Ok(out)
}

/// `(net, frame)` pairs grouped per net, each group in order.
pub fn per_net(frames: Vec<(u16, Vec<u8>)>) -> Vec<(u16, Vec<Vec<u8>>)> {
    let mut out: Vec<(u16, Vec<Vec<u8>>)> = Vec::new();
    for (net, f) in frames {
        match out.iter_mut().find(|(n, _)| *n == net) {
            Some((_, v)) => v.push(f),
            None => out.push((net, vec![f])),
        }
    }
    out
}

fn check_disk(head: &[u8], payload: &[u8]) -> Result<(), DecodeError> {
    exceeded(
        "disk message head bytes",
        head.len() as u64,
        MAX_DISK_HEAD_BYTES as u64,
    )?;
    exceeded(
        "disk message payload bytes",
        payload.len() as u64,
        MAX_DISK_PAYLOAD_BYTES as u64,
    )?;
    Ok(())
}

/// Memory regions in a `Hello`, at most.
pub const MAX_REGIONS: usize = 64;

/// Decodes a message from the primary: its head and its payload (validated, borrowed).
pub fn decode_to_standby<'a>(
    head: &[u8],
    payload: &'a [u8],
) -> Result<StandboundMsg<'a>, DecodeError> {
    decode_to_standby_at(WIRE_VERSION, 0, head, payload)
}

/// [`decode_to_standby`] of a message sent in a session of protocol `version`
/// (`session_generation`: the one its `Hello` carried, for [`legacy`] parts).
pub fn decode_to_standby_at<'a>(
    version: u16,
    session_generation: u64,
    head: &[u8],
    payload: &'a [u8],
) -> Result<StandboundMsg<'a>, DecodeError> {
    let bare = |what| {
        if payload.is_empty() {
            Ok(())
        } else {
            Err(DecodeError::UnexpectedPayload(what))
        }
    };
    match standby_head_at(version, session_generation, head)? {
        ToStandby::Hello { layout, generation } => {
            bare("hello")?;
            exceeded("memory regions", layout.len() as u64, MAX_REGIONS as u64)?;
            Ok(StandboundMsg::Hello { layout, generation })
        }
        ToStandby::SyncRoundDone { round, pages } => {
            bare("sync-round-done")?;
            Ok(StandboundMsg::SyncRoundDone { round, pages })
        }
        ToStandby::Part(h) => Ok(StandboundMsg::Part(PartView::new(h, payload)?)),
        ToStandby::Disk(head) => {
            check_disk(&head, payload)?;
            Ok(StandboundMsg::Disk { head, payload })
        }
        ToStandby::Swap {
            epoch,
            released_through,
        } => Ok(StandboundMsg::Swap {
            epoch,
            released_through,
            rx_frames: decode_rx_frames(payload)?,
        }),
    }
}

/// A part as the standby received it, decoded and checked once: the head beside the
/// message body it came in (the A-Link's receive buffer, kept as it is: no copy).
pub struct ReceivedPart {
    head: PartHead,
    body: alink::Buf,
    head_len: usize,
    data: PartData,
}

/// Where a received part's page data is.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum PartData {
    /// In the receive buffer, after the head (checked by the A-Link frame's CRC).
    #[default]
    Inline,
    /// An initial-sync part's page data, written by the A-Link straight into the
    /// mirror's pages (the places [`crate::standby::SyncPlacer`] gave) and checked there
    /// segment (page) by segment, except the `torn` pages (indexes in the part's page
    /// order): the primary saw them change while it sent them, so their bytes are stale
    /// and unchecked, and the primary sends them again (they are dirty there). `seq`:
    /// the A-Link message's sequence number (the placer records the ones it placed).
    Placed { torn: Vec<u32>, seq: u64 },
    /// An initial-sync part whose lent pages the primary could no longer send (its link
    /// failed after the loan ended): the places given for it may hold part of it; the
    /// primary sends those pages again.
    Lost,
}

impl std::fmt::Debug for ReceivedPart {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReceivedPart")
            .field("of", &self.head.of)
            .field("part", &self.head.part)
            .field("parts", &self.head.parts)
            .field("bytes", &self.body.len())
            .field("data", &self.data)
            .finish()
    }
}

impl ReceivedPart {
    pub fn head(&self) -> &PartHead {
        &self.head
    }

    /// Where the page data is (placed and lost parts' views have no page data).
    pub fn data(&self) -> &PartData {
        &self.data
    }

    /// The part's contents, borrowed (not checked again: they were when received).
    pub fn view(&self) -> PartView<'_> {
        let payload = self.body.get(self.head_len..).unwrap_or(&[]);
        PartView::split(Cow::Borrowed(&self.head), payload)
    }

    /// Bytes of the message body (head and payload) held.
    pub fn len(&self) -> usize {
        self.body.len()
    }

    pub fn is_empty(&self) -> bool {
        self.body.is_empty()
    }
}

/// A disk-mirroring message as the standby received it: its head (opaque here) and
/// the message body its payload is in.
pub struct ReceivedDisk {
    pub head: Vec<u8>,
    body: alink::Buf,
    head_len: usize,
}

impl ReceivedDisk {
    pub fn payload(&self) -> &[u8] {
        self.body.get(self.head_len..).unwrap_or(&[])
    }
}

/// A primary-to-standby message decoded once, owning its received buffer.
pub enum Standbound {
    Hello {
        layout: Vec<(u64, u64)>,
        generation: u64,
    },
    Part(ReceivedPart),
    SyncRoundDone {
        round: u32,
        pages: u64,
    },
    Disk(ReceivedDisk),
    Swap {
        epoch: u64,
        released_through: Option<u64>,
        /// See [`StandboundMsg::Swap`].
        rx_frames: Vec<(u16, Vec<u8>)>,
    },
}

/// Decodes a received message body (`body[..head_len]` is the head, as the A-Link
/// delivers it), checking everything once.
pub fn decode_standbound(
    head_len: usize,
    body: impl Into<alink::Buf>,
) -> Result<Standbound, DecodeError> {
    decode_standbound_at(WIRE_VERSION, 0, head_len, body)
}

/// [`decode_standbound`] of a message sent in a session of protocol `version`
/// (`session_generation`: the one its `Hello` carried, for [`legacy`] parts).
pub fn decode_standbound_at(
    version: u16,
    session_generation: u64,
    head_len: usize,
    body: impl Into<alink::Buf>,
) -> Result<Standbound, DecodeError> {
    let body = body.into();
    let head_len = head_len.min(body.len());
    let (h, payload) = body.split_at(head_len);
    let bare = |what| {
        if payload.is_empty() {
            Ok(())
        } else {
            Err(DecodeError::UnexpectedPayload(what))
        }
    };
    match standby_head_at(version, session_generation, h)? {
        ToStandby::Hello { layout, generation } => {
            bare("hello")?;
            exceeded("memory regions", layout.len() as u64, MAX_REGIONS as u64)?;
            Ok(Standbound::Hello { layout, generation })
        }
        ToStandby::SyncRoundDone { round, pages } => {
            bare("sync-round-done")?;
            Ok(Standbound::SyncRoundDone { round, pages })
        }
        ToStandby::Part(head) => {
            check_part(&head, payload)?;
            Ok(Standbound::Part(ReceivedPart {
                head,
                body,
                head_len,
                data: PartData::Inline,
            }))
        }
        ToStandby::Disk(head) => {
            check_disk(&head, payload)?;
            Ok(Standbound::Disk(ReceivedDisk {
                head,
                body,
                head_len,
            }))
        }
        ToStandby::Swap {
            epoch,
            released_through,
        } => Ok(Standbound::Swap {
            epoch,
            released_through,
            rx_frames: decode_rx_frames(payload)?,
        }),
    }
}

/// The head of a placeable initial-sync part (see [`PartHead::placeable`]) of a session
/// of protocol [`LENT_SYNC_VERSION`] or later, from its encoded head; None for any other
/// message.
pub fn decode_head_of_sync_part(head: &[u8]) -> Option<PartHead> {
    match decode_head::<ToStandby>(head) {
        Ok(ToStandby::Part(h)) if h.placeable() => Some(h),
        _ => None,
    }
}

/// Decodes a message as the A-Link delivered it: [`decode_standbound_at`] when its
/// payload is in its body; else (placed or lost: see [`PartData`]) it must be an
/// initial-sync part of page data only whose head matches the placement: page-sized
/// segments, the payload's length, torn pages inside the part.
pub fn decode_delivered(
    version: u16,
    session_generation: u64,
    m: alink::InMsg,
) -> Result<Standbound, DecodeError> {
    let data = match m.at {
        alink::PayloadAt::InBody => {
            return decode_standbound_at(version, session_generation, m.head_len, m.body)
        }
        alink::PayloadAt::Placed => PartData::Placed {
            torn: m.torn,
            seq: m.seq,
        },
        alink::PayloadAt::Lost => PartData::Lost,
    };
    let head_len = m.head_len.min(m.body.len());
    if m.body.len() != head_len {
        return Err(DecodeError::Placement("a payload beside the placed one"));
    }
    let ToStandby::Part(head) = standby_head_at(version, session_generation, &m.body)? else {
        return Err(DecodeError::Placement("not a checkpoint part"));
    };
    if !head.placeable() {
        return Err(DecodeError::Placement(
            "not an initial-sync part of pages only",
        ));
    }
    if m.seg_size as usize != PAGE_SIZE {
        return Err(DecodeError::Placement("segments are not pages"));
    }
    if let PartData::Placed { torn, .. } = &data {
        if m.placed_len as u64 != head.payload_len() {
            return Err(LimitError::PayloadLen {
                have: m.placed_len as u64,
                want: head.payload_len(),
            }
            .into());
        }
        if torn.iter().any(|&t| u64::from(t) >= head.page_count()) {
            return Err(DecodeError::Placement("a torn segment outside the part"));
        }
    }
    Ok(Standbound::Part(ReceivedPart {
        head,
        body: m.body,
        head_len,
        data,
    }))
}

/// A decoded standby-to-primary message.
#[derive(Debug)]
pub enum PrimaryboundMsg<'a> {
    Ack {
        epoch: u64,
        generation: u64,
    },
    /// The standby refused this primary's generation (see [`ToPrimary::Fenced`]).
    Fenced {
        generation: u64,
    },
    /// A disk-mirroring message: its head (opaque here) and its payload.
    Disk {
        head: Vec<u8>,
        payload: &'a [u8],
    },
    SwapAccepted {
        epoch: u64,
    },
    SwapRefused {
        epoch: u64,
    },
}

impl PrimaryboundMsg<'_> {
    /// The generation that fences a primary holding `own`: the one this message
    /// carries when it is newer (an ack or a refusal from a standby that knows a later
    /// takeover). The primary's receive side asks this before releasing anything on an
    /// acknowledgement: one integer compared.
    pub fn fences(&self, own: u64) -> Option<u64> {
        match *self {
            PrimaryboundMsg::Ack { generation, .. } | PrimaryboundMsg::Fenced { generation }
                if generation > own =>
            {
                Some(generation)
            }
            _ => None,
        }
    }

    /// The generation of an acknowledgement from a standby session of an OLDER
    /// generation than `own` (a standby echoes the session's, or a newer one it knows):
    /// the primary refuses it, releasing nothing on it, and ends that session.
    pub fn stale(&self, own: u64) -> Option<u64> {
        match *self {
            PrimaryboundMsg::Ack { generation, .. } if generation < own => Some(generation),
            _ => None,
        }
    }
}

/// Decodes a message from the standby.
pub fn decode_to_primary<'a>(
    head: &[u8],
    payload: &'a [u8],
) -> Result<PrimaryboundMsg<'a>, DecodeError> {
    decode_to_primary_at(WIRE_VERSION, 0, head, payload)
}

/// [`decode_to_primary`] of a message sent in a session of protocol `version`
/// (`session_generation`: the primary's own, for [`legacy`] acks).
pub fn decode_to_primary_at<'a>(
    version: u16,
    session_generation: u64,
    head: &[u8],
    payload: &'a [u8],
) -> Result<PrimaryboundMsg<'a>, DecodeError> {
    match primary_head_at(version, session_generation, head)? {
        ToPrimary::Ack { epoch, generation } => {
            if !payload.is_empty() {
                return Err(DecodeError::UnexpectedPayload("ack"));
            }
            Ok(PrimaryboundMsg::Ack { epoch, generation })
        }
        ToPrimary::Fenced { generation } => {
            if !payload.is_empty() {
                return Err(DecodeError::UnexpectedPayload("fenced"));
            }
            Ok(PrimaryboundMsg::Fenced { generation })
        }
        ToPrimary::Disk(head) => {
            check_disk(&head, payload)?;
            Ok(PrimaryboundMsg::Disk { head, payload })
        }
        ToPrimary::SwapAccepted { epoch } => {
            if !payload.is_empty() {
                return Err(DecodeError::UnexpectedPayload("swap-accepted"));
            }
            Ok(PrimaryboundMsg::SwapAccepted { epoch })
        }
        ToPrimary::SwapRefused { epoch } => {
            if !payload.is_empty() {
                return Err(DecodeError::UnexpectedPayload("swap-refused"));
            }
            Ok(PrimaryboundMsg::SwapRefused { epoch })
        }
    }
}

/// Splits `runs` (ascending, page-aligned) into groups of at most
/// [`MAX_PAGES_PER_PART`] pages and [`MAX_RUNS_PER_PART`] runs, splitting a run across
/// parts when needed. Always returns at least one (possibly empty) group, so that an
/// epoch with no dirty page still has a part to carry its state.
pub fn split_runs(runs: impl IntoIterator<Item = PageRun>, max_pages: u32) -> Vec<Vec<PageRun>> {
    let max_pages = max_pages.clamp(1, MAX_PAGES_PER_PART);
    let mut out = vec![Vec::new()];
    let mut in_cur = 0u32;
    for mut r in runs {
        while r.pages > 0 {
            let full = in_cur == max_pages
                || out.last().map(|v| v.len()).unwrap_or(0) == MAX_RUNS_PER_PART;
            if full {
                out.push(Vec::new());
                in_cur = 0;
            }
            let take = r.pages.min(max_pages - in_cur);
            if let Some(cur) = out.last_mut() {
                cur.push(PageRun {
                    gpa: r.gpa,
                    pages: take,
                });
            }
            in_cur += take;
            r.gpa += u64::from(take) * PAGE_SIZE as u64;
            r.pages -= take;
        }
    }
    out
}

/// Encodes a head for the A-Link (`Alink::send` takes the head by reference; this is for
/// transports that want bytes, e.g. the simulation).
pub fn encode<T: Serialize>(head: &T) -> Result<Vec<u8>, postcard::Error> {
    postcard::to_stdvec(head)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page(fill: u8) -> Vec<u8> {
        vec![fill; PAGE_SIZE]
    }

    #[test]
    fn a_swap_carries_the_frames_received_after_the_pause() {
        let frames = vec![(0u16, vec![1u8; 60]), (1, vec![2; 1514]), (0, vec![3; 42])];
        let head = encode(&ToStandby::Swap {
            epoch: 9,
            released_through: Some(7),
        })
        .unwrap();
        let mut body = head.clone();
        body.extend_from_slice(&encode_rx_frames(&frames));
        match decode_standbound(head.len(), body).unwrap() {
            Standbound::Swap {
                epoch,
                released_through,
                rx_frames,
            } => {
                assert_eq!((epoch, released_through), (9, Some(7)));
                assert_eq!(rx_frames, frames);
            }
            _ => panic!("not a swap"),
        }
        // Without frames: the swap of a guest whose TAPs received nothing.
        match decode_to_standby(&head, &[]).unwrap() {
            StandboundMsg::Swap { rx_frames, .. } => assert!(rx_frames.is_empty()),
            _ => panic!("not a swap"),
        }
        assert_eq!(
            per_net(frames),
            vec![
                (0, vec![vec![1u8; 60], vec![3; 42]]),
                (1, vec![vec![2u8; 1514]])
            ]
        );
        // A frame cut short, or one longer than any frame, is refused.
        let p = encode_rx_frames(&[(0, vec![1u8; 60])]);
        assert!(decode_rx_frames(&p[..p.len() - 1]).is_err());
        assert!(decode_rx_frames(&p[..3]).is_err());
        let huge = encode_rx_frames(&[(0, vec![0u8; MAX_SWAP_RX_FRAME + 1])]);
        assert!(decode_rx_frames(&huge).is_err());
        let many: Vec<_> = (0..=MAX_SWAP_RX_FRAMES)
            .map(|_| (0u16, vec![0u8; 1]))
            .collect();
        assert!(decode_rx_frames(&encode_rx_frames(&many)).is_err());
    }

    #[test]
    fn hello_carries_the_generation_both_ways() {
        let head = encode(&ToStandby::Hello {
            layout: vec![(0, 1 << 20)],
            generation: 7,
        })
        .unwrap();
        match decode_standbound(head.len(), head.clone()).unwrap() {
            Standbound::Hello { layout, generation } => {
                assert_eq!(layout, vec![(0, 1 << 20)]);
                assert_eq!(generation, 7);
            }
            _ => panic!("not a hello"),
        }
        match decode_to_standby(&head, &[]).unwrap() {
            StandboundMsg::Hello { generation, .. } => assert_eq!(generation, 7),
            _ => panic!("not a hello"),
        }
        // A hello cut short (a peer that sent no generation) is refused, not guessed.
        let short = encode(&ToStandby::Hello {
            layout: vec![],
            generation: 0,
        })
        .unwrap();
        assert!(decode_standbound(short.len() - 1, short[..short.len() - 1].to_vec()).is_err());
    }

    #[test]
    fn roundtrip_epoch_part_borrows_payload() {
        let state = b"state-bytes".to_vec();
        let disk = vec![7u8; 512];
        let pages = [page(1), page(2), page(3)].concat();
        let console = b"hello\n".to_vec();
        let frames = b"frame-0frame-one".to_vec();
        let chunks = [
            state.clone(),
            disk.clone(),
            console.clone(),
            frames.clone(),
            pages.clone(),
        ];
        let h = PartHead::new(
            PartOf::Epoch {
                epoch: 9,
                sync_rounds: 0,
            },
            0,
            1,
            state.len() as u32,
            vec![
                PageRun {
                    gpa: 0x1000,
                    pages: 2,
                },
                PageRun {
                    gpa: 0x8000,
                    pages: 1,
                },
            ],
            vec![DiskExtent {
                device: 0,
                offset: 4096,
                len: 512,
            }],
            Some(ConsoleOut { pos: 100, len: 6 }),
            vec![FrameOut { net: 0, len: 7 }, FrameOut { net: 1, len: 9 }],
            Some(8),
            &chunks,
        )
        .unwrap();
        let head = encode(&ToStandby::Part(h.clone())).unwrap();
        let payload = chunks.concat();
        let StandboundMsg::Part(v) = decode_to_standby(&head, &payload).unwrap() else {
            panic!("not a part");
        };
        assert_eq!(*v.head, h);
        assert_eq!(v.state, &state[..]);
        assert_eq!(v.console, &console[..]);
        let f: Vec<_> = v.frames().collect();
        assert_eq!(f, vec![(0, &b"frame-0"[..]), (1, &b"frame-one"[..])]);
        let p: Vec<_> = v.pages().map(|(g, d)| (g, d[0])).collect();
        assert_eq!(p, vec![(0x1000, 1), (0x2000, 2), (0x8000, 3)]);
        let d: Vec<_> = v.disk_writes().collect();
        assert_eq!(d.len(), 1);
        assert_eq!(d[0].1, &disk[..]);
        // Borrowed: the page slice points into the payload.
        let first = v.pages().next().unwrap().1.as_ptr();
        assert_eq!(
            first,
            payload[state.len() + disk.len() + console.len() + frames.len()..].as_ptr()
        );
    }

    #[test]
    fn zero_runs_only_in_sync_parts_and_bounded() {
        // An empty sync part; an epoch's only part carries a 1-byte state.
        let mk = |of| {
            let state: &[u8] = match of {
                PartOf::Sync { .. } => b"",
                PartOf::Epoch { .. } => b"S",
            };
            PartHead::new(
                of,
                0,
                1,
                state.len() as u32,
                vec![],
                vec![],
                None,
                vec![],
                None,
                &[state],
            )
            .unwrap()
        };
        let z = vec![PageRun {
            gpa: 0x1000,
            pages: 2,
        }];
        let sync = mk(PartOf::Sync { round: 0 })
            .with_zero_runs(z.clone())
            .unwrap();
        assert_eq!(sync.zero_page_count(), 2);
        assert_eq!(sync.payload_len(), 0, "zero pages carry no data");
        let epoch = mk(PartOf::Epoch {
            epoch: 1,
            sync_rounds: 0,
        });
        assert_eq!(epoch.with_zero_runs(z), Err(LimitError::ZeroRunsInEpoch));
        let s = mk(PartOf::Sync { round: 0 });
        assert!(matches!(
            s.clone().with_zero_runs(vec![PageRun {
                gpa: 0x1001,
                pages: 1
            }]),
            Err(LimitError::BadRun { .. })
        ));
        assert!(matches!(
            s.with_zero_runs(vec![PageRun {
                gpa: 0,
                pages: MAX_PAGES_PER_PART + 1
            }]),
            Err(LimitError::Exceeded { .. })
        ));
    }

    #[test]
    fn payload_of_the_wrong_length_is_refused() {
        let chunks = [b"s".to_vec(), page(5)];
        let h = PartHead::new(
            PartOf::Epoch {
                epoch: 1,
                sync_rounds: 0,
            },
            0,
            1,
            1,
            vec![PageRun { gpa: 0, pages: 1 }],
            vec![],
            None,
            Vec::new(),
            None,
            &chunks,
        )
        .unwrap();
        let head = encode(&ToStandby::Part(h)).unwrap();
        let payload = chunks.concat();
        assert!(decode_to_standby(&head, &payload).is_ok());
        assert!(matches!(
            decode_to_standby(&head, &payload[1..]),
            Err(DecodeError::Limit(LimitError::PayloadLen { .. }))
        ));
    }

    #[test]
    fn limits_are_enforced() {
        let mk = |runs: Vec<PageRun>, state_len: u32, part: u32, parts: u32| PartHead {
            of: PartOf::Epoch {
                epoch: 1,
                sync_rounds: 0,
            },
            part,
            parts,
            state_len,
            runs,
            disk: vec![],
            console: None,
            frames: vec![],
            released_through: None,
            zero: vec![],
            generation: 0,
        };
        let too_many = mk(
            vec![PageRun {
                gpa: 0,
                pages: MAX_PAGES_PER_PART + 1,
            }],
            1,
            0,
            1,
        );
        assert!(matches!(too_many.check(), Err(LimitError::Exceeded { .. })));
        let unaligned = mk(vec![PageRun { gpa: 12, pages: 1 }], 1, 0, 1);
        assert_eq!(unaligned.check(), Err(LimitError::BadRun { gpa: 12 }));
        let overflow = mk(
            vec![PageRun {
                gpa: !0xfff,
                pages: 2,
            }],
            1,
            0,
            1,
        );
        assert!(overflow.check().is_err());
        assert!(matches!(
            mk(vec![], 1, 2, 2).check(),
            Err(LimitError::PartIndex { .. })
        ));
        // State only in the last part of an epoch.
        assert!(matches!(
            mk(vec![], 1, 0, 2).check(),
            Err(LimitError::StatePlacement { .. })
        ));
        assert!(matches!(
            mk(vec![], 0, 1, 2).check(),
            Err(LimitError::StatePlacement { .. })
        ));
        assert!(mk(vec![], 0, 0, 2).check().is_ok());
        // Frames: only in the last part, bounded in count, size and length.
        let mut h = mk(vec![], 0, 0, 2);
        h.frames = vec![FrameOut { net: 0, len: 60 }];
        assert!(matches!(h.check(), Err(LimitError::StatePlacement { .. })));
        let mut h = mk(vec![], 1, 0, 1);
        h.frames = vec![FrameOut { net: 0, len: 60 }];
        assert!(h.check().is_ok());
        h.frames = vec![FrameOut { net: 0, len: 0 }];
        assert!(h.check().is_err());
        h.frames = vec![FrameOut {
            net: 0,
            len: MAX_FRAME_LEN + 1,
        }];
        assert!(h.check().is_err());
        h.frames = vec![FrameOut { net: 0, len: 60 }; MAX_FRAMES_PER_EPOCH + 1];
        assert!(h.check().is_err());
        h.frames = vec![
            FrameOut {
                net: 0,
                len: MAX_FRAME_LEN,
            };
            (MAX_FRAME_BYTES_PER_EPOCH / MAX_FRAME_LEN) as usize + 1
        ];
        assert!(h.check().is_err());
    }

    #[test]
    fn parts_acks_and_refusals_carry_the_generation() {
        let h = PartHead::new(
            PartOf::Epoch {
                epoch: 4,
                sync_rounds: 1,
            },
            0,
            1,
            8,
            Vec::new(),
            Vec::new(),
            None,
            Vec::new(),
            None,
            &[[0u8; 8]],
        )
        .unwrap();
        let mut h = PartHead { generation: 9, ..h };
        let enc = encode(&ToStandby::Part(h.clone())).unwrap();
        match decode_to_standby(&enc, &[0u8; 8]).unwrap() {
            StandboundMsg::Part(v) => assert_eq!(v.head.generation, 9),
            other => panic!("{other:?}"),
        }
        // A head of the previous protocol (no generation) does not decode.
        h.generation = 0;
        let enc = encode(&ToStandby::Part(h)).unwrap();
        assert!(decode_to_standby(&enc[..enc.len() - 1], &[0u8; 8]).is_err());
        // An ack or a refusal fences a primary only with a newer generation.
        let ack = |generation| {
            let b = encode(&ToPrimary::Ack {
                epoch: 1,
                generation,
            })
            .unwrap();
            decode_to_primary(&b, &[]).unwrap().fences(5)
        };
        assert_eq!(ack(5), None);
        assert_eq!(ack(4), None);
        assert_eq!(ack(6), Some(6));
        let b = encode(&ToPrimary::Fenced { generation: 7 }).unwrap();
        assert_eq!(decode_to_primary(&b, &[]).unwrap().fences(5), Some(7));
        assert_eq!(decode_to_primary(&b, &[]).unwrap().fences(7), None);
        assert!(decode_to_primary(&b, &[1]).is_err());
        // An ack of an older session's generation is stale, never fencing.
        let b = encode(&ToPrimary::Ack {
            epoch: 1,
            generation: 4,
        })
        .unwrap();
        let m = decode_to_primary(&b, &[]).unwrap();
        assert_eq!(m.stale(5), Some(4));
        assert_eq!(m.stale(4), None);
        assert_eq!(m.fences(5), None);
        assert_eq!(decode_to_primary(&b, &[]).unwrap().stale(0), None);
    }

    /// Rolling upgrade: a node of this version speaks protocol 2's messages to a peer
    /// not yet upgraded, and reads them; a part of protocol 2 carries the generation of
    /// its session's `Hello`, an ack the primary's own. Neither version's heads decode as
    /// the other's.
    #[test]
    fn previous_protocol_messages_round_trip() {
        // Protocol 4 changed the frames only (lent sync parts): its messages are 3's,
        // and a protocol-3 session (the previous version's peer) uses them as they are.
        assert_eq!(LENT_SYNC_VERSION, alink::PROTOCOL_CURRENT);
        assert_eq!(WIRE_VERSION + 1, LENT_SYNC_VERSION);
        let h = PartHead::new(
            PartOf::Epoch {
                epoch: 4,
                sync_rounds: 1,
            },
            0,
            1,
            8,
            Vec::new(),
            Vec::new(),
            None,
            Vec::new(),
            None,
            &[[7u8; 8]],
        )
        .unwrap();
        let h = PartHead { generation: 9, ..h };
        let cur = ToStandby::Part(h.clone());
        let old = legacy::ToStandbyV2::from_current(&cur).unwrap();
        let old_bytes = encode(&old).unwrap();
        let cur_bytes = encode(&cur).unwrap();
        // The generation is the session's (9 here: what the Hello carried).
        match decode_to_standby_at(legacy::VERSION, 9, &old_bytes, &[7u8; 8]).unwrap() {
            StandboundMsg::Part(v) => assert_eq!(*v.head, h),
            other => panic!("{other:?}"),
        }
        match decode_standbound_at(legacy::VERSION, 9, old_bytes.len(), {
            let mut b = old_bytes.clone();
            b.extend_from_slice(&[7u8; 8]);
            b
        })
        .unwrap()
        {
            Standbound::Part(p) => assert_eq!(p.head(), &h),
            _ => panic!("not a part"),
        }
        assert!(decode_to_standby_at(legacy::VERSION, 9, &cur_bytes, &[7u8; 8]).is_err());
        assert!(decode_to_standby(&old_bytes, &[7u8; 8]).is_err());
        // The Hello is the same in both (protocol 2 had the generation there).
        let hello = ToStandby::Hello {
            layout: vec![(0, 1 << 20)],
            generation: 9,
        };
        let old_hello = legacy::ToStandbyV2::from_current(&hello).unwrap();
        assert_eq!(encode(&old_hello).unwrap(), encode(&hello).unwrap());
        assert_eq!(old_hello.into_current(0), hello);
        // Acks: the primary's own generation stands for the one protocol 2 lacks.
        let ack = ToPrimary::Ack {
            epoch: 3,
            generation: 9,
        };
        let old_ack = encode(&legacy::ToPrimaryV2::from_current(&ack).unwrap()).unwrap();
        match decode_to_primary_at(legacy::VERSION, 9, &old_ack, &[]).unwrap() {
            m @ PrimaryboundMsg::Ack {
                epoch: 3,
                generation: 9,
            } => {
                assert_eq!(m.stale(9), None);
                assert_eq!(m.fences(9), None);
            }
            other => panic!("{other:?}"),
        }
        assert!(decode_to_primary(&old_ack, &[]).is_err());
        assert!(decode_to_primary_at(legacy::VERSION, 9, &encode(&ack).unwrap(), &[]).is_err());
        // Protocol 2 has no refusal message: the older primary learns it at its Hello.
        assert_eq!(
            legacy::ToPrimaryV2::from_current(&ToPrimary::Fenced { generation: 10 }),
            None
        );
    }

    /// The disk kinds are sent without conversion by the primary's outbox: they must
    /// be the same bytes in both versions.
    #[test]
    fn disk_messages_are_the_same_in_both_versions() {
        let d = ToStandby::Disk(vec![1, 2, 3]);
        let old = legacy::ToStandbyV2::from_current(&d).unwrap();
        assert_eq!(encode(&old).unwrap(), encode(&d).unwrap());
        let d = ToPrimary::Disk(vec![4, 5]);
        let old = legacy::ToPrimaryV2::from_current(&d).unwrap();
        assert_eq!(encode(&old).unwrap(), encode(&d).unwrap());
    }

    #[test]
    fn garbage_heads_give_typed_errors() {
        for junk in [&b""[..], &[0xff; 7][..], &[9][..], &[2, 0][..]] {
            assert!(decode_to_standby(junk, &[]).is_err());
        }
        assert!(matches!(
            decode_to_standby(&vec![0u8; MAX_HEAD_BYTES + 1], &[]),
            Err(DecodeError::HeadTooLarge(_))
        ));
        let ack = encode(&ToPrimary::Ack {
            epoch: 3,
            generation: 0,
        })
        .unwrap();
        assert!(matches!(
            decode_to_primary(&ack, &[]).unwrap(),
            PrimaryboundMsg::Ack {
                epoch: 3,
                generation: 0
            }
        ));
        assert!(decode_to_primary(&ack, &[1]).is_err());
        let mut trailing = ack.clone();
        trailing.push(0);
        assert!(matches!(
            decode_to_primary(&trailing, &[]),
            Err(DecodeError::Trailing(1))
        ));
    }

    #[test]
    fn split_runs_respects_limits() {
        let runs = vec![
            PageRun { gpa: 0, pages: 5 },
            PageRun {
                gpa: 0x10000,
                pages: 2,
            },
        ];
        let parts = split_runs(runs, 3);
        let counts: Vec<u32> = parts
            .iter()
            .map(|p| p.iter().map(|r| r.pages).sum())
            .collect();
        assert_eq!(counts, vec![3, 3, 1]);
        assert_eq!(parts[1][0].gpa, 0x3000);
        assert_eq!(parts[1][1].gpa, 0x10000);
        assert_eq!(split_runs(Vec::new(), 3), vec![Vec::<PageRun>::new()]);
        const { assert!(MAX_MESSAGE_BYTES < 64 << 20) };
    }
}
