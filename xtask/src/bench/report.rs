//! The bench's figures: samples per metric and tool, their medians, and the markdown table and
//! JSON document made from them. Every number here was measured by the run that prints it.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde_json::{json, Value};

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
pub enum Tool {
    Pgkeep,
    PgBackRest,
    PgBasebackup,
    TarLz4,
}

impl Tool {
    const ALL: [Tool; 4] = [
        Tool::Pgkeep,
        Tool::PgBackRest,
        Tool::PgBasebackup,
        Tool::TarLz4,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Tool::Pgkeep => "pgkeep",
            Tool::PgBackRest => "pgBackRest",
            Tool::PgBasebackup => "pg_basebackup",
            Tool::TarLz4 => "tar | lz4",
        }
    }

    fn key(self) -> &'static str {
        match self {
            Tool::Pgkeep => "pgkeep",
            Tool::PgBackRest => "pgbackrest",
            Tool::PgBasebackup => "pg_basebackup",
            Tool::TarLz4 => "tar_lz4",
        }
    }

    fn column(self) -> &'static str {
        match self {
            Tool::PgBasebackup => "pg_basebackup -Ft client-lz4",
            Tool::TarLz4 => "tar \\| lz4 -1 (floor)",
            _ => self.name(),
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
pub enum Metric {
    FullWall,
    FullStored,
    FullRss,
    IncrWall,
    IncrStored,
    IncrRss,
    RestoreWall,
    RestoreRss,
    PushWall,
    PushRss,
    ValidateRate,
    ValidateRss,
}

#[derive(Clone, Copy)]
enum Unit {
    Seconds,
    Bytes,
    BytesPerSecond,
}

impl Metric {
    const ALL: [Metric; 12] = [
        Metric::FullWall,
        Metric::FullStored,
        Metric::FullRss,
        Metric::IncrWall,
        Metric::IncrStored,
        Metric::IncrRss,
        Metric::RestoreWall,
        Metric::RestoreRss,
        Metric::PushWall,
        Metric::PushRss,
        Metric::ValidateRate,
        Metric::ValidateRss,
    ];

    fn label(self) -> &'static str {
        match self {
            Metric::FullWall => "full backup: wall time",
            Metric::FullStored => "full backup: stored bytes",
            Metric::FullRss => "full backup: peak RSS",
            Metric::IncrWall => "incremental after scattered updates: wall time",
            Metric::IncrStored => "incremental: stored bytes",
            Metric::IncrRss => "incremental: peak RSS",
            Metric::RestoreWall => "restore of full + incremental: wall time",
            Metric::RestoreRss => "restore: peak RSS",
            Metric::PushWall => "archive-push: wall time per 16 MiB segment",
            Metric::PushRss => "archive-push: peak RSS",
            Metric::ValidateRate => "validate / verify: throughput (higher is better)",
            Metric::ValidateRss => "validate / verify: peak RSS",
        }
    }

    fn key(self) -> &'static str {
        match self {
            Metric::FullWall => "full_wall_seconds",
            Metric::FullStored => "full_stored_bytes",
            Metric::FullRss => "full_peak_rss_bytes",
            Metric::IncrWall => "incr_wall_seconds",
            Metric::IncrStored => "incr_stored_bytes",
            Metric::IncrRss => "incr_peak_rss_bytes",
            Metric::RestoreWall => "restore_wall_seconds",
            Metric::RestoreRss => "restore_peak_rss_bytes",
            Metric::PushWall => "archive_push_seconds_per_segment",
            Metric::PushRss => "archive_push_peak_rss_bytes",
            Metric::ValidateRate => "validate_bytes_per_second",
            Metric::ValidateRss => "validate_peak_rss_bytes",
        }
    }

    fn unit(self) -> Unit {
        match self {
            Metric::FullWall | Metric::IncrWall | Metric::RestoreWall | Metric::PushWall => {
                Unit::Seconds
            }
            Metric::ValidateRate => Unit::BytesPerSecond,
            _ => Unit::Bytes,
        }
    }
}

/// Samples (one per run) for each metric and tool, plus the cells that could not be measured
/// because the command does not exist yet in this build of pgkeep.
#[derive(Default)]
pub struct Results {
    samples: BTreeMap<(Metric, Tool), Vec<f64>>,
    missing: BTreeMap<(Metric, Tool), String>,
    notes: BTreeMap<(Metric, Tool), String>,
}

impl Results {
    pub fn add(&mut self, metric: Metric, tool: Tool, value: f64) {
        self.samples.entry((metric, tool)).or_default().push(value);
    }

    /// `why` is the one-line stderr of the failed command.
    pub fn not_available(&mut self, metric: Metric, tool: Tool, why: &str) {
        self.missing
            .insert((metric, tool), format!("n/a (command failed: {why})"));
    }

    /// A short qualifier printed after the figure, e.g. what was actually measured.
    pub fn note(&mut self, metric: Metric, tool: Tool, note: &str) {
        self.notes.insert((metric, tool), note.to_string());
    }

    fn median(&self, metric: Metric, tool: Tool) -> Option<f64> {
        let mut v = self.samples.get(&(metric, tool))?.clone();
        if v.is_empty() {
            return None;
        }
        v.sort_by(f64::total_cmp);
        let mid = v.len() / 2;
        Some(if v.len() % 2 == 1 {
            v[mid]
        } else {
            (v[mid - 1] + v[mid]) / 2.0
        })
    }

    fn cell(&self, metric: Metric, tool: Tool) -> String {
        if let Some(why) = self.missing.get(&(metric, tool)) {
            return why.replace('|', "\\|");
        }
        let Some(m) = self.median(metric, tool) else {
            return "–".to_string();
        };
        match self.notes.get(&(metric, tool)) {
            Some(n) => format!("{} ({n})", format_value(metric.unit(), m)),
            None => format_value(metric.unit(), m),
        }
    }

    fn ratio(&self, metric: Metric) -> String {
        match (
            self.median(metric, Tool::Pgkeep),
            self.median(metric, Tool::PgBackRest),
        ) {
            (Some(a), Some(b))
                if b > 0.0
                    && !self.missing.contains_key(&(metric, Tool::Pgkeep))
                    && !self.missing.contains_key(&(metric, Tool::PgBackRest)) =>
            {
                format!("{:.2}", a / b)
            }
            _ => "–".to_string(),
        }
    }
}

/// What the table's heading says about the run.
pub struct Header {
    pub scale: u32,
    pub runs: usize,
    pub random_rows: u64,
    pub cluster_bytes: u64,
    pub push_segments: usize,
    pub machine: Machine,
    /// (what, version string) as each tool printed it.
    pub versions: Vec<(String, String)>,
    pub load_before: String,
    pub load_after: String,
    pub elapsed_seconds: f64,
}

pub fn markdown(h: &Header, r: &Results) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "## pgkeep bench: pgbench scale {} + {} md5 rows ({} in the cluster), median of {} run{}\n",
        h.scale,
        h.random_rows,
        format_bytes(h.cluster_bytes as f64),
        h.runs,
        if h.runs == 1 { "" } else { "s" }
    );
    let _ = writeln!(s, "- machine: {}", h.machine.describe());
    let _ = writeln!(
        s,
        "- load average (1/5/15 min): {} at start, {} at end; the bench took {:.0} s",
        h.load_before, h.load_after, h.elapsed_seconds
    );
    for (what, version) in &h.versions {
        let _ = writeln!(s, "- {what}: {version}");
    }
    let _ = writeln!(
        s,
        "- pgBackRest settings: compress-type=lz4, process-max=2, repo1-bundle=y, repo1-block=y (beta=y), start-fast=y; pgkeep: defaults (jobs = one per core)\n"
    );
    let _ = write!(s, "| step |");
    for t in &Tool::ALL[..2] {
        let _ = write!(s, " {} |", t.column());
    }
    let _ = write!(s, " pgkeep/pgBackRest |");
    for t in &Tool::ALL[2..] {
        let _ = write!(s, " {} |", t.column());
    }
    let _ = writeln!(s, "\n|---|---:|---:|---:|---:|---:|");
    for m in Metric::ALL {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} |",
            m.label(),
            r.cell(m, Tool::Pgkeep),
            r.cell(m, Tool::PgBackRest),
            r.ratio(m),
            r.cell(m, Tool::PgBasebackup),
            r.cell(m, Tool::TarLz4),
        );
    }
    let _ = writeln!(
        s,
        "\nStored bytes: pgkeep `show --json` stored_bytes; pgBackRest `info --output=json` repository delta of that set; \
         pg_basebackup and tar: the files written, less the WAL pg_basebackup streamed (PostgreSQL 15 writes it as a plain pg_wal.tar; the two tools keep WAL in their archives). \
         archive-push: the same {} segment(s) copied from pg_wal, pushed alternately (who goes first alternates too) into a fresh repository (pgkeep) and stanza (pgBackRest); \
         mean per segment. validate: pgkeep `validate` of the full backup, its data_bytes / s; pgBackRest `verify` checks its whole \
         repository (the full set and the archived WAL), counted as the uncompressed bytes it covers / s. \
         Every timed step starts with what it reads in the page cache (the cluster before a backup, the repository before a restore, validate or verify, \
         the segment before a push, as archive_command finds it), so neither tool finds files the other just read. \
         Peak RSS: the largest single process (ru_maxrss via wait4), so pgBackRest's worker processes count one at a time \
         and pg_basebackup's is the client's, not the server's walsender.",
        h.push_segments
    );
    s
}

pub fn json(h: &Header, r: &Results) -> Value {
    let metrics: Vec<Value> = Metric::ALL
        .iter()
        .map(|&m| {
            let tools: serde_json::Map<String, Value> = Tool::ALL
                .iter()
                .filter_map(|&t| {
                    let v = if let Some(why) = r.missing.get(&(m, t)) {
                        json!({ "not_available": why })
                    } else {
                        let samples = r.samples.get(&(m, t))?;
                        json!({
                            "median": r.median(m, t),
                            "samples": samples,
                            "note": r.notes.get(&(m, t)),
                        })
                    };
                    Some((t.key().to_string(), v))
                })
                .collect();
            json!({ "key": m.key(), "label": m.label(), "tools": tools })
        })
        .collect();
    json!({
        "scale": h.scale,
        "runs": h.runs,
        "random_rows": h.random_rows,
        "cluster_bytes": h.cluster_bytes,
        "archive_push_segments": h.push_segments,
        "machine": {
            "cpus": h.machine.cpus,
            "model": h.machine.model,
            "memory_bytes": h.machine.memory_bytes,
            "kernel": h.machine.kernel,
        },
        "load_average_start": h.load_before,
        "load_average_end": h.load_after,
        "elapsed_seconds": h.elapsed_seconds,
        "versions": h.versions.iter().cloned().collect::<BTreeMap<_, _>>(),
        "metrics": metrics,
    })
}

/// The machine the figures were measured on.
pub struct Machine {
    pub cpus: usize,
    pub model: String,
    pub memory_bytes: u64,
    pub kernel: String,
}

impl Machine {
    pub fn read() -> Machine {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        Machine {
            cpus: std::thread::available_parallelism().map_or(0, |n| n.get()),
            model: field(&cpuinfo, "model name").unwrap_or_else(|| "unknown CPU".into()),
            // "MemTotal:       24683872 kB"
            memory_bytes: field(&meminfo, "MemTotal")
                .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
                .map_or(0, |kib| kib * 1024),
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .map(|s| s.trim().to_string())
                .unwrap_or_else(|_| "unknown".into()),
        }
    }

    pub fn describe(&self) -> String {
        format!(
            "{} CPUs (nproc), {}, {} RAM, Linux {}",
            self.cpus,
            self.model,
            format_bytes(self.memory_bytes as f64),
            self.kernel
        )
    }
}

/// `/proc/loadavg`'s first three fields: the machine is shared, so the table says how busy it was.
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}

fn field(text: &str, name: &str) -> Option<String> {
    text.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        (k.trim() == name).then(|| v.trim().to_string())
    })
}

fn format_value(unit: Unit, v: f64) -> String {
    match unit {
        Unit::Seconds if v < 1.0 => format!("{:.0} ms", v * 1000.0),
        Unit::Seconds => format!("{v:.2} s"),
        Unit::Bytes => format_bytes(v),
        Unit::BytesPerSecond => format!("{}/s", format_bytes(v)),
    }
}

pub fn format_bytes(v: f64) -> String {
    const KIB: f64 = 1024.0;
    if v >= KIB * KIB * KIB {
        format!("{:.2} GiB", v / (KIB * KIB * KIB))
    } else if v >= KIB * KIB {
        format!("{:.1} MiB", v / (KIB * KIB))
    } else if v >= KIB {
        format!("{:.0} KiB", v / KIB)
    } else {
        format!("{v:.0} B")
    }
}
