//! `pgkeep check`: end-to-end check of config, connection and archiving, one line per check.

use anyhow::Result;

use crate::archive::wait_for_wal;
use crate::config::Config;
use crate::init::check_same_cluster;
use crate::pg::{self, ServerIdentity};
use crate::repo::Repo;
use pgkeep_catalog::RepoIdentity;

/// Default config path, used by an archive_command that passes no --config.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/pgkeep/pgkeep.toml";

/// True when `archive_command` runs pgkeep's archive-push with this config.
pub fn archive_command_ok(command: &str, cfg: &Config) -> bool {
    let path = cfg.config_path.display().to_string();
    let uses_config = if command.contains("--config") {
        command.contains(&path)
    } else {
        path == DEFAULT_CONFIG_PATH
    };
    command.contains("pgkeep") && command.contains("archive-push") && uses_config
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
    let wal_level = conn.setting("wal_level")?;
    push(
        wal_level == "replica" || wal_level == "logical",
        "wal_level",
        if wal_level == "minimal" {
            "minimal: set wal_level = replica and restart PostgreSQL".to_string()
        } else {
            wal_level
        },
    );
    let archive_mode = conn.setting("archive_mode")?;
    let mode_ok = archive_mode == "on" || archive_mode == "always";
    push(
        mode_ok,
        "archive_mode",
        if mode_ok {
            archive_mode
        } else {
            format!("{archive_mode}: set archive_mode = on and restart PostgreSQL")
        },
    );
    let command = conn.setting("archive_command")?;
    let cfg_path = cfg.config_path.display().to_string();
    let command_ok = archive_command_ok(&command, cfg);
    push(
        command_ok,
        "archive_command",
        if command_ok {
            command
        } else {
            format!(
                "{command:?}: set archive_command = 'pgkeep --config {cfg_path} archive-push %p' and reload"
            )
        },
    );
    let server = conn.identity()?;
    let same_path = pg::same_dir(&server.data_directory, &cfg.pg.data);
    let in_recovery = conn.query_text("SELECT pg_is_in_recovery()::text")? == "true";
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
    let repo = match Repo::open(cfg) {
        Ok(r) => r,
        Err(e) => {
            push(false, "repository", format!("{e:#}"));
            return Ok(lines);
        }
    };
    match check_same_cluster(&repo.identity, &repo_identity(&server), &repo.name) {
        Ok(()) => push(
            true,
            "repository",
            format!(
                "{} (system identifier {})",
                repo.name, server.system_identifier
            ),
        ),
        Err(e) => {
            push(false, "repository", format!("{e:#}"));
            return Ok(lines);
        }
    };
    if !(mode_ok && command_ok) {
        return Ok(lines);
    }
    // A restore point guarantees the current segment holds WAL, so the switch really switches.
    conn.execute("SELECT pg_create_restore_point('pgkeep check')")?;
    let segment = conn.query_text("SELECT pg_walfile_name(pg_switch_wal())")?;
    let timeout = cfg.archive.check_timeout;
    match wait_for_wal(&repo, std::slice::from_ref(&segment), timeout, |_| {}) {
        Ok(()) => push(true, "archiving", format!("{segment} reached the archive")),
        Err(e) => push(false, "archiving", format!("{e:#}")),
    };
    Ok(lines)
}
