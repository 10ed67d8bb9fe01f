//! The TOML config file: found via --config, $PGKEEP_CONFIG or /etc/pgkeep/pgkeep.toml, unknown
//! keys refused, turned into the validated `pgkeep_core::Config`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use pgkeep_core::config::{
    ArchiveConfig, BackupConfig, Config, DrillConfig, PgConfig, Policy, PrimaryConfig, RepoConfig,
    RepoStorage, RetentionConfig, S3Config,
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

/// The file's tables; `R` is one `[repo]` table or the `[[repo]]` entries.
#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct File<R> {
    repo: R,
    pg: ServerSection,
    primary: Option<ServerSection>,
    #[serde(default)]
    backup: BackupSection,
    #[serde(default)]
    archive: ArchiveSection,
    #[serde(default)]
    retention: RetentionSection,
    #[serde(default)]
    drill: DrillSection,
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RepoSection {
    #[serde(rename = "type", default)]
    kind: RepoKind,
    path: Option<PathBuf>,
    endpoint: Option<String>,
    bucket: Option<String>,
    region: Option<String>,
    prefix: Option<String>,
    uri_style: Option<UriStyle>,
    access_key_id: Option<String>,
    secret_access_key: Option<String>,
    ca_file: Option<PathBuf>,
    catalog: Option<PathBuf>,
    bundle: Option<bool>,
}

#[derive(Deserialize, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
enum RepoKind {
    #[default]
    Local,
    S3,
}

#[derive(Deserialize, Debug, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
enum UriStyle {
    Path,
    Host,
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
    #[serde(rename = "async")]
    push_async: Option<bool>,
    spool_path: Option<PathBuf>,
    process_max: Option<usize>,
    push_timeout: Option<u64>,
}

#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RetentionSection {
    full: Option<u32>,
    window: Option<String>,
    diff: Option<u32>,
    auto: Option<bool>,
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
    let (one, many) = repo_headers(text);
    if one && many {
        return Err(ConfigError(format!(
            "config file {}: both [repo] and [[repo]]: write every repository as a [[repo]] entry (repo1, repo2, ... in file order)",
            path.display()
        )));
    }
    if many {
        let file: File<Vec<RepoSection>> = parse_toml(text, path)?;
        let file = file.map_repo(|entries| {
            entries
                .into_iter()
                .enumerate()
                .map(|(i, r)| (format!("[[repo]] entry {} (repo{})", i + 1, i + 1), r))
                .collect()
        });
        finish(file, path)
    } else {
        let file: File<RepoSection> = parse_toml(text, path)?;
        finish(file.map_repo(|r| vec![("[repo]".to_string(), r)]), path)
    }
}

impl<R> File<R> {
    /// The same tables with the repository part turned into `S`.
    fn map_repo<S>(self, f: impl FnOnce(R) -> S) -> File<S> {
        File {
            repo: f(self.repo),
            pg: self.pg,
            primary: self.primary,
            backup: self.backup,
            archive: self.archive,
            retention: self.retention,
            drill: self.drill,
        }
    }
}

/// Whether the text has a `[repo]` header and whether it has a `[[repo]]` one. TOML itself
/// refuses the mix with a message about a duplicate key; this says what to write instead.
fn repo_headers(text: &str) -> (bool, bool) {
    let mut found = (false, false);
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or("").trim();
        let compact: String = line.chars().filter(|c| !c.is_whitespace()).collect();
        match compact.as_str() {
            "[repo]" => found.0 = true,
            "[[repo]]" => found.1 = true,
            _ => {}
        }
    }
    found
}

fn parse_toml<T: serde::de::DeserializeOwned>(text: &str, path: &Path) -> Result<T, ConfigError> {
    toml::from_str(text).map_err(|e| {
        let line = e
            .span()
            .map(|s| text[..s.start.min(text.len())].lines().count().max(1));
        let at = line.map(|l| format!(" line {l}")).unwrap_or_default();
        ConfigError(format!(
            "config file {}{at}: {}",
            path.display(),
            e.message().trim()
        ))
    })
}

/// Validate the parsed tables; `file.repo` holds each repository's table with how messages
/// name it.
fn finish(file: File<Vec<(String, RepoSection)>>, path: &Path) -> Result<Config, ConfigError> {
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
    absolute(&data, "[pg] data")?;
    let mut repos: Vec<RepoConfig> = Vec::new();
    for (i, (section, r)) in file.repo.into_iter().enumerate() {
        let mut repo = repo_config(r, &section, path, &absolute)?;
        repo.number = i + 1;
        if let Some(other) = repos.iter().find(|o| o.catalog == repo.catalog) {
            return Err(ConfigError(format!(
                "config file {}: repo{} and repo{} are the same repository (catalog {}): give each [[repo]] entry its own path or catalog",
                path.display(),
                other.number,
                repo.number,
                repo.catalog.display()
            )));
        }
        repos.push(repo);
    }
    let Some(repo) = repos.first().cloned() else {
        return Err(ConfigError(format!(
            "config file {}: no repository: add a [repo] table",
            path.display()
        )));
    };
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
    let archive = archive_config(&file.archive, &repo, path, &absolute)?;
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
        repo,
        repos,
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
        retention,
        drill: DrillConfig {
            dir: file.drill.dir,
        },
    })
}

/// `[archive]`: the spool path must be absolute (the archiver runs pgkeep from the data
/// directory), `process-max` and `push-timeout` at least 1.
fn archive_config(
    a: &ArchiveSection,
    repo: &RepoConfig,
    path: &Path,
    absolute: &dyn Fn(&Path, &str) -> Result<(), ConfigError>,
) -> Result<ArchiveConfig, ConfigError> {
    let defaults = ArchiveConfig::default();
    let err = |what: &str| ConfigError(format!("config file {}: {what}", path.display()));
    let spool_path = match &a.spool_path {
        Some(p) => {
            absolute(p, "[archive] spool-path")?;
            p.clone()
        }
        None => repo.default_spool(),
    };
    if a.process_max == Some(0) {
        return Err(err(
            "[archive] process-max = 0 would push nothing: set 1 or more",
        ));
    }
    if a.push_timeout == Some(0) {
        return Err(err(
            "[archive] push-timeout = 0 leaves no time to push: set 1 (seconds) or more",
        ));
    }
    Ok(ArchiveConfig {
        check_timeout: a
            .check_timeout
            .map_or(defaults.check_timeout, Duration::from_secs),
        push_async: a.push_async.unwrap_or(defaults.push_async),
        spool_path,
        process_max: a.process_max.unwrap_or(defaults.process_max),
        push_timeout: a
            .push_timeout
            .map_or(defaults.push_timeout, Duration::from_secs),
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

/// The `[repo]` table as a validated `RepoConfig`; S3 credentials fall back to the environment.
fn repo_config(
    r: RepoSection,
    section: &str,
    path: &Path,
    absolute: &dyn Fn(&Path, &str) -> Result<(), ConfigError>,
) -> Result<RepoConfig, ConfigError> {
    let err = |what: String| ConfigError(format!("config file {}: {what}", path.display()));
    if r.kind == RepoKind::Local {
        let s3_only = [
            ("endpoint", r.endpoint.is_some()),
            ("bucket", r.bucket.is_some()),
            ("region", r.region.is_some()),
            ("prefix", r.prefix.is_some()),
            ("uri-style", r.uri_style.is_some()),
            ("access-key-id", r.access_key_id.is_some()),
            ("secret-access-key", r.secret_access_key.is_some()),
            ("ca-file", r.ca_file.is_some()),
            ("catalog", r.catalog.is_some()),
        ];
        if let Some((key, _)) = s3_only.iter().find(|(_, set)| *set) {
            return Err(err(format!(
                "{section} {key} is only for type = \"s3\"; add it or remove the key"
            )));
        }
        let repo_path = r.path.ok_or_else(|| {
            err(format!(
                "{section} needs path (or type = \"s3\" and its keys)"
            ))
        })?;
        absolute(&repo_path, &format!("{section} path"))?;
        return Ok(RepoConfig {
            bundle: r.bundle.unwrap_or(false),
            ..RepoConfig::local(repo_path)
        });
    }
    if r.path.is_some() {
        return Err(err(format!(
            "{section} path is for a local repository; an s3 one keeps its index at catalog"
        )));
    }
    let need = |v: Option<String>, key: &str| {
        v.filter(|s| !s.trim().is_empty())
            .ok_or_else(|| err(format!("{section} type = \"s3\" needs {key}")))
    };
    let endpoint = need(r.endpoint, "endpoint")?;
    check_endpoint(&endpoint).map_err(|e| err(e.replacen("[repo]", section, 1)))?;
    let bucket = need(r.bucket, "bucket")?;
    let catalog = r.catalog.ok_or_else(|| {
        err(format!(
            "{section} type = \"s3\" needs catalog, the path of its local index"
        ))
    })?;
    absolute(&catalog, &format!("{section} catalog"))?;
    if let Some(ca) = &r.ca_file {
        absolute(ca, &format!("{section} ca-file"))?;
    }
    let from_env = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
    let access_key_id = r.access_key_id.or_else(|| from_env("AWS_ACCESS_KEY_ID"));
    let secret_access_key = r
        .secret_access_key
        .or_else(|| from_env("AWS_SECRET_ACCESS_KEY"));
    let (Some(access_key_id), Some(secret_access_key)) = (access_key_id, secret_access_key) else {
        return Err(err(format!("{section} type = \"s3\" needs access-key-id and secret-access-key (or AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY in the environment)")));
    };
    let prefix = r.prefix.unwrap_or_default();
    let prefix = prefix.trim_matches('/').to_string();
    if prefix.split('/').any(|c| c == "." || c == "..") || prefix.contains("//") {
        return Err(err(format!(
            "{section} prefix {prefix:?} is not a plain key prefix"
        )));
    }
    Ok(RepoConfig {
        number: 1,
        storage: RepoStorage::S3(S3Config {
            endpoint,
            bucket,
            region: r.region.unwrap_or_else(|| "us-east-1".into()),
            prefix,
            host_style: r.uri_style == Some(UriStyle::Host),
            access_key_id,
            secret_access_key,
            ca_file: r.ca_file,
        }),
        catalog,
        bundle: r.bundle.unwrap_or(true),
    })
}

/// https anywhere; plain http only to this host, where nothing crosses a network.
fn check_endpoint(endpoint: &str) -> Result<(), String> {
    if endpoint.starts_with("https://") {
        return Ok(());
    }
    let Some(rest) = endpoint.strip_prefix("http://") else {
        return Err(format!(
            "[repo] endpoint {endpoint:?} must start with https:// (or http:// for a server on this host)"
        ));
    };
    let authority = rest.split('/').next().unwrap_or("");
    let host = match authority.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(""),
        None => authority.split(':').next().unwrap_or(""),
    };
    let loopback = host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    if loopback {
        Ok(())
    } else {
        Err(format!(
            "[repo] endpoint {endpoint:?} uses plain http to another host: use https://"
        ))
    }
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
        assert_eq!(cfg.repo.catalog, Path::new("/var/lib/pgkeep/catalog.db"));
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

    const S3: &str = r#"
[repo]
type = "s3"
endpoint = "http://127.0.0.1:9000"
bucket = "pgkeep"
prefix = "/main/"
access-key-id = "id"
secret-access-key = "secret"
catalog = "/var/lib/pgkeep/main.db"
[pg]
data = "/d"
"#;

    #[test]
    fn s3_repository_config() {
        let cfg = parse(S3, Path::new("/etc/p.toml")).unwrap();
        let RepoStorage::S3(s3) = &cfg.repo.storage else {
            panic!("not s3: {:?}", cfg.repo)
        };
        assert_eq!(s3.prefix, "main");
        assert_eq!(s3.region, "us-east-1");
        assert!(!s3.host_style);
        assert_eq!(
            cfg.repo.lock_file(),
            Path::new("/var/lib/pgkeep/main.db.lock")
        );
        for (from, to, says) in [
            (
                "catalog = \"/var/lib/pgkeep/main.db\"\n",
                "",
                "needs catalog",
            ),
            ("bucket = \"pgkeep\"\n", "", "needs bucket"),
            (
                "http://127.0.0.1:9000",
                "http://192.0.2.1",
                "plain http to another host",
            ),
            ("type = \"s3\"\n", "", "only for type = \"s3\""),
            ("\"s3\"", "\"ftp\"", "line 3"),
        ] {
            let err = parse(&S3.replace(from, to), Path::new("/p")).unwrap_err().0;
            assert!(err.contains(says), "{from}: {err}");
        }
        assert!(check_endpoint("https://s3.example.com").is_ok());
        assert!(check_endpoint("http://[::1]:9000").is_ok());
        assert!(check_endpoint("http://localhost:9000/").is_ok());
    }

    const TWO: &str = r#"
[[repo]]
path = "/var/lib/pgkeep"

[[repo]]
type = "s3"
endpoint = "http://127.0.0.1:9000"
bucket = "pgkeep"
access-key-id = "id"
secret-access-key = "secret"
catalog = "/var/lib/pgkeep-s3.db"
[pg]
data = "/d"
"#;

    #[test]
    fn repo_entries_are_numbered_in_file_order() {
        let cfg = parse(TWO, Path::new("/x.toml")).unwrap();
        assert_eq!(cfg.repos.len(), 2);
        assert_eq!(cfg.repo.number, 1);
        assert!(matches!(cfg.repos[0].storage, RepoStorage::Local(_)));
        assert!(matches!(cfg.repos[1].storage, RepoStorage::S3(_)));
        assert_eq!(cfg.repos[1].number, 2);
        let second = cfg.with_repo(2).unwrap();
        assert_eq!(second.repo.catalog, Path::new("/var/lib/pgkeep-s3.db"));
        assert!(cfg.with_repo(0).is_none() && cfg.with_repo(3).is_none());
        // One [repo] table is repository 1 of 1.
        let one = parse(MINIMAL, Path::new("/x.toml")).unwrap();
        assert_eq!((one.repos.len(), one.repo.number), (1, 1));
        assert!(!one.several_repos());
    }

    #[test]
    fn repo_table_and_entries_together_or_twice_the_same_are_refused() {
        let text = format!("{TWO}[repo]\npath = \"/r\"\n");
        let err = parse(&text, Path::new("/x.toml")).unwrap_err().0;
        assert!(err.contains("both [repo] and [[repo]]"), "{err}");
        assert_eq!(err.lines().count(), 1, "{err}");
        let text = TWO.replace("/var/lib/pgkeep-s3.db", "/var/lib/pgkeep/catalog.db");
        let err = parse(&text, Path::new("/x.toml")).unwrap_err().0;
        assert!(
            err.contains("repo1 and repo2 are the same repository"),
            "{err}"
        );
        let text = TWO.replace("bucket = \"pgkeep\"\n", "");
        let err = parse(&text, Path::new("/x.toml")).unwrap_err().0;
        assert!(
            err.contains("[[repo]] entry 2 (repo2) type = \"s3\" needs bucket"),
            "{err}"
        );
        let text = TWO.replace(
            "path = \"/var/lib/pgkeep\"",
            "path = \"/var/lib/pgkeep\"\ncolour = 1",
        );
        let err = parse(&text, Path::new("/x.toml")).unwrap_err().0;
        assert!(err.contains("colour") && err.contains("line"), "{err}");
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
    fn archive_async_keys_parse_with_defaults_beside_the_catalog() {
        let cfg = parse(MINIMAL, Path::new("/x.toml")).unwrap().archive;
        assert!(!cfg.push_async);
        assert_eq!(
            cfg.spool_path,
            Path::new("/var/lib/pgkeep/catalog.db.spool")
        );
        assert_eq!(cfg.process_max, 2);
        assert_eq!(cfg.push_timeout, Duration::from_secs(60));
        let text = format!(
            "{MINIMAL}[archive]\nasync = true\nspool-path = \"/var/spool/pgkeep\"\nprocess-max = 4\npush-timeout = 30\n"
        );
        let cfg = parse(&text, Path::new("/x.toml")).unwrap().archive;
        assert!(cfg.push_async);
        assert_eq!(cfg.spool_path, Path::new("/var/spool/pgkeep"));
        assert_eq!(cfg.process_max, 4);
        assert_eq!(cfg.push_timeout, Duration::from_secs(30));
        for (bad, needle) in [
            ("spool-path = \"spool\"", "[archive] spool-path"),
            ("process-max = 0", "process-max"),
            ("push-timeout = 0", "push-timeout"),
            ("async = \"yes\"", "line"),
        ] {
            let text = format!("{MINIMAL}[archive]\n{bad}\n");
            let err = parse(&text, Path::new("/x.toml")).unwrap_err().0;
            assert!(err.contains(needle), "{bad}: {err}");
        }
    }

    #[test]
    fn example_config_in_repo_parses() {
        let text = include_str!("../../../config/pgkeep.toml");
        parse(text, Path::new("/etc/pgkeep/pgkeep.toml")).unwrap();
    }
}
