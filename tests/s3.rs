//! Repositories in a bucket of a real S3-compatible server (s3s-fs on loopback, data on disk):
//! the round trips of a local repository, the catalog rebuilt from the bucket alone, write-once
//! objects, big objects in parallel pieces and ranged reads, https with a private CA, and
//! one-line errors for what users get wrong.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use std::io::{Read, Write};

use pgkeep_repo::{S3Storage, Storage};

use crate::harness::s3::{free_port, S3Server, TlsFront, SECRET_KEY};
use crate::harness::{user_command, Cluster, ClusterOptions, Run};
use crate::restore::server_now;

const BUCKET: &str = "pgkeep";
const PREFIX: &str = "main";

/// A cluster archiving into `bucket`/`PREFIX` of `s3`, its catalog in `<dir>/repo/catalog.db`.
fn s3_cluster(s3: &S3Server, opts: ClusterOptions) -> Cluster {
    let catalog = PathBuf::from("{dir}/repo/catalog.db");
    Cluster::with(ClusterOptions {
        repo_toml: Some(s3.repo_toml(BUCKET, PREFIX, &catalog)),
        ..opts
    })
}

/// The object at `key` of the repository's prefix, as s3s-fs keeps it on disk.
fn object(s3: &S3Server, key: &str) -> PathBuf {
    s3.object_path(BUCKET, &format!("{PREFIX}/{key}"))
}

/// Names in a "directory" of the bucket, sorted.
fn names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .map(|d| {
            d.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// The bytes of the object at `key` as the server keeps them: the file at the key, or, where
/// that is the head of a pieced object, its pieces one after another (and how many there are).
fn stored(s3: &S3Server, key: &str) -> (Vec<u8>, usize) {
    let head = fs::read(object(s3, key)).unwrap();
    let Some(text) = head.strip_prefix(b"pgkeep-pieces 1\n") else {
        return (head, 0);
    };
    let text = String::from_utf8(text.to_vec()).unwrap();
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .unwrap()
            .trim()
            .to_owned()
    };
    let dir = object(s3, &format!("{key}.pgkeep-pieces/{}", field("writer ")));
    let pieces = names(&dir);
    assert_eq!(pieces.len().to_string(), field("pieces "), "{text}");
    let mut bytes = Vec::new();
    for piece in &pieces {
        bytes.extend(fs::read(dir.join(piece)).unwrap());
    }
    assert_eq!(bytes.len().to_string(), field("size "), "{text}");
    (bytes, pieces.len())
}

fn remove_catalog(cluster: &Cluster) {
    for suffix in ["", "-wal", "-shm"] {
        let _ = fs::remove_file(cluster.repo.join(format!("catalog.db{suffix}")));
    }
}

#[test]
fn s3_backups_validate_and_a_catalog_rebuilt_from_the_bucket_restores_to_a_time() {
    let Some(s3) = S3Server::start() else { return };
    s3.create_bucket(BUCKET);
    let mut cluster = s3_cluster(&s3, ClusterOptions::default());
    let info = fs::read_to_string(object(&s3, "storage.ini")).unwrap();
    assert!(info.contains("conditional-create = "), "{info}");

    cluster.execute("CREATE TABLE t (id int PRIMARY KEY, v text); INSERT INTO t SELECT g, md5(g::text) FROM generate_series(1, 20000) g;");
    // About 32 MiB of bytes lz4 cannot shrink: its relation file goes up in pieces.
    cluster.execute("CREATE TABLE big (id int PRIMARY KEY, b bytea); INSERT INTO big SELECT g, (SELECT string_agg(decode(md5(random()::text || g || i), 'hex'), ''::bytea) FROM generate_series(1, 64) i) FROM generate_series(1, 30000) g;");
    let full = cluster.backup("full");
    assert_eq!(full["status"], "DONE");
    let data = object(
        &s3,
        &format!("backup/{}/data", full["label"].as_str().unwrap()),
    );
    let pieced: Vec<String> = objects_under(&data)
        .into_iter()
        .filter(|p| p.contains(".pgkeep-pieces/"))
        .collect();
    assert!(pieced.len() >= 3, "{pieced:?}");
    cluster.execute("UPDATE t SET v = 'changed' WHERE id <= 500; INSERT INTO t SELECT g, 'new' FROM generate_series(20001, 30000) g;");
    let incr = cluster.backup("incr");
    assert_eq!(incr["status"], "DONE");
    assert_eq!(incr["parent"], full["label"]);
    let full_label = full["label"].as_str().unwrap();
    let incr_label = incr["label"].as_str().unwrap();
    for label in [full_label, incr_label] {
        assert!(object(&s3, &format!("backup/{label}/backup.ini")).is_file());
        assert!(object(&s3, &format!("backup/{label}/manifest")).is_file());
    }
    // Nothing of the repository but its index and lock is on local disk.
    let local = names(&cluster.repo);
    assert!(
        local.iter().all(|n| n.starts_with("catalog.db")),
        "{local:?}"
    );

    cluster.switch_wal_and_wait();
    let run = cluster.pgkeep(&["validate"]);
    assert!(run.success(), "{run:?}");
    assert!(
        run.stdout
            .contains(&format!("backup {incr_label} OK (was DONE)")),
        "{run:?}"
    );
    // The status change is a new object; backup.ini is never rewritten.
    let ini = fs::read_to_string(object(&s3, &format!("backup/{full_label}/backup.ini"))).unwrap();
    assert!(ini.contains("\nSTATUS=DONE\n"), "{ini}");
    assert_eq!(
        names(&object(&s3, &format!("backup/{full_label}/status"))),
        ["0000000001-OK"]
    );

    let live = cluster.fingerprint("t", "id");
    let live_big = cluster.fingerprint("big", "id");
    std::thread::sleep(Duration::from_millis(300));
    let t = server_now(&cluster);
    std::thread::sleep(Duration::from_millis(300));
    cluster.execute("DELETE FROM t WHERE id > 100");
    cluster.switch_wal_and_wait();

    // A new host: the local index is gone, the bucket alone gives it back.
    remove_catalog(&cluster);
    let run = cluster.pgkeep(&["show"]);
    assert_eq!(run.code, Some(1), "{run:?}");
    assert!(run.stderr.contains("catalog rebuild"), "{run:?}");
    cluster.pgkeep_ok(&["catalog", "rebuild"]);
    let statuses: Vec<(String, String)> = cluster
        .backups()
        .iter()
        .map(|b| (b["label"].to_string(), b["status"].to_string()))
        .collect();
    assert_eq!(
        statuses,
        [
            (full["label"].to_string(), "\"OK\"".to_string()),
            (incr["label"].to_string(), "\"OK\"".to_string())
        ]
    );

    cluster.stop_and_wipe();
    let run = cluster.restore(&["--target-time", &t, "--target-action", "promote"]);
    assert!(run.success(), "{run:?}");
    cluster.start();
    cluster.wait_promoted();
    assert_eq!(cluster.fingerprint("t", "id"), live);
    assert_eq!(cluster.fingerprint("big", "id"), live_big);
}

#[test]
fn s3_delta_restore_archive_get_and_a_conflicting_push_refused() {
    let Some(s3) = S3Server::start() else { return };
    s3.create_bucket(BUCKET);
    let mut cluster = s3_cluster(&s3, ClusterOptions::default());
    cluster.pg_tool_ok("pgbench", &["-i", "-s", "2", "-q"]);
    let at_backup = cluster.pgbench_fingerprints();
    let full = cluster.backup("full");
    let first = cluster.query_text(&format!(
        "SELECT pg_walfile_name('{}')",
        full["start_lsn"].as_str().unwrap()
    ));
    let seg = cluster.switch_wal_and_wait();

    // archive-get gives back what was pushed; a name the archive lacks exits 1, quietly.
    let fetched = cluster.dir.path().join("fetched");
    cluster.pgkeep_ok(&["archive-get", &seg, fetched.to_str().unwrap()]);
    let original = fs::read(&fetched).unwrap();
    assert_eq!(original.len(), 16 << 20);
    let run = cluster.pgkeep(&["archive-get", "00000001000000FF000000FF", "/tmp/none"]);
    assert_eq!(run.code, Some(1), "{run:?}");

    // The same name with other content is refused and the stored copy kept.
    let incoming = cluster.dir.subdir("incoming");
    let mut forged = original.clone();
    forged[100_000] ^= 0xff;
    let forged_path = incoming.join(&seg);
    fs::write(&forged_path, &forged).unwrap();
    crate::harness::chown_to_postgres(&forged_path);
    let run = cluster.pgkeep(&["archive-push", forged_path.to_str().unwrap()]);
    assert_ne!(run.code, Some(0), "{run:?}");
    assert!(run.stderr.contains("different content"), "{run:?}");
    // And refused by the bucket itself when the catalog has no row for it (a push that died
    // between storing the object and recording it).
    forget_wal(&cluster, &seg);
    let run = cluster.pgkeep(&["archive-push", forged_path.to_str().unwrap()]);
    assert!(run.stderr.contains("different content"), "{run:?}");
    fs::remove_file(&fetched).unwrap();
    cluster.pgkeep_ok(&["archive-get", &seg, fetched.to_str().unwrap()]);
    assert!(fs::read(&fetched).unwrap() == original);

    // --delta over a diverged copy, with the index missing a segment the backup needs: restore
    // finds it in the bucket and records it again.
    forget_wal(&cluster, &first);
    cluster.pg_tool_ok("pgbench", &["-c", "1", "-t", "300", "-n"]);
    cluster.execute("CREATE TABLE extra AS SELECT generate_series(1, 10000) AS id; CHECKPOINT;");
    cluster.stop();
    let run = cluster.restore(&[
        "--delta",
        "--target",
        "immediate",
        "--target-action",
        "promote",
    ]);
    assert!(run.success(), "{run:?}");
    assert!(run.stdout.contains("kept"), "{run:?}");
    cluster.start();
    cluster.wait_promoted();
    assert_eq!(cluster.pgbench_fingerprints(), at_backup);
    let catalog = pgkeep_catalog::Catalog::open(&cluster.repo.join("catalog.db")).unwrap();
    assert!(
        catalog.wal(&first).unwrap().is_some(),
        "{first} not indexed again"
    );
}

/// Drop WAL file `name`'s row from the local index, leaving its object in the bucket.
fn forget_wal(cluster: &Cluster, name: &str) {
    let catalog = pgkeep_catalog::Catalog::open(&cluster.repo.join("catalog.db")).unwrap();
    catalog.delete_wal(name).unwrap();
    drop(catalog);
    // Opened as root here: the sidecar files must stay the cluster user's.
    for file in names(&cluster.repo) {
        crate::harness::chown_to_postgres(&cluster.repo.join(file));
    }
}

/// Run pgkeep as the cluster's user with another config file.
fn pgkeep_with(cluster: &Cluster, config: &Path, args: &[&str]) -> Run {
    let out = user_command(&cluster.pgkeep_bin)
        .current_dir(cluster.dir.path())
        .arg("--config")
        .arg(config)
        .args(args)
        .output()
        .unwrap();
    Run::from_output(out)
}

fn assert_one_line(run: &Run, code: i32, needles: &[&str]) {
    assert_eq!(run.code, Some(code), "{run:?}");
    assert_eq!(run.stderr.lines().count(), 1, "{run:?}");
    for needle in needles {
        assert!(run.stderr.contains(needle), "expected {needle:?}: {run:?}");
    }
    assert!(!run.stderr.contains(SECRET_KEY), "secret printed: {run:?}");
}

#[test]
fn s3_wrong_credentials_missing_bucket_and_bad_endpoint_are_one_line_errors() {
    let Some(s3) = S3Server::start() else { return };
    s3.create_bucket(BUCKET);
    let cluster = s3_cluster(
        &s3,
        ClusterOptions {
            init_repo: false,
            archive: false,
            ..ClusterOptions::default()
        },
    );
    let good = fs::read_to_string(&cluster.config).unwrap();
    let variant = |name: &str, from: &str, to: &str| {
        assert!(good.contains(from), "{from}");
        cluster.dir.write(name, good.replace(from, to))
    };
    let at = format!("bucket {BUCKET} at {}", s3.endpoint);

    let wrong_secret = variant("secret.toml", SECRET_KEY, "not-the-secret");
    let run = pgkeep_with(&cluster, &wrong_secret, &["init"]);
    assert_one_line(&run, 1, &["access denied", &at]);
    assert!(!run.stderr.contains("not-the-secret"), "{run:?}");

    let missing = variant("bucket.toml", "bucket = \"pgkeep\"", "bucket = \"nosuch\"");
    let run = pgkeep_with(&cluster, &missing, &["init"]);
    assert_one_line(&run, 1, &["bucket nosuch", "does not exist"]);

    let nowhere = format!("http://127.0.0.1:{}", free_port());
    let bad_endpoint = variant("endpoint.toml", &s3.endpoint, &nowhere);
    let run = pgkeep_with(&cluster, &bad_endpoint, &["init"]);
    assert_one_line(&run, 1, &["cannot reach", &nowhere]);

    let no_catalog = variant("catalog.toml", "catalog = ", "# catalog = ");
    let run = pgkeep_with(&cluster, &no_catalog, &["init"]);
    assert_one_line(&run, 2, &["needs catalog"]);

    // None of it left anything behind: the right config still initialises the bucket.
    let run = cluster.pgkeep_ok(&["init"]);
    assert!(run.stdout.contains("created"), "{run:?}");
}

#[test]
fn s3_server_stopped_mid_backup_leaves_it_error_and_the_next_backup_works() {
    let Some(mut s3) = S3Server::start() else {
        return;
    };
    s3.create_bucket(BUCKET);
    let cluster = s3_cluster(&s3, ClusterOptions::default());
    cluster.pg_tool_ok("pgbench", &["-i", "-s", "10", "-q"]);
    let failed = std::thread::scope(|scope| {
        let backup = scope.spawn(|| cluster.pgkeep(&["backup", "--type", "full"]));
        // Stop the server once the backup is under way.
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while !cluster.backups().iter().any(|b| b["status"] == "RUNNING") {
            assert!(std::time::Instant::now() < deadline, "no backup started");
            std::thread::sleep(Duration::from_millis(20));
        }
        s3.stop();
        backup.join().unwrap()
    });
    assert_eq!(failed.code, Some(1), "{failed:?}");
    assert!(failed.stderr.contains("failed"), "{failed:?}");
    s3.restart();
    let backups = cluster.backups();
    assert_eq!(backups.len(), 1);
    assert_eq!(backups[0]["status"], "ERROR");
    let next = cluster.backup("full");
    assert_eq!(next["status"], "DONE");
}

/// `len` bytes that do not compress (xorshift64), made quickly.
fn noise(len: usize, mut seed: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        out.extend_from_slice(&seed.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Two big buffers equal, or a message naming the first byte that differs (never both dumped).
fn assert_same(got: &[u8], want: &[u8], what: &str) {
    let first = got.iter().zip(want).position(|(a, b)| a != b);
    assert!(
        got.len() == want.len() && first.is_none(),
        "{what}: {} bytes, want {}; first difference at {first:?}",
        got.len(),
        want.len()
    );
}

/// A storage client on `s3`'s bucket, as `init` leaves it.
fn s3_storage(s3: &S3Server) -> S3Storage {
    let storage = S3Storage::new(s3.config(BUCKET, PREFIX)).unwrap();
    storage.prepare().unwrap();
    storage
}

#[test]
fn s3_a_big_object_goes_up_in_parallel_pieces_and_comes_back_in_ranged_reads_across_a_restart() {
    let Some(mut s3) = S3Server::start() else {
        return;
    };
    s3.create_bucket(BUCKET);
    let storage = s3_storage(&s3);
    // 110 MiB: 14 pieces of 8 MiB (the last one short), four going up at once, then 28 ranged
    // GETs of 4 MiB coming back.
    let data = noise(110 << 20, 0x9e37_79b9_7f4a_7c15);
    let mut pending = storage.create("big/object").unwrap();
    for piece in data.chunks(3 << 20) {
        pending.write_all(piece).unwrap();
    }
    pending.commit_new().unwrap();
    assert_eq!(storage.size("big/object").unwrap(), Some(data.len() as u64));
    let (on_disk, pieces) = stored(&s3, "big/object");
    assert_eq!(pieces, 14);
    assert_same(&on_disk, &data, "on disk");
    // Pieces are no keys of their own.
    assert_eq!(storage.list("big").unwrap(), vec!["big/object".to_owned()]);
    let mut middle = Vec::new();
    let at = (8 << 20) - 1000;
    storage
        .open_range("big/object", at, 5 << 20)
        .unwrap()
        .read_to_end(&mut middle)
        .unwrap();
    assert_same(
        &middle,
        &data[at as usize..at as usize + (5 << 20)],
        "a range across pieces",
    );
    let mut back = Vec::new();
    storage
        .open("big/object")
        .unwrap()
        .read_to_end(&mut back)
        .unwrap();
    assert_same(&back, &data, "read back");

    // The server goes away after the reads ahead were taken: the rest is fetched again once it
    // is back, within the retries.
    let mut reader = storage.open("big/object").unwrap();
    let mut back = vec![0; 48 << 20];
    reader.read_exact(&mut back).unwrap();
    s3.stop();
    let restarted = std::thread::scope(|scope| {
        let restart = scope.spawn(|| {
            std::thread::sleep(Duration::from_millis(500));
            s3.restart();
        });
        let rest = reader.read_to_end(&mut back);
        restart.join().unwrap();
        rest
    });
    restarted.unwrap();
    assert_same(&back, &data, "read back across a restart");

    // Written once: a second big object at the key is refused and the first one kept.
    let mut again = storage.create("big/object").unwrap();
    again.write_all(&data[..40 << 20]).unwrap();
    let refused = again.commit_new();
    assert!(
        matches!(
            refused,
            Err(pgkeep_repo::StorageError::AlreadyExists { .. })
        ),
        "{refused:?}"
    );
    assert_eq!(storage.size("big/object").unwrap(), Some(data.len() as u64));
    assert_same(&stored(&s3, "big/object").0, &data, "kept");
    // The refused writer's pieces are gone, and deleting the object takes its pieces along.
    assert_eq!(objects_under(&object(&s3, "big")).len(), 1 + 14);
    storage.delete("big/object").unwrap();
    assert_eq!(objects_under(&object(&s3, "big")), Vec::<String>::new());
}

#[test]
fn s3_server_stopped_mid_upload_leaves_no_object_under_the_final_name() {
    let Some(mut s3) = S3Server::start() else {
        return;
    };
    s3.create_bucket(BUCKET);
    let storage = s3_storage(&s3);
    let data = noise(100 << 20, 42);
    let mut pending = storage.create("big/cut").unwrap();
    // Two parts handed off, then the server dies under the third, which fails once the client
    // has used up its retries (about 6 s); the server is back before the commit, so only the
    // lost part can make it fail.
    pending.write_all(&data[..64 << 20]).unwrap();
    s3.stop();
    let written = pending.write_all(&data[64 << 20..]);
    std::thread::sleep(Duration::from_secs(12));
    s3.restart();
    let committed = match written {
        Ok(()) => pending.commit(),
        Err(e) => {
            // Dropped unfinished: its stored pieces go with it.
            drop(pending);
            Err(pgkeep_repo::StorageError::Source {
                key: "big/cut".into(),
                source: e,
            })
        }
    };
    assert!(committed.is_err(), "{committed:?}");
    assert_eq!(storage.size("big/cut").unwrap(), None);
    assert!(!object(&s3, "big/cut").exists());
    // The pieces that went up before are deleted with the failed upload.
    assert_eq!(objects_under(&object(&s3, "big")), Vec::<String>::new());
    // Nothing stuck: the key can be written now.
    let mut pending = storage.create("big/cut").unwrap();
    pending.write_all(&data).unwrap();
    pending.commit_new().unwrap();
    assert_same(&stored(&s3, "big/cut").0, &data, "on disk");
}

#[test]
fn s3_over_https_with_a_private_ca_and_untrusted_without_it() {
    let Some(s3) = S3Server::start() else { return };
    let Some(tls) = TlsFront::start(s3.port) else {
        return;
    };
    s3.create_bucket(BUCKET);
    let catalog = PathBuf::from("{dir}/repo/catalog.db");
    let repo_toml = s3
        .repo_toml(BUCKET, PREFIX, &catalog)
        .replace(&s3.endpoint, &tls.endpoint)
        + &format!("ca-file = \"{}\"\n", tls.ca_file.display());
    let mut cluster = Cluster::with(ClusterOptions {
        repo_toml: Some(repo_toml),
        ..ClusterOptions::default()
    });
    cluster.execute(
        "CREATE TABLE t AS SELECT g AS id, md5(g::text) AS v FROM generate_series(1, 20000) g;",
    );
    let live = cluster.fingerprint("t", "id");
    let full = cluster.backup("full");
    assert_eq!(full["status"], "DONE");
    cluster.switch_wal_and_wait();
    let run = cluster.pgkeep(&["validate"]);
    assert!(run.success(), "{run:?}");
    cluster.stop_and_wipe();
    let run = cluster.restore(&["--target", "immediate", "--target-action", "promote"]);
    assert!(run.success(), "{run:?}");
    cluster.start();
    cluster.wait_promoted();
    assert_eq!(cluster.fingerprint("t", "id"), live);

    // Without the CA the same server is refused, in one line naming endpoint and bucket.
    let good = fs::read_to_string(&cluster.config).unwrap();
    let untrusted = cluster.dir.write(
        "untrusted.toml",
        good.replace("ca-file = ", "# ca-file = ")
            .replace("prefix = \"main\"", "prefix = \"other\"")
            .replace("catalog.db", "other.db"),
    );
    let run = pgkeep_with(&cluster, &untrusted, &["init"]);
    eprintln!("untrusted: {}", run.stderr.trim());
    assert_one_line(
        &run,
        1,
        &["not trusted", &tls.endpoint, "bucket pgkeep", "ca-file"],
    );
}

#[test]
fn s3_sync_waits_for_the_puts_commit_unsynced_left_in_flight_and_reports_their_failure() {
    let Some(mut s3) = S3Server::start() else {
        return;
    };
    s3.create_bucket(BUCKET);
    let storage = s3_storage(&s3);
    let data = noise(1 << 20, 5);
    for n in 0..24 {
        let mut pending = storage.create(&format!("many/{n}")).unwrap();
        pending.write_all(&data).unwrap();
        pending.commit_unsynced().unwrap();
    }
    storage.sync().unwrap();
    for n in 0..24 {
        assert_same(
            &fs::read(object(&s3, &format!("many/{n}"))).unwrap(),
            &data,
            "after sync",
        );
    }
    // The server gone: the commits return at once, the sync says the PUTs failed.
    s3.stop();
    for n in 0..3 {
        let mut pending = storage.create(&format!("lost/{n}")).unwrap();
        pending.write_all(&data).unwrap();
        let _ = pending.commit_unsynced();
    }
    let synced = storage.sync();
    assert!(synced.is_err(), "{synced:?}");
    s3.restart();
    storage.sync().unwrap();
}

/// The WAL file names the bucket holds under the repository's `archive/`, sorted.
fn archived_names(s3: &S3Server) -> Vec<String> {
    let mut names: Vec<String> = crate::harness::tree(&object(s3, "archive"))
        .into_iter()
        .filter_map(|(p, _)| Some(p.rsplit('/').next()?.strip_suffix(".lz4")?.to_string()))
        .collect();
    names.sort();
    names
}

/// The log and segment part of a 24-digit WAL file name (the timeline left out).
/// The objects (files; s3s-fs leaves empty directories behind) under `dir` of the bucket.
fn objects_under(dir: &Path) -> Vec<String> {
    if !dir.exists() {
        return Vec::new();
    }
    crate::harness::tree(dir)
        .into_iter()
        .filter(|(p, _)| dir.join(p).is_file())
        .map(|(p, _)| p)
        .collect()
}

fn segno(name: &str) -> &str {
    &name[8..24]
}

fn label_of(b: &serde_json::Value) -> String {
    b["label"].as_str().unwrap().to_string()
}

fn labels(cluster: &Cluster) -> Vec<String> {
    cluster.backups().iter().map(label_of).collect()
}

#[test]
fn s3_full_diff_incr_restore_then_expire_delete_and_pin_act_on_the_bucket() {
    let Some(s3) = S3Server::start() else { return };
    s3.create_bucket(BUCKET);
    let mut cluster = s3_cluster(&s3, ClusterOptions::default());
    let drill_dir = cluster.dir.subdir("drill");
    cluster.set_config("drill", &format!("dir = \"{}\"", drill_dir.display()));
    cluster.set_config("retention", "full = 1\nauto = false");
    let backup_dir = |label: &str| object(&s3, &format!("backup/{label}"));

    // A full -> diff -> incr chain: the full and the diff each pass a drill (restored, started,
    // read), the incr restores to a time after it with the data seen live then.
    cluster.pg_tool_ok("pgbench", &["-i", "-s", "1", "-q"]);
    let full = cluster.backup("full");
    cluster.pg_tool_ok("pgbench", &["-c", "1", "-t", "200", "-n"]);
    let diff = cluster.backup("diff");
    cluster.pg_tool_ok("pgbench", &["-c", "1", "-t", "200", "-n"]);
    let incr = cluster.backup("incr");
    assert_eq!(diff["parent"], full["label"]);
    assert_eq!(incr["parent"], diff["label"]);
    for b in [&full, &diff] {
        let run = cluster.pgkeep(&["drill", "--backup", &label_of(b), "--json"]);
        assert!(run.success(), "{run:?}");
        let report: serde_json::Value = serde_json::from_str(&run.stdout).unwrap();
        assert_eq!(report["status"], "passed", "{report}");
        assert_eq!(report["backup"], b["label"], "{report}");
    }
    cluster.pg_tool_ok("pgbench", &["-c", "1", "-t", "100", "-n"]);
    let live = cluster.pgbench_fingerprints();
    std::thread::sleep(Duration::from_millis(300));
    let t = server_now(&cluster);
    std::thread::sleep(Duration::from_millis(300));
    cluster.execute("DELETE FROM pgbench_history");
    cluster.switch_wal_and_wait();
    cluster.restore_and_promote(&["--target-time", &t]);
    assert_eq!(cluster.pgbench_fingerprints(), live);

    // Two fulls on the new timeline, the older pinned: with `full = 1` expire takes the first
    // chain and its WAL from the bucket, and keeps the pinned full with the WAL it needs.
    let pinned = cluster.backup("full");
    cluster.pgkeep_ok(&["pin", &label_of(&pinned)]);
    cluster.pg_tool_ok("pgbench", &["-c", "1", "-t", "100", "-n"]);
    cluster.switch_wal_and_wait();
    let kept = cluster.backup("full");
    let at_kept = cluster.pgbench_fingerprints();
    cluster.switch_wal_and_wait();
    let before = archived_names(&s3);
    let floor = segno(pinned["start_wal"].as_str().unwrap()).to_string();
    assert!(
        before.iter().any(|n| segno(n) < floor.as_str()),
        "{before:?}"
    );
    for b in [&full, &diff, &incr] {
        assert!(!objects_under(&backup_dir(&label_of(b))).is_empty());
    }
    let run = cluster.pgkeep_ok(&["expire"]);
    for b in [&full, &diff, &incr] {
        assert!(
            run.stdout.contains(&label_of(b)),
            "{} not reported: {run:?}",
            label_of(b)
        );
        let left = objects_under(&backup_dir(&label_of(b)));
        assert!(
            left.is_empty(),
            "{} left in the bucket: {left:?}",
            label_of(b)
        );
    }
    for b in [&pinned, &kept] {
        assert!(backup_dir(&label_of(b)).join("backup.ini").is_file());
    }
    assert_eq!(labels(&cluster), [label_of(&pinned), label_of(&kept)]);
    assert_eq!(cluster.backups()[0]["pinned"], true);
    // No segment before the pinned full's start is left; between its stop and the kept full's
    // start nothing either.
    let pinned_stop = segno(pinned["stop_wal"].as_str().unwrap()).to_string();
    let kept_start = segno(kept["start_wal"].as_str().unwrap()).to_string();
    let after = archived_names(&s3);
    for n in after.iter().filter(|n| !n.ends_with(".history")) {
        let s = segno(n);
        assert!(
            s >= floor.as_str() && (s <= pinned_stop.as_str() || s >= kept_start.as_str()),
            "{n} kept: {after:?}"
        );
    }
    assert!(after.len() < before.len(), "{before:?} -> {after:?}");
    let v = cluster.pgkeep_ok(&["validate"]);
    assert!(v.stdout.contains("0 problem(s)"), "{v:?}");

    // Unpinned, the older full goes at the next expire; `delete` takes an incr from the bucket.
    cluster.pgkeep_ok(&["unpin", &label_of(&pinned)]);
    cluster.pgkeep_ok(&["expire"]);
    assert_eq!(objects_under(&backup_dir(&label_of(&pinned))), [""; 0]);
    assert_eq!(labels(&cluster), [label_of(&kept)]);
    cluster.execute("INSERT INTO pgbench_history SELECT * FROM pgbench_history");
    cluster.switch_wal_and_wait();
    let extra = cluster.backup("incr");
    assert!(backup_dir(&label_of(&extra)).join("backup.ini").is_file());
    cluster.pgkeep_ok(&["delete", &label_of(&extra)]);
    assert_eq!(objects_under(&backup_dir(&label_of(&extra))), [""; 0]);
    assert_eq!(labels(&cluster), [label_of(&kept)]);

    // The kept full restores to its consistent point.
    cluster.restore_and_promote(&["--backup", &label_of(&kept), "--target", "immediate"]);
    assert_eq!(cluster.pgbench_fingerprints(), at_kept);
}
