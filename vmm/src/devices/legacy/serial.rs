//! COM1: a 16550A-compatible UART (vm-superio) whose output goes to the console sink
//! and whose interrupt is an irqfd on IRQ 4. With output commit on, the bytes go to the
//! VM's output gate instead (they cannot be stalled: see [`crate::devices::output`]).

use std::io::{self, Write};
use std::sync::{Arc, Mutex};
use twinrun_lock::MutexExt;

use serde::{Deserialize, Serialize};
use vm_superio::serial::{NoEvents, SerialState};
use vm_superio::Serial;

use super::IrqLine;
use crate::devices::bus::BusDevice;
use crate::devices::output::{ConsoleRelease, GatePort, OutputGate, ReleaseSink, StreamKind};
use crate::devices::virtio::console::sink::ConsoleSink;

/// Eight registers from the base port.
pub const SERIAL_PORT_LEN: u16 = 8;

/// Adapts the console sink (or the output gate) to `io::Write` for vm-superio.
pub struct SinkWriter {
    sink: Arc<Mutex<ConsoleSink>>,
    gate: Option<GatePort>,
}

impl SinkWriter {
    pub fn new(sink: ConsoleSink) -> SinkWriter {
        SinkWriter {
            sink: Arc::new(Mutex::new(sink)),
            gate: None,
        }
    }
}

impl Write for SinkWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if !self.gate.as_ref().is_some_and(|g| g.hold_slice(buf)) {
            self.sink.lock_or_recover().write(buf);
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The UART's registers and pending input, for VM state capture.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialSnapshot {
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    pub in_buffer: Vec<u8>,
}

impl From<&SerialState> for SerialSnapshot {
    fn from(s: &SerialState) -> Self {
        SerialSnapshot {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer.clone(),
        }
    }
}

impl From<&SerialSnapshot> for SerialState {
    fn from(s: &SerialSnapshot) -> Self {
        SerialState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer.clone(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SerialError {
    #[error("restoring the UART state: {0:?}")]
    Restore(vm_superio::serial::Error<io::Error>),
}

/// The UART on the port bus.
pub struct SerialDevice {
    uart: Serial<IrqLine, NoEvents, SinkWriter>,
}

impl SerialDevice {
    pub fn new(irq: IrqLine, sink: ConsoleSink) -> Self {
        SerialDevice {
            uart: Serial::new(irq, SinkWriter::new(sink)),
        }
    }

    /// A UART in the captured state.
    pub fn from_snapshot(
        s: &SerialSnapshot,
        irq: IrqLine,
        sink: ConsoleSink,
    ) -> Result<Self, SerialError> {
        let uart = Serial::from_state(&SerialState::from(s), irq, NoEvents, SinkWriter::new(sink))
            .map_err(SerialError::Restore)?;
        Ok(SerialDevice { uart })
    }

    /// Routes the UART's output through the VM's output gate (one console stream).
    pub fn attach_output_gate(&mut self, gate: &Arc<OutputGate>) -> io::Result<()> {
        let w = self.uart.writer_mut();
        let sink: Arc<Mutex<dyn ReleaseSink>> =
            Arc::new(Mutex::new(ConsoleRelease(w.sink.clone())));
        w.gate = Some(gate.register(StreamKind::Console, sink)?);
        Ok(())
    }

    pub fn snapshot(&self) -> SerialSnapshot {
        SerialSnapshot::from(&self.uart.state())
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        // Registers are bytes; wider accesses read the register at `offset` only.
        if let (Ok(off), Some(d)) = (u8::try_from(offset), data.first_mut()) {
            *d = self.uart.read(off);
        }
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        if let (Ok(off), Some(&v)) = (u8::try_from(offset), data.first()) {
            if let Err(e) = self.uart.write(off, v) {
                log::warn!("serial: write to register {off}: {e:?}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ConsoleConfig;
    use vmm_sys_util::eventfd::EventFd;

    #[test]
    fn output_reaches_the_sink_and_interrupts_fire() {
        let path = std::env::temp_dir().join(format!("twinrun-serial-{}.log", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let sink = ConsoleSink::new(&ConsoleConfig::File { path: path.clone() }).unwrap();
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut dev = SerialDevice::new(IrqLine(evt.try_clone().unwrap()), sink);
        // IER: THR-empty interrupt on.
        dev.write(0x3f8, 1, &[0x02]);
        for b in b"hi\n" {
            dev.write(0x3f8, 0, &[*b]);
        }
        assert!(evt.read().unwrap() >= 1);
        let snap = dev.snapshot();
        assert_eq!(snap.interrupt_enable, 0x02);
        let mut lsr = [0u8];
        dev.read(0x3f8, 5, &mut lsr);
        // THR empty and transmitter empty.
        assert_eq!(lsr[0] & 0x60, 0x60);
        drop(dev);
        assert_eq!(std::fs::read(&path).unwrap(), b"hi\n");
        let sink = ConsoleSink::new(&ConsoleConfig::File { path: path.clone() }).unwrap();
        let back = SerialDevice::from_snapshot(&snap, IrqLine(evt), sink).unwrap();
        assert_eq!(back.snapshot(), snap);
        std::fs::remove_file(&path).unwrap();
    }
}
