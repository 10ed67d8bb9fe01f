//! The changed-block map of a diff or incr backup: which blocks of which relation main forks
//! WAL changed between the parent's start and the new backup's start, read from pgkeep's own
//! WAL archive, so the backup reads those blocks instead of every page of the cluster.
//!
//! The map is built conservatively. A relation whose storage was created or truncated in the
//! interval (`RM_SMGR_ID`, src/include/catalog/storage_xlog.h), a database created, dropped or
//! whose relation map changed (`RM_DBASE_ID`, src/include/commands/dbcommands_xlog.h;
//! `RM_RELMAP_ID`, src/include/utils/relmapper.h) and a tablespace created or dropped
//! (`RM_TBLSPC_ID`, src/include/commands/tablespace.h) are marked for the page scan: their
//! files change in ways block references do not show. Any other record that sets
//! `XLR_SPECIAL_REL_UPDATE` (src/include/access/xlogrecord.h: "modifies relation files in ways
//! not covered by the usual block references"), a gap or damaged segment in the archive, or a
//! record the decoder refuses makes the whole backup use the page scan. Every other rmgr,
//! built in or custom, reaches relation pages only through block references, which the decoder
//! reads the same way for all of them.

use std::collections::{HashMap, HashSet};
use std::ops::ControlFlow;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;
use pgkeep_pg::{
    segment_name, Fork, Lsn, RelFileLocator, TimelineId, WalRecord, WalSegSize, WalStream,
    SEGMENT_HEADER_SIZE,
};
use pgkeep_repo::{fetch_decompressed, keys};

use crate::archive::{is_archived, wait_for_wal};
use crate::repo::Repo;

/// What changed in one relation's main fork.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Changes<'m> {
    /// These relation blocks (sorted, across all of the relation's segment files) and, when
    /// `limit` is set, every block from `limit` on: the fork was truncated to that many blocks
    /// (0: created anew) in the interval, so nothing of the parent's copy from there on counts.
    Blocks {
        blocks: &'m [u32],
        limit: Option<u32>,
    },
    /// Storage created or truncated, or its database or tablespace changed wholesale: scan it.
    Scan,
}

/// Where a map came from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) enum Origin {
    /// pgkeep's WAL archive; `records` counts the records read.
    #[default]
    Archive,
    /// The server's WAL summaries (PostgreSQL 17+); `records` counts the summary files read.
    Summaries,
}

/// Changed main-fork blocks from the WAL between two LSNs.
#[derive(Debug, Default)]
pub(crate) struct BlockMap {
    pub(crate) blocks: HashMap<RelFileLocator, Vec<u32>>,
    /// Main forks truncated (or created) in the interval, with the lowest length they had.
    pub(crate) limits: HashMap<RelFileLocator, u32>,
    /// Databases by (tablespace, database) created or dropped in the interval: every main fork
    /// in them counts as created anew (WAL summaries' whole-database entries).
    pub(crate) new_dbs: HashSet<(u32, u32)>,
    scan_rels: HashSet<RelFileLocator>,
    /// Databases by (tablespace, database); a tablespace of 0 stands for every tablespace.
    scan_dbs: HashSet<(u32, u32)>,
    scan_spcs: HashSet<u32>,
    /// The interval the map covers.
    pub since: Lsn,
    pub until: Lsn,
    pub origin: Origin,
    /// Records (archive) or summary files (summaries) read for the interval.
    pub records: u64,
    /// Why the server's WAL summaries were not used although it keeps them.
    pub summaries_unused: Option<String>,
}

impl BlockMap {
    /// An empty map of the interval from `since` to `until`.
    pub(crate) fn new(since: Lsn, until: Lsn, origin: Origin) -> BlockMap {
        BlockMap {
            since,
            until,
            origin,
            ..BlockMap::default()
        }
    }

    /// What changed in the main fork of `rel`.
    pub fn changes(&self, rel: RelFileLocator) -> Changes<'_> {
        if self.scan_rels.contains(&rel)
            || self.scan_spcs.contains(&rel.spc_oid)
            || self.scan_dbs.contains(&(rel.spc_oid, rel.db_oid))
            || self.scan_dbs.contains(&(0, rel.db_oid))
        {
            return Changes::Scan;
        }
        let limit = match self.new_dbs.contains(&(rel.spc_oid, rel.db_oid)) {
            true => Some(0),
            false => self.limits.get(&rel).copied(),
        };
        Changes::Blocks {
            blocks: self.blocks.get(&rel).map_or(&[], Vec::as_slice),
            limit,
        }
    }

    /// Takes in one record that ends at or after `since` and starts before `until`; an error
    /// when the record changes storage in a way the map cannot follow.
    fn add(&mut self, r: &WalRecord, pg_major: u32) -> Result<(), String> {
        self.records += 1;
        for b in &r.blocks {
            if b.fork == Fork::Main {
                self.blocks.entry(b.rel).or_default().push(b.block);
            }
        }
        let info = r.rmgr_info();
        let oid_at = |offset: usize| {
            r.main_data
                .get(offset..offset + 4)
                .and_then(|b| b.try_into().ok())
                .map(u32::from_ne_bytes)
        };
        let short = || {
            format!(
                "record at {} of rmgr {} has {} bytes of main data, too few for its type",
                r.lsn,
                r.rmid,
                r.main_data.len()
            )
        };
        match r.rmid {
            RM_SMGR_ID => {
                // xl_smgr_create: RelFileNode first; xl_smgr_truncate: BlockNumber, then it.
                let at = match info {
                    XLOG_SMGR_CREATE => 0,
                    XLOG_SMGR_TRUNCATE => 4,
                    _ => return Err(unknown(r)),
                };
                let rel = pgkeep_pg::rel_file_locator_at(&r.main_data, at).ok_or_else(short)?;
                self.scan_rels.insert(rel);
            }
            RM_DBASE_ID => {
                // Every record type of 12 to 18 starts with the database's Oid; which of them
                // copies files (FILE_COPY, the only kind before 15) does not matter when every
                // file of that database, in any tablespace, is scanned.
                let known = if pg_major >= 15 {
                    info <= XLOG_DBASE_DROP_15
                } else {
                    info <= XLOG_DBASE_DROP_12
                };
                if !known {
                    return Err(unknown(r));
                }
                self.scan_dbs.insert((0, oid_at(0).ok_or_else(short)?));
            }
            RM_TBLSPC_ID => {
                self.scan_spcs.insert(oid_at(0).ok_or_else(short)?);
            }
            RM_RELMAP_ID => {
                // xl_relmap_update: dbid, tsid. Mapped relations change relfilenode with an
                // smgr create anyway; scanning their database as well costs little.
                let (db, spc) = (oid_at(0).ok_or_else(short)?, oid_at(4).ok_or_else(short)?);
                self.scan_dbs.insert((spc, db));
            }
            // Commit and abort records set XLR_SPECIAL_REL_UPDATE when they delete the files of
            // relations dropped (or created and rolled back) by the transaction
            // (`XactLogCommitRecord`, `XactLogAbortRecord`, src/backend/access/transam/xact.c).
            // A deleted file is not backed up; one created again under the same name comes with
            // an smgr create record, which sends it to the scan.
            RM_XACT_ID => {}
            _ if r.special_rel_update() => return Err(unknown(r)),
            _ => {}
        }
        Ok(())
    }

    pub(crate) fn finish(&mut self) {
        for blocks in self.blocks.values_mut() {
            blocks.sort_unstable();
            blocks.dedup();
        }
    }

    /// Test hook: forget one block, to prove that the tests notice a map missing a change.
    pub(crate) fn drop_block_for_tests(&mut self) {
        if !cfg!(debug_assertions) {
            return;
        }
        let Ok(spec) = std::env::var("PGKEEP_TEST_DROP_BLOCK") else {
            return;
        };
        let Some((rel, block)) = spec.split_once('/') else {
            return;
        };
        let (Ok(rel), Ok(block)) = (rel.parse::<u32>(), block.parse::<u32>()) else {
            return;
        };
        for (r, blocks) in &mut self.blocks {
            if r.rel_number == rel {
                blocks.retain(|b| *b != block);
            }
        }
    }
}

/// Resource managers the map interprets (src/include/access/rmgrlist.h, the same ids in 12 to
/// 18) and their record types.
const RM_XACT_ID: u8 = 1;
const RM_SMGR_ID: u8 = 2;
const RM_DBASE_ID: u8 = 4;
const RM_TBLSPC_ID: u8 = 5;
const RM_RELMAP_ID: u8 = 7;
/// src/include/catalog/storage_xlog.h.
const XLOG_SMGR_CREATE: u8 = 0x10;
const XLOG_SMGR_TRUNCATE: u8 = 0x20;
/// src/include/commands/dbcommands_xlog.h: CREATE 0x00 and DROP 0x10 before 15; from 15
/// CREATE_FILE_COPY 0x00, CREATE_WAL_LOG 0x10 and DROP 0x20.
const XLOG_DBASE_DROP_12: u8 = 0x10;
const XLOG_DBASE_DROP_15: u8 = 0x20;

fn unknown(r: &WalRecord) -> String {
    format!(
        "record at {} (rmgr {}, info 0x{:02X}) changes relation storage in a way pgkeep does not follow",
        r.lsn, r.rmid, r.info
    )
}

/// Where the map's WAL comes from and what it covers.
pub(crate) struct MapSource<'a> {
    pub repo: &'a Repo,
    pub system_identifier: u64,
    pub timeline: TimelineId,
    pub seg: WalSegSize,
    pub block_size: u32,
    /// The parent's start LSN: pages the parent may hold older copies of changed from here on.
    pub since: Lsn,
    /// The new backup's start LSN: WAL replay covers every change from here on.
    pub until: Lsn,
    /// `pg_wal/archive_status` of the server that archives, when it is on this host.
    pub status_dir: Option<PathBuf>,
    pub archive_timeout: Duration,
}

/// Builds the map from the archive, or says why it cannot be trusted (the caller then scans).
/// The segment holding `until` must have been switched already, so it reaches the archive.
pub(crate) fn build(src: &MapSource<'_>) -> Result<Result<BlockMap, String>> {
    if src.since > src.until {
        return Ok(Err(format!(
            "the parent starts at {} after this backup's start {}",
            src.since, src.until
        )));
    }
    let first = src.since.segment_number(src.seg);
    let last = src.until.segment_number(src.seg);
    let names: Vec<String> = (first..=last)
        .map(|s| segment_name(src.timeline, s, src.seg))
        .collect();
    // A segment neither archived nor waiting for the archiver is a hole in the archive: no
    // wait would fill it.
    for name in &names[..names.len() - 1] {
        let queued = src
            .status_dir
            .as_ref()
            .is_none_or(|d| d.join(format!("{name}.ready")).exists());
        if !is_archived(src.repo, name)? && !queued {
            return Ok(Err(format!("WAL segment {name} is not in the archive")));
        }
    }
    if let Err(e) = wait_for_wal(src.repo, &names, src.archive_timeout, |_| {}) {
        return Ok(Err(format!("{e:#}")));
    }
    let mut map = BlockMap::new(src.since, src.until, Origin::Archive);
    let mut stream = WalStream::new(src.block_size);
    let mut reached = false;
    let mut refused: Option<String> = None;
    for (i, name) in names.iter().enumerate() {
        let Some(row) = src.repo.catalog.wal(name)? else {
            return Ok(Err(format!("WAL segment {name} is not in the archive")));
        };
        let key = keys::wal(src.system_identifier, name);
        let mut bytes = Vec::with_capacity(src.seg.bytes() as usize);
        if let Err(e) = fetch_decompressed(
            src.repo.storage(),
            &key,
            &mut bytes,
            Some((row.size, row.crc32c)),
            false,
        ) {
            return Ok(Err(format!("reading WAL segment {name}: {e}")));
        }
        let pg_major = stream_major(stream.pg_major().unwrap_or(0), &bytes);
        let walked = stream.push_segment(&bytes, &mut |r| {
            if r.lsn >= src.until {
                reached = true;
                return ControlFlow::Break(());
            }
            if r.end >= src.until {
                reached = true;
            }
            // A record that ends before the parent's start left its page LSNs below it.
            if r.end < src.since {
                return ControlFlow::Continue(());
            }
            match map.add(&r, pg_major) {
                Ok(()) => ControlFlow::Continue(()),
                Err(why) => {
                    refused = Some(why);
                    ControlFlow::Break(())
                }
            }
        });
        if let Some(why) = refused {
            return Ok(Err(why));
        }
        if let Err(e) = walked {
            return Ok(Err(format!("decoding WAL segment {name}: {e}")));
        }
        if i == 0 {
            // The tail of a record begun in an earlier segment was skipped; if it could end at
            // or after the parent's start, its blocks would be missing from the map.
            let segment_start = Lsn::from_segment(first, src.seg);
            let opened = Lsn(segment_start.0 + SEGMENT_HEADER_SIZE as u64);
            match stream.first_record() {
                Some(at) if at == opened || at < src.since => {}
                _ => {
                    return Ok(Err(format!(
                        "the WAL record before the parent's start {} begins in an earlier segment than {name}",
                        src.since
                    )))
                }
            }
        }
        if reached {
            break;
        }
    }
    if !reached {
        return Ok(Err(format!(
            "the archived WAL ends before this backup's start {}",
            src.until
        )));
    }
    map.finish();
    map.drop_block_for_tests();
    Ok(Ok(map))
}

/// The major version of the WAL in `segment`: the stream knows it from the second segment on.
fn stream_major(known: u32, segment: &[u8]) -> u32 {
    if known != 0 {
        return known;
    }
    pgkeep_pg::parse_segment_header(segment).map_or(0, |h| h.pg_major)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rel(n: u32) -> RelFileLocator {
        RelFileLocator {
            spc_oid: 1663,
            db_oid: 5,
            rel_number: n,
        }
    }

    fn record(rmid: u8, info: u8, main_data: Vec<u8>) -> WalRecord {
        WalRecord {
            lsn: Lsn(0x100),
            end: Lsn(0x140),
            xid: 0,
            prev: Lsn(0),
            info,
            rmid,
            blocks: Vec::new(),
            origin: None,
            toplevel_xid: None,
            main_data,
        }
    }

    fn locator_bytes(r: RelFileLocator) -> Vec<u8> {
        [r.spc_oid, r.db_oid, r.rel_number]
            .iter()
            .flat_map(|v| v.to_ne_bytes())
            .collect()
    }

    #[test]
    fn storage_changes_send_their_relations_to_the_scan() {
        let mut map = BlockMap::default();
        let mut create = locator_bytes(rel(1));
        create.extend(0u32.to_ne_bytes());
        map.add(&record(RM_SMGR_ID, XLOG_SMGR_CREATE | 1, create), 15)
            .unwrap();
        let mut truncate = 7u32.to_ne_bytes().to_vec();
        truncate.extend(locator_bytes(rel(2)));
        truncate.extend(7u32.to_ne_bytes());
        map.add(&record(RM_SMGR_ID, XLOG_SMGR_TRUNCATE | 1, truncate), 15)
            .unwrap();
        map.add(
            &record(RM_DBASE_ID, 0x10 | 1, 6u32.to_ne_bytes().to_vec()),
            15,
        )
        .unwrap();
        let mut heap = record(10, 0, Vec::new());
        heap.blocks.push(pgkeep_pg::BlockRef {
            id: 0,
            rel: rel(3),
            fork: Fork::Main,
            block: 9,
            will_init: false,
            data_length: 0,
            image: None,
        });
        map.add(&heap, 15).unwrap();
        map.finish();
        assert_eq!(map.changes(rel(1)), Changes::Scan);
        assert_eq!(map.changes(rel(2)), Changes::Scan);
        let blocks = |blocks| Changes::Blocks {
            blocks,
            limit: None,
        };
        assert_eq!(map.changes(rel(3)), blocks(&[9]));
        assert_eq!(map.changes(rel(4)), blocks(&[]));
        let other_db = RelFileLocator {
            db_oid: 6,
            ..rel(4)
        };
        assert_eq!(map.changes(other_db), Changes::Scan);
    }

    #[test]
    fn records_the_map_cannot_follow_are_refused() {
        let mut map = BlockMap::default();
        assert!(map
            .add(&record(RM_SMGR_ID, 0x30, vec![0; 16]), 15)
            .unwrap_err()
            .contains("record at 0/100 (rmgr 2, info 0x30)"));
        // DROP is 0x20 from 15 only.
        assert!(map.add(&record(RM_DBASE_ID, 0x20, vec![0; 8]), 14).is_err());
        assert!(map.add(&record(RM_DBASE_ID, 0x20, vec![0; 8]), 15).is_ok());
        // A custom rmgr's record that says it changes files beyond its block references.
        assert!(map.add(&record(130, 0x01, Vec::new()), 16).is_err());
        assert!(map.add(&record(130, 0x00, Vec::new()), 16).is_ok());
        // A commit that deletes dropped relations' files.
        assert!(map.add(&record(RM_XACT_ID, 0x81, Vec::new()), 16).is_ok());
        assert!(map
            .add(&record(RM_SMGR_ID, XLOG_SMGR_CREATE, vec![1]), 15)
            .is_err());
    }
}
