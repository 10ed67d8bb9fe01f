//! Diff and incr backups that read only the blocks the archived WAL (or, on PostgreSQL 17+ with
//! `summarize_wal = on`, the server's WAL summaries) says changed: restores identical to the live
//! cluster with either map and with `--scan`, the fallbacks on a damaged archive and on summaries
//! that do not cover the interval, and a map missing one block caught by the same checks.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use crate::harness::{
    corrupt_stored_object, server_major, user_command, Cluster, ClusterOptions, Run,
};
use crate::incremental::{connect_db, execute_db};

fn fingerprint_db(cluster: &Cluster, db: &str, table: &str, order_by: &str) -> String {
    connect_db(cluster, db)
        .query_one(
            &format!(
                "SELECT count(*) || ':' || coalesce(md5(string_agg(t::text, ',' ORDER BY {order_by})), '') FROM {table} t"
            ),
            &[],
        )
        .unwrap_or_else(|e| panic!("{db}: {table}: {e}"))
        .get(0)
}

/// Everything the scenario changes, as the live cluster shows it.
fn state(cluster: &Cluster) -> Vec<String> {
    let databases =
        cluster.query_text("SELECT string_agg(datname, ',' ORDER BY datname) FROM pg_database");
    let mut out = vec![databases.clone()];
    out.extend(cluster.pgbench_fingerprints());
    for table in ["ext", "pts", "moved", "flip", "trunc", "vf"] {
        // An unlogged table comes back empty from any restore: only its being unlogged counts.
        let persistence = cluster.query_text(&format!(
            "SELECT relpersistence::text FROM pg_class WHERE relname = '{table}'"
        ));
        out.push(match persistence.as_str() {
            "u" => "unlogged".to_string(),
            _ => fingerprint_db(cluster, "postgres", table, "id"),
        });
    }
    // Index scans through the hash and GiST indexes must find what the heap holds.
    let mut client = connect_db(cluster, "postgres");
    client.batch_execute("SET enable_seqscan = off").unwrap();
    for sql in [
        "SELECT count(*)::text FROM ext WHERE id = 77",
        "SELECT count(*)::text FROM pts WHERE p <@ box '((0,0),(500,50))'",
    ] {
        out.push(client.query_one(sql, &[]).unwrap().get(0));
    }
    out.push(cluster.query_text("SELECT pg_relation_size('ext')::text"));
    for db in ["wl", "fc"] {
        if databases.split(',').any(|d| d == db) {
            out.push(fingerprint_db(cluster, db, "t", "id"));
        }
    }
    out
}

/// `CREATE DATABASE` with an explicit strategy where PostgreSQL has them (15+); before 15
/// every database is copied file by file.
fn create_database(name: &str, strategy: &str) -> String {
    if server_major() >= 15 {
        format!("CREATE DATABASE {name} TEMPLATE tmpl STRATEGY {strategy}")
    } else {
        format!("CREATE DATABASE {name} TEMPLATE tmpl")
    }
}

/// The second line of `backup`'s output: where the changed pages came from.
fn pages_line(run: &Run) -> String {
    run.stdout
        .lines()
        .find(|l| l.starts_with("changed pages"))
        .unwrap_or_else(|| panic!("no changed-pages line: {run:?}"))
        .to_string()
}

/// Where a test expects a diff or incr to find its changed pages.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Source {
    Archive,
    /// The server's WAL summaries: PostgreSQL 17+ started with `summarize_wal = on`.
    Summaries,
    Scan,
}

impl Source {
    /// The words of the changed-pages line that name this source.
    fn named(self) -> &'static str {
        match self {
            Source::Archive => "from the WAL archive",
            Source::Summaries => "from WAL summaries",
            Source::Scan => "by page scan (--scan)",
        }
    }

    /// postgresql.conf lines for a cluster whose backups use this source.
    fn conf(self) -> Vec<String> {
        let mut conf = vec!["autovacuum = off".to_string()];
        if self == Source::Summaries {
            conf.push("summarize_wal = on".into());
        }
        conf
    }
}

/// WAL summaries exist from PostgreSQL 17 on; a test of them says so and passes on older ones.
fn skip_without_summaries() -> bool {
    if server_major() < 17 {
        eprintln!(
            "skipped: PostgreSQL {} keeps no WAL summaries (17+)",
            server_major()
        );
        return true;
    }
    false
}

fn take(cluster: &Cluster, kind: &str, scan: bool) -> (String, String) {
    let mut args = vec!["backup", "--type", kind];
    if scan {
        args.push("--scan");
    }
    let run = cluster.pgkeep_ok(&args);
    // Its size and time, for a reader of `--no-capture` output.
    println!("{}", run.stdout.lines().next().unwrap_or_default());
    let label = run.stdout.split_whitespace().nth(1).unwrap().to_string();
    let line = match kind {
        "full" => String::new(),
        _ => pages_line(&run),
    };
    (label, line)
}

/// Restore `label` into the wiped cluster, recover to the backup's end, promote, compare.
fn restore_and_compare(cluster: &mut Cluster, ts: &Path, label: &str, want: &[String]) {
    cluster.stop_and_wipe();
    fs::remove_dir_all(ts).unwrap();
    cluster.dir.subdir("ts");
    let run = cluster.restore(&[
        "--backup",
        label,
        "--target",
        "immediate",
        "--target-action",
        "promote",
        "--target-timeline",
        "current",
    ]);
    assert!(run.success(), "restore {label}: {run:?}");
    cluster.start();
    cluster.wait_promoted();
    assert_eq!(state(cluster), want, "restore of {label}");
    cluster.check_pages_and_stop();
}

/// full -> incr -> incr over pgbench, VACUUM FULL, TRUNCATE, CREATE/DROP DATABASE (both
/// strategies), SET TABLESPACE, SET UNLOGGED/LOGGED, hash and GiST indexes and a table
/// extended then truncated; each incr restores to what the live cluster held.
fn chain_over_storage_changes(source: Source) {
    let scan = source == Source::Scan;
    let mut cluster = Cluster::with(ClusterOptions {
        conf: source.conf(),
        ..ClusterOptions::default()
    });
    let ts: PathBuf = cluster.dir.subdir("ts");
    cluster.pg_tool_ok("pgbench", &["-i", "-s", "3", "-q"]);
    cluster.execute(&format!(
        "CREATE TABLE ext (id int, v text);
         INSERT INTO ext SELECT g, md5(g::text) FROM generate_series(1, 5000) g;
         CREATE INDEX ON ext USING hash (id);
         CREATE TABLE pts (id int, p point);
         INSERT INTO pts SELECT g, point(g % 1000, g % 97) FROM generate_series(1, 20000) g;
         CREATE INDEX ON pts USING gist (p);
         CREATE TABLE moved AS SELECT g AS id, md5(g::text) AS v FROM generate_series(1, 3000) g;
         CREATE TABLE flip AS SELECT g AS id FROM generate_series(1, 3000) g;
         CREATE TABLE trunc AS SELECT g AS id FROM generate_series(1, 3000) g;
         CREATE TABLE vf AS SELECT g AS id, md5(g::text) AS v FROM generate_series(1, 8000) g;
         CREATE TABLESPACE ts LOCATION '{}';
         CREATE DATABASE tmpl;
         CREATE DATABASE gone;",
        ts.display()
    ));
    execute_db(
        &cluster,
        "tmpl",
        "CREATE TABLE t AS SELECT g AS id, md5(g::text) AS v FROM generate_series(1, 4000) g",
    );
    cluster.execute("CHECKPOINT");
    take(&cluster, "full", scan);

    cluster.pg_tool_ok("pgbench", &["-t", "200", "-c", "2", "-n"]);
    cluster.execute(
        "INSERT INTO ext SELECT g, md5(g::text) FROM generate_series(5001, 40000) g;
         DELETE FROM ext WHERE id > 6000;
         VACUUM ext;
         UPDATE pts SET p = point(p[0] + 1, p[1]) WHERE id % 10 = 0;
         ALTER TABLE moved SET TABLESPACE ts;
         ALTER TABLE flip SET UNLOGGED;
         TRUNCATE trunc;
         INSERT INTO trunc SELECT g FROM generate_series(1, 500) g;
         DELETE FROM vf WHERE id % 3 = 0;
         VACUUM FULL vf;",
    );
    cluster.execute(&create_database("wl", "wal_log"));
    cluster.execute("DROP DATABASE gone");
    let (incr1, line1) = take(&cluster, "incr", scan);
    let want1 = state(&cluster);

    cluster.pg_tool_ok("pgbench", &["-t", "200", "-c", "2", "-n"]);
    cluster.execute(
        "ALTER TABLE flip SET LOGGED;
         INSERT INTO flip SELECT g FROM generate_series(3001, 3100) g;
         ALTER TABLE moved SET TABLESPACE pg_default;
         INSERT INTO ext SELECT g, 'again' FROM generate_series(6001, 30000) g;
         DELETE FROM ext WHERE id > 7000;
         VACUUM ext;
         UPDATE pts SET p = point(p[0], p[1] + 1) WHERE id % 7 = 0;",
    );
    cluster.execute(&create_database("fc", "file_copy"));
    execute_db(
        &cluster,
        "wl",
        "UPDATE t SET v = 'changed' WHERE id % 13 = 0",
    );
    let (incr2, line2) = take(&cluster, "incr", scan);
    let want2 = state(&cluster);
    println!("{line1}\n{line2}");
    for line in [&line1, &line2] {
        assert!(line.contains(source.named()), "{line}");
        assert!(!line.contains("WAL summaries not used"), "{line}");
        match source {
            Source::Scan => {}
            Source::Archive => {
                assert!(!line.contains(" 0 relation files not read"), "{line}");
                assert!(
                    !line.contains(" 0 fell back"),
                    "storage changes fall back: {line}"
                );
            }
            // Summaries give truncations as limit blocks, read by block from the limit on.
            Source::Summaries => {
                assert!(!line.contains(" 0 relation files not read"), "{line}");
                assert!(!line.contains(" 0 read by block"), "{line}");
            }
        }
    }
    restore_and_compare(&mut cluster, &ts, &incr2, &want2);
    restore_and_compare(&mut cluster, &ts, &incr1, &want1);
}

#[test]
fn a_chain_from_the_wal_archive_restores_storage_changes_exactly() {
    chain_over_storage_changes(Source::Archive);
}

#[test]
fn the_same_chain_with_the_page_scan_restores_exactly() {
    chain_over_storage_changes(Source::Scan);
}

#[test]
fn the_same_chain_from_wal_summaries_restores_exactly() {
    if skip_without_summaries() {
        return;
    }
    chain_over_storage_changes(Source::Summaries);
}

/// Summaries that begin after the parent's start (`summarize_wal` turned on once that WAL left
/// pg_wal) do not cover the interval: that incr reads the archive and says why; the next one uses the summaries.
#[test]
fn summaries_begun_after_the_parent_fall_back_to_the_archive() {
    if skip_without_summaries() {
        return;
    }
    // The harness keeps 2 GB of WAL; this test needs a checkpoint to remove segments.
    let mut cluster = Cluster::with(ClusterOptions {
        conf: vec!["wal_keep_size = 0".into()],
        ..ClusterOptions::default()
    });
    cluster.pg_tool_ok("pgbench", &["-i", "-s", "2", "-q"]);
    take(&cluster, "full", false);
    cluster.pg_tool_ok("pgbench", &["-t", "300", "-c", "2", "-n"]);
    // A summarizer turned on starts at the oldest segment left in pg_wal: once the segments
    // from the parent's start are archived and a checkpoint has removed them, the WAL between
    // the parent's start and there is summarized nowhere.
    cluster.switch_wal_and_wait();
    cluster.execute("CHECKPOINT");
    cluster.execute("ALTER SYSTEM SET summarize_wal = on");
    cluster.execute("SELECT pg_reload_conf()");
    cluster.pg_tool_ok("pgbench", &["-t", "300", "-c", "2", "-n"]);
    let (_, line1) = take(&cluster, "incr", false);
    assert!(line1.contains(Source::Archive.named()), "{line1}");
    assert!(
        line1.contains("[WAL summaries not used: the server's WAL summaries on timeline 1 from "),
        "{line1}"
    );
    cluster.pg_tool_ok("pgbench", &["-t", "300", "-c", "2", "-n"]);
    let (incr2, line2) = take(&cluster, "incr", false);
    println!("{line1}\n{line2}");
    assert!(line2.contains(Source::Summaries.named()), "{line2}");
    let want = cluster.pgbench_fingerprints();
    cluster.stop_and_wipe();
    let run = cluster.restore(&[
        "--backup",
        &incr2,
        "--target",
        "immediate",
        "--target-action",
        "promote",
    ]);
    assert!(run.success(), "{run:?}");
    cluster.start();
    cluster.wait_promoted();
    assert_eq!(cluster.pgbench_fingerprints(), want);
    cluster.check_pages_and_stop();
}

/// The archived object of WAL segment `name`.
fn archived_object(cluster: &Cluster, name: &str) -> PathBuf {
    let mut stack = vec![cluster.repo.join("archive")];
    while let Some(dir) = stack.pop() {
        for e in fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else if p.file_name().unwrap().to_str().unwrap().starts_with(name) {
                return p;
            }
        }
    }
    panic!("{name} not archived under {}", cluster.repo.display());
}

#[test]
fn a_damaged_segment_in_the_interval_makes_the_backup_scan() {
    let mut cluster = Cluster::new();
    cluster.pg_tool_ok("pgbench", &["-i", "-s", "2", "-q"]);
    take(&cluster, "full", false);
    cluster.pg_tool_ok("pgbench", &["-t", "300", "-c", "2", "-n"]);
    let damaged = cluster.switch_wal_and_wait();
    cluster.pg_tool_ok("pgbench", &["-t", "300", "-c", "2", "-n"]);
    corrupt_stored_object(&archived_object(&cluster, &damaged));
    let (incr, line) = take(&cluster, "incr", false);
    assert!(
        line.contains(&format!("by page scan (reading WAL segment {damaged}")),
        "{line}"
    );
    let want = state_pgbench(&cluster);
    cluster.stop_and_wipe();
    let run = cluster.restore(&[
        "--backup",
        &incr,
        "--target",
        "immediate",
        "--target-action",
        "promote",
    ]);
    assert!(run.success(), "{run:?}");
    cluster.start();
    cluster.wait_promoted();
    assert_eq!(state_pgbench(&cluster), want);
    cluster.check_pages_and_stop();
}

fn state_pgbench(cluster: &Cluster) -> Vec<String> {
    cluster.pgbench_fingerprints()
}

/// The checks above would notice a map that misses a change: with one changed block left out
/// (a debug-build hook), the restored table differs from the live one.
#[test]
fn a_map_missing_one_block_restores_different_data() {
    map_missing_one_block(Source::Archive);
}

#[test]
fn a_summaries_map_missing_one_block_restores_different_data() {
    if skip_without_summaries() {
        return;
    }
    map_missing_one_block(Source::Summaries);
}

fn map_missing_one_block(source: Source) {
    let mut cluster = Cluster::with(ClusterOptions {
        conf: source.conf(),
        ..ClusterOptions::default()
    });
    cluster.execute(
        "CREATE TABLE t AS SELECT g AS id, md5(g::text) AS v FROM generate_series(1, 2000) g;
         CHECKPOINT",
    );
    take(&cluster, "full", false);
    cluster.execute("UPDATE t SET v = 'changed' WHERE id = 1");
    let node = cluster.query_text("SELECT pg_relation_filenode('t')::text");
    let want = cluster.fingerprint("t", "id");
    let out = user_command(&cluster.pgkeep_bin)
        .current_dir(cluster.dir.path())
        .env("PGKEEP_TEST_DROP_BLOCK", format!("{node}/0"))
        .arg("--config")
        .arg(&cluster.config)
        .args(["backup", "--type", "incr"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let run = Run::from_output(out);
    assert!(run.success(), "{run:?}");
    assert!(pages_line(&run).contains(source.named()), "{run:?}");
    let label = run.stdout.split_whitespace().nth(1).unwrap().to_string();
    cluster.stop_and_wipe();
    let run = cluster.restore(&[
        "--backup",
        &label,
        "--target",
        "immediate",
        "--target-action",
        "promote",
    ]);
    assert!(run.success(), "{run:?}");
    cluster.start();
    cluster.wait_promoted();
    assert_ne!(
        cluster.fingerprint("t", "id"),
        want,
        "a restore without block 0's change still matched the live table"
    );
}
