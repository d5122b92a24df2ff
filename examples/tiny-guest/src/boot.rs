//! Entry points and the switch to long mode.
//!
//! - `pvh_start32`, named by the PVH ELF note: QEMU (and any PVH loader) starts here in 32-bit
//!   protected mode, paging off, with the PVH start-info address in `ebx`. It identity-maps the
//!   first 4 GiB with 2 MiB pages, enables PAE and long mode, loads a 64-bit GDT and jumps to
//!   64-bit code.
//! - `_start64`, the ELF entry point: a VMM that starts the guest in long mode directly (pvkit's)
//!   comes here with the start-info address in `rbx`; the guest loads its own page tables and
//!   GDT so both paths continue identically.
//!
//! Both call `tiny_main(start_info)`.

use core::arch::global_asm;

/// Page-table pages: PML4, one PDPT, four page directories (4 GiB of 2 MiB pages), and spares
/// for device memory above 4 GiB.
pub const SPARE_TABLES: usize = 8;

#[repr(C, align(4096))]
pub struct PageTables {
    pub pml4: [u64; 512],
    pub pdpt: [u64; 512],
    pub pd: [[u64; 512]; 4],
    pub spare: [[u64; 512]; SPARE_TABLES],
}

#[unsafe(no_mangle)]
#[unsafe(link_section = ".bss.pagetables")]
pub static mut BOOT_PAGE_TABLES: PageTables =
    PageTables { pml4: [0; 512], pdpt: [0; 512], pd: [[0; 512]; 4], spare: [[0; 512]; SPARE_TABLES] };

#[repr(C, align(16))]
pub struct Stack(pub [u8; 128 * 1024]);

#[unsafe(no_mangle)]
pub static mut BOOT_STACK: Stack = Stack([0; 128 * 1024]);

global_asm!(
    r#"
    .section .note.pvh, "a"
    .balign 4
    .long 4
    .long 4
    .long 18
    .asciz "Xen"
    .balign 4
    .long pvh_start32
    .balign 4

    .section .rodata
    .balign 16
boot_gdt:
    .quad 0
    .quad 0x00af9a000000ffff
    .quad 0x00cf92000000ffff
boot_gdt_end:
    .balign 16
boot_gdt_ptr:
    .word boot_gdt_end - boot_gdt - 1
    .quad boot_gdt

    .section .text.boot, "ax"
    .code32
    .global pvh_start32
pvh_start32:
    cli
    mov esi, ebx
    /* Page directories: 2048 entries of 2 MiB, present + writable + large. */
    mov edi, offset BOOT_PAGE_TABLES + 8192
    xor ecx, ecx
2:
    mov eax, ecx
    shl eax, 21
    or eax, 0x83
    mov [edi + ecx * 8], eax
    mov eax, ecx
    shr eax, 11
    mov [edi + ecx * 8 + 4], eax
    inc ecx
    cmp ecx, 2048
    jb 2b
    /* PDPT: four directories. */
    mov edi, offset BOOT_PAGE_TABLES + 4096
    mov eax, offset BOOT_PAGE_TABLES + 8192 + 3
    mov [edi], eax
    add eax, 4096
    mov [edi + 8], eax
    add eax, 4096
    mov [edi + 16], eax
    add eax, 4096
    mov [edi + 24], eax
    /* PML4[0] -> PDPT. */
    mov edi, offset BOOT_PAGE_TABLES
    mov eax, offset BOOT_PAGE_TABLES + 4096 + 3
    mov [edi], eax
    mov eax, offset BOOT_PAGE_TABLES
    mov cr3, eax
    mov eax, cr4
    or eax, 0x20
    mov cr4, eax
    mov ecx, 0xc0000080
    rdmsr
    or eax, 0x100
    wrmsr
    mov eax, cr0
    or eax, 0x80000001
    mov cr0, eax
    lgdt [boot_gdt_ptr]
    mov eax, offset long_mode_from_pvh
    push 0x08
    push eax
    retf

    .code64
long_mode_from_pvh:
    mov rsp, offset BOOT_STACK + 131072
    mov edi, esi
    jmp enter_main

    .global _start64
_start64:
    cli
    mov rsp, offset BOOT_STACK + 131072
    push rbx
    call install_page_tables
    pop rdi
    lgdt [boot_gdt_ptr]
    push 0x08
    lea rax, [rip + enter_main]
    push rax
    retfq

    /* Both entries: 64-bit code segment loaded, stack set, start info in rdi. */
enter_main:
    mov ax, 0x10
    mov ds, ax
    mov es, ax
    mov ss, ax
    mov fs, ax
    mov gs, ax
    call tiny_main
5:
    hlt
    jmp 5b
"#
);

/// Fills the boot page tables (4 GiB identity map) and loads them, for the 64-bit entry.
#[unsafe(no_mangle)]
extern "C" fn install_page_tables() {
    // SAFETY: runs once, on the boot CPU, before anything else uses the tables; the addresses
    // are the tables' own (identity-mapped by the VMM's tables in use right now).
    unsafe {
        let tables = &raw mut BOOT_PAGE_TABLES;
        for (i, pd) in (*tables).pd.iter_mut().enumerate() {
            for (j, entry) in pd.iter_mut().enumerate() {
                *entry = ((i as u64 * 512 + j as u64) << 21) | 0x83;
            }
            (*tables).pdpt[i] = (&raw const (*tables).pd[i]) as u64 | 3;
        }
        (*tables).pml4[0] = (&raw const (*tables).pdpt) as u64 | 3;
        core::arch::asm!("mov cr3, {}", in(reg) tables as u64, options(nostack));
    }
}

/// Maps the 1 GiB region holding `addr` (device memory above 4 GiB, e.g. a 64-bit PCI BAR)
/// with 2 MiB pages; returns false when it cannot (beyond 512 GiB or out of spare tables).
pub fn map_gib_region(addr: u64) -> bool {
    let gib = addr >> 30;
    if gib < 4 {
        return true;
    }
    if gib >= 512 {
        return false;
    }
    // SAFETY: single CPU, interrupts not using the tables; entries are only added.
    unsafe {
        let tables = &raw mut BOOT_PAGE_TABLES;
        if (*tables).pdpt[gib as usize] & 1 != 0 {
            return true;
        }
        let Some(spare) = (*tables).spare.iter_mut().find(|t| t[0] == 0) else { return false };
        for (j, entry) in spare.iter_mut().enumerate() {
            *entry = ((gib << 30) + ((j as u64) << 21)) | 0x83;
        }
        (*tables).pdpt[gib as usize] = (spare as *mut [u64; 512]) as u64 | 3;
        core::arch::asm!("mov {tmp}, cr3", "mov cr3, {tmp}", tmp = out(reg) _, options(nostack));
    }
    true
}
