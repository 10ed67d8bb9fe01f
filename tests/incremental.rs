//! `pgkeep backup --type diff|incr` (page-level) and the restore of backup chains.

use std::fs;

use serde_json::Value;

use crate::harness::{Cluster, ClusterOptions, Run};

/// A connection to database `db` of the cluster.
pub(crate) fn connect_db(cluster: &Cluster, db: &str) -> postgres::Client {
    postgres::Config::new()
        .host(cluster.sock.to_str().unwrap())
        .port(cluster.port)
        .user("postgres")
        .dbname(db)
        .connect(postgres::NoTls)
        .unwrap_or_else(|e| panic!("connect to database {db}: {e}"))
}

/// First column of a one-row query in database `db`, as text.
fn query_db(cluster: &Cluster, db: &str, sql: &str) -> String {
    connect_db(cluster, db)
        .query_one(sql, &[])
        .unwrap_or_else(|e| panic!("{db}: {sql}: {e}"))
        .get(0)
}

/// Run statements in database `db`.
pub(crate) fn execute_db(cluster: &Cluster, db: &str, sql: &str) {
    connect_db(cluster, db)
        .batch_execute(sql)
        .unwrap_or_else(|e| panic!("{db}: {sql}: {e}"));
}

/// What a restore of the backup taken now must bring back, table by table.
fn state(cluster: &Cluster) -> Vec<(&'static str, String)> {
    let exists = |db: &str, table: &str| {
        query_db(
            cluster,
            db,
            &format!("SELECT (to_regclass('{table}') IS NOT NULL)::text"),
        ) == "true"
    };
    let fingerprint = |db: &str, table: &str| {
        if !exists(db, table) {
            return "absent".to_string();
        }
        query_db(
            cluster,
            db,
            &format!(
                "SELECT count(*) || ':' || coalesce(md5(string_agg(t::text, ',' ORDER BY id)), '') FROM {table} t"
            ),
        )
    };
    let databases =
        cluster.query_text("SELECT string_agg(datname, ',' ORDER BY datname) FROM pg_database");
    let mut out = vec![
        ("databases", databases.clone()),
        ("scattered", fingerprint("postgres", "scattered")),
        ("shrinking", fingerprint("postgres", "shrinking")),
        (
            "shrinking size",
            cluster.query_text("SELECT pg_relation_size('shrinking')::text"),
        ),
        ("doomed", fingerprint("postgres", "doomed")),
        ("in_ts", fingerprint("postgres", "in_ts")),
        ("src.t", fingerprint("src", "t")),
    ];
    if databases.split(',').any(|d| d == "copy") {
        out.push(("copy.t", fingerprint("copy", "t")));
    }
    out
}

fn label(b: &Value) -> String {
    b["label"].as_str().unwrap().to_string()
}

/// Restore backup `label` into the cluster's data directory, recovering just to the end of
/// that backup on its own timeline and promoting there.
fn restore_to_its_end(cluster: &Cluster, label: &str, extra: &[&str]) -> Run {
    let mut args = vec![
        "--backup",
        label,
        "--target",
        "immediate",
        "--target-action",
        "promote",
        "--target-timeline",
        "current",
    ];
    args.extend_from_slice(extra);
    cluster.restore(&args)
}

/// pg_amcheck on the running cluster, then pg_checksums on the stopped one: both clean.
fn check_and_stop(cluster: &mut Cluster) {
    cluster.check_pages_and_stop();
}

#[test]
fn a_full_diff_incr_incr_chain_restores_every_backup_to_its_data() {
    chain_restores_every_backup_to_its_data(false);
}

/// The same chain with `[repo] bundle = true`: small files and small page deltas share bundle
/// objects, which restore reads one request per bundle.
#[test]
fn a_bundled_full_diff_incr_incr_chain_restores_every_backup_to_its_data() {
    chain_restores_every_backup_to_its_data(true);
}

fn chain_restores_every_backup_to_its_data(bundle: bool) {
    let mut cluster = Cluster::with(ClusterOptions {
        repo_toml: bundle.then(|| "path = \"{dir}/repo\"\nbundle = true\n".to_string()),
        ..ClusterOptions::default()
    });
    let ts = cluster.dir.subdir("ts");
    cluster.execute(
        "CREATE TABLE scattered (id int PRIMARY KEY, v text);
         INSERT INTO scattered SELECT g, md5(g::text) FROM generate_series(1, 50000) g;
         CREATE TABLE shrinking (id int PRIMARY KEY, v text);
         INSERT INTO shrinking SELECT g, repeat('x', 200) FROM generate_series(1, 20000) g;
         CREATE TABLE doomed (id int);
         INSERT INTO doomed SELECT generate_series(1, 10000);
         CREATE UNLOGGED TABLE scratch (id int);
         INSERT INTO scratch SELECT generate_series(1, 1000);
         CREATE DATABASE src",
    );
    execute_db(
        &cluster,
        "src",
        "CREATE TABLE t WITH (autovacuum_enabled = off) AS SELECT g AS id, md5(g::text) AS v FROM generate_series(1, 20000) g",
    );
    // Frozen now, so no later read or vacuum rewrites its pages (hint bits would bump their LSN).
    execute_db(&cluster, "src", "VACUUM (FREEZE) t");
    cluster.execute("CHECKPOINT");
    let mut taken: Vec<(Value, Vec<(&str, String)>)> = Vec::new();

    let full = cluster.backup("full");
    taken.push((full, state(&cluster)));

    // Scattered updates and inserts that extend the table.
    cluster.execute(
        "UPDATE scattered SET v = 'diff' WHERE id % 97 = 0;
         INSERT INTO scattered SELECT g, md5(g::text) FROM generate_series(50001, 70000) g",
    );
    let diff = cluster.backup("diff");
    taken.push((diff, state(&cluster)));

    // A table truncated by VACUUM, a dropped table, a database copied file by file from a
    // template whose pages keep their old LSNs.
    let size_before = cluster.query_text("SELECT pg_relation_size('shrinking')::text");
    cluster.execute(&format!(
        "DELETE FROM shrinking WHERE id > 1000;
         VACUUM shrinking;
         DROP TABLE doomed;
         CREATE DATABASE copy TEMPLATE src{}",
        // Before 15 a database is always copied file by file; 15 added the WAL_LOG strategy.
        if crate::harness::server_major() >= 15 {
            " STRATEGY file_copy"
        } else {
            ""
        }
    ));
    let size_after = cluster.query_text("SELECT pg_relation_size('shrinking')::text");
    assert!(
        size_after.parse::<u64>().unwrap() < size_before.parse::<u64>().unwrap(),
        "VACUUM did not truncate: {size_before} -> {size_after}"
    );
    let incr1 = cluster.backup("incr");
    taken.push((incr1, state(&cluster)));

    // A new tablespace, more updates here and in the copied database, unlogged rows.
    cluster.execute(&format!(
        "CREATE TABLESPACE extra LOCATION '{}';
         CREATE TABLE in_ts (id int PRIMARY KEY, v text) TABLESPACE extra;
         INSERT INTO in_ts SELECT g, md5(g::text) FROM generate_series(1, 5000) g;
         UPDATE scattered SET v = 'incr' WHERE id % 89 = 0;
         INSERT INTO scratch SELECT generate_series(1001, 2000)",
        ts.display()
    ));
    execute_db(
        &cluster,
        "copy",
        "UPDATE t SET v = 'changed' WHERE id % 50 = 0",
    );
    let incr2 = cluster.backup("incr");
    taken.push((incr2, state(&cluster)));

    // The catalog knows the chain.
    let labels: Vec<String> = taken.iter().map(|(b, _)| label(b)).collect();
    let expect = [("full", 'F'), ("diff", 'D'), ("incr", 'I'), ("incr", 'I')];
    for (i, ((b, _), (t, suffix))) in taken.iter().zip(expect).enumerate() {
        assert_eq!(b["type"], t, "{b}");
        assert_eq!(b["status"], "DONE", "{b}");
        assert!(labels[i].ends_with(suffix), "{b}");
        let parent = if i == 0 {
            Value::Null
        } else {
            Value::from(labels[i - 1].clone())
        };
        assert_eq!(b["parent"], parent, "{b}");
    }
    let stored: Vec<u64> = taken
        .iter()
        .map(|(b, _)| b["stored_bytes"].as_u64().unwrap())
        .collect();
    for ((b, _), bytes) in taken.iter().zip(&stored) {
        println!("{} stored {bytes} bytes", b["label"]);
        assert!(*bytes <= stored[0], "stored more than the full backup: {b}");
    }
    // An unchanged table is not stored again.
    let doomed_free = taken[3]
        .1
        .iter()
        .any(|(k, v)| *k == "doomed" && v == "absent");
    assert!(doomed_free);
    let src_t = query_db(&cluster, "src", "SELECT pg_relation_filepath('t')");
    assert!(
        !cluster.stored_paths(&labels[3]).contains(&src_t),
        "unchanged {src_t} stored again"
    );
    // Bundled: the files of each backup are mostly in a few bundles, few objects of their own.
    for (b, label) in taken.iter().map(|(b, _)| b).zip(&labels) {
        let bundles = fs::read_dir(cluster.repo.join("backup").join(label).join("bundle"))
            .map(|d| d.count())
            .unwrap_or(0);
        let own = cluster.stored_paths(label).len();
        println!("{label}: {bundles} bundles, {own} objects of their own");
        if bundle {
            assert!(bundles >= 1, "no bundle in {b}");
            assert!(
                own * 10 < b["files"].as_u64().unwrap() as usize,
                "{own} objects: {b}"
            );
        } else {
            assert_eq!(bundles, 0, "{b}");
        }
    }

    // Restore every backup of the chain and compare with what the live cluster held.
    for ((b, want), label) in taken.iter().zip(&labels) {
        cluster.stop_and_wipe();
        fs::remove_dir_all(&ts).unwrap();
        cluster.dir.subdir("ts");
        let run = restore_to_its_end(&cluster, label, &[]);
        assert!(run.success(), "restore {label}: {run:?}");
        cluster.start();
        cluster.wait_promoted();
        assert_eq!(&state(&cluster), want, "restore of {b}");
        assert_eq!(
            cluster.query_text("SELECT count(*)::text FROM scratch"),
            "0",
            "unlogged table not reset"
        );
        check_and_stop(&mut cluster);
    }
}

#[test]
fn scattered_updates_are_stored_as_differences_from_the_parent_pages() {
    let mut cluster = Cluster::with(ClusterOptions {
        conf: vec!["autovacuum = off".to_string()],
        ..ClusterOptions::default()
    });
    cluster.execute(
        "CREATE TABLE r (id int PRIMARY KEY, v text);
         INSERT INTO r SELECT g, md5(g::text) || md5((g + 1)::text) FROM generate_series(1, 200000) g;
         CHECKPOINT;
         SELECT count(*) FROM r",
    );
    cluster.backup("full");
    // One row in 50: nearly every heap page and many index leaves change, each a little.
    cluster.execute("UPDATE r SET v = md5(v) WHERE id % 50 = 0; CHECKPOINT");
    let rel_bytes: u64 = cluster
        .query_text("SELECT (pg_relation_size('r') + pg_relation_size('r_pkey'))::text")
        .parse()
        .unwrap();
    let want = state_of_r(&cluster);
    let incr = cluster.backup("incr");
    let stored = incr["stored_bytes"].as_u64().unwrap();
    println!("table and index {rel_bytes} bytes, incr stored {stored} bytes");
    // As whole pages (lz4 halves md5 text) this incr would store about half the relation.
    assert!(
        stored * 10 < rel_bytes,
        "incr stored {stored} bytes for {rel_bytes} bytes of mostly unchanged pages"
    );
    cluster.stop_and_wipe();
    let run = restore_to_its_end(&cluster, &label(&incr), &[]);
    assert!(run.success(), "{run:?}");
    cluster.start();
    cluster.wait_promoted();
    assert_eq!(state_of_r(&cluster), want);
    check_and_stop(&mut cluster);
}

fn state_of_r(cluster: &Cluster) -> String {
    cluster.query_text("SELECT count(*) || ':' || md5(string_agg(v, ',' ORDER BY id)) FROM r")
}

#[test]
fn an_incremental_after_no_changes_stores_almost_nothing() {
    let cluster = Cluster::with(ClusterOptions {
        conf: vec!["autovacuum = off".to_string()],
        ..ClusterOptions::default()
    });
    cluster.pg_tool_ok("pgbench", &["-i", "-s", "5", "-q"]);
    let full = cluster.backup("full");
    let incr = cluster.backup("incr");
    let (f, i) = (
        full["stored_bytes"].as_u64().unwrap(),
        incr["stored_bytes"].as_u64().unwrap(),
    );
    println!(
        "full stored {f} bytes, incr after no changes stored {i} bytes; data {}",
        incr["data_bytes"]
    );
    assert_eq!(incr["data_bytes"], full["data_bytes"]);
    assert!(
        i < 512 * 1024 && i * 20 < f,
        "incr stored {i} bytes, full {f}"
    );
    // Only what always changes is stored: pg_control and a few small files.
    let stored = cluster.stored_paths(&label(&incr));
    assert!(
        stored.contains(&"global/pg_control".to_string()),
        "{stored:?}"
    );
    assert!(stored.len() < 20, "{stored:?}");
}

fn assert_refused(run: &Run, needle: &str) {
    assert_eq!(run.code, Some(1), "{run:?}");
    assert_eq!(run.stderr.lines().count(), 1, "{run:?}");
    assert!(run.stderr.contains("pgkeep backup --type full"), "{run:?}");
    assert!(run.stderr.contains(needle), "expected {needle:?}: {run:?}");
}

#[test]
fn diff_and_incr_without_a_usable_parent_or_after_a_timeline_switch_are_refused() {
    let mut cluster = Cluster::new();
    assert_refused(
        &cluster.pgkeep(&["backup", "--type", "incr"]),
        "no DONE or OK backup",
    );
    assert_refused(
        &cluster.pgkeep(&["backup", "--type", "diff"]),
        "no DONE or OK full backup",
    );
    assert!(cluster.backups().is_empty());

    cluster.execute("CREATE TABLE t AS SELECT generate_series(1, 1000) AS id");
    cluster.backup("full");
    cluster.stop_and_wipe();
    let run = cluster.restore(&["--target", "immediate", "--target-action", "promote"]);
    assert!(run.success(), "{run:?}");
    cluster.start();
    cluster.wait_promoted();
    for t in ["diff", "incr"] {
        assert_refused(&cluster.pgkeep(&["backup", "--type", t]), "timeline");
    }
    assert_eq!(cluster.backups().len(), 1);
    let full = cluster.backup("full");
    assert_eq!(full["timeline"], 2);
    let incr = cluster.backup("incr");
    assert_eq!(incr["parent"], full["label"]);
}

/// Mark a backup CORRUPT in the catalog, as `validate` does when it finds damage.
fn mark_corrupt(cluster: &Cluster, label: &str) {
    let catalog = pgkeep_catalog::Catalog::open(&cluster.repo.join("catalog.db")).unwrap();
    catalog
        .set_status(label, pgkeep_catalog::BackupStatus::Corrupt, Some("test"))
        .unwrap();
    drop(catalog);
    // Files SQLite created while we (root) held the catalog must stay the cluster user's.
    for e in fs::read_dir(&cluster.repo).unwrap() {
        crate::harness::chown_to_postgres(&e.unwrap().path());
    }
}

#[test]
fn a_chain_with_a_corrupt_parent_is_neither_restored_nor_built_on() {
    let cluster = Cluster::new();
    cluster.execute("CREATE TABLE t AS SELECT generate_series(1, 1000) AS id");
    let full = label(&cluster.backup("full"));
    cluster.execute("INSERT INTO t SELECT generate_series(1001, 2000)");
    let incr = label(&cluster.backup("incr"));
    mark_corrupt(&cluster, &full);
    let dest = cluster.dir.path().join("restored");
    let run = cluster.pgkeep(&[
        "restore",
        "--pgdata",
        dest.to_str().unwrap(),
        "--backup",
        &incr,
    ]);
    assert_eq!(run.code, Some(1), "{run:?}");
    assert_eq!(run.stderr.lines().count(), 1, "{run:?}");
    assert!(
        run.stderr.contains(&full) && run.stderr.contains("CORRUPT"),
        "{run:?}"
    );
    assert!(!dest.exists(), "restore wrote before refusing");
    assert_refused(&cluster.pgkeep(&["backup", "--type", "incr"]), &full);
    assert_refused(
        &cluster.pgkeep(&["backup", "--type", "diff"]),
        "no DONE or OK full backup",
    );
}

#[test]
fn delta_restore_of_an_incremental_keeps_unchanged_files_and_recovers_its_data() {
    let mut cluster = Cluster::new();
    cluster.pg_tool_ok("pgbench", &["-i", "-s", "2", "-q"]);
    cluster.backup("full");
    cluster.pg_tool_ok("pgbench", &["-c", "1", "-t", "300", "-n"]);
    let incr = label(&cluster.backup("incr"));
    let want = cluster.pgbench_fingerprints();
    // The live cluster moves on; the restore must bring back the incremental's state.
    cluster.pg_tool_ok("pgbench", &["-c", "1", "-t", "300", "-n"]);
    cluster.execute("CREATE TABLE extra AS SELECT generate_series(1, 10000) AS id; CHECKPOINT");
    cluster.stop();
    let run = restore_to_its_end(&cluster, &incr, &["--delta"]);
    assert!(run.success(), "{run:?}");
    let kept: u64 = run
        .stdout
        .split(", ")
        .find_map(|p| p.strip_suffix(" kept"))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no kept count: {run:?}"));
    assert!(kept > 100, "{run:?}");
    cluster.start();
    cluster.wait_promoted();
    let got = cluster.pgbench_fingerprints();
    assert_eq!(got, want);
    assert_eq!(
        cluster.query_text("SELECT (to_regclass('extra') IS NULL)::text"),
        "true"
    );
    check_and_stop(&mut cluster);
}
