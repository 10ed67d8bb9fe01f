//! Human-readable output: the `show` table and the reports of backup, restore, validate, drill
//! and catalog rebuild.

use chrono::{DateTime, Utc};
use pgkeep_core::backup::{BackupSummary, BlockSource};
use pgkeep_core::drill::{CheckResult, DrillRecord, DrillReport};
use pgkeep_core::rebuild::RebuildReport;
use pgkeep_core::restore::{RecoveryTarget, RestoreOptions, RestoreSummary};
use pgkeep_core::retention::{pin_text, RetentionReport, Why};
use pgkeep_core::show::{Listing, Shown, Span, Window};
use pgkeep_core::validate::{Cut, ValidateReport};

/// A pg_rman-like table of backups, oldest first, then the span they restore to.
pub fn print_backups(listing: &Listing) {
    let backups = &listing.backups;
    println!(
        "{:<18} {:<4} {:<8} {:<7} {:<20} {:>10} {:>10} {:>3} {:<19} {:<19} {:<18} RESTORABLE UNTIL",
        "LABEL",
        "TYPE",
        "STATUS",
        "FROM",
        "START",
        "DATA",
        "STORED",
        "TLI",
        "START LSN",
        "STOP LSN",
        "PARENT"
    );
    for Shown {
        record: b,
        windows,
        restorable_until_time,
        last_drill,
    } in backups
    {
        let until = if !windows.is_empty() {
            windows_text(windows, b.timeline)
        } else if b.status.is_restorable() {
            "WAL missing".to_string()
        } else {
            String::new()
        };
        println!(
            "{:<18} {:<4} {:<8} {:<7} {:<20} {:>10} {:>10} {:>3} {:<19} {:<19} {:<18} {}",
            b.label,
            b.backup_type.as_str(),
            b.status.as_str(),
            if b.from_standby { "standby" } else { "primary" },
            b.start_time.format("%Y-%m-%d %H:%M:%S"),
            human_bytes(b.data_bytes),
            human_bytes(b.stored_bytes),
            b.timeline,
            b.start_lsn.to_string(),
            b.stop_lsn.map(|l| l.to_string()).unwrap_or_default(),
            b.parent.as_deref().unwrap_or("-"),
            until,
        );
        if b.pinned_at(chrono::Utc::now()) {
            println!("  pinned{}", pin_text(b.pinned));
        }
        if let (Some(from), Some(until)) = (b.recovery_time, restorable_until_time) {
            println!(
                "  restorable from {} to about {}",
                time_text(from),
                time_text(*until)
            );
        }
        if let Some(d) = last_drill {
            println!("  last drill {}", drill_text(d));
        }
    }
    println!("{}", span_text(listing.span.as_ref()));
}

/// A time for people: to the second, in UTC.
fn time_text(t: DateTime<Utc>) -> String {
    t.format("%Y-%m-%d %H:%M:%S UTC").to_string()
}

/// `2026-11-21 10:15:00 UTC: passed, RTO 4.2 s (restore 1.1 s, recovery 3.1 s), RPO 12.0 s`;
/// a failed drill says what it measured before what failed.
fn drill_text(d: &DrillRecord) -> String {
    let mut parts = vec![format!("{}: {}", time_text(d.started_at), d.status_str())];
    if let Some(rto) = d.rto_seconds() {
        parts.push(format!(
            "RTO {rto:.1} s (restore {:.1} s, recovery {:.1} s)",
            d.restore_seconds.unwrap_or_default(),
            d.recovery_seconds.unwrap_or_default()
        ));
    } else if let Some(restore) = d.restore_seconds {
        parts.push(format!("restore {restore:.1} s"));
    }
    if let Some(rpo) = d.rpo_seconds {
        parts.push(format!("RPO {rpo:.1} s"));
    }
    let mut text = parts.join(", ");
    if let Some(m) = &d.message {
        text.push_str(&format!(": {m}"));
    }
    text
}

/// The drill's figures, then one line per check.
pub fn print_drill_report(r: &DrillReport) {
    let d = &r.record;
    println!("{}", r.choice);
    println!("drill of backup {}: {}", d.backup_label, drill_text(d));
    let point = match (d.recovered_lsn, d.recovered_time) {
        (None, None) => None,
        (lsn, time) => Some(format!(
            "{}{}",
            lsn.map_or("unknown LSN".to_string(), |l| l.to_string()),
            time.map_or(String::new(), |t| format!(
                ", last replayed commit at {}",
                t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
            ))
        )),
    };
    if let Some(point) = point {
        println!("recovered to {point}");
    }
    for c in &r.checks {
        let result = match c.outcome {
            CheckResult::Passed => "ok",
            CheckResult::Failed => "FAIL",
            CheckResult::Skipped => "skip",
        };
        println!("{result:<4} {:<16} {}", c.name, c.detail);
    }
    if let Some(dir) = &r.kept {
        println!("sandbox kept at {} (stopped)", dir.display());
    }
}

/// `restorable: any point from T (backup L) to LSN on timeline N`.
fn span_text(span: Option<&Span>) -> String {
    match span {
        None => "restorable: nothing (no DONE or OK backup with its WAL)".to_string(),
        Some(s) => format!(
            "restorable: any point from {} (backup {}) to {} on timeline {}",
            s.from.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            s.from_label,
            s.until,
            s.timeline
        ),
    }
}

/// What `expire` or `delete` removed (or would), as lines or as JSON.
pub fn print_retention(r: &RetentionReport, json: bool) {
    if json {
        println!("{}", pgkeep_core::retention::report_json(r));
    } else {
        print_retention_report(r);
    }
}

/// One line per backup removed, one for the WAL, then the span left.
pub fn print_retention_report(r: &RetentionReport) {
    let verb = if r.dry_run { "would remove" } else { "removed" };
    for d in &r.plan.backups {
        let why = match &d.why {
            Why::Unfinished => "its deletion was interrupted".to_string(),
            Why::Failed => "it failed (ERROR)".to_string(),
            Why::Policy => "[retention] does not keep it".to_string(),
            Why::Asked => "asked for".to_string(),
            Why::DependsOn(l) => format!("it depends on {l}"),
        };
        println!(
            "{verb} backup {} ({}, {}, {}): {why}",
            d.label,
            d.backup_type,
            d.status,
            human_bytes(d.stored_bytes)
        );
    }
    let p = &r.plan;
    match (p.wal.first(), p.wal.last()) {
        (Some(first), Some(last)) => println!(
            "{verb} {} archived WAL file(s), {} to {} ({})",
            p.wal.len(),
            first,
            last,
            human_bytes(p.wal_bytes)
        ),
        _ => println!("{verb} no archived WAL"),
    }
    if p.backups.is_empty() && p.wal.is_empty() {
        println!("nothing to remove");
    }
    println!("{}", span_text(r.remaining.as_ref()));
}

/// `0/9000000`, then `tli 2: 0/B000000` for each timeline the backup can follow beyond its own.
fn windows_text(windows: &[Window], own: u32) -> String {
    windows
        .iter()
        .map(|w| {
            if w.timeline.0 == own {
                w.until.to_string()
            } else {
                format!("tli {}: {}", w.timeline, w.until)
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// One line per backup, then its problems indented; the WAL archive likewise; a total last.
pub fn print_validate_report(r: &ValidateReport) {
    for label in &r.interrupted {
        println!("backup {label} was RUNNING but its process is gone: now ERROR");
    }
    for b in &r.backups {
        let change = if b.was == b.status {
            String::new()
        } else {
            format!(" (was {})", b.was)
        };
        let detail = if b.problems.is_empty() {
            format!(
                "{} files intact, restorable until {}",
                b.files_checked,
                windows_text(&b.windows, b.windows.first().map_or(0, |w| w.timeline.0))
            )
        } else {
            format!("{} problem(s)", b.problems.len())
        };
        println!("backup {} {}{change}: {detail}", b.label, b.status);
        for p in &b.problems {
            println!("  {}: {}", p.object, p.reason);
        }
    }
    let w = &r.wal;
    println!(
        "WAL archive: {} files checked, {} damaged or missing, {} gap(s)",
        w.files_checked,
        w.bad.len(),
        w.gaps.len()
    );
    for bad in &w.bad {
        println!("  WAL {}: {}{}", bad.name, bad.reason, cuts_text(&bad.cuts));
    }
    for g in &w.gaps {
        let span = if g.segments == 1 {
            format!("{} (1 segment missing)", g.first)
        } else {
            format!(
                "{} to {} ({} segments missing)",
                g.first, g.last, g.segments
            )
        };
        println!(
            "  WAL gap on timeline {}: {span}{}",
            g.timeline,
            cuts_text(&g.cuts)
        );
    }
    for note in &w.notes {
        println!("  note: {note}");
    }
    println!("{}", span_text(r.span.as_ref()));
    let secs = r.elapsed.as_secs_f64();
    println!(
        "validated {} backup(s) and {} WAL file(s): {} read in {:.1} s ({:.0} MB/s); {} problem(s)",
        r.backups.len(),
        w.files_checked,
        human_bytes(r.bytes_read),
        secs,
        r.bytes_read as f64 / 1e6 / secs.max(1e-3),
        r.problems()
    );
}

/// `; cuts the restorable window of backup X on timeline 1 at 0/5000000` for each cut.
fn cuts_text(cuts: &[Cut]) -> String {
    cuts.iter()
        .map(|c| {
            format!(
                "; cuts the restorable window of backup {} on timeline {} at {}",
                c.label, c.timeline, c.at
            )
        })
        .collect()
}

/// One line for the rebuilt catalog, then a warning per thing left out.
pub fn print_rebuild_report(r: &RebuildReport) {
    println!(
        "catalog {} {}: {} backup(s) with {} file(s), {} WAL file(s)",
        r.catalog.display(),
        if r.created { "created" } else { "rebuilt" },
        r.backups,
        r.files,
        r.wal
    );
    for w in &r.warnings {
        eprintln!("pgkeep: warning: {w}");
    }
}

/// Bytes in binary units with one decimal ("1.5 GiB").
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

/// One line for a finished backup, then a warning per damaged page.
pub fn print_backup_summary(s: &BackupSummary) {
    let r = &s.record;
    let secs = s.elapsed.as_secs_f64();
    println!(
        "backup {} {}: {} data, {} stored, {} files, {:.1} s, {:.0} MB/s, {} page checksum failures",
        r.label,
        r.status.as_str(),
        human_bytes(r.data_bytes),
        human_bytes(r.stored_bytes),
        r.files,
        secs,
        r.data_bytes as f64 / 1e6 / secs.max(1e-3),
        s.page_failures.len()
    );
    if let Some(b) = &s.blocks {
        let source = match &b.source {
            BlockSource::Wal {
                since,
                until,
                records,
            } => format!("from the WAL archive ({since} to {until}, {records} records)"),
            BlockSource::Summaries {
                since,
                until,
                files,
            } => format!("from WAL summaries ({since} to {until}, {files} summary files)"),
            BlockSource::Scan { reason } => format!("by page scan ({reason})"),
        };
        let source = match &b.summaries_unused {
            Some(why) => format!("{source} [WAL summaries not used: {why}]"),
            None => source,
        };
        println!(
            "changed pages {source}: {} relation files not read, {} read by block, {} fell back to the page scan; {} read from the data directory",
            b.files_not_read,
            b.files_by_block,
            b.files_fallen_back,
            human_bytes(s.bytes_read)
        );
    }
    for f in &s.page_failures {
        eprintln!(
            "pgkeep: warning: page checksum failure in {} block {}: the cluster's storage is damaged (the backup stays valid; WAL replay covers pages written during it)",
            f.path, f.block
        );
    }
}

/// One line for a finished restore, then what to do next.
pub fn print_restore_summary(s: &RestoreSummary, opts: &RestoreOptions) {
    let target = match &opts.target {
        RecoveryTarget::EndOfArchive => "end of the archive".to_string(),
        RecoveryTarget::Immediate => "end of the backup".to_string(),
        RecoveryTarget::Time(t) => t.to_rfc3339(),
        RecoveryTarget::Lsn(l) => format!("LSN {l}"),
        RecoveryTarget::Xid(x) => format!("xid {x}"),
        RecoveryTarget::Name(n) => format!("restore point {n}"),
    };
    let next = match &opts.standby {
        Some(_) => "as a standby (standby.signal); start PostgreSQL: it replays the archive, then streams from its primary".to_string(),
        None => format!("recovery target: {target}; start PostgreSQL to recover"),
    };
    println!("{}", s.choice);
    println!(
        "restored backup {} into {}: {} files written ({}), {} kept, {:.1} s; {next}",
        s.backup.label,
        opts.pgdata.display(),
        s.files_written,
        human_bytes(s.bytes_written),
        s.files_kept,
        s.elapsed.as_secs_f64()
    );
}
