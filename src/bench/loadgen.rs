//! The block load generator: libblkio's `virtio-blk-vhost-user` driver (an independent
//! frontend and virtio-blk driver) keeping a fixed queue depth of requests on each of one or
//! more queues: 4 KiB random or 128 KiB sequential, reads or writes.

use super::error::BenchError;
use blkio::{Blkio, Blkioq, Completion, MemoryRegion, ReqFlags};
use std::mem::MaybeUninit;
use std::path::Path;
use std::time::{Duration, Instant};

/// What a load runs: 4 KiB random reads or writes, or 128 KiB sequential ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pattern {
    /// 4 KiB random reads.
    RandRead,
    /// 4 KiB random writes.
    RandWrite,
    /// 128 KiB sequential reads.
    SeqRead,
    /// 128 KiB sequential writes.
    SeqWrite,
}

impl Pattern {
    /// Every pattern, by name.
    pub const ALL: [Pattern; 4] = [Pattern::RandRead, Pattern::RandWrite, Pattern::SeqRead, Pattern::SeqWrite];

    /// The fio-style name.
    pub fn name(self) -> &'static str {
        match self {
            Pattern::RandRead => "randread",
            Pattern::RandWrite => "randwrite",
            Pattern::SeqRead => "read",
            Pattern::SeqWrite => "write",
        }
    }

    /// The pattern called `name`.
    pub fn parse(name: &str) -> Result<Pattern, BenchError> {
        Pattern::ALL.into_iter().find(|p| p.name() == name).ok_or_else(|| {
            BenchError::Options(format!(
                "unknown pattern '{name}' (randread, randwrite: 4 KiB random; read, write: 128 KiB sequential)"
            ))
        })
    }

    /// Bytes per request.
    pub fn block_size(self) -> usize {
        match self {
            Pattern::RandRead | Pattern::RandWrite => 4096,
            Pattern::SeqRead | Pattern::SeqWrite => 128 * 1024,
        }
    }

    fn writes(self) -> bool {
        matches!(self, Pattern::RandWrite | Pattern::SeqWrite)
    }

    fn random(self) -> bool {
        matches!(self, Pattern::RandRead | Pattern::RandWrite)
    }
}

/// What one run measured.
#[derive(Debug, Clone, Copy)]
pub struct LoadResult {
    /// Completed requests per second.
    pub iops: f64,
    /// Bytes per second.
    pub bytes_per_second: f64,
    /// Median request latency.
    pub p50: Duration,
    /// 99th-percentile request latency.
    pub p99: Duration,
}

/// Offsets for one queue: random over the disk, or sequential from a start of its own.
struct Offsets {
    random: bool,
    state: u64,
    blocks: u64,
    block: u64,
}

impl Offsets {
    fn next(&mut self) -> u64 {
        if self.random {
            // xorshift64*: cheap and good enough to spread requests over the disk.
            self.state ^= self.state >> 12;
            self.state ^= self.state << 25;
            self.state ^= self.state >> 27;
            (self.state.wrapping_mul(0x2545_f491_4f6c_dd1d) % self.blocks) * self.block
        } else {
            self.state = (self.state + 1) % self.blocks;
            self.state * self.block
        }
    }
}

/// Runs `pattern` at queue depth `qd` on each of `queues` queues against the vhost-user-blk
/// socket for `duration` (one thread drives every queue).
pub fn run(
    socket: &Path,
    pattern: Pattern,
    qd: usize,
    queues: usize,
    duration: Duration,
) -> Result<LoadResult, BenchError> {
    let err = |what: &str| {
        let what = what.to_string();
        move |e: blkio::Error| BenchError::Blkio { what: what.clone(), message: e.message().to_string() }
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
    if let Ok(max_queues) = blkio.get_i32("max-queues")
        && queues > max_queues.max(1) as usize
    {
        return Err(BenchError::Measurement(format!("the backend serves {max_queues} queue(s), {queues} asked for")));
    }
    blkio.set_i32("num-queues", queues as i32).map_err(err("set num-queues"))?;
    let capacity = blkio.get_u64("capacity").map_err(err("capacity"))?;
    let mut started = blkio.start().map_err(err("start"))?;
    let block = pattern.block_size();
    let slots = qd * queues;
    let region: MemoryRegion = blkio.alloc_mem_region(slots * block).map_err(err("alloc_mem_region"))?;
    blkio.map_mem_region(&region).map_err(err("map_mem_region"))?;
    let mut rings: Vec<Blkioq> = std::mem::take(&mut started.queues);
    if rings.len() != queues {
        return Err(BenchError::Measurement(format!("libblkio started {} queue(s), {queues} asked for", rings.len())));
    }
    let blocks = capacity / block as u64;
    if blocks == 0 {
        return Err(BenchError::Measurement(format!(
            "disk of {capacity} bytes is smaller than one {block}-byte request"
        )));
    }
    let mut offsets: Vec<Offsets> = (0..queues as u64)
        .map(|q| Offsets {
            random: pattern.random(),
            state: if pattern.random() { 0x9e37_79b9_7f4a_7c15 ^ (q + 1) } else { q * blocks / queues as u64 },
            blocks,
            block: block as u64,
        })
        .collect();
    let submit = |queue: &mut Blkioq, slot: usize, offset: u64| {
        let buf = region.addr + slot * block;
        if pattern.writes() {
            queue.write(offset, buf as *const u8, block, slot, ReqFlags::empty())
        } else {
            queue.read(offset, buf as *mut u8, block, slot, ReqFlags::empty())
        }
    };
    let mut started_at = vec![Instant::now(); slots];
    for (q, ring) in rings.iter_mut().enumerate() {
        for (slot, start) in started_at.iter_mut().enumerate().skip(q * qd).take(qd) {
            *start = Instant::now();
            submit(ring, slot, offsets[q].next());
        }
    }
    let mut completions: Vec<MaybeUninit<Completion>> = (0..qd).map(|_| MaybeUninit::uninit()).collect();
    let mut latencies: Vec<u32> = Vec::with_capacity(1 << 20);
    let begin = Instant::now();
    let mut last_completion = Instant::now();
    let mut done = 0u64;
    // One queue: block in do_io. Several: poll each in turn.
    let min_completions = usize::from(queues == 1);
    while begin.elapsed() < duration {
        for (q, ring) in rings.iter_mut().enumerate() {
            let mut timeout = Duration::from_secs(5);
            let timeout = (min_completions > 0).then_some(&mut timeout);
            let n = ring.do_io(&mut completions, min_completions, timeout, None).map_err(err("do_io"))?;
            let now = Instant::now();
            if n > 0 {
                last_completion = now;
            }
            for c in &completions[..n] {
                // SAFETY: do_io initialised the first `n` completions.
                let c = unsafe { c.assume_init_read() };
                if c.ret < 0 {
                    return Err(BenchError::Measurement(format!("{} request failed with {}", pattern.name(), c.ret)));
                }
                let slot = c.user_data;
                let Some(start) = started_at.get_mut(slot) else {
                    return Err(BenchError::Measurement(format!("completion for unknown slot {slot}")));
                };
                latencies.push(now.duration_since(*start).as_nanos().min(u32::MAX as u128) as u32);
                *start = now;
                submit(ring, slot, offsets[q].next());
                done += 1;
            }
        }
        if last_completion.elapsed() > Duration::from_secs(5) {
            return Err(BenchError::Measurement("no completion within 5 s".into()));
        }
    }
    let elapsed = begin.elapsed();
    // Drain what is still in flight so the backend sees a clean disconnect.
    for ring in &mut rings {
        let mut in_flight = qd;
        while in_flight > 0 {
            let mut timeout = Duration::from_secs(5);
            match ring.do_io(&mut completions, 1, Some(&mut timeout), None) {
                Ok(0) | Err(_) => break,
                Ok(n) => in_flight = in_flight.saturating_sub(n),
            }
        }
    }
    latencies.sort_unstable();
    let percentile = |p: usize| {
        let at = (latencies.len() * p / 100).min(latencies.len().saturating_sub(1));
        Duration::from_nanos(latencies.get(at).copied().unwrap_or(0).into())
    };
    let iops = done as f64 / elapsed.as_secs_f64();
    Ok(LoadResult { iops, bytes_per_second: iops * block as f64, p50: percentile(50), p99: percentile(99) })
}
