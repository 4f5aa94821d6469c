//! virtio-console with a single port: receiveq 0 (guest input, never filled: the VMM
//! has no console input yet) and transmitq 1 (guest output, sent to a [`ConsoleSink`],
//! or held by the VM's output gate while output commit is on: see
//! [`crate::devices::output`]).

mod persist;
pub mod sink;

use std::os::fd::RawFd;
use std::sync::{Arc, Mutex};
use twinrun_lock::MutexExt;

use virtio_queue::Queue;

use self::sink::ConsoleSink;
use super::*;
use crate::config::ConsoleConfig;
use crate::devices::output::{ConsoleRelease, GatePort, OutputGate, StreamKind};
use crate::vstate::memory::GuestMemoryMmap;

pub const RX_QUEUE: usize = 0;
pub const TX_QUEUE: usize = 1;
/// Largest single output chain accepted.
pub const MAX_TX_CHAIN: u64 = 1 << 20;

const QUEUE_SIZES: [u16; 2] = [QUEUE_MAX_SIZE, QUEUE_MAX_SIZE];

pub struct Console {
    /// Shared with the output gate, which writes released output into it.
    sink: Arc<Mutex<ConsoleSink>>,
    /// This console's stream in the VM's output gate, once attached.
    gate: Option<GatePort>,
    /// The config the sink was opened from, when known, for state capture.
    attachment: Option<ConsoleConfig>,
}

impl Console {
    pub fn new(sink: ConsoleSink) -> Console {
        Console {
            sink: Arc::new(Mutex::new(sink)),
            gate: None,
            attachment: None,
        }
    }

    /// A console on the sink `cfg` describes (which state capture then names).
    pub fn open(cfg: &ConsoleConfig) -> Result<Console, sink::SinkError> {
        Ok(Console {
            sink: Arc::new(Mutex::new(ConsoleSink::new(cfg)?)),
            gate: None,
            attachment: Some(cfg.clone()),
        })
    }

    pub fn sink(&self) -> &Arc<Mutex<ConsoleSink>> {
        &self.sink
    }

    fn sink_lock(&self) -> std::sync::MutexGuard<'_, ConsoleSink> {
        self.sink.lock_or_recover()
    }

    fn transmit(&mut self, mem: &GuestMemoryMmap, queue: &mut Queue) -> Result<bool, VirtioError> {
        let mut any = false;
        // A full gate leaves the chains in the guest's queue: the guest waits for
        // buffers instead of output being lost.
        while self.gate.as_ref().is_none_or(GatePort::has_room) {
            let Some(chain) = pop_chain(queue, mem, TX_QUEUE)? else {
                break;
            };
            let bytes = read_chain(mem, &chain, MAX_TX_CHAIN)?;
            let direct = match &self.gate {
                Some(g) => g.hold(bytes, 0).err(),
                None => Some(bytes),
            };
            if let Some(bytes) = direct {
                self.sink_lock().write(&bytes);
            }
            add_used(queue, mem, TX_QUEUE, chain.head, 0)?;
            any = true;
        }
        Ok(any)
    }
}

impl VirtioDevice for Console {
    fn device_type(&self) -> u32 {
        twinrun_guest_abi::VIRTIO_ID_CONSOLE
    }

    fn avail_features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn save_state(&self) -> super::persist::DeviceState {
        self.persist()
    }

    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        // No F_SIZE / F_MULTIPORT / F_EMERG_WRITE: the config fields are not valid.
        data.fill(0);
    }

    fn process_queue(
        &mut self,
        mem: &GuestMemoryMmap,
        queues: &mut [Queue],
        index: usize,
    ) -> Result<bool, VirtioError> {
        if index != TX_QUEUE {
            // Buffers for input we never have: leave them with the device.
            return Ok(false);
        }
        self.transmit(mem, &mut queues[TX_QUEUE])
    }

    fn backend_fds(&self) -> Vec<(RawFd, u32)> {
        let mut v = self.sink_lock().fds();
        if let Some(g) = &self.gate {
            v.push((g.wake_fd(), libc::EPOLLIN as u32));
        }
        v
    }

    fn backend_event(
        &mut self,
        mem: &GuestMemoryMmap,
        queues: &mut [Queue],
        active: bool,
        fd: RawFd,
        events: u32,
    ) -> Result<bool, VirtioError> {
        if let Some(g) = self.gate.as_ref().filter(|g| g.wake_fd() == fd) {
            // The gate has room again: send what the guest queued meanwhile.
            g.clear_wake();
            if active && virtio_queue::QueueT::ready(&queues[TX_QUEUE]) {
                return self.transmit(mem, &mut queues[TX_QUEUE]);
            }
            return Ok(false);
        }
        self.sink_lock().on_event(fd, events);
        Ok(false)
    }

    fn flush_output(&mut self) {
        self.sink_lock().flush();
    }

    fn attach_output_gate(&mut self, gate: &Arc<OutputGate>) -> std::io::Result<()> {
        let sink: Arc<Mutex<dyn crate::devices::output::ReleaseSink>> =
            Arc::new(Mutex::new(ConsoleRelease(self.sink.clone())));
        self.gate = Some(gate.register(StreamKind::Console, sink)?);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::mmio::tests::*;
    use super::super::mmio::*;
    use super::super::testutil::*;
    use super::*;
    use crate::config::ConsoleConfig;
    use crate::devices::bus::BusDevice;
    use std::io::Read;
    use std::os::unix::net::UnixStream;
    use vm_memory::{Bytes, GuestAddress};

    struct TempPath(std::path::PathBuf);
    impl Drop for TempPath {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
    fn temp(tag: &str) -> TempPath {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        TempPath(
            std::env::temp_dir().join(format!("twinrun-console-{}-{tag}-{n}", std::process::id())),
        )
    }

    fn transport(mem: &GuestMemoryMmap, cfg: &ConsoleConfig) -> MmioTransport {
        let c = Console::new(ConsoleSink::new(cfg).unwrap());
        MmioTransport::new(mem.clone(), Box::new(c)).unwrap()
    }

    fn ready<'a>(t: &mut MmioTransport, mem: &'a GuestMemoryMmap) -> Driver<'a> {
        let drv = Driver::new(mem, 16);
        init(t, VIRTIO_F_VERSION_1);
        setup_queue(t, TX_QUEUE as u32, &drv, 16);
        driver_ok(t);
        drv
    }

    fn send(t: &mut MmioTransport, drv: &mut Driver<'_>, mem: &GuestMemoryMmap, s: &[u8], at: u16) {
        let addr = 0x10000 + u64::from(at) * 0x1000;
        mem.write_slice(s, GuestAddress(addr)).unwrap();
        drv.chain(at, &[(addr, s.len() as u32, false)]);
        w(t, REG_QUEUE_NOTIFY, TX_QUEUE as u32);
    }

    #[test]
    fn tx_to_file_in_order() {
        let p = temp("file");
        std::fs::write(&p.0, b"old\n").unwrap();
        let mem = memory();
        let mut t = transport(&mem, &ConsoleConfig::File { path: p.0.clone() });
        let mut drv = ready(&mut t, &mem);
        send(&mut t, &mut drv, &mem, b"C 1\n", 0);
        // Output split over two descriptors.
        mem.write_slice(b"C ", GuestAddress(0x30000)).unwrap();
        mem.write_slice(b"2\n", GuestAddress(0x31000)).unwrap();
        drv.chain(1, &[(0x30000, 2, false), (0x31000, 2, false)]);
        w(&mut t, REG_QUEUE_NOTIFY, TX_QUEUE as u32);
        assert_eq!(drv.used_idx(), 2);
        assert_eq!(r(&mut t, REG_INTERRUPT_STATUS), INTERRUPT_USED_RING);
        assert_eq!(std::fs::read(&p.0).unwrap(), b"old\nC 1\nC 2\n");
    }

    #[test]
    fn tx_to_socket_keeps_output_until_reader_connects() {
        let p = temp("sock");
        let mem = memory();
        let cfg = ConsoleConfig::Socket { path: p.0.clone() };
        let c = Console::new(ConsoleSink::new(&cfg).unwrap());
        let mut t = MmioTransport::new(mem.clone(), Box::new(c)).unwrap();
        let mut drv = ready(&mut t, &mem);
        send(&mut t, &mut drv, &mem, b"before\n", 0);
        let mut reader = UnixStream::connect(&p.0).unwrap();
        // The backend thread would see the listener readable; do its job here.
        let fds = t.backend_fds();
        assert_eq!(fds.len(), 1);
        t.backend_event(fds[0].0, libc::EPOLLIN as u32);
        send(&mut t, &mut drv, &mem, b"after\n", 1);
        reader
            .set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        let mut got = vec![0u8; 13];
        reader.read_exact(&mut got).unwrap();
        assert_eq!(got, b"before\nafter\n");
        assert_eq!(t.backend_fds().len(), 2);
        // Reader leaves: output is kept for the next one.
        drop(reader);
        send(&mut t, &mut drv, &mem, b"x\n", 2);
        send(&mut t, &mut drv, &mem, b"y\n", 3);
        let fds = t.backend_fds();
        t.backend_event(fds[1].0, (libc::EPOLLRDHUP | libc::EPOLLHUP) as u32);
        assert_eq!(t.backend_fds().len(), 1);
        let mut reader = UnixStream::connect(&p.0).unwrap();
        t.backend_event(fds[0].0, libc::EPOLLIN as u32);
        reader
            .set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        let mut got = Vec::new();
        let mut b = [0u8; 16];
        while !got.ends_with(b"y\n") {
            let n = reader.read(&mut b).unwrap();
            assert!(n > 0);
            got.extend_from_slice(&b[..n]);
        }
        // "x\n" may have been written into the dead socket before the hang-up was seen;
        // what the new reader gets is in order and ends with the newest output.
        assert!(got == b"x\ny\n" || got == b"y\n", "{got:?}");
    }

    #[test]
    fn writable_tx_descriptor_needs_reset() {
        let p = temp("bad");
        let mem = memory();
        let mut t = transport(&mem, &ConsoleConfig::File { path: p.0.clone() });
        let mut drv = ready(&mut t, &mem);
        drv.chain(0, &[(0x10000, 4, true)]);
        w(&mut t, REG_QUEUE_NOTIFY, TX_QUEUE as u32);
        assert_ne!(r(&mut t, REG_STATUS) & STATUS_DEVICE_NEEDS_RESET, 0);
        assert_eq!(drv.used_idx(), 0);
    }

    #[test]
    fn oversized_and_outside_memory_tx_need_reset() {
        for bufs in [
            vec![(0x10000u64, (MAX_TX_CHAIN + 1) as u32, false)],
            vec![(0x2_0000_0000u64, 4, false)],
        ] {
            let p = temp("big");
            let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x20_0000)]).unwrap();
            let mut t = transport(&mem, &ConsoleConfig::File { path: p.0.clone() });
            let mut drv = ready(&mut t, &mem);
            drv.chain(0, &bufs);
            w(&mut t, REG_QUEUE_NOTIFY, TX_QUEUE as u32);
            assert_ne!(r(&mut t, REG_STATUS) & STATUS_DEVICE_NEEDS_RESET, 0);
            assert!(std::fs::read(&p.0).unwrap().is_empty());
        }
    }

    #[test]
    fn rx_notify_is_harmless() {
        let p = temp("rx");
        let mem = memory();
        let mut t = transport(&mem, &ConsoleConfig::File { path: p.0.clone() });
        let mut drv = Driver::new(&mem, 16);
        init(&mut t, VIRTIO_F_VERSION_1);
        setup_queue(&mut t, RX_QUEUE as u32, &drv, 16);
        driver_ok(&mut t);
        drv.chain(0, &[(0x10000, 64, true)]);
        t.write(0, REG_QUEUE_NOTIFY, &0u32.to_le_bytes());
        assert_eq!(r(&mut t, REG_STATUS) & STATUS_DEVICE_NEEDS_RESET, 0);
        assert_eq!(drv.used_idx(), 0);
    }
}
