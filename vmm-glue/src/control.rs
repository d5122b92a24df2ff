//! Controlling a running VM from another thread (`pvkit run --api-socket`): pause parks every
//! vCPU outside KVM_RUN, resume lets them go on, shutdown ends the run, info says what the VM is.
//!
//! A vCPU parks when it next leaves KVM_RUN; [`VmControl::pause`] kicks the vCPU threads with
//! the same signal the watchdog uses until every one is parked, and gives up after a timeout.
//! Then each started device's backend is stopped (GET_VRING_BASE on every ready queue: the
//! backend completes what it took and touches the rings no more), its indexes kept; resume
//! starts the rings again at those indexes before the vCPUs go on.

use crate::device::VirtioDevice;
use crate::memory::GuestRam;
use crate::snapshot::vcpu_state::{StateError, VcpuState};
use crate::sync::lock;
use crate::vcpu::Outcome;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// How long a pause waits for every vCPU to park.
const PAUSE_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a control request failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ControlError {
    /// The VM is not running (not started yet, or ended).
    #[error("the VM is not running")]
    NotRunning,
    /// Not every vCPU parked in time.
    #[error("{parked} of {vcpus} vCPUs parked within {PAUSE_TIMEOUT:?}")]
    PauseTimedOut {
        /// vCPUs parked.
        parked: usize,
        /// vCPUs.
        vcpus: usize,
    },
}

/// The run state, as `GET /vm` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunState {
    /// Not started yet.
    Created,
    /// vCPUs running.
    Running,
    /// Every vCPU parked.
    Paused,
    /// The run ended.
    Ended,
}

impl RunState {
    /// Its name in the API.
    pub fn name(self) -> &'static str {
        match self {
            RunState::Created => "created",
            RunState::Running => "running",
            RunState::Paused => "paused",
            RunState::Ended => "ended",
        }
    }
}

struct Inner {
    state: RunState,
    /// vCPUs parked now.
    parked: usize,
    /// The vCPU threads, for kicks (cleared before they are joined).
    threads: Vec<libc::pthread_t>,
    /// Where an outcome ends the run.
    done: Option<Sender<Outcome>>,
    /// The devices, quiesced while paused, and the memory their rings are in.
    devices: Vec<Arc<Mutex<VirtioDevice>>>,
    ram: Option<Arc<GuestRam>>,
    /// What a snapshot needs besides the devices and memory.
    machine: Option<Arc<crate::snapshot::save::Machine>>,
    /// Each vCPU's state, read by its thread when it last parked.
    vcpu_states: crate::snapshot::vcpu_state::ParkedStates,
}

/// One device, as `GET /vm` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceStatus {
    /// Its name (`blk`, `net`, ...).
    pub name: String,
    /// Its slot.
    pub slot: u32,
    /// The features the driver acknowledged.
    pub features: u64,
    /// Whether its backend is connected.
    pub connected: bool,
    /// While paused: each queue's next available index, as its backend reported it.
    pub paused_bases: Option<Vec<u16>>,
    /// Guest protocol violations the transport saw.
    pub violations: u64,
}

/// A running VM's control, shared by the VM and whoever controls it.
pub struct VmControl {
    inner: Mutex<Inner>,
    changed: Condvar,
    /// Set while a pause is asked for: vCPUs look here before each KVM_RUN.
    pause_asked: AtomicBool,
}

impl Default for VmControl {
    fn default() -> Self {
        VmControl {
            inner: Mutex::new(Inner {
                state: RunState::Created,
                parked: 0,
                threads: Vec::new(),
                done: None,
                devices: Vec::new(),
                ram: None,
                machine: None,
                vcpu_states: Vec::new(),
            }),
            changed: Condvar::new(),
            pause_asked: AtomicBool::new(false),
        }
    }
}

impl VmControl {
    /// A control for a VM not started yet.
    pub fn new() -> Arc<VmControl> {
        Arc::new(VmControl::default())
    }

    /// The state now.
    pub fn state(&self) -> RunState {
        lock(&self.inner).state
    }

    /// The VM started its vCPU `threads` with `devices` over `ram`; `done` ends the run;
    /// `machine` is what snapshots need besides.
    pub(crate) fn started(
        &self,
        threads: Vec<libc::pthread_t>,
        done: Sender<Outcome>,
        devices: Vec<Arc<Mutex<VirtioDevice>>>,
        ram: Arc<GuestRam>,
        machine: Option<Arc<crate::snapshot::save::Machine>>,
    ) {
        let mut inner = lock(&self.inner);
        inner.vcpu_states = threads.iter().map(|_| None).collect();
        inner.machine = machine;
        inner.threads = threads;
        inner.done = Some(done);
        inner.devices = devices;
        inner.ram = Some(ram);
        inner.state = RunState::Running;
    }

    /// Each device's status.
    pub fn devices(&self) -> Vec<DeviceStatus> {
        let devices = lock(&self.inner).devices.clone();
        devices
            .iter()
            .map(|device| {
                let d = lock(device);
                DeviceStatus {
                    name: d.name.clone(),
                    slot: d.slot,
                    features: d.state.negotiated_features(),
                    connected: d.connected(),
                    paused_bases: d.paused_bases.clone(),
                    violations: d.violations,
                }
            })
            .collect()
    }

    /// The run is over: no more kicks (the threads are about to be joined), parked vCPUs go.
    pub(crate) fn ended(&self) {
        let mut inner = lock(&self.inner);
        inner.threads.clear();
        inner.done = None;
        inner.state = RunState::Ended;
        self.pause_asked.store(false, Ordering::SeqCst);
        self.changed.notify_all();
    }

    /// Called by vCPU `id`'s thread before a KVM_RUN when no exit waits for the next KVM_RUN
    /// to complete it: parks it while a pause is asked for (and the run goes on), first
    /// keeping its state as `capture` reads it, for a snapshot.
    pub(crate) fn park_if_asked(&self, id: usize, capture: &dyn Fn() -> Result<VcpuState, StateError>) {
        if !self.pause_asked.load(Ordering::SeqCst) {
            return;
        }
        let state = capture();
        let mut inner = lock(&self.inner);
        if let Some(slot) = inner.vcpu_states.get_mut(id) {
            *slot = Some(state);
        }
        inner.parked += 1;
        self.changed.notify_all();
        while self.pause_asked.load(Ordering::SeqCst) && inner.state != RunState::Ended {
            inner =
                self.changed.wait_timeout(inner, Duration::from_millis(100)).map_or_else(|e| e.into_inner().0, |r| r.0);
        }
        inner.parked -= 1;
        self.changed.notify_all();
    }

    /// Parks every vCPU; returns once all are parked.
    pub fn pause(&self) -> Result<(), ControlError> {
        let deadline = Instant::now() + PAUSE_TIMEOUT;
        let mut inner = lock(&self.inner);
        match inner.state {
            RunState::Paused => return Ok(()),
            RunState::Running => {}
            RunState::Created | RunState::Ended => return Err(ControlError::NotRunning),
        }
        self.pause_asked.store(true, Ordering::SeqCst);
        let vcpus = inner.threads.len();
        while inner.parked < vcpus {
            if Instant::now() > deadline || inner.state == RunState::Ended {
                let parked = inner.parked;
                self.pause_asked.store(false, Ordering::SeqCst);
                self.changed.notify_all();
                return Err(ControlError::PauseTimedOut { parked, vcpus });
            }
            for thread in &inner.threads {
                // SAFETY: the thread ids are those of vCPU threads that are not joined yet
                // (`ended` clears the list, under this lock, before they are); the signal's
                // handler does nothing, it only ends KVM_RUN.
                unsafe { libc::pthread_kill(*thread, vmm_sys_util::signal::SIGRTMIN()) };
            }
            inner =
                self.changed.wait_timeout(inner, Duration::from_millis(5)).map_or_else(|e| e.into_inner().0, |r| r.0);
        }
        inner.state = RunState::Paused;
        for device in &inner.devices {
            let mut device = lock(device);
            if let Err(e) = device.quiesce() {
                log::warn!("{}: stopping its rings for the pause: {e}", device.name);
            }
        }
        Ok(())
    }

    /// Pauses the VM (if it runs) and saves it into `dir`; it stays paused (resume it or shut
    /// it down). Returns what was saved.
    pub fn snapshot(
        &self,
        dir: &std::path::Path,
    ) -> Result<crate::snapshot::save::Saved, crate::snapshot::SnapshotError> {
        self.pause().map_err(crate::snapshot::SnapshotError::Control)?;
        let mut inner = lock(&self.inner);
        let (Some(machine), Some(ram)) = (inner.machine.clone(), inner.ram.clone()) else {
            return Err(crate::snapshot::SnapshotError::Control(ControlError::NotRunning));
        };
        let states = std::mem::take(&mut inner.vcpu_states);
        let devices = inner.devices.clone();
        let saved = crate::snapshot::save::save(dir, &machine, &ram, &devices, &states);
        inner.vcpu_states = states;
        saved
    }

    /// Moves the VM to the `pvkit run --incoming` waiting on `socket` (by `mode`) and ends
    /// this run with [`Outcome::Migrated`]. A failure before the
    /// backends were let go resumes the VM here, if it was running; after that it stays paused.
    pub fn migrate(
        &self,
        socket: &std::path::Path,
        mode: crate::snapshot::outgoing::Mode,
    ) -> Result<crate::snapshot::outgoing::Migrated, crate::snapshot::migration::MigrationError> {
        let (machine, ram, devices, was_running) = {
            let inner = lock(&self.inner);
            if !matches!(inner.state, RunState::Running | RunState::Paused) {
                return Err(ControlError::NotRunning.into());
            }
            match (inner.machine.clone(), inner.ram.clone()) {
                (Some(machine), Some(ram)) => (machine, ram, inner.devices.clone(), inner.state == RunState::Running),
                _ => return Err(ControlError::NotRunning.into()),
            }
        };
        let mut channel = crate::snapshot::migration::Channel::connect(socket)?;
        let pause = || {
            self.pause()?;
            Ok(lock(&self.inner).vcpu_states.iter_mut().map(Option::take).collect())
        };
        let source =
            crate::snapshot::outgoing::Source { machine: &machine, ram: &ram, devices: &devices, pause: &pause };
        match crate::snapshot::outgoing::send(&mut channel, &source, mode) {
            Ok(migrated) => {
                if let Some(done) = lock(&self.inner).done.clone() {
                    let _ = done.send(Outcome::Migrated);
                }
                Ok(migrated)
            }
            Err(e) => {
                let released = devices.iter().any(|d| lock(d).is_released());
                if was_running && !released {
                    let _ = self.resume();
                }
                Err(e)
            }
        }
    }

    /// Lets parked vCPUs run again.
    pub fn resume(&self) -> Result<(), ControlError> {
        let mut inner = lock(&self.inner);
        match inner.state {
            RunState::Running => return Ok(()),
            RunState::Paused => {}
            RunState::Created | RunState::Ended => return Err(ControlError::NotRunning),
        }
        if let Some(ram) = inner.ram.clone() {
            for device in &inner.devices {
                let mut device = lock(device);
                if let Err(e) = device.resume(&ram) {
                    log::warn!("{}: starting its rings after the pause: {e}", device.name);
                }
            }
        }
        self.pause_asked.store(false, Ordering::SeqCst);
        inner.state = RunState::Running;
        self.changed.notify_all();
        Ok(())
    }

    /// Ends the run (as a guest that shut down would), paused or not.
    pub fn shutdown(&self) -> Result<(), ControlError> {
        let inner = lock(&self.inner);
        let done = inner.done.clone().ok_or(ControlError::NotRunning)?;
        drop(inner);
        done.send(Outcome::Stopped).map_err(|_| ControlError::NotRunning)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_vm_not_running_refuses_and_a_running_one_pauses_and_resumes() {
        let control = VmControl::new();
        assert_eq!(control.pause(), Err(ControlError::NotRunning));
        let (done, outcome) = std::sync::mpsc::channel();
        // A stand-in vCPU thread that keeps "leaving KVM_RUN".
        let stop = Arc::new(AtomicBool::new(false));
        let vcpu = {
            let (control, stop) = (control.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    control.park_if_asked(0, &|| Err(StateError::XsaveTooLarge(0)));
                    std::thread::sleep(Duration::from_millis(1));
                }
            })
        };
        let id = std::os::unix::thread::JoinHandleExt::as_pthread_t(&vcpu);
        // The kick signal needs a handler, as the VM installs one.
        extern "C" fn nothing(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}
        vmm_sys_util::signal::register_signal_handler(vmm_sys_util::signal::SIGRTMIN(), nothing).unwrap();
        let ram = Arc::new(crate::memory::GuestRam::new(16 << 20).unwrap());
        control.started(vec![id], done, Vec::new(), ram, None);
        assert_eq!(control.pause(), Ok(()));
        assert_eq!(control.state(), RunState::Paused);
        // Without the VM's handles there is nothing to save.
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            control.snapshot(dir.path()),
            Err(crate::snapshot::SnapshotError::Control(ControlError::NotRunning))
        ));
        assert_eq!(control.resume(), Ok(()));
        assert_eq!(control.state(), RunState::Running);
        control.shutdown().unwrap();
        assert_eq!(outcome.recv().unwrap(), Outcome::Stopped);
        control.ended();
        stop.store(true, Ordering::SeqCst);
        vcpu.join().unwrap();
        assert_eq!(control.resume(), Err(ControlError::NotRunning));
    }
}
