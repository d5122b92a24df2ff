//! The virtio-mmio (version 2) transport as the guest sees it: registers, feature and queue
//! configuration, status transitions. Pure state: the VMM turns its [`Effect`]s into
//! vhost-user messages. Anything a guest writes that makes no sense marks the device
//! DEVICE_NEEDS_RESET (and nothing else happens until the guest resets it); the VMM keeps
//! running.

use pvkit_protocol::mmio::{self, Register, WindowOffset, interrupt};
use pvkit_protocol::ring;
use pvkit_protocol::virtio::{DeviceStatus, status};

/// One queue as the driver configured it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct QueueConfig {
    /// Largest size the device accepts.
    pub max_size: u16,
    /// Size the driver chose.
    pub size: u16,
    /// Whether the driver enabled it.
    pub ready: bool,
    /// Descriptor table (guest physical).
    pub desc: u64,
    /// Available ring.
    pub avail: u64,
    /// Used ring.
    pub used: u64,
}

/// What the VMM must do after an access.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// Nothing.
    None,
    /// The driver set DRIVER_OK: start the backend's rings.
    Activate,
    /// The driver reset the device: stop the backend's rings.
    Reset,
    /// The guest broke the protocol; the device now reports DEVICE_NEEDS_RESET.
    Broken(String),
    /// A configuration-space read at this offset (answered by the backend).
    ConfigRead(u64),
    /// A configuration-space write.
    ConfigWrite(u64),
}

/// The transport state of one device.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct MmioTransportState {
    device_id: u32,
    device_features: u64,
    driver_features: u64,
    negotiated: u64,
    device_features_sel: u32,
    driver_features_sel: u32,
    queue_sel: u32,
    queues: Vec<QueueConfig>,
    status: u8,
    config_generation: u32,
    config_pending: bool,
    ram_size: u64,
}

impl MmioTransportState {
    /// A device of type `device_id` offering `device_features`, with queues of at most
    /// `max_sizes[i]` entries, in a guest with `ram_size` bytes of RAM.
    pub fn new(device_id: u32, device_features: u64, max_sizes: &[u16], ram_size: u64) -> MmioTransportState {
        MmioTransportState {
            device_id,
            device_features,
            driver_features: 0,
            negotiated: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            queue_sel: 0,
            queues: max_sizes.iter().map(|&max_size| QueueConfig { max_size, ..Default::default() }).collect(),
            status: 0,
            config_generation: 0,
            config_pending: false,
            ram_size,
        }
    }

    /// The device type.
    pub fn device_id(&self) -> u32 {
        self.device_id
    }

    /// The features offered to the driver.
    pub fn device_features(&self) -> u64 {
        self.device_features
    }

    /// The configuration generation.
    pub fn config_generation(&self) -> u32 {
        self.config_generation
    }

    /// The interrupt status as the guest would read it.
    pub fn interrupt_status(&self) -> u32 {
        (if self.is_live() { interrupt::VRING } else { 0 }) | if self.config_pending { interrupt::CONFIG } else { 0 }
    }

    /// Checks a transport state read back from a snapshot against the device it is restored
    /// onto: the same type, features the backend offers, queues it serves, rings inside
    /// guest memory of `ram_size` bytes.
    pub fn check_restorable(&self, offered: u64, queues: usize, ram_size: u64) -> Result<(), String> {
        if self.ram_size != ram_size {
            return Err(format!("saved for {} bytes of guest memory, not {ram_size}", self.ram_size));
        }
        if self.driver_features & !offered != 0 {
            return Err(format!(
                "the driver acknowledged {:#x}; the backend offers {offered:#x}",
                self.driver_features
            ));
        }
        if self.queues.len() > queues {
            return Err(format!("{} queues were saved; the backend serves {queues}", self.queues.len()));
        }
        for (index, q) in self.queues.iter().enumerate().filter(|(_, q)| q.ready) {
            check_rings(q, ram_size).map_err(|why| format!("queue {index}: {why}"))?;
        }
        Ok(())
    }

    /// The features the driver acknowledged.
    pub fn driver_features(&self) -> u64 {
        self.driver_features
    }

    /// The features of the last activation (kept after a reset, for reports).
    pub fn negotiated_features(&self) -> u64 {
        self.negotiated
    }

    /// The queues.
    pub fn queues(&self) -> &[QueueConfig] {
        &self.queues
    }

    /// The status byte.
    pub fn status(&self) -> u8 {
        self.status
    }

    /// Whether the driver has set DRIVER_OK and the device is not broken.
    pub fn is_live(&self) -> bool {
        DeviceStatus::new(self.status).is_ok_and(DeviceStatus::is_live)
    }

    /// Marks the device as needing a reset (a protocol violation, a backend that went away).
    pub fn mark_broken(&mut self) {
        self.status |= status::DEVICE_NEEDS_RESET;
        self.config_pending = true;
    }

    /// Clears DEVICE_NEEDS_RESET after the backend's rings were restored.
    pub fn clear_broken(&mut self) {
        self.status &= !status::DEVICE_NEEDS_RESET;
    }

    /// Notes a configuration change (the config interrupt bit, a new generation).
    pub fn config_changed(&mut self) {
        self.config_generation = self.config_generation.wrapping_add(1);
        self.config_pending = true;
    }

    fn broken(&mut self, why: String) -> Effect {
        self.mark_broken();
        Effect::Broken(why)
    }

    fn selected(&mut self) -> Option<&mut QueueConfig> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    /// A guest read of `data.len()` bytes at `offset` in the window.
    pub fn read(&mut self, offset: u64, data: &mut [u8]) -> Effect {
        let offset = match WindowOffset::classify(offset) {
            WindowOffset::Register(offset) => offset,
            WindowOffset::Config(offset) => return Effect::ConfigRead(offset),
            WindowOffset::Outside(_) => {
                data.fill(0);
                return Effect::None;
            }
        };
        let value = match Register::decode(offset, data.len(), false, mmio::VERSION_MODERN) {
            Ok(reg) => match reg {
                Register::MagicValue => mmio::MAGIC,
                Register::Version => mmio::VERSION_MODERN,
                Register::DeviceId => self.device_id,
                Register::VendorId => mmio::PVKIT_VENDOR_ID,
                Register::DeviceFeatures => match self.device_features_sel {
                    0 => self.device_features as u32,
                    1 => (self.device_features >> 32) as u32,
                    _ => 0,
                },
                Register::QueueNumMax => self.selected().map_or(0, |q| u32::from(q.max_size)),
                Register::QueueReady => self.selected().map_or(0, |q| u32::from(q.ready)),
                // The VMM never sees the backend's used-buffer signals (they go straight to KVM
                // as irqfds), so VRING is reported while the device is live.
                Register::InterruptStatus => self.interrupt_status(),
                Register::Status => u32::from(self.status),
                Register::ConfigGeneration => self.config_generation,
                _ => 0,
            },
            Err(e) => {
                data.fill(0);
                return self.broken(format!("guest read: {e}"));
            }
        };
        let bytes = value.to_le_bytes();
        let n = data.len().min(4);
        data[..n].copy_from_slice(&bytes[..n]);
        Effect::None
    }

    /// A guest write of `data` at `offset` in the window.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> Effect {
        let offset = match WindowOffset::classify(offset) {
            WindowOffset::Register(offset) => offset,
            WindowOffset::Config(offset) => return Effect::ConfigWrite(offset),
            WindowOffset::Outside(offset) => return self.broken(format!("write outside the window at {offset:#x}")),
        };
        let reg = match Register::decode(offset, data.len(), true, mmio::VERSION_MODERN) {
            Ok(reg) => reg,
            Err(e) => return self.broken(format!("guest write: {e}")),
        };
        let mut raw = [0u8; 4];
        raw.copy_from_slice(&data[..4]);
        let value = u32::from_le_bytes(raw);
        // After a protocol violation, only a reset is listened to.
        if self.status & status::DEVICE_NEEDS_RESET != 0 && !(reg == Register::Status && value == 0) {
            return Effect::None;
        }
        let configuring = self.status & status::DRIVER_OK == 0;
        match reg {
            Register::DeviceFeaturesSel => self.device_features_sel = value,
            Register::DriverFeaturesSel => self.driver_features_sel = value,
            Register::DriverFeatures => {
                if self.status & status::FEATURES_OK != 0 {
                    return self.broken("features written after FEATURES_OK".into());
                }
                match self.driver_features_sel {
                    0 => self.driver_features = (self.driver_features & !0xffff_ffff) | u64::from(value),
                    1 => self.driver_features = (self.driver_features & 0xffff_ffff) | u64::from(value) << 32,
                    _ => {}
                }
            }
            Register::QueueSel => self.queue_sel = value,
            Register::QueueNum => {
                let Some(q) = self.queues.get(self.queue_sel as usize).copied() else {
                    return self.broken(format!("QueueNum for queue {}, which does not exist", self.queue_sel));
                };
                if !configuring || q.ready {
                    return self.broken("QueueNum written to a live queue".into());
                }
                if value == 0 || !value.is_power_of_two() || value > u32::from(q.max_size) {
                    return self.broken(format!("queue size {value} (not a power of two up to {})", q.max_size));
                }
                if let Some(q) = self.selected() {
                    q.size = value as u16;
                }
            }
            Register::QueueDescLow
            | Register::QueueDescHigh
            | Register::QueueDriverLow
            | Register::QueueDriverHigh
            | Register::QueueDeviceLow
            | Register::QueueDeviceHigh => {
                let sel = self.queue_sel;
                let Some(q) = self.selected() else {
                    return self.broken(format!("ring address for queue {sel}, which does not exist"));
                };
                if q.ready {
                    return self.broken("ring address written to a ready queue".into());
                }
                let (field, high) = match reg {
                    Register::QueueDescLow => (&mut q.desc, false),
                    Register::QueueDescHigh => (&mut q.desc, true),
                    Register::QueueDriverLow => (&mut q.avail, false),
                    Register::QueueDriverHigh => (&mut q.avail, true),
                    Register::QueueDeviceLow => (&mut q.used, false),
                    _ => (&mut q.used, true),
                };
                *field = if high {
                    (*field & 0xffff_ffff) | u64::from(value) << 32
                } else {
                    (*field & !0xffff_ffff) | u64::from(value)
                };
            }
            Register::QueueReady => {
                let ram = self.ram_size;
                let sel = self.queue_sel;
                let Some(q) = self.selected() else {
                    return self.broken(format!("QueueReady for queue {sel}, which does not exist"));
                };
                if value == 0 {
                    q.ready = false;
                    return Effect::None;
                }
                let q = *q;
                if let Err(why) = check_rings(&q, ram) {
                    return self.broken(format!("queue {sel}: {why}"));
                }
                if let Some(q) = self.selected() {
                    q.ready = true;
                }
            }
            // Notifies for real queues are caught by ioeventfds and never come here.
            Register::QueueNotify if value as usize >= self.queues.len() => {
                return self.broken(format!("notify for queue {value}, which does not exist"));
            }
            Register::InterruptAck if value & interrupt::CONFIG != 0 => self.config_pending = false,
            Register::Status => return self.write_status(value),
            Register::QueueReset | Register::ShmSel => {}
            _ => {}
        }
        Effect::None
    }

    fn write_status(&mut self, value: u32) -> Effect {
        if value == 0 {
            let was_live = self.status & status::DRIVER_OK != 0;
            self.status = 0;
            self.driver_features = 0;
            self.config_pending = false;
            for q in &mut self.queues {
                *q = QueueConfig { max_size: q.max_size, ..Default::default() };
            }
            return if was_live { Effect::Reset } else { Effect::None };
        }
        let Ok(next) = u8::try_from(value).map_err(|_| ()).and_then(|v| DeviceStatus::new(v).map_err(|_| ())) else {
            return self.broken(format!("status {value:#x} has undefined bits"));
        };
        let current = DeviceStatus::new(self.status).unwrap_or(DeviceStatus::RESET);
        if !current.may_become(next) {
            return self.broken(format!("status {:#x} cannot become {value:#x}", self.status));
        }
        if next.has(status::FEATURES_OK) && !current.has(status::FEATURES_OK) {
            // Only offered features may be accepted; otherwise FEATURES_OK does not stick.
            if self.driver_features & !self.device_features != 0 {
                self.status = next.raw() & !status::FEATURES_OK;
                return Effect::None;
            }
        }
        let activate = next.has(status::DRIVER_OK) && !current.has(status::DRIVER_OK);
        if activate {
            self.negotiated = self.driver_features;
        }
        self.status = next.raw();
        if activate { Effect::Activate } else { Effect::None }
    }
}

/// Checks a queue the driver wants to enable: a size, aligned rings, all inside guest RAM.
fn check_rings(q: &QueueConfig, ram_size: u64) -> Result<(), String> {
    if q.size == 0 {
        return Err("no size set".into());
    }
    let parts = [
        ("descriptor table", q.desc, ring::DESC_ALIGN, ring::desc_table_size(q.size)),
        ("available ring", q.avail, ring::AVAIL_ALIGN, ring::avail_ring_size(q.size)),
        ("used ring", q.used, ring::USED_ALIGN, ring::used_ring_size(q.size)),
    ];
    for (name, addr, align, len) in parts {
        if !addr.is_multiple_of(align) {
            return Err(format!("{name} at {addr:#x} is not {align}-byte aligned"));
        }
        if addr.checked_add(len).is_none_or(|end| end > ram_size) {
            return Err(format!("{name} at {addr:#x}+{len} lies outside guest memory"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use pvkit_protocol::virtio::{Features, feature as vf};

    fn w(dev: &mut MmioTransportState, reg: Register, value: u32) -> Effect {
        dev.write(reg.offset(), &value.to_le_bytes())
    }

    fn r(dev: &mut MmioTransportState, reg: Register) -> u32 {
        let mut data = [0u8; 4];
        assert_eq!(dev.read(reg.offset(), &mut data), Effect::None);
        u32::from_le_bytes(data)
    }

    fn device() -> MmioTransportState {
        MmioTransportState::new(2, Features::from_bits(&[vf::VERSION_1, 9]).0, &[256, 256], 64 << 20)
    }

    /// Sets a queue up; returns the first effect that was not `None`.
    fn set_up_queue(dev: &mut MmioTransportState, q: u32, base: u64) -> Effect {
        let effects = [
            w(dev, Register::QueueSel, q),
            w(dev, Register::QueueNum, 128),
            w(dev, Register::QueueDescLow, base as u32),
            w(dev, Register::QueueDriverLow, (base + 0x1000) as u32),
            w(dev, Register::QueueDeviceLow, (base + 0x2000) as u32),
            w(dev, Register::QueueReady, 1),
        ];
        effects.into_iter().find(|e| *e != Effect::None).unwrap_or(Effect::None)
    }

    #[test]
    fn a_driver_brings_the_device_up() {
        let mut dev = device();
        assert_eq!(r(&mut dev, Register::MagicValue), mmio::MAGIC);
        assert_eq!(r(&mut dev, Register::Version), 2);
        assert_eq!(r(&mut dev, Register::DeviceId), 2);
        w(&mut dev, Register::DeviceFeaturesSel, 1);
        assert_eq!(r(&mut dev, Register::DeviceFeatures), 1);
        w(&mut dev, Register::Status, u32::from(status::ACKNOWLEDGE | status::DRIVER));
        w(&mut dev, Register::DriverFeaturesSel, 1);
        w(&mut dev, Register::DriverFeatures, 1);
        w(&mut dev, Register::Status, u32::from(status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK));
        assert_ne!(r(&mut dev, Register::Status) & u32::from(status::FEATURES_OK), 0);
        assert_eq!(set_up_queue(&mut dev, 0, 0x10_0000), Effect::None);
        let ok = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK;
        assert_eq!(w(&mut dev, Register::Status, u32::from(ok)), Effect::Activate);
        assert_eq!(
            dev.queues()[0],
            QueueConfig { max_size: 256, size: 128, ready: true, desc: 0x10_0000, avail: 0x10_1000, used: 0x10_2000 }
        );
        assert_eq!(r(&mut dev, Register::InterruptStatus), interrupt::VRING);
        assert_eq!(dev.driver_features(), Features::from_bits(&[vf::VERSION_1]).0);
        assert_eq!(w(&mut dev, Register::Status, 0), Effect::Reset);
        assert!(!dev.queues()[0].ready);
    }

    #[test]
    fn unoffered_features_keep_features_ok_from_sticking() {
        let mut dev = device();
        w(&mut dev, Register::Status, u32::from(status::ACKNOWLEDGE | status::DRIVER));
        w(&mut dev, Register::DriverFeatures, 1 << 3);
        w(&mut dev, Register::Status, u32::from(status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK));
        assert_eq!(r(&mut dev, Register::Status) & u32::from(status::FEATURES_OK), 0);
    }

    #[test]
    fn garbage_marks_the_device_broken_until_reset() {
        type Case = Box<dyn Fn(&mut MmioTransportState) -> Effect>;
        let cases: Vec<Case> = vec![
            Box::new(|d| {
                w(d, Register::QueueSel, 0);
                w(d, Register::QueueNum, 100)
            }),
            Box::new(|d| {
                w(d, Register::QueueSel, 0);
                w(d, Register::QueueNum, 512)
            }),
            Box::new(|d| set_up_queue(d, 0, 0xffff_0000)),
            Box::new(|d| set_up_queue(d, 5, 0x10_0000)),
            Box::new(|d| w(d, Register::QueueNotify, 7)),
            Box::new(|d| d.write(0x30, &[1])),
            Box::new(|d| d.write(0x300, &[1, 0, 0, 0])),
            Box::new(|d| w(d, Register::MagicValue, 1)),
            Box::new(|d| w(d, Register::Status, u32::from(status::DRIVER_OK))),
        ];
        for (i, case) in cases.iter().enumerate() {
            let mut dev = device();
            assert!(matches!(case(&mut dev), Effect::Broken(_)), "case {i}");
            assert_ne!(dev.status() & status::DEVICE_NEEDS_RESET, 0, "case {i}");
            assert_eq!(r(&mut dev, Register::InterruptStatus) & interrupt::CONFIG, interrupt::CONFIG, "case {i}");
            // Nothing but a reset is listened to now.
            assert_eq!(set_up_queue(&mut dev, 1, 0x10_0000), Effect::None, "case {i}");
            assert!(!dev.queues()[1].ready, "case {i}");
            w(&mut dev, Register::Status, 0);
            assert_eq!(dev.status(), 0, "case {i}");
            assert_eq!(set_up_queue(&mut dev, 1, 0x10_0000), Effect::None, "case {i}");
            assert!(dev.queues()[1].ready, "case {i}");
        }
    }

    #[test]
    fn config_space_goes_to_the_backend_and_changes_raise_the_config_bit() {
        let mut dev = device();
        let mut data = [0u8; 1];
        assert_eq!(dev.read(0x104, &mut data), Effect::ConfigRead(4));
        assert_eq!(dev.write(0x108, &[1]), Effect::ConfigWrite(8));
        dev.config_changed();
        assert_eq!(r(&mut dev, Register::ConfigGeneration), 1);
        assert_eq!(r(&mut dev, Register::InterruptStatus), interrupt::CONFIG);
        w(&mut dev, Register::InterruptAck, interrupt::CONFIG);
        assert_eq!(r(&mut dev, Register::InterruptStatus), 0);
    }
}
