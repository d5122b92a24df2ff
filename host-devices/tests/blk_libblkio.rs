//! vhost-user-blk against libblkio's `virtio-blk-vhost-user` driver, an independent vhost-user
//! frontend and virtio-blk driver, over a real socket.

mod common;

use pvkit_test_support::blkio_client::{BlkioClient, BlkioError};
use pvkit_test_support::process::ChildGuard;
use std::path::PathBuf;

const DISK: u64 = 32 << 20;

struct Backend {
    _child: ChildGuard,
    socket: PathBuf,
    image: PathBuf,
    _dir: tempfile::TempDir,
}

fn backend(extra: &[&str]) -> Backend {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img");
    std::fs::File::create(&image).unwrap().set_len(DISK).unwrap();
    let (child, socket) = common::start_blk(dir.path(), &image, extra);
    Backend { _child: child, socket, image, _dir: dir }
}

/// A deterministic pattern that differs per offset, so misplaced data is caught.
fn pattern(offset: u64, len: usize) -> Vec<u8> {
    (0..len as u64).map(|i| ((offset + i).wrapping_mul(2654435761) >> 13) as u8).collect()
}

#[test]
fn patterns_at_many_offsets_and_sizes_read_back() {
    let b = backend(&[]);
    let mut client = BlkioClient::connect(&b.socket, 1).unwrap();
    assert_eq!(client.capacity().unwrap(), DISK);
    assert!(!client.read_only().unwrap());
    let sizes = [512usize, 4096, 8192 + 512, 65536, 1 << 20];
    let mut written = Vec::new();
    for (i, size) in sizes.iter().cycle().take(25).enumerate() {
        // Spread over the disk, 512-aligned, including the very last bytes.
        let offset = if i == 24 { DISK - *size as u64 } else { (i as u64 * 1_299_709 * 512) % (DISK - (1 << 20)) };
        let data = pattern(offset, *size);
        client.write(0, offset, &data).unwrap();
        written.push((offset, data));
    }
    client.flush(0).unwrap();
    let image = std::fs::read(&b.image).unwrap();
    // Later writes may overlap earlier ones: compare against the final state.
    let mut expected = vec![0u8; DISK as usize];
    for (offset, data) in &written {
        expected[*offset as usize..*offset as usize + data.len()].copy_from_slice(data);
    }
    for (offset, data) in &written {
        let range = *offset as usize..*offset as usize + data.len();
        assert_eq!(client.read(0, *offset, data.len()).unwrap(), expected[range.clone()], "read back at {offset}");
        assert_eq!(&image[range.clone()], &expected[range], "on the image at {offset}");
    }
    assert!(image == expected, "nothing else on the image changed");
}

#[test]
fn discard_and_write_zeroes_read_back_zeros() {
    let b = backend(&[]);
    let mut client = BlkioClient::connect(&b.socket, 1).unwrap();
    let ones = vec![0xffu8; 1 << 20];
    for mib in 0..3u64 {
        client.write(0, mib << 20, &ones).unwrap();
    }
    client.discard(0, 0, 1 << 20).unwrap();
    client.write_zeroes(0, 1 << 20, 4096, true).unwrap();
    client.write_zeroes(0, (2 << 20) + 512, 1024, false).unwrap();
    assert!(client.read(0, 0, 1 << 20).unwrap().iter().all(|&b| b == 0), "discarded range");
    let second = client.read(0, 1 << 20, 8192).unwrap();
    assert!(second[..4096].iter().all(|&b| b == 0) && second[4096..].iter().all(|&b| b == 0xff));
    let third = client.read(0, 2 << 20, 2048).unwrap();
    assert!(third[..512].iter().all(|&b| b == 0xff));
    assert!(third[512..1536].iter().all(|&b| b == 0));
    assert!(third[1536..].iter().all(|&b| b == 0xff));
}

#[test]
fn read_only_disk_refuses_writes() {
    let b = backend(&["--read-only"]);
    std::fs::write(&b.image, pattern(0, DISK as usize)).unwrap();
    // The backend offers VIRTIO_BLK_F_RO, so libblkio refuses a read-write start.
    match BlkioClient::connect(&b.socket, 1) {
        Err(BlkioError::Setup { step: "start", message }) => assert!(message.contains("read-only"), "{message}"),
        Err(other) => panic!("unexpected error {other}"),
        Ok(_) => panic!("a read-write start on a read-only disk succeeded"),
    }
    let mut client = BlkioClient::connect_with(&b.socket, 1, true).unwrap();
    assert!(client.read_only().unwrap());
    assert!(matches!(client.write(0, 0, &[0u8; 512]), Err(BlkioError::Request { op: "write", .. })));
    assert_eq!(client.read(0, 4096, 4096).unwrap(), pattern(4096, 4096));
}

#[test]
fn multiple_queues_share_one_disk() {
    let b = backend(&["--num-queues", "4"]);
    let mut client = BlkioClient::connect(&b.socket, 4).unwrap();
    for q in 0..4usize {
        client.write(q, q as u64 * 65536, &pattern(q as u64, 65536)).unwrap();
    }
    for q in 0..4usize {
        // Read each queue's data back through a different queue.
        let via = (q + 1) % 4;
        assert_eq!(client.read(via, q as u64 * 65536, 65536).unwrap(), pattern(q as u64, 65536));
    }
    client.flush(3).unwrap();
}

#[test]
fn data_survives_a_reconnect() {
    let b = backend(&["--num-queues", "2"]);
    {
        let mut first = BlkioClient::connect(&b.socket, 2).unwrap();
        first.write(1, 12345 * 512, &pattern(7, 8192)).unwrap();
        first.flush(1).unwrap();
    }
    let mut second = BlkioClient::connect(&b.socket, 2).unwrap();
    assert_eq!(second.read(0, 12345 * 512, 8192).unwrap(), pattern(7, 8192));
    second.write(0, 0, &pattern(1, 512)).unwrap();
    drop(second);
    let mut third = BlkioClient::connect(&b.socket, 1).unwrap();
    assert_eq!(third.read(0, 0, 512).unwrap(), pattern(1, 512));
}

#[test]
fn memory_added_while_a_queue_is_polled_is_seen() {
    // libblkio adds its buffer region (ADD_MEM_REG) right after starting the device; with a long
    // polling window the queue worker is still polling from the start-up event when the first
    // request arrives, and must see the new region. Each round is a new connection whose rings
    // reuse the previous one's shared memory: the previous connection's worker, still inside
    // its polling window, must not serve them.
    let b = backend(&["--poll-us", "200000"]);
    for round in 0..5u64 {
        let mut client = BlkioClient::connect(&b.socket, 1).unwrap();
        client.write(0, round * 4096, &pattern(round, 4096)).unwrap();
        assert_eq!(client.read(0, round * 4096, 4096).unwrap(), pattern(round, 4096));
    }
}

#[test]
fn serves_an_inherited_listening_socket() {
    use std::os::unix::io::AsRawFd;
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img");
    std::fs::File::create(&image).unwrap().set_len(DISK).unwrap();
    let socket = dir.path().join("inherited.sock");
    let listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
    let fd = listener.as_raw_fd();
    // SAFETY: clearing FD_CLOEXEC on our own open descriptor so the child inherits it.
    assert_eq!(unsafe { libc::fcntl(fd, libc::F_SETFD, 0) }, 0);
    let mut child = ChildGuard::spawn(
        "vhost-user-blk",
        std::process::Command::new(env!("CARGO_BIN_EXE_vhost-user-blk"))
            .args(["--fd", &fd.to_string(), "--blk-file"])
            .arg(&image),
    )
    .unwrap();
    drop(listener);
    let mut client = BlkioClient::connect(&socket, 1).unwrap();
    client.write(0, 4096, &pattern(3, 4096)).unwrap();
    assert_eq!(client.read(0, 4096, 4096).unwrap(), pattern(3, 4096));
    drop(client);
    // It listens again on the same inherited socket.
    let mut again = BlkioClient::connect(&socket, 1).unwrap();
    assert_eq!(again.read(0, 4096, 4096).unwrap(), pattern(3, 4096));
    child.check_running().unwrap();
}
