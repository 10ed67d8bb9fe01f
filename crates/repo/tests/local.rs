//! Behaviour only the local filesystem backend has: temporary files on disk and their cleanup.

use std::io::Write;

use pgkeep_repo::{put_bytes, LocalStorage, MemoryStorage, Storage, StorageError, SyncMethod};

fn names(dir: &std::path::Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    v.sort();
    v
}

#[test]
fn pending_writes_go_to_a_hidden_temp_file_next_to_the_target() {
    let dir = tempfile::tempdir().unwrap();
    let s = LocalStorage::new(dir.path());
    let mut p = s.create("a/b.lz4").unwrap();
    p.write_all(b"partial").unwrap();
    p.flush().unwrap();
    let on_disk = names(&dir.path().join("a"));
    assert_eq!(on_disk.len(), 1);
    assert!(on_disk[0].starts_with(".b.lz4.pgkeep-tmp."), "{on_disk:?}");
    assert!(s.list("").unwrap().is_empty());
    p.commit().unwrap();
    assert_eq!(names(&dir.path().join("a")), ["b.lz4"]);

    let p = s.create("a/c").unwrap();
    drop(p);
    assert_eq!(
        names(&dir.path().join("a")),
        ["b.lz4"],
        "dropped temp file left behind"
    );

    let mut p = s.create("a/b.lz4").unwrap();
    p.write_all(b"again").unwrap();
    assert!(p.commit_new().is_err());
    assert_eq!(
        names(&dir.path().join("a")),
        ["b.lz4"],
        "losing temp file left behind"
    );
}

#[test]
fn stale_temps_of_dead_writers_are_removed() {
    let dir = tempfile::tempdir().unwrap();
    let s = LocalStorage::new(dir.path());
    put_bytes(&s, "archive/1/x.lz4", b"x").unwrap();
    let a = dir.path().join("archive/1");
    // Above any pid_max, so certainly not a running process: what SIGKILL mid-write leaves.
    std::fs::write(a.join(".y.lz4.pgkeep-tmp.2147483646.0"), b"half").unwrap();
    std::fs::create_dir_all(dir.path().join("backup/L")).unwrap();
    std::fs::write(
        dir.path().join("backup/L/.m.pgkeep-tmp.2147483646.3"),
        b"half",
    )
    .unwrap();
    // Our own pending write must survive.
    let mut live = s.create("archive/1/z.lz4").unwrap();
    live.write_all(b"in flight").unwrap();
    // Files that merely look similar are objects, not temps.
    std::fs::write(a.join(".psql_history"), b"keep").unwrap();

    assert_eq!(
        s.list("").unwrap(),
        ["archive/1/.psql_history", "archive/1/x.lz4"]
    );
    assert_eq!(s.remove_stale_temps("archive").unwrap(), 1);
    assert_eq!(s.remove_stale_temps("").unwrap(), 1);
    assert_eq!(s.remove_stale_temps("").unwrap(), 0);
    live.commit().unwrap();
    assert_eq!(
        s.list("").unwrap(),
        [
            "archive/1/.psql_history",
            "archive/1/x.lz4",
            "archive/1/z.lz4"
        ]
    );
    assert_eq!(names(&a), [".psql_history", "x.lz4", "z.lz4"]);
}

#[test]
fn a_file_in_the_way_of_a_directory_is_an_error_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let s = LocalStorage::new(dir.path());
    put_bytes(&s, "a", b"file").unwrap();
    let err = put_bytes(&s, "a/b", b"x").unwrap_err();
    assert_eq!(err.key(), "a/b");
    assert_eq!(s.list("").unwrap(), ["a"]);
}

#[test]
fn symlinked_root_works() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("real")).unwrap();
    std::os::unix::fs::symlink(dir.path().join("real"), dir.path().join("link")).unwrap();
    let s = LocalStorage::new(dir.path().join("link"));
    put_bytes(&s, "k/v", b"1").unwrap();
    assert_eq!(s.list("").unwrap(), ["k/v"]);
    assert_eq!(s.root(), dir.path().join("link"));
}

/// Regression (#13, item 7): syncfs reports a writeback error only to a descriptor opened
/// before it; `sync` used to open the root just before its syncfs. The descriptor it syncs
/// through must be the one taken at the first write: with the root's name gone since, a sync
/// that opened the root anew fails.
#[test]
fn sync_goes_through_the_root_descriptor_taken_before_the_first_write() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("repo");
    let s = LocalStorage::with_sync_method(&root, SyncMethod::Syncfs);
    let mut p = s.create("backup/x/data/1.lz4").unwrap();
    p.write_all(b"bytes").unwrap();
    p.commit_unsynced().unwrap();
    std::fs::rename(&root, dir.path().join("moved")).unwrap();
    s.sync().unwrap();
    // A storage that wrote nothing has no descriptor and must name the missing root.
    let fresh = LocalStorage::with_sync_method(&root, SyncMethod::Syncfs);
    assert!(fresh.sync().is_err());
}

/// Regression (#13, item 7): where syncfs cannot report errors, `sync` fsyncs each object
/// committed unsynced since the last sync, and an fsync error fails it, naming the object.
#[test]
fn without_syncfs_errors_sync_fsyncs_each_unsynced_object_and_fails_on_error() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("repo");
    let s = LocalStorage::with_sync_method(&root, SyncMethod::FsyncEach);
    for key in ["a/1", "a/2", "b/3"] {
        let mut p = s.create(key).unwrap();
        p.write_all(key.as_bytes()).unwrap();
        p.commit_unsynced().unwrap();
    }
    // An object fsync refuses (fsync of /dev/null fails with EINVAL) stands for one whose
    // writeback failed.
    let broken = root.join("a/2");
    std::fs::remove_file(&broken).unwrap();
    std::os::unix::fs::symlink("/dev/null", &broken).unwrap();
    let err = s.sync().unwrap_err();
    assert_eq!(err.key(), "a/2", "{err}");

    // Only what was committed unsynced since the last sync is fsynced again.
    let s = LocalStorage::with_sync_method(&root, SyncMethod::FsyncEach);
    let mut p = s.create("c/4").unwrap();
    p.write_all(b"4").unwrap();
    p.commit_unsynced().unwrap();
    s.sync().unwrap();
    // Committed with its own fsync: not tracked.
    put_bytes(&s, "c/5", b"5").unwrap();
    let four = root.join("c/4");
    std::fs::remove_file(&four).unwrap();
    std::os::unix::fs::symlink("/dev/null", &four).unwrap();
    s.sync().unwrap();
}

#[test]
fn sync_object_fsyncs_a_committed_object_and_names_a_missing_one() {
    let dir = tempfile::tempdir().unwrap();
    let s = LocalStorage::new(dir.path());
    put_bytes(&s, "archive/1/seg.lz4", b"seg").unwrap();
    s.sync_object("archive/1/seg.lz4").unwrap();
    let err = s.sync_object("archive/1/other.lz4").unwrap_err();
    assert!(
        matches!(&err, StorageError::NotFound { key } if key == "archive/1/other.lz4"),
        "{err}"
    );
    let memory = MemoryStorage::new();
    put_bytes(&memory, "k", b"v").unwrap();
    memory.sync_object("k").unwrap();
    assert!(matches!(
        memory.sync_object("absent"),
        Err(StorageError::NotFound { .. })
    ));
}
