//! The transmission phase: a batch of requests sent at once (several in flight), their
//! replies read in whatever order the server sends them, simple or structured. Read data goes
//! straight from the socket's buffer into the guest's memory, and only into the range of the
//! request it answers: a server that names another range, an unknown cookie or an oversized
//! chunk breaks the connection, never the backend.

use super::handshake::Connection;
use pvkit_protocol::nbd::{
    self, ChunkRepr, ReplyKind, RequestRepr, SIMPLE_REPLY_REST, STRUCTURED_REPLY_REST, SimpleReplyRepr, chunk, command,
    errno,
};
use std::io::{self, Read, Write};
use vm_memory::VolatileSlice;
use vm_memory::bitmap::BitmapSlice;

/// The most bytes one request carries (the protocol document's recommended maximum payload).
pub const MAX_PAYLOAD: u32 = 32 << 20;
/// The most bytes of an error chunk's payload accepted (error, message length, message, offset).
const MAX_ERROR_CHUNK: u32 = 4 + 2 + 4096 + 8;

/// The connection failed or the server broke the protocol: nothing more is read from it.
#[derive(Debug, thiserror::Error)]
pub enum TransmitError {
    /// The socket failed.
    #[error("{0}")]
    Io(#[from] io::Error),
    /// The server broke the protocol.
    #[error("the server broke the protocol: {0}")]
    Protocol(String),
}

impl From<nbd::NbdError> for TransmitError {
    fn from(e: nbd::NbdError) -> TransmitError {
        TransmitError::Protocol(e.to_string())
    }
}

fn protocol(what: String) -> TransmitError {
    TransmitError::Protocol(what)
}

/// One request of a batch.
pub struct Request<'s, 'a, B> {
    /// The command (`command::...`).
    pub command: u16,
    /// Command flags.
    pub flags: u16,
    /// Byte offset on the export.
    pub offset: u64,
    /// Bytes.
    pub length: u32,
    /// For reads and writes: the guest memory of the whole operation and where in it this
    /// request's bytes start.
    pub data: Option<(&'s [VolatileSlice<'a, B>], u64)>,
}

/// How far each request's reply has come.
#[derive(Debug, Clone, Copy, Default)]
struct Progress {
    done: bool,
    error: u32,
    covered: u64,
}

impl Connection {
    /// Sends `requests` together, then reads every reply; returns each request's outcome in
    /// order (0, or the server's error number). `scratch` is reused between calls.
    pub fn exchange<B: BitmapSlice>(
        &mut self,
        requests: &[Request<'_, '_, B>],
        scratch: &mut Vec<u8>,
    ) -> Result<Vec<u32>, TransmitError> {
        self.send(requests, scratch)?;
        let mut progress = vec![Progress::default(); requests.len()];
        let mut remaining = requests.len();
        while remaining > 0 {
            let mut magic = [0u8; 4];
            self.stream.read_exact(&mut magic)?;
            let finished = match ReplyKind::parse(&magic)? {
                ReplyKind::Simple => self.simple_reply(requests, &mut progress, scratch)?,
                ReplyKind::Structured => self.chunk(requests, &mut progress, scratch)?,
            };
            remaining -= usize::from(finished);
        }
        Ok(requests
            .iter()
            .zip(progress)
            .map(|(request, p)| match p.error {
                0 if request.command == command::READ && p.covered != u64::from(request.length) => errno::EIO,
                error => error,
            })
            .collect())
    }

    fn send<B: BitmapSlice>(&mut self, requests: &[Request<'_, '_, B>], scratch: &mut Vec<u8>) -> io::Result<()> {
        let mut out = io::BufWriter::with_capacity(256 * 1024, &mut self.stream);
        for (cookie, request) in requests.iter().enumerate() {
            let header = RequestRepr {
                flags: request.flags,
                command: request.command,
                cookie: cookie as u64,
                offset: request.offset,
                length: request.length,
            };
            out.write_all(&header.emit())?;
            if let (command::WRITE, Some((bufs, start))) = (request.command, request.data) {
                scratch.resize(request.length as usize, 0);
                copy_out(bufs, start, scratch)?;
                out.write_all(scratch)?;
            }
        }
        out.flush()
    }

    /// Reads a simple reply; returns whether it finished a request (always).
    fn simple_reply<B: BitmapSlice>(
        &mut self,
        requests: &[Request<'_, '_, B>],
        progress: &mut [Progress],
        scratch: &mut Vec<u8>,
    ) -> Result<bool, TransmitError> {
        let mut rest = [0u8; SIMPLE_REPLY_REST];
        self.stream.read_exact(&mut rest)?;
        let reply = SimpleReplyRepr::parse(&rest);
        let (request, state) = pending(requests, progress, reply.cookie)?;
        if reply.error != 0 {
            state.error = reply.error;
        } else if request.command == command::READ {
            if self.structured {
                return Err(protocol("a simple reply to a read after structured replies were agreed".into()));
            }
            self.read_data(request, 0, request.length, scratch)?;
            state.covered = u64::from(request.length);
        }
        state.done = true;
        Ok(true)
    }

    /// Reads a structured reply chunk; returns whether it finished a request.
    fn chunk<B: BitmapSlice>(
        &mut self,
        requests: &[Request<'_, '_, B>],
        progress: &mut [Progress],
        scratch: &mut Vec<u8>,
    ) -> Result<bool, TransmitError> {
        if !self.structured {
            return Err(protocol("a structured reply that was not agreed".into()));
        }
        let mut rest = [0u8; STRUCTURED_REPLY_REST];
        self.stream.read_exact(&mut rest)?;
        let header = ChunkRepr::parse(&rest);
        let (request, state) = pending(requests, progress, header.cookie)?;
        match header.chunk_type {
            chunk::NONE if header.length == 0 => {}
            chunk::OFFSET_DATA if request.command == command::READ && header.length > 8 => {
                let (at, len) = (self.read_u64()?, header.length - 8);
                let start = relative(request, at, u64::from(len))?;
                self.read_data(request, start, len, scratch)?;
                state.covered += u64::from(len);
            }
            chunk::OFFSET_HOLE if request.command == command::READ && header.length == 12 => {
                let at = self.read_u64()?;
                let mut size = [0u8; 4];
                self.stream.read_exact(&mut size)?;
                let len = u32::from_be_bytes(size);
                let start = relative(request, at, u64::from(len))?;
                if let Some((bufs, base)) = request.data {
                    zero(bufs, base + start, u64::from(len)).map_err(TransmitError::Io)?;
                }
                state.covered += u64::from(len);
            }
            kind if kind & chunk::ERROR_BIT != 0 && (6..=MAX_ERROR_CHUNK).contains(&header.length) => {
                scratch.resize(header.length as usize, 0);
                self.stream.read_exact(scratch)?;
                let error = u32::from_be_bytes([scratch[0], scratch[1], scratch[2], scratch[3]]);
                state.error = if error == 0 { errno::EIO } else { error };
            }
            kind => return Err(protocol(format!("a chunk of type {kind:#x} and {} bytes", header.length))),
        }
        state.done = header.is_done();
        Ok(state.done)
    }

    fn read_u64(&mut self) -> io::Result<u64> {
        let mut bytes = [0u8; 8];
        self.stream.read_exact(&mut bytes)?;
        Ok(u64::from_be_bytes(bytes))
    }

    /// Reads `len` bytes of `request`'s data from the socket into its guest memory, `start`
    /// bytes into the request.
    fn read_data<B: BitmapSlice>(
        &mut self,
        request: &Request<'_, '_, B>,
        start: u64,
        len: u32,
        scratch: &mut Vec<u8>,
    ) -> Result<(), TransmitError> {
        scratch.resize(len as usize, 0);
        self.stream.read_exact(scratch)?;
        if let Some((bufs, base)) = request.data {
            copy_in(bufs, base + start, scratch)?;
        }
        Ok(())
    }
}

/// The request a reply's `cookie` names, if it is one of the batch's and still waits.
fn pending<'r, 's, 'a, 'x, B>(
    requests: &'r [Request<'s, 'a, B>],
    progress: &'x mut [Progress],
    cookie: u64,
) -> Result<(&'r Request<'s, 'a, B>, &'x mut Progress), TransmitError> {
    let index = usize::try_from(cookie).ok().filter(|&i| i < requests.len());
    match index.and_then(|i| Some((requests.get(i)?, progress.get_mut(i)?))) {
        Some((_, state)) if state.done => Err(protocol(format!("a second reply to request {cookie}"))),
        Some(found) => Ok(found),
        None => Err(protocol(format!("a reply to unknown request {cookie}"))),
    }
}

/// Where the range `at..at + len` a chunk names starts within `request`; refused unless it
/// lies inside the request.
fn relative<B>(request: &Request<'_, '_, B>, at: u64, len: u64) -> Result<u64, TransmitError> {
    let end = u64::from(request.length);
    match at.checked_sub(request.offset) {
        Some(start) if start.checked_add(len).is_some_and(|e| e <= end) => Ok(start),
        _ => Err(protocol(format!(
            "a chunk for bytes {at}+{len} outside the request at {}+{}",
            request.offset, request.length
        ))),
    }
}

/// Calls `each(slice, offset in it, offset in the data, bytes)` for the parts of `bufs` that
/// hold `len` bytes from `start` on (the guest's buffers were checked to hold the whole
/// operation).
fn walk<B: BitmapSlice>(
    bufs: &[VolatileSlice<'_, B>],
    start: u64,
    len: u64,
    mut each: impl FnMut(&VolatileSlice<'_, B>, usize, usize, usize) -> io::Result<()>,
) -> io::Result<()> {
    let (mut skip, mut done) = (start, 0u64);
    for slice in bufs {
        let slice_len = slice.len() as u64;
        if skip >= slice_len {
            skip -= slice_len;
            continue;
        }
        let n = (slice_len - skip).min(len - done);
        each(slice, skip as usize, done as usize, n as usize)?;
        done += n;
        skip = 0;
        if done == len {
            return Ok(());
        }
    }
    if done == len { Ok(()) } else { Err(io::Error::other("the guest's buffers end before the request")) }
}

fn copy_in<B: BitmapSlice>(bufs: &[VolatileSlice<'_, B>], start: u64, data: &[u8]) -> io::Result<()> {
    walk(bufs, start, data.len() as u64, |slice, at, from, n| {
        slice.subslice(at, n).map_err(io::Error::other)?.copy_from(&data[from..from + n]);
        Ok(())
    })
}

fn copy_out<B: BitmapSlice>(bufs: &[VolatileSlice<'_, B>], start: u64, data: &mut [u8]) -> io::Result<()> {
    let len = data.len() as u64;
    walk(bufs, start, len, |slice, at, from, n| {
        slice.subslice(at, n).map_err(io::Error::other)?.copy_to(&mut data[from..from + n]);
        Ok(())
    })
}

fn zero<B: BitmapSlice>(bufs: &[VolatileSlice<'_, B>], start: u64, len: u64) -> io::Result<()> {
    const ZEROS: [u8; 4096] = [0; 4096];
    walk(bufs, start, len, |slice, at, _, n| {
        let part = slice.subslice(at, n).map_err(io::Error::other)?;
        let mut done = 0;
        while done < n {
            let step = (n - done).min(ZEROS.len());
            part.subslice(done, step).map_err(io::Error::other)?.copy_from(&ZEROS[..step]);
            done += step;
        }
        Ok(())
    })
}
