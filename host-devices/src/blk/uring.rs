//! The io_uring engine: every read and write popped from one queue notification is submitted
//! to that queue's own ring at once, so a guest's queue depth becomes the disk's queue depth.
//!
//! Except where io_uring cannot help: for buffered I/O on a file that cannot do a direction
//! without blocking (no RWF_NOWAIT: tmpfs reads and writes, ext4 buffered writes), io_uring
//! hands every such request to a kernel worker thread, which costs more than the copy itself
//! (measured here: 4 KiB writes at queue depth 1 on ext4 2.4x slower than pwrite, tmpfs reads
//! 3.7x). Those requests are done inline, with pread/pwrite in the queue's thread; the engine
//! probes each direction when it opens the image.

use super::engine::{BlockEngine, EngineError, RwOp, SyncEngine};
use io_uring::{IoUring, opcode, types};
use std::io;
use std::os::unix::io::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::sync::Mutex;
use vm_memory::VolatileSlice;
use vm_memory::bitmap::BitmapSlice;

/// Entries per ring (and most requests submitted in one go).
const RING_ENTRIES: u32 = 256;

/// Which directions are done inline instead of through the ring.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InlinePolicy {
    /// Reads with pread.
    pub reads: bool,
    /// Writes with pwrite.
    pub writes: bool,
}

impl InlinePolicy {
    /// Everything through the ring.
    pub const NEVER: InlinePolicy = InlinePolicy { reads: false, writes: false };
    /// Everything inline.
    pub const ALWAYS: InlinePolicy = InlinePolicy { reads: true, writes: true };

    fn applies(self, op_writes: bool) -> bool {
        if op_writes { self.writes } else { self.reads }
    }

    /// What suits the image open as `fd` at `path`: a direction goes inline when a one-byte
    /// RWF_NOWAIT transfer is refused with EOPNOTSUPP. Reads are probed on the image itself
    /// (one byte at offset 0, nothing changes); writes on a scratch O_TMPFILE in the image's
    /// directory (same filesystem), never on the image. Nothing goes inline with O_DIRECT,
    /// where io_uring is truly asynchronous, or when a probe cannot be made.
    pub fn probe(fd: i32, path: &str, read_only: bool, direct: bool) -> InlinePolicy {
        if direct {
            return InlinePolicy::NEVER;
        }
        let refused = |fd: i32, write: bool| {
            let mut byte = [0u8; 1];
            let iov = libc::iovec { iov_base: byte.as_mut_ptr().cast(), iov_len: 1 };
            // SAFETY: one iovec over `byte`, valid for the call; the kernel reads or writes at
            // most one byte there.
            let ret = unsafe {
                if write {
                    libc::pwritev2(fd, &iov, 1, 0, libc::RWF_NOWAIT)
                } else {
                    libc::preadv2(fd, &iov, 1, 0, libc::RWF_NOWAIT)
                }
            };
            ret < 0 && io::Error::last_os_error().raw_os_error() == Some(libc::EOPNOTSUPP)
        };
        let reads = refused(fd, false);
        let is_file = std::fs::metadata(path).is_ok_and(|m| m.is_file());
        let writes = !read_only && is_file && {
            let dir = Path::new(path).parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
            match std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()) {
                Ok(dir) => {
                    // SAFETY: opens an unnamed temporary file; `dir` is a valid C string.
                    let tmp = unsafe { libc::open(dir.as_ptr(), libc::O_TMPFILE | libc::O_RDWR, 0o600) };
                    if tmp < 0 {
                        false
                    } else {
                        // SAFETY: `tmp` was just opened and is owned by nothing else.
                        let tmp = unsafe { OwnedFd::from_raw_fd(tmp) };
                        refused(tmp.as_raw_fd(), true)
                    }
                }
                Err(_) => false,
            }
        };
        InlinePolicy { reads, writes }
    }
}

/// Reads and writes through io_uring (or inline, see [`InlinePolicy`]); flush, discard and
/// write-zeroes through the sync engine.
pub struct UringEngine {
    sync: SyncEngine,
    rings: Vec<Mutex<IoUring>>,
    inline: InlinePolicy,
}

impl UringEngine {
    /// Opens `path` like [`SyncEngine::open`] and creates one ring per queue. Fails when the
    /// kernel refuses io_uring.
    pub fn open(path: &str, read_only: bool, direct: bool, queues: u16) -> Result<UringEngine, EngineError> {
        let sync = SyncEngine::open(path, read_only, direct)?;
        let rings = (0..queues)
            .map(|_| IoUring::new(RING_ENTRIES).map(Mutex::new))
            .collect::<io::Result<Vec<_>>>()
            .map_err(EngineError::Uring)?;
        let inline = InlinePolicy::probe(sync.as_raw_fd(), path, read_only, direct);
        if inline != InlinePolicy::NEVER {
            log::info!(
                "io_uring: {path}: {} done inline (this filesystem cannot do them without blocking, and io_uring would hand each to a kernel worker thread)",
                match (inline.reads, inline.writes) {
                    (true, true) => "reads and writes",
                    (true, false) => "reads",
                    _ => "writes",
                }
            );
        }
        Ok(UringEngine { sync, rings, inline })
    }

    /// Replaces the probed policy (tests, or a caller that knows better).
    pub fn with_inline(mut self, inline: InlinePolicy) -> UringEngine {
        self.inline = inline;
        self
    }

    /// The policy in force.
    pub fn inline(&self) -> InlinePolicy {
        self.inline
    }

    /// Runs the operations of `ops` that go through the ring (not [`InlinePolicy`]'s), each
    /// result into `results` at its position; the others' results are left alone.
    fn submit_chunk<B: BitmapSlice>(&self, ring: &mut IoUring, ops: &[RwOp<'_, B>], results: &mut [io::Result<()>]) {
        let fd = types::Fd(self.sync.as_raw_fd());
        // The iovec arrays must stay where they are until every completion is reaped below.
        let iovecs: Vec<Vec<libc::iovec>> = ops
            .iter()
            .map(|op| {
                if self.inline.applies(op.write) {
                    return Vec::new();
                }
                op.bufs
                    .iter()
                    .map(|s| libc::iovec { iov_base: s.ptr_guard_mut().as_ptr().cast(), iov_len: s.len() })
                    .collect()
            })
            .collect();
        let mut submitted = 0usize;
        for (i, (op, iov)) in ops.iter().zip(&iovecs).enumerate() {
            if self.inline.applies(op.write) {
                continue;
            }
            let Ok(count) = u32::try_from(iov.len()) else {
                results[i] = Err(io::Error::from(io::ErrorKind::InvalidInput));
                continue;
            };
            let entry = if op.write {
                opcode::Writev::new(fd, iov.as_ptr(), count).offset(op.offset).build()
            } else {
                opcode::Readv::new(fd, iov.as_ptr(), count).offset(op.offset).build()
            };
            // SAFETY: the iovecs point into guest memory slices that `ops` borrows and into
            // `iovecs`; both outlive this function, which reaps every submitted entry before
            // returning. The chunk is never larger than the ring, so the push cannot overflow.
            if unsafe { ring.submission().push(&entry.user_data(i as u64)) }.is_err() {
                results[i] = Err(io::Error::other("io_uring submission queue full"));
                continue;
            }
            submitted += 1;
        }
        let mut reaped = 0usize;
        while reaped < submitted {
            if let Err(e) = ring.submit_and_wait(submitted - reaped) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                // The kernel did not take the entries: nothing of ours is in flight any more
                // only if it never got them, so fail them all and drain what it did take.
                for r in results.iter_mut() {
                    *r = Err(io::Error::new(e.kind(), e.to_string()));
                }
                while reaped < submitted {
                    if ring.submit_and_wait(1).is_err() {
                        break;
                    }
                    reaped += ring.completion().count();
                }
                return;
            }
            for cqe in ring.completion() {
                reaped += 1;
                let i = cqe.user_data() as usize;
                let Some(op) = ops.get(i) else { continue };
                let expected: usize = op.bufs.iter().map(|b| b.len()).sum();
                results[i] = match cqe.result() {
                    r if r < 0 => Err(io::Error::from_raw_os_error(-r)),
                    r if r as usize == expected => Ok(()),
                    r => self.finish_short(op, r as usize),
                };
            }
        }
    }

    /// Completes a short transfer synchronously.
    fn finish_short<B: BitmapSlice>(&self, op: &RwOp<'_, B>, done: usize) -> io::Result<()> {
        let mut skip = done;
        let mut rest: Vec<VolatileSlice<'_, B>> = Vec::new();
        for buf in &op.bufs {
            if skip >= buf.len() {
                skip -= buf.len();
                continue;
            }
            rest.push(buf.offset(skip).map_err(io::Error::other)?);
            skip = 0;
        }
        let offset = op.offset + done as u64;
        if op.write { self.sync.write(offset, &rest) } else { self.sync.read(offset, &rest) }
    }
}

impl BlockEngine for UringEngine {
    fn size(&self) -> u64 {
        self.sync.size()
    }
    fn read<B: BitmapSlice>(&self, offset: u64, bufs: &[VolatileSlice<'_, B>]) -> io::Result<()> {
        self.sync.read(offset, bufs)
    }
    fn write<B: BitmapSlice>(&self, offset: u64, bufs: &[VolatileSlice<'_, B>]) -> io::Result<()> {
        self.sync.write(offset, bufs)
    }
    fn flush(&self) -> io::Result<()> {
        self.sync.flush()
    }
    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.sync.discard(offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> io::Result<()> {
        self.sync.write_zeroes(offset, len, unmap)
    }
    fn rw_batch<B: BitmapSlice>(&self, queue: usize, ops: &[RwOp<'_, B>]) -> Vec<io::Result<()>> {
        let Some(ring) = self.rings.get(queue) else {
            return ops.iter().map(|op| op.run_sync(self)).collect();
        };
        let mut results: Vec<io::Result<()>> = ops.iter().map(|_| Ok(())).collect();
        if ops.iter().any(|op| !self.inline.applies(op.write)) {
            let mut ring = ring.lock().unwrap_or_else(|p| p.into_inner());
            for (chunk, out) in ops.chunks(RING_ENTRIES as usize).zip(results.chunks_mut(RING_ENTRIES as usize)) {
                self.submit_chunk(&mut ring, chunk, out);
            }
        }
        for (op, result) in ops.iter().zip(results.iter_mut()) {
            if self.inline.applies(op.write) {
                // The sync engine marks what it reads dirty itself.
                *result = op.run_sync(&self.sync);
            } else if !op.write && result.is_ok() {
                for buf in &op.bufs {
                    buf.bitmap().mark_dirty(0, buf.len());
                }
            }
        }
        results
    }
}
