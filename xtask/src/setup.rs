//! `cargo xtask setup`: check, and where allowed install, everything builds and tests need.
//! Idempotent: on a ready machine it only looks.

use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result};
use clap::Args;

use crate::targets::{self, CToolchain, TargetSpec};
use crate::{util, zig};

#[derive(Args, Debug, Default)]
pub struct SetupArgs {
    /// Only report what is missing; install nothing.
    #[arg(long)]
    pub check: bool,
    /// Only what `cargo xtask release` needs (targets, C toolchains, zig): a release job that
    /// holds a signing key runs no more third-party code than building takes.
    #[arg(long)]
    pub for_release: bool,
}

/// Debian packages the tests, the demo and the benchmarks use besides the targets' compilers.
const TOOL_PACKAGES: &[(&str, &str)] = &[
    ("qemu-aarch64-static", "qemu-user-static"),
    // Boot images in whole-machine emulation (`cargo xtask image`, the VM tests); x86_64 boots
    // from the network through qemu's iPXE ROMs.
    ("qemu-system-x86_64", "qemu-system-x86"),
    ("qemu-system-aarch64", "qemu-system-arm"),
    // The systemd VM (`cargo xtask rootfs`): a Debian root, and a disk made of it.
    ("debootstrap", "debootstrap"),
    ("mkfs.ext4", "e2fsprogs"),
    ("file", "file"),
    ("gdb", "gdb"),
    ("readelf", "binutils"),
    ("nginx", "nginx-light"),
    ("wrk", "wrk"),
    ("hyperfine", "hyperfine"),
    ("curl", "curl"),
    ("systemd-analyze", "systemd"),
    ("openssl", "openssl"),
    // The console's browser tests drive Debian's Chromium through its WebDriver.
    ("chromium", "chromium"),
    ("chromedriver", "chromium-driver"),
];

pub fn run(args: SetupArgs) -> Result<i32> {
    let all = targets::load_all(&util::muscle_root().join("targets"))?;
    let mut todo = Vec::new();
    rustup_targets(&all, args.check, &mut todo)?;
    packages(&all, args.check, args.for_release, &mut todo)?;
    zig(&all, args.check, &mut todo)?;
    if !args.for_release {
        fuzzing(args.check, &mut todo)?;
        s3_server(args.check, &mut todo)?;
        kernels(&all, args.check, &mut todo)?;
    }
    if !args.for_release {
        binfmt(&all, args.check, &mut todo)?;
    }
    if todo.is_empty() {
        eprintln!("setup: everything is in place ({} targets)", all.len());
        return Ok(0);
    }
    eprintln!("setup: some things are missing; run these (as root where needed):");
    for line in &todo {
        eprintln!("  {line}");
    }
    Ok(util::EXIT_FAILED)
}

fn rustup_targets(all: &[TargetSpec], check: bool, todo: &mut Vec<String>) -> Result<()> {
    let installed = util::output(Command::new("rustup").args(["target", "list", "--installed"]))?;
    let missing: Vec<&str> = all
        .iter()
        .map(|t| t.triple.as_str())
        .filter(|t| !installed.lines().any(|l| l.trim() == *t))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    let mut args = vec!["target", "add"];
    args.extend(missing);
    install(check, todo, "rustup", &args)
}

/// Runs `program args` as this user, saying so; with `--check`, only notes it in `todo`.
fn install(check: bool, todo: &mut Vec<String>, program: &str, args: &[&str]) -> Result<()> {
    let line = format!("{program} {}", args.join(" "));
    if check {
        todo.push(line);
        return Ok(());
    }
    eprintln!("setup: {line}");
    util::run(Command::new(program).args(args))
}

fn packages(
    all: &[TargetSpec],
    check: bool,
    for_release: bool,
    todo: &mut Vec<String>,
) -> Result<()> {
    let mut missing: Vec<String> = Vec::new();
    for t in all {
        if let CToolchain::Gcc {
            cc,
            ar,
            objcopy,
            apt_packages,
        } = &t.c
        {
            if ![cc, ar, objcopy].iter().all(|tool| util::have(tool)) {
                missing.extend(apt_packages.iter().cloned());
            }
        }
    }
    let tools = if for_release { &[][..] } else { TOOL_PACKAGES };
    for (tool, package) in tools {
        if !util::have(tool) && !Path::new("/usr/sbin").join(tool).exists() {
            missing.push(package.to_string());
        }
    }
    // The store suite and the replica tests start a throwaway cluster of Debian's server, which
    // lives off PATH in /usr/lib/postgresql/N/bin.
    if !for_release && !postgres_server_installed() {
        missing.push("postgresql".into());
    }
    missing.sort();
    missing.dedup();
    if missing.is_empty() {
        return Ok(());
    }
    let install = format!("apt-get install -y {}", missing.join(" "));
    let Some(mut as_root) = (!check && util::have("apt-get")).then(as_root).flatten() else {
        todo.push(format!("apt-get update && {install}"));
        return Ok(());
    };
    eprintln!("setup: {install}");
    util::run(as_root().args(["apt-get", "update", "-q"]))?;
    util::run(
        as_root()
            .args([
                "env",
                "DEBIAN_FRONTEND=noninteractive",
                "apt-get",
                "install",
            ])
            .args(["-y", "-q", "--no-install-recommends"])
            .args(&missing),
    )
}

fn postgres_server_installed() -> bool {
    std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .any(|version| version.path().join("bin/postgres").is_file())
}

/// A command maker for what only root may do: the command itself as root, through `sudo -n`
/// for a user who may (a CI runner, a developer's laptop), or `None`: then setup prints what to
/// run. Everything else (zig, cargo-fuzz, rustup) installs as the user who runs the builds.
fn as_root() -> Option<impl FnMut() -> Command> {
    let via_sudo = if util::is_root() {
        false
    } else if util::have("sudo") && util::run(Command::new("sudo").args(["-n", "true"])).is_ok() {
        true
    } else {
        return None;
    };
    Some(move || {
        let mut cmd = Command::new(if via_sudo { "sudo" } else { "env" });
        if via_sudo {
            cmd.args(["-n", "--"]);
        }
        cmd
    })
}

/// zig, for the targets whose C it compiles (see `zig.rs`).
fn zig(all: &[TargetSpec], check: bool, todo: &mut Vec<String>) -> Result<()> {
    let needed = all.iter().any(|t| matches!(t.c, CToolchain::Zig { .. }));
    if !needed || zig::binary().is_some() {
        return Ok(());
    }
    if check {
        todo.push(format!(
            "python3 -m pip install --target {} ziglang=={}",
            zig::home().display(),
            zig::VERSION
        ));
        return Ok(());
    }
    zig::install().map(drop)
}

/// The nightly toolchain and cargo-fuzz, for `cargo xtask fuzz` (libFuzzer needs nightly).
fn fuzzing(check: bool, todo: &mut Vec<String>) -> Result<()> {
    let toolchains = util::output(Command::new("rustup").args(["toolchain", "list"]))?;
    if !toolchains.lines().any(|l| l.starts_with("nightly")) {
        let nightly = ["toolchain", "install", "nightly", "--profile", "minimal"];
        install(check, todo, "rustup", &nightly)?;
    }
    let have_fuzz = Command::new("cargo")
        .args(["fuzz", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !have_fuzz {
        let cargo_fuzz = ["install", "cargo-fuzz", "--locked", "--version", "0.13.2"];
        install(check, todo, "cargo", &cargo_fuzz)?;
    }
    Ok(())
}

/// The S3-compatible server the blob store tests run against (it checks request signatures).
/// 0.14.1: later versions need a newer rustc than this toolchain.
fn s3_server(check: bool, todo: &mut Vec<String>) -> Result<()> {
    if util::have("s3s-fs") || cargo_bin("s3s-fs").is_file() {
        return Ok(());
    }
    let s3s = [
        "install",
        "s3s-fs@0.14.1",
        "--features",
        "binary",
        "--locked",
    ];
    install(check, todo, "cargo", &s3s)
}

/// Debian's cloud kernels for `cargo xtask image`, one per architecture that has one, fetched
/// into the cache (not installed: they only go into images). They come from this machine's apt
/// sources: Debian's, for `linux-image-cloud-*`.
fn kernels(all: &[TargetSpec], check: bool, todo: &mut Vec<String>) -> Result<()> {
    let mut arches: Vec<&str> = all
        .iter()
        .filter(|t| t.default)
        .filter_map(|t| muscle_protocol::image::ImageArch::from_rust(&t.arch))
        .map(crate::image::kernel::debian_arch)
        .collect();
    arches.sort();
    arches.dedup();
    for arch in arches {
        let cached = crate::image::kernel::cached(arch);
        if check {
            if !cached {
                todo.push(format!(
                    "cargo xtask setup   # fetches linux-image-cloud-{arch}"
                ));
            }
            continue;
        }
        // Asked every time: Debian's security updates replace the kernel under the same name.
        match crate::image::kernel::fetch(arch) {
            Ok(_) => {}
            Err(e) if cached => eprintln!(
                "setup: cannot look for a newer {arch} kernel ({e:#}); images keep the one in the cache"
            ),
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Where `cargo install` puts `name`: $CARGO_HOME/bin, else ~/.cargo/bin.
pub fn cargo_bin(name: &str) -> std::path::PathBuf {
    let home = std::env::var_os("CARGO_HOME")
        .map(std::path::PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cargo")))
        .unwrap_or_default();
    home.join("bin").join(name)
}

/// Registers qemu-user with binfmt_misc so foreign binaries exec like native ones: that is how
/// an aarch64 agent starts its aarch64 services on this machine.
fn binfmt(all: &[TargetSpec], check: bool, todo: &mut Vec<String>) -> Result<()> {
    let dir = Path::new("/proc/sys/fs/binfmt_misc");
    for t in all
        .iter()
        .filter(|t| !t.is_native() && !t.runner.is_empty())
    {
        if dir.join(format!("qemu-{}", t.arch)).exists() {
            continue;
        }
        let conf = Path::new("/usr/lib/binfmt.d").join(format!("qemu-{}.conf", t.arch));
        let register = format!("cat {} > {}/register", conf.display(), dir.display());
        let mount = format!(
            "mount -t binfmt_misc binfmt_misc {} 2>/dev/null",
            dir.display()
        );
        let Some(mut as_root) = (!check && conf.exists()).then(as_root).flatten() else {
            todo.push(format!("{mount}; {register}"));
            continue;
        };
        eprintln!("setup: {register}");
        let script = if dir.join("register").exists() {
            register
        } else {
            format!("{mount}; {register}")
        };
        util::run(as_root().args(["sh", "-c", &script]))
            .with_context(|| format!("cannot register {} with binfmt_misc", conf.display()))?;
    }
    Ok(())
}
