//! What a frontend can send that used to end or exhaust a backend, tried over real sockets
//! against the backend programs: a memory region larger than its file (the first access past
//! the file's end killed the backend with SIGBUS), and connection after connection (each one
//! leaked an eventfd per worker thread until the backend ran out of descriptors); and, against
//! each of the three backends, `hostile_frontend.py`: protocol garbage and hostile rings, with
//! the backend checked alive, answering and bounded in memory after each attack.

mod common;

use pvkit_test_support::blkio_client::BlkioClient;
use pvkit_test_support::process::ChildGuard;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};
use vhost::vhost_user::message::{VhostUserHeaderFlag, VhostUserProtocolFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo};

const WAIT: Duration = Duration::from_secs(10);

/// Starts the block backend on a null disk; `log` is its RUST_LOG (stderr is read only at the
/// end, so a test of many connections keeps it quiet).
fn start_null_blk(socket: &Path, queues: &str, log: &str) -> ChildGuard {
    let mut child = ChildGuard::spawn(
        "vhost-user-blk",
        Command::new(env!("CARGO_BIN_EXE_vhost-user-blk"))
            .env("RUST_LOG", log)
            .args(["--engine", "null", "--size", "1048576", "--num-queues", queues, "--socket-path"])
            .arg(socket),
    )
    .unwrap();
    child.wait_for_socket(socket, WAIT).unwrap();
    child
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(0)
}

/// A 4 KiB memfd announced as a 1 MiB region is refused with an error reply; the backend
/// lives on and serves the next frontend (libblkio) normally.
#[test]
fn a_region_larger_than_its_file_is_refused_and_the_backend_lives_on() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("blk.sock");
    let mut backend = start_null_blk(&socket, "1", "info");
    {
        let mut frontend = Frontend::connect(&socket, 1).unwrap();
        frontend.set_owner().unwrap();
        let features = frontend.get_features().unwrap();
        frontend.set_features(features).unwrap();
        let offered = frontend.get_protocol_features().unwrap();
        frontend.set_protocol_features(offered & VhostUserProtocolFeatures::REPLY_ACK).unwrap();
        let small = tempfile::tempfile().unwrap();
        small.set_len(4096).unwrap();
        let region = VhostUserMemoryRegionInfo {
            guest_phys_addr: 0,
            memory_size: 1 << 20,
            userspace_addr: 0x7f00_0000_0000,
            mmap_offset: 0,
            mmap_handle: small.as_raw_fd(),
        };
        // As QEMU does with REPLY_ACK: ask for the verdict.
        frontend.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        assert!(frontend.set_mem_table(&[region]).is_err(), "the backend accepted a region past its file");
        frontend.set_hdr_flags(VhostUserHeaderFlag::empty());
        // What used to touch the missing pages: setting up a ring in that region.
        let _ = frontend.set_vring_num(0, 16);
        let _ = frontend.set_vring_addr(
            0,
            &vhost::VringConfigData {
                queue_max_size: 16,
                queue_size: 16,
                flags: 0,
                desc_table_addr: 0x8000,
                used_ring_addr: 0x9000,
                avail_ring_addr: 0xa000,
                log_addr: None,
            },
        );
    }
    std::thread::sleep(Duration::from_millis(200));
    backend.check_running().unwrap();
    let mut client = BlkioClient::connect(&socket, 1).unwrap();
    client.write(0, 0, &[0x5a; 4096]).unwrap();
    assert_eq!(client.read(0, 0, 4096).unwrap().len(), 4096);
    drop(client);
    let log = backend.terminate(WAIT);
    assert!(log.contains("refused a memory table"), "no log line for the refusal:\n{log}");
}

/// Hundreds of connections leave the backend's descriptor count where it was.
#[test]
fn connections_leak_no_descriptors() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("blk.sock");
    let mut backend = start_null_blk(&socket, "2", "warn");
    let pid = backend.id().unwrap();
    let connect_once = || {
        let frontend = Frontend::connect(&socket, 2).unwrap();
        frontend.set_owner().unwrap();
        frontend.get_features().unwrap();
    };
    for _ in 0..20 {
        connect_once();
    }
    let settle = |target: Option<usize>| {
        let deadline = Instant::now() + WAIT;
        loop {
            let now = open_fds(pid);
            if target.is_none_or(|t| now <= t) || Instant::now() > deadline {
                return now;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    std::thread::sleep(Duration::from_millis(300));
    let before = settle(None);
    for _ in 0..300 {
        connect_once();
    }
    // The backend may still be tearing the last connection down: give it a moment.
    let after = settle(Some(before + 2));
    backend.check_running().unwrap();
    assert!(after <= before + 2, "open descriptors went from {before} to {after} over 300 connections");
}

/// Runs `hostile_frontend.py` (an independent frontend in Python, see its docstring) against a
/// running backend; it attacks, checks the backend after each attack, and moves real data at
/// the end. Its verdict and what it measured are printed.
fn run_hostile_frontend(device: &str, backend: &mut ChildGuard, socket: &Path, extra: &[&Path]) {
    if !pvkit_test_support::facility::require_programs(&format!("hostile frontend ({device})"), &["python3"]) {
        return;
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/hostile_frontend.py");
    let pid = backend.id().unwrap().to_string();
    // Sandboxed by default: seccomp in filter mode. The socket exists a moment before the
    // backend enters its sandbox (it is made first, so the sandbox can allow removing it).
    let deadline = Instant::now() + Duration::from_secs(5);
    let status = loop {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        if status.lines().any(|l| l == "Seccomp:\t2") || Instant::now() > deadline {
            break status;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    assert!(status.lines().any(|l| l == "Seccomp:\t2"), "{device} backend not in seccomp filter mode:\n{status}");
    let mut cmd = Command::new("python3");
    cmd.arg(script).arg(device).arg(socket).arg(&pid);
    if let Some(file) = extra.first() {
        cmd.arg("--console-file").arg(file);
    }
    let out = cmd.output().unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    backend.check_running().unwrap();
    assert!(out.status.success(), "{stdout}{stderr}");
    println!("{stdout}");
}

/// Starts `program` with `args`, listening on `dir/<device>.sock`.
fn start_backend(program: &str, device: &str, dir: &Path, args: &[&str]) -> (ChildGuard, std::path::PathBuf) {
    let socket = dir.join(format!("{device}.sock"));
    let mut child = ChildGuard::spawn(
        program,
        Command::new(program).env("RUST_LOG", "warn").args(args).arg("--socket-path").arg(&socket),
    )
    .unwrap();
    child.wait_for_socket(&socket, WAIT).unwrap();
    (child, socket)
}

#[test]
fn the_block_backend_survives_a_hostile_frontend() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img");
    std::fs::File::create(&image).unwrap().set_len(1 << 20).unwrap();
    let image_arg = image.to_str().unwrap();
    let (mut backend, socket) =
        start_backend(env!("CARGO_BIN_EXE_vhost-user-blk"), "blk", dir.path(), &["--blk-file", image_arg]);
    run_hostile_frontend("blk", &mut backend, &socket, &[]);
}

#[test]
fn the_net_backend_survives_a_hostile_frontend() {
    let dir = tempfile::tempdir().unwrap();
    let (mut backend, socket) = start_backend(env!("CARGO_BIN_EXE_vhost-user-net"), "net", dir.path(), &["--loopback"]);
    run_hostile_frontend("net", &mut backend, &socket, &[]);
}

#[test]
fn the_console_backend_survives_a_hostile_frontend() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("console.out");
    let port = format!("file:{}", out.display());
    let (mut backend, socket) =
        start_backend(env!("CARGO_BIN_EXE_vhost-user-console"), "console", dir.path(), &["--port", &port]);
    run_hostile_frontend("console", &mut backend, &socket, &[&out]);
}
