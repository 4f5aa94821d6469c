//! The virtio-mmio transport (virtio 1.x, "MMIO version 2" register layout).
//!
//! One transport wraps one [`VirtioDevice`] and sits on the MMIO bus as a
//! [`BusDevice`]. Registers are 32 bits wide and only 32-bit accesses to them count;
//! device config space starts at [`CONFIG_SPACE`] and may be accessed at any width.
//! A queue notify is handled synchronously on the vCPU thread that wrote it.
//!
//! Guest mistakes in queue setup or use (bad size, unaligned or out-of-memory rings,
//! notify on a queue that is not ready, broken chains) set `DEVICE_NEEDS_RESET` and
//! raise a config-change interrupt; the device then ignores notifies until the driver
//! writes 0 to Status.

use std::os::fd::RawFd;

use log::{error, warn};
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::EventFd;

use super::*;
use crate::devices::bus::BusDevice;
use crate::vstate::memory::GuestMemoryMmap;

mod persist;

/// "virt" little endian.
pub const MMIO_MAGIC: u32 = 0x7472_6976;
pub const MMIO_VERSION: u32 = 2;
/// Vendor id reported to the driver ("TWRN"-ish, any value is allowed).
pub const VENDOR_ID: u32 = 0x4e52_5754;

pub const REG_MAGIC: u64 = 0x000;
pub const REG_VERSION: u64 = 0x004;
pub const REG_DEVICE_ID: u64 = 0x008;
pub const REG_VENDOR_ID: u64 = 0x00c;
pub const REG_DEVICE_FEATURES: u64 = 0x010;
pub const REG_DEVICE_FEATURES_SEL: u64 = 0x014;
pub const REG_DRIVER_FEATURES: u64 = 0x020;
pub const REG_DRIVER_FEATURES_SEL: u64 = 0x024;
pub const REG_QUEUE_SEL: u64 = 0x030;
pub const REG_QUEUE_NUM_MAX: u64 = 0x034;
pub const REG_QUEUE_NUM: u64 = 0x038;
pub const REG_QUEUE_READY: u64 = 0x044;
pub const REG_QUEUE_NOTIFY: u64 = 0x050;
pub const REG_INTERRUPT_STATUS: u64 = 0x060;
pub const REG_INTERRUPT_ACK: u64 = 0x064;
pub const REG_STATUS: u64 = 0x070;
pub const REG_QUEUE_DESC_LOW: u64 = 0x080;
pub const REG_QUEUE_DESC_HIGH: u64 = 0x084;
pub const REG_QUEUE_DRIVER_LOW: u64 = 0x090;
pub const REG_QUEUE_DRIVER_HIGH: u64 = 0x094;
pub const REG_QUEUE_DEVICE_LOW: u64 = 0x0a0;
pub const REG_QUEUE_DEVICE_HIGH: u64 = 0x0a4;
pub const REG_CONFIG_GENERATION: u64 = 0x0fc;
pub const CONFIG_SPACE: u64 = 0x100;

/// What the driver wrote for one queue; applied to the [`Queue`] (and checked) when it
/// sets QueueReady.
#[derive(Clone, Copy, Debug, Default)]
struct QueueRegs {
    size: u16,
    desc: u64,
    driver: u64,
    device: u64,
}

pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    mem: GuestMemoryMmap,
    queues: Vec<Queue>,
    regs: Vec<QueueRegs>,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    interrupt_status: u32,
    status: u32,
    needs_reset: bool,
    /// Signalled on every interrupt status change when set (a later issue wires this
    /// to a KVM irqfd for guests that take interrupts; the test guest polls).
    irq: Option<EventFd>,
}

impl MmioTransport {
    pub fn new(mem: GuestMemoryMmap, device: Box<dyn VirtioDevice>) -> Result<Self, VirtioError> {
        let mut queues = Vec::new();
        let mut regs = Vec::new();
        for (i, &max) in device.queue_max_sizes().iter().enumerate() {
            let q = Queue::new(max).map_err(|e| VirtioError::AvailRing {
                queue: i,
                why: format!("bad maximum queue size {max}: {e}"),
            })?;
            queues.push(q);
            regs.push(QueueRegs {
                size: max,
                ..Default::default()
            });
        }
        Ok(MmioTransport {
            device,
            mem,
            queues,
            regs,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            interrupt_status: 0,
            status: 0,
            needs_reset: false,
            irq: None,
        })
    }

    /// Installs the eventfd signalled on interrupts.
    pub fn set_irq_eventfd(&mut self, irq: Option<EventFd>) {
        self.irq = irq;
    }

    pub fn device_type(&self) -> u32 {
        self.device.device_type()
    }

    /// Current device status register value.
    pub fn status(&self) -> u32 {
        self.status
    }

    pub fn interrupt_status(&self) -> u32 {
        self.interrupt_status
    }

    /// True when the driver may use the queues and the device is healthy.
    pub fn is_active(&self) -> bool {
        self.status & STATUS_DRIVER_OK != 0 && !self.needs_reset
    }

    /// Features the driver accepted.
    pub fn acked_features(&self) -> u64 {
        self.driver_features
    }

    pub fn backend_fds(&self) -> Vec<(RawFd, u32)> {
        self.device.backend_fds()
    }

    /// Runs a backend-thread event for this device.
    pub fn backend_event(&mut self, fd: RawFd, events: u32) {
        let active = self.is_active();
        let r = self
            .device
            .backend_event(&self.mem, &mut self.queues, active, fd, events);
        self.after_processing(r);
    }

    pub fn flush_output(&mut self) {
        self.device.flush_output();
    }

    /// The device's written-block map, taken and reset (block devices only; see
    /// [`VirtioDevice::take_written_blocks`]).
    pub fn take_written_blocks(&mut self) -> Option<super::block::written::WrittenBlocks> {
        self.device.take_written_blocks()
    }

    /// See [`VirtioDevice::attach_output_gate`].
    pub fn attach_output_gate(
        &mut self,
        gate: &std::sync::Arc<crate::devices::output::OutputGate>,
    ) -> std::io::Result<()> {
        self.device.attach_output_gate(gate)
    }

    /// See [`VirtioDevice::read_back_written`].
    pub fn read_back_written(
        &mut self,
        also: &[(u64, u64)],
    ) -> Option<std::io::Result<super::block::journal::DiskJournal>> {
        self.device.read_back_written(also)
    }

    /// See [`VirtioDevice::set_disk_journal`].
    pub fn set_disk_journal(&mut self, on: bool) -> bool {
        self.device.set_disk_journal(on)
    }

    /// See [`VirtioDevice::take_disk_journal`].
    pub fn take_disk_journal(&mut self) -> Option<super::block::journal::DiskJournal> {
        self.device.take_disk_journal()
    }

    /// See [`VirtioDevice::take_rx_frames`].
    pub fn take_rx_frames(&mut self, max: usize) -> Vec<Vec<u8>> {
        self.device.take_rx_frames(max)
    }

    /// See [`VirtioDevice::inject_rx_frames`].
    pub fn inject_rx_frames(&mut self, frames: Vec<Vec<u8>>) {
        self.device.inject_rx_frames(frames)
    }

    fn raise(&mut self, bits: u32) {
        self.interrupt_status |= bits;
        if let Some(irq) = &self.irq {
            if let Err(e) = irq.write(1) {
                warn!("virtio-mmio: cannot signal interrupt eventfd: {e}");
            }
        }
    }

    /// Puts the device into DEVICE_NEEDS_RESET after a guest error.
    fn fail(&mut self, e: &VirtioError) {
        error!(
            "virtio device {}: {e}; device needs reset",
            self.device.device_type()
        );
        self.needs_reset = true;
        self.status |= STATUS_DEVICE_NEEDS_RESET;
        self.raise(INTERRUPT_CONFIG_CHANGE);
    }

    fn after_processing(&mut self, r: Result<bool, VirtioError>) {
        match r {
            Ok(true) => self.raise(INTERRUPT_USED_RING),
            Ok(false) => {}
            Err(e) => self.fail(&e),
        }
    }

    fn reset(&mut self) {
        self.device.reset();
        for (q, r) in self.queues.iter_mut().zip(self.regs.iter_mut()) {
            q.reset();
            *r = QueueRegs {
                size: q.max_size(),
                ..Default::default()
            };
        }
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.driver_features = 0;
        self.queue_sel = 0;
        self.interrupt_status = 0;
        self.status = 0;
        self.needs_reset = false;
    }

    fn notify(&mut self, index: u32) {
        if self.needs_reset {
            return;
        }
        let index = index as usize;
        let r = if index >= self.queues.len() {
            Err(VirtioError::NoSuchQueue(index))
        } else if !self.is_active() || !self.queues[index].ready() {
            Err(VirtioError::QueueNotReady(index))
        } else {
            self.device
                .process_queue(&self.mem, &mut self.queues, index)
        };
        self.after_processing(r);
    }

    /// QueueReady = 1: applies the registers to the queue and checks them against
    /// guest memory.
    fn set_queue_ready(&mut self, index: usize) -> Result<(), String> {
        let r = self.regs[index];
        let q = &mut self.queues[index];
        q.try_set_size(r.size)
            .map_err(|_| format!("queue size {} (max {})", r.size, q.max_size()))?;
        q.try_set_desc_table_address(GuestAddress(r.desc))
            .map_err(|_| format!("descriptor table {:#x} not 16-byte aligned", r.desc))?;
        q.try_set_avail_ring_address(GuestAddress(r.driver))
            .map_err(|_| format!("driver area {:#x} not 2-byte aligned", r.driver))?;
        q.try_set_used_ring_address(GuestAddress(r.device))
            .map_err(|_| format!("device area {:#x} not 4-byte aligned", r.device))?;
        q.set_ready(true);
        if !q.is_valid(&self.mem) {
            q.set_ready(false);
            return Err("rings are not inside guest memory".into());
        }
        Ok(())
    }

    fn write_status(&mut self, v: u32) {
        if v == 0 {
            self.reset();
            return;
        }
        let mut v = v & 0xff;
        if v & STATUS_FEATURES_OK != 0 && self.status & STATUS_FEATURES_OK == 0 {
            let offered = self.device.avail_features();
            let ok = self.driver_features & !offered == 0
                && self.driver_features & VIRTIO_F_VERSION_1 != 0;
            if !ok {
                warn!(
                    "virtio device {}: driver features {:#x} not acceptable (offered {:#x})",
                    self.device.device_type(),
                    self.driver_features,
                    offered
                );
                v &= !STATUS_FEATURES_OK;
            }
        }
        if v & STATUS_DRIVER_OK != 0 && v & STATUS_FEATURES_OK == 0 {
            // DRIVER_OK without negotiated features is a driver bug.
            v &= !STATUS_DRIVER_OK;
            self.status = v;
            self.fail(&VirtioError::DriverOkWithoutFeatures);
            return;
        }
        self.status = v | if self.needs_reset {
            STATUS_DEVICE_NEEDS_RESET
        } else {
            0
        };
    }

    fn read_reg(&self, offset: u64) -> u32 {
        let q = self.queue_sel as usize;
        match offset {
            REG_MAGIC => MMIO_MAGIC,
            REG_VERSION => MMIO_VERSION,
            REG_DEVICE_ID => self.device.device_type(),
            REG_VENDOR_ID => VENDOR_ID,
            REG_DEVICE_FEATURES => match self.device_features_sel {
                0 => self.device.avail_features() as u32,
                1 => (self.device.avail_features() >> 32) as u32,
                _ => 0,
            },
            REG_QUEUE_NUM_MAX => self.queues.get(q).map_or(0, |q| u32::from(q.max_size())),
            REG_QUEUE_READY => self.queues.get(q).map_or(0, |q| u32::from(q.ready())),
            REG_INTERRUPT_STATUS => self.interrupt_status,
            REG_STATUS => self.status,
            // Config space never changes after creation.
            REG_CONFIG_GENERATION => 0,
            _ => 0,
        }
    }

    fn write_reg(&mut self, offset: u64, v: u32) {
        let q = self.queue_sel as usize;
        // Queue registers may only change while the queue is not ready.
        let queue_cfg = q < self.queues.len() && !self.queues[q].ready();
        match offset {
            REG_DEVICE_FEATURES_SEL => self.device_features_sel = v,
            REG_DRIVER_FEATURES_SEL => self.driver_features_sel = v,
            REG_DRIVER_FEATURES => {
                if self.status & STATUS_FEATURES_OK != 0 {
                    return;
                }
                match self.driver_features_sel {
                    0 => {
                        self.driver_features = (self.driver_features & !0xffff_ffff) | u64::from(v)
                    }
                    1 => {
                        self.driver_features =
                            (self.driver_features & 0xffff_ffff) | (u64::from(v) << 32)
                    }
                    _ => {}
                }
            }
            REG_QUEUE_SEL => self.queue_sel = v,
            REG_QUEUE_NUM if queue_cfg => self.regs[q].size = v.min(u32::from(u16::MAX)) as u16,
            REG_QUEUE_DESC_LOW if queue_cfg => set_low(&mut self.regs[q].desc, v),
            REG_QUEUE_DESC_HIGH if queue_cfg => set_high(&mut self.regs[q].desc, v),
            REG_QUEUE_DRIVER_LOW if queue_cfg => set_low(&mut self.regs[q].driver, v),
            REG_QUEUE_DRIVER_HIGH if queue_cfg => set_high(&mut self.regs[q].driver, v),
            REG_QUEUE_DEVICE_LOW if queue_cfg => set_low(&mut self.regs[q].device, v),
            REG_QUEUE_DEVICE_HIGH if queue_cfg => set_high(&mut self.regs[q].device, v),
            REG_QUEUE_READY if q < self.queues.len() => {
                if v == 0 {
                    self.queues[q].set_ready(false);
                } else if !self.queues[q].ready() {
                    if let Err(why) = self.set_queue_ready(q) {
                        self.fail(&VirtioError::AvailRing { queue: q, why });
                    }
                }
            }
            REG_QUEUE_NOTIFY => self.notify(v),
            REG_INTERRUPT_ACK => self.interrupt_status &= !v,
            REG_STATUS => self.write_status(v),
            _ => {}
        }
    }

    #[cfg(test)]
    pub(crate) fn queue(&self, i: usize) -> &Queue {
        &self.queues[i]
    }
}

fn set_low(r: &mut u64, v: u32) {
    *r = (*r & !0xffff_ffff) | u64::from(v);
}

fn set_high(r: &mut u64, v: u32) {
    *r = (*r & 0xffff_ffff) | (u64::from(v) << 32);
}

impl BusDevice for MmioTransport {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if offset >= CONFIG_SPACE {
            self.device.read_config(offset - CONFIG_SPACE, data);
        } else if data.len() == 4 && offset.is_multiple_of(4) {
            data.copy_from_slice(&self.read_reg(offset).to_le_bytes());
        }
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        if offset >= CONFIG_SPACE {
            self.device.write_config(offset - CONFIG_SPACE, data);
        } else if let (Ok(b), true) = (<[u8; 4]>::try_from(data), offset.is_multiple_of(4)) {
            self.write_reg(offset, u32::from_le_bytes(b));
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::super::testutil::*;
    use super::*;
    use std::sync::{Arc, Mutex};

    /// A device that echoes each chain back as used with its length, or fails.
    pub struct Echo {
        sizes: Vec<u16>,
        pub processed: Arc<Mutex<u32>>,
    }

    impl VirtioDevice for Echo {
        fn device_type(&self) -> u32 {
            99
        }
        fn avail_features(&self) -> u64 {
            VIRTIO_F_VERSION_1 | 1
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &self.sizes
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            for (i, b) in data.iter_mut().enumerate() {
                *b = (offset as u8).wrapping_add(i as u8);
            }
        }
        fn process_queue(
            &mut self,
            mem: &GuestMemoryMmap,
            queues: &mut [Queue],
            index: usize,
        ) -> Result<bool, VirtioError> {
            let mut any = false;
            while let Some(c) = pop_chain(&mut queues[index], mem, index)? {
                add_used(&mut queues[index], mem, index, c.head, c.total_len() as u32)?;
                *self.processed.lock().unwrap() += 1;
                any = true;
            }
            Ok(any)
        }
    }

    pub fn w(t: &mut MmioTransport, off: u64, v: u32) {
        t.write(0, off, &v.to_le_bytes());
    }

    pub fn r(t: &mut MmioTransport, off: u64) -> u32 {
        let mut b = [0u8; 4];
        t.read(0, off, &mut b);
        u32::from_le_bytes(b)
    }

    /// Drives the virtio 1.x init sequence and sets queue `qi` up with the rings of a
    /// `Driver` at 0 of `size`.
    pub fn init(t: &mut MmioTransport, features: u64) {
        w(t, REG_STATUS, 0);
        w(t, REG_STATUS, STATUS_ACKNOWLEDGE);
        w(t, REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        w(t, REG_DRIVER_FEATURES_SEL, 0);
        w(t, REG_DRIVER_FEATURES, features as u32);
        w(t, REG_DRIVER_FEATURES_SEL, 1);
        w(t, REG_DRIVER_FEATURES, (features >> 32) as u32);
        w(
            t,
            REG_STATUS,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK,
        );
    }

    pub fn setup_queue(t: &mut MmioTransport, qi: u32, drv: &Driver<'_>, size: u16) {
        w(t, REG_QUEUE_SEL, qi);
        w(t, REG_QUEUE_NUM, size as u32);
        let d = drv.mock.desc_table_addr().0;
        let a = drv.mock.avail_addr().0;
        let u = drv.mock.used_addr().0;
        w(t, REG_QUEUE_DESC_LOW, d as u32);
        w(t, REG_QUEUE_DESC_HIGH, (d >> 32) as u32);
        w(t, REG_QUEUE_DRIVER_LOW, a as u32);
        w(t, REG_QUEUE_DRIVER_HIGH, (a >> 32) as u32);
        w(t, REG_QUEUE_DEVICE_LOW, u as u32);
        w(t, REG_QUEUE_DEVICE_HIGH, (u >> 32) as u32);
        w(t, REG_QUEUE_READY, 1);
    }

    pub fn driver_ok(t: &mut MmioTransport) {
        w(
            t,
            REG_STATUS,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK,
        );
    }

    fn echo(mem: &GuestMemoryMmap) -> MmioTransport {
        MmioTransport::new(
            mem.clone(),
            Box::new(Echo {
                sizes: vec![16, 16],
                processed: Arc::default(),
            }),
        )
        .unwrap()
    }

    #[test]
    fn identity_registers_and_features() {
        let mem = memory();
        let mut t = echo(&mem);
        assert_eq!(r(&mut t, REG_MAGIC), MMIO_MAGIC);
        assert_eq!(r(&mut t, REG_VERSION), 2);
        assert_eq!(r(&mut t, REG_DEVICE_ID), 99);
        assert_eq!(r(&mut t, REG_VENDOR_ID), VENDOR_ID);
        w(&mut t, REG_DEVICE_FEATURES_SEL, 1);
        assert_eq!(r(&mut t, REG_DEVICE_FEATURES), 1);
        w(&mut t, REG_DEVICE_FEATURES_SEL, 0);
        assert_eq!(r(&mut t, REG_DEVICE_FEATURES), 1);
        w(&mut t, REG_QUEUE_SEL, 1);
        assert_eq!(r(&mut t, REG_QUEUE_NUM_MAX), 16);
        w(&mut t, REG_QUEUE_SEL, 7);
        assert_eq!(r(&mut t, REG_QUEUE_NUM_MAX), 0);
        // Config space at any width.
        let mut b = [0u8; 2];
        t.read(0, CONFIG_SPACE + 4, &mut b);
        assert_eq!(b, [4, 5]);
        // Sub-word register reads are zero.
        let mut b = [0xffu8; 2];
        t.read(0, REG_MAGIC, &mut b);
        assert_eq!(b, [0, 0]);
    }

    #[test]
    fn feature_negotiation_requires_version_1_and_offered_bits() {
        let mem = memory();
        let mut t = echo(&mem);
        init(&mut t, 1);
        assert_eq!(r(&mut t, REG_STATUS) & STATUS_FEATURES_OK, 0);
        init(&mut t, VIRTIO_F_VERSION_1 | 2);
        assert_eq!(r(&mut t, REG_STATUS) & STATUS_FEATURES_OK, 0);
        init(&mut t, VIRTIO_F_VERSION_1 | 1);
        assert_ne!(r(&mut t, REG_STATUS) & STATUS_FEATURES_OK, 0);
        assert_eq!(t.acked_features(), VIRTIO_F_VERSION_1 | 1);
    }

    #[test]
    fn notify_processes_queue_and_raises_interrupt() {
        let mem = memory();
        let mut t = echo(&mem);
        let mut drv = Driver::new(&mem, 16);
        init(&mut t, VIRTIO_F_VERSION_1);
        setup_queue(&mut t, 0, &drv, 16);
        driver_ok(&mut t);
        assert_eq!(r(&mut t, REG_QUEUE_READY), 1);
        drv.chain(0, &[(0x8000, 10, false), (0x9000, 5, true)]);
        w(&mut t, REG_QUEUE_NOTIFY, 0);
        assert_eq!(drv.used_idx(), 1);
        assert_eq!(drv.used(0), (0, 15));
        assert_eq!(r(&mut t, REG_INTERRUPT_STATUS), INTERRUPT_USED_RING);
        w(&mut t, REG_INTERRUPT_ACK, INTERRUPT_USED_RING);
        assert_eq!(r(&mut t, REG_INTERRUPT_STATUS), 0);
        // Reset clears everything.
        w(&mut t, REG_STATUS, 0);
        assert_eq!(r(&mut t, REG_STATUS), 0);
        assert_eq!(r(&mut t, REG_QUEUE_READY), 0);
    }

    #[test]
    fn irq_eventfd_is_signalled() {
        let mem = memory();
        let mut t = echo(&mem);
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        t.set_irq_eventfd(Some(evt.try_clone().unwrap()));
        let mut drv = Driver::new(&mem, 16);
        init(&mut t, VIRTIO_F_VERSION_1);
        setup_queue(&mut t, 0, &drv, 16);
        driver_ok(&mut t);
        drv.chain(0, &[(0x8000, 10, false)]);
        w(&mut t, REG_QUEUE_NOTIFY, 0);
        assert_eq!(evt.read().unwrap(), 1);
    }

    fn assert_needs_reset(t: &mut MmioTransport) {
        assert_ne!(r(t, REG_STATUS) & STATUS_DEVICE_NEEDS_RESET, 0);
        assert_ne!(r(t, REG_INTERRUPT_STATUS) & INTERRUPT_CONFIG_CHANGE, 0);
    }

    #[test]
    fn bad_queue_sizes_need_reset() {
        for size in [0u32, 3, 32, 0x1_0000] {
            let mem = memory();
            let mut t = echo(&mem);
            let drv = Driver::new(&mem, 16);
            init(&mut t, VIRTIO_F_VERSION_1);
            setup_queue(&mut t, 0, &drv, 16);
            w(&mut t, REG_QUEUE_SEL, 1);
            w(&mut t, REG_QUEUE_NUM, size);
            w(&mut t, REG_QUEUE_READY, 1);
            assert_eq!(r(&mut t, REG_QUEUE_READY), 0, "size {size}");
            assert_needs_reset(&mut t);
        }
    }

    #[test]
    fn unaligned_or_outside_rings_need_reset() {
        let cases: [(u64, u64, u64); 5] = [
            (0x1008, 0x2000, 0x3000),
            (0x1000, 0x2001, 0x3000),
            (0x1000, 0x2000, 0x3002),
            (0x1000, 0x2000, 0xFFFF0),
            (0x7000_0000, 0x2000, 0x3000),
        ];
        for (d, a, u) in cases {
            let mem = memory();
            let mut t = echo(&mem);
            init(&mut t, VIRTIO_F_VERSION_1);
            w(&mut t, REG_QUEUE_SEL, 0);
            w(&mut t, REG_QUEUE_NUM, 16);
            w(&mut t, REG_QUEUE_DESC_LOW, d as u32);
            w(&mut t, REG_QUEUE_DESC_HIGH, (d >> 32) as u32);
            w(&mut t, REG_QUEUE_DRIVER_LOW, a as u32);
            w(&mut t, REG_QUEUE_DEVICE_LOW, u as u32);
            w(&mut t, REG_QUEUE_READY, 1);
            assert_eq!(r(&mut t, REG_QUEUE_READY), 0, "{d:#x} {a:#x} {u:#x}");
            assert_needs_reset(&mut t);
            // Reset recovers.
            w(&mut t, REG_STATUS, 0);
            assert_eq!(r(&mut t, REG_STATUS), 0);
            assert_eq!(r(&mut t, REG_INTERRUPT_STATUS), 0);
        }
    }

    #[test]
    fn notify_on_unready_or_missing_queue_needs_reset() {
        let mem = memory();
        let mut t = echo(&mem);
        let drv = Driver::new(&mem, 16);
        init(&mut t, VIRTIO_F_VERSION_1);
        setup_queue(&mut t, 0, &drv, 16);
        driver_ok(&mut t);
        w(&mut t, REG_QUEUE_NOTIFY, 1);
        assert_needs_reset(&mut t);

        let mut t = echo(&mem);
        init(&mut t, VIRTIO_F_VERSION_1);
        setup_queue(&mut t, 0, &drv, 16);
        driver_ok(&mut t);
        w(&mut t, REG_QUEUE_NOTIFY, 9);
        assert_needs_reset(&mut t);

        // Notify before DRIVER_OK.
        let mut t = echo(&mem);
        init(&mut t, VIRTIO_F_VERSION_1);
        setup_queue(&mut t, 0, &drv, 16);
        w(&mut t, REG_QUEUE_NOTIFY, 0);
        assert_needs_reset(&mut t);
    }

    #[test]
    fn broken_chain_needs_reset_and_stops_processing() {
        let mem = memory();
        let mut t = echo(&mem);
        let mut drv = Driver::new(&mem, 16);
        init(&mut t, VIRTIO_F_VERSION_1);
        setup_queue(&mut t, 0, &drv, 16);
        driver_ok(&mut t);
        drv.desc(0, 0x8000, 4, VRING_DESC_F_NEXT, 0);
        drv.offer(0);
        w(&mut t, REG_QUEUE_NOTIFY, 0);
        assert_needs_reset(&mut t);
        assert_eq!(drv.used_idx(), 0);
        // Further notifies are ignored until reset.
        drv.chain(1, &[(0x8000, 4, false)]);
        w(&mut t, REG_QUEUE_NOTIFY, 0);
        assert_eq!(drv.used_idx(), 0);
        assert!(!t.queue(0).ready() || t.status() & STATUS_DEVICE_NEEDS_RESET != 0);
    }

    #[test]
    fn queue_registers_frozen_while_ready() {
        let mem = memory();
        let mut t = echo(&mem);
        let drv = Driver::new(&mem, 16);
        init(&mut t, VIRTIO_F_VERSION_1);
        setup_queue(&mut t, 0, &drv, 16);
        w(&mut t, REG_QUEUE_NUM, 4);
        assert_eq!(t.queue(0).size(), 16);
    }
}
