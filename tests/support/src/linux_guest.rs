//! Boot a real Linux guest under QEMU (TCG) against vhost-user backends.
//!
//! ```no_run
//! use pvkit_test_support::linux_guest::LinuxGuest;
//! # fn main() -> pvkit_test_support::Result<()> {
//! let run = LinuxGuest::new("fio --name=t --filename=/dev/vda --rw=randwrite --size=8M --verify=crc32c")
//!     .vhost_user_blk("/tmp/blk.sock", 1)
//!     .run()?;
//! run.assert_passed();
//! # Ok(()) }
//! ```
//!
//! The guest (Debian's cloud kernel with its virtio modules, busybox, fio and iperf3) is
//! prepared once and cached outside the repository, keyed by the packages' versions and
//! guarded by a lock file, so parallel tests share one preparation. The guest's `/init` loads
//! the virtio modules, runs the test's script from a small per-test archive appended to the
//! initramfs (the kernel command line is capped at 2048 bytes), prints
//! `PVKIT-GUEST-RESULT rc=N` and powers off.

use crate::initramfs::{self, CpioArchive};
use crate::process::run_checked;
use crate::{HarnessError, Result, tail};
use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// Debian's metapackage for the cloud kernel.
const KERNEL_METAPACKAGE: &str = "linux-image-cloud-amd64";
/// Host packages copied into the guest.
const HOST_PACKAGES: &[&str] = &["busybox-static", "fio", "iperf3"];
/// Host programs copied into the guest with their shared libraries.
const HOST_PROGRAMS: &[&str] = &["/usr/bin/fio", "/usr/bin/iperf3"];
/// Bump when the image's layout or init changes, so stale caches are not reused.
const IMAGE_LAYOUT_VERSION: u32 = 1;

/// Kernel modules the init loads, in an order that satisfies their dependencies.
pub const VIRTIO_MODULES: &[&str] = &[
    "virtio_ring",
    "virtio",
    "virtio_pci_legacy_dev",
    "virtio_pci_modern_dev",
    "virtio_pci",
    "virtio_mmio",
    "virtio_blk",
    "failover",
    "net_failover",
    "virtio_net",
    "virtio_console",
];

/// The line prefix of the guest's result.
pub const RESULT_MARKER: &str = "PVKIT-GUEST-RESULT rc=";

const INIT_SCRIPT: &str = r#"#!/bin/busybox sh
/bin/busybox mount -t proc proc /proc
/bin/busybox --install -s /bin
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /tmp
while read -r m; do
    insmod "/lib/pvkit-modules/$m.ko" || echo "PVKIT-GUEST-WARNING insmod $m failed"
done < /etc/pvkit-modules
ip link set lo up 2>/dev/null
echo "PVKIT-GUEST-BOOTED $(uname -r)"
if [ -f /pvkit/test.sh ]; then
    cd /pvkit && sh /pvkit/test.sh
    rc=$?
else
    echo "PVKIT-GUEST-WARNING no /pvkit/test.sh"
    rc=127
fi
echo "PVKIT-GUEST-RESULT rc=$rc"
sync
poweroff -f
"#;

/// A prepared guest: kernel and base initramfs.
#[derive(Debug, Clone)]
pub struct GuestImage {
    /// The bzImage.
    pub kernel: PathBuf,
    /// The gzip'd base initramfs.
    pub initramfs: PathBuf,
    /// `uname -r` of the kernel.
    pub kernel_release: String,
}

/// Where caches go: `$PVKIT_CACHE_DIR`, else `$XDG_CACHE_HOME/pvkit`, else `~/.cache/pvkit`.
pub fn cache_root() -> PathBuf {
    if let Some(dir) = std::env::var_os("PVKIT_CACHE_DIR") {
        return PathBuf::from(dir);
    }
    if let Some(dir) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(dir).join("pvkit");
    }
    match std::env::var_os("HOME") {
        Some(home) => PathBuf::from(home).join(".cache/pvkit"),
        None => std::env::temp_dir().join("pvkit-cache"),
    }
}

fn apt_update() -> Result<()> {
    run_checked(
        "apt-get update",
        Command::new("apt-get").args(["update", "-q"]).env("DEBIAN_FRONTEND", "noninteractive"),
    )
    .map(drop)
}

/// The kernel image package the metapackage points at, and its version.
fn kernel_package() -> Result<(String, String)> {
    if let Some(found) = kernel_package_from_apt_cache()? {
        return Ok(found);
    }
    apt_update()?;
    kernel_package_from_apt_cache()?.ok_or_else(|| HarnessError::Unexpected {
        what: "apt-cache show".into(),
        detail: format!("no Depends/Version for {KERNEL_METAPACKAGE}"),
    })
}

fn kernel_package_from_apt_cache() -> Result<Option<(String, String)>> {
    let out = Command::new("apt-cache")
        .args(["show", "--no-all-versions", KERNEL_METAPACKAGE])
        .output()
        .map_err(HarnessError::io("running apt-cache"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let field = |name: &str| text.lines().find_map(|l| l.strip_prefix(name)).map(|v| v.trim().to_string());
    let package = field("Depends:").and_then(|d| d.split([' ', ',']).next().map(str::to_string));
    Ok(package.zip(field("Version:")))
}

fn host_package_versions() -> Result<String> {
    let mut cmd = Command::new("dpkg-query");
    cmd.args(["-W", "-f", "${Version} "]).args(HOST_PACKAGES);
    let out = run_checked("dpkg-query", &mut cmd).map_err(|_| HarnessError::MissingProgram {
        program: HOST_PACKAGES.join(", "),
        hint: "scripts/test --prepare installs them",
    })?;
    Ok(out.split_whitespace().collect::<Vec<_>>().join("_"))
}

fn sanitize(key: &str) -> String {
    key.chars().map(|c| if c.is_ascii_alphanumeric() || c == '.' || c == '-' { c } else { '_' }).collect()
}

impl GuestImage {
    /// Returns the cached guest, preparing it first when the cache lacks this combination of
    /// package versions. Safe to call from parallel tests and processes.
    pub fn get() -> Result<GuestImage> {
        let (package, version) = kernel_package()?;
        let kernel_release = package.trim_start_matches("linux-image-").to_string();
        let key = sanitize(&format!("{kernel_release}_{version}_{}_v{IMAGE_LAYOUT_VERSION}", host_package_versions()?));
        let root = cache_root().join("linux-guest");
        fs::create_dir_all(&root).map_err(HarnessError::io(format!("creating {}", root.display())))?;
        let dir = root.join(&key);
        let image = GuestImage {
            kernel: dir.join("vmlinuz"),
            initramfs: dir.join("initramfs.cpio.gz"),
            kernel_release: kernel_release.clone(),
        };
        let ready = dir.join("ready");
        if ready.exists() {
            return Ok(image);
        }
        let lock_path = root.join("prepare.lock");
        let lock = File::create(&lock_path).map_err(HarnessError::io(format!("creating {}", lock_path.display())))?;
        lock.lock().map_err(HarnessError::io(format!("locking {}", lock_path.display())))?;
        if !ready.exists() {
            let started = Instant::now();
            eprintln!("preparing the Linux test guest ({kernel_release}) in {}", dir.display());
            prepare(&dir, &package, &kernel_release, &image)?;
            fs::write(&ready, key.as_bytes()).map_err(HarnessError::io(format!("writing {}", ready.display())))?;
            eprintln!("prepared the Linux test guest in {:.1} s", started.elapsed().as_secs_f64());
        }
        drop(lock);
        Ok(image)
    }
}

fn prepare(dir: &Path, package: &str, kernel_release: &str, image: &GuestImage) -> Result<()> {
    if dir.exists() {
        fs::remove_dir_all(dir).map_err(HarnessError::io(format!("clearing {}", dir.display())))?;
    }
    let download = dir.join("download");
    fs::create_dir_all(&download).map_err(HarnessError::io(format!("creating {}", download.display())))?;
    let fetch =
        || run_checked("apt-get download", Command::new("apt-get").args(["download", package]).current_dir(&download));
    if fetch().is_err() {
        // Stale package lists name kernel builds the mirror no longer has.
        apt_update()?;
        fetch()?;
    }
    let deb = fs::read_dir(&download)
        .map_err(HarnessError::io("listing the download"))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
        .ok_or_else(|| HarnessError::Unexpected { what: "apt-get download".into(), detail: "no .deb".into() })?;
    let unpacked = dir.join("unpacked");
    run_checked("dpkg -x", Command::new("dpkg").arg("-x").arg(&deb).arg(&unpacked))?;
    let vmlinuz = unpacked.join("boot").join(format!("vmlinuz-{kernel_release}"));
    fs::copy(&vmlinuz, &image.kernel).map_err(HarnessError::io(format!("copying {}", vmlinuz.display())))?;
    build_base_initramfs(&image.initramfs, &unpacked.join("lib/modules").join(kernel_release))?;
    fs::remove_dir_all(&unpacked).map_err(HarnessError::io("removing the unpacked kernel"))?;
    fs::remove_dir_all(&download).map_err(HarnessError::io("removing the download"))?;
    Ok(())
}

fn find_module(modules_dir: &Path, name: &str) -> Option<PathBuf> {
    let file = format!("{name}.ko");
    let mut stack = vec![modules_dir.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in fs::read_dir(&dir).ok()?.flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else if path.file_name().is_some_and(|f| f == file.as_str()) {
                return Some(path);
            }
        }
    }
    None
}

/// The shared libraries (and the dynamic loader) `program` needs, from `ldd`.
fn shared_libraries(program: &str) -> Result<Vec<PathBuf>> {
    Ok(parse_ldd(&run_checked(&format!("ldd {program}"), Command::new("ldd").arg(program))?))
}

/// The absolute paths in `ldd` output (`lib => /path (addr)` and `/path (addr)` lines).
fn parse_ldd(output: &str) -> Vec<PathBuf> {
    output
        .lines()
        .filter_map(|line| {
            let path = match line.split_once("=>") {
                Some((_, rest)) => rest.split_whitespace().next()?,
                None => line.split_whitespace().next()?,
            };
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect()
}

fn build_base_initramfs(dest: &Path, modules_dir: &Path) -> Result<()> {
    let mut cpio = initramfs::create_gz(dest)?;
    for dir in ["proc", "sys", "dev", "tmp", "run", "mnt", "root", "etc", "sbin", "usr/sbin"] {
        cpio.dir(dir)?;
    }
    cpio.char_device("dev/console", 5, 1)?;
    cpio.file("init", 0o755, INIT_SCRIPT.as_bytes())?;
    let busybox = Path::new("/bin/busybox");
    if !busybox.exists() {
        return Err(HarnessError::MissingProgram { program: "busybox".into(), hint: "install busybox-static" });
    }
    cpio.copy_from_host("bin/busybox", busybox)?;
    let mut libraries = std::collections::BTreeSet::new();
    for program in HOST_PROGRAMS {
        if !Path::new(program).exists() {
            return Err(HarnessError::MissingProgram { program: program.to_string(), hint: "install fio and iperf3" });
        }
        cpio.copy_from_host(program, Path::new(program))?;
        libraries.extend(shared_libraries(program)?);
    }
    for lib in &libraries {
        cpio.copy_from_host(&lib.to_string_lossy(), lib)?;
    }
    let mut list = String::new();
    for name in VIRTIO_MODULES {
        let module = find_module(modules_dir, name).ok_or_else(|| HarnessError::Unexpected {
            what: "the kernel package".into(),
            detail: format!("module {name}.ko not found under {}", modules_dir.display()),
        })?;
        cpio.copy_from_host(&format!("lib/pvkit-modules/{name}.ko"), &module)?;
        list.push_str(name);
        list.push('\n');
    }
    cpio.file("etc/pvkit-modules", 0o644, list.as_bytes())?;
    initramfs::finish_gz(cpio)
}

#[derive(Debug, Clone)]
enum Device {
    VhostUserBlk { socket: PathBuf, queues: u16 },
    VhostUserNet { socket: PathBuf, queues: u16, mac: String },
}

/// One guest run, configured with builder methods and started with [`LinuxGuest::run`].
pub struct LinuxGuest {
    script: String,
    files: Vec<(String, u32, Vec<u8>)>,
    devices: Vec<Device>,
    extra_args: Vec<String>,
    memory_mib: u32,
    cpus: u32,
    timeout: Duration,
    migration: Option<Migration>,
    reconnect_ms: Option<u32>,
}

/// Where and when a guest migrates: a second QEMU whose devices are the source's, each served
/// at the next of `sockets` (one per device, in order), `after` the first one started.
#[derive(Debug, Clone)]
struct Migration {
    sockets: Vec<PathBuf>,
    after: Duration,
}

impl Migration {
    /// The destination's device arguments: the source's, each on its new socket.
    fn device_args(&self, devices: &[Device], reconnect_ms: Option<u32>) -> Vec<String> {
        let moved: Vec<Device> = devices
            .iter()
            .zip(self.sockets.iter().map(Some).chain(std::iter::repeat(None)))
            .map(|(device, socket)| match (device, socket) {
                (Device::VhostUserBlk { queues, .. }, Some(socket)) => {
                    Device::VhostUserBlk { socket: socket.clone(), queues: *queues }
                }
                (Device::VhostUserNet { queues, mac, .. }, Some(socket)) => {
                    Device::VhostUserNet { socket: socket.clone(), queues: *queues, mac: mac.clone() }
                }
                (device, None) => device.clone(),
            })
            .collect();
        device_args(&moved, reconnect_ms)
    }
}

impl LinuxGuest {
    /// Live-migrates the guest `after` it started to a second QEMU on this host, whose devices
    /// are served at `sockets`, one per device in the order they were added (another backend
    /// on the same image, or on a tap of the same network), over a unix socket, started
    /// through QEMU's monitor.
    pub fn migrate_to(mut self, sockets: Vec<PathBuf>, after: Duration) -> Self {
        self.migration = Some(Migration { sockets, after });
        self
    }

    /// A guest that runs `script` (POSIX sh, busybox) as its test; its exit code is the result.
    pub fn new(script: impl Into<String>) -> LinuxGuest {
        LinuxGuest {
            script: script.into(),
            files: Vec::new(),
            devices: Vec::new(),
            extra_args: Vec::new(),
            memory_mib: 1024,
            cpus: 1,
            timeout: Duration::from_secs(240),
            migration: None,
            reconnect_ms: None,
        }
    }

    /// QEMU reconnects to a vhost-user backend that went away every `ms` milliseconds
    /// (`reconnect-ms` on each device's chardev), so a test can kill and restart backends.
    pub fn reconnect_ms(mut self, ms: u32) -> Self {
        self.reconnect_ms = Some(ms);
        self
    }

    /// Adds a `vhost-user-blk-pci` disk served at `socket` (the guest sees `/dev/vda`, `vdb`, ...).
    pub fn vhost_user_blk(mut self, socket: impl AsRef<Path>, queues: u16) -> Self {
        self.devices.push(Device::VhostUserBlk { socket: socket.as_ref().to_path_buf(), queues });
        self
    }

    /// Adds a `virtio-net-pci` card on a vhost-user netdev served at `socket`.
    pub fn vhost_user_net(mut self, socket: impl AsRef<Path>, queues: u16, mac: &str) -> Self {
        self.devices.push(Device::VhostUserNet { socket: socket.as_ref().to_path_buf(), queues, mac: mac.to_string() });
        self
    }

    /// Puts a file into the guest under `/pvkit/` (`name` relative to it).
    pub fn file(mut self, name: &str, mode: u32, data: impl Into<Vec<u8>>) -> Self {
        self.files.push((name.to_string(), mode, data.into()));
        self
    }

    /// Passes extra arguments to QEMU.
    pub fn qemu_args<I: IntoIterator<Item = S>, S: Into<String>>(mut self, args: I) -> Self {
        self.extra_args.extend(args.into_iter().map(Into::into));
        self
    }

    /// Guest memory in MiB (default 1024).
    pub fn memory_mib(mut self, mib: u32) -> Self {
        self.memory_mib = mib;
        self
    }

    /// Virtual CPUs (default 1).
    pub fn cpus(mut self, cpus: u32) -> Self {
        self.cpus = cpus;
        self
    }

    /// How long the whole run may take (default 240 s) before QEMU is killed.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    fn device_args(&self) -> Vec<String> {
        device_args(&self.devices, self.reconnect_ms)
    }

    /// The guest's initramfs in `dir`: the cached image's, then an archive with the test's
    /// script and files.
    fn initrd(&self, dir: &Path, image: &GuestImage) -> Result<PathBuf> {
        let mut test_archive = CpioArchive::new(flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast()));
        test_archive.file("pvkit/test.sh", 0o755, self.script.as_bytes())?;
        for (name, mode, data) in &self.files {
            test_archive.file(&format!("pvkit/{name}"), *mode, data)?;
        }
        let test_archive = test_archive.finish()?.finish().map_err(HarnessError::io("compressing the test archive"))?;
        let base =
            fs::read(&image.initramfs).map_err(HarnessError::io(format!("reading {}", image.initramfs.display())))?;
        let initrd = dir.join("initrd");
        initramfs::concatenate(&initrd, &[&base, &test_archive])?;
        Ok(initrd)
    }

    /// A QEMU for this guest with `devices`, its serial port into `log_path`.
    fn qemu_command(&self, image: &GuestImage, initrd: &Path, log_path: &Path, devices: Vec<String>) -> Command {
        let mem = self.memory_mib;
        let mut cmd = Command::new("qemu-system-x86_64");
        cmd.args(["-accel", "tcg", "-machine", "q35,memory-backend=mem", "-object"])
            .arg(format!("memory-backend-memfd,id=mem,size={mem}M,share=on"))
            .args(["-m", &format!("{mem}M"), "-smp", &self.cpus.to_string()])
            .args(["-nodefaults", "-display", "none", "-no-reboot", "-serial"])
            .arg(format!("file:{}", log_path.display()))
            .arg("-kernel")
            .arg(&image.kernel)
            .arg("-initrd")
            .arg(initrd)
            .args(["-append", "console=ttyS0 panic=-1 loglevel=4"])
            .args(devices)
            .args(&self.extra_args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        cmd
    }

    /// Boots the guest, waits for it to power off (or the timeout), and returns the result.
    /// With [`LinuxGuest::migrate_to`], the guest moves to a second QEMU on the way.
    pub fn run(self) -> Result<GuestRun> {
        let image = GuestImage::get()?;
        let work = tempfile::Builder::new()
            .prefix("pvkit-guest-")
            .tempdir()
            .map_err(HarnessError::io("creating a temporary directory"))?;
        let initrd = self.initrd(work.path(), &image)?;
        let log_path = work.path().join("serial.log");
        let mut cmd = self.qemu_command(&image, &initrd, &log_path, self.device_args());
        let started = Instant::now();
        let Some(migration) = &self.migration else {
            let qemu = spawn_qemu(&mut cmd)?;
            return watch(qemu, started, self.timeout, &[&log_path], None);
        };
        let dest_log = work.path().join("serial-destination.log");
        let incoming = work.path().join("migrate.sock");
        let monitor = work.path().join("monitor.sock");
        let mut dest =
            self.qemu_command(&image, &initrd, &dest_log, migration.device_args(&self.devices, self.reconnect_ms));
        dest.arg("-incoming").arg(format!("unix:{}", incoming.display()));
        let destination = spawn_qemu(&mut dest)?;
        cmd.arg("-monitor").arg(format!("unix:{},server=on,wait=off", monitor.display()));
        let mut source = spawn_qemu(&mut cmd)?;
        std::thread::sleep(migration.after);
        source.check_running()?;
        let info = crate::migration::migrate(&monitor, &incoming, self.timeout)?;
        let _ = source.terminate(Duration::from_secs(5));
        watch(destination, started, self.timeout, &[&log_path, &dest_log], Some(info))
    }
}

/// QEMU arguments attaching `devices`, their backends reconnected every `reconnect_ms` when
/// given.
fn device_args(devices: &[Device], reconnect_ms: Option<u32>) -> Vec<String> {
    let mut args = Vec::new();
    let reconnect = reconnect_ms.map(|ms| format!(",reconnect-ms={ms}")).unwrap_or_default();
    for (i, device) in devices.iter().enumerate() {
        match device {
            Device::VhostUserBlk { socket, queues } => {
                args.extend(["-chardev".into(), format!("socket,id=dev{i},path={}{reconnect}", socket.display())]);
                args.extend(["-device".into(), format!("vhost-user-blk-pci,chardev=dev{i},num-queues={queues}")]);
            }
            Device::VhostUserNet { socket, queues, mac } => {
                args.extend(["-chardev".into(), format!("socket,id=dev{i},path={}{reconnect}", socket.display())]);
                args.extend(["-netdev".into(), format!("vhost-user,id=net{i},chardev=dev{i},queues={queues}")]);
                let mq = if *queues > 1 { format!(",mq=on,vectors={}", 2 * queues + 2) } else { String::new() };
                args.extend(["-device".into(), format!("virtio-net-pci,netdev=net{i},mac={mac}{mq}")]);
            }
        }
    }
    args
}

/// Starts QEMU, saying how to install it when it is missing.
fn spawn_qemu(cmd: &mut Command) -> Result<crate::process::ChildGuard> {
    crate::process::ChildGuard::spawn("qemu-system-x86_64", cmd).map_err(|e| match e {
        HarnessError::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound => {
            HarnessError::MissingProgram {
                program: "qemu-system-x86_64".into(),
                hint: "scripts/test --prepare installs QEMU 10",
            }
        }
        other => other,
    })
}

/// Waits for `qemu` to exit (or `timeout` since `started`); the run's log is the serial logs
/// in `log_paths`, one after the other (a migrated guest's output continues in the second).
fn watch(
    mut qemu: crate::process::ChildGuard,
    started: Instant,
    timeout: Duration,
    log_paths: &[&Path],
    migration: Option<String>,
) -> Result<GuestRun> {
    let read_log = || {
        log_paths
            .iter()
            .map(|path| fs::read(path).map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default())
            .collect::<Vec<_>>()
            .join("")
    };
    let status = loop {
        match qemu.check_running() {
            Ok(()) => {}
            Err(HarnessError::ExitedEarly { status, stderr, .. }) => break (status, stderr),
            Err(other) => return Err(other),
        }
        if started.elapsed() > timeout {
            let stderr = qemu.stop();
            return Err(HarnessError::Timeout(
                timeout,
                format!("{}\n(qemu stderr: {})", tail(&read_log(), 40), tail(&stderr, 5)),
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let log = read_log();
    Ok(GuestRun {
        rc: parse_result(&log),
        log,
        qemu_status: status.0,
        qemu_stderr: status.1,
        elapsed: started.elapsed(),
        migration,
    })
}

/// The result code in a serial log, if the guest got as far as printing it.
pub fn parse_result(log: &str) -> Option<i32> {
    log.lines().find_map(|line| {
        let at = line.find(RESULT_MARKER)?;
        line[at + RESULT_MARKER.len()..].split_whitespace().next()?.parse().ok()
    })
}

/// What a guest run produced.
#[derive(Debug)]
pub struct GuestRun {
    /// Everything the guest wrote to its serial port.
    pub log: String,
    /// The test script's exit code, if the guest printed it.
    pub rc: Option<i32>,
    /// How QEMU exited.
    pub qemu_status: ExitStatus,
    /// What QEMU wrote to standard error.
    pub qemu_stderr: String,
    /// Wall time of the run.
    pub elapsed: Duration,
    /// With a migration: the source's last `info migrate` (status, times, bytes).
    pub migration: Option<String>,
}

impl GuestRun {
    /// Whether the script exited 0.
    pub fn passed(&self) -> bool {
        self.rc == Some(0)
    }

    /// Panics, with the log's tail and QEMU's stderr, unless the script exited 0.
    pub fn assert_passed(&self) {
        assert!(
            self.passed(),
            "guest test failed (rc {:?}, qemu {}):\n{}\nqemu stderr:\n{}",
            self.rc,
            self.qemu_status,
            tail(&self.log, 60),
            tail(&self.qemu_stderr, 10)
        );
    }

    /// The values of guest lines `KEY=VALUE` for `key`, in order.
    pub fn values<'a>(&'a self, key: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.log.lines().filter_map(move |l| l.trim().strip_prefix(key).and_then(|r| r.strip_prefix('=')))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn result_lines_are_found_amid_kernel_noise() {
        let log = "[ 1.0] virtio_blk virtio1: [vda] 131072 512-byte logical blocks\nPVKIT-GUEST-BOOTED 6.1\n\
                   [ 2.0] random: crng init done PVKIT-GUEST-RESULT rc=3\n";
        assert_eq!(parse_result(log), Some(3));
        assert_eq!(parse_result("PVKIT-GUEST-RESULT rc=0\r\n"), Some(0));
        assert_eq!(parse_result("PVKIT-GUEST-BOOTED\n"), None);
        assert_eq!(parse_result("PVKIT-GUEST-RESULT rc=x"), None);
    }

    #[test]
    fn ldd_output_is_parsed() {
        let text = "\tlinux-vdso.so.1 (0x00007ffd)\n\tlibz.so.1 => /lib/x86_64-linux-gnu/libz.so.1 (0x7f)\n\t/lib64/ld-linux-x86-64.so.2 (0x7f)\n\tnotfound.so => not found\n";
        let parsed = parse_ldd(text);
        assert_eq!(
            parsed,
            [PathBuf::from("/lib/x86_64-linux-gnu/libz.so.1"), PathBuf::from("/lib64/ld-linux-x86-64.so.2")]
        );
    }

    #[test]
    fn device_arguments() {
        let g = LinuxGuest::new("true").vhost_user_blk("/s/blk", 2).vhost_user_net("/s/net", 2, "52:54:00:00:00:01");
        let args = g.device_args().join(" ");
        assert!(
            args.contains("-chardev socket,id=dev0,path=/s/blk -device vhost-user-blk-pci,chardev=dev0,num-queues=2")
        );
        assert!(args.contains("-netdev vhost-user,id=net1,chardev=dev1,queues=2"));
        assert!(args.contains("virtio-net-pci,netdev=net1,mac=52:54:00:00:00:01,mq=on,vectors=6"));
    }
}
