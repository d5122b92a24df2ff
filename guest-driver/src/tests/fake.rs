//! Test doubles: a `Hal` over the host allocator (physical = virtual), a fake transport that
//! records what the driver set up, and a thread that plays the device on the same memory.

use crate::hal::{DmaMemory, Hal, PAGE_SIZE, PhysAddr};
use crate::protocol::ring::{self, RingLayout, desc_flags};
use crate::transport::{NotifyTarget, RingPlacement, Transport, TransportError};
use core::ptr::NonNull;
use std::alloc::Layout;
use std::boxed::Box;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU16, AtomicU64, Ordering, fence};
use std::sync::{Arc, Mutex};
use std::vec::Vec;

/// Host memory as DMA memory.
pub struct TestHal;

// SAFETY: memory from the global allocator, page-aligned and zeroed, is valid for the test
// "device" thread too (same address space, physical = virtual), and is freed with the same
// layout.
unsafe impl DmaMemory for TestHal {
    fn dma_alloc(pages: usize) -> Option<(PhysAddr, NonNull<u8>)> {
        let layout = Layout::from_size_align(pages * PAGE_SIZE, PAGE_SIZE).ok()?;
        // SAFETY: the layout has a non-zero size (pages >= 1, checked by Dma::new).
        let ptr = NonNull::new(unsafe { std::alloc::alloc_zeroed(layout) })?;
        Some((ptr.as_ptr() as PhysAddr, ptr))
    }

    unsafe fn dma_dealloc(_paddr: PhysAddr, vaddr: NonNull<u8>, pages: usize) {
        let layout = Layout::from_size_align(pages * PAGE_SIZE, PAGE_SIZE).expect("layout");
        // SAFETY: the caller passes what dma_alloc returned, with the same size.
        unsafe { std::alloc::dealloc(vaddr.as_ptr(), layout) };
    }
}

// SAFETY: physical = virtual in this address space, so a register's
// address is its pointer and `virt_to_phys` is the identity.
unsafe impl Hal for TestHal {
    fn mmio_phys_to_virt(paddr: PhysAddr, _size: usize) -> NonNull<u8> {
        NonNull::new(paddr as *mut u8).expect("non-null")
    }

    fn virt_to_phys(vaddr: usize) -> PhysAddr {
        vaddr as PhysAddr
    }
}

/// What the fake device shares with its thread.
pub struct FakeState {
    pub status: AtomicU8,
    pub driver_features: AtomicU64,
    pub queues: Mutex<Vec<Option<RingLayout>>>,
    pub config: Mutex<Vec<u8>>,
    pub notify: Box<[AtomicU16]>,
}

/// A transport whose device is whatever the test thread does with the rings.
pub struct FakeTransport {
    pub device_id: u32,
    pub device_features: u64,
    pub max_queue: u16,
    pub state: Arc<FakeState>,
}

impl FakeTransport {
    pub fn new(device_id: u32, device_features: u64, queues: usize, config: Vec<u8>) -> FakeTransport {
        FakeTransport {
            device_id,
            device_features,
            max_queue: 256,
            state: Arc::new(FakeState {
                status: AtomicU8::new(0),
                driver_features: AtomicU64::new(0),
                queues: Mutex::new((0..queues).map(|_| None).collect()),
                config: Mutex::new(config),
                notify: (0..queues).map(|_| AtomicU16::new(0xffff)).collect(),
            }),
        }
    }
}

impl Transport for FakeTransport {
    fn device_id(&self) -> u32 {
        self.device_id
    }
    fn requires_version_1(&self) -> bool {
        true
    }
    fn read_device_features(&mut self) -> u64 {
        self.device_features
    }
    fn write_driver_features(&mut self, features: u64) {
        self.state.driver_features.store(features, Ordering::SeqCst);
    }
    fn max_queue_size(&mut self, queue: u16) -> u16 {
        if usize::from(queue) < self.state.queues.lock().unwrap().len() { self.max_queue } else { 0 }
    }
    fn ring_placement(&self) -> RingPlacement {
        RingPlacement::Separate
    }
    fn queue_set(&mut self, queue: u16, layout: &RingLayout) -> Result<(), TransportError> {
        let mut queues = self.state.queues.lock().unwrap();
        let slot = queues.get_mut(usize::from(queue)).ok_or(TransportError::NoSuchQueue(queue))?;
        *slot = Some(*layout);
        Ok(())
    }
    fn queue_used(&mut self, queue: u16) -> bool {
        self.state.queues.lock().unwrap().get(usize::from(queue)).is_some_and(Option::is_some)
    }
    fn notify_target(&mut self, queue: u16) -> Result<NotifyTarget, TransportError> {
        let cell = self.state.notify.get(usize::from(queue)).ok_or(TransportError::NoSuchQueue(queue))?;
        Ok(NotifyTarget::Pci16(NonNull::new(cell.as_ptr()).expect("non-null")))
    }
    fn status(&self) -> u8 {
        self.state.status.load(Ordering::SeqCst)
    }
    fn set_status(&mut self, status: u8) {
        self.state.status.store(status, Ordering::SeqCst);
        if status == 0 {
            self.state.queues.lock().unwrap().iter_mut().for_each(|q| *q = None);
        }
    }
    fn ack_interrupt(&mut self) -> u32 {
        0
    }
    fn config_generation(&self) -> u32 {
        0
    }
    fn read_config(&self, offset: usize, buf: &mut [u8]) -> Result<(), TransportError> {
        let config = self.state.config.lock().unwrap();
        let src = config
            .get(offset..offset + buf.len())
            .ok_or(TransportError::ConfigOutOfRange { offset, len: buf.len() })?;
        buf.copy_from_slice(src);
        Ok(())
    }
    fn write_config(&mut self, offset: usize, data: &[u8]) -> Result<(), TransportError> {
        let mut config = self.state.config.lock().unwrap();
        let dst = config
            .get_mut(offset..offset + data.len())
            .ok_or(TransportError::ConfigOutOfRange { offset, len: data.len() })?;
        dst.copy_from_slice(data);
        Ok(())
    }
}

/// Raw access to ring memory (physical = virtual).
pub fn read_u16(addr: u64) -> u16 {
    // SAFETY: the tests only pass addresses inside rings allocated by TestHal.
    unsafe { (addr as *const u16).read_volatile() }
}
pub fn write_u16(addr: u64, value: u16) {
    // SAFETY: as in `read_u16`.
    unsafe { (addr as *mut u16).write_volatile(value) }
}
pub fn write_u32(addr: u64, value: u32) {
    // SAFETY: as in `read_u16`.
    unsafe { (addr as *mut u32).write_volatile(value) }
}

/// A descriptor as the device sees it.
#[derive(Debug, Clone, Copy)]
pub struct Seen {
    pub addr: u64,
    pub len: u32,
    pub writable: bool,
}

fn descriptor(table: u64, index: u16) -> (Seen, u16, u16) {
    let mut raw = [0u8; ring::DESCRIPTOR_SIZE];
    let at = table + u64::from(index) * ring::DESCRIPTOR_SIZE as u64;
    for (i, byte) in raw.iter_mut().enumerate() {
        // SAFETY: inside the descriptor table (or an indirect table) the driver allocated.
        *byte = unsafe { ((at + i as u64) as *const u8).read_volatile() };
    }
    let d = ring::Descriptor::new_checked(&raw[..]).expect("16 bytes");
    let repr = ring::DescriptorRepr::parse(&d).expect("descriptor");
    (Seen { addr: repr.addr, len: repr.len, writable: repr.flags & desc_flags::WRITE != 0 }, repr.flags, repr.next)
}

/// Walks the chain at `head` (following an indirect table if there is one).
pub fn walk_chain(layout: &RingLayout, head: u16) -> Vec<Seen> {
    let mut out = Vec::new();
    let (first, flags, _) = descriptor(layout.desc, head);
    if flags & desc_flags::INDIRECT != 0 {
        let count = first.len as usize / ring::DESCRIPTOR_SIZE;
        let mut i = 0u16;
        for _ in 0..count {
            let (seen, flags, next) = descriptor(first.addr, i);
            out.push(seen);
            if flags & desc_flags::NEXT == 0 {
                break;
            }
            i = next;
        }
        return out;
    }
    let mut index = head;
    for _ in 0..layout.size {
        let (seen, flags, next) = descriptor(layout.desc, index);
        out.push(seen);
        if flags & desc_flags::NEXT == 0 {
            break;
        }
        index = next;
    }
    out
}

/// A thread serving one queue until stopped: for each available chain, `serve` gets the
/// chain's buffers and returns (used id, used length) to publish. With `avail_event`, the
/// device writes it after each pass (event-idx kicks); otherwise it leaves it alone.
pub struct DeviceThread {
    stop: Arc<AtomicBool>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl DeviceThread {
    pub fn spawn<F>(state: Arc<FakeState>, queue: usize, mut serve: F) -> DeviceThread
    where
        F: FnMut(u16, &[Seen]) -> (u32, u32) + Send + 'static,
    {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let handle = std::thread::spawn(move || {
            let mut last_avail = 0u16;
            let mut used_idx = 0u16;
            while !flag.load(Ordering::SeqCst) {
                let Some(layout) = state.queues.lock().unwrap().get(queue).copied().flatten() else {
                    std::thread::yield_now();
                    continue;
                };
                let avail = read_u16(layout.avail + 2);
                if avail == last_avail {
                    std::thread::yield_now();
                    continue;
                }
                fence(Ordering::Acquire);
                while last_avail != avail {
                    let head = read_u16(layout.avail + 4 + 2 * u64::from(last_avail % layout.size));
                    let chain = walk_chain(&layout, head);
                    let (id, len) = serve(head, &chain);
                    let at = layout.used + 4 + 8 * u64::from(used_idx % layout.size);
                    write_u32(at, id);
                    write_u32(at + 4, len);
                    used_idx = used_idx.wrapping_add(1);
                    last_avail = last_avail.wrapping_add(1);
                }
                fence(Ordering::Release);
                write_u16(layout.used + 2, used_idx);
                // Ask for a kick at the next available entry.
                write_u16(layout.used + ring::avail_event_offset(layout.size), last_avail);
            }
        });
        DeviceThread { stop, handle: Some(handle) }
    }
}

impl Drop for DeviceThread {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// Copies `len` bytes from guest address `addr`.
pub fn read_bytes(addr: u64, len: usize) -> Vec<u8> {
    // SAFETY: the tests pass buffers the driver posted, which stay alive until popped.
    (0..len).map(|i| unsafe { ((addr + i as u64) as *const u8).read_volatile() }).collect()
}

/// Writes bytes at guest address `addr`.
pub fn write_bytes(addr: u64, data: &[u8]) {
    for (i, b) in data.iter().enumerate() {
        // SAFETY: as in `read_bytes`, for device-writable buffers.
        unsafe { ((addr + i as u64) as *mut u8).write_volatile(*b) };
    }
}
