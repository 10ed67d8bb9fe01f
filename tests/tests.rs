//! pgkeep's integration tests: real PostgreSQL clusters started by the tests, the real binary.
//!
//! Compiled as one test binary (see crates/cli/Cargo.toml); each module covers one command.

mod harness;

mod archive;
mod async_push;
mod backup;
mod blockmap;
mod bundle;
mod cli;
mod drill;
mod expire;
mod formats;
mod incremental;
mod init;
mod multirepo;
mod restore;
mod s3;
mod safety;
mod standby;
mod tidy;
mod timelines;
mod validate;
mod walrecord;
