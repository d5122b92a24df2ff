//! The VMM's device model without a vCPU (no KVM needed): a virtio-mmio console device whose
//! backend is pvkit's `vhost-user-console` on a pty. Resizing the pty makes the backend send a
//! config-change message; the device raises CONFIG in its interrupt status, starts a new config
//! generation and serves the new size, with the registers read the way a vCPU exit (or the
//! software guest) reads them.

use pvkit_protocol::mmio::{Register, interrupt};
use pvkit_test_support::process::ChildGuard;
use pvkit_test_support::terminal;
use pvkit_vmm_glue::device::VirtioDevice;
use pvkit_vmm_glue::memory::GuestRam;
use std::path::PathBuf;
use std::time::{Duration, Instant};

fn read(device: &mut VirtioDevice, offset: u64) -> u32 {
    let mut data = [0u8; 4];
    device.mmio_read(offset, &mut data);
    u32::from_le_bytes(data)
}

fn size(device: &mut VirtioDevice) -> (u16, u16) {
    // virtio-console config: cols, then rows (16 bits each), at the start of the config space.
    let raw = read(device, 0x100);
    (raw as u16, (raw >> 16) as u16)
}

#[test]
fn a_backend_config_change_raises_config_and_a_new_generation() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("console.sock");
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_pvkit"));
    cmd.args(["backend", "console", "--port", "pty", "--socket-path"]).arg(&socket);
    let mut backend = ChildGuard::spawn("vhost-user-console", &mut cmd).unwrap();
    let line = backend.stderr_line_with(" is pty ").unwrap();
    let pty = PathBuf::from(line.trim().rsplit(" is pty ").next().unwrap());
    let term = terminal::open_raw(&pty, 25, 80).unwrap();
    backend.wait_for_socket(&socket, Duration::from_secs(10)).unwrap();

    let ram = GuestRam::new(16 << 20).unwrap();
    let mut device = VirtioDevice::connect(pvkit_protocol::virtio::DeviceId::Console, 0, socket, &ram).unwrap();
    assert!(device.backend_requests_fd().is_some(), "the console backend offers BACKEND_REQ");
    assert_eq!(size(&mut device), (80, 25));
    let generation = read(&mut device, Register::ConfigGeneration.offset());
    assert_eq!(read(&mut device, Register::InterruptStatus.offset()) & interrupt::CONFIG, 0);

    terminal::resize(&term, 40, 132).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while device.poll_backend_requests() == 0 {
        assert!(Instant::now() < deadline, "no config-change message after the resize");
        std::thread::sleep(Duration::from_millis(20));
    }
    let status = read(&mut device, Register::InterruptStatus.offset());
    assert_eq!(status & interrupt::CONFIG, interrupt::CONFIG, "status {status:#x}");
    assert_eq!(read(&mut device, Register::ConfigGeneration.offset()), generation.wrapping_add(1));
    assert_eq!(size(&mut device), (132, 40));
    // The driver acknowledges it; nothing new is pending.
    device.mmio_write(Register::InterruptAck.offset(), &interrupt::CONFIG.to_le_bytes(), &ram);
    assert_eq!(read(&mut device, Register::InterruptStatus.offset()) & interrupt::CONFIG, 0);
    assert_eq!(device.poll_backend_requests(), 0);
    // A second resize is a second change.
    terminal::resize(&term, 50, 100).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while device.poll_backend_requests() == 0 {
        assert!(Instant::now() < deadline, "no second config-change message");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(read(&mut device, Register::ConfigGeneration.offset()), generation.wrapping_add(2));
    assert_eq!(size(&mut device), (100, 50));
    backend.check_running().unwrap();
}
