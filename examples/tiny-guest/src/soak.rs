//! Soak mode (`pvkit.mode=soak`): a long, self-checking workload for snapshot, restore and
//! migration tests. Each iteration writes one generation-stamped block to one of [`SLOTS`]
//! places spread across the disk, reads back an older one and checks it holds the generation the
//! guest's own ledger says it wrote there, sends a frame (and takes back what a loopback backend
//! returns) and writes a line to the console. Every [`PROGRESS_EVERY`] iterations it prints
//! `PVKIT-SOAK n` on COM1; after `pvkit.soak_iterations=N` (100 by default) it checks every slot
//! once more and records `soak_verify`. The ledger lives in guest memory: a guest snapshotted
//! and restored (or moved) mid-soak still finds every block it wrote before.

use crate::hal::GuestHal;
use crate::println;
use crate::selftest::{Checks, Drivers};
use pvkit_guest_driver::hal::Dma;
use pvkit_protocol::abi;

/// The places blocks are written to.
const SLOTS: usize = 32;
/// Bytes of a block.
const BLOCK: usize = 4096;
/// "PVKITSOK": the start of every stamped block.
const MAGIC: u64 = 0x5056_4b49_5453_4f4b;
/// How often a progress line is printed.
const PROGRESS_EVERY: u64 = 10;
/// The command-line key with the number of iterations.
pub const ITERATIONS_KEY: &str = "pvkit.soak_iterations";
/// Iterations when the command line does not say.
const DEFAULT_ITERATIONS: u64 = 100;

/// What the block of `slot` holds when generation `generation` wrote it.
fn stamp(block: &mut [u8], slot: usize, generation: u64) {
    block[..8].copy_from_slice(&MAGIC.to_le_bytes());
    block[8..16].copy_from_slice(&generation.to_le_bytes());
    block[16..24].copy_from_slice(&(slot as u64).to_le_bytes());
    let seed = generation.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ slot as u64;
    for (i, byte) in block[24..].iter_mut().enumerate() {
        *byte = (seed >> ((i % 8) * 8)) as u8 ^ i as u8;
    }
}

/// Whether `block` is what [`stamp`] wrote for `slot` and `generation`.
fn holds(block: &[u8], slot: usize, generation: u64, scratch: &mut [u8]) -> bool {
    stamp(scratch, slot, generation);
    block == &scratch[..block.len()]
}

/// Runs the soak on the drivers the self-test left, recording its checks in `checks`; RAM ends
/// at `ram_top` (for the ballast, [`crate::ballast`]).
pub fn run(drivers: &mut Drivers, cmdline: &str, checks: &mut Checks, ram_top: u64) {
    let iterations =
        abi::param(cmdline, ITERATIONS_KEY).and_then(|v| v.parse::<u64>().ok()).unwrap_or(DEFAULT_ITERATIONS);
    let Some(blk) = drivers.blk.as_mut() else {
        println!("tiny-guest: soak needs a block device");
        checks.set_external("soak_verify", false);
        return;
    };
    let capacity = blk.info().capacity;
    // Slots start on 4 KiB boundaries, spread evenly over the disk.
    let spacing = (capacity / SLOTS as u64) & !7;
    let Some(buffers) = Dma::<GuestHal>::new(3) else {
        checks.set_external("soak_verify", false);
        return;
    };
    // SAFETY: three DMA pages of this function's own, split into three disjoint blocks.
    let (out, back, scratch) = unsafe {
        let base = buffers.vaddr().as_ptr();
        (
            core::slice::from_raw_parts_mut(base, BLOCK),
            core::slice::from_raw_parts_mut(base.add(BLOCK), BLOCK),
            core::slice::from_raw_parts_mut(base.add(2 * BLOCK), BLOCK),
        )
    };
    let ballast = crate::ballast::Ballast::new(cmdline, ram_top);
    if let Some(ballast) = &ballast {
        ballast.fill();
        println!("PVKIT-SOAK ballast pages={}", ballast.pages());
    }
    let mut ledger = [0u64; SLOTS];
    let (mut ok, mut verified, mut frames_back) = (spacing >= 8, 0u64, 0u64);
    println!("PVKIT-SOAK start iterations={iterations} slots={SLOTS} spacing={spacing}");
    for n in 1..=iterations {
        let slot = (n as usize * 7) % SLOTS;
        stamp(out, slot, n);
        ok &= blk.write_blocks(slot as u64 * spacing, out).is_ok();
        ledger[slot] = n;
        let older = (slot + SLOTS / 2) % SLOTS;
        if ledger[older] != 0 {
            let read = blk.read_blocks(older as u64 * spacing, back).is_ok();
            let good = read && holds(back, older, ledger[older], scratch);
            if !good {
                println!("tiny-guest: soak: slot {older} does not hold generation {}", ledger[older]);
            }
            ok &= good;
            verified += 1;
        }
        if let Some(net) = drivers.net.as_mut() {
            let mut frame = [0u8; 64];
            frame[..6].copy_from_slice(&[0xff; 6]);
            frame[12..14].copy_from_slice(&[0x88, 0xb5]);
            frame[14..22].copy_from_slice(&n.to_le_bytes());
            let _ = net.send(&frame);
            let mut got = [0u8; 2048];
            while let Ok(Some(_)) = net.receive(&mut got) {
                frames_back += 1;
            }
        }
        if let Some(console) = drivers.console.as_mut() {
            let _ = console.write(b"soak\n");
        }
        if let Some(ballast) = &ballast {
            ballast.touch(n);
        }
        if n % PROGRESS_EVERY == 0 {
            println!("PVKIT-SOAK {n}");
        }
    }
    let mut all = true;
    for (slot, &generation) in ledger.iter().enumerate().filter(|(_, g)| **g != 0) {
        all &= blk.read_blocks(slot as u64 * spacing, back).is_ok() && holds(back, slot, generation, scratch);
    }
    let ballast_wrong = ballast.as_ref().map_or(0, |b| b.verify(iterations));
    println!(
        "PVKIT-SOAK done iterations={iterations} verified={verified} frames_back={frames_back} ballast_wrong={ballast_wrong}"
    );
    checks.set_external("soak_verify", ok && all && ballast_wrong == 0);
}
