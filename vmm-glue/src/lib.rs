//! The VMM glue: guest memory, vCPUs, the virtio-mmio transport and a vhost-user frontend
//! per device, wired so that doorbells and interrupts go between guest and backend through
//! the kernel (ioeventfd, irqfd).

#![warn(missing_docs)]

pub mod backend_requests;
pub mod backend_watch;
pub mod bus;
pub mod control;
pub mod device;
pub mod frontend;
pub mod guest_report;
pub mod host_frontend;
pub mod loader;
pub mod memory;
pub mod mmio;
pub mod seccomp;
pub mod serial;
pub mod snapshot;
pub mod software_guest;
pub mod sync;
pub mod vcpu;
pub mod vm;

use std::path::Path;

/// Whether `/dev/kvm` exists and can be opened for reading and writing.
pub fn kvm_usable() -> bool {
    std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm").is_ok()
}

/// Whether the host's KVM is PVM-based (guests there cannot take interrupts and must poll).
pub fn kvm_is_pvm() -> bool {
    Path::new("/sys/module/kvm_pvm").exists()
}
