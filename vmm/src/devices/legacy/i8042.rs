//! A minimal i8042 keyboard controller: enough for Linux to probe it and, above all,
//! to reset the machine with command 0xFE on port 0x64, which ends the VM
//! ([`crate::VmExit::GuestReset`]).

use std::collections::VecDeque;

use super::IrqLine;
use crate::devices::bus::BusDevice;
use vm_superio::Trigger;

/// Status register bits.
const SB_OUT_DATA_AVAIL: u8 = 1 << 0;
const SB_SYSTEM_FLAG: u8 = 1 << 2;
const SB_LAST_WAS_CMD: u8 = 1 << 3;
const SB_KBD_ENABLED: u8 = 1 << 4;

/// Controller commands (port 0x64).
const CMD_READ_CTR: u8 = 0x20;
const CMD_WRITE_CTR: u8 = 0x60;
const CMD_AUX_DISABLE: u8 = 0xa7;
const CMD_AUX_ENABLE: u8 = 0xa8;
const CMD_AUX_TEST: u8 = 0xa9;
const CMD_SELF_TEST: u8 = 0xaa;
const CMD_KBD_TEST: u8 = 0xab;
const CMD_KBD_DISABLE: u8 = 0xad;
const CMD_KBD_ENABLE: u8 = 0xae;
const CMD_READ_OUTP: u8 = 0xd0;
const CMD_WRITE_OUTP: u8 = 0xd1;
const CMD_WRITE_KBD_OUT: u8 = 0xd2;
const CMD_WRITE_AUX_OUT: u8 = 0xd3;
const CMD_WRITE_AUX: u8 = 0xd4;
const CMD_RESET: u8 = 0xfe;

/// Keyboard replies.
const KBD_ACK: u8 = 0xfa;
const KBD_SELF_TEST_OK: u8 = 0xaa;
/// Controller configuration: keyboard interrupt on, system flag, translation.
const CTR_DEFAULT: u8 = 0x45;
const BUF_LIMIT: usize = 16;

/// Called once when the guest resets the machine.
pub type ResetHook = Box<dyn FnMut() + Send>;

pub struct I8042 {
    status: u8,
    ctr: u8,
    outp: u8,
    /// Command waiting for its data byte on port 0x60.
    pending: Option<u8>,
    buf: VecDeque<u8>,
    irq: Option<IrqLine>,
    on_reset: ResetHook,
}

impl I8042 {
    pub fn new(irq: Option<IrqLine>, on_reset: ResetHook) -> Self {
        I8042 {
            status: SB_SYSTEM_FLAG | SB_KBD_ENABLED,
            ctr: CTR_DEFAULT,
            outp: 0x01,
            pending: None,
            buf: VecDeque::new(),
            irq,
            on_reset,
        }
    }

    fn push(&mut self, b: u8) {
        if self.buf.len() < BUF_LIMIT {
            self.buf.push_back(b);
        }
        // Bit 0 of the CTR enables the keyboard interrupt.
        if self.ctr & 1 != 0 {
            if let Some(irq) = &self.irq {
                if let Err(e) = irq.trigger() {
                    log::warn!("i8042: cannot raise IRQ 1: {e}");
                }
            }
        }
    }

    fn command(&mut self, cmd: u8) {
        self.status |= SB_LAST_WAS_CMD;
        match cmd {
            CMD_READ_CTR => self.push(self.ctr),
            CMD_READ_OUTP => self.push(self.outp),
            CMD_WRITE_CTR | CMD_WRITE_OUTP | CMD_WRITE_KBD_OUT | CMD_WRITE_AUX_OUT
            | CMD_WRITE_AUX => self.pending = Some(cmd),
            CMD_SELF_TEST => self.push(0x55),
            CMD_KBD_TEST | CMD_AUX_TEST => self.push(0x00),
            CMD_KBD_DISABLE | CMD_AUX_DISABLE => {}
            CMD_KBD_ENABLE | CMD_AUX_ENABLE => {}
            CMD_RESET => {
                log::info!("i8042: guest reset the machine");
                (self.on_reset)();
            }
            other => log::debug!("i8042: ignoring command {other:#x}"),
        }
    }

    fn data(&mut self, v: u8) {
        self.status &= !SB_LAST_WAS_CMD;
        match self.pending.take() {
            Some(CMD_WRITE_CTR) => self.ctr = v,
            Some(CMD_WRITE_OUTP) => self.outp = v,
            // Bytes "written by" the keyboard or mouse: echoed back as their input.
            Some(CMD_WRITE_KBD_OUT) | Some(CMD_WRITE_AUX_OUT) => self.push(v),
            // No mouse: writes to it are dropped.
            Some(_) => {}
            None => {
                // A keyboard command: ACK it; reset also reports a passed self-test.
                self.push(KBD_ACK);
                if v == 0xff {
                    self.push(KBD_SELF_TEST_OK);
                }
            }
        }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, base: u64, offset: u64, data: &mut [u8]) {
        let Some(d) = data.first_mut() else { return };
        // The device sits on 0x60..0x65: offset 0 is data, 4 is command/status.
        *d = match base + offset {
            0x60 => self.buf.pop_front().unwrap_or(0),
            0x64 => {
                let avail = if self.buf.is_empty() {
                    0
                } else {
                    SB_OUT_DATA_AVAIL
                };
                self.status | avail
            }
            _ => 0,
        };
    }

    fn write(&mut self, base: u64, offset: u64, data: &[u8]) {
        let Some(&v) = data.first() else { return };
        match base + offset {
            0x60 => self.data(v),
            0x64 => self.command(v),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::Arc;

    #[test]
    fn probe_and_reset() {
        let resets = Arc::new(AtomicU32::new(0));
        let r = resets.clone();
        let mut k = I8042::new(
            None,
            Box::new(move || {
                r.fetch_add(1, Ordering::SeqCst);
            }),
        );
        let mut b = [0u8];
        k.write(0x60, 4, &[CMD_SELF_TEST]);
        k.read(0x60, 4, &mut b);
        assert_ne!(b[0] & SB_OUT_DATA_AVAIL, 0);
        k.read(0x60, 0, &mut b);
        assert_eq!(b[0], 0x55);
        k.write(0x60, 4, &[CMD_WRITE_CTR]);
        k.write(0x60, 0, &[0x47]);
        k.write(0x60, 4, &[CMD_READ_CTR]);
        k.read(0x60, 0, &mut b);
        assert_eq!(b[0], 0x47);
        k.write(0x60, 0, &[0xff]);
        k.read(0x60, 0, &mut b);
        assert_eq!(b[0], KBD_ACK);
        k.read(0x60, 0, &mut b);
        assert_eq!(b[0], KBD_SELF_TEST_OK);
        assert_eq!(resets.load(Ordering::SeqCst), 0);
        k.write(0x60, 4, &[CMD_RESET]);
        assert_eq!(resets.load(Ordering::SeqCst), 1);
    }
}
