//! The host side of console ports: stdio, a pty, a unix or tcp listener (one client at a
//! time), or an output-only file. Everything is non-blocking; guest output waits in a bounded
//! per-port buffer while the host side is slow or absent.

use log::{info, warn};
use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::os::unix::io::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Instant;

/// Bytes of guest output a port holds while its host side cannot take them; past this the
/// backend stops taking guest output from the queue (backpressure).
pub const PENDING_LIMIT: usize = 64 * 1024;

/// Errors from port specifications and opening ports.
#[derive(Debug, thiserror::Error)]
pub enum PortError {
    /// A `--port` value that does not parse.
    #[error("bad --port '{spec}': {why}")]
    BadSpec {
        /// The value given.
        spec: String,
        /// What is wrong.
        why: String,
    },
    /// The host side could not be opened.
    #[error("cannot open port {spec}: {source}")]
    Open {
        /// The port.
        spec: String,
        /// Why.
        source: io::Error,
    },
}

/// What a port is connected to on the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PortKind {
    /// The backend's standard input and output.
    Stdio,
    /// A new pseudo-terminal; its path is printed at start.
    Pty,
    /// A unix socket the backend listens on.
    Unix(PathBuf),
    /// A tcp address the backend listens on.
    Tcp(SocketAddr),
    /// A file guest output is appended to (no input).
    File(PathBuf),
}

/// One `--port KIND[,name=NAME]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortSpec {
    /// What it connects to.
    pub kind: PortKind,
    /// The name the guest sees (multiport).
    pub name: Option<String>,
}

impl FromStr for PortSpec {
    type Err = PortError;
    fn from_str(text: &str) -> Result<PortSpec, PortError> {
        let bad = |why: &str| PortError::BadSpec { spec: text.to_string(), why: why.to_string() };
        let (kind, options) = match text.split_once(",") {
            Some((k, o)) => (k, Some(o)),
            None => (text, None),
        };
        let mut name = None;
        for option in options.into_iter().flat_map(|o| o.split(',')) {
            match option.split_once('=') {
                Some(("name", n)) if !n.is_empty() && !n.contains('\0') => name = Some(n.to_string()),
                _ => return Err(bad(&format!("unknown option '{option}' (only name=NAME)"))),
            }
        }
        let kind = match kind.split_once(':') {
            None if kind == "stdio" => PortKind::Stdio,
            None if kind == "pty" => PortKind::Pty,
            Some(("unix", path)) if !path.is_empty() => PortKind::Unix(PathBuf::from(path)),
            Some(("file", path)) if !path.is_empty() => PortKind::File(PathBuf::from(path)),
            Some(("tcp", addr)) => {
                let addr = if addr.contains(':') { addr.to_string() } else { format!("127.0.0.1:{addr}") };
                PortKind::Tcp(addr.parse().map_err(|_| bad("tcp needs HOST:PORT or PORT"))?)
            }
            _ => return Err(bad("expected stdio, pty, unix:PATH, tcp:[HOST:]PORT or file:PATH")),
        };
        Ok(PortSpec { kind, name })
    }
}

impl std::fmt::Display for PortSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.kind {
            PortKind::Stdio => write!(f, "stdio"),
            PortKind::Pty => write!(f, "pty"),
            PortKind::Unix(p) => write!(f, "unix:{}", p.display()),
            PortKind::Tcp(a) => write!(f, "tcp:{a}"),
            PortKind::File(p) => write!(f, "file:{}", p.display()),
        }
    }
}

enum Listening {
    Unix(UnixListener),
    Tcp(TcpListener),
}

/// The host side of one port.
pub struct HostPort {
    /// What it is.
    pub spec: PortSpec,
    listener: Option<Listening>,
    /// Where host input comes from (None: no input, or nobody connected).
    input: Option<File>,
    /// Where guest output goes (None: nobody connected yet).
    output: Option<File>,
    /// Guest output the host side has not taken yet, in order.
    pub pending: VecDeque<u8>,
    /// Guest output a fault rule delays, each piece with the time it joins `pending`, in
    /// order (output that comes meanwhile waits behind it, so the stream keeps its order).
    delayed: VecDeque<(Instant, Vec<u8>)>,
    /// Bytes in `delayed`.
    delayed_bytes: usize,
    /// Host input read but put back (it waits for the rate limits), delivered first.
    unread: VecDeque<u8>,
    /// The pty's path, for `pty` ports.
    pub pty_path: Option<PathBuf>,
}

fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    // SAFETY: fcntl on a descriptor we own; F_GETFL/F_SETFL touch only its flags.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    // SAFETY: as above.
    if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn dup_file(fd: RawFd) -> io::Result<File> {
    // SAFETY: dup returns a new descriptor (or -1) that we then own.
    let new = unsafe { libc::dup(fd) };
    if new < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `new` is a fresh descriptor owned by nobody else.
    Ok(File::from(unsafe { OwnedFd::from_raw_fd(new) }))
}

fn open_pty() -> io::Result<(File, PathBuf)> {
    // SAFETY: posix_openpt returns a new descriptor or -1.
    let master = unsafe { libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC) };
    if master < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `master` is ours from here on.
    let file = File::from(unsafe { OwnedFd::from_raw_fd(master) });
    let mut name = [0 as libc::c_char; 128];
    // SAFETY: grantpt/unlockpt act on our master; ptsname_r writes at most name.len() bytes.
    let ok = unsafe {
        libc::grantpt(master) == 0
            && libc::unlockpt(master) == 0
            && libc::ptsname_r(master, name.as_mut_ptr(), name.len()) == 0
    };
    if !ok {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: ptsname_r wrote a NUL-terminated string into `name`.
    let path = unsafe { std::ffi::CStr::from_ptr(name.as_ptr()) }.to_string_lossy().into_owned();
    Ok((file, PathBuf::from(path)))
}

impl HostPort {
    /// Opens the host side (creates the pty, binds the listener, opens the file).
    pub fn open(spec: PortSpec) -> Result<HostPort, PortError> {
        let err = |source: io::Error| PortError::Open { spec: spec.to_string(), source };
        let mut port = HostPort {
            spec: spec.clone(),
            listener: None,
            input: None,
            output: None,
            pending: VecDeque::new(),
            delayed: VecDeque::new(),
            delayed_bytes: 0,
            unread: VecDeque::new(),
            pty_path: None,
        };
        match &spec.kind {
            PortKind::Stdio => {
                port.input = Some(dup_file(libc::STDIN_FILENO).map_err(err)?);
                port.output = Some(dup_file(libc::STDOUT_FILENO).map_err(err)?);
            }
            PortKind::Pty => {
                let (master, path) = open_pty().map_err(err)?;
                eprintln!("vhost-user-console: port {spec} is pty {}", path.display());
                port.output = Some(master.try_clone().map_err(err)?);
                port.input = Some(master);
                port.pty_path = Some(path);
            }
            PortKind::Unix(path) => {
                let _ = std::fs::remove_file(path);
                let l = UnixListener::bind(path).map_err(err)?;
                l.set_nonblocking(true).map_err(err)?;
                port.listener = Some(Listening::Unix(l));
            }
            PortKind::Tcp(addr) => {
                let l = TcpListener::bind(addr).map_err(err)?;
                l.set_nonblocking(true).map_err(err)?;
                port.listener = Some(Listening::Tcp(l));
            }
            PortKind::File(path) => {
                let f = std::fs::OpenOptions::new().create(true).append(true).open(path).map_err(err)?;
                port.output = Some(f);
            }
        }
        for f in port.input.iter().chain(port.output.iter()) {
            set_nonblocking(f.as_raw_fd()).map_err(err)?;
        }
        Ok(port)
    }

    /// The listening socket's descriptor, for unix and tcp ports.
    pub fn listener_fd(&self) -> Option<RawFd> {
        match &self.listener {
            Some(Listening::Unix(l)) => Some(l.as_raw_fd()),
            Some(Listening::Tcp(l)) => Some(l.as_raw_fd()),
            None => None,
        }
    }

    /// The descriptor host input is read from.
    pub fn input_fd(&self) -> Option<RawFd> {
        self.input.as_ref().map(AsRawFd::as_raw_fd)
    }

    /// The descriptor guest output is written to.
    pub fn output_fd(&self) -> Option<RawFd> {
        self.output.as_ref().map(AsRawFd::as_raw_fd)
    }

    /// Whether something on the host can take output now.
    pub fn is_open(&self) -> bool {
        self.output.is_some()
    }

    /// Whether the port can take more guest output into its buffer.
    pub fn has_room(&self) -> bool {
        self.held_bytes() < PENDING_LIMIT
    }

    /// Whether `bytes` more fit in what the port holds (always, when it holds nothing, so a
    /// chain no larger than the limit is never refused for good).
    pub fn has_room_for(&self, bytes: u64) -> bool {
        self.held_bytes() == 0 || self.held_bytes() as u64 + bytes <= PENDING_LIMIT as u64
    }

    /// Guest output held, delayed or waiting for the host side.
    fn held_bytes(&self) -> usize {
        self.pending.len() + self.delayed_bytes
    }

    /// Takes guest output: it waits for the host side, behind any delayed output.
    pub fn queue_output(&mut self, bytes: Vec<u8>) {
        match self.delayed.back() {
            Some(&(last, _)) => self.delay_output(bytes, last),
            None => self.pending.extend(bytes),
        }
    }

    /// Takes guest output that a fault rule delays until `due` (or until the output before it
    /// goes, if that is later).
    pub fn delay_output(&mut self, bytes: Vec<u8>, due: Instant) {
        let due = self.delayed.back().map_or(due, |&(last, _)| due.max(last));
        self.delayed_bytes += bytes.len();
        self.delayed.push_back((due, bytes));
    }

    /// When the next delayed output is due.
    pub fn next_delayed(&self) -> Option<Instant> {
        self.delayed.front().map(|&(due, _)| due)
    }

    /// Moves the delayed output due by `now` (all of it for `None`) to the output waiting for
    /// the host side.
    pub fn release_delayed(&mut self, now: Option<Instant>) {
        while let Some(&(due, _)) = self.delayed.front()
            && now.is_none_or(|now| due <= now)
        {
            if let Some((_, bytes)) = self.delayed.pop_front() {
                self.delayed_bytes -= bytes.len();
                self.pending.extend(bytes);
            }
        }
    }

    /// Accepts a waiting client on a listening port. A second client while one is connected
    /// is told so and closed. Returns true when a client became the port's host side.
    pub fn accept(&mut self) -> io::Result<bool> {
        let stream: Option<OwnedFd> = match &self.listener {
            Some(Listening::Unix(l)) => match l.accept() {
                Ok((s, _)) => Some(s.into()),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => None,
                Err(e) => return Err(e),
            },
            Some(Listening::Tcp(l)) => match l.accept() {
                Ok((s, _)) => {
                    let _ = s.set_nodelay(true);
                    Some(s.into())
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => None,
                Err(e) => return Err(e),
            },
            None => None,
        };
        let Some(fd) = stream else { return Ok(false) };
        let mut file = File::from(fd);
        if self.output.is_some() && self.client_hung_up() {
            // The previous client left while nobody was reading its input: make room.
            self.disconnect();
        }
        if self.output.is_some() {
            let _ = file.write_all(b"pvkit console: this port already has a client\n");
            return Ok(false);
        }
        set_nonblocking(file.as_raw_fd())?;
        self.input = Some(file.try_clone()?);
        self.output = Some(file);
        info!("console port {}: client connected", self.spec);
        Ok(true)
    }

    /// Whether the connected client has closed its end.
    fn client_hung_up(&self) -> bool {
        let Some(fd) = self.input_fd() else { return false };
        let mut pfd = libc::pollfd { fd, events: libc::POLLRDHUP, revents: 0 };
        // SAFETY: `pfd` is valid for the call; a zero timeout makes it a check.
        let n = unsafe { libc::poll(&mut pfd, 1, 0) };
        n > 0 && pfd.revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0
    }

    /// Forgets a client that went away (listening ports only; output still waiting stays).
    pub fn disconnect(&mut self) {
        if self.listener.is_some() {
            self.input = None;
            self.output = None;
            info!("console port {}: client disconnected", self.spec);
        }
    }

    /// Writes as much waiting output as the host side takes now. Returns true when the
    /// client went away.
    pub fn flush(&mut self) -> bool {
        if !self.delayed.is_empty() {
            self.release_delayed(Some(Instant::now()));
        }
        while !self.pending.is_empty() {
            let Some(out) = self.output.as_mut() else { return false };
            let (front, _) = self.pending.as_slices();
            match out.write(front) {
                Ok(0) => return false,
                Ok(n) => drop(self.pending.drain(..n)),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return false,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    warn!("console port {}: write failed: {e}", self.spec);
                    self.disconnect();
                    return true;
                }
            }
        }
        false
    }

    /// Reads host input into `buf`: `Ok(Some(n))` with n > 0 bytes, `Ok(None)` when nothing
    /// is waiting, `Err` when the client went away (it is then disconnected).
    pub fn read(&mut self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        if !self.unread.is_empty() {
            let n = buf.len().min(self.unread.len());
            for (slot, byte) in buf.iter_mut().zip(self.unread.drain(..n)) {
                *slot = byte;
            }
            return Ok(Some(n));
        }
        let Some(input) = self.input.as_mut() else { return Ok(None) };
        match input.read(buf) {
            Ok(0) => {
                self.disconnect();
                if self.listener.is_none() {
                    // stdin at EOF or a pty with no slave: stop reading it.
                    self.input = None;
                }
                Err(io::Error::from(io::ErrorKind::UnexpectedEof))
            }
            Ok(n) => Ok(Some(n)),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock || e.kind() == io::ErrorKind::Interrupted => Ok(None),
            Err(e) if e.raw_os_error() == Some(libc::EIO) && self.pty_path.is_some() => Ok(None),
            Err(e) => {
                self.disconnect();
                Err(e)
            }
        }
    }

    /// Puts `data`, read with [`HostPort::read`], back in front of the input still to come.
    pub fn unread(&mut self, data: &[u8]) {
        for byte in data.iter().rev() {
            self.unread.push_front(*byte);
        }
    }

    /// Whether the port is a terminal whose size the guest should follow.
    pub fn is_terminal(&self) -> bool {
        match self.spec.kind {
            PortKind::Pty => true,
            // SAFETY: isatty only queries the descriptor.
            PortKind::Stdio => self.output_fd().is_some_and(|fd| unsafe { libc::isatty(fd) } == 1),
            _ => false,
        }
    }

    /// The terminal size (rows, cols) of a stdio or pty port, when it is a terminal.
    pub fn size(&self) -> Option<(u16, u16)> {
        let fd = match self.spec.kind {
            PortKind::Stdio | PortKind::Pty => self.output_fd()?,
            _ => return None,
        };
        let mut ws = libc::winsize { ws_row: 0, ws_col: 0, ws_xpixel: 0, ws_ypixel: 0 };
        // SAFETY: TIOCGWINSZ writes one winsize into `ws`.
        let ok = unsafe { libc::ioctl(fd, libc::TIOCGWINSZ, &mut ws) } == 0;
        (ok && ws.ws_row > 0 && ws.ws_col > 0).then_some((ws.ws_row, ws.ws_col))
    }
}

impl Drop for HostPort {
    fn drop(&mut self) {
        if let PortKind::Unix(path) = &self.spec.kind {
            let _ = std::fs::remove_file(path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse() {
        assert_eq!("stdio".parse::<PortSpec>().unwrap(), PortSpec { kind: PortKind::Stdio, name: None });
        assert_eq!(
            "unix:/tmp/c.sock,name=org.pvkit.log".parse::<PortSpec>().unwrap(),
            PortSpec { kind: PortKind::Unix("/tmp/c.sock".into()), name: Some("org.pvkit.log".into()) }
        );
        assert_eq!("tcp:4555".parse::<PortSpec>().unwrap().kind, PortKind::Tcp("127.0.0.1:4555".parse().unwrap()));
        assert_eq!("tcp:0.0.0.0:1".parse::<PortSpec>().unwrap().kind, PortKind::Tcp("0.0.0.0:1".parse().unwrap()));
        assert_eq!("file:/var/log/g".parse::<PortSpec>().unwrap().kind, PortKind::File("/var/log/g".into()));
        for bad in ["", "serial", "unix:", "tcp:host", "file:", "pty,colour=red", "pty,name="] {
            assert!(bad.parse::<PortSpec>().is_err(), "{bad}");
        }
    }

    #[test]
    fn unix_port_takes_one_client_and_keeps_output_while_none_is_there() {
        use std::os::unix::net::UnixStream;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.sock");
        let mut port = HostPort::open(PortSpec { kind: PortKind::Unix(path.clone()), name: None }).unwrap();
        port.pending.extend(b"early output");
        assert!(!port.flush() && port.pending.len() == 12, "kept while nobody listens");
        let mut client = UnixStream::connect(&path).unwrap();
        assert!(port.accept().unwrap());
        let mut second = UnixStream::connect(&path).unwrap();
        assert!(!port.accept().unwrap());
        let mut refusal = String::new();
        second.read_to_string(&mut refusal).unwrap();
        assert!(refusal.contains("already has a client"));
        port.flush();
        let mut got = [0u8; 12];
        client.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"early output");
        client.write_all(b"hi").unwrap();
        let mut buf = [0u8; 8];
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert_eq!(port.read(&mut buf).unwrap(), Some(2));
        drop(client);
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert!(port.read(&mut buf).is_err());
        assert!(!port.is_open());
    }

    #[test]
    fn pty_port_round_trip() {
        let mut port = HostPort::open(PortSpec { kind: PortKind::Pty, name: None }).unwrap();
        let path = port.pty_path.clone().unwrap();
        let mut slave = std::fs::OpenOptions::new().read(true).write(true).open(&path).unwrap();
        // Raw mode on the slave so bytes pass unchanged.
        // SAFETY: termios calls on our own open descriptor.
        unsafe {
            let mut t: libc::termios = std::mem::zeroed();
            libc::tcgetattr(slave.as_raw_fd(), &mut t);
            libc::cfmakeraw(&mut t);
            libc::tcsetattr(slave.as_raw_fd(), libc::TCSANOW, &t);
        }
        port.pending.extend(b"to pty");
        port.flush();
        let mut got = [0u8; 6];
        slave.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"to pty");
        slave.write_all(b"from pty").unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        let mut buf = [0u8; 16];
        assert_eq!(port.read(&mut buf).unwrap(), Some(8));
        assert_eq!(&buf[..8], b"from pty");
    }

    #[test]
    fn file_port_appends() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        std::fs::write(&path, b"old\n").unwrap();
        let mut port = HostPort::open(PortSpec { kind: PortKind::File(path.clone()), name: None }).unwrap();
        assert!(port.input_fd().is_none());
        port.pending.extend(b"new\n");
        port.flush();
        assert_eq!(std::fs::read(&path).unwrap(), b"old\nnew\n");
    }
}
