//! The VMM's virtio-mmio transport state machine driven by a sequence of register reads and
//! writes of every width and offset. None may panic; a violation must leave the device in
//! DEVICE_NEEDS_RESET; and whatever the sequence, a ready queue has a size the device accepts
//! and rings inside guest memory, and an activation negotiates only offered features.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pvkit_fuzz::Input;
use pvkit_protocol::virtio::status;
use pvkit_vmm_glue::mmio::{Effect, MmioTransportState};

const RAM: u64 = 1 << 20;
const MAX_SIZES: [u16; 3] = [256, 64, 16];

/// Checks a ready queue the way the specification asks, independently of the transport.
fn check_ready_queue(index: usize, size: u16, max: u16, rings: [(u64, u64, u64); 3]) {
    assert!(size != 0 && size.is_power_of_two() && size <= max, "queue {index}: ready with size {size} (max {max})");
    for (addr, align, len) in rings {
        assert!(addr.is_multiple_of(align), "queue {index}: ring at {addr:#x} not {align}-aligned");
        assert!(
            addr.checked_add(len).is_some_and(|end| end <= RAM),
            "queue {index}: ring at {addr:#x}+{len} outside RAM"
        );
    }
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    let offered = input.u64();
    let mut state = MmioTransportState::new(2, offered, &MAX_SIZES, RAM);
    for _ in 0..256 {
        let op = input.byte();
        if op == 0 && input.rest_len() == 0 {
            break;
        }
        let raw_offset = input.u16();
        // Mostly inside the register window, sometimes anywhere.
        let offset = if op & 0x80 == 0 { u64::from(raw_offset % 0x200) } else { u64::from(raw_offset) << 4 };
        let width = [1usize, 2, 4, 8, 3, 0][usize::from(op >> 1 & 7) % 6];
        let value = input.u64().to_le_bytes();
        let effect = if op & 1 == 0 {
            let mut buf = vec![0u8; width];
            state.read(offset, &mut buf)
        } else {
            state.write(offset, &value[..width.min(8)])
        };
        match effect {
            Effect::Broken(_) => {
                assert!(state.status() & status::DEVICE_NEEDS_RESET != 0, "broken without DEVICE_NEEDS_RESET")
            }
            Effect::Activate => {
                assert!(state.status() & status::DRIVER_OK != 0, "activated without DRIVER_OK");
                let unoffered = state.negotiated_features() & !offered;
                assert_eq!(unoffered, 0, "activation negotiated features {unoffered:#x} the device never offered");
            }
            _ => {}
        }
        for (index, q) in state.queues().iter().enumerate() {
            if q.ready {
                let size = u64::from(q.size);
                let rings = [(q.desc, 16, 16 * size), (q.avail, 2, 6 + 2 * size), (q.used, 4, 6 + 8 * size)];
                check_ready_queue(index, q.size, q.max_size, rings);
            }
        }
    }
});
