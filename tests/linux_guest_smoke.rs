//! Proves the Linux-guest harness end to end against an independent backend: a Debian kernel
//! under QEMU (TCG) sees a disk served by qemu-storage-daemon's vhost-user-blk export, writes
//! and verifies data with `fio --verify=crc32c`, and the data is on the host's image file.

use pvkit_test_support::facility;
use pvkit_test_support::linux_guest::LinuxGuest;
use pvkit_test_support::peers::{QemuStorageDaemon, QsdDisk};
use std::fs::File;
use std::time::Duration;

const IMAGE_SIZE: u64 = 64 << 20;
const FIO_SIZE: u64 = 16 << 20;

const SCRIPT: &str = r#"
set -e
for i in $(seq 50); do [ -b /dev/vda ] && break; sleep 0.1; done
[ -b /dev/vda ] || { echo "no /dev/vda"; ls /dev; exit 10; }
echo "DISK_BYTES=$(blockdev --getsize64 /dev/vda)"
fio --name=smoke --filename=/dev/vda --ioengine=libaio --direct=1 --iodepth=16 \
    --rw=randwrite --bs=4k --size=16M --verify=crc32c --do_verify=1 --verify_fatal=1 \
    --output-format=terse --terse-version=3 > /tmp/fio.out
cat /tmp/fio.out
# Terse v3 fields: 5 = error code, 6 = read I/O in KiB (the verify pass), 47 = write I/O in KiB.
echo "FIO_READ_KB=$(cut -d';' -f6 /tmp/fio.out)"
echo "FIO_WRITE_KB=$(cut -d';' -f47 /tmp/fio.out)"
echo "FIO_ERRORS=$(cut -d';' -f5 /tmp/fio.out)"
"#;

#[test]
fn linux_guest_verifies_data_on_qemu_storage_daemon_disk() {
    if !facility::require_programs("linux_guest_smoke", &["qemu-system-x86_64", "qemu-storage-daemon", "apt-get"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img");
    File::create(&image).unwrap().set_len(IMAGE_SIZE).unwrap();
    let socket = dir.path().join("qsd.sock");
    let mut qsd = QemuStorageDaemon::start(&QsdDisk::File(image.clone()), &socket, 1, true).unwrap();

    let run = LinuxGuest::new(SCRIPT).vhost_user_blk(&socket, 1).timeout(Duration::from_secs(300)).run().unwrap();
    println!("guest finished in {:.1} s", run.elapsed.as_secs_f64());
    run.assert_passed();
    qsd.check_running().expect("qemu-storage-daemon survived the guest");

    assert_eq!(run.values("DISK_BYTES").next(), Some(IMAGE_SIZE.to_string().as_str()), "guest sees the export's size");
    let read: u64 = run.values("FIO_READ_KB").next().and_then(|v| v.parse().ok()).expect("fio reported reads");
    assert_eq!(read, FIO_SIZE / 1024, "fio read the whole range back to verify it");
    let written: u64 = run.values("FIO_WRITE_KB").next().and_then(|v| v.parse().ok()).expect("fio reported writes");
    assert_eq!(written, FIO_SIZE / 1024, "fio wrote the whole range");
    assert_eq!(run.values("FIO_ERRORS").next(), Some("0"), "fio saw no errors");

    // The guest's writes went through qemu-storage-daemon into the file: the region fio wrote
    // holds its data, everything after it is still zero.
    let data = std::fs::read(&image).unwrap();
    let nonzero_blocks = data[..FIO_SIZE as usize].chunks(4096).filter(|b| b.iter().any(|&x| x != 0)).count();
    assert_eq!(nonzero_blocks, (FIO_SIZE / 4096) as usize, "every 4 KiB block fio wrote reached the image");
    assert!(data[FIO_SIZE as usize..].iter().all(|&b| b == 0), "nothing was written past the fio range");
}

#[test]
fn linux_guest_reports_a_failing_script_with_its_code() {
    if !facility::require_programs("linux_guest_failure", &["qemu-system-x86_64", "apt-get"]) {
        return;
    }
    let run = LinuxGuest::new("echo GREETING=$(cat /pvkit/greeting)\nexit 7\n")
        .file("greeting", 0o644, "hello from the host")
        .memory_mib(512)
        .run()
        .unwrap();
    assert_eq!(run.rc, Some(7), "log:\n{}", run.log);
    assert!(!run.passed());
    assert_eq!(run.values("GREETING").next(), Some("hello from the host"));
}
