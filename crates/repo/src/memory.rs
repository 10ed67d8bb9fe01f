//! `MemoryStorage`: an in-memory backend with the same semantics as `LocalStorage`, for tests.

use std::collections::BTreeMap;
use std::io::{self, Cursor, Read, Write};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::key;
use crate::{PendingObject, Result, Storage, StorageError};

type Objects = BTreeMap<String, Arc<[u8]>>;

/// Objects in a map behind a mutex; cloning the handle shares the objects.
#[derive(Debug, Default, Clone)]
pub struct MemoryStorage {
    objects: Arc<Mutex<Objects>>,
}

impl MemoryStorage {
    pub fn new() -> Self {
        Self::default()
    }
}

impl Storage for MemoryStorage {
    fn create(&self, key: &str) -> Result<Box<dyn PendingObject>> {
        key::check(key)?;
        Ok(Box::new(MemoryPending {
            key: key.to_owned(),
            bytes: Vec::new(),
            objects: Arc::clone(&self.objects),
        }))
    }

    fn open(&self, key: &str) -> Result<Box<dyn Read + Send>> {
        key::check(key)?;
        match lock(&self.objects).get(key) {
            Some(bytes) => Ok(Box::new(Cursor::new(Arc::clone(bytes)))),
            None => Err(StorageError::NotFound {
                key: key.to_owned(),
            }),
        }
    }

    fn size(&self, key: &str) -> Result<Option<u64>> {
        key::check(key)?;
        Ok(lock(&self.objects).get(key).map(|b| b.len() as u64))
    }

    fn list(&self, prefix: &str) -> Result<Vec<String>> {
        let prefix = key::check_prefix(prefix)?;
        let objects = lock(&self.objects);
        if prefix.is_empty() {
            return Ok(objects.keys().cloned().collect());
        }
        let dir = format!("{prefix}/");
        Ok(objects
            .range(dir.clone()..)
            .take_while(|(k, _)| k.starts_with(&dir))
            .map(|(k, _)| k.clone())
            .collect())
    }

    fn delete(&self, key: &str) -> Result<()> {
        key::check(key)?;
        lock(&self.objects).remove(key);
        Ok(())
    }

    fn delete_prefix(&self, prefix: &str) -> Result<()> {
        let prefix = key::check_prefix(prefix)?;
        if prefix.is_empty() {
            return Err(StorageError::InvalidKey { key: String::new() });
        }
        let dir = format!("{prefix}/");
        lock(&self.objects).retain(|k, _| !k.starts_with(&dir));
        Ok(())
    }
}

struct MemoryPending {
    key: String,
    bytes: Vec<u8>,
    objects: Arc<Mutex<Objects>>,
}

impl Write for MemoryPending {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.bytes.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl PendingObject for MemoryPending {
    fn commit(self: Box<Self>) -> Result<()> {
        let MemoryPending {
            key,
            bytes,
            objects,
        } = *self;
        lock(&objects).insert(key, bytes.into());
        Ok(())
    }

    fn commit_new(self: Box<Self>) -> Result<()> {
        let MemoryPending {
            key,
            bytes,
            objects,
        } = *self;
        let mut objects = lock(&objects);
        if objects.contains_key(&key) {
            return Err(StorageError::AlreadyExists { key });
        }
        objects.insert(key, bytes.into());
        Ok(())
    }
}

/// A panic elsewhere while holding the lock cannot leave the map half-updated (every update is
/// a whole insert or removal), so a poisoned lock is still safe to use.
fn lock(objects: &Mutex<Objects>) -> MutexGuard<'_, Objects> {
    objects
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}
