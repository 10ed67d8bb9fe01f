//! Process helpers for the xtasks: building, finding PostgreSQL, running as `postgres`.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// `cargo build --release -p pgkeep-cli`; returns the binary's path.
pub fn cargo_build_release() -> Result<PathBuf> {
    run_checked(Command::new("cargo").args(["build", "--release", "-p", "pgkeep-cli"]))?;
    Ok(target_dir().join("release/pgkeep"))
}

/// Cargo's target directory: `$CARGO_TARGET_DIR`, else the workspace's `target`.
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"))
}

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

/// `$PGKEEP_PG_BIN`, else the newest `/usr/lib/postgresql/*/bin`; on a fresh machine (as root)
/// Debian's `postgresql` package is installed first, which also creates the `postgres` user.
pub fn pg_bin() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os("PGKEEP_PG_BIN") {
        return Ok(PathBuf::from(dir));
    }
    if let Some(bin) = newest_pg_bin() {
        return Ok(bin);
    }
    if !is_root() {
        bail!("no initdb under /usr/lib/postgresql/*/bin: apt-get install postgresql, or set PGKEEP_PG_BIN");
    }
    println!("PostgreSQL not found: apt-get install -y postgresql");
    apt_install("postgresql")?;
    newest_pg_bin().context("no initdb under /usr/lib/postgresql/*/bin after installing postgresql")
}

fn newest_pg_bin() -> Option<PathBuf> {
    let mut majors: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| e.ok())
        .filter_map(|e| Some((e.file_name().to_str()?.parse().ok()?, e.path().join("bin"))))
        .filter(|(_, b): &(u32, PathBuf)| b.join("initdb").exists())
        .collect();
    majors.sort();
    majors.pop().map(|(_, b)| b)
}

/// `apt-get install -y PACKAGE`, running `apt-get update` first only if the plain install fails
/// (as on a machine whose package lists are stale or absent).
pub fn apt_install(package: &str) -> Result<()> {
    let plain = Command::new("apt-get")
        .args(["install", "-y", "-q", package])
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status();
    if !plain.is_ok_and(|s| s.success()) {
        run_checked(Command::new("apt-get").arg("update"))?;
        run_checked(
            Command::new("apt-get")
                .args(["install", "-y", "-q", package])
                .env("DEBIAN_FRONTEND", "noninteractive"),
        )
        .with_context(|| format!("installing {package}"))?;
    }
    Ok(())
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// A command that runs as the `postgres` OS user when we are root (PostgreSQL refuses root).
pub fn postgres_command(program: &Path) -> Command {
    if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(program);
        c
    } else {
        Command::new(program)
    }
}

/// Like `postgres_command`, but switching user in the spawned process itself rather than
/// through `runuser`, whose PAM session costs a few milliseconds per command: for the commands
/// the bench times, which PostgreSQL (archive_command) or cron would also start directly.
pub fn postgres_command_direct(program: &Path) -> Command {
    let mut c = Command::new(program);
    if let Some((uid, gid, home)) = postgres_user().filter(|_| is_root()) {
        use std::os::unix::process::CommandExt;
        // Setting the uid as root also drops the supplementary groups.
        c.uid(uid)
            .gid(gid)
            .env("HOME", home)
            .env("USER", "postgres")
            .env("LOGNAME", "postgres");
    }
    c
}

/// uid, gid and home directory of the `postgres` OS user, from /etc/passwd.
fn postgres_user() -> Option<(u32, u32, String)> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|line| {
        let f: Vec<&str> = line.split(':').collect();
        (f.len() >= 6 && f[0] == "postgres")
            .then(|| Some((f[2].parse().ok()?, f[3].parse().ok()?, f[5].to_string())))?
    })
}

/// Give a directory tree to the `postgres` OS user when we are root.
pub fn give_to_postgres(dir: &Path) -> Result<()> {
    if is_root() {
        run_checked(
            Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(dir),
        )?;
    }
    Ok(())
}

pub fn run_checked(c: &mut Command) -> Result<()> {
    let status = c.status().with_context(|| format!("starting {c:?}"))?;
    if !status.success() {
        bail!("{c:?} failed with {status}");
    }
    Ok(())
}

/// Wait until PostgreSQL has archived every finished WAL file of `data` (no `.ready` left).
pub fn wait_archive_drained(data: &Path, timeout: Duration, server_log: &Path) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        let ready = fs::read_dir(data.join("pg_wal/archive_status"))?
            .filter_map(|e| e.ok())
            .any(|e| e.file_name().to_string_lossy().ends_with(".ready"));
        if !ready {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    bail!(
        "WAL was not archived within {} s: see {}",
        timeout.as_secs(),
        server_log.display()
    )
}

/// A path as a command-line argument; the xtasks only make UTF-8 paths.
pub fn path(p: &Path) -> &str {
    p.to_str().unwrap_or_default()
}

pub fn append(file: &Path, text: &str) -> Result<()> {
    let mut current =
        fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    current.push_str(text);
    fs::write(file, current).with_context(|| format!("writing {}", file.display()))
}
