//! `pvkit bench console`: guest-to-host throughput of pvkit's vhost-user-console through one
//! unix-socket port, the guest played by pvkit's host-side frontend and driver.

use super::process::{ProcessUsage, Spawned};
use pvkit_host_devices::{BackendKind, backend_command};
use pvkit_vmm_glue::host_frontend::{Buffer, HostFrontend};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};
use vm_memory::{Bytes, GuestAddress};

/// Options of the console benchmark.
#[derive(clap::Args, Debug)]
pub struct ConsoleBenchArgs {
    /// Seconds each measurement runs.
    #[arg(long, default_value_t = 2.0)]
    pub seconds: f64,
    /// Rounds.
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// Bytes per guest write (one descriptor each).
    #[arg(long, default_value_t = 4096)]
    pub write_size: u32,
    /// Writes kept in flight.
    #[arg(long, default_value_t = 64)]
    pub in_flight: usize,
}

struct Sample {
    mbps: f64,
    usage: ProcessUsage,
}

fn one_round(args: &ConsoleBenchArgs, work: &Path) -> Result<Sample, String> {
    let socket = work.join("console.sock");
    let port = work.join("port.sock");
    let exe = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("pvkit"));
    let mut cmd = backend_command(&exe, BackendKind::Console);
    cmd.arg("--socket-path").arg(&socket).arg("--port").arg(format!("unix:{}", port.display()));
    let child = Spawned::start("vhost-user-console", &mut cmd, &socket, &work.join("backend.log"))?;
    let received = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let reader = {
        let (received, done, port) = (received.clone(), done.clone(), port.clone());
        std::thread::spawn(move || -> Result<(), String> {
            let mut stream = std::os::unix::net::UnixStream::connect(&port).map_err(|e| format!("port: {e}"))?;
            stream.set_read_timeout(Some(Duration::from_millis(100))).map_err(|e| e.to_string())?;
            let mut buf = vec![0u8; 256 * 1024];
            while !done.load(Ordering::Relaxed) {
                match stream.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => {
                        received.fetch_add(n as u64, Ordering::Relaxed);
                    }
                    Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
                    Err(e) => return Err(e.to_string()),
                }
            }
            Ok(())
        })
    };
    let mut fe = HostFrontend::connect(&socket, 64 << 20, 2, 256, 1 << 32).map_err(|e| e.to_string())?;
    let size = args.write_size;
    let mut free: Vec<u64> = Vec::new();
    for i in 0..args.in_flight {
        let addr = fe.alloc(size.into(), 64).map_err(|e| e.to_string())?;
        let data: Vec<u8> = (0..size).map(|b| (b as usize + i) as u8).collect();
        fe.mem().write_slice(&data, GuestAddress(addr)).map_err(|e| e.to_string())?;
        free.push(addr);
    }
    let mut in_flight = std::collections::HashMap::new();
    let before = child.usage()?;
    let start = Instant::now();
    let duration = Duration::from_secs_f64(args.seconds);
    let mut sent = 0u64;
    while start.elapsed() < duration {
        while let Some(addr) = free.pop() {
            let head = fe.submit(1, &[Buffer { addr, len: size, device_writes: false }]).map_err(|e| e.to_string())?;
            in_flight.insert(head, addr);
        }
        let (head, _) = fe.wait_used(1, Duration::from_secs(5)).map_err(|e| e.to_string())?;
        sent += u64::from(size);
        free.push(in_flight.remove(&head).ok_or("used id that was never submitted")?);
    }
    // Count what reached the host side by the end of the window.
    let elapsed = start.elapsed();
    let got = received.load(Ordering::Relaxed);
    let usage = child.usage()?.since(&before);
    done.store(true, Ordering::Relaxed);
    child.stop();
    let _ = reader.join();
    if got == 0 || sent == 0 {
        return Err("no data went through".into());
    }
    Ok(Sample { mbps: got as f64 / elapsed.as_secs_f64() / 1e6, usage })
}

/// Runs the benchmark and prints its result.
pub fn run(args: &ConsoleBenchArgs) -> Result<(), String> {
    if args.rounds == 0
        || !args.seconds.is_finite()
        || args.seconds <= 0.0
        || args.write_size == 0
        || args.in_flight == 0
    {
        return Err("--rounds, --seconds, --write-size and --in-flight must be positive".into());
    }
    let work = std::env::temp_dir().join(format!("pvkit-bench-console-{}", std::process::id()));
    std::fs::create_dir_all(&work).map_err(|e| format!("{}: {e}", work.display()))?;
    let mut samples = Vec::new();
    for round in 0..args.rounds {
        eprintln!("[{}/{}] console guest-to-host", round + 1, args.rounds);
        let sample = one_round(args, &work);
        let _ = std::fs::remove_file(work.join("console.sock"));
        match sample {
            Ok(s) => samples.push(s),
            Err(e) => {
                let _ = std::fs::remove_dir_all(&work);
                return Err(e);
            }
        }
    }
    let _ = std::fs::remove_dir_all(&work);
    let mut mbps: Vec<f64> = samples.iter().map(|s| s.mbps).collect();
    let mut cpu: Vec<f64> = samples.iter().map(|s| s.usage.cpu_fraction() * 100.0).collect();
    let (mbps_median, cpu_median) = (super::median(&mut mbps), super::median(&mut cpu));
    let rss = samples.iter().map(|s| s.usage.peak_rss_kib).max().unwrap_or(0);
    println!(
        "pvkit bench console: guest-to-host, {}-byte writes, {} in flight, one unix-socket port, {} round(s) of {} s",
        args.write_size, args.in_flight, args.rounds, args.seconds
    );
    println!("  {:<34} {:>10} {:>21} {:>6} {:>9}", "backend", "MB/s", "(min - max)", "CPU", "peak RSS");
    println!(
        "  {:<34} {:>10.1} {:>10.1} - {:>8.1} {:>5.0}% {:>6} MiB",
        "pvkit vhost-user-console",
        mbps_median,
        mbps[0],
        mbps[mbps.len() - 1],
        cpu_median,
        rss / 1024
    );
    Ok(())
}
