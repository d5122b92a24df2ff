//! `pvkit demo`: pvkit's three backends as separate processes, the embedded tiny guest booted
//! on KVM against them, its self-test and a short benchmark through every device, and a
//! summary. Exits 0 only if every check passed.

use pvkit_host_devices::lock;
use pvkit_host_devices::process::ServingChild;
use pvkit_host_devices::{BackendKind, backend_command};
use pvkit_protocol::virtio::{DeviceId, feature_name};
use pvkit_vmm_glue::guest_report::{BenchLine, GuestResult};
use pvkit_vmm_glue::vm::{self, DeviceSpec, RunReport, VmConfig};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const STEPS: usize = 5;

/// Why the demo (or a benchmark that starts its backends) could not run.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    /// A file or directory could not be made.
    #[error("{what}: {source}")]
    Io {
        /// What was being done, with the path.
        what: String,
        /// Why.
        source: std::io::Error,
    },
    /// A backend did not start or listen.
    #[error(transparent)]
    Process(#[from] pvkit_host_devices::process::ProcessError),
    /// The VM could not be built or run.
    #[error(transparent)]
    Vm(#[from] vm::VmError),
    /// The software guest could not run.
    #[error(transparent)]
    SoftwareGuest(#[from] pvkit_vmm_glue::software_guest::SoftwareGuestError),
}

fn io_error(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> DemoError {
    let what = what.into();
    move |source| DemoError::Io { what, source }
}

fn step(n: usize, what: &str) {
    eprintln!("[{n}/{STEPS}] {what}");
}

/// Backend processes, stopped (SIGTERM, so they remove their sockets) when dropped.
pub(crate) struct Backends {
    children: Vec<(BackendKind, ServingChild)>,
}

impl Backends {
    /// Each backend's name and process id.
    pub(crate) fn pids(&self) -> Vec<(&'static str, u32)> {
        self.children.iter().filter_map(|(kind, child)| Some((kind.program_name(), child.id()?))).collect()
    }
}

impl Drop for Backends {
    fn drop(&mut self) {
        for (_, child) in &mut self.children {
            child.signal_and_wait(libc::SIGTERM, Duration::from_secs(3));
        }
    }
}

pub(crate) fn start_backends(dir: &Path, verbose: bool) -> Result<(Backends, [PathBuf; 3], PathBuf), DemoError> {
    let exe = std::env::current_exe().map_err(io_error("finding pvkit's own binary"))?;
    let image = dir.join("disk.img");
    std::fs::File::create(&image)
        .and_then(|f| f.set_len(64 << 20))
        .map_err(io_error(format!("cannot create {}", image.display())))?;
    let sockets = [dir.join("blk.sock"), dir.join("net.sock"), dir.join("console.sock")];
    let port = dir.join("console-port.sock");
    let mut backends = Backends { children: Vec::new() };
    let specs: [(BackendKind, Vec<String>); 3] = [
        (BackendKind::Blk, vec!["--blk-file".into(), image.display().to_string()]),
        (BackendKind::Net, vec!["--loopback".into()]),
        (BackendKind::Console, vec!["--port".into(), format!("unix:{}", port.display())]),
    ];
    for ((kind, args), socket) in specs.into_iter().zip(&sockets) {
        let log = std::fs::File::create(dir.join(format!("{}.log", kind.program_name())))
            .map_err(io_error("cannot create a log file"))?;
        let mut cmd = backend_command(&exe, kind);
        cmd.args(&args).arg("--socket-path").arg(socket).stdin(Stdio::null()).stdout(Stdio::null()).stderr(log);
        let mut child = ServingChild::spawn(kind.program_name(), &mut cmd)?;
        let started = child.wait_for_socket(socket, Duration::from_secs(10));
        let pid = child.id().unwrap_or(0);
        backends.children.push((kind, child));
        started?;
        if verbose {
            eprintln!("      {} running (pid {pid})", kind.program_name());
        }
    }
    Ok((backends, sockets, port))
}

/// COM1 output, kept for parsing and echoed (check lines) as progress.
#[derive(Clone, Default)]
pub(crate) struct Capture {
    pub(crate) bytes: Arc<Mutex<Vec<u8>>>,
    /// Echo check lines to standard error as progress.
    pub(crate) echo: bool,
}

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut bytes = lock(&self.bytes);
        let line_start = bytes.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
        bytes.extend_from_slice(buf);
        // Echo finished progress lines (checks, benchmark results).
        let text = String::from_utf8_lossy(&bytes[line_start..]).into_owned();
        for line in text.split_inclusive('\n').filter(|l| l.ends_with('\n')) {
            let line = line.trim_end();
            if self.echo && (line.contains("check ") || line.starts_with("PVKIT-BENCH-BEGIN")) {
                eprintln!("      guest: {}", line.trim_start_matches("tiny-guest: "));
            }
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Answers the guest's console ping, then counts what the guest writes.
pub(crate) fn console_host(port: PathBuf, received: Arc<AtomicU64>) {
    std::thread::spawn(move || {
        let Ok(mut stream) = std::os::unix::net::UnixStream::connect(&port) else { return };
        let _ = stream.set_read_timeout(Some(Duration::from_secs(40)));
        let mut seen = Vec::new();
        let mut buf = vec![0u8; 64 * 1024];
        while !String::from_utf8_lossy(&seen).contains("PVKIT-CONSOLE-PING") {
            match stream.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => seen.extend_from_slice(&buf[..n]),
            }
        }
        let _ = stream.write_all(b"PVKIT-CONSOLE-PONG\n");
        while let Ok(n) = stream.read(&mut buf) {
            if n == 0 {
                break;
            }
            received.fetch_add(n as u64, Ordering::Relaxed);
        }
    });
}

fn feature_list(device: &str, features: u64) -> String {
    let id = match device {
        "blk" => Some(DeviceId::Block),
        "net" => Some(DeviceId::Net),
        "console" => Some(DeviceId::Console),
        _ => None,
    };
    (0..64)
        .filter(|bit| features & (1u64 << bit) != 0)
        .map(|bit| match id.and_then(|id| feature_name(id, bit)) {
            Some(name) => name.to_string(),
            None => format!("bit{bit}"),
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Prints the summary; true when every check passed.
pub fn summary(report: &RunReport, serial: &str, console_bytes: u64, guest: &str) -> bool {
    let tsc_khz = report.tsc_khz;
    println!("pvkit demo: {guest} with three out-of-process vhost-user backends");
    if guest.contains("KVM") && pvkit_vmm_glue::kvm_is_pvm() {
        println!("  (this KVM is PVM-based: the guest polls, and its instructions are emulated, so rates are low)");
    }
    println!("\ndevices (virtio-mmio, negotiated features):");
    for pvkit_vmm_glue::vm::DeviceReport { name, features, violations } in &report.devices {
        let extra = if *violations > 0 { format!(" ({violations} protocol violations)") } else { String::new() };
        println!("  {name:<8} {}{extra}", feature_list(name, *features));
    }
    let result = GuestResult::parse(serial);
    println!("\nself-test:");
    match &result {
        Some(r) => {
            for (name, ok) in &r.checks {
                println!("  {:<20} {}", name, if *ok { "pass" } else { "FAIL" });
            }
            let doorbells: Vec<String> = r.doorbells.iter().map(|(d, m)| format!("{d}: {m}")).collect();
            println!("  doorbells: {}", doorbells.join(", "));
        }
        None => println!("  the guest printed no result line"),
    }
    println!("\nbenchmark (1 s per device, timed with the TSC):");
    for line in BenchLine::parse_all(serial) {
        let seconds = line.seconds(tsc_khz).max(1e-9);
        let rate = line.ops as f64 / seconds;
        let kicks = if line.ops > 0 { line.kicks as f64 / line.ops as f64 } else { 0.0 };
        match line.name.as_str() {
            "blk" => println!(
                "  blk      4 KiB random reads, 16 in flight   {rate:>10.0} IOPS       {kicks:.2} kicks/request"
            ),
            "net" => {
                println!("  net      64-byte frames through loopback    {rate:>10.0} packets/s  {kicks:.2} kicks/frame")
            }
            "console" => println!(
                "  console  512-byte writes                   {:>10.1} KB/s       {kicks:.2} kicks/write (host read {console_bytes} bytes)",
                line.bytes as f64 / seconds / 1000.0
            ),
            other => println!("  {other}: {} ops", line.ops),
        }
    }
    let (status, message) = crate::run::outcome_status(&report.outcome);
    let passed = result.as_ref().is_some_and(GuestResult::all_passed) && status == ExitCode::SUCCESS;
    println!("\nresult: {} ({message}, {:.1} s)", if passed { "PASS" } else { "FAIL" }, report.elapsed.as_secs_f64());
    passed
}

/// Runs the demo.
pub fn demo() -> ExitCode {
    let started = Instant::now();
    // The summary says what matters; the VMM's per-device lines are for `pvkit run`.
    if std::env::var_os("RUST_LOG").is_none() {
        log::set_max_level(log::LevelFilter::Warn);
    }
    let dir = std::env::temp_dir().join(format!("pvkit-demo-{}", std::process::id()));
    if let Err(e) = std::fs::create_dir_all(&dir) {
        eprintln!("pvkit demo: cannot create {}: {e}", dir.display());
        return ExitCode::FAILURE;
    }
    let outcome = run_demo(&dir);
    step(5, "cleaning up");
    let _ = std::fs::remove_dir_all(&dir);
    match outcome {
        Ok(true) => {
            eprintln!("pvkit demo: done in {:.1} s", started.elapsed().as_secs_f64());
            ExitCode::SUCCESS
        }
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("pvkit demo: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run_demo(dir: &Path) -> Result<bool, DemoError> {
    step(1, "starting vhost-user-blk, vhost-user-net --loopback and vhost-user-console as separate processes");
    let (backends, sockets, port) = start_backends(dir, true)?;
    let received = Arc::new(AtomicU64::new(0));
    console_host(port, received.clone());
    if !pvkit_vmm_glue::kvm_usable() || std::env::var_os("PVKIT_DEMO_SOFTWARE_GUEST").is_some() {
        let why = if pvkit_vmm_glue::kvm_usable() {
            "PVKIT_DEMO_SOFTWARE_GUEST is set"
        } else {
            "/dev/kvm is not usable here"
        };
        step(2, &format!("{why}: running the software guest (the drivers in a host thread) instead of a VM"));
        return crate::software::demo(&sockets, &received);
    }
    step(2, "booting the tiny guest on KVM (self-test, then 1 s of I/O per device)");
    let capture = Capture { echo: true, ..Capture::default() };
    let config = VmConfig {
        kernel: crate::cli::TINY_GUEST_ELF.to_vec(),
        restore: None,
        on_started: None,
        cmdline: "pvkit.mode=bench pvkit.bench_ms=1000".into(),
        memory: 256 << 20,
        vcpus: 1,
        devices: vec![
            DeviceSpec { device: DeviceId::Block, socket: sockets[0].clone() },
            DeviceSpec { device: DeviceId::Net, socket: sockets[1].clone() },
            DeviceSpec { device: DeviceId::Console, socket: sockets[2].clone() },
        ],
        serial: Box::new(capture.clone()),
        timeout: Duration::from_secs(25),
        reconnect: None,
        doorbells: true,
        completion: None,
        control: pvkit_vmm_glue::control::VmControl::new(),
        sandbox: pvkit_vmm_glue::seccomp::ThreadSandbox::On,
    };
    let report = vm::run(config)?;
    step(3, "guest finished");
    // Give the console host a moment to read the last bytes.
    std::thread::sleep(Duration::from_millis(100));
    drop(backends);
    step(4, "summary");
    let serial = String::from_utf8_lossy(&lock(&capture.bytes)).into_owned();
    Ok(summary(&report, &serial, received.load(Ordering::Relaxed), "the tiny guest on KVM"))
}
