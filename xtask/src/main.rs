//! pgkeep's chores: `cargo xtask ci` (what CI runs), `cargo xtask demo`, `cargo xtask bench`.

mod bench;
mod demo;
mod sh;

use anyhow::Result;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("ci") => ci(),
        Some("demo") => demo::demo(args.iter().any(|a| a == "--keep")),
        Some("bench") => bench::bench(&args[1..]),
        _ => {
            eprintln!(
                "usage: cargo xtask ci | demo [--keep] | bench [--scale S] [--runs N] [--keep]"
            );
            std::process::exit(2);
        }
    }
}

/// Format check, clippy with warnings as errors, then every test.
fn ci() -> Result<()> {
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
    if has_nextest {
        run(
            "cargo",
            &["nextest", "run", "--workspace", "--no-fail-fast"],
        )
    } else {
        run("cargo", &["test", "--workspace", "--no-fail-fast"])
    }
}

fn run(program: &str, args: &[&str]) -> Result<()> {
    eprintln!("$ {program} {}", args.join(" "));
    sh::run_checked(std::process::Command::new(program).args(args))
}
