//! Frame handling that does not depend on where frames go: completing a partial checksum
//! the guest left to the device (VIRTIO_NET_F_CSUM, `NEEDS_CSUM`) when the other side cannot
//! take it as an offload, and reading Ethernet addresses.

use pvkit_protocol::net::{NetError, NetHeaderRepr, hdr_flags};

/// The Internet checksum (RFC 1071) of `data`, folded, not yet inverted, starting from `sum`.
fn ones_complement_sum(data: &[u8], mut sum: u32) -> u32 {
    let mut chunks = data.chunks_exact(2);
    for pair in &mut chunks {
        sum += u32::from(u16::from_be_bytes([pair[0], pair[1]]));
    }
    if let [last] = chunks.remainder() {
        sum += u32::from(*last) << 8;
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum
}

/// Completes the checksum a header with `NEEDS_CSUM` describes: the ones' complement sum from
/// `csum_start` to the end of `frame`, added to the pseudo-header sum the guest already put
/// in the checksum field, is written at `csum_start + csum_offset`. Afterwards the header no
/// longer needs it (`NEEDS_CSUM` cleared, `DATA_VALID` set). A header whose checksum lies
/// outside the frame is refused (never a panic: guest-controlled offsets).
pub fn complete_checksum(header: &mut NetHeaderRepr, frame: &mut [u8]) -> Result<(), NetError> {
    if !header.needs_csum() {
        return Ok(());
    }
    header.check_frame(frame.len())?;
    let start = header.csum_start as usize;
    let field = start + header.csum_offset as usize;
    // check_frame guarantees field + 2 <= frame.len(); `get` keeps that a typed error anyway.
    let outside = NetError::ChecksumOutsideFrame {
        csum_start: header.csum_start,
        csum_offset: header.csum_offset,
        frame_len: frame.len(),
    };
    let sum = ones_complement_sum(frame.get(start..).ok_or(outside)?, 0);
    let checksum = !(sum as u16);
    frame.get_mut(field..field + 2).ok_or(outside)?.copy_from_slice(&checksum.to_be_bytes());
    header.flags = (header.flags & !hdr_flags::NEEDS_CSUM) | hdr_flags::DATA_VALID;
    Ok(())
}

/// A MAC address.
pub type Mac = [u8; 6];

/// Destination and source addresses of an Ethernet frame, if it is long enough to have them.
pub fn addresses(frame: &[u8]) -> Option<(Mac, Mac)> {
    let dst: Mac = frame.get(0..6)?.try_into().ok()?;
    let src: Mac = frame.get(6..12)?.try_into().ok()?;
    Some((dst, src))
}

/// Whether `mac` is a group (broadcast or multicast) address.
pub fn is_group(mac: &Mac) -> bool {
    mac[0] & 1 == 1
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A UDP/IPv4 frame whose UDP checksum field holds the pseudo-header sum, as Linux
    /// leaves it with CHECKSUM_PARTIAL.
    fn udp_frame(payload: &[u8]) -> (Vec<u8>, NetHeaderRepr) {
        let mut f = vec![0u8; 14 + 20 + 8 + payload.len()];
        f[12..14].copy_from_slice(&[0x08, 0x00]);
        let ip = &mut f[14..34];
        ip[0] = 0x45;
        let total = (20 + 8 + payload.len()) as u16;
        ip[2..4].copy_from_slice(&total.to_be_bytes());
        ip[8] = 64;
        ip[9] = 17;
        ip[12..16].copy_from_slice(&[10, 0, 0, 1]);
        ip[16..20].copy_from_slice(&[10, 0, 0, 2]);
        let udp_len = (8 + payload.len()) as u16;
        f[34..36].copy_from_slice(&1234u16.to_be_bytes());
        f[36..38].copy_from_slice(&5678u16.to_be_bytes());
        f[38..40].copy_from_slice(&udp_len.to_be_bytes());
        f[42..].copy_from_slice(payload);
        // Pseudo-header: src, dst, zero+protocol, UDP length.
        let mut pseudo = Vec::new();
        pseudo.extend_from_slice(&[10, 0, 0, 1, 10, 0, 0, 2, 0, 17]);
        pseudo.extend_from_slice(&udp_len.to_be_bytes());
        let partial = ones_complement_sum(&pseudo, 0) as u16;
        f[40..42].copy_from_slice(&partial.to_be_bytes());
        let header =
            NetHeaderRepr { flags: hdr_flags::NEEDS_CSUM, csum_start: 34, csum_offset: 6, ..Default::default() };
        (f, header)
    }

    /// Verifies a UDP/IPv4 checksum the way a receiver does: the sum over pseudo-header and
    /// segment, checksum included, is 0xffff.
    fn udp_checksum_ok(f: &[u8]) -> bool {
        let mut pseudo = Vec::new();
        pseudo.extend_from_slice(&f[26..34]);
        pseudo.extend_from_slice(&[0, 17]);
        pseudo.extend_from_slice(&f[38..40]);
        ones_complement_sum(&f[34..], ones_complement_sum(&pseudo, 0)) == 0xffff
    }

    #[test]
    fn completes_a_partial_udp_checksum() {
        for payload in [&b"hello, odd"[..], &b"even!!"[..], &[0xffu8; 1000][..]] {
            let (mut f, mut h) = udp_frame(payload);
            assert!(!udp_checksum_ok(&f));
            complete_checksum(&mut h, &mut f).unwrap();
            assert!(udp_checksum_ok(&f), "payload of {} bytes", payload.len());
            assert!(!h.needs_csum() && h.flags & hdr_flags::DATA_VALID != 0);
        }
    }

    #[test]
    fn refuses_checksums_outside_the_frame_without_panicking() {
        let (mut f, mut h) = udp_frame(b"x");
        h.csum_offset = 0xffff;
        assert!(matches!(complete_checksum(&mut h, &mut f), Err(NetError::ChecksumOutsideFrame { .. })));
        h.csum_start = 0xffff;
        h.csum_offset = 0xffff;
        assert!(complete_checksum(&mut h, &mut f).is_err());
        let mut short = [0u8; 3];
        let mut h = NetHeaderRepr { flags: hdr_flags::NEEDS_CSUM, csum_start: 2, csum_offset: 0, ..Default::default() };
        assert!(complete_checksum(&mut h, &mut short).is_err());
        // Without NEEDS_CSUM nothing is touched.
        let mut plain = NetHeaderRepr::default();
        let mut frame = [7u8; 20];
        complete_checksum(&mut plain, &mut frame).unwrap();
        assert_eq!(frame, [7u8; 20]);
    }

    #[test]
    fn ethernet_addresses() {
        let mut f = [0u8; 14];
        f[..6].copy_from_slice(&[0xff; 6]);
        f[6..12].copy_from_slice(&[0x52, 0x54, 0, 1, 2, 3]);
        let (dst, src) = addresses(&f).unwrap();
        assert!(is_group(&dst) && !is_group(&src));
        assert_eq!(addresses(&f[..11]), None);
    }
}
