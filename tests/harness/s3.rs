//! A real S3-compatible server for tests: `s3s-fs` on a free loopback port, its objects in a temp
//! directory, owned by the test (`Drop` kills it); [`TlsFront`] puts https in front of it with
//! socat and a private CA made with openssl at run time.
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

    /// A storage client for `bucket`/`prefix` of this server, as `[repo]` would configure it.
    pub fn config(&self, bucket: &str, prefix: &str) -> pgkeep_repo::S3Config {
        pgkeep_repo::S3Config {
            endpoint: self.endpoint.clone(),
            bucket: bucket.into(),
            region: "us-east-1".into(),
            prefix: prefix.into(),
            host_style: false,
            access_key_id: ACCESS_KEY.into(),
            secret_access_key: SECRET_KEY.into(),
            ca_file: None,
        }
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

/// https in front of a server: `socat` terminating TLS on a free loopback port with a leaf
/// certificate for `localhost` (SAN localhost and 127.0.0.1, not a CA) signed by a CA made for
/// the test. `Drop` kills socat.
pub struct TlsFront {
    child: Child,
    /// The CA's certificate (PEM), for `ca-file`.
    pub ca_file: PathBuf,
    /// `https://localhost:PORT`.
    pub endpoint: String,
    _dir: TestDir,
}

impl TlsFront {
    /// TLS on a free port, forwarded to `127.0.0.1:backend`; `None` (with a message) when socat
    /// or openssl is missing outside CI.
    pub fn start(backend: u16) -> Option<TlsFront> {
        for tool in ["socat", "openssl"] {
            if !on_path(tool) {
                if std::env::var("CI").is_ok_and(|v| v == "true") {
                    panic!("{tool} is not installed: .ci/run installs it");
                }
                eprintln!("skipped: {tool} is not installed (apt-get install {tool})");
                return None;
            }
        }
        let dir = TestDir::new();
        make_certificates(dir.path());
        let cert = dir.path().join("leaf.pem");
        let key = dir.path().join("leaf.key");
        for _ in 0..5 {
            let port = free_port();
            let mut child = Command::new("socat")
                .arg(format!(
                    "OPENSSL-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork,nodelay,verify=0,cert={},key={}",
                    cert.display(),
                    key.display()
                ))
                .arg(format!("TCP:127.0.0.1:{backend},nodelay"))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("starting socat");
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline && child.try_wait().ok().flatten().is_none() {
                if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                    return Some(TlsFront {
                        child,
                        ca_file: dir.path().join("ca.pem"),
                        endpoint: format!("https://localhost:{port}"),
                        _dir: dir,
                    });
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        panic!("socat did not start listening on a loopback port");
    }
}

impl Drop for TlsFront {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `ca.pem`/`ca.key` (a CA) and `leaf.pem`/`leaf.key` (a server certificate for localhost that
/// is not a CA, signed by it) in `dir`, readable by everyone (the keys are throwaway).
pub fn make_certificates(dir: &Path) {
    let ext = dir.join("leaf.ext");
    std::fs::write(
        &ext,
        "basicConstraints = critical, CA:FALSE\nkeyUsage = critical, digitalSignature, keyEncipherment\nextendedKeyUsage = serverAuth\nsubjectAltName = DNS:localhost, IP:127.0.0.1\n",
    )
    .unwrap();
    let p = |name: &str| dir.join(name).to_str().unwrap().to_owned();
    let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"];
    openssl(&[
        &["req", "-x509", "-nodes", "-days", "2"][..],
        &ec,
        &[
            "-keyout",
            &p("ca.key"),
            "-out",
            &p("ca.pem"),
            "-subj",
            "/CN=pgkeep test CA",
            "-addext",
            "basicConstraints = critical, CA:TRUE",
            "-addext",
            "keyUsage = critical, keyCertSign, cRLSign",
        ],
    ]);
    openssl(&[
        &["req", "-nodes"][..],
        &ec,
        &[
            "-keyout",
            &p("leaf.key"),
            "-out",
            &p("leaf.csr"),
            "-subj",
            "/CN=localhost",
        ],
    ]);
    openssl(&[&[
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
    ][..]]);
    for name in ["ca.pem", "leaf.pem", "leaf.key"] {
        super::chown_to_postgres(&dir.join(name));
    }
}

fn openssl(args: &[&[&str]]) {
    let out = Command::new("openssl")
        .args(args.concat())
        .output()
        .expect("running openssl");
    assert!(
        out.status.success(),
        "openssl {:?}: {}",
        args.concat(),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn on_path(tool: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
}
