//! Human-readable output: the `show` table and the reports of backup, restore, validate and
//! catalog rebuild.

use pgkeep_core::backup::{BackupSummary, BlockSource};
use pgkeep_core::rebuild::RebuildReport;
use pgkeep_core::restore::{RecoveryTarget, RestoreOptions, RestoreSummary};
use pgkeep_core::show::{Shown, Window};
use pgkeep_core::validate::{Cut, ValidateReport};

/// A pg_rman-like table of backups, oldest first.
pub fn print_backups(backups: &[Shown]) {
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
    for Shown { record: b, windows } in backups {
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
    }
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
            BlockSource::Scan { reason } => format!("by page scan ({reason})"),
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
