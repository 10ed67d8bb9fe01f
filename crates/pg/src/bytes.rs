//! Bounds-checked readers of native-endian integers from byte slices.
//!
//! PostgreSQL writes `pg_control`, WAL page headers and data page headers as
//! raw C structs, so their integers are in the byte order of the machine that
//! wrote them. pgkeep runs on the database host, so native order is right.

/// The `u16` at `offset`, or `None` when `bytes` is too short.
pub(crate) fn u16_at(bytes: &[u8], offset: usize) -> Option<u16> {
    let end = offset.checked_add(2)?;
    let chunk = bytes.get(offset..end)?.first_chunk::<2>()?;
    Some(u16::from_ne_bytes(*chunk))
}

/// The `u32` at `offset`, or `None` when `bytes` is too short.
pub(crate) fn u32_at(bytes: &[u8], offset: usize) -> Option<u32> {
    let end = offset.checked_add(4)?;
    let chunk = bytes.get(offset..end)?.first_chunk::<4>()?;
    Some(u32::from_ne_bytes(*chunk))
}

/// The `u64` at `offset`, or `None` when `bytes` is too short.
pub(crate) fn u64_at(bytes: &[u8], offset: usize) -> Option<u64> {
    let end = offset.checked_add(8)?;
    let chunk = bytes.get(offset..end)?.first_chunk::<8>()?;
    Some(u64::from_ne_bytes(*chunk))
}

/// The value of exactly eight upper-case hex digits, as PostgreSQL's `%08X` writes them.
///
/// Lower case is refused on purpose: PostgreSQL never writes it, so a
/// lower-case WAL name is not one of its files.
pub(crate) fn upper_hex8(digits: &[u8]) -> Option<u32> {
    if digits.len() != 8 {
        return None;
    }
    digits.iter().try_fold(0u32, |acc, &b| {
        let nibble = match b {
            b'0'..=b'9' => b - b'0',
            b'A'..=b'F' => b - b'A' + 10,
            _ => return None,
        };
        Some((acc << 4) | u32::from(nibble))
    })
}

/// A decimal number without sign or leading zeros (PostgreSQL's `%u`), or `None`.
pub(crate) fn canonical_u32(digits: &str) -> Option<u32> {
    let bytes = digits.as_bytes();
    if bytes.is_empty() || !bytes.iter().all(u8::is_ascii_digit) {
        return None;
    }
    if bytes.len() > 1 && bytes.first() == Some(&b'0') {
        return None;
    }
    digits.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readers_refuse_short_input() {
        assert_eq!(u16_at(&[1], 0), None);
        assert_eq!(u32_at(&[1, 2, 3, 4], 1), None);
        assert_eq!(u64_at(&[0; 8], usize::MAX), None);
        assert_eq!(u32_at(&1234u32.to_ne_bytes(), 0), Some(1234));
    }

    #[test]
    fn upper_hex8_accepts_only_eight_upper_case_digits() {
        assert_eq!(upper_hex8(b"0000001F"), Some(0x1F));
        assert_eq!(upper_hex8(b"FFFFFFFF"), Some(u32::MAX));
        assert_eq!(upper_hex8(b"0000001f"), None);
        assert_eq!(upper_hex8(b"000001F"), None);
        assert_eq!(upper_hex8(b"+000001F"), None);
    }

    #[test]
    fn canonical_u32_refuses_signs_and_leading_zeros() {
        assert_eq!(canonical_u32("0"), Some(0));
        assert_eq!(canonical_u32("16384"), Some(16384));
        assert_eq!(canonical_u32("016384"), None);
        assert_eq!(canonical_u32("+1"), None);
        assert_eq!(canonical_u32(""), None);
        assert_eq!(canonical_u32("4294967296"), None);
    }
}
