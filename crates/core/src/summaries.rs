//! The changed-block map from the server's own WAL summaries (PostgreSQL 17 and later with
//! `summarize_wal = on`), trusted the way `pg_basebackup --incremental` trusts them.
//!
//! The server's WAL summarizer writes, for each stretch of WAL, which blocks of which relation
//! forks its records touched and the "limit block" of each fork truncated or created in it
//! (src/backend/postmaster/walsummarizer.c). pgkeep waits until the summarizer has passed the
//! new backup's start (`WaitForWalSummarization`), checks that the summaries of the backup's
//! timeline cover the interval from the parent's start without a hole (`WalSummariesAreComplete`,
//! src/backend/backup/walsummary.c), and reads them with `pg_wal_summary_contents()`, merging
//! them as `PrepareForIncrementalBackup` does (src/backend/backup/basebackup_incremental.c):
//! modified blocks are unioned and a fork keeps the lowest limit block any summary gives it.
//! `GetFileBackupMethod` then reads a fork's blocks from the limit on whole, and a database
//! entry (relfilenode 0) means every file of that database was created anew. Anything short of
//! that (no summarizer, a hole, an error from the server) is a reason, and the caller falls back
//! to the WAL archive.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use pgkeep_pg::{Lsn, RelFileLocator, TimelineId};

use crate::blockmap::{BlockMap, Origin};
use crate::pg::PgConn;

/// One WAL summary file as `pg_available_wal_summaries()` lists it: the records starting in
/// `[start, end)` on timeline `tli`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct SummaryFile {
    pub tli: u32,
    pub start: Lsn,
    pub end: Lsn,
}

/// Whether the server keeps WAL summaries at all: 17 or later with `summarize_wal = on`.
pub(crate) fn enabled(conn: &mut PgConn) -> Result<bool> {
    if conn.major() < 17 {
        return Ok(false);
    }
    Ok(conn.setting("summarize_wal")? == "on")
}

/// The map for `[since, until)` on `timeline` from the server's summaries, or why they cannot
/// give it. Waits at most `wait` for the summarizer to reach `until`.
pub(crate) fn build(
    conn: &mut PgConn,
    timeline: TimelineId,
    since: Lsn,
    until: Lsn,
    wait: Duration,
) -> Result<BlockMap, String> {
    let mut map = BlockMap::new(since, until, Origin::Summaries);
    if since >= until {
        // Nothing happened between the two starts (or the parent is newer: the caller refuses).
        return match since == until {
            true => Ok(map),
            false => Err(format!(
                "the parent starts at {since} after this backup's start {until}"
            )),
        };
    }
    wait_for_summarizer(conn, until, wait)?;
    let all = available(conn).map_err(|e| format!("{e:#}"))?;
    let files = covering(&all, timeline.0, since, until)?;
    for f in &files {
        read_contents(conn, f, &mut map).map_err(|e| format!("{e:#}"))?;
        map.records += 1;
    }
    map.finish();
    map.drop_block_for_tests();
    Ok(map)
}

/// The summaries of `tli` that cover `[since, until)`, in LSN order, or where the first hole is
/// (`FilterWalSummaries` and `WalSummariesAreComplete`, src/backend/backup/walsummary.c).
pub(crate) fn covering(
    all: &[SummaryFile],
    tli: u32,
    since: Lsn,
    until: Lsn,
) -> Result<Vec<SummaryFile>, String> {
    let mut files: Vec<SummaryFile> = all
        .iter()
        .filter(|f| f.tli == tli && f.end > since && f.start < until)
        .copied()
        .collect();
    files.sort_by_key(|f| (f.start, f.end));
    let mut reached = since;
    for f in &files {
        if f.start > reached {
            break;
        }
        reached = reached.max(f.end);
    }
    if reached >= until {
        return Ok(files);
    }
    Err(match files.is_empty() {
        true => format!("the server has no WAL summaries on timeline {tli} from {since} to {until}"),
        false => format!(
            "the server's WAL summaries on timeline {tli} from {since} to {until} have a hole at {reached}"
        ),
    })
}

/// Polls `pg_get_wal_summarizer_state()` until the summarizer has summarized WAL up to `until`.
fn wait_for_summarizer(conn: &mut PgConn, until: Lsn, wait: Duration) -> Result<(), String> {
    let started = Instant::now();
    loop {
        let reached = summarized_lsn(conn).map_err(|e| format!("{e:#}"))?;
        if reached >= until {
            return Ok(());
        }
        if started.elapsed() >= wait {
            return Err(format!(
                "the WAL summarizer reached only {reached}, not this backup's start {until}, within {} s",
                wait.as_secs()
            ));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn summarized_lsn(conn: &mut PgConn) -> Result<Lsn> {
    let text = conn.query_text("SELECT summarized_lsn::text FROM pg_get_wal_summarizer_state()")?;
    text.parse()
        .with_context(|| format!("unexpected summarized LSN {text:?} from the server"))
}

fn available(conn: &mut PgConn) -> Result<Vec<SummaryFile>> {
    let sql = "SELECT tli, start_lsn::text, end_lsn::text FROM pg_available_wal_summaries()";
    let rows = conn
        .client()
        .query(sql, &[])
        .with_context(|| format!("running {sql}"))?;
    let lsn = |s: String| -> Result<Lsn> {
        s.parse()
            .with_context(|| format!("unexpected LSN {s:?} in pg_available_wal_summaries()"))
    };
    rows.into_iter()
        .map(|r| {
            let tli: i64 = r.get(0);
            Ok(SummaryFile {
                tli: u32::try_from(tli).with_context(|| format!("unexpected timeline {tli}"))?,
                start: lsn(r.get(1))?,
                end: lsn(r.get(2))?,
            })
        })
        .collect()
}

/// Merges one summary's main-fork entries into `map` (`PrepareForIncrementalBackup`).
fn read_contents(conn: &mut PgConn, f: &SummaryFile, map: &mut BlockMap) -> Result<()> {
    // The LSNs are pgkeep's own `X/X` values, safe to write into the statement.
    let sql = format!(
        "SELECT relfilenode::int8, reltablespace::int8, reldatabase::int8, relblocknumber, is_limit_block \
         FROM pg_wal_summary_contents({}, '{}', '{}') WHERE relforknumber = 0",
        f.tli, f.start, f.end
    );
    let rows = conn.client().query(&sql, &[]).with_context(|| {
        format!(
            "reading WAL summary {}..{} of timeline {}",
            f.start, f.end, f.tli
        )
    })?;
    let oid =
        |v: i64| u32::try_from(v).with_context(|| format!("unexpected oid {v} in a WAL summary"));
    for r in rows {
        let rel = RelFileLocator {
            rel_number: oid(r.get(0))?,
            spc_oid: oid(r.get(1))?,
            db_oid: oid(r.get(2))?,
        };
        let block: i64 = r.get(3);
        let block = u32::try_from(block)
            .with_context(|| format!("unexpected block {block} in a WAL summary"))?;
        let is_limit: bool = r.get(4);
        match (rel.rel_number, is_limit) {
            // The database as a whole was created or dropped (`SummarizeDbaseRecord`).
            (0, _) => {
                map.new_dbs.insert((rel.spc_oid, rel.db_oid));
            }
            (_, true) => {
                let limit = map.limits.entry(rel).or_insert(block);
                *limit = (*limit).min(block);
            }
            (_, false) => map.blocks.entry(rel).or_default().push(block),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(start: u64, end: u64) -> SummaryFile {
        SummaryFile {
            tli: 1,
            start: Lsn(start),
            end: Lsn(end),
        }
    }

    #[test]
    fn summaries_must_cover_the_interval_without_a_hole() {
        let all = [file(0x100, 0x200), file(0x200, 0x300), file(0x300, 0x400)];
        assert_eq!(
            covering(&all, 1, Lsn(0x180), Lsn(0x300)).unwrap(),
            vec![all[0], all[1]]
        );
        // Another timeline's summaries do not count.
        assert!(covering(&all, 2, Lsn(0x180), Lsn(0x300))
            .unwrap_err()
            .contains("no WAL summaries on timeline 2"));
        // Summaries stop short of this backup's start.
        assert!(covering(&all, 1, Lsn(0x180), Lsn(0x500))
            .unwrap_err()
            .contains("hole at 0/400"));
        // summarize_wal turned on after the parent started.
        assert!(covering(&all[1..], 1, Lsn(0x180), Lsn(0x300))
            .unwrap_err()
            .contains("hole at 0/180"));
        let holed = [all[0], all[2]];
        assert!(covering(&holed, 1, Lsn(0x100), Lsn(0x400))
            .unwrap_err()
            .contains("hole at 0/200"));
    }
}
