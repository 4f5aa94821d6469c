//! Figure 2: the round trip of one guest MMIO / port I/O exit through the VMM.
//!
//! A hand-assembled CPL3 loop (`vmm::boot::Image::Flat`) does N writes to a device on
//! the MMIO bus (or N `out`s to one on the port I/O bus), then ends the VM through the
//! exit port. The device timestamps its first and last write, so VM start and
//! teardown are not counted: per-exit time = (last - first) / (N - 1).

use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use twinrun_guest_abi as abi;
use vmm::boot::Image;
use vmm::builder::build_vm_with_image;
use vmm::config::{ConsoleConfig, Payload, VmConfig, Workloads};
use vmm::devices::bus::BusDevice;
use vmm::VmExit;

use crate::report::{median_p90, Better, Figure};
use twinrun_lab::process::output_timeout;

const DEV_MMIO: u64 = abi::MMIO_BASE + 0x6000;
const DEV_PORT: u16 = 0x510;

/// Counts writes and remembers when the first and the last arrived.
#[derive(Default)]
struct Stamp {
    count: u64,
    first: Option<Instant>,
    last: Option<Instant>,
}

impl BusDevice for Stamp {
    fn read(&mut self, _base: u64, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn write(&mut self, _base: u64, _offset: u64, _data: &[u8]) {
        let now = Instant::now();
        self.first.get_or_insert(now);
        self.last = Some(now);
        self.count += 1;
    }
}

/// `mov ecx, n; <setup>; loop: <access>; dec ecx; jnz loop; xor eax, eax;
/// out 0xf4, eax; jmp $`.
fn code(n: u32, mmio: bool) -> Vec<u8> {
    let mut c = vec![0xb9];
    c.extend_from_slice(&n.to_le_bytes()); // mov ecx, n
    let access: &[u8] = if mmio {
        c.push(0xbb); // mov ebx, imm32 (the window is below 4 GiB)
        c.extend_from_slice(&(DEV_MMIO as u32).to_le_bytes());
        &[0x89, 0x03] // mov [rbx], eax
    } else {
        c.push(0xba); // mov edx, imm32
        c.extend_from_slice(&u32::from(DEV_PORT).to_le_bytes());
        &[0xef] // out dx, eax
    };
    c.extend_from_slice(access);
    c.extend_from_slice(&[0xff, 0xc9]); // dec ecx
    let back = -((access.len() + 4) as i8);
    c.extend_from_slice(&[0x75, back as u8]); // jnz loop
    c.extend_from_slice(&[0x31, 0xc0, 0xe7, 0xf4, 0xeb, 0xfe]);
    c
}

fn config() -> VmConfig {
    VmConfig {
        mem_mib: 64,
        vcpus: 1,
        payload: Payload::TestGuest {
            elf: "/unused".into(),
            workloads: Workloads::default(),
        },
        disks: vec![],
        nets: vec![],
        // Nothing is written to the console (the flat guest never touches it).
        console: ConsoleConfig::Stdout,
    }
}

/// Seconds per exit over one run of `n` exits.
fn once(n: u32, mmio: bool) -> Result<f64, String> {
    let mut vm = build_vm_with_image(&config(), Image::Flat(&code(n, mmio)))
        .map_err(|e| format!("build: {e}"))?;
    let dev = Arc::new(Mutex::new(Stamp::default()));
    if mmio {
        vm.insert_mmio_device(dev.clone(), DEV_MMIO, 0x1000)
    } else {
        vm.insert_pio_device(dev.clone(), DEV_PORT, 4)
    }
    .map_err(|e| format!("insert device: {e}"))?;
    vm.start().map_err(|e| format!("start: {e}"))?;
    match vm.wait_timeout(Duration::from_secs(60)) {
        Some(VmExit::GuestExit { status: 0 }) => {}
        Some(other) => return Err(format!("exit loop VM ended with {other}")),
        None => return Err("exit loop VM did not finish within 60 s".into()),
    }
    let d = dev.lock().map_err(|_| "device lock poisoned")?;
    if d.count != u64::from(n) {
        return Err(format!("device saw {} writes, expected {n}", d.count));
    }
    match (d.first, d.last) {
        (Some(a), Some(b)) if n > 1 => Ok((b - a).as_secs_f64() / f64::from(n - 1)),
        _ => Err("too few writes to time".into()),
    }
}

/// The CPL3 MMIO round trip (us) measured by the project's raw KVM probe
/// (`/work/shared/probes/kvm-probe.c`, a minimal C VMM), compiled and run here, as a
/// same-run baseline of what the KVM on this machine costs without twinrun.
pub fn raw_kvm_probe(src: &Path, dir: &Path) -> Result<f64, String> {
    let bin = dir.join("kvm-probe");
    let mut cc = Command::new("gcc");
    cc.args(["-O2", "-o"]).arg(&bin).arg(src);
    let out = output_timeout(&mut cc, Duration::from_secs(60)).map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(format!(
            "gcc {}: {}",
            src.display(),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let out = output_timeout(&mut Command::new(&bin), Duration::from_secs(120))
        .map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    parse_probe(&text).ok_or_else(|| format!("no CPL3 MMIO line in kvm-probe output:\n{text}"))
}

/// `MMIO exit round trip: 84.2 us` in the `CPL3:` section.
fn parse_probe(text: &str) -> Option<f64> {
    let cpl3 = text.split("CPL3:").nth(1)?;
    let cpl3 = cpl3.split("CPL0:").next()?;
    let rest = cpl3.split("MMIO exit round trip:").nth(1)?;
    rest.split_whitespace().next()?.parse().ok()
}

pub fn run(n: u32, reps: usize, raw_us: Option<f64>) -> Result<Vec<Figure>, String> {
    let mut figs = Vec::new();
    for (mmio, label) in [(true, "MMIO write"), (false, "port I/O out")] {
        let mut per = Vec::new();
        for _ in 0..reps {
            per.push(once(n, mmio)?);
        }
        let (med, p90) = median_p90(&per);
        let note = format!(
            "{n} exits per run, median of {reps} runs (p90 over runs {:.2} us)",
            p90 * 1e6
        );
        let mut f = Figure::new(
            "exits",
            &format!("{label} round trip"),
            med * 1e6,
            "us",
            Better::Lower,
        )
        .note(note);
        if let Some(raw) = raw_us {
            f = f.baseline("raw KVM, kvm-probe.c, CPL3 MMIO", raw);
        }
        figs.push(f);
        figs.push(Figure::new(
            "exits",
            &format!("{label} exits/s"),
            1.0 / med,
            "/s",
            Better::Higher,
        ));
    }
    Ok(figs)
}

#[cfg(test)]
mod tests {
    #[test]
    fn probe_output() {
        let t = "CPL3:\n  spin: 0.8 ms\n  MMIO exit round trip: 84.2 us\nCPL0:\n  MMIO exit round trip: 10.8 us\n";
        assert_eq!(super::parse_probe(t), Some(84.2));
        assert_eq!(
            super::parse_probe("CPL0:\n  MMIO exit round trip: 1 us"),
            None
        );
    }

    #[test]
    fn loop_encoding_jumps_back_to_the_access() {
        for mmio in [true, false] {
            let c = super::code(3, mmio);
            let jnz = c.iter().position(|&b| b == 0x75).unwrap();
            let target = jnz as i64 + 2 + i64::from(c[jnz + 1] as i8);
            // The access follows the two `mov`s (5 bytes each).
            assert_eq!(target, 10, "mmio={mmio}");
        }
    }
}
