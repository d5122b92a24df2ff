//! vhost-user-blk against Linux's own virtio-blk driver (QEMU TCG guest): fio with crc32c
//! verification and a filesystem round trip, with one and with two queues.

mod common;

use pvkit_test_support::facility;
use pvkit_test_support::linux_guest::LinuxGuest;
use std::fs::File;
use std::process::Command;
use std::time::Duration;

const IMAGE_SIZE: u64 = 64 << 20;

const SCRIPT: &str = r#"
set -e
for i in $(seq 50); do [ -b /dev/vda ] && break; sleep 0.1; done
[ -b /dev/vda ] || { echo "no /dev/vda"; exit 10; }
echo "DISK_BYTES=$(blockdev --getsize64 /dev/vda)"
echo "QUEUES=$(ls /sys/block/vda/mq | wc -l)"
echo "SERIAL=$(cat /sys/block/vda/serial)"
fio --name=verify --filename=/dev/vda --ioengine=libaio --direct=1 --iodepth=16 --numjobs=2 \
    --rw=randwrite --bs=4k --offset_increment=8M --size=8M --verify=crc32c --do_verify=1 --verify_fatal=1 \
    --group_reporting --output-format=terse --terse-version=3 | grep '^3;' > /tmp/fio.out
echo "FIO_ERRORS=$(cut -d';' -f5 /tmp/fio.out)"
echo "FIO_WRITE_KB=$(cut -d';' -f47 /tmp/fio.out)"
# A filesystem round trip through the page cache and FLUSH.
mke2fs -q -F /dev/vda > /dev/null
mkdir -p /mnt/d
mount -t ext2 /dev/vda /mnt/d
dd if=/dev/urandom of=/mnt/d/blob bs=64k count=64 2>/dev/null
before=$(md5sum /mnt/d/blob | cut -d' ' -f1)
sync
umount /mnt/d
echo 3 > /proc/sys/vm/drop_caches
mount -t ext2 /dev/vda /mnt/d
after=$(md5sum /mnt/d/blob | cut -d' ' -f1)
umount /mnt/d
echo "FS_ROUND_TRIP=$([ "$before" = "$after" ] && echo same || echo different)"
echo "FS_MD5=$after"
"#;

/// A second boot on the same backend process: the file system from the first is still there.
const SECOND_BOOT: &str = r#"
set -e
for i in $(seq 50); do [ -b /dev/vda ] && break; sleep 0.1; done
mkdir -p /mnt/d
mount -t ext2 -o ro /dev/vda /mnt/d
echo "FS_MD5=$(md5sum /mnt/d/blob | cut -d' ' -f1)"
umount /mnt/d
"#;

fn run_guest(queues: u16) {
    let test = format!("blk_linux_guest_{queues}q");
    if !facility::require_programs(&test, &["qemu-system-x86_64", "apt-get"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img");
    File::create(&image).unwrap().set_len(IMAGE_SIZE).unwrap();
    let queue_arg = queues.to_string();
    let (mut backend, socket) =
        common::start_blk(dir.path(), &image, &["--num-queues", &queue_arg, "--serial", "pvkit-e2e"]);

    let run = LinuxGuest::new(SCRIPT).vhost_user_blk(&socket, queues).cpus(queues.into()).run().unwrap();
    println!("{test}: guest finished in {:.1} s", run.elapsed.as_secs_f64());
    run.assert_passed();
    std::thread::sleep(Duration::from_millis(200));
    backend.check_running().expect("the backend survived the guest and listens again");
    assert_eq!(run.values("DISK_BYTES").next(), Some(IMAGE_SIZE.to_string().as_str()));
    assert_eq!(run.values("QUEUES").next(), Some(queues.to_string().as_str()));
    assert_eq!(run.values("SERIAL").next(), Some("pvkit-e2e"));
    assert_eq!(run.values("FIO_ERRORS").next(), Some("0"));
    assert_eq!(run.values("FIO_WRITE_KB").next(), Some("16384"));
    assert_eq!(run.values("FS_ROUND_TRIP").next(), Some("same"));
    // The filesystem reached the image: ext2's superblock magic 0xEF53 at byte 1024 + 56.
    let data = std::fs::read(&image).unwrap();
    assert_eq!(&data[1024 + 56..1024 + 58], &[0x53, 0xef], "ext2 superblock on the host image");
    assert!(socket.exists(), "still listening for the next frontend");

    if queues == 1 {
        // Reconnect: a new frontend on the same backend process sees the same disk.
        let again = LinuxGuest::new(SECOND_BOOT).vhost_user_blk(&socket, 1).run().unwrap();
        again.assert_passed();
        let first: Vec<_> = run.values("FS_MD5").collect();
        assert_eq!(again.values("FS_MD5").collect::<Vec<_>>(), first, "data survives a reconnect");
        backend.check_running().unwrap();
    }
}

/// fio verify and a filesystem round trip on a qcow2 overlay of a raw base, two queues: the
/// overlay stays consistent for qemu-img, the base is unchanged, and the overlay converted to
/// raw is the disk the guest saw at the end (its md5, read by the guest itself).
#[test]
fn linux_guest_on_a_qcow2_overlay() {
    let test = "blk_linux_guest_qcow2";
    if !facility::require_programs(test, &["qemu-system-x86_64", "apt-get", "qemu-img"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.raw");
    std::fs::write(&base, (0..IMAGE_SIZE).map(|i| (i % 251) as u8).collect::<Vec<_>>()).unwrap();
    let overlay = dir.path().join("overlay.qcow2");
    let (base_path, overlay_path) = (base.to_str().unwrap(), overlay.to_str().unwrap());
    common::qemu_img(&["create", "-q", "-f", "qcow2", "-b", base_path, "-F", "raw", overlay_path]);
    let before = std::fs::read(&base).unwrap();
    let args = ["--format", "qcow2", "--allow-backing", "--num-queues", "2", "--serial", "pvkit-e2e"];
    let (backend, socket) = common::start_blk(dir.path(), &overlay, &args);
    let script = SCRIPT.to_string() + "echo \"DISK_MD5=$(md5sum < /dev/vda | cut -d' ' -f1)\"\n";
    let run = LinuxGuest::new(&script).vhost_user_blk(&socket, 2).cpus(2).run().unwrap();
    drop(backend);
    println!("{test}: guest finished in {:.1} s", run.elapsed.as_secs_f64());
    run.assert_passed();
    assert_eq!(run.values("DISK_BYTES").next(), Some(IMAGE_SIZE.to_string().as_str()));
    assert_eq!(run.values("FIO_ERRORS").next(), Some("0"));
    assert_eq!(run.values("FS_ROUND_TRIP").next(), Some("same"));
    let check = common::qemu_img(&["check", overlay_path]);
    assert!(check.contains("No errors were found"), "{check}");
    assert!(std::fs::read(&base).unwrap() == before, "the base changed");
    let raw = common::as_raw(&overlay, "qcow2");
    let md5 = Command::new("md5sum")
        .stdin(std::fs::File::open(overlay.with_extension("converted.raw")).unwrap())
        .output()
        .unwrap();
    let host_md5 = String::from_utf8_lossy(&md5.stdout).split_whitespace().next().unwrap_or("").to_string();
    assert_eq!(raw.len() as u64, IMAGE_SIZE);
    assert_eq!(run.values("DISK_MD5").next(), Some(host_md5.as_str()), "the overlay converts to what the guest saw");
}

/// fio verify and a filesystem round trip on an NBD export (nbdkit's memory plugin), two
/// queues sharing the one connection.
#[test]
fn linux_guest_over_nbd() {
    let test = "blk_linux_guest_nbd";
    if !facility::require_programs(test, &["qemu-system-x86_64", "apt-get", "nbdkit"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let nbd_socket = dir.path().join("nbdkit.sock");
    let mut nbdkit = Command::new("nbdkit");
    nbdkit.args(["--foreground", "--exit-with-parent", "--unix"]).arg(&nbd_socket);
    nbdkit.args(["memory", &format!("size={IMAGE_SIZE}")]);
    let mut server = pvkit_test_support::process::ChildGuard::spawn("nbdkit", &mut nbdkit).unwrap();
    server.wait_for_socket(&nbd_socket, Duration::from_secs(10)).unwrap();
    let uri = format!("nbd+unix:///?socket={}", nbd_socket.display());
    let socket = dir.path().join("blk.sock");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_vhost-user-blk"));
    cmd.arg("--socket-path").arg(&socket).args(["--nbd", &uri, "--num-queues", "2", "--serial", "pvkit-e2e"]);
    let mut backend = pvkit_test_support::process::ChildGuard::spawn("vhost-user-blk", &mut cmd).unwrap();
    backend.wait_for_socket(&socket, Duration::from_secs(10)).unwrap();
    let run = LinuxGuest::new(SCRIPT).vhost_user_blk(&socket, 2).cpus(2).run().unwrap();
    println!("{test}: guest finished in {:.1} s", run.elapsed.as_secs_f64());
    run.assert_passed();
    assert_eq!(run.values("DISK_BYTES").next(), Some(IMAGE_SIZE.to_string().as_str()));
    assert_eq!(run.values("FIO_ERRORS").next(), Some("0"));
    assert_eq!(run.values("FIO_WRITE_KB").next(), Some("16384"));
    assert_eq!(run.values("FS_ROUND_TRIP").next(), Some("same"));
    backend.check_running().unwrap();
}

#[test]
fn linux_guest_one_queue() {
    run_guest(1);
}

#[test]
fn linux_guest_two_queues() {
    run_guest(2);
}
