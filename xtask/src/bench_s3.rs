//! `cargo xtask bench --s3 [--scale S] [--runs N] [--keep]`: pgkeep against pgBackRest on one
//! s3s-fs server, both over TLS (socat in front, endpoint `localhost`, a private CA made for the
//! run whose leaf is not a CA), TCP_NODELAY set on the server's accepted sockets by an
//! LD_PRELOAD shim compiled here with gcc, so the figures measure the tools and not Nagle's
//! delayed ACKs. Rows: full backup, restore, archive-push per segment, and the peak RSS of each;
//! the order of the tools alternates run by run and the table shows medians. Every restore is
//! started and its content compared with the cluster's before its time counts.

use std::fs;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::bench::measure::Measured;
use crate::bench::report::{format_bytes, load_average, Machine};
use crate::bench::{
    ensure_installed, warm_page_cache, warm_tree, Tools, FINGERPRINT_SQL, PUSH_SEGMENTS,
};
use crate::sh::{
    append, cargo_build_release, give_to_postgres, path, run_checked, wait_archive_drained,
};

const USAGE: &str = "usage: cargo xtask bench --s3 [--scale S] [--runs N] [--keep]";
const PORT: u16 = 25450;
const RESTORED_PORT: u16 = 25451;
const STANZA: &str = "bench";
const PUSH_STANZA: &str = "push";
const MD5_ROWS_PER_SCALE: u64 = 50_000;
const ACCESS_KEY: &str = "pgkeep-bench";
const SECRET_KEY: &str = "pgkeep-bench-secret-7d1e";

/// Sets TCP_NODELAY on every socket the server accepts (s3s-fs leaves Nagle on).
const NODELAY_SHIM: &str = r#"
#define _GNU_SOURCE
#include <dlfcn.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>

static int nodelay(int fd) {
    if (fd >= 0) {
        int one = 1;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    }
    return fd;
}

int accept(int s, struct sockaddr *a, socklen_t *l) {
    static int (*real)(int, struct sockaddr *, socklen_t *);
    if (!real) real = dlsym(RTLD_NEXT, "accept");
    return nodelay(real(s, a, l));
}

int accept4(int s, struct sockaddr *a, socklen_t *l, int flags) {
    static int (*real)(int, struct sockaddr *, socklen_t *, int);
    if (!real) real = dlsym(RTLD_NEXT, "accept4");
    return nodelay(real(s, a, l, flags));
}
"#;

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Row {
    Full,
    Restore,
    Push,
    FullRss,
    RestoreRss,
    PushRss,
    FullServer,
    RestoreServer,
    PushServer,
}

impl Row {
    const ALL: [Row; 9] = [
        Row::Full,
        Row::Restore,
        Row::Push,
        Row::FullRss,
        Row::RestoreRss,
        Row::PushRss,
        Row::FullServer,
        Row::RestoreServer,
        Row::PushServer,
    ];

    fn name(self) -> &'static str {
        match self {
            Row::Full => "full backup (s)",
            Row::Restore => "restore (s)",
            Row::Push => "archive-push per segment (ms)",
            Row::FullRss => "peak RSS, full backup",
            Row::RestoreRss => "peak RSS, restore",
            Row::PushRss => "peak RSS, archive-push",
            Row::FullServer => "server CPU (s3s-fs + socat), full backup (s)",
            Row::RestoreServer => "server CPU (s3s-fs + socat), restore (s)",
            Row::PushServer => "server CPU (s3s-fs + socat), per segment (ms)",
        }
    }

    /// The ratio pgkeep/pgBackRest the issue asks for, if any.
    fn target(self) -> Option<f64> {
        match self {
            Row::Full => Some(0.5),
            Row::Restore => Some(0.7),
            Row::Push => Some(0.5),
            _ => None,
        }
    }

    fn show(self, v: f64) -> String {
        match self {
            Row::Full | Row::Restore | Row::FullServer | Row::RestoreServer => format!("{v:.1}"),
            Row::Push | Row::PushServer => format!("{:.0}", v * 1000.0),
            _ => format_bytes(v),
        }
    }
}

/// Samples per (row, tool): tool 0 is pgkeep, 1 pgBackRest.
#[derive(Default)]
struct Samples(std::collections::BTreeMap<(Row, usize), Vec<f64>>);

impl Samples {
    fn add(&mut self, row: Row, tool: usize, v: f64) {
        self.0.entry((row, tool)).or_default().push(v);
    }

    fn median(&self, row: Row, tool: usize) -> Option<f64> {
        let mut v = self.0.get(&(row, tool))?.clone();
        v.sort_by(f64::total_cmp);
        Some(v[v.len() / 2])
    }
}

const TOOLS: [&str; 2] = ["pgkeep", "pgBackRest"];

struct Options {
    scale: u32,
    runs: usize,
    keep: bool,
}

fn parse(args: &[String]) -> Result<Options> {
    let mut o = Options {
        scale: 30,
        runs: 2,
        keep: false,
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut number = |name: &str| -> Result<u64> {
            it.next()
                .and_then(|v| v.parse().ok())
                .filter(|&n| n >= 1)
                .with_context(|| format!("{name} takes a whole number >= 1\n{USAGE}"))
        };
        match a.as_str() {
            "--s3" => {}
            "--scale" => o.scale = number("--scale")? as u32,
            "--runs" => o.runs = number("--runs")? as usize,
            "--keep" => o.keep = true,
            _ => bail!("unknown argument {a:?}\n{USAGE}"),
        }
    }
    Ok(o)
}

pub fn bench(args: &[String]) -> Result<()> {
    let opts = parse(args)?;
    let started = Instant::now();
    let machine = Machine::read();
    let load_before = load_average();
    println!("machine: {}", machine.describe());
    let pgkeep = cargo_build_release()?;
    let pgbackrest = ensure_installed("pgbackrest", "pgbackrest")?;
    let socat = ensure_installed("socat", "socat")?;
    let gcc = ensure_installed("gcc", "gcc")?;
    let s3s_fs = s3s_fs()?;
    let b = S3Bench::create(&pgkeep, &pgbackrest, &opts, &socat, &gcc, &s3s_fs)?;
    let result = b.run();
    b.stop_server(&b.data);
    let keep = opts.keep || result.is_err();
    drop(b.servers);
    if keep {
        eprintln!("bench files kept in {}", b.tools.dir.display());
    } else {
        let _ = fs::remove_dir_all(&b.tools.dir);
    }
    let (samples, cluster_bytes) = result?;

    let mut md = format!(
        "## pgkeep vs pgBackRest on S3 (s3s-fs over TLS through socat, TCP_NODELAY on), scale {}\n\n\
         cluster {} in its databases; {} run(s), medians; {} WAL segments pushed per run; \
         load average before {load_before}, after {}; {:.0} s in all; {}\n\n\
         | | pgkeep | pgBackRest | pgkeep / pgBackRest | target |\n|---|---|---|---|---|\n",
        opts.scale,
        format_bytes(cluster_bytes as f64),
        opts.runs,
        PUSH_SEGMENTS,
        load_average(),
        started.elapsed().as_secs_f64(),
        machine.describe(),
    );
    for row in Row::ALL {
        let (Some(k), Some(b)) = (samples.median(row, 0), samples.median(row, 1)) else {
            continue;
        };
        let ratio = k / b;
        let target = match row.target() {
            Some(t) if ratio <= t => format!("<= {t} met"),
            Some(t) => format!("<= {t} MISSED"),
            None => String::new(),
        };
        md.push_str(&format!(
            "| {} | {} | {} | {ratio:.2} | {target} |\n",
            row.name(),
            row.show(k),
            row.show(b)
        ));
    }
    println!("\n{md}");
    let out = crate::sh::target_dir().join("bench");
    fs::create_dir_all(&out)?;
    let file = out.join(format!("bench-s3-scale{}.md", opts.scale));
    fs::write(&file, &md).with_context(|| format!("writing {}", file.display()))?;
    println!("written: {}", file.display());
    Ok(())
}

/// `s3s-fs` on PATH or in cargo's bin directory (`.ci/run` installs it).
fn s3s_fs() -> Result<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    if let Some(home) = std::env::var_os("CARGO_HOME") {
        dirs.push(PathBuf::from(home).join("bin"));
    }
    if let Some(home) = std::env::var_os("HOME") {
        dirs.push(PathBuf::from(home).join(".cargo/bin"));
    }
    dirs.into_iter()
        .map(|d| d.join("s3s-fs"))
        .find(|p| p.is_file())
        .context("s3s-fs is not installed: cargo install --locked s3s-fs --version 0.14.1 --features binary")
}

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind(("127.0.0.1", 0))?.local_addr()?.port())
}

fn wait_listening(port: u16, child: &mut Child, what: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if child.try_wait()?.is_some() {
            bail!("{what} exited before listening on port {port}");
        }
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    bail!("{what} did not listen on port {port} within 10 s")
}

/// The S3 server and its TLS front; killed on drop.
struct Servers(Vec<Child>);

impl Drop for Servers {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

struct S3Bench {
    tools: Tools,
    opts: Options,
    data: PathBuf,
    samples: PathBuf,
    ca: PathBuf,
    tls_port: u16,
    servers: Servers,
}

impl std::ops::Deref for S3Bench {
    type Target = Tools;
    fn deref(&self) -> &Tools {
        &self.tools
    }
}

impl S3Bench {
    fn create(
        pgkeep: &Path,
        pgbackrest: &Path,
        opts: &Options,
        socat: &Path,
        gcc: &Path,
        s3s_fs: &Path,
    ) -> Result<S3Bench> {
        let dir = PathBuf::from(format!("/tmp/pgkeep-bench-s3-{}", std::process::id()));
        let tools = Tools::create(dir.clone(), pgkeep, pgbackrest)?;
        fs::create_dir_all(dir.join("tls"))?;

        step("TCP_NODELAY shim, private CA, s3s-fs and socat");
        let shim_c = dir.join("nodelay.c");
        let shim = dir.join("nodelay.so");
        fs::write(&shim_c, NODELAY_SHIM)?;
        run_checked(
            Command::new(gcc)
                .args(["-shared", "-fPIC", "-O2", "-o"])
                .arg(&shim)
                .arg(&shim_c)
                .arg("-ldl"),
        )?;
        let tls = dir.join("tls");
        make_certificates(&tls)?;
        let s3_data = dir.join("s3");
        for bucket in ["pgkeep", "pgbackrest"] {
            fs::create_dir_all(s3_data.join(bucket))?;
        }
        let mut servers = Servers(Vec::new());
        let s3_port = free_port()?;
        let mut s3 = Command::new(s3s_fs)
            .env("LD_PRELOAD", &shim)
            .args(["--host", "127.0.0.1", "--port", &s3_port.to_string()])
            .args(["--access-key", ACCESS_KEY, "--secret-key", SECRET_KEY])
            .arg(&s3_data)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(dir.join("logs/s3s-fs.log"))?)
            .spawn()
            .context("starting s3s-fs")?;
        let listening = wait_listening(s3_port, &mut s3, "s3s-fs");
        servers.0.push(s3);
        listening?;
        let tls_port = free_port()?;
        let mut front = Command::new(socat)
            .arg(format!(
                "OPENSSL-LISTEN:{tls_port},bind=127.0.0.1,reuseaddr,fork,nodelay,verify=0,cert={},key={}",
                tls.join("leaf.pem").display(),
                tls.join("leaf.key").display()
            ))
            .arg(format!("TCP:127.0.0.1:{s3_port},nodelay"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(dir.join("logs/socat.log"))?)
            .spawn()
            .context("starting socat")?;
        let listening = wait_listening(tls_port, &mut front, "socat");
        servers.0.push(front);
        listening?;
        println!("    s3s-fs on 127.0.0.1:{s3_port}, TLS on localhost:{tls_port}");

        let b = S3Bench {
            opts: Options { ..*opts },
            data: dir.join("data"),
            samples: dir.join("wal-samples"),
            ca: tls.join("ca.pem"),
            tls_port,
            servers,
            tools,
        };
        b.write_pgkeep_conf(STANZA)?;
        b.write_pgbr_conf(STANZA, STANZA)?;
        give_to_postgres(&b.dir)?;
        Ok(b)
    }

    fn kconf(&self, prefix: &str) -> PathBuf {
        self.dir.join(format!("pgkeep-{prefix}.toml"))
    }

    fn bconf(&self, path: &str) -> PathBuf {
        self.dir.join(format!("pgbackrest-{path}.conf"))
    }

    fn write_pgkeep_conf(&self, prefix: &str) -> Result<()> {
        let text = format!(
            "[repo]\ntype = \"s3\"\nendpoint = \"https://localhost:{port}\"\nbucket = \"pgkeep\"\n\
             region = \"us-east-1\"\nprefix = \"{prefix}\"\nuri-style = \"path\"\n\
             access-key-id = \"{ACCESS_KEY}\"\nsecret-access-key = \"{SECRET_KEY}\"\n\
             ca-file = \"{ca}\"\ncatalog = \"{dir}/pgkeep-{prefix}.db\"\n\
             [pg]\ndata = \"{data}\"\nhost = \"{sock}\"\nport = {PORT}\nuser = \"postgres\"\n",
            port = self.tls_port,
            ca = self.ca.display(),
            dir = self.dir.display(),
            data = self.data.display(),
            sock = self.sock.display(),
        );
        let file = self.kconf(prefix);
        fs::write(&file, text).with_context(|| format!("writing {}", file.display()))
    }

    fn write_pgbr_conf(&self, repo_path: &str, stanza: &str) -> Result<()> {
        let text = format!(
            "[global]\nrepo1-type=s3\nrepo1-s3-endpoint=localhost\nrepo1-storage-port={port}\n\
             repo1-storage-ca-file={ca}\nrepo1-s3-bucket=pgbackrest\nrepo1-s3-region=us-east-1\n\
             repo1-s3-key={ACCESS_KEY}\nrepo1-s3-key-secret={SECRET_KEY}\nrepo1-s3-uri-style=path\n\
             repo1-path=/{repo_path}\nrepo1-retention-full=9999\ncompress-type=lz4\nprocess-max=2\n\
             repo1-bundle=y\nstart-fast=y\narchive-check=y\n\
             log-path={dir}/pgbackrest-log\nlog-level-console=warn\nlog-level-file=info\n\
             lock-path={dir}/pgbackrest-lock\nspool-path={dir}/pgbackrest-spool\n\n\
             [{stanza}]\npg1-path={data}\npg1-socket-path={sock}\npg1-port={PORT}\npg1-user=postgres\n",
            port = self.tls_port,
            ca = self.ca.display(),
            dir = self.dir.display(),
            data = self.data.display(),
            sock = self.sock.display(),
        );
        let file = self.bconf(repo_path);
        fs::write(&file, text).with_context(|| format!("writing {}", file.display()))
    }

    fn run(&self) -> Result<(Samples, u64)> {
        let (fingerprint, cluster_bytes) = self.setup()?;
        let mut s = Samples::default();
        for run in 0..self.opts.runs {
            println!("\n==> run {}/{}", run + 1, self.opts.runs);
            let order = if run % 2 == 0 { [0, 1] } else { [1, 0] };
            let mut labels = [String::new(), String::new()];
            for tool in order {
                self.settle()?;
                warm_tree(&self.data, &["pg_wal"]);
                let cpu = self.server_cpu();
                let m = self.checked(
                    &format!("{} full backup", TOOLS[tool]),
                    &mut self.backup_cmd(tool),
                )?;
                s.add(Row::FullServer, tool, self.server_cpu() - cpu);
                s.add(Row::Full, tool, m.wall.as_secs_f64());
                s.add(Row::FullRss, tool, m.peak_rss as f64);
                labels[tool] = self.newest(tool)?;
            }
            for tool in order {
                let dir = self.fresh_dir(&format!("restore-{tool}-{run}"))?;
                self.settle()?;
                let cpu = self.server_cpu();
                let m = self.checked(
                    &format!("{} restore", TOOLS[tool]),
                    &mut self.restore_cmd(tool, &dir, &labels[tool]),
                )?;
                s.add(Row::RestoreServer, tool, self.server_cpu() - cpu);
                s.add(Row::Restore, tool, m.wall.as_secs_f64());
                s.add(Row::RestoreRss, tool, m.peak_rss as f64);
                self.check_restored(TOOLS[tool], &dir, &fingerprint)?;
            }
            self.archive_push(run, &mut s)?;
        }
        Ok((s, cluster_bytes))
    }

    /// Before a timed step: nothing left for the archiver (the load's WAL, or the segments the
    /// other tool's backup switched, would be pushed by both tools during the step), a
    /// checkpoint, and the disks idle, so the step is timed alone, whichever tool goes first.
    fn settle(&self) -> Result<()> {
        wait_archive_drained(
            &self.data,
            Duration::from_secs(600),
            &self.dir.join("server.log"),
        )?;
        self.sql("CHECKPOINT")?;
        run_checked(&mut Command::new("sync"))?;
        crate::bench::settle_disks();
        Ok(())
    }

    fn backup_cmd(&self, tool: usize) -> Command {
        if tool == 0 {
            self.pgkeep_cmd(&self.kconf(STANZA), &["backup", "--type", "full"])
        } else {
            self.pgbr_cmd(&self.bconf(STANZA), STANZA, &["backup", "--type=full"])
        }
    }

    fn restore_cmd(&self, tool: usize, dir: &Path, label: &str) -> Command {
        if tool == 0 {
            self.pgkeep_cmd(
                &self.kconf(STANZA),
                &[
                    "restore",
                    "--pgdata",
                    path(dir),
                    "--backup",
                    label,
                    "--target",
                    "immediate",
                ],
            )
        } else {
            self.pgbr_cmd(
                &self.bconf(STANZA),
                STANZA,
                &[
                    "restore",
                    &format!("--pg1-path={}", dir.display()),
                    "--type=immediate",
                    &format!("--set={label}"),
                ],
            )
        }
    }

    /// The label of the tool's newest backup, which must be a finished full.
    fn newest(&self, tool: usize) -> Result<String> {
        if tool == 0 {
            let m = self.quiet_checked(
                "pgkeep show --json",
                &mut self.pgkeep_cmd(&self.kconf(STANZA), &["show", "--json"]),
            )?;
            let v: Value = serde_json::from_str(&m.stdout)?;
            let b = v["backups"]
                .as_array()
                .and_then(|a| a.last())
                .context("pgkeep lists no backup")?;
            if !matches!(b["status"].as_str(), Some("DONE" | "OK")) {
                bail!("pgkeep's newest backup is {}", b["status"]);
            }
            Ok(b["label"].as_str().unwrap_or_default().to_string())
        } else {
            let m = self.quiet_checked(
                "pgBackRest info",
                &mut self.pgbr_cmd(&self.bconf(STANZA), STANZA, &["info", "--output=json"]),
            )?;
            let v: Value = serde_json::from_str(&m.stdout)?;
            let b = v[0]["backup"]
                .as_array()
                .and_then(|a| a.last())
                .context("pgBackRest lists no backup")?;
            Ok(b["label"].as_str().unwrap_or_default().to_string())
        }
    }

    /// initdb, archive into both repositories, load the data, sample WAL segments to push.
    fn setup(&self) -> Result<(String, u64)> {
        step("initdb a cluster whose archive_command feeds pgkeep and pgBackRest, both on S3");
        run_checked(
            self.pg("initdb")
                .args(["-k", "-N", "-U", "postgres", "--auth=trust", "-D"])
                .arg(&self.data),
        )?;
        let conf = format!(
            "\nport = {PORT}\nlisten_addresses = ''\nunix_socket_directories = '{sock}'\n\
             archive_mode = on\n\
             archive_command = '{pgkeep} --config {kconf} archive-push %p && {pgbr} --config={bconf} --stanza={STANZA} archive-push %p'\n\
             autovacuum = off\ncheckpoint_timeout = '1h'\nmax_wal_size = '8GB'\n",
            sock = self.sock.display(),
            pgkeep = self.pgkeep.display(),
            kconf = self.kconf(STANZA).display(),
            pgbr = self.pgbackrest.display(),
            bconf = self.bconf(STANZA).display(),
        );
        append(&self.data.join("postgresql.conf"), &conf)?;
        run_checked(
            self.pg("pg_ctl")
                .args(["-w", "-t", "300", "-D", path(&self.data), "-l"])
                .arg(self.dir.join("server.log"))
                .arg("start"),
        )?;
        self.checked(
            "pgkeep init",
            &mut self.pgkeep_cmd(&self.kconf(STANZA), &["init"]),
        )?;
        self.checked(
            "pgBackRest stanza-create",
            &mut self.pgbr_cmd(&self.bconf(STANZA), STANZA, &["stanza-create"]),
        )?;
        let rows = u64::from(self.opts.scale) * MD5_ROWS_PER_SCALE;
        step(&format!(
            "load pgbench scale {} and {rows} random md5 rows",
            self.opts.scale
        ));
        run_checked(
            self.pg("pgbench")
                .args(["-i", "-q", "-s", &self.opts.scale.to_string()])
                .args(self.conn_args(PORT))
                .arg("postgres"),
        )?;
        self.sql(&format!(
            "CREATE TABLE random_md5 AS SELECT g AS id, md5(random()::text) AS v FROM generate_series(1, {rows}) g"
        ))?;
        self.sql("VACUUM (FREEZE, ANALYZE)")?;
        self.sql("SELECT pg_switch_wal()")?;
        wait_archive_drained(
            &self.data,
            Duration::from_secs(600),
            &self.dir.join("server.log"),
        )?;
        self.sample_segments()?;
        self.checked(
            "pgBackRest check",
            &mut self.pgbr_cmd(&self.bconf(STANZA), STANZA, &["check"]),
        )?;
        let bytes: u64 = self
            .sql("SELECT sum(pg_database_size(oid)) FROM pg_database")?
            .parse()?;
        println!("    cluster: {}", format_bytes(bytes as f64));
        Ok((self.sql(FINGERPRINT_SQL)?, bytes))
    }

    /// The newest full segments the load wrote (not the last, which pg_switch_wal cut short).
    fn sample_segments(&self) -> Result<()> {
        crate::bench::sample_segments(&self.data, &self.samples).map(drop)
    }

    /// Each sampled segment pushed by both tools into fresh repositories, alternating who goes
    /// first, the segment in the page cache as PostgreSQL hands it over.
    fn archive_push(&self, run: usize, s: &mut Samples) -> Result<()> {
        let name = format!("push{run}");
        self.write_pgkeep_conf(&name)?;
        self.write_pgbr_conf(&name, PUSH_STANZA)?;
        give_to_postgres(&self.dir)?;
        self.checked(
            "pgkeep init (push)",
            &mut self.pgkeep_cmd(&self.kconf(&name), &["init"]),
        )?;
        self.checked(
            "pgBackRest stanza-create (push)",
            &mut self.pgbr_cmd(&self.bconf(&name), PUSH_STANZA, &["stanza-create"]),
        )?;
        let mut segments: Vec<PathBuf> = fs::read_dir(&self.samples)?
            .map(|e| e.map(|e| e.path()))
            .collect::<std::io::Result<_>>()?;
        segments.sort();
        let mut wall = [Duration::ZERO; 2];
        let mut rss = [0u64; 2];
        let mut server = [0f64; 2];
        for (n, seg) in segments.iter().enumerate() {
            let order = if n % 2 == 0 { [0, 1] } else { [1, 0] };
            for tool in order {
                warm_page_cache(seg)?;
                let args = ["archive-push", path(seg)];
                let mut cmd = if tool == 0 {
                    self.pgkeep_cmd(&self.kconf(&name), &args)
                } else {
                    self.pgbr_cmd(&self.bconf(&name), PUSH_STANZA, &args)
                };
                let cpu = self.server_cpu();
                let m = self.quiet_checked(&format!("{} archive-push", TOOLS[tool]), &mut cmd)?;
                server[tool] += self.server_cpu() - cpu;
                wall[tool] += m.wall;
                rss[tool] = rss[tool].max(m.peak_rss);
            }
        }
        for tool in 0..2 {
            let per = wall[tool].as_secs_f64() / segments.len() as f64;
            s.add(Row::Push, tool, per);
            s.add(Row::PushRss, tool, rss[tool] as f64);
            s.add(Row::PushServer, tool, server[tool] / segments.len() as f64);
            println!(
                "    {} archive-push: {:.0} ms per segment over {} segments, peak RSS {}",
                TOOLS[tool],
                per * 1000.0,
                segments.len(),
                format_bytes(rss[tool] as f64)
            );
        }
        Ok(())
    }

    /// Start a restored directory, let it reach its target, compare its content, stop it.
    fn check_restored(&self, tool: &str, dir: &Path, expected: &str) -> Result<()> {
        let opts = format!(
            "-c port={RESTORED_PORT} -c listen_addresses='' -c unix_socket_directories='{}' -c archive_mode=off",
            self.sock.display()
        );
        let log = self.logs.join(format!("{tool}-restored-server.log"));
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
                &opts,
                "start",
            ])
            .output()?;
        let outcome = if started.status.success() {
            self.wait_restored_matches(RESTORED_PORT, expected)
        } else {
            Err(anyhow::anyhow!("the server did not start"))
        };
        self.stop_server(dir);
        outcome
            .with_context(|| format!("{tool}'s restore is not usable: see {}", log.display()))?;
        println!("    {tool} restore: started, recovered, content matches");
        fs::remove_dir_all(dir).with_context(|| format!("removing {}", dir.display()))
    }

    /// CPU seconds the S3 server and the TLS front have used so far: s3s-fs's own, socat's and
    /// that of the per-connection children socat has reaped. A connection still open when a
    /// step ends is counted in the step that closes it.
    fn server_cpu(&self) -> f64 {
        let ticks = |pid: u32, fields: &[usize]| -> f64 {
            let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
                return 0.0;
            };
            let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
            let f: Vec<&str> = rest.split_whitespace().collect();
            // After the name: state is field 3, so field n is f[n - 3].
            fields
                .iter()
                .filter_map(|&n| f.get(n - 3)?.parse::<f64>().ok())
                .sum()
        };
        let hz = 100.0; // USER_HZ on Linux
        let s3 = self.servers.0[0].id();
        let front = self.servers.0[1].id();
        (ticks(s3, &[14, 15]) + ticks(front, &[14, 15, 16, 17])) / hz
    }

    fn checked(&self, what: &str, cmd: &mut Command) -> Result<Measured> {
        let m = self.quiet_checked(what, cmd)?;
        println!(
            "    {what}: {:.2} s, peak RSS {}",
            m.wall.as_secs_f64(),
            format_bytes(m.peak_rss as f64)
        );
        Ok(m)
    }

    fn quiet_checked(&self, what: &str, cmd: &mut Command) -> Result<Measured> {
        let m = self.measured(what, cmd)?;
        if !m.ok() {
            bail!(
                "{what} failed ({}): {} (log: {})",
                m.exit(),
                m.first_error_line(),
                self.last_log()
            );
        }
        Ok(m)
    }

    fn sql(&self, sql: &str) -> Result<String> {
        self.sql_at(PORT, sql)
    }
}

fn step(what: &str) {
    println!("\n==> {what}");
}

/// A CA and a leaf for `localhost` it signed (SAN localhost and 127.0.0.1, CA:FALSE), in `dir`.
fn make_certificates(dir: &Path) -> Result<()> {
    fs::write(
        dir.join("leaf.ext"),
        "basicConstraints = critical, CA:FALSE\nkeyUsage = critical, digitalSignature, keyEncipherment\n\
         extendedKeyUsage = serverAuth\nsubjectAltName = DNS:localhost, IP:127.0.0.1\n",
    )?;
    let p = |name: &str| dir.join(name).display().to_string();
    let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"];
    let openssl = |args: Vec<String>| {
        run_checked(
            Command::new("openssl")
                .args(args)
                .stdout(Stdio::null())
                .stderr(Stdio::null()),
        )
    };
    let strings = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let mut ca = strings(&["req", "-x509", "-nodes", "-days", "2"]);
    ca.extend(strings(&ec));
    ca.extend(strings(&[
        "-keyout",
        &p("ca.key"),
        "-out",
        &p("ca.pem"),
        "-subj",
        "/CN=pgkeep bench CA",
        "-addext",
        "basicConstraints = critical, CA:TRUE",
        "-addext",
        "keyUsage = critical, keyCertSign, cRLSign",
    ]));
    openssl(ca)?;
    let mut req = strings(&["req", "-nodes"]);
    req.extend(strings(&ec));
    req.extend(strings(&[
        "-keyout",
        &p("leaf.key"),
        "-out",
        &p("leaf.csr"),
        "-subj",
        "/CN=localhost",
    ]));
    openssl(req)?;
    openssl(strings(&[
        "x509",
        "-req",
        "-days",
        "2",
        "-in",
        &p("leaf.csr"),
        "-CA",
        &p("ca.pem"),
        "-CAkey",
        &p("ca.key"),
        "-CAcreateserial",
        "-out",
        &p("leaf.pem"),
        "-extfile",
        &p("leaf.ext"),
    ]))
}
