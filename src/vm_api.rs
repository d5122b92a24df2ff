//! `pvkit run --api-socket PATH`: the VM's control API, HTTP/1.1 with JSON bodies on a unix
//! socket, on the same server as the backends' API (`services::http`).
//!
//! | endpoint | |
//! |---|---|
//! | `GET /vm` | state (`created`, `running`, `paused`, `ended`), vCPUs, memory, devices |
//! | `PUT /vm/pause` | parks every vCPU and stops the devices' rings |
//! | `PUT /vm/resume` | starts the rings where they were and lets the vCPUs run again |
//! | `PUT /vm/snapshot` | body `{"dir": PATH}`: pauses (if running) and saves the VM into PATH; it stays paused |
//! | `PUT /vm/migrate` | body `{"socket": PATH, "live": BOOL, "live_ms": N}`: moves the VM to the `pvkit run --incoming PATH` (pre-copy when live, else stop-and-copy); this run then ends (exit 0) |
//! | `PUT /vm/shutdown` | ends the run (`pvkit run` exits 0) |

use pvkit_host_devices::services::http::{self, Handler, Reply, error, json_reply};
use pvkit_vmm_glue::control::{ControlError, VmControl};
use pvkit_vmm_glue::snapshot::SnapshotError;
use pvkit_vmm_glue::snapshot::migration::MigrationError;
use pvkit_vmm_glue::snapshot::outgoing::Mode;
use pvkit_vmm_glue::vm::DeviceSpec;
use std::path::Path;
use std::sync::Arc;

/// What `GET /vm` says besides the state.
pub struct VmDescription {
    /// vCPUs.
    pub vcpus: u8,
    /// Guest memory in bytes.
    pub memory: u64,
    /// The devices in slot order.
    pub devices: Vec<DeviceSpec>,
}

impl VmDescription {
    /// A VM restored from a snapshot with this manifest, on these sockets.
    pub fn restored(manifest: &pvkit_vmm_glue::snapshot::Manifest, sockets: &[std::path::PathBuf]) -> VmDescription {
        let devices = manifest
            .devices
            .iter()
            .zip(sockets)
            .filter_map(|(d, socket)| {
                let device = pvkit_protocol::virtio::DeviceId::try_from(d.virtio_id).ok()?;
                Some(DeviceSpec { device, socket: socket.clone() })
            })
            .collect();
        VmDescription { vcpus: manifest.vcpus, memory: manifest.memory.size, devices }
    }
}

/// The absolute path in `request[key]`, if there is one.
fn absolute_path(request: &serde_json::Value, key: &str) -> Option<std::path::PathBuf> {
    request[key].as_str().map(std::path::PathBuf::from).filter(|p| p.is_absolute())
}

/// `PUT /vm/snapshot` with `body` (`{"dir": PATH}`).
fn snapshot(control: &VmControl, body: &[u8]) -> Reply {
    let request = serde_json::from_slice::<serde_json::Value>(body).unwrap_or_default();
    let Some(dir) = absolute_path(&request, "dir") else {
        return error(400, "give the snapshot's directory as {\"dir\": \"/absolute/path\"}");
    };
    match control.snapshot(&dir) {
        Ok(saved) => json_reply(
            200,
            &serde_json::json!({
                "state": control.state().name(),
                "dir": saved.dir.display().to_string(),
                "memory": saved.memory,
                "nonzero_pages": saved.nonzero_pages,
                "bytes_on_disk": saved.bytes_on_disk,
                "save_ms": saved.elapsed.as_secs_f64() * 1000.0,
            }),
        ),
        Err(SnapshotError::Control(e @ ControlError::NotRunning)) => error(409, e),
        Err(e) => error(500, e),
    }
}

/// `PUT /vm/migrate` with `body` (`{"socket": PATH, "live": BOOL}`).
fn migrate(control: &VmControl, body: &[u8]) -> Reply {
    let request = serde_json::from_slice::<serde_json::Value>(body).unwrap_or_default();
    let Some(socket) = absolute_path(&request, "socket") else {
        return error(400, "give the destination as {\"socket\": \"/absolute/path\", \"live\": true|false}");
    };
    let mode = match (request["live"].as_bool().unwrap_or(false), request["live_ms"].as_u64().unwrap_or(0)) {
        (false, 0) => Mode::StopAndCopy,
        (false, _) => return error(400, "live_ms is for a live migration (\"live\": true)"),
        (true, ms) => Mode::PreCopy { at_least: std::time::Duration::from_millis(ms) },
    };
    match control.migrate(&socket, mode) {
        Ok(m) => json_reply(
            200,
            &serde_json::json!({
                "state": "migrated",
                "live": m.live,
                "rounds": m.rounds,
                "pages_live": m.pages_live,
                "pages_paused": m.pages_paused,
                "backend_pages": m.backend_pages,
                "downtime_ms": m.downtime.as_secs_f64() * 1000.0,
                "restore_ms": m.restore_ms,
            }),
        ),
        Err(MigrationError::Control(e @ ControlError::NotRunning)) => error(409, e),
        Err(e) => error(500, e),
    }
}

/// The answer to one request.
fn route(control: &VmControl, description: &VmDescription, method: &str, path: &str, body: &[u8]) -> Reply {
    let path = path.split('?').next().unwrap_or(path);
    let state = |control: &VmControl| serde_json::json!({ "state": control.state().name() });
    let act = |result: Result<(), ControlError>| match result {
        Ok(()) => json_reply(200, &state(control)),
        Err(e @ ControlError::NotRunning) => error(409, e),
        Err(e) => error(503, e),
    };
    match (method, path) {
        ("GET", "/vm") => {
            let status = control.devices();
            let devices: Vec<serde_json::Value> = description
                .devices
                .iter()
                .enumerate()
                .map(|(slot, d)| {
                    let live = status.iter().find(|s| s.slot as usize == slot);
                    serde_json::json!({
                        "slot": slot,
                        "name": live.map(|s| s.name.clone()),
                        "virtio_id": d.device.raw(),
                        "socket": d.socket.display().to_string(),
                        "features": live.map(|s| format!("{:#x}", s.features)),
                        "connected": live.map(|s| s.connected),
                        "queue_indexes": live.and_then(|s| s.paused_bases.clone()),
                        "violations": live.map(|s| s.violations),
                    })
                })
                .collect();
            json_reply(
                200,
                &serde_json::json!({
                    "state": control.state().name(),
                    "vcpus": description.vcpus,
                    "memory": description.memory,
                    "devices": devices,
                }),
            )
        }
        ("PUT", "/vm/pause") => act(control.pause()),
        ("PUT", "/vm/resume") => act(control.resume()),
        ("PUT", "/vm/shutdown") => act(control.shutdown()),
        ("PUT", "/vm/snapshot") => snapshot(control, body),
        ("PUT", "/vm/migrate") => migrate(control, body),
        (_, "/vm") => error(405, format!("{path} takes GET, not {method}")),
        (_, "/vm/pause" | "/vm/resume" | "/vm/shutdown" | "/vm/snapshot" | "/vm/migrate") => {
            error(405, format!("{path} takes PUT, not {method}"))
        }
        _ => error(
            404,
            format!(
                "no endpoint {path} (there are /vm, /vm/pause, /vm/resume, /vm/snapshot, /vm/migrate, /vm/shutdown)"
            ),
        ),
    }
}

/// Serves the API on `socket` for the rest of the process.
pub fn serve(socket: &Path, control: Arc<VmControl>, description: VmDescription) -> std::io::Result<()> {
    let server = http::unix_server(socket)?;
    let handler: Handler = Arc::new(move |method, path, body| route(&control, &description, method, path, body));
    http::serve(server, handler)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_answer_and_refuse_what_they_must() {
        let control = VmControl::new();
        let description = VmDescription { vcpus: 1, memory: 256 << 20, devices: Vec::new() };
        let info = route(&control, &description, "GET", "/vm", b"");
        assert_eq!(info.status, 200);
        assert!(info.body.contains("\"state\":\"created\""), "{}", info.body);
        assert_eq!(route(&control, &description, "PUT", "/vm/pause", b"").status, 409, "not running yet");
        assert_eq!(route(&control, &description, "GET", "/vm/pause", b"").status, 405);
        assert_eq!(route(&control, &description, "PUT", "/vm/snapshot", b"").status, 400, "no directory");
        assert_eq!(route(&control, &description, "PUT", "/vm/snapshot", br#"{"dir":"relative"}"#).status, 400);
        assert_eq!(route(&control, &description, "PUT", "/vm/snapshot", br#"{"dir":"/tmp/x"}"#).status, 409);
        assert_eq!(route(&control, &description, "PUT", "/vm/migrate", b"{}").status, 400, "no socket");
        assert_eq!(route(&control, &description, "PUT", "/vm/migrate", br#"{"socket":"/tmp/x"}"#).status, 409);
        assert_eq!(route(&control, &description, "GET", "/nothing", b"").status, 404);
    }
}
