//! vhost-user-net against DPDK: `dpdk-testpmd` with its `net_virtio_user` PMD (an independent
//! vhost-user frontend and virtio driver) sends into `--sink` in txonly mode, and exchanges
//! frames with `--loopback` in io mode; both sides' counters must agree.

use pvkit_test_support::facility;
use pvkit_test_support::process::ChildGuard;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Mutex, mpsc};
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(10);

/// Whether hugepages are reserved and mounted (scripts/test --prepare sets them up).
fn hugepages_ready(test: &str) -> bool {
    let pages: u64 =
        std::fs::read_to_string("/proc/sys/vm/nr_hugepages").ok().and_then(|s| s.trim().parse().ok()).unwrap_or(0);
    let mounted = std::fs::read_to_string("/proc/mounts").is_ok_and(|m| m.contains(" hugetlbfs "));
    if pages >= 128 && mounted {
        return true;
    }
    let why = format!("{pages} hugepages reserved, hugetlbfs mounted: {mounted} (scripts/test --prepare sets them up)");
    assert!(!facility::strict(), "{test}: {why}");
    println!("SKIPPED {test}: {why}");
    false
}

/// The two tests pin testpmd to the same cores: one at a time.
static TESTPMD: Mutex<()> = Mutex::new(());

/// How long testpmd may take to start forwarding (hugepage set-up, the vhost-user handshake)
/// on a loaded machine.
const TESTPMD_START: Duration = Duration::from_secs(60);

/// Runs testpmd against `socket` in `mode` for `seconds` after it started forwarding (its first
/// periodic statistics), then stops it with SIGINT; returns its accumulated (RX-packets,
/// TX-packets).
fn testpmd(prefix: &str, socket: &Path, mode: &[&str], seconds: u64) -> (u64, u64) {
    let _one_at_a_time = TESTPMD.lock().unwrap_or_else(|e| e.into_inner());
    let vdev = format!("net_virtio_user0,path={},queues=1,queue_size=1024", socket.display());
    let mut child = Command::new("dpdk-testpmd")
        .args(["--lcores", "0@0,1@1", "--no-pci", "--single-file-segments", "-m", "256", "--file-prefix", prefix])
        .args(["--vdev", &vdev, "--"])
        .args(mode)
        .args(["--stats-period", "1", "--nb-cores", "1", "--txd", "1024", "--rxd", "1024"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting dpdk-testpmd");
    let (started_tx, started) = mpsc::channel();
    let stdout = child.stdout.take().expect("piped stdout");
    let reader = std::thread::spawn(move || {
        let mut all = String::new();
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if line.contains("Port statistics") {
                let _ = started_tx.send(());
            }
            all.push_str(&line);
            all.push('\n');
        }
        all
    });
    let forwarding = started.recv_timeout(TESTPMD_START).is_ok();
    if forwarding {
        std::thread::sleep(Duration::from_secs(seconds));
    }
    // SAFETY: sends a signal to the child we started.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGINT) };
    let out = child.wait_with_output().unwrap();
    let stdout = reader.join().unwrap_or_default();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(forwarding, "testpmd did not start forwarding within {TESTPMD_START:?}:\n{stdout}\n{stderr}");
    let accumulated = stdout
        .split("Accumulated forward statistics")
        .nth(1)
        .unwrap_or_else(|| panic!("testpmd printed no statistics:\n{stdout}\n{stderr}"));
    let count = |key: &str| -> u64 {
        accumulated
            .split(key)
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no {key} in:\n{accumulated}"))
    };
    (count("RX-packets:"), count("TX-packets:"))
}

/// (tx packets, rx packets) from the backend's final summary line.
fn backend_counts(log: &str) -> (u64, u64) {
    let line = log.lines().rev().find(|l| l.contains(" packets ")).unwrap_or_else(|| panic!("no summary in:\n{log}"));
    let after = |key: &str| -> u64 {
        line.split(key).nth(1).and_then(|r| r.split_whitespace().next()).and_then(|n| n.parse().ok()).unwrap_or(0)
    };
    (after("tx "), after("rx "))
}

fn start_backend(socket: &Path, side: &str) -> ChildGuard {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_vhost-user-net"));
    cmd.arg(side).arg("--socket-path").arg(socket);
    let mut child = ChildGuard::spawn("vhost-user-net", &mut cmd).unwrap();
    child.wait_for_socket(socket, WAIT).unwrap();
    child
}

#[test]
fn dpdk_virtio_user_sends_into_the_sink() {
    let test = "net_dpdk_sink";
    if !facility::require_programs(test, &["dpdk-testpmd"]) || !hugepages_ready(test) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("sink.sock");
    let backend = start_backend(&socket, "--sink");
    let prefix = format!("pvkit-sink-{}", std::process::id());
    let (_, sent) = testpmd(&prefix, &socket, &["--forward-mode=txonly"], 3);
    std::thread::sleep(Duration::from_millis(200));
    let log = backend.terminate(WAIT);
    let (taken, _) = backend_counts(&log);
    assert!(sent > 1000, "testpmd sent only {sent} packets; the backend's log:\n{log}");
    // Everything testpmd counted as sent was taken, except what was still in the ring (at most
    // its size) when testpmd stopped.
    assert!(taken <= sent && taken + 1024 >= sent, "testpmd sent {sent}, the sink took {taken}");
    println!("{test}: testpmd sent {sent} frames, the sink took {taken}");
}

#[test]
fn dpdk_virtio_user_exchanges_frames_with_the_loopback() {
    let test = "net_dpdk_loopback";
    if !facility::require_programs(test, &["dpdk-testpmd"]) || !hugepages_ready(test) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("loop.sock");
    let backend = start_backend(&socket, "--loopback");
    let prefix = format!("pvkit-loop-{}", std::process::id());
    let (received, sent) = testpmd(&prefix, &socket, &["--forward-mode=io", "--tx-first"], 3);
    std::thread::sleep(Duration::from_millis(200));
    let log = backend.terminate(WAIT);
    let (taken, returned) = backend_counts(&log);
    assert!(received > 1000, "testpmd received only {received} frames back; the backend's log:\n{log}");
    assert!(returned >= received, "the loopback returned {returned}, testpmd received {received}");
    assert!(taken <= sent, "the loopback took {taken}, more than the {sent} testpmd sent");
    println!("{test}: testpmd sent {sent} and received {received}; the loopback took {taken}, returned {returned}");
}
