//! The TOML config file: found via --config, $PGKEEP_CONFIG or /etc/pgkeep/pgkeep.toml, unknown
//! keys refused, turned into the validated `pgkeep_core::Config`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use pgkeep_core::config::{
    ArchiveConfig, BackupConfig, Config, PgConfig, Policy, RepoConfig, RetentionConfig,
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
    pg: PgSection,
    #[serde(default)]
    backup: BackupSection,
    #[serde(default)]
    archive: ArchiveSection,
    #[serde(default)]
    retention: RetentionSection,
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RepoSection {
    path: PathBuf,
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct PgSection {
    data: PathBuf,
    #[serde(default = "default_host")]
    host: String,
    #[serde(default = "default_port")]
    port: u16,
    #[serde(default = "default_user")]
    user: String,
    #[serde(default = "default_database")]
    database: String,
}

#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct BackupSection {
    fast_checkpoint: Option<bool>,
    jobs: Option<usize>,
    archive_timeout: Option<u64>,
}

#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct ArchiveSection {
    check_timeout: Option<u64>,
}

#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RetentionSection {
    full: Option<u32>,
    window: Option<String>,
    diff: Option<u32>,
    auto: Option<bool>,
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
    absolute(&file.repo.path, "[repo] path")?;
    absolute(&file.pg.data, "[pg] data")?;
    let defaults = BackupConfig::default();
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
    };
    let archive = ArchiveConfig {
        check_timeout: file
            .archive
            .check_timeout
            .map_or(ArchiveConfig::default().check_timeout, Duration::from_secs),
    };
    let r = &file.retention;
    let bad = |what: String| ConfigError(format!("config file {}: {what}", path.display()));
    if r.full == Some(0) {
        return Err(bad(
            "[retention] full = 0 would remove every backup: set 1 or more, or leave it out".into(),
        ));
    }
    let window = match &r.window {
        None => None,
        Some(w) => Some(parse_window(w).ok_or_else(|| {
            bad(format!(
                "[retention] window = {w:?} is not a duration: write a whole number and a unit, e.g. \"14d\", \"36h\", \"2w\" (units s, m, h, d, w)"
            ))
        })?),
    };
    let retention = RetentionConfig {
        policy: Policy {
            full: r.full,
            window,
            diff: r.diff,
        },
        auto: r.auto.unwrap_or(true),
    };
    Ok(Config {
        config_path: path.to_path_buf(),
        repo: RepoConfig {
            path: file.repo.path,
        },
        pg: PgConfig {
            data: file.pg.data,
            host: file.pg.host,
            port: file.pg.port,
            user: file.pg.user,
            database: file.pg.database,
        },
        backup,
        archive,
        retention,
    })
}

/// `14d`, `36h`, `90m`, `2w`, `30s`: a positive whole number and a unit.
fn parse_window(text: &str) -> Option<chrono::TimeDelta> {
    let text = text.trim();
    let unit = text.chars().last()?;
    let n: i64 = text[..text.len() - unit.len_utf8()].trim().parse().ok()?;
    if n <= 0 {
        return None;
    }
    match unit {
        's' => chrono::TimeDelta::try_seconds(n),
        'm' => chrono::TimeDelta::try_minutes(n),
        'h' => chrono::TimeDelta::try_hours(n),
        'd' => chrono::TimeDelta::try_days(n),
        'w' => chrono::TimeDelta::try_weeks(n),
        _ => None,
    }
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
    fn retention_keys_parse_and_bad_values_are_refused() {
        let text = format!("{MINIMAL}[retention]\nfull = 2\nwindow = \"14d\"\ndiff = 3\n");
        let r = parse(&text, Path::new("/x.toml")).unwrap().retention;
        assert_eq!(r.policy.full, Some(2));
        assert_eq!(r.policy.window, chrono::TimeDelta::try_days(14));
        assert_eq!(r.policy.diff, Some(3));
        assert!(r.auto);
        let none = parse(MINIMAL, Path::new("/x.toml")).unwrap().retention;
        assert!(!none.policy.is_set());
        for (bad, needle) in [
            ("full = 0", "full = 0"),
            ("window = \"14\"", "window"),
            ("window = \"-1d\"", "window"),
            ("window = \"3y\"", "window"),
            ("keep = 3", "keep"),
        ] {
            let text = format!("{MINIMAL}[retention]\n{bad}\n");
            let err = parse(&text, Path::new("/x.toml")).unwrap_err().0;
            assert!(err.contains(needle), "{bad}: {err}");
        }
        assert_eq!(parse_window("36h"), chrono::TimeDelta::try_hours(36));
        assert_eq!(parse_window("2w"), chrono::TimeDelta::try_weeks(2));
    }

    #[test]
    fn example_config_in_repo_parses() {
        let text = include_str!("../../../config/pgkeep.toml");
        parse(text, Path::new("/etc/pgkeep/pgkeep.toml")).unwrap();
    }
}
