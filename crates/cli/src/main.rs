//! pgkeep binary.
fn main() {}
