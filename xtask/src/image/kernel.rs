//! Debian's cloud kernels, the kernels of Muscle's boot images: fetched by `cargo xtask setup`
//! into a cache (one .deb per architecture), read by `cargo xtask image`.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use muscle_protocol::image::ImageArch;

use crate::util;

/// The virtio network driver and what it needs, in load order (the .deb ships no modules.dep).
pub const NET_MODULES: &[&str] = &[
    "virtio_ring",
    "virtio",
    "virtio_pci_modern_dev",
    "virtio_pci_legacy_dev",
    "virtio_pci",
    "failover",
    "net_failover",
    "virtio_net",
];

/// Debian's name for an architecture with a cloud kernel.
pub fn debian_arch(arch: ImageArch) -> &'static str {
    match arch {
        ImageArch::X86_64 => "amd64",
        ImageArch::Aarch64 => "arm64",
    }
}

/// `$XDG_CACHE_HOME/muscle/kernels/ARCH` (default `~/.cache`).
pub fn cache_dir(debian_arch: &str) -> PathBuf {
    util::cache_home().join("kernels").join(debian_arch)
}

/// A kernel package in the cache, unpacked.
pub struct Kernel {
    pub package: String,
    pub version: String,
    pub deb_sha256: String,
    /// The kernel image the boot loader loads.
    pub vmlinuz: Vec<u8>,
    /// `(name, bytes)` of each of [`NET_MODULES`], in order.
    pub modules: Vec<(String, Vec<u8>)>,
}

/// The newest cached kernel for `debian_arch`, or `--kernel DEB`.
pub fn load(debian_arch: &str, deb: Option<&Path>) -> Result<Kernel> {
    let deb = match deb {
        Some(deb) => deb.to_owned(),
        None => newest_cached(debian_arch)?,
    };
    let bytes = std::fs::read(&deb).with_context(|| format!("cannot read {}", deb.display()))?;
    let field = |name: &str| -> Result<String> {
        util::output(
            Command::new("dpkg-deb")
                .args(["--field"])
                .arg(&deb)
                .arg(name),
        )
        .map(|s| s.trim().to_owned())
    };
    let package = field("Package")?;
    let version = field("Version")?;
    let unpacked = tempdir(&format!("kernel-{debian_arch}"))?;
    util::run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&unpacked))?;
    let kernel = read_unpacked(&unpacked, package, version, &bytes);
    let _ = std::fs::remove_dir_all(&unpacked);
    kernel.with_context(|| format!("reading the kernel package {}", deb.display()))
}

fn read_unpacked(dir: &Path, package: String, version: String, deb: &[u8]) -> Result<Kernel> {
    let vmlinuz = only_file(&dir.join("boot"), "vmlinuz-")?;
    let modules_root = only_dir(&dir.join("lib/modules"))?;
    let mut all = Vec::new();
    walk(&modules_root, &mut all)?;
    let modules = NET_MODULES
        .iter()
        .map(|name| {
            let file = format!("{name}.ko");
            let path = all
                .iter()
                .find(|p| p.file_name().is_some_and(|f| f == file.as_str()))
                .with_context(|| format!("the package has no module {file}"))?;
            Ok((name.to_string(), std::fs::read(path)?))
        })
        .collect::<Result<_>>()?;
    Ok(Kernel {
        package,
        version,
        deb_sha256: muscle_protocol::sha256_hex(deb),
        vmlinuz: std::fs::read(vmlinuz)?,
        modules,
    })
}

fn newest_cached(debian_arch: &str) -> Result<PathBuf> {
    let dir = cache_dir(debian_arch);
    let debs: Vec<PathBuf> = std::fs::read_dir(&dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.extension().is_some_and(|e| e == "deb")
                && p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("linux-image-"))
        })
        .collect();
    // The newest by Debian's version order (dpkg compares; the ABI number is in the package
    // name, the version in the file name).
    let mut newest: Option<(PathBuf, String)> = None;
    for deb in debs {
        let version = deb_version(&deb);
        let newer = match &newest {
            None => true,
            Some((_, best)) => dpkg_newer(&version, best)?,
        };
        if newer {
            newest = Some((deb, version));
        }
    }
    newest.map(|(deb, _)| deb).with_context(|| {
        format!(
            "no {debian_arch} kernel in {}: run `cargo xtask setup`, or give --kernel DEB",
            dir.display()
        )
    })
}

/// Whether Debian version `a` is newer than `b`.
fn dpkg_newer(a: &str, b: &str) -> Result<bool> {
    let status = Command::new("dpkg")
        .args(["--compare-versions", a, "gt", b])
        .status()
        .context("cannot run dpkg to compare kernel versions")?;
    Ok(status.success())
}

/// `linux-image-6.1.0-57-cloud-amd64_6.1.192-3_amd64.deb` → `6.1.192-3`.
fn deb_version(path: &Path) -> String {
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    name.split('_').nth(1).unwrap_or_default().to_owned()
}

/// Downloads the current cloud kernel of `debian_arch` into the cache, unless it is there.
/// Foreign architectures are read from their own package lists, kept in the cache too.
pub fn fetch(debian_arch: &str) -> Result<PathBuf> {
    let dir = cache_dir(debian_arch);
    std::fs::create_dir_all(&dir)?;
    let apt = |program: &str| {
        let mut cmd = Command::new(program);
        let lists = dir.join("lists");
        let cache = dir.join("apt-cache");
        let _ = std::fs::create_dir_all(lists.join("partial"));
        let _ = std::fs::create_dir_all(cache.join("archives/partial"));
        cmd.arg("-q")
            .arg(format!("-oAPT::Architecture={debian_arch}"))
            .arg(format!("-oAPT::Architectures={debian_arch}"))
            .arg(format!("-oDir::State::Lists={}", lists.display()))
            .arg(format!("-oDir::Cache={}", cache.display()))
            .arg("-oDir::State::status=/dev/null")
            .arg("-oAPT::Sandbox::User=root");
        cmd.current_dir(&dir);
        cmd
    };
    util::run(apt("apt-get").arg("update")).context("apt-get update")?;
    let meta = format!("linux-image-cloud-{debian_arch}");
    let depends = util::output(apt("apt-cache").args(["depends", &meta]))?;
    let Some(package) = depends
        .lines()
        .filter_map(|l| l.trim().strip_prefix("Depends: "))
        .find(|p| p.starts_with("linux-image-"))
    else {
        bail!("{meta} depends on no linux-image package:\n{depends}");
    };
    let version = util::output(apt("apt-cache").args(["show", "--no-all-versions", package]))?
        .lines()
        .find_map(|l| l.strip_prefix("Version: "))
        .map(str::to_owned)
        .with_context(|| format!("apt knows no version of {package}"))?;
    let file = dir.join(format!("{package}_{version}_{debian_arch}.deb"));
    if file.is_file() {
        return Ok(file);
    }
    eprintln!(
        "setup: downloading {package} {version} into {}",
        dir.display()
    );
    util::run(apt("apt-get").args(["download", package]))
        .with_context(|| format!("apt-get download {package}"))?;
    if !file.is_file() {
        bail!("apt-get download {package} wrote no {}", file.display());
    }
    Ok(file)
}

/// The cached kernel packages, without downloading: for `setup --check`.
pub fn cached(debian_arch: &str) -> bool {
    newest_cached(debian_arch).is_ok()
}

fn only_file(dir: &Path, prefix: &str) -> Result<PathBuf> {
    std::fs::read_dir(dir)
        .with_context(|| format!("no {}", dir.display()))?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with(prefix))
        })
        .with_context(|| format!("no {prefix}* in {}", dir.display()))
}

fn only_dir(dir: &Path) -> Result<PathBuf> {
    std::fs::read_dir(dir)
        .with_context(|| format!("no {}", dir.display()))?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.is_dir())
        .with_context(|| format!("nothing in {}", dir.display()))
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    for entry in std::fs::read_dir(dir)?.flatten() {
        let path = entry.path();
        if entry.file_type()?.is_dir() {
            walk(&path, out)?;
        } else {
            out.push(path);
        }
    }
    Ok(())
}

fn tempdir(what: &str) -> Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("muscle-{what}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}
