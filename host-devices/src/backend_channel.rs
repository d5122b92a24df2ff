//! The backend's end of the vhost-user backend request channel (protocol feature
//! BACKEND_REQ): a socket the frontend hands over with SET_BACKEND_REQ_FD, on which the backend
//! sends requests of its own. pvkit's backends send one of them, CONFIG_CHANGE_MSG, when their
//! configuration space changes (a console's terminal is resized).
//!
//! `vhost-user-backend` passes the channel to a device only as an opaque `Backend` that cannot
//! send CONFIG_CHANGE_MSG, so the control relay ([`crate::relay`]) keeps a duplicate of the
//! descriptor as it passes and gives it to the device's [`BackendChannel`].

use crate::lock;
use log::{debug, warn};
use std::io::{self, Write};
use std::os::unix::net::UnixStream;
use std::sync::Mutex;

/// Errors from the backend request channel.
#[derive(Debug, thiserror::Error)]
pub enum BackendChannelError {
    /// Writing a request failed (the frontend closed the channel, or is not reading it).
    #[error("sending {request} to the frontend: {source}")]
    Send {
        /// The request.
        request: &'static str,
        /// Why.
        source: io::Error,
    },
}

/// vhost-user's VHOST_USER_BACKEND_CONFIG_CHANGE_MSG.
const CONFIG_CHANGE_MSG: u32 = 2;
/// Header flags: protocol version 1, no reply wanted.
const FLAG_VERSION: u32 = 0x1;
/// How long a send may block before the frontend counts as not listening.
const SEND_TIMEOUT: std::time::Duration = std::time::Duration::from_millis(500);

/// The channel of one frontend connection; empty until the frontend hands it over.
#[derive(Default)]
pub struct BackendChannel {
    stream: Mutex<Option<UnixStream>>,
}

impl BackendChannel {
    /// An empty channel.
    pub fn new() -> BackendChannel {
        BackendChannel::default()
    }

    /// The frontend handed over its channel (a later one replaces an earlier one).
    pub fn connect(&self, stream: UnixStream) {
        if let Err(e) = stream.set_write_timeout(Some(SEND_TIMEOUT)) {
            warn!("backend request channel: cannot set a send timeout: {e}");
        }
        debug!("backend request channel: handed over by the frontend");
        *lock(&self.stream) = Some(stream);
    }

    /// Whether the frontend handed over a channel.
    pub fn is_connected(&self) -> bool {
        lock(&self.stream).is_some()
    }

    /// Tells the frontend the configuration space changed. Returns false when there is no
    /// channel; a channel that fails is dropped.
    pub fn config_changed(&self) -> Result<bool, BackendChannelError> {
        let mut guard = lock(&self.stream);
        let Some(stream) = guard.as_mut() else { return Ok(false) };
        let mut message = [0u8; 12];
        message[..4].copy_from_slice(&CONFIG_CHANGE_MSG.to_le_bytes());
        message[4..8].copy_from_slice(&FLAG_VERSION.to_le_bytes());
        match stream.write_all(&message) {
            Ok(()) => Ok(true),
            Err(source) => {
                *guard = None;
                Err(BackendChannelError::Send { request: "CONFIG_CHANGE_MSG", source })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn config_change_is_a_bare_version_1_header() {
        let channel = BackendChannel::new();
        assert!(!channel.config_changed().unwrap(), "nothing is sent without a channel");
        let (ours, mut frontend) = UnixStream::pair().unwrap();
        channel.connect(ours);
        assert!(channel.config_changed().unwrap());
        let mut got = [0u8; 12];
        frontend.read_exact(&mut got).unwrap();
        assert_eq!(got, [2, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0]);
        drop(frontend);
        assert!(channel.config_changed().is_err(), "a closed channel is an error");
        assert!(!channel.is_connected(), "and is dropped");
    }
}
