//! The few librados and librbd calls pvkit makes, loaded at run time from `librados.so.2` and
//! `librbd.so.1` (Debian's `librados2` and `librbd1`): pvkit builds and runs without Ceph, and
//! `--rbd` says so clearly when the libraries are missing. Every call goes through the safe
//! wrappers at the bottom; this file holds all of the RBD code's `unsafe`.

use libloading::Library;
use std::ffi::{CString, c_char, c_int, c_void};
use std::io;

type RadosT = *mut c_void;
type IoctxT = *mut c_void;
type ImageT = *mut c_void;
type CompletionT = *mut c_void;

/// The library names tried, in order.
const RADOS_LIBRARY: &str = "librados.so.2";
const RBD_LIBRARY: &str = "librbd.so.1";

/// RBD_WRITE_ZEROES_FLAG_THICK_PROVISION: zeros written, nothing deallocated.
pub const WRITE_ZEROES_THICK: c_int = 1;

/// Why the libraries could not be used.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// A library is missing.
    #[error("cannot load {library} (install Ceph's client libraries, Debian's librbd1): {source}")]
    Library {
        /// Which.
        library: &'static str,
        /// The loader's message.
        source: libloading::Error,
    },
    /// A function is missing (a librbd older than Octopus).
    #[error("{library} has no {symbol} (librbd 15, Octopus, or later is needed): {source}")]
    Symbol {
        /// Which library.
        library: &'static str,
        /// The function.
        symbol: &'static str,
        /// The loader's message.
        source: libloading::Error,
    },
}

/// The functions, resolved once.
pub struct Api {
    rados_create: unsafe extern "C" fn(*mut RadosT, *const c_char) -> c_int,
    rados_conf_read_file: unsafe extern "C" fn(RadosT, *const c_char) -> c_int,
    rados_connect: unsafe extern "C" fn(RadosT) -> c_int,
    rados_shutdown: unsafe extern "C" fn(RadosT),
    rados_ioctx_create: unsafe extern "C" fn(RadosT, *const c_char, *mut IoctxT) -> c_int,
    rados_ioctx_destroy: unsafe extern "C" fn(IoctxT),
    rbd_open: unsafe extern "C" fn(IoctxT, *const c_char, *mut ImageT, *const c_char) -> c_int,
    rbd_open_read_only: unsafe extern "C" fn(IoctxT, *const c_char, *mut ImageT, *const c_char) -> c_int,
    rbd_close: unsafe extern "C" fn(ImageT) -> c_int,
    rbd_get_size: unsafe extern "C" fn(ImageT, *mut u64) -> c_int,
    rbd_aio_create_completion: unsafe extern "C" fn(*mut c_void, *const c_void, *mut CompletionT) -> c_int,
    rbd_aio_readv: unsafe extern "C" fn(ImageT, *const libc::iovec, c_int, u64, CompletionT) -> c_int,
    rbd_aio_writev: unsafe extern "C" fn(ImageT, *const libc::iovec, c_int, u64, CompletionT) -> c_int,
    rbd_aio_flush: unsafe extern "C" fn(ImageT, CompletionT) -> c_int,
    rbd_aio_discard: unsafe extern "C" fn(ImageT, u64, u64, CompletionT) -> c_int,
    rbd_aio_write_zeroes: unsafe extern "C" fn(ImageT, u64, usize, CompletionT, c_int, c_int) -> c_int,
    rbd_aio_wait_for_complete: unsafe extern "C" fn(CompletionT) -> c_int,
    rbd_aio_get_return_value: unsafe extern "C" fn(CompletionT) -> isize,
    rbd_aio_release: unsafe extern "C" fn(CompletionT),
    // The libraries stay loaded as long as the functions may be called.
    _rados: Library,
    _rbd: Library,
}

fn open_library(library: &'static str) -> Result<Library, LoadError> {
    // SAFETY: loading Ceph's client libraries runs their initialisers, which only set up
    // their own state; nothing else in the process depends on them.
    unsafe { Library::new(library) }.map_err(|source| LoadError::Library { library, source })
}

macro_rules! symbol {
    ($lib:expr, $library:expr, $name:literal) => {
        // SAFETY: the symbol is librados' or librbd's function of this name, whose C signature
        // (librados.h, librbd.h of Ceph 15 and later) is the field's type it is stored in.
        *unsafe { $lib.get(concat!($name, "\0").as_bytes()) }.map_err(|source| LoadError::Symbol {
            library: $library,
            symbol: $name,
            source,
        })?
    };
}

impl Api {
    /// Loads the libraries and resolves the functions.
    pub fn load() -> Result<Api, LoadError> {
        let rados = open_library(RADOS_LIBRARY)?;
        let rbd = open_library(RBD_LIBRARY)?;
        Ok(Api {
            rados_create: symbol!(rados, RADOS_LIBRARY, "rados_create"),
            rados_conf_read_file: symbol!(rados, RADOS_LIBRARY, "rados_conf_read_file"),
            rados_connect: symbol!(rados, RADOS_LIBRARY, "rados_connect"),
            rados_shutdown: symbol!(rados, RADOS_LIBRARY, "rados_shutdown"),
            rados_ioctx_create: symbol!(rados, RADOS_LIBRARY, "rados_ioctx_create"),
            rados_ioctx_destroy: symbol!(rados, RADOS_LIBRARY, "rados_ioctx_destroy"),
            rbd_open: symbol!(rbd, RBD_LIBRARY, "rbd_open"),
            rbd_open_read_only: symbol!(rbd, RBD_LIBRARY, "rbd_open_read_only"),
            rbd_close: symbol!(rbd, RBD_LIBRARY, "rbd_close"),
            rbd_get_size: symbol!(rbd, RBD_LIBRARY, "rbd_get_size"),
            rbd_aio_create_completion: symbol!(rbd, RBD_LIBRARY, "rbd_aio_create_completion"),
            rbd_aio_readv: symbol!(rbd, RBD_LIBRARY, "rbd_aio_readv"),
            rbd_aio_writev: symbol!(rbd, RBD_LIBRARY, "rbd_aio_writev"),
            rbd_aio_flush: symbol!(rbd, RBD_LIBRARY, "rbd_aio_flush"),
            rbd_aio_discard: symbol!(rbd, RBD_LIBRARY, "rbd_aio_discard"),
            rbd_aio_write_zeroes: symbol!(rbd, RBD_LIBRARY, "rbd_aio_write_zeroes"),
            rbd_aio_wait_for_complete: symbol!(rbd, RBD_LIBRARY, "rbd_aio_wait_for_complete"),
            rbd_aio_get_return_value: symbol!(rbd, RBD_LIBRARY, "rbd_aio_get_return_value"),
            rbd_aio_release: symbol!(rbd, RBD_LIBRARY, "rbd_aio_release"),
            _rados: rados,
            _rbd: rbd,
        })
    }
}

fn check(ret: c_int) -> io::Result<()> {
    if ret < 0 { Err(io::Error::from_raw_os_error(-ret)) } else { Ok(()) }
}

fn c_string(text: &str) -> io::Result<CString> {
    CString::new(text).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, format!("'{text}' holds a NUL byte")))
}

/// A connected cluster handle with a pool's I/O context and an open image; closed in order on
/// drop.
pub struct Image {
    api: Api,
    cluster: RadosT,
    ioctx: IoctxT,
    image: ImageT,
}

// SAFETY: librados cluster and I/O-context handles and librbd image handles may be used from
// any thread, and librbd serialises what it must internally (its documentation allows
// concurrent AIO on one image); pvkit never closes them while calls are running (drop takes
// `&mut self`).
unsafe impl Send for Image {}
// SAFETY: as above: every method takes `&self` and calls only thread-safe librbd functions.
unsafe impl Sync for Image {}

impl Image {
    /// Connects as client `id` (e.g. `admin`) with configuration `conf` (None: Ceph's default
    /// search), and opens `image` of `pool` (at snapshot `snap`, read-only, when given).
    pub fn open(
        api: Api,
        conf: Option<&str>,
        id: &str,
        pool: &str,
        image: &str,
        snap: Option<&str>,
        read_only: bool,
    ) -> io::Result<Image> {
        let (id, pool_c, image_c) = (c_string(id)?, c_string(pool)?, c_string(image)?);
        let snap_c = snap.map(c_string).transpose()?;
        let mut this =
            Image { api, cluster: std::ptr::null_mut(), ioctx: std::ptr::null_mut(), image: std::ptr::null_mut() };
        // SAFETY: `this.cluster` is a valid place for the handle; `id` is a NUL-terminated string.
        check(unsafe { (this.api.rados_create)(&mut this.cluster, id.as_ptr()) })?;
        let conf_c = conf.map(c_string).transpose()?;
        // SAFETY: a created, unconnected cluster handle and a NUL-terminated path, or NULL for
        // Ceph's default search path.
        check(unsafe {
            (this.api.rados_conf_read_file)(this.cluster, conf_c.as_ref().map_or(std::ptr::null(), |c| c.as_ptr()))
        })?;
        // SAFETY: the cluster handle is created and configured.
        check(unsafe { (this.api.rados_connect)(this.cluster) })?;
        // SAFETY: a connected cluster, a NUL-terminated pool name, a valid place for the context.
        check(unsafe { (this.api.rados_ioctx_create)(this.cluster, pool_c.as_ptr(), &mut this.ioctx) })?;
        let snap_ptr = snap_c.as_ref().map_or(std::ptr::null(), |s| s.as_ptr());
        let open = if read_only { this.api.rbd_open_read_only } else { this.api.rbd_open };
        // SAFETY: a valid I/O context, NUL-terminated names (or NULL for no snapshot), a valid
        // place for the image handle.
        check(unsafe { open(this.ioctx, image_c.as_ptr(), &mut this.image, snap_ptr) })?;
        Ok(this)
    }

    /// The image's size in bytes.
    pub fn size(&self) -> io::Result<u64> {
        let mut size = 0u64;
        // SAFETY: an open image and a valid place for the size.
        check(unsafe { (self.api.rbd_get_size)(self.image, &mut size) })?;
        Ok(size)
    }

    /// Starts an operation with `start` (given the new completion) and returns the pending
    /// operation, to be waited for with [`Pending::wait`].
    fn start(&self, start: impl FnOnce(CompletionT) -> c_int) -> io::Result<Pending<'_>> {
        let mut completion: CompletionT = std::ptr::null_mut();
        // SAFETY: no callback argument and no callback (NULL); a valid place for the handle.
        check(unsafe {
            (self.api.rbd_aio_create_completion)(std::ptr::null_mut(), std::ptr::null(), &mut completion)
        })?;
        let started = start(completion);
        if started < 0 {
            // Refused before it started: nothing will complete it, so it is released unwaited.
            // SAFETY: the completion was just created and librbd holds no reference to it.
            unsafe { (self.api.rbd_aio_release)(completion) };
            return Err(io::Error::from_raw_os_error(-started));
        }
        Ok(Pending { api: &self.api, completion })
    }

    /// Starts a read into `iovecs` at `offset`.
    ///
    /// # Safety
    /// Every iovec must point at memory writable for its length, which stays valid (and is not
    /// otherwise written) until the returned operation has been waited for; so must the iovec
    /// array itself (librbd keeps a pointer to it for a read of more than one buffer).
    pub unsafe fn read(&self, offset: u64, iovecs: &[libc::iovec]) -> io::Result<Pending<'_>> {
        let count = c_int::try_from(iovecs.len()).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        // SAFETY: an open image; the iovecs and their array stay valid until the operation is
        // waited for, as the caller promises.
        self.start(|c| unsafe { (self.api.rbd_aio_readv)(self.image, iovecs.as_ptr(), count, offset, c) })
    }

    /// Starts a write of `iovecs` at `offset`.
    ///
    /// # Safety
    /// Every iovec must point at memory readable for its length, which stays valid until the
    /// returned operation has been waited for (librbd sends from it without a copy); the array
    /// too, as for [`Image::read`].
    pub unsafe fn write(&self, offset: u64, iovecs: &[libc::iovec]) -> io::Result<Pending<'_>> {
        let count = c_int::try_from(iovecs.len()).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        // SAFETY: as for `read`, with the memory only read.
        self.start(|c| unsafe { (self.api.rbd_aio_writev)(self.image, iovecs.as_ptr(), count, offset, c) })
    }

    /// Starts a flush.
    pub fn flush(&self) -> io::Result<Pending<'_>> {
        // SAFETY: an open image and a fresh completion.
        self.start(|c| unsafe { (self.api.rbd_aio_flush)(self.image, c) })
    }

    /// Starts a discard.
    pub fn discard(&self, offset: u64, len: u64) -> io::Result<Pending<'_>> {
        // SAFETY: an open image and a fresh completion; the range is plain numbers.
        self.start(|c| unsafe { (self.api.rbd_aio_discard)(self.image, offset, len, c) })
    }

    /// Starts a zeroing (`flags`: 0, or [`WRITE_ZEROES_THICK`]).
    pub fn write_zeroes(&self, offset: u64, len: u64, flags: c_int) -> io::Result<Pending<'_>> {
        let len = usize::try_from(len).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        // SAFETY: an open image and a fresh completion; the range and flags are plain numbers.
        self.start(|c| unsafe { (self.api.rbd_aio_write_zeroes)(self.image, offset, len, c, flags, 0) })
    }
}

impl Drop for Image {
    fn drop(&mut self) {
        // SAFETY: each handle is closed once, image before context before cluster, and only if
        // it was made; no operation is pending (each `Pending` borrows the image and is waited
        // for or dropped, which waits, before the image can be dropped).
        unsafe {
            if !self.image.is_null() {
                (self.api.rbd_close)(self.image);
            }
            if !self.ioctx.is_null() {
                (self.api.rados_ioctx_destroy)(self.ioctx);
            }
            if !self.cluster.is_null() {
                (self.api.rados_shutdown)(self.cluster);
            }
        }
    }
}

/// A started operation; dropping it waits for it (librbd must not write into buffers that
/// are gone) and releases it.
pub struct Pending<'i> {
    api: &'i Api,
    completion: CompletionT,
}

impl Pending<'_> {
    /// Waits for the operation; its outcome.
    pub fn wait(self) -> io::Result<()> {
        // SAFETY: a live completion of an operation librbd accepted (or refused: waiting on a
        // completion of a refused operation returns at once).
        let ret = unsafe {
            (self.api.rbd_aio_wait_for_complete)(self.completion);
            (self.api.rbd_aio_get_return_value)(self.completion)
        };
        if ret < 0 { Err(io::Error::from_raw_os_error(-(ret as i32))) } else { Ok(()) }
    }
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        // SAFETY: the completion is live until released here, once; waiting first means librbd
        // is done with it and with the operation's buffers.
        unsafe {
            (self.api.rbd_aio_wait_for_complete)(self.completion);
            (self.api.rbd_aio_release)(self.completion);
        }
    }
}
