//! The tap network side (`--tap NAME`): a Linux tap opened (or created) with IFF_VNET_HDR, one
//! queue per queue pair (IFF_MULTI_QUEUE when there are several), so virtio-net headers pass
//! straight through and the kernel honours the offloads the guest negotiated.

use pvkit_protocol::net::feature as netf;
use pvkit_protocol::virtio::Features;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::{AsRawFd, RawFd};

/// Errors from opening or configuring a tap.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    /// The name does not fit an interface name.
    #[error("tap name '{0}' is empty or longer than 15 bytes")]
    BadName(String),
    /// /dev/net/tun could not be opened.
    #[error("cannot open /dev/net/tun: {0}")]
    OpenTun(io::Error),
    /// TUNSETIFF failed.
    #[error("cannot attach queue {queue} of tap '{name}' (TUNSETIFF): {source}")]
    Attach {
        /// Tap name.
        name: String,
        /// Queue index.
        queue: u16,
        /// Why.
        source: io::Error,
    },
    /// A tap ioctl failed.
    #[error("tap '{name}': {what} failed: {source}")]
    Ioctl {
        /// Tap name.
        name: String,
        /// Which setting.
        what: &'static str,
        /// Why.
        source: io::Error,
    },
}

/// An open tap with one non-blocking descriptor per queue pair.
#[derive(Debug)]
pub struct Tap {
    name: String,
    queues: Vec<File>,
}

#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

impl Tap {
    /// Opens tap `name` (created if missing, which needs CAP_NET_ADMIN) with `queues` queues.
    pub fn open(name: &str, queues: u16) -> Result<Tap, TapError> {
        if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.contains('\0') {
            return Err(TapError::BadName(name.to_string()));
        }
        let mut flags = libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR;
        if queues > 1 {
            flags |= libc::IFF_MULTI_QUEUE;
        }
        let mut files = Vec::with_capacity(queues.into());
        for queue in 0..queues.max(1) {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
                .open("/dev/net/tun")
                .map_err(TapError::OpenTun)?;
            let mut req = IfReq { name: [0; libc::IFNAMSIZ], flags: flags as libc::c_short, _pad: [0; 22] };
            req.name[..name.len()].copy_from_slice(name.as_bytes());
            // SAFETY: TUNSETIFF reads (and may update) an ifreq, which `req` is laid out as
            // (16-byte name, flags, padding to 40 bytes); the descriptor is open.
            let ret = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut req) };
            if ret < 0 {
                return Err(TapError::Attach { name: name.into(), queue, source: io::Error::last_os_error() });
            }
            files.push(file);
        }
        Ok(Tap { name: name.to_string(), queues: files })
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Number of queues.
    pub fn queue_count(&self) -> usize {
        self.queues.len()
    }

    /// The descriptor of queue `index`.
    pub fn fd(&self, index: usize) -> Option<RawFd> {
        self.queues.get(index).map(AsRawFd::as_raw_fd)
    }

    fn ioctl_int(&self, what: &'static str, request: libc::Ioctl, value: libc::c_int) -> Result<(), TapError> {
        for file in &self.queues {
            // SAFETY: these tap ioctls read one int through the pointer, which is valid.
            let ret = unsafe { libc::ioctl(file.as_raw_fd(), request, &value) };
            if ret < 0 {
                return Err(TapError::Ioctl { name: self.name.clone(), what, source: io::Error::last_os_error() });
            }
        }
        Ok(())
    }

    /// Sets the virtio-net header length the tap reads and writes (10 or 12).
    pub fn set_header_len(&self, len: usize) -> Result<(), TapError> {
        self.ioctl_int("TUNSETVNETHDRSZ", libc::TUNSETVNETHDRSZ, len as libc::c_int)
    }

    /// Lets the kernel send offloaded frames (partial checksums, TSO) exactly as far as the
    /// guest accepts them (`acked`: the features the driver acknowledged).
    pub fn set_offloads(&self, acked: Features) -> Result<(), TapError> {
        self.set_offload_bits(offload_bits(acked))
    }

    fn set_offload_bits(&self, bits: libc::c_uint) -> Result<(), TapError> {
        for file in &self.queues {
            // SAFETY: TUNSETOFFLOAD takes its argument by value; the descriptor is open.
            let ret = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETOFFLOAD, bits as libc::c_ulong) };
            if ret < 0 {
                return Err(TapError::Ioctl {
                    name: self.name.clone(),
                    what: "TUNSETOFFLOAD",
                    source: io::Error::last_os_error(),
                });
            }
        }
        Ok(())
    }

    /// Reads one frame (virtio-net header first) from queue `index` into `buf`; `Ok(None)` when
    /// none is waiting.
    pub fn read_frame(&self, index: usize, buf: &mut [u8]) -> io::Result<Option<usize>> {
        let Some(file) = self.queues.get(index) else { return Ok(None) };
        // SAFETY: reads at most buf.len() bytes into `buf`, which is valid for writes.
        let n = unsafe { libc::read(file.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            let e = io::Error::last_os_error();
            return match e.kind() {
                io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => Ok(None),
                _ => Err(e),
            };
        }
        Ok(Some(n as usize))
    }

    /// Writes one frame (virtio-net header, then the frame) to queue `index`.
    pub fn write_frame(&self, index: usize, header: &[u8], frame: &[u8]) -> io::Result<()> {
        let Some(file) = self.queues.get(index) else {
            return Err(io::Error::other(format!("no tap queue {index}")));
        };
        let iov = [
            libc::iovec { iov_base: header.as_ptr() as *mut libc::c_void, iov_len: header.len() },
            libc::iovec { iov_base: frame.as_ptr() as *mut libc::c_void, iov_len: frame.len() },
        ];
        // SAFETY: both iovecs point at live slices of the given lengths, only read by writev.
        let n = unsafe { libc::writev(file.as_raw_fd(), iov.as_ptr(), 2) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

/// The TUNSETOFFLOAD bits matching the offloads a driver accepts.
pub fn offload_bits(acked: Features) -> libc::c_uint {
    let mut bits = 0;
    if acked.has(netf::GUEST_CSUM) {
        bits |= libc::TUN_F_CSUM;
        if acked.has(netf::GUEST_TSO4) {
            bits |= libc::TUN_F_TSO4;
        }
        if acked.has(netf::GUEST_TSO6) {
            bits |= libc::TUN_F_TSO6;
        }
        if acked.has(netf::GUEST_ECN) && bits & (libc::TUN_F_TSO4 | libc::TUN_F_TSO6) != 0 {
            bits |= libc::TUN_F_TSO_ECN;
        }
    }
    bits
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offload_bits_follow_the_guest() {
        let none = Features::from_bits(&[]);
        assert_eq!(offload_bits(none), 0);
        let tso_without_csum = Features::from_bits(&[netf::GUEST_TSO4]);
        assert_eq!(offload_bits(tso_without_csum), 0, "TSO needs checksum offload");
        let all = Features::from_bits(&[netf::GUEST_CSUM, netf::GUEST_TSO4, netf::GUEST_TSO6]);
        assert_eq!(offload_bits(all), libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6);
    }

    #[test]
    fn bad_names_are_refused() {
        assert!(matches!(Tap::open("", 1), Err(TapError::BadName(_))));
        assert!(matches!(Tap::open("a-name-that-is-too-long", 1), Err(TapError::BadName(_))));
    }
}
