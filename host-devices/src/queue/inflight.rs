//! In-flight I/O tracking (protocol feature INFLIGHT_SHMFD), so that a backend that crashes
//! with requests taken but not completed has exactly those resubmitted by its successor.
//!
//! The frontend asks for a shared area (GET_INFLIGHT_FD: [`allocate`] makes a sealed memfd),
//! keeps it across backend restarts and hands it to each backend it connects to
//! (SET_INFLIGHT_FD: [`Inflight::set_area`], the region's size checked against its file). Both
//! messages are taken by the relay ([`crate::relay`]): `vhost-user-backend` refuses them.
//!
//! While a ring runs, the core keeps its region as the specification's "Inflight I/O tracking"
//! section says ([`TrackedQueue`]): a head taken from the available ring gets the next counter
//! value and its `inflight` flag; a used batch is first linked into the batch list
//! (`next`, `last_batch_head`), then published, then its flags are cleared and `used_idx` set.
//! When a ring starts ([`Inflight::ring_started`], on SET_VRING_KICK), its first pass resumes
//! it ([`TrackedQueue::resume`], in [`super::inflight_resume`]): the last batch repaired if the
//! crash came between publishing it and clearing its flags, and the heads still in flight
//! resubmitted in the order they were taken, before anything new is popped.
//!
//! Nothing in the area is trusted: every access is bounds-checked against the mapping, and a
//! region whose contents make no sense is reported, counted and started afresh (its requests
//! cannot be told apart from garbage; the ring is then served from the index the frontend
//! gave, as without tracking).

use log::{info, warn};
use pvkit_protocol::inflight::{
    DESC_STATE_SIZE, InflightRepr, QUEUE_HEADER_SIZE, REGION_VERSION, desc_state, desc_state_offset, header,
};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering, fence};
use std::sync::{Arc, RwLock};
use vm_memory::mmap::MmapRegion;
use vm_memory::{Bytes, FileOffset, VolatileMemory, VolatileSlice};

pub use super::inflight_resume::RegionError;

/// Errors from taking or allocating an in-flight area.
#[derive(Debug, thiserror::Error)]
pub enum InflightError {
    /// The message's counts or sizes are wrong.
    #[error("{0}")]
    Message(#[from] pvkit_protocol::inflight::InflightError),
    /// The area's file is smaller than the area.
    #[error(
        "the in-flight area needs {needed} bytes of its file (offset {offset:#x} + size {size:#x}) but the file holds {held}"
    )]
    FileTooShort {
        /// Where the area starts in the file.
        offset: u64,
        /// The area's size.
        size: u64,
        /// Bytes the area needs.
        needed: u64,
        /// Bytes the file holds.
        held: u64,
    },
    /// The area describes fewer queues than the device has rings started.
    #[error("the in-flight area has no region for queue {queue} (it describes {queues})")]
    NoRegion {
        /// The queue.
        queue: usize,
        /// Queues the area describes.
        queues: u16,
    },
    /// An area for more queues than the device has.
    #[error("an in-flight area for {asked} queues was asked of a device with {device}")]
    TooManyQueues {
        /// Queues asked for.
        asked: u16,
        /// Queues the device has.
        device: usize,
    },
    /// A system call failed.
    #[error("{what}: {source}")]
    Os {
        /// What was being done.
        what: &'static str,
        /// Why it failed.
        source: std::io::Error,
    },
    /// The area could not be mapped.
    #[error("cannot map the in-flight area: {0}")]
    Map(vm_memory::mmap::MmapRegionError),
}

fn os(what: &'static str) -> impl FnOnce(std::io::Error) -> InflightError {
    move |source| InflightError::Os { what, source }
}

/// A new zeroed area for `request`'s queues (GET_INFLIGHT_FD): a memfd sealed against
/// growing and shrinking, and the reply's description of it.
pub fn allocate(request: &InflightRepr) -> Result<(OwnedFd, InflightRepr), InflightError> {
    request.check_counts()?;
    let reply = InflightRepr { mmap_size: request.regions_size(), mmap_offset: 0, ..*request };
    // SAFETY: the name is a NUL-terminated literal; the flags are valid memfd_create flags.
    let raw = unsafe { libc::memfd_create(c"pvkit-inflight".as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
    if raw < 0 {
        return Err(os("memfd_create for the in-flight area")(std::io::Error::last_os_error()));
    }
    // SAFETY: memfd_create just returned this descriptor; nothing else owns it.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let file = std::fs::File::from(fd);
    file.set_len(reply.mmap_size).map_err(os("sizing the in-flight area"))?;
    let seals = libc::F_SEAL_GROW | libc::F_SEAL_SHRINK | libc::F_SEAL_SEAL;
    // SAFETY: F_ADD_SEALS on a descriptor this function owns, with valid seal bits.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, seals) } < 0 {
        return Err(os("sealing the in-flight area")(std::io::Error::last_os_error()));
    }
    Ok((OwnedFd::from(file), reply))
}

/// A mapped area.
pub(crate) struct Area {
    map: MmapRegion<()>,
    pub(crate) repr: InflightRepr,
}

impl Area {
    pub(crate) fn slice(&self) -> VolatileSlice<'_> {
        self.map.as_volatile_slice()
    }
}

/// One connection's in-flight tracking: the area, once the frontend gave one, and what each
/// ring needs to resume.
pub struct Inflight {
    area: RwLock<Option<Arc<Area>>>,
    /// Per device queue: its ring started and its first pass must resume it.
    pending: Vec<AtomicBool>,
    /// Per device queue: the counter the next head taken gets.
    counters: Vec<AtomicU64>,
    resubmitted: Arc<AtomicU64>,
    refused: AtomicU64,
}

impl Inflight {
    /// No area yet, for a device with `queues` queues, counting resubmitted requests into
    /// `resubmitted` (which outlives the connection, for the device's statistics).
    pub fn new(queues: usize, resubmitted: Arc<AtomicU64>) -> Inflight {
        Inflight {
            area: RwLock::new(None),
            pending: (0..queues).map(|_| AtomicBool::new(false)).collect(),
            counters: (0..queues).map(|_| AtomicU64::new(0)).collect(),
            resubmitted,
            refused: AtomicU64::new(0),
        }
    }

    /// A new area for the queues `request` names (GET_INFLIGHT_FD), no more than the device
    /// has: [`allocate`], bounded by the device.
    pub fn allocate(&self, request: &InflightRepr) -> Result<(OwnedFd, InflightRepr), InflightError> {
        if usize::from(request.num_queues) > self.pending.len() {
            return Err(InflightError::TooManyQueues { asked: request.num_queues, device: self.pending.len() });
        }
        allocate(request)
    }

    /// Takes the area the frontend sent (SET_INFLIGHT_FD), after checking its description
    /// and that its file holds it; replaces any earlier one.
    pub fn set_area(&self, fd: OwnedFd, repr: InflightRepr) -> Result<(), InflightError> {
        let checked = repr.check_area().and_then(|()| {
            let end = repr.mmap_offset.checked_add(repr.mmap_size);
            end.ok_or(pvkit_protocol::inflight::InflightError::TooSmall {
                size: repr.mmap_size,
                queues: repr.num_queues,
                each: pvkit_protocol::inflight::queue_region_size(repr.queue_size),
            })
        });
        let needed = checked.inspect_err(|_| self.note_refused())?;
        let file = std::fs::File::from(fd);
        let held = file.metadata().map_err(os("stat of the in-flight area"))?.len();
        if needed > held {
            self.note_refused();
            return Err(InflightError::FileTooShort { offset: repr.mmap_offset, size: repr.mmap_size, needed, held });
        }
        // Only the queues' regions are ever touched; map no more than those.
        let length = usize::try_from(repr.regions_size()).unwrap_or(usize::MAX);
        let map = MmapRegion::from_file(FileOffset::new(file, repr.mmap_offset), length).map_err(InflightError::Map)?;
        info!("in-flight tracking on: {} queue region(s) of {} entries", repr.num_queues, repr.queue_size);
        *crate::write(&self.area) = Some(Arc::new(Area { map, repr }));
        Ok(())
    }

    fn note_refused(&self) {
        self.refused.fetch_add(1, Ordering::Relaxed);
    }

    /// Whether the frontend gave an area.
    pub fn is_tracking(&self) -> bool {
        crate::read(&self.area).is_some()
    }

    /// Queue `queue`'s ring was started (SET_VRING_KICK): its next pass resumes it.
    pub fn ring_started(&self, queue: usize) {
        if let Some(flag) = self.pending.get(queue) {
            flag.store(true, Ordering::SeqCst);
        }
    }

    /// What a pass on queue `queue` tracks through, when the frontend gave an area with a
    /// region for it.
    pub fn queue(&self, queue: usize) -> Option<TrackedQueue<'_>> {
        let area = crate::read(&self.area).clone()?;
        let index = u16::try_from(queue).ok().filter(|q| *q < area.repr.num_queues);
        let Some(index) = index else {
            if self.pending.get(queue).is_some_and(|p| p.swap(false, Ordering::SeqCst)) {
                let error = InflightError::NoRegion { queue, queues: area.repr.num_queues };
                warn!("{error}; that queue is not tracked");
            }
            return None;
        };
        let base = area.repr.queue_offset(index);
        Some(TrackedQueue { area, base, queue, owner: self })
    }

    /// Requests resubmitted after a restart, on every connection of the device.
    pub fn resubmitted(&self) -> u64 {
        self.resubmitted.load(Ordering::Relaxed)
    }

    /// Areas and regions refused on this connection.
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }
}

/// One queue's region, for one pass.
pub struct TrackedQueue<'a> {
    pub(crate) area: Arc<Area>,
    pub(crate) base: u64,
    pub(crate) queue: usize,
    pub(crate) owner: &'a Inflight,
}

impl TrackedQueue<'_> {
    fn at(&self, offset: u64) -> usize {
        usize::try_from(self.base + offset).unwrap_or(usize::MAX)
    }

    pub(crate) fn desc_num(&self) -> u16 {
        self.area.repr.queue_size
    }

    pub(crate) fn write_u8(&self, offset: u64, value: u8) {
        let _ = self.area.slice().write_obj(value, self.at(offset));
    }

    pub(crate) fn write_u16(&self, offset: u64, value: u16) {
        let _ = self.area.slice().write_obj(value.to_le(), self.at(offset));
    }

    pub(crate) fn write_u64(&self, offset: u64, value: u64) {
        let _ = self.area.slice().write_obj(value.to_le(), self.at(offset));
    }

    pub(crate) fn read_u8(&self, offset: u64) -> u8 {
        self.area.slice().read_obj::<u8>(self.at(offset)).unwrap_or(u8::MAX)
    }

    pub(crate) fn read_u16(&self, offset: u64) -> u16 {
        u16::from_le(self.area.slice().read_obj::<u16>(self.at(offset)).unwrap_or(u16::MAX))
    }

    pub(crate) fn read_u64(&self, offset: u64) -> u64 {
        u64::from_le(self.area.slice().read_obj::<u64>(self.at(offset)).unwrap_or(u64::MAX))
    }

    pub(crate) fn counter(&self) -> &AtomicU64 {
        &self.owner.counters[self.queue]
    }

    /// Whether the ring started since the last pass (consumed: only the first pass resumes).
    pub(crate) fn take_pending(&self) -> bool {
        self.owner.pending.get(self.queue).is_some_and(|p| p.swap(false, Ordering::SeqCst))
    }

    pub(crate) fn note_refused(&self) {
        self.owner.note_refused();
    }

    pub(crate) fn note_resubmitted(&self, count: usize) {
        self.owner.resubmitted.fetch_add(count as u64, Ordering::Relaxed);
    }

    /// Head `head` was taken from the available ring: it gets the next counter value, then
    /// its flag (a crash in between leaves it not in flight, and it was never used).
    pub fn taken(&self, head: u16) {
        if head >= self.desc_num() {
            return;
        }
        let counter = self.counter().fetch_add(1, Ordering::Relaxed);
        self.write_u64(desc_state_offset(head) + desc_state::COUNTER, counter);
        fence(Ordering::Release);
        self.write_u8(desc_state_offset(head) + desc_state::INFLIGHT, 1);
    }

    /// Head `head`, taken, was put back in the available ring without being served.
    pub fn untaken(&self, head: u16) {
        if head < self.desc_num() {
            self.write_u8(desc_state_offset(head) + desc_state::INFLIGHT, 0);
            self.counter().fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Before the used index covering `heads` is stored: they become the last batch.
    pub fn publishing(&self, heads: impl Iterator<Item = u16>) {
        let mut last = self.read_u16(header::LAST_BATCH_HEAD);
        for head in heads.filter(|h| *h < self.desc_num()) {
            self.write_u16(desc_state_offset(head) + desc_state::NEXT, last);
            last = head;
        }
        self.write_u16(header::LAST_BATCH_HEAD, last);
        fence(Ordering::Release);
    }

    /// After the used index `used_idx` covering `heads` was stored: they are done.
    pub fn published(&self, heads: impl Iterator<Item = u16>, used_idx: u16) {
        fence(Ordering::Release);
        for head in heads.filter(|h| *h < self.desc_num()) {
            self.write_u8(desc_state_offset(head) + desc_state::INFLIGHT, 0);
        }
        fence(Ordering::Release);
        self.write_u16(header::USED_IDX, used_idx);
    }

    /// Starts this queue's region afresh for a ring whose used index is `used_idx`.
    pub(crate) fn initialize(&self, used_idx: u16) {
        let states = usize::try_from(DESC_STATE_SIZE * u64::from(self.desc_num())).unwrap_or(0);
        let _ = self.area.slice().write_slice(&vec![0u8; states], self.at(QUEUE_HEADER_SIZE));
        self.write_u64(header::FEATURES, 0);
        self.write_u16(header::DESC_NUM, self.desc_num());
        self.write_u16(header::LAST_BATCH_HEAD, 0);
        self.write_u16(header::USED_IDX, used_idx);
        fence(Ordering::Release);
        self.write_u16(header::VERSION, REGION_VERSION);
        self.counter().store(0, Ordering::Relaxed);
    }
}
