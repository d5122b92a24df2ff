//! The VMM's event loop: each backend's control socket (a hang-up means the backend went
//! away), its backend request channel (a configuration change), and reconnecting to lost
//! backends without holding the locks vCPU exits need.

use crate::device::VirtioDevice;
use crate::memory::GuestRam;
use crate::sync::lock;
use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use log::warn;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use vmm_sys_util::epoll::EventSet;

/// Watches each backend's control socket (a hang-up means the backend went away) and its
/// backend request channel (a configuration change). Event data: device index times two,
/// plus one for the request channel.
pub(crate) struct BackendWatch {
    devices: Vec<Arc<Mutex<VirtioDevice>>>,
    watched: Vec<[Option<i32>; 2]>,
}

impl BackendWatch {
    fn new(devices: Vec<Arc<Mutex<VirtioDevice>>>) -> BackendWatch {
        let watched = vec![[None; 2]; devices.len()];
        BackendWatch { devices, watched }
    }

    fn sync(&mut self, ops: &mut EventOps) {
        for (i, device) in self.devices.iter().enumerate() {
            let fds = device.lock().map_or([None; 2], |d| [d.link_fd(), d.backend_requests_fd()]);
            for (channel, (fd, watched)) in fds.into_iter().zip(self.watched[i].iter_mut()).enumerate() {
                if fd == *watched {
                    continue;
                }
                let data = (i * 2 + channel) as u32;
                let events = if channel == 0 { EventSet::READ_HANG_UP } else { EventSet::IN | EventSet::READ_HANG_UP };
                if let Some(old) = *watched {
                    let _ = ops.remove(Events::with_data_raw(old, data, events));
                }
                if let Some(new) = fd {
                    let _ = ops.add(Events::with_data_raw(new, data, events));
                }
                *watched = fd;
            }
        }
    }
}

impl MutEventSubscriber for BackendWatch {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let (index, channel) = (events.data() as usize / 2, events.data() % 2);
        let hung_up = events.event_set().intersects(EventSet::HANG_UP | EventSet::READ_HANG_UP);
        if let Some(device) = self.devices.get(index) {
            let mut device = lock(device);
            if channel == 0 {
                // Only a hang-up counts: replies to the VMM's own requests make the socket
                // readable too, and are read by whoever asked.
                if hung_up {
                    device.backend_lost();
                }
            } else if events.event_set().contains(EventSet::IN) || hung_up {
                // A request (or the end of the channel, which reading reports).
                device.backend_request();
            }
        }
        self.sync(ops);
    }

    fn init(&mut self, ops: &mut EventOps) {
        self.sync(ops);
    }
}

/// Runs the event loop in a thread (confined by `sandbox`) until `stop` is set; with
/// `reconnect`, tries every lost backend that often.
pub(crate) fn spawn(
    devices: Vec<Arc<Mutex<VirtioDevice>>>,
    ram: Arc<GuestRam>,
    reconnect: Option<Duration>,
    stop: Arc<AtomicBool>,
    sandbox: crate::seccomp::ThreadSandbox,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new().name("events".into()).spawn(move || {
        if let Err(e) = crate::seccomp::confine_this_thread(crate::seccomp::VmmThread::Events, sandbox) {
            warn!("event loop: {e}; running without a filter");
        }
        let mut manager = match EventManager::<BackendWatch>::new() {
            Ok(m) => m,
            Err(e) => {
                warn!("event loop: {e:?}");
                return;
            }
        };
        let mut id = manager.add_subscriber(BackendWatch::new(devices.clone()));
        let mut last_try = Instant::now();
        while !stop.load(Ordering::SeqCst) {
            let _ = manager.run_with_timeout(50);
            if let Some(every) = reconnect
                && last_try.elapsed() >= every
            {
                last_try = Instant::now();
                if reconnect_lost(&devices, &ram) {
                    // Watch the new sockets: a fresh subscriber registers them.
                    let _ = manager.remove_subscriber(id);
                    id = manager.add_subscriber(BackendWatch::new(devices.clone()));
                }
            }
        }
    })
}

/// Tries to reconnect every device whose backend is away; true when one came back. The
/// handshake runs without the device's lock (vCPU exits need it).
fn reconnect_lost(devices: &[Arc<Mutex<VirtioDevice>>], ram: &GuestRam) -> bool {
    let mut changed = false;
    for device in devices {
        let target = lock(device).reconnect_target();
        if let Some(link) = target.and_then(|t| t.connect(ram)) {
            changed |= lock(device).adopt_link(link, ram);
        }
    }
    changed
}
