//! `pvkit bench guest`: the whole stack, guest driver to backend and back. pvkit's three
//! backends as processes, and a guest running its benchmark mode through them: the tiny guest
//! on KVM with pvkit's doorbell ports, the same with MMIO QueueNotify, and the software guest
//! (the same drivers in a host thread). Contenders interleaved, round after round.

use super::error::BenchError;
use super::process::{ProcessUsage, own_usage, usage_of};
use super::recorder::Recorder;
use super::report::ProcessStats;
use crate::demo::{Capture, console_host, start_backends};
use pvkit_host_devices::lock;
use pvkit_protocol::virtio::DeviceId;
use pvkit_vmm_glue::guest_report::{BenchLine, GuestResult};
use pvkit_vmm_glue::software_guest::{self, SOFTWARE_TICK_KHZ};
use pvkit_vmm_glue::vm::{self, DeviceSpec, VmConfig};
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

/// Options of the guest benchmark.
#[derive(clap::Args, Debug, Clone)]
pub struct GuestBenchArgs {
    /// Seconds each device is driven per run.
    #[arg(long, default_value_t = 1.0)]
    pub seconds: f64,
    /// Rounds.
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Contender {
    KvmPorts,
    KvmMmio,
    Software,
}

impl Contender {
    fn name(self) -> &'static str {
        match self {
            Contender::KvmPorts => "tiny guest on KVM, port doorbells",
            Contender::KvmMmio => "tiny guest on KVM, MMIO QueueNotify",
            Contender::Software => "software guest (host thread)",
        }
    }
}

fn devices(sockets: &[std::path::PathBuf; 3]) -> Vec<DeviceSpec> {
    [(DeviceId::Block, &sockets[0]), (DeviceId::Net, &sockets[1]), (DeviceId::Console, &sockets[2])]
        .into_iter()
        .map(|(device, socket)| DeviceSpec { device, socket: socket.clone() })
        .collect()
}

/// One run: the serial log, the TSC rate its bench lines count in (kHz), and each process's
/// usage (the three backends, and this process as the VMM or software guest).
fn one_run(contender: Contender, ms: u64) -> Result<(String, u64, Vec<ProcessStats>), BenchError> {
    let dir = std::env::temp_dir().join(format!("pvkit-bench-guest-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(BenchError::io(format!("cannot create {}", dir.display())))?;
    let result = (|| {
        let (backends, sockets, port) = start_backends(&dir, false)?;
        console_host(port, Arc::new(AtomicU64::new(0)));
        let usage_now = || -> Result<Vec<(String, ProcessUsage)>, BenchError> {
            let mut all = vec![("vmm".to_string(), own_usage()?)];
            for (name, pid) in backends.pids() {
                all.push((name.to_string(), usage_of(pid, name)?));
            }
            Ok(all)
        };
        let before = usage_now()?;
        let out = match contender {
            Contender::Software => {
                let report = software_guest::run(&devices(&sockets), 256 << 20, Some(ms))?;
                (report.log, SOFTWARE_TICK_KHZ)
            }
            Contender::KvmPorts | Contender::KvmMmio => {
                let capture = Capture::default();
                let config = VmConfig {
                    kernel: crate::cli::TINY_GUEST_ELF.to_vec(),
                    restore: None,
                    on_started: None,
                    cmdline: format!("pvkit.mode=bench pvkit.bench_ms={ms}"),
                    memory: 256 << 20,
                    vcpus: 1,
                    devices: devices(&sockets),
                    serial: Box::new(capture.clone()),
                    timeout: Duration::from_millis(ms * 6 + 20_000),
                    reconnect: None,
                    doorbells: contender == Contender::KvmPorts,
                    completion: None,
                    control: pvkit_vmm_glue::control::VmControl::new(),
                    sandbox: pvkit_vmm_glue::seccomp::ThreadSandbox::On,
                };
                let report = vm::run(config)?;
                let log = String::from_utf8_lossy(&lock(&capture.bytes)).into_owned();
                let khz = report.tsc_khz;
                (log, khz)
            }
        };
        let after = usage_now()?;
        let processes = after
            .iter()
            .zip(&before)
            .map(|((role, now), (_, then))| ProcessStats::new(role, &now.since(then)))
            .collect();
        drop(backends);
        Ok((out.0, out.1, processes))
    })();
    let _ = std::fs::remove_dir_all(&dir);
    result
}

/// Runs the benchmark into `rec`.
pub fn run(args: &GuestBenchArgs, rec: &mut Recorder) -> Result<(), BenchError> {
    if args.rounds == 0 || !args.seconds.is_finite() || args.seconds < 0.01 || args.seconds > 600.0 {
        return Err(BenchError::Options("--rounds must be positive and --seconds between 0.01 and 600".into()));
    }
    let ms = (args.seconds * 1000.0).round() as u64;
    let mut contenders = Vec::new();
    if pvkit_vmm_glue::kvm_usable() {
        contenders.extend([Contender::KvmPorts, Contender::KvmMmio]);
    } else {
        eprintln!("pvkit bench guest: /dev/kvm is not usable here; only the software guest runs");
    }
    contenders.push(Contender::Software);
    rec.begin("guest", format!("{args:?}"), args.rounds * contenders.len());
    rec.note(format!(
        "pvkit bench guest: guest driver -> doorbell -> pvkit backend -> used ring polled by the guest; {} round(s) of {ms} ms per device, interleaved",
        args.rounds
    ));
    if pvkit_vmm_glue::kvm_is_pvm() {
        rec.note(
            "This KVM is PVM-based: the tiny guest's instructions are emulated, so its rates measure the emulator.",
        );
    }
    for round in 0..args.rounds {
        for &contender in &contenders {
            rec.step(format!("round {}: {}", round + 1, contender.name()));
            let (log, khz, processes) = one_run(contender, ms)?;
            if !GuestResult::parse(&log).is_some_and(|r| r.all_passed()) {
                return Err(BenchError::Measurement(format!(
                    "{}: the guest's self-test failed:\n{log}",
                    contender.name()
                )));
            }
            let lines = BenchLine::parse_all(&log);
            for (device, case, metric, scale) in [
                ("blk", "blk: 4 KiB random reads, 16 in flight", "IOPS", 1.0),
                ("net", "net: 64-byte frames, loopback", "packets/s", 1.0),
                ("console", "console: 512-byte writes", "MB/s", 1e-6),
            ] {
                let Some(line) = lines.iter().find(|l| l.name == device) else {
                    return Err(BenchError::Measurement(format!(
                        "{}: the guest printed no {device} benchmark line:\n{log}",
                        contender.name()
                    )));
                };
                let seconds = line.seconds(khz).max(1e-9);
                let count = if device == "console" { line.bytes } else { line.ops };
                let mut sample = rec.sample(case, contender.name(), round);
                sample.group = "whole stack".into();
                sample.x_label = "device".into();
                (sample.metric, sample.value) = (metric.into(), count as f64 / seconds * scale);
                let kicks_per_op = if line.ops > 0 { line.kicks as f64 / line.ops as f64 } else { 0.0 };
                sample.extra.insert("kicks_per_op".into(), kicks_per_op);
                sample.processes.clone_from(&processes);
                rec.push(sample);
            }
        }
    }
    rec.ran(format!("{} guest(s)", contenders.len()));
    Ok(())
}
