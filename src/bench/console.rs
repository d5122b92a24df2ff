//! `pvkit bench console`: guest-to-host and host-to-guest throughput of pvkit's
//! vhost-user-console through one unix-socket port, the guest played by pvkit's host-side
//! frontend and driver, the directions interleaved.

use super::error::BenchError;
use super::process::{ProcessUsage, Spawned, own_usage};
use super::recorder::Recorder;
use super::report::ProcessStats;
use pvkit_host_devices::{BackendKind, backend_command};
use pvkit_protocol::virtio::{Features, feature};
use pvkit_vmm_glue::host_frontend::{Buffer, HostFrontend};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};
use vm_memory::{Bytes, GuestAddress};

/// Options of the console benchmark.
#[derive(clap::Args, Debug, Clone)]
pub struct ConsoleBenchArgs {
    /// Seconds each measurement runs.
    #[arg(long, default_value_t = 2.0)]
    pub seconds: f64,
    /// Rounds.
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// Bytes per guest buffer (one descriptor each), written or posted for receiving.
    #[arg(long, default_value_t = 4096)]
    pub write_size: u32,
    /// Buffers kept in flight.
    #[arg(long, default_value_t = 64)]
    pub in_flight: usize,
}

/// Which way the bytes go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Direction {
    GuestToHost,
    HostToGuest,
}

impl Direction {
    fn name(self) -> &'static str {
        match self {
            Direction::GuestToHost => "guest to host",
            Direction::HostToGuest => "host to guest",
        }
    }
}

struct Measured {
    mbps: f64,
    backend: ProcessUsage,
    frontend: ProcessUsage,
}

/// The port's host side: reads everything (guest to host, counting) or writes as fast as the
/// backend takes it (host to guest), until `done`.
fn host_side(
    port: PathBuf,
    direction: Direction,
    received: Arc<AtomicU64>,
    done: Arc<AtomicBool>,
) -> std::thread::JoinHandle<Result<(), BenchError>> {
    std::thread::spawn(move || {
        let mut stream =
            std::os::unix::net::UnixStream::connect(&port).map_err(BenchError::io("connecting to the console port"))?;
        stream.set_read_timeout(Some(Duration::from_millis(100))).map_err(BenchError::io("console port timeout"))?;
        stream.set_write_timeout(Some(Duration::from_millis(100))).map_err(BenchError::io("console port timeout"))?;
        let mut buf = vec![0x5au8; 256 * 1024];
        while !done.load(Ordering::Relaxed) {
            let result = match direction {
                Direction::GuestToHost => stream.read(&mut buf),
                Direction::HostToGuest => stream.write(&buf),
            };
            match result {
                Ok(0) => break,
                Ok(n) => {
                    received.fetch_add(n as u64, Ordering::Relaxed);
                }
                Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
                Err(e) => return Err(BenchError::io("moving data through the console port")(e)),
            }
        }
        Ok(())
    })
}

fn one_round(args: &ConsoleBenchArgs, work: &Path, direction: Direction) -> Result<Measured, BenchError> {
    let socket = work.join("console.sock");
    let port = work.join("port.sock");
    let exe = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("pvkit"));
    let mut cmd = backend_command(&exe, BackendKind::Console);
    cmd.arg("--socket-path").arg(&socket).arg("--port").arg(format!("unix:{}", port.display()));
    let child = Spawned::start("vhost-user-console", &mut cmd, &socket, &work.join("backend.log"))?;
    let host_bytes = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let host = host_side(port, direction, host_bytes.clone(), done.clone());
    let mut fe = HostFrontend::connect(&socket, 64 << 20, 2, 256, Features::from_bits(&[feature::VERSION_1]).0)?;
    let size = args.write_size;
    let mut free: Vec<u64> = Vec::new();
    for i in 0..args.in_flight {
        let addr = fe.alloc(size.into(), 64)?;
        let data: Vec<u8> = (0..size).map(|b| (b as usize + i) as u8).collect();
        fe.mem().write_slice(&data, GuestAddress(addr))?;
        free.push(addr);
    }
    // Queue 0 receives (host to guest), queue 1 transmits (guest to host).
    let (queue, device_writes) = match direction {
        Direction::GuestToHost => (1, false),
        Direction::HostToGuest => (0, true),
    };
    let mut in_flight = std::collections::HashMap::new();
    let (before, own_before) = (child.usage()?, own_usage()?);
    let start = Instant::now();
    let duration = Duration::from_secs_f64(args.seconds);
    let mut guest_bytes = 0u64;
    let host_at_start = host_bytes.load(Ordering::Relaxed);
    while start.elapsed() < duration {
        while let Some(addr) = free.pop() {
            let head = fe.submit(queue, &[Buffer { addr, len: size, device_writes }])?;
            in_flight.insert(head, addr);
        }
        let (head, len) = fe.wait_used(queue, Duration::from_secs(5))?;
        guest_bytes += if device_writes { u64::from(len) } else { u64::from(size) };
        free.push(
            in_flight
                .remove(&head)
                .ok_or_else(|| BenchError::Measurement("used id that was never submitted".into()))?,
        );
    }
    let elapsed = start.elapsed();
    // Guest to host counts what reached the host side; host to guest what the guest got.
    let moved = match direction {
        Direction::GuestToHost => host_bytes.load(Ordering::Relaxed) - host_at_start,
        Direction::HostToGuest => guest_bytes,
    };
    let (backend, frontend) = (child.usage()?.since(&before), own_usage()?.since(&own_before));
    done.store(true, Ordering::Relaxed);
    child.stop();
    let _ = host.join();
    if moved == 0 {
        return Err(BenchError::Measurement(format!("{}: no data went through", direction.name())));
    }
    Ok(Measured { mbps: moved as f64 / elapsed.as_secs_f64() / 1e6, backend, frontend })
}

/// Runs the benchmark into `rec`.
pub fn run(args: &ConsoleBenchArgs, rec: &mut Recorder) -> Result<(), BenchError> {
    if args.rounds == 0
        || !args.seconds.is_finite()
        || args.seconds <= 0.0
        || args.write_size == 0
        || args.in_flight == 0
        || args.in_flight > 256
    {
        return Err(BenchError::Options(
            "--rounds, --seconds, --write-size and --in-flight (at most 256) must be positive".into(),
        ));
    }
    let directions = [Direction::GuestToHost, Direction::HostToGuest];
    rec.begin("console", format!("{args:?}"), args.rounds * directions.len());
    rec.note(format!(
        "pvkit bench console: {}-byte buffers, {} in flight, one unix-socket port, {} round(s) of {} s, directions interleaved",
        args.write_size, args.in_flight, args.rounds, args.seconds
    ));
    let work = std::env::temp_dir().join(format!("pvkit-bench-console-{}", std::process::id()));
    std::fs::create_dir_all(&work).map_err(BenchError::io(format!("{}", work.display())))?;
    let result = (|| {
        for round in 0..args.rounds {
            for direction in directions {
                rec.step(format!("round {} {}", round + 1, direction.name()));
                let measured = one_round(args, &work, direction);
                let _ = std::fs::remove_file(work.join("console.sock"));
                let measured = measured?;
                let mut sample = rec.sample(direction.name(), "pvkit vhost-user-console", round);
                sample.group = "throughput".into();
                sample.x_label = "direction".into();
                (sample.metric, sample.value) = ("MB/s".into(), measured.mbps);
                if let Some(per_mb) = measured.backend.cpu_per_op(measured.mbps, 1e6) {
                    sample.extra.insert("backend_cpu_us_per_MB".into(), per_mb);
                }
                sample.processes = vec![
                    ProcessStats::new("backend", &measured.backend),
                    ProcessStats::new("frontend", &measured.frontend),
                ];
                rec.push(sample);
            }
        }
        Ok::<(), BenchError>(())
    })();
    let _ = std::fs::remove_dir_all(&work);
    result?;
    rec.ran("pvkit only: no other vhost-user console backend here is fit for throughput");
    Ok(())
}
