//! Split debug info, on all four architectures: a workspace whose release profile keeps line
//! tables releases stripped binaries that run under qemu-user, with `<bin>.debug` beside each,
//! matched by build-id and `.gnu_debuglink`, from which gdb resolves the shipped binary's
//! addresses. Publish stores the debug files; agents are never offered them.

mod common;

use std::process::Command;

use anyhow::{Context, Result};
use common::{text, tool};
use muscle_e2e::{release_hello_with, Deployer, HelloVersion};
use serde_json::Value;

/// Every architecture a rollout can span: (triple, arch as the binary reports it).
const FOUR_ARCHES: [(&str, &str); 4] = [
    ("x86_64-unknown-linux-musl", "x86_64"),
    ("aarch64-unknown-linux-musl", "aarch64"),
    ("armv7-unknown-linux-gnueabihf", "arm"),
    ("riscv64gc-unknown-linux-gnu", "riscv64"),
];

/// What gdb says of `binary` for `command`, e.g. `info symbol 0x1234`.
fn gdb(binary: &std::path::Path, command: &str) -> Result<String> {
    let out = Command::new("gdb")
        .args(["-batch", "-nx", "-ex", command])
        .arg(binary)
        .output()
        .context("gdb is installed by `cargo xtask setup`")?;
    Ok(text(&out))
}

#[test]
fn debug_info_is_split_off_matched_by_build_id_and_resolves_addresses_on_four_arches() -> Result<()>
{
    let dir = common::scratch("debuginfo");
    let mut args = Vec::new();
    for (triple, _) in FOUR_ARCHES {
        args.extend(["--target", triple]);
    }
    let release = release_hello_with(
        HelloVersion {
            version: "0.1.0",
            unhealthy: false,
        },
        &dir,
        // What many workspaces keep for backtraces; it used to fail `stripped`.
        "\n[profile.release]\ndebug = \"line-tables-only\"\n",
        &args,
    )?;
    let manifest: Value =
        serde_json::from_slice(&std::fs::read(release.dir.join("manifest.json"))?)?;
    let sums = std::fs::read_to_string(release.dir.join("SHA256SUMS"))?;
    let of_target = |list: &str, triple: &str| {
        manifest[list]
            .as_array()
            .into_iter()
            .flatten()
            .find(|a| a["target"] == triple)
            .cloned()
            .with_context(|| format!("no {list} entry for {triple}: {manifest:#}"))
    };
    for (triple, arch) in FOUR_ARCHES {
        let shipped = release.binary(triple, "hello-service");
        let debug = shipped.with_file_name("hello-service.debug");
        let artifact = of_target("artifacts", triple)?;
        let entry = of_target("debug", triple)?;
        assert_eq!(
            entry["build_id"], artifact["elf"]["build_id"],
            "{manifest:#}"
        );
        assert!(
            sums.contains(&format!("  {triple}/hello-service.debug\n")),
            "{sums}"
        );

        // The shipped binary: stripped, linked to its debug file, same build-id; and it runs.
        let sections = tool("readelf", &["-S", "-n", "-W"], &shipped)?;
        assert!(
            !sections.contains(".debug_info") && !sections.contains(".debug_line"),
            "{triple}: shipped with debug info:\n{sections}"
        );
        assert!(sections.contains(".gnu_debuglink"), "{triple}: {sections}");
        let build_id = entry["build_id"].as_str().unwrap();
        assert!(
            sections.contains(&format!("Build ID: {build_id}")),
            "{triple}"
        );
        assert!(
            tool("readelf", &["-n"], &debug)?.contains(&format!("Build ID: {build_id}")),
            "{triple}: the .debug file carries another build-id"
        );
        let run = Command::new(&shipped).arg("--version").output()?;
        assert_eq!(
            String::from_utf8_lossy(&run.stdout).trim(),
            format!("hello-service 0.1.0 ({arch})"),
            "{triple}: {}",
            text(&run)
        );

        // gdb finds the debug file through the link and names the function at the entry point;
        // without the debug file it cannot.
        let header = tool("readelf", &["-h"], &shipped)?;
        let entry_point = header
            .lines()
            .find_map(|l| l.trim().strip_prefix("Entry point address:"))
            .context("readelf printed no entry point")?
            .trim()
            .to_owned();
        let symbol = format!("info symbol {entry_point}");
        // hello_service::main's address, from the debug file's symbol table.
        let main = tool("nm", &[], &debug)?
            .lines()
            .find(|l| l.contains(" _ZN13hello_service4main"))
            .and_then(|l| l.split_whitespace().next().map(str::to_owned))
            .with_context(|| format!("{triple}: no hello_service::main in the debug symbols"))?;
        let line = &format!("info line *0x{main}");
        let resolved = gdb(&shipped, &symbol)?;
        assert!(
            resolved.contains("_start in section .text"),
            "{triple}: gdb could not resolve {entry_point}: {resolved}"
        );
        // The line tables too: the function's source line.
        let located = gdb(&shipped, line)?;
        assert!(
            located.contains("of \"src/main.rs\" starts at address"),
            "{triple}: {located}"
        );
        let aside = debug.with_extension("aside");
        std::fs::rename(&debug, &aside)?;
        let unresolved = gdb(&shipped, &symbol)? + &gdb(&shipped, line)?;
        std::fs::rename(&aside, &debug)?;
        assert!(
            !unresolved.contains("_start in section") && !unresolved.contains("src/main.rs"),
            "{triple}: resolved without the debug file, so the test proves nothing: {unresolved}"
        );
    }

    // Publish checks and stores the debug files; the artifacts agents choose from hold none.
    let deployer_bin = muscle_e2e::host_deployer(false)?;
    let deployer = Deployer::start(&deployer_bin, &dir.join("data"))?;
    deployer.publish(&release.dir)?;
    for entry in manifest["debug"].as_array().unwrap() {
        let sha = entry["sha256"].as_str().unwrap();
        assert!(
            dir.join("data/blobs/sha256").join(sha).is_file(),
            "{} was not stored",
            entry["path"]
        );
    }
    let debug_hashes: Vec<&Value> = manifest["debug"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| &d["sha256"])
        .collect();
    for artifact in manifest["artifacts"].as_array().unwrap() {
        assert!(
            !debug_hashes.contains(&&artifact["sha256"]),
            "a debug file is among what agents are offered: {artifact}"
        );
    }
    Ok(())
}
