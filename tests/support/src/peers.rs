//! Independent peers: backends that nobody here wrote, for interoperability tests and
//! side-by-side benchmarks.

use crate::process::ChildGuard;
use crate::{HarnessError, Result};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// What a `qemu-storage-daemon` vhost-user-blk export serves.
#[derive(Debug, Clone)]
pub enum QsdDisk {
    /// A raw image file, read with io_uring.
    File(PathBuf),
    /// QEMU's null-co driver: reads return zeros, writes are dropped.
    Null {
        /// Disk size in bytes.
        size: u64,
    },
}

/// A running `qemu-storage-daemon` exporting one disk over vhost-user-blk; killed on drop.
pub struct QemuStorageDaemon {
    child: ChildGuard,
    socket: PathBuf,
}

impl QemuStorageDaemon {
    /// Starts the daemon and waits until its socket listens.
    pub fn start(disk: &QsdDisk, socket: &Path, num_queues: u16, writable: bool) -> Result<QemuStorageDaemon> {
        let blockdev = match disk {
            QsdDisk::File(path) => format!("driver=file,node-name=disk0,filename={},aio=io_uring", path.display()),
            QsdDisk::Null { size } => format!("driver=null-co,node-name=disk0,size={size}"),
        };
        let export = format!(
            "type=vhost-user-blk,id=export0,node-name=disk0,addr.type=unix,addr.path={},writable={},num-queues={num_queues}",
            socket.display(),
            if writable { "on" } else { "off" }
        );
        let mut cmd = Command::new("qemu-storage-daemon");
        cmd.args(["--blockdev", &blockdev, "--export", &export]);
        let mut child = ChildGuard::spawn("qemu-storage-daemon", &mut cmd).map_err(|e| match e {
            HarnessError::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound => {
                HarnessError::MissingProgram {
                    program: "qemu-storage-daemon".into(),
                    hint: "scripts/test --prepare installs qemu-utils 10",
                }
            }
            other => other,
        })?;
        child.wait_for_socket(socket, Duration::from_secs(10))?;
        Ok(QemuStorageDaemon { child, socket: socket.to_path_buf() })
    }

    /// The socket a frontend connects to.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Fails if the daemon has exited.
    pub fn check_running(&mut self) -> Result<()> {
        self.child.check_running()
    }

    /// Stops the daemon and returns its standard error.
    pub fn stop(self) -> String {
        self.child.stop()
    }
}
