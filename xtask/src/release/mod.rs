//! `cargo xtask release`: static cross-builds, verified by object inspection, with checksums, a
//! manifest and an optional signature.

pub mod build;
mod debuginfo;
mod dist;

pub use debuginfo::rust_objcopy;
pub mod workspace;

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;

use crate::targets::{self, TargetSpec};
use crate::util;

#[derive(Args, Debug, Clone, Default)]
pub struct ReleaseArgs {
    /// The workspace to release (default: the current one).
    #[arg(long)]
    pub manifest_path: Option<PathBuf>,
    /// Target triple to build for (repeatable; default: every file in targets/).
    #[arg(long = "target")]
    pub targets: Vec<String>,
    /// Package whose binaries to release (repeatable; default: every package but xtask).
    #[arg(long = "package", short = 'p')]
    pub packages: Vec<String>,
    /// Binary to release (repeatable; default: every binary of the selected packages).
    #[arg(long = "bin")]
    pub bins: Vec<String>,
    /// Cargo features to enable (comma-separated, as cargo takes them).
    #[arg(long)]
    pub features: Option<String>,
    /// Where `<app>-<version>/` is written (default: `<workspace>/dist`).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Sign manifest.json with this ed25519 key file (see `muscle-deploy keygen`).
    #[arg(long)]
    pub sign: Option<PathBuf>,
    /// How agents run the app (TOML or JSON), put in the signed manifest: agents that pin keys
    /// run only this. Default: `[package.metadata.muscle] service = "FILE"` of the released
    /// package, relative to its Cargo.toml.
    #[arg(long)]
    pub service: Option<PathBuf>,
    /// Release counter (default: SOURCE_DATE_EPOCH); agents refuse a counter below one they accepted.
    #[arg(long)]
    pub counter: Option<u64>,
    /// Manifest expiry, from the build time (e.g. `30d` is not supported: use hours, `720h`).
    #[arg(long, value_parser = muscle_protocol::duration::parse)]
    pub expires_in: Option<std::time::Duration>,
    /// `native` (rustup toolchain + targets/ linker, default) or `cross` (needs a container engine).
    #[arg(long, default_value = "native")]
    pub builder: String,
    /// Print the manifest as JSON on stdout instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Print where the time went on stderr, as one JSON line `timings: {...}` (seconds).
    #[arg(long)]
    pub timings: bool,
    /// Publish the release to the deployer at this URL once written (`muscle-deploy --server
    /// URL publish`), with the token in $MUSCLE_TOKEN: a publisher's or an operator's.
    #[arg(long, value_name = "URL")]
    pub publish: Option<String>,
}

/// Where a release's time went, in seconds: `cargo xtask bench` reports it beside a plain cargo
/// build. `cargo` is the cargo runs (one per target and profile); the rest is our own work.
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct Timings {
    /// `cargo metadata` and choosing the binaries.
    pub workspace: f64,
    /// git and `rustc -vV`.
    pub provenance: f64,
    pub cargo: f64,
    /// Splitting debug info off and inspecting each binary twice (as built, as shipped).
    pub inspect: f64,
    /// Copying, hashing, manifest, checksums and signature.
    pub dist: f64,
    pub total: f64,
}

/// One binary built for one target, verified and ready to be copied into the release.
pub struct Built {
    pub target: TargetSpec,
    pub binary: muscle_protocol::Name,
    /// The stripped binary that ships.
    pub path: PathBuf,
    /// Its debug info, split off into `<binary>.debug`, when the build had any.
    pub debug: Option<PathBuf>,
    pub facts: muscle_inspect::ElfFacts,
    pub verdict: muscle_inspect::Verdict,
}

pub fn run(args: ReleaseArgs) -> Result<i32> {
    let started = Instant::now();
    let mut timings = Timings::default();
    let mut lap = {
        let mut last = Instant::now();
        move || {
            let now = Instant::now();
            let took = now.duration_since(last).as_secs_f64();
            last = now;
            took
        }
    };
    check_builder(&args.builder)?;
    let all = targets::load_all(&util::muscle_root().join("targets"))?;
    let targets = targets::select(&all, &args.targets)?;
    let ws = workspace::Workspace::load(args.manifest_path.as_deref(), &args.packages, &args.bins)?;
    timings.workspace = lap();
    let provenance = workspace::Provenance::read(&ws)?;
    timings.provenance = lap();
    let quiet = args.json;
    if !quiet {
        eprintln!(
            "releasing {} {} ({} binaries) for {}",
            ws.app,
            ws.version,
            ws.bins.len(),
            targets
                .iter()
                .map(|t| t.triple.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    let service = match args.service.as_deref().or(ws.service.as_deref()) {
        Some(path) => Some(read_service(path, &ws)?),
        None => None,
    };
    let built = build::build_all(&ws, &targets, &provenance, &args, quiet, &mut timings)?;
    lap();
    let failed: Vec<_> = built.iter().filter(|b| !b.verdict.passed()).collect();
    if !quiet {
        eprint!("{}", dist::summary_table(&built));
    }
    if !failed.is_empty() {
        for b in &failed {
            eprintln!(
                "error: {} for {} failed verification: {}",
                b.binary,
                b.target.triple,
                b.verdict.failure_summary()
            );
        }
        bail!(
            "release refused: {} binaries failed verification",
            failed.len()
        );
    }
    let out = args.out.clone().unwrap_or_else(|| ws.root.join("dist"));
    let release = dist::write(&out, &ws, &provenance, &built, service, &args)?;
    timings.dist = lap();
    timings.total = started.elapsed().as_secs_f64();
    if args.timings {
        eprintln!("timings: {}", serde_json::to_string(&timings)?);
    }
    if args.json {
        let manifest = std::fs::read_to_string(release.dir.join("manifest.json"))?;
        println!("{}", manifest.trim_end());
    } else {
        eprintln!("wrote {}", release.dir.display());
    }
    if let Some(url) = &args.publish {
        publish(url, &release.dir)?;
    }
    Ok(0)
}

/// Uploads the release with the deployer's own client, built from this workspace (it is the one
/// client of the API; the deployer re-checks everything it receives).
fn publish(url: &str, release: &std::path::Path) -> Result<()> {
    let deployer = muscle_e2e::host_deployer(false)?;
    let out = std::process::Command::new(&deployer)
        .arg("--server")
        .arg(url)
        .arg("publish")
        .arg(release)
        .stdin(std::process::Stdio::null())
        .output()
        .with_context(|| format!("cannot run {}", deployer.display()))?;
    let said = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "publishing {} to {url} failed: {}",
            release.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    eprintln!("{} ({url})", said.trim());
    Ok(())
}

/// The spec to sign into the manifest; the binary it runs must be one this release ships.
fn read_service(
    path: &std::path::Path,
    ws: &workspace::Workspace,
) -> Result<muscle_protocol::ServiceSpec> {
    let spec = muscle_protocol::ServiceSpec::read_file(path)?;
    let binary = spec.binary_name(&ws.app);
    if !ws.bins.iter().any(|b| b.name == binary) {
        let shipped: Vec<&str> = ws.bins.iter().map(|b| b.name.as_str()).collect();
        bail!(
            "{}: runs binary {binary:?}, which this release does not ship (it ships {}); set `binary` in the spec",
            path.display(),
            shipped.join(", ")
        );
    }
    Ok(spec)
}

fn check_builder(builder: &str) -> Result<()> {
    let checked: Result<()> = match builder {
        "native" => Ok(()),
        "cross" => {
            if !util::have("cross") {
                bail!("--builder cross: `cross` is not installed (cargo install cross); the default --builder native needs no container");
            }
            let engine = ["docker", "podman"].into_iter().find(|e| {
                util::have(e) && util::output(std::process::Command::new(e).arg("info")).is_ok()
            });
            if engine.is_none() {
                bail!("--builder cross needs a running container engine (docker or podman), and none answers `info` here; use --builder native (the default), which needs no container");
            }
            Ok(())
        }
        other => Err(anyhow::anyhow!(
            "unknown --builder {other:?}: expected `native` or `cross`"
        )),
    };
    checked.context("choosing the builder")
}
