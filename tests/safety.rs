//! Restore never harms a live cluster on the same host: its tablespaces and WAL directory stay
//! untouched, a damaged repository entry never leads a write out of the data directory, the
//! written restore_command works from any path, and pg_control is written last, durably.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::harness::{
    chown_to_postgres, is_root, pg_ctl_start, pg_ctl_stop_fast, tree, user_command, Cluster,
    ClusterOptions, Run,
};

fn assert_refused(run: &Run, needles: &[&str]) {
    assert_eq!(run.code, Some(1), "{run:?}");
    assert_eq!(run.stderr.lines().count(), 1, "{run:?}");
    for n in needles {
        assert!(run.stderr.contains(n), "expected {n:?}: {run:?}");
    }
}

fn restore_into(cluster: &Cluster, dest: &Path, extra: &[&str]) -> Run {
    let mut args = vec!["restore", "--pgdata", dest.to_str().unwrap()];
    args.extend_from_slice(extra);
    cluster.pgkeep(&args)
}

/// The OID of the one tablespace of a cluster (its pg_tblspc entry).
fn tablespace_oid(cluster: &Cluster) -> String {
    cluster.query_text("SELECT oid::text FROM pg_tablespace WHERE spcname = 'extra'")
}

#[test]
fn restore_elsewhere_never_writes_into_the_live_clusters_tablespace() {
    let mut cluster = Cluster::new();
    let live_ts = cluster.dir.subdir("live-ts");
    cluster.execute(&format!(
        "CREATE TABLESPACE extra LOCATION '{}';
         CREATE TABLE in_ts (id int PRIMARY KEY, v text) TABLESPACE extra;
         INSERT INTO in_ts SELECT g, md5(g::text) FROM generate_series(1, 5000) g",
        live_ts.display()
    ));
    let oid = tablespace_oid(&cluster);
    cluster.backup("full");
    cluster.execute("UPDATE in_ts SET v = 'live' WHERE id % 2 = 0; CHECKPOINT");
    cluster.switch_wal_and_wait();
    cluster.stop();
    let live_before = (tree(&cluster.data), tree(&live_ts));

    let scratch = cluster.dir.path().join("scratch");
    // The recorded location holds the live cluster's tablespace: refused, with the way out.
    let run = restore_into(&cluster, &scratch, &[]);
    let map_hint = format!("--tablespace-map {oid}=DIR");
    assert_refused(&run, &[&oid, live_ts.to_str().unwrap(), &map_hint]);
    // --delta reuses a tablespace only where --pgdata already links to it.
    let run = restore_into(&cluster, &scratch, &["--delta"]);
    assert_refused(&run, &[&oid, &map_hint]);
    let copy_ts = cluster.dir.path().join("copy-ts");
    let map = format!("{oid}={}", copy_ts.display());
    let run = restore_into(&cluster, &scratch, &["--tablespace-map", &map]);
    assert!(run.success(), "{run:?}");
    assert_eq!(
        fs::read_link(scratch.join("pg_tblspc").join(&oid)).unwrap(),
        copy_ts
    );
    let run = restore_into(&cluster, &scratch, &["--delta", "--tablespace-map", &map]);
    assert!(run.success(), "{run:?}");
    // Mapped elsewhere, --delta must leave the old location alone: only the link changes.
    let other_ts = cluster.dir.path().join("other-ts");
    let other = format!("{oid}={}", other_ts.display());
    let before_other = tree(&copy_ts);
    let run = restore_into(&cluster, &scratch, &["--delta", "--tablespace-map", &other]);
    assert!(run.success(), "{run:?}");
    assert_eq!(tree(&copy_ts), before_other);
    assert_eq!(
        (tree(&cluster.data), tree(&live_ts)),
        live_before,
        "the live cluster's files changed"
    );

    // The copy in the mapped location works: it holds the rows of the end of the archive.
    let log = cluster.dir.path().join("scratch.log");
    assert!(pg_ctl_start(&scratch, &log), "{}", read(&log));
    cluster.wait_promoted();
    let evens = cluster.query_text("SELECT count(*)::text FROM in_ts WHERE v = 'live'");
    pg_ctl_stop_fast(&scratch);
    assert_eq!(evens, "2500");
    assert_eq!(
        (tree(&cluster.data), tree(&live_ts)),
        live_before,
        "the live cluster's files changed while the copy ran"
    );
}

#[test]
fn a_linked_pg_wal_is_restored_as_the_copys_own_directory() {
    let dir = crate::harness::TestDir::new();
    let live_wal = dir.path().join("live-wal");
    let mut cluster = Cluster::with(ClusterOptions {
        initdb_args: vec!["--waldir".into(), live_wal.display().to_string()],
        ..ClusterOptions::default()
    });
    cluster.execute("CREATE TABLE t AS SELECT generate_series(1, 1000) AS id");
    cluster.backup("full");
    cluster.execute("INSERT INTO t SELECT generate_series(1001, 1500)");
    cluster.switch_wal_and_wait();
    cluster.stop();
    let live_before = tree(&live_wal);

    let scratch = cluster.dir.path().join("scratch");
    let run = restore_into(&cluster, &scratch, &[]);
    assert!(run.success(), "{run:?}");
    let meta = fs::symlink_metadata(scratch.join("pg_wal")).unwrap();
    assert!(meta.is_dir(), "pg_wal of the copy is not a directory");
    assert!(scratch.join("pg_wal/archive_status").is_dir());

    // The copy runs, writes and recycles WAL in its own directory.
    let log = cluster.dir.path().join("scratch.log");
    assert!(pg_ctl_start(&scratch, &log), "{}", read(&log));
    cluster.wait_promoted();
    assert_eq!(cluster.query_text("SELECT count(*)::text FROM t"), "1500");
    cluster.execute(
        "INSERT INTO t SELECT generate_series(1, 200000); SELECT pg_switch_wal(); CHECKPOINT",
    );
    pg_ctl_stop_fast(&scratch);
    assert_eq!(
        tree(&live_wal),
        live_before,
        "the live WAL directory changed"
    );

    // --waldir puts it where asked, linked from the data directory, if that place is empty.
    let scratch2 = cluster.dir.path().join("scratch2");
    let run = restore_into(
        &cluster,
        &scratch2,
        &["--waldir", live_wal.to_str().unwrap()],
    );
    assert_refused(&run, &[live_wal.to_str().unwrap(), "--waldir"]);
    let wal2 = cluster.dir.path().join("wal2");
    let run = restore_into(&cluster, &scratch2, &["--waldir", wal2.to_str().unwrap()]);
    assert!(run.success(), "{run:?}");
    assert_eq!(fs::read_link(scratch2.join("pg_wal")).unwrap(), wal2);
    assert!(wal2.join("archive_status").is_dir());
    drop(dir);
}

/// A copy of the pgkeep binary and config under paths a shell would split or unquote.
fn awkward_install(cluster: &Cluster) -> (PathBuf, PathBuf) {
    let bin_dir = cluster.dir.subdir("bin's \"dir\" 50%p");
    let bin = bin_dir.join("pgkeep");
    fs::copy(&cluster.pgkeep_bin, &bin).unwrap();
    fs::set_permissions(&bin, fs::Permissions::from_mode(0o755)).unwrap();
    let conf_dir = cluster.dir.subdir("conf dir $HOME `x` \\");
    let config = conf_dir.join("pgkeep's.toml");
    fs::copy(&cluster.config, &config).unwrap();
    chown_to_postgres(&config);
    (bin, config)
}

#[test]
fn the_written_restore_command_works_from_paths_with_spaces_and_quotes() {
    let mut cluster = Cluster::new();
    cluster.execute("CREATE TABLE t AS SELECT generate_series(1, 100) AS id");
    cluster.backup("full");
    // These rows exist only in WAL archived after the backup: recovery must fetch it.
    cluster.execute("INSERT INTO t SELECT generate_series(101, 300)");
    cluster.switch_wal_and_wait();
    cluster.stop_and_wipe();
    let (bin, config) = awkward_install(&cluster);
    let out = user_command(&bin)
        .current_dir("/tmp")
        .arg("--config")
        .arg(&config)
        .args(["restore", "--pgdata", cluster.data.to_str().unwrap()])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    cluster.start();
    cluster.wait_promoted();
    assert_eq!(cluster.query_text("SELECT count(*)::text FROM t"), "300");
}

#[test]
fn entries_that_lead_out_of_the_data_directory_are_refused_everywhere() {
    let cluster = Cluster::new();
    let label = cluster.backup("full")["label"]
        .as_str()
        .unwrap()
        .to_string();
    let outside = cluster.dir.subdir("outside");
    // A link out of the data directory, and a file under it (copied from a real entry).
    let catalog = pgkeep_catalog::Catalog::open(&cluster.repo.join("catalog.db")).unwrap();
    let files = catalog.files(&label).unwrap();
    let version = files.iter().find(|f| f.path == "PG_VERSION").unwrap();
    let mut link = version.clone();
    link.path = "evil".into();
    link.kind = pgkeep_catalog::FileKind::Symlink;
    link.link_target = Some(outside.display().to_string());
    link.crc32c = None;
    link.sha256 = None;
    link.stored_in = None;
    let mut under = version.clone();
    under.path = "evil/pwned".into();
    catalog.insert_files(&label, &[link, under]).unwrap();
    drop(catalog);
    crate::harness::give_catalog_to_postgres(&cluster.repo);

    // restore, run as root as a DBA may: refused before writing anything.
    let dest = cluster.dir.path().join("restored");
    let mut restore = if is_root() {
        Command::new(&cluster.pgkeep_bin)
    } else {
        user_command(&cluster.pgkeep_bin)
    };
    let out = restore
        .arg("--config")
        .arg(&cluster.config)
        .args(["restore", "--pgdata", dest.to_str().unwrap()])
        .output()
        .unwrap();
    let run = Run {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    };
    assert_refused(&run, &[&label, "evil/pwned"]);
    assert!(!dest.exists(), "restore wrote {}", dest.display());
    assert_eq!(fs::read_dir(&outside).unwrap().count(), 0);

    // validate: the backup is CORRUPT, naming the entry.
    let run = cluster.pgkeep(&["validate", &label]);
    assert_eq!(run.code, Some(3), "{run:?}");
    assert!(run.stdout.contains("evil/pwned"), "{run:?}");

    // catalog rebuild from a manifest listing the same entries: not restorable.
    let manifest = cluster.repo.join("backup").join(&label).join("manifest");
    let text = fs::read_to_string(&manifest).unwrap();
    let line = text
        .lines()
        .find(|l| l.starts_with("PG_VERSION\t"))
        .unwrap();
    let dotdot = line.replacen("PG_VERSION", "base/../../../outside/pwned", 1);
    fs::write(&manifest, format!("{text}{dotdot}\n")).unwrap();
    fs::remove_file(cluster.repo.join("catalog.db")).unwrap();
    let run = cluster.pgkeep_ok(&["catalog", "rebuild"]);
    let said = format!("{}{}", run.stdout, run.stderr);
    assert!(
        said.contains(&label) && said.contains("base/../../../outside/pwned"),
        "{run:?}"
    );
    let run = restore_into(&cluster, &dest, &[]);
    assert_eq!(run.code, Some(1), "{run:?}");
    assert!(!dest.exists(), "restore wrote {}", dest.display());
    assert_eq!(fs::read_dir(&outside).unwrap().count(), 0);
}

#[test]
fn every_restored_file_is_durable_before_pg_control_is_written_and_pg_control_after() {
    let Some(strace) = ["/usr/bin/strace", "/bin/strace"]
        .into_iter()
        .find(|p| Path::new(p).exists())
    else {
        panic!("strace is needed (apt-get install strace; .ci/run installs it)");
    };
    let cluster = Cluster::new();
    let ts = cluster.dir.subdir("ts");
    cluster.execute(&format!(
        "CREATE TABLESPACE extra LOCATION '{}'; CREATE TABLE in_ts TABLESPACE extra AS SELECT 1 AS id",
        ts.display()
    ));
    let oid = tablespace_oid(&cluster);
    cluster.backup("full");
    let dest = cluster.dir.path().join("restored");
    let copy_ts = cluster.dir.path().join("copy-ts");
    let trace = cluster.dir.path().join("trace.txt");
    let out = user_command(strace)
        .args([
            "-f",
            "-y",
            "-e",
            "trace=syncfs,fsync,fdatasync,rename,renameat,renameat2",
        ])
        .arg("-o")
        .arg(&trace)
        .arg(&cluster.pgkeep_bin)
        .arg("--config")
        .arg(&cluster.config)
        .args([
            "restore",
            "--pgdata",
            dest.to_str().unwrap(),
            "--tablespace-map",
        ])
        .arg(format!("{oid}={}", copy_ts.display()))
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let trace = read(&trace);
    let lines: Vec<&str> = trace.lines().collect();
    let at = |what: &dyn Fn(&str) -> bool| lines.iter().position(|l| what(l));
    let control = format!("{}/global/pg_control\"", dest.display());
    let renamed = at(&|l| l.contains("rename") && l.ends_with("= 0") && l.contains(&control))
        .unwrap_or_else(|| panic!("pg_control was not renamed into place:\n{trace}"));
    for dir in [&dest, &copy_ts] {
        let synced = at(&|l| l.contains("syncfs(") && l.contains(&format!("<{}>", dir.display())));
        assert!(
            synced.is_some_and(|s| s < renamed),
            "{} not synced before pg_control:\n{trace}",
            dir.display()
        );
    }
    let temp_synced = at(&|l| l.contains("fsync(") && l.contains("/global/pg_control."));
    assert!(temp_synced.is_some_and(|s| s < renamed), "{trace}");
    let dir_synced = lines[renamed..]
        .iter()
        .any(|l| l.contains("fsync(") && l.contains(&format!("<{}/global>", dest.display())));
    assert!(dir_synced, "global/ not synced after the rename:\n{trace}");
}

fn read(p: &Path) -> String {
    fs::read_to_string(p).unwrap_or_default()
}

#[test]
fn a_restore_past_a_missing_archived_segment_is_refused_naming_it() {
    let mut cluster = Cluster::new();
    cluster.execute("CREATE TABLE t (id int); INSERT INTO t SELECT generate_series(1, 100)");
    cluster.backup("full");
    cluster.execute("INSERT INTO t SELECT generate_series(101, 200)");
    let before_gap = cluster.query_text("SELECT pg_current_wal_lsn()::text");
    cluster.switch_wal_and_wait();
    cluster.execute("INSERT INTO t SELECT generate_series(201, 300)");
    let lost = cluster.switch_wal_and_wait();
    cluster.execute("INSERT INTO t SELECT generate_series(301, 400)");
    cluster.switch_wal_and_wait();
    // The segment is gone from the archive, object and catalog row, as if never archived.
    fs::remove_file(crate::archive::find_stored(&cluster.repo, &lost)).unwrap();
    let catalog = pgkeep_catalog::Catalog::open(&cluster.repo.join("catalog.db")).unwrap();
    catalog.delete_wal(&lost).unwrap();
    drop(catalog);
    crate::harness::give_catalog_to_postgres(&cluster.repo);
    cluster.stop_and_wipe();
    // Recovery would stop at the hole and promote with 200 of 400 rows: refused.
    let run = cluster.restore(&[]);
    assert_refused(&run, &[&lost, "missing"]);
    let run = cluster.restore(&["--target-lsn", "FFFFFFFF/0"]);
    assert_refused(&run, &[&lost]);
    // A target before the hole is what a DBA asks for then, and it works.
    let run = cluster.restore(&["--target-lsn", &before_gap, "--target-action", "promote"]);
    assert!(run.success(), "{run:?}");
    cluster.start();
    cluster.wait_promoted();
    assert_eq!(cluster.query_text("SELECT count(*)::text FROM t"), "200");
}
