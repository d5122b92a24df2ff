//! What the block backend's end-to-end tests share.

use pvkit_test_support::process::ChildGuard;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

#[allow(dead_code)] // not every test file that includes this module starts one
/// Starts `vhost-user-blk` serving `image` on `dir/blk.sock` with `extra` arguments and waits
/// until it listens; returns the process (killed on drop) and the socket path.
pub fn start_blk(dir: &Path, image: &Path, extra: &[&str]) -> (ChildGuard, PathBuf) {
    let socket = dir.join("blk.sock");
    let mut child = ChildGuard::spawn(
        "vhost-user-blk",
        Command::new(env!("CARGO_BIN_EXE_vhost-user-blk"))
            .arg("--socket-path")
            .arg(&socket)
            .arg("--blk-file")
            .arg(image)
            .args(extra),
    )
    .unwrap();
    child.wait_for_socket(&socket, Duration::from_secs(10)).unwrap();
    (child, socket)
}

#[allow(dead_code)] // not every test file that includes this module makes images
/// Runs `qemu-img` with `args` and returns what it printed; panics with that when it fails.
pub fn qemu_img(args: &[&str]) -> String {
    let out = Command::new("qemu-img").args(args).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "qemu-img {args:?}: {text}");
    text
}

#[allow(dead_code)]
/// The raw bytes of `image` in format `format`, converted by qemu-img (next to it).
pub fn as_raw(image: &Path, format: &str) -> Vec<u8> {
    let out = image.with_extension("converted.raw");
    qemu_img(&["convert", "-f", format, "-O", "raw", image.to_str().unwrap(), out.to_str().unwrap()]);
    std::fs::read(out).unwrap()
}
