//! The sandbox, tried in a child process (this test binary re-run on one test): once entered,
//! a file the backend was not given cannot be opened while its own can, and a system call
//! outside the allow-list (here the `clone` of starting a program) kills the process with
//! SIGSYS; with `--sandbox log` the same call goes through.

use pvkit_host_devices::BackendKind;
use pvkit_host_devices::sandbox::{Sandbox, SandboxMode};
use std::os::unix::process::ExitStatusExt;
use std::process::{Command, Output};

const CHILD_MODE: &str = "PVKIT_SANDBOX_CHILD_MODE";
const CHILD_FILE: &str = "PVKIT_SANDBOX_CHILD_FILE";

/// Runs [`sandboxed_child`] in a new process with the sandbox in `mode`, allowed an image of
/// its own; returns how it ended and what it printed.
fn run_child(mode: &str) -> (Output, String) {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img");
    std::fs::write(&image, [0u8; 512]).unwrap();
    let out = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "sandboxed_child", "--nocapture", "--test-threads", "1"])
        .env(CHILD_MODE, mode)
        .env(CHILD_FILE, &image)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    (out, stdout)
}

/// Not a test of its own: the child's body, which does nothing unless [`run_child`] started it.
#[test]
fn sandboxed_child() {
    let Ok(mode) = std::env::var(CHILD_MODE) else { return };
    let mode = if mode == "log" { SandboxMode::Log } else { SandboxMode::On };
    let given = std::path::PathBuf::from(std::env::var(CHILD_FILE).unwrap());
    let confinement = Sandbox::new(BackendKind::Blk, mode).file(&given, true).enter().unwrap().unwrap();
    println!("LANDLOCK {}", confinement.landlock);
    println!("GIVEN {}", std::fs::File::open(&given).is_ok());
    let other = std::fs::File::open("/etc/hostname").map_err(|e| e.kind());
    println!("OTHER {other:?}");
    let status = Command::new("/bin/true").status();
    println!("SPAWNED {status:?}");
}

#[test]
fn a_call_outside_the_list_kills_the_sandboxed_process() {
    let (out, stdout) = run_child("on");
    assert_eq!(out.status.signal(), Some(libc::SIGSYS), "{}\n{stdout}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("GIVEN true"), "the given file can be opened: {stdout}");
    assert!(!stdout.contains("SPAWNED"), "a program was started: {stdout}");
    if stdout.contains("LANDLOCK enforced") {
        assert!(stdout.contains("OTHER Err(PermissionDenied)"), "Landlock let another file open: {stdout}");
    } else {
        println!("Landlock is not enforced on this kernel: {stdout}");
    }
}

#[test]
fn in_log_mode_the_call_goes_through() {
    let (out, stdout) = run_child("log");
    assert!(out.status.success(), "{}\n{stdout}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("SPAWNED Ok(ExitStatus(unix_wait_status(0)))"), "{stdout}");
    assert!(stdout.contains("OTHER Ok"), "log mode applies no Landlock rules: {stdout}");
}
