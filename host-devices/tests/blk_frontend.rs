//! vhost-user-blk driven by pvkit's test frontend (`pvkit_test_support::vhost_frontend`):
//! proves the frontend that the console and VMM tests build on, on a backend already verified
//! against libblkio and Linux.

mod common;

use pvkit_protocol::blk::{ConfigRepr, RequestHeaderRepr, RequestType, Status, feature as blkf};
use pvkit_protocol::virtio::{Features, feature as vf};
use pvkit_test_support::vhost_frontend::{Buffer, TestFrontend};
use std::time::Duration;
use vm_memory::{Bytes, GuestAddress};

const DISK: u64 = 8 << 20;
const WAIT: Duration = Duration::from_secs(5);

struct Request {
    header: u64,
    data: u64,
    status: u64,
}

fn request(fe: &mut TestFrontend) -> Request {
    Request { header: fe.alloc(16, 16).unwrap(), data: fe.alloc(4096, 4096).unwrap(), status: fe.alloc(1, 1).unwrap() }
}

fn post(fe: &mut TestFrontend, q: usize, r: &Request, t: RequestType, sector: u64) -> u16 {
    let mut hdr = [0u8; 16];
    RequestHeaderRepr { request_type: t, ioprio: 0, sector }.emit(&mut hdr).unwrap();
    fe.mem().write_slice(&hdr, GuestAddress(r.header)).unwrap();
    fe.mem().write_obj(0xffu8, GuestAddress(r.status)).unwrap();
    let reads = t == RequestType::In;
    fe.submit(
        q,
        &[
            Buffer { addr: r.header, len: 16, device_writes: false },
            Buffer { addr: r.data, len: 4096, device_writes: reads },
            Buffer { addr: r.status, len: 1, device_writes: true },
        ],
    )
    .unwrap()
}

fn status(fe: &TestFrontend, r: &Request) -> u8 {
    fe.mem().read_obj(GuestAddress(r.status)).unwrap()
}

#[test]
fn test_frontend_drives_the_block_backend() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img");
    std::fs::File::create(&image).unwrap().set_len(DISK).unwrap();
    let (mut backend, socket) = common::start_blk(dir.path(), &image, &["--num-queues", "2"]);
    let wanted = Features::from_bits(&[vf::VERSION_1, blkf::MQ, blkf::FLUSH, blkf::BLK_SIZE]).0;
    let mut fe = TestFrontend::connect(&socket, 16 << 20, 2, 64, wanted).unwrap();
    assert_eq!(fe.features & wanted, wanted, "backend offers what was asked");

    let config = ConfigRepr::parse(&fe.get_config(0, 60).unwrap()).unwrap();
    assert_eq!((config.capacity, config.num_queues), (DISK / 512, 2));

    // Write on queue 1, read back on queue 0.
    let r = request(&mut fe);
    let data: Vec<u8> = (0..4096u32).map(|i| (i * 13 + 7) as u8).collect();
    fe.mem().write_slice(&data, GuestAddress(r.data)).unwrap();
    let head = post(&mut fe, 1, &r, RequestType::Out, 16);
    assert_eq!(fe.wait_used(1, WAIT).unwrap(), (head, 1));
    assert_eq!(status(&fe, &r), Status::Ok as u8);
    fe.mem().write_slice(&[0u8; 4096], GuestAddress(r.data)).unwrap();
    let head = post(&mut fe, 0, &r, RequestType::In, 16);
    assert_eq!(fe.wait_used(0, WAIT).unwrap(), (head, 4097));
    let mut back = vec![0u8; 4096];
    fe.mem().read_slice(&mut back, GuestAddress(r.data)).unwrap();
    assert_eq!(back, data);

    // A request past the end gets IOERR and service goes on.
    post(&mut fe, 0, &r, RequestType::In, DISK / 512);
    fe.wait_used(0, WAIT).unwrap();
    assert_eq!(status(&fe, &r), Status::IoErr as u8);

    // Many requests in flight at once, all completed.
    let requests: Vec<Request> = (0..20).map(|_| request(&mut fe)).collect();
    let mut heads: Vec<u16> =
        requests.iter().enumerate().map(|(i, r)| post(&mut fe, 0, r, RequestType::Out, i as u64 * 8)).collect();
    let mut used: Vec<u16> = (0..requests.len()).map(|_| fe.wait_used(0, WAIT).unwrap().0).collect();
    heads.sort_unstable();
    used.sort_unstable();
    assert_eq!(used, heads);
    assert!(requests.iter().all(|r| status(&fe, r) == Status::Ok as u8));
    backend.check_running().unwrap();
}

#[test]
fn event_idx_frontends_keep_getting_served() {
    // The frontend kicks only when the backend asked (RING_EVENT_IDX's avail_event): a backend
    // that failed to re-arm notifications would leave a request here waiting for good.
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img");
    std::fs::File::create(&image).unwrap().set_len(DISK).unwrap();
    let (_backend, socket) = common::start_blk(dir.path(), &image, &["--poll-us", "0"]);
    let wanted = Features::from_bits(&[vf::VERSION_1, vf::RING_EVENT_IDX]).0;
    let mut fe = TestFrontend::connect(&socket, 16 << 20, 1, 64, wanted).unwrap();
    assert!(Features(fe.features).has(vf::RING_EVENT_IDX));
    let r = request(&mut fe);
    for i in 0..200u64 {
        let pattern = vec![i as u8; 4096];
        fe.mem().write_slice(&pattern, GuestAddress(r.data)).unwrap();
        post(&mut fe, 0, &r, RequestType::Out, i * 8);
        fe.wait_used(0, WAIT).unwrap();
        assert_eq!(status(&fe, &r), Status::Ok as u8);
        fe.mem().write_slice(&[0u8; 4096], GuestAddress(r.data)).unwrap();
        post(&mut fe, 0, &r, RequestType::In, i * 8);
        fe.wait_used(0, WAIT).unwrap();
        let mut back = vec![0u8; 4096];
        fe.mem().read_slice(&mut back, GuestAddress(r.data)).unwrap();
        assert_eq!(back, pattern, "block {i}");
    }
}
