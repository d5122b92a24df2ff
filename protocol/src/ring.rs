//! Split virtqueue layout (virtio 1.2, section 2.7): sizes, alignments, descriptor and used
//! element formats, and the wrap-safe `need_event` rule for RING_EVENT_IDX.

use crate::bytes::{TruncatedError, check_len, get_u16, get_u32, get_u64, set_u16, set_u32, set_u64};

/// Largest queue size the split ring allows.
pub const MAX_QUEUE_SIZE: u16 = 32768;
/// Size of one descriptor.
pub const DESCRIPTOR_SIZE: usize = 16;
/// Size of one used-ring element.
pub const USED_ELEM_SIZE: usize = 8;
/// Alignment of the descriptor table.
pub const DESC_ALIGN: u64 = 16;
/// Alignment of the available ring.
pub const AVAIL_ALIGN: u64 = 2;
/// Alignment of the used ring (modern transports).
pub const USED_ALIGN: u64 = 4;
/// Used-ring alignment of the legacy MMIO/PCI layout (one page).
pub const LEGACY_USED_ALIGN: u64 = 4096;

/// Descriptor flags.
pub mod desc_flags {
    /// The chain continues at `next`.
    pub const NEXT: u16 = 1;
    /// The device writes this buffer (otherwise it reads it).
    pub const WRITE: u16 = 2;
    /// The buffer holds a table of indirect descriptors.
    pub const INDIRECT: u16 = 4;
    /// Every defined bit.
    pub const ALL: u16 = NEXT | WRITE | INDIRECT;
}

/// `flags` of the available ring: the driver does not want used-buffer notifications.
pub const AVAIL_F_NO_INTERRUPT: u16 = 1;
/// `flags` of the used ring: the device does not want available-buffer notifications.
pub const USED_F_NO_NOTIFY: u16 = 1;

/// Errors from this module.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RingError {
    /// The buffer was too short.
    #[error(transparent)]
    Truncated(#[from] TruncatedError),
    /// A queue size of zero, above 32768, or not a power of two.
    #[error("queue size {0} is not a power of two between 1 and 32768")]
    BadQueueSize(u32),
    /// A descriptor with flag bits the specification does not define.
    #[error("descriptor flags {0:#06x} have undefined bits set")]
    UndefinedDescriptorFlags(u16),
    /// A ring part whose address is not aligned as required.
    #[error("{part} at {addr:#x} is not {align}-byte aligned")]
    Misaligned {
        /// Which part of the queue.
        part: &'static str,
        /// Its guest-physical address.
        addr: u64,
        /// The alignment it needs.
        align: u64,
    },
    /// A ring part that wraps around the end of the address space.
    #[error("{part} at {addr:#x} with {len} bytes overflows the address space")]
    Overflow {
        /// Which part of the queue.
        part: &'static str,
        /// Its guest-physical address.
        addr: u64,
        /// Its size.
        len: u64,
    },
}

/// Checks that `size` is a valid split-ring queue size.
pub fn check_queue_size(size: u32) -> Result<u16, RingError> {
    if size == 0 || size > MAX_QUEUE_SIZE as u32 || !size.is_power_of_two() {
        Err(RingError::BadQueueSize(size))
    } else {
        Ok(size as u16)
    }
}

/// Bytes of the descriptor table for `size` entries.
pub const fn desc_table_size(size: u16) -> u64 {
    DESCRIPTOR_SIZE as u64 * size as u64
}

/// Bytes of the available ring (`flags`, `idx`, `ring[size]`, `used_event`).
pub const fn avail_ring_size(size: u16) -> u64 {
    6 + 2 * size as u64
}

/// Bytes of the used ring (`flags`, `idx`, `ring[size]`, `avail_event`).
pub const fn used_ring_size(size: u16) -> u64 {
    6 + USED_ELEM_SIZE as u64 * size as u64
}

/// Offset of `used_event` within the available ring.
pub const fn used_event_offset(size: u16) -> u64 {
    4 + 2 * size as u64
}

/// Offset of `avail_event` within the used ring.
pub const fn avail_event_offset(size: u16) -> u64 {
    4 + USED_ELEM_SIZE as u64 * size as u64
}

/// Where the three parts of a split ring live.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RingLayout {
    /// Entries in the ring.
    pub size: u16,
    /// Guest-physical address of the descriptor table.
    pub desc: u64,
    /// Guest-physical address of the available (driver) ring.
    pub avail: u64,
    /// Guest-physical address of the used (device) ring.
    pub used: u64,
}

fn align_up(value: u64, align: u64) -> Option<u64> {
    value.div_ceil(align).checked_mul(align)
}

impl RingLayout {
    /// The contiguous legacy layout at `base`: descriptors, then the available ring, then the
    /// used ring at the next multiple of `used_align` (4096 for legacy MMIO and PCI).
    pub fn contiguous(base: u64, size: u16, used_align: u64) -> Result<RingLayout, RingError> {
        check_queue_size(size as u32)?;
        let avail = base.checked_add(desc_table_size(size));
        let used =
            avail.and_then(|a| a.checked_add(avail_ring_size(size))).and_then(|end| align_up(end, used_align.max(1)));
        match (avail, used) {
            (Some(avail), Some(used)) => {
                let layout = RingLayout { size, desc: base, avail, used };
                layout.validate()?;
                Ok(layout)
            }
            _ => Err(RingError::Overflow { part: "queue", addr: base, len: Self::contiguous_size(size, used_align) }),
        }
    }

    /// Total bytes of the contiguous layout (what a driver allocates for it).
    /// Saturates at `u64::MAX` for absurd alignments.
    pub fn contiguous_size(size: u16, used_align: u64) -> u64 {
        align_up(desc_table_size(size) + avail_ring_size(size), used_align.max(1))
            .map_or(u64::MAX, |used| used.saturating_add(used_ring_size(size)))
    }

    /// Checks queue size, alignment, and that no part wraps around the address space.
    pub fn validate(&self) -> Result<(), RingError> {
        check_queue_size(self.size as u32)?;
        let parts = [
            ("descriptor table", self.desc, DESC_ALIGN, desc_table_size(self.size)),
            ("available ring", self.avail, AVAIL_ALIGN, avail_ring_size(self.size)),
            ("used ring", self.used, USED_ALIGN, used_ring_size(self.size)),
        ];
        for (part, addr, align, len) in parts {
            if addr % align != 0 {
                return Err(RingError::Misaligned { part, addr, align });
            }
            if addr.checked_add(len).is_none() {
                return Err(RingError::Overflow { part, addr, len });
            }
        }
        Ok(())
    }
}

/// The wrap-safe notification rule for RING_EVENT_IDX (virtio 1.2, section 2.7.10).
///
/// Returns whether the other side asked to be notified when the index moved from `old` to
/// `new`, given that it asked for a notification once the index passes `event`. All arithmetic
/// wraps at 2^16, so the rule holds across index wraparound.
pub const fn need_event(event: u16, new: u16, old: u16) -> bool {
    new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
}

/// A checked view of one split-ring descriptor.
#[derive(Debug, Clone)]
pub struct Descriptor<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> Descriptor<T> {
    /// Wraps `buffer`, which must hold at least [`DESCRIPTOR_SIZE`] bytes.
    pub fn new_checked(buffer: T) -> Result<Self, RingError> {
        check_len("descriptor", buffer.as_ref(), DESCRIPTOR_SIZE)?;
        Ok(Descriptor { buffer })
    }
    /// Guest-physical address of the buffer.
    pub fn addr(&self) -> u64 {
        get_u64(self.buffer.as_ref(), 0)
    }
    /// Length of the buffer.
    pub fn len(&self) -> u32 {
        get_u32(self.buffer.as_ref(), 8)
    }
    /// Whether the buffer is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Raw flags.
    pub fn flags(&self) -> u16 {
        get_u16(self.buffer.as_ref(), 12)
    }
    /// Index of the next descriptor when `NEXT` is set.
    pub fn next(&self) -> u16 {
        get_u16(self.buffer.as_ref(), 14)
    }
    /// The wrapped buffer.
    pub fn into_inner(self) -> T {
        self.buffer
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Descriptor<T> {
    fn set(&mut self, repr: &DescriptorRepr) {
        let buf = self.buffer.as_mut();
        set_u64(buf, 0, repr.addr);
        set_u32(buf, 8, repr.len);
        set_u16(buf, 12, repr.flags);
        set_u16(buf, 14, repr.next);
    }
}

/// A descriptor as plain values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DescriptorRepr {
    /// Guest-physical address of the buffer.
    pub addr: u64,
    /// Length of the buffer.
    pub len: u32,
    /// Flags from [`desc_flags`].
    pub flags: u16,
    /// Next descriptor in the chain.
    pub next: u16,
}

impl DescriptorRepr {
    /// Reads a descriptor, rejecting undefined flag bits.
    pub fn parse<T: AsRef<[u8]>>(desc: &Descriptor<T>) -> Result<Self, RingError> {
        let flags = desc.flags();
        if flags & !desc_flags::ALL != 0 {
            return Err(RingError::UndefinedDescriptorFlags(flags));
        }
        Ok(DescriptorRepr { addr: desc.addr(), len: desc.len(), flags, next: desc.next() })
    }
    /// Writes the descriptor into `desc`.
    pub fn emit<T: AsRef<[u8]> + AsMut<[u8]>>(&self, desc: &mut Descriptor<T>) {
        desc.set(self);
    }
    /// Whether the device writes this buffer.
    pub const fn is_write_only(&self) -> bool {
        self.flags & desc_flags::WRITE != 0
    }
    /// Whether the chain continues.
    pub const fn has_next(&self) -> bool {
        self.flags & desc_flags::NEXT != 0
    }
    /// Whether the buffer is an indirect table.
    pub const fn is_indirect(&self) -> bool {
        self.flags & desc_flags::INDIRECT != 0
    }
}

/// One used-ring element as plain values (`id`, `len`), with its own parse and emit on
/// byte slices of [`USED_ELEM_SIZE`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct UsedElemRepr {
    /// Head index of the chain the device used.
    pub id: u32,
    /// Bytes the device wrote into the chain's writable buffers.
    pub len: u32,
}

impl UsedElemRepr {
    /// Reads a used element.
    pub fn parse(buf: &[u8]) -> Result<Self, RingError> {
        check_len("used element", buf, USED_ELEM_SIZE)?;
        Ok(UsedElemRepr { id: get_u32(buf, 0), len: get_u32(buf, 4) })
    }
    /// Writes it into `buf`.
    pub fn emit(&self, buf: &mut [u8]) -> Result<(), RingError> {
        check_len("used element", buf, USED_ELEM_SIZE)?;
        set_u32(buf, 0, self.id);
        set_u32(buf, 4, self.len);
        Ok(())
    }
    /// Checks what a device reported against the ring it came from: `id` must name a
    /// descriptor of a queue of `queue_size`, and `len` may not exceed the writable bytes the
    /// driver offered. A driver uses this so a misbehaving device cannot make it misbehave.
    pub fn check(&self, queue_size: u16, writable_len: u32) -> Result<(), UsedElemError> {
        if self.id >= queue_size as u32 {
            return Err(UsedElemError::IdOutOfRange { id: self.id, queue_size });
        }
        if self.len > writable_len {
            return Err(UsedElemError::LengthTooLarge { len: self.len, writable: writable_len });
        }
        Ok(())
    }
}

/// A used element that makes no sense for the ring it came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum UsedElemError {
    /// The id does not name a descriptor.
    #[error("used id {id} is outside a queue of {queue_size}")]
    IdOutOfRange {
        /// The id the device returned.
        id: u32,
        /// The queue's size.
        queue_size: u16,
    },
    /// The device claims to have written more than the chain could hold.
    #[error("used length {len} exceeds the {writable} writable bytes offered")]
    LengthTooLarge {
        /// The length the device returned.
        len: u32,
        /// What the driver offered.
        writable: u32,
    },
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn queue_sizes() {
        assert_eq!(check_queue_size(256), Ok(256));
        assert_eq!(check_queue_size(1), Ok(1));
        assert_eq!(check_queue_size(32768), Ok(32768));
        for bad in [0, 3, 100, 65536, u32::MAX] {
            assert_eq!(check_queue_size(bad), Err(RingError::BadQueueSize(bad)));
        }
    }

    #[test]
    fn sizes_match_the_specification() {
        assert_eq!(desc_table_size(256), 4096);
        assert_eq!(avail_ring_size(256), 518);
        assert_eq!(used_ring_size(256), 2054);
        assert_eq!(used_event_offset(256), 516);
        assert_eq!(avail_event_offset(256), 2052);
        // Legacy layout of a 256-entry queue: used ring at 8192 (4096 + 518 rounded up).
        let l = RingLayout::contiguous(0x10000, 256, LEGACY_USED_ALIGN).unwrap();
        assert_eq!((l.desc, l.avail, l.used), (0x10000, 0x11000, 0x12000));
        assert_eq!(RingLayout::contiguous_size(256, LEGACY_USED_ALIGN), 8192 + 2054);
    }

    #[test]
    fn layout_validation() {
        let good = RingLayout { size: 8, desc: 0x1000, avail: 0x2000, used: 0x3000 };
        assert_eq!(good.validate(), Ok(()));
        let bad = RingLayout { desc: 0x1008, ..good };
        assert_eq!(bad.validate(), Err(RingError::Misaligned { part: "descriptor table", addr: 0x1008, align: 16 }));
        let bad = RingLayout { used: 0x3002, ..good };
        assert!(matches!(bad.validate(), Err(RingError::Misaligned { part: "used ring", .. })));
        let bad = RingLayout { avail: u64::MAX - 1, ..good };
        assert!(matches!(bad.validate(), Err(RingError::Overflow { part: "available ring", .. })));
        let bad = RingLayout { size: 6, ..good };
        assert_eq!(bad.validate(), Err(RingError::BadQueueSize(6)));
        assert!(matches!(RingLayout::contiguous(u64::MAX - 4096, 8, 4096), Err(RingError::Overflow { .. })));
    }

    #[test]
    fn need_event_examples_including_wraparound() {
        // Event at 5: moving from 4 to 6 crosses it, from 6 to 8 does not.
        assert!(need_event(5, 6, 4));
        assert!(!need_event(5, 8, 6));
        assert!(need_event(5, 6, 5));
        assert!(!need_event(5, 5, 4));
        // Across the 16-bit wrap.
        assert!(need_event(0xffff, 1, 0xfffe));
        assert!(need_event(0, 2, 0xffff));
        assert!(!need_event(3, 2, 0xffff));
    }

    #[test]
    fn descriptor_round_trip_and_rejects() {
        let repr =
            DescriptorRepr { addr: 0x1234_5678_9abc, len: 512, flags: desc_flags::NEXT | desc_flags::WRITE, next: 7 };
        let mut buf = [0u8; DESCRIPTOR_SIZE];
        repr.emit(&mut Descriptor::new_checked(&mut buf[..]).unwrap());
        let parsed = DescriptorRepr::parse(&Descriptor::new_checked(&buf[..]).unwrap()).unwrap();
        assert_eq!(parsed, repr);
        assert!(parsed.is_write_only() && parsed.has_next() && !parsed.is_indirect());
        assert!(matches!(Descriptor::new_checked(&buf[..15]), Err(RingError::Truncated(_))));
        buf[12] = 0x08;
        assert_eq!(
            DescriptorRepr::parse(&Descriptor::new_checked(&buf[..]).unwrap()),
            Err(RingError::UndefinedDescriptorFlags(0x08))
        );
    }

    #[test]
    fn used_elements() {
        let mut buf = [0u8; 8];
        UsedElemRepr { id: 3, len: 100 }.emit(&mut buf).unwrap();
        let e = UsedElemRepr::parse(&buf).unwrap();
        assert_eq!(e, UsedElemRepr { id: 3, len: 100 });
        assert_eq!(e.check(4, 100), Ok(()));
        assert_eq!(e.check(2, 100), Err(UsedElemError::IdOutOfRange { id: 3, queue_size: 2 }));
        assert_eq!(e.check(4, 99), Err(UsedElemError::LengthTooLarge { len: 100, writable: 99 }));
        assert!(UsedElemRepr::parse(&buf[..7]).is_err());
        assert!(UsedElemRepr { id: 0, len: 0 }.emit(&mut buf[..4]).is_err());
    }

    /// The reference form of the rule from the specification, computed without wrapping
    /// shortcuts: the event index lies in the half-open window (old, new] walked forwards.
    fn need_event_reference(event: u16, new: u16, old: u16) -> bool {
        let mut i = old;
        while i != new {
            i = i.wrapping_add(1);
            if i.wrapping_sub(1) == event {
                return true;
            }
        }
        false
    }

    proptest! {
        #[test]
        fn need_event_matches_reference(event in any::<u16>(), old in any::<u16>(), step in 0u16..600) {
            let new = old.wrapping_add(step);
            prop_assert_eq!(need_event(event, new, old), need_event_reference(event, new, old));
        }

        #[test]
        fn descriptor_parse_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..40)) {
            if let Ok(view) = Descriptor::new_checked(&bytes[..]) {
                if let Ok(repr) = DescriptorRepr::parse(&view) {
                    let mut out = [0u8; DESCRIPTOR_SIZE];
                    repr.emit(&mut Descriptor::new_checked(&mut out[..]).unwrap());
                    prop_assert_eq!(&out[..], &bytes[..DESCRIPTOR_SIZE]);
                }
            } else {
                prop_assert!(bytes.len() < DESCRIPTOR_SIZE);
            }
        }
    }
}
