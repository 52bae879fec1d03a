//! The rollout engine: applies queued requests and advances every running rollout, persisting
//! each step, so a deployer restarted at any moment resumes where it was.

use std::cell::{OnceCell, RefCell};
use std::collections::{BTreeMap, BTreeSet};

use muscle_protocol::ReleaseManifest;

use crate::rollout::{Action, Rollout, Status};
use crate::store::{AgentRecord, Assignment, Result, Step, Store};

/// One engine step over every rollout. Returns the messages of rollouts whose state changed.
/// Each rollout's step (assignments, its new state, the request it answered) commits as one
/// transaction. A record one rollout cannot read holds that rollout, logged every tick; a
/// failing store stops the tick with its error.
pub fn tick(store: &dyn Store, now_ms: u64) -> Result<Vec<String>> {
    let mut log = Vec::new();
    for (id, request) in store.rollout_requests()? {
        let Some(mut rollout) = store.rollout(id)? else {
            continue;
        };
        let original = rollout.clone();
        let newer = newer_rollout(store, &rollout)?;
        let applied = rollout
            .check_rollback_is_newest(request, newer)
            .and_then(|()| rollout.apply_request(request, now_ms));
        let (actions, line, applied) = match applied {
            Ok(actions) => (actions, format!("rollout {id}: {}", rollout.message), true),
            Err(why) => (vec![], format!("rollout {id}: {why}"), false),
        };
        // A refused request only leaves the queue.
        store.commit_step(&Step {
            rollout: &rollout,
            from: &original,
            save_rollout: applied,
            actions: &actions,
            handled: Some(request),
        })?;
        log.push(line);
    }
    let mut rollouts = store.rollouts()?;
    // Nothing to advance and nobody to admit: the fleet need not be read (on a large one, over
    // the wire, that read is most of a step).
    if !rollouts.iter().any(Rollout::is_standing) {
        return Ok(log);
    }
    let agents: BTreeMap<String, _> = store
        .agents()?
        .into_iter()
        .map(|a| (a.id.clone(), a))
        .collect();
    for rollout in rollouts.iter_mut().filter(|r| r.status == Status::Running) {
        let before = rollout.clone();
        let app = rollout.app.clone();
        let failed = RefCell::new(None);
        let previous = |agent: &str| {
            last_known_good(store, agents.get(agent), agent, &app).unwrap_or_else(|e| {
                failed.borrow_mut().get_or_insert(e);
                None
            })
        };
        let actions = rollout.advance(&agents, now_ms, &previous);
        if let Some(e) = failed.into_inner() {
            // This rollout waits (and says why); the others, rollbacks included, go on.
            log.push(format!("rollout {}: cannot advance: {e}", rollout.id));
            *rollout = before;
            continue;
        }
        if *rollout == before && actions.is_empty() {
            continue;
        }
        if !store.commit_step(&Step {
            rollout,
            from: &before,
            save_rollout: *rollout != before,
            actions: &actions,
            handled: None,
        })? {
            *rollout = before;
            continue;
        }
        if rollout.message != before.message || rollout.status != before.status {
            log.push(format!(
                "rollout {} ({} {}): {:?}: {}",
                rollout.id, rollout.app, rollout.version, rollout.status, rollout.message
            ));
        }
    }
    log.extend(admit_late_joiners(store, rollouts, &agents, now_ms)?);
    Ok(log)
}

/// The newest rollout of the same app started after `rollout`, if any.
pub fn newer_rollout(store: &dyn Store, rollout: &Rollout) -> Result<Option<i64>> {
    Ok(store
        .rollouts()?
        .iter()
        .filter(|r| r.app == rollout.app && r.id > rollout.id)
        .map(|r| r.id)
        .max())
}

/// Each app's standing rollout (the newest) takes in the agents that newly match its selector.
fn admit_late_joiners(
    store: &dyn Store,
    rollouts: Vec<Rollout>,
    agents: &BTreeMap<String, AgentRecord>,
    now_ms: u64,
) -> Result<Vec<String>> {
    let mut standing: BTreeMap<String, Rollout> = BTreeMap::new();
    for r in rollouts.into_iter().filter(Rollout::is_standing) {
        if standing.get(&r.app).is_none_or(|s| s.id < r.id) {
            standing.insert(r.app.clone(), r);
        }
    }
    let mut log = Vec::new();
    for mut rollout in standing.into_values() {
        // Only for a candidate (a live, matching non-member; most ticks there is none): the
        // release's arches, read once, and one lookup per candidate.
        let failed = RefCell::new(None);
        let arches: OnceCell<BTreeSet<String>> = OnceCell::new();
        let app = rollout.app.clone();
        let before = rollout.clone();
        let eligible = |a: &AgentRecord| {
            let arches = arches.get_or_init(|| {
                release_arches(store, &before).unwrap_or_else(|e| {
                    failed.borrow_mut().get_or_insert(e);
                    BTreeSet::new()
                })
            });
            arches.contains(&a.arch)
                && !store.holds(&a.id, &app).unwrap_or_else(|e| {
                    failed.borrow_mut().get_or_insert(e);
                    true
                })
        };
        let actions = rollout.admit_late_joiners(agents, now_ms, &eligible);
        if let Some(e) = failed.into_inner() {
            log.push(format!(
                "rollout {}: cannot admit late joiners: {e}",
                rollout.id
            ));
            continue;
        }
        if actions.is_empty() && rollout == before {
            continue;
        }
        let committed = store.commit_step(&Step {
            rollout: &rollout,
            from: &before,
            save_rollout: rollout != before,
            actions: &actions,
            handled: None,
        })?;
        if !committed {
            continue;
        }
        let joined: Vec<&str> = match actions.is_empty() {
            false => actions
                .iter()
                .map(|Action::Assign { agent_id, .. }| agent_id.as_str())
                .collect(),
            true => rollout.waves[before.waves.len()..]
                .iter()
                .flat_map(|w| w.members.iter().map(|m| m.agent_id.as_str()))
                .collect(),
        };
        log.push(format!(
            "rollout {} ({} {}): late joiner(s) {} {}",
            rollout.id,
            rollout.app,
            rollout.version,
            joined.join(", "),
            if actions.is_empty() {
                "added as new waves"
            } else {
                "assigned it"
            }
        ));
    }
    Ok(log)
}

/// The architectures the rollout's release has its binary for: late joiners of others would
/// only fail.
fn release_arches(store: &dyn Store, rollout: &Rollout) -> Result<BTreeSet<String>> {
    let Some(release) = store.release(&rollout.app, &rollout.version)? else {
        return Ok(BTreeSet::new());
    };
    let Ok(manifest) = ReleaseManifest::parse(release.manifest.as_bytes()) else {
        return Ok(BTreeSet::new());
    };
    let spec = manifest.service.as_ref().unwrap_or(&rollout.service);
    let binary = spec.binary_name(&rollout.app).to_owned();
    Ok(manifest
        .artifacts
        .iter()
        .filter(|a| a.binary == binary.as_str())
        .map(|a| a.arch.clone())
        .collect())
}

/// What a rollback sends `agent_id` back to for `app`: the version it last ran healthy (the one
/// its agent reports committed), never merely its last assignment, which may be a version that
/// failed there. `None` when it never ran the app healthy: the app is then removed.
fn last_known_good(
    store: &dyn Store,
    agent: Option<&AgentRecord>,
    agent_id: &str,
    app: &str,
) -> Result<Option<Assignment>> {
    let Some(good) = agent
        .and_then(|a| a.report(app))
        .and_then(|r| r.installed_version.clone())
    else {
        return Ok(None);
    };
    let assigned = store.assignment(agent_id, app)?;
    if let Some(a) = assigned.as_ref().filter(|a| a.version == good.as_str()) {
        return Ok(Some(a.clone()));
    }
    // Assigned something else since: run the good version with the spec its release signed,
    // else the one the agent was last given. (A stored manifest that no longer parses was
    // checked at publish; its spec is then simply not used.)
    let signed = store
        .release(app, &good)?
        .and_then(|r| ReleaseManifest::parse(r.manifest.as_bytes()).ok())
        .and_then(|m| m.service);
    let service = signed
        .or_else(|| assigned.map(|a| a.service))
        .unwrap_or_default();
    Ok(Some(Assignment {
        agent_id: agent_id.to_owned(),
        app: app.to_owned(),
        version: good.to_string(),
        service,
        rollout_id: None,
    }))
}
