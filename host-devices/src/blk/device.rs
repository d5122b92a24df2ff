//! The virtio-blk device behind the vhost-user protocol: features, configuration space and
//! queue processing. Each request queue has its own worker thread and shares no lock with the
//! others on the I/O path.

use super::engine::{BlockEngine, Engine, RwOp};
use super::request::{self, Limits, Operation, Request, RequestError, Segment};
use super::stats::Stats;
use crate::queue::chain::stream_len;
use crate::queue::services::{Completion, Work};
use crate::queue::split_ring::SplitRing;
use crate::queue::throttle::Throttles;
use crate::queue::worker::PassContext;
use crate::queue::{
    DeviceCore, Gates, Memory, NoServices, PassError, QueueService, QueueServices, Rearm, UsedBatch, Verdict,
    WorkerQueue, ring,
};
use pvkit_protocol::blk::{self, ConfigRepr, Status, feature as blkf};
use pvkit_protocol::virtio::{Features, feature as vf};
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use vm_memory::{GuestAddressSpace, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;

/// Largest number of data segments in one request (`seg_max`).
pub const SEG_MAX: u32 = 254;
/// Most segments in one discard or write-zeroes request.
pub const MAX_DISCARD_SEGMENTS: u32 = 32;
/// Most sectors in one discard or write-zeroes segment (a bit under 4 GiB).
pub const MAX_DISCARD_SECTORS: u32 = u32::MAX >> 9 << 9 >> 9;

/// What the device is configured with.
#[derive(Debug, Clone)]
pub struct BlkOptions {
    /// Number of request queues.
    pub num_queues: u16,
    /// Largest queue size accepted.
    pub queue_size: u16,
    /// The GET_ID answer (truncated to 20 bytes).
    pub serial: String,
    /// Logical block size reported to the guest.
    pub logical_block_size: u32,
    /// Whether writes are refused.
    pub read_only: bool,
    /// Microseconds to keep polling a queue after its last request (0: never poll).
    pub poll_us: u64,
}

struct Shared {
    core: DeviceCore,
    engine: Arc<Engine>,
    options: BlkOptions,
    limits: Limits,
    config: ConfigRepr,
    writeback: AtomicBool,
    stats: Arc<Stats>,
    throttles: Throttles,
}

/// The block device; cheap to clone (all state is shared).
#[derive(Clone)]
pub struct BlkDevice {
    shared: Arc<Shared>,
}

impl BlkDevice {
    /// A device (for one frontend connection) serving `engine` with `options`, counting into
    /// `stats`; `gates` has one gate per queue, shared by every connection.
    pub fn new(
        engine: Arc<Engine>,
        options: BlkOptions,
        stats: Arc<Stats>,
        gates: Arc<Gates>,
    ) -> io::Result<BlkDevice> {
        BlkDevice::with_services(engine, options, stats, gates, Arc::new(NoServices))
    }

    /// [`BlkDevice::new`] with `services` attached to its queues.
    pub fn with_services(
        engine: Arc<Engine>,
        options: BlkOptions,
        stats: Arc<Stats>,
        gates: Arc<Gates>,
        services: Arc<dyn QueueServices>,
    ) -> io::Result<BlkDevice> {
        let capacity_sectors = engine.size() / blk::SECTOR_SIZE;
        let block_exp = options.logical_block_size.trailing_zeros().saturating_sub(blk::SECTOR_SHIFT);
        let config = ConfigRepr {
            capacity: capacity_sectors,
            size_max: 1 << 20,
            seg_max: SEG_MAX,
            blk_size: options.logical_block_size,
            physical_block_exp: 0,
            min_io_size: 1,
            opt_io_size: 0,
            writeback: 1,
            num_queues: options.num_queues,
            max_discard_sectors: MAX_DISCARD_SECTORS,
            max_discard_seg: MAX_DISCARD_SEGMENTS,
            discard_sector_alignment: 1 << block_exp,
            max_write_zeroes_sectors: MAX_DISCARD_SECTORS,
            max_write_zeroes_seg: MAX_DISCARD_SEGMENTS,
            write_zeroes_may_unmap: 1,
            ..Default::default()
        };
        let limits = Limits {
            capacity_sectors,
            read_only: options.read_only,
            max_segments: MAX_DISCARD_SEGMENTS,
            max_discard_sectors: MAX_DISCARD_SECTORS,
            max_write_zeroes_sectors: MAX_DISCARD_SECTORS,
        };
        let queues = usize::from(options.num_queues);
        let core = DeviceCore::new("vhost-user-blk", queues, queues, gates, options.poll_us)?
            .with_services(services)
            .counting_resubmitted(stats.resubmitted_counter());
        // Each queue's timer event comes after the ids the library keeps (queues, exit).
        let throttles = Throttles::new(queues, queues as u64 + 1)?;
        let shared =
            Shared { core, engine, options, limits, config, writeback: AtomicBool::new(true), stats, throttles };
        Ok(BlkDevice { shared: Arc::new(shared) })
    }

    /// The virtio features the device offers.
    pub fn device_features(&self) -> Features {
        let mut f = Features::from_bits(&[
            vf::VERSION_1,
            vf::RING_EVENT_IDX,
            vf::RING_INDIRECT_DESC,
            vf::VHOST_USER_PROTOCOL_FEATURES,
            vf::VHOST_LOG_ALL,
            blkf::SIZE_MAX,
            blkf::SEG_MAX,
            blkf::BLK_SIZE,
            blkf::TOPOLOGY,
            blkf::FLUSH,
            blkf::CONFIG_WCE,
            blkf::MQ,
            blkf::DISCARD,
            blkf::WRITE_ZEROES,
        ]);
        let disk = self.shared.engine.capabilities();
        if !disk.flush {
            // Writes are durable when done: nothing to flush, no cache to turn off.
            f = f.without(blkf::FLUSH).without(blkf::CONFIG_WCE);
        }
        if !disk.discard {
            f = f.without(blkf::DISCARD);
        }
        if !disk.write_zeroes {
            f = f.without(blkf::WRITE_ZEROES);
        }
        if self.shared.options.read_only || disk.read_only {
            f = f.with(blkf::RO).without(blkf::DISCARD).without(blkf::WRITE_ZEROES);
        }
        f
    }

    /// The queue-worker core of this connection.
    pub fn core(&self) -> &DeviceCore {
        &self.shared.core
    }

    fn config_bytes(&self) -> [u8; blk::CONFIG_SIZE] {
        let mut config = self.shared.config;
        config.writeback = u8::from(self.shared.writeback.load(Ordering::Relaxed));
        let mut bytes = [0u8; blk::CONFIG_SIZE];
        // CONFIG_SIZE bytes always hold the configuration.
        let _ = config.emit(&mut bytes);
        bytes
    }

    /// Processes every available request on `vring` (queue `queue`) as one batch and
    /// publishes their used entries together; returns how many there were.
    ///
    /// The requests' buffers are looked up in a memory map loaded *after* the requests were
    /// seen: a frontend adds a region (ADD_MEM_REG, acknowledged) before it posts requests that
    /// use it, so a map loaded later always holds it, while one loaded before the pop may not.
    fn process_queue(
        &self,
        vring: &VringRwLock,
        queue: usize,
        memory: &Memory,
        reused: &mut PassBuffers,
    ) -> Result<usize, PassError> {
        let ring_mem = memory.memory();
        let mut state = vring.get_mut();
        // The worker's check that the queue may be served, under the lock the pass takes anyway.
        if !state.is_enabled() || self.shared.core.is_broken(queue) {
            return Ok(0);
        }
        let PassBuffers { heads, used } = reused;
        // Completions held back until now go first.
        self.shared.core.held().take_due(queue, used, self.shared.core.services());
        let released = used.len();
        let vq = state.get_queue_mut();
        let tracked = self.shared.core.inflight().queue(queue);
        if self.shared.throttles.is_waiting(queue) {
            used.publish_tracked(vq, &*ring_mem, self.shared.core.services(), tracked.as_ref())
                .map_err(io::Error::other)?;
            drop(state);
            self.rearm_timer(queue)?;
            return Ok(released);
        }
        // After a restart, the requests the last backend left in flight come first.
        heads.clear();
        if let Some(tracked) = &tracked {
            heads.extend(tracked.resume(vq, &*ring_mem));
        }
        let resubmitted = heads.len();
        let mut popper = ring::Popper::new(queue);
        popper.take_heads(vq, &ring_mem, heads, usize::MAX);
        if let Some(tracked) = &tracked {
            for &head in &heads[resubmitted..] {
                tracked.taken(head);
            }
        }
        if heads.is_empty() && released == 0 {
            return popper.finish(0);
        }
        // Only services need the time a batch was taken.
        let started = self.shared.core.services().is_active().then(Instant::now);
        let data_mem = memory.memory();
        let ring = SplitRing::new(vq, &data_mem);
        let mut batch: Vec<request::Parsed> =
            heads.iter().map(|&head| request::parse_head(ring.as_ref(), head, &self.shared.limits)).collect();
        if let Some((index, wait)) = self.first_throttled(queue, &batch, resubmitted, started) {
            // It and everything after it go back to the ring, in order, until the tokens are back.
            for head in heads.drain(index..).rev() {
                virtio_queue::QueueOwnedT::go_to_previous_position(vq);
                if let Some(tracked) = &tracked {
                    tracked.untaken(head);
                }
            }
            batch.truncate(index);
            self.shared.throttles.wait(queue, wait)?;
        }
        let held = self.shared.core.held();
        for (head, (used_len, delay)) in heads.iter().zip(self.complete_batch(&data_mem, queue, batch, started)) {
            match (delay, started) {
                (Some((delay, completion)), Some(started)) => {
                    held.hold(queue, vring, started + delay, (*head, used_len), completion);
                }
                _ => used.push(*head, used_len),
            }
        }
        // Published under the vring's lock; the signal takes it again, so after dropping it.
        let notify = used
            .publish_tracked(vq, &*ring_mem, self.shared.core.services(), tracked.as_ref())
            .map_err(io::Error::other)?;
        drop(state);
        if notify {
            vring.signal_used_queue()?;
            self.shared.core.services().notified(queue);
        }
        self.rearm_timer(queue)?;
        popper.finish(heads.len() + released)
    }

    /// Sets queue `queue`'s timer for the earlier of its limits' wait and its next held
    /// completion.
    fn rearm_timer(&self, queue: usize) -> io::Result<()> {
        let held = self.shared.core.held().next_due(queue);
        match held.into_iter().chain(self.shared.throttles.until(queue)).min() {
            Some(at) => self.shared.throttles.wake_at(queue, at),
            None => Ok(()),
        }
    }

    /// The first request of `batch` (after the `resubmitted` ones, which are no longer in the
    /// ring) the rate limits hold back, and for how long.
    fn first_throttled(
        &self,
        queue: usize,
        batch: &[request::Parsed],
        resubmitted: usize,
        started: Option<Instant>,
    ) -> Option<(usize, std::time::Duration)> {
        let started = started?;
        if !self.shared.core.services().throttles() {
            return None;
        }
        // Requests refused already (bad ones) pass through the limits untouched.
        let candidates: Vec<(usize, Work)> = batch
            .iter()
            .enumerate()
            .skip(resubmitted)
            .filter_map(|(index, parsed)| parsed.result.as_ref().ok().map(|req| (index, work_of(queue, req))))
            .collect();
        let works: Vec<Work> = candidates.iter().map(|(_, work)| *work).collect();
        let (position, wait) = self.shared.core.services().throttle(&works, started)?;
        candidates.get(position).map(|(index, _)| (*index, wait))
    }

    /// Handles one chain on its own; returns the number of bytes written into it.
    #[cfg(test)]
    pub(crate) fn handle_chain(
        &self,
        chain: virtio_queue::DescriptorChain<&GuestMemoryMmap>,
        mem: &GuestMemoryMmap,
    ) -> u32 {
        let parsed = request::parse(chain, mem, &self.shared.limits);
        self.complete_batch(mem, 0, vec![parsed], None).pop().map_or(0, |(len, _)| len)
    }

    /// Runs a batch: its reads and writes together through the engine, everything else one by
    /// one; writes each status byte and returns each chain's used length, in order, with the
    /// time a service holds its completion back for.
    pub(crate) fn complete_batch(
        &self,
        mem: &GuestMemoryMmap,
        queue: usize,
        mut batch: Vec<request::Parsed>,
        started: Option<Instant>,
    ) -> Vec<(u32, Option<HeldFor>)> {
        let services = self.shared.core.services();
        let started = started.or_else(|| services.is_active().then(Instant::now));
        let mut done = Vec::new();
        // What the services made of each request (nothing to keep when none is active).
        let mut admitted = Vec::new();
        if let Some(started) = started {
            services.taken(queue, batch.iter().filter(|parsed| parsed.result.is_ok()).count());
            done.reserve(batch.len());
            admitted = batch.iter_mut().map(|parsed| admit(services, queue, parsed, started, &mut done)).collect();
        }
        let mut ops = Vec::new();
        let mut op_of = vec![None; batch.len()];
        let mut unsliceable: Vec<Option<io::Result<()>>> = batch.iter().map(|_| None).collect();
        for (i, parsed) in batch.iter().enumerate() {
            let Ok(req) = &parsed.result else { continue };
            let (write, offset) = match req.operation {
                Operation::Read { offset } => (false, offset),
                Operation::Write { offset } => (true, offset),
                _ => continue,
            };
            match slices(mem, &req.data) {
                Ok(bufs) => {
                    op_of[i] = Some(ops.len());
                    ops.push(RwOp { write, offset, bufs });
                }
                Err(e) => unsliceable[i] = Some(Err(e)),
            }
        }
        let mut results: Vec<Option<io::Result<()>>> =
            self.shared.engine.rw_batch(queue, &ops).into_iter().map(Some).collect();
        if ops.iter().any(|op| op.write)
            && !self.shared.writeback.load(Ordering::Relaxed)
            && let Err(e) = self.shared.engine.flush()
        {
            for (op, result) in ops.iter().zip(results.iter_mut()) {
                if op.write {
                    *result = Some(Err(io::Error::new(e.kind(), e.to_string())));
                }
            }
        }
        let lengths: Vec<(u32, Option<HeldFor>)> = batch
            .into_iter()
            .enumerate()
            .map(|(i, parsed)| {
                let rw = op_of[i]
                    .map(|j| {
                        results
                            .get_mut(j)
                            .and_then(Option::take)
                            .unwrap_or_else(|| Err(io::Error::other("lost result")))
                    })
                    .or_else(|| unsliceable[i].take());
                // A torn write wrote its prefix; it fails all the same.
                let admission = admitted.get(i).copied().unwrap_or(Admitted::Plain);
                let torn = admission == Admitted::Torn;
                let rw = if torn { rw.map(|r| r.and(Err(io::Error::other("torn by a fault rule")))) } else { rw };
                let before = done.len();
                let len = self.finish(mem, queue, parsed, rw, started, &mut done);
                // A held completion is reported when its used entry is published.
                let held = match admission {
                    Admitted::Delayed(delay) => Some((delay, if done.len() > before { done.pop() } else { None })),
                    Admitted::Plain | Admitted::Torn => None,
                };
                (len, held)
            })
            .collect();
        if !done.is_empty() {
            services.completed_batch(&done);
        }
        lengths
    }

    /// Completes one request: runs it unless it is a read or write, which already ran in the
    /// batch (`rw`), writes the status, counts it, and returns the used length.
    fn finish(
        &self,
        mem: &GuestMemoryMmap,
        queue: usize,
        parsed: request::Parsed,
        rw: Option<io::Result<()>>,
        started: Option<Instant>,
        done: &mut Vec<Completion>,
    ) -> u32 {
        let stats = &self.shared.stats;
        let services = self.shared.core.services();
        let Some(status_addr) = parsed.status else {
            if let Err(e) = parsed.result {
                stats.record_error(&e);
            }
            return 0;
        };
        let (status, data_written) = match parsed.result {
            Ok(req) => {
                let bytes = stream_len(&req.data);
                let outcome = match rw {
                    Some(result) => result.map(|()| match req.operation {
                        Operation::Read { .. } => bytes,
                        _ => 0,
                    }),
                    None => self.execute(mem, &req),
                };
                if let Some(started) = started {
                    report_completion(services, queue, &req, &outcome, started, done);
                }
                match outcome {
                    Ok(written) => {
                        stats.record_ok(req.request_type, bytes);
                        (Status::Ok, written)
                    }
                    Err(e) => {
                        stats.record_io_error(req.request_type, &e);
                        (Status::IoErr, 0)
                    }
                }
            }
            Err(e) => {
                stats.record_error(&e);
                (e.status(), 0)
            }
        };
        if !request::write_status(mem, status_addr, status) {
            return 0;
        }
        services.guest_written(status_addr, 1);
        u32::try_from(data_written + 1).unwrap_or(u32::MAX)
    }

    /// Runs a request other than a read or write (those run in `complete_batch`); returns
    /// the bytes written into the guest's buffers.
    fn execute(&self, mem: &GuestMemoryMmap, req: &Request) -> io::Result<u64> {
        let engine = &self.shared.engine;
        match &req.operation {
            Operation::Read { .. } | Operation::Write { .. } => {
                Err(io::Error::other("reads and writes run in a batch"))
            }
            Operation::Flush => engine.flush().map(|()| 0),
            Operation::GetId => {
                let mut id = [0u8; blk::ID_BYTES];
                let serial = self.shared.options.serial.as_bytes();
                let n = serial.len().min(id.len());
                id[..n].copy_from_slice(&serial[..n]);
                let mut written = 0u64;
                for seg in &req.data {
                    let take = (id.len() as u64 - written).min(seg.len) as usize;
                    if take == 0 {
                        break;
                    }
                    vm_memory::Bytes::write_slice(mem, &id[written as usize..written as usize + take], seg.addr)
                        .map_err(io::Error::other)?;
                    written += take as u64;
                }
                Ok(written)
            }
            Operation::Discard(ranges) => {
                for (offset, len) in ranges {
                    engine.discard(*offset, *len)?;
                }
                Ok(0)
            }
            Operation::WriteZeroes(ranges) => {
                for (offset, len, unmap) in ranges {
                    engine.write_zeroes(*offset, *len, *unmap)?;
                }
                Ok(0)
            }
        }
    }
}

/// How long a service holds a request's completion back, and the completion to report then.
type HeldFor = (std::time::Duration, Option<Completion>);

/// What becomes of a request the services admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Admitted {
    /// Served and completed as usual (or refused already, its completion recorded).
    Plain,
    /// A write cut to a fault rule's prefix, failed once that prefix is written.
    Torn,
    /// Served, its completion held back this long after it was taken.
    Delayed(std::time::Duration),
}

/// Asks the services whether a parsed request may be served; a refused one fails, and its
/// completion (not ok) is recorded at once.
fn admit(
    services: &dyn QueueServices,
    queue: usize,
    parsed: &mut request::Parsed,
    started: Instant,
    done: &mut Vec<Completion>,
) -> Admitted {
    let Ok(req) = &mut parsed.result else { return Admitted::Plain };
    let work = work_of(queue, req);
    let refused = match services.admit(&work) {
        // Corruption and duplicates are for frames; a block device cannot be given them.
        Verdict::Serve | Verdict::Corrupt(_) | Verdict::Duplicate | Verdict::Reorder => return Admitted::Plain,
        Verdict::Delay(delay) => return Admitted::Delayed(delay),
        Verdict::Torn(bytes) if matches!(req.operation, Operation::Write { .. }) && bytes >= blk::SECTOR_SIZE => {
            keep_prefix(&mut req.data, bytes / blk::SECTOR_SIZE * blk::SECTOR_SIZE);
            return Admitted::Torn;
        }
        Verdict::Fail | Verdict::Torn(_) => RequestError::FailedByService,
        Verdict::Unsupported => RequestError::UnsupportedByService,
    };
    done.push(Completion { work, started, ok: false });
    parsed.result = Err(refused);
    Admitted::Plain
}

/// Cuts `data` to its first `bytes` bytes.
fn keep_prefix(data: &mut Vec<Segment>, bytes: u64) {
    let mut left = bytes;
    data.retain_mut(|segment| {
        let keep = segment.len.min(left);
        segment.len = keep;
        left -= keep;
        keep > 0
    });
}

/// Tells the services a request completed, and which guest memory it wrote (the data of a
/// read or GET_ID; the status byte is reported by the caller).
fn report_completion(
    services: &dyn QueueServices,
    queue: usize,
    req: &Request,
    outcome: &io::Result<u64>,
    started: Instant,
    done: &mut Vec<Completion>,
) {
    if let Ok(written) = outcome {
        let mut left = *written;
        for seg in &req.data {
            if left == 0 {
                break;
            }
            let len = seg.len.min(left);
            services.guest_written(seg.addr, len);
            left -= len;
        }
    }
    done.push(Completion { work: work_of(queue, req), started, ok: outcome.is_ok() });
}

/// What the services are told a request is.
fn work_of(queue: usize, req: &Request) -> Work {
    let work = Work::new(queue, req.request_type.name(), stream_len(&req.data));
    let first = match &req.operation {
        Operation::Read { offset } | Operation::Write { offset } => Some(offset / blk::SECTOR_SIZE),
        Operation::Discard(ranges) => ranges.first().map(|(offset, _)| offset / blk::SECTOR_SIZE),
        Operation::WriteZeroes(ranges) => ranges.first().map(|(offset, _, _)| offset / blk::SECTOR_SIZE),
        Operation::Flush | Operation::GetId => None,
    };
    first.map_or(work, |sector| work.at_sector(sector))
}

fn slices<'a>(mem: &'a GuestMemoryMmap, data: &[Segment]) -> io::Result<Vec<vm_memory::VolatileSlice<'a, ()>>> {
    let mut out = Vec::with_capacity(data.len());
    for seg in data {
        for slice in GuestMemoryBackend::get_slices(mem, seg.addr, seg.len as usize) {
            out.push(slice.map_err(io::Error::other)?);
        }
    }
    Ok(out)
}

impl VhostUserBackend for BlkDevice {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        self.shared.options.num_queues.into()
    }

    fn max_queue_size(&self) -> usize {
        self.shared.options.queue_size.into()
    }

    fn features(&self) -> u64 {
        self.device_features().0
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        // Requests in flight survive a backend restart (see `queue::inflight`).
        crate::server::protocol_features() | VhostUserProtocolFeatures::INFLIGHT_SHMFD
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        crate::server::config_slice(&self.config_bytes(), offset, size)
    }

    fn set_config(&self, offset: u32, buf: &[u8]) -> io::Result<()> {
        // Only `writeback` (CONFIG_WCE) is writable.
        if offset as usize == blk::config_offset::WRITEBACK && buf.len() == 1 {
            self.shared.writeback.store(buf[0] != 0, Ordering::Relaxed);
            return Ok(());
        }
        // Refusing with an error would make the library end the whole connection: the write
        // is ignored, counted and logged (once) instead.
        self.shared.stats.record_error(&RequestError::WrongDirection("config write"));
        Ok(())
    }

    crate::served_by_core!(shared.core);

    fn queues_per_thread(&self) -> Vec<u64> {
        (0..self.shared.options.num_queues).map(|q| 1u64 << q).collect()
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[VringRwLock],
        thread: usize,
    ) -> io::Result<()> {
        self.shared.core.log_errors(device_event, || {
            if evset != EventSet::IN {
                return Err(io::Error::other(format!("unexpected event set {evset:?}")));
            }
            if let Some(queue) = self.shared.throttles.queue_of(u64::from(device_event)) {
                // The queue's tokens are back: serve it again.
                self.shared.throttles.fired(queue);
            } else {
                self.shared.core.services().kicked(thread);
            }
            // A worker's vrings are its own queues, the one of this queue's worker first.
            let Some(vring) = vrings.first() else {
                return Err(io::Error::other(format!("event {device_event} for worker {thread} without a queue")));
            };
            let queues = [WorkerQueue { index: thread, vring }];
            let mut pass = QueuePass { device: self, vring, queue: thread, reused: PassBuffers::default() };
            self.shared.core.serve(thread, &queues, &mut pass)
        })
    }
}

/// What a queue's passes reuse instead of allocating per batch.
#[derive(Default)]
struct PassBuffers {
    heads: Vec<u16>,
    used: UsedBatch,
}

/// One request queue's pass: every available request as one batch.
struct QueuePass<'a> {
    device: &'a BlkDevice,
    vring: &'a VringRwLock,
    queue: usize,
    reused: PassBuffers,
}

impl QueueService for QueuePass<'_> {
    fn pass(&mut self, ctx: &PassContext<'_>) -> Result<usize, PassError> {
        // `process_queue` checks that the queue may be served (enabled, not broken) under the
        // vring's lock, saving the worker's separate look on every poll.
        self.device.process_queue(self.vring, self.queue, ctx.memory, &mut self.reused)
    }

    fn rearm(&self, queue: usize) -> Rearm {
        // Waiting for its limits, the queue takes no kicks: its timer wakes it.
        if self.device.shared.throttles.is_waiting(queue) { Rearm::Parked } else { Rearm::Work }
    }
}

impl crate::server::ServedDevice for BlkDevice {
    fn core(&self) -> &DeviceCore {
        &self.shared.core
    }

    fn attach(&self, handlers: Vec<Arc<vhost_user_backend::VringEpollHandler<Self>>>) -> io::Result<()> {
        // One worker per queue: each watches its queue's throttle timer.
        for (queue, handler) in handlers.iter().enumerate() {
            if let Some((fd, event)) = self.shared.throttles.timer(queue) {
                handler.register_listener(fd, EventSet::IN, event)?;
            }
        }
        Ok(())
    }
}
