//! What every device's `VhostUserBackend` implementation shares, in one [`DeviceCore`]: the
//! guest-memory slot, the worker threads' exit events, the connection's stop flag, the
//! process's gates, broken queues, and the services.

use super::Memory;
use super::dirty_log::{CoreServices, DirtyLog};
use super::held::HeldUsed;
use super::inflight::Inflight;
use super::quiesce::Gates;
use super::ring::RingError;
use super::services::{NoServices, QueueServices};
use log::warn;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;
use vmm_sys_util::event::{EventConsumer, EventFlag, EventNotifier, new_event_consumer_and_notifier};

/// The part of a device that is the same for every device; one per frontend connection.
pub struct DeviceCore {
    name: &'static str,
    memory: RwLock<Option<Memory>>,
    exits: Vec<(EventConsumer, EventNotifier)>,
    /// Exit-event descriptors handed to the library, which registers them and never closes
    /// them; closed by [`DeviceCore::release_library_fds`] once the library is done.
    library_fds: Mutex<Vec<RawFd>>,
    gates: Arc<Gates>,
    stopped: AtomicBool,
    broken: Vec<AtomicBool>,
    broken_rings: AtomicU64,
    poll: Duration,
    services: CoreServices,
    /// Each queue's call descriptor when its worker last looked (-1: none yet).
    call_fds: Vec<std::sync::atomic::AtomicI32>,
    inflight: Arc<Inflight>,
    held: HeldUsed,
}

impl DeviceCore {
    /// The core of device `name` with `queues` queues served by `workers` threads (whose
    /// gates, shared by every connection, are `gates`), polling `poll_us` µs after the last
    /// work.
    pub fn new(
        name: &'static str,
        queues: usize,
        workers: usize,
        gates: Arc<Gates>,
        poll_us: u64,
    ) -> io::Result<DeviceCore> {
        let exits = (0..workers)
            .map(|_| new_event_consumer_and_notifier(EventFlag::NONBLOCK))
            .collect::<io::Result<Vec<_>>>()?;
        Ok(DeviceCore {
            name,
            memory: RwLock::new(None),
            exits,
            library_fds: Mutex::new(Vec::new()),
            gates,
            stopped: AtomicBool::new(false),
            broken: (0..queues).map(|_| AtomicBool::new(false)).collect(),
            broken_rings: AtomicU64::new(0),
            poll: Duration::from_micros(poll_us),
            services: CoreServices { dirty: Arc::new(DirtyLog::new()), attached: Arc::new(NoServices) },
            call_fds: (0..queues).map(|_| std::sync::atomic::AtomicI32::new(-1)).collect(),
            inflight: Arc::new(Inflight::new(queues, Arc::new(AtomicU64::new(0)))),
            held: HeldUsed::new(queues),
        })
    }

    /// The same core with `services` attached.
    pub fn with_services(mut self, services: Arc<dyn QueueServices>) -> DeviceCore {
        self.services.attached = services;
        self
    }

    /// The same core counting resubmitted requests into `resubmitted` (a device's
    /// statistics, which outlive the connection).
    pub fn counting_resubmitted(mut self, resubmitted: Arc<AtomicU64>) -> DeviceCore {
        self.inflight = Arc::new(Inflight::new(self.broken.len(), resubmitted));
        self
    }

    /// The connection's in-flight tracking (fed by the relay from GET_INFLIGHT_FD,
    /// SET_INFLIGHT_FD and SET_VRING_KICK).
    pub fn inflight(&self) -> &Arc<Inflight> {
        &self.inflight
    }

    /// Used entries a service holds back until their time.
    pub fn held(&self) -> &HeldUsed {
        &self.held
    }

    /// The services' hooks: the connection's dirty log, then the attached services.
    pub fn services(&self) -> &dyn QueueServices {
        &self.services
    }

    /// Notes queue `queue`'s call descriptor `fd` and says whether it replaced another: the
    /// frontend switched where interrupts go (SET_VRING_CALL on a live ring), and a signal
    /// sent to the old one in between may be lost, so the worker signals the new one once.
    pub fn call_changed(&self, queue: usize, fd: RawFd) -> bool {
        self.call_fds.get(queue).is_some_and(|seen| {
            let old = seen.swap(fd, Ordering::Relaxed);
            old >= 0 && fd >= 0 && old != fd
        })
    }

    /// The connection's dirty log (fed by the relay from SET_FEATURES and SET_LOG_BASE).
    pub fn dirty_log(&self) -> &Arc<DirtyLog> {
        &self.services.dirty
    }

    /// How long a worker keeps polling after its last work.
    pub fn poll(&self) -> Duration {
        self.poll
    }

    /// The frontend's new memory table.
    pub fn update_memory(&self, memory: Memory) {
        *crate::write(&self.memory) = Some(memory);
    }

    /// The memory table, once the frontend sent one.
    pub fn memory(&self) -> Option<Memory> {
        crate::read(&self.memory).clone()
    }

    /// The exit event of worker `worker`, for the library (`VhostUserBackend::exit_event`).
    pub fn exit_event(&self, worker: usize) -> Option<(EventConsumer, EventNotifier)> {
        let (consumer, notifier) = self.exits.get(worker)?;
        let (consumer, notifier) = (consumer.try_clone().ok()?, notifier.try_clone().ok()?);
        crate::lock(&self.library_fds).push(consumer.as_raw_fd());
        Some((consumer, notifier))
    }

    /// Closes the exit-event descriptors the library left open. Call only after the library's
    /// daemon for this connection is dropped (its worker threads joined, its epoll closed).
    pub fn release_library_fds(&self) {
        for fd in std::mem::take(&mut *crate::lock(&self.library_fds)) {
            // SAFETY: `fd` is a duplicate made in `exit_event` whose ownership the library took
            // with `into_raw_fd` (vhost-user-backend 0.24, `VringEpollHandler::new`) and never
            // closes; the daemon that used it is gone, so nothing else refers to the number,
            // and it is taken out of the list so it is closed once.
            unsafe { libc::close(fd) };
        }
    }

    /// Stops this connection's workers: no pass starts any more, the workers are woken to
    /// leave their event loops, and this returns once none is inside a pass.
    pub fn stop(&self) {
        self.stopped.store(true, Ordering::SeqCst);
        for (_, notifier) in &self.exits {
            let _ = notifier.notify();
        }
        self.gates.wait_idle();
    }

    /// Whether the connection stopped or the process is exiting.
    pub fn is_stopped(&self) -> bool {
        self.stopped.load(Ordering::SeqCst) || self.gates.is_closed()
    }

    pub(crate) fn gates(&self) -> &Gates {
        &self.gates
    }

    pub(crate) fn stopped_flag(&self) -> &AtomicBool {
        &self.stopped
    }

    /// Marks queue `queue` broken: it is not served until the frontend stops it.
    pub fn mark_broken(&self, queue: usize, error: &RingError) {
        if let Some(flag) = self.broken.get(queue)
            && !flag.swap(true, Ordering::Relaxed)
        {
            self.broken_rings.fetch_add(1, Ordering::Relaxed);
            warn!("{}: queue {queue} is broken ({error}); not served until the frontend resets it", self.name);
        }
    }

    /// Whether queue `queue` is broken.
    pub fn is_broken(&self, queue: usize) -> bool {
        self.broken.get(queue).is_some_and(|f| f.load(Ordering::Relaxed))
    }

    /// How many times a queue was found broken on this connection.
    pub fn broken_rings(&self) -> u64 {
        self.broken_rings.load(Ordering::Relaxed)
    }

    /// The frontend stopped queue `queue` (GET_VRING_BASE): whatever broke it is gone with
    /// the ring's old state.
    pub fn stop_vring(&self, queue: usize) {
        // Nothing taken may stay uncompleted once the frontend is told the ring's index.
        self.held.release_all(queue, self.memory(), self.services(), &self.inflight);
        if let Some(flag) = self.broken.get(queue) {
            flag.store(false, Ordering::Relaxed);
        }
    }

    /// Runs `handle`, logging an error instead of returning it: an error returned from
    /// `handle_event` would end the worker's event loop for good.
    pub fn log_errors(&self, event: u16, handle: impl FnOnce() -> io::Result<()>) -> io::Result<()> {
        if let Err(e) = handle() {
            warn!("{}: event {event}: {e}", self.name);
        }
        Ok(())
    }
}

/// The `VhostUserBackend` methods every device implements the same way through its
/// [`DeviceCore`] (reached as `self.$core`).
#[macro_export]
macro_rules! served_by_core {
    ($($core:tt)+) => {
        fn update_memory(&self, memory: $crate::queue::Memory) -> std::io::Result<()> {
            self.$($core)+.update_memory(memory);
            Ok(())
        }

        fn exit_event(
            &self,
            thread_index: usize,
        ) -> Option<(vmm_sys_util::event::EventConsumer, vmm_sys_util::event::EventNotifier)> {
            self.$($core)+.exit_event(thread_index)
        }

        fn stop_vring(&self, queue_index: u32) -> std::io::Result<()> {
            self.$($core)+.stop_vring(queue_index as usize);
            Ok(())
        }

        fn set_event_idx(&self, _enabled: bool) {
            // The library applies RING_EVENT_IDX to each vring (virtio-queue's
            // `set_event_idx`); the worker loop and `UsedBatch::publish` follow it.
        }
    };
}
