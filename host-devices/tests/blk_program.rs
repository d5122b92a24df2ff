//! The vhost-user-blk program: capabilities, argument errors, and a clean exit on SIGTERM.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn blk() -> Command {
    Command::new(env!("CARGO_BIN_EXE_vhost-user-blk"))
}

#[test]
fn prints_capabilities_json() {
    let out = blk().arg("--print-capabilities").output().unwrap();
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        r#"{"type": "block", "features": ["read-only", "blk-file"]}"#
    );
}

#[test]
fn bad_input_exits_non_zero_with_a_message() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("s");
    let cases: &[(&[&str], &str)] = &[
        (&["--blk-file", "/nonexistent/disk.img", "--socket-path", "SOCK"], "cannot open /nonexistent/disk.img"),
        (&["--blk-file", "x"], "--socket-path"),
        (&["--engine", "null", "--socket-path", "SOCK"], "--blk-file"),
        (&["--engine", "null", "--size", "1000", "--socket-path", "SOCK"], "not a positive multiple of 512"),
        (&["--queue-size", "1000", "--size", "4096", "--socket-path", "SOCK"], "queue size 1000"),
        (&["--num-queues", "0", "--size", "4096", "--socket-path", "SOCK"], "0 is not in 1..=64"),
        (&["--logical-block-size", "1000", "--size", "4096", "--socket-path", "SOCK"], "not a power of two"),
        (&["--fd", "987", "--size", "4096", "--engine", "null"], "--fd 987 is not an open socket"),
    ];
    for (args, expected) in cases {
        let args: Vec<String> = args.iter().map(|a| a.replace("SOCK", &sock.display().to_string())).collect();
        let out = blk().args(&args).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert!(stderr.contains(expected), "{args:?}: expected '{expected}' in: {stderr}");
        assert!(!sock.exists(), "{args:?} left a socket behind");
    }
}

#[test]
fn sigterm_removes_the_socket_and_exits_zero() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("blk.sock");
    let mut child = blk()
        .args(["--engine", "null", "--size", "1048576", "--stats-ms", "50", "--socket-path"])
        .arg(&sock)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !sock.exists() {
        assert!(Instant::now() < deadline, "socket never appeared");
        std::thread::sleep(Duration::from_millis(10));
    }
    // SAFETY: kill only sends a signal to our own child process.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(0));
    assert!(!sock.exists(), "socket removed at exit");
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(stderr.contains("reads=0 writes=0"), "statistics printed: {stderr}");
}
