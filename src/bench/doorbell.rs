//! `pvkit bench doorbell`: inside the tiny guest on KVM, the cost of one kick for each doorbell
//! mechanism (MMIO QueueNotify, pvkit's port doorbell), of a whole block request round trip,
//! and of requests at queue depths 1, 4 and 16 with the kicks each needs, against pvkit's
//! `vhost-user-blk`, with RING_EVENT_IDX on and off. Rounds interleave the four VM
//! configurations (doorbell ports announced or not, event-idx on or off).

use super::error::BenchError;
use super::process::{own_usage, usage_of};
use super::recorder::Recorder;
use super::report::ProcessStats;
use crate::demo::{Capture, start_backends};
use pvkit_host_devices::lock;
use pvkit_protocol::virtio::DeviceId;
use pvkit_vmm_glue::vm::{self, DeviceSpec, VmConfig};
use std::time::Duration;

/// Options of the doorbell benchmark.
#[derive(clap::Args, Debug, Clone)]
pub struct DoorbellBenchArgs {
    /// Rounds.
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
}

/// One VM configuration.
#[derive(Debug, Clone, Copy)]
struct Setup {
    doorbells: bool,
    event_idx: bool,
}

impl Setup {
    fn name(self) -> String {
        format!(
            "{}, event-idx {}",
            if self.doorbells { "port doorbell" } else { "MMIO QueueNotify" },
            if self.event_idx { "on" } else { "off" }
        )
    }
}

type Lines = Vec<(String, f64, f64)>;

/// One VM run: the guest's `PVKIT-DOORBELL` lines as (name, microseconds per operation,
/// kicks per operation), and the processes' usage (the block backend, the VMM).
fn one_run(setup: Setup) -> Result<(Lines, Vec<ProcessStats>), BenchError> {
    let dir = std::env::temp_dir().join(format!("pvkit-bench-doorbell-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(BenchError::io(format!("cannot create {}", dir.display())))?;
    let result = (|| {
        let (backends, sockets, _) = start_backends(&dir, false)?;
        let blk_name = pvkit_host_devices::BackendKind::Blk.program_name();
        let blk_pid = backends
            .pids()
            .into_iter()
            .find_map(|(name, pid)| (name == blk_name).then_some(pid))
            .ok_or_else(|| BenchError::Measurement("the block backend did not start".into()))?;
        let (blk_before, vmm_before) = (usage_of(blk_pid, blk_name)?, own_usage()?);
        let capture = Capture::default();
        let config = VmConfig {
            kernel: crate::cli::TINY_GUEST_ELF.to_vec(),
            restore: None,
            on_started: None,
            cmdline: format!("pvkit.mode=doorbell pvkit.event_idx={}", if setup.event_idx { "on" } else { "off" }),
            memory: 256 << 20,
            vcpus: 1,
            devices: vec![DeviceSpec { device: DeviceId::Block, socket: sockets[0].clone() }],
            serial: Box::new(capture.clone()),
            timeout: Duration::from_secs(60),
            reconnect: None,
            doorbells: setup.doorbells,
            completion: None,
            control: pvkit_vmm_glue::control::VmControl::new(),
            sandbox: pvkit_vmm_glue::seccomp::ThreadSandbox::On,
        };
        let report = vm::run(config)?;
        let processes = vec![
            ProcessStats::new("backend", &usage_of(blk_pid, blk_name)?.since(&blk_before)),
            ProcessStats::new("vmm", &own_usage()?.since(&vmm_before)),
        ];
        drop(backends);
        if report.tsc_khz == 0 {
            return Err(BenchError::Measurement("KVM did not report the TSC rate".into()));
        }
        let khz = report.tsc_khz as f64;
        let log = String::from_utf8_lossy(&lock(&capture.bytes)).into_owned();
        let mut lines = Vec::new();
        for line in log.lines().filter_map(|l| l.trim_end().strip_prefix("PVKIT-DOORBELL ")) {
            let mut words = line.split_whitespace();
            let Some(name) = words.next() else { continue };
            let field = |key: &str| -> Option<f64> {
                line.split_whitespace().find_map(|w| w.strip_prefix(key)?.strip_prefix('=')?.parse().ok())
            };
            let (Some(ticks), Some(n)) = (field("ticks"), field("n")) else { continue };
            if n > 0.0 {
                let micros = ticks / n / khz * 1000.0;
                lines.push((name.to_string(), micros, field("kicks").map_or(1.0, |k| k / n)));
            }
        }
        if lines.is_empty() {
            return Err(BenchError::Measurement(format!("the guest reported no doorbell measurements:\n{log}")));
        }
        Ok((lines, processes))
    })();
    let _ = std::fs::remove_dir_all(&dir);
    result
}

/// Runs the benchmark into `rec`.
pub fn run(args: &DoorbellBenchArgs, rec: &mut Recorder) -> Result<(), BenchError> {
    if args.rounds == 0 {
        return Err(BenchError::Options("--rounds must be positive".into()));
    }
    if !pvkit_vmm_glue::kvm_usable() {
        return Err(BenchError::Measurement(
            "the doorbell benchmark runs the tiny guest on KVM, and /dev/kvm is not usable here".into(),
        ));
    }
    let setups = [true, false]
        .into_iter()
        .flat_map(|doorbells| [true, false].map(|event_idx| Setup { doorbells, event_idx }))
        .collect::<Vec<_>>();
    rec.begin("doorbell", format!("{args:?}"), args.rounds * setups.len());
    rec.note(format!(
        "pvkit bench doorbell: the tiny guest on KVM, pvkit vhost-user-blk, {} round(s), VM configurations interleaved",
        args.rounds
    ));
    rec.note("kick: one doorbell write; round trip: a 4 KiB read at QD 1, submit to completion; QD N: 4 KiB reads with N in flight, time per request.");
    if pvkit_vmm_glue::kvm_is_pvm() {
        rec.note("This KVM is PVM-based: guest instructions are emulated, so these costs include the emulator's.");
    }
    for round in 0..args.rounds {
        for &setup in &setups {
            rec.step(format!("round {}: {}", round + 1, setup.name()));
            let (lines, processes) = one_run(setup)?;
            for (name, micros, kicks) in lines {
                let (case, group, x) = if let Some(mechanism) = name.strip_prefix("kick-") {
                    // Both mechanisms are measured when the ports are announced; each kick
                    // case belongs to its own mechanism, whatever the configuration.
                    (format!("one kick: {mechanism}"), "one kick".to_string(), None)
                } else if name.starts_with("request-") {
                    ("round trip at QD 1".to_string(), "round trip".to_string(), None)
                } else if let Some(depth) = name.strip_prefix("qd").and_then(|r| r.split('-').next()) {
                    let depth: f64 =
                        depth.parse().map_err(|_| BenchError::Measurement(format!("odd doorbell line {name}")))?;
                    (format!("requests at QD {depth}"), "time per request by queue depth".to_string(), Some(depth))
                } else {
                    continue;
                };
                let mut sample = rec.sample(case, setup.name(), round);
                sample.group = group;
                sample.x = x;
                sample.x_label = if x.is_some() { "queue depth".into() } else { "operation".into() };
                (sample.metric, sample.value, sample.higher_is_better) = ("µs".into(), micros, false);
                if !name.starts_with("kick-") {
                    sample.extra.insert("kicks_per_op".into(), kicks);
                }
                sample.processes.clone_from(&processes);
                rec.push(sample);
            }
        }
    }
    rec.ran(format!("{} VM configurations", setups.len()));
    Ok(())
}
