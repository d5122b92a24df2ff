//! The demo on the software guest (where /dev/kvm is not usable).

use pvkit_protocol::virtio::DeviceId;
use pvkit_vmm_glue::software_guest;
use pvkit_vmm_glue::vcpu::Outcome;
use pvkit_vmm_glue::vm::{DeviceReport, DeviceSpec, RunReport};
use std::path::PathBuf;
use std::time::Instant;

/// Runs the self-test and the benchmark on the software guest and prints the demo summary.
pub fn demo(
    sockets: &[PathBuf; 3],
    console_bytes: &std::sync::atomic::AtomicU64,
) -> Result<bool, crate::demo::DemoError> {
    let started = Instant::now();
    let devices = [(DeviceId::Block, &sockets[0]), (DeviceId::Net, &sockets[1]), (DeviceId::Console, &sockets[2])]
        .map(|(device, socket)| DeviceSpec { device, socket: socket.clone() });
    let report = software_guest::run(&devices, 256 << 20, Some(1000))?;
    let passed = pvkit_vmm_glue::guest_report::GuestResult::parse(&report.log).is_some_and(|r| r.all_passed());
    let run_report = RunReport {
        outcome: Outcome::Exited(if passed { 0 } else { 1 }),
        cmdline: String::new(),
        devices: report
            .devices
            .iter()
            .map(|(name, features)| DeviceReport { name: name.clone(), features: *features, violations: 0 })
            .collect(),
        elapsed: started.elapsed(),
        tsc_khz: software_guest::SOFTWARE_TICK_KHZ,
        ready_after: std::time::Duration::ZERO,
    };
    std::thread::sleep(std::time::Duration::from_millis(100));
    let received = console_bytes.load(std::sync::atomic::Ordering::Relaxed);
    Ok(crate::demo::summary(&run_report, &report.log, received, "the software guest"))
}
