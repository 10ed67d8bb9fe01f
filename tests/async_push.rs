//! Asynchronous `archive-push` (`[archive] async = true`): segments pushed ahead by the
//! background worker, acknowledged only once stored, against real clusters.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::archive::find_stored;
use crate::harness::{chown_to_postgres, kill_tree, user_command, Cluster};
use crate::restore::server_now;

/// The spool of a cluster's local repository: the default, beside its catalog.
fn spool(cluster: &Cluster) -> PathBuf {
    cluster.repo.join("catalog.db.spool")
}

fn set_async(cluster: &Cluster, process_max: usize) {
    cluster.set_config("archive", "async = true");
    cluster.set_config("archive", &format!("process-max = {process_max}"));
    cluster.set_config("archive", "push-timeout = 30");
}

/// Point archive_command at `command` (`%p` as PostgreSQL passes it) and reload.
fn set_archive_command(cluster: &Cluster, command: &str) {
    cluster.execute(&format!(
        "ALTER SYSTEM SET archive_command = '{}'",
        command.replace('\'', "''")
    ));
    cluster.execute("SELECT pg_reload_conf()");
}

/// Names with an acknowledgement in the spool.
fn acked(cluster: &Cluster) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(spool(cluster).join("ok"))
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().into_string().ok())
                .filter(|n| !n.starts_with('.'))
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// Names PostgreSQL has marked `.ready` or `.done`, oldest first.
fn status_names(cluster: &Cluster, suffix: &str) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(cluster.data.join("pg_wal/archive_status"))
        .unwrap()
        .filter_map(|e| {
            e.ok()?
                .file_name()
                .to_str()?
                .strip_suffix(suffix)
                .map(str::to_string)
        })
        .filter(|n| n.len() == 24)
        .collect();
    names.sort();
    names
}

/// The stored copy of `name`, fetched by archive-get, equals the file in pg_wal.
fn assert_archived_intact(cluster: &Cluster, name: &str) {
    let dest = cluster.dir.subdir("got").join(name);
    let run = cluster.pgkeep(&["archive-get", name, dest.to_str().unwrap()]);
    assert!(run.success(), "archive-get {name}: {run:?}");
    assert!(
        fs::read(&dest).unwrap() == fs::read(cluster.data.join("pg_wal").join(name)).unwrap(),
        "{name}: the archived copy differs from pg_wal's"
    );
    let _ = fs::remove_file(dest);
}

/// Every acknowledgement in the spool names a segment the repository holds intact.
fn assert_every_ack_is_stored(cluster: &Cluster) -> usize {
    let names = acked(cluster);
    for name in &names {
        if cluster.data.join("pg_wal").join(name).exists() {
            assert_archived_intact(cluster, name);
        }
    }
    names.len()
}

fn switch_segments(cluster: &Cluster, n: usize) {
    cluster.execute("CREATE TABLE IF NOT EXISTS sw (i int)");
    for i in 0..n {
        cluster.execute(&format!(
            "INSERT INTO sw VALUES ({i}); SELECT pg_switch_wal()"
        ));
    }
}

fn wait_until(what: &str, cluster: &Cluster, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(90);
    while !done() {
        assert!(
            Instant::now() < deadline,
            "{what} not reached after 90 s; server log:\n{}",
            fs::read_to_string(&cluster.log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn failed_count(cluster: &Cluster) -> i64 {
    cluster
        .query_text("SELECT failed_count::text FROM pg_stat_archiver")
        .parse()
        .unwrap()
}

#[test]
fn async_push_under_pgbench_archives_every_segment_ahead_and_pitr_matches_live() {
    let mut cluster = Cluster::new();
    set_async(&cluster, 4);
    cluster.pg_tool_ok("pgbench", &["-i", "-s", "3", "-q"]);
    // Taken first: backup checks that archive_command is pgkeep's, not the wrapper below.
    cluster.backup("full");
    // A wrapper that records, per call, whether the acknowledgement was already in the spool
    // when PostgreSQL called, and how long the call took.
    // The archiver is held at its first call until the segment switches are done, so many
    // segments are `.ready` at once whatever the machine's load, as on a primary whose archiver
    // fell behind: the worker then has segments to push ahead of the calls.
    let calls = cluster.dir.path().join("calls.log");
    fs::write(&calls, "").unwrap();
    chown_to_postgres(&calls);
    let hold = cluster.dir.path().join("hold");
    fs::write(&hold, "").unwrap();
    let script = cluster.dir.write(
        "push.sh",
        format!(
            "#!/bin/sh\nwhile [ -f {hold} ]; do sleep 0.05; done\nf=$(basename \"$1\")\ns=$(date +%s%N)\nif [ -f {spool}/ok/$f ]; then a=ack; else a=wait; fi\n{bin} --config {cfg} archive-push \"$1\"\nrc=$?\necho \"$f $a $rc $(( ($(date +%s%N) - s) / 1000 ))\" >> {calls}\nexit $rc\n",
            spool = spool(&cluster).display(),
            bin = cluster.pgkeep_bin.display(),
            cfg = cluster.config.display(),
            calls = calls.display(),
            hold = hold.display()
        ),
    );
    set_mode(&script, 0o755);
    set_archive_command(&cluster, &format!("{} %p", script.display()));
    std::thread::scope(|s| {
        let load = s.spawn(|| cluster.pg_tool("pgbench", &["-c", "2", "-T", "6", "-n"]));
        std::thread::sleep(Duration::from_millis(300));
        switch_segments(&cluster, 30);
        fs::remove_file(&hold).unwrap();
        assert!(load.join().unwrap().success());
    });
    let before = cluster.pgbench_fingerprints();
    std::thread::sleep(Duration::from_millis(300));
    let t = server_now(&cluster);
    std::thread::sleep(Duration::from_millis(300));
    cluster.pg_tool_ok("pgbench", &["-c", "2", "-t", "200", "-n"]);
    let last = cluster.switch_wal_and_wait();
    assert_eq!(failed_count(&cluster), 0, "archive-push failed under load");

    let done = status_names(&cluster, ".done");
    assert!(done.len() >= 30, "{done:?}");
    assert!(done.contains(&last));
    for name in &done {
        find_stored(&cluster.repo, name);
    }
    assert_every_ack_is_stored(&cluster);
    let log = fs::read_to_string(&calls).unwrap();
    let (mut ack, mut wait) = (Vec::new(), Vec::new());
    for line in log.lines() {
        let f: Vec<&str> = line.split(' ').collect();
        assert_eq!(f[2], "0", "{line}");
        let us: u64 = f[3].parse().unwrap();
        if f[1] == "ack" {
            ack.push(us)
        } else {
            wait.push(us)
        }
    }
    ack.sort();
    wait.sort();
    eprintln!(
        "archive-push calls: {} found their acknowledgement (median {} us), {} waited for the worker (median {} us)",
        ack.len(),
        ack.get(ack.len() / 2).copied().unwrap_or(0),
        wait.len(),
        wait.get(wait.len() / 2).copied().unwrap_or(0)
    );
    assert!(
        ack.len() >= 10,
        "few segments were pushed ahead: {} of {} calls found an acknowledgement\n{log}",
        ack.len(),
        ack.len() + wait.len()
    );
    // The spool keeps only what PostgreSQL may still ask for: acknowledgements of segments it
    // has marked done go with the worker's next pass.
    switch_segments(&cluster, 1);
    cluster.switch_wal_and_wait();
    let left = acked(&cluster);
    assert!(left.len() <= 3, "stale acknowledgements kept: {left:?}");

    cluster.stop_and_wipe();
    let run = cluster.restore(&["--target-time", &t, "--target-action", "promote"]);
    assert!(run.success(), "{run:?}");
    cluster.start();
    cluster.wait_promoted();
    assert_eq!(before, cluster.pgbench_fingerprints());
}

#[test]
fn async_push_into_an_unwritable_repository_fails_acknowledges_nothing_then_lands_everything() {
    let cluster = Cluster::new();
    let archive = cluster.repo.join("archive");
    outage_then_repair(
        &cluster,
        || set_tree_writable(&archive, false),
        || set_tree_writable(&archive, true),
    );
}

#[test]
fn async_push_with_the_s3_server_stopped_fails_acknowledges_nothing_then_lands_everything() {
    use crate::harness::s3::S3Server;
    use crate::harness::ClusterOptions;
    let Some(s3) = S3Server::start() else { return };
    s3.create_bucket("pgkeep");
    let cluster = Cluster::with(ClusterOptions {
        repo_toml: Some(s3.repo_toml("pgkeep", "main", Path::new("{dir}/repo/catalog.db"))),
        ..ClusterOptions::default()
    });
    let s3 = std::cell::RefCell::new(s3);
    outage_then_repair(
        &cluster,
        || s3.borrow_mut().stop(),
        || s3.borrow_mut().restart(),
    );
}

/// With async pushes on: `break_repo` makes the repository refuse the pushes, which must fail
/// (PostgreSQL counting failures and retrying) without an acknowledgement for any segment
/// left; after `repair`, every segment lands intact.
fn outage_then_repair(cluster: &Cluster, break_repo: impl Fn(), repair: impl Fn()) {
    set_async(cluster, 2);
    switch_segments(cluster, 1);
    cluster.switch_wal_and_wait();
    let last_archived =
        || cluster.query_text("SELECT coalesce(last_archived_wal, '') FROM pg_stat_archiver");
    let archived_before = last_archived();
    break_repo();
    let failures_before = failed_count(cluster);
    switch_segments(cluster, 4);
    wait_until("two failed archive-push calls", cluster, || {
        failed_count(cluster) >= failures_before + 2 || last_archived() != archived_before
    });
    assert_eq!(
        last_archived(),
        archived_before,
        "PostgreSQL was told a segment was archived while the repository refused writes"
    );
    let ready = status_names(cluster, ".ready");
    assert!(ready.len() >= 4, "{ready:?}");
    for name in &ready {
        assert!(
            !acked(cluster).contains(name),
            "{name} acknowledged while the repository refuses writes"
        );
    }
    let log = fs::read_to_string(&cluster.log).unwrap();
    assert!(
        log.lines()
            .any(|l| l.contains("pgkeep: error:") && l.contains(&ready[0])),
        "no one-line error naming {} in the server log:\n{log}",
        ready[0]
    );
    repair();
    let last = cluster.switch_wal_and_wait();
    assert!(ready.iter().all(|n| *n <= last));
    for name in status_names(cluster, ".done") {
        assert_archived_intact(cluster, &name);
    }
    assert_every_ack_is_stored(cluster);
}

#[test]
fn a_killed_async_worker_leaves_no_ack_for_an_unstored_segment_and_the_next_push_recovers() {
    let cluster = Cluster::new();
    set_async(&cluster, 2);
    // PostgreSQL's own archiver stands still, so the .ready files stay for the pushes below.
    set_archive_command(&cluster, "false");
    cluster.pg_tool_ok("pgbench", &["-i", "-s", "2", "-q"]);
    switch_segments(&cluster, 10);
    wait_until("ten .ready segments", &cluster, || {
        status_names(&cluster, ".ready").len() >= 10
    });
    let ready = status_names(&cluster, ".ready");
    let mut killed_mid_pass = 0;
    for round in 0..6u64 {
        let Some(first) = ready.iter().find(|n| !acked(&cluster).contains(*n)) else {
            break;
        };
        let mut push = user_command(&cluster.pgkeep_bin)
            .current_dir(&cluster.data)
            .arg("--config")
            .arg(&cluster.config)
            .args(["archive-push", &format!("pg_wal/{first}")])
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(15 + round * 20));
        let worker = worker_pid(&cluster);
        if let Some(pid) = worker {
            kill_tree(pid);
        }
        kill_tree(push.id());
        let _ = push.wait();
        if worker.is_some() && acked(&cluster).len() < ready.len() {
            killed_mid_pass += 1;
        }
        wait_until("the killed worker gone", &cluster, || {
            worker.is_none_or(|pid| !alive(pid))
        });
        assert_every_ack_is_stored(&cluster);
    }
    eprintln!("{killed_mid_pass} worker(s) killed with segments left to push");
    assert!(killed_mid_pass >= 1, "no worker was killed mid-pass");
    for name in &ready {
        let run = cluster.pgkeep_in(&cluster.data, &["archive-push", &format!("pg_wal/{name}")]);
        assert!(
            run.success(),
            "archive-push {name} after the kills: {run:?}"
        );
        assert_archived_intact(&cluster, name);
    }
    assert_eq!(assert_every_ack_is_stored(&cluster), ready.len());
    // Every segment acknowledged: each call now only matches its acknowledgement.
    let hits = time_pushes(&cluster, &ready, false);
    eprintln!(
        "archive-push of an acknowledged segment: median {:.2} ms over {} calls",
        ms(median(hits)),
        ready.len()
    );
}

/// The pid of the running archive-push worker of this cluster's spool, if any.
fn worker_pid(cluster: &Cluster) -> Option<u32> {
    let pid: u32 = fs::read_to_string(spool(cluster).join("worker.lock"))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    let cmdline = fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let cmdline = String::from_utf8_lossy(&cmdline);
    (cmdline.contains("archive-push-worker") && cmdline.contains(cluster.config.to_str().unwrap()))
        .then_some(pid)
}

/// Whether `pid` runs (a zombie waiting for its parent does not).
fn alive(pid: u32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| Some(s.rsplit_once(')')?.1.trim_start().starts_with(|c| c != 'Z')))
        .unwrap_or(false)
}

fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
}

/// Take write permission away from a directory tree (or give it back).
fn set_tree_writable(root: &Path, writable: bool) {
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        set_mode(&dir, if writable { 0o700 } else { 0o500 });
        for e in fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            }
        }
    }
}

/// Wall time of `archive-push` for each name in turn, as a backlogged archiver calls it: one
/// shell as the cluster's user runs the calls from the data directory, timing each and marking
/// it `.done` after success, as the archiver does.
fn time_pushes(cluster: &Cluster, names: &[String], mark_done: bool) -> Vec<Duration> {
    let done = if mark_done {
        "mv pg_wal/archive_status/$f.ready pg_wal/archive_status/$f.done;"
    } else {
        ""
    };
    let script = format!(
        "for f in {names}; do s=$(date +%s%N); {bin} --config {cfg} archive-push pg_wal/$f >&2 || exit 1; e=$(date +%s%N); {done} echo $((e - s)); done",
        names = names.join(" "),
        bin = cluster.pgkeep_bin.display(),
        cfg = cluster.config.display()
    );
    let out = user_command("sh")
        .current_dir(&cluster.data)
        .args(["-c", &script])
        .output()
        .unwrap();
    let run = crate::harness::Run::from_output(out);
    assert!(run.success(), "archive-push in turn: {run:?}");
    run.stdout
        .lines()
        .map(|ns| Duration::from_nanos(ns.trim().parse().unwrap()))
        .collect()
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

#[test]
fn async_push_to_s3_stores_every_segment_and_later_calls_return_at_once() {
    use crate::harness::s3::S3Server;
    use crate::harness::ClusterOptions;
    let Some(s3) = S3Server::start() else { return };
    s3.create_bucket("pgkeep");
    let cluster = Cluster::with(ClusterOptions {
        repo_toml: Some(s3.repo_toml("pgkeep", "main", Path::new("{dir}/repo/catalog.db"))),
        ..ClusterOptions::default()
    });
    // A backlog of .ready segments, pushed below as PostgreSQL's archiver would, in order.
    set_archive_command(&cluster, "false");
    cluster.pg_tool_ok("pgbench", &["-i", "-s", "2", "-q"]);
    switch_segments(&cluster, 24);
    wait_until("24 .ready segments", &cluster, || {
        status_names(&cluster, ".ready").len() >= 24
    });
    let ready = status_names(&cluster, ".ready");
    let (sync_names, async_names) = ready.split_at(ready.len() / 2);

    let sync_start = Instant::now();
    let sync = time_pushes(&cluster, sync_names, true);
    let sync_total = sync_start.elapsed();
    set_async(&cluster, 4);
    let async_start = Instant::now();
    let asynchronous = time_pushes(&cluster, async_names, true);
    let async_total = async_start.elapsed();
    eprintln!(
        "archive-push to s3s-fs, {} segments each: sync median {:.1} ms/call, total {:.0} ms; async (process-max 4) first call {:.1} ms, median of the later calls {:.1} ms, total {:.0} ms",
        sync_names.len(),
        ms(median(sync.clone())),
        ms(sync_total),
        ms(asynchronous[0]),
        ms(median(asynchronous[1..].to_vec())),
        ms(async_total)
    );
    for name in &ready {
        assert_archived_intact(&cluster, name);
    }
    // The calls after the first found their segment stored: well under one push each.
    assert!(
        median(asynchronous[1..].to_vec()) < median(sync),
        "async calls were not faster than pushing"
    );
}

#[test]
fn a_worker_that_cannot_start_fails_the_push_at_once_with_its_one_line_error() {
    let cluster = Cluster::new();
    set_async(&cluster, 2);
    set_archive_command(&cluster, "false");
    switch_segments(&cluster, 1);
    wait_until("a .ready segment", &cluster, || {
        !status_names(&cluster, ".ready").is_empty()
    });
    let name = status_names(&cluster, ".ready")[0].clone();
    // The foreground can test this lock, the worker cannot take it.
    let lock = spool(&cluster).join("worker.lock");
    if !spool(&cluster).exists() {
        fs::create_dir(spool(&cluster)).unwrap();
        chown_to_postgres(&spool(&cluster));
    }
    let _ = fs::remove_file(&lock);
    fs::create_dir(&lock).unwrap();
    let start = Instant::now();
    let run = cluster.pgkeep_in(&cluster.data, &["archive-push", &format!("pg_wal/{name}")]);
    assert_eq!(run.code, Some(1), "{run:?}");
    assert!(
        start.elapsed() < Duration::from_secs(20),
        "waited {:?} for a worker that had failed",
        start.elapsed()
    );
    assert_eq!(run.stderr.trim().lines().count(), 1, "{run:?}");
    assert!(
        run.stderr.contains("archive-push worker") && run.stderr.contains("worker.lock"),
        "{run:?}"
    );
    eprintln!("{}", run.stderr.trim());
    assert!(acked(&cluster).is_empty());
    fs::remove_dir(&lock).unwrap();
    let run = cluster.pgkeep_in(&cluster.data, &["archive-push", &format!("pg_wal/{name}")]);
    assert!(run.success(), "{run:?}");
    assert_archived_intact(&cluster, &name);
}
