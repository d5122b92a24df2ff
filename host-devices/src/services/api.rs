//! The control API: HTTP/1.1 with JSON bodies over a unix socket (`--api-socket`), in the
//! manner of Firecracker's and cloud-hypervisor's API sockets, usable with
//! `curl --unix-socket PATH http://localhost/stats`; and `GET /metrics` alone over TCP
//! (`--metrics-addr`) for a Prometheus server to scrape.
//!
//! | endpoint | |
//! |---|---|
//! | `GET /stats` | per-queue counters, latency histogram and fault counters (JSON) |
//! | `GET /metrics` | the same in Prometheus's text exposition format |
//! | `GET /faults` | the fault rules with their counters |
//! | `PUT /faults` | `{"rules": [RULE, ...]}` replaces them all (checked first; nothing changes on an error) |
//! | `DELETE /faults` | removes them all |
//! | `GET /limits` | the rate limits in force, and how often and long queues waited |
//! | `PUT /limits` | `{"limits": {CLASS: LIMIT, ...}}` replaces them all (`{}`: none) |
//!
//! Bad requests get a 4xx status with `{"error": "..."}` saying what was wrong; nothing a
//! client sends reaches the devices' hot path except through the checked rules. Bodies are
//! read up to [`MAX_BODY`] bytes. The server is `tiny_http`: synchronous, its own threads, no
//! async runtime, unix sockets and TCP alike.

use super::DeviceServices;
use super::faults::RuleSpec;
use super::http::{self, Handler, PROMETHEUS_TEXT, error, json_reply};
pub use super::http::{MAX_BODY, Reply};
use log::info;
use serde::Deserialize;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Errors from setting the API up.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The socket could not be made.
    #[error("cannot listen on {address}: {source}")]
    Listen {
        /// Where.
        address: String,
        /// Why.
        source: std::io::Error,
    },
    /// The HTTP server could not start.
    #[error("cannot start the API server on {address}: {why}")]
    Start {
        /// Where.
        address: String,
        /// Why.
        why: String,
    },
}

/// The API's listening sockets, bound before the sandbox is entered; [`ApiServer::start`]
/// serves them (after it, so that the server's threads are confined too).
pub struct ApiServer {
    services: Arc<DeviceServices>,
    unix: Option<(std::os::unix::net::UnixListener, PathBuf)>,
    tcp: Option<std::net::TcpListener>,
}

/// The body of `PUT /faults`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FaultsBody {
    rules: Vec<RuleSpec>,
}

/// The body of `PUT /limits`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LimitsBody {
    limits: std::collections::BTreeMap<String, super::limits::LimitSpec>,
}

/// What a request to the API socket gets (`metrics_only`: the TCP listener, which serves
/// `GET /metrics` alone).
pub fn route(services: &DeviceServices, method: &str, path: &str, body: &[u8], metrics_only: bool) -> Reply {
    let path = path.split('?').next().unwrap_or(path);
    match (method, path) {
        ("GET", "/metrics") => Reply { status: 200, content_type: PROMETHEUS_TEXT, body: services.prometheus_text() },
        (_, "/metrics") => error(405, format!("{path} takes GET, not {method}")),
        _ if metrics_only => error(404, format!("only GET /metrics is served here, not {path}")),
        ("GET", "/stats") => {
            let mut stats = services.metrics.to_json();
            stats["faults"] = services.faults.to_json()["rules"].clone();
            stats["limits"] = services.limits.to_json();
            json_reply(200, &stats)
        }
        ("GET", "/faults") => json_reply(200, &services.faults.to_json()),
        ("GET", "/limits") => json_reply(200, &services.limits.to_json()),
        ("PUT", "/limits") => match serde_json::from_slice::<LimitsBody>(body) {
            Ok(LimitsBody { limits }) => match services.limits.set(limits) {
                Ok(()) => json_reply(200, &services.limits.to_json()),
                Err(e) => error(400, e),
            },
            Err(e) => error(400, format!("the body is not {{\"limits\": {{CLASS: LIMIT, ...}}}}: {e}")),
        },
        (_, "/limits") => error(405, format!("{path} takes GET or PUT, not {method}")),
        ("PUT", "/faults") => match serde_json::from_slice::<FaultsBody>(body) {
            Ok(FaultsBody { rules }) => match services.faults.set(rules) {
                Ok(()) => json_reply(200, &services.faults.to_json()),
                Err(e) => error(400, e),
            },
            Err(e) => error(400, format!("the body is not {{\"rules\": [RULE, ...]}}: {e}")),
        },
        ("DELETE", "/faults") => match services.faults.set(Vec::new()) {
            Ok(()) => json_reply(200, &services.faults.to_json()),
            Err(e) => error(500, e),
        },
        (_, "/stats") => error(405, format!("{path} takes GET, not {method}")),
        (_, "/faults") => error(405, format!("{path} takes GET, PUT or DELETE, not {method}")),
        _ => error(404, format!("no endpoint {path} (there are /stats, /metrics, /faults, /limits)")),
    }
}

impl ApiServer {
    /// Binds the sockets `args` asks for (a stale socket file at the path is replaced); `None`
    /// when it asks for none.
    pub fn bind(args: &super::ServiceArgs, services: Arc<DeviceServices>) -> Result<Option<ApiServer>, ApiError> {
        let unix = match &args.api_socket {
            Some(path) => {
                let _ = std::fs::remove_file(path);
                let listener = std::os::unix::net::UnixListener::bind(path)
                    .map_err(|source| ApiError::Listen { address: path.display().to_string(), source })?;
                Some((listener, path.clone()))
            }
            None => None,
        };
        let tcp = match args.metrics_addr {
            Some(address) => Some(
                std::net::TcpListener::bind(address)
                    .map_err(|source| ApiError::Listen { address: address.to_string(), source })?,
            ),
            None => None,
        };
        Ok((unix.is_some() || tcp.is_some()).then_some(ApiServer { services, unix, tcp }))
    }

    /// The unix socket's path, to be removed at exit.
    pub fn socket_path(&self) -> Option<&Path> {
        self.unix.as_ref().map(|(_, path)| path.as_path())
    }

    /// Serves the sockets, each in a thread of its own, for the rest of the process.
    pub fn start(self) -> Result<(), ApiError> {
        if let Some((listener, path)) = self.unix {
            let address = path.display().to_string();
            let server = tiny_http::Server::from_listener(listener, None)
                .map_err(|e| ApiError::Start { address: address.clone(), why: e.to_string() })?;
            spawn(server, self.services.clone(), false, address)?;
        }
        if let Some(listener) = self.tcp {
            let address = listener.local_addr().map(|a| a.to_string()).unwrap_or_default();
            let server = tiny_http::Server::from_listener(listener, None)
                .map_err(|e| ApiError::Start { address: address.clone(), why: e.to_string() })?;
            spawn(server, self.services, true, address)?;
        }
        Ok(())
    }
}

fn spawn(
    server: tiny_http::Server,
    services: Arc<DeviceServices>,
    metrics_only: bool,
    address: String,
) -> Result<(), ApiError> {
    info!("API on {address}{}", if metrics_only { " (GET /metrics)" } else { "" });
    let handler: Handler = Arc::new(move |method, path, body| route(&services, method, path, body, metrics_only));
    http::serve(server, handler).map_err(|e| ApiError::Start { address, why: e.to_string() })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::services::{QueueServices, Verdict, Work};

    fn services() -> Arc<DeviceServices> {
        DeviceServices::new(super::super::BLK, 1, &super::super::ServiceArgs::default()).unwrap()
    }

    #[test]
    fn endpoints_answer_and_bad_requests_get_4xx_without_changing_anything() {
        let s = services();
        assert_eq!(route(&s, "GET", "/stats", b"", false).status, 200);
        let metrics = route(&s, "GET", "/metrics", b"", false);
        assert_eq!((metrics.status, metrics.content_type), (200, PROMETHEUS_TEXT));
        let put = route(&s, "PUT", "/faults", br#"{"rules":[{"op":"read","sectors":[0,8],"action":"ioerr"}]}"#, false);
        assert_eq!(put.status, 200, "{}", put.body);
        assert_eq!(s.admit(&Work::new(0, "read", 512).at_sector(4)), Verdict::Fail);
        for (method, path, body, status) in [
            ("PUT", "/faults", &b"{not json"[..], 400),
            ("PUT", "/faults", br#"{"rules":[{"action":"ioerr","colour":"red"}]}"#, 400),
            ("PUT", "/faults", br#"{"rules":[{"op":"fly","action":"ioerr"}]}"#, 400),
            ("PUT", "/faults", br#"{"rules":[{"action":"drop"}]}"#, 400),
            ("PUT", "/faults", br#"{"rules":[{"trigger":{"every":0},"action":"ioerr"}]}"#, 400),
            ("POST", "/stats", b"", 405),
            ("GET", "/nothing", b"", 404),
        ] {
            let reply = route(&s, method, path, body, false);
            assert_eq!(reply.status, status, "{method} {path}: {}", reply.body);
            assert!(reply.body.contains("\"error\""), "{}", reply.body);
        }
        assert_eq!(s.admit(&Work::new(0, "read", 512).at_sector(4)), Verdict::Fail, "the rule survived the bad PUTs");
        assert_eq!(route(&s, "DELETE", "/faults", b"", false).status, 200);
        assert_eq!(s.admit(&Work::new(0, "read", 512).at_sector(4)), Verdict::Serve);
        assert_eq!(route(&s, "GET", "/stats", b"", true).status, 404, "the metrics listener serves /metrics alone");
    }
}
