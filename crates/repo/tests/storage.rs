//! Storage contract tests, run against both backends so `MemoryStorage` stays a faithful stand-in.

use std::fs::File;
use std::io::{Cursor, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Barrier};

use pgkeep_repo::{
    fetch_decompressed, fetch_decompressed_at, get_bytes, open_direct, put_bytes, store_compressed,
    Commit, CompressWriter, Digest, LocalStorage, MemoryStorage, Storage, StorageError, BLOCK_SIZE,
};

/// Runs `test` on a fresh local repository (in a temp dir) and a fresh memory one.
fn on_each_backend(test: impl Fn(&dyn Storage)) {
    let dir = tempfile::tempdir().expect("temp dir");
    test(&LocalStorage::new(dir.path().join("repo")));
    test(&MemoryStorage::default());
}

fn data(n: usize) -> Vec<u8> {
    // Compressible but not trivial: a counter pattern with some variation.
    (0..n)
        .map(|i| (i / 7 % 251) as u8 ^ (i % 13) as u8)
        .collect()
}

#[test]
fn put_get_size_list() {
    on_each_backend(|s| {
        put_bytes(s, "b/2", b"two").unwrap();
        put_bytes(s, "a/x/1", b"one").unwrap();
        put_bytes(s, "b/1", b"").unwrap();
        put_bytes(s, "top", b"t").unwrap();
        assert_eq!(get_bytes(s, "b/2").unwrap(), b"two");
        assert_eq!(get_bytes(s, "b/1").unwrap(), b"");
        assert_eq!(s.size("a/x/1").unwrap(), Some(3));
        assert_eq!(s.size("b/1").unwrap(), Some(0));
        assert_eq!(s.size("nope").unwrap(), None);
        assert_eq!(s.size("b").unwrap(), None, "a directory is not an object");
        assert_eq!(s.size("top/under").unwrap(), None);
        assert_eq!(s.list("").unwrap(), ["a/x/1", "b/1", "b/2", "top"]);
        assert_eq!(s.list("b").unwrap(), ["b/1", "b/2"]);
        assert_eq!(s.list("b/").unwrap(), ["b/1", "b/2"]);
        assert_eq!(s.list("a").unwrap(), ["a/x/1"]);
        assert!(s.list("missing").unwrap().is_empty());
        assert!(
            s.list("top").unwrap().is_empty(),
            "a file has nothing under it"
        );
        // "b" must not match keys that merely start with the same letters.
        put_bytes(s, "bb/1", b"x").unwrap();
        assert_eq!(s.list("b").unwrap(), ["b/1", "b/2"]);
    });
}

#[test]
fn open_missing_is_not_found() {
    on_each_backend(|s| {
        assert!(matches!(s.open("x/y"), Err(StorageError::NotFound { key }) if key == "x/y"));
        put_bytes(s, "x/y", b"1").unwrap();
        assert!(matches!(s.open("x"), Err(StorageError::NotFound { .. })));
        assert!(matches!(
            s.open("x/y/z"),
            Err(StorageError::NotFound { .. })
        ));
        let err = get_bytes(s, "nope").unwrap_err();
        assert_eq!(err.to_string(), "no object at nope in the repository");
    });
}

#[test]
fn commit_replaces() {
    on_each_backend(|s| {
        put_bytes(s, "k", b"old").unwrap();
        put_bytes(s, "k", b"new").unwrap();
        assert_eq!(get_bytes(s, "k").unwrap(), b"new");
        assert_eq!(s.list("").unwrap(), ["k"]);
    });
}

#[test]
fn dropped_pending_leaves_nothing() {
    on_each_backend(|s| {
        let mut p = s.create("d/obj").unwrap();
        p.write_all(&data(100_000)).unwrap();
        assert_eq!(s.size("d/obj").unwrap(), None, "invisible before commit");
        assert!(s.list("").unwrap().is_empty(), "temp file listed");
        drop(p);
        assert_eq!(s.size("d/obj").unwrap(), None);
        assert!(s.list("").unwrap().is_empty());
        // Dropping also leaves an existing object alone.
        put_bytes(s, "d/obj", b"kept").unwrap();
        let mut p = s.create("d/obj").unwrap();
        p.write_all(b"discarded").unwrap();
        drop(p);
        assert_eq!(get_bytes(s, "d/obj").unwrap(), b"kept");
        assert_eq!(s.list("").unwrap(), ["d/obj"]);
    });
}

#[test]
fn unsynced_commits_are_visible_and_synced_later() {
    on_each_backend(|s| {
        put_bytes(s, "u/x", b"old").unwrap();
        for (key, bytes) in [("u/x", &b"new"[..]), ("u/y", b"y")] {
            let mut p = s.create(key).unwrap();
            p.write_all(bytes).unwrap();
            p.commit_unsynced().unwrap();
        }
        assert_eq!(s.list("u").unwrap(), ["u/x", "u/y"]);
        assert_eq!(get_bytes(s, "u/x").unwrap(), b"new");
        s.sync().unwrap();
    });
}

#[test]
fn commit_new_never_replaces() {
    on_each_backend(|s| {
        let mut p = s.create("w/seg").unwrap();
        p.write_all(b"first").unwrap();
        p.commit_new().unwrap();
        let mut p = s.create("w/seg").unwrap();
        p.write_all(b"second").unwrap();
        let err = p.commit_new().unwrap_err();
        assert!(matches!(&err, StorageError::AlreadyExists { key } if key == "w/seg"));
        assert_eq!(
            err.to_string(),
            "an object already exists at w/seg in the repository"
        );
        assert_eq!(get_bytes(s, "w/seg").unwrap(), b"first");
        assert_eq!(
            s.list("").unwrap(),
            ["w/seg"],
            "loser's temp file left behind"
        );
    });
}

#[test]
fn concurrent_commit_new_has_one_winner() {
    on_each_backend(|s| {
        for round in 0..5 {
            let key = format!("race/{round}");
            let threads = 8;
            let barrier = Barrier::new(threads);
            let outcomes: Vec<_> = std::thread::scope(|scope| {
                let handles: Vec<_> = (0..threads)
                    .map(|t| {
                        let (barrier, key) = (&barrier, &key);
                        scope.spawn(move || {
                            let mut p = s.create(key)?;
                            p.write_all(format!("writer {t}").as_bytes()).map_err(|e| {
                                StorageError::Io {
                                    key: key.clone(),
                                    source: e,
                                }
                            })?;
                            barrier.wait();
                            p.commit_new().map(|()| t)
                        })
                    })
                    .collect();
                handles.into_iter().map(|h| h.join().unwrap()).collect()
            });
            let winners: Vec<usize> = outcomes
                .iter()
                .filter_map(|o| o.as_ref().ok())
                .copied()
                .collect();
            assert_eq!(winners.len(), 1, "{outcomes:?}");
            assert!(outcomes
                .iter()
                .all(|o| o.is_ok() || matches!(o, Err(StorageError::AlreadyExists { .. }))));
            let stored = get_bytes(s, &key).unwrap();
            assert_eq!(stored, format!("writer {}", winners[0]).as_bytes());
        }
        assert_eq!(s.list("race").unwrap().len(), 5);
    });
}

#[test]
fn invalid_keys_are_refused() {
    on_each_backend(|s| {
        for bad in ["", "/abs", "a//b", "a/", "../up", "a/../b", "./a", "a\0b"] {
            let invalid = |r: Result<(), StorageError>| matches!(r, Err(StorageError::InvalidKey { ref key }) if key == bad);
            assert!(invalid(s.create(bad).map(drop)), "create {bad:?}");
            assert!(invalid(s.open(bad).map(drop)), "open {bad:?}");
            assert!(invalid(s.size(bad).map(drop)), "size {bad:?}");
            assert!(invalid(s.delete(bad)), "delete {bad:?}");
            assert!(invalid(put_bytes(s, bad, b"x")), "put {bad:?}");
            if !bad.is_empty() && bad != "a/" {
                assert!(invalid(s.list(bad).map(drop)), "list {bad:?}");
                assert!(invalid(s.delete_prefix(bad)), "delete_prefix {bad:?}");
            }
        }
        // The whole repository is not a prefix one may delete.
        assert!(matches!(
            s.delete_prefix(""),
            Err(StorageError::InvalidKey { .. })
        ));
        assert!(s.list("").unwrap().is_empty());
    });
}

#[test]
fn deletes() {
    on_each_backend(|s| {
        s.delete("never/there").unwrap();
        s.delete_prefix("never/there").unwrap();
        for k in [
            "backup/L1/backup.ini",
            "backup/L1/data/base/1/2.lz4",
            "backup/L2/x",
            "backup/L10/y",
        ] {
            put_bytes(s, k, b"x").unwrap();
        }
        s.delete("backup/L2/x").unwrap();
        s.delete("backup/L2/x").unwrap();
        s.delete_prefix("backup/L1").unwrap();
        assert_eq!(s.list("").unwrap(), ["backup/L10/y"]);
        s.delete_prefix("backup/L10/y").unwrap();
        assert_eq!(
            s.list("").unwrap(),
            ["backup/L10/y"],
            "a file is not a prefix"
        );
    });
}

#[test]
fn compressed_round_trip_and_commit_modes() {
    on_each_backend(|s| {
        let raw = data(3 * pgkeep_repo::BLOCK_SIZE + 12345);
        let stored =
            store_compressed(s, "o/big.lz4", &mut Cursor::new(&raw), Commit::Replace).unwrap();
        assert_eq!(stored.digest.size, raw.len() as u64);
        assert_eq!(stored.digest.crc32c, crc32c::crc32c(&raw));
        assert_eq!(
            stored.digest.sha256.map(hex::encode),
            Some(sha256_hex(&raw))
        );
        assert_eq!(s.size("o/big.lz4").unwrap(), Some(stored.stored_size));
        assert!(stored.stored_size < raw.len() as u64 / 2, "{stored:?}");

        let mut out = Vec::new();
        let expect = Some((raw.len() as u64, stored.digest.crc32c));
        let got = fetch_decompressed(s, "o/big.lz4", &mut out, expect, true).unwrap();
        assert_eq!(got, stored.digest);
        assert!(out == raw);
        let got = fetch_decompressed(s, "o/big.lz4", &mut std::io::sink(), None, false).unwrap();
        assert_eq!(got.sha256, None);
        assert_eq!(
            (got.size, got.crc32c),
            (stored.digest.size, stored.digest.crc32c)
        );

        let other = data(10);
        store_compressed(s, "o/new.lz4", &mut Cursor::new(&other), Commit::New).unwrap();
        let err =
            store_compressed(s, "o/new.lz4", &mut Cursor::new(&raw), Commit::New).unwrap_err();
        assert!(matches!(err, StorageError::AlreadyExists { .. }));
        let mut out = Vec::new();
        fetch_decompressed(s, "o/new.lz4", &mut out, None, false).unwrap();
        assert_eq!(out, other);
        store_compressed(s, "o/new.lz4", &mut Cursor::new(&raw[..5]), Commit::Replace).unwrap();
        let mut out = Vec::new();
        fetch_decompressed(s, "o/new.lz4", &mut out, None, false).unwrap();
        assert_eq!(out, &raw[..5]);

        let empty =
            store_compressed(s, "o/empty.lz4", &mut std::io::empty(), Commit::Replace).unwrap();
        assert_eq!(empty.digest.size, 0);
        let mut out = Vec::new();
        let got = fetch_decompressed(s, "o/empty.lz4", &mut out, Some((0, 0)), true).unwrap();
        assert_eq!(got, empty.digest);
        assert!(out.is_empty());

        assert!(matches!(
            fetch_decompressed(s, "o/none.lz4", &mut out, None, false),
            Err(StorageError::NotFound { .. })
        ));
    });
}

#[test]
fn flipped_bytes_are_corrupt() {
    on_each_backend(|s| {
        let raw = data(2 * pgkeep_repo::BLOCK_SIZE + 999);
        let stored =
            store_compressed(s, "c/obj.lz4", &mut Cursor::new(&raw), Commit::Replace).unwrap();
        let expect = Some((stored.digest.size, stored.digest.crc32c));
        let good = get_bytes(s, "c/obj.lz4").unwrap();
        let mut positions: Vec<usize> = (0..16).collect();
        positions.extend((16..good.len()).step_by(good.len() / 97));
        positions.extend(good.len() - 8..good.len());
        for pos in positions {
            for mask in [0x01u8, 0x80, 0xFF] {
                let mut bad = good.clone();
                bad[pos] ^= mask;
                put_bytes(s, "c/bad.lz4", &bad).unwrap();
                let result =
                    fetch_decompressed(s, "c/bad.lz4", &mut std::io::sink(), expect, false);
                match result {
                    Err(StorageError::Corrupt { key, detail }) => {
                        assert_eq!(key, "c/bad.lz4");
                        assert!(!detail.is_empty());
                    }
                    other => panic!("flip {mask:#x} at {pos} of {}: {other:?}", good.len()),
                }
            }
        }
        // The message names key, expectation and finding.
        let mut bad = good.clone();
        let last_literal = bad.len() - 5;
        bad[last_literal] ^= 1;
        put_bytes(s, "c/bad.lz4", &bad).unwrap();
        let err =
            fetch_decompressed(s, "c/bad.lz4", &mut std::io::sink(), expect, false).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.starts_with("object c/bad.lz4 in the repository is corrupt: expected"),
            "{msg}"
        );
        assert!(
            msg.contains(&format!("{:08x}", stored.digest.crc32c)),
            "{msg}"
        );
    });
}

#[test]
fn truncated_or_extended_objects_are_corrupt() {
    on_each_backend(|s| {
        let raw = data(pgkeep_repo::BLOCK_SIZE + 4096);
        store_compressed(s, "t/obj.lz4", &mut Cursor::new(&raw), Commit::Replace).unwrap();
        let good = get_bytes(s, "t/obj.lz4").unwrap();
        let mut cuts: Vec<usize> = (0..24).collect();
        cuts.extend((24..good.len()).step_by(good.len() / 50));
        cuts.extend(good.len() - 6..good.len());
        for cut in cuts {
            put_bytes(s, "t/cut.lz4", &good[..cut]).unwrap();
            // Even without an expected size: the frame itself shows it was cut short.
            let result = fetch_decompressed(s, "t/cut.lz4", &mut std::io::sink(), None, false);
            assert!(
                matches!(result, Err(StorageError::Corrupt { .. })),
                "cut at {cut} of {}: {result:?}",
                good.len()
            );
        }
        let mut longer = good.clone();
        longer.push(0);
        put_bytes(s, "t/long.lz4", &longer).unwrap();
        let result = fetch_decompressed(s, "t/long.lz4", &mut std::io::sink(), None, false);
        assert!(
            matches!(result, Err(StorageError::Corrupt { .. })),
            "{result:?}"
        );
        // Uncompressed bytes are not a frame.
        put_bytes(s, "t/plain", b"backup_label contents").unwrap();
        let result = fetch_decompressed(s, "t/plain", &mut std::io::sink(), None, false);
        assert!(
            matches!(result, Err(StorageError::Corrupt { .. })),
            "{result:?}"
        );
    });
}

#[test]
fn wrong_expectation_is_corrupt() {
    on_each_backend(|s| {
        let raw = data(50_000);
        let stored =
            store_compressed(s, "e/obj.lz4", &mut Cursor::new(&raw), Commit::Replace).unwrap();
        let crc = stored.digest.crc32c;
        for expect in [(49_999, crc), (50_001, crc), (50_000, crc ^ 1), (0, 0)] {
            let mut out = Vec::new();
            let result = fetch_decompressed(s, "e/obj.lz4", &mut out, Some(expect), false);
            assert!(
                matches!(result, Err(StorageError::Corrupt { .. })),
                "{expect:?}: {result:?}"
            );
            assert!(out.len() as u64 <= expect.0.max(50_000));
        }
    });
}

#[test]
fn source_and_destination_errors_are_told_apart() {
    struct Failing;
    impl std::io::Read for Failing {
        fn read(&mut self, _: &mut [u8]) -> std::io::Result<usize> {
            Err(std::io::Error::other("disk on fire"))
        }
    }
    impl Write for Failing {
        fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
            Err(std::io::Error::other("disk full"))
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    on_each_backend(|s| {
        let err = store_compressed(s, "f/x.lz4", &mut Failing, Commit::Replace).unwrap_err();
        assert!(matches!(err, StorageError::Source { .. }), "{err:?}");
        assert!(
            s.list("").unwrap().is_empty(),
            "failed store left {:?}",
            s.list("")
        );
        store_compressed(s, "f/x.lz4", &mut Cursor::new(b"abc"), Commit::Replace).unwrap();
        let err = fetch_decompressed(s, "f/x.lz4", &mut Failing, None, false).unwrap_err();
        assert!(matches!(err, StorageError::Destination { .. }), "{err:?}");
        assert_eq!(err.key(), "f/x.lz4");
    });
}

/// Hands out at most `step` bytes per read and fails after `fail_at` bytes, like a pipe or a
/// file on a dying disk.
struct Trickle<'a> {
    data: &'a [u8],
    pos: usize,
    step: usize,
    fail_at: Option<usize>,
}

impl std::io::Read for Trickle<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.fail_at.is_some_and(|at| self.pos >= at) {
            return Err(std::io::Error::other("read error"));
        }
        let n = buf.len().min(self.step).min(self.data.len() - self.pos);
        buf[..n].copy_from_slice(&self.data[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

#[test]
fn store_handles_short_reads_and_every_block_boundary() {
    const B: usize = pgkeep_repo::BLOCK_SIZE;
    on_each_backend(|s| {
        let raw = data(4 * B + 1);
        for len in [0, 1, B - 1, B, B + 1, 2 * B, 3 * B + 17, 4 * B + 1] {
            for step in [usize::MAX, 100_003] {
                let src = &raw[..len];
                let mut reader = Trickle {
                    data: src,
                    pos: 0,
                    step,
                    fail_at: None,
                };
                let stored =
                    store_compressed(s, "s/obj.lz4", &mut reader, Commit::Replace).unwrap();
                assert_eq!(stored.digest.size, len as u64);
                assert_eq!(stored.digest.crc32c, crc32c::crc32c(src));
                assert_eq!(stored.digest.sha256.map(hex::encode), Some(sha256_hex(src)));
                let mut out = Vec::new();
                let expect = Some((len as u64, stored.digest.crc32c));
                let got = fetch_decompressed(s, "s/obj.lz4", &mut out, expect, true).unwrap();
                assert_eq!(got, stored.digest);
                assert!(out == src, "len {len} step {step}");
            }
        }
    });
}

#[test]
fn a_source_failing_midway_stores_nothing() {
    const B: usize = pgkeep_repo::BLOCK_SIZE;
    on_each_backend(|s| {
        let raw = data(4 * B);
        for fail_at in [0, B / 2, B, 2 * B + 5] {
            let mut reader = Trickle {
                data: &raw,
                pos: 0,
                step: 300_000,
                fail_at: Some(fail_at),
            };
            let err = store_compressed(s, "s/failed.lz4", &mut reader, Commit::New).unwrap_err();
            assert!(
                matches!(err, StorageError::Source { ref key, .. } if key == "s/failed.lz4"),
                "{err:?}"
            );
            assert_eq!(s.size("s/failed.lz4").unwrap(), None);
            assert!(s.list("").unwrap().is_empty());
        }
        // Stores after a failure (reusing the pooled buffers) are still right.
        let stored = store_compressed(s, "s/ok.lz4", &mut Cursor::new(&raw), Commit::New).unwrap();
        assert_eq!(
            stored.digest.sha256.map(hex::encode),
            Some(sha256_hex(&raw))
        );
    });
}

#[test]
fn memory_handles_share_objects() {
    let a = MemoryStorage::default();
    let b = a.clone();
    put_bytes(&a, "k", b"v").unwrap();
    assert_eq!(get_bytes(&b, "k").unwrap(), b"v");
    let shared: Arc<dyn Storage> = Arc::new(b);
    assert_eq!(shared.list("").unwrap(), ["k"]);
}

#[test]
fn parallel_fetch_writes_what_the_sequential_one_does() {
    const B: usize = BLOCK_SIZE;
    on_each_backend(|s| {
        let raw = mixed(5 * B + 4321);
        for len in [0, 1, B - 1, B, B + 1, 3 * B, 5 * B + 4321] {
            let src = &raw[..len];
            let stored =
                store_compressed(s, "p/obj.lz4", &mut Cursor::new(src), Commit::Replace).unwrap();
            let expect = (len as u64, stored.digest.crc32c);
            for threads in [1, 2, 4] {
                let (out, result, reported) = fetch_at(s, "p/obj.lz4", u64::MAX, expect, threads);
                let digest = result.unwrap();
                assert_eq!((digest.size, digest.crc32c), expect);
                assert!(out == src, "len {len} threads {threads}");
                assert_eq!(reported, len as u64);
            }
        }
        // A file that shrank later in a chain keeps only the head of the object.
        let len = raw.len() as u64;
        for cap in [
            0,
            1,
            B as u64,
            B as u64 + 7,
            2 * B as u64 - 1,
            len / 2,
            len,
            len + 1,
        ] {
            let (out, result, reported) =
                fetch_at(s, "p/obj.lz4", cap, (len, crc32c::crc32c(&raw)), 2);
            assert_eq!(result.unwrap().size, len);
            let want = &raw[..len.min(cap) as usize];
            assert!(out == want, "cap {cap}");
            assert_eq!(reported, want.len() as u64);
        }
    });
}

#[test]
fn parallel_fetch_reports_damage_as_corruption() {
    on_each_backend(|s| {
        let raw = mixed(4 * BLOCK_SIZE + 999);
        let stored =
            store_compressed(s, "p/obj.lz4", &mut Cursor::new(&raw), Commit::Replace).unwrap();
        let expect = (stored.digest.size, stored.digest.crc32c);
        let good = get_bytes(s, "p/obj.lz4").unwrap();
        let is_corrupt = |result: &pgkeep_repo::Result<Digest>| matches!(result, Err(StorageError::Corrupt { key, .. }) if key == "p/bad.lz4");

        let mut positions: Vec<usize> = (0..16).collect();
        positions.extend((16..good.len()).step_by(good.len() / 31));
        positions.extend(good.len() - 8..good.len());
        for pos in positions {
            for mask in [0x01u8, 0x80, 0xFF] {
                let mut bad = good.clone();
                bad[pos] ^= mask;
                put_bytes(s, "p/bad.lz4", &bad).unwrap();
                let (_, result, _) = fetch_at(s, "p/bad.lz4", u64::MAX, expect, 2);
                assert!(is_corrupt(&result), "flip {mask:#x} at {pos}: {result:?}");
            }
        }
        let mut cuts: Vec<usize> = (0..24).collect();
        cuts.extend((24..good.len()).step_by(good.len() / 31));
        cuts.extend(good.len() - 6..good.len());
        for cut in cuts {
            put_bytes(s, "p/bad.lz4", &good[..cut]).unwrap();
            let (_, result, _) = fetch_at(s, "p/bad.lz4", u64::MAX, expect, 2);
            assert!(is_corrupt(&result), "cut at {cut}: {result:?}");
        }
        let mut longer = good.clone();
        longer.push(0);
        put_bytes(s, "p/bad.lz4", &longer).unwrap();
        let (_, result, _) = fetch_at(s, "p/bad.lz4", u64::MAX, expect, 2);
        assert!(is_corrupt(&result), "{result:?}");

        put_bytes(s, "p/bad.lz4", &good).unwrap();
        let (size, crc) = expect;
        let block = BLOCK_SIZE as u64;
        for wrong in [
            (size - 1, crc),
            (size + 1, crc),
            (size, crc ^ 1),
            (0, 0),
            (size - 999, crc),
            (size - 1000, crc),
        ] {
            let (out, result, _) = fetch_at(s, "p/bad.lz4", u64::MAX, wrong, 2);
            assert!(is_corrupt(&result), "{wrong:?}: {result:?}");
            let msg = result.unwrap_err().to_string();
            assert!(
                msg.starts_with("object p/bad.lz4 in the repository is corrupt: expected"),
                "{msg}"
            );
            // A short expectation stops the fetch within a block of it.
            assert!(out.len() as u64 <= wrong.0.max(size.min(wrong.0 + block)));
        }
        let (_, result, _) = fetch_at(s, "p/none.lz4", u64::MAX, expect, 2);
        assert!(
            matches!(result, Err(StorageError::NotFound { .. })),
            "{result:?}"
        );
    });
}

#[test]
fn a_frame_with_a_short_middle_block_is_fetched_one_block_after_another() {
    const B: usize = BLOCK_SIZE;
    on_each_backend(|s| {
        let raw = mixed(4 * B - 1000);
        // `flush` ends a block early. Blocks of B, B - 1000, B, B bytes put the last block at
        // 3 B, inside the object; B, B / 2, B, B, B / 2 - 1000 put it past the end.
        for early in [2 * B - 1000, B + B / 2] {
            let mut w = CompressWriter::new(Vec::new(), false);
            w.write_all(&raw[..early]).unwrap();
            w.flush().unwrap();
            w.write_all(&raw[early..]).unwrap();
            let (digest, _, frame) = w.finish().unwrap();
            put_bytes(s, "p/short.lz4", &frame).unwrap();
            let expect = (digest.size, digest.crc32c);
            for threads in [1, 2, 4] {
                for cap in [u64::MAX, B as u64 + 10, 3 * B as u64] {
                    let (out, result, reported) = fetch_at(s, "p/short.lz4", cap, expect, threads);
                    assert_eq!(result.unwrap().crc32c, digest.crc32c);
                    let want = &raw[..raw.len().min(cap as usize)];
                    let case = format!("early {early} threads {threads} cap {cap}");
                    assert!(out == want, "{case}");
                    // Bytes the abandoned attempt reported are not reported again.
                    assert_eq!(reported, want.len() as u64, "{case}");
                }
            }
            let (_, result, _) = fetch_at(s, "p/short.lz4", u64::MAX, (digest.size, 0), 2);
            assert!(
                matches!(result, Err(StorageError::Corrupt { .. })),
                "{result:?}"
            );
        }
    });
}

#[test]
fn parallel_fetch_tells_destination_errors_apart() {
    on_each_backend(|s| {
        let raw = mixed(3 * BLOCK_SIZE);
        let stored =
            store_compressed(s, "p/obj.lz4", &mut Cursor::new(&raw), Commit::Replace).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("read-only");
        std::fs::write(&path, b"").unwrap();
        let file = File::open(&path).unwrap();
        let expect = (stored.digest.size, stored.digest.crc32c);
        let err = fetch_decompressed_at(s, "p/obj.lz4", &file, None, u64::MAX, expect, 2, &|_| {})
            .unwrap_err();
        assert!(matches!(err, StorageError::Destination { .. }), "{err:?}");
        assert_eq!(err.key(), "p/obj.lz4");
    });
}

/// Runs `fetch_decompressed_at` into a new file, through the page cache and again past it
/// (`O_DIRECT`, where the temporary directory's filesystem takes it), checks both come to the
/// same, and returns what the file then holds, the result, and the bytes reported written.
fn fetch_at(
    s: &dyn Storage,
    key: &str,
    cap: u64,
    expect: (u64, u32),
    threads: usize,
) -> (Vec<u8>, pgkeep_repo::Result<Digest>, u64) {
    let buffered = fetch_into(s, key, cap, expect, threads, false);
    let direct = fetch_into(s, key, cap, expect, threads, true);
    let case = format!("{key} cap {cap} threads {threads}");
    assert_eq!(buffered.1.is_ok(), direct.1.is_ok(), "{case}");
    // After a failure what was written depends on which thread got how far.
    if let (Ok(b), Ok(d)) = (&buffered.1, &direct.1) {
        assert!(buffered.0 == direct.0, "{case}: direct writes differ");
        assert_eq!((b.size, b.crc32c), (d.size, d.crc32c), "{case}");
        assert_eq!(buffered.2, direct.2, "{case}");
    }
    direct
}

fn fetch_into(
    s: &dyn Storage,
    key: &str,
    cap: u64,
    expect: (u64, u32),
    threads: usize,
    direct: bool,
) -> (Vec<u8>, pgkeep_repo::Result<Digest>, u64) {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("out");
    let file = File::create(&path).expect("output file");
    let direct = direct.then(|| open_direct(&path)).flatten();
    let reported = AtomicU64::new(0);
    let on_bytes = |n| {
        reported.fetch_add(n, Ordering::Relaxed);
    };
    let result = fetch_decompressed_at(
        s,
        key,
        &file,
        direct.as_ref(),
        cap,
        expect,
        threads,
        &on_bytes,
    );
    let out = std::fs::read(&path).expect("reading the output file");
    (out, result, reported.into_inner())
}

/// Compressible blocks with incompressible ones between, so frames hold stored blocks too.
fn mixed(n: usize) -> Vec<u8> {
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    let mut v = data(n);
    for (i, byte) in v.iter_mut().enumerate() {
        if i / BLOCK_SIZE % 2 == 1 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *byte = x as u8;
        }
    }
    v
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(bytes))
}
