//! Repository files are 0600 and directories 0700 whatever the umask; alone in its own test
//! binary because the umask is process-wide.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use pgkeep_repo::{put_bytes, LocalStorage};

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o7777
}

#[test]
fn modes_do_not_depend_on_umask() {
    let dir = tempfile::tempdir().unwrap();
    // One umask that would open files up and one that would lock the owner out: neither may
    // change what the repository gets.
    for (round, umask) in [(1, 0o000), (2, 0o277)] {
        // SAFETY: no other thread of this test binary creates files meanwhile.
        let old = unsafe { libc::umask(umask) };
        let root = dir.path().join(format!("repo{round}"));
        let s = LocalStorage::new(&root);
        let result = put_bytes(&s, "archive/1/0000000100000000/seg.lz4", b"x")
            .and_then(|()| put_bytes(&s, "top", b"y"));
        unsafe { libc::umask(old) };
        result.unwrap();
        for d in ["", "archive", "archive/1", "archive/1/0000000100000000"] {
            assert_eq!(mode(&root.join(d)), 0o700, "{d:?} under umask {umask:o}");
        }
        assert_eq!(
            mode(&root.join("archive/1/0000000100000000/seg.lz4")),
            0o600
        );
        assert_eq!(mode(&root.join("top")), 0o600);
    }
}
