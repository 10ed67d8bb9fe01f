//! The SQLite catalog on a temporary directory: creation, opening, CRUD, status changes,
//! concurrent writers and bulk file inserts.

use std::sync::{Arc, Barrier};
use std::time::Instant;

use pgkeep_catalog::{
    BackupStatus, BackupType, Catalog, CatalogError, DrillRecord, FileKind, FileRecord, Lsn, Pin,
    WalInsert, SCHEMA_VERSION,
};
use proptest::prelude::*;
use tempfile::TempDir;

use crate::{arb_backup, arb_file, backup, file, identity, wal};

fn new_catalog() -> (TempDir, Catalog) {
    let dir = tempfile::tempdir().unwrap();
    let catalog = Catalog::create(&dir.path().join("catalog.db"), &identity()).unwrap();
    (dir, catalog)
}

#[test]
fn create_then_open_keeps_identity() {
    let (dir, catalog) = new_catalog();
    assert_eq!(catalog.identity().unwrap(), identity());
    drop(catalog);
    let path = dir.path().join("catalog.db");
    let catalog = Catalog::open(&path).unwrap();
    assert_eq!(catalog.identity().unwrap(), identity());
    assert_eq!(catalog.path(), path);
    // Nothing but the catalog and SQLite's own companions is left beside it.
    let names: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| !n.starts_with("catalog.db"))
        .collect();
    assert!(names.is_empty(), "{names:?}");
    let version: i64 = rusqlite::Connection::open(&path)
        .unwrap()
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .unwrap();
    assert_eq!(version, i64::from(SCHEMA_VERSION));
}

#[test]
fn create_refuses_an_existing_file() {
    let (dir, _catalog) = new_catalog();
    let path = dir.path().join("catalog.db");
    let err = Catalog::create(&path, &identity()).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!("catalog {} already exists", path.display())
    );
    let other = dir.path().join("other");
    std::fs::write(&other, "precious").unwrap();
    assert!(matches!(
        Catalog::create(&other, &identity()),
        Err(CatalogError::AlreadyExists { .. })
    ));
    assert_eq!(std::fs::read_to_string(&other).unwrap(), "precious");
}

#[test]
fn open_refuses_what_is_not_a_catalog() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.db");
    assert_eq!(
        Catalog::open(&missing).unwrap_err().to_string(),
        format!("catalog {} does not exist", missing.display())
    );

    let text = dir.path().join("notes.txt");
    std::fs::write(
        &text,
        "these are not the rows you are looking for\n".repeat(50),
    )
    .unwrap();
    assert_eq!(
        Catalog::open(&text).unwrap_err().to_string(),
        format!(
            "{} is not a pgkeep catalog: not an SQLite database",
            text.display()
        )
    );

    let empty = dir.path().join("empty.db");
    std::fs::write(&empty, "").unwrap();
    assert_eq!(
        Catalog::open(&empty).unwrap_err().to_string(),
        format!("{} is not a pgkeep catalog: empty file", empty.display())
    );

    let foreign = dir.path().join("foreign.db");
    rusqlite::Connection::open(&foreign)
        .unwrap()
        .execute_batch("CREATE TABLE t (x)")
        .unwrap();
    assert_eq!(
        Catalog::open(&foreign).unwrap_err().to_string(),
        format!(
            "{} is not a pgkeep catalog: an SQLite database that pgkeep did not create",
            foreign.display()
        )
    );

    assert!(matches!(
        Catalog::open(dir.path()),
        Err(CatalogError::NotACatalog { .. })
    ));
    // Nothing was written to the refused files.
    assert!(!dir.path().join("notes.txt-wal").exists());
}

#[test]
fn pins_survive_updates_and_a_version_1_catalog_migrates_unpinned() {
    let (dir, catalog) = new_catalog();
    let full = backup("20261121-101500F", "2026-11-21T10:15:00Z");
    catalog.insert_backup(&full).unwrap();
    let until = Pin::Until(crate::time("2027-01-01T00:00:00Z"));
    assert_eq!(
        catalog.set_pin(&full.label, Some(until)).unwrap().pinned,
        Some(until)
    );
    // update_backup leaves the pin alone, as it leaves the status.
    catalog.update_backup(&full).unwrap();
    let stored = catalog.backup(&full.label).unwrap().unwrap();
    assert_eq!(stored.pinned, Some(until));
    assert!(stored.pinned_at(crate::time("2026-12-31T23:59:59Z")));
    assert!(!stored.pinned_at(crate::time("2027-01-01T00:00:00Z")));
    catalog.set_pin(&full.label, Some(Pin::Forever)).unwrap();
    assert_eq!(
        catalog.backup(&full.label).unwrap().unwrap().pinned,
        Some(Pin::Forever)
    );
    assert_eq!(
        catalog.set_pin("missing", None).unwrap_err().to_string(),
        "backup missing not found"
    );
    drop(catalog);

    // The schema as version 1 left it: no from_standby or pinned column.
    let path = dir.path().join("catalog.db");
    let conn = rusqlite::Connection::open(&path).unwrap();
    conn.execute_batch(
        "ALTER TABLE backup DROP COLUMN pinned; ALTER TABLE backup DROP COLUMN from_standby; DROP TABLE drill; ALTER TABLE backup_file DROP COLUMN bundle_id; ALTER TABLE backup_file DROP COLUMN bundle_offset; ALTER TABLE backup_file DROP COLUMN bundle_length; PRAGMA user_version = 1;",
    )
    .unwrap();
    drop(conn);
    let catalog = Catalog::open(&path).unwrap();
    assert_eq!(catalog.backup(&full.label).unwrap().unwrap().pinned, None);
}

#[test]
fn open_refuses_a_newer_schema() {
    let (dir, catalog) = new_catalog();
    drop(catalog);
    let path = dir.path().join("catalog.db");
    rusqlite::Connection::open(&path)
        .unwrap()
        .pragma_update(None, "user_version", SCHEMA_VERSION + 1)
        .unwrap();
    assert_eq!(
        Catalog::open(&path).unwrap_err().to_string(),
        format!(
            "catalog {} has schema version {}, newer than version {} known to this pgkeep: upgrade pgkeep",
            path.display(),
            SCHEMA_VERSION + 1,
            SCHEMA_VERSION
        )
    );
}

#[test]
fn a_version_1_catalog_is_migrated_and_its_backups_came_from_a_primary() {
    let (dir, catalog) = new_catalog();
    let full = backup("20261121-101500F", "2026-11-21T10:15:00Z");
    catalog.insert_backup(&full).unwrap();
    drop(catalog);
    let path = dir.path().join("catalog.db");
    // What version 1 had: no from_standby (2) or pinned (3) column, no drill table (4), no
    // bundle columns (5).
    let conn = rusqlite::Connection::open(&path).unwrap();
    conn.execute_batch(
        "ALTER TABLE backup DROP COLUMN pinned; ALTER TABLE backup DROP COLUMN from_standby; DROP TABLE drill; ALTER TABLE backup_file DROP COLUMN bundle_id; ALTER TABLE backup_file DROP COLUMN bundle_offset; ALTER TABLE backup_file DROP COLUMN bundle_length; PRAGMA user_version = 1;",
    )
    .unwrap();
    drop(conn);
    let catalog = Catalog::open(&path).unwrap();
    assert_eq!(catalog.backup(&full.label).unwrap(), Some(full.clone()));
    let mut standby = backup("20261122-101500F", "2026-11-22T10:15:00Z");
    standby.from_standby = true;
    catalog.insert_backup(&standby).unwrap();
    assert_eq!(catalog.backup(&standby.label).unwrap(), Some(standby));
    assert!(catalog.last_drills().unwrap().is_empty());
    let version: i64 = rusqlite::Connection::open(&path)
        .unwrap()
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .unwrap();
    assert_eq!(version, i64::from(SCHEMA_VERSION));
}

#[test]
fn backup_crud() {
    let (_dir, catalog) = new_catalog();
    let full = backup("20261121-101500F", "2026-11-21T10:15:00.000001Z");
    let mut diff = backup("20261122-101500D", "2026-11-22T10:15:00Z");
    diff.backup_type = BackupType::Diff;
    diff.parent = Some(full.label.clone());
    // Inserted out of order and with a label that sorts first but started last.
    let mut late = backup("00000000-000000F", "2026-11-23T10:15:00Z");
    late.end_time = None;
    for b in [&diff, &late, &full] {
        catalog.insert_backup(b).unwrap();
    }
    assert_eq!(
        catalog.insert_backup(&full).unwrap_err().to_string(),
        "backup 20261121-101500F already exists"
    );
    assert_eq!(catalog.backup(&diff.label).unwrap().as_ref(), Some(&diff));
    assert_eq!(catalog.backup("nope").unwrap(), None);
    let labels: Vec<String> = catalog
        .backups()
        .unwrap()
        .into_iter()
        .map(|b| b.label)
        .collect();
    assert_eq!(
        labels,
        [full.label.clone(), diff.label.clone(), late.label.clone()]
    );

    // update_backup changes everything but the status.
    let mut changed = full.clone();
    changed.status = BackupStatus::Ok;
    changed.stored_bytes = 1;
    changed.error = Some("note".into());
    changed.stop_lsn = None;
    catalog.update_backup(&changed).unwrap();
    let stored = catalog.backup(&full.label).unwrap().unwrap();
    assert_eq!(stored.status, BackupStatus::Running);
    assert_eq!(stored, changed.clone().with_status(BackupStatus::Running));
    assert_eq!(
        catalog
            .update_backup(&backup("missing", "2026-11-21T10:15:00Z"))
            .unwrap_err()
            .to_string(),
        "backup missing not found"
    );

    // Files, sorted by path, and deleted with their backup.
    let files: Vec<FileRecord> = (0..10).rev().map(|i| file(i, &full.label)).collect();
    catalog.insert_files(&full.label, &files).unwrap();
    let mut sorted = files.clone();
    sorted.sort_by(|a, b| a.path.cmp(&b.path));
    assert_eq!(catalog.files(&full.label).unwrap(), sorted);
    assert_eq!(catalog.files(&diff.label).unwrap(), []);
    assert_eq!(
        catalog.files("missing").unwrap_err().to_string(),
        "backup missing not found"
    );
    assert_eq!(
        catalog
            .insert_files("missing", &files)
            .unwrap_err()
            .to_string(),
        "backup missing not found"
    );
    // A duplicate path rejects the whole call.
    let err = catalog
        .insert_files(&full.label, &[file(100, "x"), file(3, "x")])
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "file base/5/16387 is recorded twice in backup 20261121-101500F"
    );
    assert_eq!(catalog.files(&full.label).unwrap().len(), 10);

    // A parent goes after its children.
    assert_eq!(
        catalog.delete_backup(&full.label).unwrap_err().to_string(),
        "backup 20261121-101500F is the parent of backup 20261122-101500D: delete 20261122-101500D first"
    );
    catalog.delete_backup(&diff.label).unwrap();
    catalog.delete_backup(&full.label).unwrap();
    assert_eq!(catalog.backup(&full.label).unwrap(), None);
    assert_eq!(
        catalog.delete_backup(&full.label).unwrap_err().to_string(),
        "backup 20261121-101500F not found"
    );
    // Re-inserting the label finds no left-over files.
    catalog.insert_backup(&full).unwrap();
    assert_eq!(catalog.files(&full.label).unwrap(), []);
}

trait WithStatus {
    fn with_status(self, s: BackupStatus) -> Self;
}

impl WithStatus for pgkeep_catalog::BackupRecord {
    fn with_status(mut self, s: BackupStatus) -> Self {
        self.status = s;
        self
    }
}

#[test]
fn set_status_enforces_transitions() {
    let (_dir, catalog) = new_catalog();
    let b = backup("20261121-101500F", "2026-11-21T10:15:00Z");
    catalog.insert_backup(&b).unwrap();
    let done = catalog
        .set_status(&b.label, BackupStatus::Done, None)
        .unwrap();
    assert_eq!(done, b.clone().with_status(BackupStatus::Done));
    assert_eq!(
        catalog
            .set_status(&b.label, BackupStatus::Running, None)
            .unwrap_err()
            .to_string(),
        "backup 20261121-101500F cannot go from DONE to RUNNING"
    );
    let corrupt = catalog
        .set_status(
            &b.label,
            BackupStatus::Corrupt,
            Some("base/5/16384: crc mismatch"),
        )
        .unwrap();
    assert_eq!(corrupt.error.as_deref(), Some("base/5/16384: crc mismatch"));
    assert_eq!(catalog.backup(&b.label).unwrap().unwrap(), corrupt);
    let ok = catalog
        .set_status(&b.label, BackupStatus::Ok, None)
        .unwrap();
    assert_eq!(ok.error, None);
    assert_eq!(catalog.backup(&b.label).unwrap().unwrap(), ok);
    catalog
        .set_status(&b.label, BackupStatus::Ok, None)
        .unwrap();
    catalog
        .set_status(&b.label, BackupStatus::Deleting, None)
        .unwrap();
    catalog
        .set_status(&b.label, BackupStatus::Deleting, None)
        .unwrap();
    assert_eq!(
        catalog
            .set_status("missing", BackupStatus::Done, None)
            .unwrap_err()
            .to_string(),
        "backup missing not found"
    );

    // Every pair, through the catalog.
    for (i, &from) in BackupStatus::ALL.iter().enumerate() {
        for (j, &to) in BackupStatus::ALL.iter().enumerate() {
            let label = format!("pair-{i}-{j}");
            catalog
                .insert_backup(&backup(&label, "2026-11-21T10:15:00Z").with_status(from))
                .unwrap();
            let result = catalog.set_status(&label, to, None);
            assert_eq!(result.is_ok(), from.can_become(to), "{from} -> {to}");
            let expected = if result.is_ok() { to } else { from };
            assert_eq!(catalog.backup(&label).unwrap().unwrap().status, expected);
        }
    }
}

#[test]
fn the_last_drill_of_each_backup_is_listed_with_every_field() {
    let (_dir, catalog) = new_catalog();
    assert!(catalog.last_drills().unwrap().is_empty());
    let at = |s: &str| chrono::DateTime::parse_from_rfc3339(s).unwrap().to_utc();
    let failed = DrillRecord {
        backup_label: "20261121-101500F".into(),
        started_at: at("2026-11-21T11:00:00.5Z"),
        passed: false,
        restore_seconds: Some(1.25),
        recovery_seconds: None,
        recovered_lsn: None,
        recovered_time: None,
        rpo_seconds: None,
        message: Some("recovery failed: archive-get 000000010000000000000003: corrupt".into()),
    };
    let passed = DrillRecord {
        started_at: at("2026-11-22T11:00:00Z"),
        passed: true,
        recovery_seconds: Some(2.5),
        recovered_lsn: Some(Lsn(0x3_0000_0028)),
        recovered_time: Some(at("2026-11-21T10:59:00.123456Z")),
        rpo_seconds: Some(61.5),
        message: None,
        ..failed.clone()
    };
    let other = DrillRecord {
        backup_label: "20261120-101500F".into(),
        ..failed.clone()
    };
    for d in [&failed, &passed, &other] {
        catalog.insert_drill(d).unwrap();
    }
    assert_eq!(catalog.last_drills().unwrap(), vec![other, passed.clone()]);
    assert_eq!(passed.rto_seconds(), Some(3.75));
    assert_eq!(failed.rto_seconds(), None);
}

#[test]
fn wal_crud() {
    let (_dir, catalog) = new_catalog();
    for segno in [3, 1, 2] {
        assert_eq!(
            catalog.insert_wal(&wal(segno)).unwrap(),
            WalInsert::Inserted
        );
    }
    let mut changed = wal(2);
    changed.sha256 = [9; 32];
    assert_eq!(
        catalog.insert_wal(&changed).unwrap(),
        WalInsert::AlreadyPresent(wal(2))
    );
    assert_eq!(catalog.wal(&wal(2).name).unwrap(), Some(wal(2)));
    assert_eq!(catalog.wal("00000002.history").unwrap(), None);
    let names: Vec<String> = catalog
        .wal_list()
        .unwrap()
        .into_iter()
        .map(|w| w.name)
        .collect();
    assert_eq!(names, [wal(1).name, wal(2).name, wal(3).name]);
    catalog.delete_wal(&wal(2).name).unwrap();
    assert_eq!(catalog.wal(&wal(2).name).unwrap(), None);
    assert_eq!(
        catalog.delete_wal(&wal(2).name).unwrap_err().to_string(),
        format!("wal file {} not found", wal(2).name)
    );
    let history = pgkeep_catalog::WalRecord {
        name: "00000002.history".into(),
        kind: pgkeep_catalog::WalKind::History,
        timeline: 2,
        segno: None,
        size: 42,
        ..wal(7)
    };
    catalog.insert_wal(&history).unwrap();
    assert_eq!(catalog.wal(&history.name).unwrap(), Some(history));
}

#[test]
fn replace_all_swaps_everything_but_identity() {
    let (_dir, catalog) = new_catalog();
    let old = backup("old", "2026-11-20T10:15:00Z");
    catalog.insert_backup(&old).unwrap();
    catalog.insert_files(&old.label, &[file(1, "old")]).unwrap();
    catalog.insert_wal(&wal(1)).unwrap();

    let full = backup("20261121-101500F", "2026-11-21T10:15:00Z");
    let mut orphan = backup("20261122-101500I", "2026-11-22T10:15:00Z");
    orphan.parent = Some("gone".into());
    let rebuilt = vec![
        (
            full.clone(),
            vec![file(1, &full.label), file(2, &full.label)],
        ),
        (orphan.clone(), vec![]),
    ];
    catalog.replace_all(&rebuilt, &[wal(2), wal(3)]).unwrap();
    assert_eq!(catalog.backups().unwrap(), [full.clone(), orphan]);
    assert_eq!(catalog.files(&full.label).unwrap().len(), 2);
    assert_eq!(catalog.wal_list().unwrap(), [wal(2), wal(3)]);
    assert_eq!(catalog.identity().unwrap(), identity());

    // A bad input leaves the catalog as it was.
    let twice = vec![(full.clone(), vec![]), (full.clone(), vec![])];
    assert_eq!(
        catalog.replace_all(&twice, &[]).unwrap_err().to_string(),
        "backup 20261121-101500F already exists"
    );
    assert_eq!(catalog.backups().unwrap().len(), 2);
    assert_eq!(catalog.wal_list().unwrap().len(), 2);
}

#[test]
fn damaged_rows_are_reported_not_panicked_on() {
    let (dir, catalog) = new_catalog();
    catalog
        .insert_backup(&backup("b", "2026-11-21T10:15:00Z"))
        .unwrap();
    let raw = rusqlite::Connection::open(dir.path().join("catalog.db")).unwrap();
    raw.execute("UPDATE backup SET start_time = 'yesterday'", [])
        .unwrap();
    let err = catalog.backup("b").unwrap_err();
    assert!(matches!(err, CatalogError::Damaged { .. }), "{err:?}");
    assert!(err.to_string().contains("reading backup b"), "{err}");
    assert!(err.to_string().contains("\"yesterday\""), "{err}");
}

#[test]
fn concurrent_writers_do_not_see_locked_errors() {
    let (dir, catalog) = new_catalog();
    drop(catalog);
    let path = dir.path().join("catalog.db");
    let start = Arc::new(Barrier::new(3));
    let archiver = {
        let (path, start) = (path.clone(), start.clone());
        std::thread::spawn(move || {
            let catalog = Catalog::open(&path).unwrap();
            start.wait();
            for segno in 0..300 {
                assert_eq!(
                    catalog.insert_wal(&wal(segno)).unwrap(),
                    WalInsert::Inserted
                );
                assert!(matches!(
                    catalog.insert_wal(&wal(segno)).unwrap(),
                    WalInsert::AlreadyPresent(_)
                ));
            }
        })
    };
    let backups = |prefix: &'static str| {
        let (path, start) = (path.clone(), start.clone());
        std::thread::spawn(move || {
            let catalog = Catalog::open(&path).unwrap();
            start.wait();
            for i in 0..30 {
                let label = format!("{prefix}-{i:03}");
                catalog
                    .insert_backup(&backup(&label, "2026-11-21T10:15:00Z"))
                    .unwrap();
                let files: Vec<FileRecord> = (0..200).map(|n| file(n, &label)).collect();
                catalog.insert_files(&label, &files).unwrap();
                catalog
                    .set_status(&label, BackupStatus::Done, None)
                    .unwrap();
                assert_eq!(catalog.files(&label).unwrap().len(), 200);
                let _ = catalog.wal_list().unwrap();
            }
        })
    };
    let first = backups("a");
    let second = backups("b");
    for t in [archiver, first, second] {
        t.join().unwrap();
    }
    let catalog = Catalog::open(&path).unwrap();
    assert_eq!(catalog.wal_list().unwrap().len(), 300);
    assert_eq!(catalog.backups().unwrap().len(), 60);
}

#[test]
fn concurrent_opens_of_a_new_catalog() {
    let (dir, catalog) = new_catalog();
    drop(catalog);
    let path = dir.path().join("catalog.db");
    let threads: Vec<_> = (0..8)
        .map(|_| {
            let path = path.clone();
            std::thread::spawn(move || Catalog::open(&path).unwrap().identity().unwrap())
        })
        .collect();
    for t in threads {
        assert_eq!(t.join().unwrap(), identity());
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]

    #[test]
    fn records_round_trip_through_the_catalog(
        b in arb_backup(),
        files in prop::collection::vec(arb_file(), 0..20),
    ) {
        let (_dir, catalog) = new_catalog();
        catalog.insert_backup(&b).unwrap();
        prop_assert_eq!(catalog.backup(&b.label).unwrap(), Some(b.clone()));
        let mut files = files;
        files.sort_by(|a, b| a.path.cmp(&b.path));
        files.dedup_by(|a, b| a.path == b.path);
        catalog.insert_files(&b.label, &files).unwrap();
        prop_assert_eq!(catalog.files(&b.label).unwrap(), files);
    }
}

#[test]
#[ignore = "timing; run with --ignored --nocapture"]
fn insert_files_100k() {
    let (_dir, catalog) = new_catalog();
    let label = "20261121-101500F";
    catalog
        .insert_backup(&backup(label, "2026-11-21T10:15:00Z"))
        .unwrap();
    let files: Vec<FileRecord> = (0..100_000)
        .map(|i| FileRecord {
            kind: if i % 100 == 0 {
                FileKind::Dir
            } else {
                FileKind::File
            },
            ..file(i, label)
        })
        .collect();
    let started = Instant::now();
    catalog.insert_files(label, &files).unwrap();
    let inserted = started.elapsed();
    let started = Instant::now();
    assert_eq!(catalog.files(label).unwrap().len(), 100_000);
    let read = started.elapsed();
    let started = Instant::now();
    catalog.delete_backup(label).unwrap();
    println!(
        "100k files: insert {inserted:?}, read {read:?}, delete {:?}",
        started.elapsed()
    );
}

#[test]
fn one_catalog_shared_by_threads() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Catalog>();
    let (_dir, catalog) = new_catalog();
    catalog
        .insert_backup(&backup("b", "2026-11-21T10:15:00Z"))
        .unwrap();
    std::thread::scope(|s| {
        for t in 0..4u64 {
            let catalog = &catalog;
            s.spawn(move || {
                for i in 0..50 {
                    catalog.insert_wal(&wal(t * 100 + i)).unwrap();
                    assert!(catalog.backup("b").unwrap().is_some());
                }
            });
        }
    });
    assert_eq!(catalog.wal_list().unwrap().len(), 200);
}
