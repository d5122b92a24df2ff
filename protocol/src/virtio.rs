//! Virtio basics shared by every device: device ids, device status bits and common feature bits
//! (virtio 1.2, sections 2.1, 5 and 6).

/// Errors from this module.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum VirtioError {
    /// A device id that pvkit does not know.
    #[error("unknown virtio device id {0}")]
    UnknownDeviceId(u32),
    /// A status value with bits that the specification does not define.
    #[error("device status {0:#04x} has undefined bits set")]
    UndefinedStatusBits(u8),
}

/// Virtio device types pvkit serves or drives (virtio 1.2, section 5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum DeviceId {
    /// Network card.
    Net = 1,
    /// Block device.
    Block = 2,
    /// Console (virtio-serial).
    Console = 3,
    /// Entropy source.
    Rng = 4,
    /// Memory balloon (traditional).
    Balloon = 5,
    /// SCSI host.
    Scsi = 8,
    /// 9P transport.
    NineP = 9,
    /// Socket device.
    Vsock = 19,
    /// File system device.
    Fs = 26,
}

impl DeviceId {
    /// The numeric id as it appears in the MMIO `DeviceID` register or a PCI device id.
    pub const fn raw(self) -> u32 {
        self as u32
    }

    /// A short lower-case name ("net", "block", ...).
    pub const fn name(self) -> &'static str {
        match self {
            DeviceId::Net => "net",
            DeviceId::Block => "block",
            DeviceId::Console => "console",
            DeviceId::Rng => "rng",
            DeviceId::Balloon => "balloon",
            DeviceId::Scsi => "scsi",
            DeviceId::NineP => "9p",
            DeviceId::Vsock => "vsock",
            DeviceId::Fs => "fs",
        }
    }
}

impl TryFrom<u32> for DeviceId {
    type Error = VirtioError;
    fn try_from(raw: u32) -> Result<Self, VirtioError> {
        Ok(match raw {
            1 => DeviceId::Net,
            2 => DeviceId::Block,
            3 => DeviceId::Console,
            4 => DeviceId::Rng,
            5 => DeviceId::Balloon,
            8 => DeviceId::Scsi,
            9 => DeviceId::NineP,
            19 => DeviceId::Vsock,
            26 => DeviceId::Fs,
            other => return Err(VirtioError::UnknownDeviceId(other)),
        })
    }
}

/// Device status bits (virtio 1.2, section 2.1).
pub mod status {
    /// The guest has noticed the device.
    pub const ACKNOWLEDGE: u8 = 1;
    /// The guest knows how to drive the device.
    pub const DRIVER: u8 = 2;
    /// The driver is set up and ready to drive the device.
    pub const DRIVER_OK: u8 = 4;
    /// The driver has acknowledged the features it understands; negotiation is complete.
    pub const FEATURES_OK: u8 = 8;
    /// The device has hit an error it cannot recover from without a reset.
    pub const DEVICE_NEEDS_RESET: u8 = 64;
    /// The guest has given up on the device.
    pub const FAILED: u8 = 128;
    /// Every bit the specification defines.
    pub const ALL: u8 = ACKNOWLEDGE | DRIVER | DRIVER_OK | FEATURES_OK | DEVICE_NEEDS_RESET | FAILED;
}

/// A device status register value with only defined bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DeviceStatus(u8);

impl DeviceStatus {
    /// The reset value.
    pub const RESET: DeviceStatus = DeviceStatus(0);

    /// Validates a raw status value.
    pub fn new(raw: u8) -> Result<Self, VirtioError> {
        if raw & !status::ALL != 0 { Err(VirtioError::UndefinedStatusBits(raw)) } else { Ok(DeviceStatus(raw)) }
    }

    /// The raw register value.
    pub const fn raw(self) -> u8 {
        self.0
    }

    /// Whether every bit of `bits` is set.
    pub const fn has(self, bits: u8) -> bool {
        self.0 & bits == bits
    }

    /// Whether the driver has finished setting the device up and it is not failed.
    pub const fn is_live(self) -> bool {
        self.has(status::DRIVER_OK) && !self.has(status::FAILED) && !self.has(status::DEVICE_NEEDS_RESET)
    }

    /// Whether `next` is a legal step from `self` for a driver to write: bits are only ever added
    /// (a reset writes 0, which is always allowed), FEATURES_OK needs DRIVER, and DRIVER_OK needs
    /// FEATURES_OK (virtio 1.2, section 3.1.1).
    pub const fn may_become(self, next: DeviceStatus) -> bool {
        if next.0 == 0 {
            return true;
        }
        if next.0 & self.0 != self.0 {
            return false;
        }
        if next.has(status::FEATURES_OK) && !next.has(status::DRIVER) {
            return false;
        }
        if next.has(status::DRIVER_OK) && !next.has(status::FEATURES_OK) {
            return false;
        }
        true
    }
}

/// Feature bits common to every device type (virtio 1.2, section 6).
pub mod feature {
    /// Descriptors may point at tables of indirect descriptors.
    pub const RING_INDIRECT_DESC: u32 = 28;
    /// `used_event` / `avail_event` notification suppression.
    pub const RING_EVENT_IDX: u32 = 29;
    /// The device conforms to virtio 1.0 or later (non-legacy).
    pub const VERSION_1: u32 = 32;
    /// The device accesses memory through a platform IOMMU.
    pub const ACCESS_PLATFORM: u32 = 33;
    /// The packed virtqueue layout.
    pub const RING_PACKED: u32 = 34;
    /// Buffers are used in the order they were made available.
    pub const IN_ORDER: u32 = 35;
    /// The driver passes extra data in its notifications.
    pub const NOTIFICATION_DATA: u32 = 38;
    /// Individual queues can be reset.
    pub const RING_RESET: u32 = 40;
    /// vhost-user: the backend understands `VHOST_USER_GET_PROTOCOL_FEATURES`. Never offered to
    /// a guest; it lives in the backend's feature word (bit 30) only.
    pub const VHOST_USER_PROTOCOL_FEATURES: u32 = 30;
    /// vhost: the backend logs the guest pages it writes while the frontend has this bit set
    /// (`VHOST_F_LOG_ALL`, live migration). Like bit 30, it is the backend's, not a guest's.
    pub const VHOST_LOG_ALL: u32 = 26;
}

/// A set of feature bits, as the 64-bit word vhost-user and virtio-pci exchange.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub struct Features(pub u64);

impl Features {
    /// No features.
    pub const EMPTY: Features = Features(0);

    /// The set holding exactly the given bits. Bits of 64 or more are ignored.
    pub const fn from_bits(bits: &[u32]) -> Features {
        let mut word = 0u64;
        let mut i = 0;
        while i < bits.len() {
            if bits[i] < 64 {
                word |= 1 << bits[i];
            }
            i += 1;
        }
        Features(word)
    }

    /// Whether `bit` is set (false for bits of 64 or more).
    pub const fn has(self, bit: u32) -> bool {
        bit < 64 && self.0 & (1 << bit) != 0
    }

    /// This set with `bit` added (unchanged for bits of 64 or more).
    pub const fn with(self, bit: u32) -> Features {
        if bit < 64 { Features(self.0 | (1 << bit)) } else { self }
    }

    /// This set with `bit` removed.
    pub const fn without(self, bit: u32) -> Features {
        if bit < 64 { Features(self.0 & !(1 << bit)) } else { self }
    }

    /// The bits present in both sets: what a negotiation ends with.
    pub const fn intersect(self, other: Features) -> Features {
        Features(self.0 & other.0)
    }

    /// Whether every bit of `self` is in `offered`: a driver may only accept what was offered.
    pub const fn is_subset_of(self, offered: Features) -> bool {
        self.0 & !offered.0 == 0
    }

    /// One 32-bit half, as the MMIO `DeviceFeatures` register shows it for selector `select`
    /// (0 = bits 0..31, 1 = bits 32..63, anything else reads 0).
    pub const fn word(self, select: u32) -> u32 {
        match select {
            0 => self.0 as u32,
            1 => (self.0 >> 32) as u32,
            _ => 0,
        }
    }

    /// This set with one 32-bit half replaced, as the MMIO `DriverFeatures` register writes it.
    /// Selectors other than 0 and 1 leave the set unchanged.
    pub const fn with_word(self, select: u32, value: u32) -> Features {
        match select {
            0 => Features((self.0 & !0xffff_ffff) | value as u64),
            1 => Features((self.0 & 0xffff_ffff) | ((value as u64) << 32)),
            _ => self,
        }
    }

    /// Iterates over the set bits in ascending order.
    pub fn iter(self) -> impl Iterator<Item = u32> {
        (0..64u32).filter(move |bit| self.has(*bit))
    }
}

/// The name of a common (transport-independent) feature bit, if it has one.
pub fn common_feature_name(bit: u32) -> Option<&'static str> {
    Some(match bit {
        feature::RING_INDIRECT_DESC => "RING_INDIRECT_DESC",
        feature::RING_EVENT_IDX => "RING_EVENT_IDX",
        feature::VHOST_USER_PROTOCOL_FEATURES => "PROTOCOL_FEATURES",
        feature::VERSION_1 => "VERSION_1",
        feature::ACCESS_PLATFORM => "ACCESS_PLATFORM",
        feature::RING_PACKED => "RING_PACKED",
        feature::IN_ORDER => "IN_ORDER",
        feature::NOTIFICATION_DATA => "NOTIFICATION_DATA",
        feature::RING_RESET => "RING_RESET",
        _ => return None,
    })
}

/// The name of a feature bit of a device of type `device`, falling back to the common names.
pub fn feature_name(device: DeviceId, bit: u32) -> Option<&'static str> {
    let specific = match device {
        DeviceId::Block => crate::blk::feature_name(bit),
        DeviceId::Net => crate::net::feature_name(bit),
        DeviceId::Console => crate::console::feature_name(bit),
        _ => None,
    };
    specific.or_else(|| common_feature_name(bit))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn device_ids_round_trip_and_reject_unknown() {
        for id in [DeviceId::Net, DeviceId::Block, DeviceId::Console, DeviceId::Vsock, DeviceId::Fs] {
            assert_eq!(DeviceId::try_from(id.raw()), Ok(id));
        }
        assert_eq!(DeviceId::try_from(0), Err(VirtioError::UnknownDeviceId(0)));
        assert_eq!(DeviceId::try_from(0xffff_ffff), Err(VirtioError::UnknownDeviceId(0xffff_ffff)));
    }

    #[test]
    fn status_rejects_undefined_bits_and_orders_steps() {
        assert_eq!(DeviceStatus::new(0x10), Err(VirtioError::UndefinedStatusBits(0x10)));
        assert_eq!(DeviceStatus::new(0x20), Err(VirtioError::UndefinedStatusBits(0x20)));
        let ack = DeviceStatus::new(status::ACKNOWLEDGE).unwrap();
        let drv = DeviceStatus::new(status::ACKNOWLEDGE | status::DRIVER).unwrap();
        let fok = DeviceStatus::new(drv.raw() | status::FEATURES_OK).unwrap();
        let ok = DeviceStatus::new(fok.raw() | status::DRIVER_OK).unwrap();
        assert!(DeviceStatus::RESET.may_become(ack));
        assert!(ack.may_become(drv) && drv.may_become(fok) && fok.may_become(ok));
        assert!(ok.may_become(DeviceStatus::RESET));
        assert!(!drv.may_become(ack), "bits may not be cleared except by reset");
        assert!(!drv.may_become(DeviceStatus::new(drv.raw() | status::DRIVER_OK).unwrap()));
        assert!(!ack.may_become(DeviceStatus::new(status::ACKNOWLEDGE | status::FEATURES_OK).unwrap()));
        assert!(ok.is_live());
        assert!(!DeviceStatus::new(ok.raw() | status::DEVICE_NEEDS_RESET).unwrap().is_live());
    }

    #[test]
    fn feature_words_split_and_join() {
        let f = Features::from_bits(&[feature::VERSION_1, feature::RING_EVENT_IDX, 3, 200]);
        assert_eq!(f.word(0), (1 << 29) | (1 << 3));
        assert_eq!(f.word(1), 1);
        assert_eq!(f.word(2), 0);
        let g = Features::EMPTY.with_word(0, f.word(0)).with_word(1, f.word(1)).with_word(7, 0xffff);
        assert_eq!(f, g);
        assert!(f.has(feature::VERSION_1) && !f.has(feature::RING_PACKED) && !f.has(64));
        assert_eq!(f.iter().collect::<std::vec::Vec<_>>(), [3, 29, 32]);
        assert!(f.without(3).is_subset_of(f) && !f.is_subset_of(f.without(3)));
    }

    #[test]
    fn feature_names_prefer_device_specific() {
        assert_eq!(feature_name(DeviceId::Block, 9), Some("BLK_F_FLUSH"));
        assert_eq!(feature_name(DeviceId::Net, 5), Some("NET_F_MAC"));
        assert_eq!(feature_name(DeviceId::Console, 1), Some("CONSOLE_F_MULTIPORT"));
        assert_eq!(feature_name(DeviceId::Block, feature::VERSION_1), Some("VERSION_1"));
        assert_eq!(feature_name(DeviceId::Rng, 0), None);
    }

    proptest! {
        #[test]
        fn with_word_inverts_word(word in any::<u64>(), sel in 0u32..2, value in any::<u32>()) {
            let f = Features(word).with_word(sel, value);
            prop_assert_eq!(f.word(sel), value);
            prop_assert_eq!(f.word(1 - sel), Features(word).word(1 - sel));
        }

        #[test]
        fn any_status_byte_is_handled(raw in any::<u8>()) {
            match DeviceStatus::new(raw) {
                Ok(s) => prop_assert_eq!(s.raw() & !status::ALL, 0),
                Err(e) => prop_assert_eq!(e, VirtioError::UndefinedStatusBits(raw)),
            }
        }
    }
}
