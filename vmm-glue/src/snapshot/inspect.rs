//! `pvkit snapshot inspect DIR`: what a snapshot holds, read without restoring it: where it
//! was taken, guest memory's size and non-zero pages, each vCPU's registers, each device's
//! transport state and, per started queue, its ring indexes and the descriptor chains in
//! flight: those the driver offered that were not used yet, taken by the backend or not (read
//! from the saved memory; a receive queue's empty buffers are among them).

use super::{DeviceSnapshot, MEMORY_FILE, Manifest, Snapshot, SnapshotError, VcpuState};
use crate::mmio::QueueConfig;
use pvkit_protocol::ring::{DESCRIPTOR_SIZE, Descriptor, DescriptorRepr};
use std::fmt::Write;
use std::fs::File;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;

/// Descriptors listed per chain at most (a longer or looping chain is cut there).
const CHAIN_LIMIT: usize = 16;
/// Chains listed per queue at most.
const CHAINS_LISTED: u16 = 8;

/// The report on the snapshot in `dir`.
pub fn report(dir: &Path) -> Result<String, SnapshotError> {
    let snapshot = Snapshot::read(dir)?;
    let memory_path = dir.join(MEMORY_FILE);
    let memory = File::open(&memory_path).map_err(|source| SnapshotError::Io {
        what: "opening",
        path: memory_path.display().to_string(),
        source,
    })?;
    let on_disk = memory.metadata().map(|m| m.blocks() * 512).unwrap_or(0);
    let mut out = String::new();
    header(&mut out, &snapshot.manifest, on_disk);
    for vcpu in &snapshot.machine.vcpus {
        vcpu_lines(&mut out, vcpu);
    }
    for device in &snapshot.manifest.devices {
        device_lines(&mut out, device, &memory);
    }
    Ok(out)
}

fn header(out: &mut String, m: &Manifest, on_disk: u64) {
    let o = &m.origin;
    let _ = writeln!(out, "pvkit snapshot, format {}", m.format);
    let _ = writeln!(
        out,
        "taken by pvkit {} on {} ({}) at {} (unix time)",
        o.pvkit_version, o.cpu_vendor, o.kvm_flavour, m.taken_unix
    );
    let _ = writeln!(
        out,
        "memory: {} MiB, {} non-zero pages ({:.1} MiB); {MEMORY_FILE} takes {:.1} MiB on disk",
        m.memory.size >> 20,
        m.memory.nonzero_pages,
        (m.memory.nonzero_pages * 4096) as f64 / (1u64 << 20) as f64,
        on_disk as f64 / (1u64 << 20) as f64
    );
    let _ = writeln!(
        out,
        "vCPUs: {}, TSC {} kHz, doorbell ports {}",
        m.vcpus,
        m.tsc_khz,
        if m.doorbells { "on" } else { "off" }
    );
    let _ = writeln!(out, "command line: {}", m.cmdline);
}

fn vcpu_lines(out: &mut String, v: &VcpuState) {
    let r = &v.regs;
    let s = &v.sregs;
    let mp = match v.mp_state.mp_state {
        0 => "runnable",
        1 => "uninitialized",
        2 => "waiting for INIT/SIPI",
        3 => "halted",
        4 => "SIPI received",
        _ => "other",
    };
    let _ = writeln!(out, "vCPU {}: {mp}", v.id);
    let _ = writeln!(out, "  rip {:#018x}  rsp {:#018x}  rflags {:#x}", r.rip, r.rsp, r.rflags);
    let general = [
        ("rax", r.rax),
        ("rbx", r.rbx),
        ("rcx", r.rcx),
        ("rdx", r.rdx),
        ("rsi", r.rsi),
        ("rdi", r.rdi),
        ("rbp", r.rbp),
        ("r8", r.r8),
        ("r9", r.r9),
        ("r10", r.r10),
        ("r11", r.r11),
        ("r12", r.r12),
        ("r13", r.r13),
        ("r14", r.r14),
        ("r15", r.r15),
    ];
    for row in general.chunks(4) {
        let line: Vec<String> = row.iter().map(|(name, value)| format!("{name:>3} {value:#018x}")).collect();
        let _ = writeln!(out, "  {}", line.join("  "));
    }
    let _ = writeln!(
        out,
        "  cr0 {:#x}  cr3 {:#x}  cr4 {:#x}  efer {:#x}  cs {:#x}  apic base {:#x}",
        s.cr0, s.cr3, s.cr4, s.efer, s.cs.selector, s.apic_base
    );
    let tsc = v.msrs.iter().find(|m| m.index == 0x10).map_or_else(|| "not saved".to_string(), |m| m.data.to_string());
    let _ = writeln!(out, "  {} MSRs saved (TSC {tsc}), {} CPUID entries", v.msrs.len(), v.cpuid.len());
}

fn device_lines(out: &mut String, d: &DeviceSnapshot, memory: &File) {
    let t = &d.transport;
    let _ =
        writeln!(out, "device {} (slot {}, virtio id {}): backend {}", d.name, d.slot, d.virtio_id, d.socket.display());
    let _ = writeln!(
        out,
        "  status {:#x}, device features {:#x}, driver features {:#x}, config generation {}, interrupt status {:#x}",
        t.status(),
        t.device_features(),
        t.driver_features(),
        t.config_generation(),
        t.interrupt_status()
    );
    for (index, (q, rings)) in t.queues().iter().zip(&d.rings).enumerate() {
        if !q.ready {
            let _ = writeln!(out, "  queue {index}: not started");
            continue;
        }
        let waiting = rings.avail.wrapping_sub(rings.last_avail);
        let taken = rings.last_avail.wrapping_sub(rings.used);
        let _ = writeln!(
            out,
            "  queue {index}: size {}, desc {:#x}, avail {:#x}, used {:#x}; avail idx {}, backend's next {}, used idx {}: {taken} taken and not used, {waiting} not taken",
            q.size, q.desc, q.avail, q.used, rings.avail, rings.last_avail, rings.used
        );
        let offered = rings.avail.wrapping_sub(rings.used).min(q.size);
        for n in 0..offered.min(CHAINS_LISTED) {
            let slot = rings.used.wrapping_add(n) % q.size;
            match read_u16(memory, q.avail + 4 + 2 * u64::from(slot)) {
                Some(head) => {
                    let _ = writeln!(out, "    in flight: head {head}: {}", chain(memory, q, head));
                }
                None => {
                    let _ = writeln!(out, "    in flight: avail entry {slot} is outside the memory file");
                }
            }
        }
        if offered > CHAINS_LISTED {
            let _ = writeln!(out, "    ... and {} more in flight", offered - CHAINS_LISTED);
        }
    }
}

fn read_u16(memory: &File, at: u64) -> Option<u16> {
    let mut raw = [0u8; 2];
    memory.read_exact_at(&mut raw, at).ok()?;
    Some(u16::from_le_bytes(raw))
}

/// The chain at `head` as `[addr+len r|w] ...`, cut at [`CHAIN_LIMIT`] descriptors.
fn chain(memory: &File, q: &QueueConfig, head: u16) -> String {
    let mut parts = Vec::new();
    let mut index = head;
    for _ in 0..CHAIN_LIMIT {
        if index >= q.size {
            parts.push(format!("<index {index} outside the table>"));
            break;
        }
        let mut raw = [0u8; DESCRIPTOR_SIZE];
        let at = q.desc + u64::from(index) * DESCRIPTOR_SIZE as u64;
        let parsed = memory
            .read_exact_at(&mut raw, at)
            .ok()
            .and_then(|()| Descriptor::new_checked(&raw[..]).ok())
            .and_then(|d| DescriptorRepr::parse(&d).ok());
        let Some(desc) = parsed else {
            parts.push(format!("<descriptor {index} unreadable>"));
            break;
        };
        let kind = if desc.is_indirect() {
            "indirect"
        } else if desc.is_write_only() {
            "w"
        } else {
            "r"
        };
        parts.push(format!("[{:#x}+{} {kind}]", desc.addr, desc.len));
        if !desc.has_next() {
            return parts.join(" ");
        }
        index = desc.next;
    }
    parts.join(" ")
}
