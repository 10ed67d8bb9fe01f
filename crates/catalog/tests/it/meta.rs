//! Round trips and error messages of the `backup.ini` and `manifest` formats.

use pgkeep_catalog::meta::{backup_ini, manifest, parse_backup_ini, parse_manifest};
use pgkeep_catalog::{BackupStatus, BackupType, Bundled, FileKind, FileRecord, Lsn};
use proptest::prelude::*;

use crate::{arb_backup, arb_file, backup, file, time};

proptest! {
    #[test]
    fn backup_ini_round_trips(b in arb_backup()) {
        let text = backup_ini(&b);
        prop_assert_eq!(parse_backup_ini(&text).unwrap(), b);
    }

    #[test]
    fn backup_ini_round_trips_with_crlf(b in arb_backup()) {
        let text = backup_ini(&b).replace('\n', "\r\n");
        prop_assert_eq!(parse_backup_ini(&text).unwrap(), b);
    }

    #[test]
    fn manifest_round_trips(files in prop::collection::vec(arb_file(), 0..40)) {
        let text = manifest(&files);
        prop_assert_eq!(text.lines().count(), files.len() + 2);
        prop_assert_eq!(parse_manifest(&text).unwrap(), files);
    }

    #[test]
    fn parsers_never_panic(text in any::<String>()) {
        let _ = parse_backup_ini(&text);
        let _ = parse_manifest(&text);
        let _ = parse_manifest(&format!("pgkeep manifest 1\n{text}"));
    }
}

#[test]
fn backup_ini_reads_like_pg_rman() {
    let mut b = backup("20261121-101500D", "2026-11-21T10:15:00.123456Z");
    b.backup_type = BackupType::Diff;
    b.status = BackupStatus::Done;
    b.parent = Some("20261120-101500F".into());
    b.error = None;
    let text = backup_ini(&b);
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines[0].starts_with("# "), "{text}");
    for line in [
        "LABEL=20261121-101500D",
        "BACKUP_TYPE=diff",
        "STATUS=DONE",
        "PARENT=20261120-101500F",
        "START_LSN=0/2000028",
        "START_TIME=2026-11-21T10:15:00.123456Z",
        "RECOVERY_TIME=2026-11-21T10:16:29.123456Z",
        "SYSTEM_IDENTIFIER=16546506505935912961",
        "DATA_CHECKSUMS=true",
        "ERROR=",
        "FROM_STANDBY=false",
    ] {
        assert!(lines.contains(&line), "{line} missing from\n{text}");
    }
    assert_eq!(lines.len(), 25);
}

#[test]
fn backup_ini_accepts_omitted_optional_keys_and_blanks() {
    let text = "# by hand\n\nLABEL=x\nBACKUP_TYPE = full\nSTATUS= OK \nTIMELINE=2\n\
                START_LSN=1/A0\nSTART_WAL=w\nSTART_TIME=2026-11-21T11:15:00+01:00\n\
                DATA_BYTES=1\nSTORED_BYTES=2\nFILES=3\nPG_VERSION_NUM=150000\n\
                SYSTEM_IDENTIFIER=7\nBLOCK_SIZE=8192\nDATA_CHECKSUMS=false\nPID=1\n\
                HOSTNAME=\nPAGE_CHECKSUM_FAILURES=0\n";
    let b = parse_backup_ini(text).unwrap();
    assert_eq!(b.status, BackupStatus::Ok);
    assert_eq!(b.start_lsn, Lsn(0x1_0000_00A0));
    assert_eq!(b.start_time, time("2026-11-21T10:15:00Z"));
    assert_eq!(
        (b.parent, b.stop_lsn, b.end_time, b.error),
        (None, None, None, None)
    );
    assert_eq!(b.hostname, "");
    // Written before backups could come from a standby: they came from a primary.
    assert!(!b.from_standby);
}

#[test]
fn backup_ini_errors_name_key_and_line() {
    let good = backup_ini(&backup("20261121-101500F", "2026-11-21T10:15:00Z"));
    let cases = [
        (
            good.replace("START_LSN=0/2000028", "START_LSN=0/zz"),
            "backup.ini line 7: invalid START_LSN \"0/zz\", expected an LSN like 0/2000028",
        ),
        (
            good.replace("STATUS=RUNNING", "STATUS=FINE"),
            "backup.ini line 4: invalid STATUS \"FINE\", expected a backup status",
        ),
        (
            good.replace("PID=4242\n", ""),
            "backup.ini: missing key PID",
        ),
        (
            good.replace("PID=4242", "PID="),
            "backup.ini line 21: invalid PID \"\", expected a process id",
        ),
        (
            format!("{good}COLOUR=blue\n"),
            "backup.ini line 26: unknown key \"COLOUR\"",
        ),
        (
            format!("{good}PID=1\n"),
            "backup.ini line 26: PID given again, first on line 21",
        ),
        (
            good.replace("HOSTNAME=db1", "HOSTNAME=db\\q"),
            "backup.ini line 22: HOSTNAME: bad escape \\q in \"db\\\\q\"",
        ),
        (
            good.replace("LABEL=20261121-101500F", "20261121-101500F"),
            "backup.ini line 2: expected KEY=VALUE, found \"20261121-101500F\"",
        ),
        (
            good.replace("TIMELINE=1", "TIMELINE=-1"),
            "backup.ini line 6: invalid TIMELINE \"-1\", expected a timeline number",
        ),
    ];
    for (text, expected) in cases {
        assert_eq!(parse_backup_ini(&text).unwrap_err().to_string(), expected);
    }
}

#[test]
fn manifest_handles_odd_paths() {
    let mut files: Vec<FileRecord> = [
        "",
        "\\N",
        "#not a comment",
        "tab\there",
        "new\nline",
        "cr\r",
        "back\\slash\\",
        "pg_tblspc/16400/PG_16_202307071/5/16401",
        "ünïcödé/\u{2028}",
        " leading and trailing ",
    ]
    .iter()
    .enumerate()
    .map(|(i, p)| FileRecord {
        path: p.to_string(),
        ..file(i as u64, "20261121-101500F")
    })
    .collect();
    files.push(FileRecord {
        path: "pg_tblspc/16400".into(),
        kind: FileKind::Symlink,
        size: 0,
        mode: 0o120777,
        link_target: Some("/srv/tbs\t1".into()),
        crc32c: None,
        sha256: None,
        stored_size: 0,
        stored_in: None,
        n_blocks: None,
        ..file(99, "x")
    });
    files.push(FileRecord {
        link_target: Some(String::new()),
        stored_in: Some(String::new()),
        ..files[10].clone()
    });
    let text = manifest(&files);
    assert_eq!(text.lines().count(), files.len() + 2);
    assert!(
        text.starts_with("pgkeep manifest 2\n# path\tkind\t"),
        "{text}"
    );
    assert!(
        text.contains("pg_tblspc/16400\tsymlink\t0\t120777\t26\t26\t1763720199\t/srv/tbs\\t1\t\\N\t\\N\t0\t\\N\t\\N\t0\t\\N\n"),
        "{text}"
    );
    assert_eq!(parse_manifest(&text).unwrap(), files);
}

#[test]
fn manifest_errors_name_the_line() {
    let text = manifest(&[file(1, "L"), file(2, "L")]);
    let line3 = text.lines().nth(2).unwrap().to_string();
    let cases = [
        (
            String::new(),
            "manifest line 1: expected the header \"pgkeep manifest 2\", found \"\"",
        ),
        (
            text.replace("pgkeep manifest 2", "pgkeep manifest 7"),
            "manifest line 1: manifest format \"7\" is not supported, this pgkeep reads formats 1 and 2",
        ),
        (
            "pgkeep manifest 2\nbase/1\n".into(),
            "manifest line 2: expected the column list",
        ),
        (
            text.replace(&line3, "base/1\tfile"),
            "manifest line 3: expected 15 tab-separated fields, found 2",
        ),
        (
            text.replace("\tfile\t16384\t", "\tfile\t16x\t"),
            "manifest line 4: invalid size \"16x\"",
        ),
        (
            text.replace("\tfile\t", "\tpipe\t"),
            "manifest line 3: invalid file kind \"pipe\", expected one of file, dir, symlink",
        ),
        (
            text.replace("\t100600\t", "\t100900\t"),
            "manifest line 3: invalid mode \"100900\"",
        ),
        (
            text.replace("deadbeee", "+eadbeee"),
            "manifest line 3: invalid crc32c \"+eadbeee\"",
        ),
        (
            text.replace(&hex::encode([1u8; 32]), "01"),
            "manifest line 3: invalid sha256 \"01\"",
        ),
        (
            text.replace("\t0\t\\N\n", "\tyes\t\\N\n"),
            "manifest line 3: invalid page_delta \"yes\", expected 0 or 1",
        ),
    ];
    for (text, expected) in cases {
        assert_eq!(parse_manifest(&text).unwrap_err().to_string(), expected);
    }
}

#[test]
fn bundled_files_round_trip_and_format_1_still_reads() {
    let mut files = vec![file(1, "L"), file(2, "L")];
    files[1].bundle = Some(Bundled {
        id: 3,
        offset: 1 << 33,
        length: 4096,
    });
    let text = manifest(&files);
    assert!(text.contains("\t3:8589934592:4096\n"), "{text}");
    assert_eq!(parse_manifest(&text).unwrap(), files);
    for bad in ["3:1", "3:1:2:4", "x:1:2", "3:-1:2"] {
        let err = parse_manifest(&text.replace("3:8589934592:4096", bad)).unwrap_err();
        assert!(err.to_string().contains("invalid bundle"), "{bad}: {err}");
    }
    // A manifest written before bundles: 14 columns, every file an object of its own.
    files[1].bundle = None;
    let v1: String = manifest(&files)
        .replace("pgkeep manifest 2", "pgkeep manifest 1")
        .replace("\tpage_delta\tbundle\n", "\tpage_delta\n")
        .replace("\t\\N\n", "\n");
    assert_eq!(parse_manifest(&v1).unwrap(), files);
}
