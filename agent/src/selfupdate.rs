//! The agent updates itself through the same path as any app: the new binary is verified like
//! any artifact, started once in probe mode (it must check in successfully), then exec'd in place
//! of this process, which keeps the pid and the services. Until the new agent checks in, a start
//! counter in the state dir decides: after too many starts, or if the old binary finds itself
//! running again, the update is reverted and reported.

use std::io::Write;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use muscle_protocol::{CheckinRequest, CheckinResponse, DesiredApp, ProbeNonce};

use crate::agent::Agent;
use crate::install::{offer_id, InstallError};
use crate::state::{Failure, SelfUpdate};

pub use muscle_protocol::SELF_APP;

/// [`SELF_APP`] as a [`Name`](muscle_protocol::Name).
pub fn self_app() -> muscle_protocol::Name {
    muscle_protocol::Name::parse(SELF_APP).expect("a valid name")
}
/// Starts of a new agent binary without a successful check-in before it is reverted.
const MAX_STARTS: u32 = 3;
const PROBE_TIMEOUT: Duration = Duration::from_secs(60);

impl Agent {
    /// Verifies, stages and probes the new agent, then execs it. Returns only on failure.
    pub(crate) fn update_self(&mut self, d: &DesiredApp) -> Result<(), InstallError> {
        let manifest = self.verify(d)?;
        let new = self.stage(d)?;
        let nonce = ProbeNonce::new(crate::agent::random_bytes());
        self.probe(&new, &nonce)?;
        self.confirm_probe(&nonce)?;
        let from = std::env::current_exe().map_err(|e| {
            InstallError::Transient(format!("cannot find this agent's binary: {e}"))
        })?;
        self.state.self_update = Some(SelfUpdate {
            version: d.version.clone(),
            sha256: d.artifact.sha256.clone(),
            offer: offer_id(d),
            from,
            to: new.clone(),
            starts: 0,
        });
        let st = &mut self.state.agent;
        st.highest_counter = st.highest_counter.max(manifest.counter);
        self.save()
            .map_err(|e| InstallError::Transient(format!("{e:#}")))?;
        say!("probe of agent {} passed; handing over", d.version);
        // No restart may fork while the process is replaced; the new agent adopts the services.
        self.supervisor.halt();
        // An older agent (a revert) knows services by the pids in the state file only.
        self.record_pids();
        let err = exec_self(&new);
        self.supervisor.resume();
        self.state.self_update = None;
        let _ = self.save();
        Err(InstallError::Refused(format!(
            "cannot exec the new agent {}: {err}",
            new.display()
        )))
    }

    /// Runs the new binary once in probe mode with this agent's report and `nonce`: it must
    /// check in with them.
    fn probe(&mut self, new: &Path, nonce: &ProbeNonce) -> Result<(), InstallError> {
        let report = CheckinRequest {
            probe_nonce: Some(nonce.clone()),
            ..self.report()
        };
        let report = serde_json::to_vec(&report).expect("reports serialize");
        let mut cmd = Command::new(new);
        cmd.arg("probe")
            .arg("--server")
            .arg(self.cfg.servers.current())
            .arg("--state-dir")
            .arg(&self.cfg.state_dir);
        if let Some(ca) = &self.cfg.ca_file {
            cmd.arg("--ca-file").arg(ca);
        }
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| InstallError::Refused(format!("the new agent does not start: {e}")))?;
        if let Some(mut stdin) = child.stdin.take() {
            let _ = stdin.write_all(&report);
        }
        let started = Instant::now();
        let status = loop {
            match child.try_wait() {
                Ok(Some(status)) => break status,
                Ok(None) if started.elapsed() > PROBE_TIMEOUT => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(InstallError::Refused(format!(
                        "the new agent's probe did not finish within {PROBE_TIMEOUT:?}"
                    )));
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(50)),
                Err(e) => {
                    return Err(InstallError::Transient(format!(
                        "waiting for the probe: {e}"
                    )))
                }
            }
        };
        if status.success() {
            return Ok(());
        }
        let mut stderr = String::new();
        if let Some(mut err) = child.stderr.take() {
            let _ = std::io::Read::read_to_string(&mut err, &mut stderr);
        }
        let tail: String = stderr
            .trim()
            .lines()
            .last()
            .unwrap_or("(no output)")
            .chars()
            .take(300)
            .collect();
        Err(InstallError::Refused(format!(
            "the new agent failed its probe ({status}): {tail}"
        )))
    }

    /// An exit status proves nothing: the deployer must have seen the probe's check-in.
    fn confirm_probe(&mut self, nonce: &ProbeNonce) -> Result<(), InstallError> {
        let request = CheckinRequest {
            confirm_probe: Some(nonce.clone()),
            ..self.report()
        };
        let transient = |e: anyhow::Error| {
            InstallError::Transient(format!("confirming the new agent's probe: {e:#}"))
        };
        let credential = self.credential(&request).map_err(transient)?;
        let answer = self
            .post("/v1/checkin", credential.as_deref(), &request)
            .map_err(transient)?;
        let answer: CheckinResponse = serde_json::from_slice(&answer)
            .map_err(|e| transient(anyhow::anyhow!("the answer is not a check-in answer: {e}")))?;
        match answer.probe_seen {
            Some(true) => Ok(()),
            Some(false) => Err(InstallError::Refused(
                "the new agent's probe exited 0 but never checked in with this deployer".into(),
            )),
            None => Err(InstallError::Refused(
                "the deployer cannot confirm a probe's check-in: update muscle-deploy before \
                 rolling out agents"
                    .into(),
            )),
        }
    }

    /// At start-up, with an update in flight: count this start, or revert.
    pub fn check_self_update(&mut self) -> Result<()> {
        let Some(mut update) = self.state.self_update.clone() else {
            return Ok(());
        };
        let me = std::env::current_exe().unwrap_or_default();
        if me != update.to {
            return self.revert_self(
                &update,
                format!(
                    "agent {} did not come up; {} is running again",
                    update.version,
                    me.display()
                ),
                false,
            );
        }
        update.starts += 1;
        if update.starts > MAX_STARTS {
            return self.revert_self(
                &update,
                format!(
                    "agent {} started {} times without checking in",
                    update.version,
                    update.starts - 1
                ),
                true,
            );
        }
        self.state.self_update = Some(update);
        self.save()
    }

    /// Called after a successful check-in: a pending update is now committed.
    pub fn commit_self_update(&mut self) -> Result<()> {
        let Some(update) = self.state.self_update.take() else {
            return Ok(());
        };
        self.state
            .agent
            .ran
            .insert(update.version.clone(), update.sha256.clone());
        self.state.agent.failure = None;
        say!("agent updated to {}", update.version);
        self.save()
    }

    fn revert_self(
        &mut self,
        update: &SelfUpdate,
        reason: String,
        exec_previous: bool,
    ) -> Result<()> {
        say!("reverting the self-update: {reason}");
        self.state.self_update = None;
        self.state.agent.failure = Some(Failure {
            version: update.version.clone(),
            sha256: update.sha256.clone(),
            offer: update.offer.clone(),
            reason,
            log_tail: None,
            permanent: true,
            attempts: update.starts,
        });
        self.save()?;
        if exec_previous {
            let err = exec_self(&update.from);
            anyhow::bail!(
                "cannot exec the previous agent {}: {err}",
                update.from.display()
            );
        }
        Ok(())
    }
}

/// Replaces this process with `binary`, same arguments. Returns only on failure.
fn exec_self(binary: &Path) -> std::io::Error {
    let args: Vec<_> = std::env::args_os().skip(1).collect();
    Command::new(binary).args(args).exec()
}

/// `muscle-agent probe`: one check-in with the report on stdin, under this binary's version.
pub fn probe(server: &str, state_dir: &Path, ca_file: Option<&Path>) -> Result<()> {
    let mut report: serde_json::Value =
        serde_json::from_reader(std::io::stdin()).context("reading the report on stdin")?;
    report["agent_version"] = env!("CARGO_PKG_VERSION").into();
    let url = format!("{}/v1/checkin", server.trim_end_matches('/'));
    let mut req = crate::http::client(ca_file)?
        .post(&url)
        .timeout(Duration::from_secs(20));
    if let Ok(credential) = std::fs::read_to_string(state_dir.join("credential")) {
        req = req.set("Authorization", &format!("Bearer {}", credential.trim()));
    }
    let answer: serde_json::Value = req
        .send_json(report)
        .with_context(|| format!("POST {url}"))?
        .into_json()
        .context("the check-in answer is not JSON")?;
    anyhow::ensure!(
        answer.get("generation").is_some(),
        "the check-in answer has no generation: {answer}"
    );
    Ok(())
}
