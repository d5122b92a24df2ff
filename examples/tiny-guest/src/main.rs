//! pvkit's tiny guest: a freestanding x86-64 kernel.
//!
//! This build only announces itself on COM1 and reports through the debug-exit port that it
//! ran no checks (result code 1, "failed"): it never claims a pass it did not earn.

#![no_std]
#![no_main]

use core::panic::PanicInfo;
use pvkit_protocol::abi;

const COM1: u16 = 0x3f8;

fn outb(port: u16, value: u8) {
    // SAFETY: writing to the COM1 data register has no effect on memory; on a VMM without a
    // serial port the write is simply ignored.
    unsafe { core::arch::asm!("out dx, al", in("dx") port, in("al") value, options(nomem, nostack, preserves_flags)) }
}

fn outl(port: u16, value: u32) {
    // SAFETY: as above; the debug-exit port ends the VM, it never touches guest memory.
    unsafe { core::arch::asm!("out dx, eax", in("dx") port, in("eax") value, options(nomem, nostack, preserves_flags)) }
}

fn print(text: &str) {
    for byte in text.bytes() {
        outb(COM1, byte);
    }
}

fn halt_forever() -> ! {
    loop {
        // SAFETY: `hlt` only stops this vCPU until the next interrupt.
        unsafe { core::arch::asm!("hlt", options(nomem, nostack)) }
    }
}

/// The 64-bit entry point.
#[unsafe(no_mangle)]
pub extern "C" fn _start() -> ! {
    print("pvkit tiny-guest: no self-test in this build\n");
    outl(abi::DEBUG_EXIT_PORT, abi::EXIT_FAIL);
    halt_forever()
}

#[panic_handler]
fn panic(_info: &PanicInfo) -> ! {
    print("pvkit tiny-guest: panic\n");
    outl(abi::DEBUG_EXIT_PORT, abi::EXIT_PANIC);
    halt_forever()
}
