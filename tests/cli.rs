//! The command line without a server: config errors, root refusal, help and version.

use crate::harness::{is_root, user_command, Run, TestDir};

fn pgkeep(dir: &TestDir, args: &[&str]) -> Run {
    let bin = dir.path().join("pgkeep");
    if !bin.exists() {
        std::fs::copy(env!("CARGO_BIN_EXE_pgkeep"), &bin).unwrap();
    }
    let out = user_command(&bin)
        .current_dir(dir.path())
        .env_remove("PGKEEP_CONFIG")
        .args(args)
        .output()
        .unwrap();
    Run {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn assert_one_line_error(run: &Run, code: i32, needle: &str) {
    assert_eq!(run.code, Some(code), "{run:?}");
    assert_eq!(
        run.stderr.lines().count(),
        1,
        "error must be one line: {run:?}"
    );
    assert!(run.stderr.starts_with("pgkeep: error: "), "{run:?}");
    assert!(
        run.stderr.contains(needle),
        "expected {needle:?} in {run:?}"
    );
}

#[test]
fn missing_config_file_is_a_one_line_usage_error() {
    let dir = TestDir::new();
    let run = pgkeep(&dir, &["--config", "/nonexistent/pgkeep.toml", "show"]);
    assert_one_line_error(&run, 2, "/nonexistent/pgkeep.toml");
}

#[test]
fn unknown_config_key_is_refused_naming_it() {
    let dir = TestDir::new();
    let cfg = dir.write(
        "bad.toml",
        "[repo]\npath = \"/tmp/x\"\n[pg]\ndata = \"/tmp/y\"\nprot = 5432\n",
    );
    let run = pgkeep(&dir, &["--config", cfg.to_str().unwrap(), "show"]);
    assert_one_line_error(&run, 2, "prot");
}

#[test]
fn show_on_a_path_without_repository_says_to_run_init() {
    let dir = TestDir::new();
    let repo = dir.path().join("norepo");
    let cfg = dir.write(
        "c.toml",
        format!(
            "[repo]\npath = \"{}\"\n[pg]\ndata = \"/tmp/y\"\n",
            repo.display()
        ),
    );
    let run = pgkeep(&dir, &["--config", cfg.to_str().unwrap(), "show"]);
    assert_one_line_error(&run, 1, "pgkeep init");
    assert!(!repo.exists(), "show must not create the repository");
}

#[test]
fn root_is_refused_without_allow_root() {
    if !is_root() {
        eprintln!("skipped: only meaningful when the tests run as root");
        return;
    }
    let bin = env!("CARGO_BIN_EXE_pgkeep");
    let out = std::process::Command::new(bin)
        .args(["--config", "/nonexistent.toml", "show"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--allow-root"), "{err}");
    // With --allow-root the command goes on (and fails on the missing config instead).
    let out = std::process::Command::new(bin)
        .args(["--allow-root", "--config", "/nonexistent.toml", "show"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent.toml"));
}

#[test]
fn version_and_help_exit_zero() {
    let dir = TestDir::new();
    let run = pgkeep(&dir, &["--version"]);
    assert!(run.success(), "{run:?}");
    assert!(run.stdout.starts_with("pgkeep "), "{run:?}");
    let run = pgkeep(&dir, &["--help"]);
    assert!(run.success(), "{run:?}");
    for cmd in ["init", "archive-push", "archive-get", "check", "show"] {
        assert!(run.stdout.contains(cmd), "help lacks {cmd}: {run:?}");
    }
}
