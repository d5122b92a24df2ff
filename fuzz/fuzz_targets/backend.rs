//! A whole backend, in process: a sequence of vhost-user messages (memory tables, vring setup,
//! kicks, garbage) from the input, sent over a real socket through the relay to the
//! vhost-user library's handler and the real device (blk over the null engine, net over the
//! loopback, or console into a file), exactly as the server wires them; guest memory is a
//! shared file the input writes rings into. Checks: no panic in any thread (the fuzzer aborts
//! on one), and once the frontend goes away the connection ends (a hang is reported by the
//! fuzzer's timeout), its workers stop, and every descriptor it was sent or
//! made is closed again.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pvkit_fuzz::Input;
use pvkit_fuzz::frontend::{Frontend, open_fds};
use pvkit_host_devices::blk::device::{BlkDevice, BlkOptions};
use pvkit_host_devices::blk::engine::{Engine, NullEngine};
use pvkit_host_devices::blk::stats::Stats;
use pvkit_host_devices::console::device::{ConsoleDevice, ConsoleHost};
use pvkit_host_devices::console::port::{HostPort, PortKind, PortSpec};
use pvkit_host_devices::net::device::{NetDevice, NetOptions};
use pvkit_host_devices::net::side::NetworkSide;
use pvkit_host_devices::net::stats::NetStats;
use pvkit_host_devices::queue::Gates;
use pvkit_host_devices::server::ServedDevice;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

fn port_dir() -> &'static tempfile::TempDir {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| tempfile::tempdir().expect("a temporary directory"))
}

/// Serves one connection of `device` while `input` plays the frontend, then checks it ends.
fn serve<D: ServedDevice>(device: D, input: &mut Input<'_>) {
    let queues = device.num_queues();
    let mut frontend = Frontend::connect("fuzz", device.clone()).expect("a connection through the relay");
    frontend.play(input, queues);
    let mut connection = frontend.hang_up();
    connection.wait();
    device.stop_workers();
    connection.release(&device);
}

fuzz_target!(|data: &[u8]| {
    let before = open_fds();
    let mut input = Input::new(data);
    match input.byte() % 3 {
        0 => {
            let options = BlkOptions {
                num_queues: 2,
                queue_size: pvkit_fuzz::RING,
                serial: "fuzz".into(),
                logical_block_size: 512,
                read_only: false,
                poll_us: 0,
            };
            let engine = Engine::Null(NullEngine::new(1 << 20).expect("null engine"));
            let device = BlkDevice::new(Arc::new(engine), options, Arc::new(Stats::default()), Arc::new(Gates::new(2)))
                .expect("a device");
            serve(device, &mut input);
        }
        1 => {
            let options =
                NetOptions { pairs: 1, queue_size: pvkit_fuzz::RING, mac: [2, 0, 0, 0, 0, 1], mtu: 1500, poll_us: 0 };
            let device =
                NetDevice::new(options, NetworkSide::Loopback, Arc::new(NetStats::default()), Arc::new(Gates::new(1)))
                    .expect("a device");
            serve(device, &mut input);
        }
        _ => {
            let path = port_dir().path().join("port0");
            let _ = std::fs::remove_file(&path);
            let port = HostPort::open(PortSpec { kind: PortKind::File(path), name: None }).expect("a file port");
            let device =
                ConsoleDevice::new(Arc::new(ConsoleHost::new(vec![port])), Arc::new(Gates::new(1))).expect("a device");
            serve(device, &mut input);
        }
    }
    // The library's threads close what they hold as they end; give them a moment.
    let deadline = Instant::now() + Duration::from_secs(5);
    while open_fds() > before && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(open_fds(), before, "descriptors left open after the connection ended");
});
