//! The block load generator: libblkio's `virtio-blk-vhost-user` driver (an independent
//! frontend and virtio-blk driver) keeping a fixed queue depth of random 4 KiB requests.

use blkio::{Blkio, Blkioq, Completion, MemoryRegion, ReqFlags};
use std::mem::MaybeUninit;
use std::path::Path;
use std::time::{Duration, Instant};

/// Random reads or random writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pattern {
    /// 4 KiB random reads.
    RandRead,
    /// 4 KiB random writes.
    RandWrite,
}

impl Pattern {
    /// The fio-style name.
    pub fn name(self) -> &'static str {
        match self {
            Pattern::RandRead => "randread",
            Pattern::RandWrite => "randwrite",
        }
    }
}

/// What one run measured.
#[derive(Debug, Clone, Copy)]
pub struct LoadResult {
    /// Completed requests per second.
    pub iops: f64,
    /// Median request latency.
    pub median_latency: Duration,
}

const BLOCK: usize = 4096;

/// Runs `pattern` at queue depth `qd` against the vhost-user-blk socket for `duration`.
pub fn run(socket: &Path, pattern: Pattern, qd: usize, duration: Duration) -> Result<LoadResult, String> {
    let err = |what: &str| {
        let what = what.to_string();
        move |e: blkio::Error| format!("libblkio {what}: {}", e.message())
    };
    let mut blkio = Blkio::new("virtio-blk-vhost-user").map_err(err("new"))?;
    blkio.set_str("path", &socket.to_string_lossy()).map_err(err("set path"))?;
    // A peer (qemu-storage-daemon) may show its socket a moment before it listens.
    let mut attempts = 0;
    while let Err(e) = blkio.connect() {
        attempts += 1;
        if attempts >= 50 || !e.to_string().contains("refused") {
            return Err(err("connect")(e));
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    blkio.set_i32("num-queues", 1).map_err(err("set num-queues"))?;
    let capacity = blkio.get_u64("capacity").map_err(err("capacity"))?;
    let mut started = blkio.start().map_err(err("start"))?;
    let region: MemoryRegion = blkio.alloc_mem_region(qd * BLOCK).map_err(err("alloc_mem_region"))?;
    blkio.map_mem_region(&region).map_err(err("map_mem_region"))?;
    let mut queue: Blkioq = started.queues.pop().ok_or("libblkio started no queue")?;
    let blocks = capacity / BLOCK as u64;
    if blocks == 0 {
        return Err(format!("disk of {capacity} bytes is smaller than one block"));
    }
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    let mut next_offset = || {
        // xorshift64*: cheap and good enough to spread requests over the disk.
        rng ^= rng >> 12;
        rng ^= rng << 25;
        rng ^= rng >> 27;
        (rng.wrapping_mul(0x2545_f491_4f6c_dd1d) % blocks) * BLOCK as u64
    };
    let submit = |queue: &mut Blkioq, slot: usize, offset: u64| {
        let buf = region.addr + slot * BLOCK;
        match pattern {
            Pattern::RandRead => queue.read(offset, buf as *mut u8, BLOCK, slot, ReqFlags::empty()),
            Pattern::RandWrite => queue.write(offset, buf as *const u8, BLOCK, slot, ReqFlags::empty()),
        }
    };
    let mut started_at = vec![Instant::now(); qd];
    for (slot, start) in started_at.iter_mut().enumerate() {
        *start = Instant::now();
        submit(&mut queue, slot, next_offset());
    }
    let mut completions: Vec<MaybeUninit<Completion>> = (0..qd).map(|_| MaybeUninit::uninit()).collect();
    let mut latencies: Vec<u32> = Vec::with_capacity(1 << 20);
    let begin = Instant::now();
    let mut done = 0u64;
    while begin.elapsed() < duration {
        let mut timeout = Duration::from_secs(5);
        let n = queue.do_io(&mut completions, 1, Some(&mut timeout), None).map_err(err("do_io"))?;
        if n == 0 {
            return Err("no completion within 5 s".into());
        }
        let now = Instant::now();
        for c in &completions[..n] {
            // SAFETY: do_io initialised the first `n` completions.
            let c = unsafe { c.assume_init_read() };
            if c.ret < 0 {
                return Err(format!("{} request failed with {}", pattern.name(), c.ret));
            }
            let slot = c.user_data;
            let Some(start) = started_at.get_mut(slot) else {
                return Err(format!("completion for unknown slot {slot}"));
            };
            latencies.push(now.duration_since(*start).as_nanos().min(u32::MAX as u128) as u32);
            *start = now;
            submit(&mut queue, slot, next_offset());
            done += 1;
        }
    }
    let elapsed = begin.elapsed();
    // Drain what is still in flight so the backend sees a clean disconnect.
    let mut in_flight = qd;
    while in_flight > 0 {
        let mut timeout = Duration::from_secs(5);
        match queue.do_io(&mut completions, 1, Some(&mut timeout), None) {
            Ok(0) | Err(_) => break,
            Ok(n) => in_flight = in_flight.saturating_sub(n),
        }
    }
    latencies.sort_unstable();
    let median = latencies.get(latencies.len() / 2).copied().unwrap_or(0);
    Ok(LoadResult { iops: done as f64 / elapsed.as_secs_f64(), median_latency: Duration::from_nanos(median.into()) })
}
