//! Runs hand-assembled CPL3 guests on real KVM and checks what the VMM reports.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use twinrun_guest_abi as abi;
use vmm::boot::Image;
use vmm::builder::build_vm_with_image;
use vmm::config::{ConsoleConfig, Payload, VmConfig, Workloads};
use vmm::devices::bus::BusDevice;
use vmm::{VmExit, Vmm};

fn config(vcpus: u8) -> VmConfig {
    VmConfig {
        mem_mib: 64,
        vcpus,
        payload: Payload::TestGuest {
            elf: "/unused".into(),
            workloads: Workloads::default(),
        },
        disks: vec![],
        nets: vec![],
        console: ConsoleConfig::Stdout,
    }
}

/// Records every write: (offset, bytes). Reads return 0x5a.
#[derive(Default)]
struct Recorder {
    writes: Vec<(u64, Vec<u8>)>,
}

impl BusDevice for Recorder {
    fn read(&mut self, _base: u64, _offset: u64, data: &mut [u8]) {
        data.fill(0x5a);
    }
    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        self.writes.push((offset, data.to_vec()));
    }
}

const DEV_BASE: u64 = abi::MMIO_BASE + 0x2000;

fn vm_with_recorder(code: &[u8], vcpus: u8) -> (Vmm, Arc<Mutex<Recorder>>) {
    let mut vmm = build_vm_with_image(&config(vcpus), Image::Flat(code)).expect("build");
    let rec = Arc::new(Mutex::new(Recorder::default()));
    vmm.insert_mmio_device(rec.clone(), DEV_BASE, 0x1000)
        .unwrap();
    (vmm, rec)
}

fn wait(vmm: &mut Vmm) -> VmExit {
    vmm.wait_timeout(Duration::from_secs(20))
        .expect("VM did not end within 20 s")
}

// mov ebx, DEV_BASE (0xd0002000)
const MOV_EBX_DEV: [u8; 5] = [0xbb, 0x00, 0x20, 0x00, 0xd0];
// out 0xf4, eax ; jmp $
const OUT_EXIT: [u8; 4] = [0xe7, 0xf4, 0xeb, 0xfe];

/// Whether CPL3 `cpuid` reached the VMM's CPUID table: the twinrun leaf's signature
/// (EBX, ECX, EDX as the guest read them) is in no host CPU's table.
fn cpuid_is_virtualized(ebx: u32, ecx: u32, edx: u32) -> bool {
    let mut sig = [0u8; 12];
    sig[..4].copy_from_slice(&ebx.to_le_bytes());
    sig[4..8].copy_from_slice(&ecx.to_le_bytes());
    sig[8..].copy_from_slice(&edx.to_le_bytes());
    sig == abi::CPUID_TWINRUN_SIGNATURE
}

#[test]
fn cpl3_guest_writes_mmio_and_exits_with_status() {
    let mut code = Vec::new();
    code.extend_from_slice(&MOV_EBX_DEV);
    code.extend_from_slice(&[0xb8, 0xcd, 0xab, 0x34, 0x12]); // mov eax, 0x1234abcd
    code.extend_from_slice(&[0x89, 0x43, 0x10]); // mov [rbx+0x10], eax
    code.extend_from_slice(&[0x48, 0x8b, 0x07]); // mov rax, [rdi]   (Params magic)
    code.extend_from_slice(&[0x50, 0x59]); // push rax; pop rcx (stack works)
    code.extend_from_slice(&[0x48, 0x89, 0x4b, 0x20]); // mov [rbx+0x20], rcx
    code.extend_from_slice(&[0x48, 0x89, 0x63, 0x28]); // mov [rbx+0x28], rsp
                                                       // Unclaimed MMIO read (window 7) returns 0; report it.
    code.extend_from_slice(&[0xbe, 0x00, 0x70, 0x00, 0xd0]); // mov esi, 0xd0007000
    code.extend_from_slice(&[0x8b, 0x06]); // mov eax, [rsi]
    code.extend_from_slice(&[0x89, 0x43, 0x30]); // mov [rbx+0x30], eax
                                                 // CPUID leaf 1 at CPL3: APIC id and logical count.
    code.extend_from_slice(&[0xb8, 0x01, 0x00, 0x00, 0x00]); // mov eax, 1
    code.extend_from_slice(&[0x0f, 0xa2]); // cpuid
    code.extend_from_slice(&[0x89, 0xde]); // mov esi, ebx (cpuid clobbered rbx)
    code.extend_from_slice(&MOV_EBX_DEV);
    code.extend_from_slice(&[0x89, 0x73, 0x38]); // mov [rbx+0x38], esi
                                                 // The twinrun leaf: its signature says whether the VMM's table answered.
    code.push(0xb8); // mov eax, CPUID_TWINRUN_LEAF
    code.extend_from_slice(&abi::CPUID_TWINRUN_LEAF.to_le_bytes());
    code.extend_from_slice(&[0x0f, 0xa2]); // cpuid
    code.extend_from_slice(&[0x89, 0xde]); // mov esi, ebx
    code.extend_from_slice(&MOV_EBX_DEV);
    code.extend_from_slice(&[0x89, 0x73, 0x40]); // mov [rbx+0x40], esi
    code.extend_from_slice(&[0x89, 0x4b, 0x44]); // mov [rbx+0x44], ecx
    code.extend_from_slice(&[0x89, 0x53, 0x48]); // mov [rbx+0x48], edx
    code.extend_from_slice(&[0xb8, 0x2a, 0x00, 0x00, 0x00]); // mov eax, 42
    code.extend_from_slice(&OUT_EXIT);
    let (mut vmm, rec) = vm_with_recorder(&code, 1);
    vmm.start().unwrap();
    let exit = wait(&mut vmm);
    assert_eq!(exit, VmExit::GuestExit { status: 42 });
    assert!(!exit.is_clean());
    let w = &rec.lock().unwrap().writes;
    assert_eq!(w.len(), 8, "{w:?}");
    assert_eq!(w[0], (0x10, 0x1234abcdu32.to_le_bytes().to_vec()));
    assert_eq!(w[1], (0x20, abi::PARAMS_MAGIC.to_le_bytes().to_vec()));
    assert_eq!(w[2], (0x28, abi::STACK_TOP.to_le_bytes().to_vec()));
    assert_eq!(w[3], (0x30, vec![0, 0, 0, 0]));
    let word = |i: usize, offset: u64| {
        assert_eq!(w[i].0, offset);
        u32::from_le_bytes(w[i].1.clone().try_into().expect("a 32-bit write"))
    };
    let leaf1_ebx = word(4, 0x38);
    let (sig_ebx, sig_ecx, sig_edx) = (word(5, 0x40), word(6, 0x44), word(7, 0x48));
    if cpuid_is_virtualized(sig_ebx, sig_ecx, sig_edx) {
        println!(
            "CPUID at CPL3 is virtualized (twinrun signature seen): leaf 1 EBX {leaf1_ebx:#010x}"
        );
        assert_eq!(leaf1_ebx >> 24, 0, "APIC id of vCPU 0");
        assert_eq!(
            (leaf1_ebx >> 16) & 0xff,
            1,
            "logical processors of a 1-vCPU VM"
        );
    } else {
        // Software KVMs without CPUID interception at CPL3 (see ../shared/ENVIRONMENT.md):
        // the host CPU answered, so its APIC id says which host CPU ran the vCPU thread.
        println!(
            "CPUID at CPL3 is not virtualized on this machine (no twinrun signature at \
             leaf {:#x}; host CPU answered leaf 1 with EBX {leaf1_ebx:#010x}): APIC id \
             not checked",
            abi::CPUID_TWINRUN_LEAF
        );
    }
}

#[test]
fn guest_exit_zero_is_clean() {
    let code = [[0x31, 0xc0].as_slice(), &OUT_EXIT].concat(); // xor eax,eax; out
    let (mut vmm, _) = vm_with_recorder(&code, 1);
    vmm.start().unwrap();
    let exit = wait(&mut vmm);
    assert_eq!(exit, VmExit::GuestExit { status: 0 });
    assert!(exit.is_clean());
    // wait() again returns the same result.
    assert_eq!(vmm.wait(), exit);
}

#[test]
fn hlt_at_cpl3_is_a_triple_fault_with_registers() {
    // mov r15, 0x1122334455667788 ; hlt
    let code = [
        0x49, 0xbf, 0x88, 0x77, 0x66, 0x55, 0x44, 0x33, 0x22, 0x11, 0xf4,
    ];
    let (mut vmm, _) = vm_with_recorder(&code, 1);
    vmm.start().unwrap();
    let exit = wait(&mut vmm);
    let text = exit.to_string();
    println!("{text}");
    match exit {
        VmExit::TripleFault { vcpu: 0, regs } => {
            assert_eq!(regs.rip, abi::IMAGE_BASE + 10, "rip at the hlt");
            assert_eq!(regs.r15, 0x1122334455667788);
            assert_eq!(regs.cs, abi::GDT_USER_CODE);
            assert_eq!(regs.cr3, abi::PML4_ADDR);
        }
        other => panic!("expected a triple fault, got {other}"),
    }
    assert!(text.contains("rip=0x000000000040000a"), "{text}");
}

#[test]
fn write_outside_mapped_memory_is_a_triple_fault() {
    // mov rax, 0x800000000 (32 GiB, unmapped) ; mov [rax], eax
    let code = [0x48, 0xb8, 0, 0, 0, 0, 8, 0, 0, 0, 0x89, 0x00];
    let (mut vmm, _) = vm_with_recorder(&code, 1);
    vmm.start().unwrap();
    match wait(&mut vmm) {
        VmExit::TripleFault { regs, .. } => assert_eq!(regs.rip, abi::IMAGE_BASE + 10),
        other => panic!("expected a triple fault, got {other}"),
    }
}

/// A guest that counts in rax forever.
const SPIN: [u8; 5] = [0x48, 0xff, 0xc0, 0xeb, 0xfb]; // inc rax; jmp -5

#[test]
fn pause_resume_repeatedly_then_stop() {
    let (mut vmm, _) = vm_with_recorder(&SPIN, 1);
    assert!(vmm.pause().is_err(), "pause before start");
    vmm.start().unwrap();
    std::thread::sleep(Duration::from_millis(20));
    let mut times = Vec::new();
    for _ in 0..1000 {
        // Let the vCPU get back into the guest, as between checkpoint epochs.
        std::thread::sleep(Duration::from_micros(500));
        times.push(vmm.pause().expect("pause"));
        vmm.resume().expect("resume");
    }
    times.sort();
    let p50 = times[times.len() / 2];
    let p99 = times[times.len() * 99 / 100];
    let max = times[times.len() - 1];
    println!("pause latency over 1000 pauses (1 vCPU): p50 {p50:?} p99 {p99:?} max {max:?}");
    assert!(p50 < Duration::from_millis(1), "p50 {p50:?}");
    let stopper = vmm.stopper();
    let t = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(20));
        stopper.stop();
    });
    let t0 = Instant::now();
    assert_eq!(wait(&mut vmm), VmExit::Stopped);
    assert!(t0.elapsed() < Duration::from_secs(2));
    t.join().unwrap();
    assert!(vmm.pause().is_err(), "pause after the end");
}

/// Polls `cond` every 2 ms; fails with `what` after 30 s.
fn wait_until(mut cond: impl FnMut() -> bool, what: &str) {
    let t0 = Instant::now();
    while !cond() {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "{what}: not within 30 s"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

#[test]
fn paused_guest_makes_no_progress_and_stop_works_while_paused() {
    // inc rax; mov [rbx], rax (MMIO exit each loop); jmp
    let mut code = MOV_EBX_DEV.to_vec();
    code.extend_from_slice(&[0x48, 0xff, 0xc0, 0x48, 0x89, 0x03, 0xeb, 0xf8]);
    let (mut vmm, rec) = vm_with_recorder(&code, 1);
    vmm.start().unwrap();
    // Conditions, not fixed sleeps: on a loaded machine the vCPU thread may not run for
    // tens of milliseconds.
    let writes = || rec.lock().unwrap().writes.len();
    wait_until(|| writes() > 0, "the guest ran");
    vmm.pause().unwrap();
    let n = writes();
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(writes(), n, "no progress while paused");
    vmm.resume().unwrap();
    wait_until(|| writes() > n, "progress after resume");
    vmm.pause().unwrap();
    vmm.stopper().stop();
    assert_eq!(wait(&mut vmm), VmExit::Stopped);
}

#[test]
fn multiple_vcpus_pause_and_exit() {
    let (mut vmm, _) = vm_with_recorder(&SPIN, 4);
    vmm.start().unwrap();
    let mut worst = Duration::ZERO;
    for _ in 0..200 {
        std::thread::sleep(Duration::from_micros(500));
        worst = worst.max(vmm.pause().unwrap());
        vmm.resume().unwrap();
    }
    println!("pause latency with 4 vCPUs: worst of 200 = {worst:?}");
    vmm.stopper().stop();
    assert_eq!(wait(&mut vmm), VmExit::Stopped);

    // The boot vCPU ending the VM takes the three blocked secondaries down with it.
    let code = [[0xb8, 7, 0, 0, 0].as_slice(), &OUT_EXIT].concat();
    let (mut vmm, _) = vm_with_recorder(&code, 4);
    vmm.start().unwrap();
    assert_eq!(wait(&mut vmm), VmExit::GuestExit { status: 7 });
}

#[test]
fn dropping_a_running_vm_stops_it() {
    let (mut vmm, _) = vm_with_recorder(&SPIN, 2);
    vmm.start().unwrap();
    std::thread::sleep(Duration::from_millis(10));
    drop(vmm);
}

/// CPU time (user + system, in clock ticks) of this process's threads named `name`.
fn thread_cpu_ticks(name: &str) -> Option<u64> {
    for t in std::fs::read_dir("/proc/self/task").ok()? {
        let dir = t.ok()?.path();
        let comm = std::fs::read_to_string(dir.join("comm")).ok()?;
        if comm.trim() != name {
            continue;
        }
        let stat = std::fs::read_to_string(dir.join("stat")).ok()?;
        // Fields after the ")" of the command name; utime and stime are fields 14, 15.
        let rest = &stat[stat.rfind(')')? + 2..];
        let f: Vec<&str> = rest.split_whitespace().collect();
        return Some(f[11].parse::<u64>().ok()? + f[12].parse::<u64>().ok()?);
    }
    None
}

#[test]
fn secondary_vcpus_block_without_burning_cpu() {
    // Test names are unique per test binary, and vCPU thread names repeat across VMs in
    // this process; this test owns the only 3-vCPU VM, so read "vcpu2" right away.
    let (mut vmm, _) = vm_with_recorder(&SPIN, 3);
    vmm.start().unwrap();
    std::thread::sleep(Duration::from_millis(50));
    let before = thread_cpu_ticks("vcpu2");
    std::thread::sleep(Duration::from_millis(500));
    let after = thread_cpu_ticks("vcpu2");
    vmm.stopper().stop();
    assert_eq!(wait(&mut vmm), VmExit::Stopped);
    let (b, a) = (before.expect("vcpu2 thread"), after.expect("vcpu2 thread"));
    // Ticks are 10 ms: a spinning thread would gain ~50 here.
    assert!(a - b <= 2, "vcpu2 used {} ticks in 500 ms", a - b);
}

#[test]
fn dirty_logging_can_be_switched_on_for_a_running_vm() {
    use vmm::vstate::memory::SlotFlags;
    // Write rax to 8 MiB + 0x123 * 4 KiB, exit via MMIO to the recorder, spin.
    let mut code = vec![0x48, 0xb8, 0, 0x30, 0x92, 0, 0, 0, 0, 0]; // mov rax, 0x923000
    code.extend_from_slice(&[0x48, 0x89, 0x00]); // mov [rax], rax
    code.extend_from_slice(&MOV_EBX_DEV);
    code.extend_from_slice(&[0x89, 0x03]); // mov [rbx], eax
    code.extend_from_slice(&[0xeb, 0xfe]); // jmp $
    let (mut vmm, rec) = vm_with_recorder(&code, 1);
    vmm.set_slot_flags(SlotFlags { dirty_log: true }).unwrap();
    assert!(vmm.vm().slot_flags().dirty_log);
    vmm.start().unwrap();
    let t0 = Instant::now();
    while rec.lock().unwrap().writes.is_empty() {
        assert!(t0.elapsed() < Duration::from_secs(10));
        std::thread::sleep(Duration::from_millis(1));
    }
    vmm.pause().unwrap();
    let bitmap = vmm.vm().fd().get_dirty_log(0, 64 << 20).unwrap();
    let page = 0x923000 / 4096;
    assert_ne!(
        bitmap[page / 64] & (1 << (page % 64)),
        0,
        "page written by the guest"
    );
    vmm.set_slot_flags(SlotFlags::default()).unwrap();
    vmm.resume().unwrap();
    vmm.stopper().stop();
    assert_eq!(wait(&mut vmm), VmExit::Stopped);
}
