//! The one stop protocol of every backend.
//!
//! Each worker thread has a gate, a lock it holds while it is inside a pass over its rings.
//! Nothing else takes the gates but the stop paths, so workers never contend with each other:
//! - a frontend disconnects: the connection's stop flag is set, its workers are woken, and the
//!   server waits until no worker is inside a pass ([`Gates::wait_idle`]) before it accepts the
//!   next frontend (which may put its rings in the same shared memory);
//! - the process exits (SIGTERM/SIGINT): [`Gates::close`] keeps every later pass from
//!   starting, for good, and waits for the ones under way, so in-flight requests complete.
//!
//! The gates belong to the process (they outlive connections); the stop flag to a connection.

use crate::lock;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard};

/// One gate per worker thread, shared by every connection of the process.
#[derive(Debug)]
pub struct Gates {
    gates: Vec<Mutex<()>>,
    closed: AtomicBool,
}

/// Proof that a worker is inside a pass; dropping it leaves the pass.
pub struct InPass<'a> {
    _gate: Option<MutexGuard<'a, ()>>,
}

impl Gates {
    /// Gates for `workers` worker threads.
    pub fn new(workers: usize) -> Gates {
        Gates { gates: (0..workers.max(1)).map(|_| Mutex::new(())).collect(), closed: AtomicBool::new(false) }
    }

    /// Enters a pass of worker `worker` unless the gates are closed or `stopped` is set (the
    /// flag is read again after the gate is taken, so a stop that waited for the gate is seen).
    pub fn enter<'a>(&'a self, worker: usize, stopped: &AtomicBool) -> Option<InPass<'a>> {
        let gate = self.gates.get(worker).map(lock);
        if self.is_closed() || stopped.load(Ordering::SeqCst) {
            return None;
        }
        Some(InPass { _gate: gate })
    }

    /// Whether [`Gates::close`] was called.
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }

    /// Waits until no worker is inside a pass.
    pub fn wait_idle(&self) {
        for gate in &self.gates {
            drop(lock(gate));
        }
    }

    /// Keeps every later pass from starting and waits for the ones under way.
    pub fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        self.wait_idle();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    #[test]
    fn a_stop_waits_for_the_pass_under_way_and_no_pass_starts_after_it() {
        let gates = Arc::new(Gates::new(2));
        let stopped = Arc::new(AtomicBool::new(false));
        let (entered_tx, entered_rx) = std::sync::mpsc::channel();
        let finished = Arc::new(AtomicBool::new(false));
        let worker = {
            let (gates, stopped, finished) = (gates.clone(), stopped.clone(), finished.clone());
            std::thread::spawn(move || {
                let pass = gates.enter(1, &stopped).expect("not stopped yet");
                entered_tx.send(()).unwrap();
                std::thread::sleep(Duration::from_millis(100));
                finished.store(true, Ordering::SeqCst);
                drop(pass);
            })
        };
        entered_rx.recv().unwrap();
        stopped.store(true, Ordering::SeqCst);
        gates.wait_idle();
        assert!(finished.load(Ordering::SeqCst), "wait_idle returned while a pass was under way");
        assert!(gates.enter(1, &stopped).is_none(), "a stopped connection entered a pass");
        worker.join().unwrap();
    }

    #[test]
    fn closed_gates_refuse_every_connection() {
        let gates = Gates::new(1);
        let running = AtomicBool::new(false);
        assert!(gates.enter(0, &running).is_some());
        gates.close();
        assert!(gates.enter(0, &running).is_none());
        assert!(gates.enter(7, &running).is_none(), "an unknown worker index is refused too");
    }
}
