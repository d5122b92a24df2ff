//! vhost-user-net over real sockets, driven by pvkit's test frontend (the driver side of the
//! rings in this process): loopback with and without merged receive buffers, checksum
//! completion, the switch between two frontends, the sink's counters, and bad frames dropped
//! while service goes on.

use pvkit_protocol::net::{self, ConfigRepr, NetHeaderRepr, feature as netf, hdr_flags};
use pvkit_protocol::virtio::{Features, feature as vf};
use pvkit_test_support::process::ChildGuard;
use pvkit_test_support::vhost_frontend::{Buffer, TestFrontend};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;
use vm_memory::{Bytes, GuestAddress};

const WAIT: Duration = Duration::from_secs(10);
const RX: usize = 0;
const TX: usize = 1;

fn start(dir: &Path, side: &[&str], sockets: usize) -> (ChildGuard, Vec<PathBuf>) {
    let paths: Vec<PathBuf> = (0..sockets).map(|i| dir.join(format!("net{i}.sock"))).collect();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_vhost-user-net"));
    cmd.args(side).args(["--poll-us", "0"]);
    for p in &paths {
        cmd.arg("--socket-path").arg(p);
    }
    let mut child = ChildGuard::spawn("vhost-user-net", &mut cmd).unwrap();
    for p in &paths {
        child.wait_for_socket(p, WAIT).unwrap();
    }
    (child, paths)
}

fn connect(socket: &Path, features: &[u32]) -> TestFrontend {
    let wanted = Features::from_bits(features).with(vf::VERSION_1);
    TestFrontend::connect(socket, 4 << 20, 2, 256, wanted.0).unwrap()
}

/// An Ethernet frame of `len` bytes from `src` to `dst` with a counting payload.
fn ethernet(dst: [u8; 6], src: [u8; 6], len: usize, seed: u8) -> Vec<u8> {
    let mut f: Vec<u8> = (0..len).map(|i| (i as u8).wrapping_mul(7).wrapping_add(seed)).collect();
    f[..6].copy_from_slice(&dst);
    f[6..12].copy_from_slice(&src);
    f[12..14].copy_from_slice(&[0x88, 0xb5]);
    f
}

fn send(fe: &mut TestFrontend, header: NetHeaderRepr, frame: &[u8]) {
    let mut bytes = vec![0u8; net::HEADER_SIZE];
    header.emit(&mut bytes, net::HEADER_SIZE).unwrap();
    bytes.extend_from_slice(frame);
    let addr = fe.alloc(bytes.len() as u64, 8).unwrap();
    fe.mem().write_slice(&bytes, GuestAddress(addr)).unwrap();
    // Header and frame in separate descriptors, as Linux sends them.
    let buffers = [
        Buffer { addr, len: net::HEADER_SIZE as u32, device_writes: false },
        Buffer { addr: addr + net::HEADER_SIZE as u64, len: frame.len() as u32, device_writes: false },
    ];
    fe.submit(TX, &buffers).unwrap();
    fe.wait_used(TX, WAIT).unwrap();
}

fn post_rx(fe: &mut TestFrontend, count: usize, len: u32) -> HashMap<u16, u64> {
    (0..count)
        .map(|_| {
            let addr = fe.alloc(len.into(), 8).unwrap();
            (fe.submit(RX, &[Buffer { addr, len, device_writes: true }]).unwrap(), addr)
        })
        .collect()
}

/// Receives one frame (following num_buffers over merged buffers): (header, frame).
fn receive(fe: &mut TestFrontend, posted: &HashMap<u16, u64>) -> (NetHeaderRepr, Vec<u8>) {
    let read = |fe: &mut TestFrontend| {
        let (head, len) = fe.wait_used(RX, WAIT).unwrap();
        let mut data = vec![0u8; len as usize];
        fe.mem().read_slice(&mut data, GuestAddress(posted[&head])).unwrap();
        data
    };
    let mut bytes = read(fe);
    let header = NetHeaderRepr::parse_bytes(&bytes, net::HEADER_SIZE).unwrap();
    for _ in 1..header.num_buffers {
        bytes.extend(read(fe));
    }
    (header, bytes.split_off(net::HEADER_SIZE))
}

const A: [u8; 6] = [0x52, 0x54, 0, 0, 0, 0xa];
const B: [u8; 6] = [0x52, 0x54, 0, 0, 0, 0xb];

#[test]
fn loopback_returns_frames_and_reports_its_configuration() {
    let dir = tempfile::tempdir().unwrap();
    let (backend, sockets) = start(dir.path(), &["--loopback", "--mac", "52:54:00:aa:bb:cc", "--mtu", "9000"], 1);
    let mut fe = connect(&sockets[0], &[netf::MAC, netf::MTU, netf::STATUS]);
    let config = ConfigRepr::parse(&fe.get_config(0, net::CONFIG_SIZE as u32).unwrap()).unwrap();
    assert_eq!(config.mac, [0x52, 0x54, 0, 0xaa, 0xbb, 0xcc]);
    assert_eq!(config.mtu, 9000);
    assert_eq!(config.status & net::status::LINK_UP, 1);
    let posted = post_rx(&mut fe, 8, 2048);
    for (i, len) in [60usize, 1514, 900].into_iter().enumerate() {
        let frame = ethernet(B, A, len, i as u8);
        send(&mut fe, NetHeaderRepr::default(), &frame);
        let (header, got) = receive(&mut fe, &posted);
        assert_eq!(header.num_buffers, 1);
        assert_eq!(got, frame, "frame {i} came back changed");
    }
    let log = backend.terminate(WAIT);
    assert!(log.contains("tx 3 packets") && log.contains("rx 3 packets"), "{log}");
}

#[test]
fn loopback_spreads_a_frame_over_merged_buffers() {
    let dir = tempfile::tempdir().unwrap();
    let (_backend, sockets) = start(dir.path(), &["--loopback"], 1);
    let mut fe = connect(&sockets[0], &[netf::MRG_RXBUF]);
    assert!(Features(fe.features).has(netf::MRG_RXBUF));
    let posted = post_rx(&mut fe, 16, 256);
    let frame = ethernet(B, A, 1400, 3);
    send(&mut fe, NetHeaderRepr::default(), &frame);
    let (header, got) = receive(&mut fe, &posted);
    // 12 + 1400 bytes in 256-byte buffers.
    assert_eq!(header.num_buffers, 6);
    assert_eq!(got, frame);
}

#[test]
fn checksum_is_completed_for_a_guest_without_guest_csum() {
    let dir = tempfile::tempdir().unwrap();
    let (_backend, sockets) = start(dir.path(), &["--loopback"], 1);
    // CSUM (the guest may leave checksums) without GUEST_CSUM (it cannot take them).
    let mut fe = connect(&sockets[0], &[netf::CSUM]);
    let posted = post_rx(&mut fe, 4, 2048);
    let mut frame = ethernet(B, A, 100, 9);
    frame[40..42].copy_from_slice(&[0, 0]);
    let header = NetHeaderRepr { flags: hdr_flags::NEEDS_CSUM, csum_start: 34, csum_offset: 6, ..Default::default() };
    send(&mut fe, header, &frame);
    let (got_header, got) = receive(&mut fe, &posted);
    assert_eq!(got_header.flags & hdr_flags::NEEDS_CSUM, 0);
    // The ones' complement sum over the checksummed range, checksum included, is 0xffff.
    let mut sum: u32 =
        got[34..].chunks(2).map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]))).sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    assert_eq!(sum, 0xffff);
    assert_eq!(got[..40], frame[..40]);
}

#[test]
fn bad_frames_are_dropped_and_service_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let (backend, sockets) = start(dir.path(), &["--loopback"], 1);
    let mut fe = connect(&sockets[0], &[netf::CSUM, netf::HOST_TSO4]);
    let posted = post_rx(&mut fe, 8, 2048);
    let frame = ethernet(B, A, 200, 1);
    // The CVE class: a checksum location past the end of the frame.
    send(
        &mut fe,
        NetHeaderRepr { flags: hdr_flags::NEEDS_CSUM, csum_start: 190, csum_offset: 60, ..Default::default() },
        &frame,
    );
    // GSO without NEEDS_CSUM.
    let gso = NetHeaderRepr {
        gso_type: net::GsoType::TcpV4 { ecn: false },
        gso_size: 1448,
        hdr_len: 54,
        ..Default::default()
    };
    send(&mut fe, gso, &frame);
    // Undefined flag bits.
    send(&mut fe, NetHeaderRepr { flags: 0x80, ..Default::default() }, &frame);
    // Longer than the MTU allows without GSO.
    send(&mut fe, NetHeaderRepr::default(), &ethernet(B, A, 3000, 2));
    // A chain too short for the header.
    let addr = fe.alloc(8, 8).unwrap();
    fe.submit(TX, &[Buffer { addr, len: 8, device_writes: false }]).unwrap();
    fe.wait_used(TX, WAIT).unwrap();
    // And a good frame still goes through, first in line.
    send(&mut fe, NetHeaderRepr::default(), &frame);
    let (_, got) = receive(&mut fe, &posted);
    assert_eq!(got, frame);
    let log = backend.terminate(WAIT);
    assert!(log.contains("bad-header 3"), "{log}");
    assert!(log.contains("too-long 1"), "{log}");
    assert!(log.contains("short-chain 1"), "{log}");
    assert!(log.contains("rx 1 packets"), "{log}");
}

#[test]
fn switch_connects_two_frontends() {
    let dir = tempfile::tempdir().unwrap();
    let (backend, sockets) = start(dir.path(), &["--switch", "--mac", "52:54:00:00:00:10"], 2);
    let mut a = connect(&sockets[0], &[netf::MAC, netf::MRG_RXBUF]);
    let mut b = connect(&sockets[1], &[netf::MAC, netf::MRG_RXBUF]);
    let mac_a = ConfigRepr::parse(&a.get_config(0, net::CONFIG_SIZE as u32).unwrap()).unwrap().mac;
    let mac_b = ConfigRepr::parse(&b.get_config(0, net::CONFIG_SIZE as u32).unwrap()).unwrap().mac;
    assert_ne!(mac_a, mac_b, "each port has its own address");
    let rx_a = post_rx(&mut a, 8, 2048);
    let rx_b = post_rx(&mut b, 8, 2048);
    // A broadcast from A reaches B (and not A).
    let hello = ethernet([0xff; 6], mac_a, 64, 5);
    send(&mut a, NetHeaderRepr::default(), &hello);
    assert_eq!(receive(&mut b, &rx_b).1, hello);
    // B answers A by unicast: A has been learned.
    let answer = ethernet(mac_a, mac_b, 1000, 6);
    send(&mut b, NetHeaderRepr::default(), &answer);
    assert_eq!(receive(&mut a, &rx_a).1, answer);
    // A frame from A to an unknown address is flooded to B.
    let unknown = ethernet([0x52, 0x54, 0, 9, 9, 9], mac_a, 300, 7);
    send(&mut a, NetHeaderRepr::default(), &unknown);
    assert_eq!(receive(&mut b, &rx_b).1, unknown);
    let log = backend.terminate(WAIT);
    assert!(log.contains("tx 3 packets") && log.contains("rx 3 packets"), "{log}");
}

#[test]
fn sink_counts_what_it_drops() {
    let dir = tempfile::tempdir().unwrap();
    let (backend, sockets) = start(dir.path(), &["--sink"], 1);
    let mut fe = connect(&sockets[0], &[]);
    for i in 0..50 {
        send(&mut fe, NetHeaderRepr::default(), &ethernet(B, A, 100, i));
    }
    let log = backend.terminate(WAIT);
    assert!(log.contains("tx 50 packets 5000 bytes"), "{log}");
}

#[test]
fn each_queue_pair_loops_back_on_itself() {
    let dir = tempfile::tempdir().unwrap();
    let (backend, sockets) = start(dir.path(), &["--loopback", "--num-queue-pairs", "2"], 1);
    let wanted = Features::from_bits(&[netf::MQ]).with(vf::VERSION_1);
    let mut fe = TestFrontend::connect(&sockets[0], 4 << 20, 4, 256, wanted.0).unwrap();
    assert!(Features(fe.features).has(netf::MQ));
    let config = ConfigRepr::parse(&fe.get_config(0, net::CONFIG_SIZE as u32).unwrap()).unwrap();
    assert_eq!(config.max_virtqueue_pairs, 2);
    for pair in 0..2usize {
        let (rx, tx) = (2 * pair, 2 * pair + 1);
        let posted: HashMap<u16, u64> = (0..4)
            .map(|_| {
                let addr = fe.alloc(2048, 8).unwrap();
                (fe.submit(rx, &[Buffer { addr, len: 2048, device_writes: true }]).unwrap(), addr)
            })
            .collect();
        let frame = ethernet(B, A, 500, pair as u8);
        let mut bytes = vec![0u8; net::HEADER_SIZE];
        bytes.extend_from_slice(&frame);
        let addr = fe.alloc(bytes.len() as u64, 8).unwrap();
        fe.mem().write_slice(&bytes, GuestAddress(addr)).unwrap();
        fe.submit(tx, &[Buffer { addr, len: bytes.len() as u32, device_writes: false }]).unwrap();
        fe.wait_used(tx, WAIT).unwrap();
        let (head, len) = fe.wait_used(rx, WAIT).unwrap();
        let mut got = vec![0u8; len as usize];
        fe.mem().read_slice(&mut got, GuestAddress(posted[&head])).unwrap();
        assert_eq!(got[net::HEADER_SIZE..], frame[..], "pair {pair}");
    }
    let log = backend.terminate(WAIT);
    assert!(log.contains("tx 2 packets") && log.contains("rx 2 packets"), "{log}");
}

#[test]
fn event_idx_frontends_keep_getting_served() {
    // The frontend kicks only when the backend asked (RING_EVENT_IDX's avail_event).
    let dir = tempfile::tempdir().unwrap();
    let (backend, sockets) = start(dir.path(), &["--loopback"], 1);
    let mut fe = connect(&sockets[0], &[vf::RING_EVENT_IDX]);
    assert!(Features(fe.features).has(vf::RING_EVENT_IDX));
    for i in 0..200u32 {
        let posted = post_rx(&mut fe, 1, 2048);
        let frame = ethernet(B, A, 60 + (i as usize % 100), i as u8);
        send(&mut fe, NetHeaderRepr::default(), &frame);
        assert_eq!(receive(&mut fe, &posted).1, frame, "frame {i}");
    }
    let log = backend.terminate(WAIT);
    assert!(log.contains("tx 200 packets") && log.contains("rx 200 packets"), "{log}");
}
