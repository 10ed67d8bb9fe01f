//! A backup chain: a diff or incr backup, its parent, and so on down to a full backup, and the
//! content of one file as that chain holds it.
//!
//! Restore writes a file from its newest whole copy and lays the later page deltas over it;
//! a diff or incr backup reads its parent's pages the same way ([`ChainPages`]) to store the
//! pages that changed as their difference from the parent's copy.

use std::collections::HashMap;
use std::io::Read;

use anyhow::{anyhow, bail, Result};
use pgkeep_catalog::{BackupRecord, Catalog, FileKind, FileRecord};
use pgkeep_repo::{DecompressReader, FrameError, Storage, StorageError};

use crate::bundle::{stored_key, StoredAt};

use crate::delta::{DeltaError, DeltaReader};

/// A backup and the backups it builds on, with their file lists.
pub(crate) struct Chain {
    /// The backup itself first, then its parent, and so on to a full backup.
    pub backups: Vec<BackupRecord>,
    /// Files of the backup itself, in path order.
    pub newest: Vec<FileRecord>,
    /// Regular files of the older backups, by label and path.
    older: HashMap<String, HashMap<String, FileRecord>>,
    pub block_size: u32,
}

/// One stored frame of a file's content (an object of its own, or a range of a bundle) and what
/// it must decompress to.
#[derive(Debug)]
pub(crate) struct Layer {
    pub at: StoredAt,
    pub size: u64,
    pub crc: u32,
}

/// Where one file's content comes from.
#[derive(Debug)]
pub(crate) struct Source {
    /// The whole copy the file starts from.
    pub base: Layer,
    /// Page deltas to lay over it, oldest first.
    pub deltas: Vec<Layer>,
}

impl Chain {
    /// Every backup of the chain must be restorable: a diff or incr is only a part of the data.
    pub fn load(catalog: &Catalog, backup: &BackupRecord) -> Result<Chain> {
        let mut backups = vec![backup.clone()];
        let mut older = HashMap::new();
        while let Some(up) = backups.last().and_then(|b| b.parent.clone()) {
            let child = backups.last().map(|b| b.label.clone()).unwrap_or_default();
            if backups.iter().any(|b| b.label == up) {
                bail!("the parent chain of backup {} loops at {up}: the catalog is damaged; restore another backup with --backup", backup.label);
            }
            let parent = catalog.backup(&up)?.ok_or_else(|| {
                anyhow!("backup {up}, which backup {child} builds on, is not in the catalog: restore another backup with --backup")
            })?;
            if !parent.status.is_restorable() {
                bail!(
                    "backup {up}, which backup {child} builds on, has status {} and cannot be restored: restore another backup with --backup",
                    parent.status
                );
            }
            let files: HashMap<String, FileRecord> = catalog
                .files(&up)?
                .into_iter()
                .filter(|f| f.kind == FileKind::File)
                .map(|f| (f.path.clone(), f))
                .collect();
            older.insert(up, files);
            backups.push(parent);
        }
        Ok(Chain {
            newest: catalog.files(&backup.label)?,
            block_size: backup.block_size,
            backups,
            older,
        })
    }

    pub fn label(&self) -> &str {
        &self.backups[0].label
    }

    /// Follow `f` (a file of the backup itself) down the chain: a record stored elsewhere
    /// leads to the older backup holding it, a page delta to the parent's record of the file,
    /// until a whole copy. Every step goes to an older backup, so the walk ends.
    pub fn source(&self, f: &FileRecord) -> Result<Source> {
        let mut deltas = Vec::new();
        let mut pos = 0;
        let mut rec = f;
        loop {
            let label = &self.backups[pos].label;
            let holder = rec.stored_in.as_deref().ok_or_else(|| {
                anyhow!(
                    "backup {label} records no content for {}: the catalog is damaged",
                    rec.path
                )
            })?;
            if holder != label {
                pos = self
                    .backups
                    .iter()
                    .position(|b| b.label == holder)
                    .filter(|&p| p > pos)
                    .ok_or_else(|| {
                        anyhow!("backup {label} refers to backup {holder} for {}, which is not an older backup of its chain: the catalog is damaged", rec.path)
                    })?;
                rec = self.older_file(pos, &rec.path)?;
                continue;
            }
            let layer = Layer {
                at: stored_key(label, &rec.path, rec.bundle),
                size: rec.size,
                crc: rec.crc32c.ok_or_else(|| {
                    anyhow!(
                        "backup {label} records no CRC for {}: the catalog is damaged",
                        rec.path
                    )
                })?,
            };
            if !rec.page_delta {
                deltas.reverse();
                return Ok(Source {
                    base: layer,
                    deltas,
                });
            }
            deltas.push(layer);
            pos += 1;
            rec = self.older_file(pos, &rec.path)?;
        }
    }

    fn older_file(&self, pos: usize, path: &str) -> Result<&FileRecord> {
        let Some(b) = self.backups.get(pos) else {
            bail!(
                "{path} is a page delta in full backup {}: the catalog is damaged",
                self.backups.last().map_or("", |b| b.label.as_str())
            );
        };
        self.older
            .get(&b.label)
            .and_then(|files| files.get(path))
            .ok_or_else(|| {
                anyhow!(
                    "{path} is missing from backup {}, which later backups build on: the catalog is damaged",
                    b.label
                )
            })
    }
}

/// One file's content as a backup chain holds it, page by page in increasing block order: its
/// whole copy, then each later page delta laid over it (a based page decoded against what the
/// layers before it made of that block), exactly as restore builds the file.
pub(crate) struct ChainPages {
    block_size: usize,
    base: DecompressReader<Box<dyn Read + Send>>,
    base_key: String,
    /// Bytes of the whole copy not read yet.
    base_left: u64,
    /// The next block the whole copy would yield.
    next: u64,
    layers: Vec<LayerCursor>,
    scratch: Vec<u8>,
}

/// A page delta being read alongside the whole copy.
struct LayerCursor {
    key: String,
    reader: DeltaReader<DecompressReader<Box<dyn Read + Send>>>,
    /// The block of the record read last; None before the first.
    at: Option<u32>,
    ended: bool,
}

impl ChainPages {
    pub fn open(storage: &dyn Storage, source: &Source, block_size: usize) -> Result<Self> {
        let base = DecompressReader::new(source.base.at.open(storage)?, false);
        let layers = source
            .deltas
            .iter()
            .map(|layer| {
                let reader = DecompressReader::new(layer.at.open(storage)?, false);
                let reader = DeltaReader::new(reader, block_size)
                    .map_err(|e| delta_error(&layer.at.key, e))?;
                Ok(LayerCursor {
                    key: layer.at.key.clone(),
                    reader,
                    at: None,
                    ended: false,
                })
            })
            .collect::<Result<_>>()?;
        Ok(ChainPages {
            block_size,
            base,
            base_key: source.base.at.key.clone(),
            base_left: source.base.size,
            next: 0,
            layers,
            scratch: vec![0; block_size],
        })
    }

    /// Block `block` into `out` (one block long). Blocks must be asked for in increasing order;
    /// a block the chain never held reads as zeros.
    pub fn page(&mut self, block: u32, out: &mut [u8]) -> Result<()> {
        let want = u64::from(block);
        if want < self.next || out.len() != self.block_size {
            bail!("block {block} of {} asked for out of order", self.base_key);
        }
        while self.next < want && self.base_left > 0 {
            self.read_base(out)?;
        }
        if self.base_left > 0 {
            self.read_base(out)?;
        } else {
            out.fill(0);
        }
        self.next = want + 1;
        for layer in &mut self.layers {
            while !layer.ended && layer.at.is_none_or(|at| at < block) {
                layer.at = layer
                    .reader
                    .next_block()
                    .map_err(|e| delta_error(&layer.key, e))?;
                layer.ended = layer.at.is_none();
            }
            if layer.at == Some(block) {
                self.scratch.copy_from_slice(out);
                layer
                    .reader
                    .page(&self.scratch, out)
                    .map_err(|e| delta_error(&layer.key, e))?;
            }
        }
        Ok(())
    }

    /// The whole copy's next block into `out`, zero-padded if the copy ends inside it.
    fn read_base(&mut self, out: &mut [u8]) -> Result<()> {
        let take = usize::try_from(self.base_left)
            .unwrap_or(usize::MAX)
            .min(self.block_size);
        out[take..].fill(0);
        self.base
            .read_exact(&mut out[..take])
            .map_err(|e| read_error(&self.base_key, e))?;
        self.base_left -= take as u64;
        self.next += 1;
        Ok(())
    }
}

/// A damaged delta or lz4 frame is corruption of the object; anything else is the storage failing.
pub(crate) fn delta_error(key: &str, e: DeltaError) -> anyhow::Error {
    match e {
        DeltaError::Io(io) if FrameError::from_io(&io).is_none() => StorageError::Io {
            key: key.to_string(),
            source: io,
        }
        .into(),
        e => StorageError::Corrupt {
            key: key.to_string(),
            detail: e.to_string(),
        }
        .into(),
    }
}

fn read_error(key: &str, e: std::io::Error) -> anyhow::Error {
    if FrameError::from_io(&e).is_some() || e.kind() == std::io::ErrorKind::UnexpectedEof {
        StorageError::Corrupt {
            key: key.to_string(),
            detail: format!("shorter than the catalog records ({e})"),
        }
        .into()
    } else {
        anyhow::Error::new(e).context(format!("reading {key}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pgkeep_catalog::BackupType;
    use pgkeep_repo::keys;

    fn backup(label: &str, parent: Option<&str>) -> BackupRecord {
        BackupRecord {
            label: label.into(),
            backup_type: if parent.is_some() {
                BackupType::Incr
            } else {
                BackupType::Full
            },
            parent: parent.map(str::to_string),
            stop_lsn: None,
            ..crate::walchain::tests::backup(1, 0, 0)
        }
    }

    fn file(stored_in: &str, page_delta: bool, size: u64) -> FileRecord {
        FileRecord {
            path: "base/5/16384".into(),
            kind: FileKind::File,
            size,
            mode: 0o600,
            uid: 0,
            gid: 0,
            mtime: 0,
            link_target: None,
            crc32c: Some(7),
            sha256: None,
            stored_size: 0,
            stored_in: Some(stored_in.into()),
            n_blocks: Some(3),
            page_delta,
            bundle: None,
        }
    }

    /// F holds the file whole, I1 a delta, I2 refers to I1's delta, I3 a delta again.
    fn chain(older: &[(&str, FileRecord)]) -> Chain {
        let labels = ["I3", "I2", "I1", "F"];
        let backups = labels
            .iter()
            .zip(labels.iter().skip(1).map(Some).chain([None]))
            .map(|(l, p)| backup(l, p.copied()))
            .collect();
        Chain {
            backups,
            newest: Vec::new(),
            older: older
                .iter()
                .map(|(l, f)| (l.to_string(), HashMap::from([(f.path.clone(), f.clone())])))
                .collect(),
            block_size: 8192,
        }
    }

    #[test]
    fn a_file_is_its_newest_whole_copy_plus_the_later_deltas_in_order() {
        let c = chain(&[
            ("F", file("F", false, 100_000)),
            ("I1", file("I1", true, 40)),
            ("I2", file("I1", true, 40)),
        ]);
        let s = c.source(&file("I3", true, 50)).unwrap();
        assert_eq!(s.base.at.key, keys::backup_file("F", "base/5/16384"));
        assert_eq!(s.base.size, 100_000);
        let deltas: Vec<_> = s.deltas.iter().map(|d| d.at.key.clone()).collect();
        assert_eq!(
            deltas,
            [
                keys::backup_file("I1", "base/5/16384"),
                keys::backup_file("I3", "base/5/16384")
            ]
        );
        // A reference straight to the whole copy needs no delta.
        let s = c.source(&file("F", false, 100_000)).unwrap();
        assert!(s.deltas.is_empty());
    }

    #[test]
    fn a_damaged_chain_is_an_error_not_a_loop_or_panic() {
        // A delta whose parent lacks the file.
        let c = chain(&[("F", file("F", false, 1))]);
        let e = c.source(&file("I3", true, 40)).unwrap_err().to_string();
        assert!(e.contains("missing from backup I2"), "{e}");
        // References must point to older backups of the chain.
        for holder in ["I9", "F2"] {
            let e = c.source(&file(holder, false, 1)).unwrap_err().to_string();
            assert!(e.contains("not an older backup of its chain"), "{e}");
        }
        let c = chain(&[("I2", file("I3", false, 1)), ("F", file("F", true, 40))]);
        let e = c.source(&file("I2", false, 1)).unwrap_err().to_string();
        assert!(e.contains("not an older backup of its chain"), "{e}");
        // A delta in the full backup at the end of the chain.
        let e = c.source(&file("F", true, 40)).unwrap_err().to_string();
        assert!(e.contains("page delta in full backup F"), "{e}");
    }
}
