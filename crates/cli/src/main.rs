//! The `pgkeep` binary: parses flags and config, runs one command, maps the result to an exit code.

mod args;
mod config;
mod options;
mod output;
mod progress;
mod repos;

use std::process::ExitCode;

use clap::Parser;

use args::{Cli, Command};

/// Exit codes, documented in README.md.
mod exit {
    /// A command failed (or `archive-get` found no such file).
    pub const FAILURE: u8 = 1;
    /// Bad command line or config.
    pub const USAGE: u8 = 2;
    /// `check` or `validate` found a problem, or a `drill` failed.
    pub const FOUND_PROBLEMS: u8 = 3;
    /// `archive-get` failed for any reason but "not in the archive". PostgreSQL takes a
    /// restore_command status of 1 to 125 for "no such file" and ends recovery there, promoting
    /// with whatever it has replayed; only a status above 125 makes it stop. 255, not 128 + a
    /// signal number: 143 (SIGTERM) would read as a shutdown request.
    pub const ARCHIVE_GET_FAILED: u8 = 255;
}

fn main() -> ExitCode {
    bound_heap();
    let args = match Cli::try_parse() {
        Ok(a) => a,
        Err(e) => {
            if let Some(wal_name) = archive_get_in_raw_args() {
                // Even a bad command line must not read as "no such file" to the server.
                // clap's message up to its usage paragraph, which would not fit on a line.
                let text = e.to_string();
                let what = text.split("\n\n").next().unwrap_or_default();
                let what = what.strip_prefix("error: ").unwrap_or(what);
                eprintln!(
                    "pgkeep: error: archive-get {}: {}: fix restore_command",
                    wal_name.as_deref().unwrap_or("(no file name)"),
                    one_line(what)
                );
                return ExitCode::from(exit::ARCHIVE_GET_FAILED);
            }
            // --help and --version are not errors.
            let code = if e.use_stderr() { exit::USAGE } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    let archive_get = match &args.command {
        Command::ArchiveGet { wal_name, .. } => Some(wal_name.clone()),
        _ => None,
    };
    match run(args) {
        Ok(code) => code,
        Err(e) => {
            if let Some(wal_name) = archive_get {
                return archive_get_failed(&wal_name, &e);
            }
            let code = if e.downcast_ref::<config::ConfigError>().is_some() {
                exit::USAGE
            } else {
                exit::FAILURE
            };
            eprintln!("pgkeep: error: {}", one_line(&format!("{e:#}")));
            ExitCode::from(code)
        }
    }
}

/// The exit of a failed `archive-get`, run by PostgreSQL as restore_command: 1 only for a file
/// the archive does not hold, else 255 and one line, which lands in the server log.
fn archive_get_failed(wal_name: &str, e: &anyhow::Error) -> ExitCode {
    if let Some(pgkeep_core::Outcome::NotInArchive(_)) = e.downcast_ref() {
        // PostgreSQL probes for files that do not exist: answer quietly.
        return ExitCode::from(exit::FAILURE);
    }
    eprintln!(
        "pgkeep: error: archive-get {wal_name}: {}",
        one_line(&format!("{e:#}"))
    );
    ExitCode::from(exit::ARCHIVE_GET_FAILED)
}

/// When the raw command line names the `archive-get` command, `Some` of the WAL name it was
/// given (if any). Used only after clap refused the line, to choose the exit status.
fn archive_get_in_raw_args() -> Option<Option<String>> {
    let mut args = std::env::args_os().skip(1);
    while let Some(arg) = args.next() {
        let arg = arg.to_string_lossy();
        match arg.as_ref() {
            // The global options, the only ones that may come before the command.
            "--config" => {
                args.next();
            }
            a if a.starts_with("--config=") || a == "--allow-root" => {}
            "archive-get" => {
                while let Some(a) = args.next() {
                    let a = a.to_string_lossy();
                    if a == "--config" {
                        args.next();
                    } else if !a.starts_with('-') {
                        return Some(Some(a.into_owned()));
                    }
                }
                return Some(None);
            }
            _ => return None,
        }
    }
    None
}

/// Start `pgkeep archive-push-worker` for `pg_wal` as a detached process: its own process
/// group (signals meant for the archiver and its command do not reach it), no terminal, stderr
/// into `stderr`; it reports through the spool.
fn start_push_worker(
    cfg: &pgkeep_core::Config,
    pg_wal: &std::path::Path,
    stderr: std::fs::File,
    allow_root: bool,
) -> anyhow::Result<std::process::Child> {
    use std::os::unix::process::CommandExt;
    use std::process::{Command, Stdio};
    let exe = std::env::current_exe()?;
    let mut cmd = Command::new(exe);
    cmd.arg("--config").arg(&cfg.config_path);
    if allow_root {
        cmd.arg("--allow-root");
    }
    cmd.arg("archive-push-worker")
        .arg(pg_wal)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr)
        .process_group(0);
    Ok(cmd.spawn()?)
}

/// Errors print as one line, whatever their sources put in them.
fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn run(args: Cli) -> anyhow::Result<ExitCode> {
    if pgkeep_core::user::is_root() && !args.allow_root && !args.command.may_run_as_root() {
        return Err(config::ConfigError(
            "refusing to run as root: run pgkeep as the OS user that owns the cluster (e.g. `sudo -u postgres pgkeep ...`), or pass --allow-root".into(),
        )
        .into());
    }
    let cfg = config::load(args.config.as_deref())?;
    let allow_root = args.allow_root;
    match args.command {
        Command::Init { repo } => {
            for c in repos::every(&cfg, repo)? {
                let r = repos::in_repo(&c, pgkeep_core::init::init(&c))?;
                let verb = if r.created {
                    "created"
                } else {
                    "already initialised"
                };
                println!(
                    "{}repository {} {verb} for system identifier {} (PostgreSQL {}, block size {}, WAL segment size {})",
                    repos::prefix(&c),
                    r.repo,
                    r.identity.system_identifier,
                    r.identity.pg_major,
                    r.identity.block_size,
                    r.identity.wal_segment_size
                );
            }
        }
        Command::ArchivePush { wal_path } => {
            if cfg.archive.push_async {
                let start = |pg_wal: &std::path::Path, stderr: std::fs::File| {
                    start_push_worker(&cfg, pg_wal, stderr, allow_root)
                };
                pgkeep_core::spool::push(&cfg, &wal_path, &start)?;
            } else {
                pgkeep_core::archive::archive_push(&cfg, &wal_path)?;
            }
        }
        Command::ArchivePushWorker { pg_wal } => {
            pgkeep_core::spool::run_worker(&cfg, &pg_wal)?;
        }
        Command::ArchiveGet {
            wal_name,
            dest_path,
        } => {
            let report = pgkeep_core::archive::archive_get(&cfg, &wal_name, &dest_path)?;
            for w in &report.warnings {
                eprintln!("pgkeep: warning: archive-get {wal_name}: {}", one_line(w));
            }
        }
        Command::Check => {
            let lines = pgkeep_core::check::check(&cfg)?;
            let mut all_ok = true;
            for l in &lines {
                all_ok &= l.ok;
                println!(
                    "{:<4} {:<16} {}",
                    if l.ok { "ok" } else { "FAIL" },
                    l.what,
                    l.detail
                );
            }
            if !all_ok {
                eprintln!("pgkeep: error: check failed: fix the FAIL lines above");
                return Ok(ExitCode::from(exit::FOUND_PROBLEMS));
            }
        }
        Command::Backup {
            backup_type,
            jobs,
            scan,
            repo,
        } => {
            let cfg = repos::one(&cfg, repo)?;
            let backup_type = match backup_type {
                args::TypeArg::Full => pgkeep_core::backup::BackupType::Full,
                args::TypeArg::Diff => pgkeep_core::backup::BackupType::Diff,
                args::TypeArg::Incr => pgkeep_core::backup::BackupType::Incr,
            };
            let opts = pgkeep_core::backup::BackupOptions {
                backup_type,
                jobs,
                scan,
            };
            let progress = progress::CliProgress::new();
            let s = pgkeep_core::backup::backup(&cfg, &opts, &progress)?;
            output::print_backup_summary(&s);
            if cfg.several_repos() {
                println!("stored in {}", cfg.repo.title());
            }
            match &s.expired {
                Some(Ok(report)) => output::print_retention_report(report),
                Some(Err(e)) => eprintln!(
                    "pgkeep: warning: expire after backup {} failed: {}: the backup is intact; run `pgkeep expire` once the cause is fixed",
                    s.record.label,
                    one_line(e)
                ),
                None => {}
            }
        }
        Command::Restore(raw) => {
            if let Some(n) = raw.repo {
                repos::one(&cfg, Some(n))?;
            }
            let opts = options::restore_options(*raw)?;
            let progress = progress::CliProgress::new();
            let s = pgkeep_core::restore::restore(&cfg, &opts, &progress)?;
            if cfg.several_repos() {
                println!("restoring from {}", s.repo);
            }
            output::print_restore_summary(&s, &opts);
        }
        Command::Show { label, json, repo } => {
            if !cfg.several_repos() {
                let listing = pgkeep_core::show::show(&cfg, label.as_deref())?;
                if json {
                    println!("{}", pgkeep_core::show::backups_json(&listing));
                } else {
                    output::print_backups(&listing);
                }
                return Ok(ExitCode::SUCCESS);
            }
            repos::show(&cfg, repo, label.as_deref(), json)?;
        }
        Command::Validate { label, jobs, repo } => {
            let opts = pgkeep_core::validate::ValidateOptions { label, jobs };
            let progress = progress::CliProgress::new();
            let mut problems = 0;
            for c in repos::every(&cfg, repo)? {
                if cfg.several_repos() {
                    println!("{}:", c.repo.title());
                }
                let report =
                    repos::in_repo(&c, pgkeep_core::validate::validate(&c, &opts, &progress))?;
                output::print_validate_report(&report);
                problems += report.problems();
            }
            if problems > 0 {
                eprintln!(
                    "pgkeep: error: validate found {problems} problem(s): see the lines above"
                );
                return Ok(ExitCode::from(exit::FOUND_PROBLEMS));
            }
        }
        Command::Expire {
            dry_run,
            json,
            repo,
        } => {
            if !cfg.several_repos() {
                let report = pgkeep_core::retention::expire(&cfg, dry_run)?;
                output::print_retention(&report, json);
                return Ok(ExitCode::SUCCESS);
            }
            repos::expire(&cfg, repo, dry_run, json)?;
        }
        Command::Delete {
            label,
            force,
            json,
            repo,
        } => {
            let cfg = repos::one(&cfg, repo)?;
            let report = pgkeep_core::retention::delete(&cfg, &label, force)?;
            output::print_retention(&report, json);
        }
        Command::Pin { label, until, repo } => {
            let cfg = repos::one(&cfg, repo)?;
            let pin = match until {
                Some(t) => pgkeep_core::show::Pin::Until(options::pin_until(&t)?),
                None => pgkeep_core::show::Pin::Forever,
            };
            let b = pgkeep_core::retention::pin(&cfg, &label, Some(pin))?;
            println!(
                "backup {} pinned{}",
                b.label,
                pgkeep_core::retention::pin_text(b.pinned)
            );
        }
        Command::Unpin { label, repo } => {
            let cfg = repos::one(&cfg, repo)?;
            let b = pgkeep_core::retention::pin(&cfg, &label, None)?;
            println!("backup {} unpinned", b.label);
        }
        Command::Drill {
            backup,
            target_time,
            jobs,
            json,
            keep,
            repo,
        } => {
            let cfg = repos::one(&cfg, repo)?;
            let opts = pgkeep_core::drill::DrillOptions {
                backup,
                target_time: target_time
                    .as_deref()
                    .map(|t| options::parse_time(t, "--target-time"))
                    .transpose()?,
                jobs,
                keep,
            };
            let progress = progress::CliProgress::new();
            let report = pgkeep_core::drill::drill(&cfg, &opts, &progress)?;
            if json {
                println!("{}", pgkeep_core::drill::report_json(&report));
            } else {
                output::print_drill_report(&report);
            }
            if let Some(message) = &report.record.message {
                eprintln!(
                    "pgkeep: error: drill of backup {} failed: {}",
                    report.record.backup_label,
                    one_line(message)
                );
                return Ok(ExitCode::from(exit::FOUND_PROBLEMS));
            }
        }
        Command::Catalog {
            command: args::CatalogCommand::Rebuild { repo },
        } => {
            let progress = progress::CliProgress::new();
            for c in repos::every(&cfg, repo)? {
                if cfg.several_repos() {
                    println!("{}:", c.repo.title());
                }
                let report = repos::in_repo(&c, pgkeep_core::rebuild::rebuild(&c, &progress))?;
                output::print_rebuild_report(&report);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Buffers of 1 MiB and more (copy chunks, lz4 blocks, object parts) get pages of their own
/// that go back to the system when freed. glibc otherwise raises its mmap threshold after the
/// first such buffer is freed and serves later ones from per-thread arenas that keep freed
/// memory: a full backup to S3 then peaked at 63-155 MiB from run to run, with this at 48 MiB.
fn bound_heap() {
    // SAFETY: mallopt only changes allocator tuning; called before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 4 << 20);
    }
}
