//! The HTTP/1.1 server behind every pvkit API socket: the backends' control API and
//! `pvkit run`'s VM API. `tiny_http` parses; a [`Handler`] maps (method, path, body) to a
//! [`Reply`]. Bodies are read up to [`MAX_BODY`] bytes; a larger one gets 413. Each server runs
//! in a thread of its own.

use log::warn;
use std::io::Read;
use std::sync::Arc;

/// The largest request body read.
pub const MAX_BODY: u64 = 64 * 1024;

/// JSON bodies.
pub const JSON: &str = "application/json";
/// Prometheus's text exposition format.
pub const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// A response: status, content type, body.
#[derive(Debug, PartialEq)]
pub struct Reply {
    /// The HTTP status.
    pub status: u16,
    /// The content type.
    pub content_type: &'static str,
    /// The body.
    pub body: String,
}

/// A JSON reply.
pub fn json_reply(status: u16, value: &serde_json::Value) -> Reply {
    Reply { status, content_type: JSON, body: value.to_string() }
}

/// An error reply: `{"error": message}`.
pub fn error(status: u16, message: impl std::fmt::Display) -> Reply {
    json_reply(status, &serde_json::json!({ "error": message.to_string() }))
}

/// What answers a request: (method, path, body) to a reply.
pub type Handler = Arc<dyn Fn(&str, &str, &[u8]) -> Reply + Send + Sync>;

/// Serves `server` with `handler` in a thread of its own, for the rest of the process.
pub fn serve(server: tiny_http::Server, handler: Handler) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("api".into())
        .spawn(move || {
            for request in server.incoming_requests() {
                answer(handler.as_ref(), request);
            }
        })
        .map(|_| ())
}

/// A server on the unix socket `path` (a stale socket file there is replaced).
pub fn unix_server(path: &std::path::Path) -> std::io::Result<tiny_http::Server> {
    let _ = std::fs::remove_file(path);
    let listener = std::os::unix::net::UnixListener::bind(path)?;
    tiny_http::Server::from_listener(listener, None).map_err(std::io::Error::other)
}

fn answer(handler: &(dyn Fn(&str, &str, &[u8]) -> Reply + Send + Sync), mut request: tiny_http::Request) {
    let mut body = Vec::new();
    let declared = request.body_length().unwrap_or(0) as u64;
    let reply = if declared > MAX_BODY {
        error(413, format!("a body of {declared} bytes; at most {MAX_BODY} are read"))
    } else {
        match request.as_reader().take(MAX_BODY + 1).read_to_end(&mut body) {
            Ok(n) if n as u64 > MAX_BODY => error(413, format!("a body over {MAX_BODY} bytes")),
            Ok(_) => handler(request.method().as_str(), request.url(), &body),
            Err(e) => error(400, format!("the body cannot be read: {e}")),
        }
    };
    let header = tiny_http::Header::from_bytes(&b"Content-Type"[..], reply.content_type.as_bytes());
    let mut response = tiny_http::Response::from_string(reply.body).with_status_code(reply.status);
    if let Ok(header) = header {
        response = response.with_header(header);
    }
    if let Err(e) = request.respond(response) {
        warn!("API: the answer could not be sent: {e}");
    }
}
