//! The frontend's end of the backend request channel: the socket pair a frontend hands to its
//! backend with SET_BACKEND_REQ_FD (protocol feature BACKEND_REQ), over which the backend sends
//! requests of its own. pvkit's frontends take one of them, CONFIG_CHANGE_MSG (the device's
//! configuration space changed); the others are refused with ENOSYS, as the vhost crate does.
//!
//! Reading is the caller's business: it watches [`BackendRequests::fd`] and calls
//! [`BackendRequests::handle`] when it is readable, so a backend can never block the VMM.

use std::os::unix::io::{AsRawFd, RawFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use vhost::vhost_user::{Frontend, FrontendReqHandler, HandlerResult, VhostUserFrontend, VhostUserFrontendReqHandler};

/// Errors from the backend request channel.
#[derive(Debug, thiserror::Error)]
pub enum BackendRequestError {
    /// The socket pair could not be made.
    #[error("making the backend request channel: {0}")]
    Socket(vhost::vhost_user::Error),
    /// The backend refused the channel (SET_BACKEND_REQ_FD).
    #[error("handing the backend its request channel (SET_BACKEND_REQ_FD): {0}")]
    Handover(vhost::Error),
    /// A request could not be read, or the backend closed the channel.
    #[error("reading a backend request: {0}")]
    Receive(vhost::vhost_user::Error),
    /// Waiting for a request failed.
    #[error("waiting for a backend request: {0}")]
    Wait(std::io::Error),
}

/// Counts the configuration changes the backend announced.
#[derive(Default)]
struct ConfigChanges(AtomicU64);

impl VhostUserFrontendReqHandler for ConfigChanges {
    fn handle_config_change(&self) -> HandlerResult<u64> {
        self.0.fetch_add(1, Ordering::SeqCst);
        Ok(0)
    }
}

/// An open backend request channel.
pub struct BackendRequests {
    handler: FrontendReqHandler<ConfigChanges>,
    changes: Arc<ConfigChanges>,
}

impl BackendRequests {
    /// Makes the channel and hands its other end to the backend (SET_BACKEND_REQ_FD). The
    /// caller must have negotiated BACKEND_REQ; `reply_ack` says whether REPLY_ACK was too.
    pub fn open(frontend: &mut Frontend, reply_ack: bool) -> Result<BackendRequests, BackendRequestError> {
        let requests = BackendRequests::new(reply_ack)?;
        frontend.set_backend_request_fd(&requests.backend_end()).map_err(BackendRequestError::Handover)?;
        Ok(requests)
    }

    /// The channel, not yet handed over.
    fn new(reply_ack: bool) -> Result<BackendRequests, BackendRequestError> {
        let changes = Arc::new(ConfigChanges::default());
        let mut handler = FrontendReqHandler::new(changes.clone()).map_err(BackendRequestError::Socket)?;
        handler.set_reply_ack_flag(reply_ack);
        Ok(BackendRequests { handler, changes })
    }

    /// The backend's end of the channel (what SET_BACKEND_REQ_FD carries).
    fn backend_end(&self) -> RawFd {
        self.handler.get_tx_raw_fd()
    }

    /// The descriptor to watch: readable when a request is waiting, hung up when the backend
    /// closed its end.
    pub fn fd(&self) -> RawFd {
        self.handler.as_raw_fd()
    }

    /// Reads and answers one request. Returns how many configuration changes it announced
    /// (0 or 1); an error means the channel is unusable (closed, or out of step).
    pub fn handle(&mut self) -> Result<u64, BackendRequestError> {
        let before = self.changes.0.load(Ordering::SeqCst);
        match self.handler.handle_request() {
            Ok(_) => {}
            // A request this frontend does not serve was refused (and answered, if the
            // backend asked for an answer); the channel is still in step.
            Err(vhost::vhost_user::Error::ReqHandlerError(_)) => {}
            Err(e) => return Err(BackendRequestError::Receive(e)),
        }
        Ok(self.changes.0.load(Ordering::SeqCst) - before)
    }

    /// Waits up to `timeout` for a configuration change (for tools without an event loop).
    /// Returns whether one arrived.
    pub fn wait_config_change(&mut self, timeout: Duration) -> Result<bool, BackendRequestError> {
        let deadline = Instant::now() + timeout;
        loop {
            if !self.ready(deadline.saturating_duration_since(Instant::now()))? {
                return Ok(false);
            }
            if self.handle()? > 0 {
                return Ok(true);
            }
        }
    }

    /// Waits up to `timeout` (zero: just looks) for the channel to be readable: a request is
    /// waiting, or the backend closed its end (which [`BackendRequests::handle`] reports).
    pub fn ready(&self, timeout: Duration) -> Result<bool, BackendRequestError> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let mut pfd = libc::pollfd { fd: self.fd(), events: libc::POLLIN, revents: 0 };
            let ms = left.as_millis().min(i32::MAX as u128) as i32;
            // SAFETY: `pfd` is one valid pollfd for the duration of the call.
            let ready = unsafe { libc::poll(&mut pfd, 1, ms) };
            if ready >= 0 {
                return Ok(ready > 0);
            }
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(BackendRequestError::Wait(e));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;

    /// A second handle on the backend's end of `requests`.
    fn backend_side(requests: &BackendRequests) -> UnixStream {
        // SAFETY: dup gives a new descriptor of our own for a socket `requests` keeps open.
        let fd = unsafe { libc::dup(requests.backend_end()) };
        assert!(fd >= 0);
        // SAFETY: `fd` was just made and is owned by nothing else.
        unsafe { std::os::unix::io::FromRawFd::from_raw_fd(fd) }
    }

    fn header(request: u32, flags: u32, size: u32) -> Vec<u8> {
        [request, flags, size].iter().flat_map(|v| v.to_le_bytes()).collect()
    }

    #[test]
    fn config_changes_are_counted_and_other_requests_refused() {
        let mut requests = BackendRequests::new(true).unwrap();
        let mut backend = backend_side(&requests);
        backend.write_all(&header(2, 1, 0)).unwrap();
        assert!(requests.wait_config_change(Duration::from_secs(5)).unwrap());
        // A request this frontend does not serve (SHARED_OBJECT_ADD, a 16-byte UUID), asking
        // for a reply: refused with an error code, and the channel stays in step.
        let mut message = header(6, 1 | 8, 16);
        message.extend_from_slice(&[7u8; 16]);
        backend.write_all(&message).unwrap();
        assert_eq!(requests.handle().unwrap(), 0);
        let mut reply = [0u8; 20];
        backend.read_exact(&mut reply).unwrap();
        assert_eq!(u32::from_le_bytes(reply[..4].try_into().unwrap()), 6);
        assert_ne!(u64::from_le_bytes(reply[12..].try_into().unwrap()), 0, "the reply reports the refusal");
        backend.write_all(&header(2, 1, 0)).unwrap();
        assert_eq!(requests.handle().unwrap(), 1);
        // No change within the wait: false, not an error.
        assert!(!requests.wait_config_change(Duration::from_millis(20)).unwrap());
    }

    #[test]
    fn garbage_and_a_closed_channel_are_errors_not_panics() {
        // An unknown request code.
        let mut requests = BackendRequests::new(false).unwrap();
        backend_side(&requests).write_all(&header(999, 1, 0)).unwrap();
        assert!(requests.handle().is_err());
        // A size past any message.
        let mut requests = BackendRequests::new(false).unwrap();
        backend_side(&requests).write_all(&header(2, 1, 0x7fff_ffff)).unwrap();
        assert!(requests.handle().is_err());
        // The backend went away.
        let mut requests = BackendRequests::new(false).unwrap();
        backend_side(&requests).shutdown(std::net::Shutdown::Both).unwrap();
        assert!(requests.handle().is_err());
        assert!(requests.wait_config_change(Duration::from_millis(50)).is_err());
    }
}
