//! `pvkit bench guest`: the whole stack, guest driver to backend and back. pvkit's three
//! backends as processes, and a guest running its benchmark mode through them: the tiny guest
//! on KVM with pvkit's doorbell ports, the same with MMIO QueueNotify, and the software guest
//! (the same drivers in a host thread). Contenders interleaved, round after round.

use super::median;
use crate::demo::{Capture, console_host, start_backends};
use pvkit_vmm_glue::guest_report::{BenchLine, GuestResult};
use pvkit_vmm_glue::software_guest::{self, SOFTWARE_TICK_KHZ};
use pvkit_vmm_glue::vm::{self, DeviceSpec, VmConfig};
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

/// Options of the guest benchmark.
#[derive(clap::Args, Debug)]
pub struct GuestBenchArgs {
    /// Milliseconds each device is driven per run.
    #[arg(long, default_value_t = 1000)]
    pub ms: u64,
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

struct Sample {
    contender: Contender,
    device: String,
    rate: f64,
    kicks_per_op: f64,
}

fn devices(sockets: &[std::path::PathBuf; 3]) -> Vec<DeviceSpec> {
    [(2, &sockets[0]), (1, &sockets[1]), (3, &sockets[2])]
        .into_iter()
        .map(|(virtio_id, socket)| DeviceSpec { virtio_id, socket: socket.clone() })
        .collect()
}

/// One run: (serial log, TSC kHz the bench lines count in).
fn one_run(contender: Contender, ms: u64) -> Result<(String, u64), String> {
    let dir = std::env::temp_dir().join(format!("pvkit-bench-guest-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let result = (|| {
        let (backends, sockets, port) = start_backends(&dir, false)?;
        console_host(port, Arc::new(AtomicU64::new(0)));
        let out = match contender {
            Contender::Software => {
                let report = software_guest::run(&devices(&sockets), 256 << 20, Some(ms)).map_err(|e| e.to_string())?;
                (report.log, SOFTWARE_TICK_KHZ)
            }
            Contender::KvmPorts | Contender::KvmMmio => {
                let capture = Capture::default();
                let config = VmConfig {
                    kernel: crate::cli::TINY_GUEST_ELF.to_vec(),
                    cmdline: format!("pvkit.mode=bench pvkit.bench_ms={ms}"),
                    memory: 256 << 20,
                    vcpus: 1,
                    devices: devices(&sockets),
                    serial: Box::new(capture.clone()),
                    timeout: Duration::from_millis(ms * 6 + 20_000),
                    reconnect: None,
                    doorbells: contender == Contender::KvmPorts,
                    completion: None,
                };
                let report = vm::run(config).map_err(|e| e.to_string())?;
                let log =
                    String::from_utf8_lossy(&capture.bytes.lock().unwrap_or_else(|p| p.into_inner())).into_owned();
                let khz = report.tsc_khz;
                (log, khz)
            }
        };
        drop(backends);
        Ok(out)
    })();
    let _ = std::fs::remove_dir_all(&dir);
    result
}

/// Runs the benchmark.
pub fn run(args: &GuestBenchArgs) -> Result<(), String> {
    if args.rounds == 0 || args.ms == 0 {
        return Err("--rounds and --ms must be positive".into());
    }
    let mut contenders = Vec::new();
    if pvkit_vmm_glue::kvm_usable() {
        contenders.extend([Contender::KvmPorts, Contender::KvmMmio]);
    } else {
        eprintln!("pvkit bench guest: /dev/kvm is not usable here; only the software guest runs");
    }
    contenders.push(Contender::Software);
    let total = args.rounds * contenders.len();
    let mut samples = Vec::new();
    let mut done = 0;
    for round in 0..args.rounds {
        for &contender in &contenders {
            done += 1;
            eprintln!("[{done}/{total}] round {}: {}", round + 1, contender.name());
            let (log, khz) = one_run(contender, args.ms)?;
            if !GuestResult::parse(&log).is_some_and(|r| r.all_passed()) {
                return Err(format!("{}: the guest's self-test failed:\n{log}", contender.name()));
            }
            for line in BenchLine::parse_all(&log) {
                let seconds = line.seconds(khz).max(1e-9);
                let rate = if line.name == "console" { line.bytes as f64 / seconds } else { line.ops as f64 / seconds };
                let kicks_per_op = if line.ops > 0 { line.kicks as f64 / line.ops as f64 } else { 0.0 };
                samples.push(Sample { contender, device: line.name.clone(), rate, kicks_per_op });
            }
        }
    }
    println!(
        "pvkit bench guest: guest driver -> doorbell -> pvkit backend -> used ring polled by the guest; {} round(s) of {} ms per device, interleaved",
        args.rounds, args.ms
    );
    for (device, unit, scale) in [
        ("blk", "IOPS (4 KiB random reads, 16 in flight)", 1.0),
        ("net", "packets/s (64 bytes, loopback)", 1.0),
        ("console", "MB/s (512-byte writes)", 1e-6),
    ] {
        println!("\n{device}: {unit}");
        println!("  {:<38} {:>12} {:>25} {:>8} {:>10}", "guest", "median", "(min - max)", "ratio", "kicks/op");
        let mut first = None;
        for &contender in &contenders {
            let group: Vec<&Sample> =
                samples.iter().filter(|s| s.contender == contender && s.device == device).collect();
            if group.is_empty() {
                continue;
            }
            let mut rates: Vec<f64> = group.iter().map(|s| s.rate * scale).collect();
            let med = median(&mut rates);
            let (min, max) = (rates[0], rates[rates.len() - 1]);
            let mut kicks: Vec<f64> = group.iter().map(|s| s.kicks_per_op).collect();
            let base = *first.get_or_insert(med);
            println!(
                "  {:<38} {:>12.1} {:>12.1} - {:>10.1} {:>8.3} {:>10.3}",
                contender.name(),
                med,
                min,
                max,
                if base > 0.0 { med / base } else { 0.0 },
                median(&mut kicks)
            );
        }
    }
    if pvkit_vmm_glue::kvm_is_pvm() {
        println!(
            "\nThis KVM is PVM-based: the tiny guest's instructions are emulated, so its rates measure the emulator."
        );
    }
    Ok(())
}
