//! Real `muscle-agent` processes, each with its own state dir and service port.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::Duration;

use anyhow::{Context, Result};

use crate::{free_port, Deployer};

#[derive(Debug, Clone)]
pub struct AgentOptions {
    pub id: String,
    /// The agent binary: its architecture is the agent's.
    pub bin: PathBuf,
    pub arch: String,
    pub state_dir: PathBuf,
    pub labels: Vec<(String, String)>,
    pub extra_args: Vec<String>,
    /// Extra environment for the agent process.
    pub env: Vec<(String, String)>,
}

impl AgentOptions {
    /// Agent `id` running `bin` (an `arch` binary) with its state in `state_dir`: no labels, no
    /// extra arguments or environment (set those fields to add them).
    pub fn new(id: &str, bin: PathBuf, arch: &str, state_dir: PathBuf) -> AgentOptions {
        AgentOptions {
            id: id.to_owned(),
            bin,
            arch: arch.to_owned(),
            state_dir,
            labels: vec![],
            extra_args: vec![],
            env: vec![],
        }
    }
}

pub struct Agent {
    pub opts: AgentOptions,
    /// The port its hello-service listens on (`--var port=`).
    pub port: u16,
    pub server: String,
    child: Option<Child>,
}

impl Agent {
    pub fn start(opts: AgentOptions, server: &str) -> Result<Agent> {
        std::fs::create_dir_all(&opts.state_dir)?;
        let mut agent = Agent {
            opts,
            port: free_port(),
            server: server.to_owned(),
            child: None,
        };
        agent.spawn()?;
        Ok(agent)
    }

    fn spawn(&mut self) -> Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())?;
        let mut cmd = Command::new(&self.opts.bin);
        cmd.args([
            "run",
            "--server",
            &self.server,
            "--id",
            &self.opts.id,
            "--interval",
            "500ms",
        ])
        .arg("--state-dir")
        .arg(&self.opts.state_dir)
        .args(["--var", &format!("port={}", self.port)])
        .args(["--label", &format!("arch={}", self.opts.arch)]);
        for (k, v) in &self.opts.labels {
            cmd.args(["--label", &format!("{k}={v}")]);
        }
        cmd.args(&self.opts.extra_args)
            .envs(self.opts.env.iter().map(|(k, v)| (k, v)))
            .stdout(log.try_clone()?)
            .stderr(log);
        self.child = Some(
            cmd.spawn()
                .with_context(|| format!("cannot start {}", self.opts.bin.display()))?,
        );
        Ok(())
    }

    pub fn log_path(&self) -> PathBuf {
        self.opts.state_dir.with_extension("log")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// SIGKILL the agent only: its services keep running, as after a real crash.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, and wait for the agent to exit (it stops its services first).
    pub fn terminate(&mut self) -> Result<()> {
        if let Some(mut c) = self.child.take() {
            // SAFETY: kill(2) on our own child's pid.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            c.wait()?;
        }
        Ok(())
    }

    pub fn restart(&mut self) -> Result<()> {
        self.kill9();
        self.spawn()
    }

    /// Waits for an agent that is expected to exit on its own (a refused start).
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<std::process::ExitStatus> {
        let child = self.child.as_mut().context("the agent is not running")?;
        let status = crate::wait_until("the agent to exit", timeout, || Ok(child.try_wait()?))?;
        self.child = None;
        Ok(status)
    }

    /// The agent's state file, as the agent wrote it.
    pub fn state(&self) -> Result<serde_json::Value> {
        let path = self.opts.state_dir.join("state.json");
        Ok(serde_json::from_slice(
            &std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?,
        )?)
    }

    /// What the service itself says its version is (`GET /version`).
    pub fn service_version(&self) -> Result<String> {
        let url = format!("http://127.0.0.1:{}/version", self.port);
        Ok(ureq::get(&url)
            .timeout(Duration::from_secs(2))
            .call()?
            .into_string()?
            .trim()
            .to_owned())
    }

    /// Live service processes started by this agent (found by their marker, as the agent does).
    pub fn service_pids(&self) -> Vec<u32> {
        marked_pids(&self.opts.state_dir)
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill9();
        for pid in marked_pids(&self.opts.state_dir) {
            // SAFETY: kill(2) on a process this agent started.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
    }
}

/// Processes whose environment marks them as services of the agent using `state_dir`.
fn marked_pids(state_dir: &Path) -> Vec<u32> {
    let prefix = format!("MUSCLE_SERVICE={}/", state_dir.display());
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return vec![];
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let alive = std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
                s.rsplit_once(')')
                    .is_some_and(|(_, r)| !r.trim_start().starts_with('Z'))
            });
            alive
                && std::fs::read(format!("/proc/{pid}/environ")).is_ok_and(|env| {
                    env.split(|b| *b == 0)
                        .any(|v| v.starts_with(prefix.as_bytes()))
                })
        })
        .collect()
}

/// A deployer and its agents.
pub struct Fleet {
    pub agents: Vec<Agent>,
    pub deployer: Deployer,
}

impl Fleet {
    /// `count` agents of each of the given (agent binary, arch) pairs, in `dir`.
    pub fn start(
        deployer: Deployer,
        binaries: &[(PathBuf, &str)],
        count: usize,
        dir: &Path,
    ) -> Result<Fleet> {
        Fleet::start_with(deployer, binaries, count, dir, &[])
    }

    /// Like [`start`](Self::start), with extra `muscle-agent run` arguments for every agent.
    pub fn start_with(
        deployer: Deployer,
        binaries: &[(PathBuf, &str)],
        count: usize,
        dir: &Path,
        agent_args: &[&str],
    ) -> Result<Fleet> {
        let mut agents = Vec::new();
        for (bin, arch) in binaries {
            for i in 1..=count {
                let id = format!("{arch}-{i}");
                let opts = AgentOptions {
                    labels: vec![("site".into(), "lab".into())],
                    extra_args: agent_args.iter().map(|a| a.to_string()).collect(),
                    ..AgentOptions::new(&id, bin.clone(), arch, dir.join(&id))
                };
                agents.push(Agent::start(opts, &deployer.url())?);
            }
        }
        let fleet = Fleet { agents, deployer };
        let timeout = Duration::from_secs(60 + 2 * fleet.agents.len() as u64);
        fleet.wait_checked_in(timeout)?;
        Ok(fleet)
    }

    pub fn wait_checked_in(&self, timeout: Duration) -> Result<()> {
        let want = self.agents.len();
        crate::wait_until("every agent to check in", timeout, || {
            let fleet = self.deployer.fleet()?;
            let live = fleet
                .iter()
                .filter(|a| !a["stale"].as_bool().unwrap_or(true))
                .count();
            anyhow::ensure!(live >= want, "{live} of {want} agents checked in");
            Ok(Some(()))
        })
    }

    pub fn agent(&self, id: &str) -> &Agent {
        self.agents
            .iter()
            .find(|a| a.opts.id == id)
            .unwrap_or_else(|| panic!("no agent {id}"))
    }

    pub fn agent_mut(&mut self, id: &str) -> &mut Agent {
        self.agents
            .iter_mut()
            .find(|a| a.opts.id == id)
            .unwrap_or_else(|| panic!("no agent {id}"))
    }

    /// Starts a rollout with `args` after `rollout start`; returns its id.
    pub fn start_rollout(&self, args: &[&str]) -> Result<i64> {
        self.deployer.start_rollout(args)
    }
}
