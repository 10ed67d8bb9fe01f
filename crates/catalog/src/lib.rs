//! pgkeep's catalog: the SQLite index of backups, their files and the archived WAL, and the text
//! files kept beside each backup from which that index can be rebuilt. The catalog ([`Catalog`])
//! is one SQLite file per repository, shared by every pgkeep process: the archiver's
//! `archive-push` inserts WAL rows while a backup writes its own, so every write runs in a
//! `BEGIN IMMEDIATE` transaction under a generous busy timeout. Its schema is versioned
//! (`PRAGMA user_version`) and migrated on open. Status changes of a backup are decided in one
//! place, [`BackupStatus::can_become`]. Beside each backup's data the repository keeps a
//! `backup.ini` and a `manifest` written by [`meta`], so the catalog can always be rebuilt
//! ([`Catalog::replace_all`]) from the repository alone.

#![warn(missing_docs)]

mod error;
pub mod meta;
mod model;
mod schema;
mod store;
mod text;

pub use error::{CatalogError, Result};
pub use model::{
    BackupRecord, BackupStatus, BackupType, Bundled, DrillRecord, FileKind, FileRecord, Pin,
    RepoIdentity, WalInsert, WalKind, WalRecord,
};
pub use schema::SCHEMA_VERSION;
pub use store::Catalog;
pub use text::{parse_pin, pin_text};

/// A WAL position, from the PostgreSQL-formats crate.
pub use pgkeep_pg::Lsn;
