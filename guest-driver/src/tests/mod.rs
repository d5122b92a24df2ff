//! Unit tests with a fake transport and a thread playing the device on the same memory.

mod fake;

use crate::device::blk::{BlkError, VirtIOBlk};
use crate::hal::Dma;
use crate::hypercall::Shim;
use crate::protocol::blk::{self as pblk, RequestHeaderRepr, RequestType, SegmentRepr};
use crate::protocol::ring;
use crate::protocol::virtio::{DeviceId, Features, feature as vf};
use crate::queue::{Buffer, QueueError, QueueMemory, QueueSetup, VirtQueue};
use crate::transport::RingPlacement;
use fake::{DeviceThread, FakeTransport, Seen, TestHal, read_bytes, write_bytes};
use std::sync::{Arc, Mutex};
use std::vec;
use std::vec::Vec;

fn transport(features: &[u32], queues: usize) -> FakeTransport {
    FakeTransport::new(DeviceId::Block.raw(), Features::from_bits(features).with(vf::VERSION_1).0, queues, vec![0; 64])
}

fn queue<const N: usize>(t: &mut FakeTransport, indirect: bool, event_idx: bool) -> VirtQueue<TestHal, N> {
    VirtQueue::new(t, 0, indirect, event_idx, Shim::Transport).unwrap()
}

/// Echo: copy the readable bytes into the writable buffers; used length = bytes written.
fn echo(head: u16, chain: &[Seen]) -> (u32, u32) {
    let input: Vec<u8> =
        chain.iter().filter(|s| !s.writable).flat_map(|s| read_bytes(s.addr, s.len as usize)).collect();
    let mut written = 0usize;
    for s in chain.iter().filter(|s| s.writable) {
        let n = (input.len() - written).min(s.len as usize);
        write_bytes(s.addr, &input[written..written + n]);
        written += n;
    }
    (u32::from(head), written as u32)
}

fn buf(data: &[u8], device_writes: bool) -> Buffer {
    Buffer { addr: data.as_ptr() as u64, len: data.len() as u32, device_writes }
}

/// Adds a chain; every test keeps its buffers alive until the device is done with them.
fn add<const N: usize>(q: &mut VirtQueue<TestHal, N>, chain: &[Buffer]) -> Result<u16, QueueError> {
    // SAFETY: the tests' buffers outlive the chains (they are popped, or the test ends with
    // the device thread stopped before the buffers are dropped).
    unsafe { q.add(chain) }
}

fn wait_used<const N: usize>(q: &mut VirtQueue<TestHal, N>) -> crate::queue::Used {
    for _ in 0..10_000_000 {
        if let Some(used) = q.pop_used().unwrap() {
            return used;
        }
        std::thread::yield_now();
    }
    panic!("the device never answered");
}

#[test]
fn ring_wraps_around_many_times_without_losing_data() {
    let mut t = transport(&[vf::RING_EVENT_IDX], 1);
    let mut q: VirtQueue<TestHal, 8> = queue(&mut t, false, true);
    let _device = DeviceThread::spawn(t.state.clone(), 0, echo);
    for round in 0..5_000u32 {
        let n = 1 + (round % 3) as usize;
        let inputs: Vec<Vec<u8>> = (0..n).map(|i| vec![(round as u8).wrapping_add(i as u8); 7 + i]).collect();
        let total: usize = inputs.iter().map(Vec::len).sum();
        let output = vec![0u8; total];
        let mut chain: Vec<Buffer> = inputs.iter().map(|d| buf(d, false)).collect();
        chain.push(buf(&output, true));
        let token = add(&mut q, &chain).unwrap();
        q.notify();
        let used = wait_used(&mut q);
        assert_eq!(used.token, token);
        assert_eq!(used.len as usize, total);
        assert_eq!(output, inputs.concat(), "round {round}");
    }
    assert_eq!(q.free(), 8, "every descriptor came back");
    // 5,000 chains went round an 8-entry ring 625 times; the device asked for every kick.
    assert_eq!(q.stats().added, 5_000);
}

#[test]
fn a_queue_sized_at_run_time_uses_only_its_size_in_memory_it_was_given() {
    let mut t = transport(&[], 1);
    let memory = QueueMemory::for_queue(8, RingPlacement::Separate, false);
    let rings = || Dma::<TestHal>::new(memory.ring_pages).unwrap();
    let setup = |size| QueueSetup { index: 0, size, event_idx: false };
    let refused = |r: Result<VirtQueue<TestHal, 64>, QueueError>| matches!(r, Err(QueueError::TooSmall { .. }));
    assert!(refused(VirtQueue::with_memory(&mut t, setup(6), rings(), None, Shim::Transport)), "not a power of two");
    assert!(refused(VirtQueue::with_memory(&mut t, setup(128), rings(), None, Shim::Transport)), "above capacity");
    let big = QueueMemory::for_queue(256, RingPlacement::Separate, false);
    let too_small = VirtQueue::<TestHal, 256>::with_memory(&mut t, setup(256), rings(), None, Shim::Transport);
    assert!(big.ring_pages > memory.ring_pages && matches!(too_small, Err(QueueError::NoMemory(0))), "rings too small");
    let mut q = VirtQueue::<TestHal, 64>::with_memory(&mut t, setup(8), rings(), None, Shim::Transport).unwrap();
    assert_eq!((q.size(), q.free()), (8, 8));
    assert_eq!(t.state.queues.lock().unwrap()[0].map(|l| l.size), Some(8), "the device was told 8 entries");
    let _device = DeviceThread::spawn(t.state.clone(), 0, echo);
    for round in 0..100u8 {
        let input = [round; 5];
        let outputs = [[0u8; 5]; 4];
        let chain = |out: &[u8; 5]| [buf(&input, false), buf(out, true)];
        let tokens: Vec<u16> = outputs.iter().map(|out| add(&mut q, &chain(out)).unwrap()).collect();
        assert!(matches!(add(&mut q, &[buf(&input, false)]), Err(QueueError::Full { .. })), "4 chains of 2 fill it");
        assert!(tokens.iter().all(|&t| t < 8), "heads stay inside the 8 entries: {tokens:?}");
        q.notify();
        for _ in 0..4 {
            assert_eq!(wait_used(&mut q).len, 5);
        }
        assert_eq!(outputs, [input; 4]);
    }
    assert_eq!(q.free(), 8);
}

#[test]
fn many_chains_in_flight_complete_out_of_order_safely() {
    let mut t = transport(&[], 1);
    let mut q: VirtQueue<TestHal, 16> = queue(&mut t, false, false);
    let held: Arc<Mutex<Vec<(u32, u32)>>> = Arc::new(Mutex::new(Vec::new()));
    let outputs: Vec<Vec<u8>> = (0..8).map(|_| vec![0u8; 4]).collect();
    let inputs: Vec<Vec<u8>> = (0..8u8).map(|i| vec![i; 4]).collect();
    let mut tokens = Vec::new();
    for (input, output) in inputs.iter().zip(&outputs) {
        tokens.push(add(&mut q, &[buf(input, false), buf(output, true)]).unwrap());
    }
    assert_eq!(q.free(), 0);
    assert!(matches!(add(&mut q, &[buf(&inputs[0], false)]), Err(QueueError::Full { .. })));
    {
        let held = held.clone();
        let _device = DeviceThread::spawn(t.state.clone(), 0, move |head, chain| {
            let r = echo(head, chain);
            held.lock().unwrap().push(r);
            r
        });
        q.notify();
        let mut seen = Vec::new();
        while seen.len() < 8 {
            seen.push(wait_used(&mut q).token);
        }
        seen.sort();
        let mut expected = tokens.clone();
        expected.sort();
        assert_eq!(seen, expected);
    }
    for (i, output) in outputs.iter().enumerate() {
        assert_eq!(output, &vec![i as u8; 4]);
    }
}

#[test]
fn event_idx_decides_kicks_once_per_batch() {
    let mut t = transport(&[vf::RING_EVENT_IDX], 1);
    let mut q: VirtQueue<TestHal, 8> = queue(&mut t, false, true);
    let layout = q.layout();
    let avail_event = layout.used + ring::avail_event_offset(8);
    let data = [1u8; 4];
    // The device wants to hear about entry 0: a batch of three gets one kick.
    fake::write_u16(avail_event, 0);
    for _ in 0..3 {
        add(&mut q, &[buf(&data, false)]).unwrap();
    }
    assert!(q.notify());
    // It still says 0 (it is polling and has not caught up): no kick for entry 3.
    add(&mut q, &[buf(&data, false)]).unwrap();
    assert!(!q.notify());
    // It asks for entry 5: adding entry 4 does not cross it, adding 5 does.
    fake::write_u16(avail_event, 5);
    add(&mut q, &[buf(&data, false)]).unwrap();
    assert!(!q.notify());
    add(&mut q, &[buf(&data, false)]).unwrap();
    assert!(q.notify());
    assert!(!q.notify(), "nothing new, no kick");
    assert_eq!(q.stats().kicks, 2);
    assert_eq!(t.state.notify[0].load(std::sync::atomic::Ordering::SeqCst), 0, "the doorbell got the queue index");
}

#[test]
fn without_event_idx_the_no_notify_flag_decides() {
    let mut t = transport(&[], 1);
    let mut q: VirtQueue<TestHal, 8> = queue(&mut t, false, false);
    let data = [1u8; 4];
    add(&mut q, &[buf(&data, false)]).unwrap();
    assert!(q.notify());
    fake::write_u16(q.layout().used, ring::USED_F_NO_NOTIFY);
    add(&mut q, &[buf(&data, false)]).unwrap();
    assert!(!q.notify());
}

#[test]
fn suppressed_interrupts_push_used_event_far_ahead() {
    let mut t = transport(&[vf::RING_EVENT_IDX], 1);
    let mut q: VirtQueue<TestHal, 8> = queue(&mut t, false, true);
    let used_event = q.layout().avail + ring::used_event_offset(8);
    q.suppress_interrupts(true);
    assert_eq!(fake::read_u16(used_event), 0x8000);
    q.suppress_interrupts(false);
    assert_eq!(fake::read_u16(used_event), 0);
}

#[test]
fn indirect_chains_take_one_ring_descriptor() {
    let mut t = transport(&[vf::RING_INDIRECT_DESC], 1);
    let mut q: VirtQueue<TestHal, 4> = queue(&mut t, true, false);
    let _device = DeviceThread::spawn(t.state.clone(), 0, echo);
    let parts: Vec<Vec<u8>> = (0..6u8).map(|i| vec![i * 3; 5]).collect();
    let out = vec![0u8; 30];
    let mut chain: Vec<Buffer> = parts.iter().map(|p| buf(p, false)).collect();
    chain.push(buf(&out, true));
    // Seven buffers on a four-entry ring: only possible indirectly.
    let token = add(&mut q, &chain).unwrap();
    assert_eq!(q.free(), 3);
    q.notify();
    let used = wait_used(&mut q);
    assert_eq!((used.token, used.len), (token, 30));
    assert_eq!(out, parts.concat());
    assert_eq!(q.free(), 4);
}

#[test]
fn a_misbehaving_device_yields_errors_not_chaos() {
    let mut t = transport(&[], 1);
    let mut q: VirtQueue<TestHal, 8> = queue(&mut t, false, false);
    let layout = q.layout();
    let out = [0u8; 16];
    let publish = |slot: u16, id: u32, len: u32, idx: u16| {
        fake::write_u32(layout.used + 4 + 8 * u64::from(slot), id);
        fake::write_u32(layout.used + 8 + 8 * u64::from(slot), len);
        fake::write_u16(layout.used + 2, idx);
    };
    let token = add(&mut q, &[buf(&out, true)]).unwrap();
    // An id outside the ring.
    publish(0, 99, 4, 1);
    assert_eq!(q.pop_used(), Err(QueueError::BadUsed { id: 99, len: 4 }));
    // An id that is not in flight.
    publish(1, u32::from(token) + 1, 4, 2);
    assert!(matches!(q.pop_used(), Err(QueueError::BadUsed { .. })));
    // More bytes than the chain offered: refused, and the chain is recycled.
    publish(2, u32::from(token), 17, 3);
    assert_eq!(q.pop_used(), Err(QueueError::BadUsed { id: u32::from(token), len: 17 }));
    assert_eq!(q.free(), 8);
    // The queue still works.
    let token = add(&mut q, &[buf(&out, true)]).unwrap();
    publish(3, u32::from(token), 16, 4);
    assert_eq!(q.pop_used().unwrap().map(|u| (u.token, u.len)), Some((token, 16)));
    // A read-only chain reported with the bytes read (as some devices do): accepted, length 0.
    let input = [0u8; 8];
    let token = add(&mut q, &[buf(&input, false)]).unwrap();
    publish(4, u32::from(token), 8, 5);
    assert_eq!(q.pop_used().unwrap().map(|u| (u.token, u.len)), Some((token, 0)));
    // Bad chains from the driver side are refused too.
    assert_eq!(add(&mut q, &[]), Err(QueueError::BadChain(0)));
    assert_eq!(add(&mut q, &[buf(&out, true), buf(&out, false)]), Err(QueueError::BadOrder));
}

/// The driver, the disk's bytes, and the threads serving its queues.
type BlkFixture = (VirtIOBlk<TestHal, FakeTransport, 16>, Arc<Mutex<Vec<u8>>>, Vec<DeviceThread>);

/// A disk in memory behind the fake transport's request queue(s) (two with MQ).
fn blk_device(sectors: u64, features: &[u32]) -> BlkFixture {
    let queues = if features.contains(&pblk::feature::MQ) { 2 } else { 1 };
    let mut config = vec![0u8; pblk::CONFIG_SIZE];
    config[..8].copy_from_slice(&sectors.to_le_bytes());
    let at = pblk::config_offset::NUM_QUEUES;
    config[at..at + 2].copy_from_slice(&(queues as u16).to_le_bytes());
    let features = Features::from_bits(features).with(vf::VERSION_1).0;
    let t = FakeTransport::new(DeviceId::Block.raw(), features, queues, config);
    let disk = Arc::new(Mutex::new(vec![0u8; sectors as usize * 512]));
    let state = t.state.clone();
    let blk = VirtIOBlk::new(t, |_, target| Shim::Transport(target)).unwrap();
    let devices = (0..queues).map(|q| blk_queue_thread(state.clone(), q, disk.clone())).collect();
    (blk, disk, devices)
}

fn blk_queue_thread(state: Arc<fake::FakeState>, queue: usize, image: Arc<Mutex<Vec<u8>>>) -> DeviceThread {
    DeviceThread::spawn(state, queue, move |head, chain| {
        let header = RequestHeaderRepr::parse_bytes(&read_bytes(chain[0].addr, 16)).unwrap();
        let status = chain.last().unwrap();
        let mut disk = image.lock().unwrap();
        let offset = header.sector as usize * 512;
        let mut written = 0u32;
        let code = match header.request_type {
            RequestType::In => {
                let data = &chain[1];
                write_bytes(data.addr, &disk[offset..offset + data.len as usize]);
                written = data.len;
                0
            }
            RequestType::Out => {
                let data = &chain[1];
                disk[offset..offset + data.len as usize].copy_from_slice(&read_bytes(data.addr, data.len as usize));
                0
            }
            RequestType::Flush => 0,
            RequestType::GetId => {
                write_bytes(chain[1].addr, b"fake-disk\0\0\0\0\0\0\0\0\0\0\0");
                written = 20;
                0
            }
            RequestType::Discard | RequestType::WriteZeroes => {
                let seg = SegmentRepr::parse(&read_bytes(chain[1].addr, 16)).unwrap();
                let start = seg.sector as usize * 512;
                disk[start..start + seg.num_sectors as usize * 512].fill(0);
                0
            }
            _ => 2,
        };
        write_bytes(status.addr, &[code]);
        (u32::from(head), written + 1)
    })
}

#[test]
fn blk_driver_reads_back_what_it_wrote() {
    let (mut blk, disk, _device) = blk_device(
        64,
        &[pblk::feature::FLUSH, pblk::feature::DISCARD, pblk::feature::WRITE_ZEROES, vf::RING_EVENT_IDX],
    );
    assert_eq!(blk.info().capacity, 64);
    let pattern: Vec<u8> = (0..4096u32).map(|i| (i * 7 % 251) as u8).collect();
    blk.write_blocks(8, &pattern).unwrap();
    assert_eq!(disk.lock().unwrap()[8 * 512..8 * 512 + 4096], pattern[..]);
    let mut back = vec![0u8; 4096];
    blk.read_blocks(8, &mut back).unwrap();
    assert_eq!(back, pattern);
    blk.flush().unwrap();
    assert_eq!(&blk.get_id().unwrap()[..9], b"fake-disk");
    blk.write_zeroes(9, 2).unwrap();
    blk.read_blocks(8, &mut back).unwrap();
    assert!(back[512..1536].iter().all(|b| *b == 0));
    assert_eq!(back[..512], pattern[..512]);
    blk.discard(8, 1).unwrap();
    // Bad requests never reach the device.
    assert!(matches!(blk.read_blocks(63, &mut back), Err(BlkError::OutOfRange { .. })));
    assert_eq!(blk.read_blocks(0, &mut back[..100]), Err(BlkError::BadLength(100)));
}

#[test]
fn blk_requests_in_flight_are_told_apart_by_token() {
    let (mut blk, _disk, _device) = blk_device(64, &[]);
    let bufs: Vec<Vec<u8>> = (0..4u8).map(|i| vec![i + 1; 512]).collect();
    let mut tokens = Vec::new();
    for (i, b) in bufs.iter().enumerate() {
        // SAFETY: the buffers outlive the requests (all polled below).
        tokens.push(unsafe { blk.submit(crate::device::blk::BlkRequest::Write { sector: i as u64, buf: b }) }.unwrap());
    }
    blk.kick();
    let mut done = Vec::new();
    while done.len() < 4 {
        if let Some(c) = blk.poll().unwrap() {
            assert_eq!(c.result, Ok(()));
            done.push(c.token);
        }
    }
    done.sort();
    tokens.sort();
    assert_eq!(done, tokens);
    assert_eq!(blk.flush(), Err(BlkError::Unsupported("flush")), "FLUSH was not offered");
}

#[test]
fn blk_spreads_requests_over_its_queues() {
    let (mut blk, disk, _devices) = blk_device(64, &[pblk::feature::MQ]);
    assert_eq!((blk.info().num_queues, blk.info().queues_used), (2, 2));
    let bufs: Vec<Vec<u8>> = (0..6u8).map(|i| vec![0x10 + i; 512]).collect();
    for (i, b) in bufs.iter().enumerate() {
        let queue = (i % 2) as u16;
        // SAFETY: the buffers outlive the requests (all polled below).
        unsafe { blk.submit_on(queue, crate::device::blk::BlkRequest::Write { sector: i as u64, buf: b }) }.unwrap();
    }
    blk.kick();
    let mut per_queue = [0; 2];
    while per_queue.iter().sum::<i32>() < 6 {
        if let Some(c) = blk.poll().unwrap() {
            assert_eq!(c.result, Ok(()));
            per_queue[usize::from(c.queue)] += 1;
        }
    }
    assert_eq!(per_queue, [3, 3]);
    for (i, b) in bufs.iter().enumerate() {
        assert_eq!(disk.lock().unwrap()[i * 512..(i + 1) * 512], b[..]);
    }
    assert!(blk.queue_at(2).is_none());
}

#[test]
fn blk_futures_and_vectors() {
    use core::future::Future;
    use core::task::{Context, Poll, Waker};
    let (mut blk, _disk, _devices) = blk_device(64, &[]);
    blk.write_blocks(3, &[0x5a; 1024]).unwrap();
    assert_eq!(blk.read_vec(3, 2).unwrap(), vec![0x5a; 1024]);
    let mut data = vec![0u8; 512];
    // SAFETY: the future is polled to completion below before `data` is read.
    let mut future =
        unsafe { blk.submit_future(0, crate::device::blk::BlkRequest::Read { sector: 4, buf: &mut data }) }.unwrap();
    let mut cx = Context::from_waker(Waker::noop());
    let result = loop {
        if let Poll::Ready(result) = core::pin::Pin::new(&mut future).poll(&mut cx) {
            break result;
        }
        std::thread::yield_now();
    };
    assert_eq!(result, Ok(()));
    assert_eq!(data, vec![0x5a; 512]);
}

#[test]
fn ecam_and_capability_parsing_find_a_virtio_pci_device() {
    use crate::transport::Transport;
    use crate::transport::pci::{Bdf, ConfigSpace, EcamConfigSpace, PciTransport, virtio_device_type};
    // One bus of ECAM (32 devices x 8 functions x 4 KiB) in host memory, with a modern
    // virtio-blk at 00:03.0 whose BAR 4 is another host buffer holding the virtio structures.
    let mut ecam = vec![0u32; (1 << 20) / 4];
    let mut bar = vec![0u32; 0x4000 / 4];
    let bar_addr = bar.as_mut_ptr() as u64;
    let function = (3 << 15) / 4;
    ecam[function] = 0x1042_1af4; // vendor 0x1af4, device 0x1042 (block)
    ecam[function + 1] = 0x0010_0000; // status: capability list
    ecam[function + 0x10 / 4 + 4] = (bar_addr as u32 & !0xf) | 0x4; // BAR 4, 64-bit memory
    ecam[function + 0x10 / 4 + 5] = (bar_addr >> 32) as u32;
    ecam[function + 0x34 / 4] = 0x40;
    // Vendor capabilities: common (0x0000), notify (0x1000, multiplier 4), ISR (0x2000),
    // device (0x3000); each: [id, next, len, type], [bar], offset, length (+ multiplier).
    let caps = [
        (0x40u32, 0x50u32, 1u32, 0x0000u32),
        (0x50, 0x64, 2, 0x1000),
        (0x64, 0x74, 3, 0x2000),
        (0x74, 0x00, 4, 0x3000),
    ];
    for (at, next, kind, offset) in caps {
        let w = function + at as usize / 4;
        ecam[w] = 0x09 | (next << 8) | (16 << 16) | (kind << 24);
        ecam[w + 1] = 4;
        ecam[w + 2] = offset;
        ecam[w + 3] = 0x100;
        if kind == 2 {
            ecam[w + 4] = 4;
        }
    }
    // SAFETY: the buffer covers bus 0 entirely and outlives the accessor.
    let config = unsafe { EcamConfigSpace::new(core::ptr::NonNull::new(ecam.as_mut_ptr().cast()).unwrap()) };
    let bdf = Bdf { bus: 0, device: 3, function: 0 };
    assert_eq!(virtio_device_type(&config, bdf), Some(2));
    assert_eq!(virtio_device_type(&config, Bdf { bus: 0, device: 4, function: 0 }), None);
    let mut transport = PciTransport::new::<TestHal>(&config, bdf).unwrap();
    assert_eq!(config.read16(bdf, 4) & 0x6, 0x6, "memory decoding and bus mastering enabled");
    // Device features as the device publishes them in the common structure.
    bar[1] = 0xdead_beef;
    assert_eq!(transport.read_device_features() as u32, 0xdead_beef);
    // num_queues (offset 18) = 1: queue 0 exists, queue 1 does not.
    bar[4] = 1 << 16;
    bar[6] = 0; // queue_size (offset 24) reads 0 until the device says otherwise
    assert_eq!(transport.max_queue_size(1), 0);
}
