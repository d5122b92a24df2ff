//! Whether a test whose facility (QEMU, DPDK, /dev/kvm...) is missing skips or fails.
//!
//! `scripts/test` installs every facility the tests use and sets `PVKIT_TEST_STRICT=1`: then a
//! missing facility fails the test, except an unusable `/dev/kvm`, which nothing can install.
//! A plain `cargo test` on a machine that was not prepared skips such tests with one line each.

use std::path::PathBuf;

/// Whether missing facilities fail tests (`PVKIT_TEST_STRICT` set to anything but `0`).
pub fn strict() -> bool {
    std::env::var("PVKIT_TEST_STRICT").is_ok_and(|v| !v.is_empty() && v != "0")
}

/// The full path of `program` on `PATH`, if it is there.
pub fn find_program(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|dir| dir.join(program)).find(|p| p.is_file())
}

/// Returns true when every program in `programs` is installed. Otherwise, in strict mode,
/// panics naming what is missing; outside strict mode prints one skip line for `test` and
/// returns false.
pub fn require_programs(test: &str, programs: &[&str]) -> bool {
    let missing: Vec<&str> = programs.iter().copied().filter(|p| find_program(p).is_none()).collect();
    if missing.is_empty() {
        return true;
    }
    let why = format!("{} not installed (scripts/test --prepare installs it)", missing.join(", "));
    assert!(!strict(), "{test}: {why}");
    println!("SKIPPED {test}: {why}");
    false
}

/// Returns true when `/dev/kvm` is usable; otherwise prints one skip line (in every mode:
/// no script can install KVM) and returns false.
pub fn require_kvm(test: &str) -> bool {
    if std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm").is_ok() {
        return true;
    }
    println!("SKIPPED {test}: /dev/kvm is missing or not usable on this machine");
    false
}

/// Whether `/dev/kvm` is usable (no skip line: for tests that expect a scenario to be
/// skipped exactly when it is not).
pub fn kvm_usable() -> bool {
    std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm").is_ok()
}
