//! Dirty-page logging for live migration, as the vhost-user specification has it with
//! protocol feature LOG_SHMFD: the frontend hands over a shared bitmap (SET_LOG_BASE, taken by
//! the relay, see [`crate::relay`]) and, while it has VHOST_F_LOG_ALL acknowledged, every page
//! of guest memory the backend writes gets its bit set: bit `n % 8` of byte `n / 8` for the
//! 4 KiB page `n` of guest-physical memory.
//!
//! Every write a device makes into guest memory already passes through
//! [`QueueServices::guest_written`] (data, status bytes, received frames, used-ring entries and
//! indexes, `avail_event`, io_uring reads): the log is one more listener there, in front of
//! whatever services are attached, so it is written once for all devices.

use super::services::{Completion, QueueServices, Verdict, Work};
use log::{info, warn};
use std::os::fd::OwnedFd;
use std::sync::RwLock;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use vm_memory::mmap::MmapRegion;
use vm_memory::{FileOffset, GuestAddress, VolatileMemory};

/// The page size the log counts in (the specification's VHOST_LOG_PAGE).
pub const LOG_PAGE: u64 = 0x1000;

/// Errors from taking a log the frontend sent.
#[derive(Debug, thiserror::Error)]
pub enum DirtyLogError {
    /// The file is smaller than the area announced.
    #[error("the log needs {needed} bytes of its file (offset {offset:#x} + size {size:#x}) but the file holds {held}")]
    TooShort {
        /// Offset of the area in the file.
        offset: u64,
        /// Size of the area.
        size: u64,
        /// Bytes the area needs.
        needed: u64,
        /// Bytes the file holds.
        held: u64,
    },
    /// An empty or absurd area.
    #[error("a log of {0} bytes")]
    BadSize(u64),
    /// fstat failed.
    #[error("cannot stat the log's file: {0}")]
    Stat(std::io::Error),
    /// mmap failed.
    #[error("cannot map the log: {0}")]
    Map(vm_memory::mmap::MmapRegionError),
}

/// Largest log accepted: one bit per 4 KiB page of 64 TiB of guest memory.
const MAX_LOG_BYTES: u64 = (64 << 40) / LOG_PAGE / 8;

/// One connection's dirty log, with the services it stands in front of.
pub struct DirtyLog {
    /// VHOST_F_LOG_ALL is acknowledged.
    log_all: AtomicBool,
    /// `log_all` and a mapped log: pages are marked.
    active: AtomicBool,
    map: RwLock<Option<MmapRegion<()>>>,
    marked: AtomicU64,
    outside: AtomicU64,
}

impl Default for DirtyLog {
    fn default() -> Self {
        DirtyLog::new()
    }
}

impl DirtyLog {
    /// No log, not logging.
    pub fn new() -> DirtyLog {
        DirtyLog {
            log_all: AtomicBool::new(false),
            active: AtomicBool::new(false),
            map: RwLock::new(None),
            marked: AtomicU64::new(0),
            outside: AtomicU64::new(0),
        }
    }

    fn update_active(&self, map: &Option<MmapRegion<()>>) {
        let on = self.log_all.load(Ordering::SeqCst) && map.is_some();
        if self.active.swap(on, Ordering::SeqCst) != on {
            info!("dirty-page logging {}", if on { "started" } else { "stopped" });
        }
    }

    /// VHOST_F_LOG_ALL was acknowledged (`true`) or cleared, e.g. by a cancelled migration.
    pub fn set_log_all(&self, on: bool) {
        self.log_all.store(on, Ordering::SeqCst);
        self.update_active(&crate::read(&self.map));
    }

    /// Takes the log in `file` at `offset`, `size` bytes (SET_LOG_BASE), after checking the
    /// file holds it; replaces any earlier one.
    pub fn set_base(&self, file: OwnedFd, offset: u64, size: u64) -> Result<(), DirtyLogError> {
        if size == 0 || size > MAX_LOG_BYTES {
            return Err(DirtyLogError::BadSize(size));
        }
        let file = std::fs::File::from(file);
        let held = file.metadata().map_err(DirtyLogError::Stat)?.len();
        let needed = offset.checked_add(size).ok_or(DirtyLogError::BadSize(size))?;
        if needed > held {
            return Err(DirtyLogError::TooShort { offset, size, needed, held });
        }
        let region = MmapRegion::from_file(FileOffset::new(file, offset), size as usize).map_err(DirtyLogError::Map)?;
        let mut map = crate::write(&self.map);
        *map = Some(region);
        self.update_active(&map);
        Ok(())
    }

    /// Whether pages are being marked.
    pub fn is_logging(&self) -> bool {
        self.active.load(Ordering::Relaxed)
    }

    /// Marks the pages of `[addr, addr + len)`.
    pub fn mark(&self, addr: GuestAddress, len: u64) {
        if len == 0 || !self.is_logging() {
            return;
        }
        let map = crate::read(&self.map);
        let Some(region) = map.as_ref() else { return };
        let first = addr.0 / LOG_PAGE;
        let last = addr.0.saturating_add(len - 1) / LOG_PAGE;
        for page in first..=last {
            let byte = usize::try_from(page / 8).unwrap_or(usize::MAX);
            match region.get_atomic_ref::<AtomicU8>(byte) {
                Ok(cell) => {
                    cell.fetch_or(1 << (page % 8), Ordering::SeqCst);
                    self.marked.fetch_add(1, Ordering::Relaxed);
                }
                Err(_) => {
                    if self.outside.fetch_add(1, Ordering::Relaxed) == 0 {
                        warn!(
                            "a write at page {page:#x} lies past the dirty log's end (further ones are only counted)"
                        );
                    }
                }
            }
        }
    }

    /// Pages marked so far (each time one was written).
    pub fn marked(&self) -> u64 {
        self.marked.load(Ordering::Relaxed)
    }
}

/// The services a device's hooks reach: the dirty log, then whatever is attached.
pub struct CoreServices {
    /// The connection's dirty log.
    pub dirty: std::sync::Arc<DirtyLog>,
    /// The attached services.
    pub attached: std::sync::Arc<dyn QueueServices>,
}

impl QueueServices for CoreServices {
    fn admit(&self, work: &Work) -> Verdict {
        self.attached.admit(work)
    }

    fn completed(&self, completion: &Completion) {
        self.attached.completed(completion);
    }

    fn guest_written(&self, addr: GuestAddress, len: u64) {
        self.dirty.mark(addr, len);
        self.attached.guest_written(addr, len);
    }

    fn throttle(&self, works: &[Work], now: std::time::Instant) -> Option<(usize, std::time::Duration)> {
        self.attached.throttle(works, now)
    }

    fn completed_batch(&self, completions: &[Completion]) {
        self.attached.completed_batch(completions);
    }

    fn taken(&self, queue: usize, count: usize) {
        self.attached.taken(queue, count);
    }

    fn throttles(&self) -> bool {
        self.attached.throttles()
    }

    fn kicked(&self, queue: usize) {
        self.attached.kicked(queue);
    }

    fn notified(&self, queue: usize) {
        self.attached.notified(queue);
    }

    fn polled(&self, queue: usize, time: std::time::Duration) {
        self.attached.polled(queue, time);
    }

    fn is_active(&self) -> bool {
        self.dirty.is_logging() || self.attached.is_active()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    fn log_file(bytes: u64) -> std::fs::File {
        let file = tempfile::tempfile().unwrap();
        file.set_len(bytes).unwrap();
        file
    }

    fn bits(file: &std::fs::File) -> Vec<u8> {
        use std::os::unix::fs::FileExt;
        let mut out = vec![0u8; file.metadata().unwrap().len() as usize];
        file.read_exact_at(&mut out, 0).unwrap();
        out
    }

    #[test]
    fn pages_written_while_logging_are_marked_and_nothing_else() {
        let log = DirtyLog::new();
        let file = log_file(64);
        log.mark(GuestAddress(0), 4096);
        log.set_base(file.as_fd().try_clone_to_owned().unwrap(), 0, 64).unwrap();
        log.mark(GuestAddress(0x1000), 1);
        assert_eq!(bits(&file), vec![0; 64], "nothing is marked before LOG_ALL");
        log.set_log_all(true);
        log.mark(GuestAddress(0x1fff), 2); // pages 1 and 2
        log.mark(GuestAddress(0x9000), 0x1000); // page 9
        log.mark(GuestAddress(0x10_0000 * 16), 8); // page 4096: past a 64-byte log, counted
        let got = bits(&file);
        assert_eq!((got[0], got[1]), (0b0000_0110, 0b0000_0010));
        assert!(got[2..].iter().all(|b| *b == 0));
        assert_eq!(log.marked(), 3);
        log.set_log_all(false);
        log.mark(GuestAddress(0x3000), 1);
        assert_eq!(bits(&file)[0], 0b0000_0110, "a cleared LOG_ALL stops logging");
    }

    #[test]
    fn a_log_larger_than_its_file_or_empty_is_refused() {
        let log = DirtyLog::new();
        let file = log_file(4096);
        let fd = || file.as_fd().try_clone_to_owned().unwrap();
        assert!(matches!(log.set_base(fd(), 0, 8192), Err(DirtyLogError::TooShort { held: 4096, .. })));
        assert!(matches!(log.set_base(fd(), 4000, 200), Err(DirtyLogError::TooShort { .. })));
        assert!(matches!(log.set_base(fd(), u64::MAX, 2), Err(DirtyLogError::BadSize(2))));
        assert!(matches!(log.set_base(fd(), 0, 0), Err(DirtyLogError::BadSize(0))));
        log.set_log_all(true);
        assert!(!log.is_logging(), "no log was taken");
    }
}
