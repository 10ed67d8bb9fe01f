//! A standby as the source of a backup: reaching the primary `[primary]` names, and the checks
//! that the standby streams from it closely enough to be copied in its place.
//!
//! The standby runs the backup functions; the primary, which archives, is asked to switch WAL
//! after the stop call so the backup's last segment reaches the archive (a standby with
//! `archive_mode = on` archives nothing, and `always` is not assumed).

use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};

use crate::config::Config;
use crate::pg::{self, PgConn};

/// Connect to the primary of the standby `[pg]` names; a clear error when `[primary]` is missing.
pub fn connect_primary(cfg: &Config) -> Result<PgConn> {
    let primary = cfg.primary.as_ref().ok_or_else(|| {
        anyhow!(
            "the server at {}:{} is a standby and {} has no [primary] section: add [primary] with the host, port and user of the primary it streams from",
            cfg.pg.host,
            cfg.pg.port,
            cfg.config_path.display()
        )
    })?;
    pg::connect_primary(primary)
}

/// `[primary]` as `host:port`, for messages.
pub fn primary_name(cfg: &Config) -> String {
    cfg.primary
        .as_ref()
        .map_or_else(String::new, |p| format!("{}:{}", p.host, p.port))
}

/// Refuse a standby that is not streaming from `primary`: the primary is itself in recovery,
/// the system identifiers differ, the standby's WAL receiver is not streaming, or it does not
/// replay what the primary has written within `[backup] standby-max-lag`.
///
/// The lag is measured by waiting, not read from `pg_stat_replication.replay_lag`: that view
/// cannot tell which of several standbys is this one, and its lag is NULL on an idle primary.
/// A standby that replays the primary's current position within the limit is close enough.
pub fn check_follows(
    standby: &mut PgConn,
    standby_sysid: u64,
    primary: &mut PgConn,
    cfg: &Config,
) -> Result<Duration> {
    let at = format!("the standby at {}:{}", cfg.pg.host, cfg.pg.port);
    let primary_at = format!("the primary at {}", primary_name(cfg));
    if primary.in_recovery()? {
        bail!(
            "{primary_at} is in recovery itself: set [primary] in {} to the server that writes WAL and archives it",
            cfg.config_path.display()
        );
    }
    let primary_sysid = primary.identity()?.system_identifier;
    if primary_sysid != standby_sysid {
        bail!(
            "{at} has system identifier {standby_sysid} but {primary_at} has {primary_sysid}: it is not a standby of that primary; set [primary] in {} to the primary it streams from",
            cfg.config_path.display()
        );
    }
    let status = standby
        .client()
        .query_opt("SELECT status FROM pg_stat_wal_receiver", &[])?
        .and_then(|row| row.get::<_, Option<String>>(0));
    if status.as_deref() != Some("streaming") {
        bail!(
            "{at} is not streaming from {primary_at} (WAL receiver: {}): check its primary_conninfo and that the primary is up",
            status.as_deref().unwrap_or("none")
        );
    }
    let target = primary.current_wal_lsn()?;
    let max = cfg.backup.standby_max_lag;
    let started = Instant::now();
    loop {
        let replayed = standby.current_wal_lsn()?;
        if replayed >= target {
            return Ok(started.elapsed());
        }
        if started.elapsed() >= max {
            bail!(
                "{at} lags {primary_at} by more than {} s (replayed up to {replayed}, the primary had written up to {target}): wait until it catches up, or raise [backup] standby-max-lag",
                max.as_secs_f64()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
