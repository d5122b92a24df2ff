//! Disks in a Ceph cluster (`--rbd POOL/IMAGE[@SNAP]`), through librbd's asynchronous calls:
//! every read and write of a queue's batch is started at once and then waited for, straight
//! between the cluster and guest memory (librbd's vectored calls take the guest's buffers).
//! The libraries are loaded at run time (`ffi.rs`), so pvkit needs Ceph only to use it.

pub mod ffi;

use super::engine::{BlockEngine, Capabilities, RwOp};
use ffi::{Image, Pending};
use std::io;
use std::sync::RwLock;
use vm_memory::VolatileSlice;
use vm_memory::bitmap::BitmapSlice;
use vm_memory::volatile_memory::PtrGuardMut;

/// Why the image could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum RbdError {
    /// Not POOL/IMAGE or POOL/IMAGE@SNAP.
    #[error("'{0}' is not POOL/IMAGE or POOL/IMAGE@SNAP")]
    Spec(String),
    /// The libraries are missing.
    #[error(transparent)]
    Load(#[from] ffi::LoadError),
    /// Connecting or opening failed.
    #[error("cannot open rbd image {spec}: {source}")]
    Open {
        /// The image.
        spec: String,
        /// librados' or librbd's error.
        source: io::Error,
    },
    /// A size that is not a positive multiple of 512 bytes.
    #[error("rbd image {spec}: its size {size} is not a positive multiple of 512 bytes")]
    Size {
        /// The image.
        spec: String,
        /// Its size.
        size: u64,
    },
}

/// An image named on the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RbdSpec {
    /// The pool.
    pub pool: String,
    /// The image.
    pub image: String,
    /// A snapshot (served read-only).
    pub snap: Option<String>,
}

impl std::str::FromStr for RbdSpec {
    type Err = RbdError;

    fn from_str(text: &str) -> Result<RbdSpec, RbdError> {
        let bad = || RbdError::Spec(text.to_string());
        let (pool, rest) = text.split_once('/').ok_or_else(bad)?;
        let (image, snap) = match rest.split_once('@') {
            Some((image, snap)) => (image, Some(snap)),
            None => (rest, None),
        };
        let fine = |s: &str| !s.is_empty() && !s.contains(['/', '@', '\0']);
        if !fine(pool) || !fine(image) || snap.is_some_and(|s| !fine(s)) {
            return Err(bad());
        }
        Ok(RbdSpec { pool: pool.into(), image: image.into(), snap: snap.map(Into::into) })
    }
}

impl std::fmt::Display for RbdSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.pool, self.image)?;
        if let Some(snap) = &self.snap {
            write!(f, "@{snap}")?;
        }
        Ok(())
    }
}

/// An RBD image served as the guest's disk.
pub struct RbdEngine {
    /// None once closed at exit.
    image: RwLock<Option<Image>>,
    size: u64,
    read_only: bool,
}

impl RbdEngine {
    /// Opens `spec` as Ceph client `id` with the configuration file `conf` (None: Ceph's
    /// default search); a snapshot, or `read_only`, opens it read-only.
    pub fn open(spec: &RbdSpec, conf: Option<&str>, id: &str, read_only: bool) -> Result<RbdEngine, RbdError> {
        let api = ffi::Api::load()?;
        let read_only = read_only || spec.snap.is_some();
        let err = |source| RbdError::Open { spec: spec.to_string(), source };
        let image =
            Image::open(api, conf, id, &spec.pool, &spec.image, spec.snap.as_deref(), read_only).map_err(err)?;
        let size = image.size().map_err(err)?;
        if size == 0 || !size.is_multiple_of(512) {
            return Err(RbdError::Size { spec: spec.to_string(), size });
        }
        Ok(RbdEngine { image: RwLock::new(Some(image)), size, read_only })
    }

    /// Runs `f` on the open image (an error once it was closed).
    fn with_image<T>(&self, f: impl FnOnce(&Image) -> io::Result<T>) -> io::Result<T> {
        let image = self.image.read().unwrap_or_else(|poisoned| poisoned.into_inner());
        match image.as_ref() {
            Some(image) => f(image),
            None => Err(closed()),
        }
    }

    /// Starts a read or write of `bufs` at `offset` on `image`.
    fn start<'i, B: BitmapSlice>(
        image: &'i Image,
        write: bool,
        offset: u64,
        bufs: &[VolatileSlice<'_, B>],
    ) -> io::Result<Started<'i>> {
        let guards: Vec<_> = bufs.iter().map(|b| b.ptr_guard_mut()).collect();
        let iovecs: Vec<libc::iovec> = guards
            .iter()
            .zip(bufs)
            .map(|(guard, slice)| libc::iovec { iov_base: guard.as_ptr().cast(), iov_len: slice.len() })
            .collect();
        // SAFETY: each iovec is a guest-memory slice of its own length, kept mapped by `guards`;
        // `Started` holds the guards and the iovec array (librbd keeps a pointer to the array of
        // a vectored read) until the operation has been waited for, and the batch's caller keeps
        // the guest memory itself alive meanwhile.
        let pending = unsafe { if write { image.write(offset, &iovecs) } else { image.read(offset, &iovecs) } }?;
        Ok(Started { pending, _iovecs: iovecs, _guards: guards })
    }
}

fn closed() -> io::Error {
    io::Error::new(io::ErrorKind::NotConnected, "the rbd image was closed")
}

/// A read or write librbd has started, with what keeps its buffers mapped.
struct Started<'i> {
    /// Dropped first: dropping it waits for the operation.
    pending: Pending<'i>,
    /// The iovec array librbd may still read (its heap buffer does not move with the `Vec`).
    _iovecs: Vec<libc::iovec>,
    _guards: Vec<PtrGuardMut>,
}

impl BlockEngine for RbdEngine {
    fn size(&self) -> u64 {
        self.size
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities { read_only: self.read_only, ..Capabilities::ALL }
    }

    fn close(&self) {
        // Dropping the image closes it: librbd releases its exclusive lock and its watch.
        self.image.write().unwrap_or_else(|poisoned| poisoned.into_inner()).take();
    }

    fn read<B: BitmapSlice>(&self, offset: u64, bufs: &[VolatileSlice<'_, B>]) -> io::Result<()> {
        self.with_image(|image| Self::start(image, false, offset, bufs)?.pending.wait())?;
        for slice in bufs {
            slice.bitmap().mark_dirty(0, slice.len());
        }
        Ok(())
    }

    fn write<B: BitmapSlice>(&self, offset: u64, bufs: &[VolatileSlice<'_, B>]) -> io::Result<()> {
        self.with_image(|image| Self::start(image, true, offset, bufs)?.pending.wait())
    }

    fn flush(&self) -> io::Result<()> {
        self.with_image(|image| image.flush()?.wait())
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.with_image(|image| image.discard(offset, len)?.wait())
    }

    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> io::Result<()> {
        let flags = if unmap { 0 } else { ffi::WRITE_ZEROES_THICK };
        self.with_image(|image| image.write_zeroes(offset, len, flags)?.wait())
    }

    /// Every read and write of the batch started before the first is waited for.
    fn rw_batch<B: BitmapSlice>(&self, _queue: usize, ops: &[RwOp<'_, B>]) -> Vec<io::Result<()>> {
        let image = self.image.read().unwrap_or_else(|poisoned| poisoned.into_inner());
        let Some(image) = image.as_ref() else {
            return ops.iter().map(|_| Err(closed())).collect();
        };
        let started: Vec<io::Result<Started<'_>>> =
            ops.iter().map(|op| Self::start(image, op.write, op.offset, &op.bufs)).collect();
        started
            .into_iter()
            .zip(ops)
            .map(|(started, op)| {
                started?.pending.wait()?;
                if !op.write {
                    for slice in &op.bufs {
                        slice.bitmap().mark_dirty(0, slice.len());
                    }
                }
                Ok(())
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_specs_parse() {
        let plain: RbdSpec = "rbd/vm1".parse().unwrap();
        assert_eq!(plain, RbdSpec { pool: "rbd".into(), image: "vm1".into(), snap: None });
        let snap: RbdSpec = "pool/img@gold".parse().unwrap();
        assert_eq!(snap.snap.as_deref(), Some("gold"));
        assert_eq!(snap.to_string(), "pool/img@gold");
        for bad in ["", "rbd", "/img", "rbd/", "rbd/img@", "a/b/c", "a/b@c@d"] {
            assert!(bad.parse::<RbdSpec>().is_err(), "{bad}");
        }
    }
}
