//! The check-in exchange: an agent's report in, its desired state out.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::{Name, ServiceSpec};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckinRequest {
    pub agent_id: Name,
    pub arch: String,
    pub hostname: String,
    #[serde(default)]
    pub labels: BTreeMap<Name, Name>,
    pub agent_version: String,
    /// The generation of the last answer this agent applied (0: none).
    #[serde(default)]
    pub generation: u64,
    #[serde(default)]
    pub apps: Vec<AppReport>,
    /// The agent's clock (Unix seconds) when it sent this: the deployer flags skew, which
    /// explains refusals of expiring releases.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clock_unix: Option<u64>,
    /// How often this agent checks in: the deployer judges it stale after a few missed intervals,
    /// not after a fixed time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval_ms: Option<u64>,
    /// Why the agent refused the server's last answer (unparsable, too large, or naming
    /// something that is not a valid name); absent when it took it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub problem: Option<String>,
    /// This check-in reports a change the agent just made (an install committed or rolled
    /// back, an app removed): the deployer's rollout engine looks at it at once instead of at
    /// its next tick.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub changed: bool,
    /// Sent by a new agent binary in probe mode (a self-update proving it can check in): the
    /// deployer records this nonce, not the check-in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub probe_nonce: Option<ProbeNonce>,
    /// Sent by the agent that ran the probe: it asks whether the deployer saw this nonce.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub confirm_probe: Option<ProbeNonce>,
}

/// 32 lowercase hex digits (128 random bits), parsed and checked wherever it enters.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ProbeNonce(String);

impl ProbeNonce {
    pub fn new(random: [u8; 16]) -> ProbeNonce {
        ProbeNonce(random.iter().map(|b| format!("{b:02x}")).collect())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for ProbeNonce {
    type Error = String;

    fn try_from(s: String) -> Result<ProbeNonce, String> {
        if s.len() == 32 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            Ok(ProbeNonce(s))
        } else {
            Err("a probe nonce is 32 lowercase hex digits".into())
        }
    }
}

impl From<ProbeNonce> for String {
    fn from(n: ProbeNonce) -> String {
        n.0
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Health {
    /// Nothing runs (not installed yet, or stopped).
    #[default]
    Stopped,
    /// Running, not yet healthy for `min_healthy_time`.
    Starting,
    Healthy,
    Unhealthy,
    /// Restarting too often.
    CrashLoop,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppReport {
    pub app: Name,
    /// The committed version (what `current` points at).
    pub installed_version: Option<Name>,
    /// The version whose process runs now.
    pub running_version: Option<Name>,
    pub health: Health,
    /// How long the running version has been continuously healthy.
    #[serde(default)]
    pub healthy_for_ms: u64,
    #[serde(default)]
    pub restarts: u32,
    /// The version this agent refused or rolled back from, with `last_error` saying why.
    pub failed_version: Option<Name>,
    pub last_error: Option<String>,
    /// The tail of the service's log when something failed.
    pub log_tail: Option<String>,
}

impl AppReport {
    /// The report of an app with nothing to say yet: stopped, no versions, no errors.
    pub fn new(app: Name) -> AppReport {
        AppReport {
            app,
            installed_version: None,
            running_version: None,
            health: Health::Stopped,
            healthy_for_ms: 0,
            restarts: 0,
            failed_version: None,
            last_error: None,
            log_tail: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckinResponse {
    pub generation: u64,
    /// The desired state has not changed since the agent's generation: `apps` is empty.
    pub unchanged: bool,
    #[serde(default)]
    pub apps: Vec<DesiredApp>,
    /// Apps taken off this agent: it stops and uninstalls them. Told at every changed answer
    /// until the app is assigned again, so an agent that missed one still converges.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub removed: Vec<Name>,
    /// The answer to `confirm_probe`: whether the probe with that nonce checked in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub probe_seen: Option<bool>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DesiredApp {
    pub app: Name,
    pub version: Name,
    pub artifact: Artifact,
    /// The release's `manifest.json`, byte for byte, so the agent can check its signature.
    pub manifest: String,
    pub signature: Option<String>,
    pub service: ServiceSpec,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Artifact {
    /// Absolute, or relative to the deployer's URL (`/v1/blobs/sha256/<hex>`).
    pub url: String,
    pub sha256: String,
    pub size: u64,
    pub binary: Name,
}
