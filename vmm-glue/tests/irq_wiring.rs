//! Interrupt wiring, checked against KVM's own state, as far as a host whose guests cannot
//! take interrupts (a PVM-based KVM) allows: with a device's IOAPIC pin programmed and
//! unmasked and the local APIC enabled (KVM_SET_LAPIC), a signal on the eventfd the VMM hands
//! a backend as its call eventfd (registered as an irqfd on the pin, as `vm.rs` does) makes
//! the vector pending in the LAPIC's IRR (KVM_GET_LAPIC); the IOAPIC's IRR stays 0 for an
//! edge-triggered pin. No vCPU runs.

use kvm_bindings::{KVM_IRQCHIP_IOAPIC, kvm_irqchip, kvm_pit_config};
use kvm_ioctls::Kvm;
use pvkit_protocol::abi;
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

const SVR: usize = 0xf0;
const IRR: usize = 0x200;

fn lapic_u32(regs: &[std::os::raw::c_char; 1024], offset: usize) -> u32 {
    u32::from_le_bytes([regs[offset] as u8, regs[offset + 1] as u8, regs[offset + 2] as u8, regs[offset + 3] as u8])
}

#[test]
fn a_backend_call_lands_in_the_lapic_irr() {
    if !pvkit_vmm_glue::kvm_usable() {
        println!("SKIPPED irq_wiring: /dev/kvm is missing or not usable on this machine");
        return;
    }
    let kvm = Kvm::new().unwrap();
    let vm = kvm.create_vm().unwrap();
    vm.create_irq_chip().unwrap();
    vm.create_pit2(kvm_pit_config::default()).unwrap();
    let vcpu = vm.create_vcpu(0).unwrap();

    // Local APIC on (software enable in the spurious-vector register).
    let mut lapic = vcpu.get_lapic().unwrap();
    let svr = lapic_u32(&lapic.regs, SVR) | 0x1ff;
    for (i, byte) in svr.to_le_bytes().iter().enumerate() {
        lapic.regs[SVR + i] = *byte as std::os::raw::c_char;
    }
    vcpu.set_lapic(&lapic).unwrap();

    // The pin of the device in slot 2: vector 0x35, fixed delivery to APIC 0, edge, unmasked.
    let slot = 2;
    let pin = abi::slot_irq(slot) as usize;
    let vector = 0x35u32;
    let mut chip = kvm_irqchip { chip_id: KVM_IRQCHIP_IOAPIC, ..Default::default() };
    vm.get_irqchip(&mut chip).unwrap();
    // SAFETY: for chip_id IOAPIC the union holds the IOAPIC state; its redirection entries are
    // plain 64-bit words.
    unsafe { chip.chip.ioapic.redirtbl[pin].bits = u64::from(vector) };
    vm.set_irqchip(&chip).unwrap();

    // The call eventfd, wired as the VMM wires it, and signalled as a backend signals it.
    let call = EventFd::new(EFD_NONBLOCK).unwrap();
    vm.register_irqfd(&call, pin as u32).unwrap();
    let before = vcpu.get_lapic().unwrap();
    assert_eq!(lapic_u32(&before.regs, IRR + 0x10 * (vector as usize / 32)) & (1 << (vector % 32)), 0);
    call.write(1).unwrap();
    let mut pending = false;
    for _ in 0..100 {
        let after = vcpu.get_lapic().unwrap();
        if lapic_u32(&after.regs, IRR + 0x10 * (vector as usize / 32)) & (1 << (vector % 32)) != 0 {
            pending = true;
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    assert!(pending, "vector {vector:#x} never became pending in the LAPIC's IRR");
    let mut chip = kvm_irqchip { chip_id: KVM_IRQCHIP_IOAPIC, ..Default::default() };
    vm.get_irqchip(&mut chip).unwrap();
    // SAFETY: as above.
    let ioapic_irr = unsafe { chip.chip.ioapic.irr };
    assert_eq!(ioapic_irr & (1 << pin), 0, "an edge-triggered pin leaves no IRR bit in the IOAPIC");
}
