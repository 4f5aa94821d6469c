//! A hand-assembled CPL3 guest that dirties a chosen number of pages per round, for
//! dirty-tracking tests and the `dirty_cost` example.
//!
//! Round `g` (1, 2, ...): read N, the first page (default [`DIRTY_BASE`]) and the
//! stride (default 4 KiB) from the control device, write `g` into the first 8 bytes of
//! N pages from the first page, one stride apart, report `done = g`, then spin on
//! MMIO reads until the host sets `go = g`. So when the host sees `done == g` the guest
//! has written exactly the N pages of round g and writes nothing until released.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use twinrun_guest_abi as abi;
use vmm::boot::Image;
use vmm::builder::build_vm_with_image_and_options;
use vmm::config::{ConsoleConfig, Payload, VmConfig, Workloads};
use vmm::devices::bus::BusDevice;
use vmm::Vmm;

/// Control device window (same window the other hand-assembled tests use).
pub const DEV_BASE: u64 = abi::MMIO_BASE + 0x2000;
/// First page the guest dirties: above the image, stack and page tables.
pub const DIRTY_BASE: u64 = 16 << 20;
const REG_DONE: u64 = 0;
const REG_GO: u64 = 8;
const REG_N: u64 = 0x10;
const REG_STRIDE: u64 = 0x18;
const REG_BASE: u64 = 0x20;

/// Machine code of the guest.
pub fn code() -> Vec<u8> {
    let mut c = Vec::new();
    c.extend_from_slice(&[0xbb]); // mov ebx, DEV_BASE
    c.extend_from_slice(&(DEV_BASE as u32).to_le_bytes());
    c.extend_from_slice(&[0x31, 0xc9]); // xor ecx, ecx
    let outer = c.len();
    c.extend_from_slice(&[0x48, 0xff, 0xc1]); // inc rcx
    c.extend_from_slice(&[0x48, 0x8b, 0x43, REG_BASE as u8]); // mov rax, [rbx + REG_BASE]
    c.extend_from_slice(&[0x8b, 0x53, REG_N as u8]); // mov edx, [rbx + REG_N]
    c.extend_from_slice(&[0x8b, 0x7b, REG_STRIDE as u8]); // mov edi, [rbx + REG_STRIDE]
    c.extend_from_slice(&[0x85, 0xd2]); // test edx, edx
    let inner: [u8; 10] = [
        0x48, 0x89, 0x08, // mov [rax], rcx
        0x48, 0x01, 0xf8, // add rax, rdi
        0xff, 0xca, // dec edx
        0x75, 0xf6, // jnz inner (-10)
    ];
    c.extend_from_slice(&[0x74, inner.len() as u8]); // jz after
    c.extend_from_slice(&inner);
    c.extend_from_slice(&[0x89, 0x0b]); // after: mov [rbx + REG_DONE], ecx
    c.extend_from_slice(&[0x8b, 0x73, REG_GO as u8]); // wait: mov esi, [rbx + REG_GO]
    c.extend_from_slice(&[0x39, 0xce]); // cmp esi, ecx
    c.extend_from_slice(&[0x75, 0xf9]); // jne wait (-7)
    let back = outer as isize - (c.len() as isize + 2);
    c.extend_from_slice(&[0xeb, back as i8 as u8]); // jmp outer
    c
}

/// The host side of the guest's control registers.
#[derive(Default)]
pub struct Control {
    pub done: AtomicU32,
    pub go: AtomicU32,
    pub n: AtomicU32,
    /// Bytes between two dirtied pages (0 = 4 KiB).
    pub stride: AtomicU32,
    /// First page dirtied (0 = [`DIRTY_BASE`]).
    pub base: AtomicU64,
}

struct Dev(Arc<Control>);

impl BusDevice for Dev {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        let v = match offset {
            REG_GO => u64::from(self.0.go.load(Ordering::SeqCst)),
            REG_N => u64::from(self.0.n.load(Ordering::SeqCst)),
            REG_STRIDE => match self.0.stride.load(Ordering::SeqCst) {
                0 => 4096,
                s => u64::from(s),
            },
            REG_BASE => match self.0.base.load(Ordering::SeqCst) {
                0 => DIRTY_BASE,
                b => b,
            },
            _ => 0,
        };
        let b = v.to_le_bytes();
        let n = data.len().min(8);
        data[..n].copy_from_slice(&b[..n]);
    }
    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        if offset == REG_DONE && data.len() >= 4 {
            let v = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
            self.0.done.store(v, Ordering::SeqCst);
        }
    }
}

/// Builds (not starts) the VM with `mem_mib` of RAM and the control device.
pub fn build(mem_mib: u64) -> (Vmm, Arc<Control>) {
    build_with_options(mem_mib, &vmm::config::BuildOptions::default())
}

/// [`build`] with build options (e.g. KVM's dirty ring).
pub fn build_with_options(mem_mib: u64, opts: &vmm::config::BuildOptions) -> (Vmm, Arc<Control>) {
    build_code(mem_mib, opts, &code())
}

/// [`build`] of a guest that reads the first word of its N pages per round instead of
/// writing it (the same code with the store turned into a load into rsi, which the
/// loop does not use).
pub fn build_reading(mem_mib: u64) -> (Vmm, Arc<Control>) {
    let mut c = code();
    let store = [0x48, 0x89, 0x08]; // mov [rax], rcx
    let at = c
        .windows(3)
        .position(|w| w == store)
        .expect("the store in the inner loop");
    c[at..at + 3].copy_from_slice(&[0x48, 0x8b, 0x30]); // mov rsi, [rax]
    build_code(mem_mib, &vmm::config::BuildOptions::default(), &c)
}

fn build_code(mem_mib: u64, opts: &vmm::config::BuildOptions, code: &[u8]) -> (Vmm, Arc<Control>) {
    let cfg = VmConfig {
        mem_mib,
        vcpus: 1,
        payload: Payload::TestGuest {
            elf: "/unused".into(),
            workloads: Workloads::default(),
        },
        disks: vec![],
        nets: vec![],
        console: ConsoleConfig::Stdout,
    };
    let mut vmm = build_vm_with_image_and_options(&cfg, Image::Flat(code), opts).expect("build");
    let ctl = Arc::new(Control::default());
    let dev: Arc<Mutex<dyn BusDevice>> = Arc::new(Mutex::new(Dev(ctl.clone())));
    vmm.insert_mmio_device(dev, DEV_BASE, 0x1000)
        .expect("insert control device");
    (vmm, ctl)
}

/// Waits until the guest reports `done == round`.
pub fn wait_done(ctl: &Control, round: u32) {
    let t0 = Instant::now();
    while ctl.done.load(Ordering::SeqCst) != round {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "guest did not finish round {round}"
        );
        std::thread::sleep(Duration::from_micros(50));
    }
}
