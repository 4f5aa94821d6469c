//! Output commit: guest output held per epoch until the caller says it may leave.
//!
//! Devices that send guest output out of the VM (virtio-console TX, the COM1 UART,
//! virtio-net TX) register one *stream* each with the VM's [`OutputGate`]. While the
//! gate is disabled (the default) they write straight to their sink or TAP, as before.
//! Once [`OutputGate::enable`] is called, every byte or frame they emit is appended to
//! their stream's queue instead, tagged with the *open* epoch.
//!
//! Epochs are numbered by the caller. [`OutputGate::close_epoch`]`(n)` (VM paused) says
//! "everything emitted since the previous close (or since enable) is epoch `n`"; later
//! output belongs to the next close. `n` must be greater than the previous close; the
//! first close after enable may be any number (0 included). [`OutputGate::release`]
//! writes every held item of closed epochs `<= n`, per stream in emission order, to the
//! real sinks; it may run on any thread while the guest runs (releases are serialised
//! among themselves). Output of the open epoch is never released by it.
//! [`OutputGate::discard_after`] drops what closed epochs `> n` and the open epoch hold.
//!
//! Streams are independent: the console stream and each NIC's stream keep their own
//! order; nothing orders a console byte against a frame (as on real hardware).
//!
//! Bound: when the held bytes reach the limit, virtio devices stop taking chains off
//! their transmit queues ([`GatePort::has_room`] says no and marks the stream
//! stalled), so the guest's own queue fills and it waits: nothing is dropped. When a
//! release or discard brings the total under the limit again, each stalled stream's
//! wake eventfd is signalled and its device's backend handler resumes transmitting
//! (the guest need not notify again). The one admitted item may overshoot the limit by
//! at most one chain (1 MiB console, 64 KiB frame). The UART cannot stall (vm-superio
//! always reports its transmitter empty, and blocking the vCPU thread would block
//! pause), so UART bytes are held even past the limit: the caller's backpressure on
//! [`OutputGate::held_bytes`] is what bounds them.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use twinrun_lock::lock;

use vmm_sys_util::eventfd::EventFd;

use super::virtio::console::sink::ConsoleSink;

/// Default limit of held bytes (all streams, all epochs).
pub const DEFAULT_HELD_LIMIT: u64 = 32 << 20;
/// Console bytes of one epoch are coalesced into buffers of up to this size, so a
/// release is a few large `writev` segments, not one per guest write.
const CONSOLE_CHUNK: usize = 64 << 10;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum OutputError {
    #[error("output commit is not enabled")]
    NotEnabled,
    #[error("the VM must be paused for this")]
    NotPaused,
    #[error("epoch {epoch} closed after epoch {last}: epoch numbers must increase")]
    EpochOrder { epoch: u64, last: u64 },
    #[error("the disk journal is not enabled")]
    JournalNotEnabled,
    #[error("console sink: {0}")]
    Sink(String),
}

/// What a stream carries (release statistics are kept per kind).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StreamKind {
    /// Console bytes (virtio-console or UART): coalesced, released with `writev`.
    Console,
    /// Ethernet frames: one item per frame, released with one write each.
    Net,
}

/// Where a stream's released items go.
pub trait ReleaseSink: Send {
    /// Writes `items` in order; returns how many items were lost (a TAP that refused a
    /// frame). Errors of the destination are the destination's business, as for
    /// direct output.
    fn release(&mut self, items: &[&[u8]]) -> u64;

    /// Writes `items`, consecutive in the stream starting at stream position `pos`
    /// (console streams): a positioned sink writes them there, others in order.
    fn release_at(&mut self, pos: u64, items: &[&[u8]]) -> u64 {
        let _ = pos;
        self.release(items)
    }

    /// Where the next byte of this stream goes, if the sink knows (console sinks).
    fn position(&self) -> Option<u64> {
        None
    }

    /// Makes the sink write at stream positions from now on, the next output at `next`
    /// (default: where it would go now). Returns the position, or None when the sink
    /// has no positions.
    fn make_positioned(&mut self, next: Option<u64>) -> io::Result<Option<u64>> {
        let _ = next;
        Ok(None)
    }
}

/// A console sink shared between its device (socket events, direct writes while the
/// gate is off) and the gate.
pub struct ConsoleRelease(pub Arc<Mutex<ConsoleSink>>);

impl ReleaseSink for ConsoleRelease {
    fn release(&mut self, items: &[&[u8]]) -> u64 {
        lock(&self.0).write_all_vectored(items);
        0
    }

    fn release_at(&mut self, pos: u64, items: &[&[u8]]) -> u64 {
        lock(&self.0).write_all_at(pos, items);
        0
    }

    fn position(&self) -> Option<u64> {
        lock(&self.0).position()
    }

    fn make_positioned(&mut self, next: Option<u64>) -> io::Result<Option<u64>> {
        lock(&self.0).make_positioned(next)
    }
}

/// A duplicate of a TAP descriptor: frames are written from the releasing thread
/// without touching the device.
pub struct TapRelease(pub File);

impl ReleaseSink for TapRelease {
    fn release(&mut self, items: &[&[u8]]) -> u64 {
        let mut lost = 0;
        for f in items {
            loop {
                match self.0.write(f) {
                    Ok(_) => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        // As for a direct write: the host side is not taking frames,
                        // and the frame is lost as on a wire.
                        log::debug!("output gate: released frame dropped: {e}");
                        lost += 1;
                        break;
                    }
                }
            }
        }
        lost
    }
}

/// Counts of one closed epoch.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OutputEpochStats {
    pub epoch: u64,
    pub console_bytes: u64,
    pub net_frames: u64,
    pub net_bytes: u64,
    /// Held over all epochs after this close.
    pub held_bytes: u64,
}

/// The console output of one closed epoch: bytes `[pos, pos + data.len())` of the
/// console stream (the checkpoint layer ships them with the epoch so that a standby
/// can release them again, at the same positions, after a failover).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EpochConsole {
    pub epoch: u64,
    pub pos: u64,
    pub data: Vec<u8>,
}

/// What a release wrote.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReleaseStats {
    /// Closed epochs with output that this release emptied.
    pub epochs: u64,
    pub console_bytes: u64,
    pub net_frames: u64,
    pub net_bytes: u64,
    /// Frames the TAP refused.
    pub net_dropped: u64,
    /// Still held after the release.
    pub held_bytes: u64,
    /// Time spent writing (outside the gate's lock).
    pub write_time: Duration,
}

struct Held {
    /// Generation (one per open epoch) the item was emitted in.
    generation: u64,
    data: Vec<u8>,
    /// Bytes at the front of `data` that are not output (the virtio-net header).
    skip: usize,
    /// Console streams: stream position of the first output byte.
    pos: u64,
}

impl Held {
    fn bytes(&self) -> &[u8] {
        &self.data[self.skip..]
    }
}

/// One stream's items taken out for writing.
type Batch = (StreamKind, Arc<Mutex<dyn ReleaseSink>>, Vec<Held>);

/// Console bytes the first console stream had emitted when the last epoch closed:
/// `(epoch, stream position)`.
type LastClose = Option<(u64, u64)>;

struct Stream {
    kind: StreamKind,
    sink: Arc<Mutex<dyn ReleaseSink>>,
    items: VecDeque<Held>,
    stalled: bool,
    wake: EventFd,
    /// Console streams: position of the next byte emitted (held output included).
    pos: u64,
}

#[derive(Default)]
struct OpenCounts {
    console_bytes: u64,
    net_frames: u64,
    net_bytes: u64,
}

struct State {
    limit: u64,
    /// Generation of the open epoch; bumped by every close.
    generation: u64,
    /// Closed epochs that still hold output: `(generation, epoch)`, oldest first.
    closed: VecDeque<(u64, u64)>,
    last_closed: Option<u64>,
    held_bytes: u64,
    open: OpenCounts,
    streams: Vec<Stream>,
    last_close: LastClose,
    /// Called when the open epoch takes its first item (see
    /// [`OutputGate::set_waiting_notifier`]).
    notify_waiting: Option<WaitingNotifier>,
}

/// Told that output is waiting in the open epoch.
pub type WaitingNotifier = Arc<dyn Fn() + Send + Sync>;

/// The VM's output gate (one per VM, shared by its output devices).
pub struct OutputGate {
    /// Checked without the lock on every output: false means "write directly".
    enabled: AtomicBool,
    state: Mutex<State>,
    /// Serialises releases so that two releasing threads cannot interleave writes.
    release_lock: Mutex<()>,
}

impl Default for OutputGate {
    fn default() -> Self {
        OutputGate {
            enabled: AtomicBool::new(false),
            state: Mutex::new(State {
                limit: DEFAULT_HELD_LIMIT,
                generation: 0,
                closed: VecDeque::new(),
                last_closed: None,
                held_bytes: 0,
                open: OpenCounts::default(),
                streams: Vec::new(),
                last_close: None,
                notify_waiting: None,
            }),
            release_lock: Mutex::new(()),
        }
    }
}

impl OutputGate {
    pub fn new() -> Arc<OutputGate> {
        Arc::new(OutputGate::default())
    }

    /// Adds a stream; the device keeps the returned port.
    pub fn register(
        self: &Arc<Self>,
        kind: StreamKind,
        sink: Arc<Mutex<dyn ReleaseSink>>,
    ) -> io::Result<GatePort> {
        let wake = EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)?;
        let device_wake = wake.try_clone()?;
        let mut st = lock(&self.state);
        st.streams.push(Stream {
            kind,
            sink,
            items: VecDeque::new(),
            stalled: false,
            wake,
            pos: 0,
        });
        Ok(GatePort {
            gate: self.clone(),
            stream: st.streams.len() - 1,
            wake: device_wake,
        })
    }

    pub fn is_enabled(&self) -> bool {
        self.enabled.load(Ordering::Acquire)
    }

    /// From now on output is held. Enabling an enabled gate changes nothing.
    pub fn enable(&self) {
        let mut st = lock(&self.state);
        if !self.is_enabled() {
            // Held output continues the stream where direct output left it (the VM is
            // paused: every direct write has reached the sink).
            for s in st
                .streams
                .iter_mut()
                .filter(|s| s.kind == StreamKind::Console)
            {
                if let Some(p) = lock(&*s.sink).position() {
                    s.pos = p;
                }
            }
        }
        self.enabled.store(true, Ordering::Release);
    }

    fn console_stream(st: &mut State) -> Option<&mut Stream> {
        st.streams
            .iter_mut()
            .find(|s| s.kind == StreamKind::Console)
    }

    /// Makes the console sink write at stream positions (see
    /// [`ReleaseSink::make_positioned`]); the gate's stream position follows. Returns
    /// the position of the next console byte, None without a positioned console.
    pub fn make_console_positioned(&self, next: Option<u64>) -> io::Result<Option<u64>> {
        let mut st = lock(&self.state);
        let Some(s) = Self::console_stream(&mut st) else {
            return Ok(None);
        };
        let p = lock(&*s.sink).make_positioned(next)?;
        if let Some(p) = p {
            s.pos = p;
        }
        Ok(p)
    }

    /// Writes `data` at stream position `pos` of the console sink, bypassing the gate
    /// (a standby releasing again what a dead primary may not have released).
    pub fn write_console_at(&self, pos: u64, data: &[u8]) -> bool {
        let _serial = lock(&self.release_lock);
        let sink = {
            let mut st = lock(&self.state);
            match Self::console_stream(&mut st) {
                Some(s) => s.sink.clone(),
                None => return false,
            }
        };
        lock(&*sink).release_at(pos, &[data]);
        true
    }

    /// Writes one Ethernet frame on net device `index`'s TAP, bypassing the gate (a VMM
    /// frame, not guest output: the RARP announce after a failover). False without
    /// that device; the count of frames the TAP refused otherwise is logged.
    pub fn send_frame(&self, index: usize, frame: &[u8]) -> bool {
        let sink = {
            let st = lock(&self.state);
            match st
                .streams
                .iter()
                .filter(|s| s.kind == StreamKind::Net)
                .nth(index)
            {
                Some(s) => s.sink.clone(),
                None => return false,
            }
        };
        if lock(&*sink).release(&[frame]) > 0 {
            log::warn!("net {index}: the TAP refused a VMM frame");
            return false;
        }
        true
    }

    /// Position of the next console byte (held output included), None without a
    /// console stream.
    pub fn console_position(&self) -> Option<u64> {
        let mut st = lock(&self.state);
        Self::console_stream(&mut st).map(|s| s.pos)
    }

    /// A copy of the console output of `epoch`, which must be the epoch closed last and
    /// not yet released (call it right after [`OutputGate::close_epoch`]). None without
    /// a console stream or for another epoch.
    pub fn epoch_console(&self, epoch: u64) -> Option<EpochConsole> {
        let mut st = lock(&self.state);
        let (e, end) = st.last_close?;
        if e != epoch {
            return None;
        }
        let generation = st
            .closed
            .back()
            .filter(|(_, ce)| *ce == epoch)
            .map(|(g, _)| *g);
        let s = Self::console_stream(&mut st)?;
        let mut data = Vec::new();
        if let Some(g) = generation {
            for h in s.items.iter().rev().take_while(|h| h.generation == g) {
                data.push(h.bytes());
            }
        }
        data.reverse();
        let data: Vec<u8> = data.concat();
        Some(EpochConsole {
            epoch,
            pos: end - data.len() as u64,
            data,
        })
    }

    /// Copies of the frames of `epoch` as `(net device index, frame)`, per device in
    /// emission order (device 0's first: nothing orders frames of two NICs). `epoch`
    /// must be the epoch closed last and not yet released, as for
    /// [`OutputGate::epoch_console`]; empty otherwise or when it sent no frame. The
    /// checkpoint layer ships them with the epoch so that a standby can send them
    /// again after a failover.
    pub fn epoch_frames(&self, epoch: u64) -> Vec<(usize, Vec<u8>)> {
        let st = lock(&self.state);
        if st.last_closed != Some(epoch) {
            return Vec::new();
        }
        // The epoch's generation, if it holds output (a closed epoch without output
        // has no entry).
        let Some(g) = st
            .closed
            .back()
            .filter(|(_, ce)| *ce == epoch)
            .map(|(g, _)| *g)
        else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for (i, s) in st
            .streams
            .iter()
            .filter(|s| s.kind == StreamKind::Net)
            .enumerate()
        {
            // The epoch closed last is at the back of each queue, behind only what the
            // open epoch emitted since (walk from the back: older epochs may hold a
            // lot, the pause must not scan them).
            let mut mine: Vec<&Held> = s
                .items
                .iter()
                .rev()
                .skip_while(|h| h.generation > g)
                .take_while(|h| h.generation == g)
                .collect();
            mine.reverse();
            out.extend(mine.into_iter().map(|h| (i, h.bytes().to_vec())));
        }
        out
    }

    /// Sets the limit of held bytes (see the module docs for what reaching it does).
    pub fn set_limit(&self, bytes: u64) {
        let mut st = lock(&self.state);
        st.limit = bytes.max(1);
        Self::wake_if_room(&mut st);
    }

    /// Ends the open epoch as `epoch`. The caller guarantees nothing emits output
    /// meanwhile (the VM is paused).
    pub fn close_epoch(&self, epoch: u64) -> Result<OutputEpochStats, OutputError> {
        let mut st = lock(&self.state);
        if !self.is_enabled() {
            return Err(OutputError::NotEnabled);
        }
        if let Some(last) = st.last_closed {
            if epoch <= last {
                return Err(OutputError::EpochOrder { epoch, last });
            }
        }
        let open = std::mem::take(&mut st.open);
        let generation = st.generation;
        let has_output = st
            .streams
            .iter()
            .any(|s| s.items.back().is_some_and(|h| h.generation == generation));
        if has_output {
            st.closed.push_back((generation, epoch));
        }
        st.generation += 1;
        st.last_closed = Some(epoch);
        st.last_close = Self::console_stream(&mut st).map(|s| (epoch, s.pos));
        Ok(OutputEpochStats {
            epoch,
            console_bytes: open.console_bytes,
            net_frames: open.net_frames,
            net_bytes: open.net_bytes,
            held_bytes: st.held_bytes,
        })
    }

    /// Writes all held output of closed epochs `<= through` to the real sinks.
    pub fn release(&self, through: u64) -> ReleaseStats {
        let _serial = lock(&self.release_lock);
        let mut stats = ReleaseStats::default();
        let batches = {
            let mut st = lock(&self.state);
            let mut upto = None;
            while let Some(&(g, e)) = st.closed.front() {
                if e > through {
                    break;
                }
                upto = Some(g);
                st.closed.pop_front();
                stats.epochs += 1;
            }
            let batches = match upto {
                Some(g) => Self::take_through(&mut st, g),
                None => Vec::new(),
            };
            stats.held_bytes = st.held_bytes;
            Self::wake_if_room(&mut st);
            batches
        };
        self.write_batches(batches, &mut stats);
        stats
    }

    /// Drops held output of closed epochs `> epoch` and of the open epoch: output of
    /// epochs that will never commit. The next close must then name an epoch `> epoch`
    /// (numbers above it are free again).
    pub fn discard_after(&self, epoch: u64) {
        let mut st = lock(&self.state);
        let mut cutoff = st.generation;
        while let Some(&(g, e)) = st.closed.back() {
            if e <= epoch {
                break;
            }
            cutoff = g;
            st.closed.pop_back();
        }
        let mut dropped = 0u64;
        for s in &mut st.streams {
            while s.items.back().is_some_and(|h| h.generation >= cutoff) {
                if let Some(h) = s.items.pop_back() {
                    dropped += h.bytes().len() as u64;
                    // The stream continues where the dropped output began.
                    s.pos = h.pos;
                }
            }
        }
        st.held_bytes -= dropped;
        st.open = OpenCounts::default();
        st.last_close = None;
        if st.last_closed.is_some_and(|l| l > epoch) {
            st.last_closed = Some(epoch);
        }
        // Output from now on must not join a discarded generation's closed entry.
        st.generation += 1;
        Self::wake_if_room(&mut st);
    }

    /// Releases everything held (closed and open epochs), then lets output through
    /// directly again. The caller guarantees nothing emits output meanwhile (the VM is
    /// paused); discard first what must not appear.
    pub fn disable(&self) -> ReleaseStats {
        let _serial = lock(&self.release_lock);
        let mut stats = ReleaseStats::default();
        let batches = {
            let mut st = lock(&self.state);
            let g = st.generation;
            st.closed.clear();
            stats.epochs = 0;
            let b = Self::take_through(&mut st, g);
            st.open = OpenCounts::default();
            st.generation += 1;
            // The next enable starts a new numbering (a new standby session counts its
            // epochs from 0 again).
            st.last_closed = None;
            self.enabled.store(false, Ordering::Release);
            for s in &mut st.streams {
                if std::mem::take(&mut s.stalled) {
                    let _ = s.wake.write(1);
                }
            }
            b
        };
        self.write_batches(batches, &mut stats);
        stats
    }

    /// Bytes held over all streams and epochs.
    pub fn held_bytes(&self) -> u64 {
        lock(&self.state).held_bytes
    }

    /// `f` is called whenever the open epoch goes from empty to holding output, on the
    /// thread that emitted it and outside the gate's lock, so a checkpoint driver can
    /// end the epoch at once instead of polling [`OutputGate::output_waiting`]. It
    /// must not block. `None` removes it.
    pub fn set_waiting_notifier(&self, f: Option<WaitingNotifier>) {
        lock(&self.state).notify_waiting = f;
    }

    /// True when the open epoch holds output.
    pub fn output_waiting(&self) -> bool {
        let st = lock(&self.state);
        st.open.console_bytes > 0 || st.open.net_frames > 0
    }

    /// The last epoch closed (and not discarded).
    pub fn last_closed(&self) -> Option<u64> {
        lock(&self.state).last_closed
    }

    /// Removes every item of generations `<= g`, per stream, adjusting the counts.
    fn take_through(st: &mut State, g: u64) -> Vec<Batch> {
        let mut out = Vec::new();
        let mut freed = 0u64;
        for s in &mut st.streams {
            let n = s.items.iter().take_while(|h| h.generation <= g).count();
            if n == 0 {
                continue;
            }
            let items: Vec<Held> = s.items.drain(..n).collect();
            freed += items.iter().map(|h| h.bytes().len() as u64).sum::<u64>();
            out.push((s.kind, s.sink.clone(), items));
        }
        st.held_bytes -= freed;
        out
    }

    fn write_batches(&self, batches: Vec<Batch>, stats: &mut ReleaseStats) {
        let t0 = Instant::now();
        for (kind, sink, items) in batches {
            let slices: Vec<&[u8]> = items.iter().map(Held::bytes).collect();
            let bytes: u64 = slices.iter().map(|s| s.len() as u64).sum();
            let lost = match (kind, items.first()) {
                // Items of a console stream are consecutive from the first one's position.
                (StreamKind::Console, Some(first)) => lock(&*sink).release_at(first.pos, &slices),
                _ => lock(&*sink).release(&slices),
            };
            match kind {
                StreamKind::Console => stats.console_bytes += bytes,
                StreamKind::Net => {
                    stats.net_frames += slices.len() as u64;
                    stats.net_bytes += bytes;
                    stats.net_dropped += lost;
                }
            }
        }
        stats.write_time = t0.elapsed();
    }

    fn wake_if_room(st: &mut State) {
        if st.held_bytes >= st.limit {
            return;
        }
        for s in &mut st.streams {
            if std::mem::take(&mut s.stalled) {
                if let Err(e) = s.wake.write(1) {
                    log::warn!("output gate: cannot wake a stalled device: {e}");
                }
            }
        }
    }
}

/// A device's handle on its stream.
pub struct GatePort {
    gate: Arc<OutputGate>,
    stream: usize,
    wake: EventFd,
}

impl GatePort {
    /// False when the gate is on and full: the device must leave its transmit queue
    /// alone until [`GatePort::wake_fd`] fires.
    pub fn has_room(&self) -> bool {
        if !self.gate.is_enabled() {
            return true;
        }
        let mut st = lock(&self.gate.state);
        if st.held_bytes < st.limit {
            return true;
        }
        if let Some(s) = st.streams.get_mut(self.stream) {
            s.stalled = true;
        }
        false
    }

    /// Holds `data[skip..]` in the open epoch, or gives `data` back when the gate is
    /// off (the device then writes it directly).
    pub fn hold(&self, data: Vec<u8>, skip: usize) -> Result<(), Vec<u8>> {
        if !self.gate.is_enabled() {
            return Err(data);
        }
        let mut st = lock(&self.gate.state);
        // Checked again under the lock: disable runs with the VM paused, but be exact.
        if !self.gate.is_enabled() {
            return Err(data);
        }
        let skip = skip.min(data.len());
        let len = (data.len() - skip) as u64;
        let generation = st.generation;
        let Some(s) = st.streams.get_mut(self.stream) else {
            return Err(data);
        };
        let kind = s.kind;
        let pos = s.pos;
        if kind == StreamKind::Console {
            s.pos += len;
        }
        match s.items.back_mut() {
            Some(last)
                if kind == StreamKind::Console
                    && last.generation == generation
                    && last.data.len() + data.len() <= CONSOLE_CHUNK =>
            {
                last.data.extend_from_slice(&data[skip..]);
            }
            _ => s.items.push_back(Held {
                generation,
                data,
                skip,
                pos,
            }),
        }
        st.held_bytes += len;
        let was_empty = st.open.console_bytes == 0 && st.open.net_frames == 0;
        match kind {
            StreamKind::Console => st.open.console_bytes += len,
            StreamKind::Net => {
                st.open.net_frames += 1;
                st.open.net_bytes += len;
            }
        }
        let now_waiting = st.open.console_bytes > 0 || st.open.net_frames > 0;
        let notify = if was_empty && now_waiting {
            st.notify_waiting.clone()
        } else {
            None
        };
        drop(st);
        if let Some(f) = notify {
            f();
        }
        Ok(())
    }

    /// Like [`GatePort::hold`] for a borrowed slice (the UART's single bytes).
    pub fn hold_slice(&self, data: &[u8]) -> bool {
        self.is_enabled() && self.hold(data.to_vec(), 0).is_ok()
    }

    pub fn is_enabled(&self) -> bool {
        self.gate.is_enabled()
    }

    /// Signalled when a stalled stream may transmit again.
    pub fn wake_fd(&self) -> RawFd {
        self.wake.as_raw_fd()
    }

    /// Consumes a wake-up.
    pub fn clear_wake(&self) {
        let _ = self.wake.read();
    }
}

#[cfg(test)]
mod tests;
