//! The forwarding table of pvkit's in-process learning L2 switch (`--switch`): each
//! vhost-user socket is a port; unicast frames go to the port that last sent from the
//! destination address, group and unknown destinations are flooded to every other port.

use super::frame::{self, Mac};
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// How long a learned address stays valid without traffic from it.
pub const AGEING: Duration = Duration::from_secs(300);

/// Where a frame should go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Forward {
    /// To this one port.
    Port(usize),
    /// To every port but the one it came from.
    Flood,
    /// Nowhere (too short to be a frame, or addressed back to its own port).
    Drop,
}

/// The learned addresses.
#[derive(Debug, Default)]
pub struct ForwardingTable {
    entries: HashMap<Mac, (usize, Instant)>,
    /// Most addresses learned at once; past it, unknown sources are not learned (they are
    /// still flooded to), so a guest sending from random addresses cannot grow it unbounded.
    capacity: usize,
}

impl ForwardingTable {
    /// A table holding at most `capacity` addresses.
    pub fn new(capacity: usize) -> ForwardingTable {
        ForwardingTable { entries: HashMap::new(), capacity }
    }

    /// Learns the source of `frame` (arrived on `port` at `now`) and says where it goes.
    pub fn forward(&mut self, port: usize, frame: &[u8], now: Instant) -> Forward {
        let Some((dst, src)) = frame::addresses(frame) else { return Forward::Drop };
        if !frame::is_group(&src) {
            if self.entries.len() >= self.capacity && !self.entries.contains_key(&src) {
                self.entries.retain(|_, (_, seen)| now.duration_since(*seen) < AGEING);
            }
            if self.entries.len() < self.capacity || self.entries.contains_key(&src) {
                self.entries.insert(src, (port, now));
            }
        }
        if frame::is_group(&dst) {
            return Forward::Flood;
        }
        match self.entries.get(&dst) {
            Some((out, seen)) if now.duration_since(*seen) < AGEING => {
                if *out == port {
                    Forward::Drop
                } else {
                    Forward::Port(*out)
                }
            }
            _ => Forward::Flood,
        }
    }

    /// Forgets every address learned on `port` (its frontend went away).
    pub fn forget_port(&mut self, port: usize) {
        self.entries.retain(|_, (p, _)| *p != port);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(dst: [u8; 6], src: [u8; 6]) -> Vec<u8> {
        let mut f = vec![0u8; 60];
        f[..6].copy_from_slice(&dst);
        f[6..12].copy_from_slice(&src);
        f
    }

    const A: [u8; 6] = [2, 0, 0, 0, 0, 0xa];
    const B: [u8; 6] = [2, 0, 0, 0, 0, 0xb];
    const BCAST: [u8; 6] = [0xff; 6];

    #[test]
    fn learns_floods_then_forwards() {
        let mut t = ForwardingTable::new(16);
        let now = Instant::now();
        assert_eq!(t.forward(0, &frame(BCAST, A), now), Forward::Flood, "ARP request");
        assert_eq!(t.forward(1, &frame(A, B), now), Forward::Port(0), "reply to a learned address");
        assert_eq!(t.forward(0, &frame(B, A), now), Forward::Port(1));
        assert_eq!(t.forward(0, &frame(A, A), now), Forward::Drop, "back to its own port");
        assert_eq!(t.forward(0, &frame([2, 0, 0, 0, 0, 0xc], A), now), Forward::Flood, "unknown");
        assert_eq!(t.forward(0, &[0u8; 11], now), Forward::Drop, "runt");
    }

    #[test]
    fn entries_age_and_ports_are_forgotten() {
        let mut t = ForwardingTable::new(16);
        let now = Instant::now();
        t.forward(1, &frame(BCAST, B), now);
        assert_eq!(t.forward(0, &frame(B, A), now + AGEING + Duration::from_secs(1)), Forward::Flood);
        t.forward(1, &frame(BCAST, B), now);
        t.forget_port(1);
        assert_eq!(t.forward(0, &frame(B, A), now), Forward::Flood);
    }

    #[test]
    fn capacity_bounds_learning_but_not_delivery() {
        let mut t = ForwardingTable::new(2);
        let now = Instant::now();
        for i in 0..10u8 {
            t.forward(1, &frame(BCAST, [2, 0, 0, 0, 1, i]), now);
        }
        assert!(t.entries.len() <= 2);
        // A source that arrives when the table is full is still delivered to (by flooding).
        assert_eq!(t.forward(0, &frame([2, 0, 0, 0, 1, 9], A), now), Forward::Flood);
        // Group source addresses are never learned.
        let mut t = ForwardingTable::new(4);
        t.forward(0, &frame(A, BCAST), now);
        assert!(t.entries.is_empty());
    }
}
