//! The dirty-page logs a live migration's pre-copy rounds follow: KVM's for the vCPUs'
//! writes (the memory slot with KVM_MEM_LOG_DIRTY_PAGES; each read clears it), and a shared
//! bitmap the backends mark for theirs (vhost-user LOG_SHMFD with VHOST_F_LOG_ALL: bit `n` for
//! guest page `n`). The backends' bitmap is never cleared while they run (a word cleared by
//! the VMM could lose a bit a backend sets in between): every page it ever marked is sent
//! again once the VM is paused.

use super::memory_image::{PAGE, read_guest};
use crate::memory::GuestRam;
use kvm_bindings::{KVM_MEM_LOG_DIRTY_PAGES, kvm_userspace_memory_region};
use kvm_ioctls::VmFd;

/// Errors from the dirty logs.
#[derive(Debug, thiserror::Error)]
pub enum DirtyError {
    /// KVM refused a dirty-log call.
    #[error("KVM {what} failed: {source}")]
    Kvm {
        /// Which call.
        what: &'static str,
        /// Why.
        source: kvm_ioctls::Error,
    },
    /// The backends' bitmap could not be made.
    #[error("the backends' dirty-page bitmap: {0}")]
    Area(#[from] crate::memory::MemoryError),
    /// The backends' bitmap could not be read.
    #[error("the backends' dirty-page bitmap: {0}")]
    Read(#[from] super::memory_image::MemoryImageError),
}

/// One bit per guest page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageBitmap(pub Vec<u64>);

impl PageBitmap {
    /// No page set, for `pages` pages.
    pub fn empty(pages: u64) -> PageBitmap {
        PageBitmap(vec![0; pages.div_ceil(64) as usize])
    }

    /// Whether page `n` is set.
    pub fn has(&self, page: u64) -> bool {
        self.0.get((page / 64) as usize).is_some_and(|w| w & (1 << (page % 64)) != 0)
    }

    /// Pages set.
    pub fn count(&self) -> u64 {
        self.0.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    /// Adds the pages of `other`.
    pub fn add(&mut self, other: &PageBitmap) {
        for (word, more) in self.0.iter_mut().zip(&other.0) {
            *word |= more;
        }
    }
}

/// Sets or clears dirty logging on guest memory's KVM slot.
fn set_slot_logging(vm: &VmFd, ram: &GuestRam, on: bool) -> Result<(), DirtyError> {
    let region = kvm_userspace_memory_region {
        slot: 0,
        flags: if on { KVM_MEM_LOG_DIRTY_PAGES } else { 0 },
        guest_phys_addr: 0,
        memory_size: ram.size(),
        userspace_addr: ram.host_base(),
    };
    // SAFETY: the same slot over the same mapping the VM was built with (only its flags
    // change); `ram` outlives the VM, as it did when the slot was first set.
    unsafe { vm.set_user_memory_region(region) }
        .map_err(|source| DirtyError::Kvm { what: "KVM_SET_USER_MEMORY_REGION (dirty logging)", source })
}

/// KVM's log of the pages vCPUs write, on while this lives.
pub struct KvmDirtyLog<'a> {
    vm: &'a VmFd,
    ram: &'a GuestRam,
}

impl<'a> KvmDirtyLog<'a> {
    /// Starts logging.
    pub fn start(vm: &'a VmFd, ram: &'a GuestRam) -> Result<KvmDirtyLog<'a>, DirtyError> {
        set_slot_logging(vm, ram, true)?;
        Ok(KvmDirtyLog { vm, ram })
    }

    /// The pages written since the last call (or the start), and clears them.
    pub fn take(&self) -> Result<PageBitmap, DirtyError> {
        let words = self
            .vm
            .get_dirty_log(0, self.ram.size() as usize)
            .map_err(|source| DirtyError::Kvm { what: "KVM_GET_DIRTY_LOG", source })?;
        Ok(PageBitmap(words))
    }
}

impl Drop for KvmDirtyLog<'_> {
    fn drop(&mut self) {
        if let Err(e) = set_slot_logging(self.vm, self.ram, false) {
            log::warn!("stopping KVM's dirty log: {e}");
        }
    }
}

/// The bitmap the backends mark (shared memory handed over with SET_LOG_BASE).
pub struct BackendLog {
    area: GuestRam,
    pages: u64,
}

impl BackendLog {
    /// A zeroed bitmap for `ram`'s pages.
    pub fn new(ram: &GuestRam) -> Result<BackendLog, DirtyError> {
        let pages = ram.size() / PAGE;
        let bytes = pages.div_ceil(8).div_ceil(PAGE) * PAGE;
        let area = GuestRam::shared(bytes)?;
        Ok(BackendLog { area, pages })
    }

    /// The bitmap's memfd and size, for SET_LOG_BASE.
    pub fn region(&self) -> (i32, u64) {
        (self.area.fd(), self.area.size())
    }

    /// Every page a backend marked so far.
    pub fn marked(&self) -> Result<PageBitmap, DirtyError> {
        let mut bytes = vec![0u8; self.pages.div_ceil(8) as usize];
        read_guest(&self.area, 0, &mut bytes)?;
        let mut bitmap = PageBitmap::empty(self.pages);
        for (i, byte) in bytes.iter().enumerate() {
            if let Some(word) = bitmap.0.get_mut(i / 8) {
                *word |= u64::from(*byte) << ((i % 8) * 8);
            }
        }
        Ok(bitmap)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_backend_bit_for_page_n_is_page_n() {
        let ram = GuestRam::new(16 << 20).unwrap();
        let log = BackendLog::new(&ram).unwrap();
        // A backend marks page 9 (byte 1, bit 1) and page 4095 (the last).
        super::super::memory_image::write_guest(&log.area, 1, &[0b10]).unwrap();
        super::super::memory_image::write_guest(&log.area, 511, &[0x80]).unwrap();
        let marked = log.marked().unwrap();
        assert!(marked.has(9) && marked.has(4095) && !marked.has(8));
        assert_eq!(marked.count(), 2);
    }
}
