//! HW-reduced ACPI tables for a Linux guest, built with the `acpi_tables` crate.
//!
//! RSDP (revision 2) at [`RSDP_ADDR`] in the BIOS area, then DSDT, FADT (revision 6,
//! `HW_REDUCED_ACPI`, `X_DSDT`), MADT (one local APIC per vCPU, APIC id = vCPU index as
//! in CPUID, and the IOAPIC) and XSDT. The DSDT describes COM1 (PNP0501), the i8042
//! (PNP0303) and one `LNRO0005` device per virtio-mmio window: the stock Debian kernel
//! has no virtio-mmio command-line devices, so ACPI is how it finds them.

use acpi_tables::aml;
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::madt::{
    EnabledStatus, IoApic, LocalInterruptController, ProcessorLocalApic, MADT,
};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::Aml;
use vm_memory::{Bytes, GuestAddress};

use super::e820::{BIOS_START, HIMEM_START};
use crate::vstate::memory::GuestMemoryMmap;

pub const OEM_ID: [u8; 6] = *b"TWINRN";
pub const OEM_TABLE_ID: [u8; 8] = *b"TWINRUN ";
pub const OEM_REVISION: u32 = 1;
/// Where the RSDP goes (inside the reserved BIOS area).
pub const RSDP_ADDR: u64 = BIOS_START;
pub const IOAPIC_ADDR: u32 = 0xfec0_0000;
pub const LAPIC_ADDR: u32 = 0xfee0_0000;
/// COM1.
pub const COM1_PORT: u16 = 0x3f8;
pub const COM1_IRQ: u32 = 4;
/// i8042 data and command/status ports, keyboard IRQ.
pub const I8042_DATA_PORT: u16 = 0x60;
pub const I8042_CMD_PORT: u16 = 0x64;
pub const I8042_IRQ: u32 = 1;
/// IAPC_BOOT_ARCH: "8042 present" (bit 1); bit 2 "VGA not present".
const IAPC_8042: u16 = 1 << 1;
const IAPC_NO_VGA: u16 = 1 << 2;

/// One virtio-mmio window as the guest sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VirtioWindow {
    pub base: u64,
    pub len: u64,
    pub gsi: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    #[error("virtio-mmio window {0:#x} is above 4 GiB; the DSDT describes 32-bit windows")]
    WindowAbove4G(u64),
    #[error("{0} vCPUs do not fit 8-bit APIC ids")]
    TooManyVcpus(usize),
    #[error("ACPI tables ({0:#x} bytes) overflow the BIOS area")]
    TooLarge(u64),
    #[error("writing ACPI tables: {0}")]
    Write(#[from] vm_memory::GuestMemoryError),
}

/// One table, its bytes and where it goes in guest memory.
#[derive(Clone, Debug)]
pub struct Table {
    pub signature: [u8; 4],
    pub addr: u64,
    pub bytes: Vec<u8>,
}

/// Every table, in placement order (RSDP first).
#[derive(Clone, Debug)]
pub struct AcpiTables {
    pub tables: Vec<Table>,
}

fn bytes_of(t: &dyn Aml) -> Vec<u8> {
    let mut v = Vec::new();
    t.to_aml_bytes(&mut v);
    v
}

/// The DSDT body (AML, no header).
fn dsdt_aml(windows: &[VirtioWindow]) -> Result<Vec<u8>, AcpiError> {
    let mut body = Vec::new();

    // Each device is built and serialized in one statement: the AML builders borrow
    // their children, which live as temporaries until the statement ends.
    aml::Device::new(
        "_SB_.COM1".into(),
        vec![
            &aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0501")),
            &aml::Name::new("_UID".into(), &aml::ZERO),
            &aml::Name::new("_DDN".into(), &"COM1"),
            &aml::Name::new(
                "_CRS".into(),
                &aml::ResourceTemplate::new(vec![
                    &aml::IO::new(COM1_PORT, COM1_PORT, 1, 8),
                    &aml::Interrupt::new(true, true, false, false, COM1_IRQ),
                ]),
            ),
        ],
    )
    .to_aml_bytes(&mut body);

    aml::Device::new(
        "_SB_.PS2_".into(),
        vec![
            &aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0303")),
            &aml::Method::new("_STA".into(), 0, false, vec![&aml::Return::new(&0x0fu8)]),
            &aml::Name::new(
                "_CRS".into(),
                &aml::ResourceTemplate::new(vec![
                    &aml::IO::new(I8042_DATA_PORT, I8042_DATA_PORT, 1, 1),
                    &aml::IO::new(I8042_CMD_PORT, I8042_CMD_PORT, 1, 1),
                    &aml::Interrupt::new(true, true, false, false, I8042_IRQ),
                ]),
            ),
        ],
    )
    .to_aml_bytes(&mut body);

    for (i, w) in windows.iter().enumerate() {
        let base = u32::try_from(w.base).map_err(|_| AcpiError::WindowAbove4G(w.base))?;
        let len = u32::try_from(w.len).map_err(|_| AcpiError::WindowAbove4G(w.base))?;
        let uid = i as u32;
        let name = format!("_SB_.V{i:03X}");
        aml::Device::new(
            name.as_str().into(),
            vec![
                &aml::Name::new("_HID".into(), &"LNRO0005"),
                &aml::Name::new("_UID".into(), &uid),
                // Cache-coherent DMA.
                &aml::Name::new("_CCA".into(), &aml::ONE),
                &aml::Name::new(
                    "_CRS".into(),
                    &aml::ResourceTemplate::new(vec![
                        &aml::Memory32Fixed::new(true, base, len),
                        // Edge-triggered, active high, exclusive: the VMM pulses an irqfd.
                        &aml::Interrupt::new(true, true, false, false, w.gsi),
                    ]),
                ),
            ],
        )
        .to_aml_bytes(&mut body);
    }
    Ok(body)
}

impl AcpiTables {
    /// Builds the tables for `vcpus` vCPUs and the given virtio-mmio windows, laid out
    /// from [`RSDP_ADDR`].
    pub fn build(vcpus: usize, windows: &[VirtioWindow]) -> Result<AcpiTables, AcpiError> {
        if vcpus > 255 {
            return Err(AcpiError::TooManyVcpus(vcpus));
        }
        let align = |a: u64| a.div_ceil(16) * 16;
        let rsdp_len = Rsdp::len() as u64;

        let mut dsdt = Sdt::new(*b"DSDT", 36, 6, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
        dsdt.append_slice(&dsdt_aml(windows)?);
        let dsdt_bytes = dsdt.as_slice().to_vec();
        let dsdt_addr = align(RSDP_ADDR + rsdp_len);

        let fadt_addr = align(dsdt_addr + dsdt_bytes.len() as u64);
        let mut fb = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION)
            .flag(Flags::HwReducedAcpi)
            .flag(Flags::PwrButton)
            .flag(Flags::SlpButton)
            .dsdt_64(dsdt_addr);
        fb.iapc_boot_arch = (IAPC_8042 | IAPC_NO_VGA).into();
        let fadt_bytes = bytes_of(&fb.finalize());

        let madt_addr = align(fadt_addr + fadt_bytes.len() as u64);
        let mut madt = MADT::new(
            OEM_ID,
            OEM_TABLE_ID,
            OEM_REVISION,
            LocalInterruptController::Address(LAPIC_ADDR),
        );
        for i in 0..vcpus {
            // APIC id = vCPU index, as CPUID leaves 0x1/0xB/0x1F report (vstate::cpuid).
            madt.add_structure(ProcessorLocalApic::new(
                i as u8,
                i as u8,
                EnabledStatus::Enabled,
            ));
        }
        // The IOAPIC's id follows the vCPUs' APIC ids so the two never collide.
        madt.add_structure(IoApic::new(vcpus as u8, IOAPIC_ADDR, 0));
        let madt_bytes = bytes_of(&madt);

        let xsdt_addr = align(madt_addr + madt_bytes.len() as u64);
        let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
        xsdt.add_entry(fadt_addr);
        xsdt.add_entry(madt_addr);
        let xsdt_bytes = bytes_of(&xsdt);
        let end = xsdt_addr + xsdt_bytes.len() as u64;
        if end > HIMEM_START {
            return Err(AcpiError::TooLarge(end - RSDP_ADDR));
        }
        let rsdp_bytes = bytes_of(&Rsdp::new(OEM_ID, xsdt_addr));

        let t = |signature: &[u8; 4], addr, bytes| Table {
            signature: *signature,
            addr,
            bytes,
        };
        Ok(AcpiTables {
            tables: vec![
                t(b"RSDP", RSDP_ADDR, rsdp_bytes),
                t(b"DSDT", dsdt_addr, dsdt_bytes),
                t(b"FACP", fadt_addr, fadt_bytes),
                t(b"APIC", madt_addr, madt_bytes),
                t(b"XSDT", xsdt_addr, xsdt_bytes),
            ],
        })
    }

    /// Copies every table to its address.
    pub fn write(&self, mem: &GuestMemoryMmap) -> Result<(), AcpiError> {
        for t in &self.tables {
            mem.write_slice(&t.bytes, GuestAddress(t.addr))?;
        }
        Ok(())
    }

    pub fn get(&self, signature: &[u8; 4]) -> Option<&Table> {
        self.tables.iter().find(|t| &t.signature == signature)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, &x| a.wrapping_add(x))
    }

    #[test]
    fn tables_are_consistent() {
        let windows: Vec<_> = (0..3)
            .map(|i| VirtioWindow {
                base: 0xd000_0000 + i * 0x1000,
                len: 0x1000,
                gsi: 5 + i as u32,
            })
            .collect();
        let t = AcpiTables::build(4, &windows).unwrap();
        for table in &t.tables {
            if &table.signature == b"RSDP" {
                assert_eq!(sum(&table.bytes[..20]), 0);
                assert_eq!(sum(&table.bytes), 0);
                assert_eq!(&table.bytes[9..15], b"TWINRN");
            } else {
                assert_eq!(sum(&table.bytes), 0, "{:?}", table.signature);
                assert_eq!(&table.bytes[..4], &table.signature);
                let len = u32::from_le_bytes(table.bytes[4..8].try_into().unwrap());
                assert_eq!(len as usize, table.bytes.len());
                assert_eq!(&table.bytes[10..16], b"TWINRN");
            }
        }
        let rsdp = t.get(b"RSDP").unwrap();
        let xsdt_addr = u64::from_le_bytes(rsdp.bytes[24..32].try_into().unwrap());
        assert_eq!(xsdt_addr, t.get(b"XSDT").unwrap().addr);
        // FADT: HW_REDUCED flag and X_DSDT.
        let fadt = &t.get(b"FACP").unwrap().bytes;
        let flags = u32::from_le_bytes(fadt[112..116].try_into().unwrap());
        assert_ne!(flags & (1 << 20), 0);
        let x_dsdt = u64::from_le_bytes(fadt[140..148].try_into().unwrap());
        assert_eq!(x_dsdt, t.get(b"DSDT").unwrap().addr);
        assert_eq!(fadt[8], 6);
        // MADT: header (44 bytes) + 4 local APICs (8) + IOAPIC (12).
        assert_eq!(t.get(b"APIC").unwrap().bytes.len(), 44 + 4 * 8 + 12);
        let dsdt = &t.get(b"DSDT").unwrap().bytes;
        let n = dsdt.windows(8).filter(|w| w == b"LNRO0005").count();
        assert_eq!(n, 3);
    }
}
