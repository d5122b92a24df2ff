//! vhost-user-blk as a hostile guest drives it: descriptor tables, available rings and buffers
//! laid out from the input, served by the real device (over the null engine, or pread/pwrite
//! on a temporary file) through `handle_event`, as the library's worker calls it on a kick.
//! Checks: no panic, no more used entries than offered, used lengths within what each chain
//! offered, every admitted request completed, every guest write inside guest memory.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pvkit_fuzz::{CheckingServices, Guest, Input, RING, post_all};
use pvkit_host_devices::blk::device::{BlkDevice, BlkOptions};
use pvkit_host_devices::blk::engine::{Engine, NullEngine, SyncEngine};
use pvkit_host_devices::blk::stats::Stats;
use pvkit_host_devices::queue::Gates;
use std::sync::{Arc, OnceLock};
use vhost_user_backend::VhostUserBackend;
use vmm_sys_util::epoll::EventSet;

const DISK: u64 = 1 << 20;

fn image() -> &'static tempfile::NamedTempFile {
    static IMAGE: OnceLock<tempfile::NamedTempFile> = OnceLock::new();
    IMAGE.get_or_init(|| {
        let file = tempfile::NamedTempFile::new().expect("temporary image");
        file.as_file().set_len(DISK).expect("image size");
        file
    })
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    let mode = input.byte();
    let queues = 1 + usize::from(mode & 1);
    let engine = if mode & 2 != 0 {
        let path = image().path().to_str().expect("a UTF-8 temporary path");
        Engine::Sync(SyncEngine::open(path, mode & 4 != 0, false).expect("opening the image"))
    } else {
        Engine::Null(NullEngine::new(DISK).expect("null engine"))
    };
    let options = BlkOptions {
        num_queues: queues as u16,
        queue_size: RING,
        serial: "fuzz".into(),
        logical_block_size: 512,
        read_only: mode & 4 != 0,
        poll_us: 0,
    };
    let services = Arc::new(CheckingServices::new(input.u64()));
    let gates = Arc::new(Gates::new(queues));
    let device =
        BlkDevice::with_services(Arc::new(engine), options, Arc::new(Stats::default()), gates, services.clone())
            .expect("a device");
    device.acked_features(input.u64() & device.features());
    let mut guest = Guest::new(queues, mode & 8 != 0);
    device.update_memory(guest.atomic.clone()).expect("memory");
    let (offered, capacities) = post_all(&mut guest, queues, &mut input);
    for q in 0..queues {
        let _ = device.handle_event(q as u16, EventSet::IN, &guest.vrings, 0);
    }
    for q in 0..queues {
        guest.check_used(q, 0, offered[q], &capacities[q]);
    }
    services.check_balanced();
});
