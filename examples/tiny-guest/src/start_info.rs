//! The PVH start-info block: magic, then (at byte 24) the command line's physical address.

const MAGIC: u32 = 0x336e_c578;
const MAX_CMDLINE: usize = 4096;

/// The command line the start info points at ("" when there is none or it is not UTF-8).
pub fn cmdline(start_info: u64) -> &'static str {
    if start_info == 0 || start_info >= 1 << 32 {
        return "";
    }
    // SAFETY: the loader placed the start info in identity-mapped low memory; fields are read
    // unaligned-safe and only after the magic matched.
    unsafe {
        let base = start_info as *const u8;
        if (base as *const u32).read_unaligned() != MAGIC {
            return "";
        }
        let addr = (base.add(24) as *const u64).read_unaligned();
        if addr == 0 || addr >= 1 << 32 {
            return "";
        }
        let text = addr as *const u8;
        let mut len = 0;
        while len < MAX_CMDLINE && *text.add(len) != 0 {
            len += 1;
        }
        core::str::from_utf8(core::slice::from_raw_parts(text, len)).unwrap_or("")
    }
}

/// The end of the highest RAM range in the start info's memory map (0 when there is none).
pub fn ram_top(start_info: u64) -> u64 {
    const RAM: u32 = 1;
    const ENTRY: usize = 24;
    const MAX_ENTRIES: u32 = 128;
    if start_info == 0 || start_info >= 1 << 32 {
        return 0;
    }
    // SAFETY: as in `cmdline`: the start info and the memory map it points at lie in
    // identity-mapped low memory; fields are read unaligned-safe after the magic matched, and
    // no more entries than a sane map holds are read.
    unsafe {
        let base = start_info as *const u8;
        if (base as *const u32).read_unaligned() != MAGIC {
            return 0;
        }
        let map = (base.add(40) as *const u64).read_unaligned();
        let entries = (base.add(48) as *const u32).read_unaligned().min(MAX_ENTRIES);
        if map == 0 || map >= 1 << 32 {
            return 0;
        }
        let mut top = 0;
        for i in 0..entries as usize {
            let entry = (map as *const u8).add(i * ENTRY);
            let addr = (entry as *const u64).read_unaligned();
            let size = (entry.add(8) as *const u64).read_unaligned();
            if (entry.add(16) as *const u32).read_unaligned() == RAM {
                top = top.max(addr.saturating_add(size));
            }
        }
        top
    }
}
