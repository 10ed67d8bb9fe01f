//! `pgkeep restore` and point-in-time recovery against real clusters.

use std::fs;
use std::path::Path;
use std::time::Duration;

use crate::harness::{tree, Cluster, Run};

/// The server's clock now, as text with an explicit offset.
pub(crate) fn server_now(cluster: &Cluster) -> String {
    cluster.query_text(
        "SELECT to_char(clock_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS.US') || '+00'",
    )
}

/// Nothing at all under `dir` (or `dir` absent).
fn is_empty_or_absent(dir: &Path) -> bool {
    fs::read_dir(dir)
        .map(|mut d| d.next().is_none())
        .unwrap_or(true)
}

#[test]
fn restore_to_a_time_brings_back_deleted_rows() {
    let mut cluster = Cluster::new();
    cluster.execute("CREATE TABLE t (id int PRIMARY KEY, v text); INSERT INTO t SELECT g, md5(g::text) FROM generate_series(1, 100) g;");
    cluster.backup("full");
    std::thread::sleep(Duration::from_millis(300));
    let t = server_now(&cluster);
    std::thread::sleep(Duration::from_millis(300));
    cluster.execute("DELETE FROM t WHERE id <= 10");
    cluster.switch_wal_and_wait();
    cluster.stop_and_wipe();
    let run = cluster.restore(&["--target-time", &t, "--target-action", "promote"]);
    assert!(run.success(), "{run:?}");
    let auto = fs::read_to_string(cluster.data.join("postgresql.auto.conf")).unwrap();
    assert!(
        auto.contains("recovery_target_time = '") && auto.contains("+00:00'"),
        "{auto}"
    );
    assert!(cluster.data.join("recovery.signal").exists());
    cluster.start();
    cluster.wait_promoted();
    assert_eq!(cluster.query_text("SELECT count(*)::text FROM t"), "100");
}

#[test]
fn restore_to_an_lsn_stops_right_there() {
    let mut cluster = Cluster::new();
    cluster.execute("CREATE TABLE t (id int); INSERT INTO t SELECT generate_series(1, 100)");
    cluster.backup("full");
    cluster.execute("INSERT INTO t SELECT generate_series(101, 200)");
    let lsn = cluster.query_text("SELECT pg_current_wal_lsn()::text");
    cluster.execute("INSERT INTO t SELECT generate_series(201, 300)");
    cluster.switch_wal_and_wait();
    cluster.stop_and_wipe();
    let run = cluster.restore(&["--target-lsn", &lsn, "--target-action", "promote"]);
    assert!(run.success(), "{run:?}");
    let auto = fs::read_to_string(cluster.data.join("postgresql.auto.conf")).unwrap();
    assert!(
        auto.contains(&format!("recovery_target_lsn = '{lsn}'")),
        "{auto}"
    );
    cluster.start();
    cluster.wait_promoted();
    assert_eq!(cluster.query_text("SELECT count(*)::text FROM t"), "200");
}

#[test]
fn restore_to_a_time_after_a_backup_under_load_matches_fingerprints() {
    let mut cluster = Cluster::new();
    cluster.pg_tool_ok("pgbench", &["-i", "-s", "3", "-q"]);
    std::thread::scope(|s| {
        let load = s.spawn(|| cluster.pg_tool("pgbench", &["-c", "2", "-T", "5", "-n"]));
        std::thread::sleep(Duration::from_millis(500));
        cluster.backup("full");
        assert!(load.join().unwrap().success());
    });
    // Writes paused around T: the fingerprints taken now hold at T.
    let before = cluster.pgbench_fingerprints();
    std::thread::sleep(Duration::from_millis(300));
    let t = server_now(&cluster);
    std::thread::sleep(Duration::from_millis(300));
    cluster.pg_tool_ok("pgbench", &["-c", "2", "-t", "300", "-n"]);
    cluster.switch_wal_and_wait();
    cluster.stop_and_wipe();
    let run = cluster.restore(&["--target-time", &t, "--target-action", "promote"]);
    assert!(run.success(), "{run:?}");
    cluster.start();
    cluster.wait_promoted();
    let after = cluster.pgbench_fingerprints();
    assert_eq!(before, after);
    check_restored_cluster(&mut cluster);
}

/// Pages of the restored cluster are sound; the cluster keeps running.
fn check_restored_cluster(cluster: &mut Cluster) {
    cluster.check_pages_and_stop();
    cluster.start();
}

#[test]
fn restore_without_target_replays_to_the_end_of_the_archive() {
    let mut cluster = Cluster::new();
    cluster.execute("CREATE TABLE t (id int); INSERT INTO t SELECT generate_series(1, 50);");
    cluster.backup("full");
    cluster.execute("INSERT INTO t SELECT generate_series(51, 80);");
    cluster.switch_wal_and_wait();
    cluster.stop_and_wipe();
    let run = cluster.restore(&[]);
    assert!(run.success(), "{run:?}");
    cluster.start();
    cluster.wait_promoted();
    assert_eq!(cluster.query_text("SELECT count(*)::text FROM t"), "80");
    check_restored_cluster(&mut cluster);
}

#[test]
fn restore_refuses_bad_targets_and_directories_and_writes_nothing() {
    let cluster = Cluster::new();
    cluster.backup("full");
    let dest = cluster.dir.path().join("restored");
    let before_every_backup = "2001-01-01 00:00:00+00";
    let run = cluster.pgkeep(&[
        "restore",
        "--pgdata",
        dest.to_str().unwrap(),
        "--target-time",
        before_every_backup,
    ]);
    assert_one_line(&run, "earliest restorable time");
    assert!(is_empty_or_absent(&dest));
    // A non-empty directory.
    let busy = cluster.dir.subdir("busy");
    cluster.dir.write("busy/keepme", "x");
    let run = cluster.pgkeep(&["restore", "--pgdata", busy.to_str().unwrap()]);
    assert_one_line(&run, "not empty");
    assert_eq!(fs::read_dir(&busy).unwrap().count(), 1);
    // The live cluster's own data directory, postmaster running.
    let run = cluster.pgkeep(&[
        "restore",
        "--pgdata",
        cluster.data.to_str().unwrap(),
        "--delta",
    ]);
    assert_one_line(&run, "postmaster");
    // An unknown label.
    let run = cluster.pgkeep(&[
        "restore",
        "--pgdata",
        dest.to_str().unwrap(),
        "--backup",
        "20000101-000000F",
    ]);
    assert_one_line(&run, "20000101-000000F");
    assert!(is_empty_or_absent(&dest));
}

fn assert_one_line(run: &Run, needle: &str) {
    assert_eq!(run.code, Some(1), "{run:?}");
    assert_eq!(run.stderr.lines().count(), 1, "{run:?}");
    assert!(run.stderr.contains(needle), "expected {needle:?}: {run:?}");
}

#[test]
fn delta_restore_over_a_diverged_copy_is_byte_identical_to_a_fresh_restore() {
    let mut cluster = Cluster::new();
    cluster.pg_tool_ok("pgbench", &["-i", "-s", "2", "-q"]);
    cluster.backup("full");
    // The live cluster diverges: more writes, a new table, a checkpoint.
    cluster.pg_tool_ok("pgbench", &["-c", "1", "-t", "500", "-n"]);
    cluster.execute("CREATE TABLE extra AS SELECT generate_series(1, 10000) AS id; CHECKPOINT;");
    cluster.stop();
    let fresh = cluster.dir.path().join("fresh");
    let run = cluster.pgkeep(&[
        "restore",
        "--pgdata",
        fresh.to_str().unwrap(),
        "--target",
        "immediate",
        "--target-action",
        "promote",
    ]);
    assert!(run.success(), "{run:?}");
    let run = cluster.pgkeep(&[
        "restore",
        "--pgdata",
        cluster.data.to_str().unwrap(),
        "--delta",
        "--target",
        "immediate",
        "--target-action",
        "promote",
    ]);
    assert!(run.success(), "{run:?}");
    assert!(run.stdout.contains("kept"), "{run:?}");
    let a = tree(&fresh);
    let b = tree(&cluster.data);
    let names = |t: &[(String, Vec<u8>)]| t.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>();
    assert_eq!(names(&a), names(&b), "different file sets");
    for ((name, x), (_, y)) in a.iter().zip(&b) {
        assert!(x == y, "{name} differs");
    }
    cluster.start();
    cluster.wait_promoted();
    assert_eq!(
        cluster.query_text("SELECT count(*)::text FROM pgbench_accounts"),
        "200000"
    );
}

#[test]
fn restore_as_root_gives_files_their_recorded_owner_and_keeps_the_archiver_working() {
    if !crate::harness::is_root() {
        eprintln!("skipped: only meaningful when the tests run as root");
        return;
    }
    use std::os::unix::fs::MetadataExt;
    let cluster = Cluster::new();
    cluster.backup("full");
    let dest = cluster.dir.path().join("as-root");
    let out = std::process::Command::new(&cluster.pgkeep_bin)
        .arg("--config")
        .arg(&cluster.config)
        .args(["restore", "--pgdata", dest.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let owner = fs::metadata(cluster.data.join("PG_VERSION")).unwrap().uid();
    assert_ne!(owner, 0);
    for rel in [
        "",
        "PG_VERSION",
        "global/pg_control",
        "base",
        "postgresql.auto.conf",
        "backup_label",
    ] {
        assert_eq!(
            fs::metadata(dest.join(rel)).unwrap().uid(),
            owner,
            "{rel} not owned by the cluster owner"
        );
    }
    for e in fs::read_dir(&cluster.repo).unwrap() {
        let e = e.unwrap();
        assert_ne!(
            e.metadata().unwrap().uid(),
            0,
            "{:?} is owned by root",
            e.path()
        );
    }
    // The archiver (running as the cluster owner) still writes into the catalog.
    cluster.switch_wal_and_wait();
}
