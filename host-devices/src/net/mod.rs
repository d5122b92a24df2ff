//! The `vhost-user-net` backend: options, and running it.

pub mod delay;
pub mod device;
pub mod frame;
mod pass;
pub mod rings;
pub mod side;
pub mod stats;
pub mod switch;
pub mod tap;
#[cfg(test)]
mod tests;

use crate::queue::Gates;
use crate::server::{self, ListenOn, ServerError};
use clap::Parser;
use device::{NetDevice, NetOptions};
use side::{NetworkSide, SwitchHub};
use std::os::unix::io::RawFd;
use std::path::PathBuf;
use std::sync::Arc;

/// Errors from starting the net backend.
#[derive(Debug, thiserror::Error)]
pub enum NetBackendError {
    /// The command line was wrong.
    #[error("{0}")]
    Usage(String),
    /// The tap could not be opened.
    #[error(transparent)]
    Tap(#[from] tap::TapError),
    /// Serving failed.
    #[error(transparent)]
    Server(#[from] ServerError),
    /// A service could not start.
    #[error(transparent)]
    Services(#[from] crate::services::ServiceError),
}

/// A MAC address on the command line (`52:54:00:12:34:56`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MacAddr(pub [u8; 6]);

impl std::str::FromStr for MacAddr {
    type Err = String;

    fn from_str(text: &str) -> Result<MacAddr, String> {
        let parts: Vec<&str> = text.split(':').collect();
        let mut mac = [0u8; 6];
        if parts.len() != 6 {
            return Err(format!("'{text}' is not a MAC address (six hex bytes separated by ':')"));
        }
        for (byte, part) in mac.iter_mut().zip(parts) {
            *byte = u8::from_str_radix(part, 16)
                .ok()
                .filter(|_| part.len() == 2)
                .ok_or_else(|| format!("'{text}' is not a MAC address ('{part}' is not a hex byte)"))?;
        }
        if mac[0] & 1 == 1 {
            return Err(format!("{text} is a group address; a device needs a unicast one"));
        }
        Ok(MacAddr(mac))
    }
}

/// vhost-user-net: a vhost-user virtio-net backend with a tap, an in-process switch, a sink or a
/// loopback as its network side.
#[derive(Parser, Debug)]
#[command(name = "vhost-user-net", version, about)]
pub struct NetArgs {
    /// Listen on this UNIX socket (created, and removed at exit). With --switch, repeat it:
    /// each socket is one port of the switch.
    #[arg(long, value_name = "PATH")]
    pub socket_path: Vec<PathBuf>,
    /// Serve on an inherited, already listening UNIX socket.
    #[arg(long, value_name = "N", conflicts_with = "socket_path")]
    pub fd: Option<RawFd>,
    /// Print the backend's capabilities as JSON and exit.
    #[arg(long)]
    pub print_capabilities: bool,
    #[command(flatten)]
    /// Confinement once everything is open.
    pub sandbox: crate::sandbox::SandboxArgs,
    #[command(flatten)]
    /// Metrics, fault injection and the control API.
    pub services: crate::services::ServiceArgs,
    /// Send and receive through this tap (opened, or created when missing, which needs
    /// CAP_NET_ADMIN); one tap queue per queue pair.
    #[arg(long, value_name = "NAME", group = "side")]
    pub tap: Option<String>,
    /// Be a learning L2 switch between the guests on the --socket-path ports (no root needed).
    #[arg(long, group = "side")]
    pub switch: bool,
    /// Count and drop every transmitted frame (for benchmarks).
    #[arg(long, group = "side")]
    pub sink: bool,
    /// Send every transmitted frame back to the guest that sent it (for benchmarks).
    #[arg(long, group = "side")]
    pub loopback: bool,
    /// MAC address in the configuration space (with --switch, port N gets the last byte + N).
    #[arg(long, default_value = "52:54:00:12:34:56")]
    pub mac: MacAddr,
    /// MTU in the configuration space; longer frames without segmentation offload are dropped.
    #[arg(long, default_value_t = 1500, value_parser = clap::value_parser!(u16).range(68..))]
    pub mtu: u16,
    /// Number of queue pairs, each served by its own thread (more than one offers MQ).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=16))]
    pub num_queue_pairs: u16,
    /// Largest queue size accepted.
    #[arg(long, default_value_t = 1024, value_parser = server::parse_queue_size)]
    pub queue_size: u16,
    /// Keep polling a queue pair for up to N microseconds after its last frame before sleeping
    /// on its kicks (0 disables); an idle pair costs no CPU.
    #[arg(long, default_value_t = 50, value_name = "N")]
    pub poll_us: u64,
    /// Print a counter summary every N milliseconds (and at exit); 0 only at exit.
    #[arg(long, default_value_t = 0, value_name = "N")]
    pub stats_ms: u64,
}

/// The capabilities JSON (QEMU's docs/interop/vhost-user.json shape).
pub const CAPABILITIES: &str =
    r#"{"type": "net", "features": ["tap", "switch", "sink", "loopback", "mrg-rxbuf", "offloads", "mq"]}"#;

/// Where to listen, checked against the chosen network side.
fn listen_addresses(args: &NetArgs) -> Result<Vec<ListenOn>, NetBackendError> {
    if let Some(fd) = args.fd {
        if args.switch {
            return Err(NetBackendError::Usage("--switch needs --socket-path for each port, not --fd".into()));
        }
        let listen = server::ListenArgs { socket_path: None, fd: Some(fd), print_capabilities: false };
        return Ok(vec![ListenOn::from_args(&listen)?]);
    }
    match (args.socket_path.len(), args.switch) {
        (0, _) => Err(NetBackendError::Usage("give --socket-path PATH or --fd N".into())),
        (1, _) => Ok(vec![ListenOn::Path(args.socket_path[0].clone())]),
        (n, false) => Err(NetBackendError::Usage(format!(
            "{n} --socket-path options given; more than one is only for --switch (one per port)"
        ))),
        (n, true) if n > 64 => Err(NetBackendError::Usage(format!("{n} switch ports given, at most 64"))),
        (_, true) => Ok(args.socket_path.iter().cloned().map(ListenOn::Path).collect()),
    }
}

/// Runs the backend with `args` (without the program name).
pub fn main(args: &[String]) -> Result<(), NetBackendError> {
    let Some(args) = server::parse_args::<NetArgs>("vhost-user-net", args).map_err(NetBackendError::Usage)? else {
        return Ok(());
    };
    if args.print_capabilities {
        println!("{CAPABILITIES}");
        return Ok(());
    }
    let listens = listen_addresses(&args)?;
    let (side, hub) = if let Some(name) = &args.tap {
        (NetworkSide::Tap(Arc::new(tap::Tap::open(name, args.num_queue_pairs)?)), None)
    } else if args.switch {
        let hub = Arc::new(SwitchHub::new(listens.len()));
        (NetworkSide::Switch { hub: hub.clone(), port: 0 }, Some(hub))
    } else if args.sink {
        (NetworkSide::Sink, None)
    } else if args.loopback {
        (NetworkSide::Loopback, None)
    } else {
        return Err(NetBackendError::Usage(
            "choose the network side: --tap NAME, --switch, --sink or --loopback".into(),
        ));
    };
    let options = NetOptions {
        pairs: args.num_queue_pairs,
        queue_size: args.queue_size,
        mac: args.mac.0,
        mtu: args.mtu,
        poll_us: args.poll_us,
    };
    log::info!(
        "vhost-user-net: {} with {} queue pair(s), MTU {} on {}",
        side.describe(),
        options.pairs,
        options.mtu,
        listens.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
    );
    let stats = Arc::new(stats::NetStats::default());
    let summary = {
        let stats = stats.clone();
        move || stats.summary()
    };
    // One set of gates per listening socket (a switch port's workers never wait on another's).
    let gates: Vec<Arc<Gates>> = listens.iter().map(|_| Arc::new(Gates::new(options.pairs.max(1).into()))).collect();
    let quiesce = {
        let gates = gates.clone();
        move || gates.iter().for_each(|g| g.close())
    };
    let sandbox = crate::sandbox::Sandbox::new(crate::BackendKind::Net, args.sandbox.sandbox);
    let queues = 2 * usize::from(options.pairs);
    let prepared = crate::services::prepare(crate::services::NET, queues, &args.services)?;
    let attached = prepared.attached();
    let reporting = server::Reporting { stats_ms: args.stats_ms, api: prepared.api };
    server::serve("vhost-user-net", listens, sandbox, reporting, summary, quiesce, |port| {
        let mut options = options.clone();
        let side = match (&hub, &side) {
            (Some(hub), _) => {
                options.mac[5] = options.mac[5].wrapping_add(port as u8);
                NetworkSide::Switch { hub: hub.clone(), port }
            }
            (None, side) => side.clone(),
        };
        let gates = gates.get(port).cloned().unwrap_or_else(|| Arc::new(Gates::new(options.pairs.into())));
        NetDevice::with_services(options, side, stats.clone(), gates, attached.clone())
    })?;
    Ok(())
}
