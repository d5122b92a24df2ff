//! virtio-net: the MAC address and link status from the configuration space, transmit, and
//! receive with buffer refill; MRG_RXBUF and checksum offload when the device offers them.

use crate::hal::{Dma, Hal};
use crate::hypercall::Shim;
use crate::protocol::net::{self, NetHeaderRepr, feature as nf};
use crate::protocol::virtio::{DeviceId, Features, feature as vf};
use crate::queue::{Buffer, QueueError, VirtQueue};
use crate::transport::{self, NotifyTarget, Transport, TransportError};

/// Bytes of each receive and transmit buffer (header plus a 1514-byte frame, rounded up).
pub const BUFFER_SIZE: usize = 2048;

/// Errors from the net driver.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum NetDriverError {
    /// The transport or a queue failed.
    #[error(transparent)]
    Queue(#[from] QueueError),
    /// The device is not a network device.
    #[error("device type {0} is not a network device")]
    WrongDevice(u32),
    /// A frame longer than a transmit buffer, or shorter than an Ethernet header.
    #[error("a {0}-byte frame cannot be sent")]
    BadFrame(usize),
    /// Every transmit buffer is in flight.
    #[error("all transmit buffers are in flight")]
    TxFull,
    /// The device returned a frame header that makes no sense (or a frame too big for the
    /// caller's buffer); the frame was dropped.
    #[error("received a malformed frame ({0} bytes)")]
    BadRxFrame(u32),
}

impl From<TransportError> for NetDriverError {
    fn from(e: TransportError) -> NetDriverError {
        NetDriverError::Queue(QueueError::Transport(e))
    }
}

/// A virtio-net device with queues of `QUEUE` entries (receive queue 0, transmit queue 1).
pub struct VirtIONet<H: Hal, T: Transport, const QUEUE: usize = 64> {
    transport: T,
    rx: VirtQueue<H, QUEUE>,
    tx: VirtQueue<H, QUEUE>,
    rx_buffers: Dma<H>,
    tx_buffers: Dma<H>,
    /// Which receive buffer each receive token posted.
    rx_slot_of: [u16; QUEUE],
    tx_free: [bool; QUEUE],
    tx_slot_of: [u16; QUEUE],
    mac: [u8; 6],
    features: Features,
    header_len: usize,
}

impl<H: Hal, T: Transport, const QUEUE: usize> VirtIONet<H, T, QUEUE> {
    /// The features the driver can use.
    pub const SUPPORTED: Features = Features::from_bits(&[
        vf::VERSION_1,
        vf::RING_EVENT_IDX,
        nf::MAC,
        nf::STATUS,
        nf::MRG_RXBUF,
        nf::CSUM,
        nf::GUEST_CSUM,
    ]);

    /// Initialises the device and posts every receive buffer.
    pub fn new(mut transport: T, shim: impl Fn(u16, NotifyTarget) -> Shim) -> Result<Self, NetDriverError> {
        if transport.device_id() != DeviceId::Net.raw() {
            return Err(NetDriverError::WrongDevice(transport.device_id()));
        }
        let features = transport::begin_init(&mut transport, Self::SUPPORTED)?;
        let mut mac = [0u8; 6];
        if features.has(nf::MAC) {
            transport.read_config_consistent(0, &mut mac)?;
        }
        let header_len = if features.has(vf::VERSION_1) || features.has(nf::MRG_RXBUF) {
            net::HEADER_SIZE
        } else {
            net::LEGACY_HEADER_SIZE
        };
        let event_idx = features.has(vf::RING_EVENT_IDX);
        let rx = VirtQueue::new(&mut transport, 0, false, event_idx, |t| shim(0, t))?;
        let tx = VirtQueue::new(&mut transport, 1, false, event_idx, |t| shim(1, t))?;
        let pages = Dma::<H>::pages_for(QUEUE * BUFFER_SIZE);
        let rx_buffers = Dma::new(pages).ok_or(QueueError::NoMemory(0))?;
        let tx_buffers = Dma::new(pages).ok_or(QueueError::NoMemory(1))?;
        let mut this = VirtIONet {
            transport,
            rx,
            tx,
            rx_buffers,
            tx_buffers,
            rx_slot_of: [0; QUEUE],
            tx_free: [true; QUEUE],
            tx_slot_of: [0; QUEUE],
            mac,
            features,
            header_len,
        };
        for slot in 0..QUEUE as u16 {
            this.post_rx(slot)?;
        }
        transport::finish_init(&mut this.transport);
        this.rx.notify();
        Ok(this)
    }

    /// The MAC address (zero when the device has none).
    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    /// The negotiated features.
    pub fn features(&self) -> Features {
        self.features
    }

    /// Whether the link is up (always, without NET_F_STATUS).
    pub fn link_up(&self) -> bool {
        if !self.features.has(nf::STATUS) {
            return true;
        }
        let mut status = [0u8; 2];
        match self.transport.read_config(6, &mut status) {
            Ok(()) => u16::from_le_bytes(status) & net::status::LINK_UP != 0,
            Err(_) => false,
        }
    }

    /// The receive and transmit queues (statistics, interrupt suppression).
    pub fn queues(&mut self) -> (&mut VirtQueue<H, QUEUE>, &mut VirtQueue<H, QUEUE>) {
        (&mut self.rx, &mut self.tx)
    }

    /// The transport (interrupt acknowledgement).
    pub fn transport(&mut self) -> &mut T {
        &mut self.transport
    }

    fn buffer_ptr(dma: &Dma<H>, slot: u16) -> *mut u8 {
        dma.vaddr().as_ptr().wrapping_add(usize::from(slot) * BUFFER_SIZE)
    }

    fn post_rx(&mut self, slot: u16) -> Result<(), NetDriverError> {
        let addr = self.rx_buffers.paddr() + (usize::from(slot) * BUFFER_SIZE) as u64;
        // SAFETY: receive buffer `slot` belongs to the queue until it comes back; the driver
        // reads it only after popping its token.
        let token = unsafe { self.rx.add(&[Buffer { addr, len: BUFFER_SIZE as u32, device_writes: true }]) }?;
        self.rx_slot_of[usize::from(token)] = slot;
        Ok(())
    }

    /// Frees the buffers of frames the device has sent.
    fn reclaim_tx(&mut self) -> Result<(), NetDriverError> {
        while let Some(used) = self.tx.pop_used()? {
            let slot = self.tx_slot_of[usize::from(used.token)];
            self.tx_free[usize::from(slot)] = true;
        }
        Ok(())
    }

    /// Queues `frame` for transmission and rings the doorbell if the device wants it.
    pub fn send(&mut self, frame: &[u8]) -> Result<(), NetDriverError> {
        if frame.len() < net::ETH_HEADER_LEN || frame.len() + self.header_len > BUFFER_SIZE {
            return Err(NetDriverError::BadFrame(frame.len()));
        }
        self.reclaim_tx()?;
        let slot = self.tx_free.iter().position(|free| *free).ok_or(NetDriverError::TxFull)? as u16;
        let base = Self::buffer_ptr(&self.tx_buffers, slot);
        let mut header = [0u8; net::HEADER_SIZE];
        let _ = NetHeaderRepr { num_buffers: 0, ..Default::default() }.emit(&mut header, self.header_len);
        for (i, byte) in header[..self.header_len].iter().chain(frame.iter()).enumerate() {
            // SAFETY: header plus frame fit the slot's BUFFER_SIZE bytes (checked above).
            unsafe { base.add(i).write_volatile(*byte) };
        }
        let addr = self.tx_buffers.paddr() + (usize::from(slot) * BUFFER_SIZE) as u64;
        let len = (self.header_len + frame.len()) as u32;
        // SAFETY: transmit buffer `slot` is reserved (tx_free false) until its token returns.
        let token = unsafe { self.tx.add(&[Buffer { addr, len, device_writes: false }]) }?;
        self.tx_free[usize::from(slot)] = false;
        self.tx_slot_of[usize::from(token)] = slot;
        self.tx.notify();
        Ok(())
    }

    /// Copies the next received frame into `out`; returns its length, or `None` when nothing
    /// waits. Merged buffers (MRG_RXBUF) are joined. The buffers go back to the device.
    pub fn receive(&mut self, out: &mut [u8]) -> Result<Option<usize>, NetDriverError> {
        let Some(first) = self.rx.pop_used()? else { return Ok(None) };
        let mut total = 0usize;
        let mut bad = false;
        let slot = self.rx_slot_of[usize::from(first.token)];
        let mut header_bytes = [0u8; net::HEADER_SIZE];
        let base = Self::buffer_ptr(&self.rx_buffers, slot);
        let first_len = first.len as usize;
        if first_len < self.header_len {
            bad = true;
        } else {
            for (i, byte) in header_bytes[..self.header_len].iter_mut().enumerate() {
                // SAFETY: inside the receive buffer the device returned.
                *byte = unsafe { base.add(i).read_volatile() };
            }
        }
        let buffers = match NetHeaderRepr::parse_bytes(&header_bytes[..self.header_len], self.header_len) {
            Ok(h) if self.features.has(nf::MRG_RXBUF) => h.num_buffers.max(1),
            Ok(_) => 1,
            Err(_) => {
                bad = true;
                1
            }
        };
        let mut copy = |base: *mut u8, from: usize, len: usize, total: &mut usize, bad: &mut bool| {
            for i in from..len {
                if *total >= out.len() {
                    *bad = true;
                    return;
                }
                // SAFETY: `len` is at most the buffer size (the queue checked the used length
                // against what was offered).
                out[*total] = unsafe { base.add(i).read_volatile() };
                *total += 1;
            }
        };
        if !bad {
            copy(base, self.header_len, first_len, &mut total, &mut bad);
        }
        self.post_rx(slot)?;
        for _ in 1..buffers {
            let Some(next) = self.rx.pop_used()? else {
                bad = true;
                break;
            };
            let slot = self.rx_slot_of[usize::from(next.token)];
            let base = Self::buffer_ptr(&self.rx_buffers, slot);
            if !bad {
                copy(base, 0, next.len as usize, &mut total, &mut bad);
            }
            self.post_rx(slot)?;
        }
        self.rx.notify();
        if bad {
            return Err(NetDriverError::BadRxFrame(first.len));
        }
        Ok(Some(total))
    }
}

impl<H: Hal, T: Transport, const QUEUE: usize> Drop for VirtIONet<H, T, QUEUE> {
    fn drop(&mut self) {
        super::reset(&mut self.transport);
    }
}
