//! A minimal HTTP/1.1 client for tests of the control API: one request per connection
//! (`Connection: close`), over a unix socket or TCP, written from RFC 9112 alone.

use crate::{HarnessError, Result};
use std::io::{Read, Write};
use std::path::Path;
use std::time::Duration;

/// A response: status code and body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// The status code.
    pub status: u16,
    /// The body, as text.
    pub body: String,
}

impl Response {
    /// The body as JSON (panics when it is not: for tests).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }
}

fn exchange(mut stream: impl Read + Write, method: &str, path: &str, body: &str) -> Result<Response> {
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let io = |what: &str| HarnessError::io(format!("HTTP {method} {path}: {what}"));
    stream.write_all(request.as_bytes()).map_err(io("sending"))?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).map_err(io("receiving"))?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status =
        head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).ok_or_else(|| HarnessError::Unexpected {
            what: format!("HTTP {method} {path}"),
            detail: format!("no status line in {head:?}"),
        })?;
    let body =
        if head.to_ascii_lowercase().contains("transfer-encoding: chunked") { dechunk(body) } else { body.into() };
    Ok(Response { status, body })
}

/// The body of a chunked response.
fn dechunk(mut rest: &str) -> String {
    let mut out = String::new();
    while let Some((size, after)) = rest.split_once("\r\n") {
        let Ok(size) = usize::from_str_radix(size.trim(), 16) else { break };
        if size == 0 || after.len() < size {
            break;
        }
        out.push_str(&after[..size]);
        rest = after[size..].trim_start_matches("\r\n");
    }
    out
}

/// `method path` with `body` to the server on the unix socket `socket`.
pub fn unix(socket: &Path, method: &str, path: &str, body: &str) -> Result<Response> {
    let stream = std::os::unix::net::UnixStream::connect(socket)
        .map_err(HarnessError::io(format!("connecting to {}", socket.display())))?;
    stream.set_read_timeout(Some(Duration::from_secs(10))).map_err(HarnessError::io("a socket timeout"))?;
    exchange(stream, method, path, body)
}

/// `method path` with `body` to the server at `address` over TCP.
pub fn tcp(address: &str, method: &str, path: &str, body: &str) -> Result<Response> {
    let stream = std::net::TcpStream::connect(address).map_err(HarnessError::io(format!("connecting to {address}")))?;
    stream.set_read_timeout(Some(Duration::from_secs(10))).map_err(HarnessError::io("a socket timeout"))?;
    exchange(stream, method, path, body)
}
