//! `Lsn`: a position in the WAL, printed and parsed in PostgreSQL's `X/X` form.

use std::fmt;
use std::str::FromStr;

use crate::error::FormatError;
use crate::wal::WalSegSize;

/// A WAL position (`XLogRecPtr`, src/include/access/xlogdefs.h): a byte
/// offset into the endless stream of WAL.
///
/// Prints as PostgreSQL does (`%X/%X`: upper 32 bits, slash, lower 32 bits,
/// upper-case hex without leading zeros), e.g. `0/2000028` or `16/B374D848`.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Default)]
pub struct Lsn(pub u64);

impl Lsn {
    /// `InvalidXLogRecPtr`: PostgreSQL uses 0 for "no position".
    pub const INVALID: Lsn = Lsn(0);

    /// The LSN whose high and low halves are `xlogid` and `xrecoff`, the
    /// split form pages store (`PageXLogRecPtr` in src/include/storage/bufpage.h).
    pub fn from_parts(xlogid: u32, xrecoff: u32) -> Lsn {
        Lsn((u64::from(xlogid) << 32) | u64::from(xrecoff))
    }

    /// Number of the WAL segment holding this position (`XLByteToSeg`).
    pub fn segment_number(self, seg: WalSegSize) -> u64 {
        self.0 / seg.bytes()
    }

    /// Offset of this position inside its WAL segment (`XLogSegmentOffset`).
    pub fn segment_offset(self, seg: WalSegSize) -> u64 {
        self.0 % seg.bytes()
    }

    /// `self + n`, or `None` past the end of the 64-bit WAL space.
    pub fn checked_add(self, n: u64) -> Option<Lsn> {
        self.0.checked_add(n).map(Lsn)
    }

    /// Whether this is a real position rather than `INVALID`.
    pub fn is_valid(self) -> bool {
        self != Lsn::INVALID
    }

    /// LSN of the start of segment `segno` (`XLogSegNoOffsetToRecPtr` with offset 0).
    ///
    /// Saturates at `u64::MAX` for a segment number past the end of the WAL
    /// space; use [`Lsn::checked_from_segment`] to detect that.
    pub fn from_segment(segno: u64, seg: WalSegSize) -> Lsn {
        Lsn(segno.saturating_mul(seg.bytes()))
    }

    /// LSN of the start of segment `segno`, or `None` past the end of the WAL space.
    pub fn checked_from_segment(segno: u64, seg: WalSegSize) -> Option<Lsn> {
        segno.checked_mul(seg.bytes()).map(Lsn)
    }
}

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xFFFF_FFFF)
    }
}

impl FromStr for Lsn {
    type Err = FormatError;

    /// Parses `X/X` like `pg_lsn_in` (src/backend/utils/adt/pg_lsn.c): each
    /// half is 1 to 8 hex digits of either case, nothing else around them.
    fn from_str(s: &str) -> Result<Lsn, FormatError> {
        let invalid = || FormatError::InvalidLsn(s.to_owned());
        let (hi, lo) = s.split_once('/').ok_or_else(invalid)?;
        let half = |part: &str| -> Option<u32> {
            // from_str_radix alone would also take a leading '+'.
            let ok = (1..=8).contains(&part.len()) && part.bytes().all(|b| b.is_ascii_hexdigit());
            if ok {
                u32::from_str_radix(part, 16).ok()
            } else {
                None
            }
        };
        match (half(hi), half(lo)) {
            (Some(hi), Some(lo)) => Ok(Lsn::from_parts(hi, lo)),
            _ => Err(invalid()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn displays_like_postgresql() {
        assert_eq!(Lsn(0x0200_0028).to_string(), "0/2000028");
        assert_eq!(Lsn(0x16_B374_D848).to_string(), "16/B374D848");
        assert_eq!(Lsn::INVALID.to_string(), "0/0");
        assert_eq!(Lsn(u64::MAX).to_string(), "FFFFFFFF/FFFFFFFF");
    }

    #[test]
    fn parses_both_cases() {
        assert_eq!("0/2000028".parse(), Ok(Lsn(0x0200_0028)));
        assert_eq!("16/b374d848".parse(), Ok(Lsn(0x16_B374_D848)));
        assert_eq!("FFFFFFFF/FFFFFFFF".parse(), Ok(Lsn(u64::MAX)));
    }

    #[test]
    fn rejects_garbage() {
        for bad in [
            "",
            "/",
            "0/",
            "/0",
            "0",
            "0/0/0",
            "+1/0",
            "1/-0",
            " 0/1",
            "0/1 ",
            "123456789/0",
            "0/123456789",
            "G/0",
            "0x1/0",
            "é/0",
        ] {
            let err = bad.parse::<Lsn>().unwrap_err();
            assert_eq!(err, FormatError::InvalidLsn(bad.to_owned()), "{bad:?}");
        }
        assert!("zz/1"
            .parse::<Lsn>()
            .unwrap_err()
            .to_string()
            .starts_with("invalid LSN \"zz/1\""));
    }

    #[test]
    fn segment_arithmetic() {
        let seg = WalSegSize::DEFAULT;
        let lsn = Lsn(0x0300_0028);
        assert_eq!(lsn.segment_number(seg), 3);
        assert_eq!(lsn.segment_offset(seg), 0x28);
        assert_eq!(Lsn::from_segment(3, seg), Lsn(0x0300_0000));
        assert_eq!(Lsn::from_segment(u64::MAX, seg), Lsn(u64::MAX));
        assert_eq!(Lsn::checked_from_segment(u64::MAX, seg), None);
        assert_eq!(Lsn(5).checked_add(3), Some(Lsn(8)));
        assert_eq!(Lsn(u64::MAX).checked_add(1), None);
        assert!(!Lsn::INVALID.is_valid());
        assert!(Lsn(1).is_valid());
        assert_eq!(Lsn::from_parts(0x16, 0xB374_D848), Lsn(0x16_B374_D848));
    }
}
