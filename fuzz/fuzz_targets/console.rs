//! vhost-user-console as a hostile guest drives it: transmit chains for every port and
//! control-queue messages (every event, port id and length) laid out from the input, one port
//! or two with MULTIPORT, each a file. Checks: no panic, no more used entries than offered,
//! used lengths within what each chain offered, every guest write inside guest memory, every
//! admitted chain completed once.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pvkit_fuzz::{CheckingServices, Guest, Input, post_all};
use pvkit_host_devices::console::device::{ConsoleDevice, ConsoleHost};
use pvkit_host_devices::console::port::{HostPort, PortKind, PortSpec};
use pvkit_host_devices::queue::Gates;
use pvkit_host_devices::server::ServedDevice;
use std::sync::{Arc, OnceLock};
use vhost_user_backend::VhostUserBackend;
use vmm_sys_util::epoll::EventSet;

fn port_dir() -> &'static tempfile::TempDir {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| tempfile::tempdir().expect("a temporary directory"))
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    let mode = input.byte();
    let ports: Vec<HostPort> = (0..1 + usize::from(mode & 1))
        .map(|i| {
            // Each run starts its port files afresh, so they never grow across runs.
            let path = port_dir().path().join(format!("port{i}"));
            let _ = std::fs::remove_file(&path);
            let name = Some(format!("port{i}"));
            HostPort::open(PortSpec { kind: PortKind::File(path), name }).expect("a file port")
        })
        .collect();
    let services = Arc::new(CheckingServices::new(input.u64()));
    let host = Arc::new(ConsoleHost::new(ports));
    let device = ConsoleDevice::with_services(host, Arc::new(Gates::new(1)), services.clone()).expect("a device");
    device.acked_features(input.u64() & device.features());
    let queues = device.num_queues();
    assert!(queues <= pvkit_fuzz::MAX_QUEUES, "{queues} queues");
    let mut guest = Guest::new(queues, mode & 2 != 0);
    device.update_memory(guest.atomic.clone()).expect("memory");
    let (offered, capacities) = post_all(&mut guest, queues, &mut input);
    for _ in 0..2 {
        for q in 0..queues {
            let _ = device.handle_event(q as u16, EventSet::IN, &guest.vrings, 0);
        }
    }
    for q in 0..queues {
        guest.check_used(q, 0, offered[q], &capacities[q]);
    }
    device.stop_workers();
    services.check_balanced();
});
