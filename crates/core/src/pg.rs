//! The connection to the PostgreSQL server and what pgkeep reads from it.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use pgkeep_pg::Lsn;
use postgres::{Client, NoTls};

use crate::config::{PgConfig, PrimaryConfig};

/// Oldest major version pgkeep supports (the non-exclusive backup API with `recovery.signal`).
pub const MIN_MAJOR: u32 = 12;

/// An open connection to the cluster.
pub struct PgConn {
    client: Client,
    /// `server_version_num`, e.g. 150018.
    pub version_num: u32,
}

/// What identifies a cluster and shapes its files.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerIdentity {
    pub system_identifier: u64,
    pub version_num: u32,
    pub block_size: u32,
    pub wal_segment_size: u32,
    pub blocks_per_segment: u32,
    pub data_checksums: bool,
    pub data_directory: PathBuf,
}

impl ServerIdentity {
    pub fn major(&self) -> u32 {
        self.version_num / 10000
    }
}

/// Connect to `[pg]` with the configured socket directory or host, port and user.
pub fn connect(cfg: &PgConfig) -> Result<PgConn> {
    open(&Endpoint {
        host: &cfg.host,
        port: cfg.port,
        user: &cfg.user,
        database: &cfg.database,
        what: "PostgreSQL",
        section: "[pg]",
    })
}

/// Connect to the primary `[primary]` names, the one a standby `[pg]` streams from.
pub fn connect_primary(cfg: &PrimaryConfig) -> Result<PgConn> {
    open(&Endpoint {
        host: &cfg.host,
        port: cfg.port,
        user: &cfg.user,
        database: &cfg.database,
        what: "the primary",
        section: "[primary]",
    })
}

/// A server to connect to, and the config section that names it (for error messages).
struct Endpoint<'a> {
    host: &'a str,
    port: u16,
    user: &'a str,
    database: &'a str,
    what: &'static str,
    section: &'static str,
}

fn open(to: &Endpoint) -> Result<PgConn> {
    let Endpoint {
        host,
        port,
        user,
        what,
        section,
        ..
    } = to;
    let mut client = postgres::Config::new()
        .host(host)
        .port(*port)
        .user(user)
        .dbname(to.database)
        .application_name("pgkeep")
        // A primary that is down must not hang a backup or a check.
        .connect_timeout(std::time::Duration::from_secs(10))
        .connect(NoTls)
        .with_context(|| {
            format!(
                "cannot connect to {what} at {host}:{port} as {user}: check {section} host, port and user in the config"
            )
        })?;
    let version: String = client
        .query_one("SELECT current_setting('server_version_num')", &[])?
        .get(0);
    let version_num: u32 = version
        .parse()
        .with_context(|| format!("unexpected server_version_num {version:?}"))?;
    if version_num / 10000 < MIN_MAJOR {
        bail!(
            "PostgreSQL {} at {host}:{port} is not supported: pgkeep needs PostgreSQL {MIN_MAJOR} or newer",
            version_num / 10000,
        );
    }
    Ok(PgConn {
        client,
        version_num,
    })
}

impl PgConn {
    /// The major version (12, 13, ...).
    pub fn major(&self) -> u32 {
        self.version_num / 10000
    }

    /// `current_setting(name)`.
    pub fn setting(&mut self, name: &str) -> Result<String> {
        let row = self
            .client
            .query_one("SELECT current_setting($1)", &[&name])
            .with_context(|| format!("reading setting {name}"))?;
        Ok(row.get(0))
    }

    /// The raw number behind a setting (`pg_settings.setting`, before units are applied).
    fn setting_u32(&mut self, name: &str) -> Result<u32> {
        let row = self
            .client
            .query_one("SELECT setting FROM pg_settings WHERE name = $1", &[&name])
            .with_context(|| format!("reading setting {name}"))?;
        let v: String = row.get(0);
        v.parse()
            .with_context(|| format!("setting {name} has unexpected value {v:?}"))
    }

    /// System identifier, sizes and checksum setting of the cluster.
    pub fn identity(&mut self) -> Result<ServerIdentity> {
        let row = self
            .client
            .query_one("SELECT system_identifier FROM pg_control_system()", &[])
            .context(
                "reading pg_control_system(): the pgkeep user needs superuser or pg_monitor",
            )?;
        // PostgreSQL returns the u64 identifier as a signed bigint.
        let sysid: i64 = row.get(0);
        let wal_segment_size = {
            // `wal_segment_size` is reported with a unit ("16MB"); the bytes come from pg_settings.
            let row = self.client.query_one(
                "SELECT setting::bigint * CASE unit WHEN '8kB' THEN 8192 WHEN 'MB' THEN 1048576 ELSE 1 END \
                 FROM pg_settings WHERE name = 'wal_segment_size'",
                &[],
            )?;
            let v: i64 = row.get(0);
            u32::try_from(v).with_context(|| format!("unexpected wal_segment_size {v}"))?
        };
        Ok(ServerIdentity {
            system_identifier: sysid as u64,
            version_num: self.version_num,
            block_size: self.setting_u32("block_size")?,
            wal_segment_size,
            // `segment_size` is counted in blocks.
            blocks_per_segment: self.setting_u32("segment_size")?,
            data_checksums: self.setting("data_checksums")? == "on",
            data_directory: PathBuf::from(self.setting("data_directory")?),
        })
    }

    /// Run a statement that returns nothing.
    pub fn execute(&mut self, sql: &str) -> Result<()> {
        self.client
            .batch_execute(sql)
            .with_context(|| format!("running {sql}"))
    }

    /// First column of a one-row query, as text.
    pub fn query_text(&mut self, sql: &str) -> Result<String> {
        let row = self
            .client
            .query_one(sql, &[])
            .with_context(|| format!("running {sql}"))?;
        Ok(row.get(0))
    }

    /// Whether the server is a standby (or otherwise still in recovery).
    pub fn in_recovery(&mut self) -> Result<bool> {
        Ok(self.query_text("SELECT pg_is_in_recovery()::text")? == "true")
    }

    /// How far the server's WAL goes: the insert position on a primary, the replay position on
    /// a standby (where `pg_current_wal_lsn()` fails: it writes no WAL of its own).
    pub fn current_wal_lsn(&mut self) -> Result<Lsn> {
        let text = self.query_text(
            "SELECT CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() \
             ELSE pg_current_wal_lsn() END::text",
        )?;
        text.parse()
            .with_context(|| format!("unexpected WAL position {text:?} from the server"))
    }

    /// The underlying client, for commands that need prepared queries.
    pub fn client(&mut self) -> &mut Client {
        &mut self.client
    }
}

/// True when two paths name the same directory (compared after resolving symlinks).
pub fn same_dir(a: &std::path::Path, b: &std::path::Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(x), Ok(y)) => x == y,
        _ => a == b,
    }
}
