//! Log requests in the store: what `muscle-deploy logs` asked an agent for, and the lines the
//! agent sent, numbered in order. Both are deleted a day later (when a new request is made).

use muscle_protocol::{JobId, LogBatch, LogRequest};
use rusqlite::{params, OptionalExtension};

use super::{Result, SqliteStore, StoreError};

/// A follow stops when the asker has not said it still reads for this long.
pub const FOLLOW_UNWANTED_AFTER_MS: u64 = 10_000;

/// Requests and their lines are deleted this long after they were made.
pub const LOG_REQUESTS_KEPT_MS: u64 = 24 * 3600 * 1000;

/// A request takes at most this many lines (an hour's follow of a chatty service); then the
/// agent is told to stop.
pub const MAX_LINES_PER_REQUEST: i64 = 100_000;

/// What a reader of a request sees.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogProgress {
    pub state: LogState,
    /// The lines after the ones asked past, in order, with their numbers.
    pub lines: Vec<(u64, String)>,
    /// When the agent last picked up or sent anything for it.
    pub heard_ms: u64,
}

/// Where a log request is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogState {
    Pending,
    /// Picked up by the agent; lines arrive.
    Streaming,
    Done,
    Failed(String),
}

pub trait LogStore {
    fn create_log_request(&self, agent_id: &str, req: &LogRequest, now_ms: u64) -> Result<()>;
    /// Hands `agent_id` the requests waiting for it (and still wanted), marking them streaming.
    fn claim_log_requests(&self, agent_id: &str, now_ms: u64) -> Result<Vec<LogRequest>>;
    /// Appends a batch; returns whether more is wanted, or `None` when that agent has no such
    /// request streaming.
    fn append_log_batch(&self, batch: &LogBatch, now_ms: u64) -> Result<Option<bool>>;
    /// The request's state and the lines after `after` (by number).
    fn log_lines(&self, id: &JobId, after: u64) -> Result<LogProgress>;
    /// The asker still reads.
    fn still_wanted(&self, id: &JobId, now_ms: u64) -> Result<()>;
}

/// The state a request ends in with `batch` (`None`: it goes on): failed on the agent's error,
/// done when the agent says so, when nobody reads any more, or at the line cap.
pub(super) fn batch_end(
    batch: &LogBatch,
    wanted_ms: u64,
    lines_before: i64,
    now_ms: u64,
) -> Option<&'static str> {
    let wanted = wanted_ms + FOLLOW_UNWANTED_AFTER_MS > now_ms
        && lines_before + (batch.lines.len() as i64) < MAX_LINES_PER_REQUEST;
    match (&batch.error, batch.done || !wanted) {
        (Some(_), _) => Some("failed"),
        (None, true) => Some("done"),
        (None, false) => None,
    }
}

pub(super) fn log_state(text: &str, error: Option<String>) -> Result<LogState> {
    Ok(match text {
        "pending" => LogState::Pending,
        "streaming" => LogState::Streaming,
        "done" => LogState::Done,
        "failed" => LogState::Failed(error.unwrap_or_default()),
        other => {
            return Err(StoreError::Corrupt(format!(
                "unknown log request state {other:?}"
            )))
        }
    })
}

impl LogStore for SqliteStore {
    fn create_log_request(&self, agent_id: &str, req: &LogRequest, now_ms: u64) -> Result<()> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let old = now_ms.saturating_sub(LOG_REQUESTS_KEPT_MS) as i64;
        tx.execute(
            "DELETE FROM log_lines WHERE request_id IN (SELECT id FROM log_requests WHERE created_ms < ?1)",
            [old],
        )?;
        tx.execute("DELETE FROM log_requests WHERE created_ms < ?1", [old])?;
        tx.execute(
            "INSERT INTO log_requests (id, agent_id, request, created_ms, wanted_ms, heard_ms, state)
             VALUES (?1, ?2, ?3, ?4, ?4, ?4, 'pending')",
            params![
                req.id.as_str(),
                agent_id,
                serde_json::to_string(req).expect("a request serialises"),
                now_ms as i64
            ],
        )?;
        tx.commit()?;
        Ok(())
    }

    fn claim_log_requests(&self, agent_id: &str, now_ms: u64) -> Result<Vec<LogRequest>> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let wanted_since = now_ms.saturating_sub(FOLLOW_UNWANTED_AFTER_MS) as i64;
        let rows: Vec<(String, String)> = tx
            .prepare_cached(
                "SELECT id, request FROM log_requests
                 WHERE agent_id = ?1 AND state = 'pending' AND wanted_ms >= ?2",
            )?
            .query_map(params![agent_id, wanted_since], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })?
            .collect::<rusqlite::Result<_>>()?;
        let mut requests = Vec::new();
        for (id, body) in rows {
            tx.execute(
                "UPDATE log_requests SET state = 'streaming', heard_ms = ?2 WHERE id = ?1",
                params![id, now_ms as i64],
            )?;
            requests.push(
                serde_json::from_str(&body)
                    .map_err(|e| StoreError::Corrupt(format!("log request {id}: {e}")))?,
            );
        }
        tx.commit()?;
        Ok(requests)
    }

    fn append_log_batch(&self, batch: &LogBatch, now_ms: u64) -> Result<Option<bool>> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let found: Option<(i64, String)> = tx
            .query_row(
                "SELECT wanted_ms, request FROM log_requests
                 WHERE id = ?1 AND agent_id = ?2 AND state = 'streaming'",
                params![batch.request_id.as_str(), batch.agent_id.as_str()],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?;
        let Some((wanted_ms, _)) = found else {
            return Ok(None);
        };
        let next: i64 = tx.query_row(
            "SELECT coalesce(max(seq), 0) FROM log_lines WHERE request_id = ?1",
            [batch.request_id.as_str()],
            |r| r.get(0),
        )?;
        for (i, line) in batch.lines.iter().enumerate() {
            tx.execute(
                "INSERT INTO log_lines (request_id, seq, line) VALUES (?1, ?2, ?3)",
                params![batch.request_id.as_str(), next + 1 + i as i64, line],
            )?;
        }
        let end = batch_end(batch, wanted_ms as u64, next, now_ms);
        tx.execute(
            "UPDATE log_requests SET state = coalesce(?2, state), error = ?3, heard_ms = ?4 WHERE id = ?1",
            params![batch.request_id.as_str(), end, batch.error, now_ms as i64],
        )?;
        tx.commit()?;
        Ok(Some(end.is_none()))
    }

    fn log_lines(&self, id: &JobId, after: u64) -> Result<LogProgress> {
        let conn = self.conn();
        let (text, error, heard_ms): (String, Option<String>, i64) = conn
            .query_row(
                "SELECT state, error, heard_ms FROM log_requests WHERE id = ?1",
                [id.as_str()],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .optional()?
            .ok_or_else(|| StoreError::Corrupt(format!("log request {id} vanished")))?;
        let lines = conn
            .prepare_cached(
                "SELECT seq, line FROM log_lines WHERE request_id = ?1 AND seq > ?2 ORDER BY seq",
            )?
            .query_map(params![id.as_str(), after as i64], |r| {
                Ok((r.get::<_, i64>(0)? as u64, r.get(1)?))
            })?
            .collect::<rusqlite::Result<_>>()?;
        Ok(LogProgress {
            state: log_state(&text, error)?,
            lines,
            heard_ms: heard_ms as u64,
        })
    }

    fn still_wanted(&self, id: &JobId, now_ms: u64) -> Result<()> {
        self.conn().execute(
            "UPDATE log_requests SET wanted_ms = ?2 WHERE id = ?1",
            params![id.as_str(), now_ms as i64],
        )?;
        Ok(())
    }
}
