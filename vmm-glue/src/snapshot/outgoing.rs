//! The source side of moving a VM to another `pvkit run --incoming`: stop-and-copy (pause,
//! send every non-zero page and the state) or pre-copy (send every page while the VM runs,
//! then the pages KVM's log says the vCPUs wrote since, round after round until few are left,
//! then pause and send those, every page the backends logged, and the state). Either way the
//! source lets go of the backends only after the destination has everything, and the
//! destination connects to them only after that.

use super::dirty::{BackendLog, KvmDirtyLog, PageBitmap};
use super::memory_image::for_each_page_run;
use super::migration::{Channel, MigrationError};
use super::save::{Machine, MachineStateRef, manifest, vcpu_refs};
use super::vcpu_state::{ChipState, ParkedStates};
use crate::device::VirtioDevice;
use crate::memory::GuestRam;
use crate::sync::lock;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Pre-copy rounds at most before the final stop.
const MAX_ROUNDS: u32 = 12;
/// Pre-copy stops when fewer pages than this are dirty after a round.
const STOP_PAGES: u64 = 256;
/// Between rounds kept going only to fill a minimum live time: how long to let pages collect.
const ROUND_PAUSE: Duration = Duration::from_millis(20);

/// What a migration did.
#[derive(Debug, Clone)]
pub struct Migrated {
    /// Whether it was pre-copy (live).
    pub live: bool,
    /// Pre-copy rounds after the first full pass (0 for stop-and-copy).
    pub rounds: u32,
    /// Pages sent while the VM ran.
    pub pages_live: u64,
    /// Pages sent while it was paused.
    pub pages_paused: u64,
    /// Pages the backends logged during the live phase (all sent again while paused).
    pub backend_pages: u64,
    /// From the pause until the destination ran the VM.
    pub downtime: Duration,
    /// The destination's part of it (from having everything to running).
    pub restore_ms: f64,
}

/// What the migration needs of the VM's control.
pub struct Source<'a> {
    /// What a snapshot needs of the VM.
    pub machine: &'a Machine,
    /// Guest memory.
    pub ram: &'a GuestRam,
    /// The devices.
    pub devices: &'a [Arc<Mutex<VirtioDevice>>],
    /// Pauses the VM; returns each vCPU's state.
    pub pause: &'a dyn Fn() -> Result<ParkedStates, MigrationError>,
}

/// How to move the VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Pause, then send everything.
    StopAndCopy,
    /// Pre-copy, with its live phase lasting at least this long (rounds go on past the point
    /// where few pages are left; for tests and measurements of the dirty logs).
    PreCopy {
        /// The shortest live phase.
        at_least: Duration,
    },
}

/// Sends the VM over `channel`; on success the source's devices have let go of their backends
/// and the VM runs on the other side.
pub fn send(channel: &mut Channel, source: &Source, mode: Mode) -> Result<Migrated, MigrationError> {
    let live = mode != Mode::StopAndCopy;
    channel.hello(source.ram.size())?;
    let mut report = Migrated {
        live,
        rounds: 0,
        pages_live: 0,
        pages_paused: 0,
        backend_pages: 0,
        downtime: Duration::ZERO,
        restore_ms: 0.0,
    };
    let send_pages = |channel: &mut Channel, wanted: Option<&PageBitmap>| {
        let wanted_fn = wanted.map(|w| move |page: u64| w.has(page));
        let wanted_ref = wanted_fn.as_ref().map(|f| f as &dyn Fn(u64) -> bool);
        // Runs never cross a scan chunk, so each fits one `Pages` message.
        for_each_page_run::<MigrationError, _>(source.ram, wanted_ref, |gpa, bytes| channel.pages(gpa, bytes))
    };
    let (paused_at, states) = if let Mode::PreCopy { at_least } = mode {
        let live_since = Instant::now();
        let logs = start_logs(source)?;
        report.pages_live = send_pages(channel, None)?;
        let mut pending = loop {
            let filling = live_since.elapsed() < at_least;
            if filling {
                std::thread::sleep(ROUND_PAUSE);
            }
            let dirty = logs.kvm.take()?;
            if !filling && (dirty.count() < STOP_PAGES || report.rounds >= MAX_ROUNDS) {
                break dirty;
            }
            report.rounds += 1;
            report.pages_live += send_pages(channel, Some(&dirty))?;
        };
        let paused_at = Instant::now();
        let states = (source.pause)()?;
        let (vcpu_pages, backend_pages) = (logs.kvm.take()?, logs.backend.marked()?);
        report.backend_pages = backend_pages.count();
        log::info!(
            "migration: paused after {} round(s); {} page(s) left from the last round, {} written by vCPUs since, {} logged by backends",
            report.rounds,
            pending.count(),
            vcpu_pages.count(),
            report.backend_pages
        );
        pending.add(&vcpu_pages);
        pending.add(&backend_pages);
        report.pages_paused = send_pages(channel, Some(&pending))?;
        (paused_at, states)
    } else {
        let paused_at = Instant::now();
        let states = (source.pause)()?;
        report.pages_paused = send_pages(channel, None)?;
        (paused_at, states)
    };
    let vcpus = vcpu_refs(&states)?;
    let chips = ChipState::capture(&source.machine.vm).map_err(super::SnapshotError::from)?;
    let manifest = manifest(source.machine, source.ram, source.devices, report.pages_live + report.pages_paused);
    channel.finish(&manifest, &MachineStateRef { chips: &chips, vcpus: &vcpus })?;
    for device in source.devices {
        lock(device).release();
    }
    let started = channel.released()?;
    report.downtime = paused_at.elapsed();
    report.restore_ms = started.restore_ms;
    Ok(report)
}

/// The logs of a pre-copy, stopped when dropped.
struct Logs<'a> {
    kvm: KvmDirtyLog<'a>,
    backend: BackendLog,
    devices: &'a [Arc<Mutex<VirtioDevice>>],
}

impl Drop for Logs<'_> {
    fn drop(&mut self) {
        for device in self.devices {
            let mut device = lock(device);
            if let Err(e) = device.set_logging(None) {
                log::warn!("{}: stopping its dirty log: {e}", device.name);
            }
        }
    }
}

/// Starts KVM's dirty log and every backend's; refuses a backend that cannot log.
fn start_logs<'a>(source: &Source<'a>) -> Result<Logs<'a>, MigrationError> {
    let kvm = KvmDirtyLog::start(&source.machine.vm, source.ram)?;
    let backend = BackendLog::new(source.ram)?;
    let logs = Logs { kvm, backend, devices: source.devices };
    for device in source.devices {
        let mut device = lock(device);
        if device.can_log() == Some(false) {
            return Err(MigrationError::CannotLog { device: device.name.clone(), socket: device.socket.clone() });
        }
        device
            .set_logging(Some(logs.backend.region()))
            .map_err(|source| MigrationError::Device { device: device.name.clone(), source })?;
    }
    Ok(logs)
}
