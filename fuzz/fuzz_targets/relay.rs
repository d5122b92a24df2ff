//! The relay in front of every backend's vhost-user handler, fed arbitrary byte streams with
//! arbitrary file descriptors (files of various sizes, sockets) on the control channel, in
//! arbitrary chunks. Checks: no panic; when the frontend goes away, both sides are closed
//! within seconds (no thread left blocked); and every descriptor sent is closed again (the
//! process's open-descriptor count comes back to where it was).
#![no_main]

use libfuzzer_sys::fuzz_target;
use pvkit_fuzz::Input;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").map(|d| d.count()).unwrap_or(0)
}

fn file_fd(size: u64) -> OwnedFd {
    let file = vmm_sys_util::tempfile::TempFile::new_in(std::path::Path::new("/dev/shm"))
        .expect("a temporary file")
        .into_file();
    file.set_len(size).expect("file size");
    OwnedFd::from(file)
}

/// A descriptor of another kind than a file: one end of a socket pair.
fn socket_fd() -> OwnedFd {
    OwnedFd::from(UnixStream::pair().expect("a socket pair").0)
}

/// Reads until end of stream or `deadline`; whether the stream ended.
fn drain_until_closed(socket: &mut UnixStream, deadline: Instant) -> bool {
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline {
        match socket.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => std::thread::yield_now(),
            Err(_) => return true,
        }
    }
    false
}

fuzz_target!(|data: &[u8]| {
    let before = open_fds();
    {
        let (mut frontend, relay_frontend) = UnixStream::pair().expect("a socket pair");
        let (relay_handler, mut handler) = UnixStream::pair().expect("a socket pair");
        let dirty = Some(std::sync::Arc::new(pvkit_host_devices::queue::dirty_log::DirtyLog::new()));
        let taken = pvkit_host_devices::relay::Taken { dirty, ..Default::default() };
        pvkit_host_devices::relay::start("fuzz", relay_frontend, relay_handler, taken).expect("the relay");
        // Never wait: what the relay has not moved yet is read later or not at all; a full
        // socket ends the input.
        for socket in [&frontend, &handler] {
            socket.set_nonblocking(true).expect("non-blocking");
        }
        let mut input = Input::new(data);
        for _ in 0..64 {
            if input.rest_len() == 0 {
                break;
            }
            let len = usize::from(input.u16() % 512);
            let fd_plan = input.byte();
            let chunk: Vec<u8> = (0..len).map(|_| input.byte()).collect();
            let fds: Vec<OwnedFd> = (0..fd_plan % 4)
                .map(|i| match fd_plan >> (2 + i) & 1 {
                    0 => file_fd(if fd_plan & 0x80 != 0 { 4096 } else { 1 << 20 }),
                    _ => socket_fd(),
                })
                .collect();
            let raw: Vec<i32> = fds.iter().map(AsRawFd::as_raw_fd).collect();
            let sent = if raw.is_empty() {
                frontend.write(&chunk)
            } else {
                frontend.send_with_fds(&[&chunk[..]], &raw).map_err(std::io::Error::from)
            };
            drop(fds);
            // Keep both directions moving; what the handler side would do is not the point.
            let mut buf = [0u8; 4096];
            let _ = handler.read(&mut buf);
            let _ = frontend.read(&mut buf);
            if sent.is_err() {
                break;
            }
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        frontend.shutdown(std::net::Shutdown::Write).expect("shutting the frontend's side");
        assert!(
            drain_until_closed(&mut handler, deadline),
            "the relay kept the handler's side open after the frontend left"
        );
        drop(handler);
        assert!(drain_until_closed(&mut frontend, deadline), "the relay kept the frontend's side open");
    }
    // The relay's threads close their sockets as they end; give them a moment.
    let deadline = Instant::now() + Duration::from_secs(5);
    while open_fds() > before && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(open_fds(), before, "descriptors left open after the relay ended");
});
