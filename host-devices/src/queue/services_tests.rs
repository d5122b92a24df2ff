//! Services on real devices, through each device's `handle_event`: fault rules that corrupt,
//! duplicate, delay and reorder frames, delay console output and hold block completions; rate
//! limits that hold work back until the tokens are back.

use super::tests::{blk_device_with, memory, post_frame, post_read, ring, used_idx};
use crate::console::device::{ConsoleDevice, ConsoleHost};
use crate::console::port::{HostPort, PortKind, PortSpec};
use crate::net::device::{NetDevice, NetOptions};
use crate::net::side::NetworkSide;
use crate::net::stats::NetStats;
use crate::queue::Gates;
use crate::queue::Memory;
use crate::services::faults::RuleSpec;
use crate::services::{DeviceKind, DeviceServices, ServiceArgs};
use pvkit_protocol::ring::desc_flags::WRITE;
use std::sync::Arc;
use std::time::Duration;
use vhost_user_backend::{VhostUserBackend, VringT};
use virtio_queue::desc::RawDescriptor;
use virtio_queue::desc::split::Descriptor as SplitDescriptor;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;

/// Services for a device of `kind` with `queues` queues and the fault rules `faults`.
fn services_with(kind: DeviceKind, queues: usize, faults: &[&str]) -> Arc<DeviceServices> {
    let args = ServiceArgs { faults: faults.iter().map(|f| f.to_string()).collect(), ..ServiceArgs::default() };
    DeviceServices::new(kind, queues, &args).unwrap()
}

/// A net device of one pair looping its frames back, every feature acknowledged, with
/// `services`, on the guest memory `atomic`.
fn loopback_net(atomic: &Memory, services: Arc<DeviceServices>) -> NetDevice {
    let options = NetOptions { pairs: 1, queue_size: 256, mac: [2, 0, 0, 0, 0, 1], mtu: 1500, poll_us: 0 };
    let stats = Arc::new(NetStats::default());
    let device =
        NetDevice::with_services(options, NetworkSide::Loopback, stats, Arc::new(Gates::new(1)), services).unwrap();
    device.acked_features(device.features());
    device.update_memory(atomic.clone()).unwrap();
    device
}

/// A 2048-byte receive buffer at `at`.
fn receive_buffer(at: u64) -> RawDescriptor {
    RawDescriptor::from(SplitDescriptor::new(at, 2048, WRITE, 0))
}

/// The 72 bytes (header and frame) at `at`.
fn frame_at(mem: &GuestMemoryMmap, at: u64) -> Vec<u8> {
    let mut got = vec![0u8; 72];
    mem.read_slice(&mut got, GuestAddress(at)).unwrap();
    got
}

/// A frame like [`post_frame`]'s whose first payload byte is `tag`.
fn post_tagged(mem: &GuestMemoryMmap, at: u64, tag: u8) -> RawDescriptor {
    let descriptor = post_frame(mem, at);
    mem.write_obj(tag, GuestAddress(at + TAG_OFFSET)).unwrap();
    descriptor
}

/// Where a frame's tag is: behind the 12-byte header and the 14-byte Ethernet header.
const TAG_OFFSET: u64 = 12 + 14;

/// Event ids of a one-pair net device's queue timers: queues + 3 + queue.
const NET_RX_TIMER: u16 = 2 + 3;
const NET_TX_TIMER: u16 = 2 + 3 + 1;

/// A loopback net device's receive and transmit rings (at 1 MiB and 2 MiB), with `buffers`
/// receive buffers of 4 KiB posted from 0x90_0000.
struct LoopbackRings<'a> {
    rx_mock: virtio_queue::mock::MockSplitQueue<'a, GuestMemoryMmap>,
    rx: vhost_user_backend::VringRwLock,
    tx_mock: virtio_queue::mock::MockSplitQueue<'a, GuestMemoryMmap>,
    tx: vhost_user_backend::VringRwLock,
}

fn loopback_rings<'a>(mem: &'a GuestMemoryMmap, atomic: &Memory, buffers: u64) -> LoopbackRings<'a> {
    let (rx_mock, rx) = ring(mem, atomic, 0x10_0000);
    let (tx_mock, tx) = ring(mem, atomic, 0x20_0000);
    let posted: Vec<_> = (0..buffers).map(|i| receive_buffer(0x90_0000 + i * 0x1000)).collect();
    rx_mock.add_desc_chains(&posted, 0).unwrap();
    LoopbackRings { rx_mock, rx, tx_mock, tx }
}

/// Fault rules on received frames: `corrupt` inverts exactly one byte after the Ethernet
/// header, `duplicate` delivers the frame twice.
#[test]
fn received_frames_are_corrupted_or_duplicated_by_their_rules() {
    let (mem, atomic) = memory();
    let services = services_with(crate::services::NET, 2, &["op=rx,seed=5,action=corrupt"]);
    let device = loopback_net(&atomic, services.clone());
    let LoopbackRings { rx_mock, rx, tx_mock, tx } = loopback_rings(&mem, &atomic, 3);
    let send = post_frame(&mem, 0x80_0000);
    let sent = frame_at(&mem, 0x80_0000);
    let frame_at = |at: u64| frame_at(&mem, at);
    tx_mock.add_desc_chains(&[send], 0).unwrap();
    device.handle_event(1, EventSet::IN, &[rx.clone(), tx.clone()], 0).unwrap();
    device.handle_event(0, EventSet::IN, &[rx.clone(), tx.clone()], 0).unwrap();
    let got = frame_at(0x90_0000);
    let differing: Vec<usize> = (12..72).filter(|&i| got[i] != sent[i]).collect();
    assert_eq!(differing.len(), 1, "one byte inverted: {differing:?}");
    assert!(differing[0] >= 12 + 14, "after the Ethernet header: {differing:?}");
    assert_eq!(got[differing[0]], !sent[differing[0]]);

    services.faults.set(vec![RuleSpec::parse("op=rx,action=duplicate").unwrap()]).unwrap();
    tx_mock.add_desc_chains(&[send], 1).unwrap();
    device.handle_event(1, EventSet::IN, &[rx.clone(), tx.clone()], 0).unwrap();
    device.handle_event(0, EventSet::IN, &[rx.clone(), tx], 0).unwrap();
    assert_eq!(used_idx(&mem, &rx_mock), 3, "the second frame arrived twice");
    assert_eq!(frame_at(0x90_1000)[12..], sent[12..]);
    assert_eq!(frame_at(0x90_2000)[12..], sent[12..]);
}

/// Rate limits on a net device: a transmitted frame over the limit goes back to its ring and
/// leaves when the queue's timer says the tokens are back; a received one waits in the backend.
#[test]
fn net_limits_hold_frames_back_until_the_tokens_are_back() {
    let (mem, atomic) = memory();
    // Buckets hold a tenth of a second: one frame each way, then one per 100 ms.
    let args = ServiceArgs { limits: vec!["tx:ops=10".into(), "rx:ops=10".into()], ..ServiceArgs::default() };
    let services = DeviceServices::new(crate::services::NET, 2, &args).unwrap();
    let device = loopback_net(&atomic, services.clone());
    let LoopbackRings { rx_mock, rx, tx_mock, tx } = loopback_rings(&mem, &atomic, 3);
    let send = post_frame(&mem, 0x80_0000);
    tx_mock.add_desc_chains(&[send], 0).unwrap();
    tx_mock.add_desc_chains(&[send], 1).unwrap();
    let vrings = [rx.clone(), tx.clone()];
    device.handle_event(1, EventSet::IN, &vrings, 0).unwrap();
    assert_eq!(used_idx(&mem, &tx_mock), 1, "the second frame waits in the ring");
    assert_eq!(virtio_queue::QueueT::next_avail(tx.get_ref().get_queue()), 1, "put back");
    assert_eq!((used_idx(&mem, &rx_mock), services.limits.throttled().0), (1, 1));
    // The transmit queue's timer fires after 100 ms.
    std::thread::sleep(Duration::from_millis(120));
    device.handle_event(NET_TX_TIMER, EventSet::IN, &vrings, 0).unwrap();
    assert_eq!(used_idx(&mem, &tx_mock), 2, "sent once the tokens were back");
    // Its looped-back copy may wait for the receive queue's tokens, then arrives.
    std::thread::sleep(Duration::from_millis(120));
    device.handle_event(NET_RX_TIMER, EventSet::IN, &vrings, 0).unwrap();
    assert_eq!(used_idx(&mem, &rx_mock), 2, "received once the tokens were back");
    assert!(services.limits.throttled().0 >= 1);
}

/// A completion a delay rule holds: not published by the pass that served the request, but at
/// once when the frontend stops the ring (GET_VRING_BASE), so the index it is told counts no
/// request taken and not completed; and by the pass after its time otherwise.
#[test]
fn held_completions_are_published_when_due_or_when_the_ring_stops() {
    use crate::services::BLK;
    let (mem, atomic) = memory();
    let args = ServiceArgs { faults: vec!["op=read,action=delay:60000".into()], ..ServiceArgs::default() };
    let services = DeviceServices::new(BLK, 1, &args).unwrap();
    let device = blk_device_with(1, services.clone());
    device.update_memory(atomic.clone()).unwrap();
    let (queue, vring) = ring(&mem, &atomic, 0x10_0000);
    post_read(&mem, &queue, 512, 0x80_2000);
    device.handle_event(0, EventSet::IN, std::slice::from_ref(&vring), 0).unwrap();
    assert_eq!(mem.read_obj::<u8>(GuestAddress(0x80_2000)).unwrap(), 0, "served: its status is written");
    assert_eq!(used_idx(&mem, &queue), 0, "but its completion is held for a minute");
    assert_eq!(services.metrics.queue(0).unwrap().in_flight(), 1);
    device.stop_vring(0).unwrap();
    assert_eq!(used_idx(&mem, &queue), 1, "published when the frontend stops the ring");
    assert_eq!(services.metrics.queue(0).unwrap().in_flight(), 0);

    // A short delay: published by the pass after its time.
    services.faults.set(vec![RuleSpec::parse("op=read,action=delay:50").unwrap()]).unwrap();
    vring.set_queue_ready(true);
    mem.write_obj(0xffu8, GuestAddress(0x80_2000)).unwrap();
    post_read(&mem, &queue, 512, 0x80_2000);
    device.handle_event(0, EventSet::IN, std::slice::from_ref(&vring), 0).unwrap();
    assert_eq!(used_idx(&mem, &queue), 1, "held");
    std::thread::sleep(Duration::from_millis(80));
    // The queue's timer event (queues + 1 + queue).
    device.handle_event(2, EventSet::IN, std::slice::from_ref(&vring), 0).unwrap();
    assert_eq!(used_idx(&mem, &queue), 2, "published once due");
}

/// A console port's output over its byte limit waits in its ring and reaches the port once
/// the queue's timer says the tokens are back.
#[test]
fn console_output_over_its_limit_waits_for_the_tokens() {
    use crate::services::CONSOLE;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let host = Arc::new(ConsoleHost::new(vec![
        HostPort::open(PortSpec { kind: PortKind::File(out.clone()), name: None }).unwrap(),
    ]));
    // 1000 bytes/s: the bucket holds 100 bytes, so one 60-byte chunk goes at once.
    let args = ServiceArgs { limits: vec!["tx:bw=1000".into()], ..ServiceArgs::default() };
    let services = DeviceServices::new(CONSOLE, 2, &args).unwrap();
    let device = ConsoleDevice::with_services(host, Arc::new(Gates::new(1)), services.clone()).unwrap();
    let (mem, atomic) = memory();
    device.update_memory(atomic.clone()).unwrap();
    let (_rx, rx) = ring(&mem, &atomic, 0x10_0000);
    let (tx_mock, tx) = ring(&mem, &atomic, 0x20_0000);
    mem.write_slice(&[b'a'; 60], GuestAddress(0x80_0000)).unwrap();
    mem.write_slice(&[b'b'; 60], GuestAddress(0x80_1000)).unwrap();
    let chains = [
        RawDescriptor::from(SplitDescriptor::new(0x80_0000, 60, 0, 0)),
        RawDescriptor::from(SplitDescriptor::new(0x80_1000, 60, 0, 0)),
    ];
    tx_mock.add_desc_chains(&chains, 0).unwrap();
    let vrings = [rx.clone(), tx.clone()];
    device.handle_event(1, EventSet::IN, &vrings, 0).unwrap();
    assert_eq!(std::fs::read(&out).unwrap(), [b'a'; 60], "the second chunk waits");
    assert_eq!(used_idx(&mem, &tx_mock), 1);
    std::thread::sleep(Duration::from_millis(60));
    // The transmit queue's timer: queues + 2 + ports x 3 + queue.
    device.handle_event(2 + 2 + 3 + 1, EventSet::IN, &vrings, 0).unwrap();
    assert_eq!(used_idx(&mem, &tx_mock), 2);
    assert_eq!(std::fs::read(&out).unwrap(), [[b'a'; 60], [b'b'; 60]].concat(), "in order, once the tokens were back");
    assert_eq!(services.limits.throttled().0, 1);
}

/// Fault rules on transmitted frames: `delay` holds a frame (its chain is returned at once)
/// until its time, when the queue's timer wakes the pair; `corrupt` inverts one byte after the
/// Ethernet header; `duplicate` sends it twice.
#[test]
fn transmitted_frames_are_delayed_corrupted_and_duplicated_by_their_rules() {
    let (mem, atomic) = memory();
    let services = services_with(crate::services::NET, 2, &["op=tx,action=delay:50"]);
    let device = loopback_net(&atomic, services.clone());
    let LoopbackRings { rx_mock, rx, tx_mock, tx } = loopback_rings(&mem, &atomic, 4);
    let send = post_frame(&mem, 0x80_0000);
    let sent = frame_at(&mem, 0x80_0000);
    let vrings = [rx.clone(), tx.clone()];
    tx_mock.add_desc_chains(&[send], 0).unwrap();
    device.handle_event(1, EventSet::IN, &vrings, 0).unwrap();
    assert_eq!((used_idx(&mem, &tx_mock), used_idx(&mem, &rx_mock)), (1, 0), "returned, not yet sent");
    std::thread::sleep(Duration::from_millis(70));
    device.handle_event(NET_TX_TIMER, EventSet::IN, &vrings, 0).unwrap();
    assert_eq!(used_idx(&mem, &rx_mock), 1, "sent once its time came");
    assert_eq!(frame_at(&mem, 0x90_0000)[12..], sent[12..]);

    services.faults.set(vec![RuleSpec::parse("op=tx,seed=9,action=corrupt").unwrap()]).unwrap();
    tx_mock.add_desc_chains(&[send], 1).unwrap();
    device.handle_event(1, EventSet::IN, &vrings, 0).unwrap();
    let got = frame_at(&mem, 0x90_1000);
    let differing: Vec<usize> = (12..72).filter(|&i| got[i] != sent[i]).collect();
    assert_eq!(differing.len(), 1, "one byte inverted: {differing:?}");
    assert!(differing[0] >= TAG_OFFSET as usize, "after the Ethernet header: {differing:?}");

    services.faults.set(vec![RuleSpec::parse("op=tx,action=duplicate").unwrap()]).unwrap();
    tx_mock.add_desc_chains(&[send], 2).unwrap();
    device.handle_event(1, EventSet::IN, &vrings, 0).unwrap();
    assert_eq!((used_idx(&mem, &tx_mock), used_idx(&mem, &rx_mock)), (3, 4), "one chain, two frames");
    assert_eq!(frame_at(&mem, 0x90_3000)[12..], sent[12..]);
    let faults = services.faults.to_json();
    assert_eq!(faults["rules"][0]["injected"], 1);
}

/// `delay` once on received frames lets the next frame overtake the delayed one, which
/// arrives when the receive queue's timer fires; `reorder` once swaps a frame with the next.
#[test]
fn delayed_and_reordered_frames_arrive_after_the_frames_behind_them() {
    let (mem, atomic) = memory();
    let services = services_with(crate::services::NET, 2, &["op=rx,trigger=once,action=delay:40"]);
    let device = loopback_net(&atomic, services.clone());
    let LoopbackRings { rx_mock, rx, tx_mock, tx } = loopback_rings(&mem, &atomic, 4);
    let vrings = [rx.clone(), tx.clone()];
    let tags = |from: u64| -> Vec<u8> {
        (from..4)
            .take_while(|&i| i < u64::from(used_idx(&mem, &rx_mock)))
            .map(|i| mem.read_obj(GuestAddress(0x90_0000 + i * 0x1000 + TAG_OFFSET)).unwrap())
            .collect()
    };
    for (i, tag) in [b'a', b'b'].into_iter().enumerate() {
        tx_mock.add_desc_chains(&[post_tagged(&mem, 0x80_0000 + i as u64 * 0x1000, tag)], i as u16).unwrap();
    }
    device.handle_event(1, EventSet::IN, &vrings, 0).unwrap();
    assert_eq!(tags(0), b"b", "the first frame is delayed, the second overtakes it");
    std::thread::sleep(Duration::from_millis(60));
    device.handle_event(NET_RX_TIMER, EventSet::IN, &vrings, 0).unwrap();
    assert_eq!(tags(0), b"ba", "the delayed frame arrives once its time came");

    services.faults.set(vec![RuleSpec::parse("op=rx,trigger=once,action=reorder").unwrap()]).unwrap();
    for (i, tag) in [b'c', b'd'].into_iter().enumerate() {
        tx_mock.add_desc_chains(&[post_tagged(&mem, 0x80_2000 + i as u64 * 0x1000, tag)], 2 + i as u16).unwrap();
    }
    device.handle_event(1, EventSet::IN, &vrings, 0).unwrap();
    assert_eq!(tags(2), b"dc", "reordered: the held frame right after the next");
}

/// A console `delay` rule holds output until its time; output after it waits behind it, so
/// the stream keeps its order. A delay of input is refused.
#[test]
fn console_output_is_delayed_in_order() {
    use crate::services::CONSOLE;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let host = Arc::new(ConsoleHost::new(vec![
        HostPort::open(PortSpec { kind: PortKind::File(out.clone()), name: None }).unwrap(),
    ]));
    let services = services_with(CONSOLE, 2, &["op=tx,trigger=once,action=delay:50"]);
    let device = ConsoleDevice::with_services(host, Arc::new(Gates::new(1)), services.clone()).unwrap();
    let (mem, atomic) = memory();
    device.update_memory(atomic.clone()).unwrap();
    let (_rx, rx) = ring(&mem, &atomic, 0x10_0000);
    let (tx_mock, tx) = ring(&mem, &atomic, 0x20_0000);
    mem.write_slice(b"first ", GuestAddress(0x80_0000)).unwrap();
    mem.write_slice(b"second", GuestAddress(0x80_1000)).unwrap();
    let chains = [
        RawDescriptor::from(SplitDescriptor::new(0x80_0000, 6, 0, 0)),
        RawDescriptor::from(SplitDescriptor::new(0x80_1000, 6, 0, 0)),
    ];
    tx_mock.add_desc_chains(&chains, 0).unwrap();
    let vrings = [rx.clone(), tx.clone()];
    device.handle_event(1, EventSet::IN, &vrings, 0).unwrap();
    assert_eq!(used_idx(&mem, &tx_mock), 2, "both chains are returned");
    assert_eq!(std::fs::read(&out).unwrap(), b"", "the output waits");
    std::thread::sleep(Duration::from_millis(70));
    // The transmit queue's timer: queues + 2 + ports x 3 + queue.
    device.handle_event(2 + 2 + 3 + 1, EventSet::IN, &vrings, 0).unwrap();
    assert_eq!(std::fs::read(&out).unwrap(), b"first second", "in order, once its time came");
    let args = ServiceArgs { faults: vec!["op=rx,action=delay:5".into()], ..ServiceArgs::default() };
    let refused = DeviceServices::new(CONSOLE, 2, &args).err().map(|e| e.to_string()).unwrap_or_default();
    assert!(refused.contains("output only"), "{refused}");
}
