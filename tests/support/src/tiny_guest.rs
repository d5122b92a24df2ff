//! Reading the tiny guest's result line, and playing the host side of its console check.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::time::Duration;

/// The guest's `PVKIT-RESULT {...}` line, taken apart.
#[derive(Debug, Clone)]
pub struct GuestResult {
    /// The whole line.
    pub line: String,
    /// `poll` or `irq`.
    pub mode: String,
    /// Every check, in order.
    pub checks: Vec<(String, bool)>,
    /// Doorbell mechanism per device.
    pub doorbells: Vec<(String, String)>,
}

fn object<'a>(line: &'a str, key: &str) -> &'a str {
    line.split(&format!("\"{key}\":{{")).nth(1).and_then(|r| r.split('}').next()).unwrap_or("")
}

fn pairs(body: &str) -> Vec<(String, String)> {
    body.split(',')
        .filter(|p| !p.is_empty())
        .filter_map(|p| p.split_once(':'))
        .map(|(k, v)| (k.trim_matches('"').to_string(), v.trim_matches('"').to_string()))
        .collect()
}

impl GuestResult {
    /// Finds and parses the result line in a serial log.
    pub fn parse(serial: &str) -> Option<GuestResult> {
        let line = serial.lines().find_map(|l| l.trim_end_matches('\r').strip_prefix("PVKIT-RESULT "))?.to_string();
        let mode = line.split("\"mode\":\"").nth(1).and_then(|r| r.split('"').next()).unwrap_or("").to_string();
        let checks = pairs(object(&line, "checks")).into_iter().map(|(k, v)| (k, v == "true")).collect();
        let doorbells = pairs(object(&line, "doorbells"));
        Some(GuestResult { line, mode, checks, doorbells })
    }

    /// A check's value, if the guest ran it.
    pub fn check(&self, name: &str) -> Option<bool> {
        self.checks.iter().find(|(n, _)| n == name).map(|(_, v)| *v)
    }

    /// Whether there were checks and all passed.
    pub fn all_passed(&self) -> bool {
        !self.checks.is_empty() && self.checks.iter().all(|(_, v)| *v)
    }

    /// The doorbell mechanism a device used.
    pub fn doorbell(&self, device: &str) -> Option<&str> {
        self.doorbells.iter().find(|(d, _)| d == device).map(|(_, m)| m.as_str())
    }

    /// Panics unless every check in `expected` ran and every check passed.
    pub fn assert_passed(&self, expected: &[&str], log: &str) {
        for name in expected {
            assert_eq!(self.check(name), Some(true), "check {name} missing or failed:\n{log}");
        }
        assert!(self.all_passed(), "a check failed:\n{log}");
    }
}

/// Waits for the guest's console ping on `stream` and answers it; false if it never came.
pub fn answer_console_ping(mut stream: impl Read + Write) -> bool {
    let mut seen = Vec::new();
    let mut buf = [0u8; 256];
    while !String::from_utf8_lossy(&seen).contains("PVKIT-CONSOLE-PING") {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => return false,
            Ok(n) => seen.extend_from_slice(&buf[..n]),
        }
    }
    stream.write_all(b"PVKIT-CONSOLE-PONG\n").is_ok()
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

/// The same over TCP to 127.0.0.1:`port`.
pub fn console_peer_tcp(port: u16) -> std::thread::JoinHandle<bool> {
    std::thread::spawn(move || {
        for _ in 0..200 {
            if let Ok(stream) = std::net::TcpStream::connect(("127.0.0.1", port)) {
                let _ = stream.set_read_timeout(Some(Duration::from_secs(60)));
                return answer_console_ping(stream);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn result_lines_are_parsed() {
        let log = "noise\nPVKIT-RESULT {\"mode\":\"poll\",\"checks\":{\"blk_write_read\":true,\"net_arp\":false},\"doorbells\":{\"blk\":\"port-doorbell\"},\"irqs\":0}\r\nmore";
        let r = GuestResult::parse(log).unwrap();
        assert_eq!(r.mode, "poll");
        assert_eq!(r.check("blk_write_read"), Some(true));
        assert_eq!(r.check("net_arp"), Some(false));
        assert_eq!(r.check("console_read"), None);
        assert!(!r.all_passed());
        assert_eq!(r.doorbell("blk"), Some("port-doorbell"));
        assert!(GuestResult::parse("no result").is_none());
    }
}
