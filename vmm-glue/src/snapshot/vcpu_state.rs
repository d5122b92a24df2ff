//! The state KVM holds for one vCPU and for the VM's in-kernel devices, read out of KVM and
//! written back into it: registers, special registers, FPU and XSAVE, XCRs, the MSRs KVM lists,
//! the LAPIC, pending events and the multiprocessing state per vCPU; the irqchip (both PICs and
//! the IOAPIC), the PIT and the clock per VM.
//!
//! A vCPU's state is read by its own thread when it parks, after a KVM_RUN a signal ended (so
//! no port or MMIO access waits for the VMM to complete it), and written before its thread
//! starts.

use kvm_bindings::{
    CpuId, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_MAX_CPUID_ENTRIES, Msrs,
    kvm_clock_data, kvm_cpuid_entry2, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state, kvm_msr_entry,
    kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use serde::{Deserialize, Serialize};

/// Errors from reading or writing KVM state.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StateError {
    /// A KVM call failed.
    #[error("KVM {what} failed: {source}")]
    Kvm {
        /// Which call.
        what: &'static str,
        /// Why.
        source: kvm_ioctls::Error,
    },
    /// The host's XSAVE area is larger than KVM_GET_XSAVE can carry.
    #[error("the host's XSAVE area is {0} bytes, more than the 4096 KVM_GET_XSAVE carries")]
    XsaveTooLarge(i32),
    /// KVM took fewer of the saved MSRs than were given.
    #[error("KVM took {taken} of {given} MSRs; MSR {index:#x} was refused")]
    MsrRefused {
        /// MSRs written.
        taken: usize,
        /// MSRs given.
        given: usize,
        /// The first one refused.
        index: u32,
    },
    /// A list too long for KVM's array types.
    #[error("{what}: {count} entries is more than KVM takes")]
    TooMany {
        /// Which list.
        what: &'static str,
        /// How many.
        count: usize,
    },
}

fn kvm(what: &'static str) -> impl Fn(kvm_ioctls::Error) -> StateError {
    move |source| StateError::Kvm { what, source }
}

/// KVM_CAP_XSAVE2: the size of the vCPU's XSAVE area.
const CAP_XSAVE2: libc::c_ulong = 208;
/// The size of `kvm_xsave`, the area KVM_GET_XSAVE and KVM_SET_XSAVE carry.
const XSAVE_AREA: i32 = 4096;
/// MSRs read or written per KVM call.
const MSR_BATCH: usize = 64;

/// What one vCPU's thread needs to read its state: the MSRs KVM says it saves.
#[derive(Debug, Clone, Default)]
pub struct MsrList(pub Vec<u32>);

impl MsrList {
    /// The MSRs KVM lists for save and restore (KVM_GET_MSR_INDEX_LIST).
    pub fn from_kvm(kvm_handle: &Kvm) -> Result<MsrList, StateError> {
        let list = kvm_handle.get_msr_index_list().map_err(kvm("KVM_GET_MSR_INDEX_LIST"))?;
        Ok(MsrList(list.as_slice().to_vec()))
    }
}

/// Each vCPU's state as its thread read it when it last parked (`None`: not parked since).
pub type ParkedStates = Vec<Option<Result<VcpuState, StateError>>>;

/// One vCPU's state.
#[derive(Debug, Serialize, Deserialize)]
pub struct VcpuState {
    /// The vCPU's index.
    pub id: u8,
    /// CPUID as the VMM set it.
    pub cpuid: Vec<kvm_cpuid_entry2>,
    /// General registers.
    pub regs: kvm_regs,
    /// Segments, control registers, EFER, the APIC base.
    pub sregs: kvm_sregs,
    /// FPU, SSE and AVX state.
    pub xsave: kvm_xsave,
    /// Extended control registers.
    pub xcrs: kvm_xcrs,
    /// Debug registers.
    pub debugregs: kvm_debugregs,
    /// Every MSR KVM lists that it could read (the TSC among them).
    pub msrs: Vec<kvm_msr_entry>,
    /// The local APIC's registers.
    pub lapic: kvm_lapic_state,
    /// Pending exceptions, interrupts, NMIs and SMIs.
    pub events: kvm_vcpu_events,
    /// Running, halted, or waiting for a start-up IPI.
    pub mp_state: kvm_mp_state,
}

impl VcpuState {
    /// Reads `vcpu`'s state (vCPU `id`); `msrs` are the MSRs to read, `xsave_size` KVM's
    /// XSAVE area size ([`xsave_size`]).
    pub fn capture(id: u8, vcpu: &VcpuFd, msrs: &MsrList, xsave_size: i32) -> Result<VcpuState, StateError> {
        if xsave_size > XSAVE_AREA {
            return Err(StateError::XsaveTooLarge(xsave_size));
        }
        Ok(VcpuState {
            id,
            cpuid: vcpu.get_cpuid2(KVM_MAX_CPUID_ENTRIES).map_err(kvm("KVM_GET_CPUID2"))?.as_slice().to_vec(),
            regs: vcpu.get_regs().map_err(kvm("KVM_GET_REGS"))?,
            sregs: vcpu.get_sregs().map_err(kvm("KVM_GET_SREGS"))?,
            xsave: vcpu.get_xsave().map_err(kvm("KVM_GET_XSAVE"))?,
            xcrs: vcpu.get_xcrs().map_err(kvm("KVM_GET_XCRS"))?,
            debugregs: vcpu.get_debug_regs().map_err(kvm("KVM_GET_DEBUGREGS"))?,
            msrs: read_msrs(vcpu, &msrs.0)?,
            lapic: vcpu.get_lapic().map_err(kvm("KVM_GET_LAPIC"))?,
            events: vcpu.get_vcpu_events().map_err(kvm("KVM_GET_VCPU_EVENTS"))?,
            mp_state: vcpu.get_mp_state().map_err(kvm("KVM_GET_MP_STATE"))?,
        })
    }

    /// Writes this state into `vcpu`, which has not run yet: CPUID first (KVM fixes the
    /// vCPU's model from it), then the special and general registers, the FPU, the APIC and
    /// the MSRs, and last the events and the multiprocessing state. `xsave_size` is this
    /// host's XSAVE area size ([`xsave_size`]); a larger one than `kvm_xsave` is refused.
    pub fn apply(&self, vcpu: &VcpuFd, xsave_size: i32) -> Result<(), StateError> {
        if xsave_size > XSAVE_AREA {
            return Err(StateError::XsaveTooLarge(xsave_size));
        }
        let cpuid = CpuId::from_entries(&self.cpuid)
            .map_err(|_| StateError::TooMany { what: "CPUID", count: self.cpuid.len() })?;
        vcpu.set_cpuid2(&cpuid).map_err(kvm("KVM_SET_CPUID2"))?;
        vcpu.set_sregs(&self.sregs).map_err(kvm("KVM_SET_SREGS"))?;
        vcpu.set_regs(&self.regs).map_err(kvm("KVM_SET_REGS"))?;
        // SAFETY: this host's XSAVE area is no larger than `kvm_xsave` (KVM's XSAVE2 size was
        // checked above), so KVM reads no further than this struct.
        unsafe { vcpu.set_xsave(&self.xsave) }.map_err(kvm("KVM_SET_XSAVE"))?;
        vcpu.set_xcrs(&self.xcrs).map_err(kvm("KVM_SET_XCRS"))?;
        vcpu.set_debug_regs(&self.debugregs).map_err(kvm("KVM_SET_DEBUGREGS"))?;
        vcpu.set_lapic(&self.lapic).map_err(kvm("KVM_SET_LAPIC"))?;
        write_msrs(vcpu, &self.msrs)?;
        vcpu.set_vcpu_events(&self.events).map_err(kvm("KVM_SET_VCPU_EVENTS"))?;
        vcpu.set_mp_state(self.mp_state).map_err(kvm("KVM_SET_MP_STATE"))?;
        Ok(())
    }
}

/// KVM's XSAVE area size for vCPUs of `vm` (0 when KVM does not say, which means the
/// 4096-byte `kvm_xsave` holds it).
pub fn xsave_size(vm: &VmFd) -> i32 {
    vm.check_extension_raw(CAP_XSAVE2)
}

/// Reads every MSR in `indices` KVM lets this vCPU read; those it refuses are left out.
fn read_msrs(vcpu: &VcpuFd, indices: &[u32]) -> Result<Vec<kvm_msr_entry>, StateError> {
    let mut out = Vec::with_capacity(indices.len());
    let mut start = 0;
    while start < indices.len() {
        let batch = &indices[start..(start + MSR_BATCH).min(indices.len())];
        let entries: Vec<kvm_msr_entry> =
            batch.iter().map(|&index| kvm_msr_entry { index, ..Default::default() }).collect();
        let mut msrs =
            Msrs::from_entries(&entries).map_err(|_| StateError::TooMany { what: "MSRs", count: entries.len() })?;
        let read = vcpu.get_msrs(&mut msrs).map_err(kvm("KVM_GET_MSRS"))?.min(batch.len());
        out.extend_from_slice(&msrs.as_slice()[..read]);
        if read < batch.len() {
            // KVM stops at the first MSR it cannot read: leave that one out, go on after it.
            log::debug!("MSR {:#x} is not readable here; not saved", batch[read]);
            start += read + 1;
        } else {
            start += batch.len();
        }
    }
    Ok(out)
}

/// Writes `entries` into the vCPU; every one must be taken.
fn write_msrs(vcpu: &VcpuFd, entries: &[kvm_msr_entry]) -> Result<(), StateError> {
    for (n, batch) in entries.chunks(MSR_BATCH).enumerate() {
        let msrs = Msrs::from_entries(batch).map_err(|_| StateError::TooMany { what: "MSRs", count: batch.len() })?;
        let taken = vcpu.set_msrs(&msrs).map_err(kvm("KVM_SET_MSRS"))?;
        if taken < batch.len() {
            return Err(StateError::MsrRefused {
                taken: n * MSR_BATCH + taken,
                given: entries.len(),
                index: batch[taken].index,
            });
        }
    }
    Ok(())
}

/// The state of the VM's in-kernel devices: the two PICs and the IOAPIC, the PIT, the clock.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ChipState {
    /// PIC master, PIC slave, IOAPIC (KVM_GET_IRQCHIP for each).
    pub irqchips: Vec<kvm_irqchip>,
    /// The PIT.
    pub pit: kvm_pit_state2,
    /// kvmclock's time.
    pub clock: kvm_clock_data,
}

impl ChipState {
    /// Reads the in-kernel devices of `vm`.
    pub fn capture(vm: &VmFd) -> Result<ChipState, StateError> {
        let mut irqchips = Vec::new();
        for chip_id in [KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_IRQCHIP_IOAPIC] {
            let mut chip = kvm_irqchip { chip_id, ..Default::default() };
            vm.get_irqchip(&mut chip).map_err(kvm("KVM_GET_IRQCHIP"))?;
            irqchips.push(chip);
        }
        Ok(ChipState {
            irqchips,
            pit: vm.get_pit2().map_err(kvm("KVM_GET_PIT2"))?,
            clock: vm.get_clock().map_err(kvm("KVM_GET_CLOCK"))?,
        })
    }

    /// Writes them into `vm` (created with its irqchip and PIT, before any vCPU runs).
    pub fn apply(&self, vm: &VmFd) -> Result<(), StateError> {
        for chip in &self.irqchips {
            vm.set_irqchip(chip).map_err(kvm("KVM_SET_IRQCHIP"))?;
        }
        vm.set_pit2(&self.pit).map_err(kvm("KVM_SET_PIT2"))?;
        // KVM_SET_CLOCK takes only the time (and, optionally, the realtime flag's pairing);
        // the flags KVM_GET_CLOCK reports about the host's clock are not for setting.
        let clock = kvm_clock_data { clock: self.clock.clock, ..Default::default() };
        vm.set_clock(&clock).map_err(kvm("KVM_SET_CLOCK"))?;
        Ok(())
    }
}
