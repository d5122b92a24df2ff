//! Live migration of a QEMU guest whose disk pvkit serves: a source and a destination QEMU
//! (TCG) on this host, each with its own vhost-user-blk process on the same image (shared
//! storage). The guest runs fio with crc32c verification in a loop while it is migrated over a
//! unix socket; it must finish on the destination with every fio run clean and a region it
//! wrote before the migration unchanged after it. Migration needs the backend's dirty-page
//! log (LOG_SHMFD): without it QEMU refuses to start.

mod common;

use pvkit_test_support::facility;
use pvkit_test_support::linux_guest::LinuxGuest;
use std::fs::File;
use std::time::Duration;

const SCRIPT: &str = r#"
for i in $(seq 50); do [ -b /dev/vda ] && break; sleep 0.1; done
[ -b /dev/vda ] || { echo "no /dev/vda"; exit 10; }
dd if=/dev/urandom of=/tmp/region bs=1M count=4 2>/dev/null
dd if=/tmp/region of=/dev/vda bs=1M seek=56 count=4 oflag=direct conv=fsync 2>/dev/null
echo "REGION_BEFORE=$(dd if=/dev/vda bs=1M skip=56 count=4 iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)"
rc=0
for run in 1 2 3 4 5 6; do
    fio --name=verify --filename=/dev/vda --ioengine=libaio --direct=1 --iodepth=16 \
        --rw=randwrite --bs=4k --size=24M --verify=crc32c --do_verify=1 --verify_fatal=1 \
        --output-format=terse --terse-version=3 > /tmp/fio.out 2>&1 || rc=1
    echo "FIO_RUN=$run errors=$(grep '^3;' /tmp/fio.out | cut -d';' -f5)"
done
echo "REGION_AFTER=$(dd if=/dev/vda bs=1M skip=56 count=4 iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)"
exit $rc
"#;

#[test]
fn a_guest_migrates_while_fio_verifies_its_disk() {
    if !facility::require_programs("blk_migration", &["qemu-system-x86_64", "apt-get"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img");
    File::create(&image).unwrap().set_len(64 << 20).unwrap();
    let source_dir = dir.path().join("source");
    let dest_dir = dir.path().join("destination");
    std::fs::create_dir_all(&source_dir).unwrap();
    std::fs::create_dir_all(&dest_dir).unwrap();
    let (mut source_backend, source_socket) = common::start_blk(&source_dir, &image, &[]);
    let (mut dest_backend, dest_socket) = common::start_blk(&dest_dir, &image, &[]);

    let run = LinuxGuest::new(SCRIPT)
        .vhost_user_blk(&source_socket, 1)
        .memory_mib(512)
        .migrate_to(vec![dest_socket.clone()], Duration::from_secs(8))
        .timeout(Duration::from_secs(300))
        .run()
        .unwrap();
    println!("migration: {}", run.migration.as_deref().unwrap_or("none"));
    println!("guest finished in {:.1} s", run.elapsed.as_secs_f64());
    run.assert_passed();
    let runs: Vec<&str> = run.values("FIO_RUN").collect();
    assert_eq!(runs.len(), 6, "{runs:?}");
    assert!(runs.iter().all(|r| r.ends_with("errors=0")), "{runs:?}");
    let before = run.values("REGION_BEFORE").next().unwrap();
    assert_eq!(run.values("REGION_AFTER").next(), Some(before), "the region written before migrating changed");
    assert!(run.migration.as_deref().is_some_and(|m| m.contains("completed")));
    source_backend.check_running().unwrap();
    dest_backend.check_running().unwrap();
}
