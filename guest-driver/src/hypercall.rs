//! The hypercall shim: the guest's only way to ring a device's doorbell.
//!
//! Two mechanisms exist now: the transport's own notify register (virtio-mmio QueueNotify or
//! the virtio-pci notify capability), and pvkit's per-queue doorbell I/O ports
//! (`protocol::abi`: an `out` that KVM turns into an eventfd signal without leaving the
//! kernel), used only when the host announced them with `pvkit.doorbells=` on the guest's
//! command line. A hypercall instruction would be a third; a guest never probes one its host
//! did not announce (on some hosts `vmcall` hangs the vCPU, on others it raises #UD).

use crate::protocol::abi::{self, Doorbells};
use crate::transport::NotifyTarget;

/// Something that tells a device a queue has new buffers.
pub trait Doorbell {
    /// Rings for queue `queue`.
    fn ring(&self, queue: u16);
}

/// The mechanism a queue uses, chosen once at setup.
#[derive(Clone, Copy)]
pub enum Shim {
    /// The transport's notify register.
    Transport(NotifyTarget),
    /// A pvkit doorbell port (x86 `out` of the queue index).
    Port(u16),
    /// Anything else that can ring (a hosted driver writing an eventfd, a test double).
    Custom(&'static (dyn Doorbell + Sync)),
}

impl core::fmt::Debug for Shim {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Shim::Transport(target) => f.debug_tuple("Transport").field(target).finish(),
            Shim::Port(port) => f.debug_tuple("Port").field(port).finish(),
            Shim::Custom(d) => f.debug_tuple("Custom").field(&(*d as *const dyn Doorbell).cast::<()>()).finish(),
        }
    }
}

impl PartialEq for Shim {
    fn eq(&self, other: &Shim) -> bool {
        match (self, other) {
            (Shim::Transport(a), Shim::Transport(b)) => a == b,
            (Shim::Port(a), Shim::Port(b)) => a == b,
            (Shim::Custom(a), Shim::Custom(b)) => {
                core::ptr::addr_eq(*a as *const dyn Doorbell, *b as *const dyn Doorbell)
            }
            _ => false,
        }
    }
}

impl Eq for Shim {}

impl Doorbell for Shim {
    fn ring(&self, queue: u16) {
        match *self {
            Shim::Transport(target) => target.write(queue),
            Shim::Port(port) => port_out(port, queue),
            Shim::Custom(doorbell) => doorbell.ring(queue),
        }
    }
}

impl Shim {
    /// A short name for logs.
    pub fn name(&self) -> &'static str {
        match self {
            Shim::Transport(NotifyTarget::Mmio32(_)) => "mmio-notify",
            Shim::Transport(NotifyTarget::Pci16(_)) => "pci-notify",
            Shim::Port(_) => "port-doorbell",
            Shim::Custom(_) => "custom",
        }
    }

    /// The mechanism for queue `queue` of the virtio-mmio device in slot `slot`: the doorbell
    /// port when `cmdline` announces doorbells (and the architecture has port I/O), else the
    /// transport's register `fallback`.
    pub fn choose(cmdline: &str, slot: Option<u32>, queue: u16, fallback: NotifyTarget) -> Shim {
        if cfg!(any(target_arch = "x86", target_arch = "x86_64"))
            && let (Some(slot), Some(value)) = (slot, abi::param(cmdline, abi::key::DOORBELLS))
            && let Ok(doorbells) = Doorbells::parse(value)
            && let Some(port) = doorbells.port(slot, queue)
        {
            return Shim::Port(port);
        }
        Shim::Transport(fallback)
    }
}

#[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
fn port_out(port: u16, value: u16) {
    // SAFETY: a 16-bit `out` to an I/O port the host announced as a doorbell; it touches no
    // memory. (On a host that did not announce it, `Shim::choose` never picks this.)
    unsafe { core::arch::asm!("out dx, ax", in("dx") port, in("ax") value, options(nomem, nostack, preserves_flags)) };
}

#[cfg(not(any(target_arch = "x86", target_arch = "x86_64")))]
fn port_out(_port: u16, _value: u16) {
    // `Shim::choose` never picks a port on architectures without port I/O.
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::ptr::NonNull;

    #[test]
    fn doorbells_are_used_only_when_announced() {
        let mut reg = 0u32;
        let fallback = NotifyTarget::Mmio32(NonNull::from(&mut reg));
        assert_eq!(Shim::choose("console=ttyS0", Some(2), 1, fallback), Shim::Transport(fallback));
        assert_eq!(Shim::choose("pvkit.doorbells=0x6000", None, 1, fallback), Shim::Transport(fallback));
        assert_eq!(Shim::choose("pvkit.doorbells=garbage", Some(2), 1, fallback), Shim::Transport(fallback));
        let chosen = Shim::choose("a=b pvkit.doorbells=0x6000 c", Some(2), 1, fallback);
        assert_eq!(chosen, Shim::Port(0x6000 + 64 * 2 + 1));
        // Ringing through the transport writes the queue index.
        Shim::Transport(fallback).ring(7);
        assert_eq!(reg, 7);
    }
}
