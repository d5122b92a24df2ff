//! The `Bus` vCPU exits go to: COM1, and each device's virtio-mmio registers, found through a
//! slot table fixed when the VM is built.

use crate::device::VirtioDevice;
use crate::memory::GuestRam;
use crate::serial::Com1;
use crate::sync::lock;
use crate::vcpu::Bus;
use pvkit_protocol::abi::{self, Doorbells};
use pvkit_protocol::mmio::Register;
use std::sync::{Arc, Mutex};

/// The devices by virtio-mmio slot, fixed when the VM is built: finding the device of a vCPU
/// exit takes no lock, and an exit waits only for its own device's.
pub(crate) struct SlotTable<T = Mutex<VirtioDevice>> {
    slots: Vec<Option<Arc<T>>>,
}

impl<T> SlotTable<T> {
    pub(crate) fn new(devices: &[(u32, Arc<T>)]) -> SlotTable<T> {
        let mut slots = vec![None; abi::MMIO_SLOTS as usize];
        for (slot, device) in devices {
            if let Some(entry) = slots.get_mut(*slot as usize) {
                *entry = Some(device.clone());
            }
        }
        SlotTable { slots }
    }

    fn get(&self, slot: u32) -> Option<&Arc<T>> {
        self.slots.get(slot as usize)?.as_ref()
    }
}

/// What vCPU exits reach: COM1, the devices' virtio-mmio registers, and doorbell ports of
/// queues that do not exist.
pub(crate) struct VmBus {
    pub(crate) serial: Com1,
    pub(crate) devices: SlotTable,
    pub(crate) ram: Arc<GuestRam>,
    pub(crate) doorbells: Option<Doorbells>,
}

impl VmBus {
    fn device_at(&self, addr: u64) -> Option<(&Arc<Mutex<VirtioDevice>>, u64)> {
        let (slot, offset) = abi::slot_of(addr)?;
        self.devices.get(slot).map(|d| (d, offset))
    }
}

impl Bus for VmBus {
    fn pio_read(&self, port: u16, data: &mut [u8]) {
        if Com1::claims(port) {
            data.fill(0);
            if let Some(first) = data.first_mut() {
                *first = self.serial.read(port);
            }
            return;
        }
        data.fill(0xff);
    }

    fn pio_write(&self, port: u16, data: &[u8]) {
        if Com1::claims(port) {
            if let Some(value) = data.first() {
                self.serial.write(port, *value);
            }
            return;
        }
        // Doorbells for real queues are ioeventfds and never get here: a write to a doorbell
        // port of a queue that does not exist is a guest error for that device.
        if let Some((slot, queue)) = self.doorbells.and_then(|d| d.decode(port))
            && let Some(device) = self.devices.get(slot)
        {
            let mut device = lock(device);
            let offset = Register::QueueNotify.offset();
            device.mmio_write(offset, &u32::from(queue).to_le_bytes(), &self.ram);
        }
    }

    fn mmio_read(&self, addr: u64, data: &mut [u8]) {
        match self.device_at(addr) {
            Some((device, offset)) => lock(device).mmio_read(offset, data),
            None => data.fill(0xff),
        }
    }

    fn mmio_write(&self, addr: u64, data: &[u8]) {
        if let Some((device, offset)) = self.device_at(addr) {
            lock(device).mmio_write(offset, data, &self.ram);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn an_exit_for_one_device_does_not_wait_for_another_devices_lock() {
        let devices: Vec<(u32, Arc<Mutex<u32>>)> = (0..3).map(|slot| (slot, Arc::new(Mutex::new(slot)))).collect();
        let table = Arc::new(SlotTable::new(&devices));
        // Slot 0's lock is held (a reconnect, a slow backend) while slot 2 takes an exit.
        let _held = devices[0].1.lock().unwrap();
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        let exit = {
            let table = table.clone();
            std::thread::spawn(move || {
                let value = table.get(2).map(|d| *d.lock().unwrap());
                let _ = done_tx.send(value);
            })
        };
        assert_eq!(done_rx.recv_timeout(Duration::from_secs(5)), Ok(Some(2)), "the exit stalled");
        exit.join().unwrap();
        assert!(table.get(3).is_none() && table.get(u32::MAX).is_none(), "empty and absurd slots");
    }
}
