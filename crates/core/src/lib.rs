//! pgkeep's commands: init, show, archive-push/get, check, backup, restore, validate, drill,
//! and retention (expire, delete, pin).
//!
//! Each command is a function taking validated options (a [`Config`] plus a per-command options
//! struct) and returning a value the CLI prints. This crate talks to PostgreSQL (the `postgres`
//! crate), to the repository (`pgkeep-repo`) and to the catalog (`pgkeep-catalog`); it knows
//! nothing of flags, TOML or terminals. Progress goes through the small [`Progress`] trait.

pub mod archive;
pub mod backup;
pub(crate) mod blockmap;
pub(crate) mod bundle;
pub(crate) mod chain;
pub mod check;
pub mod config;
pub mod delta;
pub mod drill;
pub mod entries;
pub mod init;
pub mod lock;
pub mod parallel;
pub mod pg;
pub mod progress;
pub mod rebuild;
pub mod repo;
pub mod restore;
pub mod retention;
pub mod show;
pub mod spool;
pub mod standby;
pub mod status;
pub(crate) mod summaries;
pub mod timeline;
pub mod user;
pub mod validate;
pub mod walchain;
pub mod walk;

pub use config::Config;
pub use progress::{NoProgress, Progress};

/// Errors a caller maps to a specific exit code; everything else is a general failure.
#[derive(Debug, thiserror::Error)]
pub enum Outcome {
    /// `archive-get` of a name the archive does not hold: PostgreSQL probes for files that do not
    /// exist (history files, the next segment), so this must exit 1 without noise.
    #[error("{0} is not in the archive")]
    NotInArchive(String),
}
