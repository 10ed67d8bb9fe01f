//! Integration tests of pgkeep-catalog, compiled as one binary: shared record builders and
//! proptest strategies here, the tests in the modules.

mod catalog;
mod meta;

use chrono::{DateTime, TimeZone, Utc};
use pgkeep_catalog::{
    BackupRecord, BackupStatus, BackupType, Bundled, FileKind, FileRecord, Lsn, Pin, RepoIdentity,
    WalKind, WalRecord,
};
use proptest::prelude::*;

pub fn identity() -> RepoIdentity {
    RepoIdentity {
        system_identifier: 0xE5A1_0000_0000_0001, // above i64::MAX on purpose
        pg_major: 16,
        block_size: 8192,
        wal_segment_size: 16 << 20,
        blocks_per_segment: 131_072,
    }
}

pub fn time(s: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
}

/// A finished full backup started at `start`.
pub fn backup(label: &str, start: &str) -> BackupRecord {
    BackupRecord {
        label: label.to_string(),
        backup_type: BackupType::Full,
        status: BackupStatus::Running,
        parent: None,
        timeline: 1,
        start_lsn: Lsn(0x2000028),
        stop_lsn: Some(Lsn(0x2000138)),
        start_wal: "000000010000000000000002".into(),
        stop_wal: Some("000000010000000000000002".into()),
        start_time: time(start),
        end_time: Some(time(start) + chrono::Duration::seconds(90)),
        recovery_time: Some(time(start) + chrono::Duration::seconds(89)),
        data_bytes: 40 << 20,
        stored_bytes: 9 << 20,
        files: 1000,
        pg_version_num: 160_004,
        system_identifier: identity().system_identifier,
        block_size: 8192,
        data_checksums: true,
        pid: 4242,
        hostname: "db1".into(),
        page_checksum_failures: 0,
        error: None,
        from_standby: false,
        pinned: None,
    }
}

/// The `i`th relation file of a backup.
pub fn file(i: u64, stored_in: &str) -> FileRecord {
    FileRecord {
        path: format!("base/5/{}", 16384 + i),
        kind: FileKind::File,
        size: 8192 * (i % 7),
        mode: 0o100600,
        uid: 26,
        gid: 26,
        mtime: 1_763_720_100 + i as i64,
        link_target: None,
        crc32c: Some(i as u32 ^ 0xdead_beef),
        sha256: Some([i as u8; 32]),
        stored_size: 100 + i,
        stored_in: Some(stored_in.to_string()),
        n_blocks: Some(i % 7),
        page_delta: false,
        bundle: None,
    }
}

pub fn wal(segno: u64) -> WalRecord {
    WalRecord {
        name: format!("00000001{:08X}{:08X}", segno >> 8, segno & 0xff),
        kind: WalKind::Segment,
        timeline: 1,
        segno: Some(segno),
        size: 16 << 20,
        crc32c: segno as u32,
        sha256: [segno as u8; 32],
        stored_size: 1 << 20,
        archived_at: time("2026-11-21T10:15:00.5Z") + chrono::Duration::seconds(segno as i64),
    }
}

/// Times RFC 3339 can carry (years 0000 to 9999), at microsecond precision.
pub fn arb_time() -> impl Strategy<Value = DateTime<Utc>> {
    (-62_167_219_200i64..253_402_300_800, 0u32..1_000_000)
        .prop_map(|(s, us)| Utc.timestamp_opt(s, us * 1000).unwrap())
}

/// Any string, with the awkward characters made frequent.
pub fn arb_text() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>(),
        "[a-z\\\\\t\n\r =#N\u{0}\u{7f}\u{85}\u{2028}é]{0,12}",
        Just("\\N".to_string()),
    ]
}

pub fn arb_nonempty_text() -> impl Strategy<Value = String> {
    arb_text().prop_filter("non-empty", |s| !s.is_empty())
}

pub fn arb_backup() -> impl Strategy<Value = BackupRecord> {
    let kinds = (
        prop::sample::select(BackupType::ALL),
        prop::sample::select(BackupStatus::ALL),
        proptest::option::of(arb_nonempty_text()),
        arb_nonempty_text(),
    );
    let positions = (
        any::<u32>(),
        any::<u64>(),
        proptest::option::of(any::<u64>()),
        arb_text(),
        proptest::option::of(arb_nonempty_text()),
    );
    let pin = prop_oneof![Just(Pin::Forever), arb_time().prop_map(Pin::Until)];
    let times = (
        arb_time(),
        proptest::option::of(arb_time()),
        proptest::option::of(arb_time()),
        proptest::option::of(pin),
    );
    let counts = (any::<u64>(), any::<u64>(), any::<u64>(), any::<u64>());
    let cluster = (
        any::<u32>(),
        any::<u64>(),
        any::<u32>(),
        any::<bool>(),
        any::<u32>(),
        arb_text(),
        proptest::option::of(arb_nonempty_text()),
        any::<bool>(),
    );
    (kinds, positions, times, counts, cluster).prop_map(
        |(
            (backup_type, status, parent, label),
            (timeline, start_lsn, stop_lsn, start_wal, stop_wal),
            (start_time, end_time, recovery_time, pinned),
            (data_bytes, stored_bytes, files, page_checksum_failures),
            (
                pg_version_num,
                system_identifier,
                block_size,
                data_checksums,
                pid,
                hostname,
                error,
                from_standby,
            ),
        )| BackupRecord {
            label,
            backup_type,
            status,
            parent,
            timeline,
            start_lsn: Lsn(start_lsn),
            stop_lsn: stop_lsn.map(Lsn),
            start_wal,
            stop_wal,
            start_time,
            end_time,
            recovery_time,
            data_bytes,
            stored_bytes,
            files,
            pg_version_num,
            system_identifier,
            block_size,
            data_checksums,
            pid,
            hostname,
            page_checksum_failures,
            error,
            from_standby,
            pinned,
        },
    )
}

pub fn arb_file() -> impl Strategy<Value = FileRecord> {
    let head = (
        arb_text(),
        prop::sample::select(FileKind::ALL),
        any::<u64>(),
        any::<u32>(),
        any::<u32>(),
        any::<u32>(),
        any::<i64>(),
    );
    let tail = (
        proptest::option::of(arb_text()),
        proptest::option::of(any::<u32>()),
        proptest::option::of(any::<[u8; 32]>()),
        any::<u64>(),
        proptest::option::of(arb_text()),
        proptest::option::of(any::<u64>()),
        any::<bool>(),
    );
    let bundle = proptest::option::of((any::<u32>(), any::<u64>(), any::<u64>()));
    (head, tail, bundle).prop_map(
        |(
            (path, kind, size, mode, uid, gid, mtime),
            (link_target, crc32c, sha256, stored_size, stored_in, n_blocks, page_delta),
            bundle,
        )| FileRecord {
            path,
            kind,
            size,
            mode,
            uid,
            gid,
            mtime,
            link_target,
            crc32c,
            sha256,
            stored_size,
            stored_in,
            n_blocks,
            page_delta,
            bundle: bundle.map(|(id, offset, length)| Bundled { id, offset, length }),
        },
    )
}
