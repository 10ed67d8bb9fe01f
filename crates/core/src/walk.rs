//! Enumerate what a backup copies from a data directory: every kept file, directory and
//! tablespace link, with PostgreSQL's exclusion rules applied.

use std::collections::HashSet;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use pgkeep_catalog::FileKind;
use pgkeep_pg::{classify, parse_relation_path, Disposition, Fork};

/// One thing found in the data directory.
#[derive(Clone, Debug)]
pub struct Entry {
    /// Relative to the data directory, '/'-separated; tablespace contents under `pg_tblspc/<oid>/`.
    pub rel: String,
    /// Where to read it.
    pub abs: PathBuf,
    pub kind: FileKind,
    pub size: u64,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: i64,
    pub link_target: Option<String>,
}

/// Walk `data` (following `pg_tblspc/<oid>` links into their tablespaces). Files that vanish
/// during the walk are skipped: WAL replay recreates whatever they held.
pub fn walk(data: &Path) -> Result<Vec<Entry>> {
    let mut out = Vec::new();
    walk_tree(data, data, "", &mut out)?;
    let tblspc = data.join("pg_tblspc");
    let links: Vec<Entry> = out
        .iter()
        .filter(|e| e.kind == FileKind::Symlink && e.rel.starts_with("pg_tblspc/"))
        .cloned()
        .collect();
    for link in links {
        let target = fs::canonicalize(tblspc.join(link.rel.trim_start_matches("pg_tblspc/")))
            .with_context(|| format!("following tablespace link {}", link.rel))?;
        walk_tree(&target, &target, &link.rel, &mut out)?;
    }
    drop_unlogged(&mut out);
    Ok(out)
}

fn walk_tree(root: &Path, dir: &Path, prefix: &str, out: &mut Vec<Entry>) -> Result<()> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("reading directory {}", dir.display())),
    };
    for entry in entries {
        let entry = entry.with_context(|| format!("reading directory {}", dir.display()))?;
        let abs = entry.path();
        let meta = match fs::symlink_metadata(&abs) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e).with_context(|| format!("reading {}", abs.display())),
        };
        let name = entry.file_name();
        let Some(name) = name.to_str() else {
            anyhow::bail!(
                "{} has a name that is not UTF-8: rename or remove it",
                abs.display()
            );
        };
        let rel_in_tree = abs
            .strip_prefix(root)
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_else(|_| name.to_string());
        let rel = if prefix.is_empty() {
            rel_in_tree
        } else {
            format!("{prefix}/{rel_in_tree}")
        };
        let ft = meta.file_type();
        // Exclusion rules speak of paths relative to the data directory.
        let disposition = classify(&rel, ft.is_dir());
        if matches!(disposition, Disposition::Skip) {
            continue;
        }
        let (kind, link_target) = if ft.is_symlink() {
            let target =
                fs::read_link(&abs).with_context(|| format!("reading link {}", abs.display()))?;
            (
                FileKind::Symlink,
                Some(target.to_string_lossy().into_owned()),
            )
        } else if ft.is_dir() {
            (FileKind::Dir, None)
        } else if ft.is_file() {
            (FileKind::File, None)
        } else {
            continue; // sockets, fifos: nothing PostgreSQL needs back
        };
        out.push(Entry {
            rel: rel.clone(),
            abs: abs.clone(),
            kind,
            size: if kind == FileKind::File {
                meta.len()
            } else {
                0
            },
            mode: meta.mode() & 0o7777,
            uid: meta.uid(),
            gid: meta.gid(),
            mtime: meta.mtime(),
            link_target,
        });
        if ft.is_dir() && matches!(disposition, Disposition::Keep) {
            walk_tree(root, &abs, prefix, out)?;
        }
    }
    Ok(())
}

/// Unlogged relations are reset from their `_init` fork at recovery: keep only that fork.
fn drop_unlogged(entries: &mut Vec<Entry>) {
    let init_forks: HashSet<(String, u32)> = entries
        .iter()
        .filter_map(|e| {
            let (db, f) = parse_relation_path(&e.rel)?;
            (f.fork == Fork::Init).then_some((db, f.relfilenode))
        })
        .collect();
    if init_forks.is_empty() {
        return;
    }
    entries.retain(|e| match parse_relation_path(&e.rel) {
        Some((db, f)) => f.fork == Fork::Init || !init_forks.contains(&(db, f.relfilenode)),
        None => true,
    });
}
