//! What is being released: the workspace, its binaries, and the provenance of the build.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use cargo_metadata::{Metadata, MetadataCommand, TargetKind};

use muscle_protocol::Name;

use crate::util;

pub struct Workspace {
    pub root: PathBuf,
    pub manifest_path: PathBuf,
    pub target_dir: PathBuf,
    /// The release's name: the package's when one is released, else the workspace's.
    pub app: Name,
    pub version: Name,
    /// (package, binary) pairs to build.
    pub bins: Vec<Bin>,
    /// How many packages the build compiles, for progress bars.
    pub unit_count: u64,
    /// The service spec the released package names (`[package.metadata.muscle] service`).
    pub service: Option<PathBuf>,
}

impl Workspace {
    pub fn load(
        manifest_path: Option<&Path>,
        packages: &[String],
        bins: &[String],
    ) -> Result<Workspace> {
        let mut cmd = MetadataCommand::new();
        if let Some(path) = manifest_path {
            cmd.manifest_path(path);
        }
        let meta = cmd
            .exec()
            .context("cannot read the workspace with `cargo metadata`")?;
        let selected = select_bins(&meta, packages, bins)?;
        let released: Vec<_> = meta
            .workspace_packages()
            .into_iter()
            .filter(|p| selected.iter().any(|b| b.package == p.name.as_str()))
            .collect();
        let service = match released.as_slice() {
            [one] => one.metadata["muscle"]["service"].as_str().map(|file| {
                one.manifest_path
                    .parent()
                    .expect("a manifest is in a directory")
                    .join(file)
                    .into_std_path_buf()
            }),
            _ => None,
        };
        let (app, version) = match released.as_slice() {
            [one] => (one.name.to_string(), one.version.to_string()),
            many => {
                let app = meta.workspace_metadata["muscle"]["app"]
                    .as_str()
                    .map(str::to_owned)
                    .or_else(|| meta.root_package().map(|p| p.name.to_string()))
                    .or_else(|| meta.workspace_root.file_name().map(str::to_owned))
                    .unwrap_or_else(|| "release".into());
                let version = meta
                    .root_package()
                    .or(many.first().copied())
                    .map(|p| p.version.to_string())
                    .unwrap_or_default();
                (app, version)
            }
        };
        let name = |what: &str, value: &str| {
            Name::parse(value).with_context(|| {
                format!(
                    "the release's {what} {value:?} cannot name a release (agents use it in paths)"
                )
            })
        };
        let (app, version) = (name("app name", &app)?, name("version", &version)?);
        let unit_count = meta
            .resolve
            .as_ref()
            .map_or(1, |r| r.nodes.len() as u64)
            .max(1);
        Ok(Workspace {
            root: meta.workspace_root.clone().into_std_path_buf(),
            manifest_path: meta.workspace_root.join("Cargo.toml").into_std_path_buf(),
            target_dir: meta.target_directory.clone().into_std_path_buf(),
            app,
            version,
            bins: selected,
            unit_count,
            service,
        })
    }
}

/// One binary to release, and the cargo profile its package asks for.
#[derive(Debug, Clone)]
pub struct Bin {
    pub package: String,
    pub name: Name,
    /// `[package.metadata.muscle] profile = "..."`, default `release`.
    pub profile: String,
}

fn select_bins(meta: &Metadata, packages: &[String], bins: &[String]) -> Result<Vec<Bin>> {
    let members = meta.workspace_packages();
    for wanted in packages {
        if !members.iter().any(|p| p.name.as_str() == wanted) {
            let names: Vec<_> = members.iter().map(|p| p.name.as_str()).collect();
            bail!(
                "--package {wanted:?} is not a member of the workspace: expected one of {}",
                names.join(", ")
            );
        }
    }
    let mut selected = Vec::new();
    for pkg in members {
        // xtask is tooling, not a product; it is released only when asked for by name.
        let pkg_wanted = if packages.is_empty() {
            !bins.is_empty() || pkg.name.as_str() != "xtask"
        } else {
            packages.iter().any(|p| p == pkg.name.as_str())
        };
        let profile = pkg.metadata["muscle"]["profile"]
            .as_str()
            .unwrap_or("release");
        for target in pkg.targets.iter().filter(|t| t.is_kind(TargetKind::Bin)) {
            let bin_wanted = bins.is_empty() || bins.contains(&target.name);
            if pkg_wanted && bin_wanted {
                selected.push(Bin {
                    package: pkg.name.to_string(),
                    name: Name::parse(&target.name).with_context(|| {
                        format!(
                            "binary {:?} of {} cannot be released",
                            target.name, pkg.name
                        )
                    })?,
                    profile: profile.to_owned(),
                });
            }
        }
    }
    for wanted in bins {
        if !selected.iter().any(|b| b.name == wanted.as_str()) {
            bail!("--bin {wanted:?}: no binary target of that name in the selected packages");
        }
    }
    if selected.is_empty() {
        bail!("nothing to release: the selected packages have no binary targets");
    }
    Ok(selected)
}

/// Where a build came from, recorded in the manifest.
pub struct Provenance {
    pub git_commit: Option<String>,
    pub rustc: String,
    pub cargo_lock_sha256: Option<String>,
    pub source_date_epoch: u64,
}

impl Provenance {
    pub fn read(ws: &Workspace) -> Result<Provenance> {
        let git = |args: &[&str]| {
            util::output(Command::new("git").arg("-C").arg(&ws.root).args(args))
                .ok()
                .map(|s| s.trim().to_owned())
                .filter(|s| !s.is_empty())
        };
        let git_commit = git(&["rev-parse", "HEAD"]);
        let source_date_epoch = match std::env::var("SOURCE_DATE_EPOCH") {
            Ok(v) => v.trim().parse().with_context(|| {
                format!("SOURCE_DATE_EPOCH={v:?} is not a Unix time in seconds")
            })?,
            // The commit time: the same commit always builds with the same timestamp.
            Err(_) => git(&["log", "-1", "--format=%ct"])
                .and_then(|s| s.parse().ok())
                .unwrap_or(0),
        };
        let lock = ws.root.join("Cargo.lock");
        let cargo_lock_sha256 = std::fs::read(&lock)
            .ok()
            .map(|b| muscle_protocol::sha256_hex(&b));
        Ok(Provenance {
            git_commit,
            rustc: util::output(Command::new("rustc").arg("-vV"))?
                .trim()
                .to_owned(),
            cargo_lock_sha256,
            source_date_epoch,
        })
    }
}
