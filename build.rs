//! Builds the tiny guest kernel for `x86_64-unknown-none` and hands its path to the `pvkit`
//! binary, which embeds it (`include_bytes!`), so running pvkit never builds anything.
//!
//! The guest is built by a nested cargo with its own target directory under `OUT_DIR`
//! (sharing the outer one would deadlock on its lock). When the `x86_64-unknown-none` target
//! is missing, it is installed with rustup, with a warning.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

const GUEST_TARGET: &str = "x86_64-unknown-none";

fn main() {
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let out_dir = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let guest_dir = manifest_dir.join("examples/tiny-guest");
    for watched in [
        "examples/tiny-guest/src",
        "examples/tiny-guest/Cargo.toml",
        "examples/tiny-guest/Cargo.lock",
        "protocol/src",
        "guest-driver/src",
    ] {
        println!("cargo:rerun-if-changed={watched}");
    }

    ensure_target_installed();

    let cargo = env::var("CARGO").unwrap_or_else(|_| "cargo".to_string());
    let target_dir = out_dir.join("tiny-guest");
    let mut cmd = Command::new(cargo);
    cmd.current_dir(&guest_dir)
        .args(["build", "--release", "--locked", "--target", GUEST_TARGET, "--target-dir"])
        .arg(&target_dir);
    // Flags meant for the host build (or for clippy) must not leak into the guest's.
    for var in [
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "CARGO_BUILD_RUSTFLAGS",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "CLIPPY_ARGS",
        "CARGO_MAKEFLAGS",
        "CARGO_PRIMARY_PACKAGE",
    ] {
        cmd.env_remove(var);
    }
    let status = cmd.status().unwrap_or_else(|e| panic!("cannot run cargo to build the tiny guest: {e}"));
    if !status.success() {
        panic!("building the tiny guest (examples/tiny-guest) for {GUEST_TARGET} failed: {status}");
    }
    let elf = target_dir.join(GUEST_TARGET).join("release/pvkit-tiny-guest");
    assert!(elf.exists(), "the tiny guest build did not produce {}", elf.display());
    println!("cargo:rustc-env=PVKIT_TINY_GUEST_ELF={}", elf.display());
}

fn sysroot_has_target() -> bool {
    let rustc = env::var("RUSTC").unwrap_or_else(|_| "rustc".to_string());
    let Ok(out) = Command::new(rustc).args(["--print", "sysroot"]).output() else {
        return false;
    };
    let sysroot = String::from_utf8_lossy(&out.stdout).trim().to_string();
    Path::new(&sysroot).join("lib/rustlib").join(GUEST_TARGET).exists()
}

fn ensure_target_installed() {
    if sysroot_has_target() {
        return;
    }
    println!("cargo:warning=installing the Rust target {GUEST_TARGET} (needed to build the tiny guest) with rustup");
    let mut cmd = Command::new("rustup");
    cmd.args(["target", "add", GUEST_TARGET]);
    if let Ok(toolchain) = env::var("RUSTUP_TOOLCHAIN") {
        cmd.args(["--toolchain", &toolchain]);
    }
    match cmd.status() {
        Ok(status) if status.success() => {}
        Ok(status) => panic!("`rustup target add {GUEST_TARGET}` failed ({status}); install it by hand"),
        Err(e) => panic!(
            "the Rust target {GUEST_TARGET} is missing and rustup cannot be run ({e}); install the target by hand"
        ),
    }
}
