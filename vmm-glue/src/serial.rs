//! COM1: an 8250 UART (`vm-superio`) whose output goes to standard output or a file.

use crate::sync::lock;
use std::io::Write;
use std::sync::Mutex;
use vm_superio::{Serial, Trigger, serial::NoEvents};

/// COM1's first port.
pub const COM1_BASE: u16 = 0x3f8;
/// Ports COM1 decodes.
pub const COM1_PORTS: u16 = 8;

/// The UART's interrupt line is not wired (guests here poll or only print).
pub struct NoInterrupt;

impl Trigger for NoInterrupt {
    type E = std::io::Error;

    fn trigger(&self) -> Result<(), std::io::Error> {
        Ok(())
    }
}

/// COM1 with its output.
pub struct Com1 {
    uart: Mutex<Serial<NoInterrupt, NoEvents, Box<dyn Write + Send>>>,
}

impl Com1 {
    /// A UART writing to `out`.
    pub fn new(out: Box<dyn Write + Send>) -> Com1 {
        Com1 { uart: Mutex::new(Serial::new(NoInterrupt, out)) }
    }

    /// Whether `port` belongs to COM1.
    pub fn claims(port: u16) -> bool {
        (COM1_BASE..COM1_BASE + COM1_PORTS).contains(&port)
    }

    /// A guest read.
    pub fn read(&self, port: u16) -> u8 {
        let mut uart = lock(&self.uart);
        uart.read((port - COM1_BASE) as u8)
    }

    /// A guest write.
    pub fn write(&self, port: u16, value: u8) {
        let mut uart = lock(&self.uart);
        if let Err(e) = uart.write((port - COM1_BASE) as u8, value) {
            log::warn!("serial output: {e:?}");
        }
    }
}
