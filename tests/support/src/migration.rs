//! Live migration through QEMU's human monitor (HMP) on a unix socket: start it, follow
//! `info migrate` until it completes.

use crate::{HarnessError, Result};
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

/// Sends `command` to the monitor and returns what it printed up to its next prompt.
fn ask(monitor: &mut UnixStream, command: &str) -> Result<String> {
    monitor.write_all(format!("{command}\n").as_bytes()).map_err(HarnessError::io(format!("monitor: {command}")))?;
    read_to_prompt(monitor)
}

fn read_to_prompt(monitor: &mut UnixStream) -> Result<String> {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + Duration::from_secs(10);
    while !String::from_utf8_lossy(&out).trim_end().ends_with("(qemu)") {
        if Instant::now() > deadline {
            return Err(HarnessError::Unexpected {
                what: "the QEMU monitor".into(),
                detail: format!("no prompt within 10 s: {}", String::from_utf8_lossy(&out)),
            });
        }
        match monitor.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
            Err(e) => return Err(HarnessError::io("reading the QEMU monitor")(e)),
        }
    }
    // Without the echoed command line (drawn with terminal escapes) and the prompt.
    let text = String::from_utf8_lossy(&out).replace('\r', "");
    Ok(text.lines().filter(|l| !l.contains('\u{1b}') && !l.starts_with("(qemu)")).collect::<Vec<_>>().join("\n"))
}

/// Migrates the QEMU whose monitor listens at `monitor` to the one waiting on `incoming`;
/// returns the final `info migrate` once the status is `completed`, or an error when it
/// fails or `timeout` passes.
pub fn migrate(monitor: &Path, incoming: &Path, timeout: Duration) -> Result<String> {
    let mut socket =
        UnixStream::connect(monitor).map_err(HarnessError::io(format!("connecting to {}", monitor.display())))?;
    socket.set_read_timeout(Some(Duration::from_millis(100))).map_err(HarnessError::io("monitor timeout"))?;
    read_to_prompt(&mut socket)?;
    let started = ask(&mut socket, &format!("migrate -d unix:{}", incoming.display()))?;
    if started.to_lowercase().contains("error") {
        return Err(HarnessError::Unexpected { what: "migrate".into(), detail: started });
    }
    let deadline = Instant::now() + timeout;
    loop {
        let info = ask(&mut socket, "info migrate")?;
        // "Migration status: completed" (QEMU 7-9) or "Status: completed" (QEMU 10).
        let status = info
            .lines()
            .find_map(|l| l.to_lowercase().split_once("status:").map(|(_, s)| s.trim().to_string()))
            .unwrap_or_default();
        if status.starts_with("completed") {
            return Ok(info);
        }
        if status.starts_with("failed") || status.starts_with("cancelled") || Instant::now() > deadline {
            return Err(HarnessError::Unexpected { what: "the migration".into(), detail: info });
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}
