//! The port queues: guest output from a port's transmit queue to its host side, host input
//! into its receive queue, through the rate limits and fault rules, with flow control both
//! ways.

use super::device::ConsoleDevice;
use super::port::PENDING_LIMIT;
use crate::queue::services::{Verdict, Work, admit, complete, is_served, verdict_of};
use crate::queue::{ChainBuffers, ChainError, Memory, PassError, UsedBatch, ring};
use pvkit_protocol::console::queue as cq;
use std::io;
use std::time::Instant;
use vhost_user_backend::{VringRwLock, VringT};
use virtio_queue::{DescriptorChain, QueueOwnedT};
use vm_memory::{GuestAddressSpace, GuestMemoryMmap};

/// Largest piece of host input delivered into one receive buffer.
const MAX_RX_CHUNK: usize = 64 * 1024;
/// Most bytes one transmit chain may hold (Linux's driver sends at most 32 KiB a chain): its
/// descriptors may all point at the same guest memory, so the chain is not bounded by the
/// guest's memory. A longer chain is refused (counted), never copied.
const MAX_TX_CHAIN: u64 = PENDING_LIMIT as u64;
/// Most bytes one receive chain may offer (nothing is allocated for more than
/// [`MAX_RX_CHUNK`]).
pub(super) const MAX_RX_CHAIN: u64 = 1 << 32;

/// Host reads a pass drops for its services before it yields to the other queues.
const MAX_FAILED_READS_PER_PASS: usize = 64;

impl ConsoleDevice {
    /// Takes guest output from port `p`'s transmit queue while the port has room for the next
    /// chain, and passes it on to the host side. Returns how many chains were taken and
    /// whether the port is full (its queue is parked until the host side drains).
    pub(crate) fn pump_tx(&self, p: usize, vring: &VringRwLock, memory: &Memory) -> Result<(usize, bool), PassError> {
        let queue = usize::from(cq::port_tx(p as u16));
        let mut ports = self.shared.host.lock();
        let Some(port) = ports.get_mut(p) else { return Ok((0, false)) };
        let mut closed = port.flush();
        let services = self.shared.core.services();
        let (mut used, mut rewound, mut popper) = (UsedBatch::default(), false, ring::Popper::new(queue));
        let (full, taken) = {
            let mem = memory.memory();
            let mut state = vring.get_mut();
            let vq = state.get_queue_mut();
            while port.has_room() && !self.shared.throttles.is_waiting(queue) {
                let Some(chain) = popper.next(vq, &*mem) else { break };
                let head = chain.head_index();
                match transmit_buffers(chain, MAX_TX_CHAIN) {
                    // Backpressure: the chain waits in the ring until the port has room for it.
                    Ok(buffers) if !port.has_room_for(buffers.readable_len()) => {
                        vq.go_to_previous_position();
                        rewound = true;
                        break;
                    }
                    Ok(buffers) if self.over_limit(queue, buffers.readable_len())? => {
                        // Back to the ring until the port's tokens are back.
                        vq.go_to_previous_position();
                        break;
                    }
                    Ok(buffers) => {
                        let admission = admit(services, Work::new(queue, "tx", buffers.readable_len()));
                        let mut bytes = Vec::with_capacity(buffers.readable_len() as usize);
                        let taken = if !is_served(&admission) {
                            self.refused(&format_args!("port {p}: a service failed a transmit chain"));
                            false
                        } else if let Err(why) = buffers.read_all(&*mem, &mut bytes) {
                            self.refused(&format_args!("port {p}: transmit chain dropped: {why}"));
                            false
                        } else {
                            match verdict_of(&admission) {
                                Verdict::Delay(delay) => port.delay_output(bytes, Instant::now() + delay),
                                _ => port.queue_output(bytes),
                            }
                            true
                        };
                        complete(services, admission, taken);
                    }
                    Err(why) => self.refused(&format_args!("port {p}: transmit chain dropped: {why}")),
                }
                used.push(head, 0);
                closed |= port.flush();
            }
            // Full: chains wait that the port cannot take until its host side drains (which
            // wakes the worker: output writable, or a client connecting).
            let full = rewound || (!port.has_room() && ring::has_available(vq, &*mem));
            // Delayed output wakes the worker when its time comes.
            if let Some(at) = port.next_delayed() {
                self.shared.throttles.wake_at(queue, at)?;
            }
            let taken = used.len();
            used.publish_and_release(state, vring, queue, &*mem, services)?;
            (full, taken)
        };
        let (fd, want) = (port.output_fd(), !port.pending.is_empty());
        drop(ports);
        self.watch(p, 2, fd, want);
        if closed {
            self.host_side_closed(p);
        }
        popper.finish((taken, full))
    }

    /// Whether `bytes` of work on queue `queue` must wait for the rate limits (the queue's
    /// timer is then set).
    fn over_limit(&self, queue: usize, bytes: u64) -> io::Result<bool> {
        let services = self.shared.core.services();
        if !services.throttles() {
            return Ok(false);
        }
        let transmit = matches!(cq::port_of(queue as u16), Some((_, true)));
        let work = Work::new(queue, if transmit { "tx" } else { "rx" }, bytes);
        match services.throttle(std::slice::from_ref(&work), std::time::Instant::now()) {
            Some((_, wait)) => self.shared.throttles.wait(queue, wait).map(|()| true),
            None => Ok(false),
        }
    }

    /// Delivers host input for port `p` into the receive buffers the guest posted; stops
    /// watching the input while the guest has none, so input waits on the host side.
    pub(crate) fn pump_rx(&self, p: usize, vring: &VringRwLock, memory: &Memory) -> Result<usize, PassError> {
        let queue = usize::from(cq::port_rx(p as u16));
        let mut ports = self.shared.host.lock();
        let Some(port) = ports.get_mut(p) else { return Ok(0) };
        let services = self.shared.core.services();
        let (mut used, mut closed, mut has_buffers) = (UsedBatch::default(), false, false);
        let mut popper = ring::Popper::new(queue);
        let (mut failed_reads, mut starved) = (0, false);
        let returned = {
            let mem = memory.memory();
            let mut state = vring.get_mut();
            let vq = state.get_queue_mut();
            while port.input_fd().is_some() && !self.shared.throttles.is_waiting(queue) {
                let Some(chain) = popper.next(vq, &*mem) else {
                    starved = true;
                    break;
                };
                let head = chain.head_index();
                let buffers = ChainBuffers::collect(chain, MAX_RX_CHAIN).ok().filter(|b| b.writable_len() > 0);
                let Some(buffers) = buffers else {
                    self.refused(&format_args!("port {p}: receive chain without writable buffers dropped"));
                    used.push(head, 0);
                    continue;
                };
                let mut data = vec![0u8; (buffers.writable_len() as usize).min(MAX_RX_CHUNK)];
                match port.read(&mut data) {
                    Ok(Some(n)) if self.over_limit(queue, n as u64)? => {
                        // The input waits in the port, ahead of the rest, for the tokens;
                        // meanwhile the port's input is not watched.
                        port.unread(&data[..n]);
                        vq.go_to_previous_position();
                        break;
                    }
                    Ok(Some(n)) => {
                        let admission = admit(services, Work::new(queue, "rx", n as u64));
                        if !is_served(&admission) {
                            // The input is dropped; the chain waits for the next, in a later
                            // pass once enough input was dropped in this one.
                            self.refused(&format_args!("port {p}: a service failed {n} bytes of input"));
                            complete(services, admission, false);
                            vq.go_to_previous_position();
                            failed_reads += 1;
                            if failed_reads >= MAX_FAILED_READS_PER_PASS {
                                has_buffers = true;
                                break;
                            }
                            continue;
                        }
                        let written = buffers.write(&*mem, &data[..n], services);
                        used.push(head, written as u32);
                        complete(services, admission, true);
                    }
                    Ok(None) => {
                        vq.go_to_previous_position();
                        has_buffers = true;
                        break;
                    }
                    Err(_) => {
                        vq.go_to_previous_position();
                        closed = true;
                        break;
                    }
                }
            }
            let returned = used.len();
            used.publish_and_release(state, vring, queue, &*mem, services)?;
            returned
        };
        let fd = port.input_fd();
        drop(ports);
        // Out of buffers with a client connected: input may be waiting, unwatched, so buffers the
        // guest adds while the worker finishes are work (see `ConsolePass::rearm`).
        if let Some(flag) = self.shared.rx_starved.get(p) {
            flag.store(starved && fd.is_some(), std::sync::atomic::Ordering::Relaxed);
        }
        self.watch(p, 1, fd, has_buffers);
        if closed {
            self.host_side_closed(p);
        }
        popper.finish(returned)
    }
}

/// The readable buffers of a transmit chain, refused when it has writable ones or holds more
/// than `cap` bytes.
pub(super) fn transmit_buffers(chain: DescriptorChain<&GuestMemoryMmap>, cap: u64) -> Result<ChainBuffers, ChainError> {
    ChainBuffers::collect(chain, cap)?.readable_only()
}
