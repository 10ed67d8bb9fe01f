//! A small work pool: N threads take items from a shared list until it is empty or one fails.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;

use anyhow::Result;

/// Per-worker scratch buffer size: a whole number of pages, large enough to keep syscalls and
/// lz4 frames cheap.
pub const BUF_SIZE: usize = 1 << 20;

/// Run `f` on every item with `jobs` workers, each with its own buffer of `BUF_SIZE` bytes.
/// Results come back in no particular order. The first error stops the other workers (they finish
/// the item in hand) and is returned.
pub fn for_each<T, R, F>(items: &[T], jobs: usize, f: F) -> Result<Vec<R>>
where
    T: Sync,
    R: Send,
    F: Fn(&T, &mut [u8]) -> Result<R> + Sync,
{
    let next = AtomicUsize::new(0);
    let failed = AtomicBool::new(false);
    let results = Mutex::new(Vec::with_capacity(items.len()));
    let first_error: Mutex<Option<anyhow::Error>> = Mutex::new(None);
    std::thread::scope(|s| {
        for _ in 0..jobs.clamp(1, items.len().max(1)) {
            s.spawn(|| {
                let mut buf = vec![0u8; BUF_SIZE];
                while !failed.load(Ordering::Relaxed) {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(item) = items.get(i) else { break };
                    match f(item, &mut buf) {
                        Ok(r) => results.lock().unwrap_or_else(|p| p.into_inner()).push(r),
                        Err(e) => {
                            failed.store(true, Ordering::Relaxed);
                            first_error
                                .lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .get_or_insert(e);
                        }
                    }
                }
            });
        }
    });
    if let Some(e) = first_error.into_inner().unwrap_or_else(|p| p.into_inner()) {
        return Err(e);
    }
    Ok(results.into_inner().unwrap_or_else(|p| p.into_inner()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_item_is_processed_once() {
        let items: Vec<u32> = (0..1000).collect();
        let mut out = for_each(&items, 3, |i, _| Ok(*i * 2)).unwrap();
        out.sort();
        assert_eq!(out, items.iter().map(|i| i * 2).collect::<Vec<_>>());
    }

    #[test]
    fn first_error_is_returned() {
        let items: Vec<u32> = (0..100).collect();
        let err = for_each(&items, 2, |i, _| {
            if *i == 37 {
                anyhow::bail!("item 37 broke")
            }
            Ok(())
        })
        .unwrap_err();
        assert_eq!(err.to_string(), "item 37 broke");
    }
}
