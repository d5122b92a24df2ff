//! vCPUs: CPUID from KVM's supported set (set before the first run: without it, a guest that
//! enables long mode itself triple-faults here), 64-bit mode entered directly at the ELF entry
//! with the PVH start info in `rbx`, and the run loop that hands port and MMIO exits to the VMM.
//!
//! With the in-kernel irqchip a `hlt` with interrupts off never returns from KVM_RUN, so guests
//! end through the debug-exit port; a watchdog stops a stuck vCPU with a signal.

use crate::loader::{Loaded, layout};
use kvm_bindings::{KVM_MAX_CPUID_ENTRIES, kvm_fpu, kvm_regs, kvm_segment};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd};
use pvkit_protocol::abi;
use std::sync::atomic::{AtomicBool, Ordering};

/// Errors from vCPUs.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    /// A KVM ioctl failed.
    #[error("KVM {what} failed: {source}")]
    Kvm {
        /// Which call.
        what: &'static str,
        /// Why.
        source: kvm_ioctls::Error,
    },
}

fn kvm(what: &'static str) -> impl Fn(kvm_ioctls::Error) -> VcpuError {
    move |source| VcpuError::Kvm { what, source }
}

/// How a guest's run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The guest wrote this code to the debug-exit port.
    Exited(u32),
    /// The guest shut down (a triple fault, or a reset request).
    Shutdown,
    /// KVM could not run it (emulation failure and the like).
    InternalError(String),
    /// The watchdog stopped it.
    TimedOut,
    /// It was shut down through the VM's control (`PUT /vm/shutdown`).
    Stopped,
    /// It moved to another VMM process (`PUT /vm/migrate`).
    Migrated,
}

/// Port and MMIO accesses the kernel did not handle.
pub trait Bus: Sync {
    /// A port read.
    fn pio_read(&self, port: u16, data: &mut [u8]);
    /// A port write.
    fn pio_write(&self, port: u16, data: &[u8]);
    /// An MMIO read.
    fn mmio_read(&self, addr: u64, data: &mut [u8]);
    /// An MMIO write.
    fn mmio_write(&self, addr: u64, data: &[u8]);
}

fn code_segment() -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector: 0x08,
        type_: 0xb,
        present: 1,
        dpl: 0,
        db: 0,
        s: 1,
        l: 1,
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

fn data_segment() -> kvm_segment {
    kvm_segment { selector: 0x10, type_: 0x3, db: 1, l: 0, ..code_segment() }
}

/// Sets up `vcpu` to start the loaded guest in 64-bit mode.
pub fn configure(kvm_handle: &Kvm, vcpu: &VcpuFd, loaded: &Loaded) -> Result<(), VcpuError> {
    let cpuid = kvm_handle.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).map_err(kvm("KVM_GET_SUPPORTED_CPUID"))?;
    vcpu.set_cpuid2(&cpuid).map_err(kvm("KVM_SET_CPUID2"))?;
    let mut sregs = vcpu.get_sregs().map_err(kvm("KVM_GET_SREGS"))?;
    sregs.cs = code_segment();
    let data = data_segment();
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.gdt.base = layout::GDT;
    sregs.gdt.limit = (crate::loader::gdt().len() * 8 - 1) as u16;
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
    sregs.cr3 = layout::PML4;
    sregs.cr4 |= 0x20; // PAE
    sregs.cr0 |= 0x8000_0001 | 0x10; // PG, PE, ET
    sregs.efer |= 0x500; // LME, LMA
    vcpu.set_sregs(&sregs).map_err(kvm("KVM_SET_SREGS"))?;
    let regs = kvm_regs {
        rip: loaded.entry,
        rsp: layout::STACK_TOP,
        rbx: loaded.start_info,
        rflags: 0x2,
        ..Default::default()
    };
    vcpu.set_regs(&regs).map_err(kvm("KVM_SET_REGS"))?;
    let fpu = kvm_fpu { fcw: 0x37f, mxcsr: 0x1f80, ..Default::default() };
    vcpu.set_fpu(&fpu).map_err(kvm("KVM_SET_FPU"))?;
    Ok(())
}

/// What a vCPU thread needs to read its own state for a snapshot.
#[derive(Debug, Clone, Default)]
pub struct StateReader {
    /// The MSRs to save.
    pub msrs: crate::snapshot::vcpu_state::MsrList,
    /// KVM's XSAVE area size.
    pub xsave_size: i32,
}

/// Runs `vcpu` (number `id`) until the guest exits, stops, or `stop` is set (the watchdog
/// then interrupts KVM_RUN with a signal); parks it whenever `control` asks for a pause, but
/// only after a KVM_RUN a signal ended (or before the first): after a port or MMIO exit, the
/// next KVM_RUN completes the access, and state read before it would lose that.
pub fn run(
    vcpu: &mut VcpuFd,
    id: usize,
    reader: &StateReader,
    bus: &dyn Bus,
    stop: &AtomicBool,
    control: &crate::control::VmControl,
) -> Outcome {
    let mut settled = true;
    loop {
        if settled {
            let capture =
                || crate::snapshot::vcpu_state::VcpuState::capture(id as u8, vcpu, &reader.msrs, reader.xsave_size);
            control.park_if_asked(id, &capture);
        }
        if stop.load(Ordering::SeqCst) {
            return Outcome::TimedOut;
        }
        settled = false;
        match vcpu.run() {
            Ok(VcpuExit::IoOut(port, data)) => {
                if port == abi::DEBUG_EXIT_PORT {
                    let mut raw = [0u8; 4];
                    let n = data.len().min(4);
                    raw[..n].copy_from_slice(&data[..n]);
                    return Outcome::Exited(u32::from_le_bytes(raw));
                }
                bus.pio_write(port, data);
            }
            Ok(VcpuExit::IoIn(port, data)) => bus.pio_read(port, data),
            Ok(VcpuExit::MmioRead(addr, data)) => bus.mmio_read(addr, data),
            Ok(VcpuExit::MmioWrite(addr, data)) => bus.mmio_write(addr, data),
            Ok(VcpuExit::Hlt) => {
                // Without the in-kernel irqchip a halted guest with interrupts off is done.
                return Outcome::InternalError("the guest halted".into());
            }
            Ok(VcpuExit::Shutdown) => return Outcome::Shutdown,
            Ok(VcpuExit::InternalError) => return Outcome::InternalError("KVM internal error".into()),
            Ok(VcpuExit::FailEntry(reason, cpu)) => {
                return Outcome::InternalError(format!("KVM entry failed (reason {reason:#x} on CPU {cpu})"));
            }
            Ok(VcpuExit::SystemEvent(kind, _)) => return Outcome::InternalError(format!("system event {kind}")),
            Ok(other) => log::debug!("unhandled vCPU exit {other:?}"),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                vcpu.set_kvm_immediate_exit(0);
                settled = true;
            }
            Err(e) => return Outcome::InternalError(format!("KVM_RUN: {e}")),
        }
    }
}
