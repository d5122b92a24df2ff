//! A block device resuming from an in-flight region as a hostile frontend, or a backend that
//! crashed mid-write, might leave it: the region's bytes, the ring's used index and the rings
//! come from the input; the device examines the region on its first pass and serves what it
//! believes was in flight before anything new. Checks: no panic; no more used entries than
//! the guest offered plus one ring's worth of resubmitted heads; every admitted request
//! completed; and the region afterwards is one the next backend can read (version 1, every
//! flag 0 or 1).
#![no_main]

use libfuzzer_sys::fuzz_target;
use pvkit_fuzz::{CheckingServices, Guest, Input, RING, post_all};
use pvkit_host_devices::blk::device::{BlkDevice, BlkOptions};
use pvkit_host_devices::blk::engine::{Engine, NullEngine};
use pvkit_host_devices::blk::stats::Stats;
use pvkit_host_devices::queue::Gates;
use pvkit_host_devices::queue::inflight::allocate;
use pvkit_protocol::inflight::{InflightRepr, REGION_VERSION, desc_state_offset, header, queue_region_size};
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use vhost_user_backend::{VhostUserBackend, VringT};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::epoll::EventSet;

fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    let request = InflightRepr { num_queues: 1, queue_size: RING, ..Default::default() };
    let (fd, repr) = allocate(&request).expect("an in-flight area");
    let area = std::fs::File::from(fd);
    let region: Vec<u8> = (0..queue_region_size(RING)).map(|_| input.byte()).collect();
    area.write_all_at(&region, 0).expect("writing the region");
    let used = u16::from(input.byte());

    let options = BlkOptions {
        num_queues: 1,
        queue_size: RING,
        serial: "fuzz".into(),
        logical_block_size: 512,
        read_only: false,
        poll_us: 0,
    };
    let services = Arc::new(CheckingServices::new(input.u64()));
    let engine = Engine::Null(NullEngine::new(1 << 20).expect("null engine"));
    let device = BlkDevice::with_services(
        Arc::new(engine),
        options,
        Arc::new(Stats::default()),
        Arc::new(Gates::new(1)),
        services.clone(),
    )
    .expect("a device");
    let mut guest = Guest::new(1, false);
    device.update_memory(guest.atomic.clone()).expect("memory");
    let (offered, _) = post_all(&mut guest, 1, &mut input);
    // The ring as the frontend restores it after the crash: its base is the used index.
    let used_at = GuestAddress(0x1000 + 0x200 + 2);
    guest.mem.write_obj(used, used_at).expect("used index");
    guest.vrings[0].set_queue_next_avail(used);
    guest.vrings[0].set_queue_next_used(used);
    let inflight = device.core().inflight();
    inflight.set_area(area.try_clone().expect("the area again").into(), repr).expect("a well-formed area");
    inflight.ring_started(0);
    let _ = device.handle_event(0, EventSet::IN, &guest.vrings, 0);

    let published = guest.used_idx(0).wrapping_sub(used);
    assert!(published <= offered[0].saturating_add(RING), "{published} used entries for {} offered", offered[0]);
    let mut header_bytes = [0u8; 16];
    area.read_exact_at(&mut header_bytes, 0).expect("reading the region");
    assert_eq!(
        u16::from_le_bytes([header_bytes[header::VERSION as usize], header_bytes[header::VERSION as usize + 1]]),
        REGION_VERSION
    );
    for head in 0..RING {
        let mut flag = [0u8];
        area.read_exact_at(&mut flag, desc_state_offset(head)).expect("reading a flag");
        assert!(flag[0] <= 1, "head {head} has flag {}", flag[0]);
    }
    services.check_balanced();
});
