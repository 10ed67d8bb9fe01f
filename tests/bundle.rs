//! `[repo] bundle = true` on a local repository: what validate and restore --delta make of
//! files stored inside bundles (S3 repositories bundle by default and run the S3 tests).

use std::fs;
use std::io::Read;

use crate::harness::{Cluster, ClusterOptions};

/// A cluster whose local repository bundles, holding a table `small` (a bundled file once
/// backed up), and that table's fingerprint.
fn bundled_cluster_with_a_small_table() -> (Cluster, String) {
    let cluster = Cluster::with(ClusterOptions {
        repo_toml: Some("path = \"{dir}/repo\"\nbundle = true\n".to_string()),
        ..ClusterOptions::default()
    });
    cluster.execute(
        "CREATE TABLE small (id int PRIMARY KEY, v text);
         INSERT INTO small SELECT g, md5(g::text) FROM generate_series(1, 2000) g;
         CHECKPOINT",
    );
    let want = cluster.fingerprint("small", "id");
    (cluster, want)
}

/// Where the manifest of backup `label` says `path` lies: (bundle id, offset, length).
fn bundled_at(cluster: &Cluster, label: &str, path: &str) -> Option<(u32, u64, u64)> {
    let manifest =
        fs::read_to_string(cluster.repo.join("backup").join(label).join("manifest")).unwrap();
    let line = manifest
        .lines()
        .find(|l| l.split('\t').next() == Some(path))?;
    let bundle = line.split('\t').nth(14)?;
    let mut parts = bundle.split(':').map(|p| p.parse::<u64>().ok());
    Some((parts.next()?? as u32, parts.next()??, parts.next()??))
}

/// Flips one bit inside the frame `[offset, offset + length)` of a bundle so that the frame
/// decodes to other bytes (or fails to decode), leaving every other frame as it was.
fn corrupt_frame(bundle: &std::path::Path, offset: u64, length: u64) {
    let decode = |bytes: &[u8]| {
        let mut out = Vec::new();
        let mut reader = pgkeep_repo::DecompressReader::new(bytes, false);
        reader.read_to_end(&mut out).ok().map(|_| out)
    };
    let mut all = fs::read(bundle).unwrap();
    let (start, end) = (offset as usize, (offset + length) as usize);
    let original = decode(&all[start..end]).expect("the frame decodes before it is damaged");
    for pos in (start + end) / 2..end {
        all[pos] ^= 0x40;
        if decode(&all[start..end]).as_ref() != Some(&original) {
            fs::write(bundle, &all).unwrap();
            return;
        }
        all[pos] ^= 0x40;
    }
    panic!(
        "no flipped bit changes the frame at {offset} in {}",
        bundle.display()
    );
}

#[test]
fn a_damaged_frame_in_a_bundle_is_reported_by_file_and_the_others_still_restore() {
    let (mut cluster, want) = bundled_cluster_with_a_small_table();
    let good = cluster.backup("full");
    let bad = cluster.backup("full");
    let (good, bad) = (
        good["label"].as_str().unwrap(),
        bad["label"].as_str().unwrap(),
    );
    let rel = cluster.query_text("SELECT pg_relation_filepath('small')");
    let (id, offset, length) =
        bundled_at(&cluster, bad, &rel).unwrap_or_else(|| panic!("{rel} is not bundled"));
    let bundle = cluster
        .repo
        .join("backup")
        .join(bad)
        .join("bundle")
        .join(id.to_string());
    corrupt_frame(&bundle, offset, length);

    let run = cluster.pgkeep(&["validate"]);
    assert_eq!(run.code, Some(3), "{run:?}");
    assert!(
        run.stdout.contains(&format!("backup {bad} CORRUPT")),
        "{run:?}"
    );
    assert!(run.stdout.contains(&format!("  {rel}: ")), "{run:?}");
    // One file, not the whole bundle, is damaged.
    assert!(run.stderr.contains("validate found 1 problem"), "{run:?}");
    assert!(run.stdout.contains(&format!("backup {good} OK")), "{run:?}");

    // The good backup, whose bundles are intact, restores to the data seen live.
    cluster.restore_and_promote(&["--backup", good, "--target", "immediate"]);
    assert_eq!(cluster.fingerprint("small", "id"), want);
}

#[test]
fn delta_restore_from_bundles_keeps_what_is_unchanged_and_rewrites_the_rest() {
    let (mut cluster, want) = bundled_cluster_with_a_small_table();
    let full = cluster.backup("full");
    let label = full["label"].as_str().unwrap().to_string();
    let rel = cluster.query_text("SELECT pg_relation_filepath('small')");
    assert!(
        bundled_at(&cluster, &label, &rel).is_some(),
        "{rel} not bundled"
    );
    cluster.stop();
    // Damage one bundled file in the data directory; the rest stays as backed up.
    let damaged = cluster.data.join(&rel);
    let mut bytes = fs::read(&damaged).unwrap();
    bytes[100] ^= 0xff;
    fs::write(&damaged, &bytes).unwrap();
    let run = cluster.restore(&[
        "--delta",
        "--backup",
        &label,
        "--target",
        "immediate",
        "--target-action",
        "promote",
    ]);
    assert!(run.success(), "{run:?}");
    // "N files written (...), M kept": most kept, the damaged one among the written.
    let counts: Vec<u64> = run
        .stdout
        .split([' ', ','])
        .collect::<Vec<_>>()
        .windows(2)
        .filter(|w| w[1] == "files" || w[1] == "kept;" || w[1] == "kept")
        .filter_map(|w| w[0].parse().ok())
        .collect();
    assert!(
        counts.len() == 2 && counts[0] >= 1 && counts[1] > counts[0],
        "{counts:?}: {run:?}"
    );
    cluster.start();
    cluster.wait_promoted();
    assert_eq!(cluster.fingerprint("small", "id"), want);
    cluster.check_pages_and_stop();
}
