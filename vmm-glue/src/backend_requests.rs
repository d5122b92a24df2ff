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
        let changes = Arc::new(ConfigChanges::default());
        let mut handler = FrontendReqHandler::new(changes.clone()).map_err(BackendRequestError::Socket)?;
        handler.set_reply_ack_flag(reply_ack);
        let backend_end = handler.get_tx_raw_fd();
        frontend.set_backend_request_fd(&backend_end).map_err(BackendRequestError::Handover)?;
        Ok(BackendRequests { handler, changes })
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
            let left = deadline.saturating_duration_since(Instant::now());
            let mut pfd = libc::pollfd { fd: self.fd(), events: libc::POLLIN, revents: 0 };
            let ms = left.as_millis().min(i32::MAX as u128) as i32;
            // SAFETY: `pfd` is one valid pollfd for the duration of the call.
            let ready = unsafe { libc::poll(&mut pfd, 1, ms) };
            if ready < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(BackendRequestError::Wait(e));
            }
            if ready == 0 {
                return Ok(false);
            }
            if self.handle()? > 0 {
                return Ok(true);
            }
        }
    }
}
