//! vhost-user-net as a hostile guest drives it: transmit chains (headers, checksum offsets,
//! GSO fields, frame lengths) and receive chains laid out from the input, with or without
//! MRG_RXBUF, one or two queue pairs, served by the real device with the loopback (transmitted
//! frames come back on the receive queue) or the sink. Checks: no panic, no more used entries
//! than offered, used lengths within what each chain offered, every guest write inside guest
//! memory, every admitted frame completed once (but one held for receive buffers).
#![no_main]

use libfuzzer_sys::fuzz_target;
use pvkit_fuzz::{CheckingServices, Guest, Input, RING, post_all};
use pvkit_host_devices::net::device::{NetDevice, NetOptions};
use pvkit_host_devices::net::side::NetworkSide;
use pvkit_host_devices::net::stats::NetStats;
use pvkit_host_devices::queue::Gates;
use std::sync::Arc;
use vhost_user_backend::VhostUserBackend;
use vmm_sys_util::epoll::EventSet;

fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    let mode = input.byte();
    let pairs = 1 + u16::from(mode & 1);
    let side = if mode & 2 != 0 { NetworkSide::Sink } else { NetworkSide::Loopback };
    let options = NetOptions { pairs, queue_size: RING, mac: [2, 0, 0, 0, 0, 1], mtu: 1500, poll_us: 0 };
    let gates = Arc::new(Gates::new(pairs.into()));
    let services = Arc::new(CheckingServices::new(input.u64()));
    let device = NetDevice::with_services(options, side, Arc::new(NetStats::default()), gates, services.clone())
        .expect("a device");
    device.acked_features(input.u64() & device.features());
    let queues = device.num_queues();
    let mut guest = Guest::new(queues, mode & 4 != 0);
    device.update_memory(guest.atomic.clone()).expect("memory");
    let (offered, capacities) = post_all(&mut guest, queues, &mut input);
    // Transmit queues first (odd indexes), so looped-back frames meet the receive chains.
    for q in (1..queues).step_by(2).chain((0..queues).step_by(2)) {
        let _ = device.handle_event(q as u16, EventSet::IN, &guest.vrings, 0);
    }
    for q in 0..queues {
        guest.check_used(q, 0, offered[q], &capacities[q]);
    }
    // A frame held for receive buffers (at most one per pair) completes when it is delivered.
    services.check_outstanding_at_most(pairs.into());
});
