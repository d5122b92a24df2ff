//! A vhost-user frontend no driver would be, for the whole-backend target: it connects to a
//! device the way the server does (relay, then the library's daemon) and sends messages made
//! from the fuzzer's bytes, with real file descriptors, over a real socket.

use crate::Input;
use pvkit_host_devices::server::ServedDevice;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::FileExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::Duration;
use vhost::vhost_user::Listener;
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost_user_backend::VhostUserDaemon;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

/// Size of the shared guest memory.
pub const GUEST_MEM: u64 = 0x4_0000;
/// Where the frontend says the memory is mapped in its own address space.
const USER_BASE: u64 = 0x7f00_0000_0000;
/// Version 1 in a message's flags.
const VERSION: u32 = 0x1;
/// NEED_REPLY in a message's flags.
const NEED_REPLY: u32 = 0x8;
/// The most operations one input plays.
const MAX_OPS: usize = 64;

/// Frontend request numbers (vhost-user specification).
mod request {
    pub const GET_FEATURES: u32 = 1;
    pub const SET_FEATURES: u32 = 2;
    pub const SET_OWNER: u32 = 3;
    pub const SET_MEM_TABLE: u32 = 5;
    pub const SET_VRING_NUM: u32 = 8;
    pub const SET_VRING_ADDR: u32 = 9;
    pub const SET_VRING_BASE: u32 = 10;
    pub const GET_VRING_BASE: u32 = 11;
    pub const SET_VRING_KICK: u32 = 12;
    pub const SET_VRING_CALL: u32 = 13;
    pub const GET_PROTOCOL_FEATURES: u32 = 15;
    pub const SET_PROTOCOL_FEATURES: u32 = 16;
    pub const SET_VRING_ENABLE: u32 = 18;
    pub const GET_CONFIG: u32 = 24;
    pub const SET_CONFIG: u32 = 25;
    pub const ADD_MEM_REG: u32 = 37;
    /// One past the highest request number the specification names.
    pub const END: u32 = 42;
}

/// The open descriptors of this process.
pub fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").map(|d| d.count()).unwrap_or(0)
}

fn shared_file(size: u64) -> std::fs::File {
    let file = vmm_sys_util::tempfile::TempFile::new_in(std::path::Path::new("/dev/shm"))
        .expect("a temporary file")
        .into_file();
    file.set_len(size).expect("file size");
    file
}

/// A frontend connected to a device's daemon.
pub struct Frontend<D: ServedDevice> {
    socket: UnixStream,
    daemon: VhostUserDaemon<D>,
    memory: std::fs::File,
    kicks: Vec<EventFd>,
}

/// A connection whose frontend hung up.
pub struct Connection<D: ServedDevice> {
    daemon: VhostUserDaemon<D>,
}

impl<D: ServedDevice> Frontend<D> {
    /// Connects to `device` as the server would: through the relay to a fresh daemon.
    pub fn connect(name: &str, device: D) -> io::Result<Frontend<D>> {
        use std::os::linux::net::SocketAddrExt;
        static SERIAL: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let mut daemon =
            VhostUserDaemon::new(name.into(), device.clone(), GuestMemoryAtomic::new(GuestMemoryMmap::new()))
                .map_err(|e| io::Error::other(e.to_string()))?;
        device.attach(daemon.get_epoll_handlers())?;
        let serial = SERIAL.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let address =
            std::os::unix::net::SocketAddr::from_abstract_name(format!("pvkit-fuzz-{}-{serial}", std::process::id()))?;
        let private = UnixListener::bind_addr(&address)?;
        let handler_side = UnixStream::connect_addr(&address)?;
        let (socket, relay_side) = UnixStream::pair()?;
        // What the server gives the relay, in-flight tracking included for a device offering it.
        let tracks = device.protocol_features().contains(VhostUserProtocolFeatures::INFLIGHT_SHMFD);
        let taken = pvkit_host_devices::relay::Taken {
            channel: device.backend_channel(),
            dirty: Some(device.core().dirty_log().clone()),
            inflight: tracks.then(|| device.core().inflight().clone()),
        };
        pvkit_host_devices::relay::start(name, relay_side, handler_side, taken)?;
        daemon.start(&mut Listener::from(private)).map_err(|e| io::Error::other(e.to_string()))?;
        socket.set_nonblocking(true)?;
        Ok(Frontend { socket, daemon, memory: shared_file(GUEST_MEM), kicks: Vec::new() })
    }

    /// Plays up to [`MAX_OPS`] operations from `input` against a device of `queues` queues.
    pub fn play(&mut self, input: &mut Input<'_>, queues: usize) {
        for _ in 0..MAX_OPS {
            if input.rest_len() == 0 {
                break;
            }
            let op = input.byte();
            let sent = match op % 8 {
                0 => self.good_setup(input, queues),
                1 => self.raw_message(input),
                2 => self.write_memory(input),
                3 => self.kick(input),
                4 => self.vring_addr(input, queues),
                5 => self.memory_table(input),
                6 => self.vring_state(input, queues),
                _ => self.config(input),
            };
            self.drain();
            if sent.is_err() {
                break;
            }
        }
    }

    /// Hangs up, leaving the connection to end.
    pub fn hang_up(self) -> Connection<D> {
        let Frontend { socket, daemon, .. } = self;
        drop(socket);
        Connection { daemon }
    }

    /// Reads whatever replies are waiting, so the backend never blocks writing them.
    fn drain(&mut self) {
        let mut buf = [0u8; 4096];
        while matches!(self.socket.read(&mut buf), Ok(n) if n > 0) {}
    }

    fn send(&mut self, request: u32, flags: u32, payload: &[u8], fds: &[RawFd]) -> io::Result<()> {
        let mut message = Vec::with_capacity(12 + payload.len());
        message.extend_from_slice(&request.to_le_bytes());
        message.extend_from_slice(&flags.to_le_bytes());
        message.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        message.extend_from_slice(payload);
        self.socket.set_nonblocking(false)?;
        self.socket.set_write_timeout(Some(Duration::from_millis(200)))?;
        let sent = if fds.is_empty() {
            self.socket.write_all(&message)
        } else {
            self.socket.send_with_fds(&[&message[..]], fds).map(|_| ()).map_err(io::Error::from)
        };
        self.socket.set_nonblocking(true)?;
        sent
    }

    /// The handshake a well-behaved frontend makes, with the features from the input: owner,
    /// features, one memory region over all guest memory, and every queue set up and enabled.
    fn good_setup(&mut self, input: &mut Input<'_>, queues: usize) -> io::Result<()> {
        let features = input.u64() | 1 << 32 | 1 << 30;
        self.send(request::SET_OWNER, VERSION, &[], &[])?;
        self.send(request::GET_FEATURES, VERSION, &[], &[])?;
        self.send(request::SET_FEATURES, VERSION, &features.to_le_bytes(), &[])?;
        self.send(request::GET_PROTOCOL_FEATURES, VERSION, &[], &[])?;
        self.send(request::SET_PROTOCOL_FEATURES, VERSION, &input.u64().to_le_bytes(), &[])?;
        let table = region_table(&[(0, GUEST_MEM, USER_BASE, 0)]);
        self.send(request::SET_MEM_TABLE, VERSION, &table, &[self.memory.as_raw_fd()])?;
        for q in 0..queues as u32 {
            let desc = USER_BASE + 0x1000 * u64::from(q + 1);
            self.send(request::SET_VRING_NUM, VERSION, &pair(q, u32::from(crate::RING)), &[])?;
            self.send(request::SET_VRING_ADDR, VERSION, &vring_addr(q, 0, desc, desc + 0x200, desc + 0x100), &[])?;
            self.send(request::SET_VRING_BASE, VERSION, &pair(q, 0), &[])?;
            let call = EventFd::new(0).expect("an eventfd");
            self.send(request::SET_VRING_CALL, VERSION, &u64::from(q).to_le_bytes(), &[call.as_raw_fd()])?;
            let kick = EventFd::new(0).expect("an eventfd");
            self.send(request::SET_VRING_KICK, VERSION, &u64::from(q).to_le_bytes(), &[kick.as_raw_fd()])?;
            self.kicks.push(kick);
            self.send(request::SET_VRING_ENABLE, VERSION, &pair(q, 1), &[])?;
        }
        Ok(())
    }

    /// Any request number, flags and payload, with up to two descriptors of either kind.
    fn raw_message(&mut self, input: &mut Input<'_>) -> io::Result<()> {
        let request = u32::from(input.byte()) % request::END;
        let flags = u32::from(input.byte());
        let len = usize::from(input.byte() % 80);
        let payload: Vec<u8> = (0..len).map(|_| input.byte()).collect();
        let plan = input.byte();
        let event = EventFd::new(0).expect("an eventfd");
        let fds: Vec<RawFd> = (0..plan % 3)
            .map(|i| if plan >> (2 + i) & 1 == 0 { self.memory.as_raw_fd() } else { event.as_raw_fd() })
            .collect();
        self.send(request, flags, &payload, &fds)
    }

    /// Writes bytes of the input into guest memory (rings, descriptors, buffers).
    fn write_memory(&mut self, input: &mut Input<'_>) -> io::Result<()> {
        let offset = u64::from(input.u16()) * 8 % GUEST_MEM;
        let len = u64::from(input.byte()).min(GUEST_MEM - offset) as usize;
        let bytes: Vec<u8> = (0..len).map(|_| input.byte()).collect();
        self.memory.write_all_at(&bytes, offset)
    }

    /// Kicks one of the queues set up so far, and gives its worker a moment.
    fn kick(&mut self, input: &mut Input<'_>) -> io::Result<()> {
        if self.kicks.is_empty() {
            return Ok(());
        }
        let which = usize::from(input.byte()) % self.kicks.len();
        self.kicks[which].write(1)?;
        std::thread::sleep(Duration::from_micros(200));
        Ok(())
    }

    /// SET_VRING_ADDR with addresses from the input (inside memory or anywhere).
    fn vring_addr(&mut self, input: &mut Input<'_>, queues: usize) -> io::Result<()> {
        let q = u32::from(input.byte()) % (queues as u32 + 2);
        let flags = u32::from(input.byte() & 1);
        let mut addr = || {
            let raw = input.u64();
            if raw >> 63 == 0 { USER_BASE + raw % GUEST_MEM } else { raw }
        };
        let (desc, used, avail) = (addr(), addr(), addr());
        self.send(request::SET_VRING_ADDR, VERSION | NEED_REPLY, &vring_addr(q, flags, desc, used, avail), &[])
    }

    /// SET_MEM_TABLE or ADD_MEM_REG with regions from the input, backed by files of sizes from
    /// the input (some smaller than their regions), and region counts that may lie.
    fn memory_table(&mut self, input: &mut Input<'_>) -> io::Result<()> {
        let count = usize::from(input.byte() % 4);
        let regions: Vec<(u64, u64, u64, u64)> = (0..count)
            .map(|_| {
                let size = if input.byte() & 1 == 0 { u64::from(input.u16()) << 12 } else { input.u64() };
                (
                    input.u64() % (1 << 40),
                    size,
                    USER_BASE + (u64::from(input.u16()) << 12),
                    u64::from(input.byte()) << 12,
                )
            })
            .collect();
        let files: Vec<std::fs::File> = regions.iter().map(|_| shared_file(u64::from(input.byte()) << 12)).collect();
        let fds: Vec<RawFd> = files.iter().map(AsRawFd::as_raw_fd).collect();
        let mut table = region_table(&regions);
        if input.byte() & 1 == 1 {
            // A count that does not match what follows.
            table[..4].copy_from_slice(&input.u32().to_le_bytes());
        }
        let request = if input.byte() & 1 == 0 { request::SET_MEM_TABLE } else { request::ADD_MEM_REG };
        self.send(request, VERSION | NEED_REPLY, &table, &fds)
    }

    /// SET_VRING_NUM, SET_VRING_BASE, GET_VRING_BASE or SET_VRING_ENABLE on any index.
    fn vring_state(&mut self, input: &mut Input<'_>, queues: usize) -> io::Result<()> {
        let which = input.byte();
        let index = if which & 0x80 == 0 { u32::from(which) % (queues as u32 + 1) } else { input.u32() };
        let value = input.u32();
        let request =
            [request::SET_VRING_NUM, request::SET_VRING_BASE, request::GET_VRING_BASE, request::SET_VRING_ENABLE]
                [usize::from(which >> 4 & 3)];
        self.send(request, VERSION | NEED_REPLY, &pair(index, value), &[])
    }

    /// GET_CONFIG or SET_CONFIG with offsets, sizes and flags from the input.
    fn config(&mut self, input: &mut Input<'_>) -> io::Result<()> {
        let (offset, size, flags) = (input.u32() % 512, input.u32() % 300, input.u32());
        let mut payload = Vec::new();
        payload.extend_from_slice(&offset.to_le_bytes());
        payload.extend_from_slice(&size.to_le_bytes());
        payload.extend_from_slice(&flags.to_le_bytes());
        let body = usize::from(input.byte());
        payload.extend((0..body).map(|_| input.byte()));
        let request = if input.byte() & 1 == 0 { request::GET_CONFIG } else { request::SET_CONFIG };
        self.send(request, VERSION | NEED_REPLY, &payload, &[])
    }
}

impl<D: ServedDevice> Connection<D> {
    /// Waits for the library to end the connection (a hang here is a finding: the fuzzer's
    /// timeout reports it).
    pub fn wait(&mut self) {
        let _ = self.daemon.wait();
    }

    /// Drops the daemon (joining its workers) and closes what the library left open, as the
    /// server does after every connection.
    pub fn release(self, device: &D) {
        drop(self.daemon);
        device.core().release_library_fds();
    }
}

fn pair(index: u32, value: u32) -> [u8; 8] {
    let mut out = [0u8; 8];
    out[..4].copy_from_slice(&index.to_le_bytes());
    out[4..].copy_from_slice(&value.to_le_bytes());
    out
}

fn vring_addr(index: u32, flags: u32, desc: u64, used: u64, avail: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(40);
    out.extend_from_slice(&index.to_le_bytes());
    out.extend_from_slice(&flags.to_le_bytes());
    for addr in [desc, used, avail, 0] {
        out.extend_from_slice(&addr.to_le_bytes());
    }
    out
}

/// A memory table: the region count, padding, then (guest address, size, frontend address,
/// offset in the file) per region.
fn region_table(regions: &[(u64, u64, u64, u64)]) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 + 32 * regions.len());
    out.extend_from_slice(&(regions.len() as u32).to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    for (guest, size, user, offset) in regions {
        for value in [guest, size, user, offset] {
            out.extend_from_slice(&value.to_le_bytes());
        }
    }
    out
}
