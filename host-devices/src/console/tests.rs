//! Unit tests of the console device with virtio-queue's `MockSplitQueue`: guest input of the
//! wrong shape is ignored with a log line and service goes on; backpressure holds chains.

use super::device::{ConsoleDevice, ConsoleHost};
use super::port::{HostPort, PENDING_LIMIT, PortKind, PortSpec};
use std::io::{Read, Write};
use std::sync::Arc;
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio_queue::desc::RawDescriptor;
use virtio_queue::desc::split::Descriptor as SplitDescriptor;
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryAtomic, GuestMemoryMmap};

const NEXT: u16 = 1;
const WRITE: u16 = 2;
const DATA: u64 = 0x10_0000;

fn desc(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
    RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next))
}

struct Fixture {
    mem: GuestMemoryMmap,
    atomic: GuestMemoryAtomic<GuestMemoryMmap>,
    device: ConsoleDevice,
}

fn fixture(spec: PortSpec) -> Fixture {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x80_0000)]).unwrap();
    let atomic = GuestMemoryAtomic::new(mem.clone());
    let host = Arc::new(ConsoleHost::new(vec![HostPort::open(spec).unwrap()]));
    let device = ConsoleDevice::new(host, Arc::new(crate::queue::Gates::new(1))).unwrap();
    device.update_memory(atomic.clone()).unwrap();
    Fixture { mem, atomic, device }
}

fn vring(f: &Fixture, q: &MockSplitQueue<GuestMemoryMmap>) -> VringRwLock {
    let v = VringRwLock::new(f.atomic.clone(), 256).unwrap();
    v.set_queue_size(256);
    v.set_queue_info(q.desc_table_addr().0, q.avail_addr().0, q.used_addr().0).unwrap();
    v.set_queue_ready(true);
    v
}

fn used(f: &Fixture, q: &MockSplitQueue<GuestMemoryMmap>) -> u16 {
    f.mem.read_obj(q.used_addr().unchecked_add(2)).unwrap()
}

#[test]
fn transmit_skips_chains_of_the_wrong_direction_and_keeps_order() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("out");
    let f = fixture(PortSpec { kind: PortKind::File(log.clone()), name: None });
    let q = MockSplitQueue::create(&f.mem, GuestAddress(0), 256);
    f.mem.write_slice(b"abc", GuestAddress(DATA)).unwrap();
    f.mem.write_slice(b"BAD", GuestAddress(DATA + 0x100)).unwrap();
    f.mem.write_slice(b"def", GuestAddress(DATA + 0x200)).unwrap();
    q.add_desc_chains(
        &[
            desc(DATA, 3, 0, 0),
            desc(DATA + 0x100, 3, NEXT, 2),
            desc(DATA + 0x100, 3, WRITE, 0),
            desc(DATA + 0x200, 3, 0, 0),
        ],
        0,
    )
    .unwrap();
    let v = vring(&f, &q);
    f.device.pump_tx(0, &v, &f.atomic).unwrap();
    assert_eq!(used(&f, &q), 3, "every chain returned, the bad one too");
    assert_eq!(std::fs::read(&log).unwrap(), b"abcdef");
}

#[test]
fn backpressure_leaves_chains_in_the_ring_until_the_host_side_takes_data() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("p.sock");
    let f = fixture(PortSpec { kind: PortKind::Unix(sock.clone()), name: None });
    let q = MockSplitQueue::create(&f.mem, GuestAddress(0), 256);
    let chunk = 16 * 1024u32;
    let chains = 8u16;
    let descs: Vec<RawDescriptor> =
        (0..chains).map(|i| desc(DATA + u64::from(i) * u64::from(chunk), chunk, 0, 0)).collect();
    q.add_desc_chains(&descs, 0).unwrap();
    let v = vring(&f, &q);
    // Nobody is connected: the port fills to its limit and the rest stays in the ring.
    f.device.pump_tx(0, &v, &f.atomic).unwrap();
    let taken = used(&f, &q);
    assert_eq!(u64::from(taken) * u64::from(chunk), PENDING_LIMIT as u64, "stops at the limit");
    assert!(taken < chains);
    // A client connects and reads: the rest flows.
    let mut client = std::os::unix::net::UnixStream::connect(&sock).unwrap();
    let handle = std::thread::spawn(move || {
        let mut all = Vec::new();
        client.read_to_end(&mut all).unwrap();
        all.len()
    });
    std::thread::sleep(std::time::Duration::from_millis(20));
    let accepted = { f.device.accept_for_test(0) };
    assert!(accepted);
    for _ in 0..200 {
        f.device.pump_tx(0, &v, &f.atomic).unwrap();
        if used(&f, &q) == chains {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    assert_eq!(used(&f, &q), chains);
    drop(v);
    drop(f);
    assert_eq!(handle.join().unwrap(), chains as usize * chunk as usize, "every byte arrived");
}

#[test]
fn receive_chain_without_writable_buffers_is_returned_empty_and_service_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("p.sock");
    let f = fixture(PortSpec { kind: PortKind::Unix(sock.clone()), name: None });
    let mut client = std::os::unix::net::UnixStream::connect(&sock).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(20));
    assert!(f.device.accept_for_test(0));
    client.write_all(b"input").unwrap();
    std::thread::sleep(std::time::Duration::from_millis(20));
    let q = MockSplitQueue::create(&f.mem, GuestAddress(0), 256);
    q.add_desc_chains(&[desc(DATA, 64, 0, 0), desc(DATA + 0x100, 64, WRITE, 0)], 0).unwrap();
    let v = vring(&f, &q);
    f.device.pump_rx(0, &v, &f.atomic).unwrap();
    assert_eq!(used(&f, &q), 2);
    // Used element 0: the bad chain, length 0; element 1: the input.
    let elem = |i: u64| -> (u32, u32) {
        let at = q.used_addr().unchecked_add(4 + 8 * i);
        (f.mem.read_obj(at).unwrap(), f.mem.read_obj(at.unchecked_add(4)).unwrap())
    };
    assert_eq!(elem(0), (0, 0));
    assert_eq!(elem(1), (1, 5));
    let mut got = [0u8; 5];
    f.mem.read_slice(&mut got, GuestAddress(DATA + 0x100)).unwrap();
    assert_eq!(&got, b"input");
}

#[test]
fn receive_waits_for_host_input_without_consuming_buffers() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("p.sock");
    let f = fixture(PortSpec { kind: PortKind::Unix(sock.clone()), name: None });
    let _client = std::os::unix::net::UnixStream::connect(&sock).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(20));
    assert!(f.device.accept_for_test(0));
    let q = MockSplitQueue::create(&f.mem, GuestAddress(0), 256);
    q.add_desc_chains(&[desc(DATA, 64, WRITE, 0)], 0).unwrap();
    let v = vring(&f, &q);
    f.device.pump_rx(0, &v, &f.atomic).unwrap();
    assert_eq!(used(&f, &q), 0, "no input: the buffer stays posted");
    assert_eq!(v.queue_next_avail(), 0, "and is not consumed");
}

/// Host input over the port's byte limit waits in the backend, ahead of what follows, and is
/// delivered whole once the tokens are back.
#[test]
fn input_over_its_limit_waits_in_the_backend_and_nothing_is_lost() {
    use crate::services::{CONSOLE, DeviceServices, ServiceArgs};
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("p.sock");
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x80_0000)]).unwrap();
    let atomic = GuestMemoryAtomic::new(mem.clone());
    let host = Arc::new(ConsoleHost::new(vec![
        HostPort::open(PortSpec { kind: PortKind::Unix(sock.clone()), name: None }).unwrap(),
    ]));
    // 500 bytes/s: the bucket holds 50 bytes; 60 pass when it is full, leaving it in debt.
    let args = ServiceArgs { limits: vec!["rx:bw=500".into()], ..ServiceArgs::default() };
    let services = DeviceServices::new(CONSOLE, 2, &args).unwrap();
    let device = ConsoleDevice::with_services(host, Arc::new(crate::queue::Gates::new(1)), services.clone()).unwrap();
    device.update_memory(atomic.clone()).unwrap();
    let f = Fixture { mem, atomic, device };
    let mut client = std::os::unix::net::UnixStream::connect(&sock).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(20));
    assert!(f.device.accept_for_test(0));
    let q = MockSplitQueue::create(&f.mem, GuestAddress(0), 256);
    q.add_desc_chains(&[desc(DATA, 60, WRITE, 0), desc(DATA + 0x100, 60, WRITE, 0)], 0).unwrap();
    let v = vring(&f, &q);
    client.write_all(&[b'x'; 60]).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(20));
    f.device.pump_rx(0, &v, &f.atomic).unwrap();
    assert_eq!(used(&f, &q), 1, "the first 60 bytes go at once");
    client.write_all(&[b'y'; 60]).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(20));
    f.device.pump_rx(0, &v, &f.atomic).unwrap();
    assert_eq!(used(&f, &q), 1, "the next 60 wait for their tokens");
    assert_eq!(services.limits.throttled().0, 1);
    std::thread::sleep(std::time::Duration::from_millis(200));
    // The receive queue's timer fired (the worker would have been woken by it).
    let timer_event = 2 + 2 + 3;
    f.device.handle_event(timer_event, vmm_sys_util::epoll::EventSet::IN, std::slice::from_ref(&v), 0).ok();
    f.device.pump_rx(0, &v, &f.atomic).unwrap();
    assert_eq!(used(&f, &q), 2);
    let mut got = [0u8; 60];
    f.mem.read_slice(&mut got, GuestAddress(DATA + 0x100)).unwrap();
    assert_eq!(got, [b'y'; 60], "delivered whole, nothing lost");
}
