//! qcow2 images through the `imago` crate (sync mode: no async runtime), with their backing
//! chains.
//!
//! The chain is opened here, layer by layer, never by imago's implicit opening: a backing file
//! named inside an image is followed only when the user allowed it (`--allow-backing`), only
//! inside the directories allowed (the top image's own by default, or `--backing-dir`), only
//! with its format named in the image (a missing backing format would mean guessing, which a
//! guest that can write a raw backing file could exploit), at most [`MAX_CHAIN`] deep and never
//! twice (a loop). External data files are refused. Backing layers are opened read-only.

use super::engine::BlockEngine;
use imago::file::File as ImagoFile;
use imago::io_buffers::{IoVector, IoVectorMut};
use imago::qcow2::Qcow2;
use imago::raw::Raw;
use imago::{FormatAccess, Storage, StorageOpenOptions};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::RwLock;
use vm_memory::VolatileSlice;
use vm_memory::bitmap::BitmapSlice;

/// The deepest backing chain opened (the top image counts).
pub const MAX_CHAIN: usize = 16;

/// The magic at the start of every qcow2 image.
pub const QCOW2_MAGIC: [u8; 4] = *b"QFI\xfb";

/// Why an image or its chain could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum Qcow2Error {
    /// The image (or a layer) could not be opened or is not valid qcow2.
    #[error("cannot open qcow2 image {path}: {source}")]
    Open {
        /// The layer.
        path: PathBuf,
        /// Why (imago's message).
        source: io::Error,
    },
    /// The image has a backing file and following it was not allowed.
    #[error("{image} has the backing file {backing}: give --allow-backing to open it")]
    BackingNotAllowed {
        /// The image.
        image: PathBuf,
        /// What its header names.
        backing: String,
    },
    /// A backing file outside the allowed directories.
    #[error("the backing file {backing} of {image} is outside the allowed directories ({allowed})")]
    OutsideAllowed {
        /// The image.
        image: PathBuf,
        /// The backing file, resolved.
        backing: PathBuf,
        /// The directories allowed.
        allowed: String,
    },
    /// A backing file without a format in the image header.
    #[error(
        "{image} names the backing file {backing} without its format; refusing to guess (set it with qemu-img rebase -F)"
    )]
    NoBackingFormat {
        /// The image.
        image: PathBuf,
        /// The backing file.
        backing: String,
    },
    /// A backing format other than qcow2 and raw.
    #[error("{image}: backing format '{format}' is not supported (qcow2 and raw are)")]
    BackingFormat {
        /// The image.
        image: PathBuf,
        /// The format named.
        format: String,
    },
    /// The chain is deeper than [`MAX_CHAIN`].
    #[error("the backing chain of {0} is deeper than {MAX_CHAIN} images")]
    TooDeep(PathBuf),
    /// An image appears twice in its own chain.
    #[error("the backing chain loops: {0} is its own backing file")]
    Loop(PathBuf),
    /// External data files are not supported.
    #[error("{0} uses an external data file, which is not supported")]
    ExternalDataFile(PathBuf),
}

/// How to open an image and its chain.
#[derive(Debug, Clone, Default)]
pub struct ChainOptions {
    /// Open the top image read-only.
    pub read_only: bool,
    /// O_DIRECT on every layer.
    pub direct: bool,
    /// Follow backing files named in the images.
    pub allow_backing: bool,
    /// Where backing files may be (empty: the top image's directory).
    pub backing_dirs: Vec<PathBuf>,
}

/// A qcow2 image served to the guest.
pub struct Qcow2Engine {
    /// Discard needs the image to itself (it may drop mappings other requests hold).
    image: RwLock<FormatAccess<ImagoFile>>,
    size: u64,
    /// The layers, top first.
    chain: Vec<PathBuf>,
}

/// The state of opening a chain: what has been opened, where backing files may be.
struct ChainWalk<'a> {
    options: &'a ChainOptions,
    allowed: Vec<PathBuf>,
    opened: Vec<PathBuf>,
}

impl Qcow2Engine {
    /// Opens `path` and, as `options` allow, its backing chain.
    pub fn open(path: &Path, options: &ChainOptions) -> Result<Qcow2Engine, Qcow2Error> {
        let top = canonical(path)?;
        let allowed = if options.backing_dirs.is_empty() {
            top.parent().map(Path::to_path_buf).into_iter().collect()
        } else {
            options.backing_dirs.iter().map(|dir| canonical(dir)).collect::<Result<_, _>>()?
        };
        let mut walk = ChainWalk { options, allowed, opened: Vec::new() };
        let image = walk.open_qcow2(&top, !options.read_only)?;
        let size = image.size();
        Ok(Qcow2Engine { image: RwLock::new(image), size, chain: walk.opened })
    }

    /// The images of the chain, top first.
    pub fn chain(&self) -> &[PathBuf] {
        &self.chain
    }
}

fn canonical(path: &Path) -> Result<PathBuf, Qcow2Error> {
    path.canonicalize().map_err(|source| Qcow2Error::Open { path: path.to_path_buf(), source })
}

fn open_storage(path: &Path, writable: bool, direct: bool) -> Result<ImagoFile, Qcow2Error> {
    let options = StorageOpenOptions::new().filename(path).write(writable).direct(direct);
    ImagoFile::open(options).map_err(|source| Qcow2Error::Open { path: path.to_path_buf(), source })
}

impl ChainWalk<'_> {
    /// Opens the qcow2 image at `path` (canonical) and its chain.
    fn open_qcow2(&mut self, path: &Path, writable: bool) -> Result<FormatAccess<ImagoFile>, Qcow2Error> {
        self.enter(path)?;
        let err = |source| Qcow2Error::Open { path: path.to_path_buf(), source };
        let storage = open_storage(path, writable, self.options.direct)?;
        let mut qcow2 = Qcow2::<ImagoFile>::open_image(storage, writable).map_err(err)?;
        if qcow2.requires_external_data_file() {
            return Err(Qcow2Error::ExternalDataFile(path.to_path_buf()));
        }
        let backing = match qcow2.implicit_backing_file().cloned() {
            None => None,
            Some(name) => Some(self.open_backing(path, &name, qcow2.implicit_backing_format().cloned())?),
        };
        qcow2.set_data_file(None);
        qcow2.set_backing(backing);
        Ok(FormatAccess::new(qcow2))
    }

    /// Opens the backing file `name` of the image at `image`, of format `format`.
    fn open_backing(
        &mut self,
        image: &Path,
        name: &str,
        format: Option<String>,
    ) -> Result<FormatAccess<ImagoFile>, Qcow2Error> {
        if !self.options.allow_backing {
            return Err(Qcow2Error::BackingNotAllowed { image: image.to_path_buf(), backing: name.to_string() });
        }
        let Some(format) = format else {
            return Err(Qcow2Error::NoBackingFormat { image: image.to_path_buf(), backing: name.to_string() });
        };
        let named = Path::new(name);
        let resolved = if named.is_absolute() {
            named.to_path_buf()
        } else {
            image.parent().unwrap_or(Path::new("/")).join(named)
        };
        let backing = canonical(&resolved)?;
        if !self.allowed.iter().any(|dir| backing.starts_with(dir)) {
            let allowed = self.allowed.iter().map(|d| d.display().to_string()).collect::<Vec<_>>().join(", ");
            return Err(Qcow2Error::OutsideAllowed { image: image.to_path_buf(), backing, allowed });
        }
        match format.as_str() {
            "qcow2" => self.open_qcow2(&backing, false),
            "raw" | "file" => {
                self.enter(&backing)?;
                let storage = open_storage(&backing, false, self.options.direct)?;
                let raw = Raw::open_image(storage, false)
                    .map_err(|source| Qcow2Error::Open { path: backing.clone(), source })?;
                Ok(FormatAccess::new(raw))
            }
            _ => Err(Qcow2Error::BackingFormat { image: image.to_path_buf(), format }),
        }
    }

    /// Records that `path` joins the chain: refused when the chain is too deep or loops.
    fn enter(&mut self, path: &Path) -> Result<(), Qcow2Error> {
        if self.opened.iter().any(|p| p == path) {
            return Err(Qcow2Error::Loop(path.to_path_buf()));
        }
        if self.opened.len() >= MAX_CHAIN {
            return Err(Qcow2Error::TooDeep(self.opened[0].clone()));
        }
        self.opened.push(path.to_path_buf());
        Ok(())
    }
}

/// Whether the file at `path` starts like a qcow2 image (for a warning: its format is never
/// guessed from this).
pub fn looks_like_qcow2(path: &Path) -> bool {
    let mut magic = [0u8; 4];
    std::fs::File::open(path).and_then(|f| std::os::unix::fs::FileExt::read_exact_at(&f, &mut magic, 0)).is_ok()
        && magic == QCOW2_MAGIC
}

impl Qcow2Engine {
    fn read_image(&self) -> std::sync::RwLockReadGuard<'_, FormatAccess<ImagoFile>> {
        self.image.read().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl BlockEngine for Qcow2Engine {
    fn size(&self) -> u64 {
        self.size
    }

    fn read<B: BitmapSlice>(&self, offset: u64, bufs: &[VolatileSlice<'_, B>]) -> io::Result<()> {
        {
            let (vector, _guard) = IoVectorMut::from_volatile_slice(bufs.iter());
            self.read_image().readv(vector, offset)?;
        }
        for slice in bufs {
            slice.bitmap().mark_dirty(0, slice.len());
        }
        Ok(())
    }

    fn write<B: BitmapSlice>(&self, offset: u64, bufs: &[VolatileSlice<'_, B>]) -> io::Result<()> {
        let (vector, _guard) = IoVector::from_volatile_slice(bufs.iter());
        self.read_image().writev(vector, offset)
    }

    fn flush(&self) -> io::Result<()> {
        let image = self.read_image();
        image.flush()?;
        image.sync()
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        let mut image = self.image.write().unwrap_or_else(|poisoned| poisoned.into_inner());
        image.discard_to_zero(offset, len)
    }

    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> io::Result<()> {
        if unmap { self.discard(offset, len) } else { self.read_image().write_zeroes(offset, len) }
    }
}
