//! The rollout engine: applies queued requests and advances every running rollout, persisting
//! each step, so a deployer restarted at any moment resumes where it was.

use std::collections::BTreeMap;

use crate::rollout::{Action, Status};
use crate::store::{Result, Store};

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
        let previous = |agent: &str| store.assignment(agent, &app).ok().flatten();
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
