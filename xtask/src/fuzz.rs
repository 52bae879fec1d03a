//! `cargo xtask fuzz`: libFuzzer (cargo-fuzz, nightly) over every parser that reads bytes from
//! outside: ELF inspection, release manifests, both halves of a check-in, service specs.
//!
//! Each target starts from the seeds in `fuzz/seeds/<target>/` (and, for `inspect`, real
//! binaries of this machine) and keeps its corpus in `<target dir>/fuzz/corpus/<target>/`, so
//! later runs go deeper. Any input that crashes, or takes longer than `PER_INPUT_TIMEOUT`, fails
//! the run; it is then kept in `fuzz/artifacts/` to become a regression test.

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use clap::Args;

use crate::util;

/// Every target in `fuzz/fuzz_targets/`.
pub const TARGETS: [&str; 5] = ["inspect", "manifest", "checkin", "service", "boot"];

/// An input that takes longer than this is a hang, reported like a crash.
const PER_INPUT_TIMEOUT_S: u32 = 5;

#[derive(Args, Debug)]
pub struct FuzzArgs {
    /// How long to fuzz each target.
    #[arg(long, default_value_t = 60)]
    pub seconds: u32,
    /// Targets to fuzz (default: all).
    pub targets: Vec<String>,
}

pub fn run(args: FuzzArgs) -> Result<i32> {
    let root = util::muscle_root();
    let targets: Vec<&str> = if args.targets.is_empty() {
        TARGETS.to_vec()
    } else {
        args.targets.iter().map(String::as_str).collect()
    };
    for t in &targets {
        if !TARGETS.contains(t) {
            bail!(
                "unknown fuzz target {t:?}: expected one of {}",
                TARGETS.join(", ")
            );
        }
    }
    for target in targets {
        let corpus = muscle_e2e::target_dir().join("fuzz/corpus").join(target);
        std::fs::create_dir_all(&corpus)?;
        if target == "inspect" {
            seed_real_binaries(&corpus)?;
        }
        let log = muscle_e2e::target_dir().join(format!("fuzz/{target}.log"));
        eprintln!(
            "fuzz: {target} for {} s (libFuzzer's output: {})",
            args.seconds,
            log.display()
        );
        let mut cmd = crate::util::cargo();
        cmd.args(["+nightly", "fuzz", "run"]);
        if target == "boot" {
            // As shipped: without debug assertions, which dhcproto uses on lengths its decoder
            // checks again right after (a debug build panics where a release build refuses).
            cmd.arg("-O");
        }
        cmd.arg("--fuzz-dir")
            .arg(root.join("fuzz"))
            .arg("--target-dir")
            .arg(muscle_e2e::target_dir().join("fuzz/build"))
            .arg(target)
            .arg(&corpus)
            .arg(root.join("fuzz/seeds").join(target))
            .arg("--")
            .arg(format!("-max_total_time={}", args.seconds))
            .arg(format!("-timeout={PER_INPUT_TIMEOUT_S}"))
            .arg("-rss_limit_mb=2048")
            .current_dir(&root);
        let file = std::fs::File::create(&log)?;
        cmd.stdout(file.try_clone()?).stderr(file);
        let status = cmd.status()?;
        let output = std::fs::read_to_string(&log).unwrap_or_default();
        if let Some(done) = output.lines().rev().find(|l| l.starts_with("Done ")) {
            eprintln!("fuzz: {target}: {done}");
        }
        if !status.success() {
            let tail: Vec<&str> = output.lines().rev().take(40).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            bail!(
                "{}\nfuzz target {target} failed ({status}): a crash or a hang; the input is in {} \
                 (add it to the target's regression test)",
                tail.join("\n"),
                root.join("fuzz/artifacts").join(target).display()
            );
        }
    }
    eprintln!("fuzz: no crash, no hang");
    Ok(0)
}

/// Copies a few real ELF files into the corpus: a dynamic one of this machine and the static
/// hello-service binaries already released, so mutation starts from real structure.
fn seed_real_binaries(corpus: &Path) -> Result<()> {
    let mut seeds = vec![PathBuf::from("/bin/true")];
    let released = muscle_e2e::target_dir().join("muscle-release");
    for release in std::fs::read_dir(&released).into_iter().flatten().flatten() {
        for triple in std::fs::read_dir(release.path())
            .into_iter()
            .flatten()
            .flatten()
        {
            seeds.push(triple.path().join("hello-service"));
        }
    }
    for (i, path) in seeds.iter().filter(|p| p.is_file()).take(8).enumerate() {
        std::fs::copy(path, corpus.join(format!("seed-{i}")))?;
    }
    Ok(())
}
