//! The multiport control protocol (virtio 1.2, 5.3.6.2), as a state machine without I/O:
//! guest messages go in, messages for the guest come out of `outbox`.
//!
//! Order of what the device sends, as QEMU's virtio-serial and Linux's virtio_console expect:
//! DEVICE_READY from the guest -> DEVICE_ADD for every port; PORT_READY(p) -> CONSOLE_PORT for
//! port 0 (then RESIZE when the size is known), PORT_NAME when the port has a name, PORT_OPEN
//! when the host side is connected.

use log::warn;
use pvkit_protocol::console::{CONTROL_SIZE, ConsoleError, ControlEvent, ControlRepr, RESIZE_PAYLOAD_SIZE, ResizeRepr};
use std::collections::VecDeque;

/// What the control state needs to know about a port's host side.
#[derive(Debug, Clone, Default)]
pub struct PortInfo {
    /// The port's name (PORT_NAME), if any.
    pub name: Option<String>,
    /// Whether something is connected on the host side.
    pub host_open: bool,
}

/// Control state of one device (one frontend connection).
#[derive(Debug, Default)]
pub struct Control {
    ports: u32,
    driver_ready: bool,
    port_ready: Vec<bool>,
    guest_open: Vec<bool>,
    size: Option<(u16, u16)>,
    /// Messages waiting for the guest's control receive queue, each complete; no message
    /// twice, and at most [`Control::outbox_limit`] of them.
    pub outbox: VecDeque<Vec<u8>>,
    /// Messages not queued because the outbox was full.
    pub dropped: u64,
}

fn message(id: u32, event: ControlEvent, value: u16, payload: &[u8]) -> Vec<u8> {
    let mut out = vec![0u8; CONTROL_SIZE + payload.len()];
    // CONTROL_SIZE bytes always hold a control header.
    let _ = ControlRepr { id, event, value }.emit(&mut out);
    out[CONTROL_SIZE..].copy_from_slice(payload);
    out
}

impl Control {
    /// Control state for `ports` ports; `size` is the console's (rows, cols) when known.
    pub fn new(ports: u32, size: Option<(u16, u16)>) -> Control {
        Control {
            ports,
            port_ready: vec![false; ports as usize],
            guest_open: vec![false; ports as usize],
            size,
            ..Default::default()
        }
    }

    /// Most messages waiting at once: every message a port can have outstanding (DEVICE_ADD,
    /// PORT_NAME, PORT_OPEN, one spare) plus the console's.
    pub fn outbox_limit(&self) -> usize {
        4 * self.ports as usize + 4
    }

    /// Queues `msg` for the guest unless the same message already waits (a guest repeating
    /// PORT_READY, a host side flapping) or the outbox is full (counted, logged once).
    fn send(&mut self, msg: Vec<u8>) {
        if self.outbox.contains(&msg) {
            return;
        }
        if self.outbox.len() >= self.outbox_limit() {
            if self.dropped == 0 {
                warn!("console: the guest posts no control buffers; control messages are dropped (counted)");
            }
            self.dropped += 1;
            return;
        }
        self.outbox.push_back(msg);
    }

    /// Whether the guest has the port open.
    pub fn guest_open(&self, port: u32) -> bool {
        self.guest_open.get(port as usize).copied().unwrap_or(false)
    }

    /// Handles one message the guest sent on the control transmit queue. Bad messages are
    /// refused with an error (the caller logs it) and change nothing.
    pub fn on_guest_message(&mut self, bytes: &[u8], info: impl Fn(u32) -> PortInfo) -> Result<(), ConsoleError> {
        let msg = ControlRepr::parse_for(bytes, self.ports)?;
        match msg.event {
            ControlEvent::DeviceReady => {
                if msg.value == 1 && !self.driver_ready {
                    self.driver_ready = true;
                    for port in 0..self.ports {
                        self.send(message(port, ControlEvent::DeviceAdd, 1, &[]));
                    }
                } else if msg.value != 1 {
                    warn!("console: the guest driver failed to initialise (DEVICE_READY 0)");
                }
            }
            ControlEvent::PortReady => {
                let p = msg.id as usize;
                if msg.value != 1 {
                    warn!("console: the guest failed to set up port {p}");
                    return Ok(());
                }
                self.port_ready[p] = true;
                if p == 0 {
                    self.send(message(0, ControlEvent::ConsolePort, 1, &[]));
                    if let Some((rows, cols)) = self.size {
                        self.push_resize(rows, cols);
                    }
                }
                let port = info(msg.id);
                if let Some(name) = port.name {
                    let mut payload = name.into_bytes();
                    payload.push(0);
                    self.send(message(msg.id, ControlEvent::PortName, 1, &payload));
                }
                if port.host_open {
                    self.send(message(msg.id, ControlEvent::PortOpen, 1, &[]));
                }
            }
            ControlEvent::PortOpen => self.guest_open[msg.id as usize] = msg.value == 1,
            other => {
                return Err(ConsoleError::UnknownEvent(other.raw()));
            }
        }
        Ok(())
    }

    /// Records the console's current size without telling the guest (it is told at
    /// PORT_READY, or by [`Control::resize`] later).
    pub fn note_size(&mut self, size: Option<(u16, u16)>) {
        if size.is_some() {
            self.size = size;
        }
    }

    /// The host side of `port` connected or disconnected.
    pub fn host_open_changed(&mut self, port: u32, open: bool) {
        if self.port_ready.get(port as usize).copied().unwrap_or(false) {
            // Only the latest state matters: an older PORT_OPEN for the port that still waits
            // would be news the guest no longer needs.
            let key = message(port, ControlEvent::PortOpen, 0, &[]);
            let id_and_event = ..CONTROL_SIZE - 2;
            self.outbox.retain(|m| m.get(id_and_event) != key.get(id_and_event));
            self.send(message(port, ControlEvent::PortOpen, u16::from(open), &[]));
        }
    }

    /// The console's size changed on the host.
    pub fn resize(&mut self, rows: u16, cols: u16) {
        self.size = Some((rows, cols));
        if self.port_ready.first().copied().unwrap_or(false) {
            self.push_resize(rows, cols);
        }
    }

    fn push_resize(&mut self, rows: u16, cols: u16) {
        let mut payload = [0u8; RESIZE_PAYLOAD_SIZE];
        let _ = ResizeRepr { rows, cols }.emit(&mut payload);
        self.send(message(0, ControlEvent::Resize, 0, &payload));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guest(id: u32, event: ControlEvent, value: u16) -> Vec<u8> {
        message(id, event, value, &[])
    }

    fn parse(msg: &[u8]) -> (u32, ControlEvent, u16, Vec<u8>) {
        let r = ControlRepr::parse(msg).unwrap();
        (r.id, r.event, r.value, msg[CONTROL_SIZE..].to_vec())
    }

    fn info(port: u32) -> PortInfo {
        match port {
            0 => PortInfo { name: None, host_open: true },
            1 => PortInfo { name: Some("org.pvkit.log".into()), host_open: false },
            _ => PortInfo { name: Some("data".into()), host_open: true },
        }
    }

    #[test]
    fn the_linux_handshake() {
        let mut c = Control::new(3, Some((25, 80)));
        c.on_guest_message(&guest(0xffff_ffff, ControlEvent::DeviceReady, 1), info).unwrap();
        let adds: Vec<_> = c.outbox.drain(..).map(|m| parse(&m)).collect();
        assert_eq!(
            adds.iter().map(|m| (m.0, m.1, m.2)).collect::<Vec<_>>(),
            [(0, ControlEvent::DeviceAdd, 1), (1, ControlEvent::DeviceAdd, 1), (2, ControlEvent::DeviceAdd, 1)]
        );
        c.on_guest_message(&guest(0, ControlEvent::PortReady, 1), info).unwrap();
        let sent: Vec<_> = c.outbox.drain(..).map(|m| parse(&m)).collect();
        assert_eq!(sent[0].1, ControlEvent::ConsolePort);
        assert_eq!((sent[1].1, sent[1].3.clone()), (ControlEvent::Resize, vec![25, 0, 80, 0]));
        assert_eq!((sent[2].0, sent[2].1, sent[2].2), (0, ControlEvent::PortOpen, 1));
        c.on_guest_message(&guest(1, ControlEvent::PortReady, 1), info).unwrap();
        let sent: Vec<_> = c.outbox.drain(..).map(|m| parse(&m)).collect();
        assert_eq!(sent.len(), 1, "no PORT_OPEN while nobody is connected on the host");
        assert_eq!((sent[0].1, sent[0].3.clone()), (ControlEvent::PortName, b"org.pvkit.log\0".to_vec()));
        c.host_open_changed(1, true);
        let open = parse(&c.outbox.pop_front().unwrap());
        assert_eq!((open.0, open.1, open.2), (1, ControlEvent::PortOpen, 1));
        c.on_guest_message(&guest(1, ControlEvent::PortOpen, 1), info).unwrap();
        assert!(c.guest_open(1) && !c.guest_open(2));
        c.resize(50, 132);
        let resize = parse(&c.outbox.pop_front().unwrap());
        assert_eq!((resize.1, resize.3), (ControlEvent::Resize, vec![50, 0, 132, 0]));
    }

    #[test]
    fn nothing_is_sent_for_ports_the_guest_has_not_readied() {
        let mut c = Control::new(2, None);
        c.host_open_changed(1, true);
        c.resize(10, 10);
        assert!(c.outbox.is_empty());
    }

    #[test]
    fn bad_messages_are_refused_and_change_nothing() {
        let mut c = Control::new(2, None);
        let short = guest(0, ControlEvent::PortReady, 1);
        assert!(matches!(c.on_guest_message(&short[..7], info), Err(ConsoleError::Truncated(_))));
        assert_eq!(
            c.on_guest_message(&guest(5, ControlEvent::PortReady, 1), info),
            Err(ConsoleError::NoSuchPort { port: 5, ports: 2 })
        );
        // Device-to-driver events are not the guest's to send.
        assert!(c.on_guest_message(&guest(0, ControlEvent::DeviceAdd, 1), info).is_err());
        assert!(c.on_guest_message(&guest(0, ControlEvent::Resize, 0), info).is_err());
        let mut raw = guest(0, ControlEvent::PortOpen, 1);
        raw[4] = 42;
        assert_eq!(c.on_guest_message(&raw, info), Err(ConsoleError::UnknownEvent(42)));
        assert!(c.outbox.is_empty() && !c.guest_open(0));
        // A second DEVICE_READY does not add the ports again.
        c.on_guest_message(&guest(0, ControlEvent::DeviceReady, 1), info).unwrap();
        c.on_guest_message(&guest(0, ControlEvent::DeviceReady, 1), info).unwrap();
        assert_eq!(c.outbox.len(), 2);
    }

    #[test]
    fn repeated_messages_wait_once_and_the_outbox_is_bounded() {
        let mut c = Control::new(2, Some((25, 80)));
        let info = |_| PortInfo { name: Some("p".into()), host_open: true };
        c.on_guest_message(&guest(0, ControlEvent::DeviceReady, 1), info).unwrap();
        for _ in 0..10_000 {
            c.on_guest_message(&guest(1, ControlEvent::PortReady, 1), info).unwrap();
            c.on_guest_message(&guest(0, ControlEvent::PortReady, 1), info).unwrap();
            c.host_open_changed(1, false);
            c.host_open_changed(1, true);
        }
        assert!(c.outbox.len() <= c.outbox_limit(), "{} messages wait", c.outbox.len());
        c.host_open_changed(1, false);
        let opens: Vec<_> =
            c.outbox.iter().filter(|m| m[..6] == message(1, ControlEvent::PortOpen, 0, &[])[..6]).collect();
        assert_eq!(opens.len(), 1, "one PORT_OPEN for port 1 waits");
        assert_eq!(opens[0][6..8], [0, 0], "and it is the latest state");
        let mut seen = std::collections::HashSet::new();
        assert!(c.outbox.iter().all(|m| seen.insert(m.clone())), "a message waits twice");
    }
}
