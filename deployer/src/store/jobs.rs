//! Jobs in the store: each order with its targets, and each target's state and report.

use muscle_protocol::{JobId, JobOffer, JobOrder, JobReport};
use rusqlite::{params, OptionalExtension};
use serde::Serialize;

use super::{Result, SqliteStore, StoreError};

/// A job as the operator made it.
#[derive(Debug, Clone, Serialize)]
pub struct JobRecord {
    pub id: JobId,
    pub created_ms: u64,
    /// The order exactly as signed.
    pub order_json: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub signature: Option<String>,
    pub selector: Vec<(String, String)>,
    /// How many targets run it at once.
    pub max_parallel: u32,
    /// After this, targets without a result are [`TargetState::Lost`].
    pub deadline_ms: u64,
    /// The order's timeout: a target running longer than this and [`REPORT_SLACK_MS`] is lost
    /// (its agent died), and its place goes to the next.
    pub timeout_ms: u64,
}

/// Beside a job's timeout: time for an agent to pick the job up and report it.
pub const REPORT_SLACK_MS: u64 = 15_000;

/// Jobs are deleted this long after they were made.
pub const JOBS_KEPT_MS: u64 = 30 * 24 * 3600 * 1000;

impl JobRecord {
    pub fn order(&self) -> Result<JobOrder> {
        serde_json::from_str(&self.order_json)
            .map_err(|e| StoreError::Corrupt(format!("job {}: {e}", self.id)))
    }
}

/// Where one agent is with one job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum TargetState {
    Pending,
    /// Handed to the agent.
    Running {
        started_ms: u64,
    },
    Done {
        finished_ms: u64,
        report: Box<JobReport>,
    },
    /// No result by the job's deadline.
    Lost,
}

impl TargetState {
    pub fn finished(&self) -> bool {
        matches!(self, TargetState::Done { .. } | TargetState::Lost)
    }

    pub fn succeeded(&self) -> bool {
        matches!(self, TargetState::Done { report, .. } if report.outcome.succeeded())
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct JobTarget {
    pub agent_id: String,
    pub arch: String,
    #[serde(flatten)]
    pub state: TargetState,
}

pub trait JobStore {
    fn create_job(&self, job: &JobRecord, targets: &[(String, String)]) -> Result<()>;
    /// Whether a job or a log request waits for `agent_id` (cheap: what a woken poll asks
    /// before it claims anything).
    fn has_offers(&self, agent_id: &str) -> Result<bool>;
    /// Hands `agent_id` its pending jobs, as many as each job's `max_parallel` allows now,
    /// marking them running (one transaction: two pollers never both take a slot). Targets
    /// running past their job's timeout and slack are lost first, freeing their places.
    fn claim_jobs(&self, agent_id: &str, now_ms: u64) -> Result<Vec<JobOffer>>;
    /// Records a report; false when that agent was not running that job (unknown, finished).
    fn finish_job(&self, report: &JobReport, now_ms: u64) -> Result<bool>;
    /// Marks as lost the targets of jobs past their deadline without a result, and targets
    /// running past their job's timeout and slack.
    fn expire_jobs(&self, now_ms: u64) -> Result<()>;
    /// Every job, newest first.
    fn jobs(&self) -> Result<Vec<JobRecord>>;
    fn job(&self, id: &str) -> Result<Option<(JobRecord, Vec<JobTarget>)>>;
    /// Changes whenever another process (the CLI) committed to the store: long polls look
    /// again then.
    fn changed_elsewhere(&self) -> Result<u64>;
}

/// A `jobs` row as stored: id, created_ms, order_json, signature, selector, max_parallel,
/// deadline_ms.
pub(super) type JobRow = (String, i64, String, Option<String>, String, i64, i64, i64);

fn job_row(r: &rusqlite::Row) -> rusqlite::Result<JobRow> {
    Ok((
        r.get(0)?,
        r.get(1)?,
        r.get(2)?,
        r.get(3)?,
        r.get(4)?,
        r.get(5)?,
        r.get(6)?,
        r.get(7)?,
    ))
}

pub(super) fn job_record(row: JobRow) -> Result<JobRecord> {
    let (id, created_ms, order_json, signature, selector, max_parallel, deadline_ms, timeout_ms) =
        row;
    let id = JobId::try_from(id).map_err(StoreError::Corrupt)?;
    let selector = serde_json::from_str(&selector)
        .map_err(|e| StoreError::Corrupt(format!("job {id}: selector: {e}")))?;
    Ok(JobRecord {
        id,
        created_ms: created_ms as u64,
        order_json,
        signature,
        selector,
        max_parallel: max_parallel as u32,
        deadline_ms: deadline_ms as u64,
        timeout_ms: timeout_ms as u64,
    })
}

/// A `job_targets` row: agent_id, arch, state, started_ms, finished_ms, report.
type TargetRow = (
    String,
    String,
    String,
    Option<i64>,
    Option<i64>,
    Option<String>,
);

pub(super) const JOB_COLUMNS: &str =
    "id, created_ms, order_json, signature, selector, max_parallel, deadline_ms, timeout_ms";

/// Loses the targets of ended jobs, and those running past their timeout and slack.
fn expire_in(conn: &rusqlite::Connection, now_ms: u64) -> rusqlite::Result<()> {
    conn.prepare_cached(
        "UPDATE job_targets SET state = 'lost', finished_ms = ?1
         WHERE state IN ('pending', 'running')
           AND job_id IN (SELECT id FROM jobs WHERE deadline_ms <= ?1)",
    )?
    .execute([now_ms as i64])?;
    conn.prepare_cached(
        "UPDATE job_targets SET state = 'lost', finished_ms = ?1
         WHERE state = 'running'
           AND started_ms + ?2 + (SELECT timeout_ms FROM jobs WHERE id = job_id) <= ?1",
    )?
    .execute([now_ms as i64, REPORT_SLACK_MS as i64])?;
    Ok(())
}

impl JobStore for SqliteStore {
    fn create_job(&self, job: &JobRecord, targets: &[(String, String)]) -> Result<()> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let old = job.created_ms.saturating_sub(JOBS_KEPT_MS) as i64;
        tx.execute(
            "DELETE FROM job_targets WHERE job_id IN (SELECT id FROM jobs WHERE created_ms < ?1)",
            [old],
        )?;
        tx.execute("DELETE FROM jobs WHERE created_ms < ?1", [old])?;
        tx.execute(
            "INSERT INTO jobs (id, created_ms, order_json, signature, selector, max_parallel, deadline_ms, timeout_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            params![
                job.id.as_str(),
                job.created_ms as i64,
                job.order_json,
                job.signature,
                serde_json::to_string(&job.selector).expect("strings serialise"),
                i64::from(job.max_parallel),
                job.deadline_ms as i64,
                job.timeout_ms as i64
            ],
        )?;
        for (agent, arch) in targets {
            tx.execute(
                "INSERT INTO job_targets (job_id, agent_id, arch, state) VALUES (?1, ?2, ?3, 'pending')",
                params![job.id.as_str(), agent, arch],
            )?;
        }
        tx.commit()?;
        Ok(())
    }

    fn has_offers(&self, agent_id: &str) -> Result<bool> {
        let conn = self.conn();
        let waiting = conn
            .prepare_cached(
                "SELECT EXISTS (SELECT 1 FROM job_targets WHERE agent_id = ?1 AND state = 'pending')
                     OR EXISTS (SELECT 1 FROM log_requests WHERE agent_id = ?1 AND state = 'pending')",
            )?
            .query_row([agent_id], |r| r.get(0))?;
        Ok(waiting)
    }

    fn claim_jobs(&self, agent_id: &str, now_ms: u64) -> Result<Vec<JobOffer>> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        expire_in(&tx, now_ms)?;
        let candidates: Vec<(String, String, Option<String>)> = tx
            .prepare_cached(
                "SELECT j.id, j.order_json, j.signature FROM job_targets t JOIN jobs j ON j.id = t.job_id
                 WHERE t.agent_id = ?1 AND t.state = 'pending' AND j.deadline_ms > ?2
                   AND (SELECT count(*) FROM job_targets r WHERE r.job_id = j.id AND r.state = 'running') < j.max_parallel
                 ORDER BY j.created_ms",
            )?
            .query_map(params![agent_id, now_ms as i64], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })?
            .collect::<rusqlite::Result<_>>()?;
        let mut offers = Vec::new();
        for (id, order, signature) in candidates {
            tx.execute(
                "UPDATE job_targets SET state = 'running', started_ms = ?3 WHERE job_id = ?1 AND agent_id = ?2",
                params![id, agent_id, now_ms as i64],
            )?;
            offers.push(JobOffer { order, signature });
        }
        tx.commit()?;
        Ok(offers)
    }

    fn finish_job(&self, report: &JobReport, now_ms: u64) -> Result<bool> {
        let changed = self.conn().execute(
            "UPDATE job_targets SET state = 'done', finished_ms = ?3, report = ?4
             WHERE job_id = ?1 AND agent_id = ?2 AND state = 'running'",
            params![
                report.job_id.as_str(),
                report.agent_id.as_str(),
                now_ms as i64,
                serde_json::to_string(report).expect("a report serialises")
            ],
        )?;
        Ok(changed == 1)
    }

    fn expire_jobs(&self, now_ms: u64) -> Result<()> {
        expire_in(&self.conn(), now_ms)?;
        Ok(())
    }

    fn jobs(&self) -> Result<Vec<JobRecord>> {
        let conn = self.conn();
        let rows: Vec<_> = conn
            .prepare(&format!(
                "SELECT {JOB_COLUMNS} FROM jobs ORDER BY created_ms DESC"
            ))?
            .query_map([], job_row)?
            .collect::<rusqlite::Result<_>>()?;
        rows.into_iter().map(job_record).collect()
    }

    fn job(&self, id: &str) -> Result<Option<(JobRecord, Vec<JobTarget>)>> {
        let conn = self.conn();
        let Some(row) = conn
            .query_row(
                &format!("SELECT {JOB_COLUMNS} FROM jobs WHERE id = ?1"),
                [id],
                job_row,
            )
            .optional()?
        else {
            return Ok(None);
        };
        let job = job_record(row)?;
        let rows: Vec<TargetRow> = conn
            .prepare(
                "SELECT agent_id, arch, state, started_ms, finished_ms, report FROM job_targets
                 WHERE job_id = ?1 ORDER BY agent_id",
            )?
            .query_map([id], |r| {
                Ok((
                    r.get(0)?,
                    r.get(1)?,
                    r.get(2)?,
                    r.get(3)?,
                    r.get(4)?,
                    r.get(5)?,
                ))
            })?
            .collect::<rusqlite::Result<_>>()?;
        let targets = rows
            .into_iter()
            .map(|(agent_id, arch, state, started, finished, report)| {
                let state = target_state(&state, started, finished, report)
                    .map_err(|e| StoreError::Corrupt(format!("job {id}, agent {agent_id}: {e}")))?;
                Ok(JobTarget {
                    agent_id,
                    arch,
                    state,
                })
            })
            .collect::<Result<_>>()?;
        Ok(Some((job, targets)))
    }

    fn changed_elsewhere(&self) -> Result<u64> {
        Ok(self
            .conn()
            .query_row("PRAGMA data_version", [], |r| r.get::<_, i64>(0))? as u64)
    }
}

pub(super) fn target_state(
    state: &str,
    started: Option<i64>,
    finished: Option<i64>,
    report: Option<String>,
) -> Result<TargetState, String> {
    Ok(match (state, started, finished, report) {
        ("pending", ..) => TargetState::Pending,
        ("running", Some(s), ..) => TargetState::Running {
            started_ms: s as u64,
        },
        ("done", _, Some(f), Some(report)) => TargetState::Done {
            finished_ms: f as u64,
            report: Box::new(serde_json::from_str(&report).map_err(|e| e.to_string())?),
        },
        ("lost", ..) => TargetState::Lost,
        (other, ..) => return Err(format!("unknown target state {other:?}")),
    })
}
