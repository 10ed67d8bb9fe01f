//! `pgkeep backup --type full` against real clusters.

use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

use pgkeep_pg::ControlFile;

use crate::harness::{is_root, kill_tree, pg_bin, user_command, Cluster, Run};

#[test]
fn full_backup_under_pgbench_load_reaches_done_with_every_field() {
    let cluster = Cluster::new();
    cluster.pg_tool_ok("pgbench", &["-i", "-s", "5", "-q"]);
    let load = std::thread::scope(|s| {
        let load = s.spawn(|| cluster.pg_tool("pgbench", &["-c", "2", "-T", "6", "-n"]));
        std::thread::sleep(Duration::from_millis(500));
        let b = cluster.backup("full");
        (b, load.join().unwrap())
    });
    let (b, load) = load;
    assert!(load.success(), "pgbench: {load:?}");
    assert_eq!(b["status"], "DONE", "{b}");
    assert_eq!(b["type"], "full");
    assert_eq!(b["parent"], serde_json::Value::Null);
    assert_eq!(b["timeline"], 1);
    assert_eq!(b["pg_major"], crate::harness::server_major(), "{b}");
    let start: pgkeep_pg::Lsn = b["start_lsn"].as_str().unwrap().parse().unwrap();
    let stop: pgkeep_pg::Lsn = b["stop_lsn"].as_str().unwrap().parse().unwrap();
    assert!(stop > start, "{b}");
    for key in ["start_time", "end_time", "recovery_time"] {
        chrono::DateTime::parse_from_rfc3339(b[key].as_str().unwrap()).unwrap();
    }
    assert!(b["data_bytes"].as_u64().unwrap() > 70_000_000, "{b}");
    let stored = b["stored_bytes"].as_u64().unwrap();
    assert!(
        stored > 0 && stored < b["data_bytes"].as_u64().unwrap(),
        "{b}"
    );
    assert!(b["files"].as_u64().unwrap() > 500, "{b}");
    // Every segment from start to stop is in the archive.
    let seg = cluster.query_text(&format!("SELECT pg_walfile_name('{stop}')"));
    let run = cluster.pgkeep(&[
        "archive-get",
        &seg,
        cluster.dir.path().join("seg").to_str().unwrap(),
    ]);
    assert!(run.success(), "{run:?}");
}

#[test]
fn excluded_files_are_absent_and_init_forks_and_tablespaces_present() {
    let cluster = Cluster::new();
    let ts_dir = cluster.dir.subdir("tablespace");
    cluster.execute(&format!(
        "CREATE TABLESPACE extra LOCATION '{}';
         CREATE TABLE in_ts (id int) TABLESPACE extra; INSERT INTO in_ts SELECT generate_series(1, 1000);
         CREATE UNLOGGED TABLE scratch (id int); INSERT INTO scratch SELECT generate_series(1, 1000);
         CHECKPOINT;",
        ts_dir.display()
    ));
    // A temporary table lives as long as its session: keep one open during the backup.
    let mut session = cluster.client();
    session
        .batch_execute("CREATE TEMP TABLE tmp_rows AS SELECT generate_series(1, 1000) AS id")
        .unwrap();
    let temp_path: String = session
        .query_one("SELECT pg_relation_filepath('tmp_rows')", &[])
        .unwrap()
        .get(0);
    let unlogged = cluster.query_text("SELECT pg_relation_filepath('scratch')");
    let in_ts = cluster.query_text("SELECT pg_relation_filepath('in_ts')");
    let b = cluster.backup("full");
    drop(session);
    let paths = cluster.stored_paths(b["label"].as_str().unwrap());
    let has = |p: &str| paths.iter().any(|x| x == p);
    assert!(has("global/pg_control") && has("PG_VERSION"), "{paths:?}");
    assert!(
        !paths.iter().any(|p| p.starts_with("pg_wal/")),
        "WAL copied: {paths:?}"
    );
    assert!(
        !has("postmaster.pid") && !has("postmaster.opts"),
        "{paths:?}"
    );
    assert!(!has(&temp_path), "temp relation {temp_path} copied");
    assert!(!has(&unlogged), "unlogged main fork {unlogged} copied");
    assert!(
        has(&format!("{unlogged}_init")),
        "unlogged init fork missing"
    );
    assert!(has(&in_ts), "tablespace file {in_ts} missing: {paths:?}");
    assert!(!paths
        .iter()
        .any(|p| p.starts_with("pg_stat_tmp/") || p.starts_with("pg_subtrans/")));
}

/// Start `pgkeep backup` in the background, as the cluster's OS user.
fn spawn_backup(cluster: &Cluster, jobs: &str) -> std::process::Child {
    user_command(&cluster.pgkeep_bin)
        .current_dir(cluster.dir.path())
        .arg("--config")
        .arg(&cluster.config)
        .args(["backup", "--type", "full", "--jobs", jobs])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap()
}

/// Wait until the backup in progress has stored some data.
fn wait_running(cluster: &Cluster) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(label) = std::fs::read_dir(cluster.repo.join("backup"))
            .ok()
            .and_then(|mut d| d.next())
            .and_then(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
        {
            if cluster
                .repo
                .join("backup")
                .join(&label)
                .join("data/base")
                .exists()
            {
                return label;
            }
        }
        assert!(Instant::now() < deadline, "backup did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn backup_killed_mid_copy_ends_as_error_and_the_next_backup_succeeds() {
    let cluster = Cluster::new();
    cluster.pg_tool_ok("pgbench", &["-i", "-s", "20", "-q"]);
    let mut child = spawn_backup(&cluster, "1");
    let label = wait_running(&cluster);
    kill_tree(child.id());
    let _ = child.wait();
    let b = cluster
        .backups()
        .into_iter()
        .find(|b| b["label"] == label.as_str())
        .unwrap();
    assert_eq!(
        b["status"], "ERROR",
        "a killed backup must not stay RUNNING: {b}"
    );
    // The server left backup mode with the connection; a new backup runs normally.
    let next = cluster.backup("full");
    assert_eq!(next["status"], "DONE");
}

#[test]
fn a_second_concurrent_backup_is_refused() {
    let cluster = Cluster::new();
    cluster.pg_tool_ok("pgbench", &["-i", "-s", "20", "-q"]);
    let mut child = spawn_backup(&cluster, "1");
    wait_running(&cluster);
    let run = cluster.pgkeep(&["backup", "--type", "full"]);
    let first = child.wait().unwrap();
    assert_eq!(run.code, Some(1), "{run:?}");
    assert!(run.stderr.contains("another backup is running"), "{run:?}");
    assert!(first.success(), "the first backup must finish");
}

#[test]
fn a_corrupted_page_is_reported_with_file_and_block() {
    let mut cluster = Cluster::new();
    cluster.execute("CREATE TABLE t AS SELECT g AS id, md5(g::text) AS v FROM generate_series(1, 5000) g; CHECKPOINT;");
    let path = cluster.query_text("SELECT pg_relation_filepath('t')");
    cluster.stop();
    let file = cluster.data.join(&path);
    let mut bytes = std::fs::read(&file).unwrap();
    bytes[3 * 8192 + 5000] ^= 0x40;
    std::fs::write(&file, bytes).unwrap();
    cluster.start();
    let run = cluster.pgkeep_ok(&["backup", "--type", "full"]);
    assert!(run.stdout.contains("1 page checksum failures"), "{run:?}");
    assert!(run.stderr.contains(&format!("{path} block 3")), "{run:?}");
    let b = &cluster.backups()[0];
    assert_eq!(b["status"], "DONE");
    assert_eq!(b["page_checksum_failures"], 1);
}

#[test]
fn backup_whose_wal_never_reaches_the_archive_fails_after_the_timeout() {
    let cluster = Cluster::new();
    let text = std::fs::read_to_string(&cluster.config)
        .unwrap()
        .replace("archive-timeout = 60", "archive-timeout = 3");
    std::fs::write(&cluster.config, text).unwrap();
    // Still names pgkeep (so the pre-flight check passes) but never archives anything.
    cluster.execute(&format!(
        "ALTER SYSTEM SET archive_command = 'test -e /nonexistent && {} --config {} archive-push %p'; SELECT pg_reload_conf()",
        cluster.pgkeep_bin.display(),
        cluster.config.display()
    ));
    std::thread::sleep(Duration::from_millis(300));
    let run = cluster.pgkeep(&["backup", "--type", "full"]);
    assert_eq!(run.code, Some(1), "{run:?}");
    assert!(
        run.stderr.contains("not archived after 3 s") && run.stderr.contains("pg_stat_archiver"),
        "{run:?}"
    );
    let b = &cluster.backups()[0];
    assert_eq!(b["status"], "ERROR", "{b}");
    assert!(b["error"].as_str().unwrap().contains("not archived"), "{b}");
}

/// Regression (#13, item 9): `[pg] data` was compared with the server's `data_directory` by path
/// only. Where pgkeep runs on another host or in another mount namespace than the server (a
/// container, a standby host with the same layout), the same path is another directory, and
/// pgkeep copied it under the server's `pg_backup_start`.
#[test]
fn backup_refuses_another_clusters_directory_at_the_servers_path() {
    if !is_root() {
        eprintln!("skipped: a private mount namespace needs root");
        return;
    }
    let cluster = Cluster::new();
    let sysid = cluster.query_text("SELECT system_identifier::text FROM pg_control_system()");
    let other = init_other(&cluster);
    // pgkeep in its own mount namespace, where the server's path shows the other cluster.
    let out = std::process::Command::new("unshare")
        .args(["-m", "--propagation", "private", "sh", "-c"])
        .arg(r#"mount --bind "$1" "$2" && exec runuser -u postgres -- "$3" --config "$4" backup --type full"#)
        .arg("sh")
        .args([&other, &cluster.data, &cluster.pgkeep_bin, &cluster.config])
        .current_dir(cluster.dir.path())
        .output()
        .unwrap();
    let run = Run::from_output(out);
    assert_eq!(run.code, Some(1), "{run:?}");
    assert_eq!(run.stderr.lines().count(), 1, "{run:?}");
    let theirs = ControlFile::parse(&fs::read(other.join("global/pg_control")).unwrap())
        .unwrap()
        .system_identifier
        .to_string();
    for part in ["[pg] data", cluster.data.to_str().unwrap(), &theirs, &sysid] {
        assert!(run.stderr.contains(part), "stderr lacks {part:?}: {run:?}");
    }
    assert!(
        cluster.backups().iter().all(|b| b["status"] != "DONE"),
        "nothing may be DONE from the wrong directory: {:?}",
        cluster.backups()
    );
}

/// Regression (#13, item 9): a server started through a symlink reports the link as its
/// `data_directory`, and the path check followed the link to wherever it points now. Behind it,
/// a directory that is not a running primary's (the primary's own standby, a stopped cluster)
/// must be refused; `pg_control_system()` reads through the link too, so the state of
/// `pg_control` and `standby.signal` are what tell.
#[test]
fn backup_refuses_a_standby_or_stopped_directory_behind_the_servers_path() {
    let mut cluster = Cluster::new();
    // The server runs in `real` but knows its directory by the link's path, as the config does.
    cluster.stop();
    let link = cluster.data.clone();
    let real = cluster.dir.path().join("data.real");
    fs::rename(&link, &real).unwrap();
    point(&link, &real);
    cluster.start();
    // pg_ctl must address the directory the postmaster really holds, wherever the link points.
    cluster.data = real.clone();
    assert_eq!(
        cluster.query_text("SHOW data_directory"),
        link.to_str().unwrap()
    );

    // The primary's own standby behind the path: same system identifier.
    let standby = cluster.dir.path().join("standby");
    cluster.pg_tool_ok(
        "pg_basebackup",
        &["-D", standby.to_str().unwrap(), "-R", "-c", "fast"],
    );
    point(&link, &standby);
    let run = cluster.pgkeep(&["backup", "--type", "full"]);
    assert_eq!(run.code, Some(1), "{run:?}");
    assert_eq!(run.stderr.lines().count(), 1, "{run:?}");
    for part in ["[pg] data", link.to_str().unwrap(), "standby.signal"] {
        assert!(run.stderr.contains(part), "stderr lacks {part:?}: {run:?}");
    }
    let run = cluster.pgkeep(&["check"]);
    assert!(
        run.stdout
            .lines()
            .any(|l| l.starts_with("FAIL") && l.contains("data directory")),
        "{run:?}"
    );

    // A stopped cluster behind the path.
    let other = init_other(&cluster);
    point(&link, &other);
    let run = cluster.pgkeep(&["backup", "--type", "full"]);
    assert_eq!(run.code, Some(1), "{run:?}");
    assert!(
        run.stderr.contains("[pg] data") && run.stderr.contains("shut down"),
        "{run:?}"
    );
    assert!(
        cluster.backups().iter().all(|b| b["status"] != "DONE"),
        "nothing may be DONE from the wrong directory: {:?}",
        cluster.backups()
    );

    // The server's own directory behind the path again: no refusal.
    point(&link, &real);
    assert_eq!(cluster.backup("full")["status"], "DONE");
}

/// A fresh, stopped cluster `other` beside `cluster`'s, with its own system identifier.
fn init_other(cluster: &Cluster) -> std::path::PathBuf {
    let other = cluster.dir.path().join("other");
    let out = user_command(pg_bin().join("initdb"))
        .args(["-N", "-U", "postgres", "--auth=trust", "-D"])
        .arg(&other)
        .output()
        .unwrap();
    assert!(out.status.success(), "{:?}", Run::from_output(out));
    other
}

/// Make `link` a symlink to `target`, replacing what it was in one rename.
fn point(link: &Path, target: &Path) {
    let tmp = link.with_extension("new");
    std::os::unix::fs::symlink(target, &tmp).unwrap();
    fs::rename(&tmp, link).unwrap();
}
