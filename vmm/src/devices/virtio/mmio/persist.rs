//! Capture and restore of a [`MmioTransport`]'s registers and queues.

use virtio_queue::QueueT;

use super::{MmioTransport, QueueRegs};
use crate::devices::virtio::persist::{QueueState, TransportRestoreError, TransportState};

impl MmioTransport {
    /// The transport's registers, its queues and its device's attachment. Only
    /// meaningful while nothing runs the device (the VM is paused).
    pub fn save_state(&self) -> TransportState {
        let queues = self
            .queues
            .iter()
            .zip(&self.regs)
            .map(|(q, r)| QueueState {
                size: r.size,
                desc: r.desc,
                driver: r.driver,
                device: r.device,
                ready: q.ready(),
                next_avail: q.next_avail(),
                next_used: q.next_used(),
                event_idx: q.event_idx_enabled(),
            })
            .collect();
        TransportState {
            device_type: self.device.device_type(),
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            driver_features: self.driver_features,
            queue_sel: self.queue_sel,
            interrupt_status: self.interrupt_status,
            status: self.status,
            needs_reset: self.needs_reset,
            queues,
            device: self.device.save_state(),
        }
    }

    /// Puts this freshly created transport in the state `s` describes. The device must
    /// be the same kind with the same attachment; ready queues are checked against
    /// guest memory exactly as when the driver enabled them, so a corrupt state cannot
    /// point the device outside guest memory.
    pub fn restore_state(&mut self, s: &TransportState) -> Result<(), TransportRestoreError> {
        let found = self.device.device_type();
        if s.device_type != found {
            return Err(TransportRestoreError::DeviceType {
                saved: s.device_type,
                found,
            });
        }
        if s.queues.len() != self.queues.len() {
            return Err(TransportRestoreError::QueueCount {
                saved: s.queues.len(),
                found: self.queues.len(),
            });
        }
        let attached = self.device.save_state();
        if attached != s.device {
            return Err(TransportRestoreError::Attachment {
                saved: Box::new(s.device.clone()),
                found: Box::new(attached),
            });
        }
        self.reset();
        for (i, qs) in s.queues.iter().enumerate() {
            self.regs[i] = QueueRegs {
                size: qs.size,
                desc: qs.desc,
                driver: qs.driver,
                device: qs.device,
            };
            if qs.ready {
                self.set_queue_ready(i)
                    .map_err(|why| TransportRestoreError::Queue { queue: i, why })?;
            }
            let q = &mut self.queues[i];
            q.set_next_avail(qs.next_avail);
            q.set_next_used(qs.next_used);
            q.set_event_idx(qs.event_idx);
        }
        self.device_features_sel = s.device_features_sel;
        self.driver_features_sel = s.driver_features_sel;
        self.driver_features = s.driver_features;
        self.queue_sel = s.queue_sel;
        self.interrupt_status = s.interrupt_status;
        self.status = s.status;
        self.needs_reset = s.needs_reset;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{driver_ok, init, r, setup_queue, w};
    use super::super::*;
    use crate::devices::virtio::persist::{DeviceState, TransportRestoreError, TransportState};
    use crate::devices::virtio::testutil::*;
    use std::sync::{Arc, Mutex};

    /// Puts every chain on the used ring with its length, and counts them.
    struct Echo {
        sizes: [u16; 2],
        processed: Arc<Mutex<u32>>,
    }

    impl VirtioDevice for Echo {
        fn device_type(&self) -> u32 {
            99
        }
        fn avail_features(&self) -> u64 {
            VIRTIO_F_VERSION_1
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &self.sizes
        }
        fn read_config(&self, _offset: u64, data: &mut [u8]) {
            data.fill(0);
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

    fn echo(mem: &GuestMemoryMmap) -> (MmioTransport, Arc<Mutex<u32>>) {
        let processed = Arc::new(Mutex::new(0));
        let dev = Echo {
            sizes: [16, 16],
            processed: processed.clone(),
        };
        (
            MmioTransport::new(mem.clone(), Box::new(dev)).unwrap(),
            processed,
        )
    }

    #[test]
    fn restored_transport_continues_the_rings() {
        let mem = memory();
        let (mut t, _) = echo(&mem);
        let mut drv = Driver::new(&mem, 16);
        init(&mut t, VIRTIO_F_VERSION_1);
        setup_queue(&mut t, 0, &drv, 16);
        driver_ok(&mut t);
        drv.chain(0, &[(0x8000, 10, false)]);
        drv.chain(1, &[(0x8000, 3, false)]);
        w(&mut t, REG_QUEUE_NOTIFY, 0);
        w(&mut t, REG_QUEUE_SEL, 1);
        let s = t.save_state();
        assert_eq!(s.queues[0].next_avail, 2);
        assert_eq!(s.queues[0].next_used, 2);
        assert!(s.queues[0].ready && !s.queues[1].ready);
        assert_eq!(s.device, DeviceState::Other { device_type: 99 });

        // Round trip through bytes, into a fresh transport on the same memory.
        let bytes = postcard::to_allocvec(&s).unwrap();
        let s2: TransportState = postcard::from_bytes(&bytes).unwrap();
        let (mut t2, processed) = echo(&mem);
        t2.restore_state(&s2).unwrap();
        assert_eq!(t2.save_state(), s);
        assert_eq!(r(&mut t2, REG_QUEUE_SEL), 0, "QueueSel is write-only");
        assert_eq!(r(&mut t2, REG_STATUS), r(&mut t, REG_STATUS));
        assert_eq!(r(&mut t2, REG_INTERRUPT_STATUS), INTERRUPT_USED_RING);
        // The next chain lands in used slot 2, not 0.
        drv.chain(2, &[(0x8000, 7, false)]);
        w(&mut t2, REG_QUEUE_NOTIFY, 0);
        assert_eq!(*processed.lock().unwrap(), 1);
        assert_eq!(drv.used_idx(), 3);
        assert_eq!(drv.used(2), (2, 7));
    }

    #[test]
    fn restore_rejects_wrong_device_and_bad_rings() {
        let mem = memory();
        let (mut t, _) = echo(&mem);
        let drv = Driver::new(&mem, 16);
        init(&mut t, VIRTIO_F_VERSION_1);
        setup_queue(&mut t, 0, &drv, 16);
        driver_ok(&mut t);
        let good = t.save_state();

        let mut s = good.clone();
        s.device_type = 3;
        let (mut t2, _) = echo(&mem);
        assert!(matches!(
            t2.restore_state(&s),
            Err(TransportRestoreError::DeviceType {
                saved: 3,
                found: 99
            })
        ));
        let mut s = good.clone();
        s.queues.pop();
        assert!(matches!(
            t2.restore_state(&s),
            Err(TransportRestoreError::QueueCount { .. })
        ));
        let mut s = good.clone();
        s.device = DeviceState::Net {
            tap: "x".into(),
            mac: [0; 6],
        };
        assert!(matches!(
            t2.restore_state(&s),
            Err(TransportRestoreError::Attachment { .. })
        ));
        // A ready queue whose rings lie outside guest memory is refused.
        let mut s = good;
        s.queues[0].desc = 0x7000_0000;
        assert!(matches!(
            t2.restore_state(&s),
            Err(TransportRestoreError::Queue { queue: 0, .. })
        ));
    }
}
