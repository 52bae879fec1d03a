//! The deployer's storage: records (releases, agents, assignments, rollouts) behind [`Store`], and
//! content-addressed blobs behind [`BlobStore`]. The embedded defaults are SQLite and a directory;
//! a multi-replica deployment can implement the same traits over PostgreSQL and S3.

mod access;
mod blobs;
mod boot;
mod checkins;
mod history;
mod jobs;
mod logs;
mod postgresql;
mod s3;
mod sqlite;
#[cfg(test)]
mod suite;

use std::collections::{BTreeMap, BTreeSet};

use muscle_protocol::{AppReport, CheckinRequest, ServiceSpec};
use serde::{Deserialize, Serialize};

pub use access::{AccessStore, AuditEntry, Change, Permission, Role};
pub use blobs::{is_blob_name, FsBlobStore};
pub use boot::{BootStore, ImageRecord};
pub use history::{changes, AgentEvent, AgentEventRecord, HistoryStore};
pub use jobs::{JobRecord, JobStore, JobTarget, TargetState, REPORT_SLACK_MS};
pub use logs::{LogState, LogStore};
pub use postgresql::{redacted, PgStore};
pub use s3::S3BlobStore;
pub use sqlite::SqliteStore;

use crate::rollout::{Action, Request, Rollout};

/// A check-in recorded: the generation of the agent's desired state, and what its reports were
/// before, as far as its history cares.
pub struct Recorded {
    pub generation: u64,
    pub previous: Previous,
}

pub enum Previous {
    /// The agent's first check-in.
    New,
    /// The report is the same but for its times.
    Same,
    Changed(Vec<AppReport>),
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database: {0}")]
    Db(#[from] rusqlite::Error),
    #[error("PostgreSQL: {}", muscle_protocol::causes(.0))]
    Postgres(#[from] postgres::Error),
    #[error("PostgreSQL: no connection: {0}")]
    Pool(#[from] r2d2_postgres::r2d2::Error),
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{path} is read-only for this user: this command changes the store (fleet, releases, rollout status and fsck need only read access)")]
    ReadOnly { path: String },
    #[error("blob store: {0}")]
    Blobs(String),
    #[error("stored record is corrupt: {0}")]
    Corrupt(String),
    #[error("blob sha256:{sha256} is damaged in the store (its content no longer hashes to its name); `muscle-deploy fsck` lists the releases that hold it, and re-publishing one repairs it")]
    Damaged { sha256: String },
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// Runs `f`, which blocks on a client that drives its own async runtime (PostgreSQL's, S3's):
/// such a runtime may not start on a thread that drives the server's async tasks, so there
/// tokio is told first that this thread blocks. Elsewhere (`spawn_blocking`, the CLI) nothing
/// is needed.
fn off_async<T>(f: impl FnOnce() -> T) -> T {
    use tokio::runtime::{Handle, RuntimeFlavor};
    match Handle::try_current() {
        Ok(h) if h.runtime_flavor() == RuntimeFlavor::MultiThread => tokio::task::block_in_place(f),
        _ => f(),
    }
}

/// The blob store: `s3://...` when given, else the directory in `data_dir`.
pub fn open_blobs(
    url: Option<&str>,
    data_dir: &std::path::Path,
) -> Result<std::sync::Arc<dyn BlobStore>> {
    Ok(match url {
        Some(url) => std::sync::Arc::new(S3BlobStore::open(url, data_dir)?),
        None => std::sync::Arc::new(FsBlobStore::open(data_dir)?),
    })
}

/// A record as stored: JSON text.
fn json<T: Serialize>(value: &T) -> String {
    serde_json::to_string(value).expect("records serialize")
}

/// A stored record read back; what fails to parse is named.
fn parse<T: serde::de::DeserializeOwned>(what: &str, text: &str) -> Result<T> {
    serde_json::from_str(text).map_err(|e| StoreError::Corrupt(format!("{what}: {e}")))
}

/// A published release: the manifest exactly as signed, and its signature.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ReleaseRecord {
    pub app: String,
    pub version: String,
    pub counter: u64,
    pub manifest: String,
    pub signature: Option<String>,
    pub published_ms: u64,
}

pub enum PutOutcome {
    Inserted,
    /// The same manifest was already published: nothing to do.
    Identical,
    /// Another manifest is published under this app and version.
    Conflict,
}

/// What the deployer knows of an agent: its last check-in.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AgentRecord {
    pub id: String,
    pub arch: String,
    pub hostname: String,
    pub labels: BTreeMap<String, String>,
    pub agent_version: String,
    pub last_seen_ms: u64,
    pub apps: Vec<AppReport>,
    /// Bumped whenever this agent's desired state changes.
    pub desired_generation: u64,
    /// The check-in interval the agent reported.
    pub interval_ms: u64,
    /// The agent's clock minus the deployer's at its last check-in, in seconds.
    pub clock_skew_s: i64,
}

impl AgentRecord {
    /// Not heard from for [`STALE_AFTER_MISSED`] of its own intervals (and at least
    /// [`STALE_AFTER_MS`]): not selected for new rollouts, shown as stale.
    pub fn is_stale(&self, now_ms: u64) -> bool {
        let allowed = (self.interval_ms.saturating_mul(STALE_AFTER_MISSED)).max(STALE_AFTER_MS);
        now_ms.saturating_sub(self.last_seen_ms) >= allowed
    }

    pub fn report(&self, app: &str) -> Option<&AppReport> {
        self.apps.iter().find(|a| a.app == app)
    }
}

/// The least time without a check-in after which an agent is stale, whatever its interval.
pub const STALE_AFTER_MS: u64 = 30_000;

/// A clock further off than this is flagged: it decides which releases an agent deems expired.
pub const CLOCK_SKEW_FLAGGED_S: i64 = 60;

/// How many of its own check-in intervals an agent may miss before it is stale.
pub const STALE_AFTER_MISSED: u64 = 3;

/// What one agent should run for one app.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Assignment {
    pub agent_id: String,
    pub app: String,
    pub version: String,
    pub service: ServiceSpec,
    pub rollout_id: Option<i64>,
}

/// `muscle-deploy undeploy`: tombstones for each of `agent_ids` that has `app` assigned or
/// reports running it (`reporting`), unless a rollout of the app is in progress.
pub struct Undeploy<'a> {
    pub app: &'a str,
    pub agent_ids: &'a [String],
    pub reporting: &'a BTreeSet<String>,
    /// Also withdraw the app's standing rollouts (an undeploy from every agent), at this time.
    pub withdraw_at_ms: Option<u64>,
}

/// What [`Store::undeploy`] did.
#[derive(Debug)]
pub enum Undeployed {
    /// The agents it was taken off, and the rollouts that no longer stand for new agents.
    From {
        agents: Vec<String>,
        withdrawn: Vec<i64>,
    },
    /// Nothing: this rollout of the app is in progress and would assign it again.
    RolloutInProgress {
        id: i64,
        status: crate::rollout::Status,
    },
}

impl Undeploy<'_> {
    /// The app's rollout in progress, which would assign it again: nothing is taken off then.
    pub fn blocked_by(rollouts: &[Rollout]) -> Option<Undeployed> {
        let active = rollouts.iter().find(|r| r.status.is_active())?;
        Some(Undeployed::RolloutInProgress {
            id: active.id,
            status: active.status,
        })
    }

    /// Marks the app's standing rollouts withdrawn (every one: were an older one left
    /// standing, new agents would get its version); returns them, to be saved.
    pub fn withdraw<'r>(&self, rollouts: &'r mut [Rollout]) -> Vec<&'r Rollout> {
        let Some(at_ms) = self.withdraw_at_ms else {
            return vec![];
        };
        let mut withdrawn = vec![];
        for standing in rollouts.iter_mut().filter(|r| r.is_standing()) {
            standing.withdrawn_ms = Some(at_ms);
            standing.message = format!("{} (withdrawn by undeploy)", standing.message);
            withdrawn.push(&*standing);
        }
        withdrawn
    }
}

/// What one engine step changes; see [`Store::commit_step`].
pub struct Step<'a> {
    pub rollout: &'a Rollout,
    /// The rollout as the step read it: the step commits only if the store still holds exactly
    /// that (an `undeploy` may have withdrawn it meanwhile).
    pub from: &'a Rollout,
    /// Whether `rollout` changed and must be saved.
    pub save_rollout: bool,
    pub actions: &'a [Action],
    /// The request this step answered (applied or refused).
    pub handled: Option<Request>,
}

pub trait Store:
    AccessStore + BootStore + HistoryStore + JobStore + LogStore + Send + Sync
{
    fn put_release(&self, release: &ReleaseRecord) -> Result<PutOutcome>;
    fn release(&self, app: &str, version: &str) -> Result<Option<ReleaseRecord>>;
    fn releases(&self) -> Result<Vec<ReleaseRecord>>;

    /// Records a check-in and returns the agent's desired generation.
    /// Records a check-in. One that changes nothing but the agent's last-seen time, clock skew
    /// and health durations may be kept in memory until [`flush_checkins`](Self::flush_checkins).
    fn record_checkin(&self, req: &CheckinRequest, now_ms: u64) -> Result<Recorded>;
    /// Writes the check-ins kept in memory; returns how many.
    fn flush_checkins(&self) -> Result<usize>;
    fn agents(&self) -> Result<Vec<AgentRecord>>;
    /// The sha256 of an enrolled agent's credential.
    fn credential_sha256(&self, agent_id: &str) -> Result<Option<String>>;
    /// Sets the credential of a recorded agent that has none; false when it already has one.
    fn set_credential(&self, agent_id: &str, credential_sha256: &str) -> Result<bool>;

    fn assignments(&self, agent_id: &str) -> Result<Vec<Assignment>>;
    fn assignment(&self, agent_id: &str, app: &str) -> Result<Option<Assignment>>;
    /// Records that a probe (a new agent binary) of `agent_id` checked in with this nonce.
    fn record_probe(&self, agent_id: &str, nonce_sha256: &str, now_ms: u64) -> Result<()>;
    /// Whether the probe with this nonce checked in; each answer is given once.
    fn take_probe(&self, agent_id: &str, nonce_sha256: &str) -> Result<bool>;
    /// Whether `agent_id` has `app` assigned or taken off (a tombstone): if not, it is new to it.
    fn holds(&self, agent_id: &str, app: &str) -> Result<bool>;
    /// The apps taken off an agent (tombstones), until one is assigned to it again.
    fn removals(&self, agent_id: &str) -> Result<Vec<String>>;
    /// Takes an app off agents, in one transaction; see [`Undeploy`].
    fn undeploy(&self, u: &Undeploy) -> Result<Undeployed>;

    fn create_rollout(&self, rollout: &Rollout) -> Result<i64>;
    /// One engine step, in one transaction: the assignments it makes, the rollout's new state,
    /// and (when the step answered one) the removal of the request it handled. A crash can
    /// leave the store before or after a step, never in the middle.
    /// Returns false, committing nothing, when the rollout changed since the step read it.
    fn commit_step(&self, step: &Step) -> Result<bool>;
    /// Queues a request for the engine (which owns the body).
    fn request_rollout(&self, id: i64, request: Request) -> Result<()>;
    /// Every queued request, oldest rollout first. A request stays queued until the step
    /// that handles it commits.
    fn rollout_requests(&self) -> Result<Vec<(i64, Request)>>;
    fn rollout(&self, id: i64) -> Result<Option<Rollout>>;
    fn rollouts(&self) -> Result<Vec<Rollout>>;

    /// Whether this process may run the rollout engine now. Replicas sharing a database hold
    /// a lease in turn; one that dies loses it with its connection.
    fn engine_lease(&self) -> Result<EngineLease>;
}

/// Who runs the rollout engine on this store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EngineLease {
    /// This process alone serves the store (the embedded SQLite).
    Sole,
    /// This replica holds the lease; `taken` at this call.
    Held { taken: bool },
    /// Another replica holds it.
    Elsewhere,
}

/// What putting a blob did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlobPut {
    Stored,
    /// An intact copy was there already.
    AlreadyThere,
    /// A damaged copy was there and was replaced.
    Repaired,
}

/// What re-hashing a stored blob found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BlobCheck {
    Intact,
    Missing,
    /// Its content no longer hashes to its name.
    Damaged {
        found: String,
    },
    /// Reading it failed (a bad sector, permissions): as good as damaged.
    Unreadable {
        error: String,
    },
}

/// A blob opened for reading, checked against its name.
pub struct BlobFile {
    pub file: std::fs::File,
    pub len: u64,
}

pub trait BlobStore: Send + Sync {
    /// Stores `bytes` under their sha256 and returns the hex digest. A stored copy is re-hashed,
    /// never trusted by its size: a damaged one is replaced.
    fn put(&self, bytes: &[u8]) -> Result<(String, BlobPut)>;
    /// Opens a blob to serve it, or fails with [`StoreError::Damaged`]: a blob whose content
    /// does not hash to its name is never served.
    fn open(&self, sha256: &str) -> Result<Option<BlobFile>>;
    /// Re-hashes one blob.
    fn check(&self, sha256: &str) -> Result<BlobCheck>;
    /// The names of every stored blob.
    fn list(&self) -> Result<Vec<String>>;
}
