//! The `vhost-user-blk` backend: options, and running it.

pub mod device;
pub mod engine;
pub mod nbd;
pub mod qcow2;
pub mod rbd;
pub mod request;
pub mod stats;
#[cfg(test)]
mod tests;
pub mod uring;

use crate::server::{self, ListenOn, ServerError};
use clap::{Parser, ValueEnum};
use device::{BlkDevice, BlkOptions};
use engine::{BlockEngine, Engine, EngineError, NullEngine, SyncEngine};
use std::sync::Arc;

/// Errors from starting the block backend.
#[derive(Debug, thiserror::Error)]
pub enum BlkError {
    /// The command line was wrong.
    #[error("{0}")]
    Usage(String),
    /// The disk could not be opened.
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// Serving failed.
    #[error(transparent)]
    Server(#[from] ServerError),
    /// Creating the device failed.
    #[error("cannot create the device: {0}")]
    Device(std::io::Error),
    /// A service could not start.
    #[error(transparent)]
    Services(#[from] crate::services::ServiceError),
    /// A qcow2 image or its chain could not be opened.
    #[error(transparent)]
    Qcow2(#[from] qcow2::Qcow2Error),
    /// The NBD export could not be opened.
    #[error(transparent)]
    Nbd(#[from] nbd::NbdOpenError),
    /// The RBD image could not be opened.
    #[error(transparent)]
    Rbd(#[from] rbd::RbdError),
}

/// Image formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ImageFormat {
    /// The bytes of the file are the disk's.
    Raw,
    /// qcow2 (v2 or v3), through the imago crate, with backing files as --allow-backing allows.
    Qcow2,
}

/// I/O engine choices.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum EngineKind {
    /// io_uring, one ring per queue (falls back to sync where the kernel refuses io_uring).
    #[value(name = "io_uring")]
    IoUring,
    /// Positioned reads and writes (pread/pwrite) on the image.
    Sync,
    /// Reads return zeros, writes are dropped: measures the virtio path alone.
    Null,
}

/// vhost-user-blk: a vhost-user block device backend.
#[derive(Parser, Debug)]
#[command(name = "vhost-user-blk", version, about)]
pub struct BlkArgs {
    #[command(flatten)]
    /// Where to listen.
    pub listen: server::ListenArgs,
    #[command(flatten)]
    /// Confinement once everything is open.
    pub sandbox: crate::sandbox::SandboxArgs,
    #[command(flatten)]
    /// Metrics, fault injection and the control API.
    pub services: crate::services::ServiceArgs,
    /// Image file or block device to serve.
    #[arg(long, value_name = "PATH", required_unless_present_any = ["print_capabilities", "size", "nbd", "rbd"])]
    pub blk_file: Option<String>,
    /// Serve an export of an NBD server instead of a file: nbd://HOST[:PORT]/EXPORT or
    /// nbd+unix:///EXPORT?socket=PATH (QEMU's forms).
    #[arg(long, value_name = "URI", conflicts_with_all = ["blk_file", "size", "allow_backing"])]
    pub nbd: Option<nbd::uri::NbdUri>,
    /// Seconds the guest's requests wait for a lost NBD server before they fail with IOERR.
    #[arg(long, value_name = "SECONDS", default_value_t = 30, requires = "nbd")]
    pub nbd_timeout: u64,
    /// Serve an image of a Ceph cluster instead of a file: POOL/IMAGE, or POOL/IMAGE@SNAP
    /// (read-only), through librbd (loaded when this is given).
    #[arg(long, value_name = "POOL/IMAGE[@SNAP]", conflicts_with_all = ["blk_file", "size", "allow_backing", "nbd"])]
    pub rbd: Option<rbd::RbdSpec>,
    /// The Ceph configuration file (default: Ceph's own search, /etc/ceph/ceph.conf first).
    #[arg(long, value_name = "PATH", requires = "rbd")]
    pub ceph_conf: Option<String>,
    /// The Ceph client to connect as.
    #[arg(long, value_name = "NAME", default_value = "admin", requires = "rbd")]
    pub ceph_id: String,
    /// The image's format; never guessed from its content.
    #[arg(long, value_enum, default_value_t = ImageFormat::Raw)]
    pub format: ImageFormat,
    /// qcow2: open the backing files the images name (read-only), in the allowed directories.
    #[arg(long)]
    pub allow_backing: bool,
    /// qcow2: a directory backing files may be in, repeatable (default: the image's own).
    #[arg(long = "backing-dir", value_name = "DIR", requires = "allow_backing")]
    pub backing_dirs: Vec<std::path::PathBuf>,
    /// Refuse writes (offers VIRTIO_BLK_F_RO).
    #[arg(long)]
    pub read_only: bool,
    /// Number of request queues, each served by its own thread.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub num_queues: u16,
    /// Largest queue size accepted.
    #[arg(long, default_value_t = 1024, value_parser = server::parse_queue_size)]
    pub queue_size: u16,
    /// Open the image with O_DIRECT.
    #[arg(long)]
    pub direct: bool,
    /// I/O engine for raw images (qcow2 images do their own I/O through imago).
    #[arg(long, value_enum, default_value_t = EngineKind::IoUring)]
    pub engine: EngineKind,
    /// Disk size in bytes for --engine null (instead of --blk-file).
    #[arg(long, value_name = "BYTES")]
    pub size: Option<u64>,
    /// The answer to GET_ID (at most 20 bytes are used).
    #[arg(long, default_value = "pvkit-blk")]
    pub serial: String,
    /// Logical block size reported to the guest.
    #[arg(long, default_value_t = 512, value_parser = parse_block_size)]
    pub logical_block_size: u32,
    /// Keep polling a queue for up to N microseconds after its last request before sleeping
    /// on its kick (0 disables); a queue that gets no requests costs no CPU.
    #[arg(long, default_value_t = 50, value_name = "N")]
    pub poll_us: u64,
    /// Print a counter summary every N milliseconds (and at exit); 0 only at exit.
    #[arg(long, default_value_t = 0, value_name = "N")]
    pub stats_ms: u64,
}

fn parse_block_size(text: &str) -> Result<u32, String> {
    let n: u32 = text.parse().map_err(|_| format!("'{text}' is not a number"))?;
    if (512..=65536).contains(&n) && n.is_power_of_two() {
        Ok(n)
    } else {
        Err(format!("{n} is not a power of two between 512 and 65536"))
    }
}

/// The capabilities JSON (QEMU's docs/interop/vhost-user.json).
pub const CAPABILITIES: &str = r#"{"type": "block", "features": ["read-only", "blk-file"]}"#;

fn open_engine(args: &BlkArgs) -> Result<Engine, BlkError> {
    if let Some(spec) = &args.rbd {
        if args.format != ImageFormat::Raw || args.engine == EngineKind::Null {
            return Err(BlkError::Usage("--rbd serves the image as it is: no --format qcow2, no --engine null".into()));
        }
        let engine = rbd::RbdEngine::open(spec, args.ceph_conf.as_deref(), &args.ceph_id, args.read_only)?;
        return Ok(Engine::Rbd(engine));
    }
    if let Some(uri) = &args.nbd {
        if args.format != ImageFormat::Raw || args.engine == EngineKind::Null {
            return Err(BlkError::Usage(
                "--nbd serves the export as it is: no --format qcow2, no --engine null".into(),
            ));
        }
        let timeout = std::time::Duration::from_secs(args.nbd_timeout.max(1));
        return Ok(Engine::Nbd(nbd::NbdEngine::open(uri.clone(), timeout)?));
    }
    if args.format == ImageFormat::Qcow2 {
        return open_qcow2(args);
    }
    if args.allow_backing {
        return Err(BlkError::Usage("--allow-backing goes with --format qcow2".into()));
    }
    if let Some(path) = &args.blk_file
        && qcow2::looks_like_qcow2(std::path::Path::new(path))
    {
        log::warn!(
            "{path} starts like a qcow2 image but is served raw, as asked (give --format qcow2 to open it as one)"
        );
    }
    match (args.engine, &args.blk_file, args.size) {
        (EngineKind::Null, _, Some(size)) => Ok(Engine::Null(NullEngine::new(size)?)),
        (EngineKind::Null, None, None) => Err(BlkError::Usage("--engine null needs --size BYTES".into())),
        (EngineKind::Null, Some(path), None) => {
            let size = SyncEngine::open(path, true, false)?.size();
            Ok(Engine::Null(NullEngine::new(size)?))
        }
        (EngineKind::Sync, Some(path), None) => Ok(Engine::Sync(SyncEngine::open(path, args.read_only, args.direct)?)),
        (EngineKind::IoUring, Some(path), None) => {
            match uring::UringEngine::open(path, args.read_only, args.direct, args.num_queues) {
                Ok(engine) => Ok(Engine::Uring(engine)),
                Err(EngineError::Uring(e)) => {
                    log::warn!("io_uring is not available ({e}); using the sync engine");
                    Ok(Engine::Sync(SyncEngine::open(path, args.read_only, args.direct)?))
                }
                Err(e) => Err(e.into()),
            }
        }
        (EngineKind::Sync | EngineKind::IoUring, None, _) => Err(BlkError::Usage("--blk-file PATH is required".into())),
        (EngineKind::Sync | EngineKind::IoUring, Some(_), Some(_)) => {
            Err(BlkError::Usage("--size only goes with --engine null".into()))
        }
    }
}

fn open_qcow2(args: &BlkArgs) -> Result<Engine, BlkError> {
    let Some(path) = &args.blk_file else {
        return Err(BlkError::Usage("--format qcow2 needs --blk-file PATH".into()));
    };
    if args.engine == EngineKind::Null || args.size.is_some() {
        return Err(BlkError::Usage("--format qcow2 does not go with --engine null or --size".into()));
    }
    let options = qcow2::ChainOptions {
        read_only: args.read_only,
        direct: args.direct,
        allow_backing: args.allow_backing,
        backing_dirs: args.backing_dirs.clone(),
    };
    let engine = qcow2::Qcow2Engine::open(std::path::Path::new(path), &options)?;
    let chain: Vec<String> = engine.chain().iter().map(|p| p.display().to_string()).collect();
    log::info!("vhost-user-blk: qcow2 chain {}", chain.join(" <- "));
    Ok(Engine::Qcow2(engine))
}

/// What the log calls the disk.
fn disk_name(args: &BlkArgs) -> String {
    let rbd = args.rbd.as_ref().map(|spec| format!("rbd:{spec}"));
    let nbd = args.nbd.as_ref().map(|uri| uri.to_string());
    rbd.or(nbd).or(args.blk_file.clone()).unwrap_or_else(|| "null disk".into())
}

/// Runs the backend with `args` (without the program name).
pub fn main(args: &[String]) -> Result<(), BlkError> {
    let Some(args) = server::parse_args::<BlkArgs>("vhost-user-blk", args).map_err(BlkError::Usage)? else {
        return Ok(());
    };
    if args.listen.print_capabilities {
        println!("{CAPABILITIES}");
        return Ok(());
    }
    let listen = ListenOn::from_args(&args.listen).map_err(BlkError::Server)?;
    // Before the disk opens: threads a disk library starts must not take SIGTERM themselves.
    server::block_exit_signals().map_err(BlkError::Server)?;
    let engine = open_engine(&args)?;
    let engine_name = engine.name();
    let stats = Arc::new(stats::Stats::default());
    let options = BlkOptions {
        num_queues: args.num_queues,
        queue_size: args.queue_size,
        serial: args.serial.clone(),
        logical_block_size: args.logical_block_size,
        read_only: args.read_only || engine.capabilities().read_only,
        poll_us: args.poll_us,
    };
    log::info!(
        "vhost-user-blk: {} ({engine_name} engine, {} queue(s){}) on {listen}",
        disk_name(&args),
        args.num_queues,
        if args.read_only { ", read-only" } else { "" }
    );
    // The disk stays open across frontend connections; each connection gets a fresh device.
    let engine = Arc::new(engine);
    let gates = Arc::new(crate::queue::Gates::new(args.num_queues.into()));
    let summary = {
        let stats = stats.clone();
        move || stats.summary()
    };
    let quiesce = {
        let (gates, engine) = (gates.clone(), engine.clone());
        move || {
            gates.close();
            engine.close();
        }
    };
    let mut sandbox = crate::sandbox::Sandbox::new(crate::BackendKind::Blk, args.sandbox.sandbox);
    if let Some(path) = &args.blk_file {
        sandbox = sandbox.file(std::path::Path::new(path), args.read_only || engine_name == "null");
    }
    if let Engine::Rbd(_) = &*engine {
        sandbox = sandbox.with_calls(crate::sandbox::syscalls::CEPH_CLIENT);
    }
    if let Engine::Qcow2(image) = &*engine {
        for backing in image.chain().iter().skip(1) {
            sandbox = sandbox.file(backing, true);
        }
    }
    let prepared = crate::services::prepare(crate::services::BLK, args.num_queues.into(), &args.services)?;
    let attached = prepared.attached();
    let reporting = server::Reporting { stats_ms: args.stats_ms, api: prepared.api };
    server::serve("vhost-user-blk", vec![listen], sandbox, reporting, summary, quiesce, |_| {
        BlkDevice::with_services(engine.clone(), options.clone(), stats.clone(), gates.clone(), attached.clone())
    })?;
    Ok(())
}
