//! A minimal HTTP/1.1 client for the control API (`pvkit stat`, the tests): one request per
//! connection (`Connection: close`), over a unix socket or TCP.

use std::io::{Read, Write};
use std::path::Path;
use std::time::Duration;

/// Errors from a request.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Connecting, sending or receiving failed.
    #[error("{what} {target}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// To whom.
        target: String,
        /// Why.
        source: std::io::Error,
    },
    /// The answer is not HTTP.
    #[error("{target} answered without a status line: {head:?}")]
    NoStatus {
        /// Who answered.
        target: String,
        /// What came instead.
        head: String,
    },
}

/// A response: status code and body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// The status code.
    pub status: u16,
    /// The body, as text.
    pub body: String,
}

impl Response {
    /// The body as JSON (`Null` when it is not JSON).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or(serde_json::Value::Null)
    }
}

fn exchange(
    mut stream: impl Read + Write,
    target: &str,
    method: &str,
    path: &str,
    body: &str,
) -> Result<Response, ClientError> {
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let io = |what: &'static str| move |source| ClientError::Io { what, target: target.to_string(), source };
    stream.write_all(request.as_bytes()).map_err(io("sending to"))?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).map_err(io("receiving from"))?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| ClientError::NoStatus { target: target.to_string(), head: head.chars().take(80).collect() })?;
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
pub fn unix(socket: &Path, method: &str, path: &str, body: &str) -> Result<Response, ClientError> {
    let target = socket.display().to_string();
    let failed = |what: &'static str| {
        let target = target.clone();
        move |source| ClientError::Io { what, target, source }
    };
    let stream = std::os::unix::net::UnixStream::connect(socket).map_err(failed("connecting to"))?;
    stream.set_read_timeout(Some(Duration::from_secs(10))).map_err(failed("setting a timeout on"))?;
    exchange(stream, &target, method, path, body)
}

/// `method path` with `body` to the server at `address` over TCP.
pub fn tcp(address: &str, method: &str, path: &str, body: &str) -> Result<Response, ClientError> {
    let failed = |what: &'static str| move |source| ClientError::Io { what, target: address.to_string(), source };
    let stream = std::net::TcpStream::connect(address).map_err(failed("connecting to"))?;
    stream.set_read_timeout(Some(Duration::from_secs(10))).map_err(failed("setting a timeout on"))?;
    exchange(stream, address, method, path, body)
}
