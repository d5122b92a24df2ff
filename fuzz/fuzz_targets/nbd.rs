//! A hostile NBD server: the input is everything the server sends, first during the
//! handshake, then as replies to a batch of two reads and a write. Checks: no panic; the
//! handshake either fails or yields a connection; the exchange either fails (the connection is
//! given up) or gives one outcome per request; and guest memory outside the reads' buffers is
//! never written.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pvkit_host_devices::blk::nbd::handshake::{Stream, negotiate};
use pvkit_host_devices::blk::nbd::transmit::Request;
use pvkit_protocol::nbd::command;
use std::io::Write;
use std::os::unix::net::UnixStream;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

/// Guest memory: the reads' buffers at 0x1000 and 0x3000 (512 bytes each), canaries around.
const CANARY: u8 = 0xee;

fuzz_target!(|data: &[u8]| {
    let (client, mut server) = UnixStream::pair().expect("a socket pair");
    // The whole input is written, then the server's sending side is shut: a client waiting
    // for more gets EOF, never a hang. What the client sends is read and dropped until it
    // closes its end.
    let feeder = {
        let data = data.to_vec();
        std::thread::spawn(move || {
            let _ = server.write_all(&data);
            let _ = server.shutdown(std::net::Shutdown::Write);
            let _ = std::io::copy(&mut server, &mut std::io::sink());
        })
    };
    if let Ok(mut connection) = negotiate(Stream::Unix(client), "disk") {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x5000)]).expect("guest memory");
        mem.write_slice(&[CANARY; 0x5000], GuestAddress(0)).expect("canaries");
        let slice = |at: u64| GuestMemoryBackend::get_slices(&mem, GuestAddress(at), 512).next().unwrap().unwrap();
        let (first, second) = ([slice(0x1000)], [slice(0x3000)]);
        let requests = [
            Request { command: command::READ, flags: 0, offset: 0, length: 512, data: Some((&first[..], 0)) },
            Request { command: command::READ, flags: 0, offset: 8192, length: 512, data: Some((&second[..], 0)) },
            Request { command: command::WRITE, flags: 0, offset: 4096, length: 512, data: Some((&first[..], 0)) },
        ];
        if let Ok(outcomes) = connection.exchange(&requests, &mut Vec::new()) {
            assert_eq!(outcomes.len(), requests.len());
        }
        drop(connection);
        let mut bytes = vec![0u8; 0x5000];
        mem.read_slice(&mut bytes, GuestAddress(0)).expect("reading memory back");
        for (at, byte) in bytes.iter().enumerate() {
            let in_buffer = (0x1000..0x1200).contains(&at) || (0x3000..0x3200).contains(&at);
            assert!(in_buffer || *byte == CANARY, "byte {at:#x} outside the reads' buffers was written");
        }
    }
    let _ = feeder.join();
});
