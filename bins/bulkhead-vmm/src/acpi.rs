//! ACPI tables: RSDP, XSDT, FADT (hardware-reduced), MADT and a DSDT describing every
//! virtio-mmio device (HID `LNRO0005`), so a stock distro kernel finds them without
//! command-line hints.

use acpi_tables::aml::{Device, Interrupt, Memory32Fixed, Name, Package, Path, ResourceTemplate};
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{
    EnabledStatus, IoApic, LocalInterruptController, ProcessorLocalApic, MADT,
};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::Aml;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::layout::*;

const OEM_ID: [u8; 6] = *b"BLKHD ";

/// One virtio-mmio window and its interrupt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MmioDesc {
    pub base: u64,
    pub gsi: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    #[error("ACPI tables need {0} bytes; only {1} fit below 1 MiB")]
    TooBig(usize, u64),
    #[error("cannot write ACPI tables: {0}")]
    Write(String),
}

fn bytes(t: &dyn Aml) -> Vec<u8> {
    let mut v = Vec::new();
    t.to_aml_bytes(&mut v);
    v
}

fn fix_checksum(table: &mut [u8]) {
    table[9] = 0;
    let sum = table.iter().fold(0u8, |a, b| a.wrapping_add(*b));
    table[9] = 0u8.wrapping_sub(sum);
}

pub fn dsdt(devices: &[MmioDesc]) -> Vec<u8> {
    let mut dsdt = Sdt::new(*b"DSDT", 36, 6, OEM_ID, *b"BHDSDT  ", 1);
    // \_S5: sleep type 5 is what the FADT sleep control register treats as power off.
    Name::new(Path::new("_S5_"), &Package::new(vec![&5u8])).to_aml_bytes(&mut dsdt);
    for (i, d) in devices.iter().enumerate() {
        let hid = Name::new(Path::new("_HID"), &"LNRO0005");
        let uid = Name::new(Path::new("_UID"), &(i as u32));
        let mem = Memory32Fixed::new(true, d.base as u32, VIRTIO_MMIO_SIZE as u32);
        let irq = Interrupt::new(true, true, false, false, d.gsi);
        let res = ResourceTemplate::new(vec![&mem, &irq]);
        let crs = Name::new(Path::new("_CRS"), &res);
        let path = format!("_SB_.V{i:03X}");
        Device::new(Path::new(&path), vec![&hid, &uid, &crs]).to_aml_bytes(&mut dsdt);
    }
    dsdt.update_checksum();
    dsdt.as_slice().to_vec()
}

fn fadt(dsdt_addr: u64) -> Vec<u8> {
    let io = |port: u16| {
        GAS::new(
            AddressSpace::SystemIo,
            8,
            0,
            AccessSize::ByteAccess,
            port.into(),
        )
    };
    let mut f = FADTBuilder::new(OEM_ID, *b"BHFADT  ", 1)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton)
        .flag(Flags::ResetRegSup)
        .dsdt_64(dsdt_addr);
    f.sleep_control_reg = io(ACPI_SLEEP_CTL_PORT);
    f.sleep_status_reg = io(ACPI_SLEEP_STS_PORT);
    f.reset_reg = io(ACPI_RESET_PORT);
    f.reset_value = ACPI_RESET_VALUE;
    // IA-PC boot architecture: no VGA (bit 2), no MSI (bit 3), no CMOS RTC (bit 5).
    f.iapc_boot_arch = ((1u16 << 2) | (1 << 3) | (1 << 5)).into();
    f.hypervisor_vendor_identity = u64::from_le_bytes(*b"BULKHEAD").into();
    bytes(&f.finalize())
}

fn madt(cpus: u8) -> Vec<u8> {
    let mut m = MADT::new(
        OEM_ID,
        *b"BHMADT  ",
        1,
        LocalInterruptController::Address(LAPIC_ADDR as u32),
    );
    for id in 0..cpus {
        m.add_structure(ProcessorLocalApic::new(id, id, EnabledStatus::Enabled));
    }
    m.add_structure(IoApic::new(0, IOAPIC_ADDR as u32, 0));
    let mut b = bytes(&m);
    // Flags at offset 40: PCAT_COMPAT, the dual 8259s KVM's irqchip provides.
    b[40..44].copy_from_slice(&1u32.to_le_bytes());
    fix_checksum(&mut b);
    b
}

/// Write all tables below 1 MiB and return the RSDP's address.
pub fn write_tables(
    mem: &GuestMemoryMmap,
    cpus: u8,
    devices: &[MmioDesc],
) -> Result<u64, AcpiError> {
    let align = |a: u64| (a + 15) & !15;
    let rsdp_addr = ACPI_START;
    let xsdt_addr = align(rsdp_addr + 36);
    let dsdt_bytes = dsdt(devices);
    let madt_bytes = madt(cpus);
    // The FADT length is fixed; compute the layout before building it.
    let fadt_addr = align(xsdt_addr + 36 + 8 * 2);
    let fadt_len = bytes(&FADTBuilder::new(OEM_ID, *b"BHFADT  ", 1).finalize()).len() as u64;
    let madt_addr = align(fadt_addr + fadt_len);
    let dsdt_addr = align(madt_addr + madt_bytes.len() as u64);
    let end = dsdt_addr + dsdt_bytes.len() as u64;
    if end > ACPI_END {
        return Err(AcpiError::TooBig(
            (end - ACPI_START) as usize,
            ACPI_END - ACPI_START,
        ));
    }
    let fadt_bytes = fadt(dsdt_addr);
    let mut xsdt = XSDT::new(OEM_ID, *b"BHXSDT  ", 1);
    xsdt.add_entry(fadt_addr);
    xsdt.add_entry(madt_addr);
    let rsdp = Rsdp::new(OEM_ID, xsdt_addr);
    let w = |addr: u64, b: &[u8]| {
        mem.write_slice(b, GuestAddress(addr))
            .map_err(|e| AcpiError::Write(e.to_string()))
    };
    w(rsdp_addr, &bytes(&rsdp))?;
    w(xsdt_addr, &bytes(&xsdt))?;
    w(fadt_addr, &fadt_bytes)?;
    w(madt_addr, &madt_bytes)?;
    w(dsdt_addr, &dsdt_bytes)?;
    Ok(rsdp_addr)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    fn read(mem: &GuestMemoryMmap, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
        v
    }

    #[test]
    fn tables_chain_and_checksum() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 2 << 20)]).unwrap();
        let devs = [
            MmioDesc {
                base: VIRTIO_MMIO_START,
                gsi: 5,
            },
            MmioDesc {
                base: VIRTIO_MMIO_START + 0x1000,
                gsi: 6,
            },
        ];
        let rsdp = write_tables(&mem, 2, &devs).unwrap();
        let r = read(&mem, rsdp, 36);
        assert_eq!(&r[..8], b"RSD PTR ");
        assert_eq!(sum(&r[..20]), 0);
        assert_eq!(sum(&r), 0);
        let xsdt_addr = u64::from_le_bytes(r[24..32].try_into().unwrap());
        let xlen = u32::from_le_bytes(read(&mem, xsdt_addr + 4, 4).try_into().unwrap()) as usize;
        let x = read(&mem, xsdt_addr, xlen);
        assert_eq!(&x[..4], b"XSDT");
        assert_eq!(sum(&x), 0);
        let mut sigs = vec![];
        for i in 0..(xlen - 36) / 8 {
            let a = u64::from_le_bytes(x[36 + 8 * i..44 + 8 * i].try_into().unwrap());
            let len = u32::from_le_bytes(read(&mem, a + 4, 4).try_into().unwrap()) as usize;
            let t = read(&mem, a, len);
            assert_eq!(sum(&t), 0, "checksum of {:?}", &t[..4]);
            sigs.push(t[..4].to_vec());
            if &t[..4] == b"FACP" {
                // X_DSDT at offset 140.
                let d = u64::from_le_bytes(t[140..148].try_into().unwrap());
                let dlen = u32::from_le_bytes(read(&mem, d + 4, 4).try_into().unwrap()) as usize;
                let dsdt = read(&mem, d, dlen);
                assert_eq!(&dsdt[..4], b"DSDT");
                assert_eq!(sum(&dsdt), 0);
                // Flags: hardware reduced.
                let flags = u32::from_le_bytes(t[112..116].try_into().unwrap());
                assert_ne!(flags & (1 << 20), 0);
            }
            if &t[..4] == b"APIC" {
                // Two local APIC entries (type 0) and one IOAPIC (type 1).
                let mut off = 44;
                let mut types = vec![];
                while off < t.len() {
                    types.push(t[off]);
                    off += t[off + 1] as usize;
                }
                assert_eq!(types, vec![0, 0, 1]);
            }
        }
        assert_eq!(sigs, vec![b"FACP".to_vec(), b"APIC".to_vec()]);
    }

    #[test]
    fn dsdt_names_each_device_with_its_window_and_irq() {
        let devs: Vec<MmioDesc> = (0..3)
            .map(|i| MmioDesc {
                base: VIRTIO_MMIO_START + i * 0x1000,
                gsi: 5 + i as u32,
            })
            .collect();
        let d = dsdt(&devs);
        let count = d.windows(8).filter(|w| w == b"LNRO0005").count();
        assert_eq!(count, 3);
        // Memory32Fixed descriptor (0x86) carrying the second device's base.
        let base2 = ((VIRTIO_MMIO_START + 0x1000) as u32).to_le_bytes();
        assert!(d.windows(4).any(|w| w == base2));
        assert!(d.windows(4).any(|w| w == b"_S5_"));
    }
}
