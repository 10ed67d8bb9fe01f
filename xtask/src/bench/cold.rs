//! `cargo xtask bench --cold [--small-mb M] [--runs N] [--transactions T] [--scan] [--keep]`:
//! what an incremental costs on a mostly cold cluster, pgkeep beside pgBackRest, at two sizes.
//!
//! Each size is its own throwaway cluster: a big table nobody touches after its load (written
//! frozen by `COPY ... FREEZE`, so no later read sets a hint bit) and a small pgbench set, the
//! same at both sizes; the bigger cluster is four times the smaller one. After a full backup
//! with each tool, every run is the same OLTP burst (a fixed number of pgbench transactions,
//! not a fixed time, so both sizes see the same change), a checkpoint (so neither tool's start
//! checkpoint writes the burst's pages for the other), then an incremental with each tool, the
//! page cache dropped before each one and the tool that goes first alternating run by run.
//! The table shows medians: wall time, bytes read from the block devices (the kernel's
//! `read_bytes`, summed over the tool's processes) and bytes stored, then the two ratios the
//! targets are about: pgkeep's big/small and pgkeep/pgBackRest at the big size. A missed
//! target fails the bench once the table is written. `--scan` gives pgkeep's incrementals
//! `--scan` (every page read, no changed-block map): the cost the map saves, and proof that
//! the bench tells a cost that grows with the cluster.

use std::fmt::Write as _;
use std::fs;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use serde_json::json;

use super::report::{self, format_bytes, Machine};
use super::{step, Bench, Options, PORT, STANZA};
use crate::sh::{cargo_build_release, run_checked, wait_archive_drained};

const USAGE: &str = "usage: cargo xtask bench --cold [--small-mb M] [--runs N] [--transactions T] [--scan] [--keep]";
/// The hot set: pgbench scale 5, about 80 MB, the same in both clusters.
const HOT_SCALE: u32 = 5;
/// Bytes of cold table per row: 9 rows of an 800-character filler per 8 KiB page.
const COLD_ROW_BYTES: u64 = 8192 / 9;
/// The bigger cluster is this many times the smaller one.
const FACTOR: u64 = 4;
/// Targets from issue #18: pgkeep's incr at 4x the size costs at most 1.5x the small one's
/// wall time, and at most half of pgBackRest's at the big size.
const TARGET_GROWTH: f64 = 1.5;
const TARGET_VS_PGBR: f64 = 0.5;

pub fn cold(args: &[String]) -> Result<()> {
    let opts = ColdOptions::parse(args)?;
    let started = Instant::now();
    let machine = Machine::read();
    let load_before = report::load_average();
    println!("machine: {}", machine.describe());
    drop_caches().context("the cold bench drops the page cache before each incremental")?;

    let pgkeep = cargo_build_release()?;
    let pgbackrest = super::ensure_installed("pgbackrest", "pgbackrest")?;
    let lz4 = super::ensure_installed("lz4", "lz4")?;
    let versions = super::versions(&pgkeep, &pgbackrest, &lz4)?;
    for (what, v) in &versions {
        println!("{what}: {v}");
    }

    let mut sizes = Vec::new();
    for (name, total_mb) in [("small", opts.small_mb), ("big", opts.small_mb * FACTOR)] {
        let bench_opts = Options {
            scale: HOT_SCALE,
            runs: opts.runs,
            keep: opts.keep,
        };
        let b = Bench::create(&pgkeep, &pgbackrest, &bench_opts)?;
        let result = run_size(&b, &opts, name, total_mb);
        b.stop_server(&b.data);
        match &result {
            Ok(_) if !opts.keep => {
                let _ = fs::remove_dir_all(&b.dir);
            }
            _ => {
                // Each size gets the bench's directory in turn: keep it under its own name.
                let kept = b.dir.with_file_name(format!(
                    "{}-{name}",
                    b.dir
                        .file_name()
                        .and_then(|n| n.to_str())
                        .unwrap_or("bench")
                ));
                fs::rename(&b.dir, &kept)
                    .with_context(|| format!("renaming {}", b.dir.display()))?;
                eprintln!(
                    "bench files kept in {} (paths inside name {})",
                    kept.display(),
                    b.dir.display()
                );
            }
        }
        sizes.push(result?);
    }

    let load_after = report::load_average();
    let heading = format!(
        "Cold incremental{}: {} runs per size, {} pgbench transactions (scale {HOT_SCALE}) per run, \
         page cache dropped before each incr; load average {load_before} before, {load_after} \
         after; {:.0} s in all.\n\nMachine: {}.\n\n{}",
        if opts.scan { " (pgkeep with --scan)" } else { "" },
        opts.runs,
        opts.transactions,
        started.elapsed().as_secs_f64(),
        machine.describe(),
        versions
            .iter()
            .map(|(w, v)| format!("{w}: {v}"))
            .collect::<Vec<_>>()
            .join("; "),
    );
    let md = markdown(&heading, &sizes);
    println!("\n{md}");
    let out_dir = crate::sh::target_dir().join("bench");
    fs::create_dir_all(&out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    let stem = if opts.scan {
        "bench-cold-scan"
    } else {
        "bench-cold"
    };
    let md_path = out_dir.join(format!("{stem}.md"));
    let json_path = out_dir.join(format!("{stem}.json"));
    fs::write(&md_path, &md).with_context(|| format!("writing {}", md_path.display()))?;
    let doc = json!({
        "runs": opts.runs,
        "transactions": opts.transactions,
        "pgkeep_scan": opts.scan,
        "hot_scale": HOT_SCALE,
        "load_before": load_before,
        "load_after": load_after,
        "machine": machine.describe(),
        "sizes": sizes.iter().map(Size::json).collect::<Vec<_>>(),
    });
    fs::write(&json_path, serde_json::to_string_pretty(&doc)? + "\n")
        .with_context(|| format!("writing {}", json_path.display()))?;
    println!("written: {} and {}", md_path.display(), json_path.display());
    let missed = missed_targets(&sizes);
    if !missed.is_empty() {
        bail!("the cold bench missed its targets: {}", missed.join("; "));
    }
    Ok(())
}

/// The targets the medians miss, each as a phrase; empty when both are met.
fn missed_targets(sizes: &[Size]) -> Vec<String> {
    let [small, big] = sizes else {
        return Vec::new();
    };
    let (growth, vs) = ratios(small, big);
    let mut missed = Vec::new();
    if growth.is_nan() || growth > TARGET_GROWTH {
        missed.push(format!(
            "pgkeep's incr at {FACTOR}x the size took {growth:.2}x the time (target <= {TARGET_GROWTH}x)"
        ));
    }
    if vs.is_nan() || vs > TARGET_VS_PGBR {
        missed.push(format!(
            "pgkeep's incr at the big size took {vs:.2}x pgBackRest's (target <= {TARGET_VS_PGBR}x)"
        ));
    }
    missed
}

/// pgkeep's incr wall time big/small, and pgkeep/pgBackRest at the big size (medians).
fn ratios(small: &Size, big: &Size) -> (f64, f64) {
    (
        median(&big.pgkeep.wall) / median(&small.pgkeep.wall),
        median(&big.pgkeep.wall) / median(&big.pgbr.wall),
    )
}

struct ColdOptions {
    small_mb: u64,
    runs: usize,
    transactions: u32,
    /// pgkeep's incrementals read every page (`backup --scan`).
    scan: bool,
    keep: bool,
}

impl ColdOptions {
    fn parse(args: &[String]) -> Result<ColdOptions> {
        let mut o = ColdOptions {
            small_mb: 800,
            runs: 3,
            transactions: 4000,
            scan: false,
            keep: false,
        };
        let mut it = args.iter();
        while let Some(a) = it.next() {
            let (flag, inline) = match a.split_once('=') {
                Some((f, v)) => (f, Some(v.to_string())),
                None => (a.as_str(), None),
            };
            let mut number = |name: &str, min: u64| -> Result<u64> {
                inline
                    .clone()
                    .or_else(|| it.next().cloned())
                    .and_then(|v| v.parse().ok())
                    .filter(|&n| n >= min)
                    .with_context(|| format!("{name} takes a whole number >= {min}\n{USAGE}"))
            };
            match flag {
                "--cold" => {}
                // Below about 200 MB the cold table would be smaller than the hot set.
                "--small-mb" => o.small_mb = number("--small-mb", 200)?,
                "--runs" => o.runs = number("--runs", 1)? as usize,
                "--transactions" => {
                    o.transactions = u32::try_from(number("--transactions", 2)?)
                        .with_context(|| format!("--transactions is too large\n{USAGE}"))?
                }
                "--scan" => o.scan = true,
                "--keep" => o.keep = true,
                _ => bail!("unknown argument {a:?}\n{USAGE}"),
            }
        }
        Ok(o)
    }
}

/// The samples of one tool's incrementals at one size.
#[derive(Default)]
struct Samples {
    wall: Vec<f64>,
    read: Vec<f64>,
    stored: Vec<f64>,
}

impl Samples {
    fn add(&mut self, wall: f64, read: u64, stored: u64) {
        self.wall.push(wall);
        self.read.push(read as f64);
        self.stored.push(stored as f64);
    }
}

/// One row of the table.
#[derive(Clone, Copy)]
enum Figure {
    Wall,
    Read,
    Stored,
}

impl Figure {
    /// The median of this figure's samples, as the table shows it.
    fn show(self, s: &Samples) -> String {
        match self {
            Figure::Wall => format!("{:.2} s", median(&s.wall)),
            Figure::Read => format_bytes(median(&s.read)),
            Figure::Stored => format_bytes(median(&s.stored)),
        }
    }
}

/// One cluster size's results.
struct Size {
    name: &'static str,
    cluster_bytes: u64,
    pgkeep: Samples,
    pgbr: Samples,
    /// What pgkeep's last incremental said about its changed-block map.
    pgkeep_source: String,
}

impl Size {
    fn json(&self) -> serde_json::Value {
        let tool = |s: &Samples| {
            json!({
                "incr_wall_seconds": s.wall,
                "incr_read_bytes": s.read,
                "incr_stored_bytes": s.stored,
                "median_wall_seconds": median(&s.wall),
                "median_read_bytes": median(&s.read),
                "median_stored_bytes": median(&s.stored),
            })
        };
        json!({
            "name": self.name,
            "cluster_bytes": self.cluster_bytes,
            "pgkeep": tool(&self.pgkeep),
            "pgbackrest": tool(&self.pgbr),
            "pgkeep_blocks": self.pgkeep_source,
        })
    }
}

fn run_size(b: &Bench, opts: &ColdOptions, name: &'static str, total_mb: u64) -> Result<Size> {
    step(&format!("{name} cluster: about {total_mb} MB"));
    b.init_cluster()?;
    load(b, total_mb)?;
    b.check_both()?;
    let cluster_bytes = b.cluster_bytes()?;
    println!(
        "    cluster: {} in its databases",
        format_bytes(cluster_bytes as f64)
    );

    step("full backups");
    b.checked(
        "pgkeep full backup",
        &mut b.pgkeep_cmd(&b.pgkeep_conf, &["backup", "--type", "full"]),
    )?;
    b.pgkeep_newest("full")?;
    b.checked(
        "pgBackRest full backup",
        &mut b.pgbr_cmd(&b.pgbr_conf, STANZA, &["backup", "--type=full"]),
    )?;
    b.pgbr_newest("full")?;

    let mut size = Size {
        name,
        cluster_bytes,
        pgkeep: Samples::default(),
        pgbr: Samples::default(),
        pgkeep_source: String::new(),
    };
    for run in 0..opts.runs {
        step(&format!(
            "{name}, run {}/{}: {} pgbench transactions, then both incrementals from a cold cache",
            run + 1,
            opts.runs,
            opts.transactions
        ));
        b.checked(
            "pgbench burst",
            b.pg("pgbench")
                .args(["-n", "-c", "2", "-t", &(opts.transactions / 2).to_string()])
                .args(b.conn_args(PORT))
                .arg("postgres"),
        )?;
        b.sql("CHECKPOINT")?;
        let pgkeep_first = run % 2 == 0;
        for pgkeep_turn in [pgkeep_first, !pgkeep_first] {
            run_checked(&mut std::process::Command::new("sync"))?;
            super::settle_disks();
            drop_caches()?;
            if pgkeep_turn {
                let mut args = vec!["backup", "--type", "incr"];
                if opts.scan {
                    args.push("--scan");
                }
                let m = b.checked("pgkeep incr", &mut b.pgkeep_cmd(&b.pgkeep_conf, &args))?;
                let incr = b.pgkeep_newest("incr")?;
                println!(
                    "    pgkeep: read {}, stored {}",
                    format_bytes(m.read_bytes as f64),
                    format_bytes(incr.stored_bytes as f64)
                );
                if let Some(line) = m.stdout.lines().find(|l| l.starts_with("changed pages")) {
                    println!("    {line}");
                    size.pgkeep_source = line.to_string();
                }
                size.pgkeep
                    .add(m.wall.as_secs_f64(), m.read_bytes, incr.stored_bytes);
            } else {
                let m = b.checked(
                    "pgBackRest incr",
                    &mut b.pgbr_cmd(&b.pgbr_conf, STANZA, &["backup", "--type=incr"]),
                )?;
                let incr = b.pgbr_newest("incr")?;
                println!(
                    "    pgBackRest: read {}, stored {}",
                    format_bytes(m.read_bytes as f64),
                    format_bytes(incr.repo_delta as f64)
                );
                size.pgbr
                    .add(m.wall.as_secs_f64(), m.read_bytes, incr.repo_delta);
            }
        }
    }
    Ok(size)
}

/// The hot pgbench set and a cold table making the cluster about `total_mb`, all frozen,
/// checkpointed and archived.
fn load(b: &Bench, total_mb: u64) -> Result<()> {
    let loaded = Instant::now();
    b.checked(
        "pgbench -i",
        b.pg("pgbench")
            .args(["-i", "-q", "-s", &HOT_SCALE.to_string()])
            .args(b.conn_args(PORT))
            .arg("postgres"),
    )?;
    let hot: u64 = b
        .sql("SELECT sum(pg_database_size(oid)) FROM pg_database")?
        .parse()
        .context("reading the cluster's size")?;
    let cold_bytes = (total_mb * 1_000_000).saturating_sub(hot);
    let rows = cold_bytes / COLD_ROW_BYTES;
    println!(
        "    cold table: {rows} rows of 800 bytes, about {}",
        format_bytes(cold_bytes as f64)
    );
    // COPY FREEZE in the transaction that creates the table writes the rows frozen and the
    // pages all-visible: no later read dirties them with hint bits.
    let program = format!(
        "awk -v n={rows} 'BEGIN {{ f = sprintf(\"%800s\", \"\"); gsub(/ /, \"c\", f); for (i = 1; i <= n; i++) print i \"\\t\" f }}'"
    );
    b.sql(&format!(
        "BEGIN; CREATE TABLE cold (id int, filler text); \
         COPY cold FROM PROGRAM '{}' WITH (FREEZE); COMMIT",
        program.replace('\'', "''")
    ))?;
    b.sql("VACUUM (FREEZE, ANALYZE) pgbench_accounts, pgbench_branches, pgbench_tellers, pgbench_history")?;
    b.sql("CHECKPOINT")?;
    b.sql("SELECT pg_switch_wal()")?;
    wait_archive_drained(
        &b.data,
        std::time::Duration::from_secs(600),
        &b.dir.join("server.log"),
    )?;
    println!("    loaded in {:.0} s", loaded.elapsed().as_secs_f64());
    Ok(())
}

/// Writes dirty pages out and drops the page cache, so the next step reads from the disk.
fn drop_caches() -> Result<()> {
    run_checked(&mut std::process::Command::new("sync"))?;
    fs::write("/proc/sys/vm/drop_caches", "3\n")
        .context("writing /proc/sys/vm/drop_caches: run the cold bench as root")
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    match s.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => s[n / 2],
        n => (s[n / 2 - 1] + s[n / 2]) / 2.0,
    }
}

fn markdown(heading: &str, sizes: &[Size]) -> String {
    let mut md = String::new();
    let _ = writeln!(md, "{heading}\n");
    let _ = writeln!(
        md,
        "| incr from a cold page cache | cluster | pgkeep | pgBackRest |"
    );
    let _ = writeln!(md, "|---|---|---|---|");
    for s in sizes {
        let c = format_bytes(s.cluster_bytes as f64);
        let rows = [
            ("wall time", Figure::Wall),
            ("read from disk", Figure::Read),
            ("stored", Figure::Stored),
        ];
        for (what, figure) in rows {
            let show = |x: &Samples| figure.show(x);
            let _ = writeln!(
                md,
                "| {} {what} | {c} | {} | {} |",
                s.name,
                show(&s.pgkeep),
                show(&s.pgbr)
            );
        }
    }
    if let [small, big] = sizes {
        let (growth, vs) = ratios(small, big);
        let pgbr_growth = median(&big.pgbr.wall) / median(&small.pgbr.wall);
        let verdict = |ok: bool| if ok { "met" } else { "MISSED" };
        let _ = writeln!(
            md,
            "| wall big / small | {FACTOR}x | {growth:.2}x (target <= {TARGET_GROWTH}x: {}) | {pgbr_growth:.2}x |",
            verdict(growth <= TARGET_GROWTH)
        );
        let _ = writeln!(
            md,
            "| wall pgkeep / pgBackRest, big | | {vs:.2}x (target <= {TARGET_VS_PGBR}x: {}) | |",
            verdict(vs <= TARGET_VS_PGBR)
        );
    }
    for s in sizes {
        if !s.pgkeep_source.is_empty() {
            let _ = writeln!(md, "\npgkeep, {}: {}", s.name, s.pgkeep_source);
        }
    }
    md
}
