//! Failover on the standby: what the driver hands over ([`TakeoverInput`]: the
//! committed state, the mirror's memory, the output to release again) and who turns
//! it into a running VM ([`Takeover`]): [`VmmTakeover`] for real, the simulation's toy
//! for `tests/sim.rs`.
//!
//! The real takeover builds the VM from the last committed epoch on the standby's own
//! console sink, disks and TAPs (the state names the primary's), in the mirror's RAM
//! itself (no copy: failover time does not grow with the guest), releases again the
//! committed-but-maybe-unreleased console output at its stream positions, announces the
//! guest's MAC on each TAP and sends the committed-but-maybe-unreleased net frames
//! again, lets the caller prepare the VM (the pair's role switch records the survivor's
//! disk writes from its first instruction), and starts it.
//!
//! Failover without a quorum witness: a cut of all links while the primary is alive
//! looks exactly like a dead primary from here. The standby then runs a second copy of
//! the VM. This is logged at every failover until the quorum issue lands.

use std::sync::Arc;
use std::time::{Duration, Instant};

use vmm::config::VmConfig;
use vmm::devices::output::OutputGate;
use vmm::devices::virtio::persist::{ConsoleAttachment, DeviceState};
use vmm::vstate::memory::GuestMemoryMmap;
use vmm::{build_vm_from_state_with_memory, VmState, Vmm};

use super::outcome::{FailoverReport, StandbyDriverError};

/// What the driver hands over at failover.
pub struct TakeoverInput<'a> {
    pub last_committed: u64,
    pub released_through: Option<u64>,
    /// The encoded VM state of the last committed epoch.
    pub state: &'a [u8],
    /// The mirror's RAM: the guest's memory at that epoch.
    pub memory: GuestMemoryMmap,
    /// Where the resumed guest's console output continues (the end of the last
    /// committed epoch's).
    pub console_next: Option<u64>,
    /// Console output of committed epochs after `released_through`, `(stream
    /// position, bytes)`, in order: to release again (the primary may not have).
    pub console: Vec<(u64, &'a [u8])>,
    /// Net frames of those epochs, `(net device index, frame)`, in order per NIC.
    pub frames: Vec<(u16, &'a [u8])>,
    /// A planned swap: frames the old primary's TAPs received after its guest's final
    /// pause, `(net device index, frame)`: the guest receives them first.
    pub rx_frames: Vec<(u16, Vec<u8>)>,
}

/// Turns the handed-over replica into a running VM.
pub trait Takeover {
    type Vm;
    /// Returns the running VM and the report (its `last_committed`,
    /// `released_through` and `failover_time` are the driver's to fill).
    fn take_over(
        &mut self,
        input: TakeoverInput<'_>,
    ) -> Result<(Self::Vm, FailoverReport), StandbyDriverError>;
}

/// What [`BeforeStart`] runs.
pub type BeforeStartFn = dyn Fn(&mut Vmm) -> Result<(), String> + Send + Sync;

/// Called on the built VM before it starts (the pair's role switch installs the
/// survivor's disk hooks there).
#[derive(Clone)]
pub struct BeforeStart(pub Arc<BeforeStartFn>);

impl std::fmt::Debug for BeforeStart {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BeforeStart(..)")
    }
}

/// The real takeover: a [`Vmm`] on the standby's own devices (its `VmConfig`).
pub struct VmmTakeover<'a> {
    pub cfg: &'a VmConfig,
    pub before_start: Option<BeforeStart>,
}

impl Takeover for VmmTakeover<'_> {
    type Vm = Vmm;

    fn take_over(
        &mut self,
        input: TakeoverInput<'_>,
    ) -> Result<(Vmm, FailoverReport), StandbyDriverError> {
        let mut state = VmState::from_bytes(input.state)?;
        let cfg = rebind_attachments(&mut state, self.cfg);
        // The VM runs in the mirror's RAM itself: no copy, whatever the guest's size.
        let (mut vmm, report) = build_vm_from_state_with_memory(&cfg, &state, input.memory)?;
        if !report.refused_msrs.is_empty() {
            log::warn!(
                "standby: MSRs refused on restore: {:x?}",
                report.refused_msrs
            );
        }
        // The resumed guest's output continues where the last committed epoch's ended.
        let mut out = FailoverReport {
            console_next: vmm.set_console_positioned(input.console_next)?,
            ..FailoverReport::default()
        };
        for (pos, bytes) in input.console {
            vmm.write_console_at(pos, bytes);
            out.rereleased_from.get_or_insert(pos);
            out.rereleased_bytes += bytes.len() as u64;
        }
        // Before the guest runs, in this order: the RARP announce, so that the LAN
        // learns the guest's MAC on this port first; then the frames of committed
        // epochs the primary may not have released (the resumed guest thinks they are
        // on the wire; without them its TCP waits for its RTO, >= 1 s in smoltcp); then
        // whatever the resumed guest sends. Each NIC's frames thus leave in the order
        // the guest emitted them: nothing the resumed guest sends overtakes an older
        // frame. Not idempotent, unlike the console: a frame the primary did release
        // goes out twice, which TCP (duplicate segments are dropped and re-ACKed), ARP
        // and ICMP tolerate as they tolerate any duplicating network.
        let mut macs = Vec::new();
        for (i, n) in cfg.nets.iter().enumerate() {
            match vmm::config::parse_mac(&n.mac) {
                Ok(mac) => {
                    if vmm.send_raw_frame(i, &rarp_announce(mac)) {
                        out.announces += 1;
                    }
                    macs.push((i, mac));
                }
                Err(e) => log::error!("standby: net {i}: bad MAC {}: {e}", n.mac),
            }
        }
        for (net, frame) in input.frames {
            if vmm.send_raw_frame(usize::from(net), frame) {
                out.resent_frames += 1;
            } else {
                out.resend_failed += 1;
            }
        }
        // What the old primary's TAPs received after its final pause: the guest
        // receives it before anything this TAP brings (the client sent it earlier).
        for (net, frames) in crate::messages::per_net(input.rx_frames) {
            let n = frames.len() as u64;
            if vmm.inject_rx_frames(usize::from(net), frames) {
                out.handed_in_frames += n;
            } else {
                log::error!("standby: net {net}: no such NIC for {n} handed-in frames");
            }
        }
        if let Some(f) = &self.before_start {
            (f.0)(&mut vmm).map_err(StandbyDriverError::BeforeStart)?;
        }
        vmm.start()?;
        repeat_announces(vmm.devices().output_gate().clone(), macs);
        Ok((vmm, out))
    }
}

/// The committed state names the primary's console, disks and TAPs; the standby runs
/// the VM on its own. Rewrites the state's attachments to the standby's `cfg` and
/// returns the config to build with (disk serials and MACs as the guest knew them).
pub fn rebind_attachments(state: &mut VmState, cfg: &VmConfig) -> VmConfig {
    let mut cfg = cfg.clone();
    let (mut disk, mut net) = (0, 0);
    for t in &mut state.devices {
        match &mut t.device {
            DeviceState::Console { sink } => *sink = ConsoleAttachment::from(&cfg.console),
            DeviceState::Block { disk: saved } => {
                if let Some(mine) = cfg.disks.get_mut(disk) {
                    mine.serial = saved.serial.clone();
                    *saved = mine.clone();
                }
                disk += 1;
            }
            DeviceState::Net { tap, mac } => {
                if let Some(mine) = cfg.nets.get_mut(net) {
                    *tap = mine.tap.clone();
                    mine.mac = mac
                        .iter()
                        .map(|b| format!("{b:02x}"))
                        .collect::<Vec<_>>()
                        .join(":");
                }
                net += 1;
            }
            DeviceState::Other { .. } => {}
        }
    }
    cfg
}

/// When the RARP announce is sent again after the first one (sent before the guest
/// runs), like QEMU's self-announce rounds: one lost frame (a bridge port still coming
/// up, a busy switch) must not leave the LAN pointing at the dead PM.
pub const ANNOUNCE_REPEATS: [Duration; 4] = [
    Duration::from_millis(50),
    Duration::from_millis(150),
    Duration::from_millis(300),
    Duration::from_millis(500),
];

/// Sends the announces of [`ANNOUNCE_REPEATS`] on each `(net index, MAC)` from a
/// short-lived thread, so neither the driver nor the guest waits for them. The frames
/// bypass output commit, as the first; the gate's TAP writers serialize them with the
/// guest's released frames. The thread holds the gate weakly: a VM stopped within the
/// repeats (a planned swap right after a takeover) closes its TAPs at once, so the
/// same process can open them again as the standby.
fn repeat_announces(gate: Arc<OutputGate>, macs: Vec<(usize, [u8; 6])>) {
    if macs.is_empty() {
        return;
    }
    let gate = Arc::downgrade(&gate);
    let spawned = std::thread::Builder::new()
        .name("rarp-announce".into())
        .spawn(move || {
            let t0 = Instant::now();
            for at in ANNOUNCE_REPEATS {
                std::thread::sleep(at.saturating_sub(t0.elapsed()));
                let Some(gate) = gate.upgrade() else {
                    return;
                };
                for &(i, mac) in &macs {
                    if !gate.send_frame(i, &rarp_announce(mac)) {
                        log::warn!("standby: net {i}: a repeated RARP announce was refused");
                    }
                }
            }
        });
    if let Err(e) = spawned {
        log::warn!("standby: cannot start the thread repeating the RARP announce: {e}");
    }
}

/// A RARP "request reverse" broadcast from `mac`, as QEMU sends after a migration: the
/// switches learn the guest's MAC on the new port.
pub fn rarp_announce(mac: [u8; 6]) -> Vec<u8> {
    let mut f = Vec::with_capacity(60);
    f.extend_from_slice(&[0xff; 6]);
    f.extend_from_slice(&mac);
    f.extend_from_slice(&0x8035u16.to_be_bytes()); // RARP
    f.extend_from_slice(&1u16.to_be_bytes()); // Ethernet
    f.extend_from_slice(&0x0800u16.to_be_bytes()); // IPv4
    f.extend_from_slice(&[6, 4]);
    f.extend_from_slice(&3u16.to_be_bytes()); // request reverse
    f.extend_from_slice(&mac);
    f.extend_from_slice(&[0; 4]);
    f.extend_from_slice(&mac);
    f.extend_from_slice(&[0; 4]);
    f.resize(60, 0);
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rarp_frame_layout() {
        let mac = [0x52, 0x54, 0, 0x12, 0x34, 0x56];
        let f = rarp_announce(mac);
        assert_eq!(f.len(), 60);
        assert_eq!(&f[0..6], &[0xff; 6]);
        assert_eq!(&f[6..12], &mac);
        assert_eq!(&f[12..14], &[0x80, 0x35]);
        assert_eq!(&f[20..22], &[0, 3]);
        assert_eq!(&f[22..28], &mac);
        assert_eq!(&f[32..38], &mac);
    }
}
