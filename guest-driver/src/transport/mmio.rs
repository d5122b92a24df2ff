//! virtio-mmio, version 2 (Firecracker, pvkit, QEMU with `force-legacy=false`) and legacy
//! version 1 (QEMU's default). Register offsets come from `protocol::mmio::Register`.

use super::{NotifyTarget, RingPlacement, Transport, TransportError};
use crate::protocol::mmio::{self, Register};
use crate::protocol::ring::{LEGACY_USED_ALIGN, RingLayout};
use core::ptr::NonNull;

/// Page size told to a legacy device; its queue addresses count in these pages.
const LEGACY_PAGE_SIZE: u32 = 4096;

/// A virtio-mmio device window.
#[derive(Debug)]
pub struct MmioTransport {
    base: NonNull<u8>,
    version: u32,
    device_id: u32,
}

// SAFETY: the window is device registers, accessed only with volatile reads and writes through
// `&self`/`&mut self`; moving the handle to another thread moves that access.
unsafe impl Send for MmioTransport {}

impl MmioTransport {
    /// Opens the window at `base` (mapped, e.g. by `Hal::mmio_phys_to_virt`, for
    /// `protocol::mmio::WINDOW_SIZE` bytes).
    ///
    /// # Safety
    ///
    /// `base` must point at a mapped virtio-mmio register window (or at memory that reads as
    /// something else, which is then refused), valid for the transport's lifetime, and no other
    /// transport may drive the same window.
    pub unsafe fn new(base: NonNull<u8>) -> Result<MmioTransport, TransportError> {
        let mut this = MmioTransport { base, version: 0, device_id: 0 };
        if this.read(Register::MagicValue) != mmio::MAGIC {
            return Err(TransportError::NotVirtio("virtio-mmio magic value missing"));
        }
        this.version = this.read(Register::Version);
        if this.version != mmio::VERSION_MODERN && this.version != mmio::VERSION_LEGACY {
            return Err(TransportError::NotVirtio("unknown virtio-mmio version"));
        }
        this.device_id = this.read(Register::DeviceId);
        if this.device_id == 0 {
            return Err(TransportError::EmptySlot);
        }
        if this.version == mmio::VERSION_LEGACY {
            this.write(Register::GuestPageSize, LEGACY_PAGE_SIZE);
        }
        Ok(this)
    }

    /// The transport version (1: legacy, 2: modern).
    pub fn version(&self) -> u32 {
        self.version
    }

    /// Reads any register as the device presents it (diagnostics, tests of a device's input
    /// checks); drivers use the [`Transport`] methods.
    pub fn read_register(&self, reg: Register) -> u32 {
        self.read(reg)
    }

    /// Writes any value to any register, sensible or not (tests of a device's input checks).
    pub fn write_register(&mut self, reg: Register, value: u32) {
        self.write(reg, value);
    }

    fn reg(&self, reg: Register) -> *mut u32 {
        // Register offsets are below the window size, so the pointer stays inside the window.
        self.base.as_ptr().wrapping_add(reg.offset() as usize).cast::<u32>()
    }

    fn read(&self, reg: Register) -> u32 {
        // SAFETY: `new`'s contract: the window is mapped and the register is inside it.
        unsafe { self.reg(reg).read_volatile() }
    }

    fn write(&mut self, reg: Register, value: u32) {
        // SAFETY: as in `read`.
        unsafe { self.reg(reg).write_volatile(value) }
    }
}

impl Transport for MmioTransport {
    fn device_id(&self) -> u32 {
        self.device_id
    }

    fn requires_version_1(&self) -> bool {
        self.version == mmio::VERSION_MODERN
    }

    fn read_device_features(&mut self) -> u64 {
        self.write(Register::DeviceFeaturesSel, 0);
        let low = self.read(Register::DeviceFeatures);
        self.write(Register::DeviceFeaturesSel, 1);
        let high = self.read(Register::DeviceFeatures);
        u64::from(high) << 32 | u64::from(low)
    }

    fn write_driver_features(&mut self, features: u64) {
        self.write(Register::DriverFeaturesSel, 0);
        self.write(Register::DriverFeatures, features as u32);
        self.write(Register::DriverFeaturesSel, 1);
        self.write(Register::DriverFeatures, (features >> 32) as u32);
    }

    fn max_queue_size(&mut self, queue: u16) -> u16 {
        self.write(Register::QueueSel, queue.into());
        self.read(Register::QueueNumMax).min(u32::from(u16::MAX)) as u16
    }

    fn ring_placement(&self) -> RingPlacement {
        if self.version == mmio::VERSION_LEGACY {
            RingPlacement::Contiguous { used_align: LEGACY_USED_ALIGN }
        } else {
            RingPlacement::Separate
        }
    }

    fn queue_set(&mut self, queue: u16, layout: &RingLayout) -> Result<(), TransportError> {
        if self.queue_used(queue) {
            return Err(TransportError::QueueInUse(queue));
        }
        let max = self.max_queue_size(queue);
        if max == 0 || layout.size > max {
            return Err(TransportError::NoSuchQueue(queue));
        }
        self.write(Register::QueueSel, queue.into());
        self.write(Register::QueueNum, layout.size.into());
        if self.version == mmio::VERSION_LEGACY {
            let expected = RingLayout::contiguous(layout.desc, layout.size, LEGACY_USED_ALIGN);
            let pfn = layout.desc / u64::from(LEGACY_PAGE_SIZE);
            if expected != Ok(*layout)
                || !layout.desc.is_multiple_of(u64::from(LEGACY_PAGE_SIZE))
                || pfn > u64::from(u32::MAX)
            {
                return Err(TransportError::BadLayout(queue));
            }
            self.write(Register::QueueAlign, LEGACY_USED_ALIGN as u32);
            self.write(Register::QueuePfn, pfn as u32);
        } else {
            self.write(Register::QueueDescLow, layout.desc as u32);
            self.write(Register::QueueDescHigh, (layout.desc >> 32) as u32);
            self.write(Register::QueueDriverLow, layout.avail as u32);
            self.write(Register::QueueDriverHigh, (layout.avail >> 32) as u32);
            self.write(Register::QueueDeviceLow, layout.used as u32);
            self.write(Register::QueueDeviceHigh, (layout.used >> 32) as u32);
            self.write(Register::QueueReady, 1);
        }
        Ok(())
    }

    fn queue_used(&mut self, queue: u16) -> bool {
        self.write(Register::QueueSel, queue.into());
        if self.version == mmio::VERSION_LEGACY {
            self.read(Register::QueuePfn) != 0
        } else {
            self.read(Register::QueueReady) != 0
        }
    }

    fn notify_target(&mut self, queue: u16) -> Result<NotifyTarget, TransportError> {
        if self.max_queue_size(queue) == 0 {
            return Err(TransportError::NoSuchQueue(queue));
        }
        NonNull::new(self.reg(Register::QueueNotify))
            .map(NotifyTarget::Mmio32)
            .ok_or(TransportError::NoSuchQueue(queue))
    }

    fn status(&self) -> u8 {
        self.read(Register::Status) as u8
    }

    fn set_status(&mut self, status: u8) {
        self.write(Register::Status, status.into());
    }

    fn ack_interrupt(&mut self) -> u32 {
        let isr = self.read(Register::InterruptStatus);
        if isr != 0 {
            self.write(Register::InterruptAck, isr);
        }
        isr
    }

    fn config_generation(&self) -> u32 {
        if self.version == mmio::VERSION_LEGACY { 0 } else { self.read(Register::ConfigGeneration) }
    }

    fn read_config(&self, offset: usize, buf: &mut [u8]) -> Result<(), TransportError> {
        let window = (mmio::WINDOW_SIZE - mmio::CONFIG_OFFSET) as usize;
        if offset.checked_add(buf.len()).is_none_or(|end| end > window) {
            return Err(TransportError::ConfigOutOfRange { offset, len: buf.len() });
        }
        for (i, byte) in buf.iter_mut().enumerate() {
            let at = self.base.as_ptr().wrapping_add(mmio::CONFIG_OFFSET as usize + offset + i);
            // SAFETY: inside the mapped window (checked above).
            *byte = unsafe { at.read_volatile() };
        }
        Ok(())
    }

    fn write_config(&mut self, offset: usize, data: &[u8]) -> Result<(), TransportError> {
        let window = (mmio::WINDOW_SIZE - mmio::CONFIG_OFFSET) as usize;
        if offset.checked_add(data.len()).is_none_or(|end| end > window) {
            return Err(TransportError::ConfigOutOfRange { offset, len: data.len() });
        }
        for (i, byte) in data.iter().enumerate() {
            let at = self.base.as_ptr().wrapping_add(mmio::CONFIG_OFFSET as usize + offset + i);
            // SAFETY: inside the mapped window (checked above).
            unsafe { at.write_volatile(*byte) };
        }
        Ok(())
    }
}
