//! Snapshots of a paused VM: a directory with a manifest (`manifest.json`: versioned, with the
//! pvkit version, the host's CPU vendor and KVM flavour, guest memory's size, the command line
//! and each device's transport state and ring indexes), the vCPUs' and in-kernel devices'
//! state (`vcpus.json`), and guest memory (`memory.bin`, sparse).
//!
//! The backends keep no state of their own beyond their rings, which live in guest memory: a
//! device is saved as what its frontend knows (status, features, queue addresses, the next
//! available index each backend reported when its rings were stopped), and restored by
//! connecting to a backend (the one in the manifest, or another one on the same disk) and
//! starting its rings at those indexes.

pub mod dirty;
pub mod inspect;
pub mod memory_image;
pub mod migration;
pub mod outgoing;
pub mod save;
pub mod vcpu_state;

use crate::mmio::MmioTransportState;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use vcpu_state::{ChipState, VcpuState};

/// The snapshot format this build writes and reads.
pub const FORMAT_VERSION: u32 = 1;
/// The manifest's file name.
pub const MANIFEST_FILE: &str = "manifest.json";
/// The vCPU state's file name.
pub const VCPUS_FILE: &str = "vcpus.json";
/// Guest memory's file name.
pub const MEMORY_FILE: &str = "memory.bin";

/// Errors from writing, reading or checking a snapshot.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// A file could not be written or read.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// A file is not what a snapshot holds.
    #[error("{path} is not a pvkit snapshot file: {source}")]
    Format {
        /// The file.
        path: String,
        /// Why.
        source: serde_json::Error,
    },
    /// Guest memory.
    #[error(transparent)]
    Memory(#[from] memory_image::MemoryImageError),
    /// vCPU or in-kernel device state.
    #[error(transparent)]
    State(#[from] vcpu_state::StateError),
    /// The snapshot was taken elsewhere.
    #[error("the snapshot was taken with {what} {found}; this is {here}")]
    Mismatch {
        /// What differs (`pvkit version`, `CPU vendor`, ...).
        what: &'static str,
        /// What the snapshot says.
        found: String,
        /// What this host or build is.
        here: String,
    },
    /// The snapshot's parts do not agree with each other.
    #[error("the snapshot is inconsistent: {0}")]
    Inconsistent(String),
    /// A vCPU never saved its state while parked.
    #[error("vCPU {0} has no saved state")]
    NoVcpuState(usize),
    /// A vCPU's state could not be read when it parked.
    #[error("vCPU {id}: {source}")]
    VcpuState {
        /// Which vCPU.
        id: usize,
        /// Why.
        source: vcpu_state::StateError,
    },
    /// The VM could not be paused for it.
    #[error(transparent)]
    Control(crate::control::ControlError),
}

/// One queue's ring indexes when its backend was stopped.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RingIndexes {
    /// The next available-ring entry the backend would have taken (GET_VRING_BASE).
    pub last_avail: u16,
    /// The used ring's index in guest memory.
    pub used: u16,
    /// The available ring's index in guest memory (what the driver had offered).
    pub avail: u16,
}

/// One device as its frontend knew it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeviceSnapshot {
    /// Its slot.
    pub slot: u32,
    /// Its virtio device type.
    pub virtio_id: u32,
    /// Its name (`blk`, `net`, ...).
    pub name: String,
    /// The backend's socket.
    pub socket: PathBuf,
    /// The virtio-mmio transport state (status, features both ways, queues, interrupt status,
    /// configuration generation).
    pub transport: MmioTransportState,
    /// Per queue, its indexes (all zero for a queue the driver has not started).
    pub rings: Vec<RingIndexes>,
}

/// Guest memory as saved.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MemoryInfo {
    /// Bytes of guest memory.
    pub size: u64,
    /// Pages that were not all zero.
    pub nonzero_pages: u64,
}

/// Where and what the snapshot was taken on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Origin {
    /// The pvkit version.
    pub pvkit_version: String,
    /// The host CPU's vendor (`AuthenticAMD`, `GenuineIntel`).
    pub cpu_vendor: String,
    /// The KVM flavour (`kvm-pvm` for a PVM-based KVM, `kvm` otherwise).
    pub kvm_flavour: String,
}

impl Origin {
    /// This build on this host.
    pub fn here() -> Origin {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu_vendor = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("vendor_id").and_then(|v| v.split(':').nth(1)))
            .map_or_else(|| "unknown".to_string(), |v| v.trim().to_string());
        Origin {
            pvkit_version: env!("CARGO_PKG_VERSION").to_string(),
            cpu_vendor,
            kvm_flavour: if crate::kvm_is_pvm() { "kvm-pvm".into() } else { "kvm".into() },
        }
    }

    /// Refuses a snapshot from another version, CPU vendor or KVM flavour, saying which.
    pub fn check(&self, here: &Origin) -> Result<(), SnapshotError> {
        let pairs = [
            ("pvkit version", &self.pvkit_version, &here.pvkit_version),
            ("CPU vendor", &self.cpu_vendor, &here.cpu_vendor),
            ("KVM flavour", &self.kvm_flavour, &here.kvm_flavour),
        ];
        for (what, found, mine) in pairs {
            if found != mine {
                return Err(SnapshotError::Mismatch { what, found: found.clone(), here: mine.clone() });
            }
        }
        Ok(())
    }
}

/// `manifest.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    /// [`FORMAT_VERSION`] when written.
    pub format: u32,
    /// Where it was taken.
    pub origin: Origin,
    /// Seconds since the epoch when it was taken.
    pub taken_unix: u64,
    /// Guest memory.
    pub memory: MemoryInfo,
    /// vCPUs.
    pub vcpus: u8,
    /// The TSC rate the guest was told (kHz).
    pub tsc_khz: u64,
    /// The guest's whole command line (device entries and pvkit keys included).
    pub cmdline: String,
    /// Whether pvkit's doorbell ports were wired.
    pub doorbells: bool,
    /// The devices in slot order.
    pub devices: Vec<DeviceSnapshot>,
}

/// `vcpus.json`: what KVM held.
#[derive(Debug, Serialize, Deserialize)]
pub struct MachineState {
    /// The in-kernel irqchip, PIT and clock.
    pub chips: ChipState,
    /// Each vCPU.
    pub vcpus: Vec<VcpuState>,
}

/// A snapshot's manifest and machine state (guest memory stays in its file).
#[derive(Debug)]
pub struct Snapshot {
    /// The manifest.
    pub manifest: Manifest,
    /// vCPUs and in-kernel devices.
    pub machine: MachineState,
}

fn io<'a>(what: &'static str, path: &'a Path) -> impl Fn(std::io::Error) -> SnapshotError + 'a {
    move |source| SnapshotError::Io { what, path: path.display().to_string(), source }
}

fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<(), SnapshotError> {
    let text = serde_json::to_vec_pretty(value)
        .map_err(|source| SnapshotError::Format { path: path.display().to_string(), source })?;
    std::fs::write(path, text).map_err(io("writing", path))
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, SnapshotError> {
    let text = std::fs::read(path).map_err(io("reading", path))?;
    serde_json::from_slice(&text).map_err(|source| SnapshotError::Format { path: path.display().to_string(), source })
}

impl Snapshot {
    /// Reads a snapshot's manifest (alone: enough to inspect or check it).
    pub fn read_manifest(dir: &Path) -> Result<Manifest, SnapshotError> {
        let manifest: Manifest = read_json(&dir.join(MANIFEST_FILE))?;
        if manifest.format != FORMAT_VERSION {
            return Err(SnapshotError::Mismatch {
                what: "snapshot format",
                found: manifest.format.to_string(),
                here: FORMAT_VERSION.to_string(),
            });
        }
        Ok(manifest)
    }

    /// Reads the snapshot in `dir` and checks its parts agree.
    pub fn read(dir: &Path) -> Result<Snapshot, SnapshotError> {
        let manifest = Snapshot::read_manifest(dir)?;
        let machine: MachineState = read_json(&dir.join(VCPUS_FILE))?;
        let snapshot = Snapshot { manifest, machine };
        snapshot.check_consistent()?;
        Ok(snapshot)
    }

    /// Checks the parts agree: one state per vCPU, devices in slot order with one set of
    /// indexes per queue, memory of a size the VMM takes.
    pub fn check_consistent(&self) -> Result<(), SnapshotError> {
        let m = &self.manifest;
        if m.vcpus == 0 {
            return Err(SnapshotError::Inconsistent("the manifest has no vCPU".into()));
        }
        if self.machine.vcpus.len() != usize::from(m.vcpus) {
            return Err(SnapshotError::Inconsistent(format!(
                "the manifest has {} vCPUs, {} has {}",
                m.vcpus,
                VCPUS_FILE,
                self.machine.vcpus.len()
            )));
        }
        if !(crate::memory::MIN_SIZE..=crate::memory::MAX_SIZE).contains(&m.memory.size) {
            return Err(SnapshotError::Inconsistent(format!("guest memory of {} bytes", m.memory.size)));
        }
        for (slot, device) in m.devices.iter().enumerate() {
            if device.slot as usize != slot {
                return Err(SnapshotError::Inconsistent(format!(
                    "device {} is in slot {}, expected slot {slot} (a device is missing)",
                    device.name, device.slot
                )));
            }
            if device.rings.len() != device.transport.queues().len() {
                return Err(SnapshotError::Inconsistent(format!(
                    "device {} has {} queues and {} sets of ring indexes",
                    device.name,
                    device.transport.queues().len(),
                    device.rings.len()
                )));
            }
        }
        Ok(())
    }
}

/// Creates `dir` if needed.
pub fn create_dir(dir: &Path) -> Result<(), SnapshotError> {
    std::fs::create_dir_all(dir).map_err(io("creating", dir))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vcpu(id: u8) -> VcpuState {
        VcpuState {
            id,
            cpuid: Vec::new(),
            regs: Default::default(),
            sregs: Default::default(),
            xsave: Default::default(),
            xcrs: Default::default(),
            debugregs: Default::default(),
            msrs: Vec::new(),
            lapic: Default::default(),
            events: Default::default(),
            mp_state: Default::default(),
        }
    }

    fn snapshot(vcpus: u8, states: u8) -> Snapshot {
        let transport = MmioTransportState::new(2, 1 << 32, &[256], 256 << 20);
        let device = |slot| DeviceSnapshot {
            slot,
            virtio_id: 2,
            name: "blk".into(),
            socket: PathBuf::from("/tmp/blk.sock"),
            transport: transport.clone(),
            rings: vec![RingIndexes::default()],
        };
        Snapshot {
            manifest: Manifest {
                format: FORMAT_VERSION,
                origin: Origin::here(),
                taken_unix: 0,
                memory: MemoryInfo { size: 256 << 20, nonzero_pages: 0 },
                vcpus,
                tsc_khz: 0,
                cmdline: String::new(),
                doorbells: true,
                devices: vec![device(0), device(1)],
            },
            machine: MachineState {
                chips: ChipState { irqchips: Vec::new(), pit: Default::default(), clock: Default::default() },
                vcpus: (0..states).map(vcpu).collect(),
            },
        }
    }

    #[test]
    fn parts_that_disagree_are_refused_with_what_disagrees() {
        assert!(snapshot(1, 1).check_consistent().is_ok());
        let why = |s: Snapshot| s.check_consistent().unwrap_err().to_string();
        assert!(why(snapshot(0, 0)).contains("no vCPU"));
        assert!(why(snapshot(2, 1)).contains("2 vCPUs"));
        let mut gap = snapshot(1, 1);
        gap.manifest.devices.remove(0);
        assert!(why(gap).contains("a device is missing"));
        let mut rings = snapshot(1, 1);
        rings.manifest.devices[1].rings.clear();
        assert!(why(rings).contains("0 sets of ring indexes"));
        let mut huge = snapshot(1, 1);
        huge.manifest.memory.size = 1 << 40;
        assert!(why(huge).contains("guest memory"));
    }

    #[test]
    fn another_origin_is_named() {
        let here = Origin::here();
        let other = Origin { cpu_vendor: "GenuineIntel-or-other".into(), ..here.clone() };
        let error = other.check(&here).unwrap_err().to_string();
        assert!(error.contains("CPU vendor GenuineIntel-or-other"), "{error}");
        let flavour = Origin { kvm_flavour: "kvm-elsewhere".into(), ..here.clone() };
        assert!(flavour.check(&here).unwrap_err().to_string().contains("KVM flavour kvm-elsewhere"));
        assert!(here.check(&here).is_ok());
    }

    #[test]
    fn a_manifest_round_trips_through_a_directory() {
        let dir = tempfile::tempdir().unwrap();
        let original = snapshot(1, 1);
        write_json(&dir.path().join(MANIFEST_FILE), &original.manifest).unwrap();
        write_json(&dir.path().join(VCPUS_FILE), &original.machine).unwrap();
        let back = Snapshot::read(dir.path()).unwrap();
        assert_eq!(back.manifest.devices.len(), 2);
        assert_eq!(back.machine.vcpus.len(), 1);
        assert_eq!(back.manifest.origin, original.manifest.origin);
        let mut future = original.manifest.clone();
        future.format = FORMAT_VERSION + 1;
        write_json(&dir.path().join(MANIFEST_FILE), &future).unwrap();
        assert!(Snapshot::read(dir.path()).unwrap_err().to_string().contains("snapshot format"));
    }
}
