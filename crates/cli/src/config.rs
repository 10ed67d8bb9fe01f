//! The TOML config file: found via --config, $PGKEEP_CONFIG or /etc/pgkeep/pgkeep.toml, unknown
//! keys refused, turned into the validated `pgkeep_core::Config`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use pgkeep_core::config::{
    ArchiveConfig, BackupConfig, Config, DrillConfig, PgConfig, PrimaryConfig, RepoConfig,
};

const DEFAULT_PATH: &str = "/etc/pgkeep/pgkeep.toml";

/// A config problem: maps to the usage exit code.
#[derive(Debug)]
pub struct ConfigError(pub String);

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConfigError {}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct File {
    repo: RepoSection,
    pg: ServerSection,
    primary: Option<ServerSection>,
    #[serde(default)]
    backup: BackupSection,
    #[serde(default)]
    archive: ArchiveSection,
    #[serde(default)]
    drill: DrillSection,
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RepoSection {
    path: PathBuf,
}

/// `[pg]`, the server to back up, or `[primary]`, the primary of a standby `[pg]`: the same
/// keys, but only `[pg]` has a data directory (pgkeep copies the standby's) and server
/// programs (`drill` runs them).
#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct ServerSection {
    data: Option<PathBuf>,
    #[serde(default = "default_host")]
    host: String,
    #[serde(default = "default_port")]
    port: u16,
    #[serde(default = "default_user")]
    user: String,
    #[serde(default = "default_database")]
    database: String,
    bin: Option<PathBuf>,
}

#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct BackupSection {
    fast_checkpoint: Option<bool>,
    jobs: Option<usize>,
    archive_timeout: Option<u64>,
    standby_max_lag: Option<String>,
}

#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct ArchiveSection {
    check_timeout: Option<u64>,
}

#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct DrillSection {
    dir: Option<PathBuf>,
}

fn default_host() -> String {
    "/var/run/postgresql".into()
}
fn default_port() -> u16 {
    5432
}
fn default_user() -> String {
    "postgres".into()
}
fn default_database() -> String {
    "postgres".into()
}

/// Find, read and validate the config. Precedence: flag, then environment, then default path.
pub fn load(flag: Option<&Path>) -> Result<Config, ConfigError> {
    let (path, how) = match (flag, std::env::var_os("PGKEEP_CONFIG")) {
        (Some(p), _) => (p.to_path_buf(), "--config"),
        (None, Some(p)) if !p.is_empty() => (PathBuf::from(p), "PGKEEP_CONFIG"),
        _ => (PathBuf::from(DEFAULT_PATH), "the default path"),
    };
    let text = std::fs::read_to_string(&path).map_err(|e| {
        ConfigError(format!(
            "cannot read config file {} (from {how}): {e}: pass --config FILE or set PGKEEP_CONFIG",
            path.display()
        ))
    })?;
    // Absolute, because archive_command and restore_command embed it and run elsewhere.
    let path = path.canonicalize().unwrap_or(path);
    parse(&text, &path)
}

fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
    let file: File = toml::from_str(text).map_err(|e| {
        let line = e
            .span()
            .map(|s| text[..s.start.min(text.len())].lines().count().max(1));
        let at = line.map(|l| format!(" line {l}")).unwrap_or_default();
        ConfigError(format!(
            "config file {}{at}: {}",
            path.display(),
            e.message().trim()
        ))
    })?;
    let absolute = |p: &Path, key: &str| -> Result<(), ConfigError> {
        if p.is_absolute() {
            Ok(())
        } else {
            Err(ConfigError(format!(
                "config file {}: {key} = {:?} must be an absolute path",
                path.display(),
                p.display()
            )))
        }
    };
    let data = file.pg.data.ok_or_else(|| {
        ConfigError(format!(
            "config file {}: [pg] data is missing: set it to the cluster's data directory",
            path.display()
        ))
    })?;
    if let Some(p) = &file.primary {
        let key = match (&p.data, &p.bin) {
            (Some(_), _) => Some("data"),
            (None, Some(_)) => Some("bin"),
            (None, None) => None,
        };
        if let Some(key) = key {
            return Err(ConfigError(format!(
                "config file {}: [primary] takes no {key} key: it belongs in [pg], the server pgkeep copies and drills",
                path.display()
            )));
        }
    }
    absolute(&file.repo.path, "[repo] path")?;
    absolute(&data, "[pg] data")?;
    if let Some(bin) = &file.pg.bin {
        absolute(bin, "[pg] bin")?;
    }
    if let Some(dir) = &file.drill.dir {
        absolute(dir, "[drill] dir")?;
    }
    let defaults = BackupConfig::default();
    let standby_max_lag = match &file.backup.standby_max_lag {
        Some(text) => parse_duration(text).ok_or_else(|| {
            ConfigError(format!(
                "config file {}: [backup] standby-max-lag = {text:?} is not a duration: use e.g. \"60s\", \"5min\" or \"1h\"",
                path.display()
            ))
        })?,
        None => defaults.standby_max_lag,
    };
    let backup = BackupConfig {
        fast_checkpoint: file
            .backup
            .fast_checkpoint
            .unwrap_or(defaults.fast_checkpoint),
        jobs: file.backup.jobs.unwrap_or(defaults.jobs),
        archive_timeout: file
            .backup
            .archive_timeout
            .map_or(defaults.archive_timeout, Duration::from_secs),
        standby_max_lag,
    };
    let archive = ArchiveConfig {
        check_timeout: file
            .archive
            .check_timeout
            .map_or(ArchiveConfig::default().check_timeout, Duration::from_secs),
    };
    Ok(Config {
        config_path: path.to_path_buf(),
        repo: RepoConfig {
            path: file.repo.path,
        },
        pg: PgConfig {
            data,
            host: file.pg.host,
            port: file.pg.port,
            user: file.pg.user,
            database: file.pg.database,
            bin: file.pg.bin,
        },
        primary: file.primary.map(|p| PrimaryConfig {
            host: p.host,
            port: p.port,
            user: p.user,
            database: p.database,
        }),
        backup,
        archive,
        drill: DrillConfig {
            dir: file.drill.dir,
        },
    })
}

/// A duration written as a number and a unit: `ms`, `s`, `min` (or `m`), `h`; e.g. "60s".
fn parse_duration(text: &str) -> Option<Duration> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit())?;
    let (number, unit) = text.split_at(split);
    let n: u64 = number.parse().ok()?;
    let ms = match unit.trim() {
        "ms" => 1,
        "s" => 1000,
        "m" | "min" => 60_000,
        "h" => 3_600_000,
        _ => return None,
    };
    n.checked_mul(ms).map(Duration::from_millis)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
[repo]
path = "/var/lib/pgkeep"
[pg]
data = "/var/lib/postgresql/15/main"
host = "/var/run/postgresql"
port = 5432
user = "postgres"
"#;

    #[test]
    fn minimal_config_from_design_parses() {
        let cfg = parse(MINIMAL, Path::new("/etc/pgkeep/pgkeep.toml")).unwrap();
        assert_eq!(cfg.repo.path, Path::new("/var/lib/pgkeep"));
        assert_eq!(cfg.pg.port, 5432);
        assert_eq!(cfg.pg.database, "postgres");
        assert!(cfg.backup.fast_checkpoint);
    }

    #[test]
    fn unknown_key_is_refused_with_its_line() {
        let text = format!("{MINIMAL}colour = \"red\"\n");
        let err = parse(&text, Path::new("/x.toml")).unwrap_err().0;
        assert!(err.contains("colour"), "{err}");
        assert!(err.contains("line"), "{err}");
    }

    #[test]
    fn relative_paths_are_refused() {
        let text = MINIMAL.replace("/var/lib/pgkeep", "repo");
        let err = parse(&text, Path::new("/x.toml")).unwrap_err().0;
        assert!(err.contains("[repo] path"), "{err}");
    }

    #[test]
    fn primary_section_and_standby_max_lag_parse() {
        let text = format!(
            "{MINIMAL}[primary]\nhost = \"db1\"\nport = 5433\n[backup]\nstandby-max-lag = \"2min\"\n"
        );
        let cfg = parse(&text, Path::new("/x.toml")).unwrap();
        let primary = cfg.primary.unwrap();
        assert_eq!((primary.host.as_str(), primary.port), ("db1", 5433));
        assert_eq!(primary.user, "postgres");
        assert_eq!(cfg.backup.standby_max_lag, Duration::from_secs(120));
        assert!(parse(MINIMAL, Path::new("/x.toml"))
            .unwrap()
            .primary
            .is_none());
    }

    #[test]
    fn drill_dir_and_server_programs_parse_and_must_be_absolute() {
        let text = format!(
            "{MINIMAL}bin = \"/usr/lib/postgresql/15/bin\"\n[drill]\ndir = \"/srv/drill\"\n"
        );
        let cfg = parse(&text, Path::new("/x.toml")).unwrap();
        assert_eq!(
            cfg.pg.bin.as_deref(),
            Some(Path::new("/usr/lib/postgresql/15/bin"))
        );
        assert_eq!(cfg.drill.dir.as_deref(), Some(Path::new("/srv/drill")));
        let defaults = parse(MINIMAL, Path::new("/x.toml")).unwrap();
        assert!(defaults.pg.bin.is_none() && defaults.drill.dir.is_none());
        let text = format!("{MINIMAL}[drill]\ndir = \"drill\"\n");
        let err = parse(&text, Path::new("/x.toml")).unwrap_err().0;
        assert!(err.contains("[drill] dir"), "{err}");
        let text = format!("{MINIMAL}[primary]\nhost = \"db1\"\nbin = \"/usr/bin\"\n");
        let err = parse(&text, Path::new("/x.toml")).unwrap_err().0;
        assert!(err.contains("[primary] takes no bin"), "{err}");
    }

    #[test]
    fn durations_need_a_known_unit() {
        assert_eq!(parse_duration("60s"), Some(Duration::from_secs(60)));
        assert_eq!(parse_duration("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse_duration("5 min"), Some(Duration::from_secs(300)));
        assert_eq!(parse_duration("1h"), Some(Duration::from_secs(3600)));
        for bad in ["60", "s", "1.5s", "-1s", "10 parsecs", ""] {
            assert_eq!(parse_duration(bad), None, "{bad}");
        }
        let text = format!("{MINIMAL}[backup]\nstandby-max-lag = \"soon\"\n");
        let err = parse(&text, Path::new("/x.toml")).unwrap_err().0;
        assert!(err.contains("standby-max-lag"), "{err}");
    }

    #[test]
    fn example_config_in_repo_parses() {
        let text = include_str!("../../../config/pgkeep.toml");
        parse(text, Path::new("/etc/pgkeep/pgkeep.toml")).unwrap();
    }
}
