//! Bundles: a backup's small files stored together, their lz4 frames one after another in
//! objects `backup/<label>/bundle/<id>`, so a cluster's thousand small files cost a few requests
//! to an object store instead of a thousand (`[repo] bundle`). The manifest records each file's
//! bundle, offset and length; everything that reads a stored file goes through
//! [`StoredAt::open`], which reads a range of a bundle or an object of its own alike.

use std::io::{self, Read, Write};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;

use pgkeep_catalog::Bundled;
use pgkeep_repo::{keys, PendingObject, Storage, StorageError};

/// Files whose raw content is at most this long go into a bundle (pgBackRest's
/// `repo-bundle-limit` default); bigger ones get an object of their own.
pub(crate) const BUNDLE_LIMIT: u64 = 2 << 20;

/// A bundle is closed once it holds this many (compressed) bytes; an S3 bundle of this size is
/// still one PUT.
pub(crate) const BUNDLE_SIZE: u64 = 4 << 20;

/// Where one stored file's compressed frame goes.
pub(crate) enum Sink {
    /// An object of its own.
    Object(Box<dyn PendingObject>),
    /// The end of an open bundle, the frame starting at `start`.
    Bundle { bundle: OpenBundle, start: u64 },
}

pub(crate) struct OpenBundle {
    id: u32,
    object: Box<dyn PendingObject>,
    len: u64,
}

impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Sink::Object(o) => o.write(buf),
            Sink::Bundle { bundle, .. } => {
                let n = bundle.object.write(buf)?;
                bundle.len += n as u64;
                Ok(n)
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Sink::Object(o) => o.flush(),
            Sink::Bundle { bundle, .. } => bundle.object.flush(),
        }
    }
}

/// Hands out sinks to the copy workers: a worker storing a small file takes an open bundle
/// (or starts one), appends the file's frame and gives the bundle back, so no two files are
/// ever written into one bundle at once and no lock is held while compressing. Bundles are
/// committed like the backup's other objects (`commit_unsynced`, made durable by the
/// storage's `sync` before the backup is DONE).
pub(crate) struct Bundler<'a> {
    storage: &'a dyn Storage,
    label: &'a str,
    enabled: bool,
    next_id: AtomicU32,
    idle: Mutex<Vec<OpenBundle>>,
}

impl<'a> Bundler<'a> {
    pub fn new(storage: &'a dyn Storage, label: &'a str, enabled: bool) -> Bundler<'a> {
        Bundler {
            storage,
            label,
            enabled,
            next_id: AtomicU32::new(1),
            idle: Mutex::new(Vec::new()),
        }
    }

    /// Where to write a file stored at `key` whose raw content is at most `raw` bytes long.
    pub fn sink(&self, key: &str, raw: u64) -> Result<Sink, StorageError> {
        if !self.enabled || raw > BUNDLE_LIMIT {
            return Ok(Sink::Object(self.storage.create(key)?));
        }
        let idle = self.lock().pop();
        let bundle = match idle {
            Some(b) => b,
            None => {
                let id = self.next_id.fetch_add(1, Ordering::Relaxed);
                OpenBundle {
                    id,
                    object: self.storage.create(&keys::backup_bundle(self.label, id))?,
                    len: 0,
                }
            }
        };
        let start = bundle.len;
        Ok(Sink::Bundle { bundle, start })
    }

    /// The frame written to `sink` is complete: commit an object of its own, or give the
    /// bundle back (committing it once full). Returns where in a bundle the frame lies.
    pub fn close(&self, sink: Sink) -> Result<Option<Bundled>, StorageError> {
        match sink {
            Sink::Object(o) => {
                o.commit_unsynced()?;
                Ok(None)
            }
            Sink::Bundle { bundle, start } => {
                let placed = Bundled {
                    id: bundle.id,
                    offset: start,
                    length: bundle.len - start,
                };
                if bundle.len >= BUNDLE_SIZE {
                    bundle.object.commit_unsynced()?;
                } else {
                    self.lock().push(bundle);
                }
                Ok(Some(placed))
            }
        }
    }

    /// Commit the bundles still open; every file placed in one is then stored.
    pub fn finish(&self) -> Result<(), StorageError> {
        let open = std::mem::take(&mut *self.lock());
        for b in open {
            b.object.commit_unsynced()?;
        }
        Ok(())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<OpenBundle>> {
        // A worker that panicked while holding the lock only pushed or popped a bundle.
        self.idle.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The key a stored file's content is read from, and its byte range when it lies in a bundle:
/// `label` is the backup holding it (`stored_in`).
pub(crate) fn stored_key(label: &str, path: &str, bundle: Option<Bundled>) -> StoredAt {
    match bundle {
        Some(b) => StoredAt {
            key: keys::backup_bundle(label, b.id),
            range: Some((b.offset, b.length)),
        },
        None => StoredAt {
            key: keys::backup_file(label, path),
            range: None,
        },
    }
}

/// Where a stored file's compressed frame is: an object, or a range of a bundle.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct StoredAt {
    pub key: String,
    /// `(offset, length)` in the bundle at `key`.
    pub range: Option<(u64, u64)>,
}

impl StoredAt {
    /// The frame's bytes, to hand to a `DecompressReader`.
    pub fn open(&self, storage: &dyn Storage) -> Result<Box<dyn Read + Send>, StorageError> {
        match self.range {
            Some((offset, len)) => storage.open_range(&self.key, offset, len),
            None => storage.open(&self.key),
        }
    }

    /// How errors and reports name it: the key, and the range for a bundled file.
    pub fn name(&self) -> String {
        match self.range {
            Some((offset, len)) => format!("{} (bytes {offset}..{})", self.key, offset + len),
            None => self.key.clone(),
        }
    }
}

/// `items` apart: those read on their own (`bundled` gives `None`), in their order, and the
/// items of each bundle, by offset, so that a bundle's files are read with one request
/// ([`BundleSpan`]), as restore and validate do.
pub(crate) fn by_bundle<T>(
    items: impl IntoIterator<Item = T>,
    bundled: impl Fn(&T) -> Option<&StoredAt>,
) -> (Vec<T>, Vec<Vec<T>>) {
    let mut alone = Vec::new();
    let mut bundled_items: Vec<(StoredAt, T)> = Vec::new();
    for item in items {
        match bundled(&item).cloned() {
            Some(at) => bundled_items.push((at, item)),
            None => alone.push(item),
        }
    }
    // By bundle, then offset.
    bundled_items.sort_by(|a, b| a.0.cmp(&b.0));
    let mut groups: Vec<Vec<T>> = Vec::new();
    let mut current: Option<String> = None;
    for (at, item) in bundled_items {
        if current.as_deref() != Some(at.key.as_str()) {
            groups.push(Vec::new());
            current = Some(at.key);
        }
        groups.last_mut().expect("pushed above").push(item);
    }
    (alone, groups)
}

/// Frames of one bundle read front to back with one request, from the first frame wanted to the
/// end of the last (restore and validate read a bundle's files this way). Frames must be asked
/// for in increasing offset; the bytes between them are read past.
pub(crate) struct BundleSpan {
    reader: Box<dyn Read + Send>,
    pos: u64,
}

impl BundleSpan {
    /// The bundle at `key` from `first`'s offset to the end of `last` (both `(offset, length)`).
    pub fn open(
        storage: &dyn Storage,
        key: &str,
        first: (u64, u64),
        last: (u64, u64),
    ) -> Result<BundleSpan, StorageError> {
        let end = last.0 + last.1;
        let reader = storage.open_range(key, first.0, end.saturating_sub(first.0))?;
        Ok(BundleSpan {
            reader,
            pos: first.0,
        })
    }

    /// Hand the frame `(offset, length)` to `read`, then read past whatever it left of the frame.
    /// An error here (frames out of order, the span ending early) leaves the span unusable;
    /// what `read` itself returns (a frame that does not decode) does not.
    pub fn with_frame<T>(
        &mut self,
        (offset, len): (u64, u64),
        read: impl FnOnce(&mut dyn Read) -> T,
    ) -> io::Result<T> {
        let gap = offset.checked_sub(self.pos).ok_or_else(|| {
            io::Error::other(format!(
                "the frame at byte {offset} starts before the end of the one read before it"
            ))
        })?;
        skip(&mut self.reader, gap)?;
        let mut frame = (&mut self.reader).take(len);
        let out = read(&mut frame);
        let rest = frame.limit();
        skip(&mut frame, rest)?;
        self.pos = offset + len;
        Ok(out)
    }
}

/// Read past `n` bytes; an error if fewer are there.
fn skip(reader: &mut dyn Read, n: u64) -> io::Result<()> {
    let skipped = io::copy(&mut reader.take(n), &mut io::sink())?;
    if skipped < n {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!("ended {} bytes early", n - skipped),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use pgkeep_repo::{CompressWriter, DecompressReader, MemoryStorage};

    fn store(bundler: &Bundler, key: &str, data: &[u8]) -> Option<Bundled> {
        let sink = bundler.sink(key, data.len() as u64).unwrap();
        let mut w = CompressWriter::new(sink, false);
        w.write_all(data).unwrap();
        let (_, _, sink) = w.finish().unwrap();
        bundler.close(sink).unwrap()
    }

    #[test]
    fn items_are_grouped_by_bundle_in_offset_order_after_those_read_alone() {
        let at = |key: &str, offset| StoredAt {
            key: key.into(),
            range: Some((offset, 10)),
        };
        let items = vec![
            ("b2", Some(at("b", 20))),
            ("x", None),
            ("a9", Some(at("a", 90))),
            ("b0", Some(at("b", 0))),
            ("y", None),
            ("a1", Some(at("a", 10))),
        ];
        let (alone, groups) = by_bundle(items, |(_, at)| at.as_ref());
        fn names(v: &[(&'static str, Option<StoredAt>)]) -> Vec<&'static str> {
            v.iter().map(|(n, _)| *n).collect()
        }
        assert_eq!(names(&alone), ["x", "y"]);
        let groups: Vec<_> = groups.iter().map(|g| names(g)).collect();
        assert_eq!(groups, [vec!["a1", "a9"], vec!["b0", "b2"]]);
    }

    fn fetch(storage: &dyn Storage, at: &StoredAt) -> Vec<u8> {
        let mut out = Vec::new();
        DecompressReader::new(at.open(storage).unwrap(), false)
            .read_to_end(&mut out)
            .unwrap();
        out
    }

    #[test]
    fn small_files_share_bundles_big_ones_stay_alone_and_each_reads_back() {
        let storage = MemoryStorage::new();
        let bundler = Bundler::new(&storage, "L", true);
        let mut placed = Vec::new();
        for i in 0..40u32 {
            // Incompressible enough that 40 files of 160 KiB fill more than one 4 MiB bundle.
            let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ u64::from(i);
            let data: Vec<u8> = (0..160 << 10)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect();
            let path = format!("base/1/{i}");
            let b = store(&bundler, &keys::backup_file("L", &path), &data);
            placed.push((path, b, data));
        }
        let big = vec![7u8; (BUNDLE_LIMIT + 1) as usize];
        let big_at = store(&bundler, &keys::backup_file("L", "base/1/big"), &big);
        bundler.finish().unwrap();
        assert_eq!(
            big_at, None,
            "a file above the limit has an object of its own"
        );
        let ids: std::collections::BTreeSet<u32> =
            placed.iter().map(|(_, b, _)| b.unwrap().id).collect();
        assert!(ids.len() >= 2, "bundles close once full: {ids:?}");
        for (path, b, data) in &placed {
            let at = stored_key("L", path, *b);
            assert!(at.key.starts_with("backup/L/bundle/"), "{at:?}");
            assert_eq!(&fetch(&storage, &at), data, "{path}");
        }
        assert_eq!(fetch(&storage, &stored_key("L", "base/1/big", None)), big);
        // Nothing but the bundles and the big file was stored.
        assert_eq!(storage.list("").unwrap().len(), ids.len() + 1);
    }

    #[test]
    fn a_span_reads_frames_in_order_past_gaps_and_what_a_reader_left() {
        let storage = MemoryStorage::new();
        pgkeep_repo::put_bytes(&storage, "b", b"..AAAA..BBBB...CC").unwrap();
        let mut span = BundleSpan::open(&storage, "b", (2, 4), (15, 2)).unwrap();
        let take = |span: &mut BundleSpan, range, n: usize| {
            span.with_frame(range, |r| {
                let mut got = vec![0; n];
                r.read_exact(&mut got).map(|()| got)
            })
        };
        assert_eq!(take(&mut span, (2, 4), 4).unwrap().unwrap(), b"AAAA");
        // A reader that stops half-way: the rest of its frame is read past.
        assert_eq!(take(&mut span, (8, 4), 2).unwrap().unwrap(), b"BB");
        assert_eq!(take(&mut span, (15, 2), 2).unwrap().unwrap(), b"CC");
        let mut span = BundleSpan::open(&storage, "b", (8, 4), (8, 4)).unwrap();
        take(&mut span, (8, 4), 0).unwrap().unwrap();
        assert!(take(&mut span, (2, 4), 0).is_err(), "frames out of order");
        let mut short = BundleSpan::open(&storage, "b", (15, 2), (15, 4)).unwrap();
        assert!(take(&mut short, (15, 4), 0).is_err(), "a span ending early");
    }

    #[test]
    fn without_bundles_every_file_has_its_object() {
        let storage = MemoryStorage::new();
        let bundler = Bundler::new(&storage, "L", false);
        assert_eq!(store(&bundler, &keys::backup_file("L", "a"), b"abc"), None);
        bundler.finish().unwrap();
        assert_eq!(storage.list("").unwrap(), vec![keys::backup_file("L", "a")]);
    }
}
