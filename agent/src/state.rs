//! What the agent remembers across restarts, in `STATE_DIR/state.json`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use muscle_protocol::{Name, ServiceSpec};
use serde::{Deserialize, Serialize};

use crate::fsutil;

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct AgentState {
    /// Set at the first start (from `--id`, or made from the host name).
    #[serde(default)]
    pub agent_id: Option<Name>,
    /// Every name in this file is parsed as a [`Name`] on load: a state file that names a path
    /// (`../x`) is refused, never used.
    #[serde(default)]
    pub apps: BTreeMap<Name, AppState>,
    /// The agent itself as an app: its release counters and its last failed update.
    #[serde(default)]
    pub agent: AppState,
    /// A self-update that was exec'd but has not yet checked in.
    #[serde(default)]
    pub self_update: Option<SelfUpdate>,
}

/// An agent binary swap in flight.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SelfUpdate {
    pub version: Name,
    pub sha256: String,
    pub offer: String,
    /// The binary that ran before, to go back to.
    pub from: PathBuf,
    /// The new binary.
    pub to: PathBuf,
    /// How many times the new binary has started without checking in.
    pub starts: u32,
}

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct AppState {
    /// The committed version: what `current` points at once no install is in flight.
    pub current: Option<Installed>,
    pub previous: Option<Installed>,
    /// An install in flight. Found at start-up, it means the agent died mid-switch.
    pub pending: Option<Installed>,
    /// The process the agent started, and the version it runs.
    pub pid: Option<u32>,
    pub running_version: Option<Name>,
    pub failure: Option<Failure>,
    /// The highest release counter accepted: older releases are replays unless already run here.
    #[serde(default)]
    pub highest_counter: u64,
    /// Versions this agent has run, with their sha256: a local rollback to one of them is allowed.
    #[serde(default)]
    pub ran: BTreeMap<Name, String>,
}

/// A version on disk with what it takes to run it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Installed {
    pub version: Name,
    pub binary: Name,
    pub sha256: String,
    /// The service spec with the agent's variables expanded.
    pub spec: ServiceSpec,
}

/// Why the agent did not install, or rolled back from, a version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Failure {
    pub version: Name,
    pub sha256: String,
    /// Identifies the offer (bytes, manifest, signature) that failed.
    pub offer: String,
    pub reason: String,
    pub log_tail: Option<String>,
    /// A permanent failure is not retried until the desired version changes.
    pub permanent: bool,
    pub attempts: u32,
}

pub struct StateStore {
    path: PathBuf,
}

impl StateStore {
    pub fn new(state_dir: &Path) -> StateStore {
        StateStore {
            path: state_dir.join("state.json"),
        }
    }

    pub fn load(&self) -> Result<AgentState> {
        match std::fs::read(&self.path) {
            Ok(bytes) => serde_json::from_slice(&bytes).with_context(|| {
                format!(
                    "{} is not a valid agent state file (move it away to start afresh)",
                    self.path.display()
                )
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(AgentState::default()),
            Err(e) => Err(e).with_context(|| format!("cannot read {}", self.path.display())),
        }
    }

    pub fn save(&self, state: &AgentState) -> Result<()> {
        let json = serde_json::to_vec_pretty(state).expect("the state serializes");
        fsutil::write_atomic(&self.path, &json)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_state_file_that_names_a_path_is_refused_on_load() {
        let dir = std::env::temp_dir().join(format!("muscle-state-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let store = StateStore::new(&dir);
        std::fs::write(dir.join("state.json"), r#"{"apps": {"../../x": {}}}"#).unwrap();
        let err = format!("{:#}", store.load().unwrap_err());
        assert!(
            err.contains("not a valid agent state file") && err.contains("starts with '.'"),
            "{err}"
        );
        std::fs::write(dir.join("state.json"), r#"{"apps": {"hello": {}}}"#).unwrap();
        assert!(store.load().unwrap().apps.contains_key("hello"));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
