//! `cargo xtask release` and `cargo xtask verify` on real binaries: this workspace's, another
//! generated workspace's, two checkouts of the same commit, and binaries crafted to break each
//! verification check.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{ensure, Result};
use muscle_e2e::{target_dir, workspace_root, xtask};
use serde_json::Value;

use common::{text, tool};

#[test]
fn released_binaries_are_static_and_file_readelf_and_sha256sum_agree_with_the_manifest(
) -> Result<()> {
    let b = common::builds();
    for release in [&b.agents, &b.v1] {
        let out = Command::new("sha256sum")
            .arg("-c")
            .arg("SHA256SUMS")
            .current_dir(&release.dir)
            .output()?;
        assert!(out.status.success(), "sha256sum -c: {}", text(&out));
        let manifest: Value =
            serde_json::from_slice(&std::fs::read(release.dir.join("manifest.json"))?)?;
        assert_eq!(
            manifest["artifacts"].as_array().unwrap().len(),
            muscle_e2e::ALL_TARGETS.len(),
            "one binary per target"
        );
        for a in manifest["artifacts"].as_array().unwrap() {
            let path = release.dir.join(a["path"].as_str().unwrap());
            assert_eq!(std::fs::metadata(&path)?.len(), a["size"].as_u64().unwrap());
            let file = tool("file", &["-b"], &path)?;
            let readelf = tool("readelf", &["-lhdn", "-W"], &path)?;
            let (file_arch, readelf_machine) = common::elf_names(a["arch"].as_str().unwrap());
            assert!(
                file.contains(file_arch) && file.contains("static"),
                "{}: {file}",
                path.display()
            );
            assert!(readelf.contains(readelf_machine), "{}", path.display());
            assert!(
                !readelf.contains("INTERP") && !readelf.contains("(NEEDED)"),
                "{}: not static:\n{readelf}",
                path.display()
            );
            let build_id = a["elf"]["build_id"].as_str().unwrap();
            assert!(
                readelf.contains(&format!("Build ID: {build_id}")),
                "{}: readelf and the manifest disagree on the build-id",
                path.display()
            );
            let static_pie = a["elf"]["static_pie"].as_bool().unwrap();
            assert_eq!(
                readelf.contains("DYN (Position-Independent Executable file)"),
                static_pie,
                "{}",
                path.display()
            );
        }
    }
    // The aarch64 build runs under qemu-user and knows what it is.
    let arm = b.v1.binary("aarch64-unknown-linux-musl", "hello-service");
    let out = Command::new("qemu-aarch64-static")
        .arg(&arm)
        .arg("--version")
        .output()?;
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "hello-service 0.1.0 (aarch64)"
    );
    Ok(())
}

#[test]
fn release_works_on_another_workspace_given_by_manifest_path() -> Result<()> {
    let dir = common::scratch("other-workspace");
    let ws = dir.join("acme");
    std::fs::create_dir_all(ws.join("core/src"))?;
    std::fs::create_dir_all(ws.join("tools/src/bin"))?;
    std::fs::write(ws.join("Cargo.toml"), "[workspace]\nmembers = [\"core\", \"tools\"]\nresolver = \"2\"\n\n[profile.release]\nstrip = true\n")?;
    std::fs::write(
        ws.join("core/Cargo.toml"),
        "[package]\nname = \"acme-core\"\nversion = \"1.2.3\"\nedition = \"2021\"\n",
    )?;
    std::fs::write(
        ws.join("core/src/lib.rs"),
        "pub fn greet() -> &'static str { \"acme\" }\n",
    )?;
    std::fs::write(ws.join("tools/Cargo.toml"), "[package]\nname = \"acme-tools\"\nversion = \"1.2.3\"\nedition = \"2021\"\n\n[dependencies]\nacme-core = { path = \"../core\" }\n")?;
    std::fs::write(
        ws.join("tools/src/main.rs"),
        "fn main() { println!(\"{}\", acme_core::greet()); }\n",
    )?;
    std::fs::write(
        ws.join("tools/src/bin/acme-admin.rs"),
        "fn main() { println!(\"admin {}\", acme_core::greet()); }\n",
    )?;
    let out = Command::new("cargo")
        .args(["generate-lockfile", "--offline", "--manifest-path"])
        .arg(ws.join("Cargo.toml"))
        .output()?;
    assert!(out.status.success(), "{}", text(&out));

    let dist = dir.join("dist");
    let out = xtask(&[
        "release",
        "--manifest-path",
        ws.join("Cargo.toml").to_str().unwrap(),
        "--out",
        dist.to_str().unwrap(),
        "--json",
    ])?;
    assert!(out.status.success(), "{}", text(&out));
    let manifest: Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(
        manifest["app"], "acme-tools",
        "one package released: the release is named after it"
    );
    assert_eq!(manifest["version"], "1.2.3");
    let mut got: Vec<String> = manifest["artifacts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["path"].as_str().unwrap().to_owned())
        .collect();
    got.sort();
    assert_eq!(
        got,
        [
            "aarch64-unknown-linux-musl/acme-admin",
            "aarch64-unknown-linux-musl/acme-tools",
            "x86_64-unknown-linux-musl/acme-admin",
            "x86_64-unknown-linux-musl/acme-tools"
        ]
    );
    let release = dist.join("acme-tools-1.2.3");
    let out = Command::new("sha256sum")
        .arg("-c")
        .arg("SHA256SUMS")
        .current_dir(&release)
        .output()?;
    assert!(out.status.success(), "{}", text(&out));
    let run = Command::new(release.join("aarch64-unknown-linux-musl/acme-admin")).output()?;
    assert_eq!(String::from_utf8_lossy(&run.stdout).trim(), "admin acme");
    Ok(())
}

fn clone_head(to: &Path) -> Result<PathBuf> {
    let _ = std::fs::remove_dir_all(to);
    let out = Command::new("git")
        .args(["clone", "--quiet", "--no-hardlinks"])
        .arg(workspace_root())
        .arg(to)
        .output()?;
    ensure!(out.status.success(), "git clone: {}", text(&out));
    Ok(to.to_owned())
}

#[test]
fn the_same_commit_released_from_two_checkouts_is_byte_identical() -> Result<()> {
    let dir = common::scratch("reproducible");
    let mut shas = Vec::new();
    for name in ["checkout-a", "elsewhere/checkout-b"] {
        let checkout = clone_head(&dir.join(name))?;
        let out_dir = dir.join(format!("dist-{}", shas.len()));
        let manifest_path = checkout.join("Cargo.toml");
        let out = xtask(&[
            "release",
            "--manifest-path",
            manifest_path.to_str().unwrap(),
            "--package",
            "muscle-agent",
            "--target",
            "x86_64-unknown-linux-musl",
            "--out",
            out_dir.to_str().unwrap(),
            "--json",
        ])?;
        assert!(out.status.success(), "{}", text(&out));
        let manifest: Value = serde_json::from_slice(&out.stdout)?;
        shas.push((
            manifest["artifacts"][0]["sha256"]
                .as_str()
                .unwrap()
                .to_owned(),
            manifest["source_date_epoch"].clone(),
        ));
    }
    assert_eq!(
        shas[0], shas[1],
        "byte-identical binaries and the same SOURCE_DATE_EPOCH from both checkouts"
    );
    Ok(())
}

/// Compiles `main(){}` in C with `flags` (a real binary with the property a check looks for).
fn cc(dir: &Path, name: &str, flags: &[&str]) -> Result<PathBuf> {
    let src = dir.join("main.c");
    std::fs::write(&src, "int main(void) { return 0; }\n")?;
    let out_path = dir.join(name);
    let out = Command::new("gcc")
        .args(flags)
        .arg("-o")
        .arg(&out_path)
        .arg(&src)
        .output()?;
    ensure!(out.status.success(), "gcc {flags:?}: {}", text(&out));
    Ok(out_path)
}

/// Runs `cargo xtask verify` and returns (exit code, output).
fn verify(args: &[&str], file: &Path) -> Result<(i32, String)> {
    let mut all = vec!["verify"];
    all.extend(args);
    all.push(file.to_str().unwrap());
    let out = xtask(&all)?;
    Ok((out.status.code().unwrap_or(-1), text(&out)))
}

#[test]
fn verify_names_each_failed_check_with_its_evidence() -> Result<()> {
    let b = common::builds();
    let dir = common::scratch("verify");
    let arm = b.v1.binary("aarch64-unknown-linux-musl", "hello-service");
    let x86 = b.v1.binary("x86_64-unknown-linux-musl", "hello-service");

    let (code, out) = verify(&[], &x86)?;
    assert_eq!(code, 0, "{out}");
    let (code, out) = verify(&["--target", "aarch64-unknown-linux-musl"], &arm)?;
    assert_eq!(code, 0, "{out}");

    // Each case: a real binary with the flaw, the check that must fail, and its evidence.
    let cases: Vec<(PathBuf, Vec<&str>, &str, &str)> = vec![
        (
            PathBuf::from("/bin/ls"),
            vec![],
            "no-interp",
            "PT_INTERP=/lib64/ld-linux-x86-64.so.2",
        ),
        (
            PathBuf::from("/bin/ls"),
            vec![],
            "no-needed",
            "DT_NEEDED=libselinux.so.1",
        ),
        (
            arm.clone(),
            vec!["--target", "x86_64-unknown-linux-musl"],
            "elf-machine",
            "e_machine=EM_AARCH64, expected EM_X86_64",
        ),
        (
            cc(&dir, "rpath", &["-Wl,-rpath,/opt/acme/lib"])?,
            vec![],
            "no-rpath",
            "/opt/acme/lib",
        ),
        (
            cc(&dir, "execstack", &["-static-pie", "-z", "execstack"])?,
            vec![],
            "nx-stack",
            "PF_X",
        ),
        (
            cc(&dir, "norelro", &["-static-pie", "-Wl,-z,norelro"])?,
            vec![],
            "relro",
            "no PT_GNU_RELRO",
        ),
        (
            cc(&dir, "nobuildid", &["-static-pie", "-Wl,--build-id=none"])?,
            vec![],
            "build-id",
            "no NT_GNU_BUILD_ID",
        ),
        (
            cc(&dir, "debug", &["-static-pie", "-g"])?,
            vec![],
            "stripped",
            ".debug_info",
        ),
        (
            cc(&dir, "nopie", &["-static", "-no-pie"])?,
            vec![],
            "static-pie",
            "e_type=EXEC",
        ),
    ];
    for (file, args, check, evidence) in cases {
        let (code, out) = verify(&args, &file)?;
        assert_eq!(code, 1, "{}: {out}", file.display());
        let line = out
            .lines()
            .find(|l| l.contains(&format!("check {check} failed")))
            .unwrap_or_else(|| panic!("{check} not named for {}:\n{out}", file.display()));
        assert!(
            line.contains(evidence) && line.contains(file.to_str().unwrap()),
            "{line}"
        );
    }

    // Unusable input: exit 2, a clear error, no panic.
    let not_elf = dir.join("script.sh");
    std::fs::write(&not_elf, "#!/bin/sh\necho hi\n")?;
    let (code, out) = verify(&[], &not_elf)?;
    assert_eq!(code, 2, "{out}");
    assert!(
        out.contains("not an ELF file") && out.contains("23 21 2f 62"),
        "{out}"
    );
    let truncated = dir.join("truncated");
    let bytes = std::fs::read(&x86)?;
    std::fs::write(&truncated, &bytes[..bytes.len() / 3])?;
    let (code, out) = verify(&[], &truncated)?;
    assert_eq!(code, 2, "{out}");
    assert!(
        out.contains("truncated ELF") && !out.contains("panicked"),
        "{out}"
    );
    Ok(())
}

#[test]
fn the_opt_in_glibc_target_builds_fully_static_with_crt_static() -> Result<()> {
    common::builds();
    let dir = common::scratch("glibc-static");
    let manifest = target_dir().join("e2e-dist/src/hello-service-0.1.0/Cargo.toml");
    let out = xtask(&[
        "release",
        "--target",
        "aarch64-unknown-linux-gnu",
        "--manifest-path",
        manifest.to_str().unwrap(),
        "--out",
        dir.to_str().unwrap(),
        "--json",
    ])?;
    assert!(out.status.success(), "{}", text(&out));
    let manifest: Value = serde_json::from_slice(&out.stdout)?;
    let artifact = &manifest["artifacts"][0];
    assert_eq!(artifact["target"], "aarch64-unknown-linux-gnu");
    assert!(
        artifact["elf"]["interpreter"].is_null()
            && artifact["elf"]["needed"].as_array().unwrap().is_empty(),
        "{artifact}"
    );
    let bin = dir.join("hello-service-0.1.0/aarch64-unknown-linux-gnu/hello-service");
    let file = tool("file", &["-b"], &bin)?;
    assert!(
        file.contains("ARM aarch64") && file.contains("statically linked"),
        "{file}"
    );
    let run = Command::new(&bin).arg("--version").output()?;
    assert_eq!(
        String::from_utf8_lossy(&run.stdout).trim(),
        "hello-service 0.1.0 (aarch64)"
    );
    Ok(())
}
