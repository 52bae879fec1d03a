//! `cargo xtask demo` as a CI job with a shared cache runs it: with `CARGO_TARGET_DIR` pointing
//! somewhere else, every build and scratch file must follow it.

mod common;

use std::process::Command;

use common::text;
use muscle_e2e::{target_dir, workspace_root};

#[test]
#[ignore = "full: the demo rebuilds everything in a second target dir (cargo xtask ci --full)"]
fn the_demo_runs_with_cargo_target_dir_elsewhere() {
    let elsewhere = target_dir().join("elsewhere");
    let out = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(["xtask", "demo"])
        .current_dir(workspace_root())
        .env("CARGO_TARGET_DIR", &elsewhere)
        .output()
        .expect("cargo runs");
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("demo finished: every step did what it should"));
    assert!(
        elsewhere.join("demo/dist").is_dir(),
        "the demo's files are not under CARGO_TARGET_DIR"
    );
}
