//! `pgkeep validate` and `pgkeep catalog rebuild` against real clusters and damaged repositories.
//!
//! The repository belongs to the `postgres` user: these tests change its files only through
//! writes to existing files and removals (which keep ownership) and never open the catalog
//! themselves, since SQLite would leave root-owned files beside it that break the archiver.

use std::fs;
use std::path::{Path, PathBuf};

use pgkeep_pg::{Lsn, WalFileName, WalSegSize};

use crate::harness::{corrupt_stored_object, Cluster, Run};

fn assert_one_line_error(run: &Run, needle: &str) {
    assert_eq!(run.code, Some(1), "{run:?}");
    assert_eq!(run.stderr.lines().count(), 1, "{run:?}");
    assert!(run.stderr.contains(needle), "expected {needle:?}: {run:?}");
}

fn status_of(cluster: &Cluster, label: &str) -> String {
    cluster
        .backups()
        .into_iter()
        .find(|b| b["label"] == label)
        .unwrap_or_else(|| panic!("backup {label} not listed"))["status"]
        .as_str()
        .unwrap()
        .to_string()
}

/// Every file under `root`.
fn walk_files(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out
}

/// Stored WAL segments (not .backup or .history files), by name, oldest first.
fn stored_segments(cluster: &Cluster) -> Vec<(String, PathBuf)> {
    let mut out: Vec<(String, PathBuf)> = walk_files(&cluster.repo.join("archive"))
        .into_iter()
        .filter_map(|p| {
            let name = p.file_name()?.to_str()?;
            let seg = name.strip_suffix(".lz4").filter(|n| n.len() == 24)?;
            Some((seg.to_string(), p.clone()))
        })
        .collect();
    out.sort();
    out
}

/// The LSN at which a segment starts, as `show --json` prints LSNs.
fn segment_start(name: &str) -> String {
    let seg = WalSegSize::new(16 << 20).unwrap();
    let segno = WalFileName::parse(name, seg).unwrap().segno().unwrap();
    Lsn::from_segment(segno, seg).to_string()
}

/// The largest stored data file of a backup.
fn largest_stored_file(cluster: &Cluster, label: &str) -> (String, PathBuf) {
    let data = cluster.repo.join("backup").join(label).join("data");
    cluster
        .stored_paths(label)
        .into_iter()
        .map(|rel| {
            let p = data.join(format!("{rel}.lz4"));
            (rel, p)
        })
        .max_by_key(|(_, p)| fs::metadata(p).unwrap().len())
        .unwrap()
}

fn catalog_files(repo: &Path) -> Vec<PathBuf> {
    ["catalog.db", "catalog.db-wal", "catalog.db-shm"]
        .iter()
        .map(|n| repo.join(n))
        .collect()
}

#[test]
fn an_intact_repository_validates_ok_and_records_it_in_a_new_status_object() {
    let cluster = Cluster::new();
    cluster.execute("CREATE TABLE t AS SELECT generate_series(1, 20000) AS id");
    let b = cluster.backup("full");
    let label = b["label"].as_str().unwrap();
    assert_eq!(b["status"], "DONE");
    cluster.switch_wal_and_wait();

    let run = cluster.pgkeep(&["validate"]);
    assert!(run.success(), "{run:?}");
    assert!(
        run.stdout
            .contains(&format!("backup {label} OK (was DONE)")),
        "{run:?}"
    );
    assert_eq!(status_of(&cluster, label), "OK");
    // backup.ini is written once (objects are never rewritten); the change is a new object.
    let dir = cluster.repo.join("backup").join(label);
    let ini = fs::read_to_string(dir.join("backup.ini")).unwrap();
    assert!(ini.contains("\nSTATUS=DONE\n"), "{ini}");
    let changes: Vec<String> = fs::read_dir(dir.join("status"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(changes, ["0000000001-OK"]);

    // Again, and for the one label: OK stays OK.
    let run = cluster.pgkeep(&["validate", label]);
    assert!(run.success(), "{run:?}");
    assert_eq!(status_of(&cluster, label), "OK");

    // The window reaches past the backup's stop into the switched segment.
    let shown = &cluster.backups()[0];
    let until: Lsn = shown["restorable_until"].as_str().unwrap().parse().unwrap();
    let stop: Lsn = shown["stop_lsn"].as_str().unwrap().parse().unwrap();
    assert!(until > stop, "{shown}");
    assert_eq!(shown["restorable_windows"][0]["timeline"], 1, "{shown}");

    let run = cluster.pgkeep(&["validate", "20990101-000000F"]);
    assert_one_line_error(&run, "20990101-000000F");
}

#[test]
fn a_flipped_byte_in_a_stored_file_makes_the_backup_corrupt_and_unrestorable() {
    let cluster = Cluster::new();
    cluster.pg_tool_ok("pgbench", &["-i", "-s", "1", "-q"]);
    let good = cluster.backup("full");
    let bad = cluster.backup("full");
    let good = good["label"].as_str().unwrap();
    let bad = bad["label"].as_str().unwrap();
    let (rel, stored) = largest_stored_file(&cluster, bad);
    corrupt_stored_object(&stored);

    let run = cluster.pgkeep(&["validate"]);
    assert_eq!(run.code, Some(3), "{run:?}");
    assert!(
        run.stdout.contains(&format!("backup {bad} CORRUPT")),
        "{run:?}"
    );
    assert!(run.stdout.contains(&format!("  {rel}: ")), "{run:?}");
    assert!(run.stderr.contains("validate found 1 problem"), "{run:?}");
    assert_eq!(status_of(&cluster, bad), "CORRUPT");
    assert_eq!(status_of(&cluster, good), "OK");

    // Validating it again keeps it CORRUPT (CORRUPT to CORRUPT is no transition).
    let run = cluster.pgkeep(&["validate", bad]);
    assert_eq!(run.code, Some(3), "{run:?}");
    assert_eq!(status_of(&cluster, bad), "CORRUPT");

    let dest = cluster.dir.path().join("restored");
    let run = cluster.pgkeep(&[
        "restore",
        "--pgdata",
        dest.to_str().unwrap(),
        "--backup",
        bad,
    ]);
    assert_one_line_error(&run, "CORRUPT");
    assert!(!dest.exists() || fs::read_dir(&dest).unwrap().next().is_none());
}

#[test]
fn a_truncated_and_a_deleted_segment_are_reported_the_gap_with_the_window_it_cuts() {
    let cluster = Cluster::new();
    cluster.execute("CREATE TABLE t (id int)");
    let b = cluster.backup("full");
    let label = b["label"].as_str().unwrap();
    let stop_wal = b["stop_wal"].as_str().unwrap().to_string();
    for i in 0..5 {
        cluster.execute(&format!("INSERT INTO t VALUES ({i})"));
        cluster.switch_wal_and_wait();
    }
    let after: Vec<(String, PathBuf)> = stored_segments(&cluster)
        .into_iter()
        .filter(|(name, _)| *name > stop_wal)
        .collect();
    assert!(after.len() >= 5, "{after:?}");
    // Deleted first, truncated later: the gap is what ends the backup's window.
    let (deleted, deleted_path) = &after[1];
    let (truncated, truncated_path) = &after[3];
    fs::remove_file(deleted_path).unwrap();
    let bytes = fs::read(truncated_path).unwrap();
    fs::write(truncated_path, &bytes[..bytes.len() / 2]).unwrap();

    // show sees the deleted object without reading any segment.
    let cut_at = segment_start(deleted);
    assert_eq!(cluster.backups()[0]["restorable_until"], cut_at.as_str());

    let run = cluster.pgkeep(&["validate"]);
    assert_eq!(run.code, Some(3), "{run:?}");
    assert!(
        run.stdout
            .lines()
            .any(|l| l.starts_with(&format!("  WAL {truncated}: damaged"))),
        "{run:?}"
    );
    let gap_line = run
        .stdout
        .lines()
        .find(|l| {
            l.starts_with(&format!(
                "  WAL gap on timeline 1: {deleted} (1 segment missing)"
            ))
        })
        .unwrap_or_else(|| panic!("no gap line: {run:?}"));
    assert!(
        gap_line.contains(&format!(
            "cuts the restorable window of backup {label} on timeline 1 at {cut_at}"
        )),
        "{run:?}"
    );
    assert!(
        !run.stdout.contains(&format!("  WAL {deleted}:")),
        "a missing segment is a gap, not a damaged file: {run:?}"
    );
    // The backup itself is whole: the damage is after its stop.
    assert!(
        run.stdout.contains(&format!("backup {label} OK")),
        "{run:?}"
    );
    assert_eq!(status_of(&cluster, label), "OK");
}

#[test]
fn a_deleted_catalog_is_rebuilt_from_the_repository_alone() {
    let mut cluster = Cluster::new();
    cluster.pg_tool_ok("pgbench", &["-i", "-s", "1", "-q"]);
    cluster.backup("full");
    cluster.pgkeep_ok(&["validate"]);
    cluster.pg_tool_ok("pgbench", &["-c", "1", "-t", "200", "-n"]);
    cluster.backup("full");
    cluster.switch_wal_and_wait();
    cluster.stop();
    // Everything but when the last WAL was archived, which the rebuild takes from the files'
    // modification times (a few microseconds before the archiver's catalog row): within 1 s.
    let shown = |c: &Cluster| -> (serde_json::Value, Vec<i64>) {
        let mut v: serde_json::Value =
            serde_json::from_str(&c.pgkeep_ok(&["show", "--json"]).stdout).unwrap();
        let mut times = Vec::new();
        for b in v["backups"].as_array_mut().unwrap() {
            let t = b["restorable_until_time"].take();
            times.push(
                chrono::DateTime::parse_from_rfc3339(t.as_str().unwrap())
                    .unwrap()
                    .timestamp(),
            );
        }
        (v, times)
    };
    let before = shown(&cluster);
    let statuses: Vec<_> = cluster
        .backups()
        .iter()
        .map(|b| b["status"].clone())
        .collect();
    assert_eq!(statuses, ["OK", "DONE"]);

    for f in catalog_files(&cluster.repo) {
        let _ = fs::remove_file(f);
    }
    let run = cluster.pgkeep(&["show"]);
    assert_one_line_error(&run, "pgkeep catalog rebuild");
    let run = cluster.pgkeep_ok(&["catalog", "rebuild"]);
    assert!(run.stdout.contains("created"), "{run:?}");
    assert_eq!(run.stderr, "", "{run:?}");
    let after = shown(&cluster);
    assert_eq!(after.0, before.0);
    for (a, b) in after.1.iter().zip(&before.1) {
        assert!((a - b).abs() <= 1, "{after:?} {before:?}");
    }

    // Rebuilding over an existing catalog changes nothing either.
    let run = cluster.pgkeep_ok(&["catalog", "rebuild"]);
    assert!(run.stdout.contains("rebuilt"), "{run:?}");
    let after = shown(&cluster);
    assert_eq!(after.0, before.0);
    for (a, b) in after.1.iter().zip(&before.1) {
        assert!((a - b).abs() <= 1, "{after:?} {before:?}");
    }

    // Every archived file is indexed with the checksums it was stored with.
    let run = cluster.pgkeep_ok(&["validate"]);
    let wal_objects = walk_files(&cluster.repo.join("archive")).len();
    assert!(
        run.stdout.contains("WAL archive: ")
            && run.stdout.contains(", 0 damaged or missing, 0 gap(s)"),
        "{run:?}"
    );
    let checked: usize = run
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("WAL archive: "))
        .and_then(|l| l.split_whitespace().next())
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(checked, wal_objects, "{run:?}");

    // The cluster archives into the rebuilt catalog again.
    cluster.start();
    cluster.switch_wal_and_wait();
}
