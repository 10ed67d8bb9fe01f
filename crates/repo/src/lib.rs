//! Repository storage.
