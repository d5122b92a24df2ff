//! Reading the tiny guest's result line (re-exported from `pvkit-vmm-glue`), and playing the
//! host side of its console check.

pub use pvkit_vmm_glue::guest_report::{BenchLine, GuestResult};

use std::io::{Read, Write};
use std::path::PathBuf;
use std::time::Duration;

/// Waits for the guest's console ping on `stream` and answers it; false if it never came.
/// Afterwards a detached thread keeps reading (and discarding) what the guest writes, as a
/// terminal would: a console host side that stops reading holds the guest's output back.
pub fn answer_console_ping<S: Read + Write + Send + 'static>(stream: S) -> bool {
    answer_console_ping_with(stream, false)
}

/// Like [`answer_console_ping`]; with `bytewise`, the answer goes one byte at a time, 20 ms
/// apart (rust-vmm's `vhost-device-console` 0.1.0 adds a used entry per byte when several
/// bytes fill one receive buffer, which no driver can read correctly; one byte per buffer
/// sidesteps that bug of the peer).
pub fn answer_console_ping_with<S: Read + Write + Send + 'static>(mut stream: S, bytewise: bool) -> bool {
    let mut seen = Vec::new();
    let mut buf = [0u8; 256];
    while !String::from_utf8_lossy(&seen).contains("PVKIT-CONSOLE-PING") {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => return false,
            Ok(n) => seen.extend_from_slice(&buf[..n]),
        }
    }
    let answer = b"PVKIT-CONSOLE-PONG\n";
    if bytewise {
        for byte in answer {
            if stream.write_all(&[*byte]).is_err() {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    } else if stream.write_all(answer).is_err() {
        return false;
    }
    std::thread::spawn(move || while matches!(stream.read(&mut buf), Ok(n) if n > 0) {});
    true
}

/// Connects (retrying for up to 10 s) to a unix socket that carries the guest's console and
/// answers its ping, in a thread.
pub fn console_peer_unix(path: PathBuf) -> std::thread::JoinHandle<bool> {
    std::thread::spawn(move || {
        for _ in 0..200 {
            if let Ok(stream) = std::os::unix::net::UnixStream::connect(&path) {
                let _ = stream.set_read_timeout(Some(Duration::from_secs(60)));
                return answer_console_ping(stream);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    })
}

/// The same over TCP to 127.0.0.1:`port`, answering one byte at a time when `bytewise`.
pub fn console_peer_tcp(port: u16, bytewise: bool) -> std::thread::JoinHandle<bool> {
    std::thread::spawn(move || {
        for _ in 0..200 {
            if let Ok(stream) = std::net::TcpStream::connect(("127.0.0.1", port)) {
                let _ = stream.set_read_timeout(Some(Duration::from_secs(60)));
                return answer_console_ping_with(stream, bytewise);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    })
}
