//! The virtio-mmio register map (virtio 1.2, section 4.2.2), version 2 and legacy version 1.
//!
//! A transport handler turns a guest access at `offset` into a [`Register`] with
//! [`Register::decode`], which checks the access width and direction, so a garbage access is a
//! typed error instead of a guess.

/// `MagicValue`: "virt" in little-endian.
pub const MAGIC: u32 = 0x7472_6976;
/// `Version` of the current (non-legacy) transport.
pub const VERSION_MODERN: u32 = 2;
/// `Version` of the legacy transport (QEMU's default for its virtio-mmio devices).
pub const VERSION_LEGACY: u32 = 1;
/// `VendorID` pvkit reports ("PVKT").
pub const PVKIT_VENDOR_ID: u32 = 0x544b_5650;
/// Offset of the device-specific configuration space.
pub const CONFIG_OFFSET: u64 = 0x100;
/// Size of one device's register window (a microvm slot).
pub const WINDOW_SIZE: u64 = 0x200;

/// Bits of `InterruptStatus` / `InterruptACK`.
pub mod interrupt {
    /// A used buffer notification: some queue has new used buffers.
    pub const VRING: u32 = 1;
    /// The configuration space changed.
    pub const CONFIG: u32 = 2;
}

/// Errors from decoding a register access.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum MmioError {
    /// No register lives at this offset (for this transport version).
    #[error("no virtio-mmio register at offset {0:#x}")]
    UnknownRegister(u64),
    /// The register exists but only for 32-bit accesses.
    #[error("virtio-mmio register at offset {offset:#x} accessed with width {width} (4 required)")]
    BadWidth {
        /// Offset of the access.
        offset: u64,
        /// Width in bytes of the access.
        width: usize,
    },
    /// A write to a read-only register or a read of a write-only one.
    #[error("virtio-mmio register {name} at offset {offset:#x} does not allow {access}")]
    BadDirection {
        /// Register name.
        name: &'static str,
        /// Offset of the access.
        offset: u64,
        /// "reads" or "writes".
        access: &'static str,
    },
}

/// How a register may be accessed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// The driver reads it.
    ReadOnly,
    /// The driver writes it.
    WriteOnly,
    /// Both.
    ReadWrite,
}

macro_rules! registers {
    ($( $(#[$doc:meta])* $name:ident = $offset:literal, $access:ident, $legacy:literal, $modern:literal; )*) => {
        /// A virtio-mmio register (the device-specific configuration space is separate).
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum Register {
            $( $(#[$doc])* $name, )*
        }

        impl Register {
            /// Every register, in offset order.
            pub const ALL: &'static [Register] = &[$(Register::$name),*];

            /// Byte offset within the device window.
            pub const fn offset(self) -> u64 {
                match self { $(Register::$name => $offset,)* }
            }

            /// How the driver may access it.
            pub const fn access(self) -> Access {
                match self { $(Register::$name => Access::$access,)* }
            }

            /// The specification's name of the register.
            pub const fn name(self) -> &'static str {
                match self { $(Register::$name => stringify!($name),)* }
            }

            /// Whether the register exists in transport `version` (1 = legacy, 2 = modern).
            pub const fn exists_in(self, version: u32) -> bool {
                match self { $(Register::$name => if version == VERSION_LEGACY { $legacy } else { $modern },)* }
            }

            fn at(offset: u64, version: u32) -> Option<Register> {
                match offset {
                    $($offset if Register::$name.exists_in(version) => Some(Register::$name),)*
                    _ => None,
                }
            }
        }
    };
}

registers! {
    /// 0x74726976 ("virt").
    MagicValue = 0x000, ReadOnly, true, true;
    /// Transport version: 2, or 1 for legacy.
    Version = 0x004, ReadOnly, true, true;
    /// Virtio device id; 0 means no device in this slot.
    DeviceId = 0x008, ReadOnly, true, true;
    /// Vendor id.
    VendorId = 0x00c, ReadOnly, true, true;
    /// The 32 feature bits selected by `DeviceFeaturesSel`.
    DeviceFeatures = 0x010, ReadOnly, true, true;
    /// Selects which 32 device feature bits `DeviceFeatures` shows.
    DeviceFeaturesSel = 0x014, WriteOnly, true, true;
    /// The 32 accepted feature bits selected by `DriverFeaturesSel`.
    DriverFeatures = 0x020, WriteOnly, true, true;
    /// Selects which 32 driver feature bits `DriverFeatures` sets.
    DriverFeaturesSel = 0x024, WriteOnly, true, true;
    /// Legacy only: the guest's page size, for `QueuePfn`.
    GuestPageSize = 0x028, WriteOnly, true, false;
    /// Selects the queue the queue registers refer to.
    QueueSel = 0x030, WriteOnly, true, true;
    /// Largest queue size the device accepts for the selected queue (0: no such queue).
    QueueNumMax = 0x034, ReadOnly, true, true;
    /// Queue size the driver chose.
    QueueNum = 0x038, WriteOnly, true, true;
    /// Legacy only: used-ring alignment.
    QueueAlign = 0x03c, WriteOnly, true, false;
    /// Legacy only: page number of the queue.
    QueuePfn = 0x040, ReadWrite, true, false;
    /// Whether the selected queue is in use.
    QueueReady = 0x044, ReadWrite, false, true;
    /// The driver's doorbell: the value written is a queue index.
    QueueNotify = 0x050, WriteOnly, true, true;
    /// Why the device interrupted (see [`interrupt`]).
    InterruptStatus = 0x060, ReadOnly, true, true;
    /// The driver acknowledges the bits it handled.
    InterruptAck = 0x064, WriteOnly, true, true;
    /// Device status (see [`crate::virtio::status`]).
    Status = 0x070, ReadWrite, true, true;
    /// Descriptor table address, low 32 bits.
    QueueDescLow = 0x080, WriteOnly, false, true;
    /// Descriptor table address, high 32 bits.
    QueueDescHigh = 0x084, WriteOnly, false, true;
    /// Available (driver) ring address, low 32 bits.
    QueueDriverLow = 0x090, WriteOnly, false, true;
    /// Available (driver) ring address, high 32 bits.
    QueueDriverHigh = 0x094, WriteOnly, false, true;
    /// Used (device) ring address, low 32 bits.
    QueueDeviceLow = 0x0a0, WriteOnly, false, true;
    /// Used (device) ring address, high 32 bits.
    QueueDeviceHigh = 0x0a4, WriteOnly, false, true;
    /// Shared memory region selector.
    ShmSel = 0x0ac, WriteOnly, false, true;
    /// Shared memory region length, low 32 bits.
    ShmLenLow = 0x0b0, ReadOnly, false, true;
    /// Shared memory region length, high 32 bits.
    ShmLenHigh = 0x0b4, ReadOnly, false, true;
    /// Shared memory region base, low 32 bits.
    ShmBaseLow = 0x0b8, ReadOnly, false, true;
    /// Shared memory region base, high 32 bits.
    ShmBaseHigh = 0x0bc, ReadOnly, false, true;
    /// Resets the selected queue (RING_RESET).
    QueueReset = 0x0c0, ReadWrite, false, true;
    /// Changes whenever the configuration space changes.
    ConfigGeneration = 0x0fc, ReadOnly, false, true;
}

impl Register {
    /// Decodes a guest access of `width` bytes at `offset` (below [`CONFIG_OFFSET`]) for a
    /// transport of `version`; `is_write` says which way it goes.
    pub fn decode(offset: u64, width: usize, is_write: bool, version: u32) -> Result<Register, MmioError> {
        let reg = Register::at(offset, version).ok_or(MmioError::UnknownRegister(offset))?;
        if width != 4 {
            return Err(MmioError::BadWidth { offset, width });
        }
        let allowed = match reg.access() {
            Access::ReadOnly => !is_write,
            Access::WriteOnly => is_write,
            Access::ReadWrite => true,
        };
        if !allowed {
            let access = if is_write { "writes" } else { "reads" };
            return Err(MmioError::BadDirection { name: reg.name(), offset, access });
        }
        Ok(reg)
    }
}

/// Where a guest access lands in a device window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WindowOffset {
    /// A transport register.
    Register(u64),
    /// The device-specific configuration space, at this offset within it.
    Config(u64),
    /// Past the window.
    Outside(u64),
}

impl WindowOffset {
    /// Classifies an offset within a device window of [`WINDOW_SIZE`] bytes.
    pub const fn classify(offset: u64) -> WindowOffset {
        if offset < CONFIG_OFFSET {
            WindowOffset::Register(offset)
        } else if offset < WINDOW_SIZE {
            WindowOffset::Config(offset - CONFIG_OFFSET)
        } else {
            WindowOffset::Outside(offset)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn decodes_known_registers() {
        assert_eq!(Register::decode(0x000, 4, false, 2), Ok(Register::MagicValue));
        assert_eq!(Register::decode(0x050, 4, true, 2), Ok(Register::QueueNotify));
        assert_eq!(Register::decode(0x070, 4, true, 2), Ok(Register::Status));
        assert_eq!(Register::decode(0x070, 4, false, 2), Ok(Register::Status));
        assert_eq!(Register::decode(0x0a4, 4, true, 2), Ok(Register::QueueDeviceHigh));
        assert_eq!(Register::decode(0x040, 4, true, 1), Ok(Register::QueuePfn));
    }

    #[test]
    fn rejects_bad_offsets_widths_and_directions() {
        assert_eq!(Register::decode(0x001, 4, false, 2), Err(MmioError::UnknownRegister(1)));
        assert_eq!(Register::decode(0x040, 4, true, 2), Err(MmioError::UnknownRegister(0x40)));
        assert_eq!(Register::decode(0x044, 4, true, 1), Err(MmioError::UnknownRegister(0x44)));
        assert_eq!(Register::decode(0x070, 1, true, 2), Err(MmioError::BadWidth { offset: 0x70, width: 1 }));
        assert!(matches!(
            Register::decode(0x000, 4, true, 2),
            Err(MmioError::BadDirection { name: "MagicValue", access: "writes", .. })
        ));
        assert!(matches!(
            Register::decode(0x050, 4, false, 2),
            Err(MmioError::BadDirection { name: "QueueNotify", access: "reads", .. })
        ));
    }

    #[test]
    fn offsets_are_unique_and_aligned() {
        for (i, a) in Register::ALL.iter().enumerate() {
            assert_eq!(a.offset() % 4, 0, "{}", a.name());
            assert!(a.offset() < CONFIG_OFFSET);
            for b in &Register::ALL[i + 1..] {
                assert_ne!(a.offset(), b.offset(), "{} and {}", a.name(), b.name());
            }
        }
    }

    #[test]
    fn classifies_window_offsets() {
        assert_eq!(WindowOffset::classify(0x70), WindowOffset::Register(0x70));
        assert_eq!(WindowOffset::classify(0x100), WindowOffset::Config(0));
        assert_eq!(WindowOffset::classify(0x1ff), WindowOffset::Config(0xff));
        assert_eq!(WindowOffset::classify(0x200), WindowOffset::Outside(0x200));
    }

    proptest! {
        #[test]
        fn decode_never_panics(offset in any::<u64>(), width in 0usize..16, write in any::<bool>(), version in 0u32..4) {
            if let Ok(reg) = Register::decode(offset, width, write, version) {
                prop_assert_eq!(reg.offset(), offset);
                prop_assert_eq!(width, 4);
            }
        }
    }
}
