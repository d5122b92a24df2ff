//! virtio-net (virtio 1.2, section 5.1): feature bits, the per-packet header with its
//! consistency checks, the configuration space and control-queue messages.

use crate::bytes::{TruncatedError, check_len, get_u8, get_u16, set_u8, set_u16};

/// Header size when VERSION_1 or MRG_RXBUF is negotiated (with `num_buffers`).
pub const HEADER_SIZE: usize = 12;
/// Header size of legacy devices without MRG_RXBUF.
pub const LEGACY_HEADER_SIZE: usize = 10;
/// Ethernet header length.
pub const ETH_HEADER_LEN: usize = 14;
/// Largest frame a device accepts without GSO: 65535-byte IP packets plus Ethernet and VLAN.
pub const MAX_GSO_FRAME: usize = 65_562;

/// virtio-net feature bits.
pub mod feature {
    /// The device handles partial checksums (`NEEDS_CSUM` on transmit).
    pub const CSUM: u32 = 0;
    /// The driver handles partial checksums on receive.
    pub const GUEST_CSUM: u32 = 1;
    /// Offloads can be reconfigured through the control queue.
    pub const CTRL_GUEST_OFFLOADS: u32 = 2;
    /// `mtu` is valid.
    pub const MTU: u32 = 3;
    /// `mac` is valid.
    pub const MAC: u32 = 5;
    /// The driver takes TSO over IPv4 on receive.
    pub const GUEST_TSO4: u32 = 7;
    /// The driver takes TSO over IPv6 on receive.
    pub const GUEST_TSO6: u32 = 8;
    /// The driver takes TSO with ECN on receive.
    pub const GUEST_ECN: u32 = 9;
    /// The driver takes UFO on receive.
    pub const GUEST_UFO: u32 = 10;
    /// The device takes TSO over IPv4 on transmit.
    pub const HOST_TSO4: u32 = 11;
    /// The device takes TSO over IPv6 on transmit.
    pub const HOST_TSO6: u32 = 12;
    /// The device takes TSO with ECN on transmit.
    pub const HOST_ECN: u32 = 13;
    /// The device takes UFO on transmit.
    pub const HOST_UFO: u32 = 14;
    /// Receive buffers can be merged (`num_buffers`).
    pub const MRG_RXBUF: u32 = 15;
    /// `status` is valid.
    pub const STATUS: u32 = 16;
    /// A control queue exists.
    pub const CTRL_VQ: u32 = 17;
    /// Receive-mode control (promiscuous, all-multicast).
    pub const CTRL_RX: u32 = 18;
    /// VLAN filtering control.
    pub const CTRL_VLAN: u32 = 19;
    /// The driver can send gratuitous packets on request.
    pub const GUEST_ANNOUNCE: u32 = 21;
    /// More than one queue pair (`max_virtqueue_pairs`).
    pub const MQ: u32 = 22;
    /// The MAC address can be set through the control queue.
    pub const CTRL_MAC_ADDR: u32 = 23;
}

/// The name of a virtio-net feature bit.
pub fn feature_name(bit: u32) -> Option<&'static str> {
    use feature as f;
    Some(match bit {
        f::CSUM => "NET_F_CSUM",
        f::GUEST_CSUM => "NET_F_GUEST_CSUM",
        f::CTRL_GUEST_OFFLOADS => "NET_F_CTRL_GUEST_OFFLOADS",
        f::MTU => "NET_F_MTU",
        f::MAC => "NET_F_MAC",
        f::GUEST_TSO4 => "NET_F_GUEST_TSO4",
        f::GUEST_TSO6 => "NET_F_GUEST_TSO6",
        f::GUEST_ECN => "NET_F_GUEST_ECN",
        f::GUEST_UFO => "NET_F_GUEST_UFO",
        f::HOST_TSO4 => "NET_F_HOST_TSO4",
        f::HOST_TSO6 => "NET_F_HOST_TSO6",
        f::HOST_ECN => "NET_F_HOST_ECN",
        f::HOST_UFO => "NET_F_HOST_UFO",
        f::MRG_RXBUF => "NET_F_MRG_RXBUF",
        f::STATUS => "NET_F_STATUS",
        f::CTRL_VQ => "NET_F_CTRL_VQ",
        f::CTRL_RX => "NET_F_CTRL_RX",
        f::CTRL_VLAN => "NET_F_CTRL_VLAN",
        f::GUEST_ANNOUNCE => "NET_F_GUEST_ANNOUNCE",
        f::MQ => "NET_F_MQ",
        f::CTRL_MAC_ADDR => "NET_F_CTRL_MAC_ADDR",
        _ => return None,
    })
}

/// Header `flags` bits.
pub mod hdr_flags {
    /// `csum_start`/`csum_offset` describe a checksum still to be filled in.
    pub const NEEDS_CSUM: u8 = 1;
    /// The checksum has been validated.
    pub const DATA_VALID: u8 = 2;
    /// Receive-segment-coalescing information is present.
    pub const RSC_INFO: u8 = 4;
    /// Every defined bit.
    pub const ALL: u8 = NEEDS_CSUM | DATA_VALID | RSC_INFO;
}

/// Errors from this module.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum NetError {
    /// The buffer was too short.
    #[error(transparent)]
    Truncated(#[from] TruncatedError),
    /// Flag bits the specification does not define.
    #[error("virtio-net header flags {0:#04x} have undefined bits set")]
    UndefinedFlags(u8),
    /// A GSO type that does not exist (or ECN on a non-TCP type).
    #[error("virtio-net gso_type {0:#04x} is not defined")]
    UnknownGsoType(u8),
    /// The checksum location lies outside the frame.
    #[error("virtio-net checksum at {csum_start}+{csum_offset} lies outside a {frame_len}-byte frame")]
    ChecksumOutsideFrame {
        /// Where checksumming starts.
        csum_start: u16,
        /// Offset of the checksum field from `csum_start`.
        csum_offset: u16,
        /// The frame's length (without the virtio-net header).
        frame_len: usize,
    },
    /// GSO without NEEDS_CSUM, with a zero segment size, or with a header longer than the frame.
    #[error(
        "virtio-net GSO {gso_type:#04x} with gso_size {gso_size} and hdr_len {hdr_len} is impossible for a {frame_len}-byte frame{needs_csum_note}"
    )]
    ImpossibleGso {
        /// GSO type.
        gso_type: u8,
        /// Segment size.
        gso_size: u16,
        /// Header length the driver gave.
        hdr_len: u16,
        /// Frame length.
        frame_len: usize,
        /// Extra explanation.
        needs_csum_note: &'static str,
    },
    /// A frame longer than the device accepts.
    #[error("virtio-net frame of {len} bytes exceeds the {max}-byte limit")]
    FrameTooLong {
        /// Frame length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// A control-queue class or command that does not exist.
    #[error("virtio-net control class {class} command {command} is not defined")]
    UnknownControl {
        /// Class byte.
        class: u8,
        /// Command byte.
        command: u8,
    },
}

/// Segmentation offload types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GsoType {
    /// No segmentation.
    None,
    /// TCP over IPv4.
    TcpV4 {
        /// ECN bit set.
        ecn: bool,
    },
    /// UDP fragmentation offload.
    Udp,
    /// TCP over IPv6.
    TcpV6 {
        /// ECN bit set.
        ecn: bool,
    },
    /// UDP segmentation (USO).
    UdpL4,
}

/// The ECN bit of `gso_type`.
pub const GSO_ECN: u8 = 0x80;

impl GsoType {
    /// Decodes the wire byte.
    pub fn from_raw(raw: u8) -> Result<GsoType, NetError> {
        let ecn = raw & GSO_ECN != 0;
        Ok(match (raw & !GSO_ECN, ecn) {
            (0, false) => GsoType::None,
            (1, _) => GsoType::TcpV4 { ecn },
            (3, false) => GsoType::Udp,
            (4, _) => GsoType::TcpV6 { ecn },
            (5, false) => GsoType::UdpL4,
            _ => return Err(NetError::UnknownGsoType(raw)),
        })
    }

    /// The wire byte.
    pub const fn raw(self) -> u8 {
        match self {
            GsoType::None => 0,
            GsoType::TcpV4 { ecn } => 1 | if ecn { GSO_ECN } else { 0 },
            GsoType::Udp => 3,
            GsoType::TcpV6 { ecn } => 4 | if ecn { GSO_ECN } else { 0 },
            GsoType::UdpL4 => 5,
        }
    }
}

/// A checked view of the virtio-net header.
#[derive(Debug, Clone)]
pub struct NetHeader<T: AsRef<[u8]>> {
    buffer: T,
    len: usize,
}

impl<T: AsRef<[u8]>> NetHeader<T> {
    /// Wraps `buffer`, which must hold a header of `header_len` bytes ([`HEADER_SIZE`] or
    /// [`LEGACY_HEADER_SIZE`]).
    pub fn new_checked(buffer: T, header_len: usize) -> Result<Self, NetError> {
        let len = if header_len == LEGACY_HEADER_SIZE { LEGACY_HEADER_SIZE } else { HEADER_SIZE };
        check_len("virtio-net header", buffer.as_ref(), len)?;
        Ok(NetHeader { buffer, len })
    }
    /// Raw flags.
    pub fn flags(&self) -> u8 {
        get_u8(self.buffer.as_ref(), 0)
    }
    /// Raw GSO type.
    pub fn gso_type(&self) -> u8 {
        get_u8(self.buffer.as_ref(), 1)
    }
    /// Length of the headers to copy into each segment.
    pub fn hdr_len(&self) -> u16 {
        get_u16(self.buffer.as_ref(), 2)
    }
    /// Segment payload size.
    pub fn gso_size(&self) -> u16 {
        get_u16(self.buffer.as_ref(), 4)
    }
    /// Where checksumming starts.
    pub fn csum_start(&self) -> u16 {
        get_u16(self.buffer.as_ref(), 6)
    }
    /// Where the checksum goes, relative to `csum_start`.
    pub fn csum_offset(&self) -> u16 {
        get_u16(self.buffer.as_ref(), 8)
    }
    /// Number of merged receive buffers (1 when the header is the legacy short one).
    pub fn num_buffers(&self) -> u16 {
        if self.len == LEGACY_HEADER_SIZE { 1 } else { get_u16(self.buffer.as_ref(), 10) }
    }
}

/// A virtio-net header as plain values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NetHeaderRepr {
    /// Flags from [`hdr_flags`].
    pub flags: u8,
    /// Segmentation offload.
    pub gso_type: GsoType,
    /// Length of the headers to copy into each segment.
    pub hdr_len: u16,
    /// Segment payload size.
    pub gso_size: u16,
    /// Where checksumming starts.
    pub csum_start: u16,
    /// Where the checksum goes, relative to `csum_start`.
    pub csum_offset: u16,
    /// Number of merged receive buffers.
    pub num_buffers: u16,
}

impl Default for NetHeaderRepr {
    fn default() -> Self {
        NetHeaderRepr {
            flags: 0,
            gso_type: GsoType::None,
            hdr_len: 0,
            gso_size: 0,
            csum_start: 0,
            csum_offset: 0,
            num_buffers: 1,
        }
    }
}

impl NetHeaderRepr {
    /// Reads a header, rejecting undefined flags and GSO types. Use [`NetHeaderRepr::check_frame`]
    /// to check it against the frame it describes.
    pub fn parse<T: AsRef<[u8]>>(header: &NetHeader<T>) -> Result<NetHeaderRepr, NetError> {
        let flags = header.flags();
        if flags & !hdr_flags::ALL != 0 {
            return Err(NetError::UndefinedFlags(flags));
        }
        Ok(NetHeaderRepr {
            flags,
            gso_type: GsoType::from_raw(header.gso_type())?,
            hdr_len: header.hdr_len(),
            gso_size: header.gso_size(),
            csum_start: header.csum_start(),
            csum_offset: header.csum_offset(),
            num_buffers: header.num_buffers(),
        })
    }

    /// Reads a header of `header_len` bytes straight from bytes.
    pub fn parse_bytes(bytes: &[u8], header_len: usize) -> Result<NetHeaderRepr, NetError> {
        Self::parse(&NetHeader::new_checked(bytes, header_len)?)
    }

    /// Writes the header (`header_len` bytes: [`HEADER_SIZE`] or [`LEGACY_HEADER_SIZE`]).
    pub fn emit(&self, buf: &mut [u8], header_len: usize) -> Result<(), NetError> {
        let len = if header_len == LEGACY_HEADER_SIZE { LEGACY_HEADER_SIZE } else { HEADER_SIZE };
        check_len("virtio-net header", buf, len)?;
        set_u8(buf, 0, self.flags);
        set_u8(buf, 1, self.gso_type.raw());
        set_u16(buf, 2, self.hdr_len);
        set_u16(buf, 4, self.gso_size);
        set_u16(buf, 6, self.csum_start);
        set_u16(buf, 8, self.csum_offset);
        if len == HEADER_SIZE {
            set_u16(buf, 10, self.num_buffers);
        }
        Ok(())
    }

    /// Whether the header asks for a checksum to be completed.
    pub const fn needs_csum(&self) -> bool {
        self.flags & hdr_flags::NEEDS_CSUM != 0
    }

    /// Checks the header against the frame it precedes (`frame_len` bytes without the header):
    /// a checksum to complete must lie inside the frame (the 2-byte field included), and GSO
    /// needs NEEDS_CSUM, a non-zero segment size and a header no longer than the frame.
    pub fn check_frame(&self, frame_len: usize) -> Result<(), NetError> {
        if self.needs_csum() {
            let end = self.csum_start as usize + self.csum_offset as usize + 2;
            if end > frame_len {
                return Err(NetError::ChecksumOutsideFrame {
                    csum_start: self.csum_start,
                    csum_offset: self.csum_offset,
                    frame_len,
                });
            }
        }
        if self.gso_type != GsoType::None {
            let note = if !self.needs_csum() {
                " (NEEDS_CSUM is not set)"
            } else if self.gso_size == 0 {
                " (zero segment size)"
            } else if self.hdr_len as usize > frame_len {
                " (header longer than the frame)"
            } else {
                ""
            };
            if !note.is_empty() {
                return Err(NetError::ImpossibleGso {
                    gso_type: self.gso_type.raw(),
                    gso_size: self.gso_size,
                    hdr_len: self.hdr_len,
                    frame_len,
                    needs_csum_note: note,
                });
            }
        } else if frame_len > MAX_GSO_FRAME {
            return Err(NetError::FrameTooLong { len: frame_len, max: MAX_GSO_FRAME });
        }
        Ok(())
    }
}

/// `status` bits of the configuration space.
pub mod status {
    /// The link is up.
    pub const LINK_UP: u16 = 1;
    /// The driver should announce itself.
    pub const ANNOUNCE: u16 = 2;
}

/// Size of the configuration space pvkit exposes (`mac`, `status`, `max_virtqueue_pairs`, `mtu`).
pub const CONFIG_SIZE: usize = 12;

/// The virtio-net configuration space as plain values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ConfigRepr {
    /// MAC address.
    pub mac: [u8; 6],
    /// Link status bits.
    pub status: u16,
    /// Most queue pairs the device supports.
    pub max_virtqueue_pairs: u16,
    /// Maximum transmission unit.
    pub mtu: u16,
}

impl ConfigRepr {
    /// Reads the configuration space.
    pub fn parse(buf: &[u8]) -> Result<ConfigRepr, NetError> {
        check_len("virtio-net config", buf, CONFIG_SIZE)?;
        let mut mac = [0u8; 6];
        mac.copy_from_slice(&buf[..6]);
        Ok(ConfigRepr { mac, status: get_u16(buf, 6), max_virtqueue_pairs: get_u16(buf, 8), mtu: get_u16(buf, 10) })
    }

    /// Writes the configuration space.
    pub fn emit(&self, buf: &mut [u8]) -> Result<(), NetError> {
        check_len("virtio-net config", buf, CONFIG_SIZE)?;
        buf[..6].copy_from_slice(&self.mac);
        set_u16(buf, 6, self.status);
        set_u16(buf, 8, self.max_virtqueue_pairs);
        set_u16(buf, 10, self.mtu);
        Ok(())
    }
}

/// Control-queue acknowledgement: success.
pub const CTRL_OK: u8 = 0;
/// Control-queue acknowledgement: failure.
pub const CTRL_ERR: u8 = 1;
/// Smallest `virtqueue_pairs` a VQ_PAIRS_SET may ask for.
pub const CTRL_MQ_VQ_PAIRS_MIN: u16 = 1;
/// Largest `virtqueue_pairs` a VQ_PAIRS_SET may ask for.
pub const CTRL_MQ_VQ_PAIRS_MAX: u16 = 0x8000;

/// A control-queue command (class and command byte).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ControlCommand {
    /// Class RX: promiscuous mode on/off (one byte follows).
    RxPromisc,
    /// Class RX: all-multicast on/off (one byte follows).
    RxAllMulti,
    /// Class RX: all-unicast, no-multicast, no-unicast, no-broadcast (one byte follows).
    RxOther(u8),
    /// Class MAC: set the filter tables.
    MacTableSet,
    /// Class MAC: set the address (6 bytes follow).
    MacAddrSet,
    /// Class VLAN: add or delete a filter.
    Vlan(u8),
    /// Class ANNOUNCE: acknowledge an announcement.
    AnnounceAck,
    /// Class MQ: set the number of queue pairs (u16 follows).
    MqVqPairsSet,
    /// Class GUEST_OFFLOADS: set offloads (u64 follows).
    GuestOffloadsSet,
}

impl ControlCommand {
    /// Decodes the two header bytes of a control message.
    pub fn parse(buf: &[u8]) -> Result<ControlCommand, NetError> {
        check_len("virtio-net control header", buf, 2)?;
        let (class, command) = (get_u8(buf, 0), get_u8(buf, 1));
        Ok(match (class, command) {
            (0, 0) => ControlCommand::RxPromisc,
            (0, 1) => ControlCommand::RxAllMulti,
            (0, 2..=5) => ControlCommand::RxOther(command),
            (1, 0) => ControlCommand::MacTableSet,
            (1, 1) => ControlCommand::MacAddrSet,
            (2, 0..=1) => ControlCommand::Vlan(command),
            (3, 0) => ControlCommand::AnnounceAck,
            (4, 0) => ControlCommand::MqVqPairsSet,
            (5, 0) => ControlCommand::GuestOffloadsSet,
            _ => return Err(NetError::UnknownControl { class, command }),
        })
    }

    /// The (class, command) bytes.
    pub const fn raw(self) -> (u8, u8) {
        match self {
            ControlCommand::RxPromisc => (0, 0),
            ControlCommand::RxAllMulti => (0, 1),
            ControlCommand::RxOther(c) => (0, c),
            ControlCommand::MacTableSet => (1, 0),
            ControlCommand::MacAddrSet => (1, 1),
            ControlCommand::Vlan(c) => (2, c),
            ControlCommand::AnnounceAck => (3, 0),
            ControlCommand::MqVqPairsSet => (4, 0),
            ControlCommand::GuestOffloadsSet => (5, 0),
        }
    }
}

/// Index of the receive queue of queue pair `pair`.
pub const fn rx_queue_index(pair: u16) -> u16 {
    pair * 2
}

/// Index of the transmit queue of queue pair `pair`.
pub const fn tx_queue_index(pair: u16) -> u16 {
    pair * 2 + 1
}

/// Index of the control queue for a device with `pairs` queue pairs.
pub const fn ctrl_queue_index(pairs: u16) -> u16 {
    pairs * 2
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn csum_header(start: u16, offset: u16) -> NetHeaderRepr {
        NetHeaderRepr { flags: hdr_flags::NEEDS_CSUM, csum_start: start, csum_offset: offset, ..Default::default() }
    }

    #[test]
    fn header_round_trip_both_sizes() {
        let repr = NetHeaderRepr {
            gso_type: GsoType::TcpV4 { ecn: true },
            gso_size: 1448,
            hdr_len: 54,
            num_buffers: 3,
            ..csum_header(34, 16)
        };
        let mut buf = [0u8; 12];
        repr.emit(&mut buf, HEADER_SIZE).unwrap();
        assert_eq!(buf[1], 0x81);
        assert_eq!(NetHeaderRepr::parse_bytes(&buf, HEADER_SIZE), Ok(repr));
        let mut short = [0u8; 10];
        repr.emit(&mut short, LEGACY_HEADER_SIZE).unwrap();
        assert_eq!(
            NetHeaderRepr::parse_bytes(&short, LEGACY_HEADER_SIZE),
            Ok(NetHeaderRepr { num_buffers: 1, ..repr })
        );
        assert!(NetHeaderRepr::parse_bytes(&buf[..11], HEADER_SIZE).is_err());
    }

    #[test]
    fn rejects_undefined_flags_and_gso_types() {
        let mut buf = [0u8; 12];
        buf[0] = 0x08;
        assert_eq!(NetHeaderRepr::parse_bytes(&buf, HEADER_SIZE), Err(NetError::UndefinedFlags(8)));
        buf[0] = 0;
        for bad in [2u8, 6, 0x7f, 0x80, 0x83, 0x85] {
            buf[1] = bad;
            assert_eq!(NetHeaderRepr::parse_bytes(&buf, HEADER_SIZE), Err(NetError::UnknownGsoType(bad)));
        }
    }

    #[test]
    fn checksum_must_lie_inside_the_frame() {
        assert_eq!(csum_header(34, 16).check_frame(60), Ok(()));
        assert_eq!(csum_header(34, 16).check_frame(52), Ok(()), "the field ends exactly at the frame end");
        assert_eq!(
            csum_header(34, 16).check_frame(51),
            Err(NetError::ChecksumOutsideFrame { csum_start: 34, csum_offset: 16, frame_len: 51 })
        );
        // The DPDK CVE class: huge offsets that would wrap a 16-bit sum.
        assert!(csum_header(0xffff, 0xffff).check_frame(1514).is_err());
        // Without NEEDS_CSUM the fields are ignored.
        let ignored = NetHeaderRepr { csum_start: 0xffff, csum_offset: 0xffff, ..Default::default() };
        assert_eq!(ignored.check_frame(60), Ok(()));
    }

    #[test]
    fn impossible_gso_combinations() {
        let tso = NetHeaderRepr {
            gso_type: GsoType::TcpV6 { ecn: false },
            gso_size: 1440,
            hdr_len: 74,
            ..csum_header(54, 16)
        };
        assert_eq!(tso.check_frame(9000), Ok(()));
        let no_csum = NetHeaderRepr { flags: 0, ..tso };
        assert!(matches!(
            no_csum.check_frame(9000),
            Err(NetError::ImpossibleGso { needs_csum_note: " (NEEDS_CSUM is not set)", .. })
        ));
        let zero = NetHeaderRepr { gso_size: 0, ..tso };
        assert!(matches!(
            zero.check_frame(9000),
            Err(NetError::ImpossibleGso { needs_csum_note: " (zero segment size)", .. })
        ));
        let long_hdr = NetHeaderRepr { hdr_len: 200, ..tso };
        assert!(matches!(long_hdr.check_frame(100), Err(NetError::ImpossibleGso { .. })));
        let plain = NetHeaderRepr::default();
        assert_eq!(
            plain.check_frame(MAX_GSO_FRAME + 1),
            Err(NetError::FrameTooLong { len: MAX_GSO_FRAME + 1, max: MAX_GSO_FRAME })
        );
    }

    #[test]
    fn config_round_trip() {
        let cfg = ConfigRepr {
            mac: [0x52, 0x54, 0, 0x12, 0x34, 0x56],
            status: status::LINK_UP,
            max_virtqueue_pairs: 2,
            mtu: 1500,
        };
        let mut buf = [0u8; CONFIG_SIZE];
        cfg.emit(&mut buf).unwrap();
        assert_eq!(&buf[6..8], &[1, 0]);
        assert_eq!(ConfigRepr::parse(&buf), Ok(cfg));
        assert!(ConfigRepr::parse(&buf[..11]).is_err());
    }

    #[test]
    fn control_commands() {
        assert_eq!(ControlCommand::parse(&[4, 0, 2, 0]), Ok(ControlCommand::MqVqPairsSet));
        assert_eq!(ControlCommand::parse(&[1, 1]), Ok(ControlCommand::MacAddrSet));
        assert_eq!(ControlCommand::parse(&[4, 1]), Err(NetError::UnknownControl { class: 4, command: 1 }));
        assert_eq!(ControlCommand::parse(&[9, 0]), Err(NetError::UnknownControl { class: 9, command: 0 }));
        assert!(ControlCommand::parse(&[0]).is_err());
        for cmd in [
            ControlCommand::RxPromisc,
            ControlCommand::RxOther(4),
            ControlCommand::Vlan(1),
            ControlCommand::GuestOffloadsSet,
        ] {
            let (class, command) = cmd.raw();
            assert_eq!(ControlCommand::parse(&[class, command]), Ok(cmd));
        }
        assert_eq!((rx_queue_index(1), tx_queue_index(1), ctrl_queue_index(2)), (2, 3, 4));
    }

    proptest! {
        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..16), frame_len in 0usize..70_000) {
            for len in [HEADER_SIZE, LEGACY_HEADER_SIZE] {
                if let Ok(repr) = NetHeaderRepr::parse_bytes(&bytes, len) {
                    let _ = repr.check_frame(frame_len);
                    let mut out = [0u8; HEADER_SIZE];
                    repr.emit(&mut out, len).unwrap();
                    prop_assert_eq!(&out[..len], &bytes[..len]);
                }
            }
            let _ = ControlCommand::parse(&bytes);
            let _ = ConfigRepr::parse(&bytes);
        }

        #[test]
        fn accepted_checksums_are_inside(start in any::<u16>(), offset in any::<u16>(), frame_len in 0usize..70_000) {
            if csum_header(start, offset).check_frame(frame_len).is_ok() {
                prop_assert!(start as usize + offset as usize + 2 <= frame_len);
            }
        }
    }
}
