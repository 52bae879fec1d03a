//! `cargo xtask image`: a network-bootable image per architecture — Debian's cloud kernel and
//! an initramfs holding our PID 1 (`muscle-init`), the static agent and the virtio network
//! modules — written like a release: one directory per target, manifest.json, SHA256SUMS.

mod initramfs;
pub mod kernel;
pub mod rootfs;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Args;
use muscle_protocol::image::{
    ImageArch, ImageFile, ImageIdentity, ImageManifest, KernelPackage, ManifestKind, TargetImage,
    IDENTITY_FILE, IMAGE_SCHEMA, INITRAMFS_FILE, KERNEL_FILE,
};
use muscle_protocol::Name;

use crate::release::{build, workspace, ReleaseArgs, Timings};
use crate::targets::{self, TargetSpec};
use crate::util;

#[derive(Args, Debug, Default)]
pub struct ImageArgs {
    /// Target triple (repeatable; default: the default targets, x86_64 and aarch64 musl).
    #[arg(long = "target")]
    pub targets: Vec<String>,
    /// Where `muscle-image-<version>/` is written (default: `<workspace>/dist`).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// The kernel package (.deb) to use instead of the newest one `cargo xtask setup` fetched
    /// (only with a single --target).
    #[arg(long, value_name = "DEB")]
    pub kernel: Option<PathBuf>,
    /// The image's version (default: the workspace's). A version's bytes never change once
    /// published: an image rebuilt with a newer kernel needs a new one.
    #[arg(long, value_parser = parse_version)]
    pub version: Option<Name>,
    /// The agent binary to put in the image instead of this workspace's (one already released,
    /// say; only with a single --target). Verified like a release's binary: static, for the
    /// target's architecture.
    #[arg(long, value_name = "FILE")]
    pub agent: Option<PathBuf>,
}

fn parse_version(s: &str) -> std::result::Result<Name, String> {
    Name::parse(s).map_err(|e| e.to_string())
}

/// The packages whose binaries go into every image.
const PACKAGES: [&str; 2] = ["muscle-agent", "muscle-init"];
const NAME: &str = muscle_protocol::IMAGE_APP;

pub fn run(args: ImageArgs) -> Result<i32> {
    build(&args).map(|_| 0)
}

/// Builds the image; its directory (`<out>/muscle-image-<version>`).
pub fn build(args: &ImageArgs) -> Result<PathBuf> {
    let all = targets::load_all(&util::muscle_root().join("targets"))?;
    let chosen: Vec<TargetSpec> = if args.targets.is_empty() {
        all.iter().filter(|t| t.default).cloned().collect()
    } else {
        targets::select(&all, &args.targets)?
    };
    for t in &chosen {
        if ImageArch::from_rust(&t.arch).is_none() {
            bail!(
                "no boot image for {}: images use Debian's cloud kernels, which exist for x86_64 (amd64) and aarch64 (arm64)",
                t.triple
            );
        }
    }
    if args.kernel.is_some() && chosen.len() != 1 {
        bail!("--kernel names one architecture's kernel: give exactly one --target with it");
    }
    if args.agent.is_some() && chosen.len() != 1 {
        bail!("--agent names one architecture's agent: give exactly one --target with it");
    }
    let packages: Vec<String> = PACKAGES.iter().map(|p| p.to_string()).collect();
    let ws = workspace::Workspace::load(None, &packages, &[])?;
    let provenance = workspace::Provenance::read(&ws)?;
    eprintln!(
        "building {NAME} {} for {}",
        args.version.as_ref().unwrap_or(&ws.version),
        chosen
            .iter()
            .map(|t| t.triple.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    );
    let release_args = ReleaseArgs {
        targets: chosen.iter().map(|t| t.triple.clone()).collect(),
        packages: packages.clone(),
        ..Default::default()
    };
    let built = build::build_all(
        &ws,
        &chosen,
        &provenance,
        &release_args,
        false,
        &mut Timings::default(),
    )?;
    if let Some(bad) = built.iter().find(|b| !b.verdict.passed()) {
        bail!(
            "{} for {} failed verification: {}",
            bad.binary,
            bad.target.triple,
            bad.verdict.failure_summary()
        );
    }
    let out = args.out.clone().unwrap_or_else(|| ws.root.join("dist"));
    let version = args.version.clone().unwrap_or_else(|| ws.version.clone());
    let dir = out.join(format!("{NAME}-{version}"));
    let staging = out.join(format!(".{NAME}-{version}.partial"));
    let _ = std::fs::remove_dir_all(&staging);
    std::fs::create_dir_all(&staging)
        .with_context(|| format!("cannot create {}", staging.display()))?;
    let mut manifest = ImageManifest {
        schema: IMAGE_SCHEMA,
        kind: ManifestKind::Image,
        name: Name::parse(NAME)?,
        version,
        source_date_epoch: provenance.source_date_epoch,
        git_commit: provenance.git_commit.clone(),
        rustc: provenance.rustc.clone(),
        targets: BTreeMap::new(),
    };
    let mut sums = Vec::new();
    for target in &chosen {
        let mut binaries: Vec<(&str, PathBuf)> = built
            .iter()
            .filter(|b| b.target.triple == target.triple)
            .map(|b| (b.binary.as_str(), b.path.clone()))
            .collect();
        if let Some(agent) = &args.agent {
            check_agent(agent, target)?;
            for (name, path) in &mut binaries {
                if *name == "muscle-agent" {
                    *path = agent.clone();
                }
            }
        }
        let image = write_target(&staging, target, &binaries, args, &manifest)?;
        for (file, facts) in image.files() {
            sums.push(format!("{}  {}/{file}\n", facts.sha256, target.triple));
        }
        manifest.targets.insert(Name::parse(&target.triple)?, image);
    }
    sums.sort();
    std::fs::write(staging.join("SHA256SUMS"), sums.concat())?;
    std::fs::write(
        staging.join("manifest.json"),
        serde_json::to_string_pretty(&manifest)? + "\n",
    )?;
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::rename(&staging, &dir)
        .with_context(|| format!("cannot move the image into {}", dir.display()))?;
    for (triple, image) in &manifest.targets {
        for (file, facts) in image.files() {
            eprintln!(
                "  {triple}/{file:<14} {:>10}  sha256 {}",
                util::human_size(facts.size),
                &facts.sha256[..16]
            );
        }
    }
    eprintln!("wrote {}", dir.display());
    Ok(dir)
}

/// An `--agent` binary must pass the checks a released one does for `target`.
fn check_agent(agent: &Path, target: &TargetSpec) -> Result<()> {
    let facts =
        muscle_inspect::inspect_file(agent).map_err(|e| anyhow::anyhow!(e.in_file(agent)))?;
    let verdict = muscle_inspect::verify(&facts, &target.expectation());
    if !verdict.passed() {
        bail!(
            "--agent {} is not a binary for {}: {}",
            agent.display(),
            target.triple,
            verdict.failure_summary()
        );
    }
    Ok(())
}

/// One target's kernel and initramfs, written into `staging/<triple>/`.
fn write_target(
    staging: &Path,
    target: &TargetSpec,
    binaries: &[(&str, PathBuf)],
    args: &ImageArgs,
    manifest: &ImageManifest,
) -> Result<TargetImage> {
    let image_arch = ImageArch::from_rust(&target.arch).expect("checked before building");
    let arch = kernel::debian_arch(image_arch);
    let kernel = kernel::load(arch, args.kernel.as_deref())?;
    let mut entries: Vec<(String, initramfs::Entry)> = [
        "dev",
        "etc",
        "lib",
        "lib/modules",
        "lib/modules/muscle",
        "proc",
        "run",
        "sys",
        "tmp",
        "usr",
        "usr/bin",
        "var",
        "var/lib",
        "var/lib/muscle-agent",
    ]
    .iter()
    .map(|d| (d.to_string(), initramfs::Entry::Dir))
    .collect();
    // The kernel opens /dev/console for PID 1 before anything is mounted: without this node
    // init runs with no output.
    entries.push((
        "dev/console".into(),
        initramfs::Entry::CharDevice {
            mode: 0o600,
            major: 5,
            minor: 1,
        },
    ));
    // Rust's start-up opens /dev/null for closed standard streams (a kernel with no console
    // for PID 1), and aborts without it: devtmpfs is not mounted yet then.
    entries.push((
        "dev/null".into(),
        initramfs::Entry::CharDevice {
            mode: 0o666,
            major: 1,
            minor: 3,
        },
    ));
    let mut sums = BTreeMap::new();
    for (name, path) in binaries {
        let bytes = std::fs::read(path)?;
        sums.insert(Name::parse(name)?, muscle_protocol::sha256_hex(&bytes));
        let at = if *name == "muscle-init" {
            "init".to_owned()
        } else {
            format!("usr/bin/{name}")
        };
        entries.push((at, initramfs::Entry::File { mode: 0o755, bytes }));
    }
    let mut order = String::new();
    for (name, bytes) in &kernel.modules {
        order.push_str(name);
        order.push('\n');
        entries.push((
            format!("lib/modules/muscle/{name}.ko"),
            initramfs::Entry::File {
                mode: 0o644,
                bytes: bytes.clone(),
            },
        ));
    }
    entries.push((
        "lib/modules/muscle/order".into(),
        initramfs::Entry::File {
            mode: 0o644,
            bytes: order.into_bytes(),
        },
    ));
    let identity = ImageIdentity {
        name: manifest.name.clone(),
        version: manifest.version.clone(),
        target: Name::parse(&target.triple)?,
    };
    entries.push((
        IDENTITY_FILE.trim_start_matches('/').into(),
        initramfs::Entry::File {
            mode: 0o644,
            bytes: serde_json::to_vec(&identity)?,
        },
    ));
    let mtime = u32::try_from(manifest.source_date_epoch).unwrap_or(u32::MAX);
    let initrd = initramfs::build(entries, mtime)?;
    let dir = staging.join(&target.triple);
    std::fs::create_dir_all(&dir)?;
    let write = |file: &str, bytes: &[u8]| -> Result<ImageFile> {
        std::fs::write(dir.join(file), bytes)?;
        Ok(ImageFile {
            sha256: muscle_protocol::sha256_hex(bytes),
            size: bytes.len() as u64,
        })
    };
    Ok(TargetImage {
        arch: image_arch,
        kernel: KernelPackage {
            package: kernel.package,
            version: kernel.version,
            deb_sha256: kernel.deb_sha256,
        },
        vmlinuz: write(KERNEL_FILE, &kernel.vmlinuz)?,
        initramfs: write(INITRAMFS_FILE, &initrd)?,
        binaries: sums,
        modules: kernel
            .modules
            .into_iter()
            .map(|(n, _)| Name::parse(&n))
            .collect::<std::result::Result<_, _>>()?,
    })
}
