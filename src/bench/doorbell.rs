//! `pvkit bench doorbell`: inside the tiny guest on KVM, the cost of one kick for each doorbell
//! mechanism (MMIO QueueNotify, pvkit's port doorbell) and of a whole block request round
//! trip through each, against pvkit's `vhost-user-blk`. Rounds interleave the two VM
//! configurations (doorbell ports announced or not).

use super::median;
use crate::demo::{Capture, start_backends};
use pvkit_vmm_glue::vm::{self, DeviceSpec, VmConfig};
use std::collections::BTreeMap;
use std::time::Duration;

/// Options of the doorbell benchmark.
#[derive(clap::Args, Debug)]
pub struct DoorbellBenchArgs {
    /// Rounds.
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
}

/// One VM run: the guest's `PVKIT-DOORBELL` lines as (name, microseconds per operation,
/// kicks per operation).
fn one_run(doorbells: bool) -> Result<Vec<(String, f64, f64)>, String> {
    let dir = std::env::temp_dir().join(format!("pvkit-bench-doorbell-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let result = (|| {
        let (backends, sockets, _) = start_backends(&dir, false)?;
        let capture = Capture::default();
        let config = VmConfig {
            kernel: crate::cli::TINY_GUEST_ELF.to_vec(),
            cmdline: "pvkit.mode=doorbell".into(),
            memory: 256 << 20,
            vcpus: 1,
            devices: vec![DeviceSpec { virtio_id: 2, socket: sockets[0].clone() }],
            serial: Box::new(capture.clone()),
            timeout: Duration::from_secs(60),
            reconnect: None,
            doorbells,
            completion: None,
        };
        let report = vm::run(config).map_err(|e| e.to_string())?;
        drop(backends);
        if report.tsc_khz == 0 {
            return Err("KVM did not report the TSC rate".into());
        }
        let khz = report.tsc_khz as f64;
        let log = String::from_utf8_lossy(&capture.bytes.lock().unwrap_or_else(|p| p.into_inner())).into_owned();
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
            return Err(format!("the guest reported no doorbell measurements:\n{log}"));
        }
        Ok(lines)
    })();
    let _ = std::fs::remove_dir_all(&dir);
    result
}

/// Runs the benchmark.
pub fn run(args: &DoorbellBenchArgs) -> Result<(), String> {
    if args.rounds == 0 {
        return Err("--rounds must be positive".into());
    }
    if !pvkit_vmm_glue::kvm_usable() {
        return Err("the doorbell benchmark runs the tiny guest on KVM, and /dev/kvm is not usable here".into());
    }
    let mut samples: BTreeMap<String, (Vec<f64>, Vec<f64>)> = BTreeMap::new();
    let total = args.rounds * 2;
    for round in 0..args.rounds {
        for (i, doorbells) in [true, false].into_iter().enumerate() {
            eprintln!(
                "[{}/{total}] round {}: doorbell ports {}",
                round * 2 + i + 1,
                round + 1,
                if doorbells { "announced" } else { "not announced (MMIO QueueNotify)" }
            );
            for (name, micros, kicks) in one_run(doorbells)? {
                let entry = samples.entry(name).or_default();
                entry.0.push(micros);
                entry.1.push(kicks);
            }
        }
    }
    println!("pvkit bench doorbell: the tiny guest on KVM, pvkit vhost-user-blk, {} round(s)", args.rounds);
    println!("  {:<28} {:>14} {:>23} {:>10}", "operation", "µs (median)", "(min - max)", "kicks/op");
    for (name, (mut micros, mut kicks)) in samples {
        let med = median(&mut micros);
        println!(
            "  {:<28} {:>14.2} {:>10.2} - {:>10.2} {:>10.2}",
            name,
            med,
            micros[0],
            micros[micros.len() - 1],
            median(&mut kicks)
        );
    }
    println!("\nkick-*: one doorbell write; request-*: a 4 KiB read at queue depth 1, submit to completion.");
    if pvkit_vmm_glue::kvm_is_pvm() {
        println!("This KVM is PVM-based: guest instructions are emulated, so these costs include the emulator's.");
    }
    Ok(())
}
