//! `cargo xtask demo`: the whole product on a throwaway cluster. Back up, write rows, note the
//! time, destroy the rows, wipe the cluster, restore to the noted time, show the rows are back.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::sh::{append, cargo_build_release, path, run_checked, wait_archive_drained};

struct Demo {
    dir: PathBuf,
    bin: PathBuf,
    pg_bin: PathBuf,
    data: PathBuf,
    sock: PathBuf,
    config: PathBuf,
    port: u16,
}

pub fn demo(keep: bool) -> Result<()> {
    let pgkeep = cargo_build_release()?;
    let d = Demo::create(&pgkeep)?;
    let result = d.run();
    d.stop();
    if keep || result.is_err() {
        eprintln!("demo files kept in {}", d.dir.display());
    } else {
        let _ = fs::remove_dir_all(&d.dir);
    }
    result
}

impl Demo {
    fn create(pgkeep: &Path) -> Result<Demo> {
        let dir = PathBuf::from(format!("/tmp/pgkeep-demo-{}", std::process::id()));
        fs::create_dir_all(&dir)?;
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755))?;
        let bin = dir.join("pgkeep");
        fs::copy(pgkeep, &bin).context("copying the pgkeep binary")?;
        let sock = dir.join("sock");
        fs::create_dir_all(&sock)?;
        let d = Demo {
            data: dir.join("data"),
            config: dir.join("pgkeep.toml"),
            port: 25432,
            pg_bin: crate::sh::pg_bin()?,
            bin,
            sock,
            dir,
        };
        fs::write(
            &d.config,
            format!(
                "[repo]\npath = \"{}/repo\"\n[pg]\ndata = \"{}\"\nhost = \"{}\"\nport = {}\nuser = \"postgres\"\n",
                d.dir.display(),
                d.data.display(),
                d.sock.display(),
                d.port
            ),
        )?;
        crate::sh::give_to_postgres(&d.dir)?;
        Ok(d)
    }

    fn run(&self) -> Result<()> {
        step("initdb a throwaway cluster with data checksums, archiving into pgkeep");
        self.as_postgres(
            &self.pg_bin.join("initdb"),
            &[
                "-k",
                "-N",
                "-U",
                "postgres",
                "--auth=trust",
                "-D",
                path(&self.data),
            ],
        )?;
        let conf = format!(
            "\nport = {}\nlisten_addresses = ''\nunix_socket_directories = '{}'\narchive_mode = on\narchive_command = '{} --config {} archive-push %p'\n",
            self.port,
            self.sock.display(),
            self.bin.display(),
            self.config.display()
        );
        append(&self.data.join("postgresql.conf"), &conf)?;
        self.start()?;
        self.pgkeep(&["init"])?;
        self.pgkeep(&["check"])?;

        step("create a table with 1000 rows and take a full backup");
        self.sql("CREATE TABLE accounts (id int PRIMARY KEY, owner text, balance numeric); INSERT INTO accounts SELECT g, 'owner ' || g, g * 10 FROM generate_series(1, 1000) g")?;
        self.pgkeep(&["backup", "--type", "full"])?;
        self.pgkeep(&["show"])?;

        step("write 234 more rows after the backup, then note the time");
        self.sql("INSERT INTO accounts SELECT g, 'late owner ' || g, g FROM generate_series(1001, 1234) g")?;
        let before = self.sql("SELECT count(*) || ' rows, checksum ' || md5(string_agg(id || owner || balance, ',' ORDER BY id)) FROM accounts")?;
        std::thread::sleep(Duration::from_millis(1100));
        let noted = self.sql("SELECT now()::text")?;
        println!("    {before} at {noted}");
        std::thread::sleep(Duration::from_millis(1100));

        step("disaster: every row deleted, then the cluster is stopped and wiped");
        self.sql("DELETE FROM accounts")?;
        self.sql("SELECT pg_switch_wal()")?;
        println!(
            "    {}",
            self.sql("SELECT count(*) || ' rows left' FROM accounts")?
        );
        wait_archive_drained(
            &self.data,
            Duration::from_secs(60),
            &self.dir.join("server.log"),
        )?;
        self.stop();
        fs::remove_dir_all(&self.data).context("wiping the data directory")?;

        step(&format!("restore to {noted} and start the cluster"));
        self.pgkeep(&[
            "restore",
            "--pgdata",
            path(&self.data),
            "--target-time",
            &noted,
            "--target-action",
            "promote",
        ])?;
        self.start()?;
        self.wait_promoted()?;
        let after = self.sql("SELECT count(*) || ' rows, checksum ' || md5(string_agg(id || owner || balance, ',' ORDER BY id)) FROM accounts")?;
        println!("    {after}");
        if after != before {
            bail!("restored cluster differs: expected {before}, found {after}");
        }
        step("the rows are back: the restored cluster equals the cluster at the noted time");
        Ok(())
    }

    fn pgkeep(&self, args: &[&str]) -> Result<()> {
        let mut full = vec!["--config", path(&self.config)];
        full.extend_from_slice(args);
        println!("    $ pgkeep {}", args.join(" "));
        self.as_postgres(&self.bin, &full)
    }

    fn as_postgres(&self, program: &Path, args: &[&str]) -> Result<()> {
        let mut c = crate::sh::postgres_command(program);
        c.current_dir(&self.dir).args(args);
        run_checked(&mut c)
    }

    fn sql(&self, sql: &str) -> Result<String> {
        let out = crate::sh::postgres_command(&self.pg_bin.join("psql"))
            .current_dir(&self.dir)
            .args([
                "-X",
                "-q",
                "-At",
                "-v",
                "ON_ERROR_STOP=1",
                "-h",
                path(&self.sock),
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
                "-d",
                "postgres",
                "-c",
                sql,
            ])
            .output()?;
        if !out.status.success() {
            bail!(
                "psql {sql:?}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    fn start(&self) -> Result<()> {
        let log = self.dir.join("server.log");
        self.as_postgres(
            &self.pg_bin.join("pg_ctl"),
            &[
                "-w",
                "-t",
                "120",
                "-D",
                path(&self.data),
                "-l",
                path(&log),
                "start",
            ],
        )
    }

    fn stop(&self) {
        let _ = crate::sh::postgres_command(&self.pg_bin.join("pg_ctl"))
            .current_dir(&self.dir)
            .args(["-w", "-m", "fast", "-D", path(&self.data), "stop"])
            .output();
    }

    fn wait_promoted(&self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(120);
        while Instant::now() < deadline {
            if self.sql("SELECT pg_is_in_recovery()").ok().as_deref() == Some("f") {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        bail!(
            "recovery did not finish within 120 s: see {}/server.log",
            self.dir.display()
        )
    }
}

fn step(what: &str) {
    println!("\n==> {what}");
}
