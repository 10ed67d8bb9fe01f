//! Runs one child process and measures it: wall time, and peak RSS and bytes read from storage
//! from `wait4`'s rusage.

use std::fs::File;
use std::io;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

/// What one measured command did.
pub struct Measured {
    pub wall: Duration,
    /// Peak resident set size in bytes. The kernel reports the largest of the child and of every
    /// descendant it waited for, so `runuser` wrappers and pgBackRest's worker processes count, as
    /// the largest single process (not the sum).
    pub peak_rss: u64,
    /// Bytes the child and its waited-for descendants caused to be read from the block devices:
    /// the kernel's `read_bytes` of /proc/<pid>/io, which `ru_inblock` reports in 512-byte
    /// units once the process is gone. Reads served by the page cache do not count.
    pub read_bytes: u64,
    /// Exit code; `None` when a signal ended the process.
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Measured {
    pub fn ok(&self) -> bool {
        self.code == Some(0)
    }

    /// The first non-empty line of stderr (else stdout): enough to say why it failed.
    pub fn first_error_line(&self) -> String {
        let line = |s: &str| {
            s.lines()
                .map(str::trim)
                .find(|l| !l.is_empty())
                .map(str::to_string)
        };
        line(&self.stderr)
            .or_else(|| line(&self.stdout))
            .unwrap_or_else(|| "(no output)".to_string())
    }

    pub fn exit(&self) -> String {
        match self.code {
            Some(c) => format!("exit {c}"),
            None => "killed by a signal".to_string(),
        }
    }
}

/// Run `cmd` to completion with stdout and stderr captured in `<log>.out` and `<log>.err` (kept
/// for a post-mortem) and return what it did; a non-zero exit is not an error here.
pub fn measure(cmd: &mut Command, log: &Path) -> Result<Measured> {
    let out_path = format!("{}.out", log.display());
    let err_path = format!("{}.err", log.display());
    cmd.stdin(Stdio::null())
        .stdout(File::create(&out_path).with_context(|| format!("creating {out_path}"))?)
        .stderr(File::create(&err_path).with_context(|| format!("creating {err_path}"))?);
    let started = Instant::now();
    let child = cmd.spawn().with_context(|| format!("starting {cmd:?}"))?;
    let pid = libc::pid_t::try_from(child.id()).context("child pid out of range")?;
    // Reaped here rather than by `Child::wait`, which does not return the rusage; dropping
    // `child` afterwards neither waits nor kills.
    let (status, rusage) = wait4(pid).with_context(|| format!("waiting for {cmd:?}"))?;
    let wall = started.elapsed();
    drop(child);
    let code = if libc::WIFEXITED(status) {
        Some(libc::WEXITSTATUS(status))
    } else {
        None
    };
    Ok(Measured {
        wall,
        // Linux reports ru_maxrss in KiB.
        peak_rss: u64::try_from(rusage.ru_maxrss).unwrap_or(0) * 1024,
        read_bytes: u64::try_from(rusage.ru_inblock).unwrap_or(0) * 512,
        code,
        stdout: std::fs::read_to_string(&out_path).unwrap_or_default(),
        stderr: std::fs::read_to_string(&err_path).unwrap_or_default(),
    })
}

fn wait4(pid: libc::pid_t) -> io::Result<(libc::c_int, libc::rusage)> {
    loop {
        let mut status: libc::c_int = 0;
        // SAFETY: rusage is plain old data, so all-zero bytes are a valid value.
        let mut rusage: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: both pointers refer to live locals of the right types for the whole call.
        let r = unsafe { libc::wait4(pid, &mut status, 0, &mut rusage) };
        if r == pid {
            return Ok((status, rusage));
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}
