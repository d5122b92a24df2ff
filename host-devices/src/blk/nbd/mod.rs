//! Disks on an NBD server (`--nbd URI`), through a small client of pvkit's own (no maintained
//! Rust crate does structured replies and several requests in flight): the wire format is in
//! `protocol::nbd`, the handshake in `handshake.rs`, the transmission phase in `transmit.rs`.
//!
//! One connection serves every queue; each queue's batch of reads and writes goes out at once
//! and its replies come back in any order. A lost connection is made again, with backoff, while
//! the guest's requests wait; they fail with IOERR only once `--nbd-timeout` has passed without
//! a server. Requests that were in flight when the connection broke are sent again on the new
//! one (reads, writes, flushes, discards and zeroing may all be repeated).

pub mod handshake;
pub mod transmit;
pub mod uri;

#[cfg(test)]
mod tests;

use super::engine::{BlockEngine, Capabilities, RwOp};
use handshake::{ConnectError, Connection};
use log::{info, warn};
use pvkit_protocol::nbd::{ExportInfoRepr, command, command_flags, errno, flags};
use std::io;
use std::sync::Mutex;
use std::time::{Duration, Instant};
use transmit::{MAX_PAYLOAD, Request};
use uri::NbdUri;
use vm_memory::VolatileSlice;
use vm_memory::bitmap::BitmapSlice;

/// The largest discard or zeroing sent as one request.
const MAX_RANGE: u64 = 1 << 30;
/// The first wait between attempts to reach the server, and the longest.
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// Why the disk could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum NbdOpenError {
    /// The server could not be reached or refused the export.
    #[error("cannot open {uri}: {source}")]
    Connect {
        /// The URI.
        uri: String,
        /// Why.
        source: ConnectError,
    },
    /// An export whose size is not a positive multiple of 512 bytes.
    #[error("{uri}: the export's size {size} is not a positive multiple of 512 bytes")]
    Size {
        /// The URI.
        uri: String,
        /// Its size.
        size: u64,
    },
}

/// The connection, made again when it breaks.
struct Link {
    connection: Option<Connection>,
    scratch: Vec<u8>,
}

/// An export on an NBD server, served as the guest's disk.
pub struct NbdEngine {
    uri: NbdUri,
    timeout: Duration,
    export: ExportInfoRepr,
    link: Mutex<Link>,
}

impl NbdEngine {
    /// Connects to `uri`; `timeout` is how long requests wait for a lost server.
    pub fn open(uri: NbdUri, timeout: Duration) -> Result<NbdEngine, NbdOpenError> {
        let connection = handshake::connect(&uri, timeout)
            .map_err(|source| NbdOpenError::Connect { uri: uri.to_string(), source })?;
        let export = connection.export;
        if export.size == 0 || !export.size.is_multiple_of(512) {
            return Err(NbdOpenError::Size { uri: uri.to_string(), size: export.size });
        }
        info!(
            "vhost-user-blk: {uri}: {} bytes, flags {:#x}, {} replies",
            export.size,
            export.flags,
            if connection.structured { "structured" } else { "simple" }
        );
        let link = Mutex::new(Link { connection: Some(connection), scratch: Vec::new() });
        Ok(NbdEngine { uri, timeout, export, link })
    }

    /// Runs `requests` on the connection, making it again as often as needed until the
    /// timeout; one outcome per request.
    fn run<B: BitmapSlice>(&self, requests: &[Request<'_, '_, B>]) -> Vec<io::Result<()>> {
        if requests.is_empty() {
            return Vec::new();
        }
        let mut link = crate::lock(&self.link);
        let Link { connection, scratch } = &mut *link;
        let deadline = Instant::now() + self.timeout;
        let mut backoff = FIRST_BACKOFF;
        loop {
            if connection.is_none() {
                match self.reconnect() {
                    Ok(made) => *connection = Some(made),
                    Err(e) if Instant::now() >= deadline => {
                        warn!("vhost-user-blk: {}: no server for {:?} ({e}); failing requests", self.uri, self.timeout);
                        return requests.iter().map(|_| Err(io::Error::from_raw_os_error(errno::EIO as i32))).collect();
                    }
                    Err(_) => {
                        std::thread::sleep(backoff.min(deadline.saturating_duration_since(Instant::now())));
                        backoff = (backoff * 2).min(MAX_BACKOFF);
                        continue;
                    }
                }
            }
            let Some(conn) = connection.as_mut() else { continue };
            match conn.exchange(requests, scratch) {
                Ok(outcomes) => {
                    return outcomes
                        .into_iter()
                        .map(|e| if e == 0 { Ok(()) } else { Err(io::Error::from_raw_os_error(e as i32)) })
                        .collect();
                }
                Err(e) => {
                    warn!("vhost-user-blk: {}: connection lost ({e}); connecting again", self.uri);
                    *connection = None;
                }
            }
        }
    }

    /// A new connection, to an export that must look as before.
    fn reconnect(&self) -> Result<Connection, ConnectError> {
        let made = handshake::connect(&self.uri, self.timeout)?;
        if made.export.size != self.export.size || made.export.flags != self.export.flags {
            return Err(ConnectError::Protocol(format!(
                "the export changed: {} bytes, flags {:#x}, was {} bytes, flags {:#x}",
                made.export.size, made.export.flags, self.export.size, self.export.flags
            )));
        }
        info!("vhost-user-blk: {}: connected again", self.uri);
        Ok(made)
    }

    /// One operation on `len` bytes at `offset`, split into requests of at most `max` bytes.
    fn ranges(offset: u64, len: u64, max: u64) -> impl Iterator<Item = (u64, u32)> {
        let mut done = 0;
        std::iter::from_fn(move || {
            (done < len).then(|| {
                let n = (len - done).min(max);
                let piece = (offset + done, n as u32);
                done += n;
                piece
            })
        })
    }

    /// The requests of a read or write of `bufs` at `offset`.
    fn data_requests<'s, 'a, B: BitmapSlice>(
        write: bool,
        offset: u64,
        bufs: &'s [VolatileSlice<'a, B>],
    ) -> Vec<Request<'s, 'a, B>> {
        let len: u64 = bufs.iter().map(|b| b.len() as u64).sum();
        let command = if write { command::WRITE } else { command::READ };
        Self::ranges(offset, len, MAX_PAYLOAD.into())
            .map(|(at, length)| Request { command, flags: 0, offset: at, length, data: Some((bufs, at - offset)) })
            .collect()
    }

    fn range_requests<B>(command: u16, flags: u16, offset: u64, len: u64) -> Vec<Request<'static, 'static, B>> {
        Self::ranges(offset, len, MAX_RANGE)
            .map(|(at, length)| Request { command, flags, offset: at, length, data: None })
            .collect()
    }

    fn all_ok(outcomes: Vec<io::Result<()>>) -> io::Result<()> {
        outcomes.into_iter().collect()
    }
}

impl BlockEngine for NbdEngine {
    fn size(&self) -> u64 {
        self.export.size
    }

    fn capabilities(&self) -> Capabilities {
        let export = &self.export;
        Capabilities {
            flush: export.has(flags::SEND_FLUSH),
            discard: export.has(flags::SEND_TRIM),
            write_zeroes: export.has(flags::SEND_WRITE_ZEROES),
            read_only: export.has(flags::READ_ONLY),
        }
    }

    fn read<B: BitmapSlice>(&self, offset: u64, bufs: &[VolatileSlice<'_, B>]) -> io::Result<()> {
        Self::all_ok(self.run(&Self::data_requests(false, offset, bufs)))
    }

    fn write<B: BitmapSlice>(&self, offset: u64, bufs: &[VolatileSlice<'_, B>]) -> io::Result<()> {
        Self::all_ok(self.run(&Self::data_requests(true, offset, bufs)))
    }

    fn flush(&self) -> io::Result<()> {
        if !self.capabilities().flush {
            return Ok(());
        }
        let flush = Request::<()> { command: command::FLUSH, flags: 0, offset: 0, length: 0, data: None };
        Self::all_ok(self.run(&[flush]))
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        if !self.capabilities().discard {
            return Err(io::Error::from(io::ErrorKind::Unsupported));
        }
        Self::all_ok(self.run(&Self::range_requests::<()>(command::TRIM, 0, offset, len)))
    }

    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> io::Result<()> {
        if !self.capabilities().write_zeroes {
            return Err(io::Error::from(io::ErrorKind::Unsupported));
        }
        let flags = if unmap { 0 } else { command_flags::NO_HOLE };
        Self::all_ok(self.run(&Self::range_requests::<()>(command::WRITE_ZEROES, flags, offset, len)))
    }

    /// Every read and write of the batch in flight at once.
    fn rw_batch<B: BitmapSlice>(&self, _queue: usize, ops: &[RwOp<'_, B>]) -> Vec<io::Result<()>> {
        let mut requests = Vec::new();
        let mut owners = Vec::new();
        for (index, op) in ops.iter().enumerate() {
            for request in Self::data_requests(op.write, op.offset, &op.bufs) {
                requests.push(request);
                owners.push(index);
            }
        }
        let mut results: Vec<io::Result<()>> = ops.iter().map(|_| Ok(())).collect();
        for (outcome, owner) in self.run(&requests).into_iter().zip(owners) {
            if let (Err(e), Some(slot)) = (outcome, results.get_mut(owner))
                && slot.is_ok()
            {
                *slot = Err(e);
            }
        }
        results
    }
}
