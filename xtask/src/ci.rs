//! `cargo xtask ci`: exactly what CI runs.

use std::process::Command;

use anyhow::Result;

use crate::util;

pub fn run() -> Result<i32> {
    let setup = crate::setup::run(Default::default())?;
    if setup != 0 {
        anyhow::bail!("setup could not install everything the tests need (see above)");
    }
    let cargo = || {
        let mut c = Command::new("cargo");
        c.current_dir(util::muscle_root());
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
    util::run(cargo().args(["test", "--workspace", "--locked"]))?;
    Ok(0)
}
