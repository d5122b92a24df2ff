//! Backend crashes during I/O: a QEMU guest (TCG) runs fio with crc32c verification, two jobs
//! at queue depth 32 each, on a disk that pvkit serves from an O_DIRECT image through io_uring,
//! while the test kills the backend with SIGKILL again and again at random moments, each time
//! while requests are in flight, and starts a new one on the same socket. QEMU reconnects
//! (`reconnect-ms`) and hands the new backend its in-flight area (SET_INFLIGHT_FD), from
//! which it resubmits what the dead one had taken. Every fio run must pass, the guest must
//! log no I/O error or hung task, and the backends must report the resubmitted requests.

mod common;

use pvkit_test_support::facility;
use pvkit_test_support::linux_guest::LinuxGuest;
use pvkit_test_support::process::ChildGuard;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Where the guest announces that fio started, and where the test tells it to stop (MiB).
const PHASE_MIB: u64 = 60;
const STOP_MIB: u64 = 61;
/// Kills per run.
const KILLS: usize = 6;
/// QEMU's vhost-user-blk queue size (its default).
const QUEUE_SIZE: u64 = 128;

const SCRIPT: &str = r#"
for i in $(seq 50); do [ -b /dev/vda ] && break; sleep 0.1; done
[ -b /dev/vda ] || { echo "no /dev/vda"; exit 10; }
printf 'FIO_PHASE' | dd of=/dev/vda bs=512 seek=$((60 * 2048)) count=1 conv=sync oflag=direct 2>/dev/null
rc=0
run=0
while [ $run -lt 40 ]; do
    run=$((run + 1))
    fio --name=crash --filename=/dev/vda --ioengine=libaio --direct=1 --iodepth=32 --numjobs=2 \
        --offset_increment=24M --size=24M --rw=randwrite --bs=4k --verify=crc32c --do_verify=1 \
        --verify_fatal=1 --group_reporting --output-format=terse --terse-version=3 > /tmp/fio.out 2>&1 || rc=1
    echo "FIO_RUN=$run errors=$(grep '^3;' /tmp/fio.out | cut -d';' -f5)"
    [ "$(dd if=/dev/vda bs=512 skip=$((61 * 2048)) count=1 iflag=direct 2>/dev/null | head -c 4)" = STOP ] && break
done
echo "KERNEL_COMPLAINTS=$(dmesg | grep -ciE 'i/o error|blocked for more than|hung_task|timed out')"
dmesg | grep -iE 'i/o error|blocked for more than|hung_task|timed out' | head -5
exit $rc
"#;

/// A small xorshift generator: the kill moments are random, and the seed is printed.
struct Moments(u64);

impl Moments {
    fn between(&mut self, low_ms: u64, high_ms: u64) -> Duration {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        Duration::from_millis(low_ms + self.0 % (high_ms - low_ms))
    }
}

fn start(dir: &Path, image: &Path) -> (ChildGuard, PathBuf) {
    common::start_blk(dir, image, &["--direct", "--engine", "io_uring"])
}

/// The backend's in-flight area, through its descriptor (once QEMU handed it over).
fn inflight_area(pid: u32) -> Option<File> {
    for entry in std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.flatten() {
        let target = std::fs::read_link(entry.path()).ok()?;
        if target.to_string_lossy().contains("pvkit-inflight") {
            return File::open(entry.path()).ok();
        }
    }
    None
}

/// Waits up to `limit` until queue 0's region shows a request in flight; says whether it did.
fn wait_for_requests_in_flight(pid: u32, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    let mut states = vec![0u8; (16 * QUEUE_SIZE) as usize];
    while Instant::now() < deadline {
        if let Some(area) = inflight_area(pid) {
            while Instant::now() < deadline {
                if area.read_exact_at(&mut states, 16).is_ok() && states.chunks(16).any(|state| state[0] == 1) {
                    return true;
                }
                std::thread::sleep(Duration::from_micros(200));
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

fn marker_at(image: &Path, mib: u64) -> Vec<u8> {
    let mut bytes = vec![0u8; 9];
    File::open(image).unwrap().read_exact_at(&mut bytes, mib << 20).unwrap();
    bytes
}

/// The requests a backend's log says it resubmitted.
fn resubmitted(log: &str) -> u64 {
    log.lines()
        .filter_map(|line| line.split_once("resuming at used index")?.1.split_once(": ")?.1.split_once(' '))
        .filter_map(|(count, _)| count.parse::<u64>().ok())
        .sum()
}

#[test]
fn fio_verifies_while_the_backend_is_killed_during_io() {
    if !facility::require_programs("blk_crash", &["qemu-system-x86_64", "apt-get"]) {
        return;
    }
    // The image must be on a file system with O_DIRECT (not tmpfs): beside the build.
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let image = dir.path().join("disk.img");
    File::create(&image).unwrap().set_len(64 << 20).unwrap();
    let (mut backend, socket) = start(dir.path(), &image);
    let guest = std::thread::spawn(move || {
        LinuxGuest::new(SCRIPT)
            .vhost_user_blk(&socket, 1)
            .memory_mib(512)
            .reconnect_ms(200)
            .timeout(Duration::from_secs(600))
            .run()
    });
    let waited = Instant::now();
    while !marker_at(&image, PHASE_MIB).starts_with(b"FIO_PHASE") {
        assert!(waited.elapsed() < Duration::from_secs(300) && !guest.is_finished(), "the guest never started fio");
        std::thread::sleep(Duration::from_millis(100));
    }
    let seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64 | 1;
    println!("kill moments seeded with {seed}");
    let mut moments = Moments(seed);
    let (mut logs, mut caught) = (Vec::new(), 0);
    for kill in 0..KILLS {
        std::thread::sleep(moments.between(300, 2500));
        let pid = backend.id().unwrap();
        // QEMU reconnects on its own timer, slower under load: killing the backend before QEMU
        // has finished reconnecting would test QEMU's handling of a disconnect during its
        // handshake (which leaves its device stopped), not pvkit's recovery.
        let in_flight = wait_for_requests_in_flight(pid, Duration::from_secs(30));
        caught += usize::from(in_flight);
        logs.push(backend.stop());
        println!("kill {kill}: SIGKILL with requests in flight: {in_flight}");
        std::thread::sleep(moments.between(0, 400));
        backend = start(dir.path(), &image).0;
    }
    // Let fio run on the last backend, then tell the guest to finish its run.
    std::thread::sleep(Duration::from_secs(4));
    File::options().write(true).open(&image).unwrap().write_all_at(b"STOP", STOP_MIB << 20).unwrap();
    let run = guest.join().unwrap().unwrap();
    logs.push(backend.terminate(Duration::from_secs(5)));
    let log = logs.join("\n");
    println!("guest finished in {:.1} s", run.elapsed.as_secs_f64());
    run.assert_passed();
    let runs: Vec<&str> = run.values("FIO_RUN").collect();
    assert!(runs.len() >= 2, "{runs:?}");
    assert!(runs.iter().all(|r| r.ends_with("errors=0")), "{runs:?}");
    assert_eq!(run.values("KERNEL_COMPLAINTS").next(), Some("0"), "{}", run.log);
    let total = resubmitted(&log);
    println!(
        "{caught} of {KILLS} kills came with requests in flight; {total} request(s) resubmitted; fio runs: {runs:?}"
    );
    assert!(caught > 0, "no kill found requests in flight");
    assert!(total > 0, "no request was resubmitted:\n{log}");
    assert!(log.contains("in-flight tracking on"), "QEMU never handed over the in-flight area:\n{log}");
}
