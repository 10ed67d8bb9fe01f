//! Property tests: text forms round-trip, and no parser panics on arbitrary input.

use pgkeep_pg::{
    classify, is_temp_relation_name, parse_relation_path, parse_segment_header, pg_checksum_page,
    timeline_path, verify_page, BackupLabel, ControlFile, HistoryEntry, Lsn, PageHeader,
    PageVerdict, RelFile, TimelineId, WalFileName, WalSegSize,
};
use proptest::prelude::*;

fn seg_size() -> impl Strategy<Value = WalSegSize> {
    (20u32..=30).prop_map(|shift| WalSegSize::new(1u64 << shift).unwrap())
}

/// A segment number whose name fits in 8+8 hex digits for `seg`.
fn segno_for(seg: WalSegSize) -> impl Strategy<Value = u64> {
    0..(u64::from(u32::MAX) + 1) * seg.segments_per_xlog_id()
}

fn wal_file_name() -> impl Strategy<Value = (WalSegSize, WalFileName)> {
    seg_size().prop_flat_map(|seg| {
        let tli = (1u32..).prop_map(TimelineId);
        let offset = 0..u32::try_from(seg.bytes()).unwrap();
        let name = prop_oneof![
            (tli.clone(), segno_for(seg))
                .prop_map(|(tli, segno)| WalFileName::Segment { tli, segno }),
            (tli.clone(), segno_for(seg))
                .prop_map(|(tli, segno)| WalFileName::Partial { tli, segno }),
            (tli.clone(), segno_for(seg), offset)
                .prop_map(|(tli, segno, offset)| WalFileName::Backup { tli, segno, offset }),
            tli.prop_map(|tli| WalFileName::History { tli }),
        ];
        (Just(seg), name)
    })
}

proptest! {
    #[test]
    fn lsn_display_round_trips(n in any::<u64>()) {
        let text = Lsn(n).to_string();
        prop_assert_eq!(text.parse::<Lsn>(), Ok(Lsn(n)));
        prop_assert_eq!(text.to_lowercase().parse::<Lsn>(), Ok(Lsn(n)));
        prop_assert!(!text.contains(|c: char| c.is_ascii_lowercase()));
    }

    #[test]
    fn lsn_parse_never_panics(s in ".*") {
        if let Ok(lsn) = s.parse::<Lsn>() {
            // Whatever parses prints back in canonical form and parses again.
            prop_assert_eq!(lsn.to_string().parse::<Lsn>(), Ok(lsn));
        }
    }

    #[test]
    fn lsn_segment_arithmetic_is_consistent(n in any::<u64>(), seg in seg_size()) {
        let lsn = Lsn(n);
        let start = Lsn::from_segment(lsn.segment_number(seg), seg);
        prop_assert_eq!(start.checked_add(lsn.segment_offset(seg)), Some(lsn));
    }

    #[test]
    fn wal_file_names_round_trip((seg, name) in wal_file_name()) {
        let text = name.to_name(seg);
        prop_assert_eq!(WalFileName::parse(&text, seg), Ok(name));
        if let Some(segno) = name.segno() {
            prop_assert_eq!(&text[..24], pgkeep_pg::segment_name(name.timeline(), segno, seg));
        }
    }

    #[test]
    fn wal_file_name_parse_never_panics(s in "[0-9A-Fa-z.é]{0,45}", seg in seg_size()) {
        if let Ok(name) = WalFileName::parse(&s, seg) {
            prop_assert_eq!(name.to_name(seg), s);
        }
    }

    #[test]
    fn control_file_parse_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
        let _ = ControlFile::parse(&bytes);
    }

    #[test]
    fn control_file_parse_never_panics_on_known_versions(
        mut bytes in proptest::collection::vec(any::<u8>(), 0..400),
        version in prop_oneof![Just(1201u32), Just(1300), Just(1700), Just(1800)],
    ) {
        if bytes.len() >= 12 {
            bytes[8..12].copy_from_slice(&version.to_ne_bytes());
        }
        let _ = ControlFile::parse(&bytes);
    }

    #[test]
    fn page_header_parse_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
        if let Ok(header) = PageHeader::parse(&bytes) {
            let _ = header.is_sane(8192);
            let _ = header.is_sane(0);
        }
    }

    #[test]
    fn segment_header_parse_never_panics(
        mut bytes in proptest::collection::vec(any::<u8>(), 0..80),
        magic in prop_oneof![Just(0xD110u16), any::<u16>()],
    ) {
        if bytes.len() >= 2 {
            bytes[..2].copy_from_slice(&magic.to_ne_bytes());
        }
        let _ = parse_segment_header(&bytes);
    }

    #[test]
    fn backup_label_parse_never_panics(text in "((START WAL LOCATION|CHECKPOINT LOCATION|START TIMELINE|LABEL|[A-Z ]{0,12}): ?[ -~é]{0,40}\r?\n){0,10}") {
        let _ = BackupLabel::parse(&text);
    }

    #[test]
    fn backup_label_parse_never_panics_on_any_text(text in ".*") {
        let _ = BackupLabel::parse(&text);
    }

    #[test]
    fn verify_page_never_panics(len in prop_oneof![Just(8192usize), Just(1024), 0usize..9000], seed in any::<u64>(), blkno in any::<u32>()) {
        // A cheap pseudo-random page: proptest shrinking over 8 kB vectors is slow.
        let mut state = seed;
        let page: Vec<u8> = (0..len)
            .map(|_| {
                state = state.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
                (state >> 56) as u8
            })
            .collect();
        let _ = pg_checksum_page(&page, blkno);
        let _ = verify_page(&page, blkno);
    }

    #[test]
    fn a_page_stamped_with_its_checksum_verifies(seed in any::<u64>(), blkno in any::<u32>()) {
        let mut page = vec![0u8; 8192];
        let mut state = seed | 1;
        for b in page.iter_mut().skip(24) {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            *b = state as u8;
        }
        // A sane empty-page header, then the checksum PostgreSQL would store.
        page[12..14].copy_from_slice(&24u16.to_ne_bytes());
        page[14..16].copy_from_slice(&8192u16.to_ne_bytes());
        page[16..18].copy_from_slice(&8192u16.to_ne_bytes());
        let sum = pg_checksum_page(&page, blkno);
        page[8..10].copy_from_slice(&sum.to_ne_bytes());
        prop_assert_eq!(verify_page(&page, blkno), PageVerdict::Valid);
        prop_assert!(sum != 0);
    }

    #[test]
    fn path_helpers_never_panic(path in "[a-z0-9_./é]{0,40}", is_dir in any::<bool>()) {
        let _ = classify(&path, is_dir);
        let _ = is_temp_relation_name(&path);
        if let Some((db, rel)) = parse_relation_path(&path) {
            prop_assert_eq!(format!("{db}/{}", rel.file_name()), path);
        }
    }

    #[test]
    fn relation_file_names_round_trip(
        relfilenode in 1u32..,
        fork in prop_oneof![
            Just(pgkeep_pg::Fork::Main),
            Just(pgkeep_pg::Fork::Fsm),
            Just(pgkeep_pg::Fork::Vm),
            Just(pgkeep_pg::Fork::Init),
        ],
        segno in any::<u32>(),
    ) {
        let rel = RelFile { relfilenode, fork, segno };
        let path = format!("base/5/{}", rel.file_name());
        prop_assert_eq!(parse_relation_path(&path), Some(("base/5".to_owned(), rel)));
    }

    #[test]
    fn timeline_path_agrees_with_a_newest_first_lookup(
        switchpoints in proptest::collection::vec(0u64..40, 0..6),
        probes in proptest::collection::vec(0u64..48, 1..20),
    ) {
        let entries: Vec<HistoryEntry> = switchpoints
            .iter()
            .enumerate()
            .map(|(i, &sp)| HistoryEntry { parent: TimelineId(i as u32 + 1), switchpoint: Lsn(sp) })
            .collect();
        let tli = TimelineId(entries.len() as u32 + 1);
        let spans = timeline_path(tli, &entries);
        for lsn in probes {
            let owner = spans.iter().filter(|s| s.contains(Lsn(lsn))).map(|s| s.tli).collect::<Vec<_>>();
            prop_assert_eq!(owner, vec![lookup(tli, &entries, lsn)]);
        }
    }
}

/// tliOfPointInHistory (timeline.c) on the list readTimeLineHistory builds: the file's own
/// timeline from the last switch point, then each entry from the previous switch point to its
/// own, newest first; the first range holding the LSN wins.
fn lookup(tli: TimelineId, entries: &[HistoryEntry], lsn: u64) -> TimelineId {
    let mut ranges = Vec::new();
    let mut prev = 0;
    for e in entries {
        ranges.push((e.parent, prev, Some(e.switchpoint.0)));
        prev = e.switchpoint.0;
    }
    ranges.push((tli, prev, None));
    ranges
        .iter()
        .rev()
        .find(|(_, begin, end)| *begin <= lsn && end.is_none_or(|e| lsn < e))
        .map(|r| r.0)
        .unwrap()
}
