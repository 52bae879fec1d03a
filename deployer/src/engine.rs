//! The rollout engine: applies queued requests and advances every running rollout, persisting
//! each step, so a deployer restarted at any moment resumes where it was.

use std::collections::BTreeMap;

use muscle_protocol::ReleaseManifest;

use crate::rollout::{Action, Status};
use crate::store::{AgentRecord, Assignment, Result, Store};

/// One engine step over every rollout. Returns the messages of rollouts whose state changed.
pub fn tick(store: &dyn Store, now_ms: u64) -> Result<Vec<String>> {
    let mut log = Vec::new();
    for (id, request) in store.take_rollout_requests()? {
        let Some(mut rollout) = store.rollout(id)? else {
            continue;
        };
        match rollout.apply_request(request, now_ms) {
            Ok(actions) => {
                apply(store, &actions)?;
                store.update_rollout(&rollout)?;
                log.push(format!("rollout {id}: {}", rollout.message));
            }
            Err(why) => log.push(format!("rollout {id}: {why}")),
        }
    }
    let agents: BTreeMap<String, _> = store
        .agents()?
        .into_iter()
        .map(|a| (a.id.clone(), a))
        .collect();
    for mut rollout in store
        .rollouts()?
        .into_iter()
        .filter(|r| r.status == Status::Running)
    {
        let before = rollout.clone();
        let app = rollout.app.clone();
        let previous = |agent: &str| last_known_good(store, agents.get(agent), agent, &app);
        let actions = rollout.advance(&agents, now_ms, &previous);
        apply(store, &actions)?;
        if rollout != before {
            store.update_rollout(&rollout)?;
            if rollout.message != before.message || rollout.status != before.status {
                log.push(format!(
                    "rollout {} ({} {}): {:?}: {}",
                    rollout.id, rollout.app, rollout.version, rollout.status, rollout.message
                ));
            }
        }
    }
    Ok(log)
}

/// What a rollback sends `agent_id` back to for `app`: the version it last ran healthy (the one
/// its agent reports committed), never merely its last assignment, which may be a version that
/// failed there. `None` when it never ran the app healthy: the app is then removed.
fn last_known_good(
    store: &dyn Store,
    agent: Option<&AgentRecord>,
    agent_id: &str,
    app: &str,
) -> Option<Assignment> {
    let good = agent?.report(app)?.installed_version.clone()?;
    let assigned = store.assignment(agent_id, app).ok().flatten();
    if let Some(a) = assigned.as_ref().filter(|a| a.version == good.as_str()) {
        return Some(a.clone());
    }
    // Assigned something else since: run the good version with the spec its release signed,
    // else the one the agent was last given.
    let signed = store
        .release(app, &good)
        .ok()
        .flatten()
        .and_then(|r| ReleaseManifest::parse(r.manifest.as_bytes()).ok())
        .and_then(|m| m.service);
    let service = signed
        .or_else(|| assigned.map(|a| a.service))
        .unwrap_or_default();
    Some(Assignment {
        agent_id: agent_id.to_owned(),
        app: app.to_owned(),
        version: good.to_string(),
        service,
        rollout_id: None,
    })
}

fn apply(store: &dyn Store, actions: &[Action]) -> Result<()> {
    for Action::Assign {
        agent_id,
        app,
        assignment,
    } in actions
    {
        store.assign(agent_id, app, assignment.as_ref())?;
    }
    Ok(())
}
