//! pvkit's tiny guest: a freestanding x86-64 kernel that finds virtio devices (virtio-mmio from
//! its command line or the microvm slots, virtio-pci on bus 0), drives them with
//! `pvkit-guest-driver`, runs a self-test, prints one `PVKIT-RESULT {json}` line on COM1 and
//! exits through the debug-exit port with 0 when every check passed.
//!
//! Completion mode (`pvkit.completion=poll|irq`, polling when not given): polling keeps
//! interrupts off (the only mode on a PVM-based KVM); irq takes them through the IDT, the local
//! APIC and the IOAPIC (virtio-mmio) or MSI-X (virtio-pci).

#![no_std]
#![no_main]

mod ballast;
mod bench;
mod boot;
mod discover;
mod hal;
mod irq;
mod selftest;
mod serial;
mod soak;
mod start_info;

use core::panic::PanicInfo;
use pvkit_protocol::abi::{self, CompletionMode};

/// Called by both entry points with the PVH start-info address.
#[unsafe(no_mangle)]
extern "C" fn tiny_main(start_info: u64) -> ! {
    serial::init();
    let cmdline = start_info::cmdline(start_info);
    println!("PVKIT-GUEST tiny-guest {} cmdline: {cmdline}", env!("CARGO_PKG_VERSION"));
    let mode = abi::param(cmdline, abi::key::COMPLETION)
        .and_then(|v| CompletionMode::parse(v).ok())
        .unwrap_or(CompletionMode::Poll);
    if mode == CompletionMode::Interrupt {
        irq::init();
    }
    let mut devices = discover::find(cmdline);
    let garbage = (abi::param(cmdline, abi::key::MODE) == Some("garbage")).then(|| selftest::garbage(&mut devices));
    println!("tiny-guest: {} virtio device(s) found", devices.len());
    let (mut result, drivers) = selftest::run(cmdline, mode, devices);
    if let Some(needs_reset) = garbage {
        result.set_external("garbage_needs_reset", needs_reset);
    }
    let mut drivers = drivers;
    if abi::param(cmdline, abi::key::MODE) == Some("restart")
        && let Some(blk) = drivers.blk.as_mut()
    {
        result.set_external("blk_after_restart", selftest::blk_after_restart(blk));
    }
    if abi::param(cmdline, abi::key::MODE) == Some("resize")
        && let Some(console) = drivers.console.as_mut()
    {
        selftest::console_resize(console, &mut result);
    }
    if abi::param(cmdline, abi::key::MODE) == Some("doorbell")
        && let Some(blk) = drivers.blk.as_mut()
    {
        bench::doorbells(blk, cmdline);
    }
    if abi::param(cmdline, abi::key::MODE) == Some("soak") {
        soak::run(&mut drivers, cmdline, &mut result, start_info::ram_top(start_info));
    }
    if abi::param(cmdline, abi::key::MODE) == Some("bench") {
        bench::run(drivers, cmdline);
    }
    if mode == CompletionMode::Interrupt {
        irq::stop_timer();
    }
    result.print();
    serial::exit(if result.passed() { abi::EXIT_PASS } else { abi::EXIT_FAIL })
}

#[panic_handler]
fn panic(info: &PanicInfo) -> ! {
    println!("tiny-guest: panic: {info}");
    serial::exit(abi::EXIT_PANIC)
}
