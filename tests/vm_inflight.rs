//! In-flight tracking through pvkit's VMM, without a vCPU (no KVM needed): the VMM's device
//! model drives pvkit's `vhost-user-blk` as a guest would through its registers. The backend
//! is killed; the state it left behind is that of a backend that completed requests out of
//! order (four writes taken, the third and first completed, the second and fourth not). The
//! VMM reconnects to a new backend and hands it the in-flight area: exactly the second and
//! fourth writes are served, in that order, and nothing twice. Replaying from the used index
//! (what a frontend without tracking does) would have run the third write again and never
//! the second.

use pvkit_protocol::blk::{RequestHeaderRepr, RequestType};
use pvkit_protocol::inflight::{desc_state, desc_state_offset, header};
use pvkit_protocol::mmio::Register;
use pvkit_protocol::ring::desc_flags::{NEXT, WRITE};
use pvkit_protocol::virtio::{DeviceId, status};
use pvkit_test_support::process::ChildGuard;
use pvkit_vmm_glue::device::VirtioDevice;
use pvkit_vmm_glue::frontend::MAX_QUEUE_SIZE;
use pvkit_vmm_glue::memory::GuestRam;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, Instant};
use vm_memory::{Bytes, GuestAddress};

const RING: u16 = 16;
const DESC: u64 = 0x1_0000;
const AVAIL: u64 = 0x1_1000;
const USED: u64 = 0x1_2000;
/// Request `i`: header, 512 bytes of data, status byte.
fn header_at(i: u64) -> u64 {
    0x2_0000 + 0x1000 * i
}
fn data_at(i: u64) -> u64 {
    0x4_0000 + 0x1000 * i
}
fn status_at(i: u64) -> u64 {
    0x6_0000 + i
}

fn write(device: &mut VirtioDevice, ram: &GuestRam, register: Register, value: u32) {
    device.mmio_write(register.offset(), &value.to_le_bytes(), ram);
}

fn start_backend(socket: &Path, disk: &Path) -> ChildGuard {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_pvkit"));
    cmd.args(["backend", "blk", "--blk-file"]).arg(disk).arg("--socket-path").arg(socket);
    let mut backend = ChildGuard::spawn("vhost-user-blk", &mut cmd).unwrap();
    backend.wait_for_socket(socket, Duration::from_secs(10)).unwrap();
    backend
}

/// The driver's side of bringing the block device up with one ring of `RING` entries.
fn bring_up(device: &mut VirtioDevice, ram: &GuestRam) {
    let driver = u32::from(status::ACKNOWLEDGE | status::DRIVER);
    write(device, ram, Register::Status, driver);
    write(device, ram, Register::DriverFeaturesSel, 1);
    write(device, ram, Register::DriverFeatures, 1); // VIRTIO_F_VERSION_1
    write(device, ram, Register::DriverFeaturesSel, 0);
    write(device, ram, Register::DriverFeatures, 0);
    write(device, ram, Register::Status, driver | u32::from(status::FEATURES_OK));
    write(device, ram, Register::QueueSel, 0);
    write(device, ram, Register::QueueNum, u32::from(RING));
    write(device, ram, Register::QueueDescLow, DESC as u32);
    write(device, ram, Register::QueueDriverLow, AVAIL as u32);
    write(device, ram, Register::QueueDeviceLow, USED as u32);
    write(device, ram, Register::QueueReady, 1);
    write(device, ram, Register::Status, driver | u32::from(status::FEATURES_OK | status::DRIVER_OK));
}

/// Request `i`: a write of pattern `0xb0 + i` to sector `i`, as chain head `3 * i`, made
/// available in slot `i`.
fn post_write(ram: &GuestRam, i: u64) {
    let mem = ram.memory();
    let mut header = [0u8; 16];
    RequestHeaderRepr { request_type: RequestType::Out, ioprio: 0, sector: i }.emit(&mut header).unwrap();
    mem.write_slice(&header, GuestAddress(header_at(i))).unwrap();
    mem.write_slice(&[0xb0 + i as u8; 512], GuestAddress(data_at(i))).unwrap();
    mem.write_obj(0xffu8, GuestAddress(status_at(i))).unwrap();
    let head = 3 * i as u16;
    let descs = [(header_at(i), 16, NEXT, head + 1), (data_at(i), 512, NEXT, head + 2), (status_at(i), 1, WRITE, 0)];
    for (n, (addr, len, flags, next)) in descs.into_iter().enumerate() {
        let at = DESC + 16 * (u64::from(head) + n as u64);
        mem.write_obj(addr, GuestAddress(at)).unwrap();
        mem.write_obj(len as u32, GuestAddress(at + 8)).unwrap();
        mem.write_obj(flags, GuestAddress(at + 12)).unwrap();
        mem.write_obj(next, GuestAddress(at + 14)).unwrap();
    }
    mem.write_obj(head, GuestAddress(AVAIL + 4 + 2 * i)).unwrap();
}

fn used_idx(ram: &GuestRam) -> u16 {
    ram.memory().read_obj(GuestAddress(USED + 2)).unwrap()
}

fn used_heads(ram: &GuestRam) -> Vec<u32> {
    (0..u64::from(used_idx(ram)))
        .map(|slot| ram.memory().read_obj(GuestAddress(USED + 4 + 8 * slot)).unwrap())
        .collect()
}

/// The in-flight area the VMM holds (the backend handed it over as a memfd).
fn inflight_area() -> File {
    for entry in std::fs::read_dir("/proc/self/fd").unwrap().flatten() {
        if std::fs::read_link(entry.path()).is_ok_and(|t| t.to_string_lossy().contains("pvkit-inflight")) {
            return File::options().read(true).write(true).open(entry.path()).unwrap();
        }
    }
    panic!("the VMM holds no in-flight area");
}

#[test]
fn a_restarted_backend_serves_exactly_the_requests_left_in_flight() {
    let dir = tempfile::tempdir().unwrap();
    let (socket, disk) = (dir.path().join("blk.sock"), dir.path().join("disk.img"));
    File::create(&disk).unwrap().set_len(1 << 20).unwrap();
    let first = start_backend(&socket, &disk);
    let ram = GuestRam::new(16 << 20).unwrap();
    let mut device = VirtioDevice::connect(DeviceId::Block, 0, socket.clone(), &ram).unwrap();
    bring_up(&mut device, &ram);
    let area = inflight_area();
    drop(first.stop());
    device.backend_lost();

    // What the dead backend left: writes 0..4 (heads 0, 3, 6, 9) taken in that order, and
    // writes 2 and 0 completed (data on disk, used entries, statuses), 1 and 3 in flight.
    for i in 0..4 {
        post_write(&ram, i);
    }
    let mem = ram.memory();
    mem.write_obj(4u16, GuestAddress(AVAIL + 2)).unwrap();
    for (slot, i) in [(0u64, 2u64), (1, 0)] {
        mem.write_obj(3 * i as u32, GuestAddress(USED + 4 + 8 * slot)).unwrap();
        mem.write_obj(1u32, GuestAddress(USED + 8 + 8 * slot)).unwrap();
        mem.write_obj(0u8, GuestAddress(status_at(i))).unwrap();
        File::options().write(true).open(&disk).unwrap().write_all_at(&[0xb0 + i as u8; 512], 512 * i).unwrap();
    }
    mem.write_obj(2u16, GuestAddress(USED + 2)).unwrap();
    let queue_region = |offset: u64| offset; // queue 0's region starts the area
    area.write_all_at(&1u16.to_le_bytes(), queue_region(header::VERSION)).unwrap();
    area.write_all_at(&MAX_QUEUE_SIZE.to_le_bytes(), queue_region(header::DESC_NUM)).unwrap();
    area.write_all_at(&2u16.to_le_bytes(), queue_region(header::USED_IDX)).unwrap();
    for (i, taken) in [(0u16, 0u64), (1, 1), (2, 2), (3, 3)] {
        let state = desc_state_offset(3 * i);
        area.write_all_at(&taken.to_le_bytes(), state + desc_state::COUNTER).unwrap();
        area.write_all_at(&[u8::from(i % 2 == 1)], state + desc_state::INFLIGHT).unwrap();
    }

    let second = start_backend(&socket, &disk);
    assert!(device.try_reconnect(&ram), "the VMM reconnects to the new backend");
    let deadline = Instant::now() + Duration::from_secs(10);
    while used_idx(&ram) < 4 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    std::thread::sleep(Duration::from_millis(200)); // anything served twice would show now
    assert_eq!(used_heads(&ram), [6, 0, 3, 9], "exactly writes 1 and 3, in the order taken");
    let disk_file = File::open(&disk).unwrap();
    for i in 0..4u64 {
        let mut sector = [0u8; 512];
        disk_file.read_exact_at(&mut sector, 512 * i).unwrap();
        assert_eq!(sector, [0xb0 + i as u8; 512], "sector {i}");
        assert_eq!(mem.read_obj::<u8>(GuestAddress(status_at(i))).unwrap(), 0, "status of write {i}");
    }
    let log = second.terminate(Duration::from_secs(5));
    assert!(log.contains("writes=2 ") && log.contains("resubmitted=2"), "{log}");
    let mut flags = vec![0u8; 16 * usize::from(RING)];
    area.read_exact_at(&mut flags, desc_state_offset(0)).unwrap();
    assert!(flags.chunks(16).all(|state| state[0] == 0), "nothing is left in flight");
}
