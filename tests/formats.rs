//! The PostgreSQL formats crate checked against what a real server writes.

use std::fs;
use std::path::Path;

use pgkeep_pg::{parse_relation_path, verify_page, ControlFile, PageVerdict};

use crate::harness::Cluster;

/// Every page of every relation file under `data`, with its block number.
fn for_each_page(
    data: &Path,
    block_size: usize,
    blocks_per_seg: u32,
    mut f: impl FnMut(&str, u32, &[u8]),
) {
    for entry in walkdir(data) {
        let rel = entry
            .strip_prefix(data)
            .unwrap()
            .to_str()
            .unwrap()
            .to_string();
        let Some((_, file)) = parse_relation_path(&rel) else {
            continue;
        };
        let bytes = fs::read(&entry).unwrap();
        for (i, page) in bytes.chunks_exact(block_size).enumerate() {
            let blkno = file.segno * blocks_per_seg + i as u32;
            f(&rel, blkno, page);
        }
    }
}

fn walkdir(root: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in fs::read_dir(&dir).unwrap() {
            let e = e.unwrap();
            let ft = e.file_type().unwrap();
            if ft.is_dir() {
                stack.push(e.path());
            } else if ft.is_file() {
                out.push(e.path());
            }
        }
    }
    out
}

#[test]
fn checksum_port_agrees_with_postgresql_on_every_page_of_a_real_cluster() {
    let mut cluster = Cluster::new();
    cluster.execute(
        "CREATE TABLE t AS SELECT g AS id, md5(g::text) AS v FROM generate_series(1, 20000) g;
         CREATE INDEX ON t (v); VACUUM t; CHECKPOINT;",
    );
    cluster.stop();
    let control =
        ControlFile::parse(&fs::read(cluster.data.join("global/pg_control")).unwrap()).unwrap();
    assert!(control.data_checksums());
    let (mut valid, mut new) = (0usize, 0usize);
    for_each_page(
        &cluster.data,
        control.block_size as usize,
        control.blocks_per_segment,
        |rel, blkno, page| match verify_page(page, blkno) {
            PageVerdict::Valid => valid += 1,
            PageVerdict::New => new += 1,
            other => panic!("page {blkno} of {rel}: {other:?}"),
        },
    );
    assert!(valid > 500, "only {valid} pages checked");
    eprintln!("{valid} valid pages, {new} new pages");
}

#[test]
fn checksum_port_computes_the_checksum_pg_checksums_expects_for_a_damaged_page() {
    let mut cluster = Cluster::new();
    cluster
        .execute("CREATE TABLE t AS SELECT g AS id FROM generate_series(1, 5000) g; CHECKPOINT;");
    let path = cluster.query_text("SELECT pg_relation_filepath('t')");
    cluster.stop();
    let file = cluster.data.join(&path);
    let mut bytes = fs::read(&file).unwrap();
    bytes[8192 + 4000] ^= 0xFF; // block 1, in the tuple data
    fs::write(&file, &bytes).unwrap();
    let PageVerdict::ChecksumMismatch { stored, computed } = verify_page(&bytes[8192..16384], 1)
    else {
        panic!("damaged page not detected");
    };
    let run = cluster.pg_tool(
        "pg_checksums",
        &["--check", "-D", cluster.data.to_str().unwrap()],
    );
    assert_eq!(run.code, Some(1), "{run:?}");
    let expected = format!("calculated checksum {computed:X} but block contains {stored:X}");
    assert!(
        run.stderr.contains(&expected),
        "pg_checksums disagrees: want {expected:?} in {run:?}"
    );
}

#[test]
fn pg_control_reader_agrees_with_the_server() {
    let cluster = Cluster::new();
    let sysid = cluster.query_text("SELECT system_identifier::text FROM pg_control_system()");
    let catver = cluster.query_text("SELECT catalog_version_no::text FROM pg_control_system()");
    let control =
        ControlFile::parse(&fs::read(cluster.data.join("global/pg_control")).unwrap()).unwrap();
    assert_eq!(control.system_identifier.to_string(), sysid);
    assert_eq!(control.catalog_version_no.to_string(), catver);
    assert_eq!(
        control.block_size.to_string(),
        cluster.query_text("SHOW block_size")
    );
    assert_eq!(control.wal_segment_size, 16 * 1024 * 1024);
    assert_eq!(control.data_checksum_version, 1);
}
