//! `--repo N`: which of the configured repositories (`[[repo]]` entries, numbered 1..N in file
//! order) a command works on, and the commands that go over every repository by default.

use anyhow::{Context, Result};
use serde_json::{json, Value};

use pgkeep_core::Config;

use crate::config::ConfigError;
use crate::output;

/// The config working on repository `n`, or on the first one without `--repo`.
pub fn one(cfg: &Config, n: Option<usize>) -> Result<Config, ConfigError> {
    let n = n.unwrap_or(1);
    cfg.with_repo(n).ok_or_else(|| out_of_range(cfg, n))
}

/// The configs working on repository `n` only, or on each repository in order.
pub fn every(cfg: &Config, n: Option<usize>) -> Result<Vec<Config>, ConfigError> {
    match n {
        Some(n) => Ok(vec![one(cfg, Some(n))?]),
        None => Ok((1..=cfg.repos.len())
            .filter_map(|n| cfg.with_repo(n))
            .collect()),
    }
}

fn out_of_range(cfg: &Config, n: usize) -> ConfigError {
    let count = cfg.repos.len();
    let has = if count == 1 {
        "1 repository".to_string()
    } else {
        format!("{count} repositories")
    };
    ConfigError(format!(
        "--repo {n}: config file {} has {has}: pass a number from 1 to {count}",
        cfg.config_path.display()
    ))
}

/// A command's result with the repository named in its error when several are configured.
pub fn in_repo<T>(c: &Config, result: Result<T>) -> Result<T> {
    if c.several_repos() {
        result.with_context(|| c.repo.title())
    } else {
        result
    }
}

/// `repo2: ` before a line when several repositories are configured.
pub fn prefix(c: &Config) -> String {
    if c.several_repos() {
        format!("repo{}: ", c.repo.number)
    } else {
        String::new()
    }
}

/// `show` over several repositories: a table per repository under its name, or one JSON
/// document whose backups each carry `repo` and whose `repos` gives each repository's
/// restorable span (`restorable` too when only one repository is shown).
pub fn show(cfg: &Config, n: Option<usize>, label: Option<&str>, json: bool) -> Result<()> {
    let mut listings = Vec::new();
    for c in every(cfg, n)? {
        let mut listing = in_repo(&c, pgkeep_core::show::show(&c, None))?;
        if let Some(l) = label {
            listing.backups.retain(|b| b.record.label == l);
        }
        listings.push((c, listing));
    }
    if let Some(l) = label {
        if listings.iter().all(|(_, l)| l.backups.is_empty()) {
            anyhow::bail!(
                "backup {l} not found in any repository: `pgkeep show` lists the backups"
            );
        }
    }
    if !json {
        for (i, (c, listing)) in listings.iter().enumerate() {
            if i > 0 {
                println!();
            }
            println!("{}:", c.repo.title());
            output::print_backups(listing);
        }
        return Ok(());
    }
    let mut backups = Vec::new();
    let mut repos = Vec::new();
    for (c, listing) in &listings {
        let doc = pgkeep_core::show::backups_json(listing);
        if let Some(list) = doc["backups"].as_array() {
            for b in list {
                let mut b = b.clone();
                b["repo"] = json!(c.repo.number);
                backups.push(b);
            }
        }
        repos.push(json!({
            "repo": c.repo.number,
            "name": c.repo.describe(),
            "restorable": doc["restorable"].clone(),
        }));
    }
    let mut doc = json!({ "backups": backups, "repos": repos });
    if let [(_, listing)] = listings.as_slice() {
        doc["restorable"] = pgkeep_core::show::backups_json(listing)["restorable"].clone();
    }
    println!("{doc}");
    Ok(())
}

/// `expire` over several repositories, each with the same `[retention]`: a report per
/// repository under its name, or `{"repos": [...]}` of the reports, each with `repo`.
pub fn expire(cfg: &Config, n: Option<usize>, dry_run: bool, json: bool) -> Result<()> {
    let mut docs: Vec<Value> = Vec::new();
    for c in every(cfg, n)? {
        let report = in_repo(&c, pgkeep_core::retention::expire(&c, dry_run))?;
        if json {
            let mut doc = pgkeep_core::retention::report_json(&report);
            doc["repo"] = json!(c.repo.number);
            docs.push(doc);
        } else {
            println!("{}:", c.repo.title());
            output::print_retention_report(&report);
        }
    }
    if json {
        println!("{}", json!({ "repos": docs }));
    }
    Ok(())
}
