//! Saving a paused VM into a snapshot directory: the vCPU states its threads read when they
//! parked, the in-kernel devices, each device's transport state and ring indexes, guest memory
//! (sparse), and last the manifest.

use super::vcpu_state::{ChipState, StateError, VcpuState};
use super::{Manifest, MemoryInfo, Origin, SnapshotError, memory_image};
use crate::device::VirtioDevice;
use crate::memory::GuestRam;
use crate::sync::lock;
use kvm_ioctls::VmFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What a snapshot needs of a VM besides its devices and memory.
pub struct Machine {
    /// The VM (for its in-kernel devices' state).
    pub vm: Arc<VmFd>,
    /// The guest's whole command line.
    pub cmdline: String,
    /// vCPUs.
    pub vcpus: u8,
    /// The TSC rate the guest was told (kHz).
    pub tsc_khz: u64,
    /// Whether pvkit's doorbell ports are wired.
    pub doorbells: bool,
}

/// What a snapshot took.
#[derive(Debug, Clone)]
pub struct Saved {
    /// Its directory.
    pub dir: PathBuf,
    /// Guest memory's size.
    pub memory: u64,
    /// Pages that were not zero.
    pub nonzero_pages: u64,
    /// Bytes the directory's files take on disk.
    pub bytes_on_disk: u64,
    /// How long saving took (the VM was already paused).
    pub elapsed: Duration,
}

/// Saves the paused VM into `dir` (created if needed).
pub fn save(
    dir: &Path,
    machine: &Machine,
    ram: &GuestRam,
    devices: &[Arc<Mutex<VirtioDevice>>],
    states: &[Option<Result<VcpuState, StateError>>],
) -> Result<Saved, SnapshotError> {
    let started = Instant::now();
    super::create_dir(dir)?;
    let vcpus = vcpu_refs(states)?;
    let chips = ChipState::capture(&machine.vm)?;
    let nonzero_pages = memory_image::save(ram, &dir.join(super::MEMORY_FILE))?;
    let manifest = manifest(machine, ram, devices, nonzero_pages);
    super::write_json(&dir.join(super::VCPUS_FILE), &MachineStateRef { chips: &chips, vcpus: &vcpus })?;
    super::write_json(&dir.join(super::MANIFEST_FILE), &manifest)?;
    Ok(Saved {
        dir: dir.to_path_buf(),
        memory: ram.size(),
        nonzero_pages,
        bytes_on_disk: bytes_on_disk(dir),
        elapsed: started.elapsed(),
    })
}

/// Each vCPU's state as its thread read it when it parked.
pub fn vcpu_refs(states: &[Option<Result<VcpuState, StateError>>]) -> Result<Vec<&VcpuState>, SnapshotError> {
    states
        .iter()
        .enumerate()
        .map(|(id, state)| match state {
            Some(Ok(state)) => Ok(state),
            Some(Err(source)) => Err(SnapshotError::VcpuState { id, source: source.clone() }),
            None => Err(SnapshotError::NoVcpuState(id)),
        })
        .collect()
}

/// The manifest of the paused VM.
pub fn manifest(
    machine: &Machine,
    ram: &GuestRam,
    devices: &[Arc<Mutex<VirtioDevice>>],
    nonzero_pages: u64,
) -> Manifest {
    Manifest {
        format: super::FORMAT_VERSION,
        origin: Origin::here(),
        taken_unix: std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs()),
        memory: MemoryInfo { size: ram.size(), nonzero_pages },
        vcpus: machine.vcpus,
        tsc_khz: machine.tsc_khz,
        cmdline: machine.cmdline.clone(),
        doorbells: machine.doorbells,
        devices: devices.iter().map(|d| lock(d).snapshot(ram)).collect(),
    }
}

/// [`super::MachineState`] by reference, serialized the same way.
#[derive(serde::Serialize)]
pub struct MachineStateRef<'a> {
    /// The in-kernel devices.
    pub chips: &'a ChipState,
    /// Each vCPU.
    pub vcpus: &'a [&'a VcpuState],
}

/// Bytes the files of `dir` take on disk (holes not counted).
pub fn bytes_on_disk(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::read_dir(dir)
        .map(|entries| entries.flatten().filter_map(|e| e.metadata().ok()).map(|m| m.blocks() * 512).sum())
        .unwrap_or(0)
}
