//! Guest physical address map for x86_64 guests.
//!
//! ```text
//! 0x0000_0500  GDT (4 entries)             0x0009_fc00  top of usable low RAM
//! 0x0000_6000  PVH start_info + modlist    0x000e_0000  ACPI tables (RSDP first)
//! 0x0000_7000  boot_params (zero page)     0x0010_0000  kernel (bzImage) / highmem
//! 0x0000_8000  PVH memory map              0xd000_0000  virtio-mmio windows (4 KiB each)
//! 0x0000_8ff0  boot stack top              0xfec0_0000  IOAPIC
//! 0x0000_9000  PML4, PDPT, 4 x PD          0xfee0_0000  LAPIC
//! 0x0002_0000  kernel command line         0x1_0000_0000 RAM above the 3 GiB hole
//! ```

pub const GDT_START: u64 = 0x500;
pub const PVH_INFO_START: u64 = 0x6000;
pub const ZERO_PAGE_START: u64 = 0x7000;
pub const PVH_MEMMAP_START: u64 = 0x8000;
pub const BOOT_STACK_TOP: u64 = 0x8ff0;
pub const PML4_START: u64 = 0x9000;
pub const PDPT_START: u64 = 0xa000;
pub const PD_START: u64 = 0xb000;
pub const CMDLINE_START: u64 = 0x20000;
/// Linux on x86 accepts at most 2048 bytes of command line.
pub const CMDLINE_MAX: usize = 2048;
pub const EBDA_START: u64 = 0x9fc00;
pub const ACPI_START: u64 = 0xe0000;
pub const ACPI_END: u64 = 0x100000;
pub const HIMEM_START: u64 = 0x100000;

/// Start of the hole below 4 GiB that holds device MMIO and the interrupt controllers.
pub const MMIO_HOLE_START: u64 = 0xc000_0000;
pub const MMIO_HOLE_END: u64 = 0x1_0000_0000;
pub const VIRTIO_MMIO_START: u64 = 0xd000_0000;
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
pub const IOAPIC_ADDR: u64 = 0xfec0_0000;
pub const LAPIC_ADDR: u64 = 0xfee0_0000;
pub const KVM_TSS_ADDR: u64 = 0xfffb_d000;
pub const KVM_IDENTITY_MAP_ADDR: u64 = 0xfffb_c000;

/// Legacy I/O ports.
pub const COM1_PORT: u16 = 0x3f8;
pub const COM1_IRQ: u32 = 4;
pub const I8042_PORT: u16 = 0x60;
/// ACPI hardware-reduced sleep control / status and reset registers (one byte each).
pub const ACPI_SLEEP_CTL_PORT: u16 = 0x3c0;
pub const ACPI_SLEEP_STS_PORT: u16 = 0x3c1;
pub const ACPI_RESET_PORT: u16 = 0x3c2;
pub const ACPI_RESET_VALUE: u8 = 0x0f;
pub use bulkhead_protocol::BOOT_TIMER_PORT;

/// First GSI handed to virtio devices; the IOAPIC has 24 pins.
pub const VIRTIO_IRQ_BASE: u32 = 5;
pub const IOAPIC_PINS: u32 = 24;
/// Most virtio-mmio devices one VM can carry (GSIs 5..=23).
pub const MAX_VIRTIO_DEVICES: usize = (IOAPIC_PINS - VIRTIO_IRQ_BASE) as usize;

/// Most vCPUs: APIC ids live in one byte in the MADT's local APIC entries.
pub const MAX_VCPUS: u8 = 254;
/// Smallest guest the layout above fits in, and a sanity ceiling.
pub const MIN_MEMORY_MIB: u64 = 32;
pub const MAX_MEMORY_MIB: u64 = 1 << 20;

/// RAM ranges for a guest of `mem_size` bytes, split around the MMIO hole.
pub fn ram_ranges(mem_size: u64) -> Vec<(u64, u64)> {
    if mem_size <= MMIO_HOLE_START {
        vec![(0, mem_size)]
    } else {
        vec![
            (0, MMIO_HOLE_START),
            (MMIO_HOLE_END, mem_size - MMIO_HOLE_START),
        ]
    }
}

/// Where the virtio-mem region starts: a 1 GiB boundary, a multiple of any memory block
/// size Linux picks for a guest this small (128 MiB up to 64 GiB of boot RAM).
pub const HOTPLUG_ALIGN: u64 = 1 << 30;

/// The hot-plug region for `hotplug_size` bytes, at the first [`HOTPLUG_ALIGN`] boundary
/// at or above 4 GiB that lies past boot RAM; `None` when there is none.
pub fn hotplug_range(mem_size: u64, hotplug_size: u64) -> Option<(u64, u64)> {
    if hotplug_size == 0 {
        return None;
    }
    let ram_end = ram_ranges(mem_size)
        .last()
        .map(|(start, size)| start + size)
        .unwrap_or(0);
    let start = ram_end.max(MMIO_HOLE_END).next_multiple_of(HOTPLUG_ALIGN);
    Some((start, hotplug_size))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ram_splits_around_the_hole() {
        assert_eq!(ram_ranges(128 << 20), vec![(0, 128 << 20)]);
        assert_eq!(
            ram_ranges(4 << 30),
            vec![
                (0, MMIO_HOLE_START),
                (MMIO_HOLE_END, (4 << 30) - MMIO_HOLE_START)
            ]
        );
        let total: u64 = ram_ranges(5 << 30).iter().map(|r| r.1).sum();
        assert_eq!(total, 5 << 30);
    }

    #[test]
    fn hotplug_region_lies_past_ram_and_the_hole_on_a_gib_boundary() {
        assert_eq!(hotplug_range(128 << 20, 0), None);
        assert_eq!(hotplug_range(128 << 20, 1 << 30), Some((4 << 30, 1 << 30)));
        assert_eq!(
            hotplug_range(3 << 30, 128 << 20),
            Some((4 << 30, 128 << 20))
        );
        // 5 GiB of boot RAM ends at 6 GiB (1 GiB of it above the hole).
        assert_eq!(hotplug_range(5 << 30, 1 << 30), Some((6 << 30, 1 << 30)));
        assert_eq!(
            hotplug_range((5 << 30) + (128 << 20), 1 << 30),
            Some((7 << 30, 1 << 30))
        );
    }

    #[test]
    fn fixed_areas_do_not_overlap() {
        let areas = [
            (GDT_START, 32),
            (PVH_INFO_START, 0x1000),
            (ZERO_PAGE_START, 0x1000),
            (PVH_MEMMAP_START, 0xff0),
            (PML4_START, 0x6000),
            (CMDLINE_START, CMDLINE_MAX as u64),
        ];
        for (i, a) in areas.iter().enumerate() {
            for b in &areas[i + 1..] {
                assert!(
                    a.0 + a.1 <= b.0 || b.0 + b.1 <= a.0,
                    "{a:x?} overlaps {b:x?}"
                );
            }
        }
        assert!(CMDLINE_START + CMDLINE_MAX as u64 <= EBDA_START);
    }
}
