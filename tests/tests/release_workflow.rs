//! The release as a new user and the tag workflow run it: `cargo xtask release` with no arguments
//! on this workspace, then `.github/workflows/release.yml`'s `run:` steps in order on this machine
//! (a stand-in `gh` records what would be uploaded), so a broken step fails here, not on a tag.
//!
//! Both write `<workspace>/dist/` as the commands do, so they run in one test, one after the other.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, ensure, Context, Result};
use common::{text, tool};
use muscle_e2e::{workspace_root, xtask};
use serde_json::Value;
use yaml_rust2::{Yaml, YamlLoader};

/// Every default target in targets/, as (triple, arch).
fn default_targets() -> Result<Vec<(String, String)>> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(workspace_root().join("targets"))? {
        let spec: toml::Value = toml::from_str(&std::fs::read_to_string(entry?.path())?)?;
        if spec.get("default").and_then(toml::Value::as_bool) != Some(false) {
            let field = |k: &str| spec[k].as_str().unwrap_or_default().to_owned();
            found.push((field("triple"), field("arch")));
        }
    }
    found.sort();
    Ok(found)
}

#[test]
fn the_plain_release_command_and_the_tag_workflow_steps_work_on_this_workspace() -> Result<()> {
    let dist = workspace_root().join("dist");
    let _ = std::fs::remove_dir_all(&dist);
    plain_release(&dist)?;
    std::fs::remove_dir_all(&dist)?;
    release_workflow(&dist)
}

/// `cargo xtask release`, nothing else: every binary of the workspace for every default target.
fn plain_release(dist: &Path) -> Result<()> {
    let out = xtask(&["release"])?;
    ensure!(out.status.success(), "cargo xtask release: {}", text(&out));
    let release = dist.join(format!("muscle-{}", env!("CARGO_PKG_VERSION")));
    let sums = Command::new("sha256sum")
        .args(["-c", "SHA256SUMS"])
        .current_dir(&release)
        .output()?;
    ensure!(sums.status.success(), "sha256sum -c: {}", text(&sums));
    let manifest: Value = serde_json::from_slice(&std::fs::read(release.join("manifest.json"))?)?;
    let targets = default_targets()?;
    let bins = [
        "hello-service",
        "muscle-agent",
        "muscle-deploy",
        "muscle-init",
    ];
    let artifacts = manifest["artifacts"].as_array().context("artifacts")?;
    assert_eq!(
        artifacts.len(),
        targets.len() * bins.len(),
        "every binary for every default target: {manifest}"
    );
    for (triple, arch) in &targets {
        for bin in bins {
            let path = release.join(triple).join(bin);
            check_static_binary(&path, arch)?;
            // It runs (foreign arches through qemu-user registered with binfmt_misc).
            let run = Command::new(&path).arg("--version").output()?;
            ensure!(
                run.status.success() && text(&run).contains(env!("CARGO_PKG_VERSION")),
                "{} --version: {}",
                path.display(),
                text(&run)
            );
        }
    }
    Ok(())
}

/// `readelf` and `file` agree that `path` is a static executable for `arch`.
fn check_static_binary(path: &Path, arch: &str) -> Result<()> {
    let (file_name, readelf_name) = common::elf_names(arch);
    let file = tool("file", &["-b"], path)?;
    let readelf = tool("readelf", &["-lhd", "-W"], path)?;
    ensure!(
        file.contains(file_name) && file.contains("static"),
        "{}: {file}",
        path.display()
    );
    ensure!(
        readelf.contains(&format!(
            "Machine:                           {readelf_name}"
        )) && !readelf.contains("INTERP")
            && !readelf.contains("(NEEDED)"),
        "{}: not a static {arch} executable:\n{readelf}",
        path.display()
    );
    Ok(())
}

/// Runs the `run:` steps of the release job with the values a tag push would give them.
fn release_workflow(dist: &Path) -> Result<()> {
    let dir = common::scratch("release-workflow");
    let key_file = dir.join("ci.key");
    let keygen = Command::new(muscle_e2e::host_deployer(false)?)
        .args(["keygen", "--out"])
        .arg(&key_file)
        .output()?;
    ensure!(keygen.status.success(), "keygen: {}", text(&keygen));
    let public_key = String::from_utf8_lossy(&keygen.stdout).trim().to_owned();
    let stand_ins = stand_ins(&dir)?;
    let runner_temp = dir.join("runner-temp");
    std::fs::create_dir_all(&runner_temp)?;
    let tag = "v0.1.0";
    let expressions = BTreeMap::from([
        (
            "secrets.MUSCLE_SIGNING_KEY",
            std::fs::read_to_string(&key_file)?.trim().to_owned(),
        ),
        ("github.token", "stand-in-token".to_owned()),
        ("github.ref_name", tag.to_owned()),
    ]);
    let workflow = workspace_root().join(".github/workflows/release.yml");
    let steps = run_steps(&workflow)?;
    ensure!(
        steps.len() >= 3,
        "{}: too few run steps",
        workflow.display()
    );
    let path = format!(
        "{}:{}",
        stand_ins.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    for step in &steps {
        let mut cmd = Command::new("bash");
        // GitHub's default shell for `run:` on Linux.
        cmd.args(["--noprofile", "--norc", "-eo", "pipefail", "-c", &step.run])
            .current_dir(workspace_root())
            .env("PATH", &path)
            .env("RUNNER_TEMP", &runner_temp)
            .env("GITHUB_REF_NAME", tag)
            .env("GH_RECORD", dir.join("gh"));
        for (name, value) in &step.env {
            cmd.env(name, substitute(value, &expressions)?);
        }
        let out = cmd.output()?;
        ensure!(
            out.status.success(),
            "workflow step {:?} failed: {}",
            step.name,
            text(&out)
        );
    }
    check_uploads(&dir.join("gh"), dist, tag, &public_key)
}

/// What the stand-in `gh` was asked to upload: a signed release with every default target.
fn check_uploads(record: &Path, dist: &Path, tag: &str, public_key: &str) -> Result<()> {
    let calls =
        std::fs::read_to_string(record.join("calls")).context("the workflow never called gh")?;
    assert!(
        calls.starts_with(&format!("release create {tag} --verify-tag")),
        "{calls}"
    );
    let uploaded = |name: &str| record.join("files").join(name);
    for name in ["manifest.json", "manifest.json.sig", "SHA256SUMS"] {
        assert!(uploaded(name).is_file(), "{name} was not uploaded: {calls}");
    }
    let manifest = std::fs::read(uploaded("manifest.json"))?;
    let signature = std::fs::read_to_string(uploaded("manifest.json.sig"))?;
    let key = muscle_protocol::parse_public_key(public_key)?;
    muscle_protocol::verify_signature(&manifest, Some(signature.trim()), &[key])
        .context("the uploaded manifest's signature")?;
    let tarball = uploaded(&format!("release-{tag}.tar.gz"));
    let listing = tool("tar", &["tzf"], &tarball)?;
    for (triple, _) in default_targets()? {
        for bin in [
            "hello-service",
            "muscle-agent",
            "muscle-deploy",
            "muscle-init",
        ] {
            assert!(
                listing.contains(&format!("./{triple}/{bin}\n")),
                "{triple}/{bin} missing from the tarball:\n{listing}"
            );
        }
    }
    assert!(dist.is_dir());
    Ok(())
}

struct RunStep {
    name: String,
    run: String,
    env: BTreeMap<String, String>,
}

/// The `run:` steps of the workflow's only job, in order. `uses:` steps are the checkout, which
/// this test already is.
fn run_steps(workflow: &Path) -> Result<Vec<RunStep>> {
    let docs = YamlLoader::load_from_str(&std::fs::read_to_string(workflow)?)?;
    let jobs = docs[0]["jobs"].as_hash().context("no jobs")?;
    ensure!(
        jobs.len() == 1,
        "expected one job in {}",
        workflow.display()
    );
    let job = jobs.values().next().expect("one job");
    let mut steps = Vec::new();
    for step in job["steps"].as_vec().context("no steps")? {
        if let Some(uses) = step["uses"].as_str() {
            ensure!(
                uses.starts_with("actions/checkout@"),
                "a `uses: {uses}` step: teach this test what it does"
            );
            continue;
        }
        let env = match &step["env"] {
            Yaml::Hash(map) => map
                .iter()
                .map(|(k, v)| (yaml_str(k), yaml_str(v)))
                .collect(),
            _ => BTreeMap::new(),
        };
        steps.push(RunStep {
            name: yaml_str(&step["name"]),
            run: step["run"]
                .as_str()
                .context("a step with neither uses nor run")?
                .to_owned(),
            env,
        });
    }
    Ok(steps)
}

fn yaml_str(y: &Yaml) -> String {
    match y {
        Yaml::String(s) => s.clone(),
        Yaml::Integer(i) => i.to_string(),
        Yaml::Boolean(b) => b.to_string(),
        _ => String::new(),
    }
}

/// Replaces `${{ name }}` with its value; an expression this test does not know is an error.
fn substitute(value: &str, known: &BTreeMap<&str, String>) -> Result<String> {
    let mut out = String::new();
    let mut rest = value;
    while let Some(start) = rest.find("${{") {
        let end = rest[start..]
            .find("}}")
            .with_context(|| format!("unclosed expression in {value:?}"))?;
        let name = rest[start + 3..start + end].trim();
        let Some(v) = known.get(name) else {
            bail!("the workflow uses ${{{{ {name} }}}}, which this test does not provide");
        };
        out.push_str(&rest[..start]);
        out.push_str(v);
        rest = &rest[start + end + 2..];
    }
    out.push_str(rest);
    Ok(out)
}

/// `gh` records its arguments and copies every file it is given.
fn stand_ins(dir: &Path) -> Result<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin)?;
    let gh = "#!/bin/bash\nset -e\nmkdir -p \"$GH_RECORD/files\"\necho \"$*\" >> \"$GH_RECORD/calls\"\n\
              for a in \"$@\"; do if [ -f \"$a\" ]; then cp \"$a\" \"$GH_RECORD/files/\"; fi; done\n";
    std::fs::write(bin.join("gh"), gh)?;
    std::fs::set_permissions(bin.join("gh"), std::fs::Permissions::from_mode(0o755))?;
    Ok(bin)
}
