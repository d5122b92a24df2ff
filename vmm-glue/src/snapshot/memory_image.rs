//! Guest memory in a snapshot: a file as large as guest memory whose zero pages are holes, so
//! an idle guest's snapshot takes little more room than the pages it touched. Saving writes
//! each run of non-zero pages at its own offset; loading reads only the file's data segments
//! (SEEK_DATA, SEEK_HOLE) into fresh, zeroed guest memory.

use crate::memory::GuestRam;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::Path;
use vm_memory::{Bytes, GuestAddress};

/// The page size snapshots count in.
pub const PAGE: u64 = 4096;
/// Bytes scanned per step (and the most a run passed at once holds).
pub const CHUNK: u64 = 1 << 20;

/// Errors from saving or loading guest memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryImageError {
    /// The file could not be made, read or written.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// Guest memory could not be read or written.
    #[error("guest memory at {gpa:#x}: {source}")]
    Guest {
        /// Where.
        gpa: u64,
        /// Why.
        source: vm_memory::GuestMemoryError,
    },
    /// The file is not as large as the memory it should hold (truncated, or another VM's).
    #[error("{path} holds {found} bytes; the snapshot's guest memory is {expected}")]
    WrongSize {
        /// The file.
        path: String,
        /// Its size.
        found: u64,
        /// Guest memory's size.
        expected: u64,
    },
}

/// Reads `len` bytes of guest memory at `gpa` into `buf`.
pub fn read_guest(ram: &GuestRam, gpa: u64, buf: &mut [u8]) -> Result<(), MemoryImageError> {
    ram.memory().read_slice(buf, GuestAddress(gpa)).map_err(|source| MemoryImageError::Guest { gpa, source })
}

/// Writes `bytes` into guest memory at `gpa`.
pub fn write_guest(ram: &GuestRam, gpa: u64, bytes: &[u8]) -> Result<(), MemoryImageError> {
    ram.memory().write_slice(bytes, GuestAddress(gpa)).map_err(|source| MemoryImageError::Guest { gpa, source })
}

/// Calls `each` with every run of pages of guest memory that are not all zero (`gpa`, bytes),
/// limited to the pages `wanted` says (`None`: every page); a page `wanted` names is passed
/// even when it is zero (it may have been written since it was last sent). Returns the pages
/// passed. Without `wanted`, only the memory file's data segments are read: pages the guest
/// never touched are holes there.
pub fn for_each_page_run<E, F>(ram: &GuestRam, wanted: Option<&dyn Fn(u64) -> bool>, mut each: F) -> Result<u64, E>
where
    E: From<MemoryImageError>,
    F: FnMut(u64, &[u8]) -> Result<(), E>,
{
    let mut buf = vec![0u8; CHUNK as usize];
    let mut pages = 0;
    for (start, end) in scan_ranges(ram, wanted.is_none())? {
        let mut chunk_start = start;
        while chunk_start < end {
            let len = CHUNK.min(end - chunk_start);
            let first_page = chunk_start / PAGE;
            let any_wanted = wanted.is_none_or(|w| (first_page..first_page + len / PAGE).any(w));
            if any_wanted {
                let chunk = &mut buf[..len as usize];
                read_guest(ram, chunk_start, chunk)?;
                pages += page_runs(chunk, chunk_start, wanted, &mut each)?;
            }
            chunk_start += len;
        }
    }
    Ok(pages)
}

/// The page-aligned ranges of guest memory to look at: the memory file's data segments, or
/// all of it.
fn scan_ranges(ram: &GuestRam, data_only: bool) -> Result<Vec<(u64, u64)>, MemoryImageError> {
    if !data_only {
        return Ok(vec![(0, ram.size())]);
    }
    let failed = |source| MemoryImageError::Io { what: "finding data in", path: "guest memory".into(), source };
    let segments = data_segments(ram.file(), ram.size()).map_err(failed)?;
    Ok(segments
        .into_iter()
        .map(|(start, end)| (start / PAGE * PAGE, (end.div_ceil(PAGE) * PAGE).min(ram.size())))
        .collect())
}

/// The data segments of `file` below `size` (holes left out), by SEEK_DATA and SEEK_HOLE.
fn data_segments(file: &File, size: u64) -> std::io::Result<Vec<(u64, u64)>> {
    let mut segments = Vec::new();
    let mut offset = 0;
    while offset < size {
        let Some(start) = seek(file, offset, libc::SEEK_DATA)? else { break };
        let end = seek(file, start, libc::SEEK_HOLE)?.unwrap_or(size).min(size);
        if start < end {
            segments.push((start, end));
        }
        offset = end.max(start + 1);
    }
    Ok(segments)
}

/// Passes the runs of pages in `chunk` (at `chunk_start`) to `each`; returns the pages passed.
fn page_runs<E, F>(chunk: &[u8], chunk_start: u64, wanted: Option<&dyn Fn(u64) -> bool>, each: &mut F) -> Result<u64, E>
where
    F: FnMut(u64, &[u8]) -> Result<(), E>,
{
    let mut pages = 0;
    let mut run: Option<u64> = None;
    let at = |gpa: u64| (gpa - chunk_start) as usize;
    for page in chunk.chunks(PAGE as usize).enumerate().map(|(i, bytes)| (chunk_start + i as u64 * PAGE, bytes)) {
        let (gpa, bytes) = page;
        let send = match wanted {
            Some(wanted) => wanted(gpa / PAGE),
            None => bytes.iter().any(|&b| b != 0),
        };
        match (send, run) {
            (true, None) => run = Some(gpa),
            (false, Some(start)) => {
                each(start, &chunk[at(start)..at(gpa)])?;
                run = None;
            }
            _ => {}
        }
        pages += u64::from(send);
    }
    if let Some(start) = run {
        each(start, &chunk[at(start)..])?;
    }
    Ok(pages)
}

fn io_error<'a>(what: &'static str, path: &'a Path) -> impl Fn(std::io::Error) -> MemoryImageError + 'a {
    move |source| MemoryImageError::Io { what, path: path.display().to_string(), source }
}

/// Saves guest memory to `path` (created or replaced); returns the non-zero pages written.
pub fn save(ram: &GuestRam, path: &Path) -> Result<u64, MemoryImageError> {
    let io = |what: &'static str| io_error(what, path);
    let file = File::create(path).map_err(io("creating"))?;
    file.set_len(ram.size()).map_err(io("sizing"))?;
    let pages = for_each_page_run(ram, None, |gpa, bytes| file.write_all_at(bytes, gpa).map_err(io("writing")))?;
    file.sync_all().map_err(io("syncing"))?;
    Ok(pages)
}

/// Loads `path` into `ram` (fresh, all zero); refuses a file of another size. Returns the
/// bytes read (the file's data segments).
pub fn load(ram: &GuestRam, path: &Path) -> Result<u64, MemoryImageError> {
    let io = |what: &'static str| io_error(what, path);
    let file = File::open(path).map_err(io("opening"))?;
    let found = file.metadata().map_err(io("reading the size of"))?.len();
    if found != ram.size() {
        return Err(MemoryImageError::WrongSize { path: path.display().to_string(), found, expected: ram.size() });
    }
    let mut buf = vec![0u8; CHUNK as usize];
    let mut read = 0;
    for (start, end) in data_segments(&file, found).map_err(io("finding data in"))? {
        let mut at = start;
        while at < end {
            let len = CHUNK.min(end - at) as usize;
            file.read_exact_at(&mut buf[..len], at).map_err(io("reading"))?;
            write_guest(ram, at, &buf[..len])?;
            at += len as u64;
        }
        read += end - start;
    }
    Ok(read)
}

/// `lseek(file, offset, whence)`; `None` when there is no more data (ENXIO).
fn seek(file: &File, offset: u64, whence: libc::c_int) -> std::io::Result<Option<u64>> {
    let offset = libc::off_t::try_from(offset).map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    // SAFETY: lseek on a descriptor this function borrows open for its whole call; it moves
    // only the file's offset, which nothing else here relies on (reads are positioned).
    let at = unsafe { libc::lseek(file.as_raw_fd(), offset, whence) };
    if at < 0 {
        let error = std::io::Error::last_os_error();
        return if error.raw_os_error() == Some(libc::ENXIO) { Ok(None) } else { Err(error) };
    }
    Ok(Some(at as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_pages_become_holes_and_come_back_as_zeros() {
        let ram = GuestRam::new(16 << 20).unwrap();
        write_guest(&ram, 0x1000, &[0xaa; 100]).unwrap();
        write_guest(&ram, 0x5000, &[0x55; 8192]).unwrap();
        write_guest(&ram, (16 << 20) - 1, &[1]).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("memory");
        assert_eq!(save(&ram, &path).unwrap(), 4, "pages 1, 5, 6 and the last");
        let on_disk = std::fs::metadata(&path).unwrap();
        assert_eq!(on_disk.len(), 16 << 20);
        assert!(std::os::unix::fs::MetadataExt::blocks(&on_disk) * 512 < 1 << 20, "zero pages were written");
        let back = GuestRam::new(16 << 20).unwrap();
        load(&back, &path).unwrap();
        let (mut a, mut b) = (vec![0u8; 16 << 20], vec![0u8; 16 << 20]);
        read_guest(&ram, 0, &mut a).unwrap();
        read_guest(&back, 0, &mut b).unwrap();
        assert!(a == b, "the loaded memory differs");
    }

    #[test]
    fn a_file_of_another_size_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("memory");
        std::fs::File::create(&path).unwrap().set_len(8 << 20).unwrap();
        let ram = GuestRam::new(16 << 20).unwrap();
        assert!(matches!(load(&ram, &path), Err(MemoryImageError::WrongSize { found, .. }) if found == 8 << 20));
    }
}
