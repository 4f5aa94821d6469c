//! The generated ACPI tables, checked by an independent tool: ACPICA's `iasl`
//! disassembles each one (installing Debian's acpica-tools when it is missing), and the
//! DSDT text must describe COM1, the i8042 and every virtio-mmio window.

use std::path::PathBuf;
use std::process::Command;

use vmm::boot::linux::acpi::{AcpiTables, VirtioWindow};

fn iasl() -> PathBuf {
    let found = |p: &str| std::path::Path::new(p).exists().then(|| PathBuf::from(p));
    if let Some(p) = found("/usr/bin/iasl") {
        return p;
    }
    let st = Command::new("apt-get")
        .args([
            "install",
            "-y",
            "-q",
            "--no-install-recommends",
            "acpica-tools",
        ])
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status()
        .expect("running apt-get to install acpica-tools");
    assert!(st.success(), "apt-get install acpica-tools failed");
    found("/usr/bin/iasl").expect("acpica-tools installed no /usr/bin/iasl")
}

struct TempDir(PathBuf);
impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn tables_disassemble_cleanly_with_iasl() {
    let iasl = iasl();
    let dir = TempDir(std::env::temp_dir().join(format!("twinrun-acpi-{}", std::process::id())));
    let _ = std::fs::remove_dir_all(&dir.0);
    std::fs::create_dir_all(&dir.0).unwrap();
    let windows: Vec<VirtioWindow> = (0..4u64)
        .map(|i| VirtioWindow {
            base: 0xd000_0000 + i * 0x1000,
            len: 0x1000,
            gsi: 5 + i as u32,
        })
        .collect();
    let tables = AcpiTables::build(3, &windows).unwrap();
    let mut dsdt_text = String::new();
    for t in &tables.tables {
        let bytes = &t.bytes;
        // Checksums: the whole table sums to 0 (the RSDP's first 20 bytes too).
        let sum = |b: &[u8]| b.iter().fold(0u8, |a, &x| a.wrapping_add(x));
        assert_eq!(
            sum(bytes),
            0,
            "{} checksum",
            String::from_utf8_lossy(&t.signature)
        );
        if &t.signature == b"RSDP" {
            assert_eq!(sum(&bytes[..20]), 0, "RSDP v1 checksum");
            continue; // iasl -d takes SDTs (with the common header); the RSDP has none.
        }
        let name = String::from_utf8_lossy(&t.signature).to_lowercase();
        let bin = dir.0.join(format!("{name}.dat"));
        std::fs::write(&bin, bytes).unwrap();
        let out = Command::new(&iasl)
            .arg("-d")
            .arg(&bin)
            .current_dir(&dir.0)
            .output()
            .unwrap();
        let log = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "iasl -d {name}: {log}");
        // iasl reports checksum and parse problems as warnings/errors in its output.
        for bad in ["Error", "Warning", "Invalid", "Incorrect checksum"] {
            assert!(
                !log.contains(bad),
                "iasl -d {name} reported {bad:?}:\n{log}"
            );
        }
        let dsl = std::fs::read_to_string(dir.0.join(format!("{name}.dsl"))).unwrap();
        assert!(dsl.contains("\"TWINRN\""), "{dsl}");
        if name == "dsdt" {
            dsdt_text = dsl.clone();
        }
        if name == "facp" {
            assert!(dsl.contains("Hardware Reduced (V5) : 1"), "{dsl}");
        }
        if name == "apic" {
            assert_eq!(dsl.matches("Processor Local APIC").count(), 3, "{dsl}");
            assert!(dsl.contains("Address : FEC00000"), "{dsl}");
        }
    }
    assert_eq!(
        dsdt_text.matches("\"LNRO0005\"").count(),
        windows.len(),
        "{dsdt_text}"
    );
    for w in &windows {
        let base = format!("0x{:08X}", w.base);
        assert!(
            dsdt_text.contains(&base),
            "window {base} missing:\n{dsdt_text}"
        );
    }
    assert!(dsdt_text.contains("PNP0501"), "{dsdt_text}");
    assert!(dsdt_text.contains("PNP0303"), "{dsdt_text}");
    assert!(dsdt_text.contains("0x03F8"), "{dsdt_text}");
}
