//! `pvkit run`: boot a guest on KVM (or the software guest) with vhost-user backends attached.

use pvkit_host_devices::sandbox::SandboxMode;
use pvkit_protocol::abi::{self, CompletionMode};
use pvkit_protocol::virtio::DeviceId;
use pvkit_vmm_glue::seccomp::ThreadSandbox;
use pvkit_vmm_glue::vcpu::Outcome;
use pvkit_vmm_glue::vm::{self, DeviceSpec, VmConfig};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

/// Exit status when the watchdog stopped the guest.
pub const EXIT_TIMEOUT: u8 = 124;
/// Exit status when the guest crashed or KVM could not run it.
pub const EXIT_CRASH: u8 = 125;

/// Options of `pvkit run`.
#[derive(clap::Args, Debug)]
pub struct RunArgs {
    /// Guest kernel (an ELF with a 64-bit entry point); the embedded tiny guest when omitted.
    #[arg(long, value_name = "ELF")]
    pub kernel: Option<PathBuf>,
    /// Extra kernel command line (device entries and pvkit keys are appended).
    #[arg(long, default_value = "", allow_hyphen_values = true)]
    pub cmdline: String,
    /// Guest memory (K, M, G suffixes).
    #[arg(long, default_value = "256M", value_parser = parse_size)]
    pub memory: u64,
    /// vCPUs.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=8))]
    pub vcpus: u8,
    /// A vhost-user-blk backend's socket.
    #[arg(long, value_name = "SOCK")]
    pub blk: Vec<PathBuf>,
    /// A vhost-user-net backend's socket.
    #[arg(long, value_name = "SOCK")]
    pub net: Vec<PathBuf>,
    /// A vhost-user console backend's socket.
    #[arg(long, value_name = "SOCK")]
    pub console: Vec<PathBuf>,
    /// Any virtio device type served by a vhost-user backend: virtio-id=N,socket=PATH.
    #[arg(long, value_name = "virtio-id=N,socket=PATH", value_parser = parse_device)]
    pub device: Vec<DeviceSpec>,
    /// Start from the snapshot in DIR (`pvkit ctl snapshot`) instead of booting a kernel; its
    /// devices' backends are the sockets it names, or those given with --blk, --net and
    /// --console (the first --blk for its first block device, and so on).
    #[arg(long, value_name = "DIR", conflicts_with_all = ["kernel", "cmdline", "memory", "vcpus", "device", "completion", "no_doorbells", "software_guest"])]
    pub restore: Option<PathBuf>,
    /// Wait on this unix socket for a VM another `pvkit run` sends (`pvkit ctl migrate`), and
    /// run it; --blk, --net and --console name other backends, as with --restore.
    #[arg(long, value_name = "PATH", conflicts_with_all = ["restore", "kernel", "cmdline", "memory", "vcpus", "device", "completion", "no_doorbells", "software_guest"])]
    pub incoming: Option<PathBuf>,
    /// Serve the VM's control API (HTTP with JSON bodies) on this unix socket; see `pvkit ctl`.
    #[arg(long, value_name = "PATH")]
    pub api_socket: Option<PathBuf>,
    /// Where COM1's output goes: stdout or a file path.
    #[arg(long, default_value = "stdout")]
    pub serial: String,
    /// Seconds before the watchdog stops the guest.
    #[arg(long, default_value_t = 60)]
    pub timeout: u64,
    /// Reconnect to a backend that went away every N milliseconds (0: never).
    #[arg(long, default_value_t = 500, value_name = "N")]
    pub reconnect_ms: u64,
    /// Do not announce pvkit's doorbell ports (the guest then uses MMIO QueueNotify).
    #[arg(long)]
    pub no_doorbells: bool,
    /// Completion mode to announce (default: poll on a PVM-based KVM, else irq).
    #[arg(long, value_parser = parse_completion)]
    pub completion: Option<CompletionMode>,
    /// No vCPU: run the guest drivers in a host thread over the same shared memory, frontends
    /// and backends (needs no /dev/kvm and no kernel; `pvkit.mode=bench` in --cmdline adds the
    /// benchmark).
    #[arg(long, conflicts_with_all = ["kernel", "vcpus", "completion"])]
    pub software_guest: bool,
    /// seccomp filters on the vCPU and event threads: on (a call outside the list kills the
    /// VMM), log (the kernel logs it) or off.
    #[arg(long, value_enum, value_name = "MODE", default_value = "on")]
    pub sandbox: pvkit_host_devices::sandbox::SandboxMode,
}

/// A `pvkit run` option value that cannot be used (clap prints it with the option's name).
#[derive(Debug, thiserror::Error)]
pub enum RunArgError {
    /// Not a size.
    #[error("'{text}': {source}")]
    BadSize {
        /// What was given.
        text: String,
        /// Why it does not parse.
        source: abi::AbiError,
    },
    /// A memory size the VMM does not take.
    #[error("{text} is outside {min_mib} MiB .. {max_mib} MiB")]
    SizeOutOfRange {
        /// What was given.
        text: String,
        /// Smallest, MiB.
        min_mib: u64,
        /// Largest, MiB.
        max_mib: u64,
    },
    /// Not a completion mode.
    #[error(transparent)]
    Completion(abi::AbiError),
    /// A virtio id that is not a number.
    #[error("virtio-id '{0}' is not a number")]
    DeviceIdNotANumber(String),
    /// A virtio id protocol does not name.
    #[error(transparent)]
    UnknownDevice(pvkit_protocol::virtio::VirtioError),
    /// A part of `--device` that is neither `virtio-id=N` nor `socket=PATH`.
    #[error("'{0}' is not virtio-id=N or socket=PATH")]
    DevicePart(String),
    /// `--device` without both parts.
    #[error("give virtio-id=N and socket=PATH")]
    DeviceIncomplete,
}

fn parse_size(text: &str) -> Result<u64, RunArgError> {
    let size = abi::parse_number(text).map_err(|source| RunArgError::BadSize { text: text.into(), source })?;
    let (min, max) = (pvkit_vmm_glue::memory::MIN_SIZE, pvkit_vmm_glue::memory::MAX_SIZE);
    if !(min..=max).contains(&size) {
        return Err(RunArgError::SizeOutOfRange { text: text.into(), min_mib: min >> 20, max_mib: max >> 20 });
    }
    Ok(size)
}

fn parse_completion(text: &str) -> Result<CompletionMode, RunArgError> {
    CompletionMode::parse(text).map_err(RunArgError::Completion)
}

fn parse_device(text: &str) -> Result<DeviceSpec, RunArgError> {
    let mut id = None;
    let mut socket = None;
    for part in text.split(',') {
        match part.split_once('=') {
            Some(("virtio-id", v)) => {
                let raw = v.parse::<u32>().map_err(|_| RunArgError::DeviceIdNotANumber(v.into()))?;
                id = Some(DeviceId::try_from(raw).map_err(RunArgError::UnknownDevice)?)
            }
            Some(("socket", v)) => socket = Some(PathBuf::from(v)),
            _ => return Err(RunArgError::DevicePart(part.into())),
        }
    }
    match (id, socket) {
        (Some(device), Some(socket)) => Ok(DeviceSpec { device, socket }),
        _ => Err(RunArgError::DeviceIncomplete),
    }
}

impl RunArgs {
    /// The devices in slot order: blk, net, console shorthands, then --device entries.
    pub fn devices(&self) -> Vec<DeviceSpec> {
        let short = |device: DeviceId, list: &[PathBuf]| -> Vec<DeviceSpec> {
            list.iter().map(|socket| DeviceSpec { device, socket: socket.clone() }).collect()
        };
        let mut all = short(DeviceId::Block, &self.blk);
        all.extend(short(DeviceId::Net, &self.net));
        all.extend(short(DeviceId::Console, &self.console));
        all.extend(self.device.iter().cloned());
        all
    }
}

/// What one `pvkit run` produced, ready to print.
pub fn outcome_status(outcome: &Outcome) -> (ExitCode, String) {
    match outcome {
        Outcome::Exited(code) => {
            let status = u8::try_from(*code).unwrap_or(u8::MAX);
            (ExitCode::from(status), format!("the guest exited with code {code}"))
        }
        Outcome::TimedOut => (ExitCode::from(EXIT_TIMEOUT), "the watchdog stopped the guest (--timeout)".into()),
        Outcome::Stopped => (ExitCode::SUCCESS, "shut down through the API".into()),
        Outcome::Migrated => (ExitCode::SUCCESS, "the VM moved to another pvkit run".into()),
        Outcome::Shutdown => (ExitCode::from(EXIT_CRASH), "the guest shut down (triple fault or reset)".into()),
        Outcome::InternalError(why) => (ExitCode::from(EXIT_CRASH), format!("the guest could not run: {why}")),
    }
}

/// Runs the software guest for `pvkit run --software-guest`.
fn run_software(args: &RunArgs) -> ExitCode {
    let bench_ms = abi::param(&args.cmdline, abi::key::MODE)
        .filter(|m| *m == "bench")
        .map(|_| abi::param(&args.cmdline, "pvkit.bench_ms").and_then(|v| abi::parse_number(v).ok()).unwrap_or(1000));
    match pvkit_vmm_glue::software_guest::run(&args.devices(), args.memory, bench_ms) {
        Ok(report) => {
            if args.serial == "stdout" {
                print!("{}", report.log);
            } else if let Err(e) = std::fs::write(&args.serial, &report.log) {
                eprintln!("pvkit run: cannot write {}: {e}", args.serial);
                return ExitCode::FAILURE;
            }
            let passed = pvkit_vmm_glue::guest_report::GuestResult::parse(&report.log).is_some_and(|r| r.all_passed());
            eprintln!("pvkit run: software guest {}", if passed { "passed every check" } else { "FAILED a check" });
            if passed { ExitCode::SUCCESS } else { ExitCode::from(abi::EXIT_FAIL as u8) }
        }
        Err(e) => {
            eprintln!("pvkit run: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The snapshot in `dir`, checked against this build and host, with each device's socket
/// (the manifest's unless --blk, --net or --console name another).
fn load_restore(args: &RunArgs, dir: &std::path::Path) -> Result<vm::Restore, RestoreError> {
    use pvkit_vmm_glue::snapshot::{MEMORY_FILE, Origin, Snapshot};
    let snapshot = Snapshot::read(dir)?;
    snapshot.manifest.origin.check(&Origin::here())?;
    let sockets = backend_sockets(args, &snapshot.manifest)?;
    Ok(vm::Restore { snapshot, memory: vm::RestoreMemory::File(dir.join(MEMORY_FILE)), sockets })
}

/// Each saved device's backend socket: the manifest's, unless --blk, --net or --console name
/// another; every one must exist.
fn backend_sockets(
    args: &RunArgs,
    manifest: &pvkit_vmm_glue::snapshot::Manifest,
) -> Result<Vec<PathBuf>, RestoreError> {
    let snapshot = manifest;
    let mut given = [
        (DeviceId::Block, args.blk.iter()),
        (DeviceId::Net, args.net.iter()),
        (DeviceId::Console, args.console.iter()),
    ];
    let mut sockets = Vec::new();
    for device in &snapshot.devices {
        let from_args = given.iter_mut().find(|(id, _)| id.raw() == device.virtio_id).and_then(|(_, list)| list.next());
        sockets.push(from_args.cloned().unwrap_or_else(|| device.socket.clone()));
    }
    for (id, mut rest) in given {
        if rest.next().is_some() {
            let saved = snapshot.devices.iter().filter(|d| d.virtio_id == id.raw()).count();
            return Err(RestoreError::TooManySockets { kind: pvkit_vmm_glue::device::device_name(id), saved });
        }
    }
    for (slot, socket) in sockets.iter().enumerate() {
        if !socket.exists() {
            return Err(RestoreError::NoBackend { slot, socket: socket.clone() });
        }
    }
    Ok(sockets)
}

/// Waits on `socket` for a VM another `pvkit run` sends; returns it, ready to run, and the
/// channel to tell the source how the start went.
fn receive_incoming(
    args: &RunArgs,
    socket: &std::path::Path,
) -> Result<(vm::Restore, pvkit_vmm_glue::snapshot::migration::Channel), RestoreError> {
    use pvkit_vmm_glue::snapshot::migration::Channel;
    eprintln!("pvkit run: waiting for a VM on {}", socket.display());
    let mut channel = Channel::accept(socket)?;
    let (snapshot, ram) = channel.receive_vm()?;
    match backend_sockets(args, &snapshot.manifest) {
        Ok(sockets) => Ok((vm::Restore { snapshot, memory: vm::RestoreMemory::Filled(ram), sockets }, channel)),
        Err(e) => {
            let _ = channel.failed(&e.to_string());
            Err(e)
        }
    }
}

/// Why a snapshot cannot be restored (before anything starts).
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    /// The snapshot itself.
    #[error(transparent)]
    Snapshot(#[from] pvkit_vmm_glue::snapshot::SnapshotError),
    /// More sockets of a kind than the snapshot has devices of it.
    #[error("more --{kind} sockets given than the snapshot's {saved} {kind} device(s)")]
    TooManySockets {
        /// blk, net or console.
        kind: String,
        /// Devices of that kind in the snapshot.
        saved: usize,
    },
    /// The incoming migration.
    #[error(transparent)]
    Migration(#[from] pvkit_vmm_glue::snapshot::migration::MigrationError),
    /// A backend socket that does not exist.
    #[error("device {slot}: no backend at {}", socket.display())]
    NoBackend {
        /// Its slot.
        slot: usize,
        /// The socket.
        socket: PathBuf,
    },
}

/// Runs `pvkit run`.
pub fn run(args: RunArgs) -> ExitCode {
    let began = std::time::Instant::now();
    if args.software_guest {
        return run_software(&args);
    }
    let kernel = match &args.kernel {
        Some(path) => match std::fs::read(path) {
            Ok(bytes) => bytes,
            Err(e) => {
                eprintln!("pvkit run: cannot read {}: {e}", path.display());
                return ExitCode::from(2);
            }
        },
        None => crate::cli::TINY_GUEST_ELF.to_vec(),
    };
    if !pvkit_vmm_glue::kvm_usable() {
        eprintln!("pvkit run: /dev/kvm is missing or not usable on this machine");
        return ExitCode::FAILURE;
    }
    let serial: Box<dyn std::io::Write + Send> = if args.serial == "stdout" {
        Box::new(std::io::stdout())
    } else {
        match std::fs::File::create(&args.serial) {
            Ok(file) => Box::new(file),
            Err(e) => {
                eprintln!("pvkit run: cannot create {}: {e}", args.serial);
                return ExitCode::from(2);
            }
        }
    };
    let restore = match &args.restore {
        None => None,
        Some(dir) => match load_restore(&args, dir) {
            Ok(restore) => Some(restore),
            Err(e) => {
                eprintln!("pvkit run: cannot restore {}: {e}", dir.display());
                return ExitCode::FAILURE;
            }
        },
    };
    let (restore, incoming) = match (&args.incoming, restore) {
        (Some(socket), _) => match receive_incoming(&args, socket) {
            Ok((restore, channel)) => (Some(restore), Some(std::sync::Arc::new(std::sync::Mutex::new(channel)))),
            Err(e) => {
                eprintln!("pvkit run: cannot take the incoming VM: {e}");
                return ExitCode::FAILURE;
            }
        },
        (None, restore) => (restore, None),
    };
    let control = pvkit_vmm_glue::control::VmControl::new();
    if let Some(socket) = &args.api_socket {
        let description = match &restore {
            Some(r) => crate::vm_api::VmDescription::restored(&r.snapshot.manifest, &r.sockets),
            None => crate::vm_api::VmDescription { vcpus: args.vcpus, memory: args.memory, devices: args.devices() },
        };
        if let Err(e) = crate::vm_api::serve(socket, control.clone(), description) {
            eprintln!("pvkit run: cannot serve the API on {}: {e}", socket.display());
            return ExitCode::from(2);
        }
    }
    let config = VmConfig {
        control,
        kernel,
        cmdline: args.cmdline.clone(),
        memory: args.memory,
        vcpus: args.vcpus,
        devices: args.devices(),
        serial,
        timeout: Duration::from_secs(args.timeout.max(1)),
        reconnect: (args.reconnect_ms > 0).then(|| Duration::from_millis(args.reconnect_ms)),
        doorbells: !args.no_doorbells,
        completion: args.completion,
        sandbox: match args.sandbox {
            SandboxMode::On => ThreadSandbox::On,
            SandboxMode::Log => ThreadSandbox::Log,
            SandboxMode::Off => ThreadSandbox::Off,
        },
        restore,
        on_started: match (incoming.clone(), args.restore.is_some()) {
            (Some(channel), _) => Some(Box::new(move |after: Duration| {
                if let Ok(mut channel) = channel.lock() {
                    let _ = channel.running(after);
                }
            }) as Box<dyn FnOnce(Duration) + Send>),
            (None, true) => Some(Box::new(move |_: Duration| {
                let ms = began.elapsed().as_secs_f64() * 1000.0;
                eprintln!("pvkit run: restored; the vCPUs run {ms:.1} ms after pvkit run started");
            })),
            (None, false) => None,
        },
    };
    let result = vm::run(config);
    if let (Some(channel), Err(e)) = (&incoming, &result)
        && let Ok(mut channel) = channel.lock()
    {
        let _ = channel.failed(&e.to_string());
    }
    if let Some(socket) = &args.api_socket {
        let _ = std::fs::remove_file(socket);
    }
    match result {
        Ok(report) => {
            let (status, message) = outcome_status(&report.outcome);
            eprintln!(
                "pvkit run: {message} after {:.1} s (vCPUs started {:.1} ms after start-up began)",
                report.elapsed.as_secs_f64(),
                report.ready_after.as_secs_f64() * 1000.0
            );
            status
        }
        Err(e) => {
            eprintln!("pvkit run: {e}");
            ExitCode::FAILURE
        }
    }
}
