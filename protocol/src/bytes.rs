//! Little-endian field access for the checked views.
//!
//! The views check their buffer's length once in `new_checked`; these helpers still never panic
//! when handed a short buffer (they read zeros and ignore writes), so a logic error elsewhere
//! cannot become a panic on guest-controlled data.

/// A buffer was shorter than the format it should hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("buffer of {actual} bytes is too short for {what} ({needed} bytes needed)")]
pub struct TruncatedError {
    /// Which format was being read or written.
    pub what: &'static str,
    /// Bytes the format needs.
    pub needed: usize,
    /// Bytes the buffer had.
    pub actual: usize,
}

/// Checks that `buf` holds at least `needed` bytes.
pub(crate) fn check_len(what: &'static str, buf: &[u8], needed: usize) -> Result<(), TruncatedError> {
    if buf.len() < needed { Err(TruncatedError { what, needed, actual: buf.len() }) } else { Ok(()) }
}

fn read<const N: usize>(buf: &[u8], offset: usize) -> [u8; N] {
    let mut out = [0u8; N];
    if let Some(src) = offset.checked_add(N).and_then(|end| buf.get(offset..end)) {
        out.copy_from_slice(src);
    }
    out
}

fn write<const N: usize>(buf: &mut [u8], offset: usize, value: [u8; N]) {
    if let Some(dst) = offset.checked_add(N).and_then(|end| buf.get_mut(offset..end)) {
        dst.copy_from_slice(&value);
    }
}

pub(crate) fn get_u8(buf: &[u8], offset: usize) -> u8 {
    read::<1>(buf, offset)[0]
}
pub(crate) fn get_u16(buf: &[u8], offset: usize) -> u16 {
    u16::from_le_bytes(read(buf, offset))
}
pub(crate) fn get_u32(buf: &[u8], offset: usize) -> u32 {
    u32::from_le_bytes(read(buf, offset))
}
pub(crate) fn get_u64(buf: &[u8], offset: usize) -> u64 {
    u64::from_le_bytes(read(buf, offset))
}
pub(crate) fn set_u8(buf: &mut [u8], offset: usize, value: u8) {
    write(buf, offset, [value]);
}
pub(crate) fn set_u16(buf: &mut [u8], offset: usize, value: u16) {
    write(buf, offset, value.to_le_bytes());
}
pub(crate) fn set_u32(buf: &mut [u8], offset: usize, value: u32) {
    write(buf, offset, value.to_le_bytes());
}
pub(crate) fn set_u64(buf: &mut [u8], offset: usize, value: u64) {
    write(buf, offset, value.to_le_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_buffers_read_zero_and_ignore_writes() {
        let mut buf = [0xffu8; 3];
        assert_eq!(get_u32(&buf, 0), 0);
        assert_eq!(get_u16(&buf, usize::MAX), 0);
        set_u32(&mut buf, 1, 7);
        assert_eq!(buf, [0xff; 3]);
        set_u16(&mut buf, 1, 0x0102);
        assert_eq!(buf, [0xff, 0x02, 0x01]);
    }

    #[test]
    fn check_len_reports_sizes() {
        let err = check_len("thing", &[0; 3], 8).unwrap_err();
        assert_eq!(err, TruncatedError { what: "thing", needed: 8, actual: 3 });
        assert!(check_len("thing", &[0; 8], 8).is_ok());
    }
}
