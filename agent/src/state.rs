//! What the agent remembers across restarts, in `STATE_DIR/state.json`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use muscle_protocol::{Name, ServiceSpec};
use serde::{Deserialize, Serialize};

use crate::fsutil;
use crate::paths::AppPaths;

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

impl AppState {
    /// Something of the app is on this host or to report: a version, an install in flight, or
    /// a failure. Otherwise (removed) only its counters are kept.
    pub fn is_present(&self) -> bool {
        self.current.is_some() || self.pending.is_some() || self.failure.is_some()
    }
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

/// Written beside each installed version: with it, an agent whose `state.json` was lost finds
/// what each app ran (the `current` link), how to run it, and which release counters it
/// accepted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Receipt {
    pub installed: Installed,
    pub counter: u64,
    /// Set once the version passed its probation. `current` points at a version before that:
    /// an uncommitted receipt is never recovered as what the app runs.
    #[serde(default)]
    pub committed: bool,
}

impl Receipt {
    pub fn write(&self, paths: &AppPaths) -> Result<()> {
        let json = serde_json::to_vec_pretty(self).expect("a receipt serializes");
        fsutil::write_atomic(&paths.receipt(&self.installed.version), &json)
    }

    fn read(paths: &AppPaths, version: &str) -> Result<Receipt> {
        let path = paths.receipt(version);
        let bytes =
            std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
        let receipt: Receipt = serde_json::from_slice(&bytes)
            .with_context(|| format!("{} is not a valid receipt", path.display()))?;
        anyhow::ensure!(
            receipt.installed.version == version,
            "{} is for version {}",
            path.display(),
            receipt.installed.version
        );
        Ok(receipt)
    }
}

/// Rebuilds the state of every app found under `STATE_DIR/apps` that `state` does not know
/// (its `state.json` was lost or moved away), from the receipts of its installed versions.
/// Returns what was recovered, for the log.
pub fn recover_lost_apps(state_dir: &Path, state: &mut AgentState) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(state_dir.join("apps")) else {
        return vec![];
    };
    let mut recovered = vec![];
    for entry in entries.flatten() {
        let Some(app) = entry.file_name().to_str().and_then(|n| Name::parse(n).ok()) else {
            continue;
        };
        if state.apps.contains_key(&app) {
            continue;
        }
        let paths = AppPaths::new(state_dir, &app);
        let mut st = AppState::default();
        for version in version_dirs(&paths) {
            if let Some(r) = Receipt::read(&paths, &version).ok().filter(|r| r.committed) {
                st.highest_counter = st.highest_counter.max(r.counter);
                st.ran
                    .insert(r.installed.version.clone(), r.installed.sha256.clone());
            }
        }
        let current = std::fs::read_link(&paths.current).ok().and_then(|target| {
            let version = target.file_name()?.to_str()?.to_owned();
            Receipt::read(&paths, &version).ok()
        });
        recovered.push(match &current {
            Some(r) if r.committed => format!("{app} {} (from its receipt)", r.installed.version),
            Some(r) => format!(
                "{app} (its install of {} was interrupted before commit)",
                r.installed.version
            ),
            None => format!("{app} (no current version)"),
        });
        st.current = current.filter(|r| r.committed).map(|r| r.installed);
        state.apps.insert(app, st);
    }
    recovered
}

fn version_dirs(paths: &AppPaths) -> Vec<String> {
    std::fs::read_dir(&paths.versions)
        .map(|entries| {
            entries
                .flatten()
                .filter_map(|e| e.file_name().to_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
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

    #[test]
    fn a_lost_state_file_is_rebuilt_from_the_receipts_and_the_current_link() {
        let dir = std::env::temp_dir().join(format!("muscle-recover-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let paths = AppPaths::new(&dir, "hello");
        paths.create().unwrap();
        for (version, counter) in [("0.1.0", 5), ("0.2.0", 7)] {
            std::fs::create_dir_all(paths.versions.join(version)).unwrap();
            let installed = Installed {
                version: Name::parse(version).unwrap(),
                binary: Name::parse("hello").unwrap(),
                sha256: format!("{counter:064}"),
                spec: serde_json::from_str("{}").unwrap(),
            };
            let receipt = Receipt {
                installed,
                counter,
                committed: true,
            };
            receipt.write(&paths).unwrap();
        }
        // A version that never passed its probation counts for nothing.
        std::fs::create_dir_all(paths.versions.join("0.3.0")).unwrap();
        let mut failed: Receipt =
            serde_json::from_slice(&std::fs::read(paths.receipt("0.2.0")).unwrap()).unwrap();
        failed.installed.version = Name::parse("0.3.0").unwrap();
        failed.counter = 9;
        failed.committed = false;
        failed.write(&paths).unwrap();
        // A receipt that lies about its version is not believed.
        std::fs::create_dir_all(paths.versions.join("9.9.9")).unwrap();
        std::fs::copy(paths.receipt("0.2.0"), paths.receipt("9.9.9")).unwrap();
        std::os::unix::fs::symlink(paths.versions.join("0.1.0"), &paths.current).unwrap();

        let mut state = AgentState::default();
        let recovered = recover_lost_apps(&dir, &mut state);
        assert_eq!(recovered, ["hello 0.1.0 (from its receipt)"]);
        let st = &state.apps["hello"];
        assert_eq!(st.current.as_ref().unwrap().version, "0.1.0");
        assert_eq!(
            st.highest_counter, 7,
            "counters survive: replays stay refused"
        );
        assert_eq!(st.ran.len(), 2);
        // Apps the state knows are left as they are.
        assert!(recover_lost_apps(&dir, &mut state).is_empty());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
