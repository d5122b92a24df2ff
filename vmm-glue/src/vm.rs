//! The VM: KVM with its in-kernel irqchip and PIT, guest memory, COM1, the debug-exit port,
//! virtio-mmio devices at the microvm slots (announced on the command line) whose queues are
//! served by vhost-user backends, doorbells (ioeventfd on QueueNotify and on pvkit's doorbell
//! ports) and interrupts (irqfd on IOAPIC pins) wired through the kernel, vCPU threads, a
//! watchdog, and an `event-manager` loop that notices backends going away and reconnects.

use crate::bus::{SlotTable, VmBus};
use crate::device::VirtioDevice;
use crate::loader;
use crate::memory::GuestRam;
use crate::serial::Com1;
use crate::snapshot::{Snapshot, SnapshotError};
use crate::sync::lock;
use crate::vcpu::{self, Outcome};
use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region};
use kvm_ioctls::{IoEventAddress, Kvm, VcpuFd, VmFd};
use log::info;
use pvkit_protocol::abi::{self, CompletionMode, Doorbells, MmioDeviceEntry};
use pvkit_protocol::mmio::Register;
use pvkit_protocol::virtio::DeviceId;
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Errors from building or running a VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// A KVM call failed (KVM is missing, or refused what the VM needs).
    #[error("cannot use KVM: {what}: {source}")]
    Kvm {
        /// The call (`KVM_CREATE_VM`, `opening /dev/kvm`, ...).
        what: &'static str,
        /// Why.
        source: kvm_ioctls::Error,
    },
    /// Guest memory.
    #[error(transparent)]
    Memory(#[from] crate::memory::MemoryError),
    /// Loading the kernel.
    #[error(transparent)]
    Loader(#[from] loader::LoaderError),
    /// Connecting a backend.
    #[error("device {index} ({socket}): {source}")]
    Device {
        /// Position on the command line.
        index: usize,
        /// Its socket.
        socket: String,
        /// Why.
        source: crate::frontend::FrontendError,
    },
    /// Too many devices.
    #[error("{0} devices given; the microvm layout has {max} slots", max = abi::MMIO_SLOTS)]
    TooManyDevices(usize),
    /// A vCPU could not be set up.
    #[error(transparent)]
    Vcpu(#[from] vcpu::VcpuError),
    /// The vCPU kick signal's handler could not be installed.
    #[error("registering the vCPU kick signal: {0}")]
    Signal(vmm_sys_util::errno::Error),
    /// A snapshot could not be restored.
    #[error("restoring the snapshot: {0}")]
    Restore(#[from] SnapshotError),
    /// A thread could not be started.
    #[error("starting {thread}: {source}")]
    Spawn {
        /// Which thread.
        thread: String,
        /// Why.
        source: std::io::Error,
    },
}

/// A device to attach.
#[derive(Debug, Clone)]
pub struct DeviceSpec {
    /// The virtio device type.
    pub device: DeviceId,
    /// The vhost-user backend's socket.
    pub socket: PathBuf,
}

/// Everything `pvkit run` configures.
pub struct VmConfig {
    /// The guest kernel (an ELF).
    pub kernel: Vec<u8>,
    /// Extra command-line text (the VMM appends device entries and pvkit keys).
    pub cmdline: String,
    /// Guest memory in bytes.
    pub memory: u64,
    /// vCPUs (the first runs the guest; the others wait for a start-up IPI).
    pub vcpus: u8,
    /// Devices, in slot order.
    pub devices: Vec<DeviceSpec>,
    /// Where COM1's output goes.
    pub serial: Box<dyn Write + Send>,
    /// The watchdog.
    pub timeout: Duration,
    /// Reconnect to a lost backend every this often (`None`: never).
    pub reconnect: Option<Duration>,
    /// Announce pvkit's doorbell ports to the guest.
    pub doorbells: bool,
    /// Completion mode to announce (`None`: polling on a PVM-based KVM, else interrupts).
    pub completion: Option<CompletionMode>,
    /// seccomp filters on the vCPU and event threads.
    pub sandbox: crate::seccomp::ThreadSandbox,
    /// Pausing, resuming and shutting the VM down from another thread.
    pub control: Arc<crate::control::VmControl>,
    /// Called once the vCPUs are started, with the time since the run began (an incoming
    /// migration tells its source).
    pub on_started: Option<Box<dyn FnOnce(Duration) + Send>>,
    /// Start from a snapshot instead of `kernel` (whose devices, memory size, vCPUs and
    /// command line then come from the snapshot).
    pub restore: Option<Restore>,
}

/// A snapshot to start from.
pub struct Restore {
    /// Its manifest and machine state.
    pub snapshot: Snapshot,
    /// Guest memory: the snapshot's memory file, or memory already filled (an incoming
    /// migration).
    pub memory: RestoreMemory,
    /// Each device's backend socket, in slot order (the manifest's, or others on the same
    /// backing).
    pub sockets: Vec<PathBuf>,
}

/// Where a restored VM's memory comes from.
pub enum RestoreMemory {
    /// A snapshot's sparse memory file.
    File(PathBuf),
    /// Memory already holding the guest's pages.
    Filled(GuestRam),
}

/// What a run produced.
#[derive(Debug)]
pub struct RunReport {
    /// How the guest ended.
    pub outcome: Outcome,
    /// The command line the guest got.
    pub cmdline: String,
    /// Per device, in slot order.
    pub devices: Vec<DeviceReport>,
    /// Wall time.
    pub elapsed: Duration,
    /// The TSC rate announced to the guest (kHz; 0 when KVM could not say).
    pub tsc_khz: u64,
    /// From the start of the run until the vCPUs were started (the kernel loaded, or the
    /// snapshot restored).
    pub ready_after: Duration,
}

/// What became of one device in a run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceReport {
    /// The device's name (`blk0`, `net0`, ...).
    pub name: String,
    /// The features the driver acknowledged.
    pub features: u64,
    /// Guest protocol violations the transport saw.
    pub violations: u64,
}

/// The command-line key that tells the guest its TSC rate in kHz.
pub const TSC_KHZ_KEY: &str = "pvkit.tsc_khz";

/// The port base of pvkit's doorbells when they are announced.
pub const DOORBELL_BASE: u16 = abi::DOORBELL_PORT_BASE;

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

fn kvm_err(what: &'static str) -> impl Fn(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { what, source }
}

/// A VM being built: KVM with its irqchip and PIT, guest memory, devices wired to their
/// backends, the guest's command line, the vCPUs.
struct Vm {
    kvm: Kvm,
    fd: Arc<VmFd>,
    ram: Arc<GuestRam>,
    devices: Vec<Arc<Mutex<VirtioDevice>>>,
    cmdline: String,
    doorbells: Option<Doorbells>,
    vcpus: Vec<VcpuFd>,
    tsc_khz: u64,
}

impl Vm {
    /// KVM, the in-kernel irqchip and PIT, and `ram` as guest memory.
    fn create(ram: GuestRam, cmdline: &str) -> Result<Vm, VmError> {
        let kvm = Kvm::new().map_err(kvm_err("opening /dev/kvm"))?;
        let fd = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
        fd.create_irq_chip().map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
        fd.create_pit2(kvm_pit_config::default()).map_err(kvm_err("KVM_CREATE_PIT2"))?;
        let ram = Arc::new(ram);
        let region = kvm_userspace_memory_region {
            slot: 0,
            flags: 0,
            guest_phys_addr: 0,
            memory_size: ram.size(),
            userspace_addr: ram.host_base(),
        };
        // SAFETY: the region maps memory this process owns (the memfd mapping in `ram`), which
        // outlives the VM: `ram` is kept alive until after the vCPUs are joined.
        unsafe { fd.set_user_memory_region(region) }.map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))?;
        let cmdline = cmdline.trim().to_string();
        Ok(Vm {
            kvm,
            fd: Arc::new(fd),
            ram,
            devices: Vec::new(),
            cmdline,
            doorbells: None,
            vcpus: Vec::new(),
            tsc_khz: 0,
        })
    }

    /// Connects each device to its backend at the next microvm slot, wires its kicks as
    /// ioeventfds (QueueNotify, and the doorbell ports when announced) and its calls as irqfds,
    /// and announces it on the command line. With `saved` (a restore), each device takes its
    /// saved transport state instead, and the command line stays the snapshot's.
    fn attach_devices(
        &mut self,
        specs: &[DeviceSpec],
        doorbells: bool,
        saved: Option<&[crate::snapshot::DeviceSnapshot]>,
    ) -> Result<(), VmError> {
        self.doorbells = doorbells.then(|| Doorbells::parse(&format!("{DOORBELL_BASE:#x}")).ok()).flatten();
        for (index, spec) in specs.iter().enumerate() {
            let slot = index as u32;
            let failed = |source| VmError::Device { index, socket: spec.socket.display().to_string(), source };
            let mut device =
                VirtioDevice::connect(spec.device, slot, spec.socket.clone(), &self.ram).map_err(failed)?;
            if let Some(state) = saved.and_then(|s| s.get(index)) {
                device.restore(state, &self.ram).map_err(failed)?;
            }
            let entry = MmioDeviceEntry::for_slot(slot).ok_or(VmError::TooManyDevices(specs.len()))?;
            self.wire(&device, slot, &entry)?;
            info!(
                "{} at slot {slot} ({:#x}, IRQ {}): {} queue(s), backend {}",
                device.name,
                entry.base,
                entry.irq,
                device.kicks.len(),
                spec.socket.display()
            );
            if saved.is_none() {
                self.cmdline.push_str(&format!(" {entry}"));
            }
            self.devices.push(Arc::new(Mutex::new(device)));
        }
        if let Some(d) = self.doorbells
            && saved.is_none()
        {
            let base = d.port(0, 0).unwrap_or(DOORBELL_BASE);
            self.cmdline.push_str(&format!(" {}={base:#x}", abi::key::DOORBELLS));
        }
        Ok(())
    }

    fn wire(&self, device: &VirtioDevice, slot: u32, entry: &MmioDeviceEntry) -> Result<(), VmError> {
        for (queue, kick) in device.kicks.iter().enumerate() {
            let notify = IoEventAddress::Mmio(entry.base + Register::QueueNotify.offset());
            self.fd.register_ioevent(kick, &notify, queue as u32).map_err(kvm_err("KVM_IOEVENTFD (mmio)"))?;
            if let Some(port) = self.doorbells.and_then(|d| d.port(slot, queue as u16)) {
                self.fd
                    .register_ioevent(kick, &IoEventAddress::Pio(u64::from(port)), queue as u16)
                    .map_err(kvm_err("KVM_IOEVENTFD (port)"))?;
            }
        }
        for call in &device.calls {
            self.fd.register_irqfd(call, entry.irq).map_err(kvm_err("KVM_IRQFD"))?;
        }
        Ok(())
    }

    /// Creates the vCPUs and tells the guest how completions reach it and its TSC's rate (the
    /// guest has no other clock it can trust).
    fn create_vcpus(&mut self, count: u8, completion: Option<CompletionMode>) -> Result<(), VmError> {
        let completion =
            completion.unwrap_or(if crate::kvm_is_pvm() { CompletionMode::Poll } else { CompletionMode::Interrupt });
        self.cmdline.push_str(&format!(" {}={}", abi::key::COMPLETION, completion.as_str()));
        for id in 0..count.max(1) {
            self.vcpus.push(self.fd.create_vcpu(u64::from(id)).map_err(kvm_err("KVM_CREATE_VCPU"))?);
        }
        self.tsc_khz = self.vcpus.first().and_then(|v| v.get_tsc_khz().ok()).map_or(0, u64::from);
        if self.tsc_khz > 0 {
            self.cmdline.push_str(&format!(" {TSC_KHZ_KEY}={}", self.tsc_khz));
        }
        Ok(())
    }

    /// Loads the kernel with the command line as built and sets the vCPUs up to enter it (the
    /// first at the entry point, the others waiting for a start-up IPI).
    fn boot_vcpus(&self, kernel: &[u8]) -> Result<(), VmError> {
        let loaded = loader::load(&self.ram, kernel, &self.cmdline)?;
        for (id, vcpu_fd) in self.vcpus.iter().enumerate() {
            if id == 0 {
                vcpu::configure(&self.kvm, vcpu_fd, &loaded)?;
            } else {
                let cpuid = self
                    .kvm
                    .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
                    .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
                vcpu_fd.set_cpuid2(&cpuid).map_err(kvm_err("KVM_SET_CPUID2"))?;
            }
        }
        Ok(())
    }

    /// Creates the snapshot's vCPUs and puts back their state and the in-kernel devices'.
    fn restore_vcpus(&mut self, snapshot: &Snapshot) -> Result<(), VmError> {
        let manifest = &snapshot.manifest;
        for id in 0..manifest.vcpus {
            self.vcpus.push(self.fd.create_vcpu(u64::from(id)).map_err(kvm_err("KVM_CREATE_VCPU"))?);
        }
        snapshot.machine.chips.apply(&self.fd).map_err(SnapshotError::from)?;
        let xsave_size = crate::snapshot::vcpu_state::xsave_size(&self.fd);
        for (vcpu_fd, state) in self.vcpus.iter().zip(&snapshot.machine.vcpus) {
            state
                .apply(vcpu_fd, xsave_size)
                .map_err(|source| SnapshotError::VcpuState { id: usize::from(state.id), source })?;
        }
        self.tsc_khz = manifest.tsc_khz;
        Ok(())
    }

    /// Starts one thread per vCPU; the first one's outcome goes to `done`.
    fn start_vcpus(
        &mut self,
        bus: Arc<VmBus>,
        stop: &Arc<AtomicBool>,
        done: std::sync::mpsc::Sender<Outcome>,
        sandbox: crate::seccomp::ThreadSandbox,
        control: &Arc<crate::control::VmControl>,
    ) -> Result<Vec<std::thread::JoinHandle<()>>, VmError> {
        vmm_sys_util::signal::register_signal_handler(vmm_sys_util::signal::SIGRTMIN(), kick_handler)
            .map_err(VmError::Signal)?;
        let reader = Arc::new(vcpu::StateReader {
            msrs: crate::snapshot::vcpu_state::MsrList::from_kvm(&self.kvm).map_err(SnapshotError::from)?,
            xsave_size: crate::snapshot::vcpu_state::xsave_size(&self.fd),
        });
        let mut threads = Vec::new();
        for (id, mut vcpu_fd) in std::mem::take(&mut self.vcpus).into_iter().enumerate() {
            let (bus, stop, done, control, reader) =
                (bus.clone(), stop.clone(), done.clone(), control.clone(), reader.clone());
            let thread = std::thread::Builder::new()
                .name(format!("vcpu{id}"))
                .spawn(move || {
                    if let Err(e) = crate::seccomp::confine_this_thread(crate::seccomp::VmmThread::Vcpu, sandbox) {
                        log::error!("vCPU {id}: {e}; running without a filter");
                    }
                    let outcome = vcpu::run(&mut vcpu_fd, id, &reader, bus.as_ref(), &stop, &control);
                    if id == 0 {
                        let _ = done.send(outcome);
                    }
                })
                .map_err(|source| VmError::Spawn { thread: format!("vCPU {id}"), source })?;
            threads.push(thread);
        }
        Ok(threads)
    }

    /// What each device ended with.
    fn device_reports(&self) -> Vec<DeviceReport> {
        self.devices
            .iter()
            .map(|d| {
                let d = lock(d);
                DeviceReport { name: d.name.clone(), features: d.state.negotiated_features(), violations: d.violations }
            })
            .collect()
    }
}

/// Stops every vCPU thread (a signal kicks each out of KVM_RUN) and joins them.
fn stop_vcpus(threads: Vec<std::thread::JoinHandle<()>>) {
    use vmm_sys_util::signal::Killable;
    for thread in threads {
        while !thread.is_finished() {
            let _ = thread.kill(vmm_sys_util::signal::SIGRTMIN());
            std::thread::sleep(Duration::from_millis(5));
        }
        let _ = thread.join();
    }
}

/// Waits for the run's outcome; the watchdog fires after `timeout` of running (time spent
/// paused does not count).
fn wait_for_outcome(
    done: &std::sync::mpsc::Receiver<Outcome>,
    timeout: Duration,
    control: &crate::control::VmControl,
) -> Outcome {
    const STEP: Duration = Duration::from_millis(100);
    let mut deadline = Instant::now() + timeout;
    loop {
        match done.recv_timeout(STEP) {
            Ok(outcome) => return outcome,
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return Outcome::TimedOut,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
        }
        if control.state() == crate::control::RunState::Paused {
            deadline += STEP;
        }
        if Instant::now() >= deadline {
            return Outcome::TimedOut;
        }
    }
}

/// Builds the VM (booting `config.kernel`, or from `config.restore`), runs the guest until it
/// exits (or the watchdog fires), and reports.
pub fn run(mut config: VmConfig) -> Result<RunReport, VmError> {
    let started = Instant::now();
    let mut vm = match config.restore.take() {
        None => build(&config)?,
        Some(restore) => build_restored(restore)?,
    };
    let slotted: Vec<(u32, Arc<Mutex<VirtioDevice>>)> =
        vm.devices.iter().enumerate().map(|(slot, device)| (slot as u32, device.clone())).collect();
    let bus = Arc::new(VmBus {
        serial: Com1::new(config.serial),
        devices: SlotTable::new(&slotted),
        ram: vm.ram.clone(),
        doorbells: vm.doorbells,
    });
    let stop = Arc::new(AtomicBool::new(false));
    let (done_tx, done_rx) = std::sync::mpsc::channel::<Outcome>();
    let machine = Arc::new(crate::snapshot::save::Machine {
        vm: vm.fd.clone(),
        cmdline: vm.cmdline.clone(),
        vcpus: vm.vcpus.len() as u8,
        tsc_khz: vm.tsc_khz,
        doorbells: vm.doorbells.is_some(),
    });
    let threads = vm.start_vcpus(bus, &stop, done_tx.clone(), config.sandbox, &config.control)?;
    let ready_after = started.elapsed();
    log::info!("vCPUs started {:.1} ms after start-up began", ready_after.as_secs_f64() * 1000.0);
    if let Some(on_started) = config.on_started.take() {
        on_started(ready_after);
    }
    {
        use std::os::unix::thread::JoinHandleExt;
        let ids = threads.iter().map(|t| t.as_pthread_t()).collect();
        config.control.started(ids, done_tx, vm.devices.clone(), vm.ram.clone(), Some(machine));
    }
    let events =
        crate::backend_watch::spawn(vm.devices.clone(), vm.ram.clone(), config.reconnect, stop.clone(), config.sandbox)
            .map_err(|source| VmError::Spawn { thread: "the event loop".into(), source })?;

    let outcome = wait_for_outcome(&done_rx, config.timeout, &config.control);
    stop.store(true, Ordering::SeqCst);
    config.control.ended();
    stop_vcpus(threads);
    let _ = events.join();
    let devices = vm.device_reports();
    Ok(RunReport {
        outcome,
        cmdline: vm.cmdline,
        devices,
        elapsed: started.elapsed(),
        tsc_khz: vm.tsc_khz,
        ready_after,
    })
}

/// A VM that boots `config.kernel` with `config.devices`.
fn build(config: &VmConfig) -> Result<Vm, VmError> {
    if config.devices.len() > abi::MMIO_SLOTS as usize {
        return Err(VmError::TooManyDevices(config.devices.len()));
    }
    let mut vm = Vm::create(GuestRam::new(config.memory)?, &config.cmdline)?;
    vm.attach_devices(&config.devices, config.doorbells, None)?;
    vm.create_vcpus(config.vcpus, config.completion)?;
    vm.boot_vcpus(&config.kernel)?;
    Ok(vm)
}

/// A VM as the snapshot left it: its memory, its devices on their backends (rings started at
/// the saved indexes), its vCPUs and in-kernel devices.
fn build_restored(restore: Restore) -> Result<Vm, VmError> {
    let manifest = &restore.snapshot.manifest;
    let ram = match restore.memory {
        RestoreMemory::File(ref path) => {
            let ram = GuestRam::new(manifest.memory.size)?;
            crate::snapshot::memory_image::load(&ram, path).map_err(SnapshotError::from)?;
            ram
        }
        RestoreMemory::Filled(ram) => ram,
    };
    if ram.size() != manifest.memory.size {
        return Err(SnapshotError::Inconsistent(format!(
            "{} bytes of guest memory for a snapshot of {}",
            ram.size(),
            manifest.memory.size
        ))
        .into());
    }
    let mut vm = Vm::create(ram, &manifest.cmdline)?;
    let specs = restore_specs(&restore.snapshot, &restore.sockets)?;
    vm.attach_devices(&specs, manifest.doorbells, Some(&manifest.devices))?;
    vm.restore_vcpus(&restore.snapshot)?;
    for device in &vm.devices {
        let mut device = lock(device);
        device.resume(&vm.ram).map_err(|source| VmError::Device {
            index: device.slot as usize,
            socket: device.socket.display().to_string(),
            source,
        })?;
    }
    Ok(vm)
}

/// The devices of a snapshot with the sockets to use.
fn restore_specs(snapshot: &Snapshot, sockets: &[PathBuf]) -> Result<Vec<DeviceSpec>, VmError> {
    let saved = &snapshot.manifest.devices;
    if saved.len() != sockets.len() {
        return Err(
            SnapshotError::Inconsistent(format!("{} devices and {} sockets", saved.len(), sockets.len())).into()
        );
    }
    saved
        .iter()
        .zip(sockets)
        .map(|(d, socket)| {
            let device = DeviceId::try_from(d.virtio_id).map_err(|e| {
                SnapshotError::Inconsistent(format!("device {} has virtio id {}: {e}", d.slot, d.virtio_id))
            })?;
            Ok(DeviceSpec { device, socket: socket.clone() })
        })
        .collect()
}
