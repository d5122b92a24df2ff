//! I/O engines: what actually reads and writes the disk.
//!
//! Requests arrive checked (see `request`), with their data as guest-memory slices, so an
//! engine moves bytes between the disk and guest memory without an intermediate copy.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use vm_memory::VolatileSlice;
use vm_memory::bitmap::BitmapSlice;

/// Errors from opening a disk.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The image could not be opened.
    #[error("cannot open {path}: {source}")]
    Open {
        /// The path.
        path: String,
        /// Why.
        source: io::Error,
    },
    /// Its size could not be found.
    #[error("cannot find the size of {path}: {source}")]
    Size {
        /// The path.
        path: String,
        /// Why.
        source: io::Error,
    },
    /// The kernel refused io_uring.
    #[error("io_uring is not available: {0}")]
    Uring(io::Error),
    /// A size that is not a multiple of the sector size, or zero.
    #[error("disk size {0} is not a positive multiple of 512 bytes")]
    BadSize(u64),
}

/// What a disk supports beyond reads and writes: the device offers the guest only these.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capabilities {
    /// Flushing makes writes durable (without it, writes are durable when done).
    pub flush: bool,
    /// Discarding.
    pub discard: bool,
    /// Zeroing ranges.
    pub write_zeroes: bool,
    /// The disk refuses writes whatever the guest is told.
    pub read_only: bool,
}

impl Capabilities {
    /// Everything, writable.
    pub const ALL: Capabilities = Capabilities { flush: true, discard: true, write_zeroes: true, read_only: false };
}

/// The operations the device needs from a disk.
pub trait BlockEngine: Send + Sync {
    /// Disk size in bytes.
    fn size(&self) -> u64;
    /// What the disk supports beyond reads and writes.
    fn capabilities(&self) -> Capabilities {
        Capabilities::ALL
    }
    /// Lets go of the disk at exit, once no request is in flight (a network disk releases its
    /// locks, so the next owner need not wait for them to time out). Later requests fail.
    fn close(&self) {}
    /// Reads into `bufs`, in order, starting at byte `offset`.
    fn read<B: BitmapSlice>(&self, offset: u64, bufs: &[VolatileSlice<'_, B>]) -> io::Result<()>;
    /// Writes `bufs`, in order, starting at byte `offset`.
    fn write<B: BitmapSlice>(&self, offset: u64, bufs: &[VolatileSlice<'_, B>]) -> io::Result<()>;
    /// Makes completed writes durable.
    fn flush(&self) -> io::Result<()>;
    /// Deallocates a byte range (its contents become zeros).
    fn discard(&self, offset: u64, len: u64) -> io::Result<()>;
    /// Zeroes a byte range; with `unmap` it may be deallocated.
    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> io::Result<()>;
    /// Runs a batch of reads and writes popped from queue `queue`, returning one result per
    /// operation. Engines that can overlap them (io_uring) override this.
    fn rw_batch<B: BitmapSlice>(&self, _queue: usize, ops: &[RwOp<'_, B>]) -> Vec<io::Result<()>>
    where
        Self: Sized,
    {
        ops.iter().map(|op| op.run_sync(self)).collect()
    }
}

/// One read or write of a batch.
pub struct RwOp<'a, B> {
    /// Whether it writes (else reads).
    pub write: bool,
    /// Byte offset on the disk.
    pub offset: u64,
    /// Guest memory, in order.
    pub bufs: Vec<VolatileSlice<'a, B>>,
}

impl<B: BitmapSlice> RwOp<'_, B> {
    /// Runs the operation with `engine`'s one-at-a-time methods.
    pub fn run_sync<E: BlockEngine>(&self, engine: &E) -> io::Result<()> {
        if self.write { engine.write(self.offset, &self.bufs) } else { engine.read(self.offset, &self.bufs) }
    }
}

/// Synchronous positioned I/O (`pread`/`pwrite`) on a file or block device.
pub struct SyncEngine {
    file: File,
    size: u64,
}

impl SyncEngine {
    /// Opens `path` for reading (and writing unless `read_only`); `direct` adds O_DIRECT.
    pub fn open(path: &str, read_only: bool, direct: bool) -> Result<SyncEngine, EngineError> {
        use std::os::unix::fs::OpenOptionsExt;
        let mut options = std::fs::OpenOptions::new();
        options.read(true).write(!read_only);
        if direct {
            options.custom_flags(libc::O_DIRECT);
        }
        let file = options.open(path).map_err(|source| EngineError::Open { path: path.to_string(), source })?;
        // Works for regular files and block devices alike.
        let size = io::Seek::seek(&mut &file, io::SeekFrom::End(0))
            .map_err(|source| EngineError::Size { path: path.to_string(), source })?;
        if size == 0 || size % 512 != 0 {
            return Err(EngineError::BadSize(size));
        }
        Ok(SyncEngine { file, size })
    }

    fn fallocate(&self, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
        let (Ok(offset), Ok(len)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) else {
            return Err(io::Error::from(io::ErrorKind::InvalidInput));
        };
        // SAFETY: fallocate only reads its integer arguments; the descriptor is owned by self.
        let ret = unsafe { libc::fallocate(self.file.as_raw_fd(), mode, offset, len) };
        if ret == 0 { Ok(()) } else { Err(io::Error::last_os_error()) }
    }

    fn write_zero_bytes(&self, mut offset: u64, len: u64) -> io::Result<()> {
        let zeros = vec![0u8; len.min(1 << 20) as usize];
        let end = offset + len;
        while offset < end {
            let n = (end - offset).min(zeros.len() as u64) as usize;
            self.file.write_all_at(&zeros[..n], offset)?;
            offset += n as u64;
        }
        Ok(())
    }
}

/// Runs `op` on each slice's raw memory, advancing the disk offset; retries short transfers.
fn for_each_slice<B: BitmapSlice>(
    mut offset: u64,
    bufs: &[VolatileSlice<'_, B>],
    mut op: impl FnMut(*mut u8, usize, u64) -> io::Result<usize>,
) -> io::Result<()> {
    for slice in bufs {
        let guard = slice.ptr_guard_mut();
        let base = guard.as_ptr();
        let mut done = 0usize;
        while done < slice.len() {
            // SAFETY: `base .. base + slice.len()` is the slice's mapped guest memory, kept alive
            // by `guard`; `done < slice.len()` keeps the pointer inside it.
            let ptr = unsafe { base.add(done) };
            match op(ptr, slice.len() - done, offset) {
                Ok(0) => return Err(io::Error::from(io::ErrorKind::UnexpectedEof)),
                Ok(n) => {
                    done += n;
                    offset += n as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }
    Ok(())
}

fn syscall_result(ret: isize) -> io::Result<usize> {
    if ret < 0 { Err(io::Error::last_os_error()) } else { Ok(ret as usize) }
}

impl BlockEngine for SyncEngine {
    fn size(&self) -> u64 {
        self.size
    }

    fn read<B: BitmapSlice>(&self, offset: u64, bufs: &[VolatileSlice<'_, B>]) -> io::Result<()> {
        let fd = self.file.as_raw_fd();
        for_each_slice(offset, bufs, |ptr, len, off| {
            // SAFETY: `ptr .. ptr + len` is writable guest memory (see for_each_slice); the
            // kernel writes at most `len` bytes there.
            syscall_result(unsafe { libc::pread(fd, ptr.cast(), len, off as libc::off_t) })
        })?;
        for slice in bufs {
            slice.bitmap().mark_dirty(0, slice.len());
        }
        Ok(())
    }

    fn write<B: BitmapSlice>(&self, offset: u64, bufs: &[VolatileSlice<'_, B>]) -> io::Result<()> {
        let fd = self.file.as_raw_fd();
        for_each_slice(offset, bufs, |ptr, len, off| {
            // SAFETY: `ptr .. ptr + len` is readable guest memory (see for_each_slice).
            syscall_result(unsafe { libc::pwrite(fd, ptr.cast_const().cast(), len, off as libc::off_t) })
        })
    }

    fn flush(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.fallocate(libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE, offset, len)
    }

    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> io::Result<()> {
        let mode =
            if unmap { libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE } else { libc::FALLOC_FL_ZERO_RANGE };
        match self.fallocate(mode, offset, len) {
            Ok(()) => Ok(()),
            Err(e) if matches!(e.raw_os_error(), Some(libc::EOPNOTSUPP) | Some(libc::ENODEV)) => {
                self.write_zero_bytes(offset, len)
            }
            Err(e) => Err(e),
        }
    }
}

/// Fills `slice` with zeros: a memset, half the memory traffic of copying a buffer of zeros
/// (which was a quarter of the null engine's time at queue depth 32).
fn zero_fill<B: BitmapSlice>(slice: &VolatileSlice<'_, B>) {
    let guard = slice.ptr_guard_mut();
    // SAFETY: a VolatileSlice covers `len()` bytes of mapped memory for as long as it lives,
    // and the guard keeps its pointer valid for writes of that many bytes; bytes need no
    // alignment. Guest memory is shared with the frontend, which may read it concurrently as it
    // may during any copy into it; the bytes it sees are zeros or what was there.
    unsafe { std::ptr::write_bytes(guard.as_ptr(), 0, slice.len()) };
    slice.bitmap().mark_dirty(0, slice.len());
}

/// Completes reads with zeros and drops writes: measures the virtio path alone.
pub struct NullEngine {
    size: u64,
}

impl NullEngine {
    /// A null disk of `size` bytes.
    pub fn new(size: u64) -> Result<NullEngine, EngineError> {
        if size == 0 || !size.is_multiple_of(512) {
            return Err(EngineError::BadSize(size));
        }
        Ok(NullEngine { size })
    }
}

impl BlockEngine for NullEngine {
    fn size(&self) -> u64 {
        self.size
    }
    fn read<B: BitmapSlice>(&self, _offset: u64, bufs: &[VolatileSlice<'_, B>]) -> io::Result<()> {
        bufs.iter().for_each(zero_fill);
        Ok(())
    }
    fn write<B: BitmapSlice>(&self, _offset: u64, _bufs: &[VolatileSlice<'_, B>]) -> io::Result<()> {
        Ok(())
    }
    fn flush(&self) -> io::Result<()> {
        Ok(())
    }
    fn discard(&self, _offset: u64, _len: u64) -> io::Result<()> {
        Ok(())
    }
    fn write_zeroes(&self, _offset: u64, _len: u64, _unmap: bool) -> io::Result<()> {
        Ok(())
    }
}

impl AsRawFd for SyncEngine {
    fn as_raw_fd(&self) -> std::os::unix::io::RawFd {
        self.file.as_raw_fd()
    }
}

/// The engine chosen on the command line.
pub enum Engine {
    /// io_uring.
    Uring(super::uring::UringEngine),
    /// pread/pwrite.
    Sync(SyncEngine),
    /// Zeros and drops.
    Null(NullEngine),
    /// A qcow2 image (imago).
    Qcow2(super::qcow2::Qcow2Engine),
    /// An export on an NBD server.
    Nbd(super::nbd::NbdEngine),
    /// An image in a Ceph cluster.
    Rbd(super::rbd::RbdEngine),
}

impl Engine {
    /// The engine's name.
    pub fn name(&self) -> &'static str {
        match self {
            Engine::Uring(_) => "io_uring",
            Engine::Sync(_) => "sync",
            Engine::Null(_) => "null",
            Engine::Qcow2(_) => "qcow2",
            Engine::Nbd(_) => "nbd",
            Engine::Rbd(_) => "rbd",
        }
    }
}

macro_rules! dispatch {
    ($self:ident, $e:ident => $body:expr) => {
        match $self {
            Engine::Uring($e) => $body,
            Engine::Sync($e) => $body,
            Engine::Null($e) => $body,
            Engine::Qcow2($e) => $body,
            Engine::Nbd($e) => $body,
            Engine::Rbd($e) => $body,
        }
    };
}

impl BlockEngine for Engine {
    fn size(&self) -> u64 {
        dispatch!(self, e => e.size())
    }
    fn capabilities(&self) -> Capabilities {
        dispatch!(self, e => e.capabilities())
    }
    fn close(&self) {
        dispatch!(self, e => e.close())
    }
    fn read<B: BitmapSlice>(&self, offset: u64, bufs: &[VolatileSlice<'_, B>]) -> io::Result<()> {
        dispatch!(self, e => e.read(offset, bufs))
    }
    fn write<B: BitmapSlice>(&self, offset: u64, bufs: &[VolatileSlice<'_, B>]) -> io::Result<()> {
        dispatch!(self, e => e.write(offset, bufs))
    }
    fn flush(&self) -> io::Result<()> {
        dispatch!(self, e => e.flush())
    }
    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        dispatch!(self, e => e.discard(offset, len))
    }
    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> io::Result<()> {
        dispatch!(self, e => e.write_zeroes(offset, len, unmap))
    }
    fn rw_batch<B: BitmapSlice>(&self, queue: usize, ops: &[RwOp<'_, B>]) -> Vec<io::Result<()>> {
        dispatch!(self, e => e.rw_batch(queue, ops))
    }
}
