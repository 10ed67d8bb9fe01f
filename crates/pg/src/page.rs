//! Data pages of relation files: the page header, the page checksum and the
//! check PostgreSQL makes when it reads a page.

use crate::bytes::{u16_at, u32_at};
use crate::error::FormatError;
use crate::lsn::Lsn;

/// `SizeOfPageHeaderData`: the fixed header at the start of every page.
pub const PAGE_HEADER_SIZE: usize = 24;

/// `PageHeaderData` (src/include/storage/bufpage.h), in native endianness.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct PageHeader {
    /// `pd_lsn`: end of the WAL record that last changed the page.
    pub lsn: Lsn,
    /// `pd_checksum`, meaningful when the cluster has data checksums.
    pub checksum: u16,
    /// `pd_flags`.
    pub flags: u16,
    /// `pd_lower`: end of the line pointer array.
    pub lower: u16,
    /// `pd_upper`: start of tuple data; 0 on a page never initialized.
    pub upper: u16,
    /// `pd_special`: start of the access-method-specific area.
    pub special: u16,
    /// `pd_pagesize_version`: page size in the high byte, layout version (4) in the low byte.
    pub pagesize_version: u16,
    /// `pd_prune_xid`: oldest prunable XID, or 0.
    pub prune_xid: u32,
}

/// `PD_VALID_FLAG_BITS`: the `pd_flags` bits PostgreSQL defines.
const PD_VALID_FLAG_BITS: u16 = 0x0007;
/// `MAXIMUM_ALIGNOF` on 64-bit platforms; `pd_special` is MAXALIGNed.
const MAXIMUM_ALIGNOF: u16 = 8;

impl PageHeader {
    /// Reads the first [`PAGE_HEADER_SIZE`] bytes of `page`.
    pub fn parse(page: &[u8]) -> Result<PageHeader, FormatError> {
        let too_short = || FormatError::TooShort {
            what: "page header",
            needed: PAGE_HEADER_SIZE,
            got: page.len(),
        };
        let head = page.get(..PAGE_HEADER_SIZE).ok_or_else(too_short)?;
        let u16_field = |offset| u16_at(head, offset).ok_or_else(too_short);
        let u32_field = |offset| u32_at(head, offset).ok_or_else(too_short);
        Ok(PageHeader {
            // pd_lsn is stored as two uint32 halves, xlogid then xrecoff,
            // not as one uint64: the high half comes first on every platform.
            lsn: Lsn::from_parts(u32_field(0)?, u32_field(4)?),
            checksum: u16_field(8)?,
            flags: u16_field(10)?,
            lower: u16_field(12)?,
            upper: u16_field(14)?,
            special: u16_field(16)?,
            pagesize_version: u16_field(18)?,
            prune_xid: u32_field(20)?,
        })
    }

    /// `PageIsNew`: the page was never initialized (`pd_upper == 0`).
    pub fn is_new(&self) -> bool {
        self.upper == 0
    }

    /// The header checks of `PageIsVerified` (src/backend/storage/page/bufpage.c):
    /// only known flag bits, and `pd_lower <= pd_upper <= pd_special <= block_size`
    /// with `pd_special` MAXALIGNed.
    pub fn is_sane(&self, block_size: usize) -> bool {
        self.flags & !PD_VALID_FLAG_BITS == 0
            && self.lower <= self.upper
            && self.upper <= self.special
            && usize::from(self.special) <= block_size
            // pd_special == MAXALIGN(pd_special): the low bits are clear.
            && self.special & (MAXIMUM_ALIGNOF - 1) == 0
    }
}

/// Whether every byte of `page` is zero, compared 16 bytes at a time.
pub fn is_zero_page(page: &[u8]) -> bool {
    let mut chunks = page.chunks_exact(16);
    for chunk in &mut chunks {
        // chunks_exact hands out 16-byte slices, so first_chunk always succeeds.
        let word = chunk
            .first_chunk::<16>()
            .map_or(1, |bytes| u128::from_ne_bytes(*bytes));
        if word != 0 {
            return false;
        }
    }
    chunks.remainder().iter().all(|&b| b == 0)
}

/// Number of hashes computed side by side (`N_SUMS`); part of the algorithm.
const N_SUMS: usize = 32;
/// Bytes consumed per round: one `u32` for each hash.
const ROW_BYTES: usize = N_SUMS * 4;
/// Prime multiplier of FNV-1a (`FNV_PRIME`).
const FNV_PRIME: u32 = 16_777_619;
/// Distinct starting states of the 32 hashes (`checksumBaseOffsets`).
const CHECKSUM_BASE_OFFSETS: [u32; N_SUMS] = [
    0x5B1F36E9, 0xB8525960, 0x02AB50AA, 0x1DE66D2A, 0x79FF467A, 0x9BB9F8A3, 0x217E7CD2, 0x83E13D2C,
    0xF8D4474F, 0xE39EB970, 0x42C6AE16, 0x993216FA, 0x7B093B5D, 0x98DAFF3C, 0xF718902A, 0x0B1C9CDB,
    0xE58F764B, 0x187636BC, 0x5D7B3BB1, 0xE73DE7DE, 0x92BEC979, 0xCCA6C0B2, 0x304A0979, 0x85AA43D4,
    0x783125BB, 0x6CA8EAA2, 0xE407EAC6, 0x4B5CFC3E, 0x9FBF8C76, 0x15CA20BE, 0xF2CA9FD3, 0x959BD756,
];

/// One FNV-1a-like step with an extra shift for better mixing (`CHECKSUM_COMP`).
fn checksum_comp(sum: u32, value: u32) -> u32 {
    let tmp = sum ^ value;
    tmp.wrapping_mul(FNV_PRIME) ^ (tmp >> 17)
}

/// Feeds one 128-byte row, one native-endian `u32` per hash.
fn checksum_row(sums: &mut [u32; N_SUMS], row: &[u8]) {
    for (sum, word) in sums.iter_mut().zip(row.chunks_exact(4)) {
        let value = word
            .first_chunk::<4>()
            .map_or(0, |w| u32::from_ne_bytes(*w));
        *sum = checksum_comp(*sum, value);
    }
}

/// The data page checksum PostgreSQL stores in `pd_checksum`.
///
/// Port of `pg_checksum_page` and `pg_checksum_block`,
/// src/include/storage/checksum_impl.h: 32 FNV-1a-like hashes over the page
/// read as rows of 32 native-endian `u32`s, with the stored `pd_checksum`
/// counted as 0, two extra rounds of zeros, XOR-folded, XORed with the block
/// number, reduced to `% 65535 + 1` so the result is never 0.
///
/// `blkno` is the block number within the relation fork, not within the
/// segment file: `segno * blocks_per_segment + block_in_file`. The page is
/// normally `block_size` bytes; trailing bytes short of a 128-byte row are
/// ignored (no PostgreSQL block size leaves any).
pub fn pg_checksum_page(page: &[u8], blkno: u32) -> u16 {
    let mut sums = CHECKSUM_BASE_OFFSETS;
    let mut rows = page.chunks_exact(ROW_BYTES);
    if let Some(first) = rows.next() {
        // The checksum must not cover itself: hash the first row with
        // pd_checksum (bytes 8..10) zeroed, in a copy so the input stays shared.
        let mut row = [0u8; ROW_BYTES];
        row.copy_from_slice(first);
        row[8] = 0;
        row[9] = 0;
        checksum_row(&mut sums, &row);
    }
    for row in rows {
        checksum_row(&mut sums, row);
    }
    for _ in 0..2 {
        checksum_row(&mut sums, &[0u8; ROW_BYTES]);
    }
    let folded = sums.iter().fold(0u32, |acc, sum| acc ^ sum) ^ blkno;
    // 65535 is below u16::MAX, so the sum fits; the cast cannot truncate.
    ((folded % 65535) + 1) as u16
}

/// What [`verify_page`] found.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum PageVerdict {
    /// Sane header and matching checksum.
    Valid,
    /// New or all-zero page: nothing to check.
    New,
    /// The stored checksum is not the one computed for this block.
    ChecksumMismatch { stored: u16, computed: u16 },
    /// The header is not sane, or the page is marked new but holds data, or
    /// `page` is not a possible block size (a power of two from 1 to 32 kB).
    BadHeader,
}

/// What `PageIsVerified` (src/backend/storage/page/bufpage.c) decides for a
/// page read from a cluster with data checksums on.
///
/// An initialized page must have a sane header and a matching checksum; a
/// page marked new (`pd_upper == 0`) must be all zeros. A checksum mismatch
/// is reported even when the header is also bad, as PostgreSQL does. The
/// block size is the length of `page`.
pub fn verify_page(page: &[u8], blkno: u32) -> PageVerdict {
    if !is_valid_block_size(page.len()) {
        return PageVerdict::BadHeader;
    }
    let Ok(header) = PageHeader::parse(page) else {
        return PageVerdict::BadHeader;
    };
    if header.is_new() {
        return if is_zero_page(page) {
            PageVerdict::New
        } else {
            PageVerdict::BadHeader
        };
    }
    let computed = pg_checksum_page(page, blkno);
    if computed != header.checksum {
        return PageVerdict::ChecksumMismatch {
            stored: header.checksum,
            computed,
        };
    }
    if header.is_sane(page.len()) {
        PageVerdict::Valid
    } else {
        PageVerdict::BadHeader
    }
}

/// configure's `--with-blocksize` allows 1, 2, 4, 8, 16 and 32 kB.
fn is_valid_block_size(len: usize) -> bool {
    len.is_power_of_two() && (1024..=32768).contains(&len)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An initialized, empty 8 kB heap page with LSN 1/2 and a valid checksum for `blkno`.
    fn heap_page(blkno: u32) -> Vec<u8> {
        let mut page = vec![0u8; 8192];
        page[0..4].copy_from_slice(&1u32.to_ne_bytes());
        page[4..8].copy_from_slice(&2u32.to_ne_bytes());
        page[12..14].copy_from_slice(&24u16.to_ne_bytes());
        page[14..16].copy_from_slice(&8192u16.to_ne_bytes());
        page[16..18].copy_from_slice(&8192u16.to_ne_bytes());
        page[18..20].copy_from_slice(&(8192u16 | 4).to_ne_bytes());
        page[100] = 0xAB;
        let sum = pg_checksum_page(&page, blkno);
        page[8..10].copy_from_slice(&sum.to_ne_bytes());
        page
    }

    #[test]
    fn parses_the_header() {
        let h = PageHeader::parse(&heap_page(0)).unwrap();
        assert_eq!(h.lsn, Lsn(0x1_0000_0002));
        assert_eq!((h.lower, h.upper, h.special), (24, 8192, 8192));
        assert_eq!(h.pagesize_version, 0x2004);
        assert!(!h.is_new());
        assert!(h.is_sane(8192));
        assert!(!h.is_sane(4096));
        assert_eq!(
            PageHeader::parse(&[0; 23]).unwrap_err().to_string(),
            "page header is too short: 23 bytes, need at least 24"
        );
    }

    #[test]
    fn sanity_checks_follow_page_is_verified() {
        let base = PageHeader::parse(&heap_page(0)).unwrap();
        let insane = [
            PageHeader {
                flags: 0x0008,
                ..base
            },
            PageHeader {
                lower: 8000,
                upper: 7000,
                ..base
            },
            PageHeader {
                upper: 8192,
                special: 8000,
                ..base
            },
            PageHeader {
                special: 8188,
                upper: 8000,
                ..base
            },
        ];
        for h in insane {
            assert!(!h.is_sane(8192), "{h:?}");
        }
        assert!(PageHeader {
            flags: 0x0007,
            ..base
        }
        .is_sane(8192));
    }

    #[test]
    fn zero_pages() {
        assert!(is_zero_page(&[0; 8192]));
        assert!(is_zero_page(&[0; 21]));
        assert!(is_zero_page(&[]));
        let mut page = [0u8; 8192];
        page[8191] = 1;
        assert!(!is_zero_page(&page));
        let mut odd = [0u8; 21];
        odd[20] = 1;
        assert!(!is_zero_page(&odd));
    }

    #[test]
    fn checksum_ignores_the_stored_checksum_and_mixes_the_block_number() {
        let mut page = heap_page(7);
        let sum = pg_checksum_page(&page, 7);
        page[8] ^= 0xFF;
        assert_eq!(pg_checksum_page(&page, 7), sum);
        assert_ne!(pg_checksum_page(&page, 8), sum);
        page[4000] ^= 1;
        assert_ne!(pg_checksum_page(&page, 7), sum);
        assert_ne!(pg_checksum_page(&[0; 8192], 0), 0);
    }

    #[test]
    fn verdicts() {
        assert_eq!(verify_page(&heap_page(3), 3), PageVerdict::Valid);
        assert_eq!(verify_page(&[0; 8192], 3), PageVerdict::New);
        assert_eq!(verify_page(&[0; 1000], 0), PageVerdict::BadHeader);
        assert_eq!(verify_page(&[0; 12], 0), PageVerdict::BadHeader);

        let moved = verify_page(&heap_page(3), 4);
        assert!(
            matches!(moved, PageVerdict::ChecksumMismatch { .. }),
            "{moved:?}"
        );

        let mut torn = heap_page(3);
        torn[5000] = 1;
        let PageVerdict::ChecksumMismatch { stored, computed } = verify_page(&torn, 3) else {
            panic!("expected a checksum mismatch");
        };
        assert_eq!(stored, pg_checksum_page(&heap_page(3), 3));
        assert_eq!(computed, pg_checksum_page(&torn, 3));

        // Marked new but holding data: PageIsVerified refuses it.
        let mut new_with_data = [0u8; 8192];
        new_with_data[100] = 1;
        assert_eq!(verify_page(&new_with_data, 0), PageVerdict::BadHeader);

        // Checksum right, header wrong.
        let mut bad_flags = heap_page(3);
        bad_flags[10] = 0x80;
        let sum = pg_checksum_page(&bad_flags, 3);
        bad_flags[8..10].copy_from_slice(&sum.to_ne_bytes());
        assert_eq!(verify_page(&bad_flags, 3), PageVerdict::BadHeader);
    }
}
