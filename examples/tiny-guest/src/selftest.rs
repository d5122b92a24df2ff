//! The self-test: blk writes patterns, reads them back and compares, flushes and asks for its
//! id; net sends an ARP request for the gateway and waits for the reply (or, on a loopback
//! backend, its own frame back); console writes a line and reads one back. Each check is a
//! named boolean in the result line; devices that are absent are left out.

use crate::discover::{Devices, Found};
use crate::hal::GuestHal;
use crate::irq;
use crate::println;
use pvkit_guest_driver::device::blk::{BlkRequest, VirtIOBlk};
use pvkit_guest_driver::device::console::VirtIOConsole;
use pvkit_guest_driver::device::net::VirtIONet;
use pvkit_guest_driver::hal::Dma;
use pvkit_guest_driver::hypercall::Shim;
use pvkit_guest_driver::transport::pci::PortConfigSpace;
use pvkit_guest_driver::transport::{AnyTransport, NotifyTarget, Transport};
use pvkit_protocol::abi::CompletionMode;
use pvkit_protocol::virtio::DeviceId;

const MAX_CHECKS: usize = 24;

/// The named results.
pub struct Checks {
    mode: CompletionMode,
    names: [&'static str; MAX_CHECKS],
    values: [bool; MAX_CHECKS],
    len: usize,
    doorbells: [(&'static str, &'static str); 3],
    doorbell_count: usize,
}

impl Checks {
    fn set(&mut self, name: &'static str, value: bool) {
        println!("tiny-guest: check {name}: {}", if value { "pass" } else { "FAIL" });
        if self.len < MAX_CHECKS {
            self.names[self.len] = name;
            self.values[self.len] = value;
            self.len += 1;
        }
    }

    /// Records a check made outside the device self-tests.
    pub fn set_external(&mut self, name: &'static str, value: bool) {
        self.set(name, value);
    }

    fn doorbell(&mut self, device: &'static str, shim: Shim) {
        if self.doorbell_count < self.doorbells.len() {
            self.doorbells[self.doorbell_count] = (device, shim.name());
            self.doorbell_count += 1;
        }
    }

    /// Every check passed, and there was at least one.
    pub fn passed(&self) -> bool {
        self.len > 0 && self.values[..self.len].iter().all(|v| *v)
    }

    /// `PVKIT-RESULT {...}` on COM1.
    pub fn print(&self) {
        use core::fmt::Write;
        let mut out = crate::serial::Serial;
        let _ = write!(out, "PVKIT-RESULT {{\"mode\":\"{}\",\"checks\":{{", self.mode.as_str());
        for i in 0..self.len {
            let _ = write!(out, "{}\"{}\":{}", if i > 0 { "," } else { "" }, self.names[i], self.values[i]);
        }
        let _ = write!(out, "}},\"doorbells\":{{");
        for (i, (device, name)) in self.doorbells[..self.doorbell_count].iter().enumerate() {
            let _ = write!(out, "{}\"{device}\":\"{name}\"", if i > 0 { "," } else { "" });
        }
        let _ = writeln!(out, "}},\"irqs\":{},\"dma_pages\":{}}}", irq::count(), crate::hal::pages_used());
    }
}

fn rdtsc() -> u64 {
    // SAFETY: rdtsc only reads the time-stamp counter.
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// A deadline in TSC ticks (assuming at most 4 GHz: waits may run longer, never shorter).
struct Deadline(u64);

impl Deadline {
    fn after_secs(seconds: u64) -> Deadline {
        Deadline(rdtsc().saturating_add(seconds * 4_000_000_000))
    }
    fn passed(&self) -> bool {
        rdtsc() > self.0
    }
}

/// Waits until `ready` (polling, or sleeping on interrupts); false on timeout.
fn wait(mode: CompletionMode, seconds: u64, mut ready: impl FnMut() -> bool) -> bool {
    let deadline = Deadline::after_secs(seconds);
    match mode {
        CompletionMode::Poll => loop {
            if ready() {
                return true;
            }
            if deadline.passed() {
                return false;
            }
            core::hint::spin_loop();
        },
        CompletionMode::Interrupt => {
            // The LAPIC tick wakes the halt about every millisecond at most; bound by the
            // deadline too.
            irq::wait_until(|| ready() || deadline.passed(), u64::MAX) && !deadline.passed()
        }
    }
}

/// Routes a device's interrupts (irq mode): virtio-mmio through its IOAPIC pin, virtio-pci
/// through one MSI-X entry per queue. Returns whether it could.
fn route_interrupts(
    transport: &mut AnyTransport,
    found_slot: Option<u32>,
    irq_pin: Option<u32>,
    vector: u8,
    queues: &[u16],
) -> bool {
    match transport {
        AnyTransport::Mmio(_) => match (irq_pin, found_slot) {
            (Some(pin), _) => {
                irq::route_ioapic(pin, vector);
                true
            }
            _ => false,
        },
        AnyTransport::Pci(pci) => {
            let (address, data) = irq::msi_message(vector);
            queues
                .iter()
                .enumerate()
                .all(|(entry, q)| pci.route_msix(&PortConfigSpace, entry as u16, address, data, Some(*q)).is_ok())
        }
    }
}

fn shim_for<'a>(cmdline: &'a str, slot: Option<u32>) -> impl Fn(u16, NotifyTarget) -> Shim + 'a {
    move |queue, target| Shim::choose(cmdline, slot, queue, target)
}

/// The block driver the self-test used.
pub type Blk = VirtIOBlk<GuestHal, AnyTransport, 64>;
/// The net driver.
pub type Net = VirtIONet<GuestHal, AnyTransport, 64>;
/// The console driver.
pub type Console = VirtIOConsole<GuestHal, AnyTransport, 16>;

/// The drivers, after the self-test, for the benchmark.
pub struct Drivers {
    pub blk: Option<Blk>,
    pub net: Option<Net>,
    pub console: Option<Console>,
}

/// Runs every check for the devices found.
pub fn run(cmdline: &str, mode: CompletionMode, mut devices: Devices) -> (Checks, Drivers) {
    let mut checks = Checks {
        mode,
        names: [""; MAX_CHECKS],
        values: [false; MAX_CHECKS],
        len: 0,
        doorbells: [("", ""); 3],
        doorbell_count: 0,
    };
    let blk = devices.take(DeviceId::Block.raw()).and_then(|found| blk(&mut checks, cmdline, mode, found));
    let net = devices.take(DeviceId::Net.raw()).and_then(|found| net(&mut checks, cmdline, mode, found));
    let console = devices.take(DeviceId::Console.raw()).and_then(|found| console(&mut checks, cmdline, mode, found));
    (checks, Drivers { blk, net, console })
}

fn vector_for(found: &Found, index: u8) -> u8 {
    match found.slot {
        Some(slot) => irq::MMIO_VECTOR_BASE + slot as u8,
        None => irq::PCI_VECTOR_BASE + index * 4,
    }
}

fn blk(checks: &mut Checks, cmdline: &str, mode: CompletionMode, found: Found) -> Option<Blk> {
    let vector = vector_for(&found, 0);
    let (slot, pin) = (found.slot, found.irq);
    // `pvkit.event_idx=off`: drive the block device without RING_EVENT_IDX (doorbell bench).
    let mut allowed = VirtIOBlk::<GuestHal, AnyTransport, 64>::SUPPORTED;
    if pvkit_protocol::abi::param(cmdline, "pvkit.event_idx") == Some("off") {
        allowed = allowed.without(pvkit_protocol::virtio::feature::RING_EVENT_IDX);
    }
    let mut dev =
        match VirtIOBlk::<GuestHal, AnyTransport, 64>::with_features(found.transport, allowed, shim_for(cmdline, slot))
        {
            Ok(dev) => dev,
            Err(e) => {
                println!("tiny-guest: blk: {e}");
                checks.set("blk_init", false);
                return None;
            }
        };
    checks.doorbell("blk", dev.queue().doorbell());
    let info = dev.info();
    println!("tiny-guest: blk: {} sectors, features {:#x}", info.capacity, info.features.0);
    if mode == CompletionMode::Interrupt {
        let routed = route_interrupts(dev.transport(), slot, pin, vector, &[0]);
        checks.set("blk_irq_routed", routed);
    } else {
        dev.queue().suppress_interrupts(true);
    }
    let irqs_before = irq::count();
    let Some(buffer) = Dma::<GuestHal>::new(2) else {
        checks.set("blk_memory", false);
        return None;
    };
    // SAFETY: the two DMA pages are this function's alone.
    let (write_buf, read_buf) = unsafe {
        let base = buffer.vaddr().as_ptr();
        (core::slice::from_raw_parts_mut(base, 4096), core::slice::from_raw_parts_mut(base.add(4096), 4096))
    };
    let mut ok = info.capacity >= 16;
    for (round, sector) in [0, info.capacity.saturating_sub(8)].into_iter().enumerate() {
        for (i, b) in write_buf.iter_mut().enumerate() {
            *b = (i as u8).wrapping_mul(31).wrapping_add(round as u8 * 101 + 7);
        }
        read_buf.fill(0);
        // SAFETY: both buffers are DMA pages that live until this function returns, and each
        // request is waited for before the buffers are touched again.
        ok &= unsafe { complete(&mut dev, mode, BlkRequest::Write { sector, buf: write_buf }) }
            && unsafe { complete(&mut dev, mode, BlkRequest::Read { sector, buf: read_buf }) }
            && write_buf == read_buf;
    }
    checks.set("blk_write_read", ok);
    if info.features.has(pvkit_protocol::blk::feature::FLUSH) {
        // SAFETY: no buffer.
        checks.set("blk_flush", unsafe { complete(&mut dev, mode, BlkRequest::Flush) });
    }
    let mut id = [0u8; pvkit_protocol::blk::ID_BYTES];
    // SAFETY: `id` lives until the request is waited for.
    let got_id = unsafe { complete(&mut dev, mode, BlkRequest::GetId { buf: &mut id }) };
    let id_len = id.iter().position(|b| *b == 0).unwrap_or(id.len());
    println!("tiny-guest: blk id '{}'", core::str::from_utf8(&id[..id_len]).unwrap_or("?"));
    checks.set("blk_get_id", got_id);
    if mode == CompletionMode::Interrupt {
        checks.set("blk_irq_delivered", irq::count() > irqs_before);
    }
    let stats = dev.queue().stats();
    println!("tiny-guest: blk: {} requests, {} kicks", stats.added, stats.kicks);
    Some(dev)
}

/// Submits one request, waits for its completion (polling or by interrupt), and says
/// whether it succeeded.
///
/// # Safety
///
/// As for `VirtIOBlk::submit`.
unsafe fn complete(
    dev: &mut VirtIOBlk<GuestHal, AnyTransport, 64>,
    mode: CompletionMode,
    request: BlkRequest<'_>,
) -> bool {
    // SAFETY: passed on from the caller.
    let Ok(token) = (unsafe { dev.submit(request) }) else { return false };
    dev.kick();
    loop {
        let arrived = wait(mode, 10, || {
            if mode == CompletionMode::Interrupt {
                dev.transport().ack_interrupt();
            }
            dev.queue().has_used()
        });
        if !arrived {
            println!("tiny-guest: blk: request timed out");
            return false;
        }
        match dev.poll() {
            Ok(Some(done)) if done.token == token => return done.result.is_ok(),
            Ok(_) => continue,
            Err(e) => {
                println!("tiny-guest: blk: {e}");
                return false;
            }
        }
    }
}

const GATEWAY: [u8; 4] = [10, 0, 2, 2];
const OWN_IP: [u8; 4] = [10, 0, 2, 15];

fn arp_request(mac: [u8; 6]) -> [u8; 60] {
    let mut f = [0u8; 60];
    f[..6].copy_from_slice(&[0xff; 6]);
    f[6..12].copy_from_slice(&mac);
    f[12..14].copy_from_slice(&[0x08, 0x06]);
    f[14..22].copy_from_slice(&[0, 1, 0x08, 0, 6, 4, 0, 1]);
    f[22..28].copy_from_slice(&mac);
    f[28..32].copy_from_slice(&OWN_IP);
    f[38..42].copy_from_slice(&GATEWAY);
    f
}

fn net(checks: &mut Checks, cmdline: &str, mode: CompletionMode, found: Found) -> Option<Net> {
    let vector = vector_for(&found, 1);
    let (slot, pin) = (found.slot, found.irq);
    let mut dev = match VirtIONet::<GuestHal, AnyTransport, 64>::new(found.transport, shim_for(cmdline, slot)) {
        Ok(dev) => dev,
        Err(e) => {
            println!("tiny-guest: net: {e}");
            checks.set("net_init", false);
            return None;
        }
    };
    let mac = dev.mac();
    checks.doorbell("net", dev.queues().1.doorbell());
    println!("tiny-guest: net: mac {:02x?}, link {}", mac, if dev.link_up() { "up" } else { "down" });
    if mode == CompletionMode::Interrupt {
        let routed = route_interrupts(dev.transport(), slot, pin, vector, &[0, 1]);
        checks.set("net_irq_routed", routed);
    } else {
        let (rx, tx) = dev.queues();
        rx.suppress_interrupts(true);
        tx.suppress_interrupts(true);
    }
    let irqs_before = irq::count();
    let request = arp_request(mac);
    let mut answered = false;
    let mut frame = [0u8; 2048];
    'attempts: for _ in 0..5 {
        if let Err(e) = dev.send(&request) {
            println!("tiny-guest: net: send: {e}");
            break;
        }
        let deadline = Deadline::after_secs(2);
        while !deadline.passed() {
            let got = wait(mode, 2, || {
                if mode == CompletionMode::Interrupt {
                    dev.transport().ack_interrupt();
                }
                dev.queues().0.has_used()
            });
            if !got {
                break;
            }
            match dev.receive(&mut frame) {
                Ok(Some(len)) => {
                    let f = &frame[..len];
                    let is_reply =
                        len >= 42 && f[12..14] == [0x08, 0x06] && f[20..22] == [0, 2] && f[28..32] == GATEWAY;
                    let is_echo = f.get(..60) == Some(&request[..]);
                    if is_reply || is_echo {
                        println!(
                            "tiny-guest: net: {}",
                            if is_reply { "ARP reply from the gateway" } else { "own frame back (loopback)" }
                        );
                        answered = true;
                        break 'attempts;
                    }
                }
                Ok(None) => {}
                Err(e) => println!("tiny-guest: net: receive: {e}"),
            }
        }
    }
    checks.set("net_arp", answered);
    if mode == CompletionMode::Interrupt {
        checks.set("net_irq_delivered", irq::count() > irqs_before);
    }
    Some(dev)
}

const PING: &[u8] = b"PVKIT-CONSOLE-PING\n";
const PONG: &[u8] = b"PVKIT-CONSOLE-PONG";

fn console(checks: &mut Checks, cmdline: &str, mode: CompletionMode, found: Found) -> Option<Console> {
    let vector = vector_for(&found, 2);
    let (slot, pin) = (found.slot, found.irq);
    let mut dev = match VirtIOConsole::<GuestHal, AnyTransport, 16>::new(found.transport, shim_for(cmdline, slot)) {
        Ok(dev) => dev,
        Err(e) => {
            println!("tiny-guest: console: {e}");
            checks.set("console_init", false);
            return None;
        }
    };
    checks.doorbell("console", dev.queues().1.doorbell());
    if mode == CompletionMode::Interrupt {
        let routed = route_interrupts(dev.transport(), slot, pin, vector, &[0, 1]);
        checks.set("console_irq_routed", routed);
    }
    let open = wait(CompletionMode::Poll, 10, || dev.handle_control().is_ok() && dev.port_open());
    if !open {
        println!("tiny-guest: console: port 0 was never opened");
    }
    checks.set("console_write", open && dev.write(PING).is_ok());
    let mut line = [0u8; 64];
    let mut len = 0;
    let deadline = Deadline::after_secs(10);
    while !deadline.passed() && !line[..len].contains(&b'\n') && len < line.len() {
        match dev.read(&mut line[len..]) {
            Ok(n) => len += n,
            Err(e) => {
                println!("tiny-guest: console: {e}");
                break;
            }
        }
    }
    let got = line[..len].split(|b| *b == b'\n').next().unwrap_or(&[]);
    let got = got.strip_suffix(b"\r").unwrap_or(got);
    if got != PONG {
        println!("tiny-guest: console: read {:?}", core::str::from_utf8(&line[..len]).unwrap_or("(not UTF-8)"));
    }
    checks.set("console_read", got == PONG);
    Some(dev)
}

/// Garbage mode (`pvkit.mode=garbage`): takes the console device and writes nonsense to its
/// transport registers (a queue size that is not a power of two, rings outside memory, a
/// notify for a queue that does not exist). Returns whether the device then reports
/// DEVICE_NEEDS_RESET; the other devices' self-tests run afterwards as usual.
pub fn garbage(devices: &mut Devices) -> bool {
    use pvkit_protocol::mmio::Register;
    let Some(found) = devices.take(DeviceId::Console.raw()) else {
        println!("tiny-guest: garbage mode needs a console device to abuse");
        return false;
    };
    let AnyTransport::Mmio(mut mmio) = found.transport else { return false };
    mmio.write_register(Register::Status, 0);
    mmio.write_register(Register::Status, 3);
    mmio.write_register(Register::QueueSel, 0);
    mmio.write_register(Register::QueueNum, 3);
    mmio.write_register(Register::QueueDescLow, 0xffff_f000);
    mmio.write_register(Register::QueueDescHigh, 0x7fff);
    mmio.write_register(Register::QueueReady, 1);
    mmio.write_register(Register::QueueNotify, 99);
    let status = mmio.read_register(Register::Status);
    let needs_reset = status & u32::from(pvkit_protocol::virtio::status::DEVICE_NEEDS_RESET) != 0;
    println!("tiny-guest: garbage written to the console's transport; status now {status:#x}");
    needs_reset
}

/// Restart mode (`pvkit.mode=restart`): after the self-test, waits (up to a minute) for the
/// host to kill and restart the block backend, which the device shows as DEVICE_NEEDS_RESET
/// appearing and then clearing once the VMM has restored the rings; then writes, reads back
/// and compares a block.
pub fn blk_after_restart(dev: &mut Blk) -> bool {
    let needs_reset = pvkit_protocol::virtio::status::DEVICE_NEEDS_RESET;
    println!("PVKIT-PHASE waiting-for-restart");
    let deadline = Deadline::after_secs(60);
    let saw_loss = wait(CompletionMode::Poll, 60, || dev.transport().status() & needs_reset != 0);
    let back = saw_loss && wait(CompletionMode::Poll, 60, || dev.transport().status() & needs_reset == 0);
    println!("tiny-guest: backend lost: {saw_loss}, back: {back}");
    if !back || deadline.passed() {
        return false;
    }
    let Some(buffer) = Dma::<GuestHal>::new(2) else { return false };
    // SAFETY: two DMA pages of this function's own.
    let (out, back_buf) = unsafe {
        let base = buffer.vaddr().as_ptr();
        (core::slice::from_raw_parts_mut(base, 4096), core::slice::from_raw_parts_mut(base.add(4096), 4096))
    };
    for (i, b) in out.iter_mut().enumerate() {
        *b = (i as u8).wrapping_mul(7).wrapping_add(3);
    }
    dev.write_blocks(16, out).is_ok() && dev.read_blocks(16, back_buf).is_ok() && out == back_buf
}

/// Resize mode (`pvkit.mode=resize`): after the self-test, waits (up to a minute) for the
/// console's configuration interrupt (CONFIG in the interrupt status, which the VMM raises when
/// the backend sends a configuration-change message), then reads the new size. Prints
/// `PVKIT-RESIZE cols=C rows=R generation=G` and records whether the interrupt came, the
/// generation moved on and the size changed.
pub fn console_resize(dev: &mut Console, checks: &mut Checks) {
    use pvkit_protocol::mmio::interrupt;
    dev.transport().ack_interrupt();
    let (generation, size) = (dev.transport().config_generation(), dev.size());
    let (cols, rows) = size.unwrap_or((0, 0));
    println!("PVKIT-PHASE waiting-for-resize cols={cols} rows={rows} generation={generation}");
    let interrupted = wait(CompletionMode::Poll, 60, || dev.transport().ack_interrupt() & interrupt::CONFIG != 0);
    let (new_generation, new_size) = (dev.transport().config_generation(), dev.size());
    let (cols, rows) = new_size.unwrap_or((0, 0));
    println!("PVKIT-RESIZE cols={cols} rows={rows} generation={new_generation}");
    checks.set("console_config_interrupt", interrupted);
    checks.set("console_config_generation", new_generation != generation);
    checks.set("console_size_changed", new_size.is_some() && new_size != size);
}
