//! Guest memory: one region from guest physical address 0, backed by a memfd so vhost-user
//! backends can map it too.

use std::fs::File;
use std::os::unix::io::{AsRawFd, FromRawFd};
use vm_memory::{FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

/// Errors from setting up guest memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// A size the VMM does not support.
    #[error("guest memory of {0} bytes is outside 16 MiB .. 3 GiB")]
    BadSize(u64),
    /// memfd_create or ftruncate failed.
    #[error("cannot create the guest memory file: {0}")]
    Memfd(std::io::Error),
    /// Mapping failed.
    #[error("cannot map guest memory: {0}")]
    Map(String),
}

/// Smallest guest memory accepted.
pub const MIN_SIZE: u64 = 16 << 20;
/// Largest guest memory accepted (below the 32-bit device hole).
pub const MAX_SIZE: u64 = 3 << 30;

/// Guest memory and the memfd behind it.
pub struct GuestRam {
    memory: GuestMemoryMmap,
    file: File,
    size: u64,
}

impl GuestRam {
    /// `size` bytes of zeroed, shareable memory at guest physical address 0.
    pub fn new(size: u64) -> Result<GuestRam, MemoryError> {
        if !(MIN_SIZE..=MAX_SIZE).contains(&size) {
            return Err(MemoryError::BadSize(size));
        }
        GuestRam::shared(size)
    }

    /// Shared memory of any whole number of pages up to [`MAX_SIZE`], for a frontend without a
    /// VM (a host tool driving a backend directly, [`crate::host_frontend`]).
    pub fn shared(size: u64) -> Result<GuestRam, MemoryError> {
        if size == 0 || size > MAX_SIZE || !size.is_multiple_of(4096) {
            return Err(MemoryError::BadSize(size));
        }
        // SAFETY: memfd_create reads a NUL-terminated name and returns a new descriptor or -1.
        let fd = unsafe { libc::memfd_create(c"pvkit-guest-ram".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(MemoryError::Memfd(std::io::Error::last_os_error()));
        }
        // SAFETY: `fd` was just created and is owned by nobody else.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(size).map_err(MemoryError::Memfd)?;
        let backing = file.try_clone().map_err(MemoryError::Memfd)?;
        let memory = GuestMemoryMmap::from_ranges_with_files(&[(
            GuestAddress(0),
            size as usize,
            Some(FileOffset::new(backing, 0)),
        )])
        .map_err(|e| MemoryError::Map(e.to_string()))?;
        Ok(GuestRam { memory, file, size })
    }

    /// The memory, for vm-memory accesses.
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.memory
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The memfd itself (pages never written are holes in it).
    pub fn file(&self) -> &File {
        &self.file
    }

    /// The memfd (shared with backends in SET_MEM_TABLE).
    pub fn fd(&self) -> i32 {
        self.file.as_raw_fd()
    }

    /// The VMM's virtual address of guest physical address 0.
    pub fn host_base(&self) -> u64 {
        self.memory.iter().next().map(|r| r.as_ptr() as u64).unwrap_or(0)
    }

    /// The VMM's virtual address of `len` bytes at guest physical `gpa`, if they are all RAM.
    pub fn host_address(&self, gpa: u64, len: u64) -> Option<u64> {
        let end = gpa.checked_add(len)?;
        (end <= self.size).then(|| self.host_base() + gpa)
    }

    /// Whether `len` bytes at `gpa` lie in guest RAM.
    pub fn contains(&self, gpa: u64, len: u64) -> bool {
        self.memory.address_in_range(GuestAddress(gpa)) && gpa.checked_add(len).is_some_and(|end| end <= self.size)
    }
}
