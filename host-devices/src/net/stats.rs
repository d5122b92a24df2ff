//! Frame counters: packets and bytes each way, and drops by reason. Relaxed atomics, no lock
//! on the data path; the first drop of each reason is logged.

use log::warn;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// Why a frame was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// A transmit chain too short to hold the virtio-net header, or otherwise unreadable.
    ShortChain,
    /// A virtio-net header with undefined bits, or a checksum/GSO request that cannot be met.
    BadHeader,
    /// A frame longer than the MTU allows (or than any GSO frame can be).
    TooLong,
    /// A receive chain too small for the frame (without MRG_RXBUF), or with no writable part.
    RxChainTooSmall,
    /// Frames waiting for the guest's receive buffers overflowed.
    RxNoBuffers,
    /// An offload (GSO) the receiving guest did not negotiate.
    OffloadRefused,
    /// The tap refused the frame.
    TapWrite,
    /// A switch frame with no destination (too short for Ethernet addresses, or no other port).
    NoDestination,
    /// An attached service (fault injection) failed the frame on purpose.
    FailedByService,
    /// A frame a fault rule delays or reorders found its direction's delay line full.
    DelayLineFull,
}

impl DropReason {
    /// Every reason, in the order the summary prints them.
    pub const ALL: [DropReason; 10] = [
        DropReason::ShortChain,
        DropReason::BadHeader,
        DropReason::TooLong,
        DropReason::RxChainTooSmall,
        DropReason::RxNoBuffers,
        DropReason::OffloadRefused,
        DropReason::TapWrite,
        DropReason::NoDestination,
        DropReason::FailedByService,
        DropReason::DelayLineFull,
    ];

    /// A short name for logs and the summary.
    pub const fn name(self) -> &'static str {
        match self {
            DropReason::ShortChain => "short-chain",
            DropReason::BadHeader => "bad-header",
            DropReason::TooLong => "too-long",
            DropReason::RxChainTooSmall => "rx-chain-too-small",
            DropReason::RxNoBuffers => "rx-no-buffers",
            DropReason::OffloadRefused => "offload-refused",
            DropReason::TapWrite => "tap-write",
            DropReason::NoDestination => "no-destination",
            DropReason::FailedByService => "failed-by-service",
            DropReason::DelayLineFull => "delay-line-full",
        }
    }
}

/// Counters of one backend process (all ports, all queue pairs).
#[derive(Default)]
pub struct NetStats {
    tx_packets: AtomicU64,
    tx_bytes: AtomicU64,
    rx_packets: AtomicU64,
    rx_bytes: AtomicU64,
    drops: [AtomicU64; DropReason::ALL.len()],
    logged: [AtomicBool; DropReason::ALL.len()],
}

impl NetStats {
    /// Counts frames the guest transmitted (taken from its transmit queue and passed on).
    pub fn transmitted(&self, packets: u64, bytes: u64) {
        self.tx_packets.fetch_add(packets, Ordering::Relaxed);
        self.tx_bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    /// Counts frames delivered into the guest's receive queue.
    pub fn received(&self, packets: u64, bytes: u64) {
        self.rx_packets.fetch_add(packets, Ordering::Relaxed);
        self.rx_bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    /// Counts a dropped frame; the first of each reason is logged with `detail`.
    pub fn dropped(&self, reason: DropReason, detail: &dyn std::fmt::Display) {
        let i = reason as usize;
        self.drops[i].fetch_add(1, Ordering::Relaxed);
        if !self.logged[i].swap(true, Ordering::Relaxed) {
            warn!(
                "vhost-user-net: dropped a frame ({}): {detail} (further drops of this kind are only counted)",
                reason.name()
            );
        }
    }

    /// Frames dropped for `reason` so far.
    pub fn drops(&self, reason: DropReason) -> u64 {
        self.drops[reason as usize].load(Ordering::Relaxed)
    }

    /// (packets, bytes) the guests transmitted.
    pub fn tx(&self) -> (u64, u64) {
        (self.tx_packets.load(Ordering::Relaxed), self.tx_bytes.load(Ordering::Relaxed))
    }

    /// (packets, bytes) delivered to the guests.
    pub fn rx(&self) -> (u64, u64) {
        (self.rx_packets.load(Ordering::Relaxed), self.rx_bytes.load(Ordering::Relaxed))
    }

    /// One line: packets and bytes each way, then every non-zero drop count.
    pub fn summary(&self) -> String {
        let (txp, txb) = self.tx();
        let (rxp, rxb) = self.rx();
        let mut line = format!("tx {txp} packets {txb} bytes, rx {rxp} packets {rxb} bytes");
        let drops: Vec<String> = DropReason::ALL
            .iter()
            .filter(|r| self.drops(**r) > 0)
            .map(|r| format!("{} {}", r.name(), self.drops(*r)))
            .collect();
        if drops.is_empty() {
            line.push_str(", no drops");
        } else {
            line.push_str(&format!(", dropped: {}", drops.join(", ")));
        }
        line
    }
}
