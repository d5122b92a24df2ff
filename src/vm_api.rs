//! `pvkit run --api-socket PATH`: the VM's control API, HTTP/1.1 with JSON bodies on a unix
//! socket, on the same server as the backends' API (`services::http`).
//!
//! | endpoint | |
//! |---|---|
//! | `GET /vm` | state (`created`, `running`, `paused`, `ended`), vCPUs, memory, devices |
//! | `PUT /vm/pause` | parks every vCPU (devices are not quiesced yet) |
//! | `PUT /vm/resume` | lets them run again |
//! | `PUT /vm/shutdown` | ends the run (`pvkit run` exits 0) |
//! | `PUT /vm/snapshot` | not done yet: 501 |

use pvkit_host_devices::services::http::{self, Handler, Reply, error, json_reply};
use pvkit_vmm_glue::control::{ControlError, VmControl};
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

/// The answer to one request.
fn route(control: &VmControl, description: &VmDescription, method: &str, path: &str) -> Reply {
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
        ("PUT", "/vm/snapshot") => error(501, "snapshots are not implemented yet"),
        (_, "/vm") => error(405, format!("{path} takes GET, not {method}")),
        (_, "/vm/pause" | "/vm/resume" | "/vm/shutdown" | "/vm/snapshot") => {
            error(405, format!("{path} takes PUT, not {method}"))
        }
        _ => error(404, format!("no endpoint {path} (there are /vm, /vm/pause, /vm/resume, /vm/shutdown)")),
    }
}

/// Serves the API on `socket` for the rest of the process.
pub fn serve(socket: &Path, control: Arc<VmControl>, description: VmDescription) -> std::io::Result<()> {
    let server = http::unix_server(socket)?;
    let handler: Handler = Arc::new(move |method, path, _body| route(&control, &description, method, path));
    http::serve(server, handler)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_answer_and_refuse_what_they_must() {
        let control = VmControl::new();
        let description = VmDescription { vcpus: 1, memory: 256 << 20, devices: Vec::new() };
        let info = route(&control, &description, "GET", "/vm");
        assert_eq!(info.status, 200);
        assert!(info.body.contains("\"state\":\"created\""), "{}", info.body);
        assert_eq!(route(&control, &description, "PUT", "/vm/pause").status, 409, "not running yet");
        assert_eq!(route(&control, &description, "GET", "/vm/pause").status, 405);
        assert_eq!(route(&control, &description, "PUT", "/vm/snapshot").status, 501);
        assert_eq!(route(&control, &description, "GET", "/nothing").status, 404);
    }
}
