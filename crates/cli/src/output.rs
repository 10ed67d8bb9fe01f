//! Human-readable output: the `show` table.

use pgkeep_core::backup::BackupSummary;
use pgkeep_core::restore::{RecoveryTarget, RestoreOptions, RestoreSummary};
use pgkeep_core::show::BackupRecord;

/// A pg_rman-like table of backups, oldest first.
pub fn print_backups(backups: &[BackupRecord]) {
    println!(
        "{:<18} {:<4} {:<8} {:<20} {:>10} {:>10} {:>3} {:<19} {:<19} PARENT",
        "LABEL", "TYPE", "STATUS", "START", "DATA", "STORED", "TLI", "START LSN", "STOP LSN"
    );
    for b in backups {
        println!(
            "{:<18} {:<4} {:<8} {:<20} {:>10} {:>10} {:>3} {:<19} {:<19} {}",
            b.label,
            b.backup_type.as_str(),
            b.status.as_str(),
            b.start_time.format("%Y-%m-%d %H:%M:%S"),
            human_bytes(b.data_bytes),
            human_bytes(b.stored_bytes),
            b.timeline,
            b.start_lsn.to_string(),
            b.stop_lsn.map(|l| l.to_string()).unwrap_or_default(),
            b.parent.as_deref().unwrap_or("-"),
        );
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
    println!(
        "restored backup {} into {}: {} files written ({}), {} kept, {:.1} s; recovery target: {target}; start PostgreSQL to recover",
        s.backup.label,
        opts.pgdata.display(),
        s.files_written,
        human_bytes(s.bytes_written),
        s.files_kept,
        s.elapsed.as_secs_f64()
    );
}
