//! The client against a scripted server over a socket pair: a well-behaved exchange with
//! structured and simple replies, and servers that lie: bad magic, oversized replies, data for
//! another range or another request. A lie breaks the connection and writes nothing outside the
//! request's buffer; nothing panics.

use super::handshake::{ConnectError, Connection, Stream, negotiate};
use super::transmit::{Request, TransmitError};
use pvkit_protocol::nbd::{self, chunk, command, errno, flags, handshake, info, magic, option, reply};
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::thread::JoinHandle;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

const EXPORT_SIZE: u64 = 1 << 20;

/// The server's side of a handshake: greeting, then answers to STRUCTURED_REPLY (ACK when
/// `structured`) and GO.
fn serve_handshake(server: &mut UnixStream, structured: bool) {
    let mut greeting = Vec::new();
    greeting.extend_from_slice(&magic::NBD.to_be_bytes());
    greeting.extend_from_slice(&magic::IHAVEOPT.to_be_bytes());
    greeting.extend_from_slice(&(handshake::FIXED_NEWSTYLE | handshake::NO_ZEROES).to_be_bytes());
    server.write_all(&greeting).unwrap();
    let mut client_flags = [0u8; 4];
    server.read_exact(&mut client_flags).unwrap();
    for _ in 0..2 {
        let mut header = [0u8; nbd::OPTION_HEADER_LEN];
        server.read_exact(&mut header).unwrap();
        let code = u32::from_be_bytes(header[8..12].try_into().unwrap());
        let len = u32::from_be_bytes(header[12..16].try_into().unwrap());
        let mut data = vec![0u8; len as usize];
        server.read_exact(&mut data).unwrap();
        if code == option::GO {
            let mut export = Vec::new();
            export.extend_from_slice(&info::EXPORT.to_be_bytes());
            export.extend_from_slice(&EXPORT_SIZE.to_be_bytes());
            export.extend_from_slice(&(flags::HAS_FLAGS | flags::SEND_FLUSH).to_be_bytes());
            option_reply(server, code, reply::INFO, &export);
        }
        let kind = if code == option::STRUCTURED_REPLY && !structured { reply::ERR_UNSUP } else { reply::ACK };
        option_reply(server, code, kind, &[]);
    }
}

fn option_reply(server: &mut UnixStream, code: u32, kind: u32, data: &[u8]) {
    let mut out = Vec::new();
    out.extend_from_slice(&magic::OPTION_REPLY.to_be_bytes());
    out.extend_from_slice(&code.to_be_bytes());
    out.extend_from_slice(&kind.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
    server.write_all(&out).unwrap();
}

/// A request as the server reads it: (command, cookie, offset, length).
fn read_request(server: &mut UnixStream) -> (u16, u64, u64, u32) {
    let mut header = [0u8; nbd::REQUEST_LEN];
    server.read_exact(&mut header).unwrap();
    let be64 = |at: usize| u64::from_be_bytes(header[at..at + 8].try_into().unwrap());
    (
        u16::from_be_bytes([header[6], header[7]]),
        be64(8),
        be64(16),
        u32::from_be_bytes(header[24..28].try_into().unwrap()),
    )
}

fn chunk_header(kind: u16, done: bool, cookie: u64, length: u32) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&magic::STRUCTURED_REPLY.to_be_bytes());
    out.extend_from_slice(&(if done { chunk::FLAG_DONE } else { 0 }).to_be_bytes());
    out.extend_from_slice(&kind.to_be_bytes());
    out.extend_from_slice(&cookie.to_be_bytes());
    out.extend_from_slice(&length.to_be_bytes());
    out
}

fn data_chunk(done: bool, cookie: u64, offset: u64, data: &[u8]) -> Vec<u8> {
    let mut out = chunk_header(chunk::OFFSET_DATA, done, cookie, 8 + data.len() as u32);
    out.extend_from_slice(&offset.to_be_bytes());
    out.extend_from_slice(data);
    out
}

/// A connection whose server runs `script` after the handshake.
fn connected(structured: bool, script: impl FnOnce(UnixStream) + Send + 'static) -> (Connection, JoinHandle<()>) {
    let (client, mut server) = UnixStream::pair().unwrap();
    let handle = std::thread::spawn(move || {
        serve_handshake(&mut server, structured);
        script(server);
    });
    let connection = negotiate(Stream::Unix(client), "disk").unwrap();
    (connection, handle)
}

fn memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
}

/// Guest memory for 8 KiB at 0x1000, as two buffers of 4 KiB.
fn read_into(mem: &GuestMemoryMmap) -> Vec<vm_memory::VolatileSlice<'_, ()>> {
    let slice = |at: u64| GuestMemoryBackend::get_slices(mem, GuestAddress(at), 4096).next().unwrap().unwrap();
    vec![slice(0x1000), slice(0x2000)]
}

fn read_request_of<'s, 'a>(bufs: &'s [vm_memory::VolatileSlice<'a, ()>], offset: u64) -> Request<'s, 'a, ()> {
    Request { command: command::READ, flags: 0, offset, length: 8192, data: Some((bufs, 0)) }
}

#[test]
fn structured_chunks_out_of_order_and_holes_land_in_the_right_place() {
    let (mut conn, server) = connected(true, |mut server| {
        let (kind, cookie, offset, length) = read_request(&mut server);
        assert_eq!((kind, offset, length), (command::READ, 4096, 8192));
        // The second half first, then a hole for the first 1 KiB, then the rest.
        server.write_all(&data_chunk(false, cookie, 4096 + 4096, &[0xbb; 4096])).unwrap();
        let mut hole = chunk_header(chunk::OFFSET_HOLE, false, cookie, 12);
        hole.extend_from_slice(&4096u64.to_be_bytes());
        hole.extend_from_slice(&1024u32.to_be_bytes());
        server.write_all(&hole).unwrap();
        server.write_all(&data_chunk(true, cookie, 4096 + 1024, &[0xaa; 3072])).unwrap();
    });
    assert!(conn.structured);
    assert_eq!(conn.export.size, EXPORT_SIZE);
    let mem = memory();
    mem.write_slice(&[0xff; 8192], GuestAddress(0x1000)).unwrap();
    let bufs = read_into(&mem);
    let outcome = conn.exchange(&[read_request_of(&bufs, 4096)], &mut Vec::new()).unwrap();
    assert_eq!(outcome, [0]);
    let mut got = vec![0u8; 8192];
    mem.read_slice(&mut got, GuestAddress(0x1000)).unwrap();
    assert_eq!(&got[..1024], &[0u8; 1024][..], "the hole");
    assert_eq!(&got[1024..4096], &[0xaa; 3072][..]);
    assert_eq!(&got[4096..], &[0xbb; 4096][..]);
    server.join().unwrap();
}

#[test]
fn simple_replies_and_error_replies_keep_the_connection() {
    let (mut conn, server) = connected(false, |mut server| {
        let (_, first, _, _) = read_request(&mut server);
        let (_, second, _, _) = read_request(&mut server);
        let mut out = Vec::new();
        // The second fails with ENOSPC, the first succeeds with its data.
        out.extend_from_slice(&magic::SIMPLE_REPLY.to_be_bytes());
        out.extend_from_slice(&errno::ENOSPC.to_be_bytes());
        out.extend_from_slice(&second.to_be_bytes());
        out.extend_from_slice(&magic::SIMPLE_REPLY.to_be_bytes());
        out.extend_from_slice(&0u32.to_be_bytes());
        out.extend_from_slice(&first.to_be_bytes());
        out.extend_from_slice(&[0x5a; 8192]);
        server.write_all(&out).unwrap();
    });
    assert!(!conn.structured, "the server refused structured replies");
    let mem = memory();
    let bufs = read_into(&mem);
    let write = Request { command: command::WRITE, flags: 0, offset: 0, length: 8192, data: Some((&bufs[..], 0)) };
    let outcome = conn.exchange(&[read_request_of(&bufs, 0), write], &mut Vec::new()).unwrap();
    assert_eq!(outcome, [0, errno::ENOSPC]);
    server.join().unwrap();
}

/// Runs a read against a server that answers with `reply` and returns what the client says,
/// checking that the guest memory around the request's buffer is untouched.
fn lie(reply: impl FnOnce(u64) -> Vec<u8> + Send + 'static) -> TransmitError {
    let (mut conn, server) = connected(true, move |mut server| {
        let (_, cookie, _, _) = read_request(&mut server);
        let _ = server.write_all(&reply(cookie));
    });
    let mem = memory();
    mem.write_slice(&[0xee; 0x4000], GuestAddress(0)).unwrap();
    let bufs = read_into(&mem);
    let error = conn.exchange(&[read_request_of(&bufs, 0)], &mut Vec::new()).unwrap_err();
    let mut canary = vec![0u8; 0x1000];
    mem.read_slice(&mut canary, GuestAddress(0)).unwrap();
    assert!(canary.iter().all(|b| *b == 0xee), "memory before the buffer was written");
    mem.read_slice(&mut canary, GuestAddress(0x3000)).unwrap();
    assert!(canary.iter().all(|b| *b == 0xee), "memory after the buffer was written");
    drop(conn);
    server.join().unwrap();
    error
}

#[test]
fn lying_servers_break_the_connection_not_the_backend() {
    let outside = lie(|cookie| data_chunk(true, cookie, 8192, &[1; 4096]));
    assert!(matches!(&outside, TransmitError::Protocol(m) if m.contains("outside the request")), "{outside}");
    let before = lie(|cookie| data_chunk(true, cookie, u64::MAX - 10, &[1; 16]));
    assert!(matches!(before, TransmitError::Protocol(_)), "{before}");
    let unknown = lie(|cookie| data_chunk(true, cookie + 7, 0, &[1; 16]));
    assert!(matches!(&unknown, TransmitError::Protocol(m) if m.contains("unknown request")), "{unknown}");
    let huge = lie(|cookie| chunk_header(chunk::ERROR, true, cookie, u32::MAX));
    assert!(matches!(huge, TransmitError::Protocol(_)), "{huge}");
    let magic = lie(|_| vec![0xde, 0xad, 0xbe, 0xef, 0, 0, 0, 0]);
    assert!(matches!(&magic, TransmitError::Protocol(m) if m.contains("magic")), "{magic}");
    let short = lie(|cookie| data_chunk(true, cookie, 0, &[1; 16])[..30].to_vec());
    assert!(matches!(short, TransmitError::Io(_)), "{short}");
}

#[test]
fn a_handshake_that_lies_is_refused() {
    let (client, mut server) = UnixStream::pair().unwrap();
    std::thread::spawn(move || {
        let _ = server.write_all(b"NOTNBD..IHAVEOPT\x00\x03");
    });
    let bad = negotiate(Stream::Unix(client), "disk").err().unwrap();
    assert!(matches!(&bad, ConnectError::Protocol(m) if m.contains("magic")), "{bad}");

    let (client, mut server) = UnixStream::pair().unwrap();
    std::thread::spawn(move || {
        let mut greeting = Vec::new();
        greeting.extend_from_slice(&magic::NBD.to_be_bytes());
        greeting.extend_from_slice(&magic::IHAVEOPT.to_be_bytes());
        greeting.extend_from_slice(&handshake::FIXED_NEWSTYLE.to_be_bytes());
        let _ = server.write_all(&greeting);
        let mut rest = [0u8; 4 + nbd::OPTION_HEADER_LEN];
        let _ = server.read_exact(&mut rest);
        // An option reply claiming a gigabyte of data.
        let mut header = Vec::new();
        header.extend_from_slice(&magic::OPTION_REPLY.to_be_bytes());
        header.extend_from_slice(&option::STRUCTURED_REPLY.to_be_bytes());
        header.extend_from_slice(&reply::ACK.to_be_bytes());
        header.extend_from_slice(&(1u32 << 30).to_be_bytes());
        let _ = server.write_all(&header);
    });
    let huge = negotiate(Stream::Unix(client), "disk").err().unwrap();
    assert!(matches!(&huge, ConnectError::Protocol(m) if m.contains("bytes")), "{huge}");
}

/// The fuzz target's seed of a well-behaved server (structured replies, a hole, a write's
/// simple reply) gives every request success: the seed reaches the transmission phase.
#[test]
fn the_fuzz_seed_is_a_whole_exchange() {
    let seed = include_bytes!("../../../../fuzz/corpus/nbd/structured");
    let (client, mut server) = UnixStream::pair().unwrap();
    let feeder = std::thread::spawn(move || {
        server.write_all(seed).unwrap();
        // Keep the socket open for the client's requests until it is done.
        std::io::copy(&mut server, &mut std::io::sink()).unwrap();
    });
    let mut conn = negotiate(Stream::Unix(client), "disk").unwrap();
    let mem = memory();
    let slice = |at: u64| GuestMemoryBackend::get_slices(&mem, GuestAddress(at), 512).next().unwrap().unwrap();
    let (first, second) = ([slice(0x1000)], [slice(0x3000)]);
    let requests = [
        Request { command: command::READ, flags: 0, offset: 0, length: 512, data: Some((&first[..], 0)) },
        Request { command: command::READ, flags: 0, offset: 8192, length: 512, data: Some((&second[..], 0)) },
        Request { command: command::WRITE, flags: 0, offset: 4096, length: 512, data: Some((&first[..], 0)) },
    ];
    assert_eq!(conn.exchange(&requests, &mut Vec::new()).unwrap(), [0, 0, 0]);
    drop(conn);
    feeder.join().unwrap();
}
