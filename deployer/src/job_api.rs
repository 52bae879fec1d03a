//! The agents' side of jobs and log requests: `POST /v1/jobs/poll` (a long poll that hands an
//! agent its jobs and log requests), `POST /v1/jobs/result` and `POST /v1/logs/batch`.

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

/// How often the store is asked whether jobs changed; a new job reaches a waiting agent within
/// this (jobs are made by the CLI, another process).
pub const WATCH_EVERY: Duration = Duration::from_millis(200);

/// Watches the store's jobs version and publishes it to the long polls.
pub fn watch_jobs(store: std::sync::Arc<dyn Store>) -> tokio::sync::watch::Receiver<u64> {
    let (tx, rx) = tokio::sync::watch::channel(0);
    tokio::spawn(async move {
        let mut every = tokio::time::interval(WATCH_EVERY);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            every.tick().await;
            let store = store.clone();
            if let Ok(Ok(version)) = tokio::task::spawn_blocking(move || store.jobs_version()).await
            {
                tx.send_if_modified(|v| std::mem::replace(v, version) != version);
            }
            if tx.is_closed() {
                return;
            }
        }
    });
    rx
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
    let deadline = tokio::time::Instant::now() + POLL_HOLD;
    let mut changes = s.jobs_version.clone();
    loop {
        changes.mark_unchanged();
        let store = s.store.clone();
        let agent = poll.agent_id.to_string();
        let offers = tokio::task::spawn_blocking(move || -> crate::store::Result<_> {
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
