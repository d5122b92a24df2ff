//! qcow2 images served by `vhost-user-blk --format qcow2`, made and checked by QEMU's own
//! `qemu-img`, driven by libblkio: standalone images, overlays on qcow2 and raw backing files,
//! read-only chains, discard and write-zeroes freeing clusters, and the images and chains the
//! backend must refuse.

mod common;

use common::{as_raw, qemu_img};
use pvkit_test_support::blkio_client::BlkioClient;
use pvkit_test_support::facility;
use pvkit_test_support::process::ChildGuard;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

const MIB: u64 = 1 << 20;
const DISK: u64 = 64 * MIB;

fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A pattern that differs from block to block and image to image (`seed`).
fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| (i / 512) as u8 ^ (i as u8).wrapping_mul(7) ^ seed).collect()
}

/// A raw file of `DISK` bytes holding `pattern(DISK, seed)`.
fn raw_file(dir: &Path, name: &str, seed: u8) -> PathBuf {
    let file = dir.join(name);
    std::fs::write(&file, pattern(DISK as usize, seed)).unwrap();
    file
}

fn digest(file: &Path) -> Vec<u8> {
    std::fs::read(file).unwrap()
}

fn backend_command(socket: &Path, image: &Path, extra: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_vhost-user-blk"));
    cmd.arg("--socket-path").arg(socket).arg("--blk-file").arg(image).args(["--format", "qcow2"]).args(extra);
    cmd
}

/// Starts the backend on `image` as qcow2 with `extra` arguments.
fn serve(dir: &Path, image: &Path, extra: &[&str]) -> (ChildGuard, PathBuf) {
    let socket = dir.join("blk.sock");
    let mut child = ChildGuard::spawn("vhost-user-blk", &mut backend_command(&socket, image, extra)).unwrap();
    child.wait_for_socket(&socket, Duration::from_secs(10)).unwrap();
    (child, socket)
}

/// What the backend says when it refuses to start on `image` with `extra` arguments (it must
/// exit, with a failure, within ten seconds).
fn refusal(dir: &Path, image: &Path, extra: &[&str]) -> String {
    let mut child =
        backend_command(&dir.join("refused.sock"), image, extra).stderr(std::process::Stdio::piped()).spawn().unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("the backend started on {} with {extra:?}", image.display());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    assert!(!out.status.success(), "it exited 0");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn ready(test: &str) -> bool {
    facility::require_programs(test, &["qemu-img"])
}

/// Turns the backing-format header extension of the qcow2 image `image` into one of an unknown
/// type, which readers skip: the image then names its backing file without a format (as images
/// written by old tools do; today's qemu-img refuses to make one).
fn forget_backing_format(image: &Path) {
    const BACKING_FORMAT: u32 = 0xe279_2aca;
    let mut bytes = std::fs::read(image).unwrap();
    let be32 = |b: &[u8], at: usize| u32::from_be_bytes(b[at..at + 4].try_into().unwrap());
    let mut at = be32(&bytes, 100) as usize;
    loop {
        let (kind, len) = (be32(&bytes, at), be32(&bytes, at + 4) as usize);
        assert_ne!(kind, 0, "no backing-format extension in {}", image.display());
        if kind == BACKING_FORMAT {
            bytes[at..at + 4].copy_from_slice(&0x7076_6b74u32.to_be_bytes());
            break;
        }
        at += 8 + len.div_ceil(8) * 8;
    }
    std::fs::write(image, bytes).unwrap();
}

/// Writes across a fresh qcow2 image, reads it back, and leaves an image qemu-img finds clean
/// and whose contents are what was written.
#[test]
fn a_qcow2_image_round_trips_and_stays_consistent() {
    let test = "blk_qcow2_round_trip";
    if !ready(test) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", path(&image), &DISK.to_string()]);
    let (backend, socket) = serve(dir.path(), &image, &["--num-queues", "2"]);
    let mut client = BlkioClient::connect(&socket, 2).unwrap();
    assert_eq!(client.capacity().unwrap(), DISK);
    let mut expected = vec![0u8; DISK as usize];
    for (i, offset) in [0, 65536, 3 * MIB + 4096, DISK - 8192].into_iter().enumerate() {
        let data = pattern(8192, i as u8 + 1);
        client.write(i % 2, offset, &data).unwrap();
        expected[offset as usize..offset as usize + data.len()].copy_from_slice(&data);
        assert_eq!(client.read(1 - i % 2, offset, data.len()).unwrap(), data);
    }
    assert_eq!(client.read(0, 10 * MIB, 4096).unwrap(), vec![0u8; 4096], "unwritten: zeros");
    client.flush(0).unwrap();
    drop(client);
    drop(backend);
    let check = qemu_img(&["check", path(&image)]);
    assert!(check.contains("No errors were found"), "{check}");
    assert!(as_raw(&image, "qcow2") == expected, "qemu-img convert does not give what was written");
}

/// An overlay on a qcow2 base and one on a raw base: reads show the base, writes land in the
/// overlay only (the base is unchanged), and the overlay converts to base plus writes. Without
/// --allow-backing, or with the base outside the allowed directories, the backend refuses.
#[test]
fn overlays_read_their_backing_file_and_never_write_it() {
    let test = "blk_qcow2_overlay";
    if !ready(test) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let raw_base = raw_file(dir.path(), "base.raw", 0x5a);
    let qcow2_base = dir.path().join("base.qcow2");
    qemu_img(&["convert", "-q", "-f", "raw", "-O", "qcow2", path(&raw_base), path(&qcow2_base)]);
    for (base, format) in [(&qcow2_base, "qcow2"), (&raw_base, "raw")] {
        let overlay = dir.path().join(format!("overlay-on-{format}.qcow2"));
        qemu_img(&["create", "-q", "-f", "qcow2", "-b", path(base), "-F", format, path(&overlay)]);
        let refused = refusal(dir.path(), &overlay, &[]);
        assert!(refused.contains("--allow-backing"), "served a backing file without --allow-backing: {refused}");
        let elsewhere = tempfile::tempdir().unwrap();
        let refused = refusal(dir.path(), &overlay, &["--allow-backing", "--backing-dir", path(elsewhere.path())]);
        assert!(refused.contains("outside the allowed directories"), "{refused}");

        let before = digest(base);
        let (backend, socket) = serve(dir.path(), &overlay, &["--allow-backing"]);
        let mut client = BlkioClient::connect(&socket, 1).unwrap();
        let mut expected = pattern(DISK as usize, 0x5a);
        assert!(client.read(0, 5 * MIB, 65536).unwrap() == expected[5 * MIB as usize..][..65536], "the base shows");
        let data = pattern(12288, 0x33);
        client.write(0, 5 * MIB + 2048, &data).unwrap();
        expected[(5 * MIB + 2048) as usize..][..data.len()].copy_from_slice(&data);
        assert!(client.read(0, 5 * MIB, 65536).unwrap() == expected[5 * MIB as usize..][..65536], "base + write");
        client.flush(0).unwrap();
        drop(client);
        drop(backend);
        assert!(digest(base) == before, "the {format} base changed");
        let check = qemu_img(&["check", path(&overlay)]);
        assert!(check.contains("No errors were found"), "{check}");
        assert!(as_raw(&overlay, "qcow2") == expected, "the overlay on {format} converts to something else");
    }
}

/// A read-only overlay chain serves reads and refuses writes.
#[test]
fn a_read_only_chain_serves_reads() {
    let test = "blk_qcow2_read_only";
    if !ready(test) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let base = raw_file(dir.path(), "base.raw", 0x21);
    let middle = dir.path().join("middle.qcow2");
    let top = dir.path().join("top.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", "-b", path(&base), "-F", "raw", path(&middle)]);
    qemu_img(&["create", "-q", "-f", "qcow2", "-b", path(&middle), "-F", "qcow2", path(&top)]);
    let (_backend, socket) = serve(dir.path(), &top, &["--allow-backing", "--read-only"]);
    let mut client = BlkioClient::connect_with(&socket, 1, true).unwrap();
    assert!(client.read_only().unwrap());
    let expected = pattern(DISK as usize, 0x21);
    assert!(client.read(0, 7 * MIB, 32768).unwrap() == expected[7 * MIB as usize..][..32768]);
    assert!(client.write(0, 0, &[1u8; 512]).is_err(), "a write to a read-only disk succeeded");
}

/// Discard and write-zeroes with unmap free the clusters they cover (qemu-img map shows them
/// as zeros, not data), and the range reads back as zeros.
#[test]
fn discard_and_write_zeroes_free_clusters() {
    let test = "blk_qcow2_discard";
    if !ready(test) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", path(&image), &DISK.to_string()]);
    let (backend, socket) = serve(dir.path(), &image, &[]);
    let mut client = BlkioClient::connect(&socket, 1).unwrap();
    for offset in [0, MIB, 8 * MIB, 9 * MIB, 16 * MIB, 17 * MIB] {
        client.write(0, offset, &pattern(MIB as usize, 9)).unwrap();
    }
    client.discard(0, 8 * MIB, 2 * MIB).unwrap();
    client.write_zeroes(0, 16 * MIB, 2 * MIB, true).unwrap();
    for offset in [8 * MIB, 16 * MIB] {
        assert_eq!(client.read(0, offset, 65536).unwrap(), vec![0u8; 65536]);
    }
    client.flush(0).unwrap();
    drop(client);
    drop(backend);
    let map = qemu_img(&["map", "--output=json", path(&image)]);
    let entries: serde_json::Value = serde_json::from_str(&map).unwrap();
    let data_at = |offset: u64| {
        entries.as_array().unwrap().iter().any(|e| {
            let (start, length) = (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap());
            e["data"] == true && start <= offset && offset < start + length
        })
    };
    assert!(data_at(MIB), "the written range holds data: {map}");
    assert!(!data_at(9 * MIB), "the discarded range still holds data: {map}");
    assert!(!data_at(17 * MIB), "the zeroed range still holds data: {map}");
    let check = qemu_img(&["check", path(&image)]);
    assert!(check.contains("No errors were found"), "{check}");
}

/// Images the backend must refuse at start, with a message: a truncated image, one whose
/// header says it is corrupt, a chain that loops, a backing file without a format. And a raw
/// image that looks like qcow2 stays raw unless qcow2 is asked for.
#[test]
fn broken_images_and_chains_are_refused_and_raw_stays_raw() {
    let test = "blk_qcow2_refused";
    if !ready(test) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let truncated = dir.path().join("truncated.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", path(&truncated), &DISK.to_string()]);
    std::fs::OpenOptions::new().write(true).open(&truncated).unwrap().set_len(100).unwrap();
    let refused = refusal(dir.path(), &truncated, &[]);
    assert!(refused.contains("cannot open qcow2 image"), "{refused}");

    let corrupt = dir.path().join("corrupt.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", path(&corrupt), &DISK.to_string()]);
    // The incompatible-features word (header offset 72), bit 1: "corrupt".
    let file = std::fs::OpenOptions::new().write(true).open(&corrupt).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&file, &2u64.to_be_bytes(), 72).unwrap();
    let refused = refusal(dir.path(), &corrupt, &[]);
    assert!(refused.contains("cannot open qcow2 image") && refused.contains("corrupt"), "{refused}");

    let (a, b) = (dir.path().join("a.qcow2"), dir.path().join("b.qcow2"));
    qemu_img(&["create", "-q", "-f", "qcow2", path(&a), &DISK.to_string()]);
    qemu_img(&["create", "-q", "-f", "qcow2", "-b", path(&a), "-F", "qcow2", path(&b)]);
    qemu_img(&["rebase", "-u", "-b", path(&b), "-F", "qcow2", path(&a)]);
    let refused = refusal(dir.path(), &b, &["--allow-backing"]);
    assert!(refused.contains("loops"), "{refused}");

    let unnamed = dir.path().join("unnamed-format.qcow2");
    let base = dir.path().join("base.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", path(&base), &DISK.to_string()]);
    qemu_img(&["create", "-q", "-f", "qcow2", "-b", path(&base), "-F", "qcow2", path(&unnamed)]);
    forget_backing_format(&unnamed);
    let refused = refusal(dir.path(), &unnamed, &["--allow-backing"]);
    assert!(refused.contains("refusing to guess"), "{refused}");

    let looks_like = dir.path().join("raw-with-a-qcow2-header.img");
    qemu_img(&["create", "-q", "-f", "qcow2", path(&looks_like), &DISK.to_string()]);
    let header = std::fs::read(&looks_like).unwrap()[..512].to_vec();
    std::fs::OpenOptions::new().write(true).open(&looks_like).unwrap().set_len(DISK).unwrap();
    let (backend, socket) = common::start_blk(dir.path(), &looks_like, &[]);
    let mut client = BlkioClient::connect(&socket, 1).unwrap();
    assert_eq!(client.capacity().unwrap(), DISK, "the file's size, not the qcow2 header's");
    assert_eq!(client.read(0, 0, 512).unwrap(), header, "the header's bytes, served raw");
    drop(client);
    let log = backend.terminate(Duration::from_secs(5));
    assert!(log.contains("starts like a qcow2 image but is served raw"), "{log}");
}
