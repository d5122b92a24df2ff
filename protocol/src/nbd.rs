//! The NBD protocol (the Network Block Device protocol document, `doc/proto.md` of the NBD
//! project): the fixed newstyle handshake, options, and the transmission phase's requests and
//! replies, simple and structured. Every field is big-endian.
//!
//! Each message comes as constants, a `Repr` with `parse` from a fixed-size byte array (so
//! nothing can panic on a short buffer: the caller reads exactly the header's length first)
//! and, for what a client sends, `emit`.

/// Magic numbers.
pub mod magic {
    /// The server's first eight bytes: "NBDMAGIC".
    pub const NBD: u64 = 0x4e42_444d_4147_4943;
    /// Newstyle negotiation, and the prefix of every option a client sends: "IHAVEOPT".
    pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
    /// The prefix of every option reply.
    pub const OPTION_REPLY: u64 = 0x0003_e889_0455_65a9;
    /// A transmission request.
    pub const REQUEST: u32 = 0x2560_9513;
    /// A simple reply.
    pub const SIMPLE_REPLY: u32 = 0x6744_6698;
    /// A structured reply chunk.
    pub const STRUCTURED_REPLY: u32 = 0x668e_33ef;
}

/// Handshake flags (the server's) and client flags (the client's answer).
pub mod handshake {
    /// Fixed newstyle negotiation.
    pub const FIXED_NEWSTYLE: u16 = 1 << 0;
    /// No 124 bytes of zeros after the export information.
    pub const NO_ZEROES: u16 = 1 << 1;
}

/// Option codes.
pub mod option {
    /// Ends negotiation without NBD_OPT_GO support (old servers).
    pub const EXPORT_NAME: u32 = 1;
    /// Gives up.
    pub const ABORT: u32 = 2;
    /// Ends negotiation: the export named, with information.
    pub const GO: u32 = 7;
    /// Structured replies in the transmission phase.
    pub const STRUCTURED_REPLY: u32 = 8;
}

/// Option reply types.
pub mod reply {
    /// The option is done.
    pub const ACK: u32 = 1;
    /// Information about the export.
    pub const INFO: u32 = 3;
    /// Set in every error reply type.
    pub const ERROR_BIT: u32 = 1 << 31;
    /// The option is not supported.
    pub const ERR_UNSUP: u32 = ERROR_BIT | 1;
    /// The export does not exist.
    pub const ERR_UNKNOWN: u32 = ERROR_BIT | 6;
}

/// Information types of NBD_REP_INFO.
pub mod info {
    /// Size and transmission flags.
    pub const EXPORT: u16 = 0;
    /// Block size constraints.
    pub const BLOCK_SIZE: u16 = 3;
}

/// Transmission flags: what the export supports.
pub mod flags {
    /// The other flags are valid.
    pub const HAS_FLAGS: u16 = 1 << 0;
    /// The export is read-only.
    pub const READ_ONLY: u16 = 1 << 1;
    /// NBD_CMD_FLUSH is supported.
    pub const SEND_FLUSH: u16 = 1 << 2;
    /// NBD_CMD_FLAG_FUA is supported.
    pub const SEND_FUA: u16 = 1 << 3;
    /// NBD_CMD_TRIM is supported.
    pub const SEND_TRIM: u16 = 1 << 5;
    /// NBD_CMD_WRITE_ZEROES is supported.
    pub const SEND_WRITE_ZEROES: u16 = 1 << 6;
    /// Several connections see each other's writes once flushed.
    pub const CAN_MULTI_CONN: u16 = 1 << 8;
}

/// Transmission commands.
pub mod command {
    /// Read.
    pub const READ: u16 = 0;
    /// Write.
    pub const WRITE: u16 = 1;
    /// Disconnect.
    pub const DISC: u16 = 2;
    /// Flush.
    pub const FLUSH: u16 = 3;
    /// Discard.
    pub const TRIM: u16 = 4;
    /// Write zeros.
    pub const WRITE_ZEROES: u16 = 6;
}

/// Command flags.
pub mod command_flags {
    /// Force unit access.
    pub const FUA: u16 = 1 << 0;
    /// NBD_CMD_WRITE_ZEROES: do not punch a hole.
    pub const NO_HOLE: u16 = 1 << 1;
}

/// Structured reply chunk types and flags.
pub mod chunk {
    /// The last chunk of a reply.
    pub const FLAG_DONE: u16 = 1 << 0;
    /// No payload.
    pub const NONE: u16 = 0;
    /// Data at an offset.
    pub const OFFSET_DATA: u16 = 1;
    /// Zeros at an offset.
    pub const OFFSET_HOLE: u16 = 2;
    /// Set in every error chunk type.
    pub const ERROR_BIT: u16 = 1 << 15;
    /// An error.
    pub const ERROR: u16 = ERROR_BIT | 1;
    /// An error at an offset.
    pub const ERROR_OFFSET: u16 = ERROR_BIT | 2;
}

/// Error values servers send (Linux's numbers, fixed by the protocol).
pub mod errno {
    /// Operation not permitted.
    pub const EPERM: u32 = 1;
    /// I/O error.
    pub const EIO: u32 = 5;
    /// No memory.
    pub const ENOMEM: u32 = 12;
    /// Invalid argument.
    pub const EINVAL: u32 = 22;
    /// No space left.
    pub const ENOSPC: u32 = 28;
    /// Value too large.
    pub const EOVERFLOW: u32 = 75;
    /// Not supported.
    pub const ENOTSUP: u32 = 95;
    /// Server shutting down.
    pub const ESHUTDOWN: u32 = 108;
}

/// Bytes of the server's greeting: NBDMAGIC, IHAVEOPT, handshake flags.
pub const GREETING_LEN: usize = 18;
/// Bytes of an option's header: IHAVEOPT, option, length.
pub const OPTION_HEADER_LEN: usize = 16;
/// Bytes of an option reply's header: magic, option, type, length.
pub const OPTION_REPLY_HEADER_LEN: usize = 20;
/// Bytes of the payload of NBD_INFO_EXPORT.
pub const INFO_EXPORT_LEN: usize = 12;
/// Bytes of a transmission request header.
pub const REQUEST_LEN: usize = 28;
/// Bytes of a simple reply after its magic.
pub const SIMPLE_REPLY_REST: usize = 12;
/// Bytes of a structured reply chunk's header after its magic.
pub const STRUCTURED_REPLY_REST: usize = 16;
/// The default TCP port.
pub const DEFAULT_PORT: u16 = 10809;

/// What the parsers refuse.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum NbdError {
    /// A magic number was not the one expected.
    #[error("bad {what} magic {found:#x}")]
    BadMagic {
        /// Which message.
        what: &'static str,
        /// What was there.
        found: u64,
    },
    /// The server does not do fixed newstyle negotiation.
    #[error("the server does not offer fixed newstyle negotiation (handshake flags {0:#x})")]
    NotFixedNewstyle(u16),
    /// An NBD_INFO_EXPORT of the wrong type.
    #[error("information of type {0} where NBD_INFO_EXPORT was expected")]
    NotExportInfo(u16),
}

fn be16(b: &[u8], at: usize) -> u16 {
    let mut out = [0u8; 2];
    if let Some(src) = b.get(at..at + 2) {
        out.copy_from_slice(src);
    }
    u16::from_be_bytes(out)
}

fn be32(b: &[u8], at: usize) -> u32 {
    let mut out = [0u8; 4];
    if let Some(src) = b.get(at..at + 4) {
        out.copy_from_slice(src);
    }
    u32::from_be_bytes(out)
}

fn be64(b: &[u8], at: usize) -> u64 {
    let mut out = [0u8; 8];
    if let Some(src) = b.get(at..at + 8) {
        out.copy_from_slice(src);
    }
    u64::from_be_bytes(out)
}

/// The server's greeting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GreetingRepr {
    /// Its handshake flags.
    pub flags: u16,
}

impl GreetingRepr {
    /// Parses the greeting; only fixed newstyle servers are accepted.
    pub fn parse(bytes: &[u8; GREETING_LEN]) -> Result<GreetingRepr, NbdError> {
        let (nbd, opt) = (be64(bytes, 0), be64(bytes, 8));
        if nbd != magic::NBD {
            return Err(NbdError::BadMagic { what: "greeting", found: nbd });
        }
        if opt != magic::IHAVEOPT {
            return Err(NbdError::BadMagic { what: "newstyle greeting", found: opt });
        }
        let flags = be16(bytes, 16);
        if flags & handshake::FIXED_NEWSTYLE == 0 {
            return Err(NbdError::NotFixedNewstyle(flags));
        }
        Ok(GreetingRepr { flags })
    }
}

/// The header of an option the client sends (its `length` bytes of data follow).
pub fn emit_option_header(option: u32, length: u32) -> [u8; OPTION_HEADER_LEN] {
    let mut out = [0u8; OPTION_HEADER_LEN];
    out[..8].copy_from_slice(&magic::IHAVEOPT.to_be_bytes());
    out[8..12].copy_from_slice(&option.to_be_bytes());
    out[12..].copy_from_slice(&length.to_be_bytes());
    out
}

/// An option reply's header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionReplyRepr {
    /// The option it answers.
    pub option: u32,
    /// Its type (`reply::...`).
    pub reply_type: u32,
    /// Bytes of data that follow.
    pub length: u32,
}

impl OptionReplyRepr {
    /// Parses an option reply header.
    pub fn parse(bytes: &[u8; OPTION_REPLY_HEADER_LEN]) -> Result<OptionReplyRepr, NbdError> {
        let found = be64(bytes, 0);
        if found != magic::OPTION_REPLY {
            return Err(NbdError::BadMagic { what: "option reply", found });
        }
        Ok(OptionReplyRepr { option: be32(bytes, 8), reply_type: be32(bytes, 12), length: be32(bytes, 16) })
    }

    /// Whether it is an error reply.
    pub fn is_error(&self) -> bool {
        self.reply_type & reply::ERROR_BIT != 0
    }
}

/// NBD_INFO_EXPORT: the export's size and transmission flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExportInfoRepr {
    /// Bytes.
    pub size: u64,
    /// Transmission flags (`flags::...`).
    pub flags: u16,
}

impl ExportInfoRepr {
    /// Parses the payload of an NBD_REP_INFO of type NBD_INFO_EXPORT.
    pub fn parse(bytes: &[u8; INFO_EXPORT_LEN]) -> Result<ExportInfoRepr, NbdError> {
        let kind = be16(bytes, 0);
        if kind != info::EXPORT {
            return Err(NbdError::NotExportInfo(kind));
        }
        Ok(ExportInfoRepr { size: be64(bytes, 2), flags: be16(bytes, 10) })
    }

    /// Whether the flags hold `flag` (and are valid at all).
    pub fn has(&self, flag: u16) -> bool {
        self.flags & flags::HAS_FLAGS != 0 && self.flags & flag != 0
    }
}

/// A transmission request header (a write's data follows it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestRepr {
    /// Command flags.
    pub flags: u16,
    /// The command.
    pub command: u16,
    /// The client's cookie, returned in the reply.
    pub cookie: u64,
    /// Byte offset.
    pub offset: u64,
    /// Bytes.
    pub length: u32,
}

impl RequestRepr {
    /// The header's bytes.
    pub fn emit(&self) -> [u8; REQUEST_LEN] {
        let mut out = [0u8; REQUEST_LEN];
        out[..4].copy_from_slice(&magic::REQUEST.to_be_bytes());
        out[4..6].copy_from_slice(&self.flags.to_be_bytes());
        out[6..8].copy_from_slice(&self.command.to_be_bytes());
        out[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        out[16..24].copy_from_slice(&self.offset.to_be_bytes());
        out[24..].copy_from_slice(&self.length.to_be_bytes());
        out
    }
}

/// What a reply's first four bytes say comes next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyKind {
    /// A simple reply: [`SIMPLE_REPLY_REST`] more bytes.
    Simple,
    /// A structured reply chunk: [`STRUCTURED_REPLY_REST`] more bytes.
    Structured,
}

impl ReplyKind {
    /// Reads a reply's magic.
    pub fn parse(magic_bytes: &[u8; 4]) -> Result<ReplyKind, NbdError> {
        match u32::from_be_bytes(*magic_bytes) {
            magic::SIMPLE_REPLY => Ok(ReplyKind::Simple),
            magic::STRUCTURED_REPLY => Ok(ReplyKind::Structured),
            found => Err(NbdError::BadMagic { what: "reply", found: found.into() }),
        }
    }
}

/// A simple reply (a successful read's data follows it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SimpleReplyRepr {
    /// Zero, or an error (`errno::...`).
    pub error: u32,
    /// The request's cookie.
    pub cookie: u64,
}

impl SimpleReplyRepr {
    /// Parses the bytes after the magic.
    pub fn parse(bytes: &[u8; SIMPLE_REPLY_REST]) -> SimpleReplyRepr {
        SimpleReplyRepr { error: be32(bytes, 0), cookie: be64(bytes, 4) }
    }
}

/// A structured reply chunk's header (its `length` bytes of payload follow).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkRepr {
    /// Chunk flags (`chunk::FLAG_DONE`).
    pub flags: u16,
    /// Chunk type (`chunk::...`).
    pub chunk_type: u16,
    /// The request's cookie.
    pub cookie: u64,
    /// Bytes of payload.
    pub length: u32,
}

impl ChunkRepr {
    /// Parses the bytes after the magic.
    pub fn parse(bytes: &[u8; STRUCTURED_REPLY_REST]) -> ChunkRepr {
        ChunkRepr { flags: be16(bytes, 0), chunk_type: be16(bytes, 2), cookie: be64(bytes, 4), length: be32(bytes, 12) }
    }

    /// Whether this is the reply's last chunk.
    pub fn is_done(&self) -> bool {
        self.flags & chunk::FLAG_DONE != 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_greeting_must_be_fixed_newstyle() {
        let mut greeting = [0u8; GREETING_LEN];
        greeting[..8].copy_from_slice(&magic::NBD.to_be_bytes());
        greeting[8..16].copy_from_slice(&magic::IHAVEOPT.to_be_bytes());
        greeting[16..].copy_from_slice(&(handshake::FIXED_NEWSTYLE | handshake::NO_ZEROES).to_be_bytes());
        assert_eq!(GreetingRepr::parse(&greeting), Ok(GreetingRepr { flags: 3 }));
        greeting[17] = 0;
        assert_eq!(GreetingRepr::parse(&greeting), Err(NbdError::NotFixedNewstyle(0)));
        greeting[0] = b'X';
        assert!(matches!(GreetingRepr::parse(&greeting), Err(NbdError::BadMagic { what: "greeting", .. })));
    }

    #[test]
    fn requests_are_big_endian_and_replies_parse() {
        let request = RequestRepr { flags: 0, command: command::WRITE, cookie: 7, offset: 0x1000, length: 512 };
        let bytes = request.emit();
        assert_eq!(&bytes[..4], &[0x25, 0x60, 0x95, 0x13]);
        assert_eq!(&bytes[6..8], &[0, 1]);
        assert_eq!(&bytes[16..24], &[0, 0, 0, 0, 0, 0, 0x10, 0]);
        assert_eq!(ReplyKind::parse(&magic::SIMPLE_REPLY.to_be_bytes()), Ok(ReplyKind::Simple));
        assert_eq!(ReplyKind::parse(&magic::STRUCTURED_REPLY.to_be_bytes()), Ok(ReplyKind::Structured));
        assert!(ReplyKind::parse(&[1, 2, 3, 4]).is_err());
        let mut simple = [0u8; SIMPLE_REPLY_REST];
        simple[3] = 5;
        simple[11] = 9;
        assert_eq!(SimpleReplyRepr::parse(&simple), SimpleReplyRepr { error: errno::EIO, cookie: 9 });
        let mut chunk = [0u8; STRUCTURED_REPLY_REST];
        chunk[1] = 1;
        chunk[3] = 1;
        chunk[15] = 24;
        let parsed = ChunkRepr::parse(&chunk);
        assert!(parsed.is_done());
        assert_eq!((parsed.chunk_type, parsed.length), (chunk::OFFSET_DATA, 24));
    }

    #[test]
    fn export_information_and_option_replies() {
        let mut export = [0u8; INFO_EXPORT_LEN];
        export[2..10].copy_from_slice(&(64u64 << 20).to_be_bytes());
        export[10..].copy_from_slice(&(flags::HAS_FLAGS | flags::SEND_FLUSH).to_be_bytes());
        let info = ExportInfoRepr::parse(&export).unwrap();
        assert_eq!(info.size, 64 << 20);
        assert!(info.has(flags::SEND_FLUSH) && !info.has(flags::READ_ONLY));
        export[1] = 3;
        assert_eq!(ExportInfoRepr::parse(&export), Err(NbdError::NotExportInfo(3)));
        let mut header = [0u8; OPTION_REPLY_HEADER_LEN];
        header[..8].copy_from_slice(&magic::OPTION_REPLY.to_be_bytes());
        header[8..12].copy_from_slice(&option::GO.to_be_bytes());
        header[12..16].copy_from_slice(&reply::ERR_UNKNOWN.to_be_bytes());
        let reply = OptionReplyRepr::parse(&header).unwrap();
        assert!(reply.is_error());
        assert_eq!((reply.option, reply.length), (option::GO, 0));
    }
}
