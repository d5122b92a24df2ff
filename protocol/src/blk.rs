//! virtio-blk (virtio 1.2, section 5.2): feature bits, the request header, status byte,
//! discard/write-zeroes segments and the configuration space.

use crate::bytes::{TruncatedError, check_len, get_u8, get_u16, get_u32, get_u64, set_u8, set_u16, set_u32, set_u64};

/// Sector size of the virtio-blk protocol: sector numbers always count 512-byte units.
pub const SECTOR_SIZE: u64 = 512;
/// log2 of [`SECTOR_SIZE`].
pub const SECTOR_SHIFT: u32 = 9;
/// Size of the request header.
pub const REQUEST_HEADER_SIZE: usize = 16;
/// Size of a discard / write-zeroes / secure-erase segment.
pub const SEGMENT_SIZE: usize = 16;
/// Length of the GET_ID answer.
pub const ID_BYTES: usize = 20;

/// virtio-blk feature bits.
pub mod feature {
    /// `size_max` is valid.
    pub const SIZE_MAX: u32 = 1;
    /// `seg_max` is valid.
    pub const SEG_MAX: u32 = 2;
    /// `geometry` is valid.
    pub const GEOMETRY: u32 = 4;
    /// The device is read-only.
    pub const RO: u32 = 5;
    /// `blk_size` is valid.
    pub const BLK_SIZE: u32 = 6;
    /// FLUSH requests are supported.
    pub const FLUSH: u32 = 9;
    /// Topology fields are valid.
    pub const TOPOLOGY: u32 = 10;
    /// `writeback` can be toggled.
    pub const CONFIG_WCE: u32 = 11;
    /// More than one request queue (`num_queues`).
    pub const MQ: u32 = 12;
    /// DISCARD requests are supported.
    pub const DISCARD: u32 = 13;
    /// WRITE_ZEROES requests are supported.
    pub const WRITE_ZEROES: u32 = 14;
    /// GET_LIFETIME requests are supported.
    pub const LIFETIME: u32 = 15;
    /// SECURE_ERASE requests are supported.
    pub const SECURE_ERASE: u32 = 16;
}

/// The name of a virtio-blk feature bit.
pub fn feature_name(bit: u32) -> Option<&'static str> {
    Some(match bit {
        feature::SIZE_MAX => "BLK_F_SIZE_MAX",
        feature::SEG_MAX => "BLK_F_SEG_MAX",
        feature::GEOMETRY => "BLK_F_GEOMETRY",
        feature::RO => "BLK_F_RO",
        feature::BLK_SIZE => "BLK_F_BLK_SIZE",
        feature::FLUSH => "BLK_F_FLUSH",
        feature::TOPOLOGY => "BLK_F_TOPOLOGY",
        feature::CONFIG_WCE => "BLK_F_CONFIG_WCE",
        feature::MQ => "BLK_F_MQ",
        feature::DISCARD => "BLK_F_DISCARD",
        feature::WRITE_ZEROES => "BLK_F_WRITE_ZEROES",
        feature::LIFETIME => "BLK_F_LIFETIME",
        feature::SECURE_ERASE => "BLK_F_SECURE_ERASE",
        _ => return None,
    })
}

/// Errors from this module.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BlkError {
    /// The buffer was too short.
    #[error(transparent)]
    Truncated(#[from] TruncatedError),
    /// A status byte other than OK, IOERR or UNSUPP.
    #[error("virtio-blk status byte {0} is not defined")]
    UnknownStatus(u8),
    /// A segment with flag bits other than UNMAP.
    #[error("virtio-blk segment flags {0:#x} have reserved bits set")]
    ReservedSegmentFlags(u32),
    /// A sector range that overflows 64 bits.
    #[error("virtio-blk sector range {sector} + {sectors} overflows")]
    SectorOverflow {
        /// First sector.
        sector: u64,
        /// Number of sectors.
        sectors: u64,
    },
}

/// Request types. Unknown types are kept (the device must answer them with UNSUPP).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestType {
    /// Read from the disk into the guest's buffers.
    In,
    /// Write the guest's buffers to the disk.
    Out,
    /// Make written data durable.
    Flush,
    /// Return the device's id string (20 bytes).
    GetId,
    /// Return the device's lifetime information.
    GetLifetime,
    /// Discard ranges (segments follow the header).
    Discard,
    /// Zero ranges (segments follow the header).
    WriteZeroes,
    /// Securely erase ranges.
    SecureErase,
    /// A type this version does not know.
    Unknown(u32),
}

impl RequestType {
    /// The wire value.
    pub const fn raw(self) -> u32 {
        match self {
            RequestType::In => 0,
            RequestType::Out => 1,
            RequestType::Flush => 4,
            RequestType::GetId => 8,
            RequestType::GetLifetime => 10,
            RequestType::Discard => 11,
            RequestType::WriteZeroes => 13,
            RequestType::SecureErase => 14,
            RequestType::Unknown(raw) => raw,
        }
    }

    /// The type for a wire value.
    pub const fn from_raw(raw: u32) -> RequestType {
        match raw {
            0 => RequestType::In,
            1 => RequestType::Out,
            4 => RequestType::Flush,
            8 => RequestType::GetId,
            10 => RequestType::GetLifetime,
            11 => RequestType::Discard,
            13 => RequestType::WriteZeroes,
            14 => RequestType::SecureErase,
            other => RequestType::Unknown(other),
        }
    }

    /// A short name for logs and statistics.
    pub const fn name(self) -> &'static str {
        match self {
            RequestType::In => "read",
            RequestType::Out => "write",
            RequestType::Flush => "flush",
            RequestType::GetId => "get-id",
            RequestType::GetLifetime => "get-lifetime",
            RequestType::Discard => "discard",
            RequestType::WriteZeroes => "write-zeroes",
            RequestType::SecureErase => "secure-erase",
            RequestType::Unknown(_) => "unknown",
        }
    }
}

/// The status byte the device writes last.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Status {
    /// Success.
    Ok = 0,
    /// Device or driver error.
    IoErr = 1,
    /// Request type not supported.
    Unsupp = 2,
}

impl TryFrom<u8> for Status {
    type Error = BlkError;
    fn try_from(raw: u8) -> Result<Self, BlkError> {
        match raw {
            0 => Ok(Status::Ok),
            1 => Ok(Status::IoErr),
            2 => Ok(Status::Unsupp),
            other => Err(BlkError::UnknownStatus(other)),
        }
    }
}

/// A checked view of the 16-byte request header.
#[derive(Debug, Clone)]
pub struct RequestHeader<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> RequestHeader<T> {
    /// Wraps `buffer`, which must hold at least [`REQUEST_HEADER_SIZE`] bytes.
    pub fn new_checked(buffer: T) -> Result<Self, BlkError> {
        check_len("virtio-blk request header", buffer.as_ref(), REQUEST_HEADER_SIZE)?;
        Ok(RequestHeader { buffer })
    }
    /// Raw request type.
    pub fn request_type(&self) -> u32 {
        get_u32(self.buffer.as_ref(), 0)
    }
    /// I/O priority (ignored by pvkit).
    pub fn ioprio(&self) -> u32 {
        get_u32(self.buffer.as_ref(), 4)
    }
    /// First sector (512-byte units) for IN/OUT.
    pub fn sector(&self) -> u64 {
        get_u64(self.buffer.as_ref(), 8)
    }
}

/// A request header as plain values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestHeaderRepr {
    /// What the request asks for.
    pub request_type: RequestType,
    /// I/O priority.
    pub ioprio: u32,
    /// First sector for IN/OUT.
    pub sector: u64,
}

impl RequestHeaderRepr {
    /// Reads a header. Every value is accepted: unknown types become [`RequestType::Unknown`],
    /// and sector ranges are checked against the disk by the device, which alone knows its size.
    pub fn parse<T: AsRef<[u8]>>(header: &RequestHeader<T>) -> RequestHeaderRepr {
        RequestHeaderRepr {
            request_type: RequestType::from_raw(header.request_type()),
            ioprio: header.ioprio(),
            sector: header.sector(),
        }
    }

    /// Reads a header straight from bytes.
    pub fn parse_bytes(bytes: &[u8]) -> Result<RequestHeaderRepr, BlkError> {
        Ok(Self::parse(&RequestHeader::new_checked(bytes)?))
    }

    /// Writes the header into `buf`.
    pub fn emit(&self, buf: &mut [u8]) -> Result<(), BlkError> {
        check_len("virtio-blk request header", buf, REQUEST_HEADER_SIZE)?;
        set_u32(buf, 0, self.request_type.raw());
        set_u32(buf, 4, self.ioprio);
        set_u64(buf, 8, self.sector);
        Ok(())
    }
}

/// `flags` bit of a write-zeroes segment: the device may unmap (deallocate) the range.
pub const SEGMENT_F_UNMAP: u32 = 1;

/// One discard / write-zeroes / secure-erase segment as plain values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentRepr {
    /// First sector.
    pub sector: u64,
    /// Number of sectors.
    pub num_sectors: u32,
    /// True when UNMAP is set.
    pub unmap: bool,
}

impl SegmentRepr {
    /// Reads a segment, rejecting reserved flag bits and ranges that overflow.
    pub fn parse(buf: &[u8]) -> Result<SegmentRepr, BlkError> {
        check_len("virtio-blk discard segment", buf, SEGMENT_SIZE)?;
        let flags = get_u32(buf, 12);
        if flags & !SEGMENT_F_UNMAP != 0 {
            return Err(BlkError::ReservedSegmentFlags(flags));
        }
        let repr =
            SegmentRepr { sector: get_u64(buf, 0), num_sectors: get_u32(buf, 8), unmap: flags & SEGMENT_F_UNMAP != 0 };
        repr.end_sector()?;
        Ok(repr)
    }

    /// Writes the segment into `buf`.
    pub fn emit(&self, buf: &mut [u8]) -> Result<(), BlkError> {
        check_len("virtio-blk discard segment", buf, SEGMENT_SIZE)?;
        set_u64(buf, 0, self.sector);
        set_u32(buf, 8, self.num_sectors);
        set_u32(buf, 12, if self.unmap { SEGMENT_F_UNMAP } else { 0 });
        Ok(())
    }

    /// The first sector past the range.
    pub fn end_sector(&self) -> Result<u64, BlkError> {
        sector_range_end(self.sector, self.num_sectors as u64)
    }
}

/// `sector + sectors`, or an error when it overflows.
pub fn sector_range_end(sector: u64, sectors: u64) -> Result<u64, BlkError> {
    sector.checked_add(sectors).ok_or(BlkError::SectorOverflow { sector, sectors })
}

/// Byte offsets of the configuration space fields.
pub mod config_offset {
    /// `capacity` (u64, in 512-byte sectors).
    pub const CAPACITY: usize = 0;
    /// `size_max` (u32).
    pub const SIZE_MAX: usize = 8;
    /// `seg_max` (u32).
    pub const SEG_MAX: usize = 12;
    /// `geometry.cylinders` (u16), then heads (u8) and sectors (u8).
    pub const GEOMETRY: usize = 16;
    /// `blk_size` (u32).
    pub const BLK_SIZE: usize = 20;
    /// `physical_block_exp` (u8), `alignment_offset` (u8), `min_io_size` (u16), `opt_io_size` (u32).
    pub const TOPOLOGY: usize = 24;
    /// `writeback` (u8).
    pub const WRITEBACK: usize = 32;
    /// `num_queues` (u16).
    pub const NUM_QUEUES: usize = 34;
    /// `max_discard_sectors` (u32).
    pub const MAX_DISCARD_SECTORS: usize = 36;
    /// `max_discard_seg` (u32).
    pub const MAX_DISCARD_SEG: usize = 40;
    /// `discard_sector_alignment` (u32).
    pub const DISCARD_SECTOR_ALIGNMENT: usize = 44;
    /// `max_write_zeroes_sectors` (u32).
    pub const MAX_WRITE_ZEROES_SECTORS: usize = 48;
    /// `max_write_zeroes_seg` (u32).
    pub const MAX_WRITE_ZEROES_SEG: usize = 52;
    /// `write_zeroes_may_unmap` (u8).
    pub const WRITE_ZEROES_MAY_UNMAP: usize = 56;
}

/// Size of the configuration space pvkit exposes (up to `write_zeroes_may_unmap` and its padding).
pub const CONFIG_SIZE: usize = 60;

/// The virtio-blk configuration space as plain values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ConfigRepr {
    /// Disk size in 512-byte sectors.
    pub capacity: u64,
    /// Largest single segment in bytes.
    pub size_max: u32,
    /// Most data segments in one request.
    pub seg_max: u32,
    /// Legacy geometry: cylinders, heads, sectors.
    pub geometry: (u16, u8, u8),
    /// Logical block size in bytes.
    pub blk_size: u32,
    /// log2(physical block / logical block).
    pub physical_block_exp: u8,
    /// Offset of the first aligned logical block.
    pub alignment_offset: u8,
    /// Suggested minimum I/O size in blocks.
    pub min_io_size: u16,
    /// Optimal I/O size in blocks.
    pub opt_io_size: u32,
    /// 1 when the cache is write-back.
    pub writeback: u8,
    /// Number of request queues.
    pub num_queues: u16,
    /// Largest discard in sectors.
    pub max_discard_sectors: u32,
    /// Most segments in one discard.
    pub max_discard_seg: u32,
    /// Discard alignment in sectors.
    pub discard_sector_alignment: u32,
    /// Largest write-zeroes in sectors.
    pub max_write_zeroes_sectors: u32,
    /// Most segments in one write-zeroes.
    pub max_write_zeroes_seg: u32,
    /// 1 when write-zeroes with UNMAP may deallocate.
    pub write_zeroes_may_unmap: u8,
}

impl ConfigRepr {
    /// Reads the configuration space.
    pub fn parse(buf: &[u8]) -> Result<ConfigRepr, BlkError> {
        use config_offset as o;
        check_len("virtio-blk config", buf, CONFIG_SIZE)?;
        Ok(ConfigRepr {
            capacity: get_u64(buf, o::CAPACITY),
            size_max: get_u32(buf, o::SIZE_MAX),
            seg_max: get_u32(buf, o::SEG_MAX),
            geometry: (get_u16(buf, o::GEOMETRY), get_u8(buf, o::GEOMETRY + 2), get_u8(buf, o::GEOMETRY + 3)),
            blk_size: get_u32(buf, o::BLK_SIZE),
            physical_block_exp: get_u8(buf, o::TOPOLOGY),
            alignment_offset: get_u8(buf, o::TOPOLOGY + 1),
            min_io_size: get_u16(buf, o::TOPOLOGY + 2),
            opt_io_size: get_u32(buf, o::TOPOLOGY + 4),
            writeback: get_u8(buf, o::WRITEBACK),
            num_queues: get_u16(buf, o::NUM_QUEUES),
            max_discard_sectors: get_u32(buf, o::MAX_DISCARD_SECTORS),
            max_discard_seg: get_u32(buf, o::MAX_DISCARD_SEG),
            discard_sector_alignment: get_u32(buf, o::DISCARD_SECTOR_ALIGNMENT),
            max_write_zeroes_sectors: get_u32(buf, o::MAX_WRITE_ZEROES_SECTORS),
            max_write_zeroes_seg: get_u32(buf, o::MAX_WRITE_ZEROES_SEG),
            write_zeroes_may_unmap: get_u8(buf, o::WRITE_ZEROES_MAY_UNMAP),
        })
    }

    /// Writes the configuration space into `buf` (padding bytes become zero).
    pub fn emit(&self, buf: &mut [u8]) -> Result<(), BlkError> {
        use config_offset as o;
        check_len("virtio-blk config", buf, CONFIG_SIZE)?;
        buf[..CONFIG_SIZE].fill(0);
        set_u64(buf, o::CAPACITY, self.capacity);
        set_u32(buf, o::SIZE_MAX, self.size_max);
        set_u32(buf, o::SEG_MAX, self.seg_max);
        set_u16(buf, o::GEOMETRY, self.geometry.0);
        set_u8(buf, o::GEOMETRY + 2, self.geometry.1);
        set_u8(buf, o::GEOMETRY + 3, self.geometry.2);
        set_u32(buf, o::BLK_SIZE, self.blk_size);
        set_u8(buf, o::TOPOLOGY, self.physical_block_exp);
        set_u8(buf, o::TOPOLOGY + 1, self.alignment_offset);
        set_u16(buf, o::TOPOLOGY + 2, self.min_io_size);
        set_u32(buf, o::TOPOLOGY + 4, self.opt_io_size);
        set_u8(buf, o::WRITEBACK, self.writeback);
        set_u16(buf, o::NUM_QUEUES, self.num_queues);
        set_u32(buf, o::MAX_DISCARD_SECTORS, self.max_discard_sectors);
        set_u32(buf, o::MAX_DISCARD_SEG, self.max_discard_seg);
        set_u32(buf, o::DISCARD_SECTOR_ALIGNMENT, self.discard_sector_alignment);
        set_u32(buf, o::MAX_WRITE_ZEROES_SECTORS, self.max_write_zeroes_sectors);
        set_u32(buf, o::MAX_WRITE_ZEROES_SEG, self.max_write_zeroes_seg);
        set_u8(buf, o::WRITE_ZEROES_MAY_UNMAP, self.write_zeroes_may_unmap);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn header_round_trip_and_truncation() {
        let repr = RequestHeaderRepr { request_type: RequestType::Out, ioprio: 3, sector: 0x1_0000_0001 };
        let mut buf = [0u8; 16];
        repr.emit(&mut buf).unwrap();
        assert_eq!(&buf[..4], &[1, 0, 0, 0]);
        assert_eq!(RequestHeaderRepr::parse_bytes(&buf), Ok(repr));
        assert_eq!(
            RequestHeaderRepr::parse_bytes(&buf[..15]),
            Err(BlkError::Truncated(TruncatedError { what: "virtio-blk request header", needed: 16, actual: 15 }))
        );
        assert!(repr.emit(&mut [0u8; 8]).is_err());
    }

    #[test]
    fn request_types_keep_unknown_values() {
        for raw in [0, 1, 4, 8, 10, 11, 13, 14] {
            assert!(!matches!(RequestType::from_raw(raw), RequestType::Unknown(_)));
            assert_eq!(RequestType::from_raw(raw).raw(), raw);
        }
        assert_eq!(RequestType::from_raw(2), RequestType::Unknown(2));
        assert_eq!(RequestType::from_raw(0xdead).raw(), 0xdead);
        assert_eq!(RequestType::Unknown(7).name(), "unknown");
    }

    #[test]
    fn status_bytes() {
        assert_eq!(Status::try_from(0), Ok(Status::Ok));
        assert_eq!(Status::try_from(2), Ok(Status::Unsupp));
        assert_eq!(Status::try_from(3), Err(BlkError::UnknownStatus(3)));
    }

    #[test]
    fn segments_reject_reserved_flags_and_overflow() {
        let mut buf = [0u8; 16];
        let seg = SegmentRepr { sector: 8, num_sectors: 16, unmap: true };
        seg.emit(&mut buf).unwrap();
        assert_eq!(SegmentRepr::parse(&buf), Ok(seg));
        assert_eq!(seg.end_sector(), Ok(24));
        buf[12] = 0x3;
        assert_eq!(SegmentRepr::parse(&buf), Err(BlkError::ReservedSegmentFlags(3)));
        SegmentRepr { sector: u64::MAX, num_sectors: 1, unmap: false }.emit(&mut buf).unwrap();
        assert_eq!(SegmentRepr::parse(&buf), Err(BlkError::SectorOverflow { sector: u64::MAX, sectors: 1 }));
        assert!(SegmentRepr::parse(&buf[..10]).is_err());
    }

    #[test]
    fn config_layout_matches_linux() {
        let cfg = ConfigRepr {
            capacity: 2048,
            seg_max: 126,
            blk_size: 4096,
            num_queues: 2,
            max_discard_sectors: 0xffff,
            write_zeroes_may_unmap: 1,
            ..Default::default()
        };
        let mut buf = [0xaau8; CONFIG_SIZE];
        cfg.emit(&mut buf).unwrap();
        assert_eq!(&buf[0..8], &2048u64.to_le_bytes());
        assert_eq!(&buf[12..16], &126u32.to_le_bytes());
        assert_eq!(&buf[20..24], &4096u32.to_le_bytes());
        assert_eq!(&buf[34..36], &2u16.to_le_bytes());
        assert_eq!(buf[56], 1);
        assert_eq!(buf[57], 0, "padding is zeroed");
        assert_eq!(ConfigRepr::parse(&buf), Ok(cfg));
        assert!(ConfigRepr::parse(&buf[..CONFIG_SIZE - 1]).is_err());
    }

    proptest! {
        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..80)) {
            let _ = RequestHeaderRepr::parse_bytes(&bytes);
            let _ = SegmentRepr::parse(&bytes);
            if let Ok(cfg) = ConfigRepr::parse(&bytes) {
                let mut out = [0u8; CONFIG_SIZE];
                cfg.emit(&mut out).unwrap();
                prop_assert_eq!(ConfigRepr::parse(&out), Ok(cfg));
            }
        }

        #[test]
        fn header_round_trips(raw in any::<u32>(), ioprio in any::<u32>(), sector in any::<u64>()) {
            let repr = RequestHeaderRepr { request_type: RequestType::from_raw(raw), ioprio, sector };
            let mut buf = [0u8; 16];
            repr.emit(&mut buf).unwrap();
            prop_assert_eq!(RequestHeaderRepr::parse_bytes(&buf), Ok(repr));
        }

        #[test]
        fn segment_round_trips(sector in 0u64..u64::MAX / 2, n in any::<u32>(), unmap in any::<bool>()) {
            let seg = SegmentRepr { sector, num_sectors: n, unmap };
            let mut buf = [0u8; 16];
            seg.emit(&mut buf).unwrap();
            prop_assert_eq!(SegmentRepr::parse(&buf), Ok(seg));
        }
    }
}
