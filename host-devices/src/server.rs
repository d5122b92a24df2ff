//! What every backend shares: where it listens (`--socket-path`, or an inherited `--fd`),
//! listening again after a frontend disconnects, periodic statistics, and a clean exit on
//! SIGTERM/SIGINT (in-flight requests finish, the socket is removed, exit status 0).

use log::{info, warn};
use std::fmt;
use std::os::unix::io::{FromRawFd, RawFd};
use std::path::PathBuf;
use std::time::Duration;
use vhost::vhost_user::Listener;
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost_user_backend::{VhostUserBackend, VhostUserDaemon, VringRwLock};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

/// Errors from serving.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// Neither or both of --socket-path and --fd.
    #[error("give exactly one of --socket-path PATH or --fd N")]
    NoListenAddress,
    /// An --fd that is not an open socket.
    #[error("--fd {0} is not an open socket")]
    BadFd(RawFd),
    /// The socket could not be created.
    #[error("cannot listen on {path}: {source}")]
    Listen {
        /// The socket path.
        path: String,
        /// Why.
        source: vhost::vhost_user::Error,
    },
    /// The vhost-user library's daemon could not be created or started.
    #[error("vhost-user daemon: {0}")]
    Daemon(vhost_user_backend::Error),
    /// Accepting a frontend failed.
    #[error("accepting a frontend: {0}")]
    Accept(vhost::vhost_user::Error),
    /// The control API could not start.
    #[error("control API: {0}")]
    Api(crate::services::api::ApiError),
    /// The control relay could not be set up.
    #[error("setting up the control relay: {0}")]
    Relay(std::io::Error),
    /// The device for a new connection could not be made.
    #[error("creating the device: {0}")]
    Device(std::io::Error),
    /// The device's descriptors could not be watched.
    #[error("watching the device's descriptors: {0}")]
    Attach(std::io::Error),
    /// A listener thread panicked.
    #[error("a listener thread panicked")]
    ListenerPanicked,
    /// Signal handling could not be set up.
    #[error("cannot set up signal handling: {0}")]
    Signals(std::io::Error),
    /// The sandbox could not be entered.
    #[error("entering the sandbox: {0}")]
    Sandbox(#[from] crate::sandbox::SandboxError),
}

impl From<vhost_user_backend::Error> for ServerError {
    fn from(error: vhost_user_backend::Error) -> ServerError {
        ServerError::Daemon(error)
    }
}

/// The listening options every backend takes.
#[derive(clap::Args, Debug, Clone)]
pub struct ListenArgs {
    /// Listen on this UNIX socket (created, and removed at exit).
    #[arg(long, value_name = "PATH", conflicts_with = "fd")]
    pub socket_path: Option<PathBuf>,
    /// Serve on an inherited, already listening UNIX socket.
    #[arg(long, value_name = "N")]
    pub fd: Option<RawFd>,
    /// Print the backend's capabilities as JSON and exit.
    #[arg(long)]
    pub print_capabilities: bool,
}

/// The vhost-user protocol features every pvkit backend offers (libblkio requires REPLY_ACK,
/// CONFIG and CONFIGURE_MEM_SLOTS; QEMU migrates only with LOG_SHMFD, whose SET_LOG_BASE the
/// relay takes, see [`crate::queue::dirty_log`]).
pub fn protocol_features() -> vhost::vhost_user::message::VhostUserProtocolFeatures {
    use vhost::vhost_user::message::VhostUserProtocolFeatures as F;
    F::MQ | F::CONFIG | F::REPLY_ACK | F::CONFIGURE_MEM_SLOTS | F::LOG_SHMFD
}

/// The `size` bytes at `offset` of a device's configuration space `config`, zero-filled past
/// its end (a GET_CONFIG answer); empty for absurd sizes (vhost-user caps them at 256).
pub fn config_slice(config: &[u8], offset: u32, size: u32) -> Vec<u8> {
    if size > 4096 {
        return Vec::new();
    }
    let start = (offset as usize).min(config.len());
    let end = start.saturating_add(size as usize).min(config.len());
    let mut out = config[start..end].to_vec();
    out.resize(size as usize, 0);
    out
}

/// Parses a `--queue-size` value: a power of two up to the virtio maximum.
pub fn parse_queue_size(text: &str) -> Result<u16, String> {
    let n: u32 = text.parse().map_err(|_| format!("'{text}' is not a number"))?;
    pvkit_protocol::ring::check_queue_size(n).map_err(|e| e.to_string())
}

/// Parses a backend's command line (without the program name) as `name`: `Ok(None)` when
/// help or the version was printed, `Err` with clap's message for bad arguments.
pub fn parse_args<T: clap::Parser>(name: &str, args: &[String]) -> Result<Option<T>, String> {
    let argv = std::iter::once(name.to_string()).chain(args.iter().cloned());
    match T::try_parse_from(argv) {
        Ok(parsed) => Ok(Some(parsed)),
        Err(e) if !e.use_stderr() => {
            let _ = e.print();
            Ok(None)
        }
        Err(e) => Err(e.render().to_string().trim_end().to_string()),
    }
}

/// Where a backend listens.
#[derive(Debug, Clone)]
pub enum ListenOn {
    /// A socket path the backend creates.
    Path(PathBuf),
    /// An inherited listening socket.
    Fd(RawFd),
}

impl ListenOn {
    /// From the command line.
    pub fn from_args(args: &ListenArgs) -> Result<ListenOn, ServerError> {
        match (&args.socket_path, args.fd) {
            (Some(path), None) => Ok(ListenOn::Path(path.clone())),
            (None, Some(fd)) => {
                // SAFETY: fcntl(F_GETFD) only queries the descriptor table.
                if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
                    return Err(ServerError::BadFd(fd));
                }
                Ok(ListenOn::Fd(fd))
            }
            _ => Err(ServerError::NoListenAddress),
        }
    }

    fn listener(&self) -> Result<Listener, ServerError> {
        match self {
            ListenOn::Path(path) => listen_atomically(path),
            // SAFETY: the descriptor was checked to be open in `from_args`, and the listener
            // takes it over for the rest of the process.
            ListenOn::Fd(fd) => Ok(unsafe { Listener::from_raw_fd(*fd) }),
        }
    }
}

/// Creates a listening socket at `path` that frontends can never find before it listens: it is
/// bound and listening under a temporary name first, then renamed into place (a frontend that
/// waits for the file and connects at once would otherwise be refused in the moment between
/// bind and listen).
fn listen_atomically(path: &std::path::Path) -> Result<Listener, ServerError> {
    let fail = |source: std::io::Error| ServerError::Listen {
        path: path.display().to_string(),
        source: vhost::vhost_user::Error::SocketError(source),
    };
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let temporary = path.with_file_name(format!(".{name}.{}.binding", std::process::id()));
    let _ = std::fs::remove_file(&temporary);
    let listener = std::os::unix::net::UnixListener::bind(&temporary).map_err(fail)?;
    if let Err(e) = std::fs::rename(&temporary, path) {
        let _ = std::fs::remove_file(&temporary);
        return Err(fail(e));
    }
    Ok(Listener::from(listener))
}

impl fmt::Display for ListenOn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ListenOn::Path(path) => write!(f, "{}", path.display()),
            ListenOn::Fd(fd) => write!(f, "fd {fd}"),
        }
    }
}

/// A device a backend serves, one per frontend connection.
pub trait ServedDevice: VhostUserBackend<Vring = VringRwLock, Bitmap = ()> + Clone + 'static {
    /// The device's queue-worker core.
    fn core(&self) -> &crate::queue::DeviceCore;

    /// Ends this connection's worker threads (after a disconnect), returning once none is
    /// inside a pass. A device with more to undo (leaving a switch) adds it here.
    fn stop_workers(&self) {
        self.core().stop();
    }

    /// Where this connection's backend request channel goes, for a device that sends requests
    /// of its own (the relay keeps it, see [`crate::relay`]).
    fn backend_channel(&self) -> Option<std::sync::Arc<crate::backend_channel::BackendChannel>> {
        None
    }

    /// Called once the daemon exists, before the frontend is accepted, with the worker
    /// threads' epoll handlers, so the device can watch descriptors of its own.
    fn attach(
        &self,
        _handlers: Vec<std::sync::Arc<vhost_user_backend::VringEpollHandler<Self>>>,
    ) -> std::io::Result<()> {
        Ok(())
    }
}

/// Blocks SIGTERM and SIGINT in this thread (and every thread it starts later) and returns the
/// set, for a thread to `sigwait` on. [`serve`] calls it; a backend whose disk library starts
/// threads of its own (librbd) calls it before opening the disk, so those threads never take
/// the signal (whose default action would end the process at once).
pub fn block_exit_signals() -> Result<libc::sigset_t, ServerError> {
    // SAFETY: sigset_t is plain data, initialised by sigemptyset before use.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid sigset_t; these calls only modify it and this thread's mask.
    let ret = unsafe {
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut())
    };
    if ret != 0 {
        return Err(ServerError::Signals(std::io::Error::from_raw_os_error(ret)));
    }
    Ok(set)
}

/// What a backend reports besides serving: a statistics line every `stats_ms` (0: only at
/// exit) and the control API, when asked for.
#[derive(Default)]
pub struct Reporting {
    /// Milliseconds between statistics lines.
    pub stats_ms: u64,
    /// The control API's sockets, bound already.
    pub api: Option<crate::services::api::ApiServer>,
}

/// Serves devices made by `make_device` on every address in `listens` (one thread each;
/// `make_device` gets the address's index) until SIGTERM/SIGINT, listening again after each
/// disconnect. Once the listening sockets exist, and before any thread starts, the process
/// enters `sandbox` (which is also allowed to remove the sockets at exit); the API starts
/// after it. `quiesce` is called on a signal and must return only when no request is in
/// flight (and keep new ones from starting); `summary` gives the statistics line.
pub fn serve<D, M, Q, S>(
    name: &str,
    listens: Vec<ListenOn>,
    sandbox: crate::sandbox::Sandbox,
    reporting: Reporting,
    summary: S,
    quiesce: Q,
    make_device: M,
) -> Result<(), ServerError>
where
    D: ServedDevice,
    M: Fn(usize) -> std::io::Result<D> + Sync,
    Q: Fn() + Send + 'static,
    S: Fn() -> String + Send + Sync + Clone + 'static,
{
    let signals = block_exit_signals()?;
    let mut listeners = Vec::with_capacity(listens.len());
    for listen in &listens {
        listeners.push(listen.listener()?);
    }
    let Reporting { stats_ms, api } = reporting;
    let socket_paths: Vec<PathBuf> = listens
        .iter()
        .filter_map(|listen| match listen {
            ListenOn::Path(path) => Some(path.clone()),
            ListenOn::Fd(_) => None,
        })
        .chain(api.as_ref().and_then(|api| api.socket_path()).map(PathBuf::from))
        .collect();
    socket_paths.iter().fold(sandbox, |sandbox, path| sandbox.removable(path)).enter_and_log()?;
    if let Some(api) = api {
        api.start().map_err(ServerError::Api)?;
    }
    {
        let summary = summary.clone();
        let name = name.to_string();
        std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                let mut signal: libc::c_int = 0;
                // SAFETY: `signals` is a valid set and `signal` a valid out-pointer.
                unsafe { libc::sigwait(&signals, &mut signal) };
                info!("{name}: signal {signal}, finishing in-flight requests");
                quiesce();
                for path in &socket_paths {
                    let _ = std::fs::remove_file(path);
                }
                info!("{name}: {}", summary());
                std::process::exit(0);
            })
            .map_err(ServerError::Signals)?;
    }
    if stats_ms > 0 {
        let summary = summary.clone();
        let name = name.to_string();
        std::thread::Builder::new()
            .name("stats".into())
            .spawn(move || {
                loop {
                    std::thread::sleep(Duration::from_millis(stats_ms));
                    info!("{name}: {}", summary());
                }
            })
            .map_err(ServerError::Signals)?;
    }
    if listeners.len() == 1 {
        let listener = listeners.pop().ok_or(ServerError::NoListenAddress)?;
        return accept_loop(name, 0, listener, &summary, &make_device);
    }
    std::thread::scope(|scope| {
        let threads: Vec<_> = listeners
            .into_iter()
            .enumerate()
            .map(|(index, listener)| {
                let (summary, make_device) = (&summary, &make_device);
                scope.spawn(move || accept_loop(name, index, listener, summary, make_device))
            })
            .collect();
        for thread in threads {
            thread.join().map_err(|_| ServerError::ListenerPanicked)??;
        }
        Ok(())
    })
}

/// Accepts the next frontend on `listener` and relays it (see [`crate::relay`]) to a private
/// listener, returned for the daemon to accept from.
fn relayed_frontend(
    name: &str,
    index: usize,
    listener: &Listener,
    taken: crate::relay::Taken,
) -> Result<Listener, ServerError> {
    use std::os::linux::net::SocketAddrExt;
    use std::os::unix::net::{SocketAddr, UnixListener, UnixStream};
    static CONNECTIONS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let frontend = loop {
        match listener.accept() {
            Ok(Some(stream)) => break stream,
            Ok(None) => continue,
            Err(e) => return Err(ServerError::Accept(e)),
        }
    };
    let relay_error = ServerError::Relay;
    let serial = CONNECTIONS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let address = SocketAddr::from_abstract_name(format!("pvkit-relay-{}-{index}-{serial}", std::process::id()))
        .map_err(relay_error)?;
    let private = UnixListener::bind_addr(&address).map_err(relay_error)?;
    let handler_side = UnixStream::connect_addr(&address).map_err(relay_error)?;
    crate::relay::start(name, frontend, handler_side, taken).map_err(relay_error)?;
    Ok(Listener::from(private))
}

/// Accepts frontends on `listener` one after the other, each served by a fresh device.
fn accept_loop<D, M, S>(
    name: &str,
    index: usize,
    listener: Listener,
    summary: &S,
    make_device: &M,
) -> Result<(), ServerError>
where
    D: ServedDevice,
    M: Fn(usize) -> std::io::Result<D>,
    S: Fn() -> String,
{
    loop {
        let device = make_device(index).map_err(ServerError::Device)?;
        let memory = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        let mut daemon = VhostUserDaemon::new(name.to_string(), device.clone(), memory)?;
        device.attach(daemon.get_epoll_handlers()).map_err(ServerError::Attach)?;
        // Every frontend goes through the relay: it checks memory tables before the library
        // maps them, holds QEMU's early SET_VRING_ENABLE, and keeps the backend request channel.
        let tracks = device.protocol_features().contains(VhostUserProtocolFeatures::INFLIGHT_SHMFD);
        let taken = crate::relay::Taken {
            channel: device.backend_channel(),
            dirty: Some(device.core().dirty_log().clone()),
            inflight: tracks.then(|| device.core().inflight().clone()),
        };
        let mut private = relayed_frontend(name, index, &listener, taken)?;
        daemon.start(&mut private)?;
        info!("{name}: frontend connected");
        match daemon.wait() {
            Ok(()) => info!("{name}: frontend disconnected; listening again"),
            Err(e) => warn!("{name}: connection ended: {e}; listening again"),
        }
        device.stop_workers();
        // Dropping the daemon joins its worker threads; only then may the descriptors the
        // library left open be closed.
        drop(daemon);
        device.core().release_library_fds();
        info!("{name}: {}", summary());
    }
}
