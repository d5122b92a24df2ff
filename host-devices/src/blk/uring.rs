//! The io_uring engine: every read and write popped from one queue notification is submitted
//! to that queue's own ring at once, so a guest's queue depth becomes the disk's queue depth.

use super::engine::{BlockEngine, EngineError, RwOp, SyncEngine};
use io_uring::{IoUring, opcode, types};
use std::io;
use std::os::unix::io::AsRawFd;
use std::sync::Mutex;
use vm_memory::VolatileSlice;
use vm_memory::bitmap::BitmapSlice;

/// Entries per ring (and most requests submitted in one go).
const RING_ENTRIES: u32 = 256;

/// Reads and writes through io_uring; flush, discard and write-zeroes through the sync engine.
pub struct UringEngine {
    sync: SyncEngine,
    rings: Vec<Mutex<IoUring>>,
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
        Ok(UringEngine { sync, rings })
    }

    fn submit_chunk<B: BitmapSlice>(&self, ring: &mut IoUring, ops: &[RwOp<'_, B>], results: &mut [io::Result<()>]) {
        let fd = types::Fd(self.sync.as_raw_fd());
        // The iovec arrays must stay where they are until every completion is reaped below.
        let iovecs: Vec<Vec<libc::iovec>> = ops
            .iter()
            .map(|op| {
                op.bufs
                    .iter()
                    .map(|s| libc::iovec { iov_base: s.ptr_guard_mut().as_ptr().cast(), iov_len: s.len() })
                    .collect()
            })
            .collect();
        let mut submitted = 0usize;
        for (i, (op, iov)) in ops.iter().zip(&iovecs).enumerate() {
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
        let mut ring = ring.lock().unwrap_or_else(|p| p.into_inner());
        let mut results: Vec<io::Result<()>> = ops.iter().map(|_| Ok(())).collect();
        for (chunk, out) in ops.chunks(RING_ENTRIES as usize).zip(results.chunks_mut(RING_ENTRIES as usize)) {
            self.submit_chunk(&mut ring, chunk, out);
        }
        for (op, result) in ops.iter().zip(&results) {
            if !op.write && result.is_ok() {
                for buf in &op.bufs {
                    buf.bitmap().mark_dirty(0, buf.len());
                }
            }
        }
        results
    }
}
