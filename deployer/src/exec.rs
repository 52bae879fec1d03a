//! `muscle-deploy exec` (a job: one command on the matching agents, each result shown as it
//! arrives) and `muscle-deploy jobs` (jobs kept with their results).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use muscle_protocol::{JobId, JobOrder, Name};
use serde::Serialize;

use crate::cli::ExecArgs;
use crate::now_ms;
use crate::store::{JobRecord, JobTarget, Store, TargetState, REPORT_SLACK_MS};
use crate::views::table;

/// How often `exec` looks for new results.
const FOLLOW_EVERY: Duration = Duration::from_millis(200);

/// Runs `exec`; false when any agent failed, timed out, refused or never answered.
pub fn exec(args: ExecArgs, store: &dyn Store) -> Result<bool> {
    let now = now_ms();
    let selector: BTreeMap<String, String> = args.selector.iter().cloned().collect();
    let targets: Vec<(String, String)> = store
        .agents()?
        .into_iter()
        .filter(|a| crate::rollout::selects(&selector, a) && !a.is_stale(now))
        .map(|a| (a.id, a.arch))
        .collect();
    if targets.is_empty() {
        bail!(
            "no live agent matches {}: `muscle-deploy fleet` lists the agents and their labels",
            describe(&selector)
        );
    }
    let max_parallel = args
        .max_parallel
        .map_or(targets.len(), |n| n as usize)
        .clamp(1, targets.len());
    let waves = targets.len().div_ceil(max_parallel) as u32;
    let slack = Duration::from_millis(REPORT_SLACK_MS);
    let deadline_ms = now + u64::try_from(((args.timeout + slack) * waves).as_millis())?;
    let order = JobOrder {
        id: crate::auth::new_id().context("reading /dev/urandom")?,
        argv: args.command.clone(),
        timeout: args.timeout,
        not_after: deadline_ms.div_ceil(1000),
        agents: targets
            .iter()
            .map(|(id, _)| Name::parse(id))
            .collect::<Result<_, _>>()
            .context("an agent id in the store is not a valid name")?,
    };
    order.check().map_err(anyhow::Error::msg)?;
    let order_json = serde_json::to_string(&order)?;
    let signature = args
        .sign_key
        .as_deref()
        .map(|path| sign(path, &order_json))
        .transpose()?;
    let job = JobRecord {
        id: order.id.clone(),
        created_ms: now,
        order_json,
        signature,
        selector: args.selector,
        max_parallel: max_parallel as u32,
        deadline_ms,
        timeout_ms: u64::try_from(args.timeout.as_millis())?,
    };
    store.create_job(&job, &targets)?;
    crate::access::record(
        store,
        crate::store::Change::Exec {
            job: job.id.to_string(),
            argv: args.command.clone(),
            agents: targets.len(),
        },
    )?;
    eprintln!(
        "job {}: `{}` on {} agent(s), {} at a time, timeout {}{}",
        job.id,
        args.command.join(" "),
        targets.len(),
        max_parallel,
        muscle_protocol::duration::format(args.timeout),
        if job.signature.is_some() {
            ", signed"
        } else {
            ""
        }
    );
    let targets = follow(store, &job, !args.json)?;
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&JobView::new(&job, &targets)?)?
        );
    } else {
        print!("{}", results_table(&targets));
    }
    Ok(targets.iter().all(|t| t.state.succeeded()))
}

/// `jobs [ID]`: every job with its tallies, or one job's results.
pub fn jobs(id: Option<&str>, json: bool, store: &dyn Store) -> Result<()> {
    store.expire_jobs(now_ms())?;
    if let Some(id) = id {
        let (job, targets) = store
            .job(id)?
            .with_context(|| format!("no job {id}: `muscle-deploy jobs` lists them"))?;
        if json {
            println!(
                "{}",
                serde_json::to_string_pretty(&JobView::new(&job, &targets)?)?
            );
        } else {
            for t in &targets {
                print!("{}", result_text(t));
            }
            print!("{}", results_table(&targets));
        }
        return Ok(());
    }
    let mut loaded = Vec::new();
    for job in store.jobs()? {
        loaded.push(store.job(job.id.as_str())?.context("job vanished")?);
    }
    let views = loaded
        .iter()
        .map(|(job, targets)| JobView::new(job, targets))
        .collect::<Result<Vec<_>>>()?;
    if json {
        println!("{}", serde_json::to_string_pretty(&views)?);
        return Ok(());
    }
    let rows: Vec<Vec<String>> = views
        .iter()
        .map(|v| {
            let t = v.tally();
            vec![
                v.id.to_string(),
                muscle_logline::utc(v.created_ms / 1000),
                v.argv.join(" "),
                v.targets.len().to_string(),
                t[0].to_string(),
                t[1].to_string(),
                t[2].to_string(),
            ]
        })
        .collect();
    print!(
        "{}",
        table(
            &["JOB", "CREATED", "COMMAND", "AGENTS", "OK", "FAILED", "PENDING"],
            &rows
        )
    );
    Ok(())
}

/// Prints each agent's result as it arrives (when `print`), until all are in or the job's
/// deadline passes (the rest are then lost).
fn follow(store: &dyn Store, job: &JobRecord, print: bool) -> Result<Vec<JobTarget>> {
    let mut shown = BTreeSet::new();
    loop {
        store.expire_jobs(now_ms())?;
        let (_, targets) = store.job(job.id.as_str())?.context("the job vanished")?;
        for t in targets.iter().filter(|t| t.state.finished()) {
            if shown.insert(t.agent_id.clone()) && print {
                print!("{}", result_text(t));
            }
        }
        if targets.iter().all(|t| t.state.finished()) {
            return Ok(targets);
        }
        std::thread::sleep(FOLLOW_EVERY);
    }
}

fn result_text(t: &JobTarget) -> String {
    let mut out = format!("== {} ({}): {}\n", t.agent_id, t.arch, outcome(&t.state));
    if let TargetState::Done { report, .. } = &t.state {
        for line in report.stdout.lines() {
            out.push_str(&format!("   {line}\n"));
        }
        for line in report.stderr.lines() {
            out.push_str(&format!("   stderr: {line}\n"));
        }
        if report.truncated_bytes > 0 {
            out.push_str(&format!(
                "   ({} more bytes of output not kept)\n",
                report.truncated_bytes
            ));
        }
    }
    out
}

fn outcome(state: &TargetState) -> String {
    match state {
        TargetState::Pending => "pending".into(),
        TargetState::Running { .. } => "running".into(),
        TargetState::Done { report, .. } => {
            format!("{} in {} ms", report.outcome, report.duration_ms)
        }
        TargetState::Lost => "no answer by the job's deadline".into(),
    }
}

fn results_table(targets: &[JobTarget]) -> String {
    let rows: Vec<Vec<String>> = targets
        .iter()
        .map(|t| vec![t.agent_id.clone(), t.arch.clone(), outcome(&t.state)])
        .collect();
    table(&["AGENT", "ARCH", "RESULT"], &rows)
}

/// A job and its targets, as `--json` and `jobs` show them.
#[derive(Serialize)]
struct JobView<'a> {
    id: &'a JobId,
    created_ms: u64,
    argv: Vec<String>,
    timeout: String,
    signed: bool,
    selector: &'a [(String, String)],
    max_parallel: u32,
    deadline_ms: u64,
    targets: &'a [JobTarget],
}

impl<'a> JobView<'a> {
    fn new(job: &'a JobRecord, targets: &'a [JobTarget]) -> Result<JobView<'a>> {
        let order = job.order()?;
        Ok(JobView {
            id: &job.id,
            created_ms: job.created_ms,
            argv: order.argv,
            timeout: muscle_protocol::duration::format(order.timeout),
            signed: job.signature.is_some(),
            selector: &job.selector,
            max_parallel: job.max_parallel,
            deadline_ms: job.deadline_ms,
            targets,
        })
    }

    /// Succeeded, failed (or lost), not finished.
    fn tally(&self) -> [usize; 3] {
        let ok = self.targets.iter().filter(|t| t.state.succeeded()).count();
        let open = self.targets.iter().filter(|t| !t.state.finished()).count();
        [ok, self.targets.len() - ok - open, open]
    }
}

fn describe(selector: &BTreeMap<String, String>) -> String {
    if selector.is_empty() {
        return "(no selector: every agent)".into();
    }
    let parts: Vec<String> = selector.iter().map(|(k, v)| format!("{k}={v}")).collect();
    format!("the selector {}", parts.join(","))
}

/// Signs the order with the operator key at `path` (written by `muscle-deploy keygen`).
fn sign(path: &Path, order_json: &str) -> Result<String> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the signing key {}", path.display()))?;
    let key = muscle_protocol::parse_signing_key(text.trim()).with_context(|| {
        format!(
            "{}: not a key written by `muscle-deploy keygen`",
            path.display()
        )
    })?;
    Ok(muscle_protocol::sign(
        &key,
        &JobOrder::signed_bytes(order_json),
    ))
}
