//! Timelines against real clusters: history files PostgreSQL writes after repeated point-in-time
//! recoveries, and restore's choice of a backup on the history of the timeline recovery follows.

use std::fs;
use std::time::Duration;

use pgkeep_pg::Lsn;

use crate::harness::{Cluster, Run};
use crate::restore::server_now;

fn current_timeline(cluster: &Cluster) -> u32 {
    cluster
        .query_text("SELECT timeline_id::text FROM pg_control_checkpoint()")
        .parse()
        .unwrap()
}

/// Force a checkpoint so pg_control_checkpoint() reports the timeline the server now writes.
fn timeline_after_checkpoint(cluster: &Cluster) -> u32 {
    cluster.execute("CHECKPOINT");
    current_timeline(cluster)
}

/// (parent timeline, switch point) of each line of a history file, read here rather than with
/// pgkeep's parser so the test does not depend on the code it checks.
fn history_lines(text: &str) -> Vec<(u32, Lsn)> {
    text.lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .map(|l| {
            let mut f = l.split_whitespace();
            let tli = f.next().unwrap().parse().unwrap();
            let lsn = f.next().unwrap().parse().unwrap();
            (tli, lsn)
        })
        .collect()
}

/// Lose the data directory, restore it with `args`, start and wait for the promotion that
/// starts a new timeline.
fn wipe_restore_and_promote(cluster: &mut Cluster, args: &[&str]) {
    cluster.stop_and_wipe();
    let run = cluster.restore(args);
    assert!(run.success(), "{run:?}");
    cluster.start();
    cluster.wait_promoted();
}

fn assert_one_line(run: &Run, needle: &str) {
    assert_eq!(run.code, Some(1), "{run:?}");
    assert_eq!(run.stderr.lines().count(), 1, "{run:?}");
    assert!(run.stderr.contains(needle), "expected {needle:?}: {run:?}");
}

/// Regression: restoring the latest state, then an earlier time, makes PostgreSQL write a history
/// file whose switch points go backwards (`1 X` then `2 Y`, Y < X: recovery followed timeline 2
/// but stopped on timeline 1 before 2 began). `validate` refused that file as corrupt and `show`
/// left timeline 3 out of the backup's windows.
#[test]
fn a_history_file_with_decreasing_switch_points_validates_and_timeline_3_is_a_window() {
    let mut cluster = Cluster::new();
    cluster.execute("CREATE TABLE t (id int); INSERT INTO t SELECT generate_series(1, 100);");
    let b = cluster.backup("full");
    let label = b["label"].as_str().unwrap().to_string();
    std::thread::sleep(Duration::from_millis(300));
    let t1 = server_now(&cluster);
    std::thread::sleep(Duration::from_millis(300));
    cluster.execute("INSERT INTO t SELECT generate_series(101, 200);");
    cluster.switch_wal_and_wait();

    // Timeline 2: everything archived, then promoted at the end of timeline 1's WAL.
    wipe_restore_and_promote(&mut cluster, &[]);
    assert_eq!(timeline_after_checkpoint(&cluster), 2);
    cluster.execute("INSERT INTO t SELECT generate_series(201, 300);");
    cluster.switch_wal_and_wait();

    // Timeline 3: back to T1, which lies on timeline 1 before timeline 2 began.
    wipe_restore_and_promote(
        &mut cluster,
        &["--target-time", &t1, "--target-action", "promote"],
    );
    assert_eq!(timeline_after_checkpoint(&cluster), 3);
    assert_eq!(cluster.query_text("SELECT count(*)::text FROM t"), "100");
    cluster.execute("INSERT INTO t SELECT generate_series(1001, 1050);");
    cluster.switch_wal_and_wait();

    let history = fs::read_to_string(cluster.data.join("pg_wal/00000003.history")).unwrap();
    let entries = history_lines(&history);
    assert_eq!(entries.len(), 2, "{history}");
    assert_eq!(entries[0].0, 1, "{history}");
    assert_eq!(entries[1].0, 2, "{history}");
    let (x, y) = (entries[0].1, entries[1].1);
    assert!(
        y < x,
        "the scenario must produce decreasing switch points:\n{history}"
    );
    eprintln!("00000003.history:\n{history}");

    let run = cluster.pgkeep(&["validate"]);
    assert_eq!(run.code, Some(0), "{run:?}");
    assert!(
        run.stdout.contains(&format!("backup {label} OK")),
        "{run:?}"
    );
    assert!(run.stdout.contains(" 0 gap(s)"), "{run:?}");

    // The backup reaches all three timelines: 2 branched off 1 at X, 3 off 1 at Y.
    let shown = cluster
        .backups()
        .into_iter()
        .find(|s| s["label"] == label.as_str())
        .unwrap();
    let windows = shown["restorable_windows"].as_array().unwrap();
    let timelines: Vec<u64> = windows
        .iter()
        .map(|w| w["timeline"].as_u64().unwrap())
        .collect();
    assert_eq!(timelines, [1, 2, 3], "{shown}");
    let until = |i: usize| -> Lsn { windows[i]["until"].as_str().unwrap().parse().unwrap() };
    assert!(until(0) >= x, "{shown}");
    assert!(until(1) > x, "{shown}");
    assert!(until(2) > y, "{shown}");
    let now: Lsn = cluster
        .query_text("SELECT pg_current_wal_lsn()::text")
        .parse()
        .unwrap();
    assert!(until(2) <= now, "{shown}");
}

/// Regression: after an in-place point-in-time recovery (timeline 1 -> 2 at X), a backup of
/// timeline 1 taken after X was still the newest, so `restore` with no target chose it, and
/// recovery from it cannot follow timeline 2: it is not on that timeline's history.
#[test]
fn restore_chooses_a_backup_on_the_history_of_the_latest_timeline() {
    let mut cluster = Cluster::new();
    cluster.execute("CREATE TABLE t (id int); INSERT INTO t SELECT generate_series(1, 100);");
    let b1 = cluster.backup("full")["label"]
        .as_str()
        .unwrap()
        .to_string();
    cluster.execute("INSERT INTO t SELECT generate_series(101, 200);");
    std::thread::sleep(Duration::from_millis(300));
    let t = server_now(&cluster);
    std::thread::sleep(Duration::from_millis(300));
    cluster.execute("INSERT INTO t SELECT generate_series(201, 300);");
    cluster.switch_wal_and_wait();
    // The second backup is on timeline 1 after T: past where timeline 2 will branch off.
    std::thread::sleep(Duration::from_millis(1100));
    let b2 = cluster.backup("full");
    let b2_label = b2["label"].as_str().unwrap().to_string();
    assert_ne!(b1, b2_label);

    wipe_restore_and_promote(
        &mut cluster,
        &[
            "--backup",
            &b1,
            "--target-time",
            &t,
            "--target-action",
            "promote",
        ],
    );
    assert_eq!(timeline_after_checkpoint(&cluster), 2);
    assert_eq!(cluster.query_text("SELECT count(*)::text FROM t"), "200");
    cluster.execute("INSERT INTO t SELECT generate_series(5001, 5050);");
    cluster.switch_wal_and_wait();
    let history = fs::read_to_string(cluster.data.join("pg_wal/00000002.history")).unwrap();
    let x = history_lines(&history)[0].1;
    let b2_stop: Lsn = b2["stop_lsn"].as_str().unwrap().parse().unwrap();
    assert!(
        x < b2_stop,
        "timeline 2 must branch off before B2 stopped:\n{history}"
    );

    cluster.stop_and_wipe();
    let dest = cluster.data.to_str().unwrap().to_string();
    // B2 by name is refused: it is not on timeline 2's history, and nothing is written.
    let run = cluster.restore(&["--backup", &b2_label]);
    assert_one_line(&run, "timeline 2");
    assert!(run.stderr.contains(&b2_label), "{run:?}");
    assert!(fs::metadata(&dest).is_err(), "restore wrote {dest}");
    // A timeline the archive has no history for.
    let run = cluster.restore(&["--target-timeline", "7"]);
    assert_one_line(&run, "timeline 7 does not exist");
    assert!(fs::metadata(&dest).is_err(), "restore wrote {dest}");

    let run = cluster.restore(&[]);
    assert!(run.success(), "{run:?}");
    assert!(
        run.stdout.contains(&format!("restored backup {b1} ")),
        "{run:?}"
    );
    assert!(
        run.stdout.contains("recovery follows timeline 2"),
        "{run:?}"
    );
    assert!(
        run.stdout
            .contains(&format!("newer backup {b2_label} skipped")),
        "{run:?}"
    );
    cluster.start();
    cluster.wait_promoted();
    assert_eq!(
        cluster.query_text("SELECT count(*)::text FROM t WHERE id > 5000"),
        "50"
    );
    assert_eq!(cluster.query_text("SELECT count(*)::text FROM t"), "250");
}
