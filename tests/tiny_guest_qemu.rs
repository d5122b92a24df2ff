//! The tiny guest and `pvkit-guest-driver` against devices nobody here wrote: QEMU's own
//! virtio-blk, virtio-net (with `-netdev user`, whose gateway answers ARP) and virtio-serial
//! console, under TCG, on `-M microvm` (virtio-mmio: legacy and version 2) and `-M q35`
//! (modern virtio-pci), polling and with interrupts; and once with pvkit's own
//! `vhost-user-blk` behind QEMU's `vhost-user-blk-pci`.

use pvkit_test_support::facility;
use pvkit_test_support::process::ChildGuard;
use pvkit_test_support::tiny_guest::{GuestResult, console_peer_unix};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

const TINY_GUEST_ELF: &[u8] = include_bytes!(env!("PVKIT_TINY_GUEST_ELF"));

#[derive(Clone, Copy, PartialEq)]
enum Machine {
    /// microvm, ACPI off (IRQ 5 + slot on the first IOAPIC, entries on the command line).
    Microvm { legacy: bool },
    /// q35 with modern-only virtio-pci devices.
    Q35,
}

struct Run {
    serial: String,
    status: Option<i32>,
}

impl Run {
    fn assert_passed(&self, expected: &[&str]) {
        let result = GuestResult::parse(&self.serial).unwrap_or_else(|| panic!("no result line:\n{}", self.serial));
        result.assert_passed(expected, &self.serial);
        // QEMU's isa-debug-exit turns the guest's 0 into exit status (0 << 1) | 1.
        assert_eq!(self.status, Some(1), "QEMU's exit status\n{}", self.serial);
    }
}

fn guest_elf(dir: &Path) -> PathBuf {
    let path = dir.join("tiny-guest.elf");
    std::fs::write(&path, TINY_GUEST_ELF).unwrap();
    path
}

fn run(test: &str, machine: Machine, completion: &str) -> Option<Run> {
    if !facility::require_programs(test, &["qemu-system-x86_64"]) {
        return None;
    }
    let dir = tempfile::tempdir().unwrap();
    let elf = guest_elf(dir.path());
    let disk = dir.path().join("disk.img");
    std::fs::File::create(&disk).unwrap().set_len(8 << 20).unwrap();
    let console = dir.path().join("console.sock");
    let mut cmd = Command::new("qemu-system-x86_64");
    let (machine_arg, suffix) = match machine {
        Machine::Microvm { .. } => ("microvm,acpi=off", "device"),
        Machine::Q35 => ("q35", "pci"),
    };
    cmd.args(["-M", machine_arg, "-accel", "tcg", "-m", "256M", "-nodefaults", "-no-user-config"]);
    cmd.args(["-display", "none", "-serial", "stdio", "-device", "isa-debug-exit,iobase=0xf4,iosize=4"]);
    if machine == (Machine::Microvm { legacy: false }) {
        cmd.args(["-global", "virtio-mmio.force-legacy=false"]);
    }
    let modern = if machine == Machine::Q35 { ",disable-legacy=on" } else { "" };
    cmd.arg("-kernel").arg(&elf).args(["-append", &format!("console=ttyS0 pvkit.completion={completion}")]);
    cmd.args(["-drive", &format!("id=d0,file={},format=raw,if=none", disk.display())]);
    cmd.args(["-device", &format!("virtio-blk-{suffix},drive=d0{modern}")]);
    cmd.args(["-netdev", "user,id=n0", "-device", &format!("virtio-net-{suffix},netdev=n0{modern}")]);
    cmd.args(["-device", &format!("virtio-serial-{suffix}{modern}")]);
    cmd.args(["-chardev", &format!("socket,id=c0,path={},server=on,wait=on", console.display())]);
    cmd.args(["-device", "virtconsole,chardev=c0"]);
    // QEMU waits for this connection before it starts the guest.
    let peer = console_peer_unix(console);
    let out = run_with_timeout(cmd, Duration::from_secs(120));
    let answered = peer.join().unwrap_or(false);
    assert!(answered, "the console peer never saw the guest's ping:\n{}", out.serial);
    Some(out)
}

fn run_with_timeout(mut cmd: Command, timeout: Duration) -> Run {
    let child = cmd.stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped()).spawn().unwrap();
    let id = child.id();
    let watchdog = std::thread::spawn(move || {
        std::thread::sleep(timeout);
        // SAFETY: sends SIGKILL to the QEMU we started (if it is still around).
        unsafe { libc::kill(id as libc::pid_t, libc::SIGKILL) };
    });
    let out = child.wait_with_output().unwrap();
    drop(watchdog);
    let serial = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    Run { serial, status: out.status.code() }
}

const ALL: &[&str] = &["blk_write_read", "blk_flush", "blk_get_id", "net_arp", "console_write", "console_read"];
const IRQ: &[&str] =
    &["blk_irq_routed", "blk_irq_delivered", "net_irq_routed", "net_irq_delivered", "console_irq_routed"];

#[test]
fn microvm_legacy_mmio_polling() {
    if let Some(run) = run("tiny_guest_microvm_poll", Machine::Microvm { legacy: true }, "poll") {
        run.assert_passed(ALL);
        assert!(run.serial.contains("virtio-mmio v1"), "{}", run.serial);
    }
}

#[test]
fn microvm_modern_mmio_interrupts() {
    if let Some(run) = run("tiny_guest_microvm_irq", Machine::Microvm { legacy: false }, "irq") {
        run.assert_passed(&[ALL, IRQ].concat());
        assert!(run.serial.contains("virtio-mmio v2"), "{}", run.serial);
    }
}

#[test]
fn q35_virtio_pci_polling() {
    if let Some(run) = run("tiny_guest_q35_poll", Machine::Q35, "poll") {
        run.assert_passed(ALL);
        assert!(run.serial.contains("\"blk\":\"pci-notify\""), "{}", run.serial);
    }
}

#[test]
fn q35_virtio_pci_msix_interrupts() {
    if let Some(run) = run("tiny_guest_q35_irq", Machine::Q35, "irq") {
        run.assert_passed(&[ALL, IRQ].concat());
    }
}

#[test]
fn q35_with_pvkit_vhost_user_blk() {
    let test = "tiny_guest_q35_vhost_user_blk";
    if !facility::require_programs(test, &["qemu-system-x86_64"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let elf = guest_elf(dir.path());
    let disk = dir.path().join("disk.img");
    std::fs::File::create(&disk).unwrap().set_len(8 << 20).unwrap();
    let socket = dir.path().join("blk.sock");
    let mut backend = Command::new(env!("CARGO_BIN_EXE_pvkit"));
    backend
        .args(["backend", "blk", "--serial", "tiny-guest-disk", "--blk-file"])
        .arg(&disk)
        .arg("--socket-path")
        .arg(&socket);
    let mut backend = ChildGuard::spawn("vhost-user-blk", &mut backend).unwrap();
    backend.wait_for_socket(&socket, Duration::from_secs(10)).unwrap();
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args(["-M", "q35,memory-backend=mem", "-object", "memory-backend-memfd,id=mem,size=256M,share=on"]);
    cmd.args(["-accel", "tcg", "-m", "256M", "-nodefaults", "-no-user-config", "-display", "none", "-serial", "stdio"]);
    cmd.args(["-device", "isa-debug-exit,iobase=0xf4,iosize=4"]);
    cmd.arg("-kernel").arg(&elf).args(["-append", "console=ttyS0"]);
    cmd.args(["-chardev", &format!("socket,id=vb,path={}", socket.display())]);
    cmd.args(["-device", "vhost-user-blk-pci,chardev=vb,disable-legacy=on"]);
    let run = run_with_timeout(cmd, Duration::from_secs(120));
    run.assert_passed(&["blk_write_read", "blk_flush", "blk_get_id"]);
    assert!(run.serial.contains("blk id 'tiny-guest-disk'"), "{}", run.serial);
    let log = backend.terminate(Duration::from_secs(5));
    assert!(log.contains("writes=2") && log.contains("reads=2"), "{log}");
}
