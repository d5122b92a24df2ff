//! The VMM's thread filters, tried in a child process (this test binary re-run on one test):
//! a vCPU thread that confined itself is killed with the whole process (SIGSYS) when it makes
//! a call outside its list (opening a file), and in log mode the call goes through.

use pvkit_vmm_glue::seccomp::{ThreadSandbox, VmmThread, confine_this_thread};
use std::os::unix::process::ExitStatusExt;
use std::process::{Command, Output};

const CHILD_MODE: &str = "PVKIT_VMM_SECCOMP_CHILD_MODE";

fn run_child(mode: &str) -> Output {
    Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "confined_child", "--nocapture", "--test-threads", "1"])
        .env(CHILD_MODE, mode)
        .output()
        .unwrap()
}

/// Not a test of its own: the child's body, which does nothing unless [`run_child`] started it.
#[test]
fn confined_child() {
    let Ok(mode) = std::env::var(CHILD_MODE) else { return };
    let mode = if mode == "log" { ThreadSandbox::Log } else { ThreadSandbox::On };
    let opened = std::thread::spawn(move || {
        confine_this_thread(VmmThread::Vcpu, mode).unwrap();
        println!("CONFINED");
        std::fs::File::open("/proc/self/status").is_ok()
    })
    .join()
    .unwrap();
    println!("OPENED {opened}");
}

#[test]
fn a_call_outside_the_vcpu_list_kills_the_process() {
    let out = run_child("on");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.signal(), Some(libc::SIGSYS), "{}\n{stdout}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("CONFINED") && !stdout.contains("OPENED"), "{stdout}");
}

#[test]
fn in_log_mode_the_call_goes_through() {
    let out = run_child("log");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}\n{stdout}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("OPENED true"), "{stdout}");
}
