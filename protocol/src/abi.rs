//! pvkit's paravirtual ABI between the VMM and its guests: where virtio-mmio devices live and
//! how they are announced, the per-queue doorbell ports, the debug-exit port, and the
//! command-line keys that carry all of it.
//!
//! The device layout is QEMU microvm's (512-byte slots from 0xfeb00000, IRQ 5 + slot as with
//! `-M microvm,acpi=off`), so one guest image runs under both pvkit and QEMU.

use core::fmt;

/// Guest-physical address of virtio-mmio slot 0.
pub const MMIO_BASE: u64 = 0xfeb0_0000;
/// Size of one slot.
pub const MMIO_SLOT_SIZE: u64 = 0x200;
/// Slots QEMU microvm provides with ACPI on (interrupts on a second IOAPIC, GSI 24 + slot).
pub const MICROVM_SLOTS_ACPI: u32 = 24;
/// Slots QEMU microvm provides with `acpi=off` (IRQ 5 + slot), and the slots pvkit's VMM uses.
pub const MMIO_SLOTS: u32 = 8;
/// IRQ of slot 0 on the first IOAPIC.
pub const MMIO_IRQ_BASE: u32 = 5;

/// Guest-physical base of `slot`, if it is one of the [`MICROVM_SLOTS_ACPI`] slots.
pub const fn slot_base(slot: u32) -> Option<u64> {
    if slot < MICROVM_SLOTS_ACPI { Some(MMIO_BASE + slot as u64 * MMIO_SLOT_SIZE) } else { None }
}

/// The slot whose window holds `addr`, and the offset within it.
pub const fn slot_of(addr: u64) -> Option<(u32, u64)> {
    if addr < MMIO_BASE {
        return None;
    }
    let slot = (addr - MMIO_BASE) / MMIO_SLOT_SIZE;
    if slot < MICROVM_SLOTS_ACPI as u64 { Some((slot as u32, (addr - MMIO_BASE) % MMIO_SLOT_SIZE)) } else { None }
}

/// IRQ (IOAPIC pin) of `slot` in pvkit's layout and microvm's `acpi=off` layout.
pub const fn slot_irq(slot: u32) -> u32 {
    MMIO_IRQ_BASE + slot
}

/// Errors from parsing the ABI's command-line entries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AbiError {
    /// A number that does not parse (or overflows).
    #[error("'{0}' is not a number")]
    BadNumber(&'static str),
    /// An entry that does not follow `<size>@<base>:<irq>[:<id>]`.
    #[error("virtio_mmio.device entry is not <size>@<base>:<irq>[:<id>]")]
    BadMmioEntry,
    /// A size of zero or one whose window wraps the address space.
    #[error("virtio_mmio.device window of {size:#x} bytes at {base:#x} is empty or overflows")]
    BadMmioWindow {
        /// Window base.
        base: u64,
        /// Window size.
        size: u64,
    },
    /// A completion mode other than `poll` or `irq`.
    #[error("pvkit.completion must be 'poll' or 'irq'")]
    BadCompletionMode,
    /// A doorbell base that leaves no room for the slots' ports.
    #[error("pvkit.doorbells base {0:#x} leaves no room for the doorbell ports")]
    BadDoorbellBase(u64),
}

/// Parses a number the way Linux's `memparse` does: decimal, `0x` hex or `0` octal, with an
/// optional K/M/G suffix.
pub fn parse_number(text: &str) -> Result<u64, AbiError> {
    let (digits, shift) = match text.as_bytes().last() {
        Some(b'k' | b'K') => (&text[..text.len() - 1], 10),
        Some(b'm' | b'M') => (&text[..text.len() - 1], 20),
        Some(b'g' | b'G') => (&text[..text.len() - 1], 30),
        _ => (text, 0),
    };
    let value = if let Some(hex) = digits.strip_prefix("0x").or_else(|| digits.strip_prefix("0X")) {
        u64::from_str_radix(hex, 16)
    } else if digits.len() > 1 && digits.starts_with('0') {
        u64::from_str_radix(&digits[1..], 8)
    } else {
        digits.parse::<u64>()
    }
    .map_err(|_| AbiError::BadNumber("number"))?;
    value.checked_mul(1u64 << shift).ok_or(AbiError::BadNumber("number"))
}

/// One `virtio_mmio.device=<size>@<base>:<irq>[:<id>]` entry (Linux's syntax, which QEMU
/// microvm with `acpi=off` also uses).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MmioDeviceEntry {
    /// Window size in bytes.
    pub size: u64,
    /// Guest-physical base.
    pub base: u64,
    /// Interrupt line.
    pub irq: u32,
    /// Platform device id, when given.
    pub id: Option<u32>,
}

impl MmioDeviceEntry {
    /// The entry for pvkit's `slot`.
    pub fn for_slot(slot: u32) -> Option<MmioDeviceEntry> {
        Some(MmioDeviceEntry { size: MMIO_SLOT_SIZE, base: slot_base(slot)?, irq: slot_irq(slot), id: None })
    }

    /// Parses the value of a `virtio_mmio.device=` parameter.
    pub fn parse(value: &str) -> Result<MmioDeviceEntry, AbiError> {
        let (size, rest) = value.split_once('@').ok_or(AbiError::BadMmioEntry)?;
        let mut parts = rest.split(':');
        let base = parts.next().ok_or(AbiError::BadMmioEntry)?;
        let irq = parts.next().ok_or(AbiError::BadMmioEntry)?;
        let id = parts.next();
        if parts.next().is_some() {
            return Err(AbiError::BadMmioEntry);
        }
        let size = parse_number(size)?;
        let base = parse_number(base)?;
        let irq = u32::try_from(parse_number(irq)?).map_err(|_| AbiError::BadNumber("irq"))?;
        let id = match id {
            Some(id) => Some(u32::try_from(parse_number(id)?).map_err(|_| AbiError::BadNumber("id"))?),
            None => None,
        };
        if size == 0 || base.checked_add(size).is_none() {
            return Err(AbiError::BadMmioWindow { base, size });
        }
        Ok(MmioDeviceEntry { size, base, irq, id })
    }
}

impl fmt::Display for MmioDeviceEntry {
    /// Formats the whole parameter, `virtio_mmio.device=512@0xfeb00000:5`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}={}@{:#x}:{}", key::VIRTIO_MMIO_DEVICE, self.size, self.base, self.irq)?;
        if let Some(id) = self.id {
            write!(f, ":{id}")?;
        }
        Ok(())
    }
}

/// Default base of pvkit's doorbell ports.
pub const DOORBELL_PORT_BASE: u16 = 0x6000;
/// Doorbell ports reserved per slot: one per queue, so a device has at most this many queues
/// with doorbells.
pub const DOORBELL_QUEUES_PER_SLOT: u16 = 64;
/// Width in bytes of a doorbell write (`out dx, ax`); the value written is the queue index.
pub const DOORBELL_WIDTH: usize = 2;

/// Announcement of the per-queue doorbell ports: `pvkit.doorbells=<base>`. Absent, the guest
/// uses the transport's own notify register.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Doorbells {
    /// Port of slot 0, queue 0.
    pub base: u16,
}

impl Doorbells {
    /// Parses the value of `pvkit.doorbells=`.
    pub fn parse(value: &str) -> Result<Doorbells, AbiError> {
        let base = parse_number(value)?;
        let span = MICROVM_SLOTS_ACPI as u64 * DOORBELL_QUEUES_PER_SLOT as u64;
        if base.checked_add(span).is_none_or(|end| end > 0x1_0000) {
            return Err(AbiError::BadDoorbellBase(base));
        }
        Ok(Doorbells { base: base as u16 })
    }

    /// The port that rings `queue` of the device in `slot`, if the ABI gives it one.
    pub fn port(&self, slot: u32, queue: u16) -> Option<u16> {
        if slot >= MICROVM_SLOTS_ACPI || queue >= DOORBELL_QUEUES_PER_SLOT {
            return None;
        }
        let port = self.base as u32 + slot * DOORBELL_QUEUES_PER_SLOT as u32 + queue as u32;
        u16::try_from(port).ok()
    }

    /// Which (slot, queue) a port belongs to.
    pub fn decode(&self, port: u16) -> Option<(u32, u16)> {
        let rel = port.checked_sub(self.base)?;
        let slot = (rel / DOORBELL_QUEUES_PER_SLOT) as u32;
        (slot < MICROVM_SLOTS_ACPI).then_some((slot, rel % DOORBELL_QUEUES_PER_SLOT))
    }
}

impl fmt::Display for Doorbells {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}={:#x}", key::DOORBELLS, self.base)
    }
}

/// How the guest learns about completions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CompletionMode {
    /// Interrupts stay off; the guest polls used rings. The default, and the only mode that
    /// works on a PVM-based KVM.
    #[default]
    Poll,
    /// The guest takes device interrupts.
    Interrupt,
}

impl CompletionMode {
    /// Parses the value of `pvkit.completion=`.
    pub fn parse(value: &str) -> Result<CompletionMode, AbiError> {
        match value {
            "poll" => Ok(CompletionMode::Poll),
            "irq" => Ok(CompletionMode::Interrupt),
            _ => Err(AbiError::BadCompletionMode),
        }
    }

    /// The command-line value.
    pub const fn as_str(self) -> &'static str {
        match self {
            CompletionMode::Poll => "poll",
            CompletionMode::Interrupt => "irq",
        }
    }
}

/// The debug-exit port (QEMU's `isa-debug-exit,iobase=0xf4,iosize=4` convention).
pub const DEBUG_EXIT_PORT: u16 = 0xf4;
/// Width of the debug-exit register.
pub const DEBUG_EXIT_SIZE: u16 = 4;
/// Result code for "every check passed".
pub const EXIT_PASS: u32 = 0;
/// Result code for "some check failed".
pub const EXIT_FAIL: u32 = 1;
/// Result code for "the guest panicked".
pub const EXIT_PANIC: u32 = 2;

/// The exit status QEMU reports for a guest's debug-exit `code`: `(code << 1) | 1`.
/// pvkit's VMM passes the code itself on as its exit status.
pub const fn qemu_exit_status(code: u32) -> u32 {
    (code << 1) | 1
}

/// The result code behind a QEMU exit status, when the status came from the debug-exit port
/// (odd statuses only).
pub const fn code_from_qemu_exit_status(status: u32) -> Option<u32> {
    if status & 1 == 1 { Some(status >> 1) } else { None }
}

/// Command-line keys of the ABI.
pub mod key {
    /// A virtio-mmio device, Linux's syntax (see [`super::MmioDeviceEntry`]).
    pub const VIRTIO_MMIO_DEVICE: &str = "virtio_mmio.device";
    /// The doorbell ports' base (see [`super::Doorbells`]).
    pub const DOORBELLS: &str = "pvkit.doorbells";
    /// `poll` or `irq` (see [`super::CompletionMode`]).
    pub const COMPLETION: &str = "pvkit.completion";
    /// What the tiny guest runs: `selftest` (default), `bench`, or a test mode.
    pub const MODE: &str = "pvkit.mode";
    /// A guest test's own parameters, free-form.
    pub const ARGS: &str = "pvkit.args";
}

/// Splits a kernel command line into `(key, value)` pairs; flags without `=` have no value.
/// Tokens are separated by ASCII whitespace; double quotes group a value with spaces.
pub fn params(cmdline: &str) -> impl Iterator<Item = (&str, Option<&str>)> {
    Tokens { rest: cmdline }.map(|token| match token.split_once('=') {
        Some((k, v)) => (k, Some(v.trim_matches('"'))),
        None => (token, None),
    })
}

struct Tokens<'a> {
    rest: &'a str,
}

impl<'a> Iterator for Tokens<'a> {
    type Item = &'a str;
    fn next(&mut self) -> Option<&'a str> {
        let s = self.rest.trim_start_matches(|c: char| c.is_ascii_whitespace());
        if s.is_empty() {
            self.rest = s;
            return None;
        }
        let mut in_quotes = false;
        let mut end = s.len();
        for (i, c) in s.char_indices() {
            match c {
                '"' => in_quotes = !in_quotes,
                c if c.is_ascii_whitespace() && !in_quotes => {
                    end = i;
                    break;
                }
                _ => {}
            }
        }
        self.rest = &s[end..];
        Some(&s[..end])
    }
}

/// The first value of `key` on the command line.
pub fn param<'a>(cmdline: &'a str, key: &str) -> Option<&'a str> {
    params(cmdline).find(|(k, _)| *k == key).and_then(|(_, v)| v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::string::ToString;
    use std::vec::Vec;

    #[test]
    fn slots_follow_microvm() {
        assert_eq!(slot_base(0), Some(0xfeb0_0000));
        assert_eq!(slot_base(7), Some(0xfeb0_0e00));
        assert_eq!(slot_base(24), None);
        assert_eq!(slot_of(0xfeb0_0e70), Some((7, 0x70)));
        assert_eq!(slot_of(0xfeaf_ffff), None);
        assert_eq!(slot_of(0xfeb0_0000 + 24 * 0x200), None);
        assert_eq!(slot_irq(7), 12);
    }

    #[test]
    fn mmio_entries_parse_and_format() {
        let e = MmioDeviceEntry::parse("512@0xfeb00e00:12").unwrap();
        assert_eq!(e, MmioDeviceEntry { size: 512, base: 0xfeb0_0e00, irq: 12, id: None });
        assert_eq!(e.to_string(), "virtio_mmio.device=512@0xfeb00e00:12");
        assert_eq!(
            MmioDeviceEntry::parse("4K@0x1000:5:3").unwrap(),
            MmioDeviceEntry { size: 4096, base: 0x1000, irq: 5, id: Some(3) }
        );
        assert_eq!(MmioDeviceEntry::for_slot(1).unwrap().to_string(), "virtio_mmio.device=512@0xfeb00200:6");
        assert_eq!(MmioDeviceEntry::parse("512"), Err(AbiError::BadMmioEntry));
        assert_eq!(MmioDeviceEntry::parse("512@0x1000"), Err(AbiError::BadMmioEntry));
        assert_eq!(MmioDeviceEntry::parse("512@0x1000:5:1:2"), Err(AbiError::BadMmioEntry));
        assert!(matches!(MmioDeviceEntry::parse("x@0x1000:5"), Err(AbiError::BadNumber(_))));
        assert!(matches!(MmioDeviceEntry::parse("512@0x1000:99999999999"), Err(AbiError::BadNumber(_))));
        assert_eq!(MmioDeviceEntry::parse("0@0x1000:5"), Err(AbiError::BadMmioWindow { base: 0x1000, size: 0 }));
        assert!(matches!(MmioDeviceEntry::parse("16@0xffffffffffffffff:5"), Err(AbiError::BadMmioWindow { .. })));
    }

    #[test]
    fn numbers_like_memparse() {
        assert_eq!(parse_number("512"), Ok(512));
        assert_eq!(parse_number("0x200"), Ok(512));
        assert_eq!(parse_number("0777"), Ok(511));
        assert_eq!(parse_number("2M"), Ok(2 << 20));
        assert_eq!(parse_number("1g"), Ok(1 << 30));
        assert!(parse_number("").is_err());
        assert!(parse_number("K").is_err());
        assert!(parse_number("0x").is_err());
        assert!(parse_number("99999999999999999999").is_err());
        assert!(parse_number("17179869184G").is_err());
    }

    #[test]
    fn doorbells() {
        let d = Doorbells::parse("0x6000").unwrap();
        assert_eq!(d.port(0, 0), Some(0x6000));
        assert_eq!(d.port(2, 3), Some(0x6083));
        assert_eq!(d.port(2, 64), None);
        assert_eq!(d.port(24, 0), None);
        assert_eq!(d.decode(0x6083), Some((2, 3)));
        assert_eq!(d.decode(0x5fff), None);
        assert_eq!(d.decode(0x6000 + 24 * 64), None);
        assert_eq!(d.to_string(), "pvkit.doorbells=0x6000");
        assert_eq!(Doorbells::parse("0xfc00"), Err(AbiError::BadDoorbellBase(0xfc00)));
        assert!(Doorbells::parse("nope").is_err());
    }

    #[test]
    fn debug_exit_codes() {
        assert_eq!(qemu_exit_status(EXIT_PASS), 1);
        assert_eq!(qemu_exit_status(EXIT_FAIL), 3);
        assert_eq!(code_from_qemu_exit_status(3), Some(1));
        assert_eq!(code_from_qemu_exit_status(0), None);
    }

    #[test]
    fn command_line_params() {
        let cmdline = "console=ttyS0  virtio_mmio.device=512@0xfeb00000:5 quiet pvkit.args=\"a b\" \
                       virtio_mmio.device=512@0xfeb00200:6 pvkit.completion=irq";
        let all: Vec<_> = params(cmdline).collect();
        assert_eq!(all.len(), 6);
        assert_eq!(all[2], ("quiet", None));
        assert_eq!(all[3], ("pvkit.args", Some("a b")));
        let devices: Vec<_> = params(cmdline)
            .filter(|(k, _)| *k == key::VIRTIO_MMIO_DEVICE)
            .map(|(_, v)| MmioDeviceEntry::parse(v.unwrap()).unwrap().base)
            .collect();
        assert_eq!(devices, [0xfeb0_0000, 0xfeb0_0200]);
        assert_eq!(param(cmdline, key::COMPLETION).map(CompletionMode::parse), Some(Ok(CompletionMode::Interrupt)));
        assert_eq!(param(cmdline, key::DOORBELLS), None);
        assert_eq!(CompletionMode::parse("sometimes"), Err(AbiError::BadCompletionMode));
        assert_eq!(params("   ").count(), 0);
    }

    proptest! {
        #[test]
        fn garbage_never_panics(text in "\\PC{0,40}") {
            let _ = MmioDeviceEntry::parse(&text);
            let _ = Doorbells::parse(&text);
            let _ = parse_number(&text);
            let _ = params(&text).count();
        }

        #[test]
        fn entries_round_trip(slot in 0u32..24, id in proptest::option::of(any::<u32>())) {
            let mut e = MmioDeviceEntry::for_slot(slot).unwrap();
            e.id = id;
            let text = e.to_string();
            let value = text.strip_prefix("virtio_mmio.device=").unwrap();
            prop_assert_eq!(MmioDeviceEntry::parse(value), Ok(e));
        }
    }
}
