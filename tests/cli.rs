//! The `pvkit` command line: help, errors, and multi-call dispatch by `argv[0]`.

use pvkit_host_devices::{BackendKind, backend_command};
use std::path::Path;
use std::process::Command;

fn pvkit() -> Command {
    Command::new(env!("CARGO_BIN_EXE_pvkit"))
}

#[test]
fn help_and_version_exit_zero() {
    let out = pvkit().arg("--help").output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("demo") && text.contains("backend"), "{text}");
    let out = pvkit().arg("--version").output().unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("pvkit "));
}

#[test]
fn bad_arguments_exit_two_with_a_message() {
    let out = pvkit().arg("frobnicate").output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("frobnicate"));
    let out = pvkit().args(["backend", "scsi"]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown backend 'scsi'"));
}

#[test]
fn demo_runs_the_guest_against_three_backend_processes() {
    let started = std::time::Instant::now();
    let out = pvkit().arg("demo").output().unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(started.elapsed() < std::time::Duration::from_secs(30), "the demo took {:?}", started.elapsed());
    assert!(stdout.contains("result: PASS"), "{stdout}");
    for check in ["blk_write_read", "blk_flush", "blk_get_id", "net_arp", "console_write", "console_read"] {
        assert!(stdout.lines().any(|l| l.trim_start().starts_with(check) && l.ends_with("pass")), "{check}:\n{stdout}");
    }
    for rate in ["IOPS", "packets/s", "KB/s"] {
        let line = stdout.lines().find(|l| l.contains(rate)).unwrap_or_else(|| panic!("no {rate} line:\n{stdout}"));
        assert!(line.split_whitespace().any(|w| w.parse::<f64>().is_ok_and(|v| v > 0.0)), "{line}");
    }
    // The backends ran as separate processes under their own names.
    for name in ["vhost-user-blk", "vhost-user-net", "vhost-user-console"] {
        assert!(stderr.contains(&format!("{name} running (pid")), "{stderr}");
    }
    assert!(stderr.contains("cleaning up"), "{stderr}");
}

#[test]
fn argv0_selects_the_backend() {
    for kind in BackendKind::ALL {
        let out = backend_command(Path::new(env!("CARGO_BIN_EXE_pvkit")), kind).arg("--help").output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        // Whatever the backend answers, it answers as itself and not as the pvkit command.
        assert!(stderr.starts_with(&format!("{}:", kind.program_name())) || out.status.success(), "{kind}: {stderr}");
        assert!(!String::from_utf8_lossy(&out.stdout).contains("Usage: pvkit"), "{kind} ran as pvkit");
    }
}

#[test]
fn install_script_places_binaries_and_the_vhost_user_descriptor() {
    let prefix = tempfile::tempdir().unwrap();
    let root = env!("CARGO_MANIFEST_DIR");
    let out = Command::new(format!("{root}/scripts/install")).arg(prefix.path()).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let descriptor = prefix.path().join("share/qemu/vhost-user/50-pvkit-vhost-user-blk.json");
    let text = std::fs::read_to_string(&descriptor).unwrap();
    let binary = prefix.path().join("bin/vhost-user-blk");
    assert!(text.contains(r#""type": "block""#), "{text}");
    assert!(text.contains(&format!(r#""binary": "{}""#, binary.display())), "{text}");
    // The installed program answers the way the descriptor's consumers ask it to.
    let caps = Command::new(&binary).arg("--print-capabilities").output().unwrap();
    assert!(caps.status.success());
    assert!(String::from_utf8_lossy(&caps.stdout).contains(r#""type": "block""#));
    let console = prefix.path().join("share/qemu/vhost-user/50-pvkit-vhost-user-console.json");
    let text = std::fs::read_to_string(&console).unwrap();
    let binary = prefix.path().join("bin/vhost-user-console");
    assert!(text.contains(&format!(r#""binary": "{}""#, binary.display())), "{text}");
    let caps = Command::new(&binary).arg("--print-capabilities").output().unwrap();
    assert!(String::from_utf8_lossy(&caps.stdout).contains(r#""type": "console""#));
}

#[test]
fn stat_prints_live_rates_of_a_backend_and_refuses_bad_input() {
    let dir = tempfile::tempdir().unwrap();
    let (image, socket, api) = (dir.path().join("disk.img"), dir.path().join("blk.sock"), dir.path().join("api.sock"));
    std::fs::File::create(&image).unwrap().set_len(8 << 20).unwrap();
    let mut cmd = pvkit();
    cmd.args(["backend", "blk", "--blk-file"])
        .arg(&image)
        .arg("--socket-path")
        .arg(&socket)
        .arg("--api-socket")
        .arg(&api);
    let mut backend = pvkit_test_support::process::ChildGuard::spawn("vhost-user-blk", &mut cmd).unwrap();
    backend.wait_for_socket(&socket, std::time::Duration::from_secs(10)).unwrap();
    let mut client = pvkit_test_support::blkio_client::BlkioClient::connect(&socket, 1).unwrap();
    let stat = {
        let api = api.clone();
        std::thread::spawn(move || {
            pvkit().args(["stat", "--json", "--interval", "0.5", "--count", "3"]).arg(api).output().unwrap()
        })
    };
    let started = std::time::Instant::now();
    while started.elapsed() < std::time::Duration::from_secs(1) {
        client.write(0, 0, &[3; 4096]).unwrap();
    }
    let out = stat.join().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    let lines: Vec<serde_json::Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 3, "{text}");
    assert!(lines.iter().any(|l| l["requests_per_s"].as_f64() > Some(0.0)), "{text}");
    assert!(lines.iter().all(|l| l["device"] == "vhost-user-blk"), "{text}");
    let table = pvkit().args(["stat", "--interval", "0.1", "--count", "1"]).arg(&api).output().unwrap();
    assert!(String::from_utf8_lossy(&table.stdout).starts_with("device"), "a header line");

    let missing = pvkit().args(["stat", "--count", "1"]).arg(dir.path().join("nothing.sock")).output().unwrap();
    assert_eq!(missing.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("nothing.sock"), "names the socket");
    for bad in [&["stat"][..], &["stat", "--interval", "0", "x"], &["stat", "--count", "many", "x"]] {
        assert_eq!(pvkit().args(bad).output().unwrap().status.code(), Some(2), "{bad:?}");
    }
}

/// `pvkit ctl` without a VM to talk to, or with an action it does not know: a message and a
/// non-zero exit (1 for an unreachable socket, 2 for bad usage).
#[test]
fn ctl_says_what_went_wrong() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-vm.api");
    let out = Command::new(env!("CARGO_BIN_EXE_pvkit"))
        .args(["ctl", "--api-socket"])
        .arg(&missing)
        .arg("pause")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no-vm.api"), "{}", String::from_utf8_lossy(&out.stderr));
    let bad = Command::new(env!("CARGO_BIN_EXE_pvkit"))
        .args(["ctl", "--api-socket"])
        .arg(&missing)
        .arg("explode")
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("explode"));
}

/// Snapshot commands on bad input, without KVM: a snapshot directory that is not there (inspect
/// and restore exit 1 naming it), options that cannot go with a restore (exit 2), a migration
/// to a socket nobody listens on (exit 1 naming it).
#[test]
fn snapshot_commands_say_what_went_wrong() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-snapshot");
    let pvkit = || Command::new(env!("CARGO_BIN_EXE_pvkit"));
    let inspect = pvkit().args(["snapshot", "inspect"]).arg(&missing).output().unwrap();
    assert_eq!(inspect.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&inspect.stderr).contains("no-snapshot/manifest.json"));
    if pvkit_test_support::facility::kvm_usable() {
        let restore = pvkit().args(["run", "--restore"]).arg(&missing).output().unwrap();
        assert_eq!(restore.status.code(), Some(1));
        assert!(String::from_utf8_lossy(&restore.stderr).contains("cannot restore"));
    }
    let both = pvkit().args(["run", "--restore"]).arg(&missing).args(["--kernel", "x.elf"]).output().unwrap();
    assert_eq!(both.status.code(), Some(2), "{}", String::from_utf8_lossy(&both.stderr));
    let api = dir.path().join("no-vm.api");
    let migrate = pvkit().args(["ctl", "--api-socket"]).arg(&api).args(["migrate", "/tmp/x.sock"]).output().unwrap();
    assert_eq!(migrate.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&migrate.stderr).contains("no-vm.api"));
    let live_ms_alone =
        pvkit().args(["ctl", "--api-socket"]).arg(&api).args(["migrate", "x", "--live-ms", "5"]).output();
    assert_eq!(live_ms_alone.unwrap().status.code(), Some(2), "--live-ms needs --live");
}
