//! `pgkeep check`: end-to-end check of config, connection and archiving, one line per check.
//! When `[pg]` is a standby, also its primary (`[primary]`): reachable, the same cluster, the
//! standby streaming from it, and the primary's WAL settings and archiving.

use std::path::Path;

use anyhow::Result;

use crate::archive::wait_for_wal;
use crate::config::Config;
use crate::init::check_same_cluster;
use crate::pg::{self, ServerIdentity};
use crate::repo::Repo;
use crate::standby;
use pgkeep_catalog::RepoIdentity;

/// Default config path, used by an archive_command that passes no --config.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/pgkeep/pgkeep.toml";

/// True when `archive_command` runs pgkeep's archive-push with `config`. None takes any config:
/// a standby's primary runs the command on its own host with that host's config, and only the
/// segments reaching this repository (which `check` and `backup` wait for) prove where it goes.
pub fn archive_command_ok(command: &str, config: Option<&Path>) -> bool {
    let uses_config = match config.map(|p| p.display().to_string()) {
        None => true,
        Some(path) if command.contains("--config") => command.contains(&path),
        Some(path) => path == DEFAULT_CONFIG_PATH,
    };
    command.contains("pgkeep") && command.contains("archive-push") && uses_config
}

/// The config `archive_command` must name: this one for a primary, none for a standby's primary.
pub fn expected_archive_config(cfg: &Config, in_recovery: bool) -> Option<&Path> {
    (!in_recovery).then_some(cfg.config_path.as_path())
}

/// The identity a repository records, as read from the server.
pub fn repo_identity(server: &ServerIdentity) -> RepoIdentity {
    RepoIdentity {
        system_identifier: server.system_identifier,
        pg_major: server.major(),
        block_size: server.block_size,
        wal_segment_size: server.wal_segment_size,
        blocks_per_segment: server.blocks_per_segment,
    }
}

/// One check and its outcome; `detail` says what was found and, on failure, the fix.
#[derive(Debug, Clone)]
pub struct CheckLine {
    pub ok: bool,
    pub what: &'static str,
    pub detail: String,
}

/// Run every check; stops early only when a later check cannot run without an earlier one.
pub fn check(cfg: &Config) -> Result<Vec<CheckLine>> {
    let mut lines = Vec::new();
    let mut push = |ok: bool, what: &'static str, detail: String| {
        lines.push(CheckLine { ok, what, detail });
        ok
    };
    let mut conn = match pg::connect(&cfg.pg) {
        Ok(c) => {
            push(
                true,
                "connection",
                format!("{}:{} as {}", cfg.pg.host, cfg.pg.port, cfg.pg.user),
            );
            c
        }
        Err(e) => {
            push(false, "connection", format!("{e:#}"));
            return Ok(lines);
        }
    };
    let server = conn.identity()?;
    let in_recovery = conn.in_recovery()?;
    // A standby is copied, but WAL reaches the archive from its primary: the WAL settings and
    // the archiving test are the primary's.
    let mut primary = None;
    if in_recovery {
        let mut p = match standby::connect_primary(cfg) {
            Ok(p) => {
                let at = standby::primary_name(cfg);
                push(true, "primary", format!("{at} (the server is its standby)"));
                p
            }
            Err(e) => {
                push(false, "primary", format!("{e:#}"));
                return Ok(lines);
            }
        };
        match standby::check_follows(&mut conn, server.system_identifier, &mut p, cfg) {
            Ok(waited) => push(
                true,
                "standby",
                format!(
                    "streaming, same system identifier {}, replayed the primary's position in {:.1} s",
                    server.system_identifier,
                    waited.as_secs_f64()
                ),
            ),
            Err(e) => push(false, "standby", format!("{e:#}")),
        };
        primary = Some(p);
    }
    let on = if in_recovery { " on the primary" } else { "" };
    let archiver = primary.as_mut().unwrap_or(&mut conn);
    let wal_level = archiver.setting("wal_level")?;
    push(
        wal_level == "replica" || wal_level == "logical",
        "wal_level",
        if wal_level == "minimal" {
            format!("minimal{on}: set wal_level = replica and restart PostgreSQL")
        } else {
            format!("{wal_level}{on}")
        },
    );
    let archive_mode = archiver.setting("archive_mode")?;
    let mode_ok = archive_mode == "on" || archive_mode == "always";
    push(
        mode_ok,
        "archive_mode",
        if mode_ok {
            format!("{archive_mode}{on}")
        } else {
            format!("{archive_mode}{on}: set archive_mode = on and restart PostgreSQL")
        },
    );
    let command = archiver.setting("archive_command")?;
    let cfg_path = cfg.config_path.display().to_string();
    let command_ok = archive_command_ok(&command, expected_archive_config(cfg, in_recovery));
    push(
        command_ok,
        "archive_command",
        if command_ok {
            format!("{command}{on}")
        } else {
            format!(
                "{command:?}{on}: set archive_command = 'pgkeep --config {cfg_path} archive-push %p' and reload"
            )
        },
    );
    let same_path = pg::same_dir(&server.data_directory, &cfg.pg.data);
    // The path can match while the directory behind it is another cluster's: what backup
    // refuses, check reports.
    let not_the_servers = same_path
        .then(|| crate::backup::check_data_directory(cfg, &server, in_recovery).err())
        .flatten();
    push(
        same_path && not_the_servers.is_none(),
        "data directory",
        match not_the_servers {
            _ if !same_path => format!(
                "server runs {} but [pg] data is {}: fix the config",
                server.data_directory.display(),
                cfg.pg.data.display()
            ),
            Some(e) => format!("{e:#}"),
            None => server.data_directory.display().to_string(),
        },
    );
    // Every repository: archive-push stores into each, so each must answer and hold the
    // switched segment.
    let mut repos = Vec::new();
    for c in (1..=cfg.repos.len()).filter_map(|n| cfg.with_repo(n)) {
        let named = |detail: String| {
            if cfg.several_repos() {
                format!("repo{}: {detail}", c.repo.number)
            } else {
                detail
            }
        };
        let repo = match Repo::open(&c) {
            Ok(r) => r,
            Err(e) => {
                push(false, "repository", named(format!("{e:#}")));
                continue;
            }
        };
        match check_same_cluster(&repo.identity, &repo_identity(&server), &repo.name) {
            Ok(()) => {
                push(
                    true,
                    "repository",
                    named(format!(
                        "{} (system identifier {})",
                        repo.name, server.system_identifier
                    )),
                );
                repos.push((c.repo.number, repo));
            }
            Err(e) => {
                push(false, "repository", named(format!("{e:#}")));
            }
        };
    }
    if repos.len() != cfg.repos.len() || !(mode_ok && command_ok) {
        return Ok(lines);
    }
    // A restore point guarantees the current segment holds WAL, so the switch really switches.
    let archiver = primary.as_mut().unwrap_or(&mut conn);
    archiver.execute("SELECT pg_create_restore_point('pgkeep check')")?;
    let segment = archiver.query_text("SELECT pg_walfile_name(pg_switch_wal())")?;
    let timeout = cfg.archive.check_timeout;
    for (number, repo) in &repos {
        let place = if cfg.several_repos() {
            format!("repo{number}")
        } else {
            "the archive".to_string()
        };
        match wait_for_wal(repo, std::slice::from_ref(&segment), timeout, |_| {}) {
            Ok(()) => push(true, "archiving", format!("{segment} reached {place}")),
            Err(e) if cfg.several_repos() => push(false, "archiving", format!("{place}: {e:#}")),
            Err(e) => push(false, "archiving", format!("{e:#}")),
        };
    }
    Ok(lines)
}
