//! `muscle-deploy logs AGENT APP`: asks the agent for its service's log through the store (the
//! agent picks the request up on its job poll) and prints the lines as they arrive.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use muscle_protocol::{JobId, LogRequest};

use crate::cli::LogsArgs;
use crate::now_ms;
use crate::store::{LogState, Store};

/// How long an agent has to pick a request up, and to finish sending a tail.
const ANSWER_DEADLINE: Duration = Duration::from_secs(30);

/// An agent sending a log is heard from at least every 2 s: this much silence means it stopped.
const SILENCE_MS: u64 = 10_000;

/// How often new lines are looked for (and the request said to be still wanted).
const READ_EVERY: Duration = Duration::from_millis(200);

pub fn logs(args: LogsArgs, store: &dyn Store) -> Result<()> {
    let now = now_ms();
    let agent = store
        .agents()?
        .into_iter()
        .find(|a| a.id == args.agent.as_str())
        .with_context(|| format!("no agent {}: `muscle-deploy fleet` lists them", args.agent))?;
    if agent.is_stale(now) {
        eprintln!(
            "note: agent {} last checked in {} s ago; the request waits {} s for it",
            agent.id,
            now.saturating_sub(agent.last_seen_ms) / 1000,
            ANSWER_DEADLINE.as_secs()
        );
    }
    let request = LogRequest {
        id: crate::auth::new_id().context("reading /dev/urandom")?,
        app: args.app,
        tail: args.tail,
        since_unix: args.since.map(|d| (now / 1000).saturating_sub(d.as_secs())),
        follow: args.follow,
    };
    store.create_log_request(&agent.id, &request, now)?;
    let asked = Instant::now();
    let mut after = 0;
    loop {
        let progress = store.log_lines(&request.id, after)?;
        for (seq, line) in progress.lines {
            println!("{line}");
            after = seq;
        }
        let silent_ms = now_ms().saturating_sub(progress.heard_ms);
        match progress.state {
            LogState::Done => return Ok(()),
            LogState::Failed(why) => bail!("agent {}: {why}", agent.id),
            LogState::Pending if asked.elapsed() > ANSWER_DEADLINE => bail!(
                "agent {} did not pick the request up within {} s: it is offline, or older than \
                 the logs command (update it with a rollout of muscle-agent)",
                agent.id,
                ANSWER_DEADLINE.as_secs()
            ),
            // A following agent sends at least every 2 s.
            LogState::Streaming if silent_ms > SILENCE_MS => bail!(
                "agent {} stopped sending the log ({} s without a word: it restarted or went \
                 offline)",
                agent.id,
                silent_ms / 1000
            ),
            _ => {}
        }
        // Said in both modes: a request nobody reads is not picked up, nor sent on.
        store.still_wanted(&request.id, now_ms())?;
        std::thread::sleep(READ_EVERY);
    }
}

/// The lines of a tail, and why they are not all of them when they are not.
pub struct Tail {
    pub lines: Vec<String>,
    pub problem: Option<String>,
}

/// Asks `agent_id` for the last `tail` lines of `app`'s log; [`await_tail`] reads them.
pub fn ask_tail(
    store: &dyn Store,
    agent_id: &str,
    app: muscle_protocol::Name,
    tail: u32,
) -> Result<JobId> {
    let request = LogRequest {
        id: crate::auth::new_id().context("reading /dev/urandom")?,
        app,
        tail,
        since_unix: None,
        follow: false,
    };
    store.create_log_request(agent_id, &request, now_ms())?;
    Ok(request.id)
}

/// The tail asked for as `id`, waiting up to `deadline` for the agent to send it.
pub fn await_tail(
    store: &dyn Store,
    agent_id: &str,
    id: &JobId,
    deadline: Duration,
) -> Result<Tail> {
    let asked = Instant::now();
    let mut lines = Vec::new();
    let mut after = 0;
    loop {
        let progress = store.log_lines(id, after)?;
        for (seq, line) in progress.lines {
            lines.push(line);
            after = seq;
        }
        let problem = match progress.state {
            LogState::Done => None,
            LogState::Failed(why) => Some(why),
            _ if asked.elapsed() > deadline => Some(format!(
                "agent {agent_id} did not send the whole tail within {} s: it is offline or busy",
                deadline.as_secs()
            )),
            _ => {
                store.still_wanted(id, now_ms())?;
                std::thread::sleep(READ_EVERY);
                continue;
            }
        };
        return Ok(Tail { lines, problem });
    }
}
