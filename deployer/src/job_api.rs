//! The agents' side of jobs and log requests: `POST /v1/jobs/poll` (a long poll that hands an
//! agent its jobs and log requests), `POST /v1/jobs/result` and `POST /v1/logs/batch`.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::Json;
use muscle_protocol::{
    JobOffers, JobPoll, JobReport, LogAck, LogBatch, MAX_JOB_OUTPUT, MAX_LOG_BATCH,
};
use serde::de::DeserializeOwned;

use crate::now_ms;
use crate::server::{check_agent_credential, internal, ApiError, Server};
use crate::store::Store;

/// How long a poll is held when there is nothing for the agent (under the agent's read
/// timeout and the server's request deadline).
pub const POLL_HOLD: Duration = Duration::from_secs(20);

/// How often the store is asked whether another process (the CLI) changed it; a new job or
/// log request reaches a waiting agent within this.
pub const WATCH_EVERY: Duration = Duration::from_millis(200);

/// Wakes the waiting polls: when the CLI changed the store (a new job or log request), and
/// when a job's target finished here (its place may go to the next agent).
#[derive(Clone)]
pub struct JobWake {
    tx: Arc<tokio::sync::watch::Sender<u64>>,
    /// Polls held at once: each holds a connection, so at most half of them, leaving the rest
    /// for check-ins. Polls past it are answered at once.
    holds: Arc<tokio::sync::Semaphore>,
}

impl JobWake {
    /// Starts watching `store` for changes made elsewhere.
    pub fn watch(store: Arc<dyn Store>, max_connections: usize) -> JobWake {
        let (tx, _) = tokio::sync::watch::channel(0);
        let wake = JobWake {
            tx: Arc::new(tx),
            holds: Arc::new(tokio::sync::Semaphore::new((max_connections / 2).max(1))),
        };
        let bump = wake.clone();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(WATCH_EVERY);
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut seen = None;
            loop {
                every.tick().await;
                let store = store.clone();
                let version = tokio::task::spawn_blocking(move || store.changed_elsewhere()).await;
                if let Ok(Ok(version)) = version {
                    if seen.replace(version).is_some_and(|v| v != version) {
                        bump.bump();
                    }
                }
            }
        });
        wake
    }

    pub fn bump(&self) {
        self.tx.send_modify(|n| *n = n.wrapping_add(1));
    }
}

fn parse<T: DeserializeOwned>(what: &str, body: &[u8]) -> Result<T, ApiError> {
    let de = &mut serde_json::Deserializer::from_slice(body);
    serde_path_to_error::deserialize(de)
        .map_err(|e| ApiError(StatusCode::BAD_REQUEST, format!("invalid {what} body: {e}")))
}

pub async fn poll(
    State(s): State<Server>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<JobOffers>, ApiError> {
    let poll: JobPoll = parse("job poll", &body)?;
    check_agent_credential(&s, &headers, &poll.agent_id)?;
    // Past the holds available, the poll is answered at once (the agent asks again shortly).
    let hold = s.job_wake.holds.clone().try_acquire_owned().ok();
    let deadline = tokio::time::Instant::now()
        + if hold.is_some() {
            POLL_HOLD
        } else {
            Duration::ZERO
        };
    let mut changes = s.job_wake.tx.subscribe();
    loop {
        changes.mark_unchanged();
        let store = s.store.clone();
        let agent = poll.agent_id.to_string();
        let offers = tokio::task::spawn_blocking(move || -> crate::store::Result<_> {
            // Every woken poll asks; only those with something waiting write.
            if !store.has_offers(&agent)? {
                return Ok(JobOffers::default());
            }
            let now = now_ms();
            Ok(JobOffers {
                jobs: store.claim_jobs(&agent, now)?,
                logs: store.claim_log_requests(&agent, now)?,
            })
        })
        .await
        .map_err(internal)?
        .map_err(internal)?;
        if !offers.jobs.is_empty() || !offers.logs.is_empty() {
            return Ok(Json(offers));
        }
        match tokio::time::timeout_at(deadline, changes.changed()).await {
            Ok(Ok(())) => continue,
            _ => return Ok(Json(JobOffers::default())),
        }
    }
}

pub async fn result(
    State(s): State<Server>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<StatusCode, ApiError> {
    let report: JobReport = parse("job result", &body)?;
    check_agent_credential(&s, &headers, &report.agent_id)?;
    if report.stdout.len() > MAX_JOB_OUTPUT || report.stderr.len() > MAX_JOB_OUTPUT {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            format!("job output is limited to {MAX_JOB_OUTPUT} bytes per stream"),
        ));
    }
    let store = s.store.clone();
    let recorded = tokio::task::spawn_blocking(move || store.finish_job(&report, now_ms()))
        .await
        .map_err(internal)?
        .map_err(internal)?;
    if recorded {
        s.job_wake.bump();
        Ok(StatusCode::NO_CONTENT)
    } else {
        // Unknown, not this agent's, or reported already: nothing to record, nothing to retry.
        Err(ApiError(
            StatusCode::CONFLICT,
            "this agent is not running that job (unknown, or its result is in already)".into(),
        ))
    }
}

pub async fn log_batch(
    State(s): State<Server>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<LogAck>, ApiError> {
    let batch: LogBatch = parse("log batch", &body)?;
    check_agent_credential(&s, &headers, &batch.agent_id)?;
    let bytes: usize = batch.lines.iter().map(String::len).sum();
    if bytes > MAX_LOG_BATCH {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            format!("a log batch holds at most {MAX_LOG_BATCH} bytes of lines, this one {bytes}"),
        ));
    }
    let store = s.store.clone();
    let more = tokio::task::spawn_blocking(move || store.append_log_batch(&batch, now_ms()))
        .await
        .map_err(internal)?
        .map_err(internal)?;
    match more {
        Some(more) => Ok(Json(LogAck { more })),
        None => Err(ApiError(
            StatusCode::CONFLICT,
            "this agent is not sending that log (unknown, or it ended)".into(),
        )),
    }
}
