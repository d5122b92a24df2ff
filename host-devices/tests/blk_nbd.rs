//! `vhost-user-blk --nbd` against two independent NBD servers, QEMU's `qemu-nbd` and
//! `nbdkit` (its memory plugin), driven by libblkio: patterns written and read back, flush,
//! discard, write-zeroes, a read-only export, the server restarted while requests wait, a
//! server that stays away (IOERR after the timeout), and features the export lacks not offered
//! to the guest.

mod common;

use pvkit_protocol::blk::feature as blkf;
use pvkit_protocol::virtio::{Features, feature as vf};
use pvkit_test_support::blkio_client::{BlkioClient, BlkioError};
use pvkit_test_support::facility;
use pvkit_test_support::process::ChildGuard;
use pvkit_test_support::vhost_frontend::TestFrontend;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;
const DISK: u64 = 64 * MIB;
const WAIT: Duration = Duration::from_secs(10);

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| (i / 512) as u8 ^ (i as u8).wrapping_mul(13) ^ seed).collect()
}

/// An NBD server on a unix socket in `dir`, killed on drop.
struct Server {
    _child: ChildGuard,
    uri: String,
}

/// `qemu-nbd` serving `image` (raw) as export "disk", `extra` arguments added.
fn qemu_nbd(dir: &Path, image: &Path, extra: &[&str]) -> Server {
    let socket = dir.join("qemu-nbd.sock");
    let _ = std::fs::remove_file(&socket);
    let mut cmd = Command::new("qemu-nbd");
    cmd.args(["-f", "raw", "-x", "disk", "-t", "--shared=8", "-k"]).arg(&socket).args(extra).arg(image);
    let mut child = ChildGuard::spawn("qemu-nbd", &mut cmd).unwrap();
    child.wait_for_socket(&socket, WAIT).unwrap();
    Server { _child: child, uri: format!("nbd+unix:///disk?socket={}", socket.display()) }
}

/// `nbdkit` serving a 64 MiB memory disk (export name ignored by nbdkit), with `extra`
/// arguments before the plugin (filters, -r).
fn nbdkit(dir: &Path, extra: &[&str]) -> Server {
    let socket = dir.join("nbdkit.sock");
    let _ = std::fs::remove_file(&socket);
    let mut cmd = Command::new("nbdkit");
    cmd.args(["--foreground", "--exit-with-parent", "--unix"]).arg(&socket).args(extra);
    cmd.args(["memory", &format!("size={DISK}")]);
    let mut child = ChildGuard::spawn("nbdkit", &mut cmd).unwrap();
    child.wait_for_socket(&socket, WAIT).unwrap();
    Server { _child: child, uri: format!("nbd+unix:///?socket={}", socket.display()) }
}

fn backend(dir: &Path, uri: &str, extra: &[&str]) -> (ChildGuard, PathBuf) {
    let socket = dir.join("blk.sock");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_vhost-user-blk"));
    cmd.arg("--socket-path").arg(&socket).args(["--nbd", uri]).args(extra);
    let mut child = ChildGuard::spawn("vhost-user-blk", &mut cmd).unwrap();
    child.wait_for_socket(&socket, WAIT).unwrap();
    (child, socket)
}

/// An empty raw image of `DISK` bytes in `dir`.
fn empty_image(dir: &Path) -> PathBuf {
    let image = dir.join("disk.img");
    std::fs::File::create(&image).unwrap().set_len(DISK).unwrap();
    image
}

fn ready(test: &str) -> bool {
    facility::require_programs(test, &["qemu-nbd", "nbdkit"])
}

/// Patterns at many offsets and sizes, two queues in turn, read back; flush; write-zeroes
/// reads back zeros; discard succeeds.
fn exercise(socket: &Path) {
    let mut client = BlkioClient::connect(socket, 2).unwrap();
    assert_eq!(client.capacity().unwrap(), DISK);
    for (i, (offset, len)) in
        [(0, 512), (4096, 65536), (3 * MIB + 512, MIB), (DISK - 4096, 4096)].into_iter().enumerate()
    {
        let data = pattern(len as usize, i as u8);
        client.write(i % 2, offset, &data).unwrap();
        assert!(client.read(1 - i % 2, offset, data.len()).unwrap() == data, "{len} bytes at {offset}");
    }
    client.flush(0).unwrap();
    client.write_zeroes(0, 4096, 65536, false).unwrap();
    assert_eq!(client.read(1, 4096, 65536).unwrap(), vec![0u8; 65536]);
    client.discard(0, 3 * MIB, MIB).unwrap();
}

#[test]
fn qemu_nbd_and_nbdkit_exports_round_trip() {
    let test = "blk_nbd_round_trip";
    if !ready(test) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let image = empty_image(dir.path());
    let server = qemu_nbd(dir.path(), &image, &[]);
    let (blk, socket) = backend(dir.path(), &server.uri, &["--num-queues", "2"]);
    exercise(&socket);
    drop(blk);
    let on_disk = std::fs::read(&image).unwrap();
    assert!(on_disk[(DISK - 4096) as usize..] == pattern(4096, 3)[..], "the write reached qemu-nbd's file");

    let server = nbdkit(dir.path(), &[]);
    let (_blk, socket) = backend(dir.path(), &server.uri, &["--num-queues", "2"]);
    exercise(&socket);
}

#[test]
fn read_only_exports_and_missing_features() {
    let test = "blk_nbd_features";
    if !ready(test) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img");
    std::fs::write(&image, pattern(DISK as usize, 7)).unwrap();
    let server = qemu_nbd(dir.path(), &image, &["-r"]);
    let (_blk, socket) = backend(dir.path(), &server.uri, &[]);
    let mut client = BlkioClient::connect_with(&socket, 1, true).unwrap();
    assert!(client.read_only().unwrap(), "a read-only export gives a read-only disk");
    assert!(client.read(0, 5 * MIB, 8192).unwrap() == pattern(DISK as usize, 7)[5 * MIB as usize..][..8192]);
    assert!(client.write(0, 0, &[0u8; 512]).is_err());
    drop(client);

    // nbdkit without write-zeroes (its nozero filter): the guest is not offered it.
    let dir = tempfile::tempdir().unwrap();
    let server = nbdkit(dir.path(), &["--filter=nozero"]);
    let (_blk, socket) = backend(dir.path(), &server.uri, &[]);
    let wanted = Features::from_bits(&[vf::VERSION_1, blkf::FLUSH, blkf::DISCARD, blkf::WRITE_ZEROES, blkf::RO]);
    let frontend = TestFrontend::connect(&socket, 4 * MIB, 1, 64, wanted.0).unwrap();
    let offered = Features(frontend.features);
    assert!(offered.has(blkf::FLUSH), "flush is offered: {offered:?}");
    assert!(!offered.has(blkf::WRITE_ZEROES), "nbdkit's nozero filter hides write-zeroes: {offered:?}");
    assert!(!offered.has(blkf::RO));
}

/// qemu-nbd is killed while the guest keeps writing; a new qemu-nbd on the same file comes
/// back after a second: the requests that waited succeed, nothing is lost. With the server
/// gone for good, a request fails with EIO once --nbd-timeout has passed, and the backend
/// goes on.
#[test]
fn a_server_restart_is_waited_out_and_a_lost_server_times_out() {
    let test = "blk_nbd_restart";
    if !ready(test) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let image = empty_image(dir.path());
    let server = qemu_nbd(dir.path(), &image, &[]);
    let (mut blk, socket) = backend(dir.path(), &server.uri, &["--nbd-timeout", "3"]);
    let mut client = BlkioClient::connect(&socket, 1).unwrap();
    client.write(0, 0, &pattern(65536, 1)).unwrap();
    drop(server);
    let restarter = {
        let (dir, image) = (dir.path().to_path_buf(), image.clone());
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_secs(1));
            qemu_nbd(&dir, &image, &[])
        })
    };
    let started = Instant::now();
    client.write(0, MIB, &pattern(65536, 2)).unwrap();
    let waited = started.elapsed();
    let server = restarter.join().unwrap();
    assert!(waited >= Duration::from_millis(800), "the write did not wait for the server ({waited:?})");
    assert!(client.read(0, 0, 65536).unwrap() == pattern(65536, 1));
    assert!(client.read(0, MIB, 65536).unwrap() == pattern(65536, 2));

    drop(server);
    let started = Instant::now();
    let failed = client.read(0, 0, 4096);
    let waited = started.elapsed();
    assert!(matches!(failed, Err(BlkioError::Request { ret, .. }) if ret == -libc::EIO), "{failed:?}");
    assert!(waited >= Duration::from_secs(2), "failed after {waited:?}, before the 3 s timeout");
    blk.check_running().unwrap();
    println!(
        "blk_nbd_restart: a write waited {:?} for qemu-nbd's restart; a lost server failed a read after {waited:?}",
        started.elapsed()
    );
}

#[test]
fn refused_exports_and_bad_uris_stop_the_backend_at_start() {
    let test = "blk_nbd_refused";
    if !ready(test) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let image = empty_image(dir.path());
    let server = qemu_nbd(dir.path(), &image, &[]);
    let wrong_export = server.uri.replace("/disk?", "/nothing?");
    for (uri, expected) in [
        (wrong_export.as_str(), "refused export 'nothing'"),
        ("nbd+unix:///disk?socket=/nonexistent.sock", "cannot open"),
        ("http://example/disk", "is not nbd://"),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_vhost-user-blk"))
            .args(["--socket-path", dir.path().join("x.sock").to_str().unwrap(), "--nbd", uri])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && stderr.contains(expected), "{uri}: {stderr}");
    }
    let both = Command::new(env!("CARGO_BIN_EXE_vhost-user-blk"))
        .args(["--socket-path", "/tmp/x.sock", "--nbd", &server.uri, "--blk-file"])
        .arg(&image)
        .output()
        .unwrap();
    assert!(!both.status.success() && String::from_utf8_lossy(&both.stderr).contains("cannot be used with"));
}
