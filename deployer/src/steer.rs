//! `rollout start|status|pause|resume|abort|rollback` and `undeploy`: steering what the fleet
//! runs, from the command line, on the local store.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use muscle_protocol::{Name, ReleaseManifest, ServiceSpec};

use crate::cli::{RolloutCommand, StartArgs};
use crate::rollout::{self, Params, Request, Rollout, Status};
use crate::store::{self, Store};
use crate::{engine, now_ms, views};

pub fn rollout_command(cmd: RolloutCommand, store: &dyn Store) -> Result<()> {
    match cmd {
        RolloutCommand::Start(args) => start(args, store),
        RolloutCommand::Status { id, watch, json } => status(id, watch, json, store),
        RolloutCommand::Pause { id } => request(store, id, Request::Pause),
        RolloutCommand::Resume { id } => request(store, id, Request::Resume),
        RolloutCommand::Abort { id } => request(store, id, Request::Abort),
        RolloutCommand::Rollback { id } => request(store, id, Request::Rollback),
    }
}

fn start(args: StartArgs, store: &dyn Store) -> Result<()> {
    let Some(release) = store.release(&args.app, &args.version)? else {
        let known: Vec<String> = store
            .releases()?
            .into_iter()
            .filter(|r| r.app == args.app)
            .map(|r| r.version)
            .collect();
        bail!("{} {} is not published (published versions: {}); run `muscle-deploy publish dist/{}-{}` first", args.app, args.version, if known.is_empty() { "none".into() } else { known.join(", ") }, args.app, args.version);
    };
    let signed = ReleaseManifest::parse(release.manifest.as_bytes())
        .with_context(|| format!("the stored manifest of {} {}", args.app, args.version))?
        .service;
    let mut service = match (&args.service, &signed) {
        (Some(path), _) => ServiceSpec::read_file(path)?,
        (None, Some(spec)) => spec.clone(),
        (None, None) => ServiceSpec::default(),
    };
    if let Some(d) = args.min_healthy_time {
        service.min_healthy_time = d;
    }
    if let Some(d) = args.healthy_deadline {
        service.healthy_deadline = d;
    }
    service.validate()?;
    if signed.as_ref().is_some_and(|s| *s != service) {
        eprintln!(
            "note: {} {} carries a signed service spec; agents that pin release keys run it, not \
             this rollout's --service/timings",
            args.app, args.version
        );
    }
    let active: Vec<Rollout> = store
        .rollouts()?
        .into_iter()
        .filter(|r| r.app == args.app && r.status.is_active())
        .collect();
    if !active.is_empty() && !args.supersede {
        bail!(
            "rollout {} of {} is still {:?}; wait for it, abort it, or pass --supersede",
            active[0].id,
            args.app,
            active[0].status
        );
    }
    let params = Params {
        selector: args.selector.into_iter().collect::<BTreeMap<_, _>>(),
        canary_per_arch: args.canary_per_arch,
        max_parallel: args.max_parallel.max(1),
        min_healthy_time: service.min_healthy_time,
        healthy_deadline: service.healthy_deadline,
        progress_deadline: args.progress_deadline,
        max_failures: args.max_failures.max(1),
        auto_rollback: args.auto_rollback,
    };
    let rollout = Rollout::plan(
        &args.app,
        &args.version,
        service,
        params,
        &store.agents()?,
        now_ms(),
    )
    .map_err(anyhow::Error::msg)?;
    check_artifacts(&release.manifest, &rollout)?;
    for old in &active {
        store.request_rollout(old.id, Request::Supersede)?;
    }
    let id = store.create_rollout(&rollout)?;
    crate::access::record(
        store,
        store::Change::RolloutStart {
            rollout: id,
            app: args.app.to_string(),
            version: args.version.to_string(),
        },
    )?;
    let waves: Vec<String> = rollout
        .waves
        .iter()
        .map(|w| format!("{} ({})", w.name, w.members.len()))
        .collect();
    println!(
        "rollout {id}: {} {} to {} agents in waves: {}",
        args.app,
        args.version,
        rollout.members().count(),
        waves.join(", ")
    );
    Ok(())
}

/// Every selected agent must find a binary of its architecture in the release.
fn check_artifacts(manifest: &str, rollout: &Rollout) -> Result<()> {
    let manifest = ReleaseManifest::parse(manifest.as_bytes())?;
    let binary = rollout.service.binary_name(&rollout.app);
    let missing: Vec<String> = rollout
        .members()
        .filter(|m| manifest.artifact(binary, &m.arch).is_none())
        .map(|m| format!("{} ({})", m.agent_id, m.arch))
        .collect();
    if !missing.is_empty() {
        let have: Vec<String> = manifest
            .artifacts
            .iter()
            .map(|a| format!("{}/{}", a.arch, a.binary))
            .collect();
        bail!(
            "{} {} has no `{binary}` binary for agents {}; the release has {}",
            rollout.app,
            rollout.version,
            missing.join(", "),
            have.join(", ")
        );
    }
    Ok(())
}

/// Queues `what` after checking it against the rollout's transition table now: an illegal
/// request is refused here, with the reason, not dropped later by the engine.
fn request(store: &dyn Store, id: i64, what: Request) -> Result<()> {
    ask(store, id, what, &crate::access::local_who()).map_err(anyhow::Error::msg)?;
    println!(
        "rollout {id}: {} requested; the deployer applies it at its next tick",
        what.as_str()
    );
    Ok(())
}

/// Why a rollout request was not queued.
#[derive(Debug, thiserror::Error)]
pub enum AskError {
    #[error("there is no rollout {0}; `muscle-deploy rollout status` lists the newest")]
    NoSuchRollout(i64),
    #[error("{0}")]
    NotNow(String),
    #[error(transparent)]
    Store(#[from] store::StoreError),
}

/// Queues `what` for rollout `id` if its state allows it, and records it as `who`'s: what the
/// CLI and the API both do.
pub fn ask(store: &dyn Store, id: i64, what: Request, who: &str) -> Result<(), AskError> {
    let rollout = store.rollout(id)?.ok_or(AskError::NoSuchRollout(id))?;
    rollout.check_request(what).map_err(AskError::NotNow)?;
    let newer = engine::newer_rollout(store, &rollout)?;
    rollout
        .check_rollback_is_newest(what, newer)
        .map_err(AskError::NotNow)?;
    store.request_rollout(id, what)?;
    store.record(&store::AuditEntry {
        at_ms: now_ms(),
        who: who.to_owned(),
        change: store::Change::RolloutRequest {
            rollout: id,
            request: what,
        },
    })?;
    Ok(())
}

fn status(id: Option<i64>, watch: bool, json: bool, store: &dyn Store) -> Result<()> {
    let find = |store: &dyn Store| -> Result<Rollout> {
        let found = match id {
            Some(id) => store.rollout(id)?,
            None => store.rollouts()?.pop(),
        };
        found.with_context(|| match id {
            Some(id) => format!("there is no rollout {id}"),
            None => "there are no rollouts yet; start one with `muscle-deploy rollout start APP VERSION`".into(),
        })
    };
    if watch && json {
        return watch_json(store, &find);
    }
    if watch {
        return watch_rollout(store, &find);
    }
    let rollout = find(store)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&rollout)?);
    } else {
        print!("{}", views::rollout_summary(&rollout));
    }
    Ok(())
}

/// The rollout as one JSON line each time it changes, until it ends (`--watch --json`).
fn watch_json(store: &dyn Store, find: &dyn Fn(&dyn Store) -> Result<Rollout>) -> Result<()> {
    let mut last: Option<Rollout> = None;
    loop {
        let r = find(store)?;
        if last.as_ref() != Some(&r) {
            println!("{}", serde_json::to_string(&r)?);
            last = Some(r.clone());
        }
        if !r.status.is_active() {
            return ended(&r);
        }
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// A watch exits 0 only for a clean success.
fn ended(r: &Rollout) -> Result<()> {
    if r.status == Status::Succeeded {
        Ok(())
    } else {
        bail!("rollout {} ended {:?}", r.id, r.status)
    }
}

/// Progress bars per wave (healthy members of members), until the rollout ends.
fn watch_rollout(store: &dyn Store, find: &dyn Fn(&dyn Store) -> Result<Rollout>) -> Result<()> {
    use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
    let first = find(store)?;
    let multi = MultiProgress::new();
    let style = ProgressStyle::with_template("{prefix:>10} [{bar:24}] {pos}/{len} {wide_msg}")
        .expect("valid template")
        .progress_chars("=> ");
    let bars: Vec<ProgressBar> = first
        .waves
        .iter()
        .map(|w| {
            let bar = multi.add(ProgressBar::new(w.members.len() as u64));
            bar.set_style(style.clone());
            bar.set_prefix(w.name.clone());
            bar
        })
        .collect();
    let on_terminal = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let mut last_message = String::new();
    loop {
        let r = find(store)?;
        for (bar, wave) in bars.iter().zip(&r.waves) {
            bar.set_position(wave.count(rollout::MemberState::Healthy) as u64);
            let failed = wave.count(rollout::MemberState::Failed);
            bar.set_message(if failed > 0 {
                format!("{failed} failed")
            } else {
                String::new()
            });
        }
        if r.message != last_message {
            if !on_terminal {
                eprintln!("rollout {}: {:?}: {}", r.id, r.status, r.message);
            }
            last_message = r.message.clone();
        }
        if !r.status.is_active() {
            bars.iter().for_each(ProgressBar::abandon);
            print!("{}", views::rollout_summary(&r));
            return ended(&r);
        }
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// `muscle-deploy undeploy`: tombstones for the matching agents that have the app assigned or
/// report running it; from every agent, it also withdraws the app's standing rollout. Refused
/// while a rollout of the app is in progress (it would assign it again).
pub fn undeploy(store: &dyn Store, app: &Name, selector: Vec<(String, String)>) -> Result<()> {
    if app.as_str() == muscle_protocol::SELF_APP {
        bail!("{app} is the agent itself: it cannot be undeployed (roll out the version to run)");
    }
    let selector: BTreeMap<String, String> = selector.into_iter().collect();
    let agents: Vec<_> = store
        .agents()?
        .into_iter()
        .filter(|a| rollout::selects(&selector, a))
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
        withdraw_at_ms: selector.is_empty().then(now_ms),
    })?;
    let (removed, withdrawn) = match outcome {
        store::Undeployed::From { agents, withdrawn } => (agents, withdrawn),
        store::Undeployed::RolloutInProgress { id, status } => bail!(
            "rollout {id} of {app} is {status:?}: abort it first (`muscle-deploy rollout abort {id}`)"
        ),
    };
    if !removed.is_empty() || !withdrawn.is_empty() {
        crate::access::record(
            store,
            store::Change::Undeploy {
                app: app.to_string(),
                agents: removed.clone(),
            },
        )?;
    }
    if !withdrawn.is_empty() {
        let ids: Vec<String> = withdrawn.iter().map(i64::to_string).collect();
        println!(
            "rollout(s) {} of {app} withdrawn: agents that join later do not get it",
            ids.join(", ")
        );
    }
    if removed.is_empty() && withdrawn.is_empty() {
        bail!(
            "no agent{} has {app} assigned or running: nothing to undeploy",
            if selector.is_empty() {
                ""
            } else {
                " matching the selector"
            }
        );
    }
    if !removed.is_empty() {
        println!(
            "{app} taken off {} agent(s): {} (each stops and uninstalls it at its next check-in)",
            removed.len(),
            removed.join(", ")
        );
    }
    Ok(())
}
