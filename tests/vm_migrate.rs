//! Moving a running VM between two `pvkit run` processes on KVM: a soaking tiny guest is sent
//! by `pvkit ctl migrate` to a `pvkit run --incoming`, with stop-and-copy and with pre-copy;
//! the source exits 0, the destination connects to the same backend processes and the soak
//! finishes there, finding every block it wrote. The pre-copy's live phase is held for 1.5 s,
//! so the guest and the block backend write pages while memory is sent: those pages reach the
//! destination only through KVM's dirty log and the backend's (without the backend's, the
//! soak fails). On a machine without a usable /dev/kvm each test prints one skip line.

use pvkit_test_support::facility;
use pvkit_test_support::process::ChildGuard;
use pvkit_test_support::tiny_guest::{GuestResult, console_peer_unix};
use pvkit_test_support::tiny_vm::{Backends, ConsolePort, ctl, soak_progress, wait_for, wait_for_exit};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

const ALL: &[&str] = &["blk_write_read", "blk_flush", "blk_get_id", "net_arp", "console_write", "console_read"];

fn pvkit() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_pvkit"))
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// Soaks a guest, moves it with `how` (extra `pvkit ctl migrate` arguments) once its soak
/// passed iteration 30, and checks both ends. Returns the migration's report.
fn soak_and_move(how: &[&str]) -> serde_json::Value {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let port = dir.join("port.sock");
    let backends = Backends::start(pvkit(), dir, ConsolePort::Unix(port.clone()));
    let peer = console_peer_unix(port);
    let (api, serial, incoming, serial2) =
        (dir.join("vm.api"), dir.join("serial.log"), dir.join("incoming.sock"), dir.join("moved.log"));
    let mut run = backends.run_command(&[
        "--timeout",
        "120",
        "--cmdline",
        "pvkit.mode=soak pvkit.soak_iterations=150 pvkit.soak_touch_mib=4",
    ]);
    run.arg("--api-socket").arg(&api).arg("--serial").arg(&serial);
    let mut source = ChildGuard::spawn("pvkit run (source)", &mut run).unwrap();
    let mut destination = ChildGuard::spawn(
        "pvkit run (destination)",
        Command::new(pvkit())
            .args(["run", "--timeout", "120", "--incoming"])
            .arg(&incoming)
            .arg("--serial")
            .arg(&serial2),
    )
    .unwrap();
    destination.wait_for_socket(&incoming, Duration::from_secs(10)).unwrap();
    wait_for("the guest never reached soak iteration 30", Duration::from_secs(90), &|| {
        soak_progress(&read(&serial)).1 >= 30
    });
    assert!(peer.join().unwrap(), "the console peer never saw the ping");
    let out = ctl(pvkit(), &api, &[&["migrate", incoming.to_str().unwrap()], how].concat());
    assert!(out.status.success(), "migrate failed: {}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let ended = wait_for_exit(&mut source, Duration::from_secs(20));
    assert!(ended.contains("exit status: 0"), "the source did not exit 0 after the move: {ended}");
    let at_move = soak_progress(&read(&serial)).1;
    let ended = wait_for_exit(&mut destination, Duration::from_secs(120));
    let log = read(&serial2);
    assert!(ended.contains("exit status: 0"), "the moved guest did not exit 0: {ended}\n{log}");
    let result = GuestResult::parse(&log).unwrap_or_else(|| panic!("no result line on the destination:\n{log}"));
    result.assert_passed(&[ALL, &["soak_verify"]].concat(), &log);
    assert!(log.contains("PVKIT-SOAK done iterations=150"), "{log}");
    assert!(log.contains("ballast_wrong=0"), "a ballast page lost what the guest wrote:\n{log}");
    assert!(soak_progress(&log).1 > at_move, "no progress on the destination after {at_move}:\n{log}");
    assert!(!log.contains("PVKIT-GUEST"), "the destination booted the guest again:\n{log}");
    report
}

#[test]
fn a_vm_moves_to_another_process_with_stop_and_copy() {
    if !facility::require_kvm("vm_migrate_stop_and_copy") {
        return;
    }
    let report = soak_and_move(&[]);
    assert_eq!(report["live"], false, "{report}");
    assert!(report["pages_paused"].as_u64() > Some(0), "{report}");
    println!("vm_migrate_stop_and_copy: {report}");
}

#[test]
fn a_vm_moves_to_another_process_with_pre_copy() {
    if !facility::require_kvm("vm_migrate_pre_copy") {
        return;
    }
    let report = soak_and_move(&["--live", "--live-ms", "1500"]);
    assert_eq!(report["live"], true, "{report}");
    assert!(report["rounds"].as_u64() > Some(1), "no pre-copy rounds: {report}");
    assert!(report["pages_live"].as_u64() > Some(0), "{report}");
    assert!(report["backend_pages"].as_u64() > Some(0), "the block backend logged no page in 1.5 s: {report}");
    println!("vm_migrate_pre_copy: {report}");
}
