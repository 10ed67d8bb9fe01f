//! Several repositories per cluster (`[[repo]]` entries): archive-push stores into every one,
//! `--repo N` picks one for backup and restore, show/validate go over all, archive-get falls
//! back to a later repository, and a repository that cannot be written makes PostgreSQL retry.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::harness::s3::S3Server;
use crate::harness::{corrupt_stored_object, Cluster, ClusterOptions};
use crate::restore::server_now;

/// Two local repositories: `{dir}/repo` (repo1) and `{dir}/repo2` (repo2).
const TWO_LOCAL: &str = "[[repo]]\npath = \"{dir}/repo\"\n\n[[repo]]\npath = \"{dir}/repo2\"\n";

fn two_local() -> Cluster {
    Cluster::with(ClusterOptions {
        repo_toml: Some(TWO_LOCAL.to_string()),
        ..ClusterOptions::default()
    })
}

fn repo2(cluster: &Cluster) -> PathBuf {
    cluster.dir.path().join("repo2")
}

/// The stored object of WAL file `name` under a local repository, if there is one.
fn wal_object(repo: &Path, name: &str) -> Option<PathBuf> {
    let wanted = format!("{name}.lz4");
    let mut dirs = vec![repo.join("archive")];
    while let Some(dir) = dirs.pop() {
        for e in fs::read_dir(&dir).ok()?.flatten() {
            let path = e.path();
            if path.is_dir() {
                dirs.push(path);
            } else if e.file_name().to_string_lossy() == wanted {
                return Some(path);
            }
        }
    }
    None
}

/// `chmod -R` as root: the repository belongs to the cluster's user, pgkeep runs as it.
fn chmod_tree(mode: &str, path: &Path) {
    let ok = Command::new("chmod")
        .args(["-R", mode])
        .arg(path)
        .status()
        .unwrap()
        .success();
    assert!(ok, "chmod -R {mode} {}", path.display());
}

fn archiver_failures(cluster: &Cluster) -> i64 {
    cluster
        .query_text("SELECT failed_count::text FROM pg_stat_archiver")
        .parse()
        .unwrap()
}

#[test]
fn multirepo_push_reaches_both_backup_and_pitr_restore_use_repo_2() {
    let mut cluster = two_local();
    let r2 = repo2(&cluster);
    assert!(r2.join("catalog.db").is_file(), "init made repo2");
    cluster.execute(
        "CREATE TABLE t (id int PRIMARY KEY, v text); INSERT INTO t SELECT g, md5(g::text) FROM generate_series(1, 20000) g;",
    );
    let seg = cluster.switch_wal_and_wait();
    assert!(wal_object(&cluster.repo, &seg).is_some(), "{seg} in repo1");
    assert!(wal_object(&r2, &seg).is_some(), "{seg} in repo2");

    let run = cluster.pgkeep_ok(&["backup", "--type", "full", "--repo", "2"]);
    assert!(run.stdout.contains("stored in repo2 ("), "{run:?}");
    let label = run.stdout.split_whitespace().nth(1).unwrap().to_string();
    assert!(r2.join("backup").join(&label).join("backup.ini").is_file());
    assert!(!cluster.repo.join("backup").join(&label).exists());
    let shown: serde_json::Value =
        serde_json::from_str(&cluster.pgkeep_ok(&["show", "--json"]).stdout).unwrap();
    let backups = shown["backups"].as_array().unwrap();
    assert_eq!(backups.len(), 1, "{shown}");
    assert_eq!(backups[0]["label"], label.as_str());
    assert_eq!(backups[0]["repo"], 2);
    assert_eq!(shown["repos"].as_array().unwrap().len(), 2, "{shown}");
    let shown = cluster.pgkeep_ok(&["show", "--repo", "1", "--json"]).stdout;
    assert!(shown.contains("\"backups\":[]"), "{shown}");
    let text = cluster.pgkeep_ok(&["show"]).stdout;
    assert!(
        text.contains("repo1 (") && text.contains("repo2 ("),
        "{text}"
    );
    // expire and catalog rebuild also go over every repository, each under its name.
    let text = cluster.pgkeep_ok(&["expire", "--dry-run"]).stdout;
    assert!(
        text.contains("repo1 (") && text.contains("repo2 ("),
        "{text}"
    );
    let doc: serde_json::Value =
        serde_json::from_str(&cluster.pgkeep_ok(&["expire", "--dry-run", "--json"]).stdout)
            .unwrap();
    assert_eq!(doc["repos"][1]["repo"], 2, "{doc}");
    let text = cluster.pgkeep_ok(&["catalog", "rebuild"]).stdout;
    assert!(
        text.contains("repo1 (") && text.contains("repo2 ("),
        "{text}"
    );
    let shown = cluster.pgkeep_ok(&["show", "--repo", "2", "--json"]).stdout;
    assert!(shown.contains(&label), "{shown}");

    // A repository number the config does not have: one line, exit 2.
    let run = cluster.pgkeep(&["backup", "--type", "full", "--repo", "3"]);
    assert_eq!(run.code, Some(2), "{run:?}");
    assert!(
        run.stderr.contains("--repo 3") && run.stderr.contains("2 repositories"),
        "{run:?}"
    );
    assert_eq!(run.stderr.trim().lines().count(), 1, "{run:?}");

    let live = cluster.fingerprint("t", "id");
    std::thread::sleep(Duration::from_millis(300));
    let t = server_now(&cluster);
    std::thread::sleep(Duration::from_millis(300));
    cluster.execute("DELETE FROM t WHERE id > 100");
    cluster.switch_wal_and_wait();

    // validate goes over both repositories: the backup in repo2, the archive in each.
    let run = cluster.pgkeep_ok(&["validate"]);
    assert!(
        run.stdout.contains("repo1 (") && run.stdout.contains("repo2 ("),
        "{run:?}"
    );
    assert!(
        run.stdout
            .contains(&format!("backup {label} OK (was DONE)")),
        "{run:?}"
    );

    // Without --repo, restore passes over repo1 (no backup) and says it chose repo2.
    let elsewhere = cluster.dir.path().join("elsewhere");
    let run = cluster.pgkeep(&[
        "restore",
        "--pgdata",
        elsewhere.to_str().unwrap(),
        "--target",
        "immediate",
    ]);
    assert!(run.success(), "{run:?}");
    assert!(
        run.stdout.contains("restoring from repo2 (") && run.stdout.contains("passed over"),
        "{run:?}"
    );

    cluster.stop_and_wipe();
    let run = cluster.restore(&[
        "--repo",
        "2",
        "--target-time",
        &t,
        "--target-action",
        "promote",
    ]);
    assert!(run.success(), "{run:?}");
    assert!(
        run.stdout.contains("restoring from repo2 (") && run.stdout.contains("(--repo 2)"),
        "{run:?}"
    );
    cluster.start();
    cluster.wait_promoted();
    assert_eq!(cluster.fingerprint("t", "id"), live);
}

#[test]
fn multirepo_unwritable_repository_fails_the_push_until_repaired_and_nothing_is_lost() {
    let cluster = two_local();
    let r2 = repo2(&cluster);
    let first = cluster.switch_wal_and_wait();
    let archive2 = r2.join("archive");
    chmod_tree("a-w", &archive2);
    let failures = archiver_failures(&cluster);
    cluster.execute("CREATE TABLE t AS SELECT g FROM generate_series(1, 1000) g");
    cluster.execute("SELECT pg_create_restore_point('x')");
    let seg = cluster.query_text("SELECT pg_walfile_name(pg_switch_wal())");
    // PostgreSQL retries: the failures count up while the segment stays unacknowledged.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while archiver_failures(&cluster) < failures + 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "archive-push did not fail"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let last = cluster.query_text("SELECT coalesce(last_archived_wal, '') FROM pg_stat_archiver");
    assert!(last < seg, "{seg} acknowledged while repo2 cannot hold it");
    // repo1 took it; the error names repo2 only.
    assert!(wal_object(&cluster.repo, &seg).is_some());
    assert!(wal_object(&r2, &seg).is_none());
    let log = fs::read_to_string(&cluster.log).unwrap();
    let line = log
        .lines()
        .find(|l| l.contains("pgkeep: error") && l.contains(&seg))
        .unwrap_or_else(|| panic!("no pgkeep error in the server log:\n{log}"));
    assert!(
        line.contains("repo2 (") && line.contains("taken by repo1"),
        "{line}"
    );

    chmod_tree("u+w", &archive2);
    // After a few failures the archiver waits for a new segment (or a minute): give it one.
    cluster.switch_wal_and_wait();
    for repo in [&cluster.repo, &r2] {
        for name in [&first, &seg] {
            assert!(
                wal_object(repo, name).is_some(),
                "{name} in {}",
                repo.display()
            );
        }
    }
    // Every segment from the first archived on is in each repository, each read back by CRC.
    let run = cluster.pgkeep_ok(&["validate"]);
    assert_eq!(
        run.stdout.matches("0 damaged or missing, 0 gap(s)").count(),
        2,
        "{run:?}"
    );
    // A re-push of the same content into both is a success.
    let path = format!("pg_wal/{seg}");
    let run = cluster.pgkeep_in(&cluster.data, &["archive-push", &path]);
    assert!(run.success(), "{run:?}");
    // Other bytes under the same name are refused by each repository, which keeps its copy.
    let other = cluster.dir.subdir("other").join(&seg);
    let mut bytes = fs::read(cluster.data.join(&path)).unwrap();
    let at = bytes.len() / 2;
    bytes[at] ^= 0x5a;
    fs::write(&other, &bytes).unwrap();
    crate::harness::chown_to_postgres(&other);
    let run = cluster.pgkeep(&["archive-push", other.to_str().unwrap()]);
    assert_eq!(run.code, Some(1), "{run:?}");
    assert!(
        run.stderr.contains("taken by no repository")
            && run.stderr.matches("different content").count() == 2,
        "{run:?}"
    );
    let got = cluster.dir.path().join("got");
    cluster.pgkeep_ok(&["archive-get", &seg, got.to_str().unwrap()]);
    assert_eq!(
        fs::read(&got).unwrap(),
        fs::read(cluster.data.join(&path)).unwrap()
    );
}

#[test]
fn multirepo_archive_get_falls_back_to_repo_2_when_repo_1_lost_or_damaged_a_segment() {
    let cluster = two_local();
    let r2 = repo2(&cluster);
    cluster.execute("CREATE TABLE t AS SELECT g FROM generate_series(1, 1000) g");
    let lost = cluster.switch_wal_and_wait();
    cluster.execute("INSERT INTO t SELECT g FROM generate_series(1, 1000) g");
    let damaged = cluster.switch_wal_and_wait();
    fs::remove_file(wal_object(&cluster.repo, &lost).unwrap()).unwrap();
    corrupt_stored_object(&wal_object(&cluster.repo, &damaged).unwrap());

    let out = cluster.dir.subdir("out");
    for (name, what) in [(&lost, "no object at"), (&damaged, "")] {
        let dest = out.join(name);
        let run = cluster.pgkeep(&["archive-get", name, dest.to_str().unwrap()]);
        assert!(run.success(), "{run:?}");
        assert!(
            run.stderr.contains("warning")
                && run.stderr.contains("repo1 (")
                && run.stderr.contains("served from repo2 ("),
            "{run:?}"
        );
        assert!(run.stderr.contains(what), "{run:?}");
        assert_eq!(
            fs::read(&dest).unwrap(),
            fs::read(cluster.data.join("pg_wal").join(name)).unwrap(),
            "{name}"
        );
    }
    // No repository has the name: exit 1, quietly.
    let run = cluster.pgkeep(&[
        "archive-get",
        "0000000100000000000000FE",
        out.join("x").to_str().unwrap(),
    ]);
    assert_eq!(run.code, Some(1), "{run:?}");
    assert!(run.stderr.is_empty(), "{run:?}");
    // The only other copy damaged too: no repository serves it, which is not "not found".
    corrupt_stored_object(&wal_object(&r2, &damaged).unwrap());
    let run = cluster.pgkeep(&["archive-get", &damaged, out.join("y").to_str().unwrap()]);
    assert_eq!(run.code, Some(255), "{run:?}");
    assert!(
        run.stderr.contains("repo1 (") && run.stderr.contains("repo2 ("),
        "{run:?}"
    );
    assert!(!out.join("y").exists());
}

#[test]
fn multirepo_local_and_s3_repositories_archive_back_up_and_restore() {
    let Some(s3) = S3Server::start() else { return };
    s3.create_bucket("pgkeep");
    let catalog = PathBuf::from("{dir}/s3-catalog.db");
    let tables = format!(
        "[[repo]]\npath = \"{{dir}}/repo\"\n\n[[repo]]\n{}",
        s3.repo_toml("pgkeep", "main", &catalog)
    );
    let mut cluster = Cluster::with(ClusterOptions {
        repo_toml: Some(tables),
        ..ClusterOptions::default()
    });
    let run = cluster.pgkeep_ok(&["check"]);
    assert!(
        run.stdout.contains("reached repo1") && run.stdout.contains("reached repo2"),
        "{run:?}"
    );
    cluster.execute(
        "CREATE TABLE t (id int PRIMARY KEY, v text); INSERT INTO t SELECT g, md5(g::text) FROM generate_series(1, 20000) g;",
    );
    let run = cluster.pgkeep_ok(&["backup", "--type", "full", "--repo", "2"]);
    let label = run.stdout.split_whitespace().nth(1).unwrap().to_string();
    assert!(s3
        .object_path("pgkeep", &format!("main/backup/{label}/backup.ini"))
        .is_file());
    let seg = cluster.switch_wal_and_wait();
    assert!(wal_object(&cluster.repo, &seg).is_some(), "{seg} in repo1");
    let sysid = cluster.query_text("SELECT system_identifier::text FROM pg_control_system()");
    let key = pgkeep_repo::keys::wal(sysid.parse().unwrap(), &seg);
    assert!(
        s3.object_path("pgkeep", &format!("main/{key}")).is_file(),
        "{seg} in the bucket"
    );

    let live = cluster.fingerprint("t", "id");
    std::thread::sleep(Duration::from_millis(300));
    let t = server_now(&cluster);
    std::thread::sleep(Duration::from_millis(300));
    cluster.execute("DELETE FROM t WHERE id > 100");
    cluster.switch_wal_and_wait();

    // repo1 has no backup: restore takes the bucket's, and recovery reads WAL from repo1.
    cluster.stop_and_wipe();
    let run = cluster.restore(&["--target-time", &t, "--target-action", "promote"]);
    assert!(run.success(), "{run:?}");
    assert!(run.stdout.contains("restoring from repo2 ("), "{run:?}");
    cluster.start();
    cluster.wait_promoted();
    assert_eq!(cluster.fingerprint("t", "id"), live);
}

/// Every file of a local repository but its catalog and lock, with its content.
fn repo_tree(repo: &Path) -> Vec<(String, Vec<u8>)> {
    crate::harness::tree(repo)
        .into_iter()
        .filter(|(p, _)| !p.starts_with("catalog.db") && p != "backup.lock")
        .collect()
}

fn shown(cluster: &Cluster, repo: &str) -> Vec<serde_json::Value> {
    let run = cluster.pgkeep_ok(&["show", "--repo", repo, "--json"]);
    let doc: serde_json::Value = serde_json::from_str(&run.stdout).unwrap();
    doc["backups"].as_array().unwrap().clone()
}

#[test]
fn multirepo_delete_pin_and_drill_with_repo_2_leave_repo_1_alone() {
    let cluster = two_local();
    let r2 = repo2(&cluster);
    let drill_dir = cluster.dir.subdir("drill");
    cluster.set_config("drill", &format!("dir = \"{}\"", drill_dir.display()));
    cluster.execute("CREATE TABLE t AS SELECT g AS id FROM generate_series(1, 1000) g");
    let label =
        |run: &crate::harness::Run| run.stdout.split_whitespace().nth(1).unwrap().to_string();
    let in1 = label(&cluster.pgkeep_ok(&["backup", "--type", "full", "--repo", "1"]));
    let old2 = label(&cluster.pgkeep_ok(&["backup", "--type", "full", "--repo", "2"]));
    cluster.execute("INSERT INTO t SELECT g FROM generate_series(1, 100) g");
    cluster.switch_wal_and_wait();
    let new2 = label(&cluster.pgkeep_ok(&["backup", "--type", "full", "--repo", "2"]));
    cluster.switch_wal_and_wait();
    let tree1 = repo_tree(&cluster.repo);
    let shown1 = shown(&cluster, "1");
    assert_eq!(shown1.len(), 1);

    // repo1's backup is not repo2's to delete or pin.
    for verb in ["delete", "pin"] {
        let run = cluster.pgkeep(&[verb, &in1, "--repo", "2"]);
        assert_eq!(run.code, Some(1), "{run:?}");
        assert!(run.stderr.contains("not found"), "{run:?}");
    }

    let run = cluster.pgkeep_ok(&["pin", &new2, "--repo", "2"]);
    assert!(run.stdout.contains(&new2), "{run:?}");
    let two = shown(&cluster, "2");
    let pinned: Vec<(String, bool)> = two
        .iter()
        .map(|b| {
            (
                b["label"].as_str().unwrap().to_string(),
                b["pinned"] == true,
            )
        })
        .collect();
    assert_eq!(pinned, [(old2.clone(), false), (new2.clone(), true)]);

    cluster.pgkeep_ok(&["delete", &old2, "--repo", "2"]);
    assert!(!r2.join("backup").join(&old2).exists());
    assert!(r2.join("backup").join(&new2).join("backup.ini").is_file());
    let two = shown(&cluster, "2");
    assert_eq!(two.len(), 1);
    assert_eq!(two[0]["label"], new2.as_str());

    let run = cluster.pgkeep(&["drill", "--repo", "2", "--json"]);
    assert!(run.success(), "{run:?}");
    let report: serde_json::Value = serde_json::from_str(&run.stdout).unwrap();
    assert_eq!(report["status"], "passed", "{report}");
    assert_eq!(report["backup"], new2.as_str(), "{report}");
    assert!(shown(&cluster, "2")[0]["last_drill"].is_object());

    // repo1: the same files and the same catalog rows, no pin, no drill.
    assert!(repo_tree(&cluster.repo) == tree1, "repo1's files changed");
    assert_eq!(shown(&cluster, "1"), shown1);
}
