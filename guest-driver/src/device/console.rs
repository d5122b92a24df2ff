//! virtio-console: port 0 read and write, the multiport control protocol (the driver announces
//! itself, accepts port 0 and opens it, so hosts that wait for that, like QEMU's virtconsole,
//! send data), the terminal size (SIZE) and emergency writes (EMERG_WRITE).

use crate::hal::{Dma, Hal};
use crate::hypercall::Shim;
use crate::protocol::console::{self, ControlEvent, ControlRepr, feature as cf, queue as cq};
use crate::protocol::virtio::{DeviceId, Features, feature as vf};
use crate::queue::{Buffer, QueueError, VirtQueue};
use crate::transport::{self, NotifyTarget, Transport, TransportError};

/// Bytes of each data buffer.
pub const BUFFER_SIZE: usize = 512;
/// Receive buffers kept posted on each receive queue.
const RX_BUFFERS: usize = 8;

/// Errors from the console driver.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ConsoleDriverError {
    /// The transport or a queue failed.
    #[error(transparent)]
    Queue(#[from] QueueError),
    /// The device is not a console.
    #[error("device type {0} is not a console")]
    WrongDevice(u32),
    /// EMERG_WRITE was not negotiated.
    #[error("the device does not offer EMERG_WRITE")]
    NoEmergWrite,
}

impl From<TransportError> for ConsoleDriverError {
    fn from(e: TransportError) -> ConsoleDriverError {
        ConsoleDriverError::Queue(QueueError::Transport(e))
    }
}

/// Buffer layout in the DMA area: port receive buffers, control receive buffers, then one
/// transmit buffer for data and one for control messages.
const RX0: usize = 0;
const CRX: usize = RX_BUFFERS;
const TX: usize = 2 * RX_BUFFERS;
const CTX: usize = TX + 1;
const SLOTS: usize = CTX + 1;

/// A virtio-console device (port 0) with queues of `QUEUE` entries.
pub struct VirtIOConsole<H: Hal, T: Transport, const QUEUE: usize = 16> {
    transport: T,
    rx: VirtQueue<H, QUEUE>,
    tx: VirtQueue<H, QUEUE>,
    control: Option<(VirtQueue<H, QUEUE>, VirtQueue<H, QUEUE>)>,
    buffers: Dma<H>,
    rx_slot_of: [u16; QUEUE],
    crx_slot_of: [u16; QUEUE],
    /// Received bytes not yet handed out: (slot, start, end).
    pending: Option<(u16, usize, usize)>,
    features: Features,
    port_open: bool,
}

impl<H: Hal, T: Transport, const QUEUE: usize> VirtIOConsole<H, T, QUEUE> {
    /// The features the driver can use.
    pub const SUPPORTED: Features =
        Features::from_bits(&[vf::VERSION_1, vf::RING_EVENT_IDX, cf::SIZE, cf::MULTIPORT, cf::EMERG_WRITE]);

    /// Initialises the device; with MULTIPORT, announces the driver (DEVICE_READY) and
    /// handles the host's port announcements that arrive meanwhile.
    pub fn new(mut transport: T, shim: impl Fn(u16, NotifyTarget) -> Shim) -> Result<Self, ConsoleDriverError> {
        if transport.device_id() != DeviceId::Console.raw() {
            return Err(ConsoleDriverError::WrongDevice(transport.device_id()));
        }
        let features = transport::begin_init(&mut transport, Self::SUPPORTED)?;
        let event_idx = features.has(vf::RING_EVENT_IDX);
        let rx = VirtQueue::new(&mut transport, cq::port_rx(0), false, event_idx, |t| shim(cq::port_rx(0), t))?;
        let tx = VirtQueue::new(&mut transport, cq::port_tx(0), false, event_idx, |t| shim(cq::port_tx(0), t))?;
        let control = if features.has(cf::MULTIPORT) {
            let crx = VirtQueue::new(&mut transport, cq::CONTROL_RX, false, event_idx, |t| shim(cq::CONTROL_RX, t))?;
            let ctx = VirtQueue::new(&mut transport, cq::CONTROL_TX, false, event_idx, |t| shim(cq::CONTROL_TX, t))?;
            Some((crx, ctx))
        } else {
            None
        };
        let buffers = Dma::new(Dma::<H>::pages_for(SLOTS * BUFFER_SIZE)).ok_or(QueueError::NoMemory(0))?;
        let mut this = VirtIOConsole {
            transport,
            rx,
            tx,
            control,
            buffers,
            rx_slot_of: [0; QUEUE],
            crx_slot_of: [0; QUEUE],
            pending: None,
            features,
            port_open: false,
        };
        for i in 0..RX_BUFFERS.min(QUEUE) {
            this.post(false, (RX0 + i) as u16)?;
            if this.control.is_some() {
                this.post(true, (CRX + i) as u16)?;
            }
        }
        transport::finish_init(&mut this.transport);
        this.rx.notify();
        if this.control.is_some() {
            if let Some((crx, _)) = this.control.as_mut() {
                crx.notify();
            }
            this.send_control(ControlRepr { id: 0, event: ControlEvent::DeviceReady, value: 1 })?;
        } else {
            this.port_open = true;
        }
        Ok(this)
    }

    /// The negotiated features.
    pub fn features(&self) -> Features {
        self.features
    }

    /// Whether port 0 is usable (single-port devices: always; multiport: once the host added
    /// it and the driver opened it).
    pub fn port_open(&self) -> bool {
        self.port_open
    }

    /// The transport (interrupt acknowledgement).
    pub fn transport(&mut self) -> &mut T {
        &mut self.transport
    }

    /// The port-0 queues (statistics, interrupt suppression).
    pub fn queues(&mut self) -> (&mut VirtQueue<H, QUEUE>, &mut VirtQueue<H, QUEUE>) {
        (&mut self.rx, &mut self.tx)
    }

    /// Terminal size (columns, rows) when the device offers SIZE.
    pub fn size(&self) -> Option<(u16, u16)> {
        if !self.features.has(cf::SIZE) {
            return None;
        }
        let mut raw = [0u8; 4];
        self.transport.read_config_consistent(console::config_offset::COLS, &mut raw).ok()?;
        Some((u16::from_le_bytes([raw[0], raw[1]]), u16::from_le_bytes([raw[2], raw[3]])))
    }

    fn slot_ptr(&self, slot: u16) -> *mut u8 {
        self.buffers.vaddr().as_ptr().wrapping_add(usize::from(slot) * BUFFER_SIZE)
    }

    fn slot_phys(&self, slot: u16) -> u64 {
        self.buffers.paddr() + (usize::from(slot) * BUFFER_SIZE) as u64
    }

    fn post(&mut self, control: bool, slot: u16) -> Result<(), ConsoleDriverError> {
        let buffer = Buffer { addr: self.slot_phys(slot), len: BUFFER_SIZE as u32, device_writes: true };
        if control {
            if let Some((crx, _)) = self.control.as_mut() {
                // SAFETY: the slot belongs to the queue until its token is popped.
                let token = unsafe { crx.add(&[buffer]) }?;
                self.crx_slot_of[usize::from(token)] = slot;
            }
        } else {
            // SAFETY: as above.
            let token = unsafe { self.rx.add(&[buffer]) }?;
            self.rx_slot_of[usize::from(token)] = slot;
        }
        Ok(())
    }

    fn write_slot(&self, slot: u16, data: &[u8]) {
        let base = self.slot_ptr(slot);
        for (i, byte) in data.iter().take(BUFFER_SIZE).enumerate() {
            // SAFETY: at most BUFFER_SIZE bytes into the slot.
            unsafe { base.add(i).write_volatile(*byte) };
        }
    }

    /// Sends one control message and waits for the device to take it.
    fn send_control(&mut self, message: ControlRepr) -> Result<(), ConsoleDriverError> {
        let mut raw = [0u8; console::CONTROL_SIZE];
        let _ = message.emit(&mut raw);
        self.write_slot(CTX as u16, &raw);
        let buffer = Buffer { addr: self.slot_phys(CTX as u16), len: raw.len() as u32, device_writes: false };
        let Some((_, ctx)) = self.control.as_mut() else { return Ok(()) };
        // SAFETY: the control transmit slot is reused only after the device returned it (the
        // loop below waits for that).
        unsafe { ctx.add(&[buffer]) }?;
        ctx.notify();
        loop {
            let Some((_, ctx)) = self.control.as_mut() else { return Ok(()) };
            if ctx.pop_used()?.is_some() {
                return Ok(());
            }
            self.handle_control()?;
            core::hint::spin_loop();
        }
    }

    /// Handles the host's control messages: accepts port 0 (PORT_READY), opens it when it is
    /// a console (PORT_OPEN). Returns whether any arrived.
    pub fn handle_control(&mut self) -> Result<bool, ConsoleDriverError> {
        let mut any = false;
        loop {
            let Some((crx, _)) = self.control.as_mut() else { return Ok(any) };
            let Some(used) = crx.pop_used()? else { break };
            any = true;
            let slot = self.crx_slot_of[usize::from(used.token)];
            let mut raw = [0u8; console::CONTROL_SIZE];
            let base = self.slot_ptr(slot);
            for (i, byte) in raw.iter_mut().enumerate().take(used.len as usize) {
                // SAFETY: inside the control buffer the device returned.
                *byte = unsafe { base.add(i).read_volatile() };
            }
            self.post(true, slot)?;
            if let Some((crx, _)) = self.control.as_mut() {
                crx.notify();
            }
            let Ok(message) = ControlRepr::parse(&raw) else { continue };
            match message.event {
                ControlEvent::DeviceAdd if message.id == 0 => {
                    self.send_control(ControlRepr { id: 0, event: ControlEvent::PortReady, value: 1 })?;
                }
                ControlEvent::DeviceAdd => {
                    // Only port 0 is driven: refuse the others.
                    self.send_control(ControlRepr { id: message.id, event: ControlEvent::PortReady, value: 0 })?;
                }
                ControlEvent::ConsolePort | ControlEvent::PortOpen
                    if message.id == 0 && (message.event == ControlEvent::ConsolePort || message.value == 1) =>
                {
                    self.port_open = true;
                    self.send_control(ControlRepr { id: 0, event: ControlEvent::PortOpen, value: 1 })?;
                }
                _ => {}
            }
        }
        Ok(any)
    }

    /// Writes `data` to port 0, waiting until the device has taken it all.
    pub fn write(&mut self, data: &[u8]) -> Result<(), ConsoleDriverError> {
        for chunk in data.chunks(BUFFER_SIZE) {
            self.write_slot(TX as u16, chunk);
            let buffer = Buffer { addr: self.slot_phys(TX as u16), len: chunk.len() as u32, device_writes: false };
            // SAFETY: the transmit slot is reused only after the device returned it.
            unsafe { self.tx.add(&[buffer]) }?;
            self.tx.notify();
            while self.tx.pop_used()?.is_none() {
                self.handle_control()?;
                core::hint::spin_loop();
            }
        }
        Ok(())
    }

    /// Copies received bytes into `out`; returns how many (0 when nothing waits).
    pub fn read(&mut self, out: &mut [u8]) -> Result<usize, ConsoleDriverError> {
        self.handle_control()?;
        if self.pending.is_none()
            && let Some(used) = self.rx.pop_used()?
        {
            let slot = self.rx_slot_of[usize::from(used.token)];
            self.pending = Some((slot, 0, (used.len as usize).min(BUFFER_SIZE)));
        }
        let Some((slot, start, end)) = self.pending else { return Ok(0) };
        let n = (end - start).min(out.len());
        let base = self.slot_ptr(slot);
        for (i, byte) in out[..n].iter_mut().enumerate() {
            // SAFETY: inside the receive buffer the device returned.
            *byte = unsafe { base.add(start + i).read_volatile() };
        }
        if start + n == end {
            self.pending = None;
            self.post(false, slot)?;
            self.rx.notify();
        } else {
            self.pending = Some((slot, start + n, end));
        }
        Ok(n)
    }

    /// Writes one byte through the configuration space (EMERG_WRITE), usable before the queues.
    pub fn emerg_write(&mut self, byte: u8) -> Result<(), ConsoleDriverError> {
        if !self.features.has(cf::EMERG_WRITE) {
            return Err(ConsoleDriverError::NoEmergWrite);
        }
        self.transport.write_config(console::config_offset::EMERG_WR, &u32::from(byte).to_le_bytes())?;
        Ok(())
    }
}

impl<H: Hal, T: Transport, const QUEUE: usize> Drop for VirtIOConsole<H, T, QUEUE> {
    fn drop(&mut self) {
        super::reset(&mut self.transport);
    }
}
