//! The `vhost-user-console` backend: options, and running it.

pub mod control;
pub mod device;
pub mod port;
mod pumps;
#[cfg(test)]
mod tests;

use crate::server::{self, ListenOn, ServerError};
use clap::Parser;
use device::{ConsoleDevice, ConsoleHost};
use port::{HostPort, PortError, PortKind, PortSpec};
use std::sync::Arc;

/// Errors from starting the console backend.
#[derive(Debug, thiserror::Error)]
pub enum ConsoleBackendError {
    /// The command line was wrong.
    #[error("{0}")]
    Usage(String),
    /// A port could not be opened.
    #[error(transparent)]
    Port(#[from] PortError),
    /// Serving failed.
    #[error(transparent)]
    Server(#[from] ServerError),
    /// A service could not start.
    #[error(transparent)]
    Services(#[from] crate::services::ServiceError),
}

/// vhost-user-console: a vhost-user virtio-console backend with multiport, SIZE and EMERG_WRITE.
#[derive(Parser, Debug)]
#[command(name = "vhost-user-console", version, about)]
pub struct ConsoleArgs {
    #[command(flatten)]
    /// Where to listen.
    pub listen: server::ListenArgs,
    #[command(flatten)]
    /// Confinement once everything is open.
    pub sandbox: crate::sandbox::SandboxArgs,
    #[command(flatten)]
    /// Metrics, fault injection and the control API.
    pub services: crate::services::ServiceArgs,
    /// A port: stdio, pty, unix:PATH, tcp:[HOST:]PORT or file:PATH, optionally ,name=NAME.
    /// Repeat for more ports; the first is the console. More than one offers MULTIPORT.
    #[arg(long = "port", value_name = "KIND[,name=NAME]", default_value = "stdio")]
    pub ports: Vec<PortSpec>,
    /// Print a summary line every N milliseconds (and at exit); 0 only at exit.
    #[arg(long, default_value_t = 0, value_name = "N")]
    pub stats_ms: u64,
}

/// The capabilities JSON (QEMU's docs/interop/vhost-user.json shape).
pub const CAPABILITIES: &str = r#"{"type": "console", "features": ["multiport", "size", "emerg-write"]}"#;

/// Runs the backend with `args` (without the program name).
pub fn main(args: &[String]) -> Result<(), ConsoleBackendError> {
    let Some(args) =
        server::parse_args::<ConsoleArgs>("vhost-user-console", args).map_err(ConsoleBackendError::Usage)?
    else {
        return Ok(());
    };
    if args.listen.print_capabilities {
        println!("{CAPABILITIES}");
        return Ok(());
    }
    if args.ports.len() > 31 {
        return Err(ConsoleBackendError::Usage(format!("{} ports given, at most 31", args.ports.len())));
    }
    let listen = ListenOn::from_args(&args.listen)?;
    let ports = args.ports.iter().cloned().map(HostPort::open).collect::<Result<Vec<_>, _>>()?;
    log::info!(
        "vhost-user-console: {} port(s) ({}) on {listen}",
        ports.len(),
        args.ports.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
    );
    let host = Arc::new(ConsoleHost::new(ports));
    let summary = {
        let host = host.clone();
        move || host.summary()
    };
    let gates = Arc::new(crate::queue::Gates::new(1));
    let quiesce = {
        let (host, gates) = (host.clone(), gates.clone());
        move || {
            gates.close();
            host.flush_all();
        }
    };
    let sandbox = args.ports.iter().fold(
        crate::sandbox::Sandbox::new(crate::BackendKind::Console, args.sandbox.sandbox),
        |sandbox, port| match &port.kind {
            PortKind::File(path) => sandbox.file(path, false),
            PortKind::Unix(path) => sandbox.removable(path),
            PortKind::Stdio | PortKind::Pty | PortKind::Tcp(_) => sandbox,
        },
    );
    let ports_given = args.ports.len() as u16;
    let queues = usize::from(pvkit_protocol::console::queue::count(ports_given, ports_given > 1));
    let prepared = crate::services::prepare(crate::services::CONSOLE, queues, &args.services)?;
    let attached = prepared.attached();
    let reporting = server::Reporting { stats_ms: args.stats_ms, api: prepared.api };
    server::serve("vhost-user-console", vec![listen], sandbox, reporting, summary, quiesce, |_| {
        ConsoleDevice::with_services(host.clone(), gates.clone(), attached.clone())
    })?;
    Ok(())
}
