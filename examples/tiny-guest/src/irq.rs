//! Interrupt mode: an IDT, the local APIC, IOAPIC pins for virtio-mmio and MSI-X messages for
//! virtio-pci. Every device vector runs one handler that counts and sends EOI; the drivers'
//! waits sleep with `sti; hlt` until a count changes.

use crate::serial::outb;
use core::arch::global_asm;
use core::sync::atomic::{AtomicU64, Ordering};

pub const LAPIC_BASE: u64 = 0xfee0_0000;
const IOAPIC_BASE: u64 = 0xfec0_0000;
/// First vector for virtio-mmio slot interrupts (slot added).
pub const MMIO_VECTOR_BASE: u8 = 0x30;
/// First vector for virtio-pci MSI-X messages (device index added).
pub const PCI_VECTOR_BASE: u8 = 0x60;

#[unsafe(no_mangle)]
static IRQ_COUNT: AtomicU64 = AtomicU64::new(0);

#[repr(C, packed)]
#[derive(Clone, Copy)]
struct Gate {
    offset_low: u16,
    selector: u16,
    ist: u8,
    attributes: u8,
    offset_mid: u16,
    offset_high: u32,
    zero: u32,
}

static mut IDT: [Gate; 256] =
    [Gate { offset_low: 0, selector: 0, ist: 0, attributes: 0, offset_mid: 0, offset_high: 0, zero: 0 }; 256];

global_asm!(
    r#"
    .section .text
    .global irq_stub
irq_stub:
    push rax
    lock inc qword ptr [rip + IRQ_COUNT]
    mov rax, 0xfee000b0
    mov dword ptr [rax], 0
    pop rax
    iretq

    .global timer_stub
timer_stub:
    push rax
    mov rax, 0xfee000b0
    mov dword ptr [rax], 0
    pop rax
    iretq

    .global exception_stub
exception_stub:
    and rsp, -16
    call exception_handler
4:
    hlt
    jmp 4b
"#
);

/// The local APIC timer's vector: a periodic tick that bounds every interrupt wait.
const TIMER_VECTOR: usize = 0xef;

unsafe extern "C" {
    fn irq_stub();
    fn timer_stub();
    fn exception_stub();
}

#[unsafe(no_mangle)]
extern "C" fn exception_handler() -> ! {
    crate::println!("tiny-guest: CPU exception");
    crate::serial::exit(pvkit_protocol::abi::EXIT_PANIC)
}

fn gate(handler: u64) -> Gate {
    Gate {
        offset_low: handler as u16,
        selector: 0x08,
        ist: 0,
        attributes: 0x8e,
        offset_mid: (handler >> 16) as u16,
        offset_high: (handler >> 32) as u32,
        zero: 0,
    }
}

fn lapic_write(offset: u64, value: u32) {
    // SAFETY: the local APIC's registers are identity-mapped below 4 GiB.
    unsafe { ((LAPIC_BASE + offset) as *mut u32).write_volatile(value) }
}

fn ioapic_write(register: u32, value: u32) {
    // SAFETY: the IOAPIC's select and window registers are identity-mapped below 4 GiB.
    unsafe {
        (IOAPIC_BASE as *mut u32).write_volatile(register);
        ((IOAPIC_BASE + 0x10) as *mut u32).write_volatile(value);
    }
}

/// Loads the IDT, masks the legacy PICs and LINT0, and enables the local APIC. Interrupts stay
/// off until a wait enables them.
pub fn init() {
    // SAFETY: single CPU, interrupts off; the IDT is filled before it is loaded.
    unsafe {
        let idt = &raw mut IDT;
        for (vector, entry) in (*idt).iter_mut().enumerate() {
            let handler = match vector {
                0..32 => exception_stub as *const () as usize,
                TIMER_VECTOR => timer_stub as *const () as usize,
                _ => irq_stub as *const () as usize,
            };
            *entry = gate(handler as u64);
        }
        let pointer: [u16; 5] = {
            let base = idt as u64;
            [(256 * 16 - 1) as u16, base as u16, (base >> 16) as u16, (base >> 32) as u16, (base >> 48) as u16]
        };
        core::arch::asm!("lidt [{}]", in(reg) pointer.as_ptr(), options(nostack));
    }
    outb(0x21, 0xff);
    outb(0xa1, 0xff);
    lapic_write(0x80, 0); // task priority: accept everything
    lapic_write(0x350, 1 << 16); // LINT0 masked (no PIC virtual wire)
    lapic_write(0xf0, 0x1ff); // enable, spurious vector 0xff
    lapic_write(0x3e0, 0xb); // timer divide by 1
    lapic_write(0x320, (1 << 17) | TIMER_VECTOR as u32); // periodic tick
    lapic_write(0x380, 2_000_000);
}

/// Routes IOAPIC pin `pin` to `vector` on CPU 0: edge-triggered, active high, unmasked.
pub fn route_ioapic(pin: u32, vector: u8) {
    ioapic_write(0x10 + 2 * pin + 1, 0);
    ioapic_write(0x10 + 2 * pin, u32::from(vector));
}

/// The MSI address and data that deliver `vector` to CPU 0.
pub fn msi_message(vector: u8) -> (u64, u32) {
    (LAPIC_BASE, u32::from(vector))
}

/// Stops the tick (before the guest ends).
pub fn stop_timer() {
    lapic_write(0x320, 1 << 16);
}

/// Device interrupts taken so far.
pub fn count() -> u64 {
    IRQ_COUNT.load(Ordering::SeqCst)
}

/// Sleeps until `ready` holds, waking on interrupts (`sti; hlt` is atomic with respect to
/// an interrupt arriving between the check and the halt). Gives up after `max_sleeps`.
pub fn wait_until(mut ready: impl FnMut() -> bool, max_sleeps: u64) -> bool {
    for _ in 0..max_sleeps {
        // SAFETY: interrupts off while checking, then re-enabled together with the halt.
        unsafe { core::arch::asm!("cli", options(nomem, nostack)) };
        if ready() {
            // SAFETY: as above.
            unsafe { core::arch::asm!("sti", options(nomem, nostack)) };
            return true;
        }
        // SAFETY: as above.
        unsafe { core::arch::asm!("sti", "hlt", options(nomem, nostack)) };
    }
    false
}
