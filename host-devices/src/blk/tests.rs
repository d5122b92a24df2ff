//! Unit tests of the block device with virtio-queue's `MockSplitQueue`: every request type over
//! a temporary file, and every kind of bad input a guest can send.

use super::device::{BlkDevice, BlkOptions};
use super::engine::{Engine, SyncEngine};
use super::request::{self, Limits, RequestError};
use super::stats::Stats;
use crate::queue::Gates;
use pvkit_protocol::blk::{RequestHeaderRepr, RequestType, SegmentRepr, Status};
use std::sync::Arc;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::desc::split::Descriptor as SplitDescriptor;
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const READ: u16 = 0;
const WRITE: u16 = virtio_bindings::bindings::virtio_ring::VRING_DESC_F_WRITE as u16;
const HEADER: u64 = 0x10_0000;
const DATA: u64 = 0x20_0000;
const STATUS: u64 = 0x30_0000;
const DISK: u64 = 1 << 20;

struct Fixture {
    mem: GuestMemoryMmap,
    device: BlkDevice,
    stats: Arc<Stats>,
    _file: tempfile::NamedTempFile,
    path: std::path::PathBuf,
}

fn fixture(read_only: bool) -> Fixture {
    fixture_with(read_only, |path, ro| Engine::Sync(SyncEngine::open(path, ro, false).unwrap()))
}

fn fixture_with(read_only: bool, open: impl Fn(&str, bool) -> Engine) -> Fixture {
    let file = tempfile::NamedTempFile::new().unwrap();
    file.as_file().set_len(DISK).unwrap();
    let path = file.path().to_path_buf();
    let engine = open(path.to_str().unwrap(), read_only);
    let stats = Arc::new(Stats::default());
    let options = BlkOptions {
        num_queues: 1,
        queue_size: 256,
        serial: "unit-serial".into(),
        logical_block_size: 512,
        read_only,
        poll_us: 0,
    };
    let device = BlkDevice::new(Arc::new(engine), options, stats.clone(), Arc::new(Gates::new(1))).unwrap();
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap();
    Fixture { mem, device, stats, _file: file, path }
}

fn desc(addr: u64, len: u32, flags: u16) -> RawDescriptor {
    RawDescriptor::from(SplitDescriptor::new(addr, len, flags, 0))
}

fn header(mem: &GuestMemoryMmap, request_type: RequestType, sector: u64) {
    let mut bytes = [0u8; 16];
    RequestHeaderRepr { request_type, ioprio: 0, sector }.emit(&mut bytes).unwrap();
    mem.write_slice(&bytes, GuestAddress(HEADER)).unwrap();
}

impl Fixture {
    /// Runs one chain through the device; returns (status byte, used length).
    fn run(&self, descs: &[RawDescriptor]) -> (u8, u32) {
        self.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
        let queue = MockSplitQueue::new(&self.mem, 16);
        let chain = queue.build_desc_chain(descs).unwrap();
        let used = self.device.handle_chain(chain, &self.mem);
        (self.mem.read_obj(GuestAddress(STATUS)).unwrap(), used)
    }

    fn request(&self, t: RequestType, sector: u64, data: Option<(u32, u16)>) -> (u8, u32) {
        header(&self.mem, t, sector);
        let mut descs = vec![desc(HEADER, 16, READ)];
        if let Some((len, flags)) = data {
            descs.push(desc(DATA, len, flags));
        }
        descs.push(desc(STATUS, 1, WRITE));
        self.run(&descs)
    }
}

#[test]
fn write_then_read_back_through_the_file() {
    let f = fixture(false);
    let pattern: Vec<u8> = (0..8192u32).map(|i| (i * 7 + 3) as u8).collect();
    f.mem.write_slice(&pattern, GuestAddress(DATA)).unwrap();
    assert_eq!(f.request(RequestType::Out, 8, Some((8192, READ))), (Status::Ok as u8, 1));
    let on_disk = std::fs::read(&f.path).unwrap();
    assert_eq!(&on_disk[4096..4096 + 8192], &pattern[..]);

    f.mem.write_slice(&[0u8; 8192], GuestAddress(DATA)).unwrap();
    assert_eq!(f.request(RequestType::In, 8, Some((8192, WRITE))), (Status::Ok as u8, 8193));
    let mut back = vec![0u8; 8192];
    f.mem.read_slice(&mut back, GuestAddress(DATA)).unwrap();
    assert_eq!(back, pattern);
    assert_eq!(f.request(RequestType::Flush, 0, None), (Status::Ok as u8, 1));
}

#[test]
fn data_split_across_descriptors_any_way() {
    // Header and data in one readable descriptor, data split over two writable ones.
    let f = fixture(false);
    let mut buf = [0u8; 16 + 512];
    RequestHeaderRepr { request_type: RequestType::Out, ioprio: 0, sector: 1 }.emit(&mut buf).unwrap();
    buf[16..].fill(0xab);
    f.mem.write_slice(&buf, GuestAddress(HEADER)).unwrap();
    assert_eq!(f.run(&[desc(HEADER, 16 + 512, READ), desc(STATUS, 1, WRITE)]).0, Status::Ok as u8);
    header(&f.mem, RequestType::In, 1);
    // 300 + 212 data bytes, then the status byte at the end of the second writable buffer.
    let (status, used) = f.run(&[desc(HEADER, 16, READ), desc(DATA, 300, WRITE), desc(STATUS - 212, 213, WRITE)]);
    assert_eq!((status, used), (Status::Ok as u8, 513));
    let mut back = vec![0u8; 300];
    f.mem.read_slice(&mut back, GuestAddress(DATA)).unwrap();
    assert!(back.iter().all(|&b| b == 0xab));
}

#[test]
fn get_id_returns_the_serial() {
    let f = fixture(false);
    assert_eq!(f.request(RequestType::GetId, 0, Some((20, WRITE))), (Status::Ok as u8, 21));
    let mut id = [0u8; 20];
    f.mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
    assert_eq!(&id[..11], b"unit-serial");
    assert!(id[11..].iter().all(|&b| b == 0));
}

fn segment(f: &Fixture, seg: SegmentRepr) {
    let mut raw = [0u8; 16];
    seg.emit(&mut raw).unwrap();
    f.mem.write_slice(&raw, GuestAddress(DATA)).unwrap();
}

#[test]
fn discard_and_write_zeroes_clear_data() {
    let f = fixture(false);
    std::fs::write(&f.path, vec![0x5au8; DISK as usize]).unwrap();
    segment(&f, SegmentRepr { sector: 0, num_sectors: 16, unmap: false });
    assert_eq!(f.request(RequestType::Discard, 0, Some((16, READ))).0, Status::Ok as u8);
    segment(&f, SegmentRepr { sector: 32, num_sectors: 8, unmap: false });
    assert_eq!(f.request(RequestType::WriteZeroes, 0, Some((16, READ))).0, Status::Ok as u8);
    segment(&f, SegmentRepr { sector: 64, num_sectors: 8, unmap: true });
    assert_eq!(f.request(RequestType::WriteZeroes, 0, Some((16, READ))).0, Status::Ok as u8);
    let disk = std::fs::read(&f.path).unwrap();
    assert!(disk[..16 * 512].iter().all(|&b| b == 0), "discarded range reads zeros");
    assert!(disk[16 * 512..32 * 512].iter().all(|&b| b == 0x5a), "untouched between");
    assert!(disk[32 * 512..40 * 512].iter().all(|&b| b == 0), "write-zeroes");
    assert!(disk[64 * 512..72 * 512].iter().all(|&b| b == 0), "write-zeroes with unmap");
    assert!(disk[72 * 512..].iter().all(|&b| b == 0x5a));
}

#[test]
fn bad_requests_get_error_statuses_and_are_counted() {
    let f = fixture(false);
    let ioerr = Status::IoErr as u8;
    type Case = (&'static str, Box<dyn Fn(&Fixture) -> (u8, u32)>, u8);
    let cases: Vec<Case> = vec![
        ("out-of-range", Box::new(|f| f.request(RequestType::In, DISK / 512, Some((512, WRITE)))), ioerr),
        ("out-of-range", Box::new(|f| f.request(RequestType::Out, u64::MAX, Some((512, READ)))), ioerr),
        ("out-of-range", Box::new(|f| f.request(RequestType::In, DISK / 512 - 1, Some((1024, WRITE)))), ioerr),
        ("unaligned", Box::new(|f| f.request(RequestType::In, 0, Some((511, WRITE)))), ioerr),
        ("unaligned", Box::new(|f| f.request(RequestType::Out, 0, Some((100, READ)))), ioerr),
        ("wrong-direction", Box::new(|f| f.request(RequestType::In, 0, Some((512, READ)))), ioerr),
        ("wrong-direction", Box::new(|f| f.request(RequestType::Out, 0, Some((512, WRITE)))), ioerr),
        ("unsupported", Box::new(|f| f.request(RequestType::Unknown(99), 0, None)), Status::Unsupp as u8),
        ("unsupported", Box::new(|f| f.request(RequestType::GetLifetime, 0, Some((16, WRITE)))), Status::Unsupp as u8),
    ];
    for (kind, case, expected) in &cases {
        let before = f.stats.errors(kind);
        let (status, used) = case(&f);
        assert_eq!((status, used), (*expected, 1), "{kind}");
        assert_eq!(f.stats.errors(kind), before + 1, "{kind} counted");
    }
}

#[test]
fn bad_segments() {
    let f = fixture(false);
    segment(&f, SegmentRepr { sector: 0, num_sectors: 8, unmap: true });
    assert_eq!(f.request(RequestType::Discard, 0, Some((16, READ))).0, Status::Unsupp as u8, "UNMAP on discard");
    let mut raw = [0u8; 16];
    SegmentRepr { sector: 0, num_sectors: 8, unmap: false }.emit(&mut raw).unwrap();
    raw[12] = 0x6;
    f.mem.write_slice(&raw, GuestAddress(DATA)).unwrap();
    assert_eq!(f.request(RequestType::WriteZeroes, 0, Some((16, READ))).0, Status::Unsupp as u8, "reserved flags");
    segment(&f, SegmentRepr { sector: DISK / 512, num_sectors: 1, unmap: false });
    assert_eq!(f.request(RequestType::Discard, 0, Some((16, READ))).0, Status::IoErr as u8, "past the end");
    assert_eq!(f.request(RequestType::Discard, 0, Some((15, READ))).0, Status::IoErr as u8, "truncated");
    assert_eq!(f.request(RequestType::Discard, 0, Some((16 * 33, READ))).0, Status::IoErr as u8, "too many");
    assert_eq!(f.stats.errors("over-limit"), 1);
}

#[test]
fn read_only_refuses_writes_but_reads() {
    let f = fixture(true);
    assert_eq!(f.request(RequestType::Out, 0, Some((512, READ))).0, Status::IoErr as u8);
    segment(&f, SegmentRepr { sector: 0, num_sectors: 1, unmap: false });
    assert_eq!(f.request(RequestType::Discard, 0, Some((16, READ))).0, Status::IoErr as u8);
    assert_eq!(f.stats.errors("read-only"), 2);
    assert_eq!(f.request(RequestType::In, 0, Some((512, WRITE))).0, Status::Ok as u8);
    assert!(f.device.device_features().has(pvkit_protocol::blk::feature::RO));
}

#[test]
fn chains_without_header_or_status_never_panic() {
    let f = fixture(false);
    // No writable byte at all: dropped without a status.
    header(&f.mem, RequestType::In, 0);
    assert_eq!(f.run(&[desc(HEADER, 16, READ)]), (0xff, 0));
    assert_eq!(f.stats.errors("no-status"), 1);
    // A header too short.
    assert_eq!(f.run(&[desc(HEADER, 8, READ), desc(STATUS, 1, WRITE)]), (Status::IoErr as u8, 1));
    // A readable descriptor after a writable one.
    assert_eq!(
        f.run(&[desc(HEADER, 16, READ), desc(DATA, 512, WRITE), desc(HEADER, 16, READ), desc(STATUS, 1, WRITE)]).0,
        Status::IoErr as u8
    );
    // Data outside guest memory.
    header(&f.mem, RequestType::In, 0);
    assert_eq!(
        f.run(&[desc(HEADER, 16, READ), desc(0x7fff_0000, 512, WRITE), desc(STATUS, 1, WRITE)]).0,
        Status::IoErr as u8
    );
    assert_eq!(f.stats.errors("bad-address"), 1);
    // A descriptor whose address plus length wraps the address space: dropped, no panic.
    let queue = MockSplitQueue::new(&f.mem, 16);
    let chain = queue
        .build_desc_chain(&[desc(HEADER, 16, READ), desc(u64::MAX - 100, 512, WRITE), desc(STATUS, 1, WRITE)])
        .unwrap();
    assert_eq!(f.device.handle_chain(chain, &f.mem), 0);
    assert_eq!(f.stats.errors("bad-address"), 2);
    // A status byte outside guest memory: nothing to write to, dropped.
    let queue = MockSplitQueue::new(&f.mem, 16);
    let chain = queue.build_desc_chain(&[desc(HEADER, 16, READ), desc(0x7fff_0000, 1, WRITE)]).unwrap();
    assert_eq!(f.device.handle_chain(chain, &f.mem), 0);
}

#[test]
fn config_space_reports_the_disk() {
    use vhost_user_backend::VhostUserBackend;
    let f = fixture(false);
    let config = pvkit_protocol::blk::ConfigRepr::parse(&f.device.get_config(0, 60)).unwrap();
    assert_eq!(config.capacity, DISK / 512);
    assert_eq!(config.num_queues, 1);
    assert_eq!(config.writeback, 1);
    f.device.set_config(32, &[0]).unwrap();
    assert_eq!(f.device.get_config(32, 1), [0]);
    f.device.set_config(0, &[1, 2, 3, 4]).unwrap();
    assert_eq!(config.capacity, DISK / 512);
    assert_eq!(
        pvkit_protocol::blk::ConfigRepr::parse(&f.device.get_config(0, 60)).unwrap().capacity,
        DISK / 512,
        "capacity is read-only: the write is ignored"
    );
    assert_eq!(f.stats.errors("wrong-direction"), 1, "and counted");
    assert_eq!(f.device.get_config(56, 8), [1, 0, 0, 0, 0, 0, 0, 0], "reads past the end are zero-filled");
    assert!(f.device.get_config(0, u32::MAX).is_empty(), "absurd sizes are refused");
}

#[test]
fn parse_limits_are_checked_without_io() {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap();
    let limits = Limits {
        capacity_sectors: 8,
        read_only: false,
        max_segments: 1,
        max_discard_sectors: 4,
        max_write_zeroes_sectors: 4,
    };
    header(&mem, RequestType::Discard, 0);
    segment_raw(&mem, SegmentRepr { sector: 0, num_sectors: 5, unmap: false });
    let queue = MockSplitQueue::new(&mem, 16);
    let chain =
        queue.build_desc_chain(&[desc(HEADER, 16, READ), desc(DATA, 16, READ), desc(STATUS, 1, WRITE)]).unwrap();
    let parsed = request::parse(chain, &mem, &limits);
    assert_eq!(parsed.status, Some(GuestAddress(STATUS)));
    assert!(matches!(parsed.result, Err(RequestError::OverLimit { what: "segment sectors", value: 5, limit: 4 })));
}

fn segment_raw(mem: &GuestMemoryMmap, seg: SegmentRepr) {
    let mut raw = [0u8; 16];
    seg.emit(&mut raw).unwrap();
    mem.write_slice(&raw, GuestAddress(DATA)).unwrap();
}

#[test]
fn io_uring_batches_many_reads_and_writes() {
    use super::uring::InlinePolicy;
    for policy in [
        InlinePolicy::NEVER,
        InlinePolicy::ALWAYS,
        InlinePolicy { reads: false, writes: true },
        InlinePolicy { reads: true, writes: false },
    ] {
        io_uring_round_trip(policy);
    }
}

#[test]
fn io_uring_probes_which_directions_go_inline() {
    use super::uring::{InlinePolicy, UringEngine};
    let file = tempfile::NamedTempFile::new_in(std::env::temp_dir()).unwrap();
    file.as_file().set_len(DISK).unwrap();
    let path = file.path().to_str().unwrap();
    let probe = |ro: bool| UringEngine::open(path, ro, false, 1).unwrap().inline();
    // Read-only: no write probe, so writes never go inline.
    assert!(!probe(true).writes);
    // With O_DIRECT io_uring is asynchronous: nothing goes inline.
    assert_eq!(
        InlinePolicy::probe(std::os::unix::io::AsRawFd::as_raw_fd(file.as_file()), path, false, true),
        InlinePolicy::NEVER
    );
    // tmpfs can do neither direction without blocking.
    let shm = std::path::Path::new("/dev/shm");
    if shm.is_dir() && tempfile::NamedTempFile::new_in(shm).is_ok() {
        let file = tempfile::NamedTempFile::new_in(shm).unwrap();
        file.as_file().set_len(DISK).unwrap();
        let policy = UringEngine::open(file.path().to_str().unwrap(), false, false, 1).unwrap().inline();
        let statfs = statfs_type(file.path());
        if statfs == Some(0x0102_1994) {
            assert_eq!(policy, InlinePolicy::ALWAYS, "tmpfs");
        }
    }
}

/// The filesystem magic number of the filesystem holding `path`.
fn statfs_type(path: &std::path::Path) -> Option<i64> {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).ok()?;
    // SAFETY: statfs fills the zeroed struct for a valid C string path.
    let mut buf: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    (unsafe { libc::statfs(c.as_ptr(), &mut buf) } == 0).then_some(buf.f_type as i64)
}

fn io_uring_round_trip(policy: super::uring::InlinePolicy) {
    let f = fixture_with(false, |path, ro| {
        Engine::Uring(super::uring::UringEngine::open(path, ro, false, 1).unwrap().with_inline(policy))
    });
    let parse_one = |f: &Fixture, t: RequestType, i: u64, flags: u16| {
        // Each request has its own header, data and status area.
        let (hdr, data, status) = (HEADER + i * 16, DATA + i * 8192, STATUS + i);
        let mut bytes = [0u8; 16];
        RequestHeaderRepr { request_type: t, ioprio: 0, sector: i * 16 + 3 }.emit(&mut bytes).unwrap();
        f.mem.write_slice(&bytes, GuestAddress(hdr)).unwrap();
        // Data split over two descriptors to exercise multi-iovec submissions.
        let queue = MockSplitQueue::new(&f.mem, 16);
        let chain = queue
            .build_desc_chain(&[
                desc(hdr, 16, READ),
                desc(data, 4096, flags),
                desc(data + 4096, 4096, flags),
                desc(status, 1, WRITE),
            ])
            .unwrap();
        request::parse(
            chain,
            &f.mem,
            &Limits {
                capacity_sectors: DISK / 512,
                read_only: false,
                max_segments: 1,
                max_discard_sectors: 1,
                max_write_zeroes_sectors: 1,
            },
        )
    };
    let count = 40u64;
    for i in 0..count {
        f.mem.write_slice(&vec![(i as u8).wrapping_mul(37) | 1; 8192], GuestAddress(DATA + i * 8192)).unwrap();
    }
    let writes: Vec<_> = (0..count).map(|i| parse_one(&f, RequestType::Out, i, READ)).collect();
    assert!(f.device.complete_batch(&f.mem, 0, writes, None).iter().all(|&(used, _)| used == 1));
    let disk = std::fs::read(&f.path).unwrap();
    for i in 0..count {
        let at = ((i * 16 + 3) * 512) as usize;
        assert!(
            disk[at..at + 8192].iter().all(|&b| b == (i as u8).wrapping_mul(37) | 1),
            "{policy:?}: write {i} on disk"
        );
    }
    f.mem.write_slice(&vec![0u8; (count * 8192) as usize], GuestAddress(DATA)).unwrap();
    let reads: Vec<_> = (0..count).map(|i| parse_one(&f, RequestType::In, i, WRITE)).collect();
    assert!(f.device.complete_batch(&f.mem, 0, reads, None).iter().all(|&(used, _)| used == 8193));
    for i in 0..count {
        let mut back = vec![0u8; 8192];
        f.mem.read_slice(&mut back, GuestAddress(DATA + i * 8192)).unwrap();
        assert!(back.iter().all(|&b| b == (i as u8).wrapping_mul(37) | 1), "{policy:?}: read {i} back");
        assert_eq!(f.mem.read_obj::<u8>(GuestAddress(STATUS + i)).unwrap(), Status::Ok as u8);
    }
}

#[test]
fn the_null_engine_reads_zeros_over_whatever_the_buffers_held() {
    let f = fixture_with(false, |_, _| Engine::Null(super::engine::NullEngine::new(DISK).unwrap()));
    // Two descriptors, one not a multiple of a page long, both full of stale bytes.
    f.mem.write_slice(&[0xa5u8; 12288], GuestAddress(DATA)).unwrap();
    header(&f.mem, RequestType::In, 0);
    let descs =
        [desc(HEADER, 16, READ), desc(DATA, 4608, WRITE), desc(DATA + 8192, 3584, WRITE), desc(STATUS, 1, WRITE)];
    assert_eq!(f.run(&descs), (Status::Ok as u8, 8193));
    let mut back = vec![0u8; 12288];
    f.mem.read_slice(&mut back, GuestAddress(DATA)).unwrap();
    assert!(back[..4608].iter().all(|&b| b == 0), "the first buffer is zeros");
    assert!(back[4608..8192].iter().all(|&b| b == 0xa5), "nothing written between the buffers");
    assert!(back[8192..11776].iter().all(|&b| b == 0), "the second buffer is zeros");
    assert!(back[11776..].iter().all(|&b| b == 0xa5), "nothing written past the request");
}
