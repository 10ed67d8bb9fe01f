//! `cargo xtask bench [--scale S] [--runs N] [--keep]`: pgkeep side by side with pgBackRest on a
//! throwaway cluster whose archive_command feeds both, with pg_basebackup and `tar | lz4` as
//! references. Runs alternate between the tools (A B A B ...) and the table shows medians.
//!
//! A tool that fails a step fails the bench: a broken run must never look fast. The one
//! exception is a pgkeep command that does not exist yet in this build (`backup --type incr`,
//! `validate`): its row says `n/a (command failed: ...)` instead.

mod cold;
pub(crate) mod measure;
pub(crate) mod report;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::sh::{
    append, cargo_build_release, give_to_postgres, path, pg_bin, postgres_command,
    postgres_command_direct, run_checked, wait_archive_drained,
};
use measure::{measure, Measured};
use report::{Header, Machine, Metric, Results, Tool};

const USAGE: &str = "usage: cargo xtask bench [--scale S] [--runs N] [--keep]";
/// pgbench scale 30 plus 1.5 M md5 rows makes the default cluster of about 600 MB; the md5
/// table grows with the scale so that `--scale 90` is three times the default cluster.
const MD5_ROWS_PER_SCALE: u64 = 50_000;
/// How many existing WAL segments each tool pushes per run.
pub(crate) const PUSH_SEGMENTS: usize = 10;
const PORT: u16 = 25440;
/// Restored clusters start on this port, beside the bench's own server, to prove they work.
const RESTORED_PORT: u16 = 25441;
const STANZA: &str = "bench";
const PUSH_STANZA: &str = "push";
/// The (wall time, stored bytes, peak RSS) rows of a backup.
const FULL: [Metric; 3] = [Metric::FullWall, Metric::FullStored, Metric::FullRss];
const INCR: [Metric; 3] = [Metric::IncrWall, Metric::IncrStored, Metric::IncrRss];

pub fn bench(args: &[String]) -> Result<()> {
    if args.iter().any(|a| a == "--expire") {
        return expire();
    }
    if args.iter().any(|a| a == "--cold") {
        return cold::cold(args);
    }
    let opts = Options::parse(args)?;
    let started = Instant::now();
    let machine = Machine::read();
    let load_before = report::load_average();
    println!("machine: {}", machine.describe());

    let pgkeep = cargo_build_release()?;
    let pgbackrest = ensure_installed("pgbackrest", "pgbackrest")?;
    let lz4 = ensure_installed("lz4", "lz4")?;
    let versions = versions(&pgkeep, &pgbackrest, &lz4)?;
    for (what, v) in &versions {
        println!("{what}: {v}");
    }

    let b = Bench::create(&pgkeep, &pgbackrest, &opts)?;
    let result = b.run();
    b.stop_server(&b.data);
    match &result {
        Ok(_) if !opts.keep => {
            let _ = fs::remove_dir_all(&b.dir);
        }
        _ => eprintln!("bench files kept in {}", b.dir.display()),
    }
    let (results, facts) = result?;

    let header = Header {
        scale: opts.scale,
        runs: opts.runs,
        random_rows: opts.md5_rows(),
        cluster_bytes: facts.cluster_bytes,
        push_segments: facts.push_segments,
        machine,
        versions,
        load_before,
        load_after: report::load_average(),
        elapsed_seconds: started.elapsed().as_secs_f64(),
    };
    let md = report::markdown(&header, &results);
    println!("\n{md}");
    let out_dir = crate::sh::target_dir().join("bench");
    fs::create_dir_all(&out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    let stem = out_dir.join(format!("bench-scale{}", opts.scale));
    let md_path = stem.with_extension("md");
    let json_path = stem.with_extension("json");
    fs::write(&md_path, &md).with_context(|| format!("writing {}", md_path.display()))?;
    let json = serde_json::to_string_pretty(&report::json(&header, &results))?;
    fs::write(&json_path, json + "\n")
        .with_context(|| format!("writing {}", json_path.display()))?;
    println!("written: {} and {}", md_path.display(), json_path.display());
    Ok(())
}

#[derive(Clone)]
struct Options {
    scale: u32,
    runs: usize,
    keep: bool,
}

impl Options {
    fn parse(args: &[String]) -> Result<Options> {
        let mut o = Options {
            scale: 30,
            runs: 3,
            keep: false,
        };
        let mut it = args.iter();
        while let Some(a) = it.next() {
            let (flag, inline) = match a.split_once('=') {
                Some((f, v)) => (f, Some(v.to_string())),
                None => (a.as_str(), None),
            };
            let mut value = |name: &str| -> Result<String> {
                inline
                    .clone()
                    .or_else(|| it.next().cloned())
                    .with_context(|| format!("{name} needs a value\n{USAGE}"))
            };
            match flag {
                "--scale" => {
                    o.scale = value("--scale")?
                        .parse()
                        .ok()
                        .filter(|&s| s >= 1)
                        .with_context(|| format!("--scale takes a whole number >= 1\n{USAGE}"))?
                }
                "--runs" => {
                    o.runs = value("--runs")?
                        .parse()
                        .ok()
                        .filter(|&n| n >= 1)
                        .with_context(|| format!("--runs takes a whole number >= 1\n{USAGE}"))?
                }
                "--keep" => o.keep = true,
                _ => bail!("unknown argument {a:?}\n{USAGE}"),
            }
        }
        Ok(o)
    }

    fn md5_rows(&self) -> u64 {
        u64::from(self.scale) * MD5_ROWS_PER_SCALE
    }
}

/// Facts about the run that the table's heading needs.
struct Facts {
    cluster_bytes: u64,
    push_segments: usize,
}

/// A pgkeep backup as `show --json` describes it.
struct PgkeepBackup {
    label: String,
    data_bytes: u64,
    stored_bytes: u64,
}

/// A pgBackRest backup set as `info --output=json` describes it.
struct PgbrBackup {
    label: String,
    repo_delta: u64,
}

/// The cluster's content that a restore must reproduce, as one comparable string.
pub(crate) const FINGERPRINT_SQL: &str = "SELECT (SELECT count(*) || '/' || sum(abalance) FROM pgbench_accounts) \
     || ' ' || (SELECT count(*) || '/' || md5(string_agg(v, '' ORDER BY id)) FROM random_md5 WHERE id % 2000 = 0)";

/// The programs a bench runs, as whom and where: shared by the local, cold and S3 benches.
pub(crate) struct Tools {
    /// The bench's scratch directory; commands run from it.
    pub dir: PathBuf,
    /// pgkeep's binary, copied where `postgres` can run it.
    pub pgkeep: PathBuf,
    pub pgbackrest: PathBuf,
    /// The PostgreSQL server's binaries.
    pub pg_bin: PathBuf,
    /// The cluster's socket directory.
    pub sock: PathBuf,
    /// Each step's output, numbered in order by `log_seq`.
    pub logs: PathBuf,
    pub log_seq: std::cell::Cell<u32>,
}

impl Tools {
    /// A fresh scratch directory `dir` (0755, so `postgres` reaches it) holding a copy of the
    /// pgkeep binary and the directories every bench uses: the socket directory, step logs, WAL
    /// samples, and pgBackRest's log, lock and spool directories (which must exist before its
    /// first command).
    pub(crate) fn create(dir: PathBuf, pgkeep: &Path, pgbackrest: &Path) -> Result<Tools> {
        fs::create_dir_all(&dir)?;
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755))?;
        let bin = dir.join("pgkeep");
        fs::copy(pgkeep, &bin).context("copying the pgkeep binary")?;
        for d in [
            "sock",
            "logs",
            "wal-samples",
            "pgbackrest-log",
            "pgbackrest-lock",
            "pgbackrest-spool",
        ] {
            fs::create_dir_all(dir.join(d))?;
        }
        Ok(Tools {
            pgkeep: bin,
            pgbackrest: pgbackrest.to_path_buf(),
            pg_bin: pg_bin()?,
            sock: dir.join("sock"),
            logs: dir.join("logs"),
            log_seq: std::cell::Cell::new(0),
            dir,
        })
    }

    pub(crate) fn pg(&self, program: &str) -> Command {
        let mut c = postgres_command(&self.pg_bin.join(program));
        c.current_dir(&self.dir);
        c
    }

    pub(crate) fn pgkeep_cmd(&self, conf: &Path, args: &[&str]) -> Command {
        let mut c = postgres_command_direct(&self.pgkeep);
        c.current_dir(&self.dir)
            .arg("--config")
            .arg(conf)
            .args(args);
        c
    }

    pub(crate) fn pgbr_cmd(&self, conf: &Path, stanza: &str, args: &[&str]) -> Command {
        let mut c = postgres_command_direct(&self.pgbackrest);
        c.current_dir(&self.dir)
            .arg(format!("--config={}", conf.display()))
            .arg(format!("--stanza={stanza}"))
            .args(args);
        c
    }

    pub(crate) fn conn_args(&self, port: u16) -> Vec<String> {
        vec![
            "-h".into(),
            self.sock.display().to_string(),
            "-p".into(),
            port.to_string(),
            "-U".into(),
            "postgres".into(),
        ]
    }

    pub(crate) fn sql_at(&self, port: u16, sql: &str) -> Result<String> {
        let out = self
            .pg("psql")
            .args(["-X", "-q", "-At", "-v", "ON_ERROR_STOP=1"])
            .args(self.conn_args(port))
            .args(["-d", "postgres", "-c", sql])
            .output()
            .context("starting psql")?;
        if !out.status.success() {
            bail!(
                "psql {sql:?}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    pub(crate) fn stop_server(&self, data: &Path) {
        if data.join("postmaster.pid").exists() {
            let _ = self
                .pg("pg_ctl")
                .args(["-w", "-m", "immediate", "-D", path(data), "stop"])
                .output();
        }
    }

    /// An empty directory owned by `postgres`, as restores and scratch repositories need.
    pub(crate) fn fresh_dir(&self, name: &str) -> Result<PathBuf> {
        let dir = self.dir.join(name);
        if dir.exists() {
            fs::remove_dir_all(&dir)?;
        }
        fs::create_dir(&dir)?;
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o700))?;
        give_to_postgres(&dir)?;
        Ok(dir)
    }

    /// Waits until the restored server on `port` paused at its recovery target, then compares
    /// its content with `expected`.
    pub(crate) fn wait_restored_matches(&self, port: u16, expected: &str) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(300);
        while Instant::now() < deadline {
            let state = self.sql_at(
                port,
                "SELECT pg_is_in_recovery() AND pg_get_wal_replay_pause_state() = 'paused'",
            );
            if state.ok().as_deref() == Some("t") {
                let found = self.sql_at(port, FINGERPRINT_SQL)?;
                if found != expected {
                    bail!("restored content {found:?} differs from the backed-up {expected:?}");
                }
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        bail!("recovery did not reach its target within 300 s")
    }

    /// Run and measure a step whose failure the caller judges.
    pub(crate) fn measured(&self, what: &str, cmd: &mut Command) -> Result<Measured> {
        let n = self.log_seq.get() + 1;
        self.log_seq.set(n);
        let slug: String = what
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() {
                    c.to_ascii_lowercase()
                } else {
                    '-'
                }
            })
            .collect();
        measure(cmd, &self.logs.join(format!("{n:04}-{slug}")))
    }

    /// The error log of the last step run, or an empty string.
    pub(crate) fn last_log(&self) -> String {
        let n = self.log_seq.get();
        fs::read_dir(&self.logs)
            .ok()
            .and_then(|rd| {
                rd.filter_map(|e| e.ok()).map(|e| e.path()).find(|p| {
                    p.file_name()
                        .and_then(|f| f.to_str())
                        .is_some_and(|f| f.starts_with(&format!("{n:04}-")) && f.ends_with(".err"))
                })
            })
            .map(|p| p.display().to_string())
            .unwrap_or_default()
    }
}

struct Bench {
    tools: Tools,
    opts: Options,
    data: PathBuf,
    pgkeep_conf: PathBuf,
    pgbr_conf: PathBuf,
    pgbr_repo: PathBuf,
    samples: PathBuf,
}

impl std::ops::Deref for Bench {
    type Target = Tools;
    fn deref(&self) -> &Tools {
        &self.tools
    }
}

impl Bench {
    fn create(pgkeep: &Path, pgbackrest: &Path, opts: &Options) -> Result<Bench> {
        let dir = PathBuf::from(format!("/tmp/pgkeep-bench-{}", std::process::id()));
        let b = Bench {
            opts: opts.clone(),
            data: dir.join("data"),
            pgkeep_conf: dir.join("pgkeep.toml"),
            pgbr_conf: dir.join("pgbackrest.conf"),
            pgbr_repo: dir.join("pgbackrest-repo"),
            samples: dir.join("wal-samples"),
            tools: Tools::create(dir, pgkeep, pgbackrest)?,
        };
        b.write_pgkeep_conf(&b.pgkeep_conf, &b.dir.join("pgkeep-repo"))?;
        b.write_pgbr_conf(&b.pgbr_conf, STANZA, &b.pgbr_repo)?;
        give_to_postgres(&b.dir)?;
        Ok(b)
    }

    fn run(&self) -> Result<(Results, Facts)> {
        let facts = self.setup()?;
        let mut results = Results::default();
        let mut previous_pgbr_full: Option<String> = None;
        for run in 0..self.opts.runs {
            println!("\n==> run {}/{}", run + 1, self.opts.runs);
            previous_pgbr_full = Some(self.one_run(run, previous_pgbr_full, &mut results)?);
        }
        self.final_validate()?;
        Ok((results, facts))
    }

    /// initdb, archive into both tools, load the data, sample WAL segments for archive-push.
    fn setup(&self) -> Result<Facts> {
        self.init_cluster()?;
        self.load_data()?;
        let push_segments = self.sample_segments()?;
        self.check_both()?;
        let cluster_bytes = self.cluster_bytes()?;
        println!(
            "    cluster: {} in its databases; {push_segments} WAL segment(s) sampled for archive-push",
            report::format_bytes(cluster_bytes as f64)
        );
        Ok(Facts {
            cluster_bytes,
            push_segments,
        })
    }

    /// initdb a cluster whose archive_command feeds both tools, start it, init both repositories.
    fn init_cluster(&self) -> Result<()> {
        step("initdb a throwaway cluster whose archive_command feeds pgkeep and pgBackRest");
        self.checked(
            "initdb",
            self.pg("initdb")
                .args(["-k", "-N", "-U", "postgres", "--auth=trust", "-D"])
                .arg(&self.data),
        )?;
        let conf = format!(
            "\nport = {PORT}\nlisten_addresses = ''\nunix_socket_directories = '{sock}'\n\
             archive_mode = on\n\
             archive_command = '{pgkeep} --config {kconf} archive-push %p && {pgbr} --config={bconf} --stanza={STANZA} archive-push %p'\n\
             # Autovacuum would change pages between one tool's backup and the other's.\n\
             autovacuum = off\n\
             # Only the backups' own checkpoints: a timed one would land inside some measurement.\n\
             checkpoint_timeout = '1h'\nmax_wal_size = '8GB'\n",
            sock = self.sock.display(),
            pgkeep = self.pgkeep.display(),
            kconf = self.pgkeep_conf.display(),
            pgbr = self.pgbackrest.display(),
            bconf = self.pgbr_conf.display(),
        );
        append(&self.data.join("postgresql.conf"), &conf)?;
        self.start_server()?;
        self.checked(
            "pgkeep init",
            &mut self.pgkeep_cmd(&self.pgkeep_conf, &["init"]),
        )?;
        self.checked(
            "pgBackRest stanza-create",
            &mut self.pgbr_cmd(&self.pgbr_conf, STANZA, &["stanza-create"]),
        )?;
        Ok(())
    }

    /// pgbench's tables and the random md5 table, frozen, their WAL archived.
    fn load_data(&self) -> Result<()> {
        step(&format!(
            "load pgbench scale {} and {} random md5 rows",
            self.opts.scale,
            self.opts.md5_rows()
        ));
        let loaded = Instant::now();
        self.checked(
            "pgbench -i",
            self.pg("pgbench")
                .args(["-i", "-q", "-s", &self.opts.scale.to_string()])
                .args(self.conn_args(PORT))
                .arg("postgres"),
        )?;
        self.sql(&format!(
            "CREATE TABLE random_md5 AS SELECT g AS id, md5(random()::text) AS v FROM generate_series(1, {}) g",
            self.opts.md5_rows()
        ))?;
        // Frozen and all-visible now, so later reads do not set hint bits and dirty pages that
        // an incremental would then have to copy.
        self.sql("VACUUM (FREEZE, ANALYZE)")?;
        self.sql("SELECT pg_switch_wal()")?;
        wait_archive_drained(
            &self.data,
            Duration::from_secs(300),
            &self.dir.join("server.log"),
        )?;
        println!("    loaded in {:.0} s", loaded.elapsed().as_secs_f64());
        Ok(())
    }

    /// `check` of both tools: archiving works before anything is timed.
    fn check_both(&self) -> Result<()> {
        self.checked(
            "pgkeep check",
            &mut self.pgkeep_cmd(&self.pgkeep_conf, &["check"]),
        )?;
        self.checked(
            "pgBackRest check",
            &mut self.pgbr_cmd(&self.pgbr_conf, STANZA, &["check"]),
        )?;
        Ok(())
    }

    fn cluster_bytes(&self) -> Result<u64> {
        self.sql("SELECT sum(pg_database_size(oid)) FROM pg_database")?
            .parse()
            .context("reading the cluster's size")
    }

    /// One run: full backups, references, validate, updates, incrementals, restores, pushes.
    /// Returns the label of pgBackRest's full, which the next run expires.
    fn one_run(
        &self,
        run: usize,
        previous_pgbr_full: Option<String>,
        r: &mut Results,
    ) -> Result<String> {
        let before_updates = self.sql(FINGERPRINT_SQL)?;

        // Full backups, A then B, then the references. Every timed step starts with what it
        // reads in the page cache: this machine's memory reclaim evicts files idle for a minute,
        // and whichever tool read the cluster second would otherwise find it cached.
        self.warm_cluster();
        let m = self.checked(
            "pgkeep full backup",
            &mut self.pgkeep_cmd(&self.pgkeep_conf, &["backup", "--type", "full"]),
        )?;
        let k_full = self.pgkeep_newest("full")?;
        record_backup(r, Tool::Pgkeep, FULL, &m, k_full.stored_bytes);
        self.warm_cluster();
        let m = self.checked(
            "pgBackRest full backup",
            &mut self.pgbr_cmd(&self.pgbr_conf, STANZA, &["backup", "--type=full"]),
        )?;
        let b_full = self.pgbr_newest("full")?;
        record_backup(r, Tool::PgBackRest, FULL, &m, b_full.repo_delta);
        if let Some(label) = previous_pgbr_full {
            // Keeps pgBackRest's repository to this run's sets, so `verify` checks the same
            // amount every run. Only now: pgBackRest refuses to expire its only full.
            self.checked(
                "pgBackRest expire of the previous run",
                &mut self.pgbr_cmd(
                    &self.pgbr_conf,
                    STANZA,
                    &["expire", &format!("--set={label}")],
                ),
            )?;
        }
        self.warm_cluster();
        self.pg_basebackup(run, r)?;
        self.warm_cluster();
        self.tar_lz4(run, r)?;

        // Validate the full backups.
        warm_tree(&self.dir.join("pgkeep-repo"), &[]);
        let m = self.measured(
            "pgkeep validate",
            &mut self.pgkeep_cmd(&self.pgkeep_conf, &["validate", &k_full.label]),
        )?;
        if m.ok() {
            let rate = k_full.data_bytes as f64 / m.wall.as_secs_f64();
            r.add(Metric::ValidateRate, Tool::Pgkeep, rate);
            r.add(Metric::ValidateRss, Tool::Pgkeep, m.peak_rss as f64);
            report_line(
                "pgkeep validate",
                &m,
                &format!("{}/s", report::format_bytes(rate)),
            );
        } else if missing_feature(&m) {
            for metric in [Metric::ValidateRate, Metric::ValidateRss] {
                r.not_available(metric, Tool::Pgkeep, &m.first_error_line());
            }
            println!("    pgkeep validate: n/a ({})", m.first_error_line());
        } else {
            bail!(failure("pgkeep validate", &m, &self.last_log()));
        }
        let verified = self.pgbr_verified_bytes()?;
        warm_tree(&self.pgbr_repo, &[]);
        let m = self.checked(
            "pgBackRest verify",
            &mut self.pgbr_cmd(&self.pgbr_conf, STANZA, &["verify"]),
        )?;
        r.add(
            Metric::ValidateRate,
            Tool::PgBackRest,
            verified as f64 / m.wall.as_secs_f64(),
        );
        r.add(Metric::ValidateRss, Tool::PgBackRest, m.peak_rss as f64);

        // Scattered updates, then the incrementals.
        self.sql("UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid % 1000 = 0")?;
        self.sql("UPDATE random_md5 SET v = md5(random()::text) WHERE id % 2000 = 0")?;
        let after_updates = self.sql(FINGERPRINT_SQL)?;
        self.warm_cluster();
        let m = self.measured(
            "pgkeep incremental backup",
            &mut self.pgkeep_cmd(&self.pgkeep_conf, &["backup", "--type", "incr"]),
        )?;
        let (k_restore, k_expect) = if m.ok() {
            let k_incr = self.pgkeep_newest("incr")?;
            record_backup(r, Tool::Pgkeep, INCR, &m, k_incr.stored_bytes);
            (k_incr.label, &after_updates)
        } else if missing_feature(&m) {
            for metric in INCR {
                r.not_available(metric, Tool::Pgkeep, &m.first_error_line());
            }
            r.note(Metric::RestoreWall, Tool::Pgkeep, "full only: incr n/a");
            println!(
                "    pgkeep incremental backup: n/a ({})",
                m.first_error_line()
            );
            (k_full.label, &before_updates)
        } else {
            bail!(failure("pgkeep incremental backup", &m, &self.last_log()));
        };
        self.warm_cluster();
        let m = self.checked(
            "pgBackRest incremental backup",
            &mut self.pgbr_cmd(&self.pgbr_conf, STANZA, &["backup", "--type=incr"]),
        )?;
        let b_incr = self.pgbr_newest("incr")?;
        record_backup(r, Tool::PgBackRest, INCR, &m, b_incr.repo_delta);

        // Restore each chain into a fresh directory, then start it to prove it is the cluster.
        let dir = self.fresh_dir(&format!("restore-pgkeep-{run}"))?;
        warm_tree(&self.dir.join("pgkeep-repo"), &[]);
        let m = self.checked(
            "pgkeep restore",
            &mut self.pgkeep_cmd(
                &self.pgkeep_conf,
                &[
                    "restore",
                    "--pgdata",
                    path(&dir),
                    "--backup",
                    &k_restore,
                    "--target",
                    "immediate",
                ],
            ),
        )?;
        r.add(Metric::RestoreWall, Tool::Pgkeep, m.wall.as_secs_f64());
        r.add(Metric::RestoreRss, Tool::Pgkeep, m.peak_rss as f64);
        self.check_restored("pgkeep", &dir, k_expect)?;
        let dir = self.fresh_dir(&format!("restore-pgbackrest-{run}"))?;
        warm_tree(&self.pgbr_repo, &[]);
        let m = self.checked(
            "pgBackRest restore",
            &mut self.pgbr_cmd(
                &self.pgbr_conf,
                STANZA,
                &[
                    "restore",
                    &format!("--pg1-path={}", dir.display()),
                    "--type=immediate",
                    &format!("--set={}", b_incr.label),
                ],
            ),
        )?;
        r.add(Metric::RestoreWall, Tool::PgBackRest, m.wall.as_secs_f64());
        r.add(Metric::RestoreRss, Tool::PgBackRest, m.peak_rss as f64);
        self.check_restored("pgBackRest", &dir, &after_updates)?;

        self.archive_push(run, r)?;
        Ok(b_full.label)
    }

    /// `pg_basebackup -Ft --compress=client-lz4`: the reference a user has without any tool.
    fn pg_basebackup(&self, run: usize, r: &mut Results) -> Result<()> {
        let out = self.dir.join(format!("basebackup-{run}"));
        let m = self.checked(
            "pg_basebackup",
            self.pg("pg_basebackup")
                .args(self.conn_args(PORT))
                .args(["-Ft", "--compress=client-lz4", "-c", "fast", "-D"])
                .arg(&out),
        )?;
        // PostgreSQL 15 compresses only base.tar with client-lz4 and writes the WAL it streamed
        // as a plain pg_wal.tar; pgkeep and pgBackRest keep that WAL in their archives, so it is
        // left out here too.
        let stored = dir_bytes(&out)?
            .saturating_sub(fs::metadata(out.join("pg_wal.tar")).map_or(0, |m| m.len()));
        r.note(Metric::FullStored, Tool::PgBasebackup, "without pg_wal.tar");
        record_backup(r, Tool::PgBasebackup, FULL, &m, stored);
        fs::remove_dir_all(&out).with_context(|| format!("removing {}", out.display()))
    }

    /// `tar | lz4 -1` of the data directory: the floor, what reading and compressing every file
    /// costs with no checksums, catalog or WAL coordination. pg_wal is left out, as every
    /// backup tool leaves it out.
    fn tar_lz4(&self, run: usize, r: &mut Results) -> Result<()> {
        let out = self.dir.join(format!("floor-{run}.tar.lz4"));
        // GNU tar exits 1 when a file changed while it read it, which is expected of a live
        // cluster and no failure of the floor.
        let script = r#"tar --warning=no-file-changed --warning=no-file-removed --warning=no-file-shrank --exclude='./pg_wal/*' -C "$1" -cf - . | lz4 -1 -q > "$2"; s=("${PIPESTATUS[@]}"); [ "${s[0]}" -le 1 ] && [ "${s[1]}" -eq 0 ]"#;
        let m = self.checked(
            "tar | lz4",
            postgres_command(Path::new("/bin/bash"))
                .current_dir(&self.dir)
                .args(["-c", script, "bash"])
                .arg(&self.data)
                .arg(&out),
        )?;
        let stored = fs::metadata(&out)?.len();
        record_backup(r, Tool::TarLz4, FULL, &m, stored);
        fs::remove_file(&out).with_context(|| format!("removing {}", out.display()))
    }

    /// Push the sampled segments into a fresh pgkeep repository and a fresh pgBackRest stanza,
    /// alternating tools segment by segment, each push of a segment already in the page cache.
    fn archive_push(&self, run: usize, r: &mut Results) -> Result<()> {
        let dir = self.fresh_dir(&format!("push-{run}"))?;
        let kconf = dir.join("pgkeep.toml");
        let bconf = dir.join("pgbackrest.conf");
        self.write_pgkeep_conf(&kconf, &dir.join("pgkeep-repo"))?;
        self.write_pgbr_conf(&bconf, PUSH_STANZA, &dir.join("pgbackrest-repo"))?;
        give_to_postgres(&dir)?;
        self.checked(
            "pgkeep init (push repository)",
            &mut self.pgkeep_cmd(&kconf, &["init"]),
        )?;
        self.checked(
            "pgBackRest stanza-create (push stanza)",
            &mut self.pgbr_cmd(&bconf, PUSH_STANZA, &["stanza-create"]),
        )?;
        // The restore before this step leaves a gigabyte of dirty pages being written back; a
        // push's fsync would queue behind them, timing the disk's backlog rather than the tool.
        run_checked(&mut Command::new("sync"))?;
        settle_disks();
        let mut segments: Vec<PathBuf> = fs::read_dir(&self.samples)?
            .map(|e| e.map(|e| e.path()))
            .collect::<std::io::Result<_>>()?;
        segments.sort();
        let mut wall = [Duration::ZERO; 2];
        let mut rss = [0u64; 2];
        for (n, seg) in segments.iter().enumerate() {
            // Who goes first alternates: the first reader of a segment could otherwise pay for
            // pages the second finds cached.
            let order = if n % 2 == 0 { [0, 1] } else { [1, 0] };
            for i in order {
                // PostgreSQL hands archive_command a segment it has just written, so its pages
                // are in memory; a sample copied minutes ago may have been reclaimed since.
                warm_page_cache(seg)?;
                let (what, mut push) = if i == 0 {
                    let args = ["archive-push", path(seg)];
                    ("pgkeep archive-push", self.pgkeep_cmd(&kconf, &args))
                } else {
                    let args = ["archive-push", path(seg)];
                    let cmd = self.pgbr_cmd(&bconf, PUSH_STANZA, &args);
                    ("pgBackRest archive-push", cmd)
                };
                let m = self.quiet_checked(what, &mut push)?;
                wall[i] += m.wall;
                rss[i] = rss[i].max(m.peak_rss);
            }
        }
        for (i, tool) in [Tool::Pgkeep, Tool::PgBackRest].into_iter().enumerate() {
            let per_segment = wall[i].as_secs_f64() / segments.len() as f64;
            r.add(Metric::PushWall, tool, per_segment);
            r.add(Metric::PushRss, tool, rss[i] as f64);
            println!(
                "    {} archive-push: {:.0} ms per segment over {} segments, peak RSS {}",
                tool.name(),
                per_segment * 1000.0,
                segments.len(),
                report::format_bytes(rss[i] as f64)
            );
        }
        fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))
    }

    /// Reads the cluster's files (but its WAL) into the page cache before a timed backup.
    fn warm_cluster(&self) {
        warm_tree(&self.data, &["pg_wal"]);
    }

    /// Every backup the bench took must pass `pgkeep validate` (once that command exists).
    fn final_validate(&self) -> Result<()> {
        step("pgkeep validate of every backup the bench took");
        let m = self.measured(
            "pgkeep validate (all)",
            &mut self.pgkeep_cmd(&self.pgkeep_conf, &["validate"]),
        )?;
        if m.ok() {
            println!("    every pgkeep backup is intact");
        } else if missing_feature(&m) {
            println!("    n/a (command failed: {})", m.first_error_line());
        } else {
            bail!(failure("pgkeep validate (all)", &m, &self.last_log()));
        }
        Ok(())
    }

    /// Start a restored data directory, let it recover to its consistent point, compare its
    /// content with the cluster's when the backup was taken.
    fn check_restored(&self, tool: &str, dir: &Path, expected: &str) -> Result<()> {
        let sock_opt = format!(
            "-c port={RESTORED_PORT} -c listen_addresses='' -c unix_socket_directories='{}' -c archive_mode=off",
            self.sock.display()
        );
        let log = self.logs.join(format!(
            "{}-server.log",
            dir.file_name()
                .and_then(|n| n.to_str())
                .unwrap_or("restored")
        ));
        let started = self
            .pg("pg_ctl")
            .args([
                "-w",
                "-t",
                "300",
                "-D",
                path(dir),
                "-l",
                path(&log),
                "-o",
                &sock_opt,
                "start",
            ])
            .output()
            .context("starting pg_ctl")?;
        let outcome = if started.status.success() {
            self.wait_restored_matches(RESTORED_PORT, expected)
        } else {
            Err(anyhow::anyhow!("the server did not start"))
        };
        self.stop_server(dir);
        outcome.with_context(|| {
            format!(
                "{tool} restore of the bench cluster is not usable: see {}",
                log.display()
            )
        })?;
        println!("    {tool} restore: started, recovered, content matches");
        fs::remove_dir_all(dir).with_context(|| format!("removing {}", dir.display()))
    }

    /// See [`sample_segments`].
    fn sample_segments(&self) -> Result<usize> {
        sample_segments(&self.data, &self.samples)
    }

    /// The newest pgkeep backup, which must be of `kind` and finished (DONE or OK).
    fn pgkeep_newest(&self, kind: &str) -> Result<PgkeepBackup> {
        let m = self.quiet_checked(
            "pgkeep show --json",
            &mut self.pgkeep_cmd(&self.pgkeep_conf, &["show", "--json"]),
        )?;
        let v: Value = serde_json::from_str(&m.stdout).context("parsing pgkeep show --json")?;
        let b = v["backups"]
            .as_array()
            .and_then(|a| a.last())
            .context("pgkeep show --json lists no backup after a backup")?;
        let (label, status) = (
            b["label"].as_str().unwrap_or(""),
            b["status"].as_str().unwrap_or(""),
        );
        if b["type"].as_str() != Some(kind) || !matches!(status, "DONE" | "OK") {
            bail!(
                "pgkeep's newest backup {label} is {} {status}, expected a finished {kind}",
                b["type"]
            );
        }
        Ok(PgkeepBackup {
            label: label.to_string(),
            data_bytes: b["data_bytes"]
                .as_u64()
                .context("pgkeep show --json: no data_bytes")?,
            stored_bytes: b["stored_bytes"]
                .as_u64()
                .context("pgkeep show --json: no stored_bytes")?,
        })
    }

    fn pgbr_info(&self) -> Result<Value> {
        let m = self.quiet_checked(
            "pgBackRest info",
            &mut self.pgbr_cmd(&self.pgbr_conf, STANZA, &["info", "--output=json"]),
        )?;
        serde_json::from_str(&m.stdout).context("parsing pgbackrest info --output=json")
    }

    /// The newest pgBackRest set, which must be of `kind`.
    fn pgbr_newest(&self, kind: &str) -> Result<PgbrBackup> {
        let info = self.pgbr_info()?;
        let b = info[0]["backup"]
            .as_array()
            .and_then(|a| a.last())
            .context("pgbackrest info lists no backup after a backup")?;
        let label = b["label"].as_str().unwrap_or("");
        if b["type"].as_str() != Some(kind) {
            bail!(
                "pgBackRest's newest set {label} is {}, expected {kind}",
                b["type"]
            );
        }
        Ok(PgbrBackup {
            label: label.to_string(),
            repo_delta: b["info"]["repository"]["delta"]
                .as_u64()
                .context("pgbackrest info: no repository delta")?,
        })
    }

    /// What `pgbackrest verify` reads, uncompressed: the data each set stores itself (not
    /// what it references) plus every archived WAL segment.
    fn pgbr_verified_bytes(&self) -> Result<u64> {
        let info = self.pgbr_info()?;
        let sets: u64 = info[0]["backup"]
            .as_array()
            .map(|a| a.iter().filter_map(|b| b["info"]["delta"].as_u64()).sum())
            .unwrap_or(0);
        let seg_size: u64 = self
            .sql("SELECT setting FROM pg_settings WHERE name = 'wal_segment_size'")?
            .parse()
            .context("reading wal_segment_size")?;
        let archive = self.pgbr_repo.join("archive").join(STANZA);
        let segments = walk_files(&archive)?
            .iter()
            .filter(|p| {
                let n = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
                n.len() > 25
                    && n[..24].chars().all(|c| c.is_ascii_hexdigit())
                    && n.as_bytes()[24] == b'-'
            })
            .count() as u64;
        Ok(sets + segments * seg_size)
    }

    // ---- processes ----

    /// Run and measure a step; any failure fails the bench with the tool, the step and why.
    fn checked(&self, what: &str, cmd: &mut Command) -> Result<Measured> {
        let m = self.quiet_checked(what, cmd)?;
        report_line(what, &m, "");
        Ok(m)
    }

    fn quiet_checked(&self, what: &str, cmd: &mut Command) -> Result<Measured> {
        let m = self.measured(what, cmd)?;
        if !m.ok() {
            bail!(failure(what, &m, &self.last_log()));
        }
        Ok(m)
    }

    fn sql(&self, sql: &str) -> Result<String> {
        self.sql_at(PORT, sql)
    }

    fn start_server(&self) -> Result<()> {
        run_checked(
            self.pg("pg_ctl")
                .args(["-w", "-t", "300", "-D", path(&self.data), "-l"])
                .arg(self.dir.join("server.log"))
                .arg("start"),
        )
    }

    fn write_pgkeep_conf(&self, file: &Path, repo: &Path) -> Result<()> {
        fs::write(
            file,
            format!(
                "[repo]\npath = \"{}\"\n[pg]\ndata = \"{}\"\nhost = \"{}\"\nport = {PORT}\nuser = \"postgres\"\n",
                repo.display(),
                self.data.display(),
                self.sock.display(),
            ),
        )
        .with_context(|| format!("writing {}", file.display()))
    }

    fn write_pgbr_conf(&self, file: &Path, stanza: &str, repo: &Path) -> Result<()> {
        // Block incremental is a beta feature in pgBackRest 2.45 (Debian 12's): it needs beta=y.
        let text = format!(
            "[global]\nrepo1-path={repo}\nrepo1-retention-full=9999\ncompress-type=lz4\nprocess-max=2\n\
             repo1-bundle=y\nbeta=y\nrepo1-block=y\nstart-fast=y\narchive-check=y\n\
             log-path={dir}/pgbackrest-log\nlog-level-console=warn\nlog-level-file=info\n\
             lock-path={dir}/pgbackrest-lock\nspool-path={dir}/pgbackrest-spool\n\n\
             [{stanza}]\npg1-path={data}\npg1-socket-path={sock}\npg1-port={PORT}\npg1-user=postgres\n",
            repo = repo.display(),
            dir = self.dir.display(),
            data = self.data.display(),
            sock = self.sock.display(),
        );
        fs::write(file, text).with_context(|| format!("writing {}", file.display()))
    }
}

/// True only when a pgkeep command failed because this build does not have it yet: clap's
/// unknown subcommand (`validate`), or backup's refusal of `--type incr`. Any other failure
/// must fail the bench.
fn missing_feature(m: &Measured) -> bool {
    m.stderr.contains("unrecognized subcommand 'validate'")
        || m.stderr
            .contains("--type incr is not available in this version of pgkeep")
}

fn failure(what: &str, m: &Measured, log: &str) -> String {
    format!(
        "{what} failed ({}): {}; full output in {log}",
        m.exit(),
        m.first_error_line()
    )
}

fn record_backup(
    r: &mut Results,
    tool: Tool,
    [wall, stored, rss]: [Metric; 3],
    m: &Measured,
    stored_bytes: u64,
) {
    r.add(wall, tool, m.wall.as_secs_f64());
    r.add(stored, tool, stored_bytes as f64);
    r.add(rss, tool, m.peak_rss as f64);
    println!(
        "    {}: {} stored",
        tool.name(),
        report::format_bytes(stored_bytes as f64)
    );
}

fn report_line(what: &str, m: &Measured, extra: &str) {
    println!(
        "    {what}: {:.2} s, peak RSS {}{}{extra}",
        m.wall.as_secs_f64(),
        report::format_bytes(m.peak_rss as f64),
        if extra.is_empty() { "" } else { ", " }
    );
}

fn step(what: &str) {
    println!("\n==> {what}");
}

/// The program's path, installing its Debian package when it is missing (`apt-get update`
/// first only if the plain install fails, as on a machine whose package lists are stale).
pub(crate) fn ensure_installed(program: &str, package: &str) -> Result<PathBuf> {
    if let Some(p) = which(program) {
        return Ok(p);
    }
    println!("{program} not found: apt-get install -y {package}");
    crate::sh::apt_install(package).with_context(|| format!("the bench needs {program}"))?;
    which(program)
        .with_context(|| format!("{program} still not on PATH after installing {package}"))
}

fn which(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .chain([PathBuf::from("/usr/bin"), PathBuf::from("/usr/local/bin")])
        .map(|d| d.join(program))
        .find(|p| p.is_file())
}

/// (what, version) of every program whose figures the table shows, as each prints it.
fn versions(pgkeep: &Path, pgbackrest: &Path, lz4: &Path) -> Result<Vec<(String, String)>> {
    let first_line = |program: &Path, args: &[&str]| -> Result<String> {
        let out = Command::new(program)
            .args(args)
            .output()
            .with_context(|| format!("running {} {}", program.display(), args.join(" ")))?;
        let text = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        Ok(text
            .lines()
            .next()
            .unwrap_or("")
            .trim()
            .trim_matches('*')
            .trim()
            .to_string())
    };
    let commit = first_line(
        Path::new("git"),
        &[
            "-C",
            path(&crate::sh::workspace_root()),
            "describe",
            "--always",
            "--dirty",
        ],
    )
    .unwrap_or_default();
    Ok(vec![
        (
            "pgkeep".into(),
            format!("{} (git {commit})", first_line(pgkeep, &["--version"])?),
        ),
        ("pgBackRest".into(), first_line(pgbackrest, &["version"])?),
        (
            "PostgreSQL".into(),
            first_line(&pg_bin()?.join("postgres"), &["--version"])?,
        ),
        ("lz4".into(), first_line(lz4, &["-V"])?),
    ])
}

fn dir_bytes(dir: &Path) -> Result<u64> {
    Ok(walk_files(dir)?
        .iter()
        .filter_map(|p| p.metadata().ok())
        .map(|m| m.len())
        .sum())
}

fn walk_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in fs::read_dir(&d).with_context(|| format!("listing {}", d.display()))? {
            let e = e?;
            if e.file_type()?.is_dir() {
                todo.push(e.path());
            } else {
                files.push(e.path());
            }
        }
    }
    Ok(files)
}

/// Reads every file under `dir` (but the subdirectories named in `skip`) into the page cache,
/// as well as it can: files of a running cluster come and go while it reads.
pub(crate) fn warm_tree(dir: &Path, skip: &[&str]) {
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        let Ok(entries) = fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let skipped = skip.iter().any(|s| e.file_name() == *s);
            match e.file_type() {
                Ok(t) if t.is_dir() && !skipped => todo.push(e.path()),
                Ok(t) if t.is_file() => {
                    let _ = warm_page_cache(&e.path());
                }
                _ => {}
            }
        }
    }
}

/// Reads `file` through, so that its pages are in the page cache when a timed step reads it.
pub(crate) fn warm_page_cache(file: &Path) -> Result<()> {
    let mut f = fs::File::open(file).with_context(|| format!("reading {}", file.display()))?;
    std::io::copy(&mut f, &mut std::io::sink())
        .with_context(|| format!("reading {}", file.display()))?;
    Ok(())
}

/// Waits (at most 30 s) until the block devices have written nothing for half a second and hold
/// no request in flight: `sync` returns once the data is handed to the device, and a virtual
/// disk may go on writing it out for seconds, slowing every fsync of the next step.
pub(crate) fn settle_disks() {
    let started = Instant::now();
    let mut last = disk_writes();
    let mut quiet_since = Instant::now();
    while started.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(100));
        let now = disk_writes();
        if now.is_none() {
            return;
        }
        if now != last || now.is_some_and(|(_, in_flight)| in_flight > 0) {
            quiet_since = Instant::now();
            last = now;
        } else if quiet_since.elapsed() >= Duration::from_millis(500) {
            break;
        }
    }
    println!(
        "    disks settled after {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

/// Sectors written and requests in flight, summed over the whole disks in /proc/diskstats
/// (partitions would count twice); `None` where that file cannot be read.
fn disk_writes() -> Option<(u64, u64)> {
    let stats = fs::read_to_string("/proc/diskstats").ok()?;
    let mut total = (0, 0);
    for line in stats.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        let whole_disk = f.get(2).is_some_and(|name| {
            !["loop", "ram", "zram"].iter().any(|p| name.starts_with(p))
                && fs::metadata(format!("/sys/block/{name}")).is_ok()
        });
        if f.len() > 11 && whole_disk {
            total.0 += f[9].parse::<u64>().unwrap_or(0);
            total.1 += f[11].parse::<u64>().unwrap_or(0);
        }
    }
    Some(total)
}

/// `cargo xtask bench --expire`: `expire` of 10 full backups (1000 files each) and 1000 archived
/// segments on a synthetic local repository (the example `expire_bench` of pgkeep-core: rows
/// and objects made directly, objects of a few bytes, since expire never reads them), median
/// of 3 runs in release mode.
fn expire() -> Result<()> {
    let mut seconds = Vec::new();
    for _ in 0..3 {
        let out = std::process::Command::new("cargo")
            .args([
                "run",
                "--quiet",
                "--release",
                "-p",
                "pgkeep-core",
                "--example",
            ])
            .arg("expire_bench")
            .output()?;
        anyhow::ensure!(
            out.status.success(),
            "expire_bench failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let line = String::from_utf8_lossy(&out.stdout);
        println!("{}", line.trim());
        let v: serde_json::Value = serde_json::from_str(line.trim())?;
        seconds.push(v["seconds"].as_f64().unwrap_or(f64::NAN));
    }
    seconds.sort_by(f64::total_cmp);
    println!(
        "expire of 10 backups (9 removed, 9000 files) and 1000 archived segments: median {:.3} s",
        seconds[1]
    );
    Ok(())
}

/// Copies up to [`PUSH_SEGMENTS`] full segments written by the data load out of `data`'s pg_wal
/// into `samples`, so every run pushes the same bytes. The newest archived segment is left out:
/// `pg_switch_wal` ended it early, so it is mostly zeros and would flatter both tools.
pub(crate) fn sample_segments(data: &Path, samples: &Path) -> Result<usize> {
    let mut done: Vec<String> = fs::read_dir(data.join("pg_wal/archive_status"))?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_str()?.strip_suffix(".done")?.to_string();
            (name.len() == 24 && name.chars().all(|c| c.is_ascii_hexdigit())).then_some(name)
        })
        .collect();
    done.sort();
    done.pop();
    let take = done.len().saturating_sub(PUSH_SEGMENTS);
    let mut n = 0;
    for name in &done[take..] {
        let from = data.join("pg_wal").join(name);
        match fs::copy(&from, samples.join(name)) {
            Ok(_) => n += 1,
            // Removed by a checkpoint since we listed it: take the others.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("copying {}", from.display())),
        }
    }
    if n == 0 {
        bail!(
            "no archived WAL segment left in {}/pg_wal to time archive-push with",
            data.display()
        );
    }
    give_to_postgres(samples)?;
    Ok(n)
}
