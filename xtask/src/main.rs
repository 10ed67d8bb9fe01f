//! pgkeep's chores: `cargo xtask ci` (what CI runs), `cargo xtask demo`, `cargo xtask bench`.

mod bench;
mod bench_s3;
mod demo;
mod matrix;
mod sh;

use std::time::Instant;

use anyhow::Result;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("ci") => ci(&args[1..]),
        Some("demo") => demo::demo(args.iter().any(|a| a == "--keep")),
        Some("bench") if args.iter().any(|a| a == "--s3") => bench_s3::bench(&args[1..]),
        Some("bench") => bench::bench(&args[1..]),
        Some("pg") => {
            // `PGKEEP_PG_BIN=$(cargo xtask pg 14) cargo nextest run ...`: one major by hand.
            for (_, version) in matrix::parse_majors(args.get(1).map_or("", String::as_str))? {
                println!("{}", matrix::install(version)?.display());
            }
            Ok(())
        }
        _ => {
            eprintln!(
                "usage: cargo xtask ci [--majors 12,18|all|none] | pg MAJOR | demo [--keep] | bench [--scale S] [--runs N] [--keep] | bench --expire | bench --cold [--small-mb M] [--runs N] [--transactions T] [--scan] [--keep] | bench --s3 [--scale S] [--runs N] [--keep]"
            );
            std::process::exit(2);
        }
    }
}

/// Format check, clippy with warnings as errors, every test on Debian's PostgreSQL, then the
/// matrix subset on each other major (`--majors`, default all).
fn ci(args: &[String]) -> Result<()> {
    let majors = match args {
        [] => matrix::VERSIONS.to_vec(),
        [flag, list] if flag == "--majors" => matrix::parse_majors(list)?,
        _ => anyhow::bail!("usage: cargo xtask ci [--majors 12,18|all|none]"),
    };
    let started = Instant::now();
    run("cargo", &["fmt", "--all", "--", "--check"])?;
    run(
        "cargo",
        &[
            "clippy",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ],
    )?;
    let has_nextest = std::process::Command::new("cargo")
        .args(["nextest", "--version"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    let mut outcomes = Vec::new();
    let full = if has_nextest {
        run(
            "cargo",
            &["nextest", "run", "--workspace", "--no-fail-fast"],
        )
    } else {
        run("cargo", &["test", "--workspace", "--no-fail-fast"])
    };
    outcomes.push(("whole suite, Debian's PostgreSQL".to_string(), full.is_ok()));
    if has_nextest && !majors.is_empty() {
        matrix::check_subset_exists()?;
    }
    for (major, version) in majors {
        let step = Instant::now();
        let bin = matrix::install(version)?;
        eprintln!("== PostgreSQL {major} ({version}): the matrix subset");
        let mut cmd = std::process::Command::new("cargo");
        cmd.env("PGKEEP_PG_BIN", &bin);
        if has_nextest {
            cmd.args(["nextest", "run", "-p", "pgkeep-cli", "--test", "tests"])
                .args(["--no-fail-fast", "-E", &matrix::filter()]);
        } else {
            cmd.args(["test", "-p", "pgkeep-cli", "--test", "tests", "--"])
                .arg("--exact")
                .args(matrix::SUBSET);
        }
        let ok = sh::run_checked(&mut cmd).is_ok();
        eprintln!(
            "== PostgreSQL {major}: {} in {:.0} s",
            if ok { "passed" } else { "FAILED" },
            step.elapsed().as_secs_f64()
        );
        outcomes.push((format!("subset, PostgreSQL {major} ({version})"), ok));
    }
    eprintln!("== ci took {:.0} s", started.elapsed().as_secs_f64());
    for (what, ok) in &outcomes {
        eprintln!("   {} {what}", if *ok { "ok  " } else { "FAIL" });
    }
    if outcomes.iter().any(|(_, ok)| !ok) {
        anyhow::bail!("ci failed: see FAIL above");
    }
    Ok(())
}

fn run(program: &str, args: &[&str]) -> Result<()> {
    eprintln!("$ {program} {}", args.join(" "));
    sh::run_checked(std::process::Command::new(program).args(args))
}
