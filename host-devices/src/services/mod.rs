//! The services a backend adds between guest and backing: live metrics, fault injection, and
//! the control API that shows and changes them. They attach to every device the same way, as
//! one [`QueueServices`] implementation given to the queue-worker core
//! ([`crate::queue::DeviceCore::with_services`]), and outlive frontend connections (a device
//! is made anew for each connection; its services are the process's).
//!
//! - [`metrics`]: per-queue counters and latency histograms, as JSON and in Prometheus's
//!   text format;
//! - [`faults`]: rules that fail requests, frames or console chunks;
//! - [`api`]: HTTP/1.1 over a unix socket (`--api-socket`), and `/metrics` over TCP
//!   (`--metrics-addr`) for a Prometheus server.

pub mod api;
pub mod client;
pub mod faults;
pub mod http;
pub mod limits;
pub mod metrics;

use crate::queue::services::{Completion, QueueServices, Verdict, Work};
use faults::{Action, FaultError, Faults, RuleSpec};
use limits::{LimitError, LimitSpec, Limits};
use metrics::Metrics;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The service options every backend takes.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct ServiceArgs {
    /// Serve the control API (HTTP/1.1, JSON) on this UNIX socket: GET /stats, GET /metrics,
    /// GET|PUT|DELETE /faults, GET|PUT /limits (created, and removed at exit).
    #[arg(long, value_name = "PATH")]
    pub api_socket: Option<PathBuf>,
    /// Serve GET /metrics (Prometheus text format) over TCP on this address as well.
    #[arg(long, value_name = "HOST:PORT")]
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// A fault-injection rule, repeatable: `op=OP,sectors=FIRST-END,trigger=T,seed=N,action=A`
    /// (every key but `action` optional). OP: an operation of the device or `any`; T: `always`,
    /// `once`, `every:N` or `probability:P`; A: `ioerr`, `unsupp`, `torn:BYTES` (blk),
    /// `delay:MS[-MS]` (blk completions, net frames, console output), `drop` (net, console),
    /// `reorder`, `corrupt` or `duplicate` (net frames, `op=tx` or `op=rx`).
    #[arg(long = "fault", value_name = "RULE")]
    pub faults: Vec<String>,
    /// A rate limit, repeatable: `CLASS:ops=RATE,bw=RATE,ops_burst=N,bw_burst=N` (per second,
    /// K/M/G allowed; each key optional; ops are packets for net). Block classes: `all`,
    /// `read`, `write`; net: `tx`, `rx`; console: `tx`, `rx` (bytes per port). Work over the
    /// limit waits (in its ring, or received data in the backend); none is failed or dropped.
    #[arg(long = "limit", value_name = "LIMIT")]
    pub limits: Vec<String>,
}

impl ServiceArgs {
    /// Whether any service was asked for (otherwise the device runs with none: nothing is
    /// counted on its hot path).
    pub fn any(&self) -> bool {
        self.api_socket.is_some() || self.metrics_addr.is_some() || !self.faults.is_empty() || !self.limits.is_empty()
    }
}

/// Errors from starting the services.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// A `--fault` rule was refused.
    #[error("--fault: {0}")]
    Fault(#[from] FaultError),
    /// A `--limit` was refused.
    #[error("--limit: {0}")]
    Limit(#[from] LimitError),
    /// The API's sockets could not be made.
    #[error(transparent)]
    Api(#[from] api::ApiError),
}

/// What a backend's `main` gets from [`prepare`].
#[derive(Default)]
pub struct Prepared {
    /// The services, when any was asked for.
    pub services: Option<Arc<DeviceServices>>,
    /// The API's sockets, bound, to be started once the sandbox is entered.
    pub api: Option<api::ApiServer>,
}

impl Prepared {
    /// What to attach to each connection's device.
    pub fn attached(&self) -> Arc<dyn QueueServices> {
        match &self.services {
            Some(services) => services.clone(),
            None => Arc::new(crate::queue::NoServices),
        }
    }
}

/// The services `args` asks for, for a device of `kind` with `queues` queues: rules checked,
/// API sockets bound.
pub fn prepare(kind: DeviceKind, queues: usize, args: &ServiceArgs) -> Result<Prepared, ServiceError> {
    if !args.any() {
        return Ok(Prepared::default());
    }
    let services = DeviceServices::new(kind, queues, args)?;
    let api = api::ApiServer::bind(args, services.clone())?;
    Ok(Prepared { services: Some(services), api })
}

/// What a device kind offers the services.
#[derive(Debug, Clone, Copy)]
pub struct DeviceKind {
    /// The program name (`vhost-user-blk`, ...), the `device` label of every metric.
    pub name: &'static str,
    /// The operations its work is named by.
    pub ops: &'static [&'static str],
    /// The fault actions it can take.
    pub actions: &'static [Action],
    /// Those of them that apply only to its output (`op=tx`).
    pub output_only: &'static [Action],
    /// Its classes of rate limits (none: it takes no limits yet).
    pub limit_classes: &'static [&'static str],
    /// Whether each queue has buckets of its own (a console's ports) instead of the device.
    pub limits_per_queue: bool,
}

/// The block device.
pub const BLK: DeviceKind = DeviceKind {
    name: "vhost-user-blk",
    ops: &["read", "write", "flush", "get-id", "discard", "write-zeroes"],
    actions: &[Action::Ioerr, Action::Unsupp, Action::Torn(0), Action::Delay(0, 0)],
    output_only: &[],
    limit_classes: &["all", "read", "write"],
    limits_per_queue: false,
};
/// The net device.
pub const NET: DeviceKind = DeviceKind {
    name: "vhost-user-net",
    ops: &["tx", "rx"],
    actions: &[Action::Drop, Action::Ioerr, Action::Delay(0, 0), Action::Reorder, Action::Corrupt, Action::Duplicate],
    output_only: &[],
    limit_classes: &["tx", "rx"],
    limits_per_queue: false,
};
/// The console device.
pub const CONSOLE: DeviceKind = DeviceKind {
    name: "vhost-user-console",
    ops: &["tx", "rx"],
    actions: &[Action::Drop, Action::Ioerr, Action::Delay(0, 0)],
    output_only: &[Action::Delay(0, 0)],
    limit_classes: &["tx", "rx"],
    limits_per_queue: true,
};

/// One device process's services.
pub struct DeviceServices {
    /// Live counters.
    pub metrics: Metrics,
    /// Fault-injection rules.
    pub faults: Faults,
    /// Rate limits.
    pub limits: Limits,
}

impl DeviceServices {
    /// Services for a device of `kind` with `queues` queues, with the fault rules of `args`.
    pub fn new(kind: DeviceKind, queues: usize, args: &ServiceArgs) -> Result<Arc<DeviceServices>, ServiceError> {
        let faults = Faults::new(kind.ops, kind.actions).with_output_only(kind.output_only);
        let rules = args.faults.iter().map(|text| RuleSpec::parse(text)).collect::<Result<Vec<_>, _>>()?;
        faults.set(rules)?;
        let limits = Limits::new(kind.limit_classes, kind.limits_per_queue);
        let specs = args.limits.iter().map(|text| LimitSpec::parse(text)).collect::<Result<_, _>>()?;
        limits.set(specs)?;
        Ok(Arc::new(DeviceServices { metrics: Metrics::new(kind.name, queues), faults, limits }))
    }

    /// The metrics in Prometheus's text format, fault counters included.
    pub fn prometheus_text(&self) -> String {
        let mut out = String::new();
        self.metrics.render_prometheus(&mut out);
        let name = "pvkit_faults_injected_total";
        out.push_str(&format!("# HELP {name} Faults injected, by rule.\n# TYPE {name} counter\n"));
        for (rule, action, count) in self.faults.injected() {
            let action = match action {
                Action::Torn(_) => "torn".to_string(),
                Action::Delay(..) => "delay".to_string(),
                other => format!("{other:?}").to_lowercase(),
            };
            out.push_str(&format!(
                "{name}{{device=\"{}\",rule=\"{rule}\",action=\"{action}\"}} {count}\n",
                self.metrics.device()
            ));
        }
        let (throttled, seconds) = self.limits.throttled();
        let device = self.metrics.device();
        for (name, kind, help, value) in [
            ("pvkit_throttled_total", "counter", "Times a queue waited for its rate limits.", throttled.to_string()),
            (
                "pvkit_throttled_seconds_total",
                "counter",
                "Time queues waited for their rate limits.",
                seconds.to_string(),
            ),
        ] {
            out.push_str(&format!(
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name}{{device=\"{device}\"}} {value}\n"
            ));
        }
        out
    }
}

impl QueueServices for DeviceServices {
    fn throttle(&self, works: &[Work], now: Instant) -> Option<(usize, Duration)> {
        let (index, wait) = self.limits.admit_batch(works, now)?;
        self.limits.note_throttled(wait);
        Some((index, wait))
    }

    fn completed_batch(&self, completions: &[Completion]) {
        self.metrics.completed_batch(completions, Instant::now());
    }

    fn taken(&self, queue: usize, count: usize) {
        if let Some(queue) = self.metrics.queue(queue) {
            queue.admitted(count as u64);
        }
    }

    fn admit(&self, work: &Work) -> Verdict {
        self.faults.admit(work)
    }

    fn throttles(&self) -> bool {
        self.limits.is_active()
    }

    fn completed(&self, completion: &Completion) {
        if let Some(queue) = self.metrics.queue(completion.work.queue) {
            let work = &completion.work;
            queue.completed(work.kind, work.bytes, completion.ok, completion.started.elapsed());
        }
    }

    fn kicked(&self, queue: usize) {
        if let Some(queue) = self.metrics.queue(queue) {
            queue.kicked();
        }
    }

    fn notified(&self, queue: usize) {
        if let Some(queue) = self.metrics.queue(queue) {
            queue.notified();
        }
    }

    fn polled(&self, queue: usize, time: Duration) {
        if let Some(queue) = self.metrics.queue(queue) {
            queue.polled(time);
        }
    }
}
