//! Every parser of `pvkit-protocol` on arbitrary bytes: none may panic, and where the type
//! can be written back, what it writes must parse to the same value (and, for fixed layouts,
//! to the same bytes).
#![no_main]

use libfuzzer_sys::fuzz_target;
use pvkit_protocol::{abi, blk, console, net, ring};

/// Parses, emits into a buffer of the parsed length, parses again: the same value.
macro_rules! round_trip {
    ($bytes:expr, $len:expr, $parse:expr, $emit:expr) => {{
        if let Ok(first) = $parse($bytes) {
            let mut out = vec![0u8; $len];
            $emit(&first, &mut out[..]).expect("a parsed value fits the buffer it came from");
            let again = $parse(&out[..]).expect("what was emitted parses");
            assert_eq!(first, again, "round trip changed the value");
        }
    }};
}

fuzz_target!(|data: &[u8]| {
    let Some((&which, bytes)) = data.split_first() else { return };
    match which % 12 {
        0 => round_trip!(
            bytes,
            blk::REQUEST_HEADER_SIZE,
            blk::RequestHeaderRepr::parse_bytes,
            |r: &blk::RequestHeaderRepr, b: &mut [u8]| r.emit(b)
        ),
        1 => round_trip!(bytes, blk::SEGMENT_SIZE, blk::SegmentRepr::parse, |r: &blk::SegmentRepr, b: &mut [u8]| r
            .emit(b)),
        2 => round_trip!(bytes, bytes.len(), blk::ConfigRepr::parse, |r: &blk::ConfigRepr, b: &mut [u8]| r.emit(b)),
        3 => {
            for len in [net::HEADER_SIZE, net::LEGACY_HEADER_SIZE] {
                if let Ok(first) = net::NetHeaderRepr::parse_bytes(bytes, len) {
                    let mut out = vec![0u8; len];
                    first.emit(&mut out, len).expect("a parsed header fits");
                    assert_eq!(net::NetHeaderRepr::parse_bytes(&out, len).expect("emitted header parses"), first);
                    assert_eq!(&out[..], &bytes[..len], "a header is written back byte for byte");
                    let frame = bytes.len().saturating_sub(len);
                    let _ = first.check_frame(frame);
                }
            }
        }
        4 => round_trip!(bytes, bytes.len(), net::ConfigRepr::parse, |r: &net::ConfigRepr, b: &mut [u8]| r.emit(b)),
        5 => {
            let _ = net::ControlCommand::parse(bytes);
        }
        6 => round_trip!(bytes, bytes.len(), console::ConfigRepr::parse, |r: &console::ConfigRepr, b: &mut [u8]| r
            .emit(b)),
        7 => {
            round_trip!(
                bytes,
                console::CONTROL_SIZE,
                console::ControlRepr::parse,
                |r: &console::ControlRepr, b: &mut [u8]| r.emit(b)
            );
            let ports = bytes.first().map_or(1, |p| u32::from(*p));
            let _ = console::ControlRepr::parse_for(bytes, ports);
        }
        8 => round_trip!(bytes, bytes.len(), console::ResizeRepr::parse, |r: &console::ResizeRepr, b: &mut [u8]| r
            .emit(b)),
        9 => {
            if let Ok(desc) = ring::Descriptor::new_checked(bytes) {
                let _ = (desc.addr(), desc.len(), desc.flags(), desc.next());
                if let Ok(repr) = ring::DescriptorRepr::parse(&desc) {
                    let mut out = [0u8; ring::DESCRIPTOR_SIZE];
                    let mut written = ring::Descriptor::new_checked(&mut out[..]).expect("a descriptor's size");
                    repr.emit(&mut written);
                    assert_eq!(&out[..], &bytes[..ring::DESCRIPTOR_SIZE]);
                }
            }
        }
        10 => {
            round_trip!(
                bytes,
                ring::USED_ELEM_SIZE,
                ring::UsedElemRepr::parse,
                |r: &ring::UsedElemRepr, b: &mut [u8]| r.emit(b)
            );
            if let (Ok(elem), Some(size)) = (ring::UsedElemRepr::parse(bytes), bytes.get(8..12)) {
                let size = u16::from_le_bytes([size[0], size[1]]);
                let _ = elem.check(size, u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]));
            }
            if let Some(raw) = bytes.get(..4) {
                let _ = ring::check_queue_size(u32::from_le_bytes([raw[0], raw[1], raw[2], raw[3]]));
            }
        }
        _ => {
            let text = String::from_utf8_lossy(bytes);
            let _ = abi::parse_number(&text);
            let _ = abi::MmioDeviceEntry::parse(&text);
            let _ = abi::Doorbells::parse(&text);
            let _ = abi::CompletionMode::parse(&text);
            let _ = abi::param(&text, abi::key::DOORBELLS);
        }
    }
});
