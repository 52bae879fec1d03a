//! Building what the fleet runs, through the same `cargo xtask release` users run.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use anyhow::{bail, Context, Result};

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ is one level below the root")
        .to_owned()
}

/// Cargo's target directory for this workspace, as cargo itself says (`CARGO_TARGET_DIR`,
/// `build.target-dir` in a config file, or `<root>/target`). Asked once per process.
pub fn target_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let asked = || -> Result<PathBuf> {
            let out = cargo()
                .args([
                    "metadata",
                    "--format-version",
                    "1",
                    "--no-deps",
                    "--offline",
                ])
                .output()?;
            if !out.status.success() {
                bail!("{}", String::from_utf8_lossy(&out.stderr).trim());
            }
            let meta: serde_json::Value = serde_json::from_slice(&out.stdout)?;
            meta["target_directory"]
                .as_str()
                .map(PathBuf::from)
                .context("`cargo metadata` printed no target_directory")
        };
        asked().unwrap_or_else(|e| {
            let fallback = workspace_root().join("target");
            eprintln!(
                "cannot ask cargo for its target directory ({e:#}); using {}",
                fallback.display()
            );
            fallback
        })
    })
}

/// A release directory and its binaries.
#[derive(Debug, Clone)]
pub struct Artifacts {
    pub dir: PathBuf,
}

impl Artifacts {
    pub fn binary(&self, triple: &str, name: &str) -> PathBuf {
        self.dir.join(triple).join(name)
    }
}

fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.current_dir(workspace_root());
    without_cargo_run_env(&mut cmd);
    cmd
}

/// Removes what cargo sets for the program it runs (`CARGO_PKG_NAME`, `CARGO_MANIFEST_DIR`,
/// `OUT_DIR`, ...) from a cargo command started by such a program (`cargo xtask`, a test).
/// Build scripts may ask to rerun when those change (ring's do): a cargo started from a test
/// and one started from a shell would each rebuild ring and everything above it, replacing
/// the other's binaries (among them the running xtask's own).
pub fn without_cargo_run_env(cmd: &mut Command) -> &mut Command {
    for (key, _) in std::env::vars_os() {
        let Some(key) = key.to_str() else { continue };
        let set_by_cargo_run = key.starts_with("CARGO_PKG_")
            || key.starts_with("CARGO_MANIFEST_")
            || key.starts_with("CARGO_BIN_")
            || matches!(
                key,
                "CARGO_CRATE_NAME" | "CARGO_PRIMARY_PACKAGE" | "CARGO_TARGET_TMPDIR" | "OUT_DIR"
            );
        if set_by_cargo_run {
            cmd.env_remove(key);
        }
    }
    cmd
}

fn run(cmd: &mut Command) -> Result<()> {
    let out = cmd
        .output()
        .with_context(|| format!("cannot start {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}):\n{}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// `cargo xtask ARGS…` in this workspace; its output, whatever the exit status.
pub fn xtask(args: &[&str]) -> Result<std::process::Output> {
    let mut cmd = cargo();
    cmd.args(["run", "--quiet", "--package", "xtask", "--"])
        .args(args);
    cmd.output()
        .with_context(|| format!("cannot start {cmd:?}"))
}

/// The xtask binary, built once per process, to run with an environment of the test's own
/// (`cargo run` would pass that environment to cargo too).
pub fn xtask_binary() -> Result<PathBuf> {
    static BUILT: OnceLock<Result<(), String>> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            run(cargo().args(["build", "--quiet", "--package", "xtask"]))
                .map_err(|e| format!("{e:#}"))
        })
        .clone()
        .map_err(anyhow::Error::msg)?;
    Ok(target_dir().join("debug/xtask"))
}

/// The source of a published crate, as crates.io serves it (`.crate`, with its Cargo.lock),
/// fetched by cargo and unpacked into `into/<name>-<version>`. Nothing but cargo touches the
/// network.
pub fn fetch_crate(name: &str, version: &str, into: &Path) -> Result<PathBuf> {
    let dir = into.join(format!("{name}-{version}"));
    if dir.join("Cargo.lock").is_file() {
        return Ok(dir);
    }
    let probe = into.join(format!(".fetch-{name}-{version}"));
    std::fs::create_dir_all(probe.join("src"))?;
    std::fs::write(
        probe.join("Cargo.toml"),
        format!("[package]\nname = \"fetch-probe\"\nversion = \"0.0.0\"\nedition = \"2021\"\n\n[dependencies]\n{name} = \"={version}\"\n\n[workspace]\n"),
    )?;
    std::fs::write(probe.join("src/lib.rs"), "")?;
    run(cargo()
        .args(["fetch", "--quiet", "--manifest-path"])
        .arg(probe.join("Cargo.toml")))?;
    let home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .context("neither CARGO_HOME nor HOME is set")?;
    let file = format!("{name}-{version}.crate");
    let cached = std::fs::read_dir(home.join("registry/cache"))?
        .flatten()
        .map(|registry| registry.path().join(&file))
        .find(|p| p.is_file())
        .with_context(|| format!("cargo fetched no {file}"))?;
    // Unpacked beside, then renamed into place: an interrupted unpack is never taken for a
    // complete one.
    let unpacking = into.join(format!(".unpack-{name}-{version}-{}", std::process::id()));
    std::fs::create_dir_all(&unpacking)?;
    run(Command::new("tar")
        .arg("xzf")
        .arg(&cached)
        .arg("-C")
        .arg(&unpacking))?;
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::rename(unpacking.join(format!("{name}-{version}")), &dir)?;
    let _ = std::fs::remove_dir_all(&unpacking);
    let _ = std::fs::remove_dir_all(&probe);
    Ok(dir)
}

/// `cargo xtask release` with `args`; returns the release directory it wrote into `out`.
pub fn xtask_release(args: &[&str], out: &Path) -> Result<Artifacts> {
    let out_dir = out.to_str().context("non-UTF-8 path")?;
    let output = xtask(&[&["release", "--json", "--out", out_dir], args].concat())?;
    if !output.status.success() {
        bail!(
            "cargo xtask release {args:?} failed ({}):\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let manifest: serde_json::Value = serde_json::from_slice(&output.stdout)
        .context("`xtask release --json` printed no manifest")?;
    let name = format!(
        "{}-{}",
        manifest["app"].as_str().unwrap_or_default(),
        manifest["version"].as_str().unwrap_or_default()
    );
    Ok(Artifacts {
        dir: out.join(name),
    })
}

/// The deployer built for this host (it is not deployed to the fleet, it drives it): a debug
/// build for tests and the demo, an optimised one for benchmarks.
pub fn host_deployer(optimised: bool) -> Result<PathBuf> {
    let mut cmd = cargo();
    cmd.args(["build", "--quiet", "--package", "muscle-deploy"]);
    if optimised {
        cmd.arg("--release");
    }
    run(&mut cmd)?;
    let path = target_dir().join(if optimised {
        "release/muscle-deploy"
    } else {
        "debug/muscle-deploy"
    });
    path.exists()
        .then_some(path.clone())
        .with_context(|| format!("{} was not built", path.display()))
}

/// The agent released for all four architectures.
pub fn release_agents(out: &Path) -> Result<Artifacts> {
    let mut args = vec!["--package", "muscle-agent"];
    args.extend(crate::target_args(&crate::ALL_TARGETS));
    xtask_release(&args, out)
}

/// One version of hello-service to release.
#[derive(Debug, Clone, Copy)]
pub struct HelloVersion<'a> {
    pub version: &'a str,
    /// Built with the `unhealthy` feature: its health check always fails.
    pub unhealthy: bool,
}

/// Releases hello-service as `version` for all four architectures from a scratch workspace: a copy of
/// `examples/hello-service` with its version bumped, released with `--manifest-path` the way a
/// user releases their own project.
pub fn release_hello(v: HelloVersion, out: &Path) -> Result<Artifacts> {
    release_hello_with(v, out, "", &crate::target_args(&crate::ALL_TARGETS))
}

/// Like [`release_hello`], with `extra_toml` appended to the copy's Cargo.toml (a profile, say)
/// and `extra_args` passed to `cargo xtask release` (targets, say).
pub fn release_hello_with(
    v: HelloVersion,
    out: &Path,
    extra_toml: &str,
    extra_args: &[&str],
) -> Result<Artifacts> {
    let src = workspace_root().join("examples/hello-service");
    let scratch = out.join("src").join(format!("hello-service-{}", v.version));
    let _ = std::fs::remove_dir_all(&scratch);
    std::fs::create_dir_all(scratch.join("src"))?;
    std::fs::copy(src.join("src/main.rs"), scratch.join("src/main.rs"))?;
    std::fs::copy(src.join("service.toml"), scratch.join("service.toml"))?;
    let manifest = std::fs::read_to_string(src.join("Cargo.toml"))?;
    let bumped = manifest.replacen(
        "version = \"0.1.0\"",
        &format!("version = \"{}\"", v.version),
        1,
    );
    if bumped == manifest && v.version != "0.1.0" {
        bail!("examples/hello-service/Cargo.toml no longer says version = \"0.1.0\"; update the harness");
    }
    // An empty [workspace] makes the copy its own workspace, outside ours.
    std::fs::write(
        scratch.join("Cargo.toml"),
        format!("{bumped}\n[workspace]\n{extra_toml}"),
    )?;
    run(cargo()
        .args(["generate-lockfile", "--offline", "--manifest-path"])
        .arg(scratch.join("Cargo.toml")))?;
    let manifest_path = scratch.join("Cargo.toml");
    let mut args = vec![
        "--manifest-path",
        manifest_path.to_str().context("non-UTF-8 path")?,
    ];
    if v.unhealthy {
        args.extend(["--features", "unhealthy"]);
    }
    args.extend(extra_args);
    xtask_release(&args, out)
}

/// The agent of this commit released as `version`: a clone of the repository with the
/// workspace version bumped, released with `--manifest-path` (what a real new agent release is).
pub fn release_agent_version(version: &str, out: &Path) -> Result<Artifacts> {
    let clone = out.join("src").join(format!("muscle-{version}"));
    let _ = std::fs::remove_dir_all(&clone);
    run(Command::new("git")
        .args(["clone", "--quiet", "--no-hardlinks"])
        .arg(workspace_root())
        .arg(&clone))?;
    let manifest = clone.join("Cargo.toml");
    let text = std::fs::read_to_string(&manifest)?;
    let current = format!(
        "[workspace.package]\nversion = \"{}\"",
        env!("CARGO_PKG_VERSION")
    );
    if !text.contains(&current) {
        bail!("{} has no `{current}` to bump", manifest.display());
    }
    std::fs::write(
        &manifest,
        text.replace(
            &current,
            &format!("[workspace.package]\nversion = \"{version}\""),
        ),
    )?;
    run(cargo()
        .args(["update", "--workspace", "--offline", "--manifest-path"])
        .arg(&manifest))?;
    xtask_release(
        &[
            "--manifest-path",
            manifest.to_str().context("non-UTF-8 path")?,
            "--package",
            "muscle-agent",
        ],
        out,
    )
}

/// A "muscle-agent" release whose binary exits at once: a broken agent update.
pub fn release_broken_agent(version: &str, out: &Path) -> Result<Artifacts> {
    release_fake_agent(
        version,
        "eprintln!(\"broken agent: exiting at once\");\n    std::process::exit(3);",
        out,
    )
}

/// A "muscle-agent" release whose binary exits 0 whatever it is asked, without contacting
/// anyone: a probe that claims success.
pub fn release_lying_agent(version: &str, out: &Path) -> Result<Artifacts> {
    release_fake_agent(version, "std::process::exit(0);", out)
}

/// A "muscle-agent" release of a program whose `main` is `body`.
fn release_fake_agent(version: &str, body: &str, out: &Path) -> Result<Artifacts> {
    let scratch = out.join("src").join(format!("fake-agent-{version}"));
    let _ = std::fs::remove_dir_all(&scratch);
    std::fs::create_dir_all(scratch.join("src"))?;
    std::fs::write(
        scratch.join("Cargo.toml"),
        format!("[package]\nname = \"muscle-agent\"\nversion = \"{version}\"\nedition = \"2021\"\n\n[workspace]\n\n[profile.release]\nstrip = true\n"),
    )?;
    std::fs::write(
        scratch.join("src/main.rs"),
        format!("fn main() {{\n    {body}\n}}\n"),
    )?;
    run(cargo()
        .args(["generate-lockfile", "--offline", "--manifest-path"])
        .arg(scratch.join("Cargo.toml")))?;
    xtask_release(
        &[
            "--manifest-path",
            scratch
                .join("Cargo.toml")
                .to_str()
                .context("non-UTF-8 path")?,
        ],
        out,
    )
}

/// `cargo xtask image` for `targets` into `out`, with `extra` arguments (`--version`,
/// `--agent`); returns the image directory (`out/muscle-image-<version>`).
pub fn xtask_image(targets: &[(&str, &str)], out: &Path, extra: &[&str]) -> Result<PathBuf> {
    let out_dir = out.to_str().context("non-UTF-8 path")?;
    let mut args = vec!["image", "--out", out_dir];
    args.extend(crate::target_args(targets));
    args.extend(extra);
    let output = xtask(&args)?;
    if !output.status.success() {
        bail!(
            "cargo xtask image failed ({}):\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let dir = std::fs::read_dir(out)?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("muscle-image-"))
        })
        .context("cargo xtask image wrote no muscle-image-* directory")?;
    Ok(dir)
}

/// hello-service `version` for the default targets, listening on every address of its machine
/// (a VM's forwarded port reaches it there, not on its loopback).
pub fn release_hello_for_machines(version: &str, out: &Path) -> Result<Artifacts> {
    let spec = out.join(format!("service-{version}-all-addresses.toml"));
    std::fs::create_dir_all(out)?;
    let text =
        std::fs::read_to_string(workspace_root().join("examples/hello-service/service.toml"))?;
    let everywhere = text.replace("127.0.0.1:${port}", "0.0.0.0:${port}");
    if everywhere == text {
        bail!("examples/hello-service/service.toml no longer listens on 127.0.0.1:${{port}}; update the harness");
    }
    std::fs::write(&spec, everywhere)?;
    let mut args = vec!["--service", spec.to_str().context("non-UTF-8 path")?];
    args.extend(crate::target_args(&crate::TARGETS));
    release_hello_with(
        HelloVersion {
            version,
            unhealthy: false,
        },
        out,
        "",
        &args,
    )
}
