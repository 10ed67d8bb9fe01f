//! Throwaway PostgreSQL clusters and a runner for the real `pgkeep` binary.
//!
//! Servers never run as root: when the tests run as root (as CI does), every PostgreSQL program
//! and every pgkeep command runs as the `postgres` OS user through `runuser`, in a temp directory
//! under /tmp that user owns, with a copy of the pgkeep binary that user can execute.

#![allow(dead_code)]

use std::ffi::OsStr;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::{Duration, Instant};

pub mod s3;

/// The PostgreSQL server binaries (initdb, pg_ctl, postgres): `$PGKEEP_PG_BIN`, else the newest
/// `/usr/lib/postgresql/*/bin`.
pub fn pg_bin() -> PathBuf {
    if let Some(dir) = std::env::var_os("PGKEEP_PG_BIN") {
        return PathBuf::from(dir);
    }
    debian_bin()
}

/// The newest Debian PostgreSQL `bin` directory, which also has the client tools.
fn debian_bin() -> PathBuf {
    let mut found: Vec<(u32, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
        .expect("no /usr/lib/postgresql: install PostgreSQL server packages or set PGKEEP_PG_BIN")
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let major = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((major, bin))
        })
        .collect();
    found.sort();
    found
        .pop()
        .map(|(_, b)| b)
        .expect("no PostgreSQL server found under /usr/lib/postgresql: set PGKEEP_PG_BIN")
}

/// A client program (pgbench, pg_checksums ...): from the server's directory when it has one
/// (a server-only build such as the version matrix's has none), else from Debian's.
pub fn pg_client(tool: &str) -> PathBuf {
    let own = pg_bin().join(tool);
    if own.exists() {
        return own;
    }
    debian_bin().join(tool)
}

/// Major version of a PostgreSQL program, from its `--version` line.
pub fn major_of(program: &Path) -> u32 {
    let out = Command::new(program).arg("--version").output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace()
        .find_map(|w| w.split('.').next()?.parse().ok())
        .unwrap_or_else(|| panic!("cannot read the version of {}: {text}", program.display()))
}

/// Major version of the server the tests run.
pub fn server_major() -> u32 {
    static MAJOR: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    *MAJOR.get_or_init(|| major_of(&pg_bin().join("postgres")))
}

pub fn is_root() -> bool {
    // SAFETY: geteuid cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// uid and gid of the `postgres` OS user.
fn postgres_ids() -> (u32, u32) {
    let name = std::ffi::CString::new("postgres").unwrap();
    // SAFETY: getpwnam returns a pointer to static storage or null; read before any other call.
    let pw = unsafe { libc::getpwnam(name.as_ptr()) };
    assert!(!pw.is_null(), "tests run as root need a `postgres` OS user");
    unsafe { ((*pw).pw_uid, (*pw).pw_gid) }
}

/// Give a path to the `postgres` user when running as root.
pub fn chown_to_postgres(path: &Path) {
    if is_root() {
        let (uid, gid) = postgres_ids();
        std::os::unix::fs::chown(path, Some(uid), Some(gid)).unwrap();
    }
}

/// After a test edited the catalog as root, give SQLite's side files back to the `postgres`
/// user, or the next pgkeep command cannot open the catalog.
pub fn give_catalog_to_postgres(repo: &Path) {
    for sidecar in ["catalog.db-wal", "catalog.db-shm"] {
        let p = repo.join(sidecar);
        if p.exists() {
            chown_to_postgres(&p);
        }
    }
}

/// Flips one bit of a stored lz4 object at `path`, at or after its middle, where that changes
/// what the object decodes to. Not every flip in an lz4 stream does: one in the offset of a
/// match inside a run of zeros can point at other zeros and decode to the very same bytes, and
/// the object is then intact, which is what a checksum of the content rightly says.
pub fn corrupt_stored_object(path: &Path) {
    use std::io::Read;
    let decode = |bytes: &[u8]| {
        let mut out = Vec::new();
        let mut reader = pgkeep_repo::DecompressReader::new(bytes, false);
        reader.read_to_end(&mut out).ok().map(|_| out)
    };
    let good = fs::read(path).unwrap();
    let original = decode(&good).expect("the object decodes before it is damaged");
    for pos in good.len() / 2..good.len() {
        let mut bad = good.clone();
        bad[pos] ^= 0x40;
        if decode(&bad).as_ref() != Some(&original) {
            fs::write(path, bad).unwrap();
            return;
        }
    }
    panic!(
        "no flipped bit in the second half of {} changes its content",
        path.display()
    );
}

/// A command that runs as the cluster's OS user: `postgres` under `runuser` when we are root.
pub fn user_command(program: impl AsRef<OsStr>) -> Command {
    if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(program);
        c
    } else {
        Command::new(program)
    }
}

/// A temp directory under /tmp that the `postgres` user owns; removed on drop.
pub struct TestDir {
    dir: tempfile::TempDir,
}

impl TestDir {
    pub fn new() -> TestDir {
        let dir = tempfile::Builder::new()
            .prefix("pgkeep-test-")
            .tempdir_in("/tmp")
            .unwrap();
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
        chown_to_postgres(dir.path());
        TestDir { dir }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// A subdirectory owned by the `postgres` user.
    pub fn subdir(&self, name: &str) -> PathBuf {
        let p = self.path().join(name);
        fs::create_dir_all(&p).unwrap();
        chown_to_postgres(&p);
        p
    }

    /// Write a file owned by the `postgres` user.
    pub fn write(&self, name: &str, contents: impl AsRef<[u8]>) -> PathBuf {
        let p = self.path().join(name);
        fs::write(&p, contents).unwrap();
        chown_to_postgres(&p);
        p
    }
}

/// The pgkeep binary copied where the `postgres` user can run it (the build dir may be under
/// /root). One copy per test directory keeps tests independent.
fn install_pgkeep(dir: &TestDir) -> PathBuf {
    let bin_dir = dir.subdir("bin");
    let bin = bin_dir.join("pgkeep");
    fs::copy(env!("CARGO_BIN_EXE_pgkeep"), &bin).unwrap();
    fs::set_permissions(&bin, fs::Permissions::from_mode(0o755)).unwrap();
    bin
}

/// Output of a finished command with its streams as text.
pub struct Run {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    pub fn from_output(out: Output) -> Run {
        Run {
            code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    pub fn success(&self) -> bool {
        self.code == Some(0)
    }
}

impl std::fmt::Debug for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exit {:?}\n--- stdout\n{}\n--- stderr\n{}",
            self.code, self.stdout, self.stderr
        )
    }
}

/// Options for a new cluster.
#[derive(Clone, Debug)]
pub struct ClusterOptions {
    /// `archive_command` = pgkeep archive-push into this cluster's repository.
    pub archive: bool,
    /// Run `pgkeep init` once the server is up.
    pub init_repo: bool,
    /// Extra postgresql.conf lines.
    pub conf: Vec<String>,
    /// Extra initdb arguments.
    pub initdb_args: Vec<String>,
    /// The body of the `[repo]` table, in place of a local `path` (an S3 repository), or
    /// `[[repo]]` entries in place of the table; `{dir}` stands for the cluster's temp directory.
    pub repo_toml: Option<String>,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        ClusterOptions {
            archive: true,
            init_repo: true,
            conf: Vec::new(),
            initdb_args: Vec::new(),
            repo_toml: None,
        }
    }
}

static NEXT_PORT: AtomicU16 = AtomicU16::new(0);

fn next_port() -> u16 {
    // The socket directory is private to the cluster, so the port only has to differ between
    // clusters of one test process; spread by pid anyway to keep server logs readable.
    let n = NEXT_PORT.fetch_add(1, Ordering::Relaxed);
    20000 + ((std::process::id() % 2000) as u16) * 16 + n % 16
}

/// A pgkeep config for the server at `data`, `sock` and `port`, with `[primary]` at the given
/// socket directory and port when it is a standby.
pub fn config_text(
    repo: &Path,
    data: &Path,
    sock: &Path,
    port: u16,
    primary: Option<(&Path, u16)>,
) -> String {
    let mut text = format!(
        "[repo]\npath = \"{}\"\n[pg]\ndata = \"{}\"\nhost = \"{}\"\nport = {port}\nuser = \"postgres\"\n[backup]\narchive-timeout = 60\n[archive]\ncheck-timeout = 30\n",
        repo.display(),
        data.display(),
        sock.display()
    );
    if let Some((host, port)) = primary {
        text.push_str(&format!(
            "[primary]\nhost = \"{}\"\nport = {port}\nuser = \"postgres\"\n",
            host.display()
        ));
    }
    text
}

/// A running throwaway cluster with its own pgkeep config and repository.
pub struct Cluster {
    pub dir: TestDir,
    pub data: PathBuf,
    pub sock: PathBuf,
    pub port: u16,
    pub pgkeep_bin: PathBuf,
    pub config: PathBuf,
    pub repo: PathBuf,
    pub log: PathBuf,
    running: bool,
}

impl Cluster {
    /// initdb -k, archive to pgkeep, start, `pgkeep init`.
    pub fn new() -> Cluster {
        Cluster::with(ClusterOptions::default())
    }

    pub fn with(opts: ClusterOptions) -> Cluster {
        let dir = TestDir::new();
        let repo = dir.path().join("repo");
        let mut cluster = Cluster::unstarted(dir, repo, None);
        if let Some(body) = &opts.repo_toml {
            // Another repository than the local default (an S3 bucket): swap the [repo] table.
            // A body of `[[repo]]` entries (several repositories) replaces the whole table.
            let body = body.replace("{dir}", &cluster.dir.path().display().to_string());
            let tables = if body.starts_with("[[repo]]") {
                body
            } else {
                format!("[repo]\n{body}")
            };
            let text = fs::read_to_string(&cluster.config).unwrap().replace(
                &format!("[repo]\npath = \"{}\"\n", cluster.repo.display()),
                &tables,
            );
            fs::write(&cluster.config, text).unwrap();
        }
        let c = &cluster;
        let out = user_command(pg_bin().join("initdb"))
            .current_dir(c.dir.path())
            .args([
                "-k",
                "-N",
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--locale=C",
                "-D",
            ])
            .arg(&c.data)
            .args(&opts.initdb_args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "initdb failed: {:?}",
            Run::from_output(out)
        );
        let mut conf = vec![
            format!("port = {}", c.port),
            "listen_addresses = ''".to_string(),
            format!("unix_socket_directories = '{}'", c.sock.display()),
            "wal_level = replica".to_string(),
            "max_wal_senders = 4".to_string(),
            "fsync = off".to_string(),
            "shared_buffers = 64MB".to_string(),
            "max_wal_size = 2GB".to_string(),
            // wal_keep_size replaced wal_keep_segments in PostgreSQL 13.
            if server_major() >= 13 {
                "wal_keep_size = 2GB".to_string()
            } else {
                "wal_keep_segments = 128".to_string()
            },
            "log_min_messages = warning".to_string(),
        ];
        if opts.archive {
            conf.push("archive_mode = on".to_string());
            conf.push(format!(
                "archive_command = '{} --config {} archive-push %p'",
                c.pgkeep_bin.display(),
                c.config.display()
            ));
        }
        conf.extend(opts.conf.iter().cloned());
        let mut text = fs::read_to_string(c.data.join("postgresql.conf")).unwrap();
        text.push_str("\n# test harness\n");
        text.push_str(&conf.join("\n"));
        text.push('\n');
        fs::write(c.data.join("postgresql.conf"), text).unwrap();
        cluster.start();
        if opts.init_repo {
            cluster.pgkeep_ok(&["init"]);
        }
        cluster
    }

    pub fn start(&mut self) {
        let out = self.pg_ctl_start();
        if !out.status.success() {
            panic!(
                "pg_ctl start failed: {:?}\n--- server log\n{}",
                Run::from_output(out),
                fs::read_to_string(&self.log).unwrap_or_default()
            );
        }
        self.running = true;
    }

    /// Start the server and say whether it came up; for tests in which the startup process may
    /// rightly give up (a recovery that must stop). The cluster counts as running either way, so
    /// a postmaster that did come up is stopped on drop.
    pub fn try_start(&mut self) -> bool {
        let out = self.pg_ctl_start();
        self.running = true;
        out.status.success()
    }

    /// True while a postmaster holds this cluster's data directory.
    pub fn postmaster_alive(&self) -> bool {
        user_command(pg_bin().join("pg_ctl"))
            .current_dir("/tmp")
            .arg("-D")
            .arg(&self.data)
            .arg("status")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .unwrap()
            .success()
    }

    fn pg_ctl_start(&self) -> Output {
        user_command(pg_bin().join("pg_ctl"))
            .current_dir(self.dir.path())
            .args(["-w", "-t", "60", "-D"])
            .arg(&self.data)
            .arg("-l")
            .arg(&self.log)
            .arg("start")
            .stdout(Stdio::null())
            .output()
            .unwrap()
    }

    /// Stop with a clean shutdown (checkpoint), as a DBA would before wiping a cluster.
    pub fn stop(&mut self) {
        if self.running {
            pg_ctl_stop(&self.data, "fast");
            self.running = false;
        }
    }

    pub fn is_running(&self) -> bool {
        self.running
    }

    /// A new client connection.
    pub fn client(&self) -> postgres::Client {
        postgres::Config::new()
            .host(self.sock.to_str().unwrap())
            .port(self.port)
            .user("postgres")
            .dbname("postgres")
            .connect(postgres::NoTls)
            .unwrap_or_else(|e| panic!("connect to test cluster: {e}"))
    }

    /// Run SQL statements, each on its own (so VACUUM and CREATE TABLESPACE may be among them).
    pub fn execute(&self, sql: &str) {
        let mut client = self.client();
        for stmt in sql.split(';').map(str::trim).filter(|s| !s.is_empty()) {
            client.batch_execute(stmt).unwrap_or_else(|e| {
                let detail = e
                    .as_db_error()
                    .map_or_else(|| e.to_string(), |d| d.message().to_string());
                panic!("{stmt}: {detail}")
            });
        }
    }

    /// First column of the first row, as text (cast in SQL with ::text).
    pub fn query_text(&self, sql: &str) -> String {
        let row = self
            .client()
            .query_one(sql, &[])
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
        row.get(0)
    }

    /// Run pgkeep with this cluster's config, as the cluster's OS user.
    pub fn pgkeep(&self, args: &[&str]) -> Run {
        self.pgkeep_in(self.dir.path(), args)
    }

    /// Same, from a given working directory (PostgreSQL runs archive-push from the data dir).
    pub fn pgkeep_in(&self, cwd: &Path, args: &[&str]) -> Run {
        let out = user_command(&self.pgkeep_bin)
            .current_dir(cwd)
            .arg("--config")
            .arg(&self.config)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        Run::from_output(out)
    }

    /// Run pgkeep and panic with its output unless it exits 0.
    pub fn pgkeep_ok(&self, args: &[&str]) -> Run {
        let run = self.pgkeep(args);
        assert!(run.success(), "pgkeep {args:?} failed: {run:?}");
        run
    }

    /// Switch WAL and wait until PostgreSQL reports the switched segment archived.
    pub fn switch_wal_and_wait(&self) -> String {
        self.execute("SELECT pg_create_restore_point('test')");
        let seg = self.query_text("SELECT pg_walfile_name(pg_switch_wal())");
        self.wait_archived(&seg);
        seg
    }

    /// Wait until `pg_stat_archiver.last_archived_wal` reaches `segment`.
    pub fn wait_archived(&self, segment: &str) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let last =
                self.query_text("SELECT coalesce(last_archived_wal, '') FROM pg_stat_archiver");
            if last.as_str() >= segment {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "segment {segment} not archived after 60 s (last {last}); server log:\n{}",
                fs::read_to_string(&self.log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Run a PostgreSQL client program (pgbench, pg_checksums ...) against this cluster.
    pub fn pg_tool(&self, tool: &str, args: &[&str]) -> Run {
        let out = user_command(pg_client(tool))
            .current_dir(self.dir.path())
            .env("PGHOST", &self.sock)
            .env("PGPORT", self.port.to_string())
            .env("PGUSER", "postgres")
            .env("PGDATABASE", "postgres")
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        Run::from_output(out)
    }

    /// pg_amcheck on the running cluster, then stop it and pg_checksums on its files: both
    /// clean. A check the tools cannot make on this major is skipped and says so: pg_amcheck
    /// needs amcheck 1.3 (PostgreSQL 14+), pg_checksums reads only its own major's pg_control.
    pub fn check_pages_and_stop(&mut self) {
        if server_major() >= 14 {
            self.pg_tool_ok(
                "pg_amcheck",
                &["--all", "--install-missing", "--heapallindexed"],
            );
        } else {
            eprintln!(
                "skipped pg_amcheck: PostgreSQL {} has no amcheck 1.3",
                server_major()
            );
        }
        self.stop();
        let tool = pg_client("pg_checksums");
        if major_of(&tool) == server_major() {
            self.pg_tool_ok(
                "pg_checksums",
                &["--check", "-D", self.data.to_str().unwrap()],
            );
        } else {
            eprintln!(
                "skipped pg_checksums: {} is not for PostgreSQL {}",
                tool.display(),
                server_major()
            );
        }
    }

    pub fn pg_tool_ok(&self, tool: &str, args: &[&str]) -> Run {
        let run = self.pg_tool(tool, args);
        assert!(run.success(), "{tool} {args:?} failed: {run:?}");
        run
    }
}

fn pg_ctl_stop(data: &Path, mode: &str) {
    let _ = user_command(pg_bin().join("pg_ctl"))
        .current_dir("/tmp")
        .args(["-w", "-t", "60", "-m", mode, "-D"])
        .arg(data)
        .arg("stop")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // Also runs when a test panics, so no server outlives its test.
        if self.running {
            pg_ctl_stop(&self.data, "immediate");
        }
    }
}

/// SIGKILL a process and its children (under runuser, the real pgkeep is runuser's child).
pub fn kill_tree(pid: u32) {
    let children =
        fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
    for child in children.split_whitespace() {
        if let Ok(c) = child.parse() {
            kill_tree(c);
        }
    }
    // SAFETY: sending a signal to a process this test spawned.
    unsafe {
        libc::kill(pid as i32, libc::SIGKILL);
    }
}

impl Cluster {
    /// Stop the server and delete its data directory, as after losing the machine.
    pub fn stop_and_wipe(&mut self) {
        self.stop();
        fs::remove_dir_all(&self.data).unwrap();
    }

    /// Stop and wipe, restore with `args` and `--target-action promote`, start and wait until
    /// the server accepts writes.
    pub fn restore_and_promote(&mut self, args: &[&str]) {
        self.stop_and_wipe();
        let mut all = args.to_vec();
        all.extend(["--target-action", "promote"]);
        let run = self.restore(&all);
        assert!(run.success(), "{run:?}");
        self.start();
        self.wait_promoted();
    }

    /// Restore into this cluster's (wiped) data directory with extra restore flags.
    pub fn restore(&self, args: &[&str]) -> Run {
        let mut full = vec!["restore", "--pgdata", self.data.to_str().unwrap()];
        full.extend_from_slice(args);
        self.pgkeep(&full)
    }

    /// Wait until recovery has ended and the server accepts writes.
    pub fn wait_promoted(&self) {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let done = postgres::Config::new()
                .host(self.sock.to_str().unwrap())
                .port(self.port)
                .user("postgres")
                .dbname("postgres")
                .connect(postgres::NoTls)
                .ok()
                .and_then(|mut c| c.query_one("SELECT NOT pg_is_in_recovery()", &[]).ok())
                .is_some_and(|r| r.get::<_, bool>(0));
            if done {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "recovery did not finish in 120 s; server log:\n{}",
                fs::read_to_string(&self.log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// md5 of a table's rows in key order: equal fingerprints mean equal contents.
    pub fn fingerprint(&self, table: &str, order_by: &str) -> String {
        self.query_text(&format!(
            "SELECT count(*) || ':' || coalesce(md5(string_agg(t::text, ',' ORDER BY {order_by})), '') FROM {table} t"
        ))
    }

    /// Fingerprints of the four pgbench tables, in a fixed order.
    pub fn pgbench_fingerprints(&self) -> Vec<String> {
        [
            ("pgbench_accounts", "aid"),
            ("pgbench_branches", "bid"),
            ("pgbench_tellers", "tid"),
            ("pgbench_history", "t::text"),
        ]
        .iter()
        .map(|(t, k)| self.fingerprint(t, k))
        .collect()
    }

    /// The backups `show --json` lists.
    pub fn backups(&self) -> Vec<serde_json::Value> {
        let run = self.pgkeep_ok(&["show", "--json"]);
        let v: serde_json::Value = serde_json::from_str(&run.stdout).unwrap();
        v["backups"].as_array().unwrap().clone()
    }

    /// Take a backup and return its `show --json` entry.
    pub fn backup(&self, kind: &str) -> serde_json::Value {
        let run = self.pgkeep_ok(&["backup", "--type", kind]);
        let label = run.stdout.split_whitespace().nth(1).unwrap().to_string();
        self.backups()
            .into_iter()
            .find(|b| b["label"] == label.as_str())
            .unwrap_or_else(|| panic!("backup {label} not listed"))
    }

    /// Paths (relative to PGDATA) of the files a backup stored in the repository.
    pub fn stored_paths(&self, label: &str) -> Vec<String> {
        let root = self.repo.join("backup").join(label).join("data");
        let mut out = Vec::new();
        let mut stack = vec![root.clone()];
        while let Some(dir) = stack.pop() {
            for e in fs::read_dir(&dir).unwrap() {
                let p = e.unwrap().path();
                if p.is_dir() {
                    stack.push(p);
                } else if let Some(rel) = p
                    .strip_prefix(&root)
                    .unwrap()
                    .to_str()
                    .unwrap()
                    .strip_suffix(".lz4")
                {
                    out.push(rel.to_string());
                }
            }
        }
        out.sort();
        out
    }
}

/// Every entry under `root` by relative path, with a file's bytes or a link's target (links are
/// not followed; a directory has no content): equal trees hold the same bytes.
pub fn tree(root: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
            let meta = fs::symlink_metadata(&p).unwrap();
            if meta.file_type().is_symlink() {
                let target = fs::read_link(&p).unwrap();
                out.push((rel, format!("-> {}", target.display()).into_bytes()));
            } else if meta.is_dir() {
                out.push((rel, Vec::new()));
                stack.push(p);
            } else {
                out.push((rel, fs::read(&p).unwrap()));
            }
        }
    }
    out.sort();
    out
}

/// Start a server on another data directory (a restored copy) with this cluster's settings;
/// true when it came up. The copy shares the port and socket, so this cluster must be stopped.
pub fn pg_ctl_start(data: &Path, log: &Path) -> bool {
    user_command(pg_bin().join("pg_ctl"))
        .current_dir("/tmp")
        .args(["-w", "-t", "60", "-D"])
        .arg(data)
        .arg("-l")
        .arg(log)
        .arg("start")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap()
        .success()
}

/// Stop the server of a data directory started with [`pg_ctl_start`] (fast shutdown).
pub fn pg_ctl_stop_fast(data: &Path) {
    pg_ctl_stop(data, "fast");
}

impl Cluster {
    /// A second server beside this one, for a replica: its own directory, port, socket and log,
    /// and a pgkeep config whose `[pg]` is the replica, `[primary]` this cluster and `[repo]`
    /// this cluster's repository. Its data directory does not exist yet: fill it (see
    /// [`Cluster::standby_of`], or `restore --standby`), call [`Cluster::own_settings`], start.
    pub fn replica_dir(&self) -> Cluster {
        Cluster::unstarted(
            TestDir::new(),
            self.repo.clone(),
            Some((&self.sock, self.port)),
        )
    }

    /// A server's places in `dir` (its data directory not yet created), its pgkeep and config.
    fn unstarted(dir: TestDir, repo: PathBuf, primary: Option<(&Path, u16)>) -> Cluster {
        let data = dir.path().join("data");
        let sock = dir.subdir("sock");
        let log = dir.path().join("server.log");
        let pgkeep_bin = install_pgkeep(&dir);
        let port = next_port();
        let config = dir.write(
            "pgkeep.toml",
            config_text(&repo, &data, &sock, port, primary),
        );
        Cluster {
            dir,
            data,
            sock,
            port,
            pgkeep_bin,
            config,
            repo,
            log,
            running: false,
        }
    }

    /// A streaming standby of this cluster, made by `pg_basebackup -R` and started.
    pub fn standby_of(primary: &Cluster) -> Cluster {
        let mut standby = primary.replica_dir();
        let run = user_command(pg_client("pg_basebackup"))
            .current_dir(standby.dir.path())
            .args(["-R", "-X", "stream", "-c", "fast", "-U", "postgres", "-h"])
            .arg(&primary.sock)
            .arg("-p")
            .arg(primary.port.to_string())
            .arg("-D")
            .arg(&standby.data)
            .output()
            .unwrap();
        let run = Run::from_output(run);
        assert!(run.success(), "pg_basebackup failed: {run:?}");
        standby.own_settings();
        standby.start();
        standby.wait_streaming_from(primary);
        standby
    }

    /// Give a data directory copied from another cluster this server's port and socket, and an
    /// archive_command with this server's config (which takes effect once it is promoted), as
    /// each host of a real pair has its own. postgresql.auto.conf wins over postgresql.conf.
    pub fn own_settings(&self) {
        let auto = self.data.join("postgresql.auto.conf");
        let mut text = fs::read_to_string(&auto).unwrap_or_default();
        text.push_str(&format!(
            "port = {}\nunix_socket_directories = '{}'\narchive_command = '{} --config {} archive-push %p'\n",
            self.port,
            self.sock.display(),
            self.pgkeep_bin.display(),
            self.config.display()
        ));
        fs::write(&auto, text).unwrap();
        chown_to_postgres(&auto);
    }

    /// libpq connection string of this server, for a replica's primary_conninfo.
    pub fn conninfo(&self) -> String {
        format!(
            "host={} port={} user=postgres",
            self.sock.display(),
            self.port
        )
    }

    /// Wait until `primary`'s pg_stat_replication shows a streaming standby and this server has
    /// replayed everything the primary had written when asked.
    pub fn wait_streaming_from(&self, primary: &Cluster) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while primary
            .query_text("SELECT count(*)::text FROM pg_stat_replication WHERE state = 'streaming'")
            == "0"
        {
            assert!(
                Instant::now() < deadline,
                "no streaming standby after 60 s; standby log:\n{}",
                fs::read_to_string(&self.log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        self.wait_replayed(primary);
    }

    /// Wait until this standby has replayed what `primary` had written when asked.
    pub fn wait_replayed(&self, primary: &Cluster) {
        let target = primary.query_text("SELECT pg_current_wal_lsn()::text");
        let deadline = Instant::now() + Duration::from_secs(60);
        let sql = format!("SELECT (pg_last_wal_replay_lsn() >= '{target}')::text");
        while self.query_text(&sql) != "true" {
            assert!(
                Instant::now() < deadline,
                "standby did not replay {target} in 60 s; standby log:\n{}",
                fs::read_to_string(&self.log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Cluster {
    /// Put `line` into `[section]` of this cluster's pgkeep config (the section is added at the
    /// end when the config has none).
    pub fn set_config(&self, section: &str, line: &str) {
        let text = fs::read_to_string(&self.config).unwrap();
        let header = format!("[{section}]\n");
        let text = match text.find(&header) {
            Some(at) => {
                let at = at + header.len();
                format!("{}{line}\n{}", &text[..at], &text[at..])
            }
            None => format!("{text}{header}{line}\n"),
        };
        fs::write(&self.config, text).unwrap();
    }
}

/// What a drill left behind under `dir`, its `[drill] dir`: entries in the directory and
/// processes whose command line names it (a postmaster of a sandbox there).
pub fn drill_leftovers(dir: &Path) -> Vec<String> {
    let mut found: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path().display().to_string())
        .collect();
    let needle = dir.to_str().unwrap().as_bytes();
    for proc_entry in fs::read_dir("/proc").unwrap().flatten() {
        let Ok(cmdline) = fs::read(proc_entry.path().join("cmdline")) else {
            continue;
        };
        if cmdline.windows(needle.len()).any(|w| w == needle) {
            let text = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            // The test's own pgkeep runs (already finished) and this scan do not count.
            if text.contains("postgres") && !text.contains("pgkeep") {
                found.push(format!("process: {text}"));
            }
        }
    }
    found
}
