//! Transports: how a driver finds a device's registers, negotiates features and sets up
//! queues. virtio-mmio (version 2 and legacy version 1) and virtio-pci (modern) implement
//! [`Transport`]; drivers are written against the trait.

pub mod mmio;
pub mod pci;

use crate::protocol::ring::RingLayout;
use crate::protocol::virtio::{Features, feature as vf, status};
use core::ptr::NonNull;

/// Errors from transports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TransportError {
    /// No virtio device at the address (wrong magic, vendor or version).
    #[error("no virtio device here: {0}")]
    NotVirtio(&'static str),
    /// The device's type is 0 (an empty slot).
    #[error("the virtio slot is empty (device id 0)")]
    EmptySlot,
    /// A modern transport's device did not offer VIRTIO_F_VERSION_1.
    #[error("the device does not offer VIRTIO_F_VERSION_1")]
    NoVersion1,
    /// The device refused the features the driver chose (FEATURES_OK did not stick).
    #[error("the device refused features {0:#x}")]
    FeaturesRefused(u64),
    /// A queue index the device does not have.
    #[error("queue {0} does not exist on this device")]
    NoSuchQueue(u16),
    /// The queue is already set up.
    #[error("queue {0} is already in use")]
    QueueInUse(u16),
    /// A ring layout the transport cannot express (legacy needs page-aligned contiguous rings).
    #[error("queue {0}: ring layout not usable by this transport")]
    BadLayout(u16),
    /// A configuration-space access outside the device's configuration.
    #[error("config access of {len} bytes at {offset} is outside the device configuration")]
    ConfigOutOfRange {
        /// Offset asked for.
        offset: usize,
        /// Length asked for.
        len: usize,
    },
    /// A PCI capability the modern transport needs is missing.
    #[error("virtio-pci capability {0} is missing")]
    MissingCapability(&'static str),
    /// A BAR the device's capabilities point at is not assigned or not memory.
    #[error("BAR {0} is not an assigned memory BAR")]
    BadBar(u8),
}

/// Where a queue's notifications go, resolved once when the queue is set up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotifyTarget {
    /// A 32-bit register written with the queue index (virtio-mmio QueueNotify).
    Mmio32(NonNull<u32>),
    /// A 16-bit register written with the queue index (the virtio-pci notify capability).
    Pci16(NonNull<u16>),
}

// SAFETY: the pointers name device registers, which any thread may write; the target is only
// used for volatile writes.
unsafe impl Send for NotifyTarget {}

impl NotifyTarget {
    /// Writes `queue` to the register.
    pub fn write(&self, queue: u16) {
        match *self {
            // SAFETY: the transport resolved this pointer to the queue's notify register
            // (mapped by `Hal::mmio_phys_to_virt`), valid for volatile writes of its width.
            NotifyTarget::Mmio32(reg) => unsafe { reg.as_ptr().write_volatile(u32::from(queue)) },
            // SAFETY: as above, for the 16-bit PCI notify address.
            NotifyTarget::Pci16(reg) => unsafe { reg.as_ptr().write_volatile(queue) },
        }
    }
}

/// How rings must be placed for this transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RingPlacement {
    /// Three separate addresses, each naturally aligned (modern transports).
    Separate,
    /// One page-aligned block with the used ring aligned to `used_align` (legacy virtio-mmio).
    Contiguous {
        /// Alignment of the used ring.
        used_align: u64,
    },
}

/// A virtio transport.
pub trait Transport {
    /// The device type (`protocol::virtio::DeviceId` raw value).
    fn device_id(&self) -> u32;
    /// Whether the device must negotiate VIRTIO_F_VERSION_1 (modern transports).
    fn requires_version_1(&self) -> bool;
    /// The 64 feature bits the device offers.
    fn read_device_features(&mut self) -> u64;
    /// Acknowledges the features the driver uses.
    fn write_driver_features(&mut self, features: u64);
    /// The largest size queue `queue` accepts; 0 when it does not exist.
    fn max_queue_size(&mut self, queue: u16) -> u16;
    /// How rings must be placed.
    fn ring_placement(&self) -> RingPlacement;
    /// Gives queue `queue` its rings and enables it.
    fn queue_set(&mut self, queue: u16, layout: &RingLayout) -> Result<(), TransportError>;
    /// Whether queue `queue` is set up.
    fn queue_used(&mut self, queue: u16) -> bool;
    /// Where notifications for `queue` go.
    fn notify_target(&mut self, queue: u16) -> Result<NotifyTarget, TransportError>;
    /// The device status byte.
    fn status(&self) -> u8;
    /// Writes the device status byte (0 resets the device).
    fn set_status(&mut self, status: u8);
    /// Reads and acknowledges the interrupt status (bit 0: used buffers, bit 1: config change).
    fn ack_interrupt(&mut self) -> u32;
    /// The configuration generation (changes when the configuration does).
    fn config_generation(&self) -> u32;
    /// Reads configuration bytes at `offset` (byte by byte, volatile).
    fn read_config(&self, offset: usize, buf: &mut [u8]) -> Result<(), TransportError>;
    /// Writes configuration bytes at `offset`.
    fn write_config(&mut self, offset: usize, data: &[u8]) -> Result<(), TransportError>;

    /// Reads configuration bytes until the generation is stable around the read.
    fn read_config_consistent(&self, offset: usize, buf: &mut [u8]) -> Result<(), TransportError> {
        loop {
            let before = self.config_generation();
            self.read_config(offset, buf)?;
            if self.config_generation() == before {
                return Ok(());
            }
        }
    }
}

/// The part of a transport that setting up a queue uses: its size limit, where rings go, the
/// registers that take them, and where notifications go. Every [`Transport`] is one; a host
/// tool whose device is reached another way (a vhost-user frontend) implements just this.
pub trait QueueRegisters {
    /// The largest size queue `queue` accepts; 0 when it does not exist.
    fn max_queue_size(&mut self, queue: u16) -> u16;
    /// How rings must be placed.
    fn ring_placement(&self) -> RingPlacement;
    /// Gives queue `queue` its rings and enables it.
    fn queue_set(&mut self, queue: u16, layout: &RingLayout) -> Result<(), TransportError>;
    /// Where notifications for `queue` go.
    fn notify_target(&mut self, queue: u16) -> Result<NotifyTarget, TransportError>;
}

impl<T: Transport + ?Sized> QueueRegisters for T {
    fn max_queue_size(&mut self, queue: u16) -> u16 {
        Transport::max_queue_size(self, queue)
    }
    fn ring_placement(&self) -> RingPlacement {
        Transport::ring_placement(self)
    }
    fn queue_set(&mut self, queue: u16, layout: &RingLayout) -> Result<(), TransportError> {
        Transport::queue_set(self, queue, layout)
    }
    fn notify_target(&mut self, queue: u16) -> Result<NotifyTarget, TransportError> {
        Transport::notify_target(self, queue)
    }
}

/// Resets the device and negotiates features: the ones in `supported` the device offers (plus
/// VERSION_1 on modern transports). Leaves the device in FEATURES_OK (or DRIVER for a legacy
/// device); queues come next, then [`finish_init`].
pub fn begin_init<T: Transport + ?Sized>(transport: &mut T, supported: Features) -> Result<Features, TransportError> {
    transport.set_status(0);
    while transport.status() != 0 {
        core::hint::spin_loop();
    }
    transport.set_status(status::ACKNOWLEDGE);
    transport.set_status(status::ACKNOWLEDGE | status::DRIVER);
    let offered = Features(transport.read_device_features());
    let mut chosen = offered.intersect(supported.with(vf::VERSION_1));
    if transport.requires_version_1() {
        if !offered.has(vf::VERSION_1) {
            transport.set_status(status::FAILED);
            return Err(TransportError::NoVersion1);
        }
    } else {
        chosen = chosen.without(vf::VERSION_1);
    }
    transport.write_driver_features(chosen.0);
    if chosen.has(vf::VERSION_1) {
        transport.set_status(status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK);
        if transport.status() & status::FEATURES_OK == 0 {
            transport.set_status(status::FAILED);
            return Err(TransportError::FeaturesRefused(chosen.0));
        }
    }
    Ok(chosen)
}

/// Tells the device the driver is ready (DRIVER_OK).
pub fn finish_init<T: Transport + ?Sized>(transport: &mut T) {
    let current = transport.status();
    transport.set_status(current | status::DRIVER_OK);
}

/// Either transport, for kernels that drive devices found both ways without an allocator.
#[derive(Debug)]
pub enum AnyTransport {
    /// A virtio-mmio device.
    Mmio(mmio::MmioTransport),
    /// A virtio-pci device.
    Pci(pci::PciTransport),
}

macro_rules! delegate {
    ($self:ident, $t:ident => $call:expr) => {
        match $self {
            AnyTransport::Mmio($t) => $call,
            AnyTransport::Pci($t) => $call,
        }
    };
}

impl Transport for AnyTransport {
    fn device_id(&self) -> u32 {
        delegate!(self, t => t.device_id())
    }
    fn requires_version_1(&self) -> bool {
        delegate!(self, t => t.requires_version_1())
    }
    fn read_device_features(&mut self) -> u64 {
        delegate!(self, t => t.read_device_features())
    }
    fn write_driver_features(&mut self, features: u64) {
        delegate!(self, t => t.write_driver_features(features))
    }
    fn max_queue_size(&mut self, queue: u16) -> u16 {
        delegate!(self, t => Transport::max_queue_size(t, queue))
    }
    fn ring_placement(&self) -> RingPlacement {
        delegate!(self, t => Transport::ring_placement(t))
    }
    fn queue_set(&mut self, queue: u16, layout: &RingLayout) -> Result<(), TransportError> {
        delegate!(self, t => Transport::queue_set(t, queue, layout))
    }
    fn queue_used(&mut self, queue: u16) -> bool {
        delegate!(self, t => t.queue_used(queue))
    }
    fn notify_target(&mut self, queue: u16) -> Result<NotifyTarget, TransportError> {
        delegate!(self, t => Transport::notify_target(t, queue))
    }
    fn status(&self) -> u8 {
        delegate!(self, t => t.status())
    }
    fn set_status(&mut self, status: u8) {
        delegate!(self, t => t.set_status(status))
    }
    fn ack_interrupt(&mut self) -> u32 {
        delegate!(self, t => t.ack_interrupt())
    }
    fn config_generation(&self) -> u32 {
        delegate!(self, t => t.config_generation())
    }
    fn read_config(&self, offset: usize, buf: &mut [u8]) -> Result<(), TransportError> {
        delegate!(self, t => t.read_config(offset, buf))
    }
    fn write_config(&mut self, offset: usize, data: &[u8]) -> Result<(), TransportError> {
        delegate!(self, t => t.write_config(offset, data))
    }
}
