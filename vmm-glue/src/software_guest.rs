//! The software guest: for machines without a usable /dev/kvm, and for fast tests. The same
//! guest memory (a memfd shared with the backends), the same virtio-mmio transport state and
//! vhost-user frontends as the VM, with `pvkit-guest-driver`'s drivers running in a host
//! thread in place of a vCPU. Register accesses go through the code a vCPU exit would take;
//! doorbells write the kick eventfds directly; completions are polled from the used rings.
//! It runs the tiny guest's self-test (and, on request, its benchmark) and reports the same
//! `PVKIT-RESULT` line.

use crate::device::VirtioDevice;
use crate::memory::GuestRam;
use crate::sync::lock;
use crate::vm::DeviceSpec;
use pvkit_guest_driver::device::blk::{BlkRequest, VirtIOBlk};
use pvkit_guest_driver::device::console::VirtIOConsole;
use pvkit_guest_driver::device::net::VirtIONet;
use pvkit_guest_driver::hal::{Dma, DmaMemory, Hal, PAGE_SIZE, PhysAddr};
use pvkit_guest_driver::hypercall::{Doorbell, Shim};
use pvkit_guest_driver::transport::{NotifyTarget, RingPlacement, Transport, TransportError};
use pvkit_protocol::mmio::Register;
use pvkit_protocol::ring::RingLayout;
use pvkit_protocol::virtio::DeviceId;
use std::fmt::Write as _;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use vmm_sys_util::eventfd::EventFd;

/// Errors from the software guest.
#[derive(Debug, thiserror::Error)]
pub enum SoftwareGuestError {
    /// Guest memory.
    #[error(transparent)]
    Memory(#[from] crate::memory::MemoryError),
    /// A backend.
    #[error("device {index} ({socket}): {source}")]
    Device {
        /// Position.
        index: usize,
        /// Socket.
        socket: String,
        /// Why.
        source: crate::frontend::FrontendError,
    },
    /// Another software guest runs in this process.
    #[error("one software guest at a time per process")]
    Busy,
}

/// Where DMA pages start in the software guest's memory (below: nothing).
const DMA_BASE: u64 = 1 << 20;

struct DmaArena {
    host_base: u64,
    size: u64,
    next: AtomicU64,
}

static ARENA: Mutex<Option<Arc<DmaArena>>> = Mutex::new(None);

fn arena() -> Option<Arc<DmaArena>> {
    lock(&ARENA).clone()
}

/// The software guest's `Hal`: DMA pages are guest RAM (bump-allocated, never reused),
/// physical addresses are guest physical addresses.
pub struct SoftHal;

// SAFETY: pages come from the shared guest memory, each handed out once (atomic bump), zeroed
// (fresh memfd memory), and valid for the device (the backends map the same memfd) and the
// driver (this process's mapping) for as long as the guest runs; `virt_to_phys` is the inverse
// of that mapping for addresses inside it, the only ones the software guest passes.
unsafe impl DmaMemory for SoftHal {
    fn dma_alloc(pages: usize) -> Option<(PhysAddr, NonNull<u8>)> {
        let arena = arena()?;
        let bytes = (pages * PAGE_SIZE) as u64;
        let gpa = arena.next.fetch_add(bytes, Ordering::SeqCst);
        if gpa.checked_add(bytes)? > arena.size {
            return None;
        }
        NonNull::new((arena.host_base + gpa) as *mut u8).map(|p| (gpa, p))
    }

    unsafe fn dma_dealloc(_paddr: PhysAddr, _vaddr: NonNull<u8>, _pages: usize) {}
}

// SAFETY: the software transport has no register window (its registers are
// function calls), so no driver maps one; `virt_to_phys` inverts the arena's mapping for the
// addresses inside it, the only ones the software guest passes.
unsafe impl Hal for SoftHal {
    fn mmio_phys_to_virt(_paddr: PhysAddr, _size: usize) -> NonNull<u8> {
        // The software transport has no register window; nothing maps one.
        NonNull::dangling()
    }

    fn virt_to_phys(vaddr: usize) -> PhysAddr {
        arena().map_or(0, |a| (vaddr as u64).wrapping_sub(a.host_base))
    }
}

/// A doorbell that writes a queue's kick eventfd (what KVM's ioeventfd does for a vCPU).
struct EventfdDoorbell {
    kicks: Vec<EventFd>,
}

impl Doorbell for EventfdDoorbell {
    fn ring(&self, queue: u16) {
        if let Some(kick) = self.kicks.get(usize::from(queue)) {
            let _ = kick.write(1);
        }
    }
}

/// A transport whose registers are the VMM's virtio-mmio handler, called directly.
pub struct SoftTransport {
    device: Arc<Mutex<VirtioDevice>>,
    ram: Arc<GuestRam>,
    doorbell: &'static EventfdDoorbell,
    notify_sink: &'static u32,
}

impl SoftTransport {
    fn read(&self, reg: Register) -> u32 {
        let mut data = [0u8; 4];
        let mut device = lock(&self.device);
        // No event loop here: take the backend's configuration changes before the registers
        // that report them.
        if matches!(reg, Register::InterruptStatus | Register::ConfigGeneration) {
            device.poll_backend_requests();
        }
        device.mmio_read(reg.offset(), &mut data);
        u32::from_le_bytes(data)
    }

    fn write(&mut self, reg: Register, value: u32) {
        lock(&self.device).mmio_write(reg.offset(), &value.to_le_bytes(), &self.ram);
    }

    /// The doorbell that kicks this device's queues.
    pub fn shim(&self) -> Shim {
        Shim::Custom(self.doorbell)
    }
}

impl Transport for SoftTransport {
    fn device_id(&self) -> u32 {
        self.read(Register::DeviceId)
    }
    fn requires_version_1(&self) -> bool {
        true
    }
    fn read_device_features(&mut self) -> u64 {
        self.write(Register::DeviceFeaturesSel, 0);
        let low = self.read(Register::DeviceFeatures);
        self.write(Register::DeviceFeaturesSel, 1);
        u64::from(self.read(Register::DeviceFeatures)) << 32 | u64::from(low)
    }
    fn write_driver_features(&mut self, features: u64) {
        self.write(Register::DriverFeaturesSel, 0);
        self.write(Register::DriverFeatures, features as u32);
        self.write(Register::DriverFeaturesSel, 1);
        self.write(Register::DriverFeatures, (features >> 32) as u32);
    }
    fn max_queue_size(&mut self, queue: u16) -> u16 {
        self.write(Register::QueueSel, queue.into());
        self.read(Register::QueueNumMax) as u16
    }
    fn ring_placement(&self) -> RingPlacement {
        RingPlacement::Separate
    }
    fn queue_set(&mut self, queue: u16, layout: &RingLayout) -> Result<(), TransportError> {
        self.write(Register::QueueSel, queue.into());
        self.write(Register::QueueNum, layout.size.into());
        for (low, high, addr) in [
            (Register::QueueDescLow, Register::QueueDescHigh, layout.desc),
            (Register::QueueDriverLow, Register::QueueDriverHigh, layout.avail),
            (Register::QueueDeviceLow, Register::QueueDeviceHigh, layout.used),
        ] {
            self.write(low, addr as u32);
            self.write(high, (addr >> 32) as u32);
        }
        self.write(Register::QueueReady, 1);
        if self.read(Register::QueueReady) == 1 { Ok(()) } else { Err(TransportError::BadLayout(queue)) }
    }
    fn queue_used(&mut self, queue: u16) -> bool {
        self.write(Register::QueueSel, queue.into());
        self.read(Register::QueueReady) != 0
    }
    fn notify_target(&mut self, queue: u16) -> Result<NotifyTarget, TransportError> {
        if self.max_queue_size(queue) == 0 {
            return Err(TransportError::NoSuchQueue(queue));
        }
        // Never written: the queues use `shim()`, which writes the kick eventfd.
        Ok(NotifyTarget::Mmio32(NonNull::from(self.notify_sink).cast()))
    }
    fn status(&self) -> u8 {
        self.read(Register::Status) as u8
    }
    fn set_status(&mut self, status: u8) {
        self.write(Register::Status, status.into());
    }
    fn ack_interrupt(&mut self) -> u32 {
        let isr = self.read(Register::InterruptStatus);
        self.write(Register::InterruptAck, isr);
        isr
    }
    fn config_generation(&self) -> u32 {
        self.read(Register::ConfigGeneration)
    }
    fn read_config(&self, offset: usize, buf: &mut [u8]) -> Result<(), TransportError> {
        lock(&self.device).mmio_read(0x100 + offset as u64, buf);
        Ok(())
    }
    fn write_config(&mut self, offset: usize, data: &[u8]) -> Result<(), TransportError> {
        lock(&self.device).mmio_write(0x100 + offset as u64, data, &self.ram);
        Ok(())
    }
}

/// The software guest's report: the serial-like log with its `PVKIT-RESULT` line.
#[derive(Debug, Default)]
pub struct SoftwareReport {
    /// What the guest "printed".
    pub log: String,
    /// Per device: name and negotiated features.
    pub devices: Vec<(String, u64)>,
}

struct Checks {
    log: String,
    checks: Vec<(&'static str, bool)>,
    doorbells: Vec<(&'static str, &'static str)>,
}

impl Checks {
    fn set(&mut self, name: &'static str, ok: bool) {
        let _ = writeln!(self.log, "software-guest: check {name}: {}", if ok { "pass" } else { "FAIL" });
        self.checks.push((name, ok));
    }
}

fn wait(timeout: Duration, mut ready: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if ready() {
            return true;
        }
        std::hint::spin_loop();
    }
    false
}

/// Requests in flight in the software guest's block benchmark, one page each.
const BENCH_SLOTS: usize = 16;

/// Runs the self-test (and with `bench_ms`, a benchmark of that length per device) against
/// the backends in `devices`, with `memory` bytes of guest memory.
pub fn run(devices: &[DeviceSpec], memory: u64, bench_ms: Option<u64>) -> Result<SoftwareReport, SoftwareGuestError> {
    let ram = Arc::new(GuestRam::new(memory)?);
    {
        let mut slot = lock(&ARENA);
        if slot.is_some() {
            return Err(SoftwareGuestError::Busy);
        }
        *slot =
            Some(Arc::new(DmaArena { host_base: ram.host_base(), size: ram.size(), next: AtomicU64::new(DMA_BASE) }));
    }
    let result = run_with(devices, &ram, bench_ms);
    *lock(&ARENA) = None;
    result
}

fn run_with(
    specs: &[DeviceSpec],
    ram: &Arc<GuestRam>,
    bench_ms: Option<u64>,
) -> Result<SoftwareReport, SoftwareGuestError> {
    let mut checks = Checks { log: String::new(), checks: Vec::new(), doorbells: Vec::new() };
    let mut devices = Vec::new();
    let mut bench = String::new();
    for (index, spec) in specs.iter().enumerate() {
        let device = VirtioDevice::connect(spec.device, index as u32, spec.socket.clone(), ram).map_err(|source| {
            SoftwareGuestError::Device { index, socket: spec.socket.display().to_string(), source }
        })?;
        let kicks = device.kicks.iter().map(|k| k.try_clone()).collect::<Result<Vec<_>, _>>().map_err(|e| {
            SoftwareGuestError::Device {
                index,
                socket: spec.socket.display().to_string(),
                source: crate::frontend::FrontendError::Eventfd(e),
            }
        })?;
        let device = Arc::new(Mutex::new(device));
        devices.push(device.clone());
        let transport = SoftTransport {
            device,
            ram: ram.clone(),
            doorbell: Box::leak(Box::new(EventfdDoorbell { kicks })),
            notify_sink: Box::leak(Box::new(0u32)),
        };
        match spec.device {
            DeviceId::Block => blk(&mut checks, transport, bench_ms, &mut bench),
            DeviceId::Net => net(&mut checks, transport, bench_ms, &mut bench),
            DeviceId::Console => console(&mut checks, transport, bench_ms, &mut bench),
            other => {
                let _ = writeln!(checks.log, "software-guest: no self-test for virtio {} devices", other.name());
            }
        }
    }
    let mut line = String::from("PVKIT-RESULT {\"mode\":\"poll\",\"checks\":{");
    for (i, (name, ok)) in checks.checks.iter().enumerate() {
        let _ = write!(line, "{}\"{name}\":{ok}", if i > 0 { "," } else { "" });
    }
    line.push_str("},\"doorbells\":{");
    for (i, (device, mechanism)) in checks.doorbells.iter().enumerate() {
        let _ = write!(line, "{}\"{device}\":\"{mechanism}\"", if i > 0 { "," } else { "" });
    }
    line.push_str("},\"irqs\":0}");
    let log = format!("{}{bench}{line}\n", checks.log);
    let devices = devices
        .iter()
        .map(|d| {
            let d = lock(d);
            (d.name.clone(), d.state.negotiated_features())
        })
        .collect();
    Ok(SoftwareReport { log, devices })
}

/// Benchmark lines in the tiny guest's format; ticks are nanoseconds (a 1 GHz "TSC").
fn bench_line(out: &mut String, name: &str, ops: u64, bytes: u64, kicks: u64, elapsed: Duration) {
    let _ = writeln!(out, "PVKIT-BENCH-END {name} ops={ops} bytes={bytes} kicks={kicks} ticks={}", elapsed.as_nanos());
}

/// The TSC rate the software guest's benchmark lines are in, in kHz.
pub const SOFTWARE_TICK_KHZ: u64 = 1_000_000;

fn blk(checks: &mut Checks, transport: SoftTransport, bench_ms: Option<u64>, bench: &mut String) {
    let shim = transport.shim();
    let Ok(mut dev) = VirtIOBlk::<SoftHal, SoftTransport, 64>::new(transport, |_, _| shim) else {
        return checks.set("blk_init", false);
    };
    dev.queue().suppress_interrupts(true);
    checks.doorbells.push(("blk", "eventfd"));
    let capacity = dev.info().capacity;
    // Pages: one to write, one to read back, one for GET_ID, 16 for the benchmark's slots.
    let Some(mut dma) = Dma::<SoftHal>::new(3 + BENCH_SLOTS) else { return checks.set("blk_memory", false) };
    let (write_buf, rest) = dma.as_mut_bytes().split_at_mut(PAGE_SIZE);
    let (read_buf, rest) = rest.split_at_mut(PAGE_SIZE);
    let (id_page, slot_pages) = rest.split_at_mut(PAGE_SIZE);
    let mut ok = capacity >= 16;
    for (round, sector) in [0, capacity.saturating_sub(8)].into_iter().enumerate() {
        for (i, b) in write_buf.iter_mut().enumerate() {
            *b = (i as u8).wrapping_mul(31).wrapping_add(round as u8 * 101 + 7);
        }
        read_buf.fill(0);
        ok &= dev.write_blocks(sector, write_buf).is_ok()
            && dev.read_blocks(sector, read_buf).is_ok()
            && write_buf == read_buf;
    }
    checks.set("blk_write_read", ok);
    if dev.info().features.has(pvkit_protocol::blk::feature::FLUSH) {
        checks.set("blk_flush", dev.flush().is_ok());
    }
    let Some(id) = id_page.first_chunk_mut::<20>() else { return checks.set("blk_get_id", false) };
    // SAFETY: `id` is guest memory that outlives the request, which is waited for below.
    let got_id = unsafe { dev.submit(BlkRequest::GetId { buf: id }) }.is_ok() && {
        dev.kick();
        wait(Duration::from_secs(5), || matches!(dev.poll(), Ok(Some(c)) if c.result.is_ok()))
    };
    checks.set("blk_get_id", got_id);
    if let Some(ms) = bench_ms {
        let start_kicks = dev.queue().stats().kicks;
        let (started, mut done, mut in_flight, mut next) = (Instant::now(), 0u64, 0usize, 0u64);
        let blocks = (capacity / 8).max(1);
        while started.elapsed() < Duration::from_millis(ms) || in_flight > 0 {
            while in_flight < BENCH_SLOTS && started.elapsed() < Duration::from_millis(ms) {
                let slot = (next % BENCH_SLOTS as u64) as usize;
                next += 1;
                let Some(buf) = slot_pages.chunks_mut(PAGE_SIZE).nth(slot) else { break };
                let sector = (next.wrapping_mul(2_654_435_761) % blocks) * 8;
                // SAFETY: one in-flight request per 4 KiB slot (at most BENCH_SLOTS in flight,
                // submitted in turn and completed before a slot comes round again), and the
                // pages outlive every request (the loop waits for all before `dma` drops).
                if unsafe { dev.submit(BlkRequest::Read { sector, buf }) }.is_err() {
                    break;
                }
                in_flight += 1;
            }
            dev.kick();
            while let Ok(Some(_)) = dev.poll() {
                in_flight -= 1;
                done += 1;
            }
        }
        let kicks = dev.queue().stats().kicks - start_kicks;
        bench_line(bench, "blk", done, done * PAGE_SIZE as u64, kicks, started.elapsed());
    }
}

fn net(checks: &mut Checks, transport: SoftTransport, bench_ms: Option<u64>, bench: &mut String) {
    let shim = transport.shim();
    let Ok(mut dev) = VirtIONet::<SoftHal, SoftTransport, 64>::new(transport, |_, _| shim) else {
        return checks.set("net_init", false);
    };
    checks.doorbells.push(("net", "eventfd"));
    let mut frame = [0u8; 64];
    frame[..6].copy_from_slice(&[0xff; 6]);
    frame[6..12].copy_from_slice(&dev.mac());
    frame[12..14].copy_from_slice(&[0x88, 0xb5]);
    let mut buf = [0u8; 2048];
    let echoed = dev.send(&frame).is_ok()
        && wait(Duration::from_secs(5), || matches!(dev.receive(&mut buf), Ok(Some(n)) if buf[..n] == frame[..]));
    // The tiny guest's check name: an ARP reply, or (on a loopback) its own frame back.
    checks.set("net_arp", echoed);
    if let Some(ms) = bench_ms {
        let start_kicks = dev.queues().1.stats().kicks;
        let (started, mut sent, mut received) = (Instant::now(), 0u64, 0u64);
        while (started.elapsed() < Duration::from_millis(ms))
            || (received < sent && started.elapsed() < Duration::from_millis(2 * ms))
        {
            while sent - received < 32 && started.elapsed() < Duration::from_millis(ms) && dev.send(&frame).is_ok() {
                sent += 1;
            }
            while let Ok(Some(_)) = dev.receive(&mut buf) {
                received += 1;
            }
        }
        let kicks = dev.queues().1.stats().kicks - start_kicks;
        bench_line(bench, "net", received, received * 64, kicks, started.elapsed());
    }
}

fn console(checks: &mut Checks, transport: SoftTransport, bench_ms: Option<u64>, bench: &mut String) {
    let shim = transport.shim();
    let Ok(mut dev) = VirtIOConsole::<SoftHal, SoftTransport, 16>::new(transport, |_, _| shim) else {
        return checks.set("console_init", false);
    };
    checks.doorbells.push(("console", "eventfd"));
    let open = wait(Duration::from_secs(10), || dev.handle_control().is_ok() && dev.port_open());
    checks.set("console_write", open && dev.write(b"PVKIT-CONSOLE-PING\n").is_ok());
    let mut line = Vec::new();
    let mut buf = [0u8; 64];
    let got = wait(Duration::from_secs(10), || {
        if let Ok(n) = dev.read(&mut buf) {
            line.extend_from_slice(&buf[..n]);
        }
        line.contains(&b'\n')
    });
    checks.set("console_read", got && line.starts_with(b"PVKIT-CONSOLE-PONG"));
    if let Some(ms) = bench_ms {
        let chunk = [b'x'; pvkit_guest_driver::device::console::BUFFER_SIZE];
        let start_kicks = dev.queues().1.stats().kicks;
        let (started, mut writes) = (Instant::now(), 0u64);
        while started.elapsed() < Duration::from_millis(ms) && dev.write(&chunk).is_ok() {
            writes += 1;
        }
        let kicks = dev.queues().1.stats().kicks - start_kicks;
        bench_line(bench, "console", writes, writes * chunk.len() as u64, kicks, started.elapsed());
    }
}
