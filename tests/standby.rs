//! Standbys: `restore --standby` builds a streaming replica; backups taken from a standby, with
//! its primary archiving, restore to the primary's data.

use std::fs;
use std::time::Duration;

use crate::harness::{config_text, Cluster, Run};

/// The command failed with one line on stderr that says `needle`.
fn assert_refused(run: &Run, needle: &str) {
    assert!(!run.success(), "{run:?}");
    assert_eq!(run.stderr.trim().lines().count(), 1, "{run:?}");
    assert!(run.stderr.contains(needle), "{run:?}");
}

/// Labels of the DONE backups.
fn done(cluster: &Cluster) -> Vec<String> {
    cluster
        .backups()
        .iter()
        .filter(|b| b["status"] == "DONE")
        .map(|b| b["label"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn restore_standby_builds_a_replica_that_streams_and_a_delta_reseeds_it() {
    let primary = Cluster::new();
    primary
        .execute("CREATE TABLE before (id int); INSERT INTO before SELECT generate_series(1, 10)");
    primary.backup("full");
    primary.switch_wal_and_wait();
    let mut replica = primary.replica_dir();
    let pgdata = replica.data.to_str().unwrap().to_string();

    // A recovery target makes no sense for a replica: refused before anything is written.
    let run = replica.pgkeep(&[
        "restore",
        "--pgdata",
        &pgdata,
        "--standby",
        "--target",
        "immediate",
    ]);
    assert_eq!(run.code, Some(2), "{run:?}");
    assert!(run.stderr.contains("--standby"), "{run:?}");
    assert!(!replica.data.exists());

    let conninfo = primary.conninfo();
    let args = [
        "restore",
        "--pgdata",
        &pgdata,
        "--standby",
        "--primary-conninfo",
        &conninfo,
    ];
    let run = replica.pgkeep(&args);
    assert!(run.success(), "{run:?}");
    assert!(run.stdout.contains("as a standby"), "{run:?}");
    assert!(replica.data.join("standby.signal").exists());
    assert!(!replica.data.join("recovery.signal").exists());
    let auto = fs::read_to_string(replica.data.join("postgresql.auto.conf")).unwrap();
    assert!(
        auto.contains(&format!("primary_conninfo = '{conninfo}'")),
        "{auto}"
    );
    assert!(auto.contains("restore_command = '"), "{auto}");
    assert!(
        auto.contains("recovery_target_timeline = 'latest'"),
        "{auto}"
    );
    assert!(!auto.contains("recovery_target_action"), "{auto}");
    replica.own_settings();
    replica.start();
    replica.wait_streaming_from(&primary);
    assert_eq!(
        replica.query_text("SELECT pg_is_in_recovery()::text"),
        "true"
    );
    primary.execute("CREATE TABLE after (id int); INSERT INTO after SELECT generate_series(1, 42)");
    replica.wait_replayed(&primary);
    assert_eq!(replica.query_text("SELECT count(*)::text FROM after"), "42");
    assert_eq!(
        replica.query_text("SELECT count(*)::text FROM before"),
        "10"
    );

    // A replica left behind is re-seeded in place from a newer backup.
    replica.stop();
    primary.execute("INSERT INTO after SELECT generate_series(43, 100)");
    primary.backup("incr");
    primary.switch_wal_and_wait();
    let mut delta_args = args.to_vec();
    delta_args.push("--delta");
    let run = replica.pgkeep(&delta_args);
    assert!(run.success(), "{run:?}");
    assert!(replica.data.join("standby.signal").exists());
    replica.own_settings();
    replica.start();
    replica.wait_streaming_from(&primary);
    primary.execute("INSERT INTO after SELECT generate_series(101, 120)");
    replica.wait_replayed(&primary);
    assert_eq!(
        replica.query_text("SELECT count(*)::text FROM after"),
        "120"
    );
}

#[test]
fn backups_from_a_standby_under_load_restore_to_the_primarys_data() {
    let primary = Cluster::new();
    primary.pg_tool_ok("pgbench", &["-i", "-s", "3", "-q"]);
    let mut standby = Cluster::standby_of(&primary);
    let run = standby.pgkeep_ok(&["check"]);
    assert!(
        run.stdout.contains("primary") && run.stdout.contains("streaming"),
        "{run:?}"
    );
    let (full, incr) = std::thread::scope(|s| {
        let load = s.spawn(|| primary.pg_tool("pgbench", &["-c", "2", "-T", "8", "-n"]));
        std::thread::sleep(Duration::from_millis(500));
        let full = standby.backup("full");
        primary.execute("CHECKPOINT");
        let incr = standby.backup("incr");
        assert!(load.join().unwrap().success());
        (full, incr)
    });
    for b in [&full, &incr] {
        assert_eq!(b["status"], "DONE", "{b}");
        assert_eq!(b["from_standby"], true, "{b}");
        assert_eq!(b["page_checksum_failures"], 0, "{b}");
    }
    assert_eq!(incr["parent"], full["label"]);
    let stored = |name: &str| {
        let dir = standby
            .repo
            .join("backup")
            .join(incr["label"].as_str().unwrap());
        fs::read_to_string(dir.join(name)).unwrap()
    };
    let ini = stored("backup.ini");
    assert!(ini.contains("FROM_STANDBY=true"), "{ini}");
    let shown = standby.pgkeep_ok(&["show"]).stdout;
    assert!(shown.contains(" standby "), "{shown}");
    // The stored label says the copy came from a standby; restore relies on PostgreSQL to end
    // recovery at the standby's minimum recovery point.
    let label = stored("backup_label");
    assert!(label.contains("BACKUP FROM: standby"), "{label}");

    primary.switch_wal_and_wait();
    let want = primary.pgbench_fingerprints();
    standby.stop_and_wipe();
    let run = standby.restore(&[]);
    assert!(run.success(), "{run:?}");
    assert!(
        run.stdout.contains(incr["label"].as_str().unwrap()),
        "{run:?}"
    );
    standby.start();
    standby.wait_promoted();
    assert_eq!(standby.pgbench_fingerprints(), want);
    standby.check_pages_and_stop();
}

#[test]
fn a_promoted_standby_refuses_an_incr_across_the_timeline_change_and_takes_a_full() {
    let mut primary = Cluster::new();
    primary.execute("CREATE TABLE t (id int); INSERT INTO t SELECT generate_series(1, 100)");
    let standby = Cluster::standby_of(&primary);
    let first = standby.backup("full");
    assert_eq!(first["from_standby"], true);
    assert_eq!(first["timeline"], 1);
    // Failover: the primary is gone, the standby takes over and archives from now on.
    primary.stop();
    standby.execute("SELECT pg_promote()");
    standby.wait_promoted();
    standby.execute("INSERT INTO t SELECT generate_series(101, 200)");
    let before = standby.backups().len();
    let run = standby.pgkeep(&["backup", "--type", "incr"]);
    assert_refused(&run, "timeline");
    assert!(run.stderr.contains("--type full"), "{run:?}");
    assert_eq!(
        standby.backups().len(),
        before,
        "a refused backup is not recorded"
    );
    let second = standby.backup("full");
    assert_eq!(second["status"], "DONE");
    assert_eq!(second["from_standby"], false);
    assert_eq!(second["timeline"], 2);
}

#[test]
fn a_standby_of_another_cluster_or_an_unreachable_primary_is_refused_with_nothing_done() {
    let primary = Cluster::new();
    let standby = Cluster::standby_of(&primary);
    let other = Cluster::new();
    let with_primary = |primary: Option<(&std::path::Path, u16)>| {
        fs::write(
            &standby.config,
            config_text(
                &standby.repo,
                &standby.data,
                &standby.sock,
                standby.port,
                primary,
            ),
        )
        .unwrap();
    };
    let attempt = |needle: &str| {
        let run = standby.pgkeep(&["backup", "--type", "full"]);
        assert_refused(&run, needle);
        // Refused before the backup is recorded: no row, let alone a DONE one.
        assert!(standby.backups().is_empty(), "{:?}", standby.backups());
    };

    // [primary] names a server of another cluster.
    with_primary(Some((&other.sock, other.port)));
    attempt("system identifier");
    let run = standby.pgkeep(&["check"]);
    assert_eq!(run.code, Some(3), "{run:?}");
    assert!(run.stdout.contains("FAIL standby"), "{run:?}");
    // Nobody listens there.
    with_primary(Some((&other.sock, other.port + 1000)));
    attempt("cannot connect to the primary");
    // No [primary] at all.
    with_primary(None);
    attempt("[primary]");
    // The right primary: check passes, and the backup is taken.
    with_primary(Some((&primary.sock, primary.port)));
    let run = standby.pgkeep(&["check"]);
    assert!(run.success(), "{run:?}");
    standby.backup("full");
    assert_eq!(done(&standby).len(), 1);
}
