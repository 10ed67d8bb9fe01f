//! `archive-push`, `archive-get` and `check` against real clusters.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::harness::{
    chown_to_postgres, corrupt_stored_object, is_root, user_command, Cluster, ClusterOptions, Run,
};

/// Names of the segments PostgreSQL marked archived (`.done`), oldest first.
fn done_segments(cluster: &Cluster) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(cluster.data.join("pg_wal/archive_status"))
        .unwrap()
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            e.file_name()
                .to_str()?
                .strip_suffix(".done")
                .map(str::to_string)
        })
        .filter(|n| n.len() == 24)
        .collect();
    names.sort();
    names
}

fn archive_get(cluster: &Cluster, name: &str) -> (crate::harness::Run, PathBuf) {
    let dest = cluster.dir.subdir("restored").join(name);
    let run = cluster.pgkeep(&["archive-get", name, dest.to_str().unwrap()]);
    (run, dest)
}

#[test]
fn archiving_under_pgbench_loses_nothing_and_get_returns_identical_bytes() {
    let cluster = Cluster::new();
    cluster.pg_tool_ok("pgbench", &["-i", "-s", "3", "-q"]);
    cluster.pg_tool_ok("pgbench", &["-c", "2", "-t", "1500", "-n"]);
    let last = cluster.switch_wal_and_wait();
    let failed = cluster.query_text("SELECT failed_count::text FROM pg_stat_archiver");
    assert_eq!(
        failed,
        "0",
        "archiver failures; server log:\n{}",
        fs::read_to_string(&cluster.log).unwrap()
    );
    let segments = done_segments(&cluster);
    assert!(
        segments.len() >= 3,
        "too few segments archived: {segments:?}"
    );
    assert!(segments.contains(&last));
    for name in &segments {
        let (run, dest) = archive_get(&cluster, name);
        assert!(run.success(), "archive-get {name}: {run:?}");
        let original = fs::read(cluster.data.join("pg_wal").join(name)).unwrap();
        assert!(
            fs::read(&dest).unwrap() == original,
            "{name} differs after archive-get"
        );
    }
}

#[test]
fn same_content_again_succeeds_and_different_content_is_refused() {
    let cluster = Cluster::new();
    let name = cluster.switch_wal_and_wait();
    // The archiver's retry after a crash: same name, same bytes.
    let rel = format!("pg_wal/{name}");
    let run = cluster.pgkeep_in(&cluster.data, &["archive-push", &rel]);
    assert!(run.success(), "{run:?}");
    // Same name, other bytes: refused, original kept.
    let fake_dir = cluster.dir.subdir("fake");
    let fake = fake_dir.join(&name);
    let mut bytes = fs::read(cluster.data.join(&rel)).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x55;
    fs::write(&fake, &bytes).unwrap();
    chown_to_postgres(&fake);
    let run = cluster.pgkeep(&["archive-push", fake.to_str().unwrap()]);
    assert_eq!(run.code, Some(1), "{run:?}");
    assert!(
        run.stderr.contains(&name) && run.stderr.contains("different content"),
        "{run:?}"
    );
    assert_eq!(run.stderr.lines().count(), 1, "{run:?}");
    let (run, dest) = archive_get(&cluster, &name);
    assert!(run.success(), "{run:?}");
    assert!(fs::read(dest).unwrap() == fs::read(cluster.data.join(&rel)).unwrap());
}

#[test]
fn an_object_left_without_its_catalog_row_is_adopted_and_served_intact() {
    let cluster = Cluster::with(ClusterOptions {
        archive: false,
        ..Default::default()
    });
    cluster.execute("CREATE TABLE t AS SELECT generate_series(1, 100000) AS id");
    let name = cluster.query_text("SELECT pg_walfile_name(pg_current_wal_lsn())");
    cluster.execute("SELECT pg_switch_wal()");
    let rel = format!("pg_wal/{name}");
    // A second repository of the same cluster stores the segment; its object is then placed in
    // the cluster's repository as a push that died before writing the catalog row leaves it.
    let other_repo = cluster.dir.subdir("other-repo");
    let config = fs::read_to_string(&cluster.config)
        .unwrap()
        .replace(cluster.repo.to_str().unwrap(), other_repo.to_str().unwrap());
    let other_config = cluster.dir.path().join("other.toml");
    fs::write(&other_config, config).unwrap();
    chown_to_postgres(&other_config);
    for args in [vec!["init"], vec!["archive-push", &rel]] {
        let out = crate::harness::user_command(&cluster.pgkeep_bin)
            .current_dir(&cluster.data)
            .arg("--config")
            .arg(&other_config)
            .args(&args)
            .output()
            .unwrap();
        assert!(out.status.success(), "{args:?}: {out:?}");
    }
    let orphan = find_stored(&other_repo, &name);
    let relative = orphan.strip_prefix(&other_repo).unwrap();
    let target = cluster.repo.join(relative);
    fs::create_dir_all(target.parent().unwrap()).unwrap();
    fs::copy(&orphan, &target).unwrap();
    for path in target.ancestors().take_while(|p| *p != cluster.repo) {
        chown_to_postgres(path);
    }

    let run = cluster.pgkeep_in(&cluster.data, &["archive-push", &rel]);
    assert!(run.success(), "{run:?}");
    let (run, dest) = archive_get(&cluster, &name);
    assert!(run.success(), "{run:?}");
    assert!(fs::read(dest).unwrap() == fs::read(cluster.data.join(&rel)).unwrap());
    let run = cluster.pgkeep(&["validate"]);
    assert!(run.success(), "{run:?}");
}

#[test]
fn random_bytes_and_foreign_segments_are_refused() {
    let cluster = Cluster::new();
    let other = Cluster::with(ClusterOptions {
        init_repo: false,
        archive: false,
        ..Default::default()
    });
    let dir = cluster.dir.subdir("incoming");
    // 16 MiB of noise under a segment name.
    let noise: Vec<u8> = (0..16u32 * 1024 * 1024)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    let noise_path = dir.join("0000000100000000000000F0");
    fs::write(&noise_path, noise).unwrap();
    chown_to_postgres(&noise_path);
    let run = cluster.pgkeep(&["archive-push", noise_path.to_str().unwrap()]);
    assert_eq!(run.code, Some(1), "{run:?}");
    assert!(run.stderr.contains("0000000100000000000000F0"), "{run:?}");
    // A real segment of another cluster.
    let seg = other.query_text("SELECT pg_walfile_name(pg_current_wal_lsn())");
    let foreign = dir.join(&seg);
    fs::copy(other.data.join("pg_wal").join(&seg), &foreign).unwrap();
    chown_to_postgres(&foreign);
    let run = cluster.pgkeep(&["archive-push", foreign.to_str().unwrap()]);
    assert_eq!(run.code, Some(1), "{run:?}");
    assert!(run.stderr.contains("system identifier"), "{run:?}");
    // Not a WAL name at all.
    let junk = dir.join("notes.txt");
    fs::write(&junk, "x").unwrap();
    let run = cluster.pgkeep(&["archive-push", junk.to_str().unwrap()]);
    assert_eq!(run.code, Some(1), "{run:?}");
    // Nothing of these reached the archive.
    for name in ["0000000100000000000000F0", seg.as_str()] {
        let (run, _) = archive_get(&cluster, name);
        assert_eq!(run.code, Some(1), "{name} should not be archived: {run:?}");
    }
}

#[test]
fn archive_get_of_a_missing_name_exits_1_quietly() {
    let cluster = Cluster::new();
    for name in ["00000002.history", "0000000100000000000000AA"] {
        let (run, dest) = archive_get(&cluster, name);
        assert_eq!(run.code, Some(1), "{run:?}");
        assert_eq!(
            run.stderr, "",
            "archive-get of a missing file must be quiet"
        );
        assert!(!dest.exists());
    }
}

#[test]
fn history_files_are_archived_and_returned() {
    let cluster = Cluster::new();
    let dir = cluster.dir.subdir("incoming");
    let history = dir.join("00000002.history");
    fs::write(&history, "1\t0/3000000\tno recovery target specified\n").unwrap();
    chown_to_postgres(&history);
    cluster.pgkeep_ok(&["archive-push", history.to_str().unwrap()]);
    let (run, dest) = archive_get(&cluster, "00000002.history");
    assert!(run.success(), "{run:?}");
    assert_eq!(fs::read(dest).unwrap(), fs::read(&history).unwrap());
}

#[test]
fn corrupt_stored_segment_is_refused_by_archive_get() {
    let cluster = Cluster::new();
    let name = cluster.switch_wal_and_wait();
    let stored = find_stored(&cluster.repo, &name);
    corrupt_stored_object(&stored);
    let (run, dest) = archive_get(&cluster, &name);
    assert_ne!(run.code, Some(0), "{run:?}");
    assert!(run.stderr.contains(&name), "{run:?}");
    assert!(!dest.exists(), "nothing may be written for a corrupt file");
    let leftovers: Vec<_> = fs::read_dir(dest.parent().unwrap()).unwrap().collect();
    assert!(leftovers.is_empty(), "temp file left behind: {leftovers:?}");
}

/// Regression (#13, item 3): PostgreSQL reads a restore_command status of 1 to 125 as "no such
/// file" and ends recovery there. archive-get used to exit 1 for a damaged object too, so the
/// server promoted without the damaged segment and everything after it.
#[test]
fn archive_get_exits_255_on_any_failure_but_a_missing_name() {
    let cluster = Cluster::new();
    let name = cluster.switch_wal_and_wait();
    corrupt_stored_object(&find_stored(&cluster.repo, &name));
    let (run, dest) = archive_get(&cluster, &name);
    assert_archive_get_failed(&run, &name, "corrupt");
    assert!(!dest.exists());

    let (run, _) = archive_get(&cluster, "0000000100000000000000AA");
    assert_eq!(run.code, Some(1), "{run:?}");
    assert_eq!(run.stderr, "", "a missing name must stay quiet: {run:?}");

    let dest = dest.to_str().unwrap();
    let as_postgres = |args: &[&str]| {
        let out = user_command(&cluster.pgkeep_bin)
            .current_dir(cluster.dir.path())
            .args(args)
            .output()
            .unwrap();
        Run::from_output(out)
    };
    let missing = "/nonexistent/pgkeep.toml";
    let run = as_postgres(&["--config", missing, "archive-get", &name, dest]);
    assert_archive_get_failed(&run, &name, missing);
    // restore_command with a missing argument.
    let config = cluster.config.to_str().unwrap();
    let run = as_postgres(&["--config", config, "archive-get", &name]);
    assert_archive_get_failed(&run, &name, "required");
    if is_root() {
        // The root refusal, which exits 2 for other commands.
        let out = std::process::Command::new(&cluster.pgkeep_bin)
            .args(["--config", config, "archive-get", &name, dest])
            .output()
            .unwrap();
        assert_archive_get_failed(&Run::from_output(out), &name, "--allow-root");
    }
}

/// Exit 255 and one stderr line naming the WAL file and saying `what`.
fn assert_archive_get_failed(run: &Run, name: &str, what: &str) {
    assert_eq!(run.code, Some(255), "{run:?}");
    assert_eq!(run.stderr.lines().count(), 1, "{run:?}");
    assert!(
        run.stderr.contains(name) && run.stderr.contains(what),
        "stderr should name {name} and say {what:?}: {run:?}"
    );
}

/// Regression (#13, item 3), end to end: a restore whose archive holds a damaged segment must
/// stop in recovery with the segment named in the server log, never promote without it.
#[test]
fn recovery_stops_at_a_corrupt_archived_segment_instead_of_promoting_without_it() {
    let mut cluster = Cluster::new();
    cluster.execute("CREATE TABLE t (id int); INSERT INTO t SELECT generate_series(1, 1000)");
    cluster.backup("full");
    cluster.execute("INSERT INTO t SELECT generate_series(1001, 2000)");
    // The segment holding the second thousand rows, which recovery must replay.
    let seg = cluster.switch_wal_and_wait();
    corrupt_stored_object(&find_stored(&cluster.repo, &seg));
    cluster.stop_and_wipe();
    let run = cluster.restore(&[]);
    assert!(run.success(), "{run:?}");

    // pg_ctl start fails when the startup process gives up, as it must here; whatever it
    // says, the server must not open for writes while it lives.
    cluster.try_start();
    let deadline = Instant::now() + Duration::from_secs(120);
    while cluster.postmaster_alive() {
        if let Some(rows) = rows_if_promoted(&cluster) {
            panic!(
                "the server promoted with {rows} of 2000 rows instead of stopping at {seg}; server log:\n{}",
                fs::read_to_string(&cluster.log).unwrap_or_default()
            );
        }
        assert!(
            Instant::now() < deadline,
            "the server neither stopped nor promoted in 120 s; server log:\n{}",
            fs::read_to_string(&cluster.log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let log = fs::read_to_string(&cluster.log).unwrap();
    assert!(
        log.lines()
            .any(|l| l.contains(&format!("archive-get {seg}")) && l.contains("corrupt")),
        "the server log should carry archive-get's line naming {seg}:\n{log}"
    );
    assert!(
        log.lines().any(|l| l.contains("FATAL") && l.contains(&seg)),
        "recovery should stop with a FATAL naming {seg}:\n{log}"
    );
}

/// The row count of `t` once the server accepts writes, `None` while it cannot be reached or is
/// still in recovery.
fn rows_if_promoted(cluster: &Cluster) -> Option<i64> {
    let mut client = postgres::Config::new()
        .host(cluster.sock.to_str().unwrap())
        .port(cluster.port)
        .user("postgres")
        .dbname("postgres")
        .connect_timeout(Duration::from_secs(2))
        .connect(postgres::NoTls)
        .ok()?;
    let in_recovery: bool = client
        .query_one("SELECT pg_is_in_recovery()", &[])
        .ok()?
        .get(0);
    if in_recovery {
        return None;
    }
    Some(
        client
            .query_one("SELECT count(*) FROM t", &[])
            .map_or(-1, |r| r.get(0)),
    )
}

/// The repository file holding an archived WAL file.
pub(crate) fn find_stored(repo: &Path, name: &str) -> PathBuf {
    let mut stack = vec![repo.join("archive")];
    while let Some(dir) = stack.pop() {
        for e in fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else if p.file_name().unwrap().to_str().unwrap() == format!("{name}.lz4") {
                return p;
            }
        }
    }
    panic!("{name} not found in {}", repo.display());
}

#[test]
fn push_killed_mid_write_leaves_nothing_under_the_final_name_and_retry_succeeds() {
    let cluster = Cluster::with(ClusterOptions {
        archive: false,
        ..Default::default()
    });
    cluster.pg_tool_ok("pgbench", &["-i", "-s", "2", "-q"]);
    cluster.execute("CHECKPOINT");
    let current = cluster.query_text("SELECT pg_walfile_name(pg_current_wal_lsn())");
    let mut segments: Vec<String> = fs::read_dir(cluster.data.join("pg_wal"))
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.len() == 24 && *n < current)
        .collect();
    segments.sort();
    assert!(segments.len() >= 2, "{segments:?}");
    let mut killed_mid_write = 0;
    for (i, name) in segments.iter().enumerate() {
        let mut child = crate::harness::user_command(&cluster.pgkeep_bin)
            .current_dir(&cluster.data)
            .arg("--config")
            .arg(&cluster.config)
            .args(["archive-push", &format!("pg_wal/{name}")])
            .spawn()
            .unwrap();
        // Spread the kills over the push's lifetime.
        std::thread::sleep(Duration::from_millis(2 + (i as u64 * 7) % 40));
        crate::harness::kill_tree(child.id());
        let status = child.wait().unwrap();
        if !status.success() {
            killed_mid_write += 1;
        }
        let (run, dest) = archive_get(&cluster, name);
        if run.success() {
            // Whatever is under the final name must be the whole file.
            assert!(
                fs::read(&dest).unwrap()
                    == fs::read(cluster.data.join("pg_wal").join(name)).unwrap()
            );
        } else {
            assert_eq!(run.code, Some(1), "{run:?}");
        }
        let retry = cluster.pgkeep_in(&cluster.data, &["archive-push", &format!("pg_wal/{name}")]);
        assert!(retry.success(), "retry after kill: {retry:?}");
        let (run, dest) = archive_get(&cluster, name);
        assert!(run.success(), "{run:?}");
        assert!(
            fs::read(&dest).unwrap() == fs::read(cluster.data.join("pg_wal").join(name)).unwrap()
        );
    }
    eprintln!(
        "{killed_mid_write} of {} pushes were killed before finishing",
        segments.len()
    );
}

#[test]
fn check_reports_each_check_and_confirms_archiving() {
    let cluster = Cluster::new();
    let run = cluster.pgkeep_ok(&["check"]);
    for what in [
        "wal_level",
        "archive_mode",
        "archive_command",
        "repository",
        "archiving",
    ] {
        assert!(
            run.stdout
                .lines()
                .any(|l| l.starts_with("ok") && l.contains(what)),
            "missing ok line for {what}: {run:?}"
        );
    }
}

#[test]
fn check_fails_naming_the_fix_when_archiving_is_off() {
    let cluster = Cluster::with(ClusterOptions {
        archive: false,
        ..Default::default()
    });
    let run = cluster.pgkeep(&["check"]);
    assert_eq!(run.code, Some(3), "{run:?}");
    assert!(
        run.stdout.lines().any(|l| l.starts_with("FAIL")
            && l.contains("archive_mode")
            && l.contains("archive_mode = on")),
        "{run:?}"
    );
}
