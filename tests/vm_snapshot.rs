//! Snapshots on KVM: a soaking tiny guest is snapshotted mid-soak (`pvkit ctl snapshot`),
//! then either resumed or shut down and restored (`pvkit run --restore`) on fresh backend
//! processes over the same disk image; either way the soak finishes and finds every block it
//! wrote. Bad snapshots are refused before anything starts. On a machine without a usable
//! /dev/kvm each test prints one skip line.

use pvkit_test_support::facility;
use pvkit_test_support::process::ChildGuard;
use pvkit_test_support::tiny_guest::{GuestResult, console_peer_unix};
use pvkit_test_support::tiny_vm::{Backends, ConsolePort, ctl, soak_progress, wait_for, wait_for_exit};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

const ALL: &[&str] = &["blk_write_read", "blk_flush", "blk_get_id", "net_arp", "console_write", "console_read"];
/// Iterations of the soak: long enough to be snapshotted mid-way; with 4 MiB of ballast (a
/// page's first touch is slow on a PVM-based KVM) whose every page must survive.
const SOAK: &str = "pvkit.mode=soak pvkit.soak_iterations=150 pvkit.soak_touch_mib=4";

fn pvkit() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_pvkit"))
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// A soaking VM with its API socket and serial log, snapshotted into `dir/snapshot` once its
/// soak passed iteration 30. Returns the VM (paused), the backends, and the last progress seen.
fn soak_and_snapshot(dir: &Path) -> (ChildGuard, Backends, u64) {
    let port = dir.join("port.sock");
    let backends = Backends::start(pvkit(), dir, ConsolePort::Unix(port.clone()));
    let peer = console_peer_unix(port);
    let (api, serial) = (dir.join("vm.api"), dir.join("serial.log"));
    let mut run = backends.run_command(&["--timeout", "120", "--cmdline", SOAK]);
    run.arg("--api-socket").arg(&api).arg("--serial").arg(&serial);
    let vm = ChildGuard::spawn("pvkit run", &mut run).unwrap();
    wait_for("the guest never reached soak iteration 30", Duration::from_secs(90), &|| {
        soak_progress(&read(&serial)).1 >= 30
    });
    assert!(peer.join().unwrap(), "the console peer never saw the ping");
    let snapshot = dir.join("snapshot");
    let out = ctl(pvkit(), &api, &["snapshot", snapshot.to_str().unwrap()]);
    assert!(out.status.success(), "snapshot failed: {}", String::from_utf8_lossy(&out.stderr));
    let saved: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(saved["state"], "paused", "{saved}");
    assert!(saved["nonzero_pages"].as_u64() > Some(0), "{saved}");
    let at_snapshot = soak_progress(&read(&serial)).1;
    std::thread::sleep(Duration::from_millis(1000));
    assert_eq!(soak_progress(&read(&serial)).1, at_snapshot, "the guest went on after the snapshot paused it");
    println!("vm_snapshot: {saved}");
    (vm, backends, at_snapshot)
}

/// Checks a finished soak's serial log: every check passed, and the progress went on past
/// `from` to the end.
fn assert_soak_finished(log: &str, from: u64) {
    let result = GuestResult::parse(log).unwrap_or_else(|| panic!("no result line:\n{log}"));
    result.assert_passed(&[ALL, &["soak_verify"]].concat(), log);
    assert!(log.contains("PVKIT-SOAK done iterations=150"), "{log}");
    assert!(log.contains("ballast_wrong=0"), "a ballast page lost what the guest wrote:\n{log}");
    assert!(soak_progress(log).1 > from, "no progress after iteration {from}:\n{log}");
    assert!(!log.contains("does not hold"), "the soak found a block it wrote changed:\n{log}");
}

/// Snapshot, shut down, kill the backends, start fresh ones on the same image, restore: the
/// soak finishes with every check passing (the console's output after the restore reaches the
/// new backend's port). `pvkit snapshot inspect` describes the snapshot; bad snapshots are
/// refused with a message and a non-zero exit, and nothing is started.
#[test]
fn a_snapshot_restored_on_fresh_backends_finishes_its_soak() {
    if !facility::require_kvm("vm_snapshot_restore") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (mut vm, mut backends, at_snapshot) = soak_and_snapshot(dir.path());
    assert!(ctl(pvkit(), &dir.path().join("vm.api"), &["shutdown"]).status.success());
    let ended = wait_for_exit(&mut vm, Duration::from_secs(20));
    assert!(ended.contains("exit status: 0"), "pvkit run did not exit 0 after shutdown: {ended}");
    backends.stop();
    let snapshot = dir.path().join("snapshot");
    inspect_describes(&snapshot);
    let console_out = dir.path().join("console.out");
    let _fresh = Backends::start(pvkit(), dir.path(), ConsolePort::File(console_out.clone()));
    refuse_bad_snapshots(dir.path(), &snapshot);
    let serial = dir.path().join("restored.log");
    let out = Command::new(pvkit())
        .args(["run", "--timeout", "120", "--restore"])
        .arg(&snapshot)
        .arg("--serial")
        .arg(&serial)
        .output()
        .unwrap();
    let log = read(&serial);
    assert_eq!(out.status.code(), Some(0), "{log}\n{}", String::from_utf8_lossy(&out.stderr));
    assert_soak_finished(&log, at_snapshot);
    assert!(!log.contains("PVKIT-GUEST"), "the restored guest booted again:\n{log}");
    assert!(read(&console_out).contains("soak"), "no console output reached the new backend");
    println!("vm_snapshot_restore: snapshot at iteration {at_snapshot}, the restored guest finished");
}

/// Snapshot, then resume: the soak goes on in the same process and finishes.
#[test]
fn a_snapshotted_vm_resumes_and_finishes_its_soak() {
    if !facility::require_kvm("vm_snapshot_resume") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (mut vm, _backends, at_snapshot) = soak_and_snapshot(dir.path());
    assert!(ctl(pvkit(), &dir.path().join("vm.api"), &["resume"]).status.success());
    let ended = wait_for_exit(&mut vm, Duration::from_secs(120));
    assert!(ended.contains("exit status: 0"), "the resumed guest did not exit 0: {ended}");
    assert_soak_finished(&read(&dir.path().join("serial.log")), at_snapshot);
    println!("vm_snapshot_resume: snapshot at iteration {at_snapshot}, resumed, finished");
}

/// `pvkit snapshot inspect`: registers, devices, ring indexes, memory.
fn inspect_describes(snapshot: &Path) {
    let out = Command::new(pvkit()).args(["snapshot", "inspect"]).arg(snapshot).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    for needle in ["vCPU 0:", "rip 0x", "device blk (slot 0", "device net (slot 1", "queue 0: size", "non-zero pages"] {
        assert!(text.contains(needle), "inspect does not say '{needle}':\n{text}");
    }
}

/// A copy of `snapshot` in `dir/name`, changed by `change`.
fn broken_copy(dir: &Path, snapshot: &Path, name: &str, change: &dyn Fn(&Path)) -> PathBuf {
    let copy = dir.join(name);
    std::fs::create_dir_all(&copy).unwrap();
    for entry in std::fs::read_dir(snapshot).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), copy.join(entry.file_name())).unwrap();
    }
    change(&copy);
    copy
}

fn edit_manifest(dir: &Path, edit: &dyn Fn(&mut serde_json::Value)) {
    let path = dir.join("manifest.json");
    let mut manifest: serde_json::Value = serde_json::from_str(&read(&path)).unwrap();
    edit(&mut manifest);
    std::fs::write(path, manifest.to_string()).unwrap();
}

/// Each bad snapshot is refused: a message naming what is wrong, a non-zero exit, no vCPU
/// started.
fn refuse_bad_snapshots(dir: &Path, snapshot: &Path) {
    let truncated = broken_copy(dir, snapshot, "truncated", &|d| {
        let file = std::fs::OpenOptions::new().write(true).open(d.join("memory.bin")).unwrap();
        file.set_len(64 << 20).unwrap();
    });
    let other_version = broken_copy(dir, snapshot, "other-version", &|d| {
        edit_manifest(d, &|m| m["origin"]["pvkit_version"] = "0.0.1".into())
    });
    let missing_device = broken_copy(dir, snapshot, "missing-device", &|d| {
        edit_manifest(d, &|m| {
            m["devices"].as_array_mut().unwrap().remove(1);
        })
    });
    let no_vcpus = broken_copy(dir, snapshot, "no-vcpus", &|d| std::fs::remove_file(d.join("vcpus.json")).unwrap());
    let cases: [(&Path, &[&str], &str); 6] = [
        (&truncated, &[], "memory.bin holds 67108864 bytes"),
        (&other_version, &[], "pvkit version 0.0.1"),
        (&missing_device, &[], "a device is missing"),
        (&no_vcpus, &[], "vcpus.json"),
        (snapshot, &["--blk", "/nonexistent/blk.sock"], "no backend at /nonexistent/blk.sock"),
        (snapshot, &["--net", "/a", "--net", "/b"], "more --net sockets given"),
    ];
    for (case, extra, expected) in cases {
        let out = Command::new(pvkit()).args(["run", "--restore"]).arg(case).args(extra).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{} {extra:?}: {stderr}", case.display());
        assert!(stderr.contains(expected), "{} {extra:?}: expected '{expected}' in: {stderr}", case.display());
        assert!(!stderr.contains("vCPUs started"), "{} {extra:?} started the VM: {stderr}", case.display());
    }
}
