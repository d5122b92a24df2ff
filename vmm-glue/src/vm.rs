//! The VM: KVM with its in-kernel irqchip and PIT, guest memory, COM1, the debug-exit port,
//! virtio-mmio devices at the microvm slots (announced on the command line) whose queues are
//! served by vhost-user backends, doorbells (ioeventfd on QueueNotify and on pvkit's doorbell
//! ports) and interrupts (irqfd on IOAPIC pins) wired through the kernel, vCPU threads, a
//! watchdog, and an `event-manager` loop that notices backends going away and reconnects.

use crate::device::VirtioDevice;
use crate::loader;
use crate::memory::GuestRam;
use crate::serial::Com1;
use crate::sync::lock;
use crate::vcpu::{self, Bus, Outcome};
use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region};
use kvm_ioctls::{IoEventAddress, Kvm};
use log::{info, warn};
use pvkit_protocol::abi::{self, CompletionMode, Doorbells, MmioDeviceEntry};
use pvkit_protocol::mmio::Register;
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use vmm_sys_util::epoll::EventSet;

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
    /// The virtio device type (1 net, 2 block, 3 console, ...).
    pub virtio_id: u32,
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
}

/// What a run produced.
#[derive(Debug)]
pub struct RunReport {
    /// How the guest ended.
    pub outcome: Outcome,
    /// The command line the guest got.
    pub cmdline: String,
    /// Per device: name, features the driver acknowledged, guest protocol violations.
    pub devices: Vec<(String, u64, u64)>,
    /// Wall time.
    pub elapsed: Duration,
    /// The TSC rate announced to the guest (kHz; 0 when KVM could not say).
    pub tsc_khz: u64,
}

/// The command-line key that tells the guest its TSC rate in kHz.
pub const TSC_KHZ_KEY: &str = "pvkit.tsc_khz";

/// The port base of pvkit's doorbells when they are announced.
pub const DOORBELL_BASE: u16 = abi::DOORBELL_PORT_BASE;

/// The devices by virtio-mmio slot, fixed when the VM is built: finding the device of a vCPU
/// exit takes no lock, and an exit waits only for its own device's.
struct SlotTable<T = Mutex<VirtioDevice>> {
    slots: Vec<Option<Arc<T>>>,
}

impl<T> SlotTable<T> {
    fn new(devices: &[(u32, Arc<T>)]) -> SlotTable<T> {
        let mut slots = vec![None; abi::MMIO_SLOTS as usize];
        for (slot, device) in devices {
            if let Some(entry) = slots.get_mut(*slot as usize) {
                *entry = Some(device.clone());
            }
        }
        SlotTable { slots }
    }

    fn get(&self, slot: u32) -> Option<&Arc<T>> {
        self.slots.get(slot as usize)?.as_ref()
    }
}

struct VmBus {
    serial: Com1,
    devices: SlotTable,
    ram: Arc<GuestRam>,
    doorbells: Option<Doorbells>,
}

impl VmBus {
    fn device_at(&self, addr: u64) -> Option<(&Arc<Mutex<VirtioDevice>>, u64)> {
        let (slot, offset) = abi::slot_of(addr)?;
        self.devices.get(slot).map(|d| (d, offset))
    }
}

impl Bus for VmBus {
    fn pio_read(&self, port: u16, data: &mut [u8]) {
        if Com1::claims(port) {
            data.fill(0);
            if let Some(first) = data.first_mut() {
                *first = self.serial.read(port);
            }
            return;
        }
        data.fill(0xff);
    }

    fn pio_write(&self, port: u16, data: &[u8]) {
        if Com1::claims(port) {
            if let Some(value) = data.first() {
                self.serial.write(port, *value);
            }
            return;
        }
        // Doorbells for real queues are ioeventfds and never get here: a write to a doorbell
        // port of a queue that does not exist is a guest error for that device.
        if let Some((slot, queue)) = self.doorbells.and_then(|d| d.decode(port))
            && let Some(device) = self.devices.get(slot)
        {
            let mut device = lock(device);
            let offset = Register::QueueNotify.offset();
            device.mmio_write(offset, &u32::from(queue).to_le_bytes(), &self.ram);
        }
    }

    fn mmio_read(&self, addr: u64, data: &mut [u8]) {
        match self.device_at(addr) {
            Some((device, offset)) => lock(device).mmio_read(offset, data),
            None => data.fill(0xff),
        }
    }

    fn mmio_write(&self, addr: u64, data: &[u8]) {
        if let Some((device, offset)) = self.device_at(addr) {
            lock(device).mmio_write(offset, data, &self.ram);
        }
    }
}

/// Watches each backend's control socket (a hang-up means the backend went away) and its
/// backend request channel (a configuration change). Event data: device index times two,
/// plus one for the request channel.
struct BackendWatch {
    devices: Vec<Arc<Mutex<VirtioDevice>>>,
    watched: Vec<[Option<i32>; 2]>,
}

impl BackendWatch {
    fn new(devices: Vec<Arc<Mutex<VirtioDevice>>>) -> BackendWatch {
        let watched = vec![[None; 2]; devices.len()];
        BackendWatch { devices, watched }
    }

    fn sync(&mut self, ops: &mut EventOps) {
        for (i, device) in self.devices.iter().enumerate() {
            let fds = device.lock().map_or([None; 2], |d| [d.link_fd(), d.backend_requests_fd()]);
            for (channel, (fd, watched)) in fds.into_iter().zip(self.watched[i].iter_mut()).enumerate() {
                if fd == *watched {
                    continue;
                }
                let data = (i * 2 + channel) as u32;
                let events = if channel == 0 { EventSet::READ_HANG_UP } else { EventSet::IN | EventSet::READ_HANG_UP };
                if let Some(old) = *watched {
                    let _ = ops.remove(Events::with_data_raw(old, data, events));
                }
                if let Some(new) = fd {
                    let _ = ops.add(Events::with_data_raw(new, data, events));
                }
                *watched = fd;
            }
        }
    }
}

impl MutEventSubscriber for BackendWatch {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let (index, channel) = (events.data() as usize / 2, events.data() % 2);
        let hung_up = events.event_set().intersects(EventSet::HANG_UP | EventSet::READ_HANG_UP);
        if let Some(device) = self.devices.get(index) {
            let mut device = lock(device);
            if channel == 0 {
                // Only a hang-up counts: replies to the VMM's own requests make the socket
                // readable too, and are read by whoever asked.
                if hung_up {
                    device.backend_lost();
                }
            } else if events.event_set().contains(EventSet::IN) || hung_up {
                // A request (or the end of the channel, which reading reports).
                device.backend_request();
            }
        }
        self.sync(ops);
    }

    fn init(&mut self, ops: &mut EventOps) {
        self.sync(ops);
    }
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

fn kvm_err(what: &'static str) -> impl Fn(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { what, source }
}

/// Builds the VM, runs the guest until it exits (or the watchdog fires), and reports.
pub fn run(config: VmConfig) -> Result<RunReport, VmError> {
    let started = Instant::now();
    if config.devices.len() > abi::MMIO_SLOTS as usize {
        return Err(VmError::TooManyDevices(config.devices.len()));
    }
    let kvm = Kvm::new().map_err(kvm_err("opening /dev/kvm"))?;
    let vm = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
    vm.create_irq_chip().map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
    vm.create_pit2(kvm_pit_config::default()).map_err(kvm_err("KVM_CREATE_PIT2"))?;
    let ram = Arc::new(GuestRam::new(config.memory)?);
    let region = kvm_userspace_memory_region {
        slot: 0,
        flags: 0,
        guest_phys_addr: 0,
        memory_size: ram.size(),
        userspace_addr: ram.host_base(),
    };
    // SAFETY: the region maps memory this process owns (the memfd mapping in `ram`), which
    // outlives the VM: `ram` is kept alive until after the vCPUs are joined.
    unsafe { vm.set_user_memory_region(region) }.map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))?;

    let doorbells = config.doorbells.then(|| Doorbells::parse(&format!("{DOORBELL_BASE:#x}")).ok()).flatten();
    let mut devices = Vec::new();
    let mut cmdline = config.cmdline.trim().to_string();
    for (index, spec) in config.devices.iter().enumerate() {
        let slot = index as u32;
        let device = VirtioDevice::connect(spec.virtio_id, slot, spec.socket.clone(), &ram)
            .map_err(|source| VmError::Device { index, socket: spec.socket.display().to_string(), source })?;
        let entry = MmioDeviceEntry::for_slot(slot).ok_or(VmError::TooManyDevices(config.devices.len()))?;
        for (queue, kick) in device.kicks.iter().enumerate() {
            let notify = IoEventAddress::Mmio(entry.base + Register::QueueNotify.offset());
            vm.register_ioevent(kick, &notify, queue as u32).map_err(kvm_err("KVM_IOEVENTFD (mmio)"))?;
            if let Some(port) = doorbells.and_then(|d| d.port(slot, queue as u16)) {
                vm.register_ioevent(kick, &IoEventAddress::Pio(u64::from(port)), queue as u16)
                    .map_err(kvm_err("KVM_IOEVENTFD (port)"))?;
            }
        }
        for call in &device.calls {
            vm.register_irqfd(call, entry.irq).map_err(kvm_err("KVM_IRQFD"))?;
        }
        info!(
            "{} at slot {slot} ({:#x}, IRQ {}): {} queue(s), backend {}",
            device.name,
            entry.base,
            entry.irq,
            device.kicks.len(),
            spec.socket.display()
        );
        cmdline.push(' ');
        cmdline.push_str(&entry.to_string());
        devices.push(Arc::new(Mutex::new(device)));
    }
    let slotted: Vec<(u32, Arc<Mutex<VirtioDevice>>)> =
        devices.iter().enumerate().map(|(slot, device)| (slot as u32, device.clone())).collect();
    if let Some(d) = doorbells {
        cmdline.push_str(&format!(" {}={:#x}", abi::key::DOORBELLS, d.port(0, 0).unwrap_or(DOORBELL_BASE)));
    }
    let completion =
        config.completion.unwrap_or(if crate::kvm_is_pvm() { CompletionMode::Poll } else { CompletionMode::Interrupt });
    cmdline.push_str(&format!(" {}={}", abi::key::COMPLETION, completion.as_str()));
    let mut vcpu_fds = Vec::new();
    for id in 0..config.vcpus.max(1) {
        vcpu_fds.push(vm.create_vcpu(u64::from(id)).map_err(kvm_err("KVM_CREATE_VCPU"))?);
    }
    // The guest has no other clock it can trust: tell it the TSC's rate.
    let tsc_khz = vcpu_fds.first().and_then(|v| v.get_tsc_khz().ok()).map_or(0, u64::from);
    if tsc_khz > 0 {
        cmdline.push_str(&format!(" {TSC_KHZ_KEY}={tsc_khz}"));
    }
    let loaded = loader::load(&ram, &config.kernel, &cmdline)?;

    let bus = Arc::new(VmBus {
        serial: Com1::new(config.serial),
        devices: SlotTable::new(&slotted),
        ram: ram.clone(),
        doorbells,
    });
    let stop = Arc::new(AtomicBool::new(false));
    vmm_sys_util::signal::register_signal_handler(vmm_sys_util::signal::SIGRTMIN(), kick_handler)
        .map_err(VmError::Signal)?;
    let (done_tx, done_rx) = std::sync::mpsc::channel::<Outcome>();
    let mut threads = Vec::new();
    for (id, mut vcpu_fd) in vcpu_fds.into_iter().enumerate() {
        if id == 0 {
            vcpu::configure(&kvm, &vcpu_fd, &loaded)?;
        } else {
            let cpuid = kvm
                .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
                .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
            vcpu_fd.set_cpuid2(&cpuid).map_err(kvm_err("KVM_SET_CPUID2"))?;
        }
        let (bus, stop, done) = (bus.clone(), stop.clone(), done_tx.clone());
        let thread = std::thread::Builder::new()
            .name(format!("vcpu{id}"))
            .spawn(move || {
                let outcome = vcpu::run(&mut vcpu_fd, bus.as_ref(), &stop);
                if id == 0 {
                    let _ = done.send(outcome);
                }
            })
            .map_err(|source| VmError::Spawn { thread: format!("vCPU {id}"), source })?;
        threads.push(thread);
    }

    // The event loop: backend hang-ups, and reconnects while a backend is away.
    let events_stop = stop.clone();
    let watch_devices = devices.clone();
    let watch_ram = ram.clone();
    let reconnect = config.reconnect;
    let events = std::thread::Builder::new()
        .name("events".into())
        .spawn(move || {
            let mut manager = match EventManager::<BackendWatch>::new() {
                Ok(m) => m,
                Err(e) => {
                    warn!("event loop: {e:?}");
                    return;
                }
            };
            let mut id = manager.add_subscriber(BackendWatch::new(watch_devices.clone()));
            let mut last_try = Instant::now();
            while !events_stop.load(Ordering::SeqCst) {
                let _ = manager.run_with_timeout(50);
                if let Some(every) = reconnect
                    && last_try.elapsed() >= every
                {
                    last_try = Instant::now();
                    let mut changed = false;
                    for device in &watch_devices {
                        // The handshake runs without the device's lock (vCPU exits need it).
                        let target = lock(device).reconnect_target();
                        if let Some(link) = target.and_then(|t| t.connect(&watch_ram)) {
                            changed |= lock(device).adopt_link(link, &watch_ram);
                        }
                    }
                    if changed {
                        // Watch the new sockets: a fresh subscriber registers them.
                        let _ = manager.remove_subscriber(id);
                        id = manager.add_subscriber(BackendWatch::new(watch_devices.clone()));
                    }
                }
            }
        })
        .map_err(|source| VmError::Spawn { thread: "the event loop".into(), source })?;

    let outcome = done_rx.recv_timeout(config.timeout).unwrap_or(Outcome::TimedOut);
    stop.store(true, Ordering::SeqCst);
    for thread in threads {
        use vmm_sys_util::signal::Killable;
        while !thread.is_finished() {
            let _ = thread.kill(vmm_sys_util::signal::SIGRTMIN());
            std::thread::sleep(Duration::from_millis(5));
        }
        let _ = thread.join();
    }
    let _ = events.join();
    let devices = devices
        .iter()
        .map(|d| {
            let d = lock(d);
            (d.name.clone(), d.state.negotiated_features(), d.violations)
        })
        .collect();
    Ok(RunReport { outcome, cmdline, devices, elapsed: started.elapsed(), tsc_khz })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_exit_for_one_device_does_not_wait_for_another_devices_lock() {
        let devices: Vec<(u32, Arc<Mutex<u32>>)> = (0..3).map(|slot| (slot, Arc::new(Mutex::new(slot)))).collect();
        let table = Arc::new(SlotTable::new(&devices));
        // Slot 0's lock is held (a reconnect, a slow backend) while slot 2 takes an exit.
        let _held = devices[0].1.lock().unwrap();
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        let exit = {
            let table = table.clone();
            std::thread::spawn(move || {
                let value = table.get(2).map(|d| *d.lock().unwrap());
                let _ = done_tx.send(value);
            })
        };
        assert_eq!(done_rx.recv_timeout(Duration::from_secs(5)), Ok(Some(2)), "the exit stalled");
        exit.join().unwrap();
        assert!(table.get(3).is_none() && table.get(u32::MAX).is_none(), "empty and absurd slots");
    }
}
