//! Unit tests of the net device's ring handling with virtio-queue's `MockSplitQueue`: every
//! kind of bad transmit chain a guest can send, receive chains with and without merged
//! buffers, batched used-ring publication, and offload resolution for the receiving guest.

use super::device::{NetDevice, NetOptions};
use super::rings::{self, FrameFormat, RxOutcome};
use super::side::{Frame, NetworkSide};
use super::stats::{DropReason, NetStats};
use crate::queue::split_ring::SplitRing;
use crate::queue::{ChainBuffers, NoServices, UsedBatch};
use pvkit_protocol::net::{self, GsoType, NetHeaderRepr, feature as netf, hdr_flags};
use pvkit_protocol::virtio::{Features, feature as vf};
use std::sync::Arc;
use vhost_user_backend::VhostUserBackend;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::desc::split::Descriptor as SplitDescriptor;
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const READ: u16 = 0;
const WRITE: u16 = pvkit_protocol::ring::desc_flags::WRITE;
const DATA: u64 = 0x10_0000;

const FORMAT: FrameFormat = FrameFormat { header_len: net::HEADER_SIZE, mergeable: false, max_frame: 1518 };
const MERGEABLE: FrameFormat = FrameFormat { mergeable: true, ..FORMAT };

fn rx_frame(
    vq: &mut Queue,
    mem: &GuestMemoryMmap,
    format: &FrameFormat,
    frame: &[u8],
    used: &mut UsedBatch,
) -> RxOutcome {
    let mut popper = crate::queue::ring::Popper::new(0);
    let ring = SplitRing::new(vq, mem).unwrap();
    popper.refresh(vq, &ring);
    let frame = (&NetHeaderRepr::default(), frame);
    let outcome = rings::write_rx_frame((vq, &ring, &mut popper), format, frame, used, &NoServices, &mut Vec::new());
    popper.finish(outcome).unwrap()
}

fn memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap()
}

fn desc(addr: u64, len: u32, flags: u16) -> RawDescriptor {
    RawDescriptor::from(SplitDescriptor::new(addr, len, flags, 0))
}

fn header_bytes(header: NetHeaderRepr) -> Vec<u8> {
    let mut bytes = vec![0u8; net::HEADER_SIZE];
    header.emit(&mut bytes, net::HEADER_SIZE).unwrap();
    bytes
}

fn ethernet(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 13 % 251) as u8).collect()
}

/// Puts header + frame at DATA and reads it back as a transmit chain split at `split`.
fn transmit(header: NetHeaderRepr, frame: &[u8], split: usize) -> Result<(rings::TxFrame, Vec<u8>), DropReason> {
    let mem = memory();
    let mut bytes = header_bytes(header);
    bytes.extend_from_slice(frame);
    mem.write_slice(&bytes, GuestAddress(DATA)).unwrap();
    let split = split.min(bytes.len());
    let queue = MockSplitQueue::new(&mem, 16);
    let mut descs = vec![desc(DATA, split as u32, READ)];
    if bytes.len() > split {
        descs.push(desc(DATA + split as u64, (bytes.len() - split) as u32, READ));
    }
    let chain = queue.build_desc_chain(&descs).unwrap();
    let mut copy = Vec::new();
    rings::read_tx_chain(chain, &mem, &FORMAT, &mut ChainBuffers::default(), Some(&mut copy))
        .map(|f| (f, copy))
        .map_err(|r| r.reason)
}

#[test]
fn transmit_chain_is_read_whatever_the_split() {
    let frame = ethernet(200);
    for split in [1, 5, 12, 13, 100, 500] {
        let (tx, copy) = transmit(NetHeaderRepr::default(), &frame, split).unwrap();
        assert_eq!(tx.frame_len, 200, "split at {split}");
        assert_eq!(copy, frame, "split at {split}");
    }
}

#[test]
fn bad_transmit_chains_are_refused_with_their_reason() {
    let frame = ethernet(200);
    let csum = |start, offset| NetHeaderRepr {
        flags: hdr_flags::NEEDS_CSUM,
        csum_start: start,
        csum_offset: offset,
        ..Default::default()
    };
    // Checksum field past the end of the frame (the DPDK CVE class), and just inside it.
    assert_eq!(transmit(csum(190, 60), &frame, 12).unwrap_err(), DropReason::BadHeader);
    assert_eq!(transmit(csum(u16::MAX, u16::MAX), &frame, 12).unwrap_err(), DropReason::BadHeader);
    assert_eq!(transmit(csum(199, 0), &frame, 12).unwrap_err(), DropReason::BadHeader);
    assert!(transmit(csum(196, 2), &frame, 12).is_ok());
    // GSO without NEEDS_CSUM, with a zero segment size, with a header longer than the frame.
    let tso = |flags, gso_size, hdr_len| NetHeaderRepr {
        flags,
        gso_type: GsoType::TcpV4 { ecn: false },
        gso_size,
        hdr_len,
        csum_start: 34,
        csum_offset: 16,
        num_buffers: 0,
    };
    assert_eq!(transmit(tso(0, 1448, 54), &frame, 12).unwrap_err(), DropReason::BadHeader);
    assert_eq!(transmit(tso(hdr_flags::NEEDS_CSUM, 0, 54), &frame, 12).unwrap_err(), DropReason::BadHeader);
    assert_eq!(transmit(tso(hdr_flags::NEEDS_CSUM, 1448, 4000), &frame, 12).unwrap_err(), DropReason::BadHeader);
    assert!(transmit(tso(hdr_flags::NEEDS_CSUM, 1448, 54), &frame, 12).is_ok());
    // Undefined flags and GSO types.
    assert_eq!(
        transmit(NetHeaderRepr { flags: 0x40, ..Default::default() }, &frame, 12).unwrap_err(),
        DropReason::BadHeader
    );
    // Longer than the MTU without GSO; longer than any frame at all.
    assert_eq!(transmit(NetHeaderRepr::default(), &ethernet(1519), 12).unwrap_err(), DropReason::TooLong);
    assert_eq!(
        transmit(NetHeaderRepr::default(), &ethernet(net::MAX_GSO_FRAME + 1), 12).unwrap_err(),
        DropReason::TooLong
    );
    // Shorter than an Ethernet header; shorter than the virtio-net header.
    assert_eq!(transmit(NetHeaderRepr::default(), &ethernet(10), 12).unwrap_err(), DropReason::ShortChain);
    let mem = memory();
    let queue = MockSplitQueue::new(&mem, 16);
    let chain = queue.build_desc_chain(&[desc(DATA, 8, READ)]).unwrap();
    assert_eq!(
        rings::read_tx_chain(chain, &mem, &FORMAT, &mut ChainBuffers::default(), None).unwrap_err().reason,
        DropReason::ShortChain
    );
    // A device-writable buffer in a transmit chain; a buffer outside guest memory.
    let chain = queue.build_desc_chain(&[desc(DATA, 12, READ), desc(DATA + 12, 100, WRITE)]).unwrap();
    assert_eq!(
        rings::read_tx_chain(chain, &mem, &FORMAT, &mut ChainBuffers::default(), None).unwrap_err().reason,
        DropReason::ShortChain
    );
    let chain = queue.build_desc_chain(&[desc(0x1000_0000, 112, READ)]).unwrap();
    assert_eq!(
        rings::read_tx_chain(chain, &mem, &FORMAT, &mut ChainBuffers::default(), None).unwrap_err().reason,
        DropReason::ShortChain
    );
}

/// A queue with `chains` receive chains of `len` bytes each at DATA + i * 0x1000.
fn rx_queue(mem: &GuestMemoryMmap, chains: u16, len: u32, flags: u16) -> (MockSplitQueue<'_, GuestMemoryMmap>, Queue) {
    let mock = MockSplitQueue::new(mem, 16);
    let descs: Vec<RawDescriptor> = (0..chains).map(|i| desc(DATA + u64::from(i) * 0x1000, len, flags)).collect();
    mock.add_desc_chains(&descs, 0).unwrap();
    let queue: Queue = mock.create_queue().unwrap();
    (mock, queue)
}

fn used_entry(mem: &GuestMemoryMmap, mock: &MockSplitQueue<'_, GuestMemoryMmap>, i: u64) -> (u32, u32) {
    let at = mock.used_addr().0 + 4 + 8 * i;
    (mem.read_obj(GuestAddress(at)).unwrap(), mem.read_obj(GuestAddress(at + 4)).unwrap())
}

fn used_idx(mem: &GuestMemoryMmap, mock: &MockSplitQueue<'_, GuestMemoryMmap>) -> u16 {
    mem.read_obj(GuestAddress(mock.used_addr().0 + 2)).unwrap()
}

#[test]
fn a_frame_fills_one_receive_chain() {
    let mem = memory();
    let (mock, mut vq) = rx_queue(&mem, 2, 2048, WRITE);
    let frame = ethernet(1000);
    let mut used = UsedBatch::default();
    let outcome = rx_frame(&mut vq, &mem, &FORMAT, &frame, &mut used);
    assert_eq!(outcome, RxOutcome::Delivered(1));
    assert_eq!(used_idx(&mem, &mock), 0, "nothing is visible before the batch is published");
    used.publish(&mut vq, &mem, &NoServices).unwrap();
    assert_eq!(used_idx(&mem, &mock), 1);
    assert_eq!(used_entry(&mem, &mock, 0), (0, 1012));
    let mut got = vec![0u8; 1012];
    mem.read_slice(&mut got, GuestAddress(DATA)).unwrap();
    assert_eq!(NetHeaderRepr::parse_bytes(&got, 12).unwrap().num_buffers, 1);
    assert_eq!(got[12..], frame[..]);
}

#[test]
fn a_frame_too_big_for_a_chain_is_refused_without_taking_it() {
    let mem = memory();
    let (_mock, mut vq) = rx_queue(&mem, 2, 512, WRITE);
    let mut used = UsedBatch::default();
    let outcome = rx_frame(&mut vq, &mem, &FORMAT, &ethernet(1000), &mut used);
    assert!(matches!(outcome, RxOutcome::Refused(r) if r.reason == DropReason::RxChainTooSmall));
    assert!(used.is_empty());
    assert_eq!(vq.next_avail(), 0, "the chain stays for a smaller frame");
    let small = rx_frame(&mut vq, &mem, &FORMAT, &ethernet(400), &mut used);
    assert_eq!(small, RxOutcome::Delivered(1));
}

#[test]
fn merged_buffers_carry_one_frame_and_appear_together() {
    let mem = memory();
    let (mock, mut vq) = rx_queue(&mem, 8, 256, WRITE);
    let frame = ethernet(1000);
    let mut used = UsedBatch::default();
    let outcome = rx_frame(&mut vq, &mem, &MERGEABLE, &frame, &mut used);
    // 12 + 1000 bytes in 256-byte buffers: 4 of them.
    assert_eq!(outcome, RxOutcome::Delivered(4));
    used.publish(&mut vq, &mem, &NoServices).unwrap();
    assert_eq!(used_idx(&mem, &mock), 4);
    let mut stream = Vec::new();
    for i in 0..4u64 {
        let (id, len) = used_entry(&mem, &mock, i);
        assert_eq!(id, i as u32);
        let mut part = vec![0u8; len as usize];
        mem.read_slice(&mut part, GuestAddress(DATA + i * 0x1000)).unwrap();
        stream.extend(part);
    }
    assert_eq!(NetHeaderRepr::parse_bytes(&stream, 12).unwrap().num_buffers, 4);
    assert_eq!(stream[12..], frame[..]);
}

#[test]
fn too_few_merged_buffers_leave_the_ring_untouched() {
    let mem = memory();
    let (mock, mut vq) = rx_queue(&mem, 2, 256, WRITE);
    let mut used = UsedBatch::default();
    let outcome = rx_frame(&mut vq, &mem, &MERGEABLE, &ethernet(1000), &mut used);
    assert_eq!(outcome, RxOutcome::NoBuffers);
    assert_eq!(vq.next_avail(), 0);
    assert!(used.is_empty());
    assert!(!used.publish(&mut vq, &mem, &NoServices).unwrap());
    assert_eq!(used_idx(&mem, &mock), 0);
}

#[test]
fn an_unusable_later_chain_returns_every_chain_taken_for_the_frame() {
    let mem = memory();
    let mock = MockSplitQueue::new(&mem, 16);
    // Two good 256-byte receive chains, then one the device cannot write, for a frame that
    // needs four: the frame is dropped and all three chains go back, none left out of the ring.
    let descs = [desc(DATA, 256, WRITE), desc(DATA + 0x1000, 256, WRITE), desc(DATA + 0x2000, 256, READ)];
    mock.add_desc_chains(&descs, 0).unwrap();
    let mut vq: Queue = mock.create_queue().unwrap();
    let mut used = UsedBatch::default();
    let outcome = rx_frame(&mut vq, &mem, &MERGEABLE, &ethernet(1000), &mut used);
    assert!(matches!(outcome, RxOutcome::Refused(r) if r.reason == DropReason::RxChainTooSmall));
    assert_eq!(vq.next_avail(), 3);
    used.publish(&mut vq, &mem, &NoServices).unwrap();
    assert_eq!(used_idx(&mem, &mock), 3, "every chain taken is returned");
    let returned: Vec<_> = (0..3).map(|i| used_entry(&mem, &mock, i)).collect();
    assert_eq!(returned, vec![(0, 0), (1, 0), (2, 0)]);
}

#[test]
fn a_receive_chain_without_writable_buffers_is_returned_empty() {
    let mem = memory();
    let (_mock, mut vq) = rx_queue(&mem, 1, 2048, READ);
    let mut used = UsedBatch::default();
    let outcome = rx_frame(&mut vq, &mem, &FORMAT, &ethernet(100), &mut used);
    assert!(matches!(outcome, RxOutcome::Refused(r) if r.reason == DropReason::RxChainTooSmall));
    assert_eq!(used.len(), 1, "the unusable chain goes back to the driver");
}

#[test]
fn publication_follows_the_drivers_used_event() {
    let mem = memory();
    let (mock, mut vq) = rx_queue(&mem, 8, 2048, WRITE);
    // The mock's used ring overlaps its avail ring's used_event field; move it clear.
    const USED: u64 = 0x8000;
    vq.set_used_ring_address(Some(USED as u32), Some(0));
    vq.set_event_idx(true);
    let used_event_at = GuestAddress(mock.avail_addr().0 + 4 + 2 * 16);
    // The driver wants to hear when entry 2 is used: publishing 0..2 must not notify, 2..3 must.
    mem.write_obj(2u16, used_event_at).unwrap();
    let mut used = UsedBatch::default();
    for _ in 0..2 {
        rx_frame(&mut vq, &mem, &FORMAT, &ethernet(60), &mut used);
    }
    assert!(!used.publish(&mut vq, &mem, &NoServices).unwrap());
    rx_frame(&mut vq, &mem, &FORMAT, &ethernet(60), &mut used);
    assert!(used.publish(&mut vq, &mem, &NoServices).unwrap());
    assert_eq!(mem.read_obj::<u16>(GuestAddress(USED + 2)).unwrap(), 3);
    // Without event-idx, the NO_INTERRUPT flag decides.
    vq.set_event_idx(false);
    mem.write_obj(1u16, mock.avail_addr()).unwrap();
    rx_frame(&mut vq, &mem, &FORMAT, &ethernet(60), &mut used);
    assert!(!used.publish(&mut vq, &mem, &NoServices).unwrap());
}

fn device_with(acked: &[u32]) -> NetDevice {
    let options = NetOptions { pairs: 1, queue_size: 256, mac: [0x52, 0x54, 0, 0, 0, 1], mtu: 1500, poll_us: 0 };
    let device = NetDevice::new(
        options,
        NetworkSide::Loopback,
        Arc::new(NetStats::default()),
        Arc::new(crate::queue::Gates::new(1)),
    )
    .unwrap();
    device.acked_features(Features::from_bits(acked).with(vf::VERSION_1).0);
    device
}

#[test]
fn offloads_are_resolved_for_the_receiving_guest() {
    let tso = NetHeaderRepr {
        flags: hdr_flags::NEEDS_CSUM,
        gso_type: GsoType::TcpV4 { ecn: false },
        gso_size: 1448,
        hdr_len: 54,
        csum_start: 34,
        csum_offset: 16,
        num_buffers: 0,
    };
    let frame = || Frame { header: tso, data: ethernet(3000) };
    // A guest without GUEST_TSO4 cannot take a TSO frame.
    let plain = device_with(&[]);
    assert_eq!(plain.prepare_for_guest(&mut frame()).unwrap_err().reason, DropReason::OffloadRefused);
    let tso_guest = device_with(&[netf::GUEST_CSUM, netf::GUEST_TSO4]);
    let mut f = frame();
    tso_guest.prepare_for_guest(&mut f).unwrap();
    assert_eq!(f.header, tso, "passed through untouched");
    // NEEDS_CSUM for a guest without GUEST_CSUM: completed by the device.
    let partial = NetHeaderRepr { gso_type: GsoType::None, gso_size: 0, hdr_len: 0, ..tso };
    let mut f = Frame { header: partial, data: ethernet(100) };
    plain.prepare_for_guest(&mut f).unwrap();
    assert_eq!(f.header.flags & (hdr_flags::NEEDS_CSUM | hdr_flags::DATA_VALID), 0);
    // A checksum outside the frame is refused, not trusted.
    let mut f = Frame { header: NetHeaderRepr { csum_start: 90, ..partial }, data: ethernet(100) };
    assert_eq!(plain.prepare_for_guest(&mut f).unwrap_err().reason, DropReason::BadHeader);
}

#[test]
fn features_and_configuration_follow_the_options() {
    let device = device_with(&[netf::MRG_RXBUF]);
    let offered = device.device_features();
    for bit in [vf::VERSION_1, vf::RING_EVENT_IDX, netf::MRG_RXBUF, netf::CSUM, netf::GUEST_TSO4, netf::MTU] {
        assert!(offered.has(bit), "bit {bit} offered");
    }
    assert!(!offered.has(netf::MQ), "one pair: no MQ");
    assert!(!offered.has(netf::CTRL_VQ), "no control queue is implemented");
    assert_eq!(device.frame_format(), FrameFormat { header_len: 12, mergeable: true, max_frame: 1518 });
    let config = net::ConfigRepr::parse(&device.get_config(0, net::CONFIG_SIZE as u32)).unwrap();
    assert_eq!((config.mac, config.mtu, config.max_virtqueue_pairs), ([0x52, 0x54, 0, 0, 0, 1], 1500, 1));
    assert_eq!(device.get_config(10, 8).len(), 8, "reads past the end are zero-filled");
    assert_eq!(device.queues_per_thread(), vec![0b11]);
}
