//! Moving a VM between two `pvkit run` processes over a unix socket. The stream is a sequence
//! of messages, each a one-byte tag, a little-endian u64 length and the payload:
//!
//! | from | message | payload |
//! |---|---|---|
//! | source | `Hello` | JSON [`Hello`]: the format, where it runs, guest memory's size |
//! | source | `Pages` | u64 guest-physical address, then whole pages (repeated, in rounds) |
//! | source | `State` | JSON: the manifest and the machine state, as a snapshot holds them |
//! | source | `End` | nothing: the VM is paused and everything is sent |
//! | destination | `Ack` | nothing: received; let go of the backends |
//! | source | `Released` | nothing: the backends are free |
//! | destination | `Running` | JSON: how long the restore took; or `Failed` with a message |
//!
//! The destination checks the source as a restore checks a snapshot (format, pvkit version,
//! CPU vendor, KVM flavour) and keeps every page inside guest memory.

use super::{MachineState, Manifest, Origin, Snapshot, SnapshotError};
use crate::memory::GuestRam;
use serde::{Deserialize, Serialize};
use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::time::Duration;

/// The largest JSON payload taken (the machine state of 8 vCPUs is well under 2 MiB).
const MAX_JSON: u64 = 64 << 20;
/// The largest `Pages` payload taken.
const MAX_PAGES: u64 = super::memory_image::CHUNK + 8;
/// How long either side waits for the other's next message.
const PEER_TIMEOUT: Duration = Duration::from_secs(60);

/// Errors from a migration.
#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    /// The socket failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// Why.
        source: std::io::Error,
    },
    /// The peer sent something else than the protocol's next message.
    #[error("expected {expected} from the other side, got message {got}")]
    Unexpected {
        /// What was expected.
        expected: &'static str,
        /// The tag received.
        got: u8,
    },
    /// A message too large for its kind.
    #[error("a {kind} message of {len} bytes is larger than the {max} taken")]
    TooLarge {
        /// Its kind.
        kind: &'static str,
        /// Its length.
        len: u64,
        /// The largest taken.
        max: u64,
    },
    /// Pages that are not inside guest memory.
    #[error("{len} bytes of pages at {gpa:#x} are not inside {size} bytes of guest memory")]
    PagesOutside {
        /// Where.
        gpa: u64,
        /// How many bytes.
        len: u64,
        /// Guest memory's size.
        size: u64,
    },
    /// A JSON payload that does not parse.
    #[error("a {kind} message does not parse: {source}")]
    Json {
        /// Its kind.
        kind: &'static str,
        /// Why.
        source: serde_json::Error,
    },
    /// The destination could not start the VM.
    #[error("the destination could not start the VM: {0}")]
    DestinationFailed(String),
    /// The state the source sent.
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    /// Guest memory.
    #[error(transparent)]
    Memory(#[from] crate::memory::MemoryError),
    /// Reading or writing guest memory.
    #[error(transparent)]
    Pages(#[from] super::memory_image::MemoryImageError),
    /// A dirty-page log.
    #[error(transparent)]
    Dirty(#[from] super::dirty::DirtyError),
    /// A backend that cannot log the pages it writes (pre-copy needs it).
    #[error("{device}'s backend at {} cannot log the pages it writes; move the VM with stop-and-copy", socket.display())]
    CannotLog {
        /// The device.
        device: String,
        /// Its backend's socket.
        socket: std::path::PathBuf,
    },
    /// A device's backend refused a request.
    #[error("{device}: {source}")]
    Device {
        /// The device.
        device: String,
        /// Why.
        source: crate::frontend::FrontendError,
    },
    /// The VM could not be paused.
    #[error(transparent)]
    Control(#[from] crate::control::ControlError),
}

/// The messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum Tag {
    Hello = 1,
    Pages = 2,
    State = 3,
    End = 4,
    Ack = 5,
    Released = 6,
    Running = 7,
    Failed = 8,
}

impl Tag {
    fn name(self) -> &'static str {
        match self {
            Tag::Hello => "Hello",
            Tag::Pages => "Pages",
            Tag::State => "State",
            Tag::End => "End",
            Tag::Ack => "Ack",
            Tag::Released => "Released",
            Tag::Running => "Running",
            Tag::Failed => "Failed",
        }
    }

    fn max_len(self) -> u64 {
        match self {
            Tag::Pages => MAX_PAGES,
            Tag::Hello | Tag::State | Tag::Running | Tag::Failed => MAX_JSON,
            Tag::End | Tag::Ack | Tag::Released => 0,
        }
    }
}

/// The first message: what the destination must be able to take.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Hello {
    /// The snapshot format of the state to come.
    pub format: u32,
    /// Where the source runs.
    pub origin: Origin,
    /// Guest memory's size.
    pub memory: u64,
}

/// `State`: the manifest and machine state.
#[derive(Serialize)]
pub struct StateRef<'a, M: Serialize> {
    /// The manifest.
    pub manifest: &'a Manifest,
    /// The machine state (by reference).
    pub machine: &'a M,
}

#[derive(Deserialize)]
struct StateOwned {
    manifest: Manifest,
    machine: MachineState,
}

/// `Running`: how the destination's start went.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Started {
    /// From the end of the transfer until its vCPUs were started.
    pub restore_ms: f64,
}

/// One end of a migration's connection.
pub struct Channel {
    stream: UnixStream,
}

impl Channel {
    /// Connects to a destination waiting on `socket`.
    pub fn connect(socket: &Path) -> Result<Channel, MigrationError> {
        let stream = UnixStream::connect(socket)
            .map_err(|source| MigrationError::Io { what: "connecting to the destination", source })?;
        Channel::new(stream)
    }

    /// Waits on `socket` (made anew) for the source, and takes its connection.
    pub fn accept(socket: &Path) -> Result<Channel, MigrationError> {
        // A socket left by an earlier run is replaced; any other file is left alone (and
        // binding fails on it).
        if std::fs::symlink_metadata(socket).is_ok_and(|m| std::os::unix::fs::FileTypeExt::is_socket(&m.file_type())) {
            let _ = std::fs::remove_file(socket);
        }
        let io = |what| move |source| MigrationError::Io { what, source };
        let listener = UnixListener::bind(socket).map_err(io("listening for the source"))?;
        let (stream, _) = listener.accept().map_err(io("taking the source's connection"))?;
        let _ = std::fs::remove_file(socket);
        Channel::new(stream)
    }

    fn new(stream: UnixStream) -> Result<Channel, MigrationError> {
        stream
            .set_read_timeout(Some(PEER_TIMEOUT))
            .map_err(|source| MigrationError::Io { what: "setting the socket's timeout", source })?;
        Ok(Channel { stream })
    }

    fn send(&mut self, tag: Tag, parts: &[&[u8]]) -> Result<(), MigrationError> {
        let len: usize = parts.iter().map(|p| p.len()).sum();
        let mut header = [0u8; 9];
        header[0] = tag as u8;
        header[1..].copy_from_slice(&(len as u64).to_le_bytes());
        let io = |source| MigrationError::Io { what: "sending", source };
        self.stream.write_all(&header).map_err(io)?;
        for part in parts {
            self.stream.write_all(part).map_err(io)?;
        }
        Ok(())
    }

    fn send_json<T: Serialize>(&mut self, tag: Tag, value: &T) -> Result<(), MigrationError> {
        let bytes = serde_json::to_vec(value).map_err(|source| MigrationError::Json { kind: tag.name(), source })?;
        self.send(tag, &[&bytes])
    }

    /// The next message, which must be one of `expected` (`what` names them); its tag and
    /// payload.
    fn receive(&mut self, expected: &[Tag], what: &'static str) -> Result<(Tag, Vec<u8>), MigrationError> {
        let io = |source| MigrationError::Io { what: "receiving", source };
        let mut header = [0u8; 9];
        self.stream.read_exact(&mut header).map_err(io)?;
        let Some(&tag) = expected.iter().find(|t| **t as u8 == header[0]) else {
            return Err(MigrationError::Unexpected { expected: what, got: header[0] });
        };
        let mut raw = [0u8; 8];
        raw.copy_from_slice(&header[1..]);
        let len = u64::from_le_bytes(raw);
        if len > tag.max_len() {
            return Err(MigrationError::TooLarge { kind: tag.name(), len, max: tag.max_len() });
        }
        let mut payload = vec![0u8; len as usize];
        self.stream.read_exact(&mut payload).map_err(io)?;
        Ok((tag, payload))
    }

    // The source's side.

    /// Says what comes.
    pub fn hello(&mut self, memory: u64) -> Result<(), MigrationError> {
        let hello = Hello { format: super::FORMAT_VERSION, origin: Origin::here(), memory };
        self.send_json(Tag::Hello, &hello)
    }

    /// Sends `bytes` of guest memory at `gpa`.
    pub fn pages(&mut self, gpa: u64, bytes: &[u8]) -> Result<(), MigrationError> {
        self.send(Tag::Pages, &[&gpa.to_le_bytes(), bytes])
    }

    /// Sends the manifest and machine state, and the end of the transfer; waits for the
    /// destination to have them.
    pub fn finish<M: Serialize>(&mut self, manifest: &Manifest, machine: &M) -> Result<(), MigrationError> {
        self.send_json(Tag::State, &StateRef { manifest, machine })?;
        self.send(Tag::End, &[])?;
        self.receive(&[Tag::Ack], "Ack").map(|_| ())
    }

    /// Tells the destination the backends are free; waits for it to run the VM.
    pub fn released(&mut self) -> Result<Started, MigrationError> {
        self.send(Tag::Released, &[])?;
        let (tag, payload) = self.receive(&[Tag::Running, Tag::Failed], "Running or Failed")?;
        if tag == Tag::Failed {
            return Err(MigrationError::DestinationFailed(String::from_utf8_lossy(&payload).into_owned()));
        }
        serde_json::from_slice(&payload).map_err(|source| MigrationError::Json { kind: "Running", source })
    }

    // The destination's side.

    /// Receives the VM: its memory (into new guest memory) and state, checked as a restore
    /// checks a snapshot; answers `Ack` and waits until the source let go of the backends.
    pub fn receive_vm(&mut self) -> Result<(Snapshot, GuestRam), MigrationError> {
        let (_, payload) = self.receive(&[Tag::Hello], "Hello")?;
        let hello: Hello =
            serde_json::from_slice(&payload).map_err(|source| MigrationError::Json { kind: "Hello", source })?;
        if hello.format != super::FORMAT_VERSION {
            return Err(SnapshotError::Mismatch {
                what: "snapshot format",
                found: hello.format.to_string(),
                here: super::FORMAT_VERSION.to_string(),
            }
            .into());
        }
        hello.origin.check(&Origin::here())?;
        let ram = GuestRam::new(hello.memory)?;
        let snapshot = loop {
            let (tag, payload) = self.receive(&[Tag::Pages, Tag::State], "Pages or State")?;
            if tag == Tag::Pages {
                write_pages(&ram, &payload)?;
                continue;
            }
            let state: StateOwned =
                serde_json::from_slice(&payload).map_err(|source| MigrationError::Json { kind: "State", source })?;
            break Snapshot { manifest: state.manifest, machine: state.machine };
        };
        snapshot.check_consistent()?;
        if snapshot.manifest.memory.size != ram.size() {
            return Err(SnapshotError::Inconsistent(format!(
                "{} bytes of guest memory announced, {} in the manifest",
                ram.size(),
                snapshot.manifest.memory.size
            ))
            .into());
        }
        self.receive(&[Tag::End], "End")?;
        self.send(Tag::Ack, &[])?;
        self.receive(&[Tag::Released], "Released")?;
        Ok((snapshot, ram))
    }

    /// Tells the source the VM runs here.
    pub fn running(&mut self, restore: Duration) -> Result<(), MigrationError> {
        self.send_json(Tag::Running, &Started { restore_ms: restore.as_secs_f64() * 1000.0 })
    }

    /// Tells the source the VM could not start here, and why.
    pub fn failed(&mut self, why: &str) -> Result<(), MigrationError> {
        self.send(Tag::Failed, &[why.as_bytes()])
    }
}

/// Writes a `Pages` payload (address, then bytes) into guest memory, refusing pages outside it.
fn write_pages(ram: &GuestRam, payload: &[u8]) -> Result<(), MigrationError> {
    let (Some(head), rest) = (payload.get(..8), payload.get(8..).unwrap_or_default()) else {
        return Err(MigrationError::PagesOutside { gpa: 0, len: payload.len() as u64, size: ram.size() });
    };
    let mut raw = [0u8; 8];
    raw.copy_from_slice(head);
    let gpa = u64::from_le_bytes(raw);
    let len = rest.len() as u64;
    if !ram.contains(gpa, len) || !gpa.is_multiple_of(super::memory_image::PAGE) {
        return Err(MigrationError::PagesOutside { gpa, len, size: ram.size() });
    }
    super::memory_image::write_guest(ram, gpa, rest)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_outside_guest_memory_and_oversized_messages_are_refused() {
        let ram = GuestRam::new(16 << 20).unwrap();
        let mut payload = (16u64 << 20).to_le_bytes().to_vec();
        payload.extend_from_slice(&[1; 4096]);
        assert!(matches!(write_pages(&ram, &payload), Err(MigrationError::PagesOutside { .. })));
        assert!(matches!(write_pages(&ram, &[1, 2]), Err(MigrationError::PagesOutside { .. })));
        let mut inside = 4096u64.to_le_bytes().to_vec();
        inside.extend_from_slice(&[7; 4096]);
        write_pages(&ram, &inside).unwrap();

        let (a, b) = UnixStream::pair().unwrap();
        let (mut source, mut destination) = (Channel::new(a).unwrap(), Channel::new(b).unwrap());
        let mut header = vec![Tag::Pages as u8];
        header.extend_from_slice(&(MAX_PAGES + 1).to_le_bytes());
        source.stream.write_all(&header).unwrap();
        assert!(matches!(destination.receive(&[Tag::Pages], "Pages"), Err(MigrationError::TooLarge { .. })));
    }

    #[test]
    fn a_message_out_of_turn_is_refused() {
        let (a, b) = UnixStream::pair().unwrap();
        let (mut source, mut destination) = (Channel::new(a).unwrap(), Channel::new(b).unwrap());
        source.send(Tag::End, &[]).unwrap();
        assert!(matches!(destination.receive_vm(), Err(MigrationError::Unexpected { got: 4, .. })));
    }
}
