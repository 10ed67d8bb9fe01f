//! `pgkeep expire`, `delete`, `pin` and `unpin` against real clusters: what goes is checked on
//! disk and in the catalog, what stays is validated and restored.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use rusqlite::types::ValueRef;
use serde_json::Value;

use crate::harness::{kill_tree, tree, user_command, Cluster, Run};
use crate::restore::server_now;

/// Append a `[retention]` section to the cluster's config.
fn set_retention(cluster: &Cluster, body: &str) {
    let mut f = fs::OpenOptions::new()
        .append(true)
        .open(&cluster.config)
        .unwrap();
    write!(f, "[retention]\n{body}\n").unwrap();
}

/// Every repository file but the catalog and the lock, by relative path, with its size.
fn repo_files(repo: &Path) -> BTreeMap<String, u64> {
    tree(repo)
        .into_iter()
        .filter(|(p, c)| !p.starts_with("catalog.db") && p != "backup.lock" && !c.is_empty())
        .map(|(p, c)| (p, c.len() as u64))
        .collect()
}

/// Every row of the catalog's backup, backup_file and wal tables, as text.
fn catalog_rows(repo: &Path) -> Vec<String> {
    let conn = rusqlite::Connection::open(repo.join("catalog.db")).unwrap();
    let mut out = Vec::new();
    for table in ["backup", "backup_file", "wal"] {
        let mut stmt = conn
            .prepare(&format!("SELECT * FROM {table} ORDER BY 1, 2"))
            .unwrap();
        let n = stmt.column_count();
        let rows = stmt
            .query_map([], |row| {
                let cols: Vec<String> = (0..n)
                    .map(|i| match row.get_ref(i).unwrap() {
                        ValueRef::Text(t) => String::from_utf8_lossy(t).into_owned(),
                        other => format!("{other:?}"),
                    })
                    .collect();
                Ok(format!("{table}: {}", cols.join("|")))
            })
            .unwrap();
        out.extend(rows.map(Result::unwrap));
    }
    out
}

/// Archived WAL file names the catalog records.
fn wal_rows(repo: &Path) -> Vec<String> {
    catalog_rows(repo)
        .into_iter()
        .filter_map(|r| {
            r.strip_prefix("wal: ")
                .map(|r| r.split('|').next().unwrap().to_string())
        })
        .collect()
}

/// The WAL file name inside a repository key, if it is one.
fn wal_name(key: &str) -> Option<&str> {
    key.starts_with("archive/")
        .then(|| key.rsplit('/').next()?.strip_suffix(".lz4"))
        .flatten()
}

fn label(b: &Value) -> String {
    b["label"].as_str().unwrap().to_string()
}

fn labels(cluster: &Cluster) -> Vec<String> {
    cluster.backups().iter().map(label).collect()
}

fn count(cluster: &Cluster) -> i64 {
    cluster
        .query_text("SELECT count(*)::text FROM t")
        .parse()
        .unwrap()
}

fn assert_one_line_error(run: &Run, needle: &str) {
    assert!(!run.success(), "{run:?}");
    assert_eq!(run.stderr.trim().lines().count(), 1, "{run:?}");
    assert!(run.stderr.contains(needle), "{needle:?} not in {run:?}");
}

/// Restore (end of archive, or the given flags), promote, and return the row count.
fn restore_and_count(cluster: &mut Cluster, args: &[&str]) -> i64 {
    cluster.stop_and_wipe();
    let mut full = args.to_vec();
    full.extend(["--target-action", "promote"]);
    let run = cluster.restore(&full);
    assert!(run.success(), "{run:?}");
    cluster.start();
    cluster.wait_promoted();
    count(cluster)
}

#[test]
fn full_2_removes_the_oldest_chain_and_only_its_wal_and_both_kept_chains_restore() {
    let mut c = Cluster::new();
    set_retention(&c, "full = 2\nauto = false");
    c.execute("CREATE TABLE t (id int)");
    let mut chains = Vec::new();
    let mut inside = None;
    for k in 0..3 {
        c.execute("INSERT INTO t SELECT g FROM generate_series(1, 100) g");
        let full = c.backup("full");
        c.execute("INSERT INTO t SELECT g FROM generate_series(1, 10) g");
        c.switch_wal_and_wait();
        let incr = c.backup("incr");
        if k == 1 {
            std::thread::sleep(Duration::from_millis(300));
            inside = Some((server_now(&c), count(&c)));
            std::thread::sleep(Duration::from_millis(300));
        }
        c.execute("INSERT INTO t SELECT g FROM generate_series(1, 7) g");
        c.switch_wal_and_wait();
        chains.push((full, incr));
    }
    let final_rows = count(&c);
    let (inside_time, inside_rows) = inside.unwrap();
    let floor = chains[1].0["start_wal"].as_str().unwrap().to_string();

    // --dry-run names the oldest chain and changes no file and no catalog row.
    let files = repo_files(&c.repo);
    let rows = catalog_rows(&c.repo);
    let dry = c.pgkeep_ok(&["expire", "--dry-run"]);
    for b in [&chains[0].0, &chains[0].1] {
        let line = format!("would remove backup {}", label(b));
        assert!(dry.stdout.contains(&line), "{dry:?}");
    }
    assert_eq!(repo_files(&c.repo), files, "--dry-run changed files");
    assert_eq!(
        catalog_rows(&c.repo),
        rows,
        "--dry-run changed catalog rows"
    );

    let run = c.pgkeep_ok(&["expire"]);
    let after = repo_files(&c.repo);
    let du_before: u64 = files.values().sum();
    let du_after: u64 = after.values().sum();
    println!(
        "repository bytes: before expire {du_before}, after {du_after}\n{}",
        run.stdout
    );
    assert!(run.stdout.contains("restorable: any point from"), "{run:?}");

    // Exactly the oldest chain and the WAL before the oldest kept backup's start went.
    let gone_chain = [label(&chains[0].0), label(&chains[0].1)];
    let expected: BTreeMap<String, u64> = files
        .iter()
        .filter(|(k, _)| {
            let old_backup = gone_chain
                .iter()
                .any(|l| k.starts_with(&format!("backup/{l}/")));
            let old_wal = wal_name(k).is_some_and(|n| n.get(..24).unwrap_or(n) < floor.as_str());
            !old_backup && !old_wal
        })
        .map(|(k, v)| (k.clone(), *v))
        .collect();
    assert!(files
        .keys()
        .any(|k| wal_name(k).is_some_and(|n| n < floor.as_str())));
    let differ: Vec<&String> = after
        .keys()
        .chain(expected.keys())
        .filter(|k| after.get(*k) != expected.get(*k))
        .collect();
    assert!(
        differ.is_empty(),
        "files after expire differ from those expected: {differ:?}"
    );
    assert_eq!(
        du_after,
        expected.values().sum::<u64>(),
        "bytes after expire are what the kept backups and WAL take"
    );
    for l in &gone_chain {
        assert!(
            !c.repo.join("backup").join(l).exists(),
            "{l} directory left"
        );
    }
    let kept: Vec<String> = chains[1..]
        .iter()
        .flat_map(|(f, i)| [label(f), label(i)])
        .collect();
    assert_eq!(labels(&c), kept);
    let catalog_wal = wal_rows(&c.repo);
    assert!(
        catalog_wal.iter().all(|n| n.as_str() >= floor.as_str()),
        "{catalog_wal:?}"
    );
    let mut on_disk: Vec<&str> = after.keys().filter_map(|k| wal_name(k)).collect();
    on_disk.sort();
    assert_eq!(catalog_wal, on_disk, "catalog and objects agree");

    // What stays validates, without a gap, and a second expire has nothing to do.
    let v = c.pgkeep_ok(&["validate"]);
    assert!(v.stdout.contains("0 gap(s)"), "{v:?}");
    let again = c.pgkeep_ok(&["expire"]);
    assert!(again.stdout.contains("nothing to remove"), "{again:?}");

    // A target before the kept backups is one line naming the earliest restorable time.
    let old_time = chains[0].1["recovery_time"].as_str().unwrap().to_string();
    let earliest = chains[1].0["recovery_time"].as_str().unwrap().to_string();
    let elsewhere = c.dir.path().join("elsewhere");
    let refused = c.pgkeep(&[
        "restore",
        "--pgdata",
        elsewhere.to_str().unwrap(),
        "--target-time",
        &old_time,
    ]);
    assert_one_line_error(
        &refused,
        &format!("the earliest restorable time is {}", &earliest[..19]),
    );

    // The newest chain restores to the end of the archive, the older one to a time inside
    // the window with exactly the rows of that moment.
    assert_eq!(restore_and_count(&mut c, &[]), final_rows);
    assert_eq!(
        restore_and_count(&mut c, &["--target-time", &inside_time]),
        inside_rows
    );
}

#[test]
fn a_window_keeps_the_full_that_reaches_its_start_and_a_pinned_backup_survives_and_restores() {
    let mut c = Cluster::new();
    // auto = true (the default): expire runs after each backup.
    set_retention(&c, "window = \"4s\"");
    c.execute("CREATE TABLE t (id int)");
    c.execute("INSERT INTO t SELECT g FROM generate_series(1, 50) g");
    let pinned = c.backup("full");
    let pinned_rows = count(&c);
    c.pgkeep_ok(&["pin", &label(&pinned)]);
    c.execute("INSERT INTO t SELECT g FROM generate_series(1, 50) g");
    c.switch_wal_and_wait();
    let old = c.backup("full");
    c.execute("INSERT INTO t SELECT g FROM generate_series(1, 50) g");
    c.switch_wal_and_wait();
    let anchor = c.backup("full");
    c.execute("INSERT INTO t SELECT g FROM generate_series(1, 50) g");
    c.switch_wal_and_wait();
    // The window's start passes `anchor`: only it reaches that point.
    std::thread::sleep(Duration::from_secs(5));
    c.execute("INSERT INTO t SELECT g FROM generate_series(1, 50) g");
    let newest = c.backup("full");
    assert_eq!(
        labels(&c),
        [label(&pinned), label(&anchor), label(&newest)],
        "the backup after the window's start made expire keep the full before it and the pinned one"
    );
    assert!(!c.repo.join("backup").join(label(&old)).exists());
    let shown = c.backups();
    assert_eq!(shown[0]["pinned"], true);
    assert_eq!(shown[0]["pinned_until"], "forever");
    assert_eq!(shown[1]["pinned"], false);

    // Between the pinned backup and the anchor only the pinned backup's own WAL stays, and
    // validate counts that hole as retention's, not as a gap.
    let wal: Vec<String> = repo_files(&c.repo)
        .keys()
        .filter_map(|k| wal_name(k).map(str::to_string))
        .collect();
    let old_start = old["start_wal"].as_str().unwrap();
    assert!(!wal.iter().any(|n| n.as_str() == old_start), "{wal:?}");
    assert!(wal
        .iter()
        .any(|n| n == pinned["start_wal"].as_str().unwrap()));
    let v = c.pgkeep_ok(&["validate"]);
    assert!(v.stdout.contains("0 gap(s)"), "{v:?}");

    // The pin lives in backup.ini too: a rebuilt catalog keeps it.
    fs::remove_file(c.repo.join("catalog.db")).unwrap();
    c.pgkeep_ok(&["catalog", "rebuild"]);
    assert_eq!(c.backups()[0]["pinned_until"], "forever");

    // The pinned backup still restores to its consistent point.
    assert_eq!(
        restore_and_count(
            &mut c,
            &["--backup", &label(&pinned), "--target", "immediate"]
        ),
        pinned_rows
    );
    // Unpinned, it goes at the next expire: the window alone decides now.
    c.pgkeep_ok(&["unpin", &label(&pinned)]);
    c.pgkeep_ok(&["expire"]);
    assert!(!labels(&c).contains(&label(&pinned)));
}

#[test]
fn a_killed_expire_is_finished_by_the_next_and_never_interleaves_with_a_backup() {
    let mut c = Cluster::new();
    set_retention(&c, "full = 1\nauto = false");
    c.execute("CREATE TABLE t (id int)");
    let mut backups = Vec::new();
    for _ in 0..3 {
        c.execute("INSERT INTO t SELECT g FROM generate_series(1, 100) g");
        backups.push(c.backup("full"));
        c.execute("INSERT INTO t SELECT g FROM generate_series(1, 10) g");
        c.switch_wal_and_wait();
        backups.push(c.backup("incr"));
    }
    let rows = count(&c);
    let keep = [label(&backups[4]), label(&backups[5])];
    let spawn_expire = || {
        user_command(&c.pgkeep_bin)
            .current_dir(c.dir.path())
            .env("PGKEEP_TEST_EXPIRE_PAUSE_MS", "4")
            .arg("--config")
            .arg(&c.config)
            .arg("expire")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    };

    let mut kills = 0;
    let mut saw_deleting = false;
    for delay_ms in [300u64, 900, 1500, 2500, 4000] {
        let mut child = spawn_expire();
        let started = Instant::now();
        std::thread::sleep(Duration::from_millis(delay_ms));
        if child.try_wait().unwrap().is_some() {
            break;
        }
        if kills == 0 {
            // While expire runs it holds the backup lock: no backup can start.
            let refused = c.pgkeep(&["backup", "--type", "full"]);
            assert_one_line_error(&refused, "another backup is running");
            assert!(refused.stderr.contains("expire"), "{refused:?}");
            // archive-push goes on meanwhile and loses nothing.
            let seg = c.switch_wal_and_wait();
            assert!(
                wal_rows(&c.repo).contains(&seg),
                "{seg} archived during expire"
            );
        }
        kill_tree(child.id());
        let _ = child.wait();
        kills += 1;
        println!("expire killed after {:?}", started.elapsed());
        for b in c.backups() {
            if b["status"] == "DELETING" {
                saw_deleting = true;
                let refused = c.restore(&["--backup", b["label"].as_str().unwrap()]);
                assert_one_line_error(&refused, "has status DELETING and cannot be restored");
            }
        }
    }
    assert!(
        kills >= 2,
        "expire finished before it could be killed twice"
    );
    assert!(saw_deleting, "no backup was seen DELETING after a kill");

    let done = c.pgkeep_ok(&["expire"]);
    println!("{}", done.stdout);
    assert_eq!(labels(&c), keep);
    for b in &backups[..4] {
        assert!(!c.repo.join("backup").join(label(b)).exists());
    }
    let floor = backups[4]["start_wal"].as_str().unwrap();
    assert!(repo_files(&c.repo)
        .keys()
        .filter_map(|k| wal_name(k))
        .all(|n| n.get(..24).unwrap_or(n) >= floor));
    let v = c.pgkeep_ok(&["validate"]);
    assert!(v.stdout.contains("0 problem(s)"), "{v:?}");
    assert_eq!(restore_and_count(&mut c, &[]), rows);
}

#[test]
fn delete_takes_the_dependents_and_refuses_the_last_backup_of_the_newest_point() {
    let c = Cluster::new();
    c.execute("CREATE TABLE t (id int)");
    let full = c.backup("full");
    c.execute("INSERT INTO t VALUES (1)");
    c.switch_wal_and_wait();
    let incr = c.backup("incr");
    let refused = c.pgkeep(&["delete", &label(&full)]);
    assert_one_line_error(
        &refused,
        "is the last backup that restores to the newest archived point",
    );
    assert_eq!(labels(&c).len(), 2);
    let newer = c.backup("full");
    let run = c.pgkeep_ok(&["delete", &label(&full), "--json"]);
    let report: Value = serde_json::from_str(&run.stdout).unwrap();
    let gone: Vec<String> = report["backups"]
        .as_array()
        .unwrap()
        .iter()
        .map(label)
        .collect();
    assert_eq!(gone, [label(&incr), label(&full)], "newest first");
    assert_eq!(labels(&c), [label(&newer)]);
    assert!(!c.repo.join("backup").join(label(&full)).exists());
}
