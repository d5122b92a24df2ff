//! A relay between every frontend and the vhost-user library's request handler, for two things
//! the handler gets wrong:
//! - memory tables whose regions reach past the end of their file: the handler maps them, and
//!   the first access past the file's end kills the backend with SIGBUS. The relay refuses
//!   them ([`crate::region_check`]), with a failure reply when the frontend asks for one;
//! - QEMU's virtio-net sends SET_VRING_ENABLE while it sets the device up, before SET_FEATURES
//!   has acknowledged VHOST_USER_F_PROTOCOL_FEATURES, and the handler ends the whole
//!   connection on it ("inactive feature"). The relay remembers the last state asked for each
//!   ring, answers the frontend itself when it wants a reply, and replays the states to the
//!   handler right after SET_FEATURES, when they are valid.
//!
//! Every other message passes through unchanged (file descriptors included). Only the control
//! channel goes through the relay; the rings, kicks and calls never do.
//!
//! It also keeps a duplicate of the backend request channel handed over with
//! SET_BACKEND_REQ_FD, for devices that send requests the library cannot
//! ([`crate::backend_channel`]), and it takes dirty-page logging over from the library, which
//! can only log through a bitmap in the guest memory type: SET_LOG_BASE gives the connection's
//! [`DirtyLog`] its bitmap (answered here, as the specification asks), SET_LOG_FD is accepted
//! and closed, and SET_FEATURES tells the log whether VHOST_F_LOG_ALL is on. A log that cannot
//! be taken ends the connection: a migration must fail rather than lose pages.
//!
//! For a device that tracks requests in flight ([`crate::queue::inflight`]) it also answers
//! GET_INFLIGHT_FD (a new sealed area) and takes SET_INFLIGHT_FD (the area checked and mapped;
//! a refused one is answered with a failure when the frontend asks for a reply, and the ring
//! goes on untracked), and tells the tracking when a ring starts (SET_VRING_KICK).

use crate::backend_channel::BackendChannel;
use crate::lock;
use crate::queue::dirty_log::DirtyLog;
use crate::queue::inflight::{self, Inflight};
use log::{debug, warn};
use pvkit_protocol::inflight::InflightRepr;
use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::unix::io::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use vhost::vhost_user::message::FrontendReq;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

/// Bytes of a vhost-user message header: request, flags, payload size.
const HEADER_LEN: usize = 12;
/// The largest payload the relay accepts (a memory table with 509 regions is under 16 KiB).
const MAX_PAYLOAD: usize = 64 * 1024;
/// The most rings whose early SET_VRING_ENABLE the relay holds (more than any device has; a
/// frontend naming more rings gets the rest dropped, not memory without bound).
const MAX_HELD_RINGS: usize = 1024;
/// The most file descriptors one message carries.
const MAX_FDS: usize = 32;
const FLAG_VERSION: u32 = 0x1;
const FLAG_REPLY: u32 = 0x4;
const FLAG_NEED_REPLY: u32 = 0x8;
const PROTOCOL_FEATURES_BIT: u64 =
    pvkit_protocol::virtio::Features::from_bits(&[pvkit_protocol::virtio::feature::VHOST_USER_PROTOCOL_FEATURES]).0;
const LOG_ALL_BIT: u64 =
    pvkit_protocol::virtio::Features::from_bits(&[pvkit_protocol::virtio::feature::VHOST_LOG_ALL]).0;

/// What the relay hands on, besides the messages: each is optional.
#[derive(Clone, Default)]
pub struct Taken {
    /// Where a backend request channel the frontend hands over goes too.
    pub channel: Option<Arc<BackendChannel>>,
    /// The connection's dirty log.
    pub dirty: Option<Arc<DirtyLog>>,
    /// The connection's in-flight tracking (devices that offer INFLIGHT_SHMFD).
    pub inflight: Option<Arc<Inflight>>,
}

/// Starts relaying between `frontend` and `handler` in two threads; they end when either side
/// closes, closing the other. What the relay keeps goes to `taken`.
pub fn start(name: &str, frontend: UnixStream, handler: UnixStream, taken: Taken) -> io::Result<()> {
    let frontend_writer = Arc::new(Mutex::new(frontend.try_clone()?));
    let handler_reader = handler.try_clone()?;
    let frontend_for_replies = frontend_writer.clone();
    let (frontend_reader, frontend_closer) = (frontend.try_clone()?, frontend);
    let handler_closer = handler.try_clone()?;
    let label = name.to_string();
    std::thread::Builder::new().name("relay-requests".into()).spawn(move || {
        let sinks = Sinks {
            channel: taken.channel.as_deref(),
            dirty: taken.dirty.as_deref(),
            inflight: taken.inflight.as_deref(),
        };
        if let Err(e) = requests(&frontend_reader, &handler, &frontend_for_replies, sinks) {
            debug!("{label}: relay from the frontend ended: {e}");
        }
        let _ = handler_closer.shutdown(std::net::Shutdown::Both);
    })?;
    let label = name.to_string();
    std::thread::Builder::new().name("relay-replies".into()).spawn(move || {
        if let Err(e) = replies(&handler_reader, &frontend_writer) {
            debug!("{label}: relay to the frontend ended: {e}");
        }
        let _ = frontend_closer.shutdown(std::net::Shutdown::Both);
    })?;
    Ok(())
}

/// Receives exactly `buf.len()` bytes, the first chunk with any attached descriptors.
fn recv_message_part(socket: &UnixStream, buf: &mut [u8], fds: &mut Vec<OwnedFd>) -> io::Result<bool> {
    let mut raw = [-1 as RawFd; MAX_FDS];
    let mut iov = [libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() }];
    // SAFETY: the iovec points at `buf`, which is valid for writes of its length.
    let (n, nfds) = unsafe { socket.recv_with_fds(&mut iov, &mut raw) }.map_err(io::Error::from)?;
    for fd in raw.iter().take(nfds) {
        // SAFETY: recvmsg just gave us these descriptors; nothing else owns them.
        fds.push(unsafe { OwnedFd::from_raw_fd(*fd) });
    }
    if n == 0 {
        return Ok(false);
    }
    let mut rest = &mut buf[n..];
    let mut reader = socket;
    while !rest.is_empty() {
        let m = reader.read(rest)?;
        if m == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "message cut short"));
        }
        rest = &mut rest[m..];
    }
    Ok(true)
}

fn send_message(socket: &UnixStream, bytes: &[u8], fds: &[OwnedFd]) -> io::Result<()> {
    let raw: Vec<RawFd> = fds.iter().map(AsRawFd::as_raw_fd).collect();
    let sent = socket.send_with_fds(&[bytes], &raw).map_err(io::Error::from)?;
    if sent < bytes.len() {
        let mut writer = socket;
        writer.write_all(&bytes[sent..])?;
    }
    Ok(())
}

fn u32_at(bytes: &[u8], at: usize) -> u32 {
    bytes.get(at..at + 4).and_then(|b| b.try_into().ok()).map(u32::from_le_bytes).unwrap_or(0)
}

fn u64_at(bytes: &[u8], at: usize) -> u64 {
    bytes.get(at..at + 8).and_then(|b| b.try_into().ok()).map(u64::from_le_bytes).unwrap_or(0)
}

fn message(request: u32, flags: u32, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.extend_from_slice(&request.to_le_bytes());
    out.extend_from_slice(&flags.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(payload);
    out
}

/// Answers `request` for the handler: the u64 of a REPLY_ACK reply (0 success, else failure).
fn reply(frontend_writer: &Mutex<UnixStream>, request: u32, value: u64) -> io::Result<()> {
    let reply = message(request, FLAG_VERSION | FLAG_REPLY, &value.to_le_bytes());
    send_message(&lock(frontend_writer), &reply, &[])
}

/// Frontend to handler: messages one by one, holding back early SET_VRING_ENABLE.
/// Where the relay passes what it keeps of the control channel.
#[derive(Clone, Copy)]
struct Sinks<'a> {
    channel: Option<&'a BackendChannel>,
    dirty: Option<&'a DirtyLog>,
    inflight: Option<&'a Inflight>,
}

/// Answers GET_INFLIGHT_FD with a new area and its descriptor, or with an empty description
/// (no tracking) when the request makes no sense or the area cannot be made.
fn answer_get_inflight(payload: &[u8], inflight: &Inflight, frontend_writer: &Mutex<UnixStream>) -> io::Result<()> {
    let request = FrontendReq::GET_INFLIGHT_FD as u32;
    let made = InflightRepr::parse(payload).map_err(inflight::InflightError::from).and_then(|r| inflight.allocate(&r));
    let (body, fds) = match made {
        Ok((fd, reply)) => {
            debug!("in-flight area of {} bytes for {} queue(s) handed out", reply.mmap_size, reply.num_queues);
            (reply.emit(), vec![fd])
        }
        Err(e) => {
            warn!("GET_INFLIGHT_FD refused: {e}");
            (InflightRepr::default().emit(), Vec::new())
        }
    };
    send_message(&lock(frontend_writer), &message(request, FLAG_VERSION | FLAG_REPLY, &body), &fds)
}

/// Takes SET_INFLIGHT_FD's area; answers when asked. A refused area leaves tracking off.
fn take_set_inflight(
    payload: &[u8],
    fds: &mut Vec<OwnedFd>,
    flags: u32,
    inflight: &Inflight,
    frontend_writer: &Mutex<UnixStream>,
) -> io::Result<()> {
    let taken = match (InflightRepr::parse(payload), fds.len()) {
        (Ok(repr), 1) => match fds.pop() {
            Some(fd) => inflight.set_area(fd, repr).map_err(|e| e.to_string()),
            None => Err("no descriptor".to_string()),
        },
        (Ok(_), n) => Err(format!("{n} descriptors where one is needed")),
        (Err(e), _) => Err(e.to_string()),
    };
    fds.clear();
    if let Err(e) = &taken {
        warn!("SET_INFLIGHT_FD refused, requests in flight are not tracked: {e}");
    }
    if flags & FLAG_NEED_REPLY != 0 {
        reply(frontend_writer, FrontendReq::SET_INFLIGHT_FD as u32, u64::from(taken.is_err()))?;
    }
    Ok(())
}

/// Takes SET_LOG_BASE (payload: size, offset; one descriptor) or SET_LOG_FD for the dirty log
/// and answers; an error ends the connection.
fn take_log_message(
    request: u32,
    payload: &[u8],
    fds: &mut Vec<OwnedFd>,
    dirty: Option<&DirtyLog>,
    frontend_writer: &Mutex<UnixStream>,
) -> io::Result<()> {
    if request == FrontendReq::SET_LOG_FD as u32 {
        // The log's eventfd: nothing is ever signalled through it (no IOTLB, no log syncing).
        fds.clear();
        return Ok(());
    }
    let (Some(dirty), [_], Some(raw)) = (dirty, fds.as_slice(), payload.get(..16)) else {
        return Err(io::Error::other(format!(
            "a SET_LOG_BASE with {} payload bytes and {} descriptor(s) cannot be taken",
            payload.len(),
            fds.len()
        )));
    };
    let (size, offset) = (u64_at(raw, 0), u64_at(raw, 8));
    let fd = fds.pop().ok_or_else(|| io::Error::other("SET_LOG_BASE without its descriptor"))?;
    dirty.set_base(fd, offset, size).map_err(|e| io::Error::other(format!("SET_LOG_BASE: {e}")))?;
    // The reply echoes the log's size and offset, as the vhost-user library's backends do: QEMU
    // takes a reply of any size, rust-vmm's frontend reads exactly these 16 bytes.
    let echo = message(request, FLAG_VERSION | FLAG_REPLY, raw);
    send_message(&lock(frontend_writer), &echo, &[])
}

fn requests(
    frontend: &UnixStream,
    handler: &UnixStream,
    frontend_writer: &Mutex<UnixStream>,
    sinks: Sinks<'_>,
) -> io::Result<()> {
    let Sinks { channel, dirty, inflight } = sinks;
    let (get_inflight, set_inflight) = (FrontendReq::GET_INFLIGHT_FD as u32, FrontendReq::SET_INFLIGHT_FD as u32);
    let set_vring_kick = FrontendReq::SET_VRING_KICK as u32;
    let (set_log_base, set_log_fd) = (FrontendReq::SET_LOG_BASE as u32, FrontendReq::SET_LOG_FD as u32);
    let set_vring_enable = FrontendReq::SET_VRING_ENABLE as u32;
    let set_backend_req_fd = FrontendReq::SET_BACKEND_REQ_FD as u32;
    let set_features = FrontendReq::SET_FEATURES as u32;
    let mut protocol_features_acked = false;
    let mut held: BTreeMap<u32, u32> = BTreeMap::new();
    loop {
        let mut fds = Vec::new();
        let mut kick_after: Option<OwnedFd> = None;
        let mut header = [0u8; HEADER_LEN];
        if !recv_message_part(frontend, &mut header, &mut fds)? {
            return Ok(());
        }
        let (request, flags, size) = (u32_at(&header, 0), u32_at(&header, 4), u32_at(&header, 8) as usize);
        if size > MAX_PAYLOAD {
            return Err(io::Error::other(format!("request {request} announces a {size}-byte payload")));
        }
        let mut payload = vec![0u8; size];
        if size > 0 && !recv_message_part(frontend, &mut payload, &mut fds)? {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "message cut short"));
        }
        if let Err(e) = crate::region_check::check(request, &payload, &fds) {
            // Mapping it would kill the backend with SIGBUS at the first access: refuse it.
            warn!("refused a memory table from the frontend: {e}");
            if flags & FLAG_NEED_REPLY != 0 {
                reply(frontend_writer, request, 1)?;
            }
            continue;
        }
        if request == set_vring_enable && !protocol_features_acked && size == 8 {
            // Too early for the handler: remember it, answer it here if asked to.
            let index = u32_at(&payload, 0);
            if held.len() < MAX_HELD_RINGS || held.contains_key(&index) {
                held.insert(index, u32_at(&payload, 4));
            } else {
                warn!("early SET_VRING_ENABLE for ring {index} dropped: {MAX_HELD_RINGS} rings are held already");
            }
            if flags & FLAG_NEED_REPLY != 0 {
                reply(frontend_writer, request, 0)?;
            }
            continue;
        }
        if request == set_log_base || request == set_log_fd {
            if let Err(e) = take_log_message(request, &payload, &mut fds, dirty, frontend_writer) {
                warn!("dirty log refused, ending the connection: {e}");
                return Err(e);
            }
            if request == set_log_fd && flags & FLAG_NEED_REPLY != 0 {
                reply(frontend_writer, request, 0)?;
            }
            continue;
        }
        if let Some(inflight) = inflight {
            if request == get_inflight {
                answer_get_inflight(&payload, inflight, frontend_writer)?;
                continue;
            }
            if request == set_inflight {
                take_set_inflight(&payload, &mut fds, flags, inflight, frontend_writer)?;
                continue;
            }
            if request == set_vring_kick && size == 8 {
                // Bits 0-7: the ring; before the library starts it, so its first pass resumes.
                inflight.ring_started(usize::from(payload[0]));
                if inflight.is_tracking() {
                    kick_after = fds.first().and_then(|fd| fd.try_clone().ok());
                }
            }
        }
        if request == set_backend_req_fd
            && let (Some(channel), [fd]) = (channel, fds.as_slice())
        {
            match fd.try_clone() {
                Ok(copy) => channel.connect(UnixStream::from(copy)),
                Err(e) => warn!("cannot keep the backend request channel: {e}"),
            }
        }
        let features = (request == set_features && size == 8).then(|| u64_at(&payload, 0));
        if let (Some(dirty), Some(features)) = (dirty, features) {
            // Before the library acts on the features: no write escapes a starting log.
            dirty.set_log_all(features & LOG_ALL_BIT != 0);
        }
        let mut bytes = header.to_vec();
        bytes.extend_from_slice(&payload);
        send_message(handler, &bytes, &fds)?;
        drop(fds);
        if let Some(kick) = kick_after.take() {
            // The ring's first pass must come even if the driver, waiting for the requests
            // the last backend left unfinished, never kicks again: kick it once.
            let _ = std::fs::File::from(kick).write_all(&1u64.to_ne_bytes());
        }
        if let Some(features) = features {
            protocol_features_acked = features & PROTOCOL_FEATURES_BIT != 0;

            if protocol_features_acked && !held.is_empty() {
                debug!("replaying {} early SET_VRING_ENABLE message(s)", held.len());
                for (index, state) in std::mem::take(&mut held) {
                    let mut body = index.to_le_bytes().to_vec();
                    body.extend_from_slice(&state.to_le_bytes());
                    // No NEED_REPLY: the handler's answer would reach a frontend not asking.
                    send_message(handler, &message(set_vring_enable, FLAG_VERSION, &body), &[])?;
                }
            } else if !protocol_features_acked && !held.is_empty() {
                warn!("the frontend enabled rings but did not acknowledge protocol features; ignoring that");
                held.clear();
            }
        }
    }
}

/// Handler to frontend: bytes and descriptors as they come.
fn replies(handler: &UnixStream, frontend_writer: &Mutex<UnixStream>) -> io::Result<()> {
    let mut buf = vec![0u8; 4096];
    loop {
        let mut raw = [-1 as RawFd; MAX_FDS];
        let mut iov = [libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() }];
        // SAFETY: the iovec points at `buf`, which is valid for writes of its length.
        let (n, nfds) = unsafe { handler.recv_with_fds(&mut iov, &mut raw) }.map_err(io::Error::from)?;
        // SAFETY: recvmsg just gave us these descriptors; nothing else owns them.
        let fds: Vec<OwnedFd> = raw.iter().take(nfds).map(|fd| unsafe { OwnedFd::from_raw_fd(*fd) }).collect();
        if n == 0 {
            return Ok(());
        }
        let writer = lock(frontend_writer);
        send_message(&writer, &buf[..n], &fds)?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const SET_FEATURES: u32 = FrontendReq::SET_FEATURES as u32;
    const SET_VRING_ENABLE: u32 = FrontendReq::SET_VRING_ENABLE as u32;
    const GET_FEATURES: u32 = FrontendReq::GET_FEATURES as u32;

    /// A relay between two socket pairs: (the test's frontend end, the test's handler end).
    fn relayed() -> (UnixStream, UnixStream) {
        relayed_to(None)
    }

    /// [`relayed`], the relay feeding `dirty`.
    fn relayed_to(dirty: Option<Arc<DirtyLog>>) -> (UnixStream, UnixStream) {
        let (frontend, relay_frontend) = UnixStream::pair().unwrap();
        let (relay_handler, handler) = UnixStream::pair().unwrap();
        for s in [&frontend, &handler] {
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        }
        start("relay-test", relay_frontend, relay_handler, Taken { dirty, ..Taken::default() }).unwrap();
        (frontend, handler)
    }

    fn read_message(socket: &UnixStream) -> (u32, u32, Vec<u8>) {
        let mut header = [0u8; HEADER_LEN];
        let mut reader = socket;
        reader.read_exact(&mut header).unwrap();
        let mut payload = vec![0u8; u32_at(&header, 8) as usize];
        reader.read_exact(&mut payload).unwrap();
        (u32_at(&header, 0), u32_at(&header, 4), payload)
    }

    fn enable(index: u32, flags: u32) -> Vec<u8> {
        let mut body = index.to_le_bytes().to_vec();
        body.extend_from_slice(&1u32.to_le_bytes());
        message(SET_VRING_ENABLE, flags, &body)
    }

    #[test]
    fn early_ring_enables_are_answered_held_and_replayed_after_set_features() {
        let (frontend, handler) = relayed();
        let mut writer = &frontend;
        writer.write_all(&enable(1, FLAG_VERSION | FLAG_NEED_REPLY)).unwrap();
        let (request, flags, payload) = read_message(&frontend);
        assert_eq!((request, flags & FLAG_REPLY, payload), (SET_VRING_ENABLE, FLAG_REPLY, 0u64.to_le_bytes().to_vec()));
        writer.write_all(&message(GET_FEATURES, FLAG_VERSION, &[])).unwrap();
        assert_eq!(read_message(&handler).0, GET_FEATURES, "the held message is not passed on early");
        writer.write_all(&message(SET_FEATURES, FLAG_VERSION, &PROTOCOL_FEATURES_BIT.to_le_bytes())).unwrap();
        assert_eq!(read_message(&handler).0, SET_FEATURES);
        let (request, flags, payload) = read_message(&handler);
        assert_eq!((request, flags & FLAG_NEED_REPLY), (SET_VRING_ENABLE, 0), "replayed without asking a reply");
        assert_eq!(payload, [1u32.to_le_bytes(), 1u32.to_le_bytes()].concat());
        // Replies go back to the frontend as they come.
        let mut handler_writer = &handler;
        handler_writer.write_all(&message(GET_FEATURES, FLAG_VERSION | FLAG_REPLY, &7u64.to_le_bytes())).unwrap();
        assert_eq!(read_message(&frontend).2, 7u64.to_le_bytes());
    }

    #[test]
    fn early_ring_enables_for_endless_ring_numbers_are_held_up_to_a_bound() {
        let (frontend, handler) = relayed();
        let mut writer = &frontend;
        for index in 0..(MAX_HELD_RINGS as u32 + 500) {
            writer.write_all(&enable(index, FLAG_VERSION)).unwrap();
        }
        writer.write_all(&message(SET_FEATURES, FLAG_VERSION, &PROTOCOL_FEATURES_BIT.to_le_bytes())).unwrap();
        assert_eq!(read_message(&handler).0, SET_FEATURES);
        let replayed: Vec<u32> = (0..MAX_HELD_RINGS).map(|_| u32_at(&read_message(&handler).2, 0)).collect();
        assert_eq!(replayed, (0..MAX_HELD_RINGS as u32).collect::<Vec<_>>(), "the first rings, each once");
        writer.write_all(&message(GET_FEATURES, FLAG_VERSION, &[])).unwrap();
        assert_eq!(read_message(&handler).0, GET_FEATURES, "nothing beyond the bound was held");
    }

    #[test]
    fn an_absurd_payload_size_ends_the_relay_and_closes_both_sides() {
        let (frontend, handler) = relayed();
        let mut header = message(GET_FEATURES, FLAG_VERSION, &[]);
        header[8..12].copy_from_slice(&(MAX_PAYLOAD as u32 + 1).to_le_bytes());
        (&frontend).write_all(&header).unwrap();
        let mut byte = [0u8; 1];
        assert_eq!((&handler).read(&mut byte).unwrap(), 0, "the handler's side is closed");
        assert_eq!((&frontend).read(&mut byte).unwrap(), 0, "the frontend's side is closed");
    }

    #[test]
    fn a_message_cut_short_ends_the_relay_without_passing_half_of_it() {
        let (frontend, handler) = relayed();
        (&frontend).write_all(&message(SET_FEATURES, FLAG_VERSION, &[0; 8])[..15]).unwrap();
        frontend.shutdown(std::net::Shutdown::Write).unwrap();
        let mut rest = Vec::new();
        (&handler).read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty(), "{} bytes of a partial message were passed on", rest.len());
    }

    #[test]
    fn a_region_past_its_file_is_refused_with_a_failure_reply_and_not_passed_on() {
        let (frontend, handler) = relayed();
        let file = tempfile::tempfile().unwrap();
        file.set_len(4096).unwrap();
        let mut table = 1u32.to_le_bytes().to_vec();
        table.extend_from_slice(&[0; 4]);
        for field in [0u64, 1 << 20, 0x7f00_0000_0000, 0] {
            table.extend_from_slice(&field.to_le_bytes());
        }
        let request = crate::region_check::SET_MEM_TABLE;
        let bytes = message(request, FLAG_VERSION | FLAG_NEED_REPLY, &table);
        frontend.send_with_fds(&[&bytes[..]], &[file.as_raw_fd()]).unwrap();
        let (reply, flags, payload) = read_message(&frontend);
        assert_eq!((reply, flags & FLAG_REPLY, payload), (request, FLAG_REPLY, 1u64.to_le_bytes().to_vec()));
        (&frontend).write_all(&message(GET_FEATURES, FLAG_VERSION, &[])).unwrap();
        assert_eq!(read_message(&handler).0, GET_FEATURES, "the refused table never reached the handler");
    }

    fn relayed_with_log() -> (UnixStream, UnixStream, Arc<DirtyLog>) {
        let dirty = Arc::new(DirtyLog::new());
        let (frontend, handler) = relayed_to(Some(dirty.clone()));
        (frontend, handler, dirty)
    }

    fn log_base(size: u64, offset: u64) -> Vec<u8> {
        let body = [size.to_le_bytes(), offset.to_le_bytes()].concat();
        message(FrontendReq::SET_LOG_BASE as u32, FLAG_VERSION, &body)
    }

    /// SET_LOG_BASE is answered by the relay and never reaches the library; SET_FEATURES with
    /// VHOST_F_LOG_ALL (passed on) starts the logging, and without it stops it.
    #[test]
    fn a_log_base_is_taken_and_answered_and_log_all_switches_logging() {
        let (frontend, handler, dirty) = relayed_with_log();
        let file = tempfile::tempfile().unwrap();
        file.set_len(4096).unwrap();
        frontend.send_with_fds(&[&log_base(4096, 0)[..]], &[file.as_raw_fd()]).unwrap();
        let (request, flags, payload) = read_message(&frontend);
        // The reply echoes size and offset (rust-vmm's frontend reads exactly those 16 bytes).
        let echo = [4096u64.to_le_bytes(), 0u64.to_le_bytes()].concat();
        assert_eq!((request, flags & FLAG_REPLY, payload), (FrontendReq::SET_LOG_BASE as u32, FLAG_REPLY, echo));
        let with_log = PROTOCOL_FEATURES_BIT | LOG_ALL_BIT;
        (&frontend).write_all(&message(SET_FEATURES, FLAG_VERSION, &with_log.to_le_bytes())).unwrap();
        assert_eq!(read_message(&handler).0, SET_FEATURES, "SET_LOG_BASE was not passed on");
        assert!(dirty.is_logging());
        (&frontend).write_all(&message(SET_FEATURES, FLAG_VERSION, &PROTOCOL_FEATURES_BIT.to_le_bytes())).unwrap();
        assert_eq!(read_message(&handler).0, SET_FEATURES);
        assert!(!dirty.is_logging(), "a cleared LOG_ALL stops logging");
    }

    /// A log its file cannot hold, or one without its descriptor, ends the connection: a
    /// migration must fail rather than miss pages.
    #[test]
    fn a_log_that_cannot_be_taken_ends_the_connection() {
        for with_fd in [true, false] {
            let (frontend, handler, dirty) = relayed_with_log();
            let file = tempfile::tempfile().unwrap();
            file.set_len(4096).unwrap();
            let fds = if with_fd { vec![file.as_raw_fd()] } else { Vec::new() };
            frontend.send_with_fds(&[&log_base(1 << 20, 0)[..]], &fds).unwrap();
            let mut rest = Vec::new();
            (&handler).read_to_end(&mut rest).unwrap();
            assert!(rest.is_empty(), "nothing reaches the library");
            (&frontend).read_to_end(&mut rest).unwrap();
            assert!(rest.is_empty(), "no success reply, the frontend's side is closed");
            assert!(!dirty.is_logging());
        }
    }

    fn relayed_with_inflight() -> (UnixStream, UnixStream, Arc<Inflight>) {
        let inflight = Arc::new(Inflight::new(2, Arc::new(std::sync::atomic::AtomicU64::new(0))));
        let (frontend, relay_frontend) = UnixStream::pair().unwrap();
        let (relay_handler, handler) = UnixStream::pair().unwrap();
        for s in [&frontend, &handler] {
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        }
        let taken = Taken { inflight: Some(inflight.clone()), ..Taken::default() };
        start("relay-test", relay_frontend, relay_handler, taken).unwrap();
        (frontend, handler, inflight)
    }

    /// Reads a reply and the descriptors that came with it.
    fn read_reply_with_fds(socket: &UnixStream) -> (u32, Vec<u8>, Vec<OwnedFd>) {
        let mut buf = vec![0u8; HEADER_LEN + 64];
        let mut fds = Vec::new();
        assert!(
            recv_message_part(socket, &mut buf[..HEADER_LEN + pvkit_protocol::inflight::MESSAGE_SIZE], &mut fds)
                .unwrap()
        );
        (u32_at(&buf, 0), buf[HEADER_LEN..HEADER_LEN + pvkit_protocol::inflight::MESSAGE_SIZE].to_vec(), fds)
    }

    /// GET_INFLIGHT_FD is answered by the relay with a new area; SET_INFLIGHT_FD takes it and
    /// SET_VRING_KICK reaches the library; neither in-flight message reaches the library.
    #[test]
    fn in_flight_areas_are_handed_out_and_taken_by_the_relay() {
        let (frontend, handler, inflight) = relayed_with_inflight();
        let get = FrontendReq::GET_INFLIGHT_FD as u32;
        let ask = InflightRepr { num_queues: 2, queue_size: 128, ..Default::default() };
        (&frontend).write_all(&message(get, FLAG_VERSION, &ask.emit())).unwrap();
        let (request, payload, mut fds) = read_reply_with_fds(&frontend);
        let reply = InflightRepr::parse(&payload).unwrap();
        assert_eq!((request, reply.num_queues, reply.queue_size), (get, 2, 128));
        assert_eq!(reply.mmap_size, 2 * pvkit_protocol::inflight::queue_region_size(128));
        let area = fds.pop().expect("the area's descriptor");
        assert_eq!(std::fs::File::from(area.try_clone().unwrap()).metadata().unwrap().len(), reply.mmap_size);

        let set = FrontendReq::SET_INFLIGHT_FD as u32;
        let bytes = message(set, FLAG_VERSION | FLAG_NEED_REPLY, &reply.emit());
        frontend.send_with_fds(&[&bytes[..]], &[area.as_raw_fd()]).unwrap();
        assert_eq!(read_message(&frontend).2, 0u64.to_le_bytes(), "taken");
        assert!(inflight.is_tracking());
        let kick_fd = vmm_sys_util::eventfd::EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK).unwrap();
        let kick = message(FrontendReq::SET_VRING_KICK as u32, FLAG_VERSION, &1u64.to_le_bytes());
        frontend.send_with_fds(&[&kick[..]], &[kick_fd.as_raw_fd()]).unwrap();
        assert_eq!(read_message(&handler).0, FrontendReq::SET_VRING_KICK as u32, "the first message the library sees");
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        let kicked = loop {
            match kick_fd.read() {
                Ok(count) => break count,
                Err(_) if std::time::Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
                Err(e) => panic!("the ring was never kicked: {e}"),
            }
        };
        assert_eq!(kicked, 1, "the ring is kicked once, so that it resumes without the driver");
        let ring = inflight.queue(1).expect("a region for ring 1");
        assert!(ring.take_pending(), "ring 1's next pass resumes it");
        assert!(!inflight.queue(0).unwrap().take_pending(), "ring 0 was not started");
    }

    /// An area its file cannot hold, a nonsense request or a missing descriptor: a failure
    /// reply (or an empty area), a log line, no tracking, and the connection goes on.
    #[test]
    fn bad_in_flight_messages_are_refused_and_the_connection_goes_on() {
        let (frontend, handler, inflight) = relayed_with_inflight();
        let get = FrontendReq::GET_INFLIGHT_FD as u32;
        let nonsense = InflightRepr { num_queues: 0, queue_size: 128, ..Default::default() };
        (&frontend).write_all(&message(get, FLAG_VERSION, &nonsense.emit())).unwrap();
        let (_, payload, fds) = read_reply_with_fds(&frontend);
        assert_eq!(
            (InflightRepr::parse(&payload).unwrap().mmap_size, fds.len()),
            (0, 0),
            "an empty area, no descriptor"
        );

        let set = FrontendReq::SET_INFLIGHT_FD as u32;
        let small = tempfile::tempfile().unwrap();
        small.set_len(64).unwrap();
        let claim = InflightRepr { mmap_size: 1 << 20, mmap_offset: 0, num_queues: 2, queue_size: 128 };
        let bytes = message(set, FLAG_VERSION | FLAG_NEED_REPLY, &claim.emit());
        frontend.send_with_fds(&[&bytes[..]], &[small.as_raw_fd()]).unwrap();
        assert_eq!(read_message(&frontend).2, 1u64.to_le_bytes(), "a file smaller than the area is refused");
        (&frontend).write_all(&message(set, FLAG_VERSION | FLAG_NEED_REPLY, &claim.emit())).unwrap();
        assert_eq!(read_message(&frontend).2, 1u64.to_le_bytes(), "no descriptor is refused");
        (&frontend).write_all(&message(set, FLAG_VERSION | FLAG_NEED_REPLY, &[0; 8])).unwrap();
        assert_eq!(read_message(&frontend).2, 1u64.to_le_bytes(), "a short payload is refused");
        assert!(!inflight.is_tracking());
        assert_eq!(inflight.refused(), 1, "the area checked and refused");
        (&frontend).write_all(&message(GET_FEATURES, FLAG_VERSION, &[])).unwrap();
        assert_eq!(read_message(&handler).0, GET_FEATURES, "the connection goes on");
    }
}
