//! Times `expire` on a synthetic local repository: 10 full backups of 1000 files each and 1000
//! archived 16 MiB WAL segments (objects of a few bytes: expire never reads them), `full = 1`.
//! Run by `cargo xtask bench --expire`; prints one JSON line.

use std::path::Path;
use std::time::{Duration, Instant};

use chrono::{TimeDelta, Utc};
use pgkeep_catalog::{
    BackupRecord, BackupStatus, BackupType, Catalog, FileKind, FileRecord, RepoIdentity, WalKind,
    WalRecord,
};
use pgkeep_core::config::{
    ArchiveConfig, BackupConfig, Config, DrillConfig, PgConfig, Policy, RepoConfig, RetentionConfig,
};
use pgkeep_pg::{segment_name, Lsn, TimelineId, WalSegSize};
use pgkeep_repo::{keys, put_bytes, LocalStorage, Storage};

const BACKUPS: u64 = 10;
const FILES: u64 = 1000;
const SEGMENTS: u64 = 1000;
const SEG: u64 = 16 << 20;

fn main() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let root = dir.path().join("repo");
    let identity = RepoIdentity {
        system_identifier: 7_000_000_000_000_000_001,
        pg_major: 15,
        block_size: 8192,
        wal_segment_size: SEG as u32,
        blocks_per_segment: 131_072,
    };
    std::fs::create_dir_all(&root)?;
    let catalog = Catalog::create(&root.join(keys::CATALOG_FILE), &identity)?;
    let storage = LocalStorage::new(&root);
    fill(&catalog, &storage, &identity)?;
    drop(catalog);
    // The set-up's writeback is not expire's work: finish it before the clock starts.
    storage.sync()?;

    let cfg = config(&root, dir.path());
    let started = Instant::now();
    let report = pgkeep_core::retention::expire(&cfg, false)?;
    let elapsed = started.elapsed();
    println!(
        "{}",
        serde_json::json!({
            "backups_removed": report.plan.backups.len(),
            "wal_removed": report.plan.wal.len(),
            "seconds": secs(elapsed),
        })
    );
    Ok(())
}

/// Backups every 100 segments, each with its files as objects and rows, and the segments.
fn fill(catalog: &Catalog, storage: &LocalStorage, id: &RepoIdentity) -> anyhow::Result<()> {
    let seg = WalSegSize::new(SEG)?;
    let t0 = Utc::now() - TimeDelta::try_days(10).unwrap_or_default();
    for i in 0..BACKUPS {
        let label = format!("20260101-{:06}F", i);
        let start = Lsn((i * 100 + 2) * SEG + 40);
        let at = t0 + TimeDelta::try_hours(i as i64).unwrap_or_default();
        let mut files = Vec::new();
        for f in 0..FILES {
            let path = format!("base/5/{}", 16384 + f);
            put_bytes(storage, &keys::backup_file(&label, &path), b"x")?;
            files.push(FileRecord {
                path,
                kind: FileKind::File,
                size: 1,
                mode: 0o100600,
                uid: 0,
                gid: 0,
                mtime: 0,
                link_target: None,
                crc32c: Some(0),
                sha256: Some([0; 32]),
                stored_size: 1,
                stored_in: Some(label.clone()),
                n_blocks: None,
                page_delta: false,
                bundle: None,
            });
        }
        let record = BackupRecord {
            label: label.clone(),
            backup_type: BackupType::Full,
            status: BackupStatus::Running,
            parent: None,
            timeline: 1,
            start_lsn: start,
            stop_lsn: Some(Lsn(start.0 + 4096)),
            start_wal: segment_name(TimelineId(1), start.segment_number(seg), seg),
            stop_wal: None,
            start_time: at,
            end_time: Some(at),
            recovery_time: Some(at),
            data_bytes: FILES,
            stored_bytes: FILES,
            files: FILES,
            pg_version_num: 150_000,
            system_identifier: id.system_identifier,
            block_size: 8192,
            data_checksums: true,
            pid: 1,
            hostname: "bench".into(),
            page_checksum_failures: 0,
            error: None,
            from_standby: false,
            pinned: None,
        };
        catalog.insert_backup(&record)?;
        catalog.insert_files(&label, &files)?;
        let done = catalog.set_status(&label, BackupStatus::Done, None)?;
        put_bytes(
            storage,
            &keys::backup_meta(&label, "backup.ini"),
            pgkeep_catalog::meta::backup_ini(&done).as_bytes(),
        )?;
    }
    for s in 1..=SEGMENTS {
        let name = segment_name(TimelineId(1), s, seg);
        put_bytes(storage, &keys::wal(id.system_identifier, &name), b"x")?;
        catalog.insert_wal(&WalRecord {
            name,
            kind: WalKind::Segment,
            timeline: 1,
            segno: Some(s),
            size: SEG,
            crc32c: 0,
            sha256: [0; 32],
            stored_size: 1,
            archived_at: t0,
        })?;
    }
    Ok(())
}

fn config(root: &Path, dir: &Path) -> Config {
    Config {
        config_path: dir.join("pgkeep.toml"),
        repo: RepoConfig::local(root.to_path_buf()),
        repos: vec![RepoConfig::local(root.to_path_buf())],
        pg: PgConfig {
            data: dir.join("data"),
            host: "/tmp".into(),
            port: 5432,
            user: "postgres".into(),
            database: "postgres".into(),
            bin: None,
        },
        primary: None,
        backup: BackupConfig::default(),
        archive: ArchiveConfig::default(),
        retention: RetentionConfig {
            policy: Policy {
                full: Some(1),
                ..Policy::default()
            },
            auto: true,
        },
        drill: DrillConfig::default(),
    }
}

fn secs(d: Duration) -> f64 {
    (d.as_secs_f64() * 1000.0).round() / 1000.0
}
