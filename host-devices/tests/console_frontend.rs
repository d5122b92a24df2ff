//! vhost-user-console over a real socket, driven by pvkit's test frontend: every port kind
//! carries data, the multiport control handshake, EMERG_WRITE, and no loss through a slow
//! reader.

use pvkit_protocol::console::{ControlEvent, ControlRepr, feature as cf, queue as cq};
use pvkit_protocol::virtio::{Features, feature as vf};
use pvkit_test_support::http;
use pvkit_test_support::process::ChildGuard;
use pvkit_test_support::vhost_frontend::{Buffer, TestFrontend};
use std::collections::HashMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};
use vm_memory::{Bytes, GuestAddress};

const WAIT: Duration = Duration::from_secs(10);

fn start(dir: &Path, ports: &[String]) -> (ChildGuard, PathBuf) {
    start_with(dir, ports, &[])
}

/// As [`start`], with `extra` arguments.
fn start_with(dir: &Path, ports: &[String], extra: &[&str]) -> (ChildGuard, PathBuf) {
    let socket = dir.join("console.sock");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_vhost-user-console"));
    cmd.arg("--socket-path").arg(&socket).args(extra);
    for p in ports {
        cmd.args(["--port", p]);
    }
    let mut child = ChildGuard::spawn("vhost-user-console", &mut cmd).unwrap();
    child.wait_for_socket(&socket, WAIT).unwrap();
    (child, socket)
}

fn features(multiport: bool) -> u64 {
    let mut f = Features::from_bits(&[vf::VERSION_1, cf::SIZE, cf::EMERG_WRITE]);
    if multiport {
        f = f.with(cf::MULTIPORT);
    }
    f.0
}

/// Sends `data` on transmit queue `q` from a fresh buffer and waits for it to be taken.
fn send(fe: &mut TestFrontend, q: usize, data: &[u8]) {
    let addr = fe.alloc(data.len() as u64, 8).unwrap();
    fe.mem().write_slice(data, GuestAddress(addr)).unwrap();
    fe.submit(q, &[Buffer { addr, len: data.len() as u32, device_writes: false }]).unwrap();
    fe.wait_used(q, WAIT).unwrap();
}

/// Posts `count` receive buffers of `len` bytes on queue `q`; returns head -> address.
fn post_rx(fe: &mut TestFrontend, q: usize, count: usize, len: u32) -> HashMap<u16, u64> {
    (0..count)
        .map(|_| {
            let addr = fe.alloc(len.into(), 8).unwrap();
            (fe.submit(q, &[Buffer { addr, len, device_writes: true }]).unwrap(), addr)
        })
        .collect()
}

fn receive(fe: &mut TestFrontend, q: usize, posted: &HashMap<u16, u64>) -> Vec<u8> {
    let (head, len) = fe.wait_used(q, WAIT).unwrap();
    let mut data = vec![0u8; len as usize];
    fe.mem().read_slice(&mut data, GuestAddress(posted[&head])).unwrap();
    data
}

fn read_file_until(path: &Path, expected_len: usize) -> Vec<u8> {
    let deadline = Instant::now() + WAIT;
    loop {
        let data = std::fs::read(path).unwrap_or_default();
        if data.len() >= expected_len || Instant::now() > deadline {
            return data;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn file_port_and_emergency_writes() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("guest.log");
    let (mut backend, socket) = start(dir.path(), &[format!("file:{}", log.display())]);
    let mut fe = TestFrontend::connect(&socket, 4 << 20, 2, 64, features(false)).unwrap();
    assert_eq!(fe.features & (1 << cf::MULTIPORT), 0, "one port: no MULTIPORT");
    let config = pvkit_protocol::console::ConfigRepr::parse(&fe.get_config(0, 12).unwrap()).unwrap();
    assert_eq!(config.max_nr_ports, 1);
    // EMERG_WRITE works before any queue carries data.
    fe.set_config(8, &[b'!', 0, 0, 0]).unwrap();
    for line in ["first line\n", "second line\n", "third line\n"] {
        send(&mut fe, 1, line.as_bytes());
    }
    fe.set_config(8, &[b'#', 0, 0, 0]).unwrap();
    let expected = b"!first line\nsecond line\nthird line\n#";
    assert_eq!(read_file_until(&log, expected.len()), expected);
    // A config write out of range is ignored (an error would end the connection); the
    // device goes on.
    fe.set_config(10, &[b'x'; 4]).unwrap();
    send(&mut fe, 1, b"after");
    let all = read_file_until(&log, expected.len() + 5);
    assert_eq!(&all[expected.len()..], b"after", "nothing from the refused write");
    backend.check_running().unwrap();
}

fn control(fe: &mut TestFrontend, id: u32, event: ControlEvent, value: u16) {
    let mut raw = [0u8; 8];
    ControlRepr { id, event, value }.emit(&mut raw).unwrap();
    send(fe, cq::CONTROL_TX.into(), &raw);
}

fn next_control(fe: &mut TestFrontend, posted: &HashMap<u16, u64>) -> (ControlRepr, Vec<u8>) {
    let msg = receive(fe, cq::CONTROL_RX.into(), posted);
    (ControlRepr::parse(&msg).unwrap(), msg[8..].to_vec())
}

#[test]
fn multiport_unix_and_tcp_with_the_control_handshake() {
    let dir = tempfile::tempdir().unwrap();
    let unix = dir.path().join("port0.sock");
    let tcp_port = 20000 + (std::process::id() % 20000) as u16;
    let (mut backend, socket) =
        start(dir.path(), &[format!("unix:{}", unix.display()), format!("tcp:{tcp_port},name=org.pvkit.test")]);
    let queues = usize::from(cq::count(2, true));
    let mut fe = TestFrontend::connect(&socket, 8 << 20, queues, 64, features(true)).unwrap();
    assert_ne!(fe.features & (1 << cf::MULTIPORT), 0);
    let ctrl = post_rx(&mut fe, cq::CONTROL_RX.into(), 16, 64);
    control(&mut fe, 0, ControlEvent::DeviceReady, 1);
    for port in 0..2 {
        let (msg, _) = next_control(&mut fe, &ctrl);
        assert_eq!((msg.id, msg.event, msg.value), (port, ControlEvent::DeviceAdd, 1));
    }
    control(&mut fe, 0, ControlEvent::PortReady, 1);
    let (msg, _) = next_control(&mut fe, &ctrl);
    assert_eq!((msg.id, msg.event), (0, ControlEvent::ConsolePort));
    control(&mut fe, 1, ControlEvent::PortReady, 1);
    let (msg, name) = next_control(&mut fe, &ctrl);
    assert_eq!((msg.id, msg.event, name.as_slice()), (1, ControlEvent::PortName, &b"org.pvkit.test\0"[..]));

    // A unix client connects to port 0: the guest is told the port opened.
    let mut client = std::os::unix::net::UnixStream::connect(&unix).unwrap();
    let (msg, _) = next_control(&mut fe, &ctrl);
    assert_eq!((msg.id, msg.event, msg.value), (0, ControlEvent::PortOpen, 1));
    // Host to guest on port 0.
    let rx0 = post_rx(&mut fe, cq::port_rx(0).into(), 4, 256);
    client.write_all(b"hello guest").unwrap();
    assert_eq!(receive(&mut fe, cq::port_rx(0).into(), &rx0), b"hello guest");
    // Guest to host on port 0.
    send(&mut fe, cq::port_tx(0).into(), b"hello host");
    let mut got = [0u8; 10];
    client.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"hello host");

    // Port 1 over tcp, both ways.
    let mut tcp = std::net::TcpStream::connect(("127.0.0.1", tcp_port)).unwrap();
    let (msg, _) = next_control(&mut fe, &ctrl);
    assert_eq!((msg.id, msg.event, msg.value), (1, ControlEvent::PortOpen, 1));
    send(&mut fe, cq::port_tx(1).into(), b"over tcp");
    let mut got = [0u8; 8];
    tcp.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"over tcp");
    let rx1 = post_rx(&mut fe, cq::port_rx(1).into(), 2, 64);
    tcp.write_all(b"tcp in").unwrap();
    assert_eq!(receive(&mut fe, cq::port_rx(1).into(), &rx1), b"tcp in");

    // Bad control input is ignored and service goes on.
    control(&mut fe, 9, ControlEvent::PortOpen, 1);
    send(&mut fe, cq::CONTROL_TX.into(), &[1, 2, 3]);
    drop(client);
    let (msg, _) = next_control(&mut fe, &ctrl);
    assert_eq!((msg.id, msg.event, msg.value), (0, ControlEvent::PortOpen, 0), "the client went away");
    backend.check_running().unwrap();
}

fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 31 + i / 4096) as u8).collect()
}

#[test]
fn nothing_is_lost_through_a_slow_reader() {
    const TOTAL: usize = 4 << 20;
    const CHUNK: usize = 4096;
    let dir = tempfile::tempdir().unwrap();
    let unix = dir.path().join("slow.sock");
    let (mut backend, socket) = start(dir.path(), &[format!("unix:{}", unix.display())]);
    let mut fe = TestFrontend::connect(&socket, 64 << 20, 2, 256, features(false)).unwrap();
    let data = pattern(TOTAL);
    let client = std::os::unix::net::UnixStream::connect(&unix).unwrap();
    let reader = std::thread::spawn(move || {
        let mut client = client;
        let mut got = Vec::with_capacity(TOTAL);
        let mut buf = vec![0u8; 16 * 1024];
        while got.len() < TOTAL {
            let n = client.read(&mut buf).unwrap();
            assert!(n > 0, "the backend closed the stream early");
            got.extend_from_slice(&buf[..n]);
            // A slow reader: far slower than the guest writes.
            std::thread::sleep(Duration::from_micros(500));
        }
        got
    });
    // Guest to host: keep up to 64 chunks in flight; the backend must hold back, not drop.
    let buffers: Vec<u64> = (0..64).map(|_| fe.alloc(CHUNK as u64, 8).unwrap()).collect();
    let mut free: Vec<u64> = buffers.clone();
    let mut in_flight: HashMap<u16, u64> = HashMap::new();
    let mut sent = 0;
    while sent < TOTAL || !in_flight.is_empty() {
        while sent < TOTAL && !free.is_empty() {
            let addr = free.pop().unwrap();
            fe.mem().write_slice(&data[sent..sent + CHUNK], GuestAddress(addr)).unwrap();
            let head = fe.submit(1, &[Buffer { addr, len: CHUNK as u32, device_writes: false }]).unwrap();
            in_flight.insert(head, addr);
            sent += CHUNK;
        }
        let (head, _) = fe.wait_used(1, Duration::from_secs(30)).unwrap();
        free.push(in_flight.remove(&head).unwrap());
    }
    let got = reader.join().unwrap();
    assert_eq!(got.len(), TOTAL);
    assert!(got == data, "bytes arrived out of order or changed");

    // Host to guest, from a new client (the reader has gone: the port takes the next one):
    // 1 MiB written at once waits for receive buffers the guest posts slowly.
    let mut writer = std::os::unix::net::UnixStream::connect(&unix).unwrap();
    let input = pattern(1 << 20);
    let to_send = input.clone();
    let w = std::thread::spawn(move || writer.write_all(&to_send).map(|()| writer));
    let mut received = Vec::new();
    while received.len() < input.len() {
        let posted = post_rx(&mut fe, 0, 1, 8192);
        received.extend(receive(&mut fe, 0, &posted));
    }
    assert!(received == input, "host input arrived out of order or changed");
    drop(w.join().unwrap().unwrap());
    backend.check_running().unwrap();
}

#[test]
fn pty_port_with_size_and_live_resize() {
    use std::io::BufRead;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("second.log");
    let socket = dir.path().join("console.sock");
    let mut child = Command::new(env!("CARGO_BIN_EXE_vhost-user-console"))
        .arg("--socket-path")
        .arg(&socket)
        .args(["--port", "pty", "--port"])
        .arg(format!("file:{},name=log", log.display()))
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut stderr = std::io::BufReader::new(child.stderr.take().unwrap());
    let _guard = Kill(child);
    let mut line = String::new();
    let pty = loop {
        line.clear();
        assert!(stderr.read_line(&mut line).unwrap() > 0, "the backend exited before naming its pty");
        if let Some(path) = line.trim().split(" is pty ").nth(1) {
            break PathBuf::from(path);
        }
    };
    std::thread::spawn(move || std::io::copy(&mut stderr, &mut std::io::sink()));
    let mut slave = pvkit_test_support::terminal::open_raw(&pty, 30, 100).unwrap();
    let deadline = Instant::now() + WAIT;
    while !socket.exists() {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(10));
    }

    let mut fe = TestFrontend::connect(&socket, 8 << 20, usize::from(cq::count(2, true)), 64, features(true)).unwrap();
    let mut backend_requests = fe.open_backend_requests().unwrap();
    let config = pvkit_protocol::console::ConfigRepr::parse(&fe.get_config(0, 12).unwrap()).unwrap();
    assert_eq!((config.rows, config.cols, config.max_nr_ports), (30, 100, 2));
    let ctrl = post_rx(&mut fe, cq::CONTROL_RX.into(), 32, 64);
    control(&mut fe, 0, ControlEvent::DeviceReady, 1);
    next_control(&mut fe, &ctrl);
    next_control(&mut fe, &ctrl);
    control(&mut fe, 0, ControlEvent::PortReady, 1);
    assert_eq!(next_control(&mut fe, &ctrl).0.event, ControlEvent::ConsolePort);
    let (msg, payload) = next_control(&mut fe, &ctrl);
    assert_eq!((msg.event, payload.as_slice()), (ControlEvent::Resize, &[30, 0, 100, 0][..]));
    assert_eq!(next_control(&mut fe, &ctrl).0.event, ControlEvent::PortOpen);

    // The terminal is resized: the guest hears of it on the control queue, and the frontend
    // gets a configuration-change message on its backend request channel.
    pvkit_test_support::terminal::resize(&slave, 40, 120).unwrap();
    let (msg, payload) = next_control(&mut fe, &ctrl);
    assert_eq!((msg.id, msg.event, payload.as_slice()), (0, ControlEvent::Resize, &[40, 0, 120, 0][..]));
    assert!(
        backend_requests.wait_config_change(WAIT).unwrap(),
        "no CONFIG_CHANGE_MSG on the backend request channel after a resize"
    );
    let config = pvkit_protocol::console::ConfigRepr::parse(&fe.get_config(0, 12).unwrap()).unwrap();
    assert_eq!((config.rows, config.cols), (40, 120));

    // Data both ways through the pty.
    send(&mut fe, cq::port_tx(0).into(), b"to the pty");
    let mut got = [0u8; 10];
    slave.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"to the pty");
    let rx = post_rx(&mut fe, cq::port_rx(0).into(), 2, 64);
    slave.write_all(b"typed").unwrap();
    assert_eq!(receive(&mut fe, cq::port_rx(0).into(), &rx), b"typed");
    // And port 1 writes its file.
    send(&mut fe, cq::port_tx(1).into(), b"log line\n");
    assert_eq!(read_file_until(&log, 9), b"log line\n");
}

#[test]
fn a_port_client_that_connects_before_the_frontend_is_served() {
    let dir = tempfile::tempdir().unwrap();
    let port = dir.path().join("early.sock");
    let (_backend, socket) = start(dir.path(), &[format!("unix:{}", port.display())]);
    // The host side connects first, before any frontend (and its memory table) exists.
    let mut client = std::os::unix::net::UnixStream::connect(&port).unwrap();
    client.set_read_timeout(Some(WAIT)).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let mut fe = TestFrontend::connect(&socket, 1 << 20, 2, 64, features(false)).unwrap();
    send(&mut fe, 1, b"early bird\n");
    let mut got = [0u8; 11];
    client.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"early bird\n");
}

#[test]
fn event_idx_frontends_keep_getting_served() {
    // A frontend that kicks only when the backend asked (RING_EVENT_IDX's avail_event), as a
    // specification-following driver does: a backend that forgets to re-arm, or stops
    // re-checking after a few rounds, leaves one of these writes waiting for good.
    let dir = tempfile::tempdir().unwrap();
    let port = dir.path().join("drain.sock");
    let (_backend, socket) = start(dir.path(), &[format!("unix:{}", port.display())]);
    let mut client = std::os::unix::net::UnixStream::connect(&port).unwrap();
    client.set_read_timeout(Some(WAIT)).unwrap();
    let wanted = Features(features(false)).with(vf::RING_EVENT_IDX).0;
    let mut fe = TestFrontend::connect(&socket, 1 << 20, 2, 64, wanted).unwrap();
    assert!(Features(fe.features).has(vf::RING_EVENT_IDX));
    let reader = std::thread::spawn(move || {
        let mut total = Vec::new();
        let mut buf = [0u8; 4096];
        while total.len() < 300 * 8 {
            match client.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => total.extend_from_slice(&buf[..n]),
            }
        }
        total
    });
    for i in 0..300u32 {
        send(&mut fe, 1, format!("{i:07}\n").as_bytes());
    }
    let got = reader.join().unwrap();
    let expected: Vec<u8> = (0..300u32).flat_map(|i| format!("{i:07}\n").into_bytes()).collect();
    assert_eq!(got, expected);
}

/// The console's services over a real socket: a delay rule holds the first output for 300 ms
/// (what follows waits behind it, in order); a byte limit on output, set at run time through
/// the API, paces 5000 bytes at 2000 bytes/s; a byte limit on input paces what the port's
/// client types. Nothing is lost or reordered.
#[test]
fn services_delay_output_and_pace_both_directions() {
    let dir = tempfile::tempdir().unwrap();
    let (port, api) = (dir.path().join("port.sock"), dir.path().join("api.sock"));
    let extra = [
        "--api-socket",
        api.to_str().unwrap(),
        "--fault",
        "op=tx,trigger=once,action=delay:300",
        "--limit",
        "rx:bw=2000",
    ];
    let (mut backend, socket) = start_with(dir.path(), &[format!("unix:{}", port.display())], &extra);
    let mut client = std::os::unix::net::UnixStream::connect(&port).unwrap();
    client.set_read_timeout(Some(WAIT)).unwrap();
    let mut fe = TestFrontend::connect(&socket, 4 << 20, 2, 64, features(false)).unwrap();
    std::thread::sleep(Duration::from_millis(200));

    let started = Instant::now();
    send(&mut fe, 1, b"first ");
    send(&mut fe, 1, b"second");
    let mut got = [0u8; 12];
    client.read_exact(&mut got).unwrap();
    let delayed = started.elapsed();
    assert_eq!(&got, b"first second");
    assert!(delayed >= Duration::from_millis(280), "the delayed output came after {delayed:?}");

    let limits = r#"{"limits":{"tx":{"bw":2000},"rx":{"bw":2000}}}"#;
    assert_eq!(http::unix(&api, "PUT", "/limits", limits).unwrap().status, 200);
    let output = pattern(5000);
    let started = Instant::now();
    for chunk in output.chunks(500) {
        send(&mut fe, 1, chunk);
    }
    let mut got = vec![0u8; output.len()];
    client.read_exact(&mut got).unwrap();
    let paced_out = started.elapsed().as_secs_f64();
    assert_eq!(got, output, "output through the limit, in order");

    let posted = post_rx(&mut fe, 0, 16, 512);
    let input = pattern(3000);
    let started = Instant::now();
    client.write_all(&input).unwrap();
    let mut got = Vec::new();
    while got.len() < input.len() {
        got.extend(receive(&mut fe, 0, &posted));
    }
    let paced_in = started.elapsed().as_secs_f64();
    assert_eq!(got, input, "input through the limit, in order");
    let (limits, faults) = (
        http::unix(&api, "GET", "/limits", "").unwrap().json(),
        http::unix(&api, "GET", "/faults", "").unwrap().json(),
    );
    println!(
        "console services: delayed output after {delayed:?}; 5000 bytes out in {paced_out:.2} s and 3000 in \
         {paced_in:.2} s at 2000 bytes/s"
    );
    // The buckets hold 0.1 s of their rate: 4800 bytes wait 2.4 s, 2800 bytes 1.4 s.
    assert!((1.6..6.0).contains(&paced_out), "5000 bytes out in {paced_out} s at 2000 bytes/s");
    assert!((0.9..5.0).contains(&paced_in), "3000 bytes in in {paced_in} s at 2000 bytes/s");
    assert!(limits["throttled"].as_u64() > Some(0), "{limits}");
    assert_eq!(faults["rules"][0]["injected"], 1, "{faults}");
    backend.check_running().unwrap();
}
