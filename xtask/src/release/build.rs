//! Running cargo once per target with the target's linker and C compiler, and following its JSON
//! messages to drive a progress bar and collect the executables.

use std::ffi::OsString;
use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use cargo_metadata::Message;
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

use muscle_protocol::Name;

use super::debuginfo;
use super::workspace::{Bin, Provenance, Workspace};
use super::{Built, ReleaseArgs};
use crate::targets::TargetSpec;

pub fn build_all(
    ws: &Workspace,
    targets: &[TargetSpec],
    provenance: &Provenance,
    args: &ReleaseArgs,
    quiet: bool,
    timings: &mut super::Timings,
) -> Result<Vec<Built>> {
    let multi = MultiProgress::new();
    let on_terminal = std::io::IsTerminal::is_terminal(&std::io::stderr()) && !quiet;
    if !on_terminal {
        multi.set_draw_target(ProgressDrawTarget::hidden());
    }
    let style = ProgressStyle::with_template("{prefix:>28} [{bar:30}] {pos}/{len} {wide_msg}")
        .expect("the template is valid")
        .progress_chars("=> ");
    let bars: Vec<ProgressBar> = targets
        .iter()
        .map(|t| {
            let bar = multi.add(ProgressBar::new(ws.unit_count));
            bar.set_style(style.clone());
            bar.set_prefix(t.triple.clone());
            bar.set_message("waiting");
            bar
        })
        .collect();
    let mut built = Vec::new();
    for (target, bar) in targets.iter().zip(&bars) {
        let started = Instant::now();
        if !on_terminal && !quiet {
            eprintln!("[{}] building {} binaries", target.triple, ws.bins.len());
        }
        let exes = build_target(ws, target, provenance, args, bar)?;
        timings.cargo += started.elapsed().as_secs_f64();
        bar.finish_with_message(format!("done in {:.0?}", started.elapsed()));
        if !on_terminal && !quiet {
            eprintln!("[{}] built in {:.1?}", target.triple, started.elapsed());
        }
        let inspecting = Instant::now();
        for (binary, path) in exes {
            built.push(inspect(ws, target, binary, path)?);
        }
        timings.inspect += inspecting.elapsed().as_secs_f64();
    }
    Ok(built)
}

/// Splits off the debug info of a freshly built `exe` and inspects what will ship.
fn inspect(ws: &Workspace, target: &TargetSpec, binary: Name, exe: PathBuf) -> Result<Built> {
    let facts_of = |path: &Path| {
        muscle_inspect::inspect_file(path).map_err(|e| anyhow::anyhow!(e.in_file(path)))
    };
    let built = facts_of(&exe)?;
    // One folder per release: two releases sharing a target dir must not swap binaries.
    let dir = ws
        .target_dir
        .join("muscle-release")
        .join(format!("{}-{}", ws.app, ws.version))
        .join(&target.triple);
    let split = debuginfo::split(&target.objcopy()?, &exe, &built, &dir, &binary)?;
    let facts = facts_of(&split.shipped)?;
    let verdict = muscle_inspect::verify(&facts, &target.expectation());
    Ok(Built {
        target: target.clone(),
        binary,
        path: split.shipped,
        debug: split.debug,
        facts,
        verdict,
    })
}

/// Builds every selected binary for one target; returns (binary name, executable path) pairs.
fn build_target(
    ws: &Workspace,
    target: &TargetSpec,
    provenance: &Provenance,
    args: &ReleaseArgs,
    bar: &ProgressBar,
) -> Result<Vec<(Name, PathBuf)>> {
    // One cargo run per profile: a package may ask for its own (the agent's is size-optimised).
    let mut profiles: Vec<&str> = ws.bins.iter().map(|b| b.profile.as_str()).collect();
    profiles.sort();
    profiles.dedup();
    let mut exes = Vec::new();
    for profile in profiles {
        let bins: Vec<&Bin> = ws.bins.iter().filter(|b| b.profile == profile).collect();
        let cmd = cargo_command(ws, target, provenance, args, profile, &bins)?;
        exes.extend(run_cargo(cmd, ws, target, bar)?);
    }
    Ok(exes)
}

/// Runs one cargo build, following its JSON messages; returns (binary, executable) pairs.
fn run_cargo(
    mut cmd: Command,
    ws: &Workspace,
    target: &TargetSpec,
    bar: &ProgressBar,
) -> Result<Vec<(Name, PathBuf)>> {
    let mut child = cmd
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot start {}", crate::util::describe(&cmd)))?;
    let stdout = child.stdout.take().expect("stdout is piped");
    let mut exes = Vec::new();
    let mut last_line = Instant::now();
    for message in Message::parse_stream(BufReader::new(stdout)) {
        if let Message::CompilerArtifact(artifact) =
            message.context("reading cargo's JSON messages")?
        {
            bar.inc(1);
            bar.set_message(format!(
                "{} {}",
                artifact.target.name,
                if artifact.fresh { "(fresh)" } else { "" }
            ));
            if bar.is_hidden() && last_line.elapsed() > Duration::from_secs(10) {
                eprintln!(
                    "[{}] compiled {} ({} units)",
                    target.triple,
                    artifact.target.name,
                    bar.position()
                );
                last_line = Instant::now();
            }
            if let Some(exe) = artifact.executable {
                if let Some(bin) = ws.bins.iter().find(|b| b.name == *artifact.target.name) {
                    exes.push((bin.name.clone(), exe.into_std_path_buf()));
                }
            }
        }
    }
    let status = child.wait()?;
    if !status.success() {
        bail!(
            "building for {} failed ({status}); the compiler's messages are above.\n\
             hint: `cargo xtask setup` installs the rustup target and the C compiler it needs",
            target.triple,
        );
    }
    Ok(exes)
}

fn cargo_command(
    ws: &Workspace,
    target: &TargetSpec,
    provenance: &Provenance,
    args: &ReleaseArgs,
    profile: &str,
    bins: &[&Bin],
) -> Result<Command> {
    let program = if args.builder == "cross" {
        "cross"
    } else {
        "cargo"
    };
    let mut cmd = Command::new(program);
    muscle_e2e::without_cargo_run_env(&mut cmd);
    cmd.arg("build")
        .args(["--profile", profile])
        .arg("--locked")
        .args(["--target", &target.triple])
        .arg("--manifest-path")
        .arg(&ws.manifest_path)
        .arg("--message-format=json-render-diagnostics")
        // Cargo's status lines would tear through the progress bars; compiler errors still show.
        .arg("--quiet");
    let mut packages: Vec<&str> = bins.iter().map(|b| b.package.as_str()).collect();
    packages.dedup();
    for p in packages {
        cmd.args(["--package", p]);
    }
    for bin in bins {
        cmd.args(["--bin", &bin.name]);
    }
    if let Some(features) = &args.features {
        cmd.args(["--features", features]);
    }
    if args.builder == "cross" {
        // cross brings the target's linker and C compiler in its image: only our remapping and
        // timestamp go along (the targets/ flags are for the native toolchain).
        cmd.env("CARGO_ENCODED_RUSTFLAGS", remap_flags(ws).join("\x1f"))
            .env(
                "SOURCE_DATE_EPOCH",
                provenance.source_date_epoch.to_string(),
            );
    } else {
        apply_target_env(&mut cmd, &target_env(ws, target, provenance)?);
    }
    Ok(cmd)
}

/// The environment that makes cargo build `target` the way a release does: the target's linker
/// and C compiler, our flags only, and a fixed SOURCE_DATE_EPOCH. Also used by the benchmark's
/// plain-cargo baseline, so both share one warm cache. A stray `RUSTFLAGS` in someone's shell must
/// not change a release: callers remove it (see [`apply_target_env`]).
pub fn target_env(
    ws: &Workspace,
    target: &TargetSpec,
    provenance: &Provenance,
) -> Result<Vec<(String, OsString)>> {
    let (cc, ar) = target.c_programs()?;
    let c_key = target.triple.replace('-', "_");
    Ok(vec![
        (
            format!("CARGO_TARGET_{}_LINKER", target.env_key()),
            target.linker.clone().into(),
        ),
        (
            "CARGO_ENCODED_RUSTFLAGS".into(),
            rustflags(ws, target).join("\x1f").into(),
        ),
        (
            "SOURCE_DATE_EPOCH".into(),
            provenance.source_date_epoch.to_string().into(),
        ),
        (format!("CC_{c_key}"), cc.into()),
        (format!("AR_{c_key}"), ar.into()),
        (
            format!("CFLAGS_{c_key}"),
            c_prefix_maps(ws).join(" ").into(),
        ),
    ])
}

/// The C counterpart of our `--remap-path-prefix` flags, so that C built with debug info (or
/// `__FILE__`) does not carry the paths of this checkout. cc-rs splits CFLAGS on spaces: a path
/// with one is left unmapped rather than breaking the build.
fn c_prefix_maps(ws: &Workspace) -> Vec<String> {
    prefix_maps(ws)
        .into_iter()
        .filter(|(from, _)| !from.to_string_lossy().contains(char::is_whitespace))
        .map(|(from, to)| format!("-ffile-prefix-map={}={to}", from.display()))
        .collect()
}

/// Sets [`target_env`] on `cmd` and removes `RUSTFLAGS`, which would override it.
pub fn apply_target_env(cmd: &mut Command, env: &[(String, OsString)]) {
    cmd.envs(env.iter().map(|(k, v)| (k, v)))
        .env_remove("RUSTFLAGS");
}

/// The target's flags plus path remapping, so that builds from two checkouts are byte-identical.
fn rustflags(ws: &Workspace, target: &TargetSpec) -> Vec<String> {
    let mut flags = target.rustflags.clone();
    flags.extend(remap_flags(ws));
    flags
}

/// `--remap-path-prefix` for the checkout, the target dir, and the cargo and rustup homes.
fn remap_flags(ws: &Workspace) -> Vec<String> {
    prefix_maps(ws)
        .into_iter()
        .map(|(from, to)| format!("--remap-path-prefix={}={to}", from.display()))
        .collect()
}

/// (local path, path written in binaries) pairs. rustc lets the last matching remap win, so
/// the more specific target dir comes after the root.
fn prefix_maps(ws: &Workspace) -> Vec<(PathBuf, &'static str)> {
    let mut maps = vec![
        (ws.root.clone(), "/build"),
        (ws.target_dir.clone(), "/target"),
    ];
    if let Some(home) = cargo_home() {
        maps.push((home, "/cargo"));
    }
    let rustup = std::env::var_os("RUSTUP_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".rustup")));
    if let Some(rustup) = rustup {
        maps.push((rustup, "/rustup"));
    }
    maps
}

fn cargo_home() -> Option<PathBuf> {
    std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
}
