//! The one worker loop every device's queues are served by.

use super::Memory;
use super::device_core::DeviceCore;
use super::ring::RingError;
use std::io;
use std::time::Instant;
use vhost_user_backend::{VringRwLock, VringT};
use virtio_queue::QueueT;

/// One of the queues a worker thread serves.
#[derive(Clone, Copy)]
pub struct WorkerQueue<'a> {
    /// The device's queue index.
    pub index: usize,
    /// The ring.
    pub vring: &'a VringRwLock,
}

/// What a queue wants when its worker goes idle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rearm {
    /// Kicks, and buffers added meanwhile are work: serve them before sleeping.
    Work,
    /// Kicks, but buffers waiting are not work by themselves (a receive queue's free buffers
    /// while no input waits).
    KickOnly,
    /// Neither: the device cannot take more from this queue until something else happens
    /// (a console port whose host side is full wakes the worker when it drains).
    Parked,
    /// Kicks, and only buffers added after the driver's available index reached `seen` are
    /// work: the buffers up to it could not take what waits (a receive queue whose buffers
    /// are too small for the held frame). Counting those as work would spin forever.
    Blocked {
        /// The driver's available index when the device found its buffers too few.
        seen: u16,
    },
}

/// Why a pass ended early.
#[derive(Debug, thiserror::Error)]
pub enum PassError {
    /// A ring is broken; the worker marks it and goes on with the others.
    #[error("queue {queue}: {error}")]
    Ring {
        /// The device's queue index.
        queue: usize,
        /// What is wrong with it.
        error: RingError,
    },
    /// Signalling the driver failed, or similar; logged by the caller.
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// What a pass sees: the memory holder (load a map *after* popping a chain from it) and
/// which queues may be touched.
pub struct PassContext<'a> {
    /// Guest memory.
    pub memory: &'a Memory,
    core: &'a DeviceCore,
}

impl PassContext<'_> {
    /// Whether queue `queue` (on `vring`) may be served: set up, enabled and not broken.
    pub fn serviceable(&self, queue: usize, vring: &VringRwLock) -> bool {
        serviceable(self.core, queue, vring)
    }
}

/// Re-enables kicks on a queue blocked at available index `seen` and says whether the driver
/// has added buffers since. With RING_EVENT_IDX the driver kicks only once its index passes
/// `avail_event`, which `enable_notification` puts at the device's position, behind `seen`
/// (the chains up to `seen` were looked at and put back): `avail_event` moves to `seen`, so the
/// next buffer added is kicked.
fn rearm_blocked(core: &DeviceCore, vring: &VringRwLock, memory: &Memory, seen: u16) -> io::Result<bool> {
    use std::sync::atomic::{Ordering, fence};
    use vm_memory::{Address, Bytes, GuestAddress, GuestAddressSpace};
    vring.enable_notification().map_err(io::Error::other)?;
    let mem = memory.memory();
    let mut state = vring.get_mut();
    let vq = state.get_queue_mut();
    if vq.event_idx_enabled() {
        let at = GuestAddress(vq.used_ring()).checked_add(pvkit_protocol::ring::avail_event_offset(vq.size()));
        if let Some(at) = at
            && mem.write_obj(seen.to_le(), at).is_ok()
        {
            core.services().guest_written(at, 2);
        }
        fence(Ordering::SeqCst);
    }
    Ok(vq.avail_idx(&*mem, Ordering::Acquire).is_ok_and(|now| now.0 != seen))
}

fn serviceable(core: &DeviceCore, queue: usize, vring: &VringRwLock) -> bool {
    if core.is_broken(queue) {
        return false;
    }
    let state = vring.get_ref();
    state.is_enabled() && state.get_queue().ready()
}

/// A device's service of one worker's queues.
pub trait QueueService {
    /// One pass over the queues; returns how much moved (chains, frames), 0 when idle.
    fn pass(&mut self, ctx: &PassContext<'_>) -> Result<usize, PassError>;

    /// What queue `queue` wants when the worker goes idle.
    fn rearm(&self, _queue: usize) -> Rearm {
        Rearm::Work
    }
}

impl DeviceCore {
    /// Serves `queues` as worker `worker` until there is nothing left to do with
    /// notifications re-enabled: notifications off, passes until one finds nothing (with
    /// `--poll-us`, until none found anything for that long), then notifications on as each
    /// queue wants, and again if the driver added work meanwhile (it will not kick for it).
    /// Returns at once when the connection is stopped or the process exits.
    pub fn serve(&self, worker: usize, queues: &[WorkerQueue<'_>], service: &mut impl QueueService) -> io::Result<()> {
        let Some(_pass) = self.gates().enter(worker, self.stopped_flag()) else { return Ok(()) };
        let Some(memory) = self.memory() else { return Ok(()) };
        let ctx = PassContext { memory: &memory, core: self };
        let poll = self.poll();
        for q in queues {
            let call = q.vring.get_ref().get_call().as_ref().map_or(-1, std::os::fd::AsRawFd::as_raw_fd);
            if self.call_changed(q.index, call) {
                // A spurious interrupt is harmless; one lost with the old descriptor stalls a
                // driver that waits for it (RING_EVENT_IDX signals only on crossing used_event).
                q.vring.signal_used_queue()?;
            }
        }
        loop {
            for q in queues.iter().filter(|q| serviceable(self, q.index, q.vring)) {
                let _ = q.vring.disable_notification();
            }
            // The clock is read only while polling an idle queue (it is not free: a profile
            // of the null block backend found 14% of its time in clock_gettime when every pass
            // read it).
            let mut idle_since: Option<Instant> = None;
            loop {
                if self.is_stopped() {
                    return Ok(());
                }
                let work = match service.pass(&ctx) {
                    Ok(work) => work,
                    Err(PassError::Ring { queue, error }) => {
                        self.mark_broken(queue, &error);
                        // The other queues still want their pass.
                        1
                    }
                    Err(PassError::Io(e)) => return Err(e),
                };
                if work > 0 {
                    idle_since = None;
                    continue;
                }
                if poll.is_zero() {
                    break;
                }
                let idle = idle_since.get_or_insert_with(Instant::now).elapsed();
                if idle >= poll {
                    if let Some(first) = queues.first() {
                        self.services().polled(first.index, idle);
                    }
                    break;
                }
                std::hint::spin_loop();
            }
            let mut more = false;
            for q in queues.iter().filter(|q| serviceable(self, q.index, q.vring)) {
                match service.rearm(q.index) {
                    Rearm::Work => more |= q.vring.enable_notification().map_err(io::Error::other)?,
                    Rearm::KickOnly => {
                        q.vring.enable_notification().map_err(io::Error::other)?;
                    }
                    Rearm::Parked => {}
                    Rearm::Blocked { seen } => more |= rearm_blocked(self, q.vring, &memory, seen)?,
                }
            }
            if !more {
                return Ok(());
            }
        }
    }
}
