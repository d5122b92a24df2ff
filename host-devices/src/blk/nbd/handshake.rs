//! Connecting to an NBD server: the fixed newstyle handshake, structured replies when the
//! server offers them, and NBD_OPT_GO for the export named in the URI. Every length a server
//! sends is checked before anything is read or allocated for it.

use super::uri::{Address, NbdUri};
use pvkit_protocol::nbd::{
    self, ExportInfoRepr, GreetingRepr, INFO_EXPORT_LEN, OPTION_REPLY_HEADER_LEN, OptionReplyRepr, handshake, info,
    option, reply,
};
use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::time::Duration;

/// The most bytes of one option reply's data accepted (a reply carries at most a name, a
/// description or a message).
const MAX_OPTION_REPLY: u32 = 64 * 1024;
/// The most option replies read for one option.
const MAX_REPLIES_PER_OPTION: usize = 64;

/// Why a connection could not be made or went wrong.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The socket failed.
    #[error("{0}")]
    Io(#[from] io::Error),
    /// The server broke the protocol.
    #[error("the server broke the protocol: {0}")]
    Protocol(String),
    /// The server refused the export.
    #[error("the server refused export '{export}': {why}")]
    Refused {
        /// The export.
        export: String,
        /// The server's reply type and message.
        why: String,
    },
}

impl From<nbd::NbdError> for ConnectError {
    fn from(e: nbd::NbdError) -> ConnectError {
        ConnectError::Protocol(e.to_string())
    }
}

/// The socket to the server.
pub enum Stream {
    /// TCP.
    Tcp(TcpStream),
    /// A unix socket.
    Unix(UnixStream),
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(buf),
            Stream::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write(buf),
            Stream::Unix(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.flush(),
            Stream::Unix(s) => s.flush(),
        }
    }
}

impl Stream {
    fn set_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.set_read_timeout(timeout).and_then(|()| s.set_write_timeout(timeout)),
            Stream::Unix(s) => s.set_read_timeout(timeout).and_then(|()| s.set_write_timeout(timeout)),
        }
    }
}

/// A negotiated connection, in the transmission phase.
pub struct Connection {
    /// The socket.
    pub stream: Stream,
    /// The export's size and flags.
    pub export: ExportInfoRepr,
    /// Whether replies may be structured.
    pub structured: bool,
}

/// Connects to `uri`'s server and negotiates its export; `timeout` bounds every read and write.
pub fn connect(uri: &NbdUri, timeout: Duration) -> Result<Connection, ConnectError> {
    let stream = match &uri.address {
        Address::Tcp(host, port) => {
            let stream = TcpStream::connect((host.as_str(), *port))?;
            stream.set_nodelay(true)?;
            Stream::Tcp(stream)
        }
        Address::Unix(path) => Stream::Unix(UnixStream::connect(path)?),
    };
    stream.set_timeout(Some(timeout))?;
    negotiate(stream, &uri.export)
}

/// The handshake over `stream`, for export `export`.
pub fn negotiate(mut stream: Stream, export: &str) -> Result<Connection, ConnectError> {
    let mut greeting = [0u8; nbd::GREETING_LEN];
    stream.read_exact(&mut greeting)?;
    let greeting = GreetingRepr::parse(&greeting)?;
    let no_zeroes = greeting.flags & handshake::NO_ZEROES;
    stream.write_all(&u32::from(handshake::FIXED_NEWSTYLE | no_zeroes).to_be_bytes())?;

    send_option(&mut stream, option::STRUCTURED_REPLY, &[])?;
    let mut structured = false;
    for_each_reply(&mut stream, option::STRUCTURED_REPLY, |header, _| {
        structured = header.reply_type == reply::ACK;
        Ok(())
    })?;

    let name = export.as_bytes();
    let mut go = Vec::with_capacity(name.len() + 6);
    go.extend_from_slice(&(name.len() as u32).to_be_bytes());
    go.extend_from_slice(name);
    go.extend_from_slice(&0u16.to_be_bytes());
    send_option(&mut stream, option::GO, &go)?;
    let mut found = None;
    let mut refused = None;
    for_each_reply(&mut stream, option::GO, |header, data| {
        if header.is_error() {
            let message = String::from_utf8_lossy(data).into_owned();
            refused = Some(format!("reply {:#x}: {message}", header.reply_type));
        } else if header.reply_type == reply::INFO
            && data.len() >= 2
            && u16::from_be_bytes([data[0], data[1]]) == info::EXPORT
        {
            let bytes: &[u8; INFO_EXPORT_LEN] = data
                .try_into()
                .map_err(|_| ConnectError::Protocol(format!("NBD_INFO_EXPORT of {} bytes", data.len())))?;
            found = Some(ExportInfoRepr::parse(bytes)?);
        }
        Ok(())
    })?;
    if let Some(why) = refused {
        return Err(ConnectError::Refused { export: export.to_string(), why });
    }
    let export_info = found.ok_or_else(|| ConnectError::Protocol("NBD_OPT_GO ended without NBD_INFO_EXPORT".into()))?;
    Ok(Connection { stream, export: export_info, structured })
}

fn send_option(stream: &mut Stream, code: u32, data: &[u8]) -> io::Result<()> {
    let length = u32::try_from(data.len()).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    stream.write_all(&nbd::emit_option_header(code, length))?;
    stream.write_all(data)
}

/// Reads the replies to option `code` until its last (an ACK or an error), handing each to
/// `each` with its data.
fn for_each_reply(
    stream: &mut Stream,
    code: u32,
    mut each: impl FnMut(&OptionReplyRepr, &[u8]) -> Result<(), ConnectError>,
) -> Result<(), ConnectError> {
    for _ in 0..MAX_REPLIES_PER_OPTION {
        let mut header = [0u8; OPTION_REPLY_HEADER_LEN];
        stream.read_exact(&mut header)?;
        let header = OptionReplyRepr::parse(&header)?;
        if header.option != code {
            return Err(ConnectError::Protocol(format!("a reply to option {} while {code} was asked", header.option)));
        }
        if header.length > MAX_OPTION_REPLY {
            return Err(ConnectError::Protocol(format!("an option reply of {} bytes", header.length)));
        }
        let mut data = vec![0u8; header.length as usize];
        stream.read_exact(&mut data)?;
        each(&header, &data)?;
        if header.reply_type == reply::ACK || header.is_error() {
            return Ok(());
        }
    }
    Err(ConnectError::Protocol(format!("more than {MAX_REPLIES_PER_OPTION} replies to option {code}")))
}
