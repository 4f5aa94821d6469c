//! Routes guest MMIO and port I/O accesses to devices by address range.
//!
//! A vCPU thread that exits on MMIO or port I/O looks the address up here and calls the
//! device with the offset into its range. Ranges never overlap (checked on insert).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use twinrun_lock::MutexExt;

/// A device that sits on a bus.
///
/// `offset` is relative to the base of the range the device was inserted at; `data` is
/// the access (1, 2, 4 or 8 bytes, little endian). Devices must treat every access as
/// untrusted guest input: unknown offsets read as zero and writes to them are ignored.
pub trait BusDevice: Send {
    fn read(&mut self, base: u64, offset: u64, data: &mut [u8]);
    fn write(&mut self, base: u64, offset: u64, data: &[u8]);
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    #[error("bus range {base:#x}+{len:#x} is empty or overflows")]
    BadRange { base: u64, len: u64 },
    #[error("bus range {base:#x}+{len:#x} overlaps a device already at {other:#x}")]
    Overlap { base: u64, len: u64, other: u64 },
}

#[derive(Clone)]
struct Entry {
    len: u64,
    device: Arc<Mutex<dyn BusDevice>>,
}

/// An address space (MMIO or port I/O) of devices.
#[derive(Clone, Default)]
pub struct Bus {
    ranges: BTreeMap<u64, Entry>,
}

impl Bus {
    pub fn new() -> Self {
        Self::default()
    }

    /// Places `device` at `[base, base + len)`.
    pub fn insert(
        &mut self,
        device: Arc<Mutex<dyn BusDevice>>,
        base: u64,
        len: u64,
    ) -> Result<(), BusError> {
        let end = base
            .checked_add(len)
            .filter(|_| len > 0)
            .ok_or(BusError::BadRange { base, len })?;
        if let Some((&other, e)) = self.ranges.range(..end).next_back() {
            if other + e.len > base {
                return Err(BusError::Overlap { base, len, other });
            }
        }
        self.ranges.insert(base, Entry { len, device });
        Ok(())
    }

    fn find(&self, addr: u64) -> Option<(u64, &Entry)> {
        let (&base, e) = self.ranges.range(..=addr).next_back()?;
        (addr - base < e.len).then_some((base, e))
    }

    /// Dispatches a read; returns false when no device claims `addr` (the data is then
    /// left as zeroes).
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        data.fill(0);
        match self.find(addr) {
            Some((base, e)) => {
                // A device whose lock was poisoned by a panic still answers: the bus
                // must not take the vCPU thread down with it.
                let mut dev = e.device.lock_or_recover();
                dev.read(base, addr - base, data);
                true
            }
            None => false,
        }
    }

    /// Dispatches a write; returns false when no device claims `addr`.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr) {
            Some((base, e)) => {
                let mut dev = e.device.lock_or_recover();
                dev.write(base, addr - base, data);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Reg(u8);
    impl BusDevice for Reg {
        fn read(&mut self, _b: u64, off: u64, data: &mut [u8]) {
            data[0] = self.0.wrapping_add(off as u8);
        }
        fn write(&mut self, _b: u64, _off: u64, data: &[u8]) {
            self.0 = data[0];
        }
    }

    #[test]
    fn routes_by_range_and_rejects_overlap() {
        let mut bus = Bus::new();
        bus.insert(Arc::new(Mutex::new(Reg(10))), 0x1000, 0x100)
            .unwrap();
        bus.insert(Arc::new(Mutex::new(Reg(20))), 0x1100, 0x100)
            .unwrap();
        assert!(matches!(
            bus.insert(Arc::new(Mutex::new(Reg(0))), 0x10ff, 2),
            Err(BusError::Overlap { other: 0x1100, .. })
        ));
        assert!(matches!(
            bus.insert(Arc::new(Mutex::new(Reg(0))), u64::MAX, 2),
            Err(BusError::BadRange { .. })
        ));
        let mut b = [0u8; 1];
        assert!(bus.read(0x1004, &mut b));
        assert_eq!(b[0], 14);
        assert!(bus.write(0x1100, &[7]));
        assert!(bus.read(0x1101, &mut b));
        assert_eq!(b[0], 8);
        assert!(!bus.read(0x1200, &mut b));
        assert_eq!(b[0], 0);
        assert!(!bus.read(0xfff, &mut b));
    }
}
