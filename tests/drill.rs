//! `pgkeep drill` against real clusters: a healthy repository passes with RTO and RPO and leaves
//! the live cluster alone; damaged WAL, a damaged page, a backup running beside it and a full
//! sandbox disk fail (or pass) cleanly, with nothing left behind.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

use crate::archive::find_stored;
use crate::harness::{chown_to_postgres, drill_leftovers, is_root, pg_bin, tree, Cluster, Run};

/// A cluster whose drills build their sandboxes in a directory of the test's own.
fn cluster_with_drill_dir() -> (Cluster, PathBuf) {
    let cluster = Cluster::new();
    let dir = cluster.dir.subdir("drill");
    cluster.set_config("drill", &format!("dir = \"{}\"", dir.display()));
    (cluster, dir)
}

fn json(run: &Run) -> Value {
    serde_json::from_str(&run.stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {run:?}"))
}

/// Names of the archived files, to see that a drill adds none.
fn archive_names(repo: &Path) -> Vec<String> {
    let mut names: Vec<String> = tree(&repo.join("archive"))
        .into_iter()
        .map(|(p, _)| p)
        .collect();
    names.sort();
    names
}

/// Lines of stderr that report an error (the others are progress).
fn error_lines(run: &Run) -> usize {
    run.stderr
        .lines()
        .filter(|l| l.starts_with("pgkeep: error:"))
        .count()
}

fn check<'a>(report: &'a Value, name: &str) -> &'a Value {
    report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no check {name}: {report}"))
}

#[test]
fn a_drill_of_a_healthy_repository_passes_reports_rto_and_rpo_and_leaves_the_live_cluster_alone() {
    let (mut cluster, drill_dir) = cluster_with_drill_dir();
    let ts_dir = cluster.dir.subdir("ts");
    cluster.execute(&format!(
        "CREATE TABLESPACE ts LOCATION '{}'; \
         CREATE TABLE t (id int PRIMARY KEY, v text) TABLESPACE ts; \
         INSERT INTO t SELECT g, md5(g::text) FROM generate_series(1, 1000) g; \
         CREATE DATABASE other; CREATE TABLE u AS SELECT generate_series(1, 50) AS id",
        ts_dir.display()
    ));
    let backup = cluster.backup("full");
    cluster.execute("INSERT INTO t SELECT g, md5(g::text) FROM generate_series(1001, 1200) g");
    let last_commit = cluster.query_text("SELECT now()::text");
    cluster.switch_wal_and_wait();
    let archived = archive_names(&cluster.repo);
    let mut live = cluster.client();

    let run = cluster.pgkeep(&["drill", "--json", "--keep"]);
    assert!(run.success(), "{run:?}");
    let report = json(&run);
    assert_eq!(report["backup"], backup["label"]);
    assert_eq!(report["status"], "passed", "{report}");
    assert!(report["message"].is_null(), "{report}");
    for key in [
        "restore_seconds",
        "recovery_seconds",
        "rto_seconds",
        "rpo_seconds",
    ] {
        assert!(report[key].as_f64().unwrap() >= 0.0, "{key}: {report}");
    }
    let to = &report["recovered_to"];
    assert!(to["lsn"].as_str().unwrap().contains('/'), "{report}");
    // The last replayed commit is the insert made after the backup (the restore point and WAL
    // switch are not commits).
    let replayed = chrono::DateTime::parse_from_rfc3339(to["time"].as_str().unwrap()).unwrap();
    let committed =
        chrono::DateTime::parse_from_str(&format!("{last_commit}00"), "%Y-%m-%d %H:%M:%S%.f%z")
            .unwrap();
    assert!(
        (replayed - committed).num_milliseconds().abs() < 1000,
        "{replayed} vs {committed}"
    );
    // 1200 rows of t, 50 of u: the replayed insert is there.
    assert_eq!(report["rows"], 1250, "{report}");
    for name in ["databases", "tables", "page checksums"] {
        assert_eq!(check(&report, name)["result"], "passed", "{report}");
    }
    // pg_amcheck needs PostgreSQL 14+ and a client of the server's major or newer.
    let amcheck = check(&report, "amcheck");
    match amcheck["result"].as_str() {
        Some("passed") => {}
        Some("skipped") => eprintln!("skipped pg_amcheck: {}", amcheck["detail"]),
        _ => panic!("{report}"),
    }

    // The kept sandbox was private: its own tablespace, socket and port, no TCP, no archiving.
    let sandbox = PathBuf::from(report["sandbox"].as_str().unwrap());
    assert!(sandbox.starts_with(&drill_dir), "{report}");
    let auto = fs::read_to_string(sandbox.join("data/postgresql.auto.conf")).unwrap();
    for line in ["listen_addresses = ''", "archive_mode = off", "ssl = off"] {
        assert!(auto.contains(line), "{auto}");
    }
    for link in fs::read_dir(sandbox.join("data/pg_tblspc")).unwrap() {
        let target = fs::read_link(link.unwrap().path()).unwrap();
        assert!(target.starts_with(&sandbox), "{}", target.display());
    }
    fs::remove_dir_all(&sandbox).unwrap();

    // The live cluster: its connection still works, its archive has nothing new.
    let n: i64 = live
        .query_one("SELECT count(*) FROM t", &[])
        .unwrap()
        .get(0);
    assert_eq!(n, 1200);
    assert_eq!(archive_names(&cluster.repo), archived);

    // show remembers the drill and gives the restorable window as times.
    let shown = cluster.backups();
    let last = &shown[0]["last_drill"];
    assert_eq!(last["status"], "passed", "{last}");
    assert_eq!(last["backup"], backup["label"]);
    assert!(last["rto_seconds"].as_f64().is_some(), "{last}");
    assert!(shown[0]["restorable_from_time"].is_string(), "{}", shown[0]);
    assert!(
        shown[0]["restorable_until_time"].is_string(),
        "{}",
        shown[0]
    );
    let text = cluster.pgkeep_ok(&["show"]).stdout;
    assert!(
        text.contains("last drill") && text.contains("passed, RTO"),
        "{text}"
    );
    assert!(text.contains("restorable from"), "{text}");

    // With the live cluster stopped, not one byte of its data directory or tablespace changes.
    drop(live);
    cluster.stop();
    cluster.set_config("pg", &format!("bin = \"{}\"", pg_bin().display()));
    // (A clean shutdown archives the live cluster's last segment: look at the archive after it.)
    let archived = archive_names(&cluster.repo);
    let (data_before, ts_before) = (tree(&cluster.data), tree(&ts_dir));
    let run = cluster.pgkeep(&["drill"]);
    assert!(run.success(), "{run:?}");
    assert!(run.stdout.contains("passed, RTO"), "{run:?}");
    assert!(run.stdout.contains("recovered to "), "{run:?}");
    assert!(
        tree(&cluster.data) == data_before,
        "the live data directory changed"
    );
    assert!(tree(&ts_dir) == ts_before, "the live tablespace changed");
    assert_eq!(archive_names(&cluster.repo), archived);
    assert_eq!(drill_leftovers(&drill_dir), Vec::<String>::new());
    cluster.start();
    assert_eq!(cluster.query_text("SELECT count(*)::text FROM t"), "1200");
}

#[test]
fn a_flipped_bit_in_an_archived_segment_the_replay_needs_fails_the_drill_naming_it() {
    let (cluster, drill_dir) = cluster_with_drill_dir();
    cluster.execute(
        "CREATE TABLE t AS SELECT g AS id, md5(g::text) AS v FROM generate_series(1, 20000) g",
    );
    cluster.backup("full");
    cluster.execute("INSERT INTO t SELECT g, md5(g::text) FROM generate_series(1, 20000) g");
    let segment = cluster.switch_wal_and_wait();
    crate::harness::corrupt_stored_object(&find_stored(&cluster.repo, &segment));

    let run = cluster.pgkeep(&["drill", "--json"]);
    assert_eq!(run.code, Some(3), "{run:?}");
    let report = json(&run);
    assert_eq!(report["status"], "failed", "{report}");
    let message = report["message"].as_str().unwrap();
    assert!(message.contains(&segment), "{message}");
    assert!(
        run.stderr.contains("drill of backup") && run.stderr.contains(&segment),
        "{run:?}"
    );
    assert_eq!(error_lines(&run), 1, "{run:?}");
    assert_eq!(drill_leftovers(&drill_dir), Vec::<String>::new());
    let last = &cluster.backups()[0]["last_drill"];
    assert_eq!(last["status"], "failed", "{last}");
    assert!(
        last["message"].as_str().unwrap().contains(&segment),
        "{last}"
    );
}

#[test]
fn a_damaged_page_in_a_stored_file_fails_the_drill_naming_file_and_block() {
    let (mut cluster, drill_dir) = cluster_with_drill_dir();
    cluster.execute("CREATE TABLE t AS SELECT g AS id, md5(g::text) AS v FROM generate_series(1, 5000) g; CHECKPOINT;");
    let path = cluster.query_text("SELECT pg_relation_filepath('t')");
    // Damaged on the live disk before the backup: the backup reports it and stores the page as
    // it is, so only reading the stored copy back (as the drill does) shows the damage.
    cluster.stop();
    let file = cluster.data.join(&path);
    let mut bytes = fs::read(&file).unwrap();
    bytes[3 * 8192 + 5000] ^= 0x40;
    fs::write(&file, bytes).unwrap();
    cluster.start();
    let b = cluster.backup("full");
    assert_eq!(b["page_checksum_failures"], 1);
    cluster.switch_wal_and_wait();

    let run = cluster.pgkeep(&["drill"]);
    assert_eq!(run.code, Some(3), "{run:?}");
    let named = format!("{path} block 3");
    assert!(run.stderr.contains(&named), "{run:?}");
    assert!(run.stderr.contains("page checksums"), "{run:?}");
    assert!(run.stdout.contains("FAIL page checksums"), "{run:?}");
    assert_eq!(drill_leftovers(&drill_dir), Vec::<String>::new());
}

#[test]
fn a_drill_beside_a_running_backup_restores_the_newest_finished_one() {
    let (cluster, drill_dir) = cluster_with_drill_dir();
    cluster.pg_tool_ok("pgbench", &["-i", "-s", "8", "-q"]);
    let first = cluster.backup("full");
    // A backup that runs while the drill restores: restore takes no lock, and a RUNNING backup
    // is never chosen.
    let mut backup = crate::harness::user_command(&cluster.pgkeep_bin)
        .arg("--config")
        .arg(&cluster.config)
        .args(["backup", "--type", "full"])
        .current_dir(cluster.dir.path())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !cluster.backups().iter().any(|b| b["status"] == "RUNNING") {
        assert!(std::time::Instant::now() < deadline, "no RUNNING backup");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let run = cluster.pgkeep(&["drill", "--json"]);
    assert!(backup.wait().unwrap().success(), "the backup must finish");
    assert!(run.success(), "{run:?}");
    let report = json(&run);
    assert_eq!(report["backup"], first["label"], "{report}");
    assert_eq!(report["status"], "passed", "{report}");
    assert_eq!(drill_leftovers(&drill_dir), Vec::<String>::new());
}

/// Unmounts a tmpfs when the test ends, however it ends.
struct Mount(PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
fn a_drill_into_a_full_disk_fails_cleanly_and_leaves_no_sandbox() {
    if !is_root() {
        eprintln!("skipped: mounting a small tmpfs needs root");
        return;
    }
    let (cluster, drill_dir) = cluster_with_drill_dir();
    let status = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=8m", "tmpfs"])
        .arg(&drill_dir)
        .status()
        .unwrap();
    assert!(status.success(), "mount -t tmpfs failed");
    let _mount = Mount(drill_dir.clone());
    chown_to_postgres(&drill_dir);
    cluster.execute(
        "CREATE TABLE t AS SELECT g AS id, md5(g::text) AS v FROM generate_series(1, 100000) g",
    );
    cluster.backup("full");

    let run = cluster.pgkeep(&["drill"]);
    assert_eq!(run.code, Some(3), "{run:?}");
    assert!(run.stderr.contains("No space left on device"), "{run:?}");
    assert_eq!(error_lines(&run), 1, "{run:?}");
    assert_eq!(drill_leftovers(&drill_dir), Vec::<String>::new());
    let last = &cluster.backups()[0]["last_drill"];
    assert_eq!(last["status"], "failed", "{last}");
}
