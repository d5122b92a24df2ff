//! `pvkit bench net`: frames per second through a vhost-user-net backend, with DPDK's testpmd
//! and its `net_virtio_user` PMD as the generator, contenders interleaved. Two modes:
//! - sink: the generator transmits (txonly) into pvkit `vhost-user-net --sink` (polling on,
//!   and `--poll-us 0`) and DPDK's own `net_vhost` PMD in rxonly mode; the rate is what the
//!   backend took from the ring;
//! - loop: every frame goes back to the generator (testpmd `io` forwarding after
//!   `--tx-first`), through pvkit `--loopback` and through `net_vhost` in `io` forwarding;
//!   both backends copy every frame out of one ring and into the other, and the rate is what
//!   came back to the generator.

use super::error::BenchError;
use super::median;
use super::process::{ProcessUsage, Spawned, usage_of};
use super::recorder::Recorder;
use super::report::ProcessStats;
use pvkit_host_devices::lock;
use pvkit_host_devices::{BackendKind, backend_command};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Options of the net benchmark.
#[derive(clap::Args, Debug, Clone)]
pub struct NetBenchArgs {
    /// Seconds each measurement runs (after a one-second warm-up).
    #[arg(long, default_value_t = 3.0)]
    pub seconds: f64,
    /// Rounds (each contender once per round, interleaved).
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// Frame sizes in bytes.
    #[arg(long, value_delimiter = ',', default_values_t = [64u16, 1500])]
    pub frame_sizes: Vec<u16>,
    /// Leave DPDK's net_vhost out (measure pvkit alone).
    #[arg(long)]
    pub no_dpdk_peer: bool,
    /// Also run pvkit (polling) with `--sandbox off`, as a contender of its own (the
    /// sandbox's cost).
    #[arg(long)]
    pub compare_sandbox: bool,
    /// Modes: `sink` (frames into the backend) and `loop` (frames back to the generator).
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = [Mode::Sink, Mode::Loop])]
    pub modes: Vec<Mode>,
}

/// Where the generator's frames go.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Into the backend, which drops them (pvkit `--sink`, DPDK rxonly).
    Sink,
    /// Back to the generator (pvkit `--loopback`, DPDK `io` forwarding).
    Loop,
}

impl Mode {
    /// The case's name for `frame`-byte frames and the plot's group.
    fn case(self, frame: u16) -> (String, &'static str) {
        match self {
            Mode::Sink => (format!("{frame}-byte frames"), "frames per second"),
            Mode::Loop => (format!("{frame}-byte frames, looped back"), "frames per second, looped back"),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Contender {
    DpdkVhost,
    PvkitPolling,
    PvkitNoPoll,
    PvkitUnsandboxed,
}

impl Contender {
    fn name(self, mode: Mode) -> &'static str {
        match (mode, self) {
            (Mode::Sink, Contender::DpdkVhost) => "DPDK net_vhost rxonly",
            (Mode::Sink, Contender::PvkitPolling) => "pvkit --sink (--poll-us 50)",
            (Mode::Sink, Contender::PvkitNoPoll) => "pvkit --sink --poll-us 0",
            (Mode::Sink, Contender::PvkitUnsandboxed) => "pvkit --sink --sandbox off",
            (Mode::Loop, Contender::DpdkVhost) => "DPDK net_vhost io",
            (Mode::Loop, Contender::PvkitPolling) => "pvkit --loopback (--poll-us 50)",
            (Mode::Loop, Contender::PvkitNoPoll) => "pvkit --loopback --poll-us 0",
            (Mode::Loop, Contender::PvkitUnsandboxed) => "pvkit --loopback --sandbox off",
        }
    }
}

/// Frames the generator sends first in loop mode, which then circulate (testpmd's burst, at
/// most 512).
const LOOP_BURST: u16 = 256;

/// testpmd, with its standard output line-buffered (`stdbuf`) so each periodic reading
/// arrives when it is printed.
fn testpmd_base(lcores: &str, prefix: &str) -> Command {
    let mut cmd = Command::new("stdbuf");
    cmd.args([
        "-oL",
        "dpdk-testpmd",
        "--lcores",
        lcores,
        "--no-pci",
        "--single-file-segments",
        "-m",
        "256",
        "--file-prefix",
        prefix,
    ]);
    cmd
}

/// Pins a command's process to CPU 0 (the generator's forwarding core is CPU 1).
fn pin_to_cpu0(cmd: &mut Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: the closure runs in the child between fork and exec and only calls
    // sched_setaffinity, which is async-signal-safe, on a stack-allocated set.
    unsafe {
        cmd.pre_exec(|| {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(0, &mut set);
            libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
            Ok(())
        });
    }
}

fn backend(contender: Contender, mode: Mode, socket: &Path, log: &Path) -> Result<Spawned, BenchError> {
    let exe = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("pvkit"));
    let mut cmd = match contender {
        Contender::DpdkVhost => {
            let mut cmd = testpmd_base("0@1,1@0", &format!("pvkit-bench-vhost-{}", std::process::id()));
            cmd.args(["--vdev", &format!("net_vhost0,iface={},queues=1", socket.display()), "--"]);
            cmd.arg(match mode {
                Mode::Sink => "--forward-mode=rxonly",
                Mode::Loop => "--forward-mode=io",
            });
            cmd.args([
                "--port-topology=loop",
                "--stats-period",
                "1",
                "--nb-cores",
                "1",
                "--txd",
                "1024",
                "--rxd",
                "1024",
            ]);
            cmd
        }
        Contender::PvkitPolling | Contender::PvkitNoPoll | Contender::PvkitUnsandboxed => {
            let mut cmd = backend_command(&exe, BackendKind::Net);
            cmd.arg(match mode {
                Mode::Sink => "--sink",
                Mode::Loop => "--loopback",
            });
            cmd.arg("--socket-path").arg(socket);
            if contender == Contender::PvkitUnsandboxed {
                cmd.args(["--sandbox", "off"]);
            }
            if contender == Contender::PvkitNoPoll {
                cmd.args(["--poll-us", "0"]);
            }
            pin_to_cpu0(&mut cmd);
            cmd
        }
    };
    Spawned::start(contender.name(mode), &mut cmd, socket, log)
}

/// Runs the generator for the warm-up plus `seconds`; returns its per-second readings after
/// the warm-up (Tx-pps in sink mode, Rx-pps, what came back, in loop mode), and the backend's
/// and the generator's usage over them.
fn generate(
    (socket, mode): (&Path, Mode),
    frame: u16,
    seconds: f64,
    child: &Spawned,
) -> Result<(Vec<f64>, ProcessUsage, ProcessUsage), BenchError> {
    let mut cmd = testpmd_base("0@0,1@1", &format!("pvkit-bench-gen-{}", std::process::id()));
    cmd.args(["--vdev", &format!("net_virtio_user0,path={},queues=1,queue_size=1024", socket.display()), "--"]);
    let reading = match mode {
        Mode::Sink => {
            cmd.arg("--forward-mode=txonly");
            "Tx-pps:"
        }
        Mode::Loop => {
            // One burst of LOOP_BURST txonly frames, then whatever comes back goes out again.
            cmd.args(["--forward-mode=io", "--tx-first", &format!("--burst={LOOP_BURST}")]);
            "Rx-pps:"
        }
    };
    cmd.args([&format!("--txpkts={frame}"), "--port-topology=loop", "--stats-period", "1"]);
    cmd.args(["--nb-cores", "1", "--txd", "1024", "--rxd", "1024"]);
    let mut generator = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(BenchError::io("cannot start dpdk-testpmd"))?;
    let readings = Arc::new(Mutex::new(Vec::new()));
    let reader = {
        let readings = readings.clone();
        let stdout = generator.stdout.take().ok_or_else(|| BenchError::Measurement("no testpmd output".into()))?;
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(rest) = line.trim().strip_prefix(reading)
                    && let Some(pps) = rest.split_whitespace().next().and_then(|v| v.parse::<f64>().ok())
                {
                    lock(&readings).push(pps);
                }
            }
        })
    };
    // Wait for the first reading (EAL start-up takes a moment), then one more as warm-up.
    let mut waited = Duration::ZERO;
    while lock(&readings).len() < 2 {
        std::thread::sleep(Duration::from_millis(50));
        waited += Duration::from_millis(50);
        if waited > Duration::from_secs(20) {
            let _ = generator.kill();
            return Err(BenchError::Measurement("dpdk-testpmd printed no statistics within 20 s".into()));
        }
    }
    let before = child.usage()?;
    let generator_before = usage_of(generator.id(), "dpdk-testpmd")?;
    let skip = lock(&readings).len();
    // One reading per second: wait for as many as the measurement asks for.
    let wanted = (seconds.round() as usize).max(1);
    let deadline = std::time::Instant::now() + Duration::from_secs_f64(seconds + 10.0);
    while lock(&readings).len() < skip + wanted {
        if std::time::Instant::now() > deadline {
            let _ = generator.kill();
            return Err(BenchError::Measurement("dpdk-testpmd stopped printing statistics".into()));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let usage = child.usage()?.since(&before);
    let generator_usage = usage_of(generator.id(), "dpdk-testpmd")?.since(&generator_before);
    // SAFETY: sends a signal to the child we started.
    unsafe { libc::kill(generator.id() as libc::pid_t, libc::SIGINT) };
    let _ = generator.wait();
    let _ = reader.join();
    let all = lock(&readings).clone();
    let measured: Vec<f64> = all.into_iter().skip(skip).take(wanted).collect();
    if measured.is_empty() {
        return Err(BenchError::Measurement("dpdk-testpmd printed no readings while measuring".into()));
    }
    Ok((measured, usage, generator_usage))
}

/// Why the net benchmark cannot run here, if it cannot.
pub fn unavailable() -> Option<String> {
    if super::find_program("dpdk-testpmd").is_none() {
        return Some("dpdk-testpmd is not installed (scripts/test --prepare installs DPDK and hugepages)".into());
    }
    let pages: u64 =
        std::fs::read_to_string("/proc/sys/vm/nr_hugepages").ok().and_then(|s| s.trim().parse().ok()).unwrap_or(0);
    if pages < 256 {
        return Some(format!("{pages} hugepages reserved; DPDK needs 256 or more (scripts/test --prepare)"));
    }
    None
}

/// Runs the benchmark into `rec`.
pub fn run(args: &NetBenchArgs, rec: &mut Recorder) -> Result<(), BenchError> {
    if let Some(why) = unavailable() {
        return Err(BenchError::Options(why));
    }
    if args.rounds == 0 || args.frame_sizes.is_empty() || args.seconds <= 0.0 {
        return Err(BenchError::Options("--rounds, --frame-sizes and --seconds must be positive".into()));
    }
    if let Some(bad) = args.frame_sizes.iter().find(|s| !(60..=1514).contains(*s)) {
        return Err(BenchError::Options(format!("frame size {bad} is outside 60..=1514")));
    }
    if args.modes.is_empty() {
        return Err(BenchError::Options("--modes: name at least one of sink, loop".into()));
    }
    let mut contenders = vec![Contender::PvkitPolling, Contender::PvkitNoPoll];
    if args.compare_sandbox {
        contenders.push(Contender::PvkitUnsandboxed);
    }
    if !args.no_dpdk_peer {
        contenders.insert(0, Contender::DpdkVhost);
    }
    let work = std::env::temp_dir().join(format!("pvkit-bench-net-{}", std::process::id()));
    std::fs::create_dir_all(&work).map_err(BenchError::io(format!("cannot create {}", work.display())))?;
    let total = args.rounds * contenders.len() * args.frame_sizes.len() * args.modes.len();
    rec.begin("net", format!("{args:?}"), total);
    rec.note(format!(
        "pvkit bench net: DPDK testpmd net_virtio_user as the generator (1 queue, 1024 descriptors), {} round(s) of {} s, interleaved",
        args.rounds, args.seconds
    ));
    if args.modes.contains(&Mode::Sink) {
        rec.note("sink: pvkit's sink reads only each frame's header; DPDK's rxonly copies every frame into an mbuf.");
    }
    if args.modes.contains(&Mode::Loop) {
        rec.note(format!(
            "looped back: {LOOP_BURST} frames circulate (testpmd io --tx-first); both backends copy each frame from the transmit ring into the receive ring; the rate is what came back"
        ));
    }
    let result = (|| {
        for (&mode, &frame) in args.modes.iter().flat_map(|m| args.frame_sizes.iter().map(move |f| (m, f))) {
            let (case, group) = mode.case(frame);
            for round in 0..args.rounds {
                for &contender in &contenders {
                    let name = contender.name(mode);
                    rec.step(format!("round {} {case}: {name}", round + 1));
                    let socket = work.join("net.sock");
                    let child = backend(contender, mode, &socket, &work.join("backend.log"))?;
                    let outcome = generate((&socket, mode), frame, args.seconds, &child);
                    child.interrupt(Duration::from_secs(5));
                    let (mut readings, usage, generator) = outcome?;
                    let pps = median(&mut readings);
                    let mut sample = rec.sample(&case, name, round);
                    sample.group = group.into();
                    sample.x = Some(f64::from(frame));
                    sample.x_label = "frame bytes".into();
                    (sample.metric, sample.value) = ("Mpps".into(), pps / 1e6);
                    sample.extra.insert("Gbit/s".into(), pps * f64::from(frame) * 8.0 / 1e9);
                    if let Some(per_frame) = usage.cpu_per_op(pps, 1e9) {
                        sample.extra.insert("backend_cpu_ns_per_frame".into(), per_frame);
                    }
                    sample.processes =
                        vec![ProcessStats::new("backend", &usage), ProcessStats::new("testpmd generator", &generator)];
                    rec.push(sample);
                }
            }
        }
        Ok::<(), BenchError>(())
    })();
    let _ = std::fs::remove_dir_all(&work);
    result?;
    rec.ran(format!("{} contender(s)", contenders.len()));
    Ok(())
}
