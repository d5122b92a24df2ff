//! The one lock helper of the VMM.

use std::sync::{Mutex, MutexGuard};

/// Locks `mutex`, recovering the data from a thread that panicked while holding it: the VMM's
/// locks guard device state that stays consistent between statements, so one panicking thread
/// must not stop every vCPU exit after it.
pub fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}
