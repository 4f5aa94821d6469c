//! The virtio-mmio register window of one device, and the initialisation handshake.
//!
//! Every register access is an MMIO exit to the VMM (~20 us on this host), so drivers
//! touch registers only at set-up and to notify queues.

use super::queue::Virtq;
use super::F_VERSION_1;

const MAGIC: usize = 0x000;
const VERSION: usize = 0x004;
const DEVICE_ID: usize = 0x008;
const DEVICE_FEATURES: usize = 0x010;
const DEVICE_FEATURES_SEL: usize = 0x014;
const DRIVER_FEATURES: usize = 0x020;
const DRIVER_FEATURES_SEL: usize = 0x024;
const QUEUE_SEL: usize = 0x030;
const QUEUE_NUM_MAX: usize = 0x034;
const QUEUE_NUM: usize = 0x038;
const QUEUE_READY: usize = 0x044;
const QUEUE_NOTIFY: usize = 0x050;
const STATUS: usize = 0x070;
const QUEUE_DESC_LOW: usize = 0x080;
const QUEUE_DESC_HIGH: usize = 0x084;
const QUEUE_DRIVER_LOW: usize = 0x090;
const QUEUE_DRIVER_HIGH: usize = 0x094;
const QUEUE_DEVICE_LOW: usize = 0x0a0;
const QUEUE_DEVICE_HIGH: usize = 0x0a4;
const CONFIG_GENERATION: usize = 0x0fc;
const CONFIG: usize = 0x100;

const MAGIC_VALUE: u32 = 0x7472_6976;

const S_ACKNOWLEDGE: u32 = 1;
const S_DRIVER: u32 = 2;
const S_DRIVER_OK: u32 = 4;
const S_FEATURES_OK: u32 = 8;
const S_FAILED: u32 = 128;

/// One device's register window.
pub struct Transport {
    base: usize,
}

impl Transport {
    /// Checks magic, version 2 and the device id at `base`.
    ///
    /// # Safety
    /// `base` must be a mapped virtio-mmio window (from `Params.devices`).
    pub unsafe fn probe(base: u64, device_id: u32) -> Result<Self, &'static str> {
        let t = Transport {
            base: base as usize,
        };
        if t.read(MAGIC) != MAGIC_VALUE {
            return Err("bad virtio-mmio magic");
        }
        if t.read(VERSION) != 2 {
            return Err("virtio-mmio version is not 2");
        }
        if t.read(DEVICE_ID) != device_id {
            return Err("unexpected virtio device id");
        }
        Ok(t)
    }

    pub fn read(&self, off: usize) -> u32 {
        // SAFETY: `base` is a mapped MMIO window (constructor contract) and `off` is a
        // register offset inside its 4 KiB; volatile so every access reaches the device.
        unsafe { ((self.base + off) as *const u32).read_volatile() }
    }

    pub fn write(&self, off: usize, v: u32) {
        // SAFETY: as for `read`.
        unsafe { ((self.base + off) as *mut u32).write_volatile(v) }
    }

    pub fn config_u8(&self, off: usize) -> u8 {
        // SAFETY: as for `read`; config space starts at 0x100 within the window.
        unsafe { ((self.base + CONFIG + off) as *const u8).read_volatile() }
    }

    /// A 64-bit config field, read as two 32-bit halves under the generation counter so
    /// a concurrent device update cannot tear it.
    pub fn config_u64(&self, off: usize) -> u64 {
        loop {
            let gen = self.read(CONFIG_GENERATION);
            let lo = self.read(CONFIG + off) as u64;
            let hi = self.read(CONFIG + off + 4) as u64;
            if self.read(CONFIG_GENERATION) == gen {
                return lo | (hi << 32);
            }
        }
    }

    /// Reset, ACKNOWLEDGE, DRIVER, feature negotiation and FEATURES_OK. `wanted` are the
    /// device-specific features the driver can use; VERSION_1 is required. Returns the
    /// negotiated set. Queues are set up afterwards, then [`Transport::driver_ok`].
    pub fn begin_init(&self, wanted: u64) -> Result<u64, &'static str> {
        self.write(STATUS, 0);
        while self.read(STATUS) != 0 {
            core::hint::spin_loop();
        }
        self.write(STATUS, S_ACKNOWLEDGE);
        self.write(STATUS, S_ACKNOWLEDGE | S_DRIVER);
        self.write(DEVICE_FEATURES_SEL, 0);
        let lo = self.read(DEVICE_FEATURES) as u64;
        self.write(DEVICE_FEATURES_SEL, 1);
        let hi = self.read(DEVICE_FEATURES) as u64;
        let offered = lo | (hi << 32);
        if offered & F_VERSION_1 == 0 {
            self.fail();
            return Err("device does not offer VIRTIO_F_VERSION_1");
        }
        let features = offered & (wanted | F_VERSION_1);
        self.write(DRIVER_FEATURES_SEL, 0);
        self.write(DRIVER_FEATURES, features as u32);
        self.write(DRIVER_FEATURES_SEL, 1);
        self.write(DRIVER_FEATURES, (features >> 32) as u32);
        self.write(STATUS, S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK);
        if self.read(STATUS) & S_FEATURES_OK == 0 {
            self.fail();
            return Err("device rejected FEATURES_OK");
        }
        Ok(features)
    }

    /// The size to use for queue `idx`: `want` capped at the device maximum, rounded
    /// down to a power of two. Errors when the queue does not exist.
    pub fn queue_size(&self, idx: u16, want: u16) -> Result<u16, &'static str> {
        self.write(QUEUE_SEL, idx as u32);
        if self.read(QUEUE_READY) != 0 {
            return Err("queue already live after reset");
        }
        let max = self.read(QUEUE_NUM_MAX).min(u16::MAX as u32) as u16;
        if max == 0 {
            return Err("queue not available");
        }
        let n = want.min(max);
        Ok(1 << (15 - n.leading_zeros()))
    }

    /// Programs queue `q` into the device and marks it ready.
    pub fn setup_queue(&self, q: &Virtq) {
        let (desc, driver, device) = q.addrs();
        self.write(QUEUE_SEL, q.index() as u32);
        self.write(QUEUE_NUM, q.size() as u32);
        self.write(QUEUE_DESC_LOW, desc as u32);
        self.write(QUEUE_DESC_HIGH, (desc >> 32) as u32);
        self.write(QUEUE_DRIVER_LOW, driver as u32);
        self.write(QUEUE_DRIVER_HIGH, (driver >> 32) as u32);
        self.write(QUEUE_DEVICE_LOW, device as u32);
        self.write(QUEUE_DEVICE_HIGH, (device >> 32) as u32);
        self.write(QUEUE_READY, 1);
    }

    pub fn driver_ok(&self) -> Result<(), &'static str> {
        self.write(
            STATUS,
            S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK,
        );
        if self.read(STATUS) & S_FAILED != 0 {
            return Err("device failed DRIVER_OK");
        }
        Ok(())
    }

    fn fail(&self) {
        self.write(STATUS, S_FAILED);
    }

    pub fn notify(&self, queue: u16) {
        self.write(QUEUE_NOTIFY, queue as u32);
    }
}
