//! virtio-console (virtio 1.2, section 5.3): feature bits, configuration space, multiport
//! control messages and the queue numbering.

use crate::bytes::{TruncatedError, check_len, get_u16, get_u32, set_u16, set_u32};

/// virtio-console feature bits.
pub mod feature {
    /// `cols` and `rows` are valid.
    pub const SIZE: u32 = 0;
    /// Several ports and a control queue pair (`max_nr_ports`).
    pub const MULTIPORT: u32 = 1;
    /// `emerg_wr` can be written to emit a character on port 0.
    pub const EMERG_WRITE: u32 = 2;
}

/// The name of a virtio-console feature bit.
pub fn feature_name(bit: u32) -> Option<&'static str> {
    Some(match bit {
        feature::SIZE => "CONSOLE_F_SIZE",
        feature::MULTIPORT => "CONSOLE_F_MULTIPORT",
        feature::EMERG_WRITE => "CONSOLE_F_EMERG_WRITE",
        _ => return None,
    })
}

/// Errors from this module.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ConsoleError {
    /// The buffer was too short.
    #[error(transparent)]
    Truncated(#[from] TruncatedError),
    /// A control event that does not exist.
    #[error("virtio-console control event {0} is not defined")]
    UnknownEvent(u16),
    /// A control message for a port the device does not have.
    #[error("virtio-console control message for port {port}, but the device has {ports} ports")]
    NoSuchPort {
        /// The port named.
        port: u32,
        /// Ports the device has.
        ports: u32,
    },
    /// A configuration access outside the configuration space.
    #[error("virtio-console config access of {len} bytes at offset {offset} is outside the {size}-byte space")]
    ConfigOutOfRange {
        /// Offset of the access.
        offset: u64,
        /// Length of the access.
        len: usize,
        /// Size of the space.
        size: usize,
    },
}

/// Byte offsets of the configuration space fields.
pub mod config_offset {
    /// `cols` (u16).
    pub const COLS: usize = 0;
    /// `rows` (u16).
    pub const ROWS: usize = 2;
    /// `max_nr_ports` (u32).
    pub const MAX_NR_PORTS: usize = 4;
    /// `emerg_wr` (u32): writing it emits the character on port 0.
    pub const EMERG_WR: usize = 8;
}

/// Size of the configuration space.
pub const CONFIG_SIZE: usize = 12;

/// The virtio-console configuration space as plain values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ConfigRepr {
    /// Columns of the console (port 0).
    pub cols: u16,
    /// Rows of the console (port 0).
    pub rows: u16,
    /// Most ports the device supports (MULTIPORT).
    pub max_nr_ports: u32,
    /// The emergency-write field (reads as 0).
    pub emerg_wr: u32,
}

impl ConfigRepr {
    /// Reads the configuration space.
    pub fn parse(buf: &[u8]) -> Result<ConfigRepr, ConsoleError> {
        check_len("virtio-console config", buf, CONFIG_SIZE)?;
        Ok(ConfigRepr {
            cols: get_u16(buf, config_offset::COLS),
            rows: get_u16(buf, config_offset::ROWS),
            max_nr_ports: get_u32(buf, config_offset::MAX_NR_PORTS),
            emerg_wr: get_u32(buf, config_offset::EMERG_WR),
        })
    }

    /// Writes the configuration space.
    pub fn emit(&self, buf: &mut [u8]) -> Result<(), ConsoleError> {
        check_len("virtio-console config", buf, CONFIG_SIZE)?;
        set_u16(buf, config_offset::COLS, self.cols);
        set_u16(buf, config_offset::ROWS, self.rows);
        set_u32(buf, config_offset::MAX_NR_PORTS, self.max_nr_ports);
        set_u32(buf, config_offset::EMERG_WR, self.emerg_wr);
        Ok(())
    }
}

/// What a driver's write to the configuration space means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConfigWrite {
    /// A character to emit on port 0 (EMERG_WRITE): the low byte of the value written.
    EmergencyWrite(u8),
    /// A write to a read-only field; to be ignored.
    ReadOnlyField(u64),
}

/// Classifies a driver's write of `data` at `offset` in the configuration space.
pub fn classify_config_write(offset: u64, data: &[u8]) -> Result<ConfigWrite, ConsoleError> {
    let out_of_range = ConsoleError::ConfigOutOfRange { offset, len: data.len(), size: CONFIG_SIZE };
    let end = offset.checked_add(data.len() as u64).ok_or(out_of_range)?;
    if data.is_empty() || end > CONFIG_SIZE as u64 {
        return Err(out_of_range);
    }
    match (offset, data.first()) {
        (o, Some(byte)) if o == config_offset::EMERG_WR as u64 => Ok(ConfigWrite::EmergencyWrite(*byte)),
        _ => Ok(ConfigWrite::ReadOnlyField(offset)),
    }
}

/// Size of a control message header (`id`, `event`, `value`).
pub const CONTROL_SIZE: usize = 8;
/// Size of a RESIZE payload (`rows`, `cols`) following the header.
pub const RESIZE_PAYLOAD_SIZE: usize = 4;

/// Control events (virtio 1.2, section 5.3.6.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ControlEvent {
    /// Driver to device: the driver is ready (value 1) or failed (0).
    DeviceReady,
    /// Device to driver: a port was added.
    DeviceAdd,
    /// Device to driver: a port was removed.
    DeviceRemove,
    /// Driver to device: the port is ready (value 1) or failed (0).
    PortReady,
    /// Device to driver: the port is a console.
    ConsolePort,
    /// Device to driver: the console's size changed (`rows`, `cols` follow).
    Resize,
    /// Both ways: the port was opened (value 1) or closed (0).
    PortOpen,
    /// Device to driver: the port's name follows.
    PortName,
}

impl ControlEvent {
    /// The wire value.
    pub const fn raw(self) -> u16 {
        match self {
            ControlEvent::DeviceReady => 0,
            ControlEvent::DeviceAdd => 1,
            ControlEvent::DeviceRemove => 2,
            ControlEvent::PortReady => 3,
            ControlEvent::ConsolePort => 4,
            ControlEvent::Resize => 5,
            ControlEvent::PortOpen => 6,
            ControlEvent::PortName => 7,
        }
    }
}

impl TryFrom<u16> for ControlEvent {
    type Error = ConsoleError;
    fn try_from(raw: u16) -> Result<Self, ConsoleError> {
        Ok(match raw {
            0 => ControlEvent::DeviceReady,
            1 => ControlEvent::DeviceAdd,
            2 => ControlEvent::DeviceRemove,
            3 => ControlEvent::PortReady,
            4 => ControlEvent::ConsolePort,
            5 => ControlEvent::Resize,
            6 => ControlEvent::PortOpen,
            7 => ControlEvent::PortName,
            other => return Err(ConsoleError::UnknownEvent(other)),
        })
    }
}

/// A control message header as plain values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ControlRepr {
    /// The port the message is about.
    pub id: u32,
    /// What happened.
    pub event: ControlEvent,
    /// The event's value (1/0 for ready and open events).
    pub value: u16,
}

impl ControlRepr {
    /// Reads a control header.
    pub fn parse(buf: &[u8]) -> Result<ControlRepr, ConsoleError> {
        check_len("virtio-console control message", buf, CONTROL_SIZE)?;
        Ok(ControlRepr { id: get_u32(buf, 0), event: ControlEvent::try_from(get_u16(buf, 4))?, value: get_u16(buf, 6) })
    }

    /// Reads a control header and checks that it names one of `ports` ports. DEVICE_READY is
    /// about the device as a whole and carries no meaningful id.
    pub fn parse_for(buf: &[u8], ports: u32) -> Result<ControlRepr, ConsoleError> {
        let repr = Self::parse(buf)?;
        if repr.event != ControlEvent::DeviceReady && repr.id >= ports {
            return Err(ConsoleError::NoSuchPort { port: repr.id, ports });
        }
        Ok(repr)
    }

    /// Writes the header into `buf`.
    pub fn emit(&self, buf: &mut [u8]) -> Result<(), ConsoleError> {
        check_len("virtio-console control message", buf, CONTROL_SIZE)?;
        set_u32(buf, 0, self.id);
        set_u16(buf, 4, self.event.raw());
        set_u16(buf, 6, self.value);
        Ok(())
    }
}

/// A RESIZE payload; note that Linux's layout puts `rows` before `cols`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResizeRepr {
    /// Rows.
    pub rows: u16,
    /// Columns.
    pub cols: u16,
}

impl ResizeRepr {
    /// Reads the payload that follows a RESIZE header.
    pub fn parse(buf: &[u8]) -> Result<ResizeRepr, ConsoleError> {
        check_len("virtio-console resize payload", buf, RESIZE_PAYLOAD_SIZE)?;
        Ok(ResizeRepr { rows: get_u16(buf, 0), cols: get_u16(buf, 2) })
    }
    /// Writes the payload.
    pub fn emit(&self, buf: &mut [u8]) -> Result<(), ConsoleError> {
        check_len("virtio-console resize payload", buf, RESIZE_PAYLOAD_SIZE)?;
        set_u16(buf, 0, self.rows);
        set_u16(buf, 2, self.cols);
        Ok(())
    }
}

/// Queue indexes of a console device: port 0 uses queues 0 and 1, the control queues are 2
/// and 3, and port `n >= 1` uses `2(n+1)` and `2(n+1)+1`.
pub mod queue {
    /// Control receive queue (device to driver).
    pub const CONTROL_RX: u16 = 2;
    /// Control transmit queue (driver to device).
    pub const CONTROL_TX: u16 = 3;

    /// The receive (device-to-driver) queue of `port`.
    pub const fn port_rx(port: u16) -> u16 {
        if port == 0 { 0 } else { 2 * (port + 1) }
    }

    /// The transmit (driver-to-device) queue of `port`.
    pub const fn port_tx(port: u16) -> u16 {
        port_rx(port) + 1
    }

    /// Total queues of a device with `ports` ports (control queues counted when `ports > 1`
    /// or multiport is negotiated).
    pub const fn count(ports: u16, multiport: bool) -> u16 {
        if multiport { 2 * (ports + 1) } else { 2 }
    }

    /// What a queue index is for: `Some((port, is_transmit))` for a port queue, `None` for a
    /// control queue.
    pub const fn port_of(index: u16) -> Option<(u16, bool)> {
        match index {
            0 => Some((0, false)),
            1 => Some((0, true)),
            CONTROL_RX | CONTROL_TX => None,
            n => Some((n / 2 - 1, n % 2 == 1)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn config_round_trip() {
        let cfg = ConfigRepr { cols: 80, rows: 25, max_nr_ports: 4, emerg_wr: 0 };
        let mut buf = [0u8; CONFIG_SIZE];
        cfg.emit(&mut buf).unwrap();
        assert_eq!(&buf[..4], &[80, 0, 25, 0]);
        assert_eq!(ConfigRepr::parse(&buf), Ok(cfg));
        assert!(ConfigRepr::parse(&buf[..11]).is_err());
    }

    #[test]
    fn config_writes() {
        assert_eq!(classify_config_write(8, &[b'x', 0, 0, 0]), Ok(ConfigWrite::EmergencyWrite(b'x')));
        assert_eq!(classify_config_write(0, &[1, 0]), Ok(ConfigWrite::ReadOnlyField(0)));
        assert_eq!(
            classify_config_write(10, &[0; 4]),
            Err(ConsoleError::ConfigOutOfRange { offset: 10, len: 4, size: CONFIG_SIZE })
        );
        assert!(classify_config_write(u64::MAX, &[0]).is_err());
        assert!(classify_config_write(0, &[]).is_err());
    }

    #[test]
    fn control_messages() {
        let msg = ControlRepr { id: 2, event: ControlEvent::PortOpen, value: 1 };
        let mut buf = [0u8; CONTROL_SIZE];
        msg.emit(&mut buf).unwrap();
        assert_eq!(buf, [2, 0, 0, 0, 6, 0, 1, 0]);
        assert_eq!(ControlRepr::parse(&buf), Ok(msg));
        assert_eq!(ControlRepr::parse_for(&buf, 3), Ok(msg));
        assert_eq!(ControlRepr::parse_for(&buf, 2), Err(ConsoleError::NoSuchPort { port: 2, ports: 2 }));
        let ready = ControlRepr { id: 0xffff_ffff, event: ControlEvent::DeviceReady, value: 1 };
        ready.emit(&mut buf).unwrap();
        assert_eq!(ControlRepr::parse_for(&buf, 1), Ok(ready));
        buf[4] = 8;
        assert_eq!(ControlRepr::parse(&buf), Err(ConsoleError::UnknownEvent(8)));
        assert!(ControlRepr::parse(&buf[..7]).is_err());
        let mut payload = [0u8; 4];
        ResizeRepr { rows: 24, cols: 80 }.emit(&mut payload).unwrap();
        assert_eq!(payload, [24, 0, 80, 0]);
        assert_eq!(ResizeRepr::parse(&payload), Ok(ResizeRepr { rows: 24, cols: 80 }));
    }

    #[test]
    fn queue_numbering_matches_linux() {
        use queue::*;
        assert_eq!((port_rx(0), port_tx(0)), (0, 1));
        assert_eq!((port_rx(1), port_tx(1)), (4, 5));
        assert_eq!((port_rx(3), port_tx(3)), (8, 9));
        assert_eq!(count(1, false), 2);
        assert_eq!(count(4, true), 10);
        assert_eq!(port_of(5), Some((1, true)));
        assert_eq!(port_of(8), Some((3, false)));
        assert_eq!(port_of(CONTROL_RX), None);
        for port in 0..100 {
            assert_eq!(port_of(port_rx(port)), Some((port, false)));
            assert_eq!(port_of(port_tx(port)), Some((port, true)));
        }
    }

    proptest! {
        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..16), ports in any::<u32>(), offset in any::<u64>()) {
            let _ = ConfigRepr::parse(&bytes);
            let _ = ResizeRepr::parse(&bytes);
            let _ = classify_config_write(offset, &bytes);
            if let Ok(msg) = ControlRepr::parse_for(&bytes, ports) {
                let mut out = [0u8; CONTROL_SIZE];
                msg.emit(&mut out).unwrap();
                prop_assert_eq!(&out[..], &bytes[..CONTROL_SIZE]);
            }
        }
    }
}
