//! Moving frames between the guest's virtqueues and the backend: reading a transmit chain
//! (virtio-net header plus frame), writing a frame into one or more receive chains
//! (VIRTIO_NET_F_MRG_RXBUF), and publishing used entries in batches.
//!
//! Used entries are published with one store of the used index per batch, never one by one:
//! a frame spread over several receive buffers must become visible all at once, or a driver
//! that sees its first buffer (with `num_buffers` = 3) before the other two drops it.

use super::stats::DropReason;
use pvkit_protocol::net::{ETH_HEADER_LEN, GsoType, MAX_GSO_FRAME, NetHeaderRepr};
use pvkit_protocol::ring::need_event;
use std::sync::atomic::{Ordering, fence};
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemory};

/// Bytes a VLAN tag adds to a frame on top of the MTU and the Ethernet header.
pub const VLAN_TAG_LEN: usize = 4;

/// A frame refused, with why (for the drop counters) and the detail to log.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{detail}")]
pub struct Refused {
    /// The drop counter to bump.
    pub reason: DropReason,
    /// What was wrong, with the values.
    pub detail: String,
}

impl Refused {
    fn new(reason: DropReason, detail: impl Into<String>) -> Refused {
        Refused { reason, detail: detail.into() }
    }
}

/// How frames look on this connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameFormat {
    /// Length of the virtio-net header in front of each frame (12, or 10 for a legacy
    /// driver without MRG_RXBUF).
    pub header_len: usize,
    /// Whether a received frame may span several receive chains.
    pub mergeable: bool,
    /// Longest frame accepted without GSO: MTU plus Ethernet header and one VLAN tag.
    pub max_frame: usize,
}

/// A transmitted frame: its header, and its length without the header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TxFrame {
    /// The virtio-net header, checked against the frame.
    pub header: NetHeaderRepr,
    /// Frame length (without the header).
    pub frame_len: usize,
}

/// Reads a transmit chain. With `copy`, the frame (without header) is copied into it; without,
/// only the header is read (the sink needs no more). Every refusal is a [`Refused`], never a
/// panic: lengths, flags and offsets all come from the guest.
pub fn read_tx_chain<M: GuestMemory>(
    chain: DescriptorChain<&M>,
    mem: &M,
    format: &FrameFormat,
    copy: Option<&mut Vec<u8>>,
) -> Result<TxFrame, Refused> {
    let mut header_bytes = [0u8; pvkit_protocol::net::HEADER_SIZE];
    let header_len = format.header_len;
    let mut total: u64 = 0;
    let mut segments: [(u64, u32); 8] = [(0, 0); 8];
    let mut extra: Vec<(u64, u32)> = Vec::new();
    let mut count = 0usize;
    for desc in chain {
        if desc.is_write_only() {
            return Err(Refused::new(DropReason::ShortChain, "a transmit chain holds a device-writable buffer"));
        }
        total += u64::from(desc.len());
        if count < segments.len() {
            segments[count] = (desc.addr().0, desc.len());
        } else {
            extra.push((desc.addr().0, desc.len()));
        }
        count += 1;
    }
    if total < header_len as u64 {
        return Err(Refused::new(
            DropReason::ShortChain,
            format!("a {total}-byte transmit chain cannot hold the {header_len}-byte virtio-net header"),
        ));
    }
    let frame_len64 = total - header_len as u64;
    if frame_len64 > MAX_GSO_FRAME as u64 {
        return Err(Refused::new(
            DropReason::TooLong,
            format!("a {frame_len64}-byte frame exceeds the {MAX_GSO_FRAME}-byte limit"),
        ));
    }
    let frame_len = frame_len64 as usize;
    let all = segments[..count.min(segments.len())].iter().chain(extra.iter()).copied();
    // The header first (it may be split over several buffers), then the frame.
    let mut header_filled = 0usize;
    let mut out = copy;
    if let Some(buf) = out.as_deref_mut() {
        buf.clear();
        buf.reserve(frame_len);
    }
    for (addr, len) in all {
        let mut addr = addr;
        let mut len = len as usize;
        if header_filled < header_len {
            let take = (header_len - header_filled).min(len);
            mem.read_slice(&mut header_bytes[header_filled..header_filled + take], GuestAddress(addr))
                .map_err(|e| Refused::new(DropReason::ShortChain, format!("transmit buffer at {addr:#x}: {e}")))?;
            header_filled += take;
            addr += take as u64;
            len -= take;
        }
        if len == 0 {
            continue;
        }
        let Some(buf) = out.as_deref_mut() else { break };
        let start = buf.len();
        buf.resize(start + len, 0);
        mem.read_slice(&mut buf[start..], GuestAddress(addr))
            .map_err(|e| Refused::new(DropReason::ShortChain, format!("transmit buffer at {addr:#x}: {e}")))?;
    }
    let header = NetHeaderRepr::parse_bytes(&header_bytes[..header_len], header_len)
        .map_err(|e| Refused::new(DropReason::BadHeader, e.to_string()))?;
    header.check_frame(frame_len).map_err(|e| Refused::new(DropReason::BadHeader, e.to_string()))?;
    if header.gso_type == GsoType::None && frame_len > format.max_frame {
        return Err(Refused::new(
            DropReason::TooLong,
            format!("a {frame_len}-byte frame without GSO exceeds the {}-byte MTU limit", format.max_frame),
        ));
    }
    if frame_len < ETH_HEADER_LEN {
        return Err(Refused::new(
            DropReason::ShortChain,
            format!("a {frame_len}-byte frame is shorter than an Ethernet header"),
        ));
    }
    Ok(TxFrame { header, frame_len })
}

/// What became of a frame offered to the receive queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RxOutcome {
    /// Written into this many receive chains (added to the used batch).
    Delivered(u16),
    /// The ring does not hold enough buffers yet; nothing was consumed. Try again after the
    /// driver adds buffers.
    NoBuffers,
    /// The frame can never fit (see the reason); nothing was consumed.
    Refused(Refused),
}

/// Writes `header` and `frame` into the receive queue `vq`: one chain, or with
/// `format.mergeable` as many as it takes (`num_buffers` says how many). The chains' used
/// entries are added to `used`, to be published with the batch.
pub fn write_rx_frame<M: GuestMemory>(
    vq: &mut Queue,
    mem: &M,
    format: &FrameFormat,
    header: &NetHeaderRepr,
    frame: &[u8],
    used: &mut UsedBatch,
) -> RxOutcome {
    let total = format.header_len + frame.len();
    // First find buffers enough, without writing, so that `num_buffers` is known up front.
    let mut chains: Vec<(u16, Vec<(u64, u32)>)> = Vec::new();
    let mut capacity = 0usize;
    while capacity < total {
        if !format.mergeable && !chains.is_empty() {
            break;
        }
        let Some(chain) = vq.pop_descriptor_chain(mem) else { break };
        let head = chain.head_index();
        let mut writable = Vec::with_capacity(2);
        let mut bad = false;
        for desc in chain {
            if !desc.is_write_only() {
                bad = true;
                break;
            }
            writable.push((desc.addr().0, desc.len()));
        }
        let chain_capacity: usize = writable.iter().map(|(_, len)| *len as usize).sum();
        if bad || chain_capacity == 0 {
            // Unusable for any frame: hand it back empty so the driver can reuse the slot.
            used.push(head, 0);
            return RxOutcome::Refused(Refused::new(
                DropReason::RxChainTooSmall,
                format!("receive chain {head} has no device-writable buffer"),
            ));
        }
        capacity += chain_capacity;
        chains.push((head, writable));
    }
    if capacity < total {
        let popped = chains.len();
        for _ in 0..popped {
            vq.go_to_previous_position();
        }
        if !format.mergeable && popped > 0 {
            return RxOutcome::Refused(Refused::new(
                DropReason::RxChainTooSmall,
                format!("a {total}-byte frame does not fit a {capacity}-byte receive chain (no MRG_RXBUF)"),
            ));
        }
        return RxOutcome::NoBuffers;
    }
    let mut header_bytes = [0u8; pvkit_protocol::net::HEADER_SIZE];
    let header = NetHeaderRepr { num_buffers: chains.len() as u16, ..*header };
    // header_len is 10 or 12, both within HEADER_SIZE.
    let _ = header.emit(&mut header_bytes, format.header_len);
    let header_part = &header_bytes[..format.header_len];
    let mut pos = 0usize;
    for (head, writable) in &chains {
        let mut written_here = 0u32;
        for (addr, len) in writable {
            if pos == total {
                break;
            }
            let take = (*len as usize).min(total - pos);
            let mut at = *addr;
            // The stream is header then frame; a buffer may take from both.
            let pieces = [
                header_part.get(pos.min(header_part.len())..(pos + take).min(header_part.len())).unwrap_or(&[]),
                frame
                    .get(pos.saturating_sub(header_part.len())..(pos + take).saturating_sub(header_part.len()))
                    .unwrap_or(&[]),
            ];
            for piece in pieces {
                if piece.is_empty() {
                    continue;
                }
                if mem.write_slice(piece, GuestAddress(at)).is_err() {
                    // Outside guest memory: the driver gave a bad address. The chain still
                    // goes back; the frame arrives damaged and the guest's own checks see it.
                    log::warn!("vhost-user-net: receive buffer {at:#x}+{} lies outside guest memory", piece.len());
                }
                at += piece.len() as u64;
            }
            written_here += take as u32;
            pos += take;
        }
        used.push(*head, written_here);
    }
    RxOutcome::Delivered(chains.len() as u16)
}

/// Used entries waiting to be published together.
#[derive(Debug, Default)]
pub struct UsedBatch {
    entries: Vec<(u16, u32)>,
}

impl UsedBatch {
    /// Adds chain `head`, of which the device wrote `len` bytes.
    pub fn push(&mut self, head: u16, len: u32) {
        self.entries.push((head, len));
    }

    /// Number of entries waiting.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether nothing waits.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Writes the entries into the used ring, then the used index once (release order), and
    /// says whether the driver wants a notification for them (RING_EVENT_IDX's `used_event`
    /// with the wrap-safe rule, or the NO_INTERRUPT flag).
    pub fn publish<M: GuestMemory>(&mut self, vq: &mut Queue, mem: &M) -> Result<bool, vm_memory::GuestMemoryError> {
        if self.entries.is_empty() {
            return Ok(false);
        }
        let size = vq.size();
        let used_ring = vq.used_ring();
        let old = vq.next_used();
        let mut next = old;
        for (head, len) in self.entries.drain(..) {
            let slot = u64::from(next % size.max(1));
            let mut elem = [0u8; 8];
            elem[..4].copy_from_slice(&u32::from(head).to_le_bytes());
            elem[4..].copy_from_slice(&len.to_le_bytes());
            mem.write_slice(&elem, GuestAddress(used_ring + 4 + 8 * slot))?;
            next = next.wrapping_add(1);
        }
        mem.store(next.to_le(), GuestAddress(used_ring + 2), Ordering::Release)?;
        vq.set_next_used(next);
        // The index must be visible before the driver's wish is read (pairs with the
        // driver's barrier between writing used_event and reading the used index).
        fence(Ordering::SeqCst);
        let avail_ring = vq.avail_ring();
        if vq.event_idx_enabled() {
            let used_event: u16 =
                u16::from_le(mem.load(GuestAddress(avail_ring + 4 + 2 * u64::from(size)), Ordering::Acquire)?);
            Ok(need_event(used_event, next, old))
        } else {
            let flags: u16 = u16::from_le(mem.load(GuestAddress(avail_ring), Ordering::Acquire)?);
            Ok(flags & 1 == 0)
        }
    }
}
