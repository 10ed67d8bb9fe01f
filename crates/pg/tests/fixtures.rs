//! Checks the parsers against bytes written by a real PostgreSQL 15 (see fixtures/README.md).

use pgkeep_pg::{
    parse_segment_header, pg_checksum_page, verify_page, BackupLabel, ControlFile, Lsn, PageHeader,
    PageVerdict, TimelineId, WalFileName, WalSegSize, PG_CONTROL_FILE_SIZE,
};

const PG_CONTROL: &[u8] = include_bytes!("fixtures/pg_control_15");
const WAL_HEAD: &[u8] = include_bytes!("fixtures/wal_000000010000000000000004_head");
const LABEL: &str = include_str!("fixtures/backup_label_15");
/// (file, block number within the relation, page bytes)
const PAGES: [(&str, u32, &[u8]); 3] = [
    (
        "global/1260",
        0,
        include_bytes!("fixtures/global_1260_blk0"),
    ),
    (
        "base/5/16384",
        0,
        include_bytes!("fixtures/base_5_16384_blk0"),
    ),
    (
        "base/5/16384",
        3,
        include_bytes!("fixtures/base_5_16384_blk3"),
    ),
];
const SYSTEM_IDENTIFIER: u64 = 7_710_604_395_262_297_761;

#[test]
fn pg_control_from_postgresql_15() {
    assert_eq!(PG_CONTROL.len(), PG_CONTROL_FILE_SIZE);
    let control = ControlFile::parse(PG_CONTROL).unwrap();
    assert_eq!(control.system_identifier, SYSTEM_IDENTIFIER);
    assert_eq!(control.pg_control_version, 1300);
    assert_eq!(control.catalog_version_no, 202_209_061);
    assert_eq!(control.state_name(), "shut down");
    assert_eq!(control.checkpoint, "0/40000D8".parse::<Lsn>().unwrap());
    assert_eq!(control.checkpoint_redo, "0/40000D8".parse::<Lsn>().unwrap());
    assert_eq!(control.checkpoint_timeline, TimelineId(1));
    assert_eq!(control.block_size, 8192);
    assert_eq!(control.blocks_per_segment, 131_072);
    assert_eq!(control.wal_block_size, 8192);
    assert_eq!(control.wal_segment_size, 16_777_216);
    assert_eq!(control.data_checksum_version, 1);
    assert!(control.data_checksums());
}

#[test]
fn pg_control_with_a_flipped_bit_fails_its_crc() {
    let mut bytes = PG_CONTROL.to_vec();
    bytes[100] ^= 0x10;
    let err = ControlFile::parse(&bytes).unwrap_err();
    assert!(
        err.to_string().starts_with("pg_control CRC mismatch"),
        "{err}"
    );
}

#[test]
fn page_checksums_match_postgresql_15() {
    for (file, blkno, page) in PAGES {
        let header = PageHeader::parse(page).unwrap();
        assert!(!header.is_new(), "{file} block {blkno}");
        assert!(header.is_sane(8192), "{file} block {blkno}");
        assert_eq!(header.pagesize_version, 8192 | 4, "{file} block {blkno}");
        assert_eq!(
            pg_checksum_page(page, blkno),
            header.checksum,
            "{file} block {blkno}"
        );
        assert_eq!(
            verify_page(page, blkno),
            PageVerdict::Valid,
            "{file} block {blkno}"
        );
    }
}

#[test]
fn a_page_checked_at_the_wrong_block_number_fails() {
    let (_, _, page) = PAGES[2];
    assert!(matches!(
        verify_page(page, 2),
        PageVerdict::ChecksumMismatch { .. }
    ));
    let mut torn = page.to_vec();
    torn[4096] ^= 0x01;
    assert!(matches!(
        verify_page(&torn, 3),
        PageVerdict::ChecksumMismatch { .. }
    ));
}

#[test]
fn wal_segment_header_from_postgresql_15() {
    let header = parse_segment_header(WAL_HEAD).unwrap();
    assert_eq!(header.magic, 0xD110);
    assert_eq!(header.pg_major, 15);
    assert_eq!(header.timeline, TimelineId(1));
    assert_eq!(header.page_addr, Lsn(0x0400_0000));
    assert_eq!(header.segno(), 4);
    assert_eq!(header.system_identifier, SYSTEM_IDENTIFIER);
    assert_eq!(header.segment_size, 16_777_216);
    assert_eq!(header.wal_block_size, 8192);
    let name = WalFileName::parse("000000010000000000000004", WalSegSize::DEFAULT).unwrap();
    assert_eq!(name.segno(), Some(header.segno()));
}

#[test]
fn backup_label_from_postgresql_15() {
    let label = BackupLabel::parse(LABEL).unwrap();
    assert_eq!(label.start_lsn, Lsn(0x0300_0028));
    assert_eq!(label.start_wal_file, "000000010000000000000003");
    assert_eq!(label.checkpoint_lsn, Lsn(0x0300_0060));
    assert_eq!(label.backup_method, "streamed");
    assert_eq!(label.backup_from, "primary");
    assert_eq!(label.start_time, "2026-11-21 12:43:09 UTC");
    assert_eq!(label.label, "nightly fixture");
    assert_eq!(label.start_timeline, TimelineId(1));
    let seg = WalSegSize::DEFAULT;
    assert_eq!(
        WalFileName::parse(&label.start_wal_file, seg)
            .unwrap()
            .segno(),
        Some(label.start_lsn.segment_number(seg))
    );
}
