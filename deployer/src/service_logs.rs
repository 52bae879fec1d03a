//! `muscle-deploy logs AGENT APP`: asks the agent for its service's log through the store (the
//! agent picks the request up on its job poll) and prints the lines as they arrive.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use muscle_protocol::LogRequest;

use crate::cli::LogsArgs;
use crate::now_ms;
use crate::store::{LogState, Store};

/// How long an agent has to pick a request up, and to finish sending a tail.
const ANSWER_DEADLINE: Duration = Duration::from_secs(30);

/// How often new lines are looked for (and a follow said to be still wanted).
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
        let (state, lines) = store.log_lines(&request.id, after)?;
        for (seq, line) in lines {
            println!("{line}");
            after = seq;
        }
        match state {
            LogState::Done => return Ok(()),
            LogState::Failed(why) => bail!("agent {}: {why}", agent.id),
            LogState::Pending if asked.elapsed() > ANSWER_DEADLINE => bail!(
                "agent {} did not pick the request up within {} s: it is offline, or older than \
                 the logs command (update it with a rollout of muscle-agent)",
                agent.id,
                ANSWER_DEADLINE.as_secs()
            ),
            LogState::Streaming if !request.follow && asked.elapsed() > 2 * ANSWER_DEADLINE => {
                bail!("agent {} stopped sending the log before its end", agent.id)
            }
            _ => {}
        }
        if request.follow {
            store.still_wanted(&request.id, now_ms())?;
        }
        std::thread::sleep(READ_EVERY);
    }
}
