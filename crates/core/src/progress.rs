//! Progress reporting as a small trait, so the libraries stay free of terminals.

/// Receives progress of long-running commands. The CLI draws a bar on a terminal or logs lines.
pub trait Progress: Send + Sync {
    /// A phase starts; `total` is its size in bytes when known.
    fn start(&self, phase: &str, total: Option<u64>);
    /// `n` more bytes of the current phase are done.
    fn advance(&self, n: u64);
    /// A line worth showing the operator (warnings, waits).
    fn message(&self, line: &str);
    /// The current phase is over.
    fn finish(&self);
}

/// Progress that goes nowhere (tests, `--quiet`).
#[derive(Debug, Default, Clone, Copy)]
pub struct NoProgress;

impl Progress for NoProgress {
    fn start(&self, _phase: &str, _total: Option<u64>) {}
    fn advance(&self, _n: u64) {}
    fn message(&self, _line: &str) {}
    fn finish(&self) {}
}
