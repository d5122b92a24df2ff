//! Loading the guest: an ELF kernel at its physical addresses (`linux-loader`), the PVH
//! start-info block with the command line and the memory map, and the page tables and GDT a
//! guest entered directly in 64-bit mode needs.

use crate::memory::GuestRam;
use linux_loader::loader::KernelLoader;
use linux_loader::loader::elf::Elf;
use linux_loader::loader::elf::start_info::{hvm_memmap_table_entry, hvm_start_info};
use vm_memory::{Bytes, GuestAddress};

/// Errors from loading.
#[derive(Debug, thiserror::Error)]
pub enum LoaderError {
    /// The kernel is not a loadable ELF.
    #[error("cannot load the kernel ELF: {0}")]
    Elf(String),
    /// The command line is too long.
    #[error("the command line is {0} bytes; at most {MAX_CMDLINE} fit")]
    CmdlineTooLong(usize),
    /// Writing boot structures failed.
    #[error("cannot write {what} into guest memory: {detail}")]
    Write {
        /// What.
        what: &'static str,
        /// Why.
        detail: String,
    },
}

/// Where boot structures go (below the kernel at 1 MiB).
pub mod layout {
    /// The GDT.
    pub const GDT: u64 = 0x500;
    /// The PVH start info.
    pub const START_INFO: u64 = 0x6000;
    /// The memory map the start info points at.
    pub const MEMMAP: u64 = 0x7000;
    /// PML4, then PDPT, then four page directories (4 GiB of 2 MiB pages).
    pub const PML4: u64 = 0x9000;
    /// The command line.
    pub const CMDLINE: u64 = 0x20000;
    /// The initial stack top (the guest sets its own).
    pub const STACK_TOP: u64 = 0x8_0000;
    /// Start of high memory (where kernels load).
    pub const HIGH_MEMORY: u64 = 0x10_0000;
    /// End of conventional low memory.
    pub const LOW_MEMORY_END: u64 = 0x9_fc00;
}

/// Longest command line accepted.
pub const MAX_CMDLINE: usize = 4095;

const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;
const E820_RAM: u32 = 1;

/// What loading produced.
#[derive(Debug, Clone, Copy)]
pub struct Loaded {
    /// The 64-bit entry point (the ELF entry).
    pub entry: u64,
    /// The PVH start-info address (passed in `rbx`).
    pub start_info: u64,
    /// Whether the ELF carries a PVH note (informational: the VMM enters at the ELF entry).
    pub has_pvh_note: bool,
}

fn write<T: vm_memory::ByteValued>(ram: &GuestRam, what: &'static str, value: T, at: u64) -> Result<(), LoaderError> {
    ram.memory().write_obj(value, GuestAddress(at)).map_err(|e| LoaderError::Write { what, detail: e.to_string() })
}

/// Loads `elf` and writes the start info, command line, memory map, page tables and GDT.
pub fn load(ram: &GuestRam, elf: &[u8], cmdline: &str) -> Result<Loaded, LoaderError> {
    if cmdline.len() > MAX_CMDLINE {
        return Err(LoaderError::CmdlineTooLong(cmdline.len()));
    }
    let mut image = std::io::Cursor::new(elf);
    let result = Elf::load(ram.memory(), None, &mut image, Some(GuestAddress(layout::HIGH_MEMORY)))
        .map_err(|e| LoaderError::Elf(e.to_string()))?;
    let mut text = cmdline.as_bytes().to_vec();
    text.push(0);
    ram.memory()
        .write_slice(&text, GuestAddress(layout::CMDLINE))
        .map_err(|e| LoaderError::Write { what: "the command line", detail: e.to_string() })?;
    let memmap = [
        hvm_memmap_table_entry { addr: 0, size: layout::LOW_MEMORY_END, type_: E820_RAM, reserved: 0 },
        hvm_memmap_table_entry {
            addr: layout::HIGH_MEMORY,
            size: ram.size() - layout::HIGH_MEMORY,
            type_: E820_RAM,
            reserved: 0,
        },
    ];
    for (i, entry) in memmap.iter().enumerate() {
        write(
            ram,
            "the memory map",
            *entry,
            layout::MEMMAP + (i * std::mem::size_of::<hvm_memmap_table_entry>()) as u64,
        )?;
    }
    let start_info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC,
        version: 1,
        cmdline_paddr: layout::CMDLINE,
        memmap_paddr: layout::MEMMAP,
        memmap_entries: memmap.len() as u32,
        ..Default::default()
    };
    write(ram, "the PVH start info", start_info, layout::START_INFO)?;
    write_page_tables(ram)?;
    for (i, descriptor) in gdt().iter().enumerate() {
        write(ram, "the GDT", *descriptor, layout::GDT + 8 * i as u64)?;
    }
    Ok(Loaded {
        entry: result.kernel_load.0,
        start_info: layout::START_INFO,
        has_pvh_note: matches!(result.pvh_boot_cap, linux_loader::loader::elf::PvhBootCapability::PvhEntryPresent(_)),
    })
}

/// Identity map of the first 4 GiB with 2 MiB pages.
fn write_page_tables(ram: &GuestRam) -> Result<(), LoaderError> {
    let pdpt = layout::PML4 + 0x1000;
    let pd = layout::PML4 + 0x2000;
    write(ram, "the page tables", pdpt | 3, layout::PML4)?;
    for dir in 0..4u64 {
        write(ram, "the page tables", (pd + dir * 0x1000) | 3, pdpt + dir * 8)?;
        for entry in 0..512u64 {
            let addr = ((dir * 512 + entry) << 21) | 0x83;
            write(ram, "the page tables", addr, pd + dir * 0x1000 + entry * 8)?;
        }
    }
    Ok(())
}

/// Null, 64-bit code (selector 0x08), data (0x10).
pub fn gdt() -> [u64; 3] {
    [0, 0x00af_9b00_0000_ffff, 0x00cf_9300_0000_ffff]
}
