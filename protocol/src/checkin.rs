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
    pub apps: Vec<DesiredEntry>,
    /// Apps taken off this agent: it stops and uninstalls them. Told at every changed answer
    /// until the app is assigned again, so an agent that missed one still converges.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub removed: Vec<Name>,
    /// The answer to `confirm_probe`: whether the probe with that nonce checked in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub probe_seen: Option<bool>,
    /// The boot image version this machine should run (network-booted machines only): one that
    /// runs another restarts into it, as the deployer's boot script then boots it. Like `apps`,
    /// sent in changed answers only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<Name>,
}

/// One entry of an answer's `apps`, read on its own. An entry this agent cannot read (a field a
/// newer deployer sends, say) is refused alone, for its app and version: the rest of the answer
/// is still taken, where one unknown field used to refuse it whole.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DesiredEntry {
    App(Box<DesiredApp>),
    Unreadable(Unreadable),
}

/// An entry that names its app and version but is not a [`DesiredApp`] this agent knows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unreadable {
    pub app: Name,
    pub version: Name,
    /// The artifact's sha256 as the entry gives it; empty when it gives none that is one.
    pub sha256: String,
    /// What the parser said.
    pub error: String,
    /// The entry as it came, so that it serializes back unchanged.
    raw: serde_json::Value,
}

impl CheckinResponse {
    /// An app the answer names twice: which entry would win is no answer to act on.
    pub fn duplicate_app(&self) -> Option<&Name> {
        let mut seen = std::collections::BTreeSet::new();
        self.apps
            .iter()
            .map(DesiredEntry::app)
            .find(|a| !seen.insert(*a))
    }
}

impl DesiredEntry {
    pub fn app(&self) -> &Name {
        match self {
            DesiredEntry::App(a) => &a.app,
            DesiredEntry::Unreadable(u) => &u.app,
        }
    }

    /// The entries read, and those that were not.
    pub fn split(entries: Vec<DesiredEntry>) -> (Vec<DesiredApp>, Vec<Unreadable>) {
        let mut read = Vec::new();
        let mut unreadable = Vec::new();
        for e in entries {
            match e {
                DesiredEntry::App(a) => read.push(*a),
                DesiredEntry::Unreadable(u) => unreadable.push(u),
            }
        }
        (read, unreadable)
    }
}

impl Serialize for DesiredEntry {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            DesiredEntry::App(app) => app.serialize(s),
            DesiredEntry::Unreadable(u) => u.raw.serialize(s),
        }
    }
}

impl<'de> Deserialize<'de> for DesiredEntry {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = serde_json::Value::deserialize(d)?;
        let error = match DesiredApp::deserialize(&raw) {
            Ok(app) => return Ok(DesiredEntry::App(Box::new(app))),
            Err(e) => e,
        };
        let name = |key: &str| {
            raw.get(key)
                .and_then(serde_json::Value::as_str)
                .and_then(|s| Name::parse(s).ok())
        };
        // An entry that does not even say which app it is about cannot be refused alone.
        let (Some(app), Some(version)) = (name("app"), name("version")) else {
            return Err(serde::de::Error::custom(error));
        };
        let sha256 = raw
            .pointer("/artifact/sha256")
            .and_then(serde_json::Value::as_str)
            .filter(|s| s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit()))
            .unwrap_or_default()
            .to_owned();
        Ok(DesiredEntry::Unreadable(Unreadable {
            app,
            version,
            sha256,
            error: error.to_string(),
            raw,
        }))
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn entry(app: &str, service: serde_json::Value) -> serde_json::Value {
        json!({
            "app": app, "version": "1.0.0",
            "artifact": {"url": "/b", "sha256": "ab".repeat(32), "size": 1, "binary": app},
            "manifest": "{}", "signature": null, "service": service,
        })
    }

    #[test]
    fn an_entry_with_a_field_this_agent_does_not_know_is_refused_alone() {
        let newer = entry("b", json!({"from_a_newer_deployer": {"memory": "64M"}}));
        let answer =
            json!({"generation": 2, "unchanged": false, "apps": [entry("a", json!({})), newer]});
        let response: CheckinResponse = serde_json::from_value(answer).unwrap();
        let (read, unreadable) = DesiredEntry::split(response.apps.clone());
        assert_eq!(read.len(), 1);
        assert_eq!(read[0].app.as_str(), "a");
        assert_eq!(unreadable.len(), 1);
        assert_eq!(unreadable[0].app.as_str(), "b");
        assert_eq!(unreadable[0].version.as_str(), "1.0.0");
        assert_eq!(unreadable[0].sha256, "ab".repeat(32));
        let error = &unreadable[0].error;
        assert!(error.contains("from_a_newer_deployer"), "{error}");
        // What a deployer sends is what it serializes: the entry is kept as it came.
        let again = serde_json::to_value(&response).unwrap();
        let kept = &again["apps"][1]["service"]["from_a_newer_deployer"];
        assert_eq!(kept["memory"], "64M");
        assert_eq!(response.duplicate_app(), None);
        let twice = json!({"generation": 2, "unchanged": false,
            "apps": [entry("a", json!({})), entry("a", json!({"x": {}}))]});
        let response: CheckinResponse = serde_json::from_value(twice).unwrap();
        assert_eq!(response.duplicate_app().map(Name::as_str), Some("a"));
    }

    #[test]
    fn an_entry_that_does_not_name_its_app_and_version_refuses_the_answer() {
        for bad in [
            json!({"version": "1.0.0"}),
            json!({"app": "../x", "version": "1"}),
        ] {
            let answer = json!({"generation": 2, "unchanged": false, "apps": [bad]});
            assert!(serde_json::from_value::<CheckinResponse>(answer).is_err());
        }
    }
}
