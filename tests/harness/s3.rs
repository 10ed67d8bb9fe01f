//! A real S3-compatible server for tests: `s3s-fs` on a free loopback port, its objects in a temp
//! directory, owned by the test (`Drop` kills it).
//!
//! `.ci/run` installs s3s-fs when missing, so under CI (`CI=true`) a missing binary fails the test;
//! elsewhere the test is skipped with a message saying how to install it.

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::TestDir;

/// Access key and secret the server is started with.
pub const ACCESS_KEY: &str = "pgkeep-test";
pub const SECRET_KEY: &str = "pgkeep-test-secret-1f3b";

/// A running s3s-fs.
pub struct S3Server {
    child: Option<Child>,
    bin: PathBuf,
    /// Objects live here, a bucket per directory.
    pub data: TestDir,
    pub port: u16,
    pub endpoint: String,
}

impl S3Server {
    /// Start a server, or `None` (with a message) when s3s-fs is not installed outside CI.
    pub fn start() -> Option<S3Server> {
        let Some(bin) = find_binary() else {
            if std::env::var("CI").is_ok_and(|v| v == "true") {
                panic!("s3s-fs is not installed: .ci/run installs it with `cargo install --locked s3s-fs --version 0.14.1 --features binary`");
            }
            eprintln!("skipped: s3s-fs is not installed (cargo install --locked s3s-fs --version 0.14.1 --features binary)");
            return None;
        };
        let mut server = S3Server {
            child: None,
            bin,
            data: TestDir::new(),
            port: 0,
            endpoint: String::new(),
        };
        server.spawn();
        Some(server)
    }

    /// Start the server on a free port.
    fn spawn(&mut self) {
        for _ in 0..5 {
            let port = free_port();
            if self.launch(port) {
                self.endpoint = format!("http://127.0.0.1:{port}");
                return;
            }
        }
        panic!("s3s-fs did not start listening on a loopback port");
    }

    /// Run s3s-fs on `port` with this server's data; false if it did not come up.
    fn launch(&mut self, port: u16) -> bool {
        let child = Command::new(&self.bin)
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args(["--access-key", ACCESS_KEY, "--secret-key", SECRET_KEY])
            .arg(self.data.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting s3s-fs");
        self.child = Some(child);
        self.port = port;
        if self.wait_listening(port) {
            return true;
        }
        self.stop();
        false
    }

    /// True once the port accepts connections; false if the server exited (port taken).
    fn wait_listening(&mut self, port: u16) -> bool {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Some(child) = self.child.as_mut() {
                if child.try_wait().ok().flatten().is_some() {
                    return false;
                }
            }
            if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    /// s3s-fs keeps a bucket as a directory under its root.
    pub fn create_bucket(&self, name: &str) {
        std::fs::create_dir_all(self.data.path().join(name)).unwrap();
    }

    /// Where the object at `key` of `bucket` is on disk.
    pub fn object_path(&self, bucket: &str, key: &str) -> PathBuf {
        self.data.path().join(bucket).join(key)
    }

    /// The body of a `[repo]` table for `bucket`/`prefix`, with the catalog at `catalog`.
    pub fn repo_toml(&self, bucket: &str, prefix: &str, catalog: &Path) -> String {
        format!(
            "type = \"s3\"\nendpoint = \"{}\"\nbucket = \"{bucket}\"\nregion = \"us-east-1\"\nprefix = \"{prefix}\"\nuri-style = \"path\"\naccess-key-id = \"{ACCESS_KEY}\"\nsecret-access-key = \"{SECRET_KEY}\"\ncatalog = \"{}\"\n",
            self.endpoint,
            catalog.display()
        )
    }

    /// Kill the server (the objects stay on disk).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Start it again on its old port, so configs naming the endpoint still work.
    pub fn restart(&mut self) {
        self.stop();
        let port = self.port;
        assert!(self.launch(port), "s3s-fs did not come back on port {port}");
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A port nothing listens on right now (the kernel's choice for an ephemeral bind).
pub fn free_port() -> u16 {
    TcpListener::bind(("127.0.0.1", 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap()
}

/// `$S3S_FS`, else `s3s-fs` on PATH or in cargo's bin directory.
fn find_binary() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("S3S_FS") {
        return Some(PathBuf::from(p));
    }
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
}
