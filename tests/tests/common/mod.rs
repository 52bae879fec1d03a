//! What every end-to-end test needs: the builds (once per test binary) and a scratch directory.

#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::OnceLock;

use muscle_e2e::{
    host_deployer, release_agents, release_hello, target_dir, workspace_root, Artifacts,
    HelloVersion,
};

pub struct Builds {
    pub deployer: PathBuf,
    pub agents: Artifacts,
    pub v1: Artifacts,
    pub v2: Artifacts,
    /// A release whose health check always fails.
    pub v3_bad: Artifacts,
}

impl Builds {
    pub fn agent(&self, arch: &str) -> PathBuf {
        let triple = muscle_e2e::ALL_TARGETS
            .iter()
            .find(|(_, a)| *a == arch)
            .expect("a known arch")
            .0;
        self.agents.binary(triple, "muscle-agent")
    }

    /// One agent binary for each of the four architectures, for `Fleet::start`.
    pub fn all_arches(&self) -> Vec<(PathBuf, &'static str)> {
        muscle_e2e::ALL_TARGETS
            .iter()
            .map(|(_, arch)| (self.agent(arch), *arch))
            .collect()
    }

    /// One agent binary per default architecture, for `Fleet::start`.
    pub fn both_arches(&self) -> Vec<(PathBuf, &'static str)> {
        vec![
            (self.agent("x86_64"), "x86_64"),
            (self.agent("aarch64"), "aarch64"),
        ]
    }
}

pub fn builds() -> &'static Builds {
    static BUILDS: OnceLock<Builds> = OnceLock::new();
    BUILDS.get_or_init(|| {
        muscle_e2e::require_emulation().expect("the foreign half of the fleet needs qemu-user");
        let out = target_dir().join("e2e-dist");
        let build = || -> anyhow::Result<Builds> {
            Ok(Builds {
                deployer: host_deployer(false)?,
                agents: release_agents(&out)?,
                v1: release_hello(
                    HelloVersion {
                        version: "0.1.0",
                        unhealthy: false,
                    },
                    &out,
                )?,
                v2: release_hello(
                    HelloVersion {
                        version: "0.2.0",
                        unhealthy: false,
                    },
                    &out,
                )?,
                v3_bad: release_hello(
                    HelloVersion {
                        version: "0.3.0",
                        unhealthy: true,
                    },
                    &out,
                )?,
            })
        };
        build().expect("building the fleet's releases")
    })
}

/// A process's stdout and stderr, for assertion messages.
pub fn text(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Runs `program ARGS FILE` (a tool `cargo xtask setup` installs); its stdout, or an error.
pub fn tool(program: &str, args: &[&str], file: &std::path::Path) -> anyhow::Result<String> {
    use anyhow::Context;
    let out = std::process::Command::new(program)
        .args(args)
        .arg(file)
        .output()
        .with_context(|| format!("{program} is installed by `cargo xtask setup`"))?;
    anyhow::ensure!(
        out.status.success(),
        "{program} {}: {}",
        file.display(),
        text(&out)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The machine as `file -b` and `readelf -h` name it, for each arch the release targets.
pub fn elf_names(arch: &str) -> (&'static str, &'static str) {
    match arch {
        "x86_64" => ("x86-64", "Advanced Micro Devices X86-64"),
        "aarch64" => ("ARM aarch64", "AArch64"),
        "arm" => ("ARM, EABI5", "ARM"),
        "riscv64" => ("RISC-V", "RISC-V"),
        other => panic!("unexpected arch {other}"),
    }
}

/// A fresh directory for one test, under target/ (short paths, cleaned at the next run).
pub fn scratch(name: &str) -> PathBuf {
    let dir = target_dir().join("e2e").join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("target/ is writable");
    dir
}

pub fn service_spec() -> String {
    workspace_root()
        .join("examples/hello-service/service.toml")
        .display()
        .to_string()
}

/// The state of `agent` in a rollout's waves, e.g. "healthy".
pub fn member_state(rollout: &serde_json::Value, agent: &str) -> String {
    rollout["waves"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|w| w["members"].as_array().cloned().unwrap_or_default())
        .find(|m| m["agent_id"] == agent)
        .map(|m| m["state"].as_str().unwrap_or_default().to_owned())
        .unwrap_or_default()
}

/// Rolls hello-service `version` out to the whole fleet with the example spec and waits until
/// it succeeded.
pub fn roll_out(fleet: &muscle_e2e::Fleet, version: &str) -> anyhow::Result<()> {
    let spec = service_spec();
    let id = fleet.start_rollout(&["hello-service", version, "--service", &spec])?;
    let r = fleet
        .deployer
        .wait_rollout_end(id, std::time::Duration::from_secs(180))?;
    anyhow::ensure!(
        r["status"] == "succeeded",
        "rollout of {version} ended {}: {}",
        r["status"],
        r["message"]
    );
    Ok(())
}

/// A fixed ed25519 key for tests: the same seed gives the same key.
pub fn signing_key(seed: u8) -> muscle_protocol::SigningKey {
    muscle_protocol::SigningKey::from_seed(&[seed; 32])
}

/// The release's manifest with a new counter and expiry, serialized, and its signature by `key`.
pub fn signed(
    manifest: &serde_json::Value,
    counter: u64,
    expires: Option<u64>,
    key: &muscle_protocol::SigningKey,
) -> (String, String) {
    let mut m = manifest.clone();
    m["counter"] = counter.into();
    if let Some(e) = expires {
        m["expires"] = e.into();
    }
    let text = serde_json::to_string_pretty(&m).unwrap();
    let sig = muscle_protocol::sign(key, text.as_bytes());
    (text, sig)
}
