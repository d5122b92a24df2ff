//! Fault injection seen from a Linux guest under QEMU (TCG): `vhost-user-blk` starts with a
//! rule that fails reads of one range of sectors. The guest writes that range, reads it with
//! O_DIRECT and must get an I/O error (and its kernel must log one for that sector), reads
//! elsewhere must succeed; then the test removes the rule through the API (`DELETE /faults`)
//! and the range must read back what was written before.

mod common;

use pvkit_test_support::facility;
use pvkit_test_support::http;
use pvkit_test_support::linux_guest::LinuxGuest;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

/// The range the rule covers: 16 KiB at 1 MiB.
const FIRST_SECTOR: u64 = 2048;
const END_SECTOR: u64 = 2080;
/// Where the guest says it is done with the faulty reads, and where the test says the rule is
/// gone (MiB).
const DONE_MIB: u64 = 8;
const CLEARED_MIB: u64 = 9;

const SCRIPT: &str = r#"
for i in $(seq 50); do [ -b /dev/vda ] && break; sleep 0.1; done
[ -b /dev/vda ] || { echo "no /dev/vda"; exit 10; }
dd if=/dev/urandom of=/tmp/region bs=4k count=4 2>/dev/null
dd if=/tmp/region of=/dev/vda bs=4k seek=256 count=4 oflag=direct conv=fsync 2>/dev/null || echo "WRITE=failed"
echo "BEFORE=$(md5sum < /tmp/region | cut -d' ' -f1)"
if dd if=/dev/vda of=/dev/null bs=4k skip=256 count=4 iflag=direct 2>/tmp/dd.err; then
    echo "FAULTY_READ=succeeded"
else
    echo "FAULTY_READ=failed: $(tail -1 /tmp/dd.err)"
fi
if dd if=/dev/vda of=/dev/null bs=4k skip=1024 count=4 iflag=direct 2>/dev/null; then
    echo "OTHER_READ=succeeded"
else
    echo "OTHER_READ=failed"
fi
echo "KERNEL_LOG=$(dmesg | grep -i 'i/o error' | head -1)"
printf DONE | dd of=/dev/vda bs=512 seek=$((8 * 2048)) count=1 conv=sync oflag=direct 2>/dev/null
for i in $(seq 600); do
    [ "$(dd if=/dev/vda bs=512 skip=$((9 * 2048)) count=1 iflag=direct 2>/dev/null | head -c 7)" = CLEARED ] && break
    sleep 0.1
done
echo "AFTER=$(dd if=/dev/vda bs=4k skip=256 count=4 iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)"
"#;

#[test]
fn a_guest_sees_injected_read_errors_on_one_range_and_its_data_after_the_rule_is_removed() {
    if !facility::require_programs("services_guest_blk", &["qemu-system-x86_64", "apt-get"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img");
    File::create(&image).unwrap().set_len(16 << 20).unwrap();
    let api = dir.path().join("api.sock");
    let rule = format!("op=read,sectors={FIRST_SECTOR}-{END_SECTOR},action=ioerr");
    let (_backend, socket) =
        common::start_blk(dir.path(), &image, &["--api-socket", api.to_str().unwrap(), "--fault", &rule]);
    let guest = std::thread::spawn(move || {
        LinuxGuest::new(SCRIPT).vhost_user_blk(&socket, 1).memory_mib(512).timeout(Duration::from_secs(300)).run()
    });
    let marker = |mib: u64| {
        let mut bytes = [0u8; 4];
        File::open(&image).unwrap().read_exact_at(&mut bytes, mib << 20).unwrap();
        bytes
    };
    let waited = Instant::now();
    while &marker(DONE_MIB) != b"DONE" {
        assert!(
            waited.elapsed() < Duration::from_secs(280) && !guest.is_finished(),
            "the guest never got past its reads"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let faults = http::unix(&api, "GET", "/faults", "").unwrap().json();
    assert!(faults["rules"][0]["injected"].as_u64() >= Some(1), "{faults}");
    assert_eq!(http::unix(&api, "DELETE", "/faults", "").unwrap().status, 200);
    File::options().write(true).open(&image).unwrap().write_all_at(b"CLEARED", CLEARED_MIB << 20).unwrap();
    let run = guest.join().unwrap().unwrap();
    run.assert_passed();
    let value = |key: &str| run.values(key).next().unwrap_or_default().to_string();
    assert!(
        value("FAULTY_READ").starts_with("failed") && value("FAULTY_READ").contains("Input/output error"),
        "{}",
        run.log
    );
    assert_eq!(value("OTHER_READ"), "succeeded", "{}", run.log);
    let kernel = value("KERNEL_LOG");
    assert!(kernel.contains("vda") && kernel.contains(&format!("sector {FIRST_SECTOR}")), "{kernel}\n{}", run.log);
    assert_eq!(value("AFTER"), value("BEFORE"), "{}", run.log);
    println!("guest: {}; injected {}", kernel.trim(), faults["rules"][0]["injected"]);
}

/// fio in a Linux guest sees a delay rule in its completion latency: reads of the first 4 MiB
/// are held 20 ms each, reads elsewhere are not. The same backend tears the guest's writes at
/// 6 MiB after 2 KiB: the guest's write fails, and the image holds exactly that prefix.
#[test]
fn a_delay_rule_shows_in_fio_completion_latency_and_a_torn_write_leaves_its_prefix() {
    if !facility::require_programs("services_guest_delay", &["qemu-system-x86_64", "apt-get"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img");
    File::create(&image).unwrap().set_len(16 << 20).unwrap();
    let rules = [
        "--fault",
        "op=read,sectors=0-8192,action=delay:20",
        "--fault",
        "op=write,sectors=12288-12296,action=torn:2048",
    ];
    let (_backend, socket) = common::start_blk(dir.path(), &image, &rules);
    let script = r#"
for i in $(seq 50); do [ -b /dev/vda ] && break; sleep 0.1; done
[ -b /dev/vda ] || { echo "no /dev/vda"; exit 10; }
for range in 0 8M; do
    fio --name=lat --filename=/dev/vda --ioengine=libaio --direct=1 --iodepth=1 --rw=randread --bs=4k \
        --offset=$range --size=4M --runtime=2 --time_based --output-format=terse --terse-version=3 > /tmp/fio.out 2>&1
    echo "CLAT_US_$range=$(grep '^3;' /tmp/fio.out | cut -d';' -f16)"
done
yes TORN | head -c 4096 > /tmp/torn
if dd if=/tmp/torn of=/dev/vda bs=4k seek=1536 count=1 oflag=direct 2>/tmp/dd.err; then
    echo "TORN_WRITE=succeeded"
else
    echo "TORN_WRITE=failed: $(grep -i error /tmp/dd.err | head -1)"
fi
"#;
    let run = LinuxGuest::new(script)
        .vhost_user_blk(&socket, 1)
        .memory_mib(512)
        .timeout(Duration::from_secs(240))
        .run()
        .unwrap();
    run.assert_passed();
    let mean = |key: &str| run.values(key).next().and_then(|v| v.parse::<f64>().ok()).unwrap_or(-1.0);
    let (held, free) = (mean("CLAT_US_0"), mean("CLAT_US_8M"));
    println!("fio completion latency: {held:.0} us on the delayed range, {free:.0} us elsewhere");
    assert!((20_000.0..60_000.0).contains(&held), "{held} us\n{}", run.log);
    assert!((0.0..10_000.0).contains(&free), "{free} us\n{}", run.log);
    let torn = run.values("TORN_WRITE").next().unwrap_or_default().to_string();
    assert!(torn.starts_with("failed") && torn.contains("Input/output error"), "{torn}\n{}", run.log);
    let mut on_disk = vec![0u8; 4096];
    File::open(&image).unwrap().read_exact_at(&mut on_disk, 6 << 20).unwrap();
    let written: Vec<u8> = b"TORN\n".iter().copied().cycle().take(2048).collect();
    assert!(on_disk[..2048] == written[..], "the prefix did not reach the image");
    assert!(on_disk[2048..].iter().all(|b| *b == 0), "more than the prefix reached the image");
    println!("torn write: the guest got {torn:?}, the image holds its first 2048 bytes only");
}
