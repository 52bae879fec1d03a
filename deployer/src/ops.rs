//! The changes an operator makes, done the same way for the CLI on the deployer's host and for
//! the API: start a rollout, steer it, undeploy. Each checks its request against the store,
//! makes the change and records who made it in the audit log.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use muscle_protocol::{Name, ReleaseManifest, ServiceSpec};
use serde::{Deserialize, Serialize};

use crate::rollout::{self, Params, Request, Rollout};
use crate::store::{self, AuditEntry, Change, Store, StoreError};
use crate::{engine, now_ms};

/// Why a change was not made; the API answers each with its own status.
#[derive(Debug, thiserror::Error)]
pub enum OpError {
    /// What the request names does not exist (404).
    #[error("{0}")]
    NotFound(String),
    /// The fleet's state does not allow it now (409).
    #[error("{0}")]
    Conflict(String),
    /// The request itself is wrong (422).
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// `rollout start`, as the CLI builds it and `POST /v1/rollouts` takes it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StartRequest {
    pub app: Name,
    pub version: Name,
    /// The service spec (the CLI reads `--service` where it runs); default: the spec signed
    /// into the release, else running the binary named like the app.
    #[serde(default)]
    pub service: Option<ServiceSpec>,
    #[serde(default)]
    pub selector: BTreeMap<String, String>,
    pub canary_per_arch: usize,
    pub max_parallel: usize,
    #[serde(default)]
    pub min_healthy_time_ms: Option<u64>,
    #[serde(default)]
    pub healthy_deadline_ms: Option<u64>,
    pub progress_deadline_ms: u64,
    pub max_failures: u32,
    pub auto_rollback: bool,
    /// Replace the app's active rollout instead of refusing to start.
    pub supersede: bool,
}

/// A rollout that was started.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Started {
    pub id: i64,
    pub app: String,
    pub version: String,
    pub agents: usize,
    /// Each wave's name and size, in order.
    pub waves: Vec<(String, usize)>,
    /// Things the operator should know (the release's signed spec wins on key-pinning agents).
    pub notes: Vec<String>,
}

/// Plans and stores a rollout of a published release (or, for the app `muscle-image`, of a
/// boot image) to the matching agents.
pub fn start(store: &dyn Store, req: StartRequest, who: &str) -> Result<Started, OpError> {
    if req.app.as_str() == muscle_protocol::IMAGE_APP {
        return crate::images::start_rollout(store, req, who);
    }
    let release = store.release(&req.app, &req.version)?.ok_or_else(|| {
        let known: Vec<String> = store
            .releases()
            .unwrap_or_default()
            .into_iter()
            .filter(|r| r.app == req.app)
            .map(|r| r.version)
            .collect();
        OpError::NotFound(format!(
            "{} {} is not published (published versions: {}); publish dist/{}-{} first",
            req.app,
            req.version,
            if known.is_empty() {
                "none".into()
            } else {
                known.join(", ")
            },
            req.app,
            req.version
        ))
    })?;
    let manifest = ReleaseManifest::parse(release.manifest.as_bytes()).map_err(|e| {
        OpError::Conflict(format!(
            "the stored manifest of {} {} does not parse ({e}): re-publish it",
            req.app, req.version
        ))
    })?;
    let signed = manifest.service.clone();
    let service = timed_spec(&req, req.service.clone().or_else(|| signed.clone()))?;
    let mut notes = Vec::new();
    if signed.as_ref().is_some_and(|s| *s != service) {
        notes.push(format!(
            "{} {} carries a signed service spec; agents that pin release keys run it, not this \
             rollout's --service/timings",
            req.app, req.version
        ));
    }
    let agents = store.agents()?;
    launch(store, req, service, &agents, notes, who, |rollout| {
        check_artifacts(&manifest, rollout)
    })
}

/// `spec` (default: run the binary named like the app) with the request's timings, validated.
pub(crate) fn timed_spec(
    req: &StartRequest,
    spec: Option<ServiceSpec>,
) -> Result<ServiceSpec, OpError> {
    let mut service = spec.unwrap_or_default();
    if let Some(ms) = req.min_healthy_time_ms {
        service.min_healthy_time = Duration::from_millis(ms);
    }
    if let Some(ms) = req.healthy_deadline_ms {
        service.healthy_deadline = Duration::from_millis(ms);
    }
    service
        .validate()
        .map_err(|e| OpError::Invalid(format!("the service spec: {e}")))?;
    Ok(service)
}

/// Plans the rollout over `agents`, has `check` look at its members, and stores it, superseding
/// the app's active rollout if the request says so.
pub(crate) fn launch(
    store: &dyn Store,
    req: StartRequest,
    service: ServiceSpec,
    agents: &[store::AgentRecord],
    notes: Vec<String>,
    who: &str,
    check: impl Fn(&Rollout) -> Result<(), OpError>,
) -> Result<Started, OpError> {
    let active: Vec<Rollout> = store
        .rollouts()?
        .into_iter()
        .filter(|r| r.app == req.app && r.status.is_active())
        .collect();
    if let (Some(first), false) = (active.first(), req.supersede) {
        return Err(OpError::Conflict(format!(
            "rollout {} of {} is still {:?}; wait for it, abort it, or pass --supersede",
            first.id, req.app, first.status
        )));
    }
    let params = Params {
        selector: req.selector,
        canary_per_arch: req.canary_per_arch,
        max_parallel: req.max_parallel.max(1),
        min_healthy_time: service.min_healthy_time,
        healthy_deadline: service.healthy_deadline,
        progress_deadline: Duration::from_millis(req.progress_deadline_ms),
        max_failures: req.max_failures.max(1),
        auto_rollback: req.auto_rollback,
    };
    let rollout = Rollout::plan(&req.app, &req.version, service, params, agents, now_ms())
        .map_err(OpError::Invalid)?;
    check(&rollout)?;
    for old in &active {
        store.request_rollout(old.id, Request::Supersede)?;
    }
    let id = store.create_rollout(&rollout)?;
    record(
        store,
        who,
        Change::RolloutStart {
            rollout: id,
            app: req.app.to_string(),
            version: req.version.to_string(),
        },
    )?;
    Ok(Started {
        id,
        app: req.app.to_string(),
        version: req.version.to_string(),
        agents: rollout.members().count(),
        waves: rollout
            .waves
            .iter()
            .map(|w| (w.name.clone(), w.members.len()))
            .collect(),
        notes,
    })
}

/// Every selected agent must find a binary of its architecture in the release.
fn check_artifacts(manifest: &ReleaseManifest, rollout: &Rollout) -> Result<(), OpError> {
    let binary = rollout.service.binary_name(&rollout.app);
    let missing: Vec<String> = rollout
        .members()
        .filter(|m| manifest.artifact(binary, &m.arch).is_none())
        .map(|m| format!("{} ({})", m.agent_id, m.arch))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    let have: Vec<String> = manifest
        .artifacts
        .iter()
        .map(|a| format!("{}/{}", a.arch, a.binary))
        .collect();
    Err(OpError::Invalid(format!(
        "{} {} has no `{binary}` binary for agents {}; the release has {}",
        rollout.app,
        rollout.version,
        missing.join(", "),
        have.join(", ")
    )))
}

/// Queues `what` for rollout `id` after checking it against the rollout's transition table now
/// (an illegal request is refused here, with the reason, not dropped later by the engine).
pub fn ask(store: &dyn Store, id: i64, what: Request, who: &str) -> Result<(), OpError> {
    let rollout = store.rollout(id)?.ok_or_else(|| {
        OpError::NotFound(format!(
            "there is no rollout {id}; `muscle-deploy rollout status` shows the newest"
        ))
    })?;
    rollout.check_request(what).map_err(OpError::Conflict)?;
    let newer = engine::newer_rollout(store, &rollout)?;
    rollout
        .check_rollback_is_newest(what, newer)
        .map_err(OpError::Conflict)?;
    store.request_rollout(id, what)?;
    record(
        store,
        who,
        Change::RolloutRequest {
            rollout: id,
            request: what,
        },
    )
}

/// `undeploy`, as the CLI builds it and `POST /v1/undeploy` takes it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UndeployRequest {
    pub app: Name,
    #[serde(default)]
    pub selector: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Undeployed {
    /// Agents told to stop and uninstall the app.
    pub agents: Vec<String>,
    /// The app's standing rollouts, withdrawn so that agents joining later do not get it.
    pub withdrawn: Vec<i64>,
}

/// Tombstones for the matching agents that have the app assigned or report running it; with no
/// selector, the app's standing rollouts are withdrawn too. Refused while a rollout of the app
/// is in progress (it would assign it again).
pub fn undeploy(
    store: &dyn Store,
    req: &UndeployRequest,
    who: &str,
) -> Result<Undeployed, OpError> {
    let app = &req.app;
    if app.as_str() == muscle_protocol::SELF_APP {
        return Err(OpError::Invalid(format!(
            "{app} is the agent itself: it cannot be undeployed (roll out the version to run)"
        )));
    }
    if app.as_str() == muscle_protocol::IMAGE_APP {
        return Err(OpError::Invalid(format!(
            "{app} is what network-booted machines boot: it cannot be undeployed (roll out the image version to run)"
        )));
    }
    let agents: Vec<_> = store
        .agents()?
        .into_iter()
        .filter(|a| rollout::selects(&req.selector, a))
        .collect();
    let chosen: Vec<String> = agents.iter().map(|a| a.id.clone()).collect();
    let reporting: BTreeSet<String> = agents
        .iter()
        .filter(|a| a.report(app).is_some_and(|r| r.installed_version.is_some()))
        .map(|a| a.id.clone())
        .collect();
    let outcome = store.undeploy(&store::Undeploy {
        app,
        agent_ids: &chosen,
        reporting: &reporting,
        withdraw_at_ms: req.selector.is_empty().then(now_ms),
    })?;
    let (removed, withdrawn) = match outcome {
        store::Undeployed::From { agents, withdrawn } => (agents, withdrawn),
        store::Undeployed::RolloutInProgress { id, status } => {
            return Err(OpError::Conflict(format!(
                "rollout {id} of {app} is {status:?}: abort it first (`muscle-deploy rollout abort {id}`)"
            )))
        }
    };
    if removed.is_empty() && withdrawn.is_empty() {
        return Err(OpError::NotFound(format!(
            "no agent{} has {app} assigned or running: nothing to undeploy",
            if req.selector.is_empty() {
                ""
            } else {
                " matching the selector"
            }
        )));
    }
    record(
        store,
        who,
        Change::Undeploy {
            app: app.to_string(),
            agents: removed.clone(),
        },
    )?;
    Ok(Undeployed {
        agents: removed,
        withdrawn,
    })
}

/// Writes `change` to the audit log as `who`'s, made now.
pub fn record(store: &dyn Store, who: &str, change: Change) -> Result<(), OpError> {
    store.record(&AuditEntry {
        at_ms: now_ms(),
        who: who.to_owned(),
        change,
    })?;
    Ok(())
}
