//! virtio-pci, modern (virtio 1.x) devices: capability parsing through a configuration-space
//! access trait, with the legacy x86 port mechanism (0xCF8/0xCFC) and ECAM (memory-mapped)
//! implementations.

use super::{NotifyTarget, RingPlacement, Transport, TransportError};
use crate::hal::{Hal, PhysAddr};
use crate::protocol::ring::RingLayout;
use core::ptr::NonNull;

/// Red Hat's vendor id, which every virtio-pci device carries.
pub const VIRTIO_VENDOR_ID: u16 = 0x1af4;
/// Modern device ids are this plus the virtio device type.
pub const MODERN_DEVICE_ID_BASE: u16 = 0x1040;

/// A PCI function's address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bdf {
    /// Bus.
    pub bus: u8,
    /// Device (0..32).
    pub device: u8,
    /// Function (0..8).
    pub function: u8,
}

/// Access to PCI configuration space.
pub trait ConfigSpace {
    /// Reads the aligned 32-bit word at `offset` of `bdf`'s configuration space.
    fn read32(&self, bdf: Bdf, offset: u16) -> u32;
    /// Writes the aligned 32-bit word at `offset`.
    fn write32(&self, bdf: Bdf, offset: u16, value: u32);

    /// Reads a byte.
    fn read8(&self, bdf: Bdf, offset: u16) -> u8 {
        (self.read32(bdf, offset & !3) >> ((offset & 3) * 8)) as u8
    }

    /// Reads a 16-bit value.
    fn read16(&self, bdf: Bdf, offset: u16) -> u16 {
        (self.read32(bdf, offset & !3) >> ((offset & 2) * 8)) as u16
    }
}

/// The x86 port mechanism: address to 0xCF8, data at 0xCFC.
#[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
#[derive(Debug, Default, Clone, Copy)]
pub struct PortConfigSpace;

#[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
impl PortConfigSpace {
    fn address(bdf: Bdf, offset: u16) -> u32 {
        0x8000_0000
            | u32::from(bdf.bus) << 16
            | u32::from(bdf.device & 31) << 11
            | u32::from(bdf.function & 7) << 8
            | u32::from(offset & 0xfc)
    }
}

#[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
impl ConfigSpace for PortConfigSpace {
    fn read32(&self, bdf: Bdf, offset: u16) -> u32 {
        let value: u32;
        // SAFETY: the configuration-address and -data ports only select and move PCI
        // configuration words; no memory is touched.
        unsafe {
            core::arch::asm!("out dx, eax", in("dx") 0xcf8u16, in("eax") Self::address(bdf, offset), options(nomem, nostack));
            core::arch::asm!("in eax, dx", in("dx") 0xcfcu16, out("eax") value, options(nomem, nostack));
        }
        value
    }

    fn write32(&self, bdf: Bdf, offset: u16, value: u32) {
        // SAFETY: as in `read32`.
        unsafe {
            core::arch::asm!("out dx, eax", in("dx") 0xcf8u16, in("eax") Self::address(bdf, offset), options(nomem, nostack));
            core::arch::asm!("out dx, eax", in("dx") 0xcfcu16, in("eax") value, options(nomem, nostack));
        }
    }
}

/// ECAM: every function's 4 KiB of configuration space mapped in memory.
#[derive(Debug, Clone, Copy)]
pub struct EcamConfigSpace {
    base: NonNull<u8>,
}

impl EcamConfigSpace {
    /// ECAM at `base`, covering the buses a caller will ask for.
    ///
    /// # Safety
    ///
    /// `base` must map the ECAM region for every bus the caller passes to the accessors.
    pub unsafe fn new(base: NonNull<u8>) -> EcamConfigSpace {
        EcamConfigSpace { base }
    }

    fn word(&self, bdf: Bdf, offset: u16) -> *mut u32 {
        let at = (usize::from(bdf.bus) << 20)
            | (usize::from(bdf.device & 31) << 15)
            | (usize::from(bdf.function & 7) << 12)
            | usize::from(offset & 0xffc);
        self.base.as_ptr().wrapping_add(at).cast()
    }
}

impl ConfigSpace for EcamConfigSpace {
    fn read32(&self, bdf: Bdf, offset: u16) -> u32 {
        // SAFETY: `new`'s contract maps this function's configuration space.
        unsafe { self.word(bdf, offset).read_volatile() }
    }

    fn write32(&self, bdf: Bdf, offset: u16, value: u32) {
        // SAFETY: as in `read32`.
        unsafe { self.word(bdf, offset).write_volatile(value) }
    }
}

/// Transitional device ids (legacy-capable devices) start here; their type is the subsystem id.
pub const TRANSITIONAL_DEVICE_ID_BASE: u16 = 0x1000;

/// The virtio device type of the function at `bdf`, if it is a virtio-pci device: modern
/// (0x1040 + type) or transitional (0x1000..0x103f, the type in the subsystem id; its modern
/// capabilities are used, never the legacy I/O BAR).
pub fn virtio_device_type(config: &dyn ConfigSpace, bdf: Bdf) -> Option<u32> {
    let id = config.read32(bdf, 0);
    let (vendor, device) = (id as u16, (id >> 16) as u16);
    if vendor != VIRTIO_VENDOR_ID {
        return None;
    }
    if (MODERN_DEVICE_ID_BASE..=MODERN_DEVICE_ID_BASE + 0x3f).contains(&device) {
        return Some(u32::from(device - MODERN_DEVICE_ID_BASE));
    }
    if (TRANSITIONAL_DEVICE_ID_BASE..MODERN_DEVICE_ID_BASE).contains(&device) {
        let subsystem = config.read16(bdf, 0x2e);
        return (subsystem != 0).then_some(u32::from(subsystem));
    }
    None
}

mod cap {
    pub const VENDOR: u8 = 0x09;
    pub const MSIX: u8 = 0x11;
    pub const COMMON: u8 = 1;
    pub const NOTIFY: u8 = 2;
    pub const ISR: u8 = 3;
    pub const DEVICE: u8 = 4;
}

mod common {
    pub const DEVICE_FEATURE_SELECT: usize = 0;
    pub const DEVICE_FEATURE: usize = 4;
    pub const DRIVER_FEATURE_SELECT: usize = 8;
    pub const DRIVER_FEATURE: usize = 12;
    pub const MSIX_CONFIG: usize = 16;
    pub const NUM_QUEUES: usize = 18;
    pub const DEVICE_STATUS: usize = 20;
    pub const CONFIG_GENERATION: usize = 21;
    pub const QUEUE_SELECT: usize = 22;
    pub const QUEUE_SIZE: usize = 24;
    pub const QUEUE_MSIX_VECTOR: usize = 26;
    pub const QUEUE_ENABLE: usize = 28;
    pub const QUEUE_NOTIFY_OFF: usize = 30;
    pub const QUEUE_DESC: usize = 32;
    pub const QUEUE_DRIVER: usize = 40;
    pub const QUEUE_DEVICE: usize = 48;
}

/// MSI-X vector value meaning "no vector".
pub const NO_VECTOR: u16 = 0xffff;

/// A modern virtio-pci device.
#[derive(Debug)]
pub struct PciTransport {
    device_type: u32,
    bdf: Bdf,
    common: NonNull<u8>,
    notify: NonNull<u8>,
    notify_multiplier: u32,
    isr: NonNull<u8>,
    device: Option<(NonNull<u8>, usize)>,
    msix: Option<MsixTable>,
}

/// The device's MSI-X table.
#[derive(Debug, Clone, Copy)]
pub struct MsixTable {
    table: NonNull<u8>,
    entries: u16,
    capability: u16,
}

// SAFETY: all pointers name the device's BAR registers, used only for volatile accesses
// through `&self`/`&mut self`.
unsafe impl Send for PciTransport {}

impl PciTransport {
    /// Finds the device's virtio capabilities, enables memory decoding and bus mastering, and
    /// maps the regions with `H`.
    pub fn new<H: Hal>(config: &dyn ConfigSpace, bdf: Bdf) -> Result<PciTransport, TransportError> {
        let device_type =
            virtio_device_type(config, bdf).ok_or(TransportError::NotVirtio("not a virtio-pci device"))?;
        let status = config.read16(bdf, 6);
        if status & 0x10 == 0 {
            return Err(TransportError::MissingCapability("capability list"));
        }
        // Memory space and bus master; zeros written to the status half clear nothing (its
        // bits are write-one-to-clear).
        let command = config.read32(bdf, 4);
        config.write32(bdf, 4, (command & 0xffff) | 0x6);
        let (mut common_cfg, mut notify, mut isr, mut device, mut msix) = (None, None, None, None, None);
        let mut multiplier = 0;
        let mut pointer = u16::from(config.read8(bdf, 0x34) & 0xfc);
        let mut guard = 0;
        while pointer != 0 && guard < 48 {
            guard += 1;
            let id = config.read8(bdf, pointer);
            if id == cap::VENDOR {
                let cfg_type = config.read8(bdf, pointer + 3);
                let bar = config.read8(bdf, pointer + 4);
                let offset = config.read32(bdf, pointer + 8);
                let length = config.read32(bdf, pointer + 12);
                let region = (bar, offset, length);
                match cfg_type {
                    cap::COMMON if common_cfg.is_none() => common_cfg = Some(region),
                    cap::NOTIFY if notify.is_none() => {
                        notify = Some(region);
                        multiplier = config.read32(bdf, pointer + 16);
                    }
                    cap::ISR if isr.is_none() => isr = Some(region),
                    cap::DEVICE if device.is_none() => device = Some(region),
                    _ => {}
                }
            } else if id == cap::MSIX && msix.is_none() {
                let control = config.read16(bdf, pointer + 2);
                let table = config.read32(bdf, pointer + 4);
                msix = Some((pointer, (control & 0x7ff) + 1, (table & 7) as u8, table & !7));
            }
            pointer = u16::from(config.read8(bdf, pointer + 1) & 0xfc);
        }
        let map = |region: Option<(u8, u32, u32)>, name| -> Result<(NonNull<u8>, usize), TransportError> {
            let (bar, offset, length) = region.ok_or(TransportError::MissingCapability(name))?;
            let base = bar_address(config, bdf, bar)?;
            let addr = base + u64::from(offset);
            Ok((H::mmio_phys_to_virt(addr, length as usize), length as usize))
        };
        let (common, _) = map(common_cfg, "common configuration")?;
        let (notify_ptr, _) = map(notify, "notification")?;
        let (isr_ptr, _) = map(isr, "ISR status")?;
        let device = if device.is_some() { Some(map(device, "device configuration")?) } else { None };
        let msix = match msix {
            Some((capability, entries, bar, offset)) => {
                let base = bar_address(config, bdf, bar)?;
                let table = H::mmio_phys_to_virt(base + u64::from(offset), usize::from(entries) * 16);
                Some(MsixTable { table, entries, capability })
            }
            None => None,
        };
        Ok(PciTransport {
            device_type,
            bdf,
            common,
            notify: notify_ptr,
            notify_multiplier: multiplier,
            isr: isr_ptr,
            device,
            msix,
        })
    }

    /// Where the function sits.
    pub fn bdf(&self) -> Bdf {
        self.bdf
    }

    /// The MSI-X table, if the device has one.
    pub fn msix(&self) -> Option<MsixTable> {
        self.msix
    }

    /// Points MSI-X entry `entry` at `address`/`data`, unmasked, enables MSI-X on the function,
    /// and routes queue `queue` (or the configuration interrupt, for `None`) to that entry.
    pub fn route_msix(
        &mut self,
        config: &dyn ConfigSpace,
        entry: u16,
        address: u64,
        data: u32,
        queue: Option<u16>,
    ) -> Result<(), TransportError> {
        let msix = self.msix.ok_or(TransportError::MissingCapability("MSI-X"))?;
        if entry >= msix.entries {
            return Err(TransportError::MissingCapability("MSI-X entry"));
        }
        let slot = msix.table.as_ptr().wrapping_add(usize::from(entry) * 16).cast::<u32>();
        // SAFETY: the table was mapped for `entries` 16-byte entries and `entry` is below that.
        unsafe {
            slot.write_volatile(address as u32);
            slot.add(1).write_volatile((address >> 32) as u32);
            slot.add(2).write_volatile(data);
            slot.add(3).write_volatile(0);
        }
        let control = config.read32(self.bdf, msix.capability);
        config.write32(self.bdf, msix.capability, control | 1 << 31);
        match queue {
            Some(q) => {
                self.write16(common::QUEUE_SELECT, q);
                self.write16(common::QUEUE_MSIX_VECTOR, entry);
            }
            None => self.write16(common::MSIX_CONFIG, entry),
        }
        Ok(())
    }

    fn at(&self, offset: usize) -> *mut u8 {
        self.common.as_ptr().wrapping_add(offset)
    }

    fn read8(&self, offset: usize) -> u8 {
        // SAFETY: offsets below 56 lie inside the common configuration structure, mapped in `new`.
        unsafe { self.at(offset).read_volatile() }
    }
    fn write8(&mut self, offset: usize, value: u8) {
        // SAFETY: as in `read8`.
        unsafe { self.at(offset).write_volatile(value) }
    }
    fn read16(&self, offset: usize) -> u16 {
        // SAFETY: as in `read8`; the offsets used are 2-aligned.
        unsafe { self.at(offset).cast::<u16>().read_volatile() }
    }
    fn write16(&mut self, offset: usize, value: u16) {
        // SAFETY: as in `read16`.
        unsafe { self.at(offset).cast::<u16>().write_volatile(value) }
    }
    fn read32(&self, offset: usize) -> u32 {
        // SAFETY: as in `read8`; the offsets used are 4-aligned.
        unsafe { self.at(offset).cast::<u32>().read_volatile() }
    }
    fn write32(&mut self, offset: usize, value: u32) {
        // SAFETY: as in `read32`.
        unsafe { self.at(offset).cast::<u32>().write_volatile(value) }
    }
    fn write64(&mut self, offset: usize, value: u64) {
        self.write32(offset, value as u32);
        self.write32(offset + 4, (value >> 32) as u32);
    }
}

/// The physical address a memory BAR decodes (64-bit BARs included).
fn bar_address(config: &dyn ConfigSpace, bdf: Bdf, bar: u8) -> Result<PhysAddr, TransportError> {
    if bar > 5 {
        return Err(TransportError::BadBar(bar));
    }
    let offset = 0x10 + u16::from(bar) * 4;
    let low = config.read32(bdf, offset);
    if low & 1 != 0 {
        return Err(TransportError::BadBar(bar));
    }
    let mut addr = u64::from(low & !0xf);
    if (low >> 1) & 3 == 2 {
        if bar == 5 {
            return Err(TransportError::BadBar(bar));
        }
        addr |= u64::from(config.read32(bdf, offset + 4)) << 32;
    }
    if addr == 0 {
        return Err(TransportError::BadBar(bar));
    }
    Ok(addr)
}

impl Transport for PciTransport {
    fn device_id(&self) -> u32 {
        self.device_type
    }

    fn requires_version_1(&self) -> bool {
        true
    }

    fn read_device_features(&mut self) -> u64 {
        self.write32(common::DEVICE_FEATURE_SELECT, 0);
        let low = self.read32(common::DEVICE_FEATURE);
        self.write32(common::DEVICE_FEATURE_SELECT, 1);
        let high = self.read32(common::DEVICE_FEATURE);
        u64::from(high) << 32 | u64::from(low)
    }

    fn write_driver_features(&mut self, features: u64) {
        self.write32(common::DRIVER_FEATURE_SELECT, 0);
        self.write32(common::DRIVER_FEATURE, features as u32);
        self.write32(common::DRIVER_FEATURE_SELECT, 1);
        self.write32(common::DRIVER_FEATURE, (features >> 32) as u32);
    }

    fn max_queue_size(&mut self, queue: u16) -> u16 {
        if queue >= self.read16(common::NUM_QUEUES) {
            return 0;
        }
        self.write16(common::QUEUE_SELECT, queue);
        self.read16(common::QUEUE_SIZE)
    }

    fn ring_placement(&self) -> RingPlacement {
        RingPlacement::Separate
    }

    fn queue_set(&mut self, queue: u16, layout: &RingLayout) -> Result<(), TransportError> {
        let max = self.max_queue_size(queue);
        if max == 0 || layout.size > max {
            return Err(TransportError::NoSuchQueue(queue));
        }
        if self.queue_used(queue) {
            return Err(TransportError::QueueInUse(queue));
        }
        self.write16(common::QUEUE_SELECT, queue);
        self.write16(common::QUEUE_SIZE, layout.size);
        self.write64(common::QUEUE_DESC, layout.desc);
        self.write64(common::QUEUE_DRIVER, layout.avail);
        self.write64(common::QUEUE_DEVICE, layout.used);
        self.write16(common::QUEUE_ENABLE, 1);
        Ok(())
    }

    fn queue_used(&mut self, queue: u16) -> bool {
        self.write16(common::QUEUE_SELECT, queue);
        self.read16(common::QUEUE_ENABLE) != 0
    }

    fn notify_target(&mut self, queue: u16) -> Result<NotifyTarget, TransportError> {
        if self.max_queue_size(queue) == 0 {
            return Err(TransportError::NoSuchQueue(queue));
        }
        self.write16(common::QUEUE_SELECT, queue);
        let offset = usize::from(self.read16(common::QUEUE_NOTIFY_OFF)) * self.notify_multiplier as usize;
        NonNull::new(self.notify.as_ptr().wrapping_add(offset).cast::<u16>())
            .map(NotifyTarget::Pci16)
            .ok_or(TransportError::NoSuchQueue(queue))
    }

    fn status(&self) -> u8 {
        self.read8(common::DEVICE_STATUS)
    }

    fn set_status(&mut self, status: u8) {
        self.write8(common::DEVICE_STATUS, status);
    }

    fn ack_interrupt(&mut self) -> u32 {
        // SAFETY: the ISR byte was mapped in `new`; reading it acknowledges the interrupt.
        u32::from(unsafe { self.isr.as_ptr().read_volatile() })
    }

    fn config_generation(&self) -> u32 {
        u32::from(self.read8(common::CONFIG_GENERATION))
    }

    fn read_config(&self, offset: usize, buf: &mut [u8]) -> Result<(), TransportError> {
        let (base, len) = self.device.ok_or(TransportError::ConfigOutOfRange { offset, len: buf.len() })?;
        if offset.checked_add(buf.len()).is_none_or(|end| end > len) {
            return Err(TransportError::ConfigOutOfRange { offset, len: buf.len() });
        }
        for (i, byte) in buf.iter_mut().enumerate() {
            // SAFETY: inside the mapped device configuration (checked above).
            *byte = unsafe { base.as_ptr().add(offset + i).read_volatile() };
        }
        Ok(())
    }

    fn write_config(&mut self, offset: usize, data: &[u8]) -> Result<(), TransportError> {
        let (base, len) = self.device.ok_or(TransportError::ConfigOutOfRange { offset, len: data.len() })?;
        if offset.checked_add(data.len()).is_none_or(|end| end > len) {
            return Err(TransportError::ConfigOutOfRange { offset, len: data.len() });
        }
        for (i, byte) in data.iter().enumerate() {
            // SAFETY: inside the mapped device configuration (checked above).
            unsafe { base.as_ptr().add(offset + i).write_volatile(*byte) };
        }
        Ok(())
    }
}
