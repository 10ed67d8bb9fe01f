//! Behaviour only the local filesystem backend has: temporary files on disk and their cleanup.

use std::io::Write;

use pgkeep_repo::{put_bytes, LocalStorage, Storage};

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
