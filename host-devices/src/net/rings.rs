//! Moving frames between the guest's virtqueues and the backend: reading a transmit chain
//! (virtio-net header plus frame) and writing a frame into one or more receive chains
//! (VIRTIO_NET_F_MRG_RXBUF). Chains are walked and used entries published by the queue core
//! ([`crate::queue`]); a frame spread over several receive chains becomes visible at once
//! because a [`UsedBatch`] stores the used index once.

use super::stats::DropReason;
use crate::queue::chain::{read_stream, write_guest};
use crate::queue::ring::Popper;
use crate::queue::split_ring::SplitRing;
use crate::queue::{ChainBuffers, ChainError, QueueServices, UsedBatch};
use pvkit_protocol::net::{ETH_HEADER_LEN, GsoType, MAX_GSO_FRAME, NetHeaderRepr};
use virtio_queue::{DescriptorChain, Queue};
use vm_memory::{Address, GuestMemoryBackend};

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

/// Bytes one transmit chain may hold: the header and the largest GSO frame.
pub fn tx_cap(format: &FrameFormat) -> u64 {
    (format.header_len + MAX_GSO_FRAME) as u64
}

/// Reads a transmit chain, walking it into `buffers` (reused from frame to frame). With
/// `copy`, the frame (without header) is copied into it; without, only the header is read (the
/// sink needs no more). Every refusal is a [`Refused`], never a panic: lengths, flags and
/// offsets all come from the guest.
pub fn read_tx_chain<M: GuestMemoryBackend>(
    chain: DescriptorChain<&M>,
    mem: &M,
    format: &FrameFormat,
    buffers: &mut ChainBuffers,
    copy: Option<&mut Vec<u8>>,
) -> Result<TxFrame, Refused> {
    let walked = buffers.refill(chain, tx_cap(format));
    read_tx_buffers(walked, mem, format, buffers, copy)
}

/// Reads a transmit chain already walked into `buffers` (`walked`: how the walk went), as
/// [`read_tx_chain`] does.
pub fn read_tx_buffers<M: GuestMemoryBackend>(
    walked: Result<(), ChainError>,
    mem: &M,
    format: &FrameFormat,
    buffers: &ChainBuffers,
    copy: Option<&mut Vec<u8>>,
) -> Result<TxFrame, Refused> {
    let header_len = format.header_len;
    walked.map_err(|e| match e {
        ChainError::TooLong { .. } => {
            Refused::new(DropReason::TooLong, format!("a transmit chain exceeds the {MAX_GSO_FRAME}-byte frame limit"))
        }
        other => Refused::new(DropReason::ShortChain, format!("transmit chain: {other}")),
    })?;
    buffers.check_readable_only().map_err(|e| Refused::new(DropReason::ShortChain, format!("transmit chain: {e}")))?;
    let total = buffers.readable_len();
    if total < header_len as u64 {
        return Err(Refused::new(
            DropReason::ShortChain,
            format!("a {total}-byte transmit chain cannot hold the {header_len}-byte virtio-net header"),
        ));
    }
    let frame_len = (total - header_len as u64) as usize;
    let mut header_bytes = [0u8; pvkit_protocol::net::HEADER_SIZE];
    let unreadable = |e: ChainError| Refused::new(DropReason::ShortChain, format!("transmit buffer: {e}"));
    read_stream(mem, &buffers.readable, &mut header_bytes[..header_len]).map_err(unreadable)?;
    if let Some(out) = copy {
        out.clear();
        buffers.read_after(mem, header_len as u64, out).map_err(unreadable)?;
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

/// Most bytes one receive chain may offer.
const MAX_RX_CHAIN: u64 = 1 << 32;

/// Writes `header` and `frame` into the receive queue `vq` (read through `ring`): one chain,
/// or with `format.mergeable` as many as it takes (`num_buffers` says how many), taken from
/// what the popper's last read of the available index announced. The chains' used entries
/// are added to `used`, to be published with the batch; every byte written is reported to
/// `services`. `scratch` keeps the walked chains from frame to frame. A broken ring offers no
/// buffers (`popper` keeps the error).
pub fn write_rx_frame(
    (vq, ring, popper): (&mut Queue, &SplitRing<'_>, &mut Popper),
    format: &FrameFormat,
    frame: (&NetHeaderRepr, &[u8]),
    used: &mut UsedBatch,
    services: &dyn QueueServices,
    scratch: &mut Vec<ChainBuffers>,
) -> RxOutcome {
    let (header, frame) = frame;
    let mem = ring.memory();
    let total = format.header_len + frame.len();
    // First find buffers enough, without writing, so that `num_buffers` is known up front.
    let (mut taken, mut capacity) = (0usize, 0usize);
    while capacity < total {
        if !format.mergeable && taken > 0 {
            break;
        }
        let Some(head) = popper.next_head(vq, ring) else { break };
        if scratch.len() == taken {
            scratch.push(ChainBuffers::default());
        }
        let buffers = &mut scratch[taken];
        let walked = ring.walk(head, MAX_RX_CHAIN, buffers);
        if walked.is_err() || !buffers.readable.is_empty() || buffers.misordered || buffers.writable_len() == 0 {
            // Unusable for any frame: every chain taken for this frame goes back empty (none
            // is left out of the ring) and the frame is dropped.
            for taken in &scratch[..taken] {
                used.push(taken.head, 0);
            }
            used.push(head, 0);
            return RxOutcome::Refused(Refused::new(
                DropReason::RxChainTooSmall,
                format!("receive chain {head} has no usable device-writable buffer"),
            ));
        }
        capacity = capacity.saturating_add(buffers.writable_len().min(usize::MAX as u64) as usize);
        taken += 1;
    }
    if capacity < total {
        popper.put_back(vq, taken as u16);
        if !format.mergeable && taken > 0 {
            return RxOutcome::Refused(Refused::new(
                DropReason::RxChainTooSmall,
                format!("a {total}-byte frame does not fit a {capacity}-byte receive chain (no MRG_RXBUF)"),
            ));
        }
        return RxOutcome::NoBuffers;
    }
    let chains = &scratch[..taken];
    let mut header_bytes = [0u8; pvkit_protocol::net::HEADER_SIZE];
    let header = NetHeaderRepr { num_buffers: chains.len() as u16, ..*header };
    // header_len is 10 or 12, both within HEADER_SIZE.
    let _ = header.emit(&mut header_bytes, format.header_len);
    let header_part = &header_bytes[..format.header_len];
    let mut pos = 0usize;
    for buffers in chains {
        let mut written_here = 0u32;
        for seg in &buffers.writable {
            if pos == total {
                break;
            }
            let take = (seg.len.min(u64::from(u32::MAX)) as usize).min(total - pos);
            let mut at = seg.addr;
            // The stream is header then frame; a buffer may take from both.
            let pieces = [
                header_part.get(pos.min(header_part.len())..(pos + take).min(header_part.len())).unwrap_or(&[]),
                frame
                    .get(pos.saturating_sub(header_part.len())..(pos + take).saturating_sub(header_part.len()))
                    .unwrap_or(&[]),
            ];
            for piece in pieces.into_iter().filter(|p| !p.is_empty()) {
                if write_guest(mem, at, piece).is_ok() {
                    services.guest_written(at, piece.len() as u64);
                } else {
                    // Outside guest memory: the driver gave a bad address. The chain still
                    // goes back; the frame arrives damaged and the guest's own checks see it.
                    log::warn!("vhost-user-net: receive buffer {:#x}+{} lies outside guest memory", at.0, piece.len());
                }
                at = at.unchecked_add(piece.len() as u64);
            }
            written_here += take as u32;
            pos += take;
        }
        used.push(buffers.head, written_here);
    }
    RxOutcome::Delivered(chains.len() as u16)
}
