//! `cargo xtask rootfs`: a minimal Debian root (amd64) whose PID 1 is systemd, for the VM that
//! joins the fleet the way an existing host does — through the deployer's install script — and
//! runs services as real systemd units. Built once with debootstrap from Debian's mirror into
//! `~/.cache/muscle/rootfs/`; the tests make a disk of it with `mkfs.ext4 -d`.
//!
//! Beside Debian's packages it holds only: DHCP on every Ethernet interface (systemd-networkd),
//! and `muscle-join.service`, which runs `curl -fsSL URL/install.sh | sh -s -- --enroll-token T`
//! with the URL and token of the kernel command line (`muscle.install=`, `muscle.token=`), and
//! its `muscle.label=`/`muscle.var=` words as `--label`/`--var`.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use clap::Args;

use crate::util;

#[derive(Args, Debug)]
pub struct RootfsArgs {}

const SUITE: &str = "bookworm";
const PACKAGES: &str = "systemd,systemd-sysv,udev,curl,ca-certificates,iproute2,\
                        linux-image-cloud-amd64,initramfs-tools";
/// Written last, naming the recipe: a root without it (an interrupted build) or of another
/// recipe is built again.
fn ready_stamp() -> String {
    let recipe = [SUITE, PACKAGES, NETWORK, JOIN_UNIT, JOIN_SCRIPT].concat();
    format!(
        "muscle-rootfs {}",
        muscle_protocol::sha256_hex(recipe.as_bytes())
    )
}

const NETWORK: &str = "[Match]\nName=en* eth*\n\n[Network]\nDHCP=ipv4\n";

pub fn run(_: RootfsArgs) -> Result<i32> {
    println!("{}", ensure()?.display());
    Ok(0)
}

/// The root directory, built first if it is not in the cache yet.
pub fn ensure() -> Result<PathBuf> {
    let dir = util::cache_home()
        .join("rootfs")
        .join(format!("{SUITE}-systemd-amd64"));
    let root = dir.join("root");
    let ready = ready_stamp();
    if std::fs::read_to_string(dir.join("READY")).is_ok_and(|s| s.trim() == ready) {
        return Ok(root);
    }
    if !is_root() {
        bail!(
            "building the systemd root needs root (debootstrap, and a root-owned tree for \
             mkfs.ext4 -d): run the systemd host test as root"
        );
    }
    let mirror = std::env::var("MUSCLE_DEBIAN_MIRROR")
        .unwrap_or_else(|_| "http://deb.debian.org/debian".into());
    let staging = dir.with_extension("partial");
    let _ = std::fs::remove_dir_all(&staging);
    std::fs::create_dir_all(&staging)?;
    eprintln!(
        "building a Debian {SUITE} root with systemd (debootstrap from {mirror}, about a minute)"
    );
    let status = Command::new("debootstrap")
        .args(["--variant=minbase", &format!("--include={PACKAGES}"), SUITE])
        .arg(staging.join("root"))
        .arg(&mirror)
        // Its progress is for the eye: stdout is this command's answer, the root's path.
        .stdout(std::io::stderr())
        .status()
        .context("cannot run debootstrap (cargo xtask setup installs it)")?;
    if !status.success() {
        bail!(
            "debootstrap failed ({status}); its log is in {}/root/debootstrap/",
            staging.display()
        );
    }
    configure(&staging.join("root"))?;
    std::fs::write(staging.join("READY"), ready)?;
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::rename(&staging, &dir)?;
    Ok(root)
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// Network by DHCP, a host name, and the join service.
fn configure(root: &Path) -> Result<()> {
    let write = |path: &str, text: &str, mode: u32| -> Result<()> {
        use std::os::unix::fs::PermissionsExt;
        let path = root.join(path);
        std::fs::create_dir_all(path.parent().expect("a file in a directory"))?;
        std::fs::write(&path, text)?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))?;
        Ok(())
    };
    write("etc/hostname", "muscle-systemd\n", 0o644)?;
    write("etc/systemd/network/10-wired.network", NETWORK, 0o644)?;
    write("usr/local/sbin/muscle-join", JOIN_SCRIPT, 0o755)?;
    write("etc/systemd/system/muscle-join.service", JOIN_UNIT, 0o644)?;
    let wants = root.join("etc/systemd/system/multi-user.target.wants");
    std::fs::create_dir_all(&wants)?;
    for (unit, target) in [
        (
            "systemd-networkd.service",
            "/lib/systemd/system/systemd-networkd.service",
        ),
        (
            "muscle-join.service",
            "/etc/systemd/system/muscle-join.service",
        ),
    ] {
        let link = wants.join(unit);
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(target, &link)?;
    }
    Ok(())
}

const JOIN_UNIT: &str = "\
[Unit]
Description=Join the Muscle fleet named on the kernel command line
ConditionKernelCommandLine=muscle.install
After=systemd-networkd.service

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/usr/local/sbin/muscle-join
StandardOutput=journal+console
StandardError=journal+console

[Install]
WantedBy=multi-user.target
";

/// The one line of the README, once the network is up.
const JOIN_SCRIPT: &str = r#"#!/bin/sh
set -eu
url=''; token=''; words=''
for word in $(cat /proc/cmdline); do
  case "$word" in
    muscle.install=*) url="${word#*=}" ;;
    muscle.token=*) token="${word#*=}" ;;
    muscle.label=*) words="$words --label ${word#*=}" ;;
    muscle.var=*) words="$words --var ${word#*=}" ;;
  esac
done
i=0
until curl -fsS -o /dev/null "$url/healthz"; do
  i=$((i + 1)); [ "$i" -lt 120 ] || { echo "muscle-join: $url does not answer" >&2; exit 1; }
  sleep 1
done
# shellcheck disable=SC2086 # words: --label/--var pairs, checked by the install script
curl -fsSL "$url/install.sh" | sh -s -- --enroll-token "$token" $words
"#;
