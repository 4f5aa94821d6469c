//! Deterministic simulation of an FT pair (TigerBeetle / FoundationDB style) that runs
//! the REAL code: the primary's and the standby's drivers (`PrimaryDriver`,
//! `StandbyDriver`, with their state machines), the capture (`Capturer`, over a toy VM
//! that implements `PrimaryVm`), the wire format, the standby's `Mirror`, the disk
//! session machines of both sides with storage-mirror's real file edges (metadata,
//! bitmaps, apply journal, images, in a tmpfs directory), failover through the
//! `Takeover` trait, and failback (the old primary comes back as the standby and is
//! resynced with a delta). Only the VM (a toy guest: a few pages, a counter as its
//! state, a 64 KiB disk written a sector at a time, a console and a NIC) and the
//! network are simulated, driven by a seeded scheduler through message delays,
//! link-down windows, loss, duplication, corruption (which the A-Link's frame check
//! turns into a late resend), reordering, and crashes of either machine at any point
//! of its sends; a crashed standby, and a crashed primary after a failover, come back
//! as the standby of a new session.
//!
//! Checked for every seed:
//! - at every commit, the standby's mirror (memory, state) and disk image equal the
//!   primary's at that epoch (the oracle: a snapshot the toy VM takes at each cut);
//! - output is released only for epochs the standby has committed;
//! - failover resumes from the last committed epoch (memory, state and disk), and the
//!   console seen outside (a positional sink) is 0, 1, 2, ... with no gap, duplicate
//!   or disagreement, across every failover and session;
//! - the frames seen on the LAN have no gap (a frame the primary released may come
//!   again after a failover, as on a real network);
//! - in-order, exactly-once links (the A-Link's guarantee) never break the protocol
//!   or fail a driver, and make progress (epochs get committed, also after failback);
//! - fencing (one seed in four): at a random step the standby learns a newer quorum
//!   generation than the one the primary stamps on its checkpoints (as a takeover
//!   grant gives it). From then on the standby commits no checkpoint of that session
//!   (every stale part is refused, and the primary told), and a primary that receives
//!   the refusal releases nothing more and is demoted at once (its node stops; the
//!   standby, the holder, then fails over from its last commit and the demoted node
//!   comes back as its standby, with the newer generation).
//! - a primary's own grant (issue 14's race; about one seed in three of those that neither
//!   fence nor swap): at a random step the primary's node is granted a newer generation of
//!   its own (the quorum names a holder by parity: pm1 is node 1, pm2 node 2); the
//!   standby learns it at once, the primary's driver only some steps later. Nothing
//!   may fence or demote it: a demotion by a generation the primary's own node holds,
//!   or a standby refusing a part of the holder, fails the seed.
//! - planned role swaps (on in-order links, about a third of the seeds, asked at random
//!   steps, often refused while the pair is not in sync): the standby resumes the exact
//!   swap point, releases the swap point's output itself, and nothing is released
//!   twice (no console rewrite, no duplicate frame) or lost; the old primary comes
//!   back as the standby of the next session; a standby lost mid-swap leaves the VM on
//!   the old primary. One swap request in three is refused by the standby's quorum (no
//!   grant of the next generation, issue 15): the old primary resumes its guest and
//!   releases the swap point's output itself, again nothing twice or lost, and the
//!   session goes on (later swaps of the same run may then succeed).
//!
//! A failing seed prints itself; rerun one with `SIM_SEED=<n> cargo test --test sim`
//! (`SIM_DEBUG=1` prints each run), run more with `SIM_SEEDS=<n>`. Every seed that
//! ever failed is kept in `tests/sim_regressions.txt` and runs first, always.

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use alink::{AlinkError, Bytes};
use checkpoint::link::{SendError, ToPrimaryLink, ToStandbyLink};
use checkpoint::messages::{
    decode_to_primary, encode, PrimaryboundMsg, ToPrimary, ToStandby, PAGE_SIZE,
};
use checkpoint::primary::inbox::screen;
use checkpoint::primary::{
    Cut, DriverError, EpochState, FromStandby, MirroredDisks, Parked, PrimaryDriver,
    PrimaryDriverConfig, PrimaryVm, SwapPort,
};
use checkpoint::protocol::{PrimaryConfig, PrimaryPhase, StandbyConfig};
use checkpoint::standby::{
    FailoverReport, StandbyDriver, StandbyDriverConfig, StandbyDriverError, StandbyOutcome,
    Takeover, TakeoverGate, TakeoverGateRef, TakeoverInput,
};
use quorum::types::{held_by, next_generation, NodeId};
use storage_mirror::primary::PrimaryDisks;
use storage_mirror::resync::ResyncConfig;
use storage_mirror::wire::{self, DiskToPrimary};
use vm_memory::{Bytes as _, GuestAddress};
use vmm::devices::output::EpochConsole;
use vmm::devices::virtio::block::journal::{read_back, JournalExtent};
use vmm::devices::virtio::block::written::WrittenBlocks;
use vmm::devices::virtio::block::{DiskHooks, DiskJournal};
use vmm::vstate::dirty::{DirtySet, HarvestStats};
use vmm::vstate::memory::GuestMemoryMmap;
use vmm::{CutKind, VmmError};

const PAGES: usize = 8;
const MEM: usize = PAGES * PAGE_SIZE;
const SECTOR: u64 = 512;
/// The toy disk: 16 blocks of 4 KiB.
const DISK: u64 = 16 * 4096;
/// Pages per part: small, so that epochs span several parts.
const PART_PAGES: u32 = 3;
/// Steps (1 ms each) of the first session.
const HORIZON: u64 = 300;
/// Steps run after a failover or a standby's crash (the next session's time).
const TAIL: u64 = 300;
/// Pair sessions per seed, at most (the first, then one per failover or restart).
const MAX_SESSIONS: u32 = 3;
/// Steps a session runs on after its first commit, at least.
const AFTER_PROTECTION: u64 = 100;
/// No run goes past this step.
const LAST_STEP: u64 = HORIZON + MAX_SESSIONS as u64 * TAIL + AFTER_PROTECTION;

/// splitmix64 (the lab's one RNG: the seeds kept as regression cases replay the same
/// schedules).
use twinrun_lab::Rng;

fn mix(i: u64) -> u64 {
    let mut r = Rng(i);
    r.next()
}

fn debug() -> bool {
    std::env::var("SIM_DEBUG").is_ok()
}

// ---------------------------------------------------------------------------------
// The world outside: the console sink, the LAN, the oracle, what each session's
// standby has committed.
// ---------------------------------------------------------------------------------

/// A positional console sink (a file written at stream offsets), so that the standby's
/// re-release of output the primary may already have released is idempotent. Guest
/// output `i` is 8 bytes at stream position `8 * i`.
#[derive(Default)]
struct Sink {
    bytes: Vec<u8>,
    rewrites: u64,
}

/// The LAN: frames carry output values; a frame may come twice (the standby sends
/// again what the primary may have released) but none may be missing.
#[derive(Default)]
struct Lan {
    max: Option<u64>,
    duplicates: u64,
}

/// The primary's VM as it was at a cut.
#[derive(Clone, PartialEq, Eq)]
struct Snapshot {
    mem: Vec<u8>,
    counter: u64,
    disk: Vec<u8>,
}

struct World {
    seed: u64,
    sink: Sink,
    lan: Lan,
    /// (session, epoch) -> the primary's VM at that epoch's cut.
    oracle: BTreeMap<(u32, u64), Snapshot>,
    /// What each session's standby has committed.
    committed: BTreeMap<u32, u64>,
    commits_checked: u64,
}

impl World {
    fn write_console(&mut self, pos: u64, data: &[u8]) {
        let seed = self.seed;
        let pos = pos as usize;
        assert!(
            pos <= self.sink.bytes.len(),
            "seed {seed}: console gap: write at {pos}, sink has {}",
            self.sink.bytes.len()
        );
        let overlap = (self.sink.bytes.len() - pos).min(data.len());
        if overlap > 0 {
            self.sink.rewrites += 1;
        }
        assert_eq!(
            &self.sink.bytes[pos..pos + overlap],
            &data[..overlap],
            "seed {seed}: a re-release differs from what was released"
        );
        self.sink.bytes.extend_from_slice(&data[overlap..]);
    }

    fn frame(&mut self, data: &[u8]) {
        let seed = self.seed;
        let mut b = [0u8; 8];
        b.copy_from_slice(data);
        let v = u64::from_le_bytes(b);
        let next = self.lan.max.map_or(0, |m| m + 1);
        assert!(
            v <= next,
            "seed {seed}: frame gap: frame {v} after frames up to {:?}",
            self.lan.max
        );
        if v < next {
            self.lan.duplicates += 1;
        } else {
            self.lan.max = Some(v);
        }
    }

    /// Guest output `v` reaches the outside: console bytes and a frame.
    fn emit(&mut self, v: u64) {
        self.write_console(v * 8, &v.to_le_bytes());
        self.frame(&v.to_le_bytes());
    }
}

type WorldRef = Rc<RefCell<World>>;

// ---------------------------------------------------------------------------------
// The toy VM: what `PrimaryVm` asks, on real guest memory (vm-memory), a real disk
// image and the VMM's own journal and written-block types.
// ---------------------------------------------------------------------------------

/// The output gate of the toy: held values per closed epoch, the open epoch's.
#[derive(Default)]
struct Gate {
    on: bool,
    open: Vec<u64>,
    closed: BTreeMap<u64, Vec<u64>>,
}

struct ToyInner {
    world: WorldRef,
    /// The pair session whose oracle the cuts feed.
    session: Cell<u32>,
    /// The machine died: it emits and sends nothing more.
    dead: Rc<Cell<bool>>,
    mem: GuestMemoryMmap,
    counter: Cell<u64>,
    paused: Cell<bool>,
    /// Pages written since the last harvest.
    since: RefCell<DirtySet>,
    image: File,
    /// The VM has its disk (some seeds run a VM without disks: the image file then
    /// stays zero on both machines).
    has_disk: bool,
    hooks: RefCell<Option<Arc<dyn DiskHooks>>>,
    written: RefCell<WrittenBlocks>,
    journal: RefCell<Option<DiskJournal>>,
    gate: RefCell<Gate>,
    /// A newer quorum generation reached this machine as primary: it may release
    /// nothing more.
    fenced: Cell<bool>,
}

#[derive(Clone)]
struct Toy(Rc<ToyInner>);

/// The toy's VM state: its counter.
struct ToyState(u64);

impl EpochState for ToyState {
    fn to_bytes(&self) -> Result<Vec<u8>, vmm::persist::StateFormatError> {
        Ok(self.0.to_le_bytes().to_vec())
    }
    fn hash(&self) -> u32 {
        crc32c::crc32c(&self.0.to_le_bytes())
    }
}

fn open_rw(p: &Path) -> File {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(p)
        .expect("open toy image")
}

impl Toy {
    fn new(
        world: &WorldRef,
        session: u32,
        mem: GuestMemoryMmap,
        counter: u64,
        image: &Path,
        has_disk: bool,
    ) -> Toy {
        let since = DirtySet::new(&mem);
        Toy(Rc::new(ToyInner {
            world: world.clone(),
            session: Cell::new(session),
            dead: Rc::new(Cell::new(false)),
            mem,
            counter: Cell::new(counter),
            paused: Cell::new(false),
            since: RefCell::new(since),
            image: open_rw(image),
            has_disk,
            hooks: RefCell::new(None),
            written: RefCell::new(WrittenBlocks::new(DISK)),
            journal: RefCell::new(None),
            gate: RefCell::new(Gate::default()),
            fenced: Cell::new(false),
        }))
    }

    fn fresh(world: &WorldRef, image: &Path, has_disk: bool) -> Toy {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM)]).expect("toy memory");
        Toy::new(world, 0, mem, 0, image, has_disk)
    }

    fn set_hooks(&self, h: Arc<dyn DiskHooks>) {
        *self.0.hooks.borrow_mut() = Some(h);
    }

    /// One guest step: a word of memory, every third step a disk sector, one output.
    fn step(&self) {
        let t = &self.0;
        let i = t.counter.get();
        let h = mix(i);
        let page = (h % PAGES as u64) as usize;
        let word = ((h >> 8) % (PAGE_SIZE as u64 / 8)) as usize;
        let at = (page * PAGE_SIZE + word * 8) as u64;
        t.mem
            .write_slice(&i.to_le_bytes(), GuestAddress(at))
            .expect("toy memory write");
        t.since.borrow_mut().mark(GuestAddress(at), 8);
        if t.has_disk && i.is_multiple_of(3) {
            let sector = ((i / 3).wrapping_mul(7)) % (DISK / SECTOR);
            let off = sector * SECTOR;
            let data: Vec<u8> = (0..SECTOR).map(|k| (i as u8) ^ (k as u8)).collect();
            let hooks = t.hooks.borrow().clone();
            let ok = match &hooks {
                Some(h) => h.before_writes(0, &[(off, SECTOR)]).is_ok(),
                None => true,
            };
            assert!(
                ok,
                "seed {}: the disk hook failed a write",
                t.world.borrow().seed
            );
            t.image.write_all_at(&data, off).expect("toy disk write");
            t.written.borrow_mut().mark(off, SECTOR);
            if let Some(j) = t.journal.borrow_mut().as_mut() {
                let at = j.data.len() as u64;
                j.data.extend_from_slice(&data);
                j.extents.push(JournalExtent {
                    sector: off / SECTOR,
                    offset: at,
                    len: SECTOR,
                });
            }
        }
        t.counter.set(i + 1);
        let mut g = t.gate.borrow_mut();
        if g.on {
            g.open.push(i);
        } else if !t.dead.get() {
            drop(g);
            t.world.borrow_mut().emit(i);
        }
    }

    fn snapshot(&self) -> Snapshot {
        let t = &self.0;
        let mut mem = vec![0u8; MEM];
        t.mem
            .read_slice(&mut mem, GuestAddress(0))
            .expect("toy memory read");
        let mut disk = vec![0u8; DISK as usize];
        t.image.read_exact_at(&mut disk, 0).expect("toy disk read");
        Snapshot {
            mem,
            counter: t.counter.get(),
            disk,
        }
    }

    fn console_of(values: &[u64]) -> Option<(u64, Vec<u8>)> {
        let first = *values.first()?;
        Some((
            first * 8,
            values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        ))
    }
}

impl PrimaryVm for Toy {
    type State = ToyState;

    fn guest_memory(&self) -> &GuestMemoryMmap {
        &self.0.mem
    }
    fn pause(&self) -> Result<Duration, VmmError> {
        self.0.paused.set(true);
        Ok(Duration::ZERO)
    }
    fn resume(&self) -> Result<(), VmmError> {
        self.0.paused.set(false);
        Ok(())
    }
    fn start_dirty_tracking(&self) -> Result<(), VmmError> {
        self.0.since.borrow_mut().clear();
        Ok(())
    }
    fn harvest_dirty_into(&self, out: &mut DirtySet) -> Result<HarvestStats, VmmError> {
        let mut since = self.0.since.borrow_mut();
        out.union(&since)?;
        since.clear();
        Ok(HarvestStats::default())
    }
    fn cut_epoch(
        &self,
        epoch: u64,
        dirty: &mut DirtySet,
        kind: CutKind<'_>,
    ) -> Result<Cut<ToyState>, VmmError> {
        let t = &self.0;
        assert!(t.paused.get(), "an epoch cut while the toy runs");
        let first = matches!(kind, CutKind::First { .. });
        let mut g = t.gate.borrow_mut();
        if first {
            *g = Gate {
                on: true,
                ..Gate::default()
            };
            *t.journal.borrow_mut() = Some(DiskJournal::default());
        }
        let values = std::mem::take(&mut g.open);
        let console = Toy::console_of(&values).map(|(pos, data)| EpochConsole { epoch, pos, data });
        let frames = values
            .iter()
            .map(|v| (0usize, v.to_le_bytes().to_vec()))
            .collect();
        g.closed.insert(epoch, values);
        drop(g);
        dirty.clear();
        let harvest = self.harvest_dirty_into(dirty)?;
        let journals = match kind {
            _ if !t.has_disk => Vec::new(),
            CutKind::First { read_back: extra } => {
                let mut w = t.written.borrow_mut().take();
                for &(off, len) in extra.first().map_or(&[][..], |v| &v[..]) {
                    w.mark(off, len);
                }
                vec![read_back(&t.image, DISK, &w).map_err(VmmError::DiskReadBack)?]
            }
            CutKind::Next => vec![t
                .journal
                .borrow_mut()
                .replace(DiskJournal::default())
                .unwrap_or_default()],
        };
        let snap = self.snapshot();
        let counter = snap.counter;
        t.world
            .borrow_mut()
            .oracle
            .insert((t.session.get(), epoch), snap);
        Ok(Cut {
            harvest,
            state: ToyState(counter),
            journals,
            console,
            frames,
        })
    }
    fn run_parked<R, F>(&self, f: F) -> Result<Parked<'_, R>, VmmError>
    where
        R: Send + 'static,
        F: FnOnce() -> R + Send + 'static,
    {
        Ok(Parked::Done(f()))
    }
    fn release_output(&self, through: u64) -> Result<(), VmmError> {
        let t = &self.0;
        let mut w = t.world.borrow_mut();
        let session = t.session.get();
        let committed = w.committed.get(&session).copied();
        assert!(
            !t.fenced.get() || t.dead.get(),
            "seed {}: a fenced primary released output through epoch {through}",
            w.seed
        );
        // The invariant that makes failover lose nothing.
        assert!(
            committed.is_some_and(|c| c >= through),
            "seed {}: release through {through}, standby committed {committed:?}",
            w.seed
        );
        let mut g = t.gate.borrow_mut();
        let later = g.closed.split_off(&(through + 1));
        let done = std::mem::replace(&mut g.closed, later);
        if !t.dead.get() {
            for v in done.into_values().flatten() {
                w.emit(v);
            }
        }
        Ok(())
    }
    fn output_waiting(&self) -> bool {
        !self.0.gate.borrow().open.is_empty()
    }
    fn discard_output_after(&self, epoch: u64) {
        let mut g = self.0.gate.borrow_mut();
        drop(g.closed.split_off(&(epoch + 1)));
        g.open.clear();
    }
    fn end_output_commit(&self) -> Result<(u64, u64), VmmError> {
        let t = &self.0;
        let mut g = t.gate.borrow_mut();
        let values: Vec<u64> = std::mem::take(&mut g.closed)
            .into_values()
            .flatten()
            .chain(std::mem::take(&mut g.open))
            .collect();
        g.on = false;
        drop(g);
        *t.journal.borrow_mut() = None;
        if !t.dead.get() {
            let mut w = t.world.borrow_mut();
            for &v in &values {
                w.emit(v);
            }
        }
        Ok((values.len() as u64 * 8, values.len() as u64))
    }
    fn reset_written_blocks(&self, _disk: Option<usize>) {
        self.0.written.borrow_mut().take();
    }
}

// ---------------------------------------------------------------------------------
// The network: per direction, in order (the A-Link) or not (chaos).
// ---------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug)]
struct Faults {
    /// In-order, exactly-once delivery (what the A-Link gives): only delays and
    /// link-down windows, and the loss of whatever is in flight when a node dies.
    /// Otherwise chaos: loss, duplication, corruption, reordering.
    fifo: bool,
    drop: u64,
    dup: u64,
    corrupt: u64,
    max_delay: u64,
    link_down: u64,
    /// The primary of session `s` crashes at its n-th send of that session.
    primary_crash_at_send: [Option<u64>; MAX_SESSIONS as usize],
    standby_crash_at_step: Option<u64>,
    detect: u64,
    restart_after: u64,
    /// Per-mille chance per step that an operator asks the primary for a role swap
    /// (0: never; in-order runs only).
    swap_chance: u64,
}

enum Payload {
    ToStandby(Vec<u8>, Vec<u8>),
    ToPrimary(Vec<u8>, Vec<u8>),
}

struct Packet {
    at: u64,
    /// Tie-breaker for deterministic ordering.
    id: u64,
    session: u32,
    payload: Payload,
}

struct Net {
    q: Vec<Packet>,
    next_id: u64,
    /// Link down until this step: packets sent meanwhile wait for it to come back (the
    /// A-Link resends unacknowledged messages on reconnect).
    down_until: u64,
    /// FIFO mode: the last delivery time per direction (0: to standby, 1: to primary).
    last_at: [u64; 2],
    faults: Faults,
    rng: Rng,
}

impl Net {
    fn send(&mut self, now: u64, session: u32, payload: Payload) {
        let f = self.faults;
        if self.rng.chance(f.drop) {
            return;
        }
        let copies = if self.rng.chance(f.dup) { 2 } else { 1 };
        let (to_primary, head, body) = match payload {
            Payload::ToStandby(h, b) => (false, h, b),
            Payload::ToPrimary(h, b) => (true, h, b),
        };
        for _ in 0..copies {
            let mut at = now.max(self.down_until) + 1 + self.rng.below(f.max_delay + 1);
            if self.rng.chance(f.corrupt) {
                // A bit flipped on the wire. The A-Link's frame CRC-32C (over head and
                // payload) refuses the frame and drops the connection, and the
                // unacknowledged message goes again on the next connection: the
                // protocol sees it late, never corrupted.
                let wire_crc = |h: &[u8], b: &[u8]| crc32c::crc32c_append(crc32c::crc32c(h), b);
                let (mut h2, mut b2) = (head.clone(), body.clone());
                let before = wire_crc(&h2, &b2);
                if !b2.is_empty() {
                    let i = self.rng.below(b2.len() as u64) as usize;
                    b2[i] ^= 0x40;
                } else if !h2.is_empty() {
                    let i = self.rng.below(h2.len() as u64) as usize;
                    h2[i] ^= 0x40;
                }
                assert_ne!(
                    before,
                    wire_crc(&h2, &b2),
                    "the frame check missed a flipped bit"
                );
                at += 1 + self.rng.below(f.max_delay + 1);
            }
            if f.fifo {
                let dir = usize::from(to_primary);
                at = at.max(self.last_at[dir]);
                self.last_at[dir] = at;
            }
            self.next_id += 1;
            let payload = if to_primary {
                Payload::ToPrimary(head.clone(), body.clone())
            } else {
                Payload::ToStandby(head.clone(), body.clone())
            };
            self.q.push(Packet {
                at,
                id: self.next_id,
                session,
                payload,
            });
        }
    }

    fn due(&mut self, now: u64) -> Vec<Packet> {
        let (mut due, rest): (Vec<_>, Vec<_>) = self.q.drain(..).partition(|p| p.at <= now);
        self.q = rest;
        due.sort_by_key(|p| (p.at, p.id));
        if self.faults.fifo {
            return due;
        }
        // Same-step packets in a seeded order.
        for i in (1..due.len()).rev() {
            let j = self.rng.below(i as u64 + 1) as usize;
            due.swap(i, j);
        }
        due
    }
}

type NetRef = Rc<RefCell<Net>>;

fn concat(payload: &[Bytes]) -> Vec<u8> {
    payload.iter().flat_map(|b| b.iter().copied()).collect()
}

/// The primary's end of a session's link.
struct P2S {
    net: NetRef,
    now: Rc<Cell<u64>>,
    session: u32,
    sends: Rc<Cell<u64>>,
    crash_at: Option<u64>,
    dead: Rc<Cell<bool>>,
}

impl ToStandbyLink for P2S {
    fn send(&self, head: &ToStandby, payload: Vec<Bytes>) -> Result<(), SendError> {
        // A crash can hit before any send: the rest of the stream never leaves.
        let n = self.sends.get() + 1;
        self.sends.set(n);
        if self.crash_at.is_some_and(|c| n > c) {
            self.dead.set(true);
        }
        if self.dead.get() {
            return Ok(());
        }
        let h = encode(head).expect("encode");
        self.net.borrow_mut().send(
            self.now.get(),
            self.session,
            Payload::ToStandby(h, concat(&payload)),
        );
        Ok(())
    }
}

/// The standby's end of a session's link.
struct S2P {
    net: NetRef,
    now: Rc<Cell<u64>>,
    session: u32,
    dead: Rc<Cell<bool>>,
    world: WorldRef,
    image: PathBuf,
}

impl ToPrimaryLink for S2P {
    fn send(
        &self,
        head: &ToPrimary,
        payload: Vec<Bytes>,
        _wait: Duration,
    ) -> Result<(), AlinkError> {
        if self.dead.get() {
            return Ok(());
        }
        if let ToPrimary::Ack { epoch, .. } = head {
            // Ack only after apply: the epoch's disk writes are on the standby's image
            // (durably: the apply journal commits before it writes the image) when its
            // ack leaves.
            let mut disk = vec![0u8; DISK as usize];
            File::open(&self.image)
                .and_then(|f| f.read_exact_at(&mut disk, 0))
                .expect("standby image");
            let w = self.world.borrow();
            let seed = w.seed;
            let want = w
                .oracle
                .get(&(self.session, *epoch))
                .unwrap_or_else(|| panic!("seed {seed}: ack of epoch {epoch}, never captured"));
            assert!(
                disk == want.disk,
                "seed {seed}: ack of epoch {epoch} before its disk writes reached the standby"
            );
        }
        let h = encode(head).expect("encode");
        self.net.borrow_mut().send(
            self.now.get(),
            self.session,
            Payload::ToPrimary(h, concat(&payload)),
        );
        Ok(())
    }
}

// ---------------------------------------------------------------------------------
// Failover onto the toy.
// ---------------------------------------------------------------------------------

/// The standby's takeover: the toy resumes in the mirror's memory on the standby's
/// image, and the output of committed epochs the primary may not have released goes
/// out again (console at its positions, frames in order).
struct SimTakeover {
    world: WorldRef,
    session: u32,
    image: PathBuf,
    has_disk: bool,
}

impl Takeover for SimTakeover {
    type Vm = Toy;

    fn take_over(
        &mut self,
        input: TakeoverInput<'_>,
    ) -> Result<(Toy, FailoverReport), StandbyDriverError> {
        let mut c = [0u8; 8];
        c.copy_from_slice(input.state);
        let counter = u64::from_le_bytes(c);
        let toy = Toy::new(
            &self.world,
            self.session,
            input.memory,
            counter,
            &self.image,
            self.has_disk,
        );
        let w = self.world.borrow();
        let seed = w.seed;
        let want = w
            .oracle
            .get(&(self.session, input.last_committed))
            .unwrap_or_else(|| panic!("seed {seed}: no oracle of epoch {}", input.last_committed))
            .clone();
        drop(w);
        assert!(
            toy.snapshot() == want,
            "seed {seed}: failover state (memory, counter or disk) differs from epoch {}",
            input.last_committed
        );
        let mut w = self.world.borrow_mut();
        let mut out = FailoverReport::default();
        for (pos, bytes) in input.console {
            w.write_console(pos, bytes);
            out.rereleased_bytes += bytes.len() as u64;
        }
        for (_, f) in input.frames {
            w.frame(f);
            out.resent_frames += 1;
        }
        Ok((toy, out))
    }
}

// ---------------------------------------------------------------------------------
// The pair: nodes, sessions, the scheduler.
// ---------------------------------------------------------------------------------

/// A machine running the VM: its toy, its mirrored disks, and the driver of the
/// session it is primary in.
struct PrimaryNode {
    toy: Toy,
    disks: Arc<PrimaryDisks>,
    image: PathBuf,
    driver: Option<PrimaryDriver<Toy, P2S>>,
    sends: Rc<Cell<u64>>,
    /// The quorum generation this node holds (stamped on its sessions).
    generation: Arc<AtomicU64>,
    /// The session's swap port (the receive pump's early release asks it).
    swap: Arc<SwapPort>,
    /// The generation its session's `Hello` carried (the pump's `session`: an ack
    /// older than it is stale; `generation` may grow past it mid-session).
    stamp: u64,
}

struct StandbyNode {
    driver: StandbyDriver<S2P, SimTakeover>,
    image: PathBuf,
    dead: Rc<Cell<bool>>,
    /// The quorum as the standby sees it: the generation it knows.
    gate: Arc<SimGate>,
}

/// The standby's quorum: takeovers are granted (the simulation decides when the
/// primary is gone); the generation it knows grows when the simulation fences, or
/// when the primary's node is granted one (an own grant).
struct SimGate {
    generation: AtomicU64,
    /// The primary's node (a generation names its holder).
    peer: NodeId,
    /// The next swap's grant is refused (the quorum's witness said no or is down).
    refuse_swap: std::sync::atomic::AtomicBool,
}

impl TakeoverGate for SimGate {
    fn committed(&self, _epoch: u64) {}
    fn may_take_over(&self) -> bool {
        true
    }
    fn generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }
    fn peer_holds(&self, generation: u64) -> bool {
        held_by(generation, self.peer)
    }
    fn grant_swap(&self) -> Result<(), String> {
        if self.refuse_swap.load(Ordering::SeqCst) {
            return Err("the simulated witness refuses the next generation".into());
        }
        Ok(())
    }
}

/// The quorum node of the machine whose disk is `image` (pm1.img: node 1, pm2.img:
/// node 2; roles move between the two, the ids stay).
fn node_of(image: &Path) -> NodeId {
    if image.file_name().is_some_and(|n| n == "pm1.img") {
        NodeId(1)
    } else {
        NodeId(2)
    }
}

struct Report {
    commits: u64,
    /// Disk resyncs by plan: (full, delta), over all sessions.
    resyncs: (u32, u32),
    throttles: u64,
    rewrites: u64,
    frame_duplicates: u64,
    failovers: u32,
    sessions: u32,
    fifo: bool,
    protected: bool,
    /// The standby was fenced / the fenced primary was demoted.
    fenced: bool,
    demoted: u32,
    /// The demoted node's resync when it came back: (full, delta).
    demoted_resyncs: (u32, u32),
    /// Its delta resyncs: (bytes moved, bytes of a full copy).
    demoted_delta_bytes: (u64, u64),
    swaps: u32,
    swaps_refused: u32,
    /// Swaps the standby's quorum refused (no grant): the old primary resumed.
    swaps_no_grant: u32,
    /// Own grants to the primary's node that reached the standby first.
    own_grants: u32,
}

/// A scratch directory for a seed's disk images and their metadata, on tmpfs when
/// there is one (the apply journal and the metadata store fsync).
struct Scratch(PathBuf);

impl Scratch {
    fn new(seed: u64) -> Scratch {
        let base = if Path::new("/dev/shm").is_dir() {
            PathBuf::from("/dev/shm")
        } else {
            std::env::temp_dir()
        };
        let d = base.join(format!("twinrun-sim-{}-{seed}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).expect("scratch dir");
        Scratch(d)
    }

    fn image(&self, name: &str) -> PathBuf {
        let p = self.0.join(name);
        File::create(&p)
            .and_then(|f| f.set_len(DISK))
            .expect("toy image");
        p
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

struct Sim {
    seed: u64,
    f: Faults,
    cfg: PrimaryConfig,
    resync: ResyncConfig,
    world: WorldRef,
    net: NetRef,
    now: Rc<Cell<u64>>,
    base: Instant,
    session: u32,
    primary: Option<PrimaryNode>,
    standby: Option<StandbyNode>,
    /// A dead machine's image, and when it comes back as the standby.
    restart: Option<(PathBuf, u64)>,
    primary_peer_lost_at: Option<u64>,
    standby_peer_lost_at: Option<u64>,
    /// Steps until which the run goes on.
    end: u64,
    failovers: u32,
    /// Commits per session (for liveness).
    commits: BTreeMap<u32, u64>,
    /// A driver failed (its node is treated as crashed): never on in-order links.
    driver_errors: u64,
    violations: u64,
    /// Sessions that saw a crash (liveness is not asked of them).
    crashed_sessions: Vec<u32>,
    /// Disk resyncs by plan: (full, delta).
    resyncs: (u32, u32),
    /// Captures that found the guest held by a throttle.
    throttles: u64,
    /// The VM has a disk (one seed in ten runs one without).
    has_disk: bool,
    /// The step at which the standby of session 0 learns a newer generation.
    fence_at: Option<u64>,
    /// Session 0's commit when the standby was fenced (it may commit nothing after).
    fenced_commit: Option<Option<u64>>,
    /// The newest generation any node holds (a returning node learns it).
    generation: u64,
    /// Runs where a fenced primary was demoted.
    demoted: u32,
    /// The session in which the demoted node returns as the standby.
    demoted_session: Option<u32>,
    /// Its resync: (full, delta).
    demoted_resyncs: (u32, u32),
    /// Its delta resyncs: (bytes moved, bytes a full copy of those disks moves).
    demoted_delta_bytes: (u64, u64),
    /// The swap decisions' own RNG (the other draws, hence the kept seeds' schedules,
    /// stay as they were before swaps existed).
    swap_rng: Rng,
    /// The old primary of a swap in progress, until its driver takes the acceptance.
    swapping_out: Option<PrimaryNode>,
    /// The console sink's length when the swap in progress was asked.
    swap_asked_sink: Option<usize>,
    /// Sessions a swap ended (they committed, but may have ended before five commits).
    swapped_sessions: Vec<u32>,
    swaps: u32,
    swaps_refused: u32,
    /// Swaps the standby's quorum refused (no grant): the old primary resumed.
    swaps_no_grant: u32,
    /// The step at which the primary of session 0 is granted a newer generation of its
    /// own node, and how many steps later its driver sees it (the standby: at once).
    own_grant_at: Option<(u64, u64)>,
    /// The grant on its way to the primary's driver: (step, generation, its counter).
    own_grant_pending: Option<(u64, u64, Arc<AtomicU64>)>,
    own_grants: u32,
}

impl Sim {
    /// The VM config's disks on a machine whose image is `image`.
    fn images(&self, image: &Path) -> Vec<PathBuf> {
        if self.has_disk {
            vec![image.to_path_buf()]
        } else {
            Vec::new()
        }
    }

    /// Counts what a primary driver of `session` did (its disk session, its throttles).
    fn retire(&mut self, d: Option<PrimaryDriver<Toy, P2S>>, session: u32) {
        let Some(r) = d.map(|d| d.report()) else {
            return;
        };
        self.throttles += r.throttles;
        if let Some(r) = r.resync {
            self.resyncs.0 += r.full_disks;
            self.resyncs.1 += r.delta_disks;
            if self.demoted_session == Some(session) {
                self.demoted_resyncs.0 += r.full_disks;
                self.demoted_resyncs.1 += r.delta_disks;
                if r.full_disks == 0 && r.delta_disks > 0 {
                    self.demoted_delta_bytes.0 += r.bytes;
                    self.demoted_delta_bytes.1 += DISK * u64::from(r.delta_disks);
                }
            }
        }
    }

    fn clock(&self) -> checkpoint::primary::driver::Clock {
        let now = self.now.clone();
        Box::new(move || Duration::from_millis(now.get()))
    }

    fn primary_cfg(
        &self,
        disks: &Arc<PrimaryDisks>,
        generation: &Arc<AtomicU64>,
        swap: &Arc<SwapPort>,
        node: NodeId,
    ) -> PrimaryDriverConfig {
        PrimaryDriverConfig {
            generation: Some(generation.clone()),
            own_generations: Some(Arc::new(move |g| held_by(g, node))),
            swap: Some(swap.clone()),
            protocol: self.cfg,
            max_part_pages: Some(PART_PAGES),
            // Parts of 2 pages and more have their copy split (done inline by the toy).
            split_copy_min_pages: Some(2),
            disks: Some(disks.clone()),
            resync: self.resync,
            hot_pages: None,
            ..PrimaryDriverConfig::default()
        }
    }

    /// Starts session `self.session` between `primary` (running) and a standby on
    /// `standby_image`.
    fn start_session(&mut self, standby_image: PathBuf) {
        let session = self.session;
        let sdead = Rc::new(Cell::new(false));
        let link = S2P {
            net: self.net.clone(),
            now: self.now.clone(),
            session,
            dead: sdead.clone(),
            world: self.world.clone(),
            image: standby_image.clone(),
        };
        let takeover = SimTakeover {
            world: self.world.clone(),
            session,
            image: standby_image.clone(),
            has_disk: self.has_disk,
        };
        let gate = Arc::new(SimGate {
            generation: AtomicU64::new(self.generation),
            peer: self
                .primary
                .as_ref()
                .map_or(NodeId(1), |p| node_of(&p.image)),
            refuse_swap: std::sync::atomic::AtomicBool::new(false),
        });
        let opts = StandbyDriverConfig {
            protocol: StandbyConfig {
                max_staged: self.cfg.max_in_flight,
            },
            mirror_disks: true,
            takeover_gate: Some(TakeoverGateRef(gate.clone())),
            ..StandbyDriverConfig::default()
        };
        let driver = StandbyDriver::new(
            link,
            takeover,
            self.images(&standby_image),
            &opts,
            self.clock(),
            self.base,
        )
        .unwrap_or_else(|e| panic!("seed {}: standby driver: {e}", self.seed));
        self.standby = Some(StandbyNode {
            driver,
            image: standby_image,
            dead: sdead,
            gate,
        });
        let clock = self.clock();
        let cfg = match &self.primary {
            Some(p) => self.primary_cfg(&p.disks, &p.generation, &p.swap, node_of(&p.image)),
            None => panic!("seed {}: a session without a primary", self.seed),
        };
        let old = self.primary.as_mut().and_then(|p| p.driver.take());
        self.retire(old, session.saturating_sub(1));
        let p = self.primary.as_mut().expect("a primary");
        p.toy.0.session.set(session);
        p.sends.set(0);
        p.swap = Arc::new(SwapPort::default());
        let cfg = PrimaryDriverConfig {
            swap: Some(p.swap.clone()),
            ..cfg
        };
        let crash_at = self.f.primary_crash_at_send[session as usize];
        let link = P2S {
            net: self.net.clone(),
            now: self.now.clone(),
            session,
            sends: p.sends.clone(),
            crash_at,
            dead: p.toy.0.dead.clone(),
        };
        let mut d = PrimaryDriver::new(p.toy.clone(), link, &cfg, clock, self.base)
            .unwrap_or_else(|e| panic!("seed {}: primary driver: {e}", self.seed));
        p.stamp = p.generation.load(Ordering::SeqCst);
        if let Err(e) = d.start() {
            panic!("seed {}: primary start: {e}", self.seed);
        }
        p.driver = Some(d);
        if debug() {
            eprintln!(
                "seed {} step {}: session {session} starts",
                self.seed,
                self.now.get()
            );
        }
    }

    fn primary_alive(&self) -> bool {
        self.primary.as_ref().is_some_and(|p| !p.toy.0.dead.get())
    }

    fn standby_alive(&self) -> bool {
        self.standby.as_ref().is_some_and(|s| !s.dead.get())
    }

    fn kill_primary(&mut self) {
        if let Some(p) = &self.primary {
            p.toy.0.dead.set(true);
        }
    }

    /// A driver error ends its node (as a crashed process would).
    fn driver_error(&mut self, who: &str, e: &dyn std::fmt::Display) {
        self.driver_errors += 1;
        if debug() {
            eprintln!(
                "seed {} step {}: {who} driver failed: {e}",
                self.seed,
                self.now.get()
            );
        }
        assert!(
            !self.f.fifo,
            "seed {}: the {who} driver failed on in-order links: {e}",
            self.seed
        );
        if who == "primary" {
            self.kill_primary();
        } else if let Some(s) = &self.standby {
            s.dead.set(true);
        }
    }

    /// After the standby was given something: its image holds exactly the committed
    /// epoch's disk (the resync writes it before epoch 0; nothing but a commit may
    /// after), and the newest commit equals the primary's at that epoch.
    fn check_commit(&mut self) {
        let Some(s) = &self.standby else { return };
        let Some(c) = s.driver.committed() else {
            return;
        };
        let session = self.session;
        let seed = self.seed;
        if let Some(at_fence) = self.fenced_commit.filter(|_| session == 0) {
            assert!(
                at_fence.is_some_and(|f| f >= c),
                "seed {seed}: the standby committed epoch {c} of a primary with an older \
                 generation (committed {at_fence:?} when it learned the newer one)"
            );
        }
        let mut disk = vec![0u8; DISK as usize];
        File::open(&s.image)
            .and_then(|f| f.read_exact_at(&mut disk, 0))
            .expect("standby image");
        let mut w = self.world.borrow_mut();
        let want = w
            .oracle
            .get(&(session, c))
            .unwrap_or_else(|| panic!("seed {seed}: no oracle of epoch {c}"));
        assert!(
            disk == want.disk,
            "seed {seed}: standby disk differs from the primary's at its committed epoch {c}"
        );
        if w.committed.get(&session) == Some(&c) {
            return;
        }
        w.committed.insert(session, c);
        w.commits_checked += 1;
        let first = !self.commits.contains_key(&session);
        *self.commits.entry(session).or_default() += 1;
        if first {
            // A session's first commit may come late (a resync one block at a time over
            // slow links is sound, just slow): it gets time to show it keeps going.
            self.end = self
                .end
                .max(self.now.get() + AFTER_PROTECTION)
                .min(LAST_STEP);
        }
        if debug() {
            eprintln!(
                "seed {seed} step {}: session {session} committed epoch {c}",
                self.now.get()
            );
        }
        let want = w
            .oracle
            .get(&(session, c))
            .unwrap_or_else(|| panic!("seed {seed}: no oracle of epoch {c}"));
        let m = s.driver.mirror().expect("a mirror once committed");
        for p in 0..PAGES {
            let gpa = (p * PAGE_SIZE) as u64;
            assert!(
                m.page(gpa) == Some(&want.mem[p * PAGE_SIZE..(p + 1) * PAGE_SIZE]),
                "seed {seed}: standby memory differs from the primary at epoch {c} (page {p})"
            );
        }
        assert_eq!(
            m.state_bytes(),
            Some(&want.counter.to_le_bytes()[..]),
            "seed {seed}: standby state differs from the primary at epoch {c}"
        );
    }

    fn deliver(&mut self, pkt: Packet) {
        if pkt.session != self.session {
            return; // a previous session's A-Link is gone
        }
        match pkt.payload {
            Payload::ToStandby(h, b) => {
                if !self.standby_alive() {
                    return;
                }
                let n = h.len();
                let mut body = h;
                body.extend_from_slice(&b);
                let Some(s) = self.standby.as_mut() else {
                    return;
                };
                let (before, sink_before) = {
                    let w = self.world.borrow();
                    ((w.sink.rewrites, w.lan.duplicates), w.sink.bytes.len())
                };
                let r = s.driver.on_message(n, body.into());
                self.violations = self.violations.max(s.driver.violations());
                match r {
                    Ok(None) => {}
                    Ok(Some(StandbyOutcome::FailedOver(toy, report))) if report.planned => {
                        let asked = self.swap_asked_sink.take();
                        let w = self.world.borrow();
                        assert_eq!(
                            (w.sink.rewrites, w.lan.duplicates),
                            before,
                            "seed {}: a role swap released output twice (console rewrites, \
                             duplicate frames)",
                            self.seed
                        );
                        assert!(
                            report.released_through < Some(report.last_committed),
                            "seed {}: the swap point's output must be the standby's to release",
                            self.seed
                        );
                        // Once the swap was asked, the old primary released nothing (a
                        // client answered there would send its next request to a guest
                        // that never runs again): the standby released it all.
                        assert_eq!(
                            Some(sink_before),
                            asked,
                            "seed {}: the old primary released output after the swap request",
                            self.seed
                        );
                        drop(w);
                        self.swapped_in(*toy);
                        return;
                    }
                    Ok(Some(_)) => {
                        panic!("seed {}: a message made the standby fail over", self.seed)
                    }
                    // A stale part refused (the primary is told): the standby keeps its
                    // replica, as the holder it takes over once the primary is gone.
                    Err(StandbyDriverError::Fenced { peer, known }) => assert!(
                        self.fenced_commit.is_some(),
                        "seed {}: FALSE FENCE: the standby refused a part of generation \
                         {peer} citing {known}, which the primary's own node holds",
                        self.seed
                    ),
                    Err(e) => self.driver_error("standby", &e),
                }
                self.check_commit();
            }
            Payload::ToPrimary(h, b) => {
                if !self.primary_alive() {
                    return;
                }
                let own = self
                    .primary
                    .as_ref()
                    .map_or(0, |p| p.generation.load(Ordering::SeqCst));
                let stamp = self.primary.as_ref().map_or(0, |p| p.stamp);
                let node = self
                    .primary
                    .as_ref()
                    .map_or(NodeId(1), |p| node_of(&p.image));
                let decoded = decode_to_primary(&h, &b);
                // The oracle's view, apart from the code under test: the message
                // carries a newer generation than the primary's, held by the other node
                // (a newer one of its own node is its own grant, not yet seen).
                let newer = match &decoded {
                    Ok(PrimaryboundMsg::Ack { generation, .. })
                    | Ok(PrimaryboundMsg::Fenced { generation }) => {
                        *generation > own && !held_by(*generation, node)
                    }
                    _ => false,
                };
                if newer {
                    if let Some(p) = &self.primary {
                        p.toy.0.fenced.set(true);
                    }
                }
                // The real standby echoes its session's generation (or a newer one):
                // an ack never carries an older one than its session's `Hello`.
                if let Ok(PrimaryboundMsg::Ack { generation, .. }) = &decoded {
                    assert!(
                        *generation >= stamp,
                        "seed {}: the standby acked with generation {generation}, older than \
                         its session's {stamp}",
                        self.seed
                    );
                }
                // The receive pump's check (the same function): a refused message
                // releases nothing and goes to the driver as a refusal.
                let refusal = decoded
                    .as_ref()
                    .ok()
                    .and_then(|m| screen(m, stamp, own, &|g| held_by(g, node)));
                let msg = match (refusal, decoded) {
                    (Some(r), _) => r,
                    (None, Ok(PrimaryboundMsg::Ack { epoch, .. })) => {
                        // The receive pump releases an acknowledged epoch's output
                        // itself, before the driver hears of the ack (never a swap
                        // point's: the standby releases that).
                        if let Some(p) = &self.primary {
                            p.swap.release_on_ack(epoch, |through| {
                                let _ = p.toy.release_output(through);
                            });
                        }
                        FromStandby::Ack { epoch }
                    }
                    (None, Ok(PrimaryboundMsg::Fenced { .. })) => {
                        // Not newer than the primary's (else `fences` took it).
                        assert!(
                            !newer,
                            "seed {}: the primary ignored a refusal citing a generation newer \
                             than its {own}",
                            self.seed
                        );
                        return;
                    }
                    (None, Ok(PrimaryboundMsg::SwapAccepted { epoch })) => {
                        // The old primary of a swap (the standby runs the VM already).
                        let Some(old) = self.swapping_out.as_mut() else {
                            panic!("seed {}: a swap acceptance without a swap", self.seed)
                        };
                        if old.toy.0.dead.get() {
                            return;
                        }
                        if let Some(d) = old.driver.as_mut() {
                            if let Err(e) = d.on_message(FromStandby::SwapAccepted { epoch }) {
                                panic!("seed {}: old primary: {e}", self.seed);
                            }
                            assert_eq!(
                                d.phase(),
                                PrimaryPhase::SwappedOut,
                                "seed {}: the acceptance did not end the old primary's session",
                                self.seed
                            );
                        }
                        self.swapped_out();
                        return;
                    }
                    (None, Ok(PrimaryboundMsg::SwapRefused { epoch })) => {
                        // The standby's quorum gave no grant: the primary resumes.
                        self.swaps_no_grant += 1;
                        FromStandby::SwapRefused { epoch }
                    }
                    (None, Ok(PrimaryboundMsg::Disk { head, payload })) => {
                        match wire::decode_to_primary(&head, payload) {
                            Ok(DiskToPrimary::ReadDone { .. } | DiskToPrimary::Digests { .. }) => {
                                return
                            }
                            Ok(msg) => FromStandby::Disk {
                                msg,
                                payload: payload.to_vec(),
                            },
                            Err(e) => panic!("seed {}: disk message: {e}", self.seed),
                        }
                    }
                    (None, Err(e)) => panic!("seed {}: message to the primary: {e}", self.seed),
                };
                let r = match self.primary.as_mut().and_then(|p| p.driver.as_mut()) {
                    Some(d) => d.on_message(msg),
                    None => Ok(()),
                };
                match r {
                    Err(DriverError::Fenced { peer, .. }) => self.demote_primary(peer),
                    Err(e) => self.driver_error("primary", &e),
                    Ok(()) => {}
                }
                assert!(
                    !newer || !self.primary_alive(),
                    "seed {}: the primary received generation newer than its {own} and ran on",
                    self.seed
                );
            }
        }
    }

    /// The primary learned it lost the VM: its process ends (demoted) with its held
    /// output, the holder (the standby) takes over once it sees the primary gone.
    fn demote_primary(&mut self, generation: u64) {
        if let Some(p) = &self.primary {
            assert!(
                !held_by(generation, node_of(&p.image)),
                "seed {}: FALSE DEMOTION: the primary was demoted by generation {generation}, \
                 which its own node holds",
                self.seed
            );
        }
        if debug() {
            eprintln!(
                "seed {} step {}: primary DEMOTED by generation {generation}",
                self.seed,
                self.now.get()
            );
        }
        self.demoted += 1;
        self.generation = self.generation.max(generation);
        self.kill_primary();
        // As the pair's demoted primary does: its disks become the winner's resync
        // target (a delta when the metadata allows), the winner's generation recorded.
        if let Some(p) = &self.primary {
            for image in self.images(&p.image) {
                let store = storage_mirror::meta::MetaStore::for_image(&image);
                match store.load() {
                    Ok(storage_mirror::meta::MetaState::Ok(mut m)) => {
                        m.mark_demoted(generation);
                        store.save(&m).expect("save the demoted metadata");
                    }
                    other => panic!("seed {}: demoted disk metadata: {other:?}", self.seed),
                }
            }
        }
        self.demoted_session = Some(self.session + 1);
    }

    /// The standby learns a newer generation than the primary's (a takeover grant).
    fn fence_standby(&mut self) {
        let Some(s) = &self.standby else { return };
        if !self.standby_alive() || self.session != 0 {
            return;
        }
        // A takeover grant to the standby's node: the next generation of its parity.
        self.generation = next_generation(self.generation, node_of(&s.image))
            .expect("generations stay small in a run");
        s.gate.generation.store(self.generation, Ordering::SeqCst);
        self.fenced_commit = Some(s.driver.committed());
        self.crashed_sessions.push(self.session);
        if debug() {
            eprintln!(
                "seed {} step {}: the standby knows generation {} (committed {:?})",
                self.seed,
                self.now.get(),
                self.generation,
                s.driver.committed()
            );
        }
    }

    /// The primary's node is granted a newer generation of its own (a first grant, or
    /// a re-acquired lease): the standby learns it now (the witness answered its query,
    /// or the primary's peer message came first), the primary's driver `lag` steps
    /// later (its quorum thread has not handed it over yet).
    fn own_grant(&mut self, lag: u64) {
        if self.session != 0 || !self.primary_alive() || !self.standby_alive() {
            return;
        }
        let (Some(p), Some(s)) = (&self.primary, &self.standby) else {
            return;
        };
        self.generation = next_generation(self.generation, node_of(&p.image))
            .expect("generations stay small in a run");
        s.gate.generation.store(self.generation, Ordering::SeqCst);
        let at = self.now.get() + lag;
        self.own_grant_pending = Some((at, self.generation, p.generation.clone()));
        self.own_grants += 1;
        if debug() {
            eprintln!(
                "seed {} step {}: the standby knows the primary's own generation {}, the \
                 primary's driver from step {at}",
                self.seed,
                self.now.get(),
                self.generation
            );
        }
    }

    fn step(&mut self, rng: &mut Rng) {
        let now = self.now.get();
        if self.fence_at == Some(now) {
            self.fence_standby();
        }
        if let Some((at, lag)) = self.own_grant_at {
            if at == now {
                self.own_grant(lag);
            }
        }
        if let Some((at, g, counter)) = self.own_grant_pending.take() {
            if at <= now {
                counter.fetch_max(g, Ordering::SeqCst);
            } else {
                self.own_grant_pending = Some((at, g, counter));
            }
        }
        if self.f.link_down > 0 && rng.chance(self.f.link_down) {
            self.net.borrow_mut().down_until = now + 1 + rng.below(30);
        }
        // The guest runs unless paused (throttle, capture) or dead.
        if let Some(p) = &self.primary {
            if !p.toy.0.dead.get() && !p.toy.0.paused.get() && rng.chance(800) {
                p.toy.step();
            }
        }
        if self.f.swap_chance > 0 && self.swap_rng.chance(self.f.swap_chance) {
            self.ask_swap();
        }
        if self
            .swapping_out
            .as_ref()
            .is_some_and(|o| o.toy.0.dead.get())
        {
            self.swapped_out();
        }
        if self.primary_alive() {
            let r = match self.primary.as_mut().and_then(|p| p.driver.as_mut()) {
                Some(d)
                    if !matches!(d.phase(), PrimaryPhase::Simplex | PrimaryPhase::SwappedOut) =>
                {
                    d.tick()
                }
                _ => Ok(()),
            };
            if let Err(e) = r {
                self.driver_error("primary", &e);
            }
        }
        if self.standby_alive() {
            if let Some(s) = self.standby.as_mut() {
                if let Err(e) = s.driver.on_idle() {
                    self.driver_error("standby", &e);
                }
            }
            self.check_commit();
        }
        let due = self.net.borrow_mut().due(now);
        for pkt in due {
            self.deliver(pkt);
        }
        // Crashes and failure detection.
        if self.primary.is_some() && !self.primary_alive() && self.standby_peer_lost_at.is_none() {
            self.standby_peer_lost_at = Some(now + self.f.detect);
            self.crashed_sessions.push(self.session);
        }
        if self.standby_alive() && self.session == 0 && self.f.standby_crash_at_step == Some(now) {
            if let Some(s) = &self.standby {
                s.dead.set(true);
            }
        }
        if self.standby.is_some() && !self.standby_alive() && self.primary_peer_lost_at.is_none() {
            self.primary_peer_lost_at = Some(now + self.f.detect);
            self.crashed_sessions.push(self.session);
        }
        if self.standby_peer_lost_at == Some(now) {
            self.standby_peer_lost_at = None;
            self.standby_lost_primary();
        }
        if self.primary_peer_lost_at == Some(now) {
            self.primary_peer_lost_at = None;
            self.primary_lost_standby();
        }
        if self.restart.as_ref().is_some_and(|(_, at)| *at == now) {
            if let Some((image, _)) = self.restart.take() {
                if self.primary_alive() && self.session + 1 < MAX_SESSIONS {
                    self.session += 1;
                    self.end = self.end.max(now + TAIL);
                    self.start_session(image);
                }
            }
        }
    }

    /// The operator asks the primary for a swap (refused unless in sync).
    fn ask_swap(&mut self) {
        if self.swapping_out.is_some() || !self.primary_alive() || !self.standby_alive() {
            return;
        }
        let Some(d) = self.primary.as_mut().and_then(|p| p.driver.as_mut()) else {
            return;
        };
        match d.request_swap() {
            Ok(Ok(())) => {
                // One request in three finds the standby's quorum refusing the grant
                // (decided without the swap RNG: the kept seeds' schedules stay).
                let refuse =
                    (self.seed + u64::from(self.swaps + self.swaps_no_grant)).is_multiple_of(3);
                if let Some(st) = &self.standby {
                    st.gate.refuse_swap.store(refuse, Ordering::SeqCst);
                }
                self.swap_asked_sink = Some(self.world.borrow().sink.bytes.len());
                if debug() {
                    eprintln!(
                        "seed {} step {}: swap requested (quorum refuses: {refuse})",
                        self.seed,
                        self.now.get()
                    );
                }
            }
            Ok(Err(why)) => {
                self.swaps_refused += 1;
                if debug() {
                    eprintln!(
                        "seed {} step {}: swap refused: {why}",
                        self.seed,
                        self.now.get()
                    );
                }
            }
            Err(e) => self.driver_error("primary", &e),
        }
    }

    /// The standby accepted a swap and runs the VM: the role switch (as after a
    /// failover); the old primary waits for the acceptance.
    fn swapped_in(&mut self, toy: Toy) {
        self.swaps += 1;
        self.swapped_sessions.push(self.session);
        if debug() {
            eprintln!(
                "seed {} step {}: swap: the standby runs the VM from epoch {:?}",
                self.seed,
                self.now.get(),
                self.world.borrow().committed.get(&self.session)
            );
        }
        let image = match self.standby.take() {
            Some(s) => s.image,
            None => panic!("seed {}: a swap without a standby", self.seed),
        };
        let disks = PrimaryDisks::open(&self.images(&image))
            .unwrap_or_else(|e| panic!("seed {}: swapped-in disks: {e}", self.seed));
        toy.set_hooks(Arc::new(MirroredDisks(disks.clone())));
        self.swapping_out = self.primary.take();
        self.primary = Some(PrimaryNode {
            toy,
            disks,
            image,
            driver: None,
            sends: Rc::new(Cell::new(0)),
            // A swap moves no generation (seeds that swap fence nothing).
            generation: Arc::new(AtomicU64::new(self.generation)),
            swap: Arc::new(SwapPort::default()),
            stamp: 0,
        });
        self.end = self.end.max(self.now.get() + TAIL);
        // A crash of the old primary meanwhile is not a failover of this one.
        self.standby_peer_lost_at = None;
        if self
            .swapping_out
            .as_ref()
            .is_some_and(|o| o.toy.0.dead.get())
        {
            self.swapped_out();
        }
    }

    /// The old primary of a swap took the acceptance (or died waiting for it): its VM
    /// stops for good, its disks close cleanly, it comes back as the standby.
    fn swapped_out(&mut self) {
        let Some(old) = self.swapping_out.take() else {
            return;
        };
        old.toy.0.dead.set(true);
        let PrimaryNode {
            disks,
            image,
            driver,
            ..
        } = old;
        // (No demoted session in a seed that swaps: the session number only matters there.)
        self.retire(driver, self.session);
        disks.clean_shutdown();
        drop(disks);
        self.restart = Some((image, self.now.get() + self.f.restart_after));
    }

    /// Every link to the primary is down, as the standby sees it.
    fn standby_lost_primary(&mut self) {
        if !self.standby_alive() {
            return;
        }
        let Some(s) = self.standby.as_mut() else {
            return;
        };
        let r = s.driver.on_peer_lost();
        let image = s.image.clone();
        match r {
            Ok(Some(StandbyOutcome::FailedOver(toy, _report))) => {
                self.failovers += 1;
                if debug() {
                    eprintln!(
                        "seed {} step {}: failover from epoch {:?}",
                        self.seed,
                        self.now.get(),
                        self.world.borrow().committed.get(&self.session)
                    );
                }
                // The role switch (as `pair::role` does it): the survivor's disks are
                // opened as a primary's and record every write from the first
                // instruction the resumed guest runs.
                let toy = *toy;
                let disks = PrimaryDisks::open(&self.images(&image))
                    .unwrap_or_else(|e| panic!("seed {}: survivor disks: {e}", self.seed));
                toy.set_hooks(Arc::new(MirroredDisks(disks.clone())));
                let old = self.primary.take().map(|p| (p.image, p.driver));
                let session = self.session;
                let old = old.map(|(image, d)| {
                    self.retire(d, session);
                    image
                });
                let known = self
                    .standby
                    .take()
                    .map_or(0, |s| s.gate.generation.load(Ordering::SeqCst));
                // The takeover's grant: the next generation of the survivor's node
                // unless it holds the newest already (0: the run models no quorum).
                let me = node_of(&image);
                let generation = if known != 0 && !held_by(known, me) {
                    next_generation(known, me).expect("generations stay small in a run")
                } else {
                    known
                };
                self.generation = self.generation.max(generation);
                self.primary = Some(PrimaryNode {
                    toy,
                    disks,
                    image,
                    driver: None,
                    sends: Rc::new(Cell::new(0)),
                    generation: Arc::new(AtomicU64::new(generation)),
                    swap: Arc::new(SwapPort::default()),
                    stamp: 0,
                });
                self.end = self.end.max(self.now.get() + TAIL);
                // The old primary comes back, as the standby.
                if let Some(old) = old {
                    self.restart = Some((old, self.now.get() + self.f.restart_after));
                }
            }
            Ok(Some(StandbyOutcome::NoReplica)) => {
                assert!(
                    !self.world.borrow().committed.contains_key(&self.session),
                    "seed {}: no replica after a commit",
                    self.seed
                );
                self.standby = None;
            }
            Ok(Some(StandbyOutcome::Stopped { .. } | StandbyOutcome::PrimaryBack { .. }))
            | Ok(None) => {}
            Err(e) => self.driver_error("standby", &e),
        }
    }

    /// Every link to the standby is down, as the primary sees it.
    fn primary_lost_standby(&mut self) {
        if !self.primary_alive() {
            return;
        }
        let r = match self.primary.as_mut().and_then(|p| p.driver.as_mut()) {
            Some(d) => d.peer_lost(),
            None => Ok(()),
        };
        if let Err(e) = r {
            self.driver_error("primary", &e);
            return;
        }
        // The standby comes back (its replica where it stopped).
        if let Some(s) = self.standby.take() {
            self.restart = Some((s.image, self.now.get() + self.f.restart_after));
        }
    }
}

fn run(seed: u64) -> Report {
    let mut rng = Rng(seed.wrapping_mul(0x2545_f491_4f6c_dd1d) ^ 0x5eed);
    let pick_fifo = rng.chance(500);
    let faulty = !pick_fifo && rng.chance(800);
    // Without faults the scheduler still shuffles same-step deliveries: FIFO then.
    let fifo = !faulty;
    let f = Faults {
        fifo,
        drop: if faulty && rng.chance(200) { 5 } else { 0 },
        dup: if faulty { rng.below(80) } else { 0 },
        corrupt: if faulty && rng.chance(100) { 3 } else { 0 },
        max_delay: rng.below(8),
        link_down: rng.below(6),
        primary_crash_at_send: [(); MAX_SESSIONS as usize].map(|()| {
            if rng.chance(700) {
                Some(rng.below(160))
            } else {
                None
            }
        }),
        standby_crash_at_step: if rng.chance(150) {
            Some(rng.below(HORIZON))
        } else {
            None
        },
        detect: 1 + rng.below(20),
        restart_after: 1 + rng.below(40),
        swap_chance: 0,
    };
    let mut swap_rng = Rng(mix(seed ^ 0x5a5a_0015));
    let f = Faults {
        // Swaps need the A-Link's in-order delivery (the acceptance must arrive).
        swap_chance: if f.fifo && swap_rng.chance(333) {
            1 + swap_rng.below(20)
        } else {
            0
        },
        ..f
    };
    let cfg = PrimaryConfig {
        epoch_len: Duration::from_millis(4 + rng.below(12)),
        min_epoch: Duration::from_millis(1 + rng.below(3)),
        max_in_flight: 1 + rng.below(4) as u32,
        // From "every early end waits for an ack" to "never waits".
        coalesce_bytes: [0, 4096, 1 << 20, u64::MAX][rng.below(4) as usize],
        sync_max_rounds: 1 + rng.below(4) as u32,
        sync_small_pages: rng.below(4),
    };
    let resync = ResyncConfig {
        chunk_blocks: 1 + rng.below(8) as u32,
        max_in_flight: 1 + rng.below(8) as usize,
        ..ResyncConfig::default()
    };
    let has_disk = !rng.chance(100);
    // Fencing draws from its own stream: the schedules of the seeds kept as regression
    // cases stay what they were.
    let mut frng = Rng(seed ^ 0xfe4c_ed00_0000_0001);
    let fence_at = if frng.chance(250) {
        Some(1 + frng.below(HORIZON))
    } else {
        None
    };
    // A fence models a quorum's takeover; the runtime refuses a planned swap when a
    // quorum is configured (its handover is not built), so a seed has one or the other.
    let f = Faults {
        swap_chance: if fence_at.is_some() { 0 } else { f.swap_chance },
        ..f
    };
    // The primary's own grant reaching the standby first (issue 14), in seeds that
    // neither fence nor swap: its own stream too.
    let mut grng = Rng(mix(seed ^ 0x0a0a_0014));
    let own_grant_at = if fence_at.is_none() && f.swap_chance == 0 && grng.chance(300) {
        Some((1 + grng.below(HORIZON), 1 + grng.below(40)))
    } else {
        None
    };
    let scratch = Scratch::new(seed);
    let world = Rc::new(RefCell::new(World {
        seed,
        sink: Sink::default(),
        lan: Lan::default(),
        oracle: BTreeMap::new(),
        committed: BTreeMap::new(),
        commits_checked: 0,
    }));
    let net = Rc::new(RefCell::new(Net {
        q: Vec::new(),
        next_id: 0,
        down_until: 0,
        last_at: [0; 2],
        faults: f,
        rng: Rng(rng.next()),
    }));
    let mut sim = Sim {
        seed,
        f,
        cfg,
        resync,
        world: world.clone(),
        net,
        now: Rc::new(Cell::new(0)),
        base: Instant::now(),
        session: 0,
        primary: None,
        standby: None,
        restart: None,
        primary_peer_lost_at: None,
        standby_peer_lost_at: None,
        end: HORIZON,
        failovers: 0,
        commits: BTreeMap::new(),
        driver_errors: 0,
        violations: 0,
        crashed_sessions: Vec::new(),
        resyncs: (0, 0),
        throttles: 0,
        has_disk,
        fence_at,
        fenced_commit: None,
        generation: 0,
        demoted: 0,
        demoted_session: None,
        demoted_resyncs: (0, 0),
        demoted_delta_bytes: (0, 0),
        swap_rng,
        swapping_out: None,
        swap_asked_sink: None,
        swapped_sessions: Vec::new(),
        swaps: 0,
        swaps_refused: 0,
        swaps_no_grant: 0,
        own_grant_at,
        own_grant_pending: None,
        own_grants: 0,
    };
    // The primary: its disks opened (degraded, recording) before the guest runs.
    let pimage = scratch.image("pm1.img");
    let simage = scratch.image("pm2.img");
    let toy = Toy::fresh(&world, &pimage, sim.has_disk);
    let disks = PrimaryDisks::open(&sim.images(&pimage))
        .unwrap_or_else(|e| panic!("seed {seed}: primary disks: {e}"));
    toy.set_hooks(Arc::new(MirroredDisks(disks.clone())));
    sim.primary = Some(PrimaryNode {
        toy,
        disks,
        image: pimage,
        driver: None,
        sends: Rc::new(Cell::new(0)),
        generation: Arc::new(AtomicU64::new(0)),
        swap: Arc::new(SwapPort::default()),
        stamp: 0,
    });
    sim.start_session(simage);
    while sim.now.get() < sim.end {
        sim.now.set(sim.now.get() + 1);
        sim.step(&mut rng);
        let nobody = !sim.primary_alive() && !sim.standby_alive() && sim.swapping_out.is_none();
        if nobody {
            break;
        }
    }
    let last = sim.primary.as_mut().and_then(|p| p.driver.take());
    sim.retire(last, sim.session);
    let w = world.borrow();
    // The console outside: 0, 1, 2, ... with no gap, duplicate or reordering.
    for (i, v) in w.sink.bytes.chunks(8).enumerate() {
        let mut b = [0u8; 8];
        b.copy_from_slice(v);
        assert_eq!(
            u64::from_le_bytes(b),
            i as u64,
            "seed {seed}: console sequence broken at {i}"
        );
    }
    // Every output value reached the LAN too.
    let values = (w.sink.bytes.len() / 8) as u64;
    assert_eq!(
        w.lan.max.map_or(0, |m| m + 1),
        values,
        "seed {seed}: frames missing at the end"
    );
    if debug() {
        eprintln!(
            "seed {seed}: {f:?} {cfg:?} {resync:?} sessions {} failovers {} commits {:?} \
             resyncs (full, delta) {:?} errors {}",
            sim.session + 1,
            sim.failovers,
            sim.commits,
            sim.resyncs,
            sim.driver_errors
        );
    }
    if f.fifo {
        // In order and exactly once, the stream never breaks the protocol.
        assert_eq!(sim.violations, 0, "seed {seed}: violations on a FIFO link");
        // Liveness: a session nothing crashed in commits epochs (the first one, and a
        // later one that had its time).
        for s in 0..=sim.session {
            if sim.crashed_sessions.contains(&s) || sim.swapped_sessions.contains(&s) {
                continue;
            }
            let c = sim.commits.get(&s).copied().unwrap_or(0);
            assert!(
                c >= 5,
                "seed {seed}: only {c} commits in session {s} of a lossless run"
            );
        }
    }
    Report {
        commits: w.commits_checked,
        resyncs: sim.resyncs,
        throttles: sim.throttles,
        rewrites: w.sink.rewrites,
        frame_duplicates: w.lan.duplicates,
        failovers: sim.failovers,
        sessions: sim.session + 1,
        fifo: f.fifo,
        protected: sim.commits.get(&0).copied().unwrap_or(0) > 1,
        fenced: sim.fenced_commit.is_some(),
        demoted: sim.demoted,
        demoted_resyncs: sim.demoted_resyncs,
        demoted_delta_bytes: sim.demoted_delta_bytes,
        swaps: sim.swaps,
        swaps_refused: sim.swaps_refused,
        swaps_no_grant: sim.swaps_no_grant,
        own_grants: sim.own_grants,
    }
}

/// Seeds that failed once (kept as regression cases: they always run).
fn regressions() -> Vec<u64> {
    include_str!("sim_regressions.txt")
        .lines()
        .filter_map(|l| l.split('#').next())
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

fn seeds() -> Vec<u64> {
    match std::env::var("SIM_SEED") {
        Ok(v) => vec![v.parse().expect("SIM_SEED is a number")],
        Err(_) => {
            let n = std::env::var("SIM_SEEDS")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(2000u64);
            let mut s = regressions();
            s.extend(0..n);
            s
        }
    }
}

#[derive(Default)]
struct Totals {
    seeds: u64,
    commits: u64,
    rewrites: u64,
    frame_dups: u64,
    failovers: u64,
    later_sessions: u64,
    fifo: u64,
    protected: u64,
    full: u64,
    delta: u64,
    throttles: u64,
    throttled_runs: u64,
    fenced: u64,
    demoted: u64,
    demoted_full: u64,
    demoted_delta: u64,
    demoted_delta_bytes: u64,
    demoted_full_bytes: u64,
    swaps: u64,
    swaps_refused: u64,
    swaps_no_grant: u64,
    swap_runs: u64,
    own_grants: u64,
}

impl Totals {
    fn add(&mut self, r: &Report) {
        self.seeds += 1;
        self.commits += r.commits;
        self.rewrites += r.rewrites;
        self.frame_dups += r.frame_duplicates;
        self.failovers += u64::from(r.failovers);
        self.later_sessions += u64::from(r.sessions > 1);
        self.protected += u64::from(r.protected && r.fifo);
        self.fifo += u64::from(r.fifo);
        self.full += u64::from(r.resyncs.0);
        self.delta += u64::from(r.resyncs.1);
        self.throttles += r.throttles;
        self.throttled_runs += u64::from(r.throttles > 0);
        self.fenced += u64::from(r.fenced);
        self.demoted += u64::from(r.demoted);
        self.demoted_full += u64::from(r.demoted_resyncs.0);
        self.demoted_delta += u64::from(r.demoted_resyncs.1);
        self.demoted_delta_bytes += r.demoted_delta_bytes.0;
        self.demoted_full_bytes += r.demoted_delta_bytes.1;
        self.swaps += u64::from(r.swaps);
        self.swaps_refused += u64::from(r.swaps_refused);
        self.swaps_no_grant += u64::from(r.swaps_no_grant);
        self.swap_runs += u64::from(r.swaps > 0);
        self.own_grants += u64::from(r.own_grants);
    }

    fn merge(&mut self, o: Totals) {
        self.seeds += o.seeds;
        self.commits += o.commits;
        self.rewrites += o.rewrites;
        self.frame_dups += o.frame_dups;
        self.failovers += o.failovers;
        self.later_sessions += o.later_sessions;
        self.protected += o.protected;
        self.fifo += o.fifo;
        self.full += o.full;
        self.delta += o.delta;
        self.throttles += o.throttles;
        self.throttled_runs += o.throttled_runs;
        self.fenced += o.fenced;
        self.demoted += o.demoted;
        self.demoted_full += o.demoted_full;
        self.demoted_delta += o.demoted_delta;
        self.demoted_delta_bytes += o.demoted_delta_bytes;
        self.demoted_full_bytes += o.demoted_full_bytes;
        self.swaps += o.swaps;
        self.swaps_refused += o.swaps_refused;
        self.swaps_no_grant += o.swaps_no_grant;
        self.swap_runs += o.swap_runs;
        self.own_grants += o.own_grants;
    }
}

#[test]
fn simulation_under_faults() {
    let t0 = std::time::Instant::now();
    let all = seeds();
    // Seeds are independent: spread them over the CPUs (each run is deterministic in
    // its seed whatever thread runs it).
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(8);
    // One seed: its panic as it is; many: the failing seeds, summed up below.
    let quiet = all.len() > 1;
    let prev_hook = std::panic::take_hook();
    if quiet {
        std::panic::set_hook(Box::new(|_| {}));
    }
    let next = std::sync::atomic::AtomicUsize::new(0);
    let failed = std::sync::Mutex::new(Vec::new());
    let mut t = Totals::default();
    std::thread::scope(|s| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(|| {
                    let mut t = Totals::default();
                    loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let Some(&seed) = all.get(i) else { break };
                        match std::panic::catch_unwind(|| run(seed)) {
                            Ok(r) => t.add(&r),
                            Err(e) => {
                                let why = e
                                    .downcast_ref::<String>()
                                    .cloned()
                                    .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                                    .unwrap_or_default();
                                failed.lock().unwrap().push((seed, why));
                            }
                        }
                    }
                    t
                })
            })
            .collect();
        for w in workers {
            t.merge(w.join().expect("a simulation worker"));
        }
    });
    if quiet {
        std::panic::set_hook(prev_hook);
    }
    let mut failed = failed.into_inner().unwrap();
    failed.sort();
    assert!(
        failed.is_empty(),
        "{} of {} seeds FAILED (replay one with SIM_SEED=<n> SIM_DEBUG=1; add it to \
         checkpoint/tests/sim_regressions.txt once fixed): {:?}",
        failed.len(),
        all.len(),
        &failed[..failed.len().min(10)]
    );
    eprintln!(
        "{} seeds in {:?} on {threads} threads: {} commits checked, {} failovers, {} runs \
         with a later session (failback or a standby's return), disk resyncs {} full and {} \
         delta, {} throttled captures in {} runs, {} of {} in-order runs protected, {} \
         idempotent console re-releases, {} duplicate frames on the LAN, {} runs fenced \
         the standby ({} primaries demoted; their disks back by {} full and {} delta \
         resyncs, the deltas moving {} bytes where full copies would move {}), {} role \
         swaps in {} runs ({} requests refused: not in sync; {} refused by the standby's \
         quorum, the VM resumed on the old primary), {} own grants of the \
         primary's node learned by the standby first (none fenced: checked)",
        t.seeds,
        t0.elapsed(),
        t.commits,
        t.failovers,
        t.later_sessions,
        t.full,
        t.delta,
        t.throttles,
        t.throttled_runs,
        t.protected,
        t.fifo,
        t.rewrites,
        t.frame_dups,
        t.fenced,
        t.demoted,
        t.demoted_full,
        t.demoted_delta,
        t.demoted_delta_bytes,
        t.demoted_full_bytes,
        t.swaps,
        t.swap_runs,
        t.swaps_refused,
        t.swaps_no_grant,
        t.own_grants
    );
    if all.len() >= 1000 {
        // The test is not vacuous: most runs get protected, many fail over and come
        // back in a later session, with a delta.
        assert!(
            t.protected * 10 > t.fifo * 8,
            "{} of {} protected",
            t.protected,
            t.fifo
        );
        assert!(t.failovers * 5 > t.seeds, "{} failovers", t.failovers);
        assert!(
            t.later_sessions * 5 > t.seeds,
            "{} later sessions",
            t.later_sessions
        );
        assert!(t.delta * 10 > t.seeds, "{} delta resyncs", t.delta);
        assert!(
            t.throttled_runs * 10 > t.seeds,
            "{} throttled runs",
            t.throttled_runs
        );
        // Fencing is exercised: most fenced runs end with the primary demoted.
        assert!(t.fenced * 10 > t.seeds, "{} fenced runs", t.fenced);
        assert!(
            t.demoted * 2 > t.fenced,
            "{} of {} demoted",
            t.demoted,
            t.fenced
        );
        // A demoted node's disk comes back by a delta (the union of both bitmaps from
        // the generation both shared), checked equal to the primary's at every commit.
        assert!(
            t.demoted_delta * 2 > t.demoted,
            "{} of {} demoted disks back by a delta",
            t.demoted_delta,
            t.demoted
        );
        // ... and the delta moves the blocks either side wrote since, not the disk (on
        // the simulation's 16-block disk the two sides' writes usually cover all of it,
        // so the saving shows in some runs only; the exact plan is
        // storage-mirror's `a_demoted_standby_gets_a_delta_of_both_bitmaps`).
        assert!(
            t.demoted_delta_bytes < t.demoted_full_bytes,
            "the demoted disks' deltas moved {} bytes, a full copy {}",
            t.demoted_delta_bytes,
            t.demoted_full_bytes
        );
        assert!(
            t.swap_runs * 10 > t.seeds,
            "{} runs with a role swap",
            t.swap_runs
        );
        // Issue 14's race is exercised (each one checked: nothing fenced, nobody
        // demoted by its own node's generation).
        assert!(
            t.own_grants * 20 > t.seeds,
            "{} own grants learned by the standby first",
            t.own_grants
        );
    }
}
