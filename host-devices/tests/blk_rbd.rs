//! `vhost-user-blk --rbd` on a single-node Ceph cluster the test starts on loopback (one
//! monitor, one manager, one memstore OSD; started once for every check here, torn down
//! after): libblkio patterns on two queues, flush, discard and write-zeroes, the image let go
//! at SIGTERM, `rbd export` equal to what was written, a snapshot served read-only, a Linux guest's fio verify and
//! filesystem round trip, and images that do not exist refused at start.

mod common;

use pvkit_test_support::blkio_client::BlkioClient;
use pvkit_test_support::ceph::{Cluster, PROGRAMS};
use pvkit_test_support::facility;
use pvkit_test_support::linux_guest::LinuxGuest;
use pvkit_test_support::process::ChildGuard;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

const MIB: u64 = 1 << 20;
const DISK: u64 = 64 * MIB;

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| (i / 512) as u8 ^ (i as u8).wrapping_mul(11) ^ seed).collect()
}

fn backend(dir: &Path, cluster: &Cluster, spec: &str, extra: &[&str]) -> (ChildGuard, PathBuf) {
    let socket = dir.join(format!("{}.sock", spec.replace(['/', '@'], "-")));
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_vhost-user-blk"));
    cmd.arg("--socket-path").arg(&socket).args(["--rbd", spec, "--ceph-conf"]).arg(cluster.conf()).args(extra);
    let mut child = ChildGuard::spawn("vhost-user-blk", &mut cmd).unwrap();
    child.wait_for_socket(&socket, Duration::from_secs(30)).unwrap();
    (child, socket)
}

fn exported(cluster: &Cluster, dir: &Path, spec: &str) -> Vec<u8> {
    let file = dir.join(format!("{}.export", spec.replace(['/', '@'], "-")));
    cluster.rbd(&["export", spec, file.to_str().unwrap()]).unwrap();
    std::fs::read(file).unwrap()
}

#[test]
fn rbd_images_on_a_loopback_cluster() {
    let test = "blk_rbd";
    if !facility::require_programs(test, PROGRAMS) {
        return;
    }
    let cluster = Cluster::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    cluster.rbd(&["create", "--size", "64M", "rbd/disk"]).unwrap();

    // libblkio: patterns on two queues, flush, write-zeroes, discard; then rbd export.
    let (blk, socket) = backend(dir.path(), &cluster, "rbd/disk", &["--num-queues", "2"]);
    let mut client = BlkioClient::connect(&socket, 2).unwrap();
    assert_eq!(client.capacity().unwrap(), DISK);
    let mut expected = vec![0u8; DISK as usize];
    for (i, (offset, len)) in
        [(0, 4096), (5 * MIB + 512, MIB), (12 * MIB, 65536), (DISK - 8192, 8192)].into_iter().enumerate()
    {
        let data = pattern(len as usize, i as u8 + 1);
        client.write(i % 2, offset, &data).unwrap();
        expected[offset as usize..][..data.len()].copy_from_slice(&data);
        assert!(client.read(1 - i % 2, offset, data.len()).unwrap() == data, "{len} bytes at {offset}");
    }
    client.flush(0).unwrap();
    client.write_zeroes(0, 12 * MIB, 4096, false).unwrap();
    expected[(12 * MIB) as usize..][..4096].fill(0);
    client.discard(1, 40 * MIB, 4 * MIB).unwrap();
    assert_eq!(client.read(0, 12 * MIB, 4096).unwrap(), vec![0u8; 4096]);
    client.flush(1).unwrap();
    drop(client);
    // SIGTERM: the backend closes the image, so its lock and watch go at once (a backend on
    // another host could take the image over without waiting for them to time out).
    let log = blk.terminate(Duration::from_secs(10));
    assert!(log.contains("signal 15"), "{log}");
    let status = cluster.rbd(&["status", "rbd/disk"]).unwrap();
    assert!(status.contains("Watchers: none"), "the image is still watched after the backend left: {status}");
    assert!(exported(&cluster, dir.path(), "rbd/disk") == expected, "rbd export differs from what was written");

    // A snapshot is served read-only.
    cluster.rbd(&["snap", "create", "rbd/disk@gold"]).unwrap();
    let (_snap, socket) = backend(dir.path(), &cluster, "rbd/disk@gold", &[]);
    let mut client = BlkioClient::connect_with(&socket, 1, true).unwrap();
    assert!(client.read_only().unwrap());
    assert!(client.read(0, 5 * MIB, MIB as usize).unwrap() == expected[(5 * MIB) as usize..][..MIB as usize]);
    assert!(client.write(0, 0, &[1u8; 512]).is_err());
    drop(client);

    // A missing image is refused at start.
    let missing = Command::new(env!("CARGO_BIN_EXE_vhost-user-blk"))
        .args(["--socket-path", dir.path().join("x.sock").to_str().unwrap(), "--rbd", "rbd/nothing", "--ceph-conf"])
        .arg(cluster.conf())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&missing.stderr);
    assert!(!missing.status.success() && stderr.contains("cannot open rbd image rbd/nothing"), "{stderr}");

    // A Linux guest: fio verify and an ext2 round trip on two queues.
    if facility::require_programs("blk_rbd_linux_guest", &["qemu-system-x86_64", "apt-get"]) {
        cluster.rbd(&["create", "--size", "64M", "rbd/guest"]).unwrap();
        let (_blk, socket) = backend(dir.path(), &cluster, "rbd/guest", &["--num-queues", "2"]);
        let script = r#"
set -e
for i in $(seq 50); do [ -b /dev/vda ] && break; sleep 0.1; done
fio --name=verify --filename=/dev/vda --ioengine=libaio --direct=1 --iodepth=16 --numjobs=2 \
    --rw=randwrite --bs=4k --offset_increment=8M --size=8M --verify=crc32c --do_verify=1 --verify_fatal=1 \
    --group_reporting --output-format=terse --terse-version=3 | grep '^3;' > /tmp/fio.out
echo "FIO_ERRORS=$(cut -d';' -f5 /tmp/fio.out)"
mke2fs -q -F /dev/vda > /dev/null
mkdir -p /mnt/d
mount -t ext2 /dev/vda /mnt/d
dd if=/dev/urandom of=/mnt/d/blob bs=64k count=32 2>/dev/null
before=$(md5sum /mnt/d/blob | cut -d' ' -f1)
umount /mnt/d
echo 3 > /proc/sys/vm/drop_caches
mount -t ext2 /dev/vda /mnt/d
echo "FS_ROUND_TRIP=$([ "$before" = "$(md5sum /mnt/d/blob | cut -d' ' -f1)" ] && echo same || echo different)"
umount /mnt/d
echo "DISK_MD5=$(md5sum < /dev/vda | cut -d' ' -f1)"
"#;
        let run = LinuxGuest::new(script).vhost_user_blk(&socket, 2).cpus(2).run().unwrap();
        run.assert_passed();
        assert_eq!(run.values("FIO_ERRORS").next(), Some("0"), "{}", run.log);
        assert_eq!(run.values("FS_ROUND_TRIP").next(), Some("same"), "{}", run.log);
        let image = exported(&cluster, dir.path(), "rbd/guest");
        let file = dir.path().join("guest.image");
        std::fs::write(&file, image).unwrap();
        let md5 = Command::new("md5sum").arg(&file).output().unwrap();
        let host = String::from_utf8_lossy(&md5.stdout).split_whitespace().next().unwrap_or("").to_string();
        assert_eq!(run.values("DISK_MD5").next(), Some(host.as_str()), "rbd export is not what the guest saw");
        println!("blk_rbd: guest fio verify and ext2 round trip over RBD in {:.1} s", run.elapsed.as_secs_f64());
    }
}
