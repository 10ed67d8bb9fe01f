//! The WAL record decoder checked against `pg_waldump -b` on WAL a real cluster wrote, or on
//! majors whose WAL that pg_waldump cannot read (16 and later), against the server's own reader
//! through `pg_walinspect`'s `pg_get_wal_block_info()`.

use std::collections::BTreeMap;
use std::fs;
use std::ops::ControlFlow;

use pgkeep_pg::{Fork, Lsn, WalStream};

use crate::harness::{major_of, pg_client, server_major, Cluster, ClusterOptions};

/// One record's block references: (spc/db/rel, fork name, block) in block-id order.
type Blocks = Vec<(String, &'static str, u32)>;

fn fork_name(f: Fork) -> &'static str {
    match f {
        Fork::Main => "main",
        Fork::Fsm => "fsm",
        Fork::Vm => "vm",
        Fork::Init => "init",
    }
}

/// `X/X` with or without pg_waldump's zero padding.
fn lsn(text: &str) -> u64 {
    let (hi, lo) = text.trim_end_matches(',').split_once('/').unwrap();
    (u64::from_str_radix(hi, 16).unwrap() << 32) | u64::from_str_radix(lo, 16).unwrap()
}

/// Records by LSN with their block references, from `pg_waldump -b` output: a record line
/// carries `lsn: X/X,`, each following `blkref #N: rel S/D/R [fork F] blk B` line one block.
fn parse_waldump(out: &str) -> BTreeMap<u64, Blocks> {
    let mut records = BTreeMap::new();
    let mut current = None;
    for line in out.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        if let Some(i) = words.iter().position(|w| *w == "lsn:") {
            let at = lsn(words[i + 1]);
            records.insert(at, Vec::new());
            current = Some(at);
        } else if words.first() == Some(&"blkref") {
            let rel = words[words.iter().position(|w| *w == "rel").unwrap() + 1];
            let fork = match words.iter().position(|w| *w == "fork") {
                Some(i) => match words[i + 1] {
                    "fsm" => "fsm",
                    "vm" => "vm",
                    "init" => "init",
                    _ => "main",
                },
                None => "main",
            };
            let blk = words[words.iter().position(|w| *w == "blk").unwrap() + 1];
            let blk: u32 = blk
                .trim_end_matches(|c: char| !c.is_ascii_digit())
                .parse()
                .unwrap();
            records
                .get_mut(&current.expect("blkref before any record"))
                .unwrap()
                .push((rel.to_string(), fork, blk));
        }
    }
    records
}

/// Records with block references, by LSN, as the server's `pg_get_wal_block_info()` (the
/// pg_walinspect extension, 16 and later) reads them from `start` up to `end`.
fn walinspect(cluster: &Cluster, start: &str, end: &str) -> BTreeMap<u64, Blocks> {
    let mut client = crate::incremental::connect_db(cluster, "postgres");
    client
        .batch_execute("CREATE EXTENSION IF NOT EXISTS pg_walinspect")
        .unwrap();
    let rows = client
        .query(
            &format!(
                "SELECT start_lsn::text, reltablespace::int8, reldatabase::int8, relfilenode::int8, \
                 relforknumber::int4, relblocknumber FROM pg_get_wal_block_info('{start}', '{end}') \
                 ORDER BY start_lsn, block_id"
            ),
            &[],
        )
        .unwrap();
    let mut records: BTreeMap<u64, Blocks> = BTreeMap::new();
    for r in rows {
        let at: String = r.get(0);
        let rel = format!(
            "{}/{}/{}",
            r.get::<_, i64>(1),
            r.get::<_, i64>(2),
            r.get::<_, i64>(3)
        );
        let fork = match r.get::<_, i32>(4) {
            0 => "main",
            1 => "fsm",
            2 => "vm",
            3 => "init",
            other => panic!("fork number {other} at {at}"),
        };
        let block = u32::try_from(r.get::<_, i64>(5)).unwrap();
        records
            .entry(lsn(&at))
            .or_default()
            .push((rel, fork, block));
    }
    records
}

#[test]
fn decoder_sees_every_record_and_block_pg_waldump_sees() {
    let waldump = pg_client("pg_waldump");
    let by_waldump = major_of(&waldump) == server_major();
    if !by_waldump && server_major() < 16 {
        eprintln!(
            "skipped: {} cannot read PostgreSQL {} WAL, nor has it pg_get_wal_block_info()",
            waldump.display(),
            server_major()
        );
        return;
    }
    // Compressed full-page images (with and without holes) on top of the plain kinds.
    let cluster = Cluster::with(ClusterOptions {
        conf: vec!["wal_compression = on".into()],
        ..ClusterOptions::default()
    });
    cluster.pg_tool_ok("pgbench", &["-i", "-s", "2", "-q"]);
    let ts = cluster.dir.subdir("ts");
    crate::harness::chown_to_postgres(&ts);
    let start = cluster.query_text("SELECT pg_current_wal_insert_lsn()::text");
    cluster.execute(&format!(
        "CHECKPOINT;
         CREATE INDEX ON pgbench_accounts USING hash (aid);
         CREATE TABLE pts AS SELECT point(g, g % 97) AS p, g AS id FROM generate_series(1, 20000) g;
         CREATE INDEX ON pts USING gist (p);
         CREATE TABLESPACE ts LOCATION '{}';
         ALTER TABLE pts SET TABLESPACE ts;
         CREATE DATABASE other;
         TRUNCATE pgbench_history;",
        ts.display()
    ));
    cluster.pg_tool_ok("pgbench", &["-t", "300", "-c", "2", "-n"]);
    cluster.execute("VACUUM FULL pgbench_tellers; VACUUM pgbench_accounts");
    let last = cluster.switch_wal_and_wait();
    let end = cluster.query_text("SELECT pg_current_wal_flush_lsn()::text");

    // The segments from the start to the switched one, as PostgreSQL left them in pg_wal.
    let seg_size = 16u64 << 20;
    let first = format!(
        "{:08X}{:08X}{:08X}",
        1,
        lsn(&start) >> 32,
        (lsn(&start) & 0xFFFF_FFFF) / seg_size
    );
    let copy = cluster.dir.subdir("walcopy");
    let mut names: Vec<String> = fs::read_dir(cluster.data.join("pg_wal"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.len() == 24 && *n >= first && *n <= last)
        .collect();
    names.sort();
    assert!(names.len() >= 2, "WAL from {first} to {last}: {names:?}");
    for n in &names {
        fs::copy(cluster.data.join("pg_wal").join(n), copy.join(n)).unwrap();
        crate::harness::chown_to_postgres(&copy.join(n));
    }
    crate::harness::chown_to_postgres(&copy);

    let theirs = if by_waldump {
        // pg_waldump stops with an error where the copied WAL ends, after printing every record.
        let run = cluster.pg_tool(
            "pg_waldump",
            &["-b", "-p", copy.to_str().unwrap(), "-s", &start],
        );
        parse_waldump(&run.stdout)
    } else {
        walinspect(&cluster, &start, &end)
    };
    assert!(
        theirs.len() > 1000,
        "the server's reader returned only {} records",
        theirs.len()
    );

    let mut stream = WalStream::new(8192);
    let mut ours: BTreeMap<u64, Blocks> = BTreeMap::new();
    let mut images = 0;
    for n in &names {
        let bytes = fs::read(copy.join(n)).unwrap();
        stream
            .push_segment(&bytes, &mut |r| {
                // pg_get_wal_block_info() lists records with block references only.
                let listed = by_waldump || (!r.blocks.is_empty() && r.lsn < Lsn(lsn(&end)));
                if r.lsn >= Lsn(lsn(&start)) && listed {
                    images += r.blocks.iter().filter(|b| b.image.is_some()).count();
                    let blocks = r
                        .blocks
                        .iter()
                        .map(|b| {
                            let rel =
                                format!("{}/{}/{}", b.rel.spc_oid, b.rel.db_oid, b.rel.rel_number);
                            (rel, fork_name(b.fork), b.block)
                        })
                        .collect();
                    ours.insert(r.lsn.0, blocks);
                }
                ControlFlow::Continue(())
            })
            .unwrap_or_else(|e| panic!("decoding {n}: {e}"));
    }
    assert!(images > 100, "only {images} full-page images");
    let missing: Vec<_> = theirs
        .keys()
        .filter(|k| !ours.contains_key(k))
        .take(5)
        .collect();
    let extra: Vec<_> = ours
        .keys()
        .filter(|k| !theirs.contains_key(k))
        .take(5)
        .collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "records only the server's reader saw {missing:X?}, only we saw {extra:X?}"
    );
    for (at, blocks) in &theirs {
        assert_eq!(
            &ours[at], blocks,
            "block references of the record at {at:X}"
        );
    }
    eprintln!(
        "{} records, {images} full-page images agree with {}",
        ours.len(),
        match by_waldump {
            true => "pg_waldump",
            false => "pg_get_wal_block_info()",
        }
    );
}
