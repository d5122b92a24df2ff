//! The software guest (used where /dev/kvm is not usable): not built yet.

use std::path::PathBuf;

/// Runs the demo's self-test with the software guest.
pub fn demo(_sockets: &[PathBuf; 3]) -> Result<bool, String> {
    Err("the software guest is not part of this build yet".into())
}
