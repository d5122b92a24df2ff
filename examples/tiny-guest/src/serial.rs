//! COM1 (8250 UART at 0x3f8) output, and the debug-exit port.

use core::fmt;

const COM1: u16 = 0x3f8;

pub fn outb(port: u16, value: u8) {
    // SAFETY: port output touches no memory; the ports used are the UART's, the PIC's and the
    // debug-exit port.
    unsafe { core::arch::asm!("out dx, al", in("dx") port, in("al") value, options(nomem, nostack, preserves_flags)) }
}

pub fn inb(port: u16) -> u8 {
    let value: u8;
    // SAFETY: port input touches no memory.
    unsafe { core::arch::asm!("in al, dx", in("dx") port, out("al") value, options(nomem, nostack, preserves_flags)) }
    value
}

fn outl(port: u16, value: u32) {
    // SAFETY: as in `outb`.
    unsafe { core::arch::asm!("out dx, eax", in("dx") port, in("eax") value, options(nomem, nostack, preserves_flags)) }
}

/// Sets the UART to 115200 8N1 with FIFOs.
pub fn init() {
    outb(COM1 + 1, 0x00);
    outb(COM1 + 3, 0x80);
    outb(COM1, 0x01);
    outb(COM1 + 1, 0x00);
    outb(COM1 + 3, 0x03);
    outb(COM1 + 2, 0xc7);
    outb(COM1 + 4, 0x03);
}

fn put(byte: u8) {
    // Wait (boundedly) for room in the transmitter; a VMM without a UART reads 0xff here.
    for _ in 0..100_000 {
        let lsr = inb(COM1 + 5);
        if lsr & 0x20 != 0 || lsr == 0xff {
            break;
        }
    }
    outb(COM1, byte);
}

/// The serial console as a `fmt::Write`.
pub struct Serial;

impl fmt::Write for Serial {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for byte in s.bytes() {
            if byte == b'\n' {
                put(b'\r');
            }
            put(byte);
        }
        Ok(())
    }
}

#[macro_export]
macro_rules! println {
    ($($arg:tt)*) => {{
        use core::fmt::Write as _;
        let _ = writeln!($crate::serial::Serial, $($arg)*);
    }};
}

/// Ends the guest through the debug-exit port with `code` (0 = every check passed).
pub fn exit(code: u32) -> ! {
    outl(pvkit_protocol::abi::DEBUG_EXIT_PORT, code);
    loop {
        // SAFETY: `cli; hlt` stops this vCPU for good if the exit port did not end the VM.
        unsafe { core::arch::asm!("cli", "hlt", options(nomem, nostack)) }
    }
}
