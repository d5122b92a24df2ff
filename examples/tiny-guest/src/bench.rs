//! Benchmark mode (`pvkit.mode=bench`): after the self-test, each device is driven for a fixed
//! time (`pvkit.bench_ms=N`, 1000 by default) measured with the TSC at the rate the host gives
//! (`pvkit.tsc_khz=N`; without it, 2 GHz is assumed and only the host's timing is right).
//! Each run is bracketed by `PVKIT-BENCH-BEGIN name` and `PVKIT-BENCH-END name ops=.. bytes=..
//! kicks=.. ticks=..` lines on COM1, so the host can also time it by when the lines arrive.

use crate::hal::GuestHal;
use crate::println;
use crate::selftest::{Blk, Console, Drivers, Net};
use pvkit_guest_driver::device::blk::BlkRequest;
use pvkit_guest_driver::hal::{Dma, PAGE_SIZE};
use pvkit_protocol::abi;

/// Requests in flight for the block benchmark (4 KiB random reads).
const BLK_DEPTH: usize = 16;
/// Frames in flight for the net benchmark (64 bytes, through a loopback backend).
const NET_WINDOW: u64 = 32;

fn rdtsc() -> u64 {
    // SAFETY: rdtsc only reads the time-stamp counter.
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// A time budget in TSC ticks.
#[derive(Clone, Copy)]
struct Budget {
    ticks: u64,
}

impl Budget {
    fn from_cmdline(cmdline: &str) -> Budget {
        let number = |key: &str, default: u64| {
            abi::param(cmdline, key).and_then(|v| abi::parse_number(v).ok()).filter(|v| *v > 0).unwrap_or(default)
        };
        let khz = number("pvkit.tsc_khz", 2_000_000);
        let ms = number("pvkit.bench_ms", 1000).min(60_000);
        Budget { ticks: khz.saturating_mul(ms) }
    }
}

/// Runs each device's benchmark.
pub fn run(drivers: Drivers, cmdline: &str) {
    let budget = Budget::from_cmdline(cmdline);
    if let Some(dev) = drivers.blk {
        blk(dev, budget);
    }
    if let Some(dev) = drivers.net {
        net(dev, budget);
    }
    if let Some(dev) = drivers.console {
        console(dev, budget);
    }
}

fn report(name: &str, ops: u64, bytes: u64, kicks: u64, started: u64) {
    println!("PVKIT-BENCH-END {name} ops={ops} bytes={bytes} kicks={kicks} ticks={}", rdtsc() - started);
}

fn blk(mut dev: Blk, budget: Budget) {
    let blocks = dev.info().capacity / 8;
    if blocks == 0 {
        return;
    }
    let mut rng = 0x2545_f491_4f6c_dd1du64;
    let next_sector = move |_| {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        (rng % blocks) * 8
    };
    let start_kicks = dev.queue().stats().kicks;
    println!("PVKIT-BENCH-BEGIN blk");
    let started = rdtsc();
    let Some(done) = reads_in_flight(&mut dev, BLK_DEPTH, next_sector, |_| rdtsc() - started < budget.ticks) else {
        return;
    };
    let kicks = dev.queue().stats().kicks - start_kicks;
    report("blk", done, done * PAGE_SIZE as u64, kicks, started);
}

/// Keeps up to `depth` (at most [`BLK_DEPTH`]) 4 KiB reads in flight, the n-th at sector
/// `next_sector(n)`, while `more(submitted)` says so, kicking once per batch (the queue decides
/// whether the device wants it); returns how many completed, or `None` on a driver error.
fn reads_in_flight(
    dev: &mut Blk,
    depth: usize,
    mut next_sector: impl FnMut(u64) -> u64,
    mut more: impl FnMut(u64) -> bool,
) -> Option<u64> {
    let depth = depth.clamp(1, BLK_DEPTH);
    let buffers = Dma::<GuestHal>::new(depth)?;
    let mut free: [usize; BLK_DEPTH] = core::array::from_fn(|i| i);
    let mut free_len = depth;
    let mut slot_of = [0usize; 64];
    let (mut submitted, mut done) = (0u64, 0u64);
    let mut submitting = true;
    while submitting || free_len < depth {
        submitting = more(submitted);
        while submitting && free_len > 0 {
            free_len -= 1;
            let slot = free[free_len];
            // SAFETY: each 4 KiB page of `buffers` belongs to one request at a time (a slot is
            // reused only after its completion), and the pages outlive the loop.
            let buf =
                unsafe { core::slice::from_raw_parts_mut(buffers.vaddr().as_ptr().add(slot * PAGE_SIZE), PAGE_SIZE) };
            // SAFETY: as above.
            match unsafe { dev.submit(BlkRequest::Read { sector: next_sector(submitted), buf }) } {
                Ok(token) => slot_of[usize::from(token) % 64] = slot,
                Err(_) => {
                    free_len += 1;
                    break;
                }
            }
            submitted += 1;
            submitting = more(submitted);
        }
        dev.kick();
        loop {
            match dev.poll() {
                Ok(Some(completion)) => {
                    free[free_len] = slot_of[usize::from(completion.token) % 64];
                    free_len += 1;
                    done += 1;
                }
                Ok(None) => break,
                Err(e) => {
                    println!("tiny-guest: blk bench: {e}");
                    return None;
                }
            }
        }
    }
    Some(done)
}

fn net(mut dev: Net, budget: Budget) {
    let mut frame = [0u8; 64];
    frame[..6].copy_from_slice(&[0xff; 6]);
    frame[6..12].copy_from_slice(&dev.mac());
    frame[12..14].copy_from_slice(&[0x88, 0xb5]);
    let mut buf = [0u8; 2048];
    let (mut sent, mut received) = (0u64, 0u64);
    let start_kicks = dev.queues().1.stats().kicks;
    println!("PVKIT-BENCH-BEGIN net");
    let started = rdtsc();
    // Send while the budget lasts; then wait (a bounded while) for the frames in flight.
    loop {
        let elapsed = rdtsc() - started;
        if elapsed >= budget.ticks && (received == sent || elapsed >= budget.ticks.saturating_mul(2)) {
            break;
        }
        while elapsed < budget.ticks && sent - received < NET_WINDOW {
            if dev.send(&frame).is_err() {
                break;
            }
            sent += 1;
        }
        while let Ok(Some(_)) = dev.receive(&mut buf) {
            received += 1;
        }
    }
    let kicks = dev.queues().1.stats().kicks - start_kicks;
    report("net", received, received * 64, kicks, started);
}

fn console(mut dev: Console, budget: Budget) {
    let chunk = [b'x'; pvkit_guest_driver::device::console::BUFFER_SIZE];
    let mut writes = 0u64;
    let start_kicks = dev.queues().1.stats().kicks;
    println!("PVKIT-BENCH-BEGIN console");
    let started = rdtsc();
    while rdtsc() - started < budget.ticks {
        if dev.write(&chunk).is_err() {
            break;
        }
        writes += 1;
    }
    let kicks = dev.queues().1.stats().kicks - start_kicks;
    report("console", writes, writes * chunk.len() as u64, kicks, started);
}

/// Doorbell mode (`pvkit.mode=doorbell`): the cost of one kick for each mechanism, and of a
/// whole request round trip, on the block device. Prints `PVKIT-DOORBELL name ticks=.. n=..`
/// lines (divide by `pvkit.tsc_khz` for time). The kicks are spurious for the backend: it
/// wakes, finds nothing new and sleeps again, which is part of what a kick costs.
pub fn doorbells(dev: &mut Blk, cmdline: &str) {
    use pvkit_guest_driver::hypercall::{Doorbell, Shim};
    use pvkit_guest_driver::transport::{AnyTransport, NotifyTarget, Transport};
    const KICKS: u64 = 2_000;
    const REQUESTS: u64 = 500;
    let Ok(target) = dev.transport().notify_target(0) else { return };
    let mut mechanisms = [None, None];
    mechanisms[0] = Some(("mmio-notify", Shim::Transport(target)));
    if let (AnyTransport::Mmio(_), NotifyTarget::Mmio32(reg)) = (dev.transport(), target) {
        let base = reg.as_ptr() as u64 - pvkit_protocol::mmio::Register::QueueNotify.offset();
        let slot = abi::slot_of(base).map(|(slot, _)| slot);
        if let Shim::Port(port) = Shim::choose(cmdline, slot, 0, target) {
            mechanisms[1] = Some(("port-doorbell", Shim::Port(port)));
        }
    }
    for (name, shim) in mechanisms.into_iter().flatten() {
        let started = rdtsc();
        for _ in 0..KICKS {
            shim.ring(0);
        }
        println!("PVKIT-DOORBELL kick-{name} ticks={} n={KICKS}", rdtsc() - started);
    }
    let Some(buffer) = Dma::<GuestHal>::new(1) else { return };
    // SAFETY: one DMA page of this function's own, used by one request at a time.
    let buf = unsafe { core::slice::from_raw_parts_mut(buffer.vaddr().as_ptr(), PAGE_SIZE) };
    let start_kicks = dev.queue().stats().kicks;
    let started = rdtsc();
    let mut done = 0;
    for i in 0..REQUESTS {
        if dev.read_blocks(i % 64 * 8, buf).is_err() {
            break;
        }
        done += 1;
    }
    let kicks = dev.queue().stats().kicks - start_kicks;
    println!(
        "PVKIT-DOORBELL request-{} ticks={} n={done} kicks={kicks}",
        dev.queue().doorbell().name(),
        rdtsc() - started
    );
    for depth in [1, 4, 16] {
        at_depth(dev, depth, REQUESTS);
    }
}

/// Keeps `depth` 4 KiB reads in flight until `requests` were submitted and completed; prints
/// `PVKIT-DOORBELL qdN-... ticks=.. n=.. kicks=..`.
fn at_depth(dev: &mut Blk, depth: usize, requests: u64) {
    let start_kicks = dev.queue().stats().kicks;
    let started = rdtsc();
    let Some(done) = reads_in_flight(dev, depth, |n| n % 64 * 8, |submitted| submitted < requests) else { return };
    let kicks = dev.queue().stats().kicks - start_kicks;
    println!(
        "PVKIT-DOORBELL qd{depth}-{} ticks={} n={done} kicks={kicks}",
        dev.queue().doorbell().name(),
        rdtsc() - started
    );
}
