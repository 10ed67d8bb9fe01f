//! Checks on repository keys and the names of temporary files, shared by every backend.

use crate::{Result, StorageError};

/// Marker in the names of temporary files: `.<name>.pgkeep-tmp.<pid>.<n>`.
const TEMP_MARKER: &str = ".pgkeep-tmp";

/// Suffix of the "directory" holding the pieces of a big object in an object store:
/// `<key>.pgkeep-pieces/<writer>/<n>` (see `s3`).
const PIECES_MARKER: &str = ".pgkeep-pieces";

/// Accepts a key: relative, '/'-separated, no empty, "." or ".." components, no NUL, and no
/// component that looks like one of our temporary files or piece directories (they would be
/// invisible to `list`).
pub(crate) fn check(key: &str) -> Result<()> {
    let ok = !key.is_empty()
        && !key.contains('\0')
        && key.split('/').all(|c| {
            !c.is_empty()
                && c != "."
                && c != ".."
                && !is_temp_name(c)
                && !c.ends_with(PIECES_MARKER)
        });
    if ok {
        Ok(())
    } else {
        Err(StorageError::InvalidKey {
            key: key.to_owned(),
        })
    }
}

/// Accepts a prefix for listing: "" (everything) or a key, with one trailing '/' tolerated.
/// Returns it without the slash.
pub(crate) fn check_prefix(prefix: &str) -> Result<&str> {
    let trimmed = prefix.strip_suffix('/').unwrap_or(prefix);
    if trimmed.is_empty() && prefix.is_empty() {
        return Ok("");
    }
    check(trimmed).map_err(|_| StorageError::InvalidKey {
        key: prefix.to_owned(),
    })?;
    Ok(trimmed)
}

/// Where the pieces of the object at `key` lie in an object store, whichever writer wrote them.
pub(crate) fn pieces_dir(key: &str) -> String {
    format!("{key}{PIECES_MARKER}")
}

/// Piece `n` of `writer`'s object at `key`.
pub(crate) fn piece_key(key: &str, writer: &str, n: u64) -> String {
    format!("{}/{writer}/{n:05}", pieces_dir(key))
}

/// The temporary name for file `name` written by process `pid`, attempt `n`.
pub(crate) fn temp_name(name: &str, pid: u32, n: u64) -> String {
    format!(".{name}{TEMP_MARKER}.{pid}.{n}")
}

/// True for names made by `temp_name`.
pub(crate) fn is_temp_name(name: &str) -> bool {
    temp_pid(name).is_some()
}

/// The writer's pid in a temporary name.
pub(crate) fn temp_pid(name: &str) -> Option<u32> {
    if !name.starts_with('.') {
        return None;
    }
    let (head, n) = name.rsplit_once('.')?;
    let (head, pid) = head.rsplit_once('.')?;
    let all_digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !all_digits(n) || !all_digits(pid) || !head.ends_with(TEMP_MARKER) {
        return None;
    }
    pid.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temp_names_round_trip() {
        let t = temp_name("000000010000000000000001.lz4", 4242, 7);
        assert_eq!(t, ".000000010000000000000001.lz4.pgkeep-tmp.4242.7");
        assert_eq!(temp_pid(&t), Some(4242));
        assert!(!is_temp_name("000000010000000000000001.lz4"));
        assert!(!is_temp_name(".psql_history"));
        assert!(!is_temp_name(".x.tmp.1.2"));
        assert!(!is_temp_name(".x.pgkeep-tmp.1."));
    }

    #[test]
    fn keys_are_checked() {
        for good in ["a", "a/b", "archive/1/x.lz4", ".hidden/f", "a/.b"] {
            assert!(check(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "/a",
            "a/",
            "a//b",
            "a/../b",
            "..",
            "./a",
            "a/.",
            "a\0b",
            "a/.b.pgkeep-tmp.1.2",
            "a/b.lz4.pgkeep-pieces/1-2/0",
        ] {
            assert!(
                matches!(check(bad), Err(StorageError::InvalidKey { .. })),
                "{bad:?}"
            );
        }
        assert_eq!(check_prefix("").ok(), Some(""));
        assert_eq!(check_prefix("a/b/").ok(), Some("a/b"));
        assert!(check_prefix("/").is_err());
        assert!(check_prefix("a//").is_err());
    }
}
