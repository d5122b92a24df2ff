//! A vhost-user-blk frontend and virtio-blk driver nobody here wrote: libblkio (crate `blkio`,
//! driver `virtio-blk-vhost-user`), wrapped in a small synchronous API for tests.

use blkio::{Blkio, Blkioq, Completion, MemoryRegion, ReqFlags};
use std::mem::MaybeUninit;
use std::path::Path;
use std::time::Duration;

/// Errors from the libblkio client.
#[derive(Debug, thiserror::Error)]
pub enum BlkioError {
    /// Connecting or starting failed.
    #[error("libblkio {step}: {message}")]
    Setup {
        /// Which step.
        step: &'static str,
        /// libblkio's message.
        message: String,
    },
    /// A request completed with an error (`ret` is a negative errno).
    #[error("{op} failed with {ret}")]
    Request {
        /// Which operation.
        op: &'static str,
        /// The completion's return value.
        ret: i32,
    },
    /// A request larger than the client's buffer, or a queue that does not exist.
    #[error("{0}")]
    Usage(String),
}

fn setup(step: &'static str) -> impl FnOnce(blkio::Error) -> BlkioError {
    move |e| BlkioError::Setup { step, message: e.message().to_string() }
}

/// A connected, started libblkio instance with one buffer region mapped.
pub struct BlkioClient {
    // Field order matters: queues go before the instance that owns the region.
    queues: Vec<Blkioq>,
    region: MemoryRegion,
    blkio: Blkio,
}

/// Size of the client's I/O buffer: the largest single transfer.
pub const BUFFER_SIZE: usize = 1 << 20;

impl BlkioClient {
    /// Connects to the vhost-user-blk backend at `socket` with `num_queues` queues.
    pub fn connect(socket: &Path, num_queues: u16) -> Result<BlkioClient, BlkioError> {
        Self::connect_with(socket, num_queues, false)
    }

    /// Like [`BlkioClient::connect`]; `read_only` must be true for a read-only device
    /// (libblkio refuses to start read-write on one).
    pub fn connect_with(socket: &Path, num_queues: u16, read_only: bool) -> Result<BlkioClient, BlkioError> {
        let mut blkio = Blkio::new("virtio-blk-vhost-user").map_err(setup("new"))?;
        blkio.set_str("path", &socket.to_string_lossy()).map_err(setup("set path"))?;
        blkio.set_bool("read-only", read_only).map_err(setup("set read-only"))?;
        // A peer (qemu-storage-daemon) may show its socket a moment before it listens.
        let mut attempts = 0;
        while let Err(e) = blkio.connect() {
            attempts += 1;
            if attempts >= 50 || !e.to_string().contains("refused") {
                return Err(setup("connect")(e));
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        blkio.set_i32("num-queues", num_queues.into()).map_err(setup("set num-queues"))?;
        let started = blkio.start().map_err(setup("start"))?;
        let region = blkio.alloc_mem_region(BUFFER_SIZE).map_err(setup("alloc_mem_region"))?;
        blkio.map_mem_region(&region).map_err(setup("map_mem_region"))?;
        Ok(BlkioClient { queues: started.queues, region, blkio })
    }

    /// Disk size in bytes.
    pub fn capacity(&self) -> Result<u64, BlkioError> {
        self.blkio.get_u64("capacity").map_err(setup("get capacity"))
    }

    /// Whether the device is read-only.
    pub fn read_only(&self) -> Result<bool, BlkioError> {
        self.blkio.get_bool("read-only").map_err(setup("get read-only"))
    }

    fn buffer(&self, len: usize) -> Result<*mut u8, BlkioError> {
        if len > self.region.len {
            return Err(BlkioError::Usage(format!("{len} bytes exceed the {}-byte buffer", self.region.len)));
        }
        Ok(self.region.addr as *mut u8)
    }

    fn queue(&mut self, queue: usize) -> Result<&mut Blkioq, BlkioError> {
        let count = self.queues.len();
        self.queues.get_mut(queue).ok_or_else(|| BlkioError::Usage(format!("queue {queue} of {count}")))
    }

    fn complete(&mut self, queue: usize, op: &'static str) -> Result<(), BlkioError> {
        let q = self.queue(queue)?;
        let mut completions = [const { MaybeUninit::<Completion>::uninit() }; 1];
        let mut timeout = Duration::from_secs(10);
        let n = q.do_io(&mut completions, 1, Some(&mut timeout), None).map_err(setup("do_io"))?;
        if n != 1 {
            return Err(BlkioError::Request { op, ret: -libc::ETIMEDOUT });
        }
        // SAFETY: do_io initialised the first `n` (= 1) completions.
        let completion = unsafe { completions[0].assume_init_read() };
        if completion.ret < 0 { Err(BlkioError::Request { op, ret: completion.ret }) } else { Ok(()) }
    }

    /// Writes `data` at byte `offset` through `queue` and waits for it.
    pub fn write(&mut self, queue: usize, offset: u64, data: &[u8]) -> Result<(), BlkioError> {
        let buf = self.buffer(data.len())?;
        // SAFETY: `buf` is the start of the mapped region of BUFFER_SIZE bytes, and `buffer`
        // checked that `data` fits; no request is in flight while we copy.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), buf, data.len()) };
        self.queue(queue)?.write(offset, buf, data.len(), 0, ReqFlags::empty());
        self.complete(queue, "write")
    }

    /// Reads `len` bytes at byte `offset` through `queue`.
    pub fn read(&mut self, queue: usize, offset: u64, len: usize) -> Result<Vec<u8>, BlkioError> {
        let buf = self.buffer(len)?;
        self.queue(queue)?.read(offset, buf, len, 0, ReqFlags::empty());
        self.complete(queue, "read")?;
        let mut out = vec![0u8; len];
        // SAFETY: the read completed into `buf .. buf + len`, inside the mapped region.
        unsafe { std::ptr::copy_nonoverlapping(buf, out.as_mut_ptr(), len) };
        Ok(out)
    }

    /// Flushes through `queue`.
    pub fn flush(&mut self, queue: usize) -> Result<(), BlkioError> {
        self.queue(queue)?.flush(0, ReqFlags::empty());
        self.complete(queue, "flush")
    }

    /// Discards a byte range.
    pub fn discard(&mut self, queue: usize, offset: u64, len: u64) -> Result<(), BlkioError> {
        self.queue(queue)?.discard(offset, len, 0, ReqFlags::empty());
        self.complete(queue, "discard")
    }

    /// Zeroes a byte range; `unmap` allows deallocation.
    pub fn write_zeroes(&mut self, queue: usize, offset: u64, len: u64, unmap: bool) -> Result<(), BlkioError> {
        let flags = if unmap { ReqFlags::empty() } else { ReqFlags::NO_UNMAP };
        self.queue(queue)?.write_zeroes(offset, len, 0, flags);
        self.complete(queue, "write-zeroes")
    }
}
