//! Finding devices: virtio-mmio windows named by `virtio_mmio.device=` entries on the command
//! line (or, when there are none, the microvm slots probed one by one), and modern virtio-pci
//! functions on bus 0.

use crate::hal::GuestHal;
use pvkit_guest_driver::hal::Hal;
use pvkit_guest_driver::transport::mmio::MmioTransport;
use pvkit_guest_driver::transport::pci::{self, Bdf, PciTransport, PortConfigSpace};
use pvkit_guest_driver::transport::{AnyTransport, Transport};
use pvkit_protocol::abi::{self, MmioDeviceEntry};
use pvkit_protocol::mmio;

/// A device found, with what its interrupts and doorbells need.
pub struct Found {
    pub transport: AnyTransport,
    /// The microvm slot of a virtio-mmio device (names its doorbell ports).
    pub slot: Option<u32>,
    /// The IOAPIC pin of a virtio-mmio device, when the command line gave it.
    pub irq: Option<u32>,
}

const MAX_DEVICES: usize = 16;

/// Up to 16 devices, in discovery order.
pub struct Devices {
    items: [Option<Found>; MAX_DEVICES],
    len: usize,
}

impl Devices {
    fn push(&mut self, found: Found) {
        if self.len < MAX_DEVICES {
            self.items[self.len] = Some(found);
            self.len += 1;
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    /// Takes the first device of virtio type `id`.
    pub fn take(&mut self, id: u32) -> Option<Found> {
        self.items.iter_mut().find(|f| f.as_ref().is_some_and(|f| f.transport.device_id() == id))?.take()
    }
}

fn open_mmio(entry: &MmioDeviceEntry, irq: Option<u32>) -> Option<Found> {
    let base = GuestHal::mmio_phys_to_virt(entry.base, mmio::WINDOW_SIZE as usize);
    // SAFETY: the window is identity-mapped device memory (or unbacked, reading as no device),
    // and each window is opened once.
    let transport = unsafe { MmioTransport::new(base) }.ok()?;
    crate::println!(
        "tiny-guest: virtio-mmio v{} device {} at {:#x}",
        transport.version(),
        transport.device_id(),
        entry.base
    );
    let slot = abi::slot_of(entry.base).map(|(slot, _)| slot);
    Some(Found { transport: AnyTransport::Mmio(transport), slot, irq })
}

/// Every device the guest can find.
pub fn find(cmdline: &str) -> Devices {
    let mut devices = Devices { items: Default::default(), len: 0 };
    let mut named = 0;
    for (key, value) in abi::params(cmdline) {
        if key != abi::key::VIRTIO_MMIO_DEVICE {
            continue;
        }
        match value.map(MmioDeviceEntry::parse) {
            Some(Ok(entry)) => {
                named += 1;
                if let Some(found) = open_mmio(&entry, Some(entry.irq)) {
                    devices.push(found);
                }
            }
            _ => crate::println!("tiny-guest: ignoring a malformed {key} entry"),
        }
    }
    if named == 0 {
        for slot in 0..abi::MICROVM_SLOTS_ACPI {
            if let Some(entry) = MmioDeviceEntry::for_slot(slot)
                && let Some(found) = open_mmio(&entry, None)
            {
                devices.push(found);
            }
        }
    }
    let config = PortConfigSpace;
    for device in 0..32 {
        let bdf = Bdf { bus: 0, device, function: 0 };
        if pci::virtio_device_type(&config, bdf).is_none() {
            continue;
        }
        match PciTransport::new::<GuestHal>(&config, bdf) {
            Ok(transport) => {
                crate::println!("tiny-guest: virtio-pci device {} at 00:{device:02x}.0", transport.device_id());
                devices.push(Found { transport: AnyTransport::Pci(transport), slot: None, irq: None });
            }
            Err(e) => crate::println!("tiny-guest: virtio-pci 00:{device:02x}.0: {e}"),
        }
    }
    devices
}
