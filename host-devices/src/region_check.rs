//! Memory regions a frontend sends (SET_MEM_TABLE, ADD_MEM_REG) are checked against their
//! files before the library maps them: a region larger than what its file holds maps fine,
//! but the first access past the file's end (the library reads the used index while handling
//! SET_VRING_ADDR) kills the whole backend with SIGBUS. The relay ([`crate::relay`]) refuses
//! such messages instead.

use std::os::fd::{AsRawFd, OwnedFd};

/// vhost-user's VHOST_USER_SET_MEM_TABLE.
pub const SET_MEM_TABLE: u32 = vhost::vhost_user::message::FrontendReq::SET_MEM_TABLE as u32;
/// vhost-user's VHOST_USER_ADD_MEM_REG.
pub const ADD_MEM_REG: u32 = vhost::vhost_user::message::FrontendReq::ADD_MEM_REG as u32;

/// Bytes of one region descriptor: guest address, size, user address, mmap offset.
const REGION_LEN: usize = 32;
/// Bytes before the regions of SET_MEM_TABLE (count, padding) and of ADD_MEM_REG (padding).
const TABLE_HEADER_LEN: usize = 8;

/// Why a memory message is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegionError {
    /// The payload is shorter than its regions need, or the fds do not match them.
    #[error("a {request} message with {payload} payload bytes and {fds} file descriptor(s) is malformed")]
    Malformed {
        /// The request number.
        request: u32,
        /// Payload bytes.
        payload: usize,
        /// Descriptors attached.
        fds: usize,
    },
    /// A region reaches past the end of its file.
    #[error(
        "region {index} needs {needed} bytes of its file (offset {offset:#x} + size {size:#x}) but the file holds {file_size}"
    )]
    PastEndOfFile {
        /// Which region.
        index: usize,
        /// mmap offset.
        offset: u64,
        /// Region size.
        size: u64,
        /// offset + size.
        needed: u64,
        /// The file's size.
        file_size: u64,
    },
}

fn u64_at(bytes: &[u8], at: usize) -> u64 {
    bytes.get(at..at + 8).and_then(|b| b.try_into().ok()).map(u64::from_le_bytes).unwrap_or(0)
}

/// Checks the regions of a `request` message with `payload` and `fds`; other requests pass.
pub fn check(request: u32, payload: &[u8], fds: &[OwnedFd]) -> Result<(), RegionError> {
    let malformed = || RegionError::Malformed { request, payload: payload.len(), fds: fds.len() };
    let count = match request {
        SET_MEM_TABLE => {
            payload.get(..4).and_then(|b| b.try_into().ok()).map(u32::from_le_bytes).ok_or_else(malformed)? as usize
        }
        ADD_MEM_REG => 1,
        _ => return Ok(()),
    };
    if fds.len() != count || payload.len() < TABLE_HEADER_LEN + count * REGION_LEN {
        return Err(malformed());
    }
    for (index, fd) in fds.iter().enumerate() {
        let region = TABLE_HEADER_LEN + index * REGION_LEN;
        let (size, offset) = (u64_at(payload, region + 8), u64_at(payload, region + 24));
        let Some(file_size) = regular_file_size(fd) else { continue };
        let needed = offset.saturating_add(size);
        if needed > file_size {
            return Err(RegionError::PastEndOfFile { index, offset, size, needed, file_size });
        }
    }
    Ok(())
}

/// The size of a regular file (memfd, hugetlbfs or tmpfs file); `None` for anything else,
/// whose size fstat does not tell.
fn regular_file_size(fd: &OwnedFd) -> Option<u64> {
    // SAFETY: `stat` is plain data that fstat fills in; the descriptor is open (owned here).
    let mut stat: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: a valid descriptor and a valid out-pointer.
    if unsafe { libc::fstat(fd.as_raw_fd(), &mut stat) } != 0 {
        return None;
    }
    (stat.st_mode & libc::S_IFMT == libc::S_IFREG).then_some(stat.st_size as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn memfd(len: u64) -> OwnedFd {
        let file = tempfile::tempfile().unwrap();
        file.set_len(len).unwrap();
        OwnedFd::from(file)
    }

    fn table(regions: &[(u64, u64)]) -> Vec<u8> {
        let mut out = (regions.len() as u32).to_le_bytes().to_vec();
        out.extend_from_slice(&[0; 4]);
        for &(size, offset) in regions {
            for field in [0x1000_0000u64, size, 0x7f00_0000_0000, offset] {
                out.extend_from_slice(&field.to_le_bytes());
            }
        }
        out
    }

    #[test]
    fn a_region_past_its_file_is_refused_and_one_inside_passes() {
        let fds = vec![memfd(4096)];
        assert_eq!(
            check(SET_MEM_TABLE, &table(&[(1 << 20, 0)]), &fds),
            Err(RegionError::PastEndOfFile { index: 0, offset: 0, size: 1 << 20, needed: 1 << 20, file_size: 4096 })
        );
        assert_eq!(check(SET_MEM_TABLE, &table(&[(4096, 0)]), &fds), Ok(()));
        assert!(check(SET_MEM_TABLE, &table(&[(4096, 1)]), &fds).is_err(), "the offset counts");
        assert!(check(SET_MEM_TABLE, &table(&[(u64::MAX, 2)]), &fds).is_err(), "no overflow");
    }

    #[test]
    fn add_mem_reg_is_checked_and_malformed_tables_refused() {
        let mut single = vec![0u8; 8];
        single.extend_from_slice(&table(&[(8192, 0)])[8..]);
        assert!(matches!(check(ADD_MEM_REG, &single, &[memfd(4096)]), Err(RegionError::PastEndOfFile { .. })));
        assert_eq!(check(ADD_MEM_REG, &single, &[memfd(8192)]), Ok(()));
        assert!(matches!(check(SET_MEM_TABLE, &table(&[(4096, 0)]), &[]), Err(RegionError::Malformed { .. })));
        assert!(matches!(check(SET_MEM_TABLE, &[1, 0], &[]), Err(RegionError::Malformed { .. })));
        assert_eq!(check(1, &[], &[]), Ok(()), "other requests pass");
    }
}
