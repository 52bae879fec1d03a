//! Someone else's workspace: published crates that compile C in their build, released from their
//! `.crate` sources with `--manifest-path` for x86_64 and aarch64 musl, each binary then run for
//! real (aarch64 under qemu-user) so that the C inside it does its work.
//!
//! One runs in `cargo xtask ci` (bundled SQLite: the C that broke aarch64 musl links); all three
//! run in `cargo xtask ci --full`. Their builds go to `<target>/foreign` through
//! `CARGO_TARGET_DIR`, which the release must honour, and are cached there between runs.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{ensure, Context, Result};
use common::text;
use muscle_e2e::{fetch_crate, target_dir, xtask_binary};
use serde_json::Value;

const TARGETS: [&str; 2] = ["x86_64-unknown-linux-musl", "aarch64-unknown-linux-musl"];

/// Fetches `name` `version`, releases it for both arches; returns the release directory.
fn release(name: &str, version: &str) -> Result<PathBuf> {
    // Unpacked outside this workspace (cargo would otherwise take it for one of our members),
    // in a folder of this user's, stable so that the build cache keeps.
    let sources = std::env::temp_dir().join(format!("muscle-foreign-{}", uid()));
    std::fs::create_dir_all(&sources)?;
    let src = fetch_crate(name, version, &sources)?;
    let out = common::scratch(&format!("foreign-{name}"));
    let mut cmd = Command::new(xtask_binary()?);
    cmd.args(["release", "--json", "--manifest-path"])
        .arg(src.join("Cargo.toml"))
        .arg("--out")
        .arg(&out)
        .env("CARGO_TARGET_DIR", target_dir().join("foreign"));
    for t in TARGETS {
        cmd.args(["--target", t]);
    }
    // The split binaries land in CARGO_TARGET_DIR's muscle-release/: gone before, there after.
    let split = target_dir().join("foreign/muscle-release");
    let _ = std::fs::remove_dir_all(&split);
    let run = cmd.output()?;
    ensure!(
        run.status.success(),
        "release of {name} {version}: {}",
        text(&run)
    );
    let manifest: Value = serde_json::from_slice(&run.stdout)?;
    ensure!(
        manifest["artifacts"].as_array().map(Vec::len) >= Some(TARGETS.len()),
        "{manifest}"
    );
    ensure!(
        split.join(format!("{name}-{version}")).is_dir() && !src.join("target").exists(),
        "the build did not go to CARGO_TARGET_DIR ({})",
        split.display()
    );
    Ok(out.join(format!("{name}-{version}")))
}

/// This user's id, as /proc says it.
fn uid() -> String {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|l| l.split_whitespace().next().map(str::to_owned))
        })
        .unwrap_or_else(|| "0".into())
}

/// Runs `bin ARGS` in `dir` with `stdin`; returns its output.
fn run(bin: &Path, args: &[&str], dir: &Path, stdin: &str) -> Result<std::process::Output> {
    use std::io::Write;
    let mut child = Command::new(bin)
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot run {}", bin.display()))?;
    child
        .stdin
        .take()
        .expect("piped")
        .write_all(stdin.as_bytes())?;
    Ok(child.wait_with_output()?)
}

#[test]
fn sqlitepipe_with_bundled_sqlite_releases_and_runs_on_both_arches() -> Result<()> {
    let release = release("sqlitepipe", "0.2.3")?;
    for triple in TARGETS {
        let bin = release.join(triple).join("sqlitepipe");
        let dir = common::scratch(&format!("sqlitepipe-{triple}"));
        let out = run(&bin, &["-l", "-o", "t.db"], &dir, "a\nb\nc\n")?;
        ensure!(out.status.success(), "{triple}: {}", text(&out));
        let db = std::fs::read(dir.join("t.db"))?;
        ensure!(
            db.starts_with(b"SQLite format 3\0"),
            "{triple}: not a database"
        );
        // Read back by another SQLite: three rows.
        let count = Command::new("python3")
            .args(["-c", "import sqlite3; print(sqlite3.connect('t.db').execute('select count(*) from data').fetchone()[0])"])
            .current_dir(&dir)
            .output()?;
        assert_eq!(text(&count).trim(), "3", "{triple}");
        // SQLite's own JSON parser refuses bad input: its C runs, not just its file format.
        let bad = run(&bin, &["-j", "-o", "bad.db"], &dir, "{bad\n")?;
        assert!(
            !bad.status.success() && text(&bad).contains("malformed JSON"),
            "{triple}: {}",
            text(&bad)
        );
    }
    Ok(())
}

#[test]
#[ignore = "full: ripgrep and jemalloc take minutes per arch (cargo xtask ci --full)"]
fn ripgrep_with_jemalloc_releases_and_runs_on_both_arches() -> Result<()> {
    let release = release("ripgrep", "15.2.0")?;
    for triple in TARGETS {
        let bin = release.join(triple).join("rg");
        let dir = common::scratch(&format!("ripgrep-{triple}"));
        std::fs::write(dir.join("f"), "alpha\nbeta\n")?;
        let out = Command::new(&bin)
            .args(["-c", "beta", "f"])
            .current_dir(&dir)
            // jemalloc, built with its `_rjem_` prefix, prints its statistics at exit.
            .env("_RJEM_MALLOC_CONF", "stats_print:true")
            .output()?;
        assert!(out.status.success(), "{triple}: {}", text(&out));
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "1", "{triple}");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("Begin jemalloc statistics"),
            "{triple}: jemalloc did not run: {}",
            text(&out)
        );
    }
    Ok(())
}

#[test]
#[ignore = "full: libgit2 and zlib take minutes per arch (cargo xtask ci --full)"]
fn git_absorb_with_bundled_libgit2_releases_and_runs_on_both_arches() -> Result<()> {
    let release = release("git-absorb", "0.9.0")?;
    for triple in TARGETS {
        let bin = release.join(triple).join("git-absorb");
        let dir = common::scratch(&format!("git-absorb-{triple}"));
        let git = |args: &[&str]| -> Result<()> {
            let out = Command::new("git")
                .args(["-c", "user.name=t", "-c", "user.email=t@t"])
                .args(args)
                .current_dir(&dir)
                .output()?;
            ensure!(out.status.success(), "git {args:?}: {}", text(&out));
            Ok(())
        };
        git(&["init", "-q"])?;
        git(&["commit", "-q", "--allow-empty", "-m", "init"])?;
        // libgit2 opens the repository, reads HEAD and the config, diffs the index.
        let out = Command::new(&bin).current_dir(&dir).output()?;
        assert!(
            out.status.success() && text(&out).contains("No changes staged"),
            "{triple}: {}",
            text(&out)
        );
    }
    Ok(())
}
