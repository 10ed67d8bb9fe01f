//! PostgreSQL on-disk formats.
