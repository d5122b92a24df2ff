//! The core under every device, tried as a hostile or ordinary guest would, through each
//! device's `handle_event` (what the library's worker thread calls on a kick).

use crate::blk::device::{BlkDevice, BlkOptions};
use crate::blk::engine::{Engine, NullEngine};
use crate::blk::stats::Stats;
use crate::console::device::{ConsoleDevice, ConsoleHost};
use crate::console::port::{HostPort, PortKind, PortSpec};
use crate::net::device::{NetDevice, NetOptions};
use crate::net::side::NetworkSide;
use crate::net::stats::NetStats;
use crate::queue::{Gates, Memory};
use crate::server::ServedDevice;
use pvkit_protocol::blk::{RequestHeaderRepr, RequestType};
use pvkit_protocol::console::queue as cq;
use pvkit_protocol::ring::desc_flags::{NEXT, WRITE};
use std::io::Read;
use std::sync::Arc;
use std::time::Duration;
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio_queue::desc::RawDescriptor;
use virtio_queue::desc::split::Descriptor as SplitDescriptor;
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;

pub(super) const RING_SIZE: u16 = 16;

pub(super) fn memory() -> (GuestMemoryMmap, Memory) {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x100_0000)]).unwrap();
    let atomic = GuestMemoryAtomic::new(mem.clone());
    (mem, atomic)
}

/// A ring at `base` (a mock split queue), as the library's vring for it: set up, ready and
/// enabled.
pub(super) fn ring<'a>(
    mem: &'a GuestMemoryMmap,
    atomic: &Memory,
    base: u64,
) -> (MockSplitQueue<'a, GuestMemoryMmap>, VringRwLock) {
    let mock = MockSplitQueue::create(mem, GuestAddress(base), RING_SIZE);
    let vring = VringRwLock::new(atomic.clone(), RING_SIZE).unwrap();
    vring.set_queue_size(RING_SIZE);
    vring.set_queue_info(mock.desc_table_addr().0, mock.avail_addr().0, mock.used_addr().0).unwrap();
    vring.set_queue_ready(true);
    vring.set_enabled(true);
    (mock, vring)
}

fn break_ring(mem: &GuestMemoryMmap, mock: &MockSplitQueue<'_, GuestMemoryMmap>) {
    mem.write_obj(1000u16, mock.avail_addr().unchecked_add(2)).unwrap();
}

pub(super) fn used_idx(mem: &GuestMemoryMmap, mock: &MockSplitQueue<'_, GuestMemoryMmap>) -> u16 {
    mem.read_obj(mock.used_addr().unchecked_add(2)).unwrap()
}

/// Posts a block read of `len` bytes from sector 0 on `mock`: its header at 0x80_0000, its data
/// at 0x80_1000, its status byte at `status`.
pub(super) fn post_read(mem: &GuestMemoryMmap, mock: &MockSplitQueue<'_, GuestMemoryMmap>, len: u32, status: u64) {
    let mut header = [0u8; 16];
    RequestHeaderRepr { request_type: RequestType::In, ioprio: 0, sector: 0 }.emit(&mut header).unwrap();
    mem.write_slice(&header, GuestAddress(0x80_0000)).unwrap();
    let read = [
        RawDescriptor::from(SplitDescriptor::new(0x80_0000, 16, NEXT, 1)),
        RawDescriptor::from(SplitDescriptor::new(0x80_1000, len, WRITE | NEXT, 2)),
        RawDescriptor::from(SplitDescriptor::new(status, 1, WRITE, 0)),
    ];
    mock.add_desc_chains(&read, 0).unwrap();
}

/// Writes a 60-byte frame behind a zeroed 12-byte header at `at` and returns the transmit
/// descriptor for it.
pub(super) fn post_frame(mem: &GuestMemoryMmap, at: u64) -> RawDescriptor {
    let mut frame = vec![0u8; 12 + 60];
    frame[12..18].copy_from_slice(&[2, 0, 0, 0, 0, 2]);
    frame[24..26].copy_from_slice(&[0x08, 0x00]);
    mem.write_slice(&frame, GuestAddress(at)).unwrap();
    RawDescriptor::from(SplitDescriptor::new(at, frame.len() as u32, 0, 0))
}

/// Turns dirty-page logging on for `core` over 16 MiB of guest memory; returns the log.
fn logging_on(core: &crate::queue::DeviceCore) -> std::fs::File {
    use std::os::fd::AsFd;
    let bytes = 0x100_0000 / 4096 / 8;
    let log = tempfile::tempfile().unwrap();
    log.set_len(bytes).unwrap();
    core.dirty_log().set_base(log.as_fd().try_clone_to_owned().unwrap(), 0, bytes).unwrap();
    core.dirty_log().set_log_all(true);
    log
}

/// Runs `f` on a thread and fails the test if it does not return within five seconds (a
/// worker spinning on a broken ring never returns).
pub(super) fn within_five_seconds<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = done_tx.send(f());
    });
    done_rx.recv_timeout(Duration::from_secs(5)).unwrap_or_else(|_| panic!("{what} did not return: a worker spins"))
}

fn blk_device(queues: u16) -> BlkDevice {
    blk_device_with(queues, Arc::new(crate::queue::NoServices))
}

/// A block device with `queues` queues over a 1 MiB null disk, with `services`.
pub(super) fn blk_device_with(queues: u16, services: Arc<dyn crate::queue::QueueServices>) -> BlkDevice {
    let options = BlkOptions {
        num_queues: queues,
        queue_size: 256,
        serial: "core-test".into(),
        logical_block_size: 512,
        read_only: false,
        poll_us: 0,
    };
    let engine = Engine::Null(NullEngine::new(1 << 20).unwrap());
    let gates = Arc::new(Gates::new(queues.into()));
    BlkDevice::with_services(Arc::new(engine), options, Arc::new(Stats::default()), gates, services).unwrap()
}

#[test]
fn a_broken_blk_ring_is_marked_once_and_the_other_queue_goes_on() {
    let (mem, atomic) = memory();
    let device = blk_device(2);
    device.update_memory(atomic.clone()).unwrap();
    let (broken, vring0) = ring(&mem, &atomic, 0x10_0000);
    let (good, vring1) = ring(&mem, &atomic, 0x20_0000);
    break_ring(&mem, &broken);
    for _ in 0..3 {
        let (device, vring0) = (device.clone(), vring0.clone());
        within_five_seconds("a kick on a broken ring", move || {
            device.handle_event(0, EventSet::IN, &[vring0], 0).unwrap();
        });
    }
    assert!(device.core().is_broken(0));
    assert_eq!(device.core().broken_rings(), 1, "found broken once, however often it is kicked");
    // A read on the other queue is served.
    mem.write_obj(0xffu8, GuestAddress(0x80_2000)).unwrap();
    post_read(&mem, &good, 512, 0x80_2000);
    device.handle_event(0, EventSet::IN, &[vring1], 1).unwrap();
    assert_eq!(used_idx(&mem, &good), 1);
    assert_eq!(mem.read_obj::<u8>(GuestAddress(0x80_2000)).unwrap(), 0, "status OK");
    // The frontend resets the broken queue (GET_VRING_BASE): it may be served again.
    device.stop_vring(0).unwrap();
    assert!(!device.core().is_broken(0));
}

#[test]
fn a_broken_net_ring_is_marked_and_the_worker_returns() {
    let (mem, atomic) = memory();
    let options = NetOptions { pairs: 1, queue_size: 256, mac: [2, 0, 0, 0, 0, 1], mtu: 1500, poll_us: 50 };
    let device =
        NetDevice::new(options, NetworkSide::Loopback, Arc::new(NetStats::default()), Arc::new(Gates::new(1))).unwrap();
    device.update_memory(atomic.clone()).unwrap();
    let (_rx, rx) = ring(&mem, &atomic, 0x10_0000);
    let (tx_mock, tx) = ring(&mem, &atomic, 0x20_0000);
    break_ring(&mem, &tx_mock);
    for _ in 0..3 {
        let (device, rx, tx) = (device.clone(), rx.clone(), tx.clone());
        within_five_seconds("a kick on a broken transmit ring", move || {
            device.handle_event(1, EventSet::IN, &[rx, tx], 0).unwrap();
        });
    }
    assert!(device.core().is_broken(1) && !device.core().is_broken(0));
    assert_eq!(device.core().broken_rings(), 1);
}

fn console_device(ports: Vec<PortSpec>) -> (ConsoleDevice, Arc<ConsoleHost>) {
    let host = Arc::new(ConsoleHost::new(ports.into_iter().map(|spec| HostPort::open(spec).unwrap()).collect()));
    (ConsoleDevice::new(host.clone(), Arc::new(Gates::new(1))).unwrap(), host)
}

#[test]
fn a_broken_console_ring_leaves_the_next_connection_unaffected() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let host = Arc::new(ConsoleHost::new(vec![
        HostPort::open(PortSpec { kind: PortKind::File(out.clone()), name: None }).unwrap(),
    ]));
    let first = ConsoleDevice::new(host.clone(), Arc::new(Gates::new(1))).unwrap();
    let (mem, atomic) = memory();
    first.update_memory(atomic.clone()).unwrap();
    let (_rx, rx) = ring(&mem, &atomic, 0x10_0000);
    let (tx_mock, tx) = ring(&mem, &atomic, 0x20_0000);
    break_ring(&mem, &tx_mock);
    {
        let (first, rx, tx) = (first.clone(), rx.clone(), tx.clone());
        within_five_seconds("a kick on a broken console ring", move || {
            first.handle_event(1, EventSet::IN, &[rx, tx], 0).unwrap();
        });
    }
    assert_eq!(first.core().broken_rings(), 1);
    first.stop_workers();
    // The next frontend, on fresh rings, is served.
    let second = ConsoleDevice::new(host, Arc::new(Gates::new(1))).unwrap();
    let (mem, atomic) = memory();
    second.update_memory(atomic.clone()).unwrap();
    let (_rx, rx) = ring(&mem, &atomic, 0x10_0000);
    let (tx_mock, tx) = ring(&mem, &atomic, 0x20_0000);
    mem.write_slice(b"after", GuestAddress(0x80_0000)).unwrap();
    tx_mock.add_desc_chains(&[RawDescriptor::from(SplitDescriptor::new(0x80_0000, 5, 0, 0))], 0).unwrap();
    second.handle_event(1, EventSet::IN, &[rx, tx], 0).unwrap();
    assert_eq!(used_idx(&mem, &tx_mock), 1);
    assert_eq!(std::fs::read(&out).unwrap(), b"after");
}

#[test]
fn a_full_console_port_parks_its_queue_instead_of_spinning() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("p1.sock");
    let ports = vec![
        PortSpec { kind: PortKind::File(dir.path().join("p0")), name: None },
        PortSpec { kind: PortKind::Unix(sock.clone()), name: Some("second".into()) },
    ];
    let (device, _host) = console_device(ports);
    let (mem, atomic) = memory();
    device.update_memory(atomic.clone()).unwrap();
    let queues = usize::from(cq::count(2, true));
    let mocks_and_vrings: Vec<_> = (0..queues).map(|q| ring(&mem, &atomic, 0x10_0000 * (q as u64 + 1))).collect();
    let vrings: Vec<VringRwLock> = mocks_and_vrings.iter().map(|(_, v)| v.clone()).collect();
    let tx = usize::from(cq::port_tx(1));
    let chunk = 40 * 1024;
    let payload: Vec<u8> = (0..3 * chunk).map(|i| (i % 251) as u8).collect();
    mem.write_slice(&payload, GuestAddress(0x80_0000)).unwrap();
    let chains: Vec<RawDescriptor> = (0..3)
        .map(|i| RawDescriptor::from(SplitDescriptor::new(0x80_0000 + (i * chunk) as u64, chunk as u32, 0, 0)))
        .collect();
    mocks_and_vrings[tx].0.add_desc_chains(&chains, 0).unwrap();
    {
        let (device, vrings) = (device.clone(), vrings.clone());
        within_five_seconds("a kick on a full port's queue", move || {
            device.handle_event(tx as u16, EventSet::IN, &vrings, 0).unwrap();
        });
    }
    assert_eq!(used_idx(&mem, &mocks_and_vrings[tx].0), 1, "one chain taken; the rest wait in the ring");
    // A client connects: the port drains and the waiting chains follow, nothing lost.
    let mut client = std::os::unix::net::UnixStream::connect(&sock).unwrap();
    client.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    assert!(device.accept_for_test(1));
    let mut received = Vec::new();
    while received.len() < payload.len() {
        device.handle_event(tx as u16, EventSet::IN, &vrings, 0).unwrap();
        let mut buf = vec![0u8; 64 * 1024];
        match client.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => received.extend_from_slice(&buf[..n]),
            Err(e) => panic!("reading the port: {e}"),
        }
    }
    assert_eq!(received, payload);
    assert_eq!(used_idx(&mem, &mocks_and_vrings[tx].0), 3);
}

#[test]
fn a_console_chain_aliasing_one_buffer_is_refused_not_copied() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let (device, host) = console_device(vec![PortSpec { kind: PortKind::File(out.clone()), name: None }]);
    let (mem, atomic) = memory();
    device.update_memory(atomic.clone()).unwrap();
    let (_rx, rx) = ring(&mem, &atomic, 0x10_0000);
    let (tx_mock, tx) = ring(&mem, &atomic, 0x20_0000);
    // Sixteen descriptors, all over the same 1 MiB: 16 MiB from 1 MiB of guest memory.
    let aliasing: Vec<RawDescriptor> = (0..RING_SIZE)
        .map(|i| {
            let flags = if i + 1 < RING_SIZE { NEXT } else { 0 };
            RawDescriptor::from(SplitDescriptor::new(0x80_0000, 1 << 20, flags, i + 1))
        })
        .collect();
    tx_mock.add_desc_chains(&aliasing, 0).unwrap();
    device.handle_event(1, EventSet::IN, &[rx, tx], 0).unwrap();
    assert_eq!(used_idx(&mem, &tx_mock), 1, "the chain goes back");
    assert_eq!(device.refused_chains(), 1);
    assert!(host.summary().contains("pending=0"), "nothing was held: {}", host.summary());
    assert_eq!(std::fs::read(&out).unwrap_or_default(), b"");
}

/// A pass that takes its time, as a batch of slow disk requests would.
struct SlowPass {
    entered: std::sync::mpsc::Sender<()>,
    finished: Arc<std::sync::atomic::AtomicBool>,
    passes: usize,
}

impl crate::queue::QueueService for SlowPass {
    fn pass(&mut self, _ctx: &crate::queue::worker::PassContext<'_>) -> Result<usize, crate::queue::PassError> {
        self.passes += 1;
        let _ = self.entered.send(());
        std::thread::sleep(Duration::from_millis(150));
        self.finished.store(true, std::sync::atomic::Ordering::SeqCst);
        Ok(0)
    }
}

#[test]
fn a_disconnect_waits_for_the_pass_under_way_and_no_pass_starts_after_it() {
    let (_mem, atomic) = memory();
    let core = Arc::new(crate::queue::DeviceCore::new("test", 1, 1, Arc::new(Gates::new(1)), 0).unwrap());
    core.update_memory(atomic);
    let finished = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (entered_tx, entered_rx) = std::sync::mpsc::channel();
    let worker = {
        let (core, finished) = (core.clone(), finished.clone());
        std::thread::spawn(move || {
            let mut pass = SlowPass { entered: entered_tx, finished, passes: 0 };
            core.serve(0, &[], &mut pass).unwrap();
            core.serve(0, &[], &mut pass).unwrap();
            pass.passes
        })
    };
    entered_rx.recv_timeout(Duration::from_secs(5)).unwrap();
    // What the server does when the frontend goes away, before it accepts the next one.
    core.stop();
    assert!(finished.load(std::sync::atomic::Ordering::SeqCst), "stop returned while a pass was under way");
    assert_eq!(worker.join().unwrap(), 1, "a pass ran after the stop");
}

/// A read on a block queue with recording services attached: admitted, completed, every byte
/// the device wrote reported; with the services failing everything, the read ends in IOERR.
#[test]
fn services_see_every_block_request_and_every_guest_write() {
    use crate::queue::services::RecordingServices;
    let (mem, atomic) = memory();
    let services = Arc::new(RecordingServices::default());
    let device = blk_device_with(1, services.clone());
    device.update_memory(atomic.clone()).unwrap();
    let (queue, vring) = ring(&mem, &atomic, 0x10_0000);
    post_read(&mem, &queue, 512, 0x80_2000);
    device.handle_event(0, EventSet::IN, std::slice::from_ref(&vring), 0).unwrap();
    assert_eq!(mem.read_obj::<u8>(GuestAddress(0x80_2000)).unwrap(), 0, "status OK");
    let admitted = crate::lock(&services.admitted).clone();
    assert_eq!(admitted.iter().map(|w| (w.queue, w.kind, w.bytes)).collect::<Vec<_>>(), [(0, "read", 512)]);
    let completed = crate::lock(&services.completed).clone();
    assert!(completed.len() == 1 && completed[0].ok, "one successful completion: {completed:?}");
    assert!(services.covers(0x80_1000, 512), "the read's data was reported written");
    assert!(services.covers(0x80_2000, 1), "the status byte was reported written");
    assert!(services.covers(queue.used_addr().0 + 2, 2), "the used index was reported written");
    // A service that fails everything: the next read is refused with IOERR, still reported.
    services.fail_all.store(true, std::sync::atomic::Ordering::Relaxed);
    post_read(&mem, &queue, 512, 0x80_2000);
    device.handle_event(0, EventSet::IN, &[vring], 0).unwrap();
    assert_eq!(used_idx(&mem, &queue), 2);
    assert_eq!(mem.read_obj::<u8>(GuestAddress(0x80_2000)).unwrap(), 1, "status IOERR");
    let completed = crate::lock(&services.completed).clone();
    assert!(completed.len() == 2 && !completed[1].ok, "the failed read completes, not ok: {completed:?}");
}

/// The admitted work and completions a recording service saw, as (queue, kind, bytes, ok).
fn balance(services: &crate::queue::services::RecordingServices) -> (Vec<(usize, &'static str, u64)>, Vec<bool>) {
    let admitted = crate::lock(&services.admitted).iter().map(|w| (w.queue, w.kind, w.bytes)).collect();
    let completed: Vec<_> = crate::lock(&services.completed).iter().map(|c| c.ok).collect();
    (admitted, completed)
}

/// A frame through the loopback: admitted and completed once on the transmit queue and once
/// on the receive queue, the received frame reported written; failed by a service, the next
/// frame is dropped (not looped back) and completes not ok.
#[test]
fn services_see_every_net_frame_both_ways() {
    use crate::queue::services::RecordingServices;
    let (mem, atomic) = memory();
    let services = Arc::new(RecordingServices::default());
    let options = NetOptions { pairs: 1, queue_size: 256, mac: [2, 0, 0, 0, 0, 1], mtu: 1500, poll_us: 0 };
    let stats = Arc::new(NetStats::default());
    let device =
        NetDevice::with_services(options, NetworkSide::Loopback, stats, Arc::new(Gates::new(1)), services.clone())
            .unwrap();
    device.acked_features(device.features());
    device.update_memory(atomic.clone()).unwrap();
    let (rx_mock, rx) = ring(&mem, &atomic, 0x10_0000);
    let (tx_mock, tx) = ring(&mem, &atomic, 0x20_0000);
    let receive = |at: u64| RawDescriptor::from(SplitDescriptor::new(at, 2048, WRITE, 0));
    rx_mock.add_desc_chains(&[receive(0x90_0000), receive(0x90_1000)], 0).unwrap();
    let send = post_frame(&mem, 0x80_0000);
    tx_mock.add_desc_chains(&[send], 0).unwrap();
    device.handle_event(1, EventSet::IN, &[rx.clone(), tx.clone()], 0).unwrap();
    device.handle_event(0, EventSet::IN, &[rx.clone(), tx.clone()], 0).unwrap();
    assert_eq!((used_idx(&mem, &tx_mock), used_idx(&mem, &rx_mock)), (1, 1), "sent and looped back");
    assert_eq!(balance(&services), (vec![(1, "tx", 60), (0, "rx", 60)], vec![true, true]));
    assert!(services.covers(0x90_0000, 72), "the received frame was reported written");
    services.fail_all.store(true, std::sync::atomic::Ordering::Relaxed);
    tx_mock.add_desc_chains(&[send], 1).unwrap();
    device.handle_event(1, EventSet::IN, &[rx.clone(), tx.clone()], 0).unwrap();
    device.handle_event(0, EventSet::IN, &[rx, tx], 0).unwrap();
    assert_eq!((used_idx(&mem, &tx_mock), used_idx(&mem, &rx_mock)), (2, 1), "taken from the ring, not looped back");
    assert_eq!(balance(&services).1, [true, true, false]);
}

/// Guest output to a file port: each chain admitted and completed once; failed by a service,
/// the chain is returned and its bytes are not written.
#[test]
fn services_see_every_console_chain_both_ways() {
    use crate::queue::services::RecordingServices;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let host = Arc::new(ConsoleHost::new(vec![
        HostPort::open(PortSpec { kind: PortKind::File(out.clone()), name: None }).unwrap(),
    ]));
    let services = Arc::new(RecordingServices::default());
    let device = ConsoleDevice::with_services(host, Arc::new(Gates::new(1)), services.clone()).unwrap();
    let (mem, atomic) = memory();
    device.update_memory(atomic.clone()).unwrap();
    let (_rx, rx) = ring(&mem, &atomic, 0x10_0000);
    let (tx_mock, tx) = ring(&mem, &atomic, 0x20_0000);
    mem.write_slice(b"hello", GuestAddress(0x80_0000)).unwrap();
    let chain = RawDescriptor::from(SplitDescriptor::new(0x80_0000, 5, 0, 0));
    tx_mock.add_desc_chains(&[chain], 0).unwrap();
    device.handle_event(1, EventSet::IN, &[rx.clone(), tx.clone()], 0).unwrap();
    assert_eq!(std::fs::read(&out).unwrap(), b"hello");
    assert_eq!(balance(&services), (vec![(1, "tx", 5)], vec![true]));
    services.fail_all.store(true, std::sync::atomic::Ordering::Relaxed);
    tx_mock.add_desc_chains(&[chain], 1).unwrap();
    device.handle_event(1, EventSet::IN, &[rx, tx], 0).unwrap();
    assert_eq!(used_idx(&mem, &tx_mock), 2, "the failed chain is returned");
    assert_eq!(std::fs::read(&out).unwrap(), b"hello", "and its bytes are not written");
    assert_eq!(balance(&services).1, [true, false]);
}

/// A frame larger than every receive buffer the guest posted (MRG_RXBUF, event index on) waits
/// without spinning: the worker returns, the driver is asked to kick for the next buffer it
/// adds (`avail_event` at its index), and once that buffer comes the frame is delivered.
#[test]
fn a_frame_larger_than_all_receive_buffers_waits_without_spinning() {
    use pvkit_protocol::net::feature as netf;
    use pvkit_protocol::ring::avail_event_offset;
    use pvkit_protocol::virtio::feature as vf;
    let (mem, atomic) = memory();
    let options = NetOptions { pairs: 1, queue_size: 256, mac: [2, 0, 0, 0, 0, 1], mtu: 1500, poll_us: 0 };
    let stats = Arc::new(NetStats::default());
    let device = NetDevice::new(options, NetworkSide::Loopback, stats, Arc::new(Gates::new(1))).unwrap();
    let wanted = pvkit_protocol::virtio::Features::from_bits(&[vf::VERSION_1, vf::RING_EVENT_IDX, netf::MRG_RXBUF]);
    device.acked_features(device.features() & wanted.0);
    device.update_memory(atomic.clone()).unwrap();
    let (rx_mock, rx) = ring(&mem, &atomic, 0x10_0000);
    let (tx_mock, tx) = ring(&mem, &atomic, 0x20_0000);
    for vring in [&rx, &tx] {
        vring.set_queue_event_idx(true);
    }
    let small = |at: u64| RawDescriptor::from(SplitDescriptor::new(at, 16, WRITE, 0));
    rx_mock.add_desc_chains(&[small(0x90_0000), small(0x90_1000)], 0).unwrap();
    let send = post_frame(&mem, 0x80_0000);
    tx_mock.add_desc_chains(&[send], 0).unwrap();
    for queue in [1, 0] {
        let (device, rx, tx) = (device.clone(), rx.clone(), tx.clone());
        within_five_seconds("a frame too large for the receive buffers", move || {
            device.handle_event(queue, EventSet::IN, &[rx, tx], 0).unwrap();
        });
    }
    assert_eq!(used_idx(&mem, &rx_mock), 0, "nothing delivered into buffers too small");
    let avail_event: u16 = mem.read_obj(rx_mock.used_addr().unchecked_add(avail_event_offset(RING_SIZE))).unwrap();
    assert_eq!(avail_event, 2, "the driver is asked to kick for the next buffer");
    rx_mock.add_desc_chains(&[RawDescriptor::from(SplitDescriptor::new(0x90_2000, 2048, WRITE, 0))], 2).unwrap();
    device.handle_event(0, EventSet::IN, &[rx, tx], 0).unwrap();
    assert!(used_idx(&mem, &rx_mock) >= 1, "the held frame is delivered once a large enough buffer comes");
}

/// Whether page `page` is set in the dirty log `file`.
fn logged(file: &std::fs::File, page: u64) -> bool {
    use std::os::unix::fs::FileExt;
    let mut byte = [0u8];
    file.read_exact_at(&mut byte, page / 8).unwrap();
    byte[0] & (1 << (page % 8)) != 0
}

/// With logging on, a block read through each engine marks every page the backend wrote:
/// the read's data (from the kernel, for io_uring), the status byte and the used ring; a page
/// it did not write stays clear.
#[test]
fn a_block_read_marks_every_page_it_wrote_for_each_engine() {
    use crate::blk::engine::SyncEngine;
    use crate::blk::uring::UringEngine;
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img");
    std::fs::write(&image, vec![0x5a; 1 << 20]).unwrap();
    let path = image.to_str().unwrap();
    let engines: Vec<(&str, Engine)> = vec![
        ("null", Engine::Null(NullEngine::new(1 << 20).unwrap())),
        ("sync", Engine::Sync(SyncEngine::open(path, false, false).unwrap())),
        ("io_uring", Engine::Uring(UringEngine::open(path, false, false, 1).unwrap())),
    ];
    for (name, engine) in engines {
        let options = BlkOptions {
            num_queues: 1,
            queue_size: 256,
            serial: "log".into(),
            logical_block_size: 512,
            read_only: false,
            poll_us: 0,
        };
        let device =
            BlkDevice::new(Arc::new(engine), options, Arc::new(Stats::default()), Arc::new(Gates::new(1))).unwrap();
        let (mem, atomic) = memory();
        device.update_memory(atomic.clone()).unwrap();
        let log = logging_on(device.core());
        let (queue, vring) = ring(&mem, &atomic, 0x10_0000);
        post_read(&mem, &queue, 8192, 0x80_5000);
        device.handle_event(0, EventSet::IN, &[vring], 0).unwrap();
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0x80_5000)).unwrap(), 0, "{name}: status OK");
        let used_page = queue.used_addr().0 / 4096;
        for page in [0x801, 0x802, 0x805, used_page] {
            assert!(logged(&log, page), "{name}: page {page:#x} was written but not logged");
        }
        for page in [0x800, 0x803, 0x804] {
            assert!(!logged(&log, page), "{name}: page {page:#x} was not written but is logged");
        }
    }
}

/// With logging on, a frame received through the loopback marks its receive buffer's page and
/// the receive queue's used ring; the transmit buffer, only read, stays clear.
#[test]
fn a_received_frame_marks_its_pages() {
    let (mem, atomic) = memory();
    let options = NetOptions { pairs: 1, queue_size: 256, mac: [2, 0, 0, 0, 0, 1], mtu: 1500, poll_us: 0 };
    let device =
        NetDevice::new(options, NetworkSide::Loopback, Arc::new(NetStats::default()), Arc::new(Gates::new(1))).unwrap();
    device.acked_features(device.features());
    device.update_memory(atomic.clone()).unwrap();
    let log = logging_on(device.core());
    let (rx_mock, rx) = ring(&mem, &atomic, 0x10_0000);
    let (tx_mock, tx) = ring(&mem, &atomic, 0x20_0000);
    rx_mock.add_desc_chains(&[RawDescriptor::from(SplitDescriptor::new(0x90_0000, 2048, WRITE, 0))], 0).unwrap();
    tx_mock.add_desc_chains(&[post_frame(&mem, 0x80_0000)], 0).unwrap();
    device.handle_event(1, EventSet::IN, &[rx.clone(), tx.clone()], 0).unwrap();
    device.handle_event(0, EventSet::IN, &[rx, tx], 0).unwrap();
    assert_eq!(used_idx(&mem, &rx_mock), 1);
    for page in [0x900, rx_mock.used_addr().0 / 4096, tx_mock.used_addr().0 / 4096] {
        assert!(logged(&log, page), "page {page:#x} was written but not logged");
    }
    assert!(!logged(&log, 0x800), "the transmitted frame's page was only read");
}

/// An eventfd as the `File` the library takes for a call descriptor, and a way to read it.
fn call_eventfd() -> (std::fs::File, vmm_sys_util::eventfd::EventFd) {
    use std::os::fd::{FromRawFd, IntoRawFd};
    let event = vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let copy = event.try_clone().unwrap();
    // SAFETY: `into_raw_fd` hands over the duplicate's sole ownership to the `File`.
    (unsafe { std::fs::File::from_raw_fd(copy.into_raw_fd()) }, event)
}

/// When the frontend moves a live queue's interrupts to a new call descriptor (as QEMU does
/// around a migration), the next time its worker runs it signals the new one once: a signal
/// that went to the old one meanwhile would otherwise be lost for good.
#[test]
fn a_new_call_descriptor_gets_one_signal() {
    let (mem, atomic) = memory();
    let device = blk_device(1);
    device.update_memory(atomic.clone()).unwrap();
    let (_queue, vring) = ring(&mem, &atomic, 0x10_0000);
    let (first_file, first) = call_eventfd();
    vring.set_call(Some(first_file));
    device.handle_event(0, EventSet::IN, std::slice::from_ref(&vring), 0).unwrap();
    assert!(first.read().is_err(), "the first call descriptor is not signalled for nothing");
    let (second_file, second) = call_eventfd();
    vring.set_call(Some(second_file));
    device.handle_event(0, EventSet::IN, std::slice::from_ref(&vring), 0).unwrap();
    assert_eq!(second.read().unwrap(), 1, "the new call descriptor is signalled once");
    device.handle_event(0, EventSet::IN, &[vring], 0).unwrap();
    assert!(second.read().is_err(), "and only once");
}
