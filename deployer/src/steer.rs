//! `rollout start|status|pause|resume|abort|rollback` and `undeploy`: steering what the fleet
//! runs, from the command line, on the local store or through `--server`.

use std::time::Duration;

use anyhow::{bail, Context, Result};
use muscle_protocol::{Name, ServiceSpec};

use crate::cli::{RolloutCommand, StartArgs};
use crate::control::{Control, Which};
use crate::ops::{StartRequest, UndeployRequest};
use crate::rollout::{self, Request, Rollout, Status};
use crate::views;

pub fn rollout_command(cmd: RolloutCommand, control: &dyn Control) -> Result<()> {
    match cmd {
        RolloutCommand::Start(args) => start(args, control),
        RolloutCommand::Status { id, watch, json } => status(id, watch, json, control),
        RolloutCommand::Pause { id } => request(control, id, Request::Pause),
        RolloutCommand::Resume { id } => request(control, id, Request::Resume),
        RolloutCommand::Abort { id } => request(control, id, Request::Abort),
        RolloutCommand::Rollback { id } => request(control, id, Request::Rollback),
    }
}

fn start(args: StartArgs, control: &dyn Control) -> Result<()> {
    // The spec file is read where the command runs; the deployer checks it.
    let service = args
        .service
        .as_deref()
        .map(ServiceSpec::read_file)
        .transpose()?;
    let millis = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
    let started = control.start_rollout(StartRequest {
        app: args.app,
        version: args.version,
        service,
        selector: args.selector.into_iter().collect(),
        canary_per_arch: args.canary_per_arch,
        max_parallel: args.max_parallel,
        min_healthy_time_ms: args.min_healthy_time.map(millis),
        healthy_deadline_ms: args.healthy_deadline.map(millis),
        progress_deadline_ms: millis(args.progress_deadline),
        max_failures: args.max_failures,
        auto_rollback: args.auto_rollback,
        supersede: args.supersede,
    })?;
    for note in &started.notes {
        eprintln!("note: {note}");
    }
    let waves: Vec<String> = started
        .waves
        .iter()
        .map(|(name, size)| format!("{name} ({size})"))
        .collect();
    println!(
        "rollout {}: {} {} to {} agents in waves: {}",
        started.id,
        started.app,
        started.version,
        started.agents,
        waves.join(", ")
    );
    Ok(())
}

/// Queues `what`; the deployer checks it against the rollout's state now and refuses an illegal
/// request with the reason.
fn request(control: &dyn Control, id: i64, what: Request) -> Result<()> {
    control.ask(id, what)?;
    println!(
        "rollout {id}: {} requested; the deployer applies it at its next tick",
        what.as_str()
    );
    Ok(())
}

fn status(id: Option<i64>, watch: bool, json: bool, control: &dyn Control) -> Result<()> {
    let which = id.map_or(Which::Newest, Which::Id);
    let find = |control: &dyn Control| -> Result<Rollout> {
        control.rollout(which)?.with_context(|| match id {
            Some(id) => format!("there is no rollout {id}"),
            None => "there are no rollouts yet; start one with `muscle-deploy rollout start APP VERSION`".into(),
        })
    };
    if watch && json {
        return watch_json(control, &find);
    }
    if watch {
        return watch_rollout(control, &find);
    }
    let rollout = find(control)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&rollout)?);
    } else {
        print!("{}", views::rollout_summary(&rollout));
    }
    Ok(())
}

type Find<'a> = &'a dyn Fn(&dyn Control) -> Result<Rollout>;

/// The rollout as one JSON line each time it changes, until it ends (`--watch --json`).
fn watch_json(control: &dyn Control, find: Find) -> Result<()> {
    let mut last: Option<Rollout> = None;
    loop {
        let r = find(control)?;
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
fn watch_rollout(control: &dyn Control, find: Find) -> Result<()> {
    use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
    let first = find(control)?;
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
        let r = find(control)?;
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

/// `muscle-deploy undeploy`: the matching agents stop and uninstall the app; with no selector,
/// agents that join later do not get it either.
pub fn undeploy(control: &dyn Control, app: Name, selector: Vec<(String, String)>) -> Result<()> {
    let done = control.undeploy(&UndeployRequest {
        app: app.clone(),
        selector: selector.into_iter().collect(),
    })?;
    if !done.withdrawn.is_empty() {
        let ids: Vec<String> = done.withdrawn.iter().map(i64::to_string).collect();
        println!(
            "rollout(s) {} of {app} withdrawn: agents that join later do not get it",
            ids.join(", ")
        );
    }
    if !done.agents.is_empty() {
        println!(
            "{app} taken off {} agent(s): {} (each stops and uninstalls it at its next check-in)",
            done.agents.len(),
            done.agents.join(", ")
        );
    }
    Ok(())
}
