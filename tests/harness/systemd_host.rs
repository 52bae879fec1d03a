//! An existing host, as far as Muscle can tell: a VM whose PID 1 is systemd (the Debian root of
//! `cargo xtask rootfs` on a virtio disk), which joins the fleet at boot with the README's one
//! line, `curl -fsSL DEPLOYER/install.sh | sh -s -- --enroll-token T` (its `muscle-join`
//! service, given the deployer and token on the kernel command line).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::{xtask, Boot, Deployer, Vm, VmOptions};

/// The Debian root with systemd, built (once, cached) by `cargo xtask rootfs`.
fn rootfs() -> Result<PathBuf> {
    let out = xtask(&["rootfs"])?;
    if !out.status.success() {
        bail!(
            "cargo xtask rootfs failed ({}):\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let said = String::from_utf8(out.stdout)?;
    let path = said
        .lines()
        .last()
        .context("cargo xtask rootfs printed no path")?;
    Ok(PathBuf::from(path.trim()))
}

/// The one file in `dir` whose name starts with `prefix`.
fn file_starting(dir: &Path, prefix: &str) -> Result<PathBuf> {
    std::fs::read_dir(dir)?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with(prefix))
        })
        .with_context(|| format!("no {prefix}* in {}", dir.display()))
}

/// Boots the systemd host: a fresh disk made from the root, console to
/// `logs/systemd-console.log`; it joins with `words` (`muscle.label=K=V`, `muscle.var=K=V`).
pub fn boot_systemd_host(
    deployer: &Deployer,
    enroll_token: &str,
    words: &str,
    logs: &Path,
) -> Result<Vm> {
    let root = rootfs()?;
    let disk = logs.join("systemd-disk.img");
    let status = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-L", "root", "-d"])
        .arg(&root)
        .arg(&disk)
        .arg("2G")
        .status()
        .context("cannot run mkfs.ext4 (cargo xtask setup installs e2fsprogs)")?;
    if !status.success() {
        bail!("mkfs.ext4 -d {} failed: {status}", root.display());
    }
    let boot = root.join("boot");
    Vm::start(
        VmOptions {
            arch: "x86_64",
            boot: Boot::Direct {
                kernel: file_starting(&boot, "vmlinuz-")?,
                initrd: file_starting(&boot, "initrd.img-")?,
                cmdline: format!(
                    "root=/dev/vda rw muscle.install=http://10.0.2.2:{} muscle.token={enroll_token} {words}",
                    deployer.port
                ),
            },
            mac: "52:54:00:00:01:01".into(),
            forwards: vec![],
            memory_mib: 1024,
            reboots: false,
            disk: Some(disk),
        },
        &logs.join("systemd-console.log"),
    )
}
