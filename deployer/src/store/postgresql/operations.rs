//! The operators' records in PostgreSQL: tokens and the audit log, agents' history, jobs,
//! log requests, boot images and tokens. Same rows and rules as SQLite's (see the traits' modules).

use muscle_protocol::{JobId, JobOffer, JobReport, LogBatch, LogRequest};

use super::{lock_writes, text, PgStore};
use crate::store::access::{role, AccessStore, AuditEntry, TokenRecord};
use crate::store::boot::{self, BootStore, ImageRecord, IMAGE_COLUMNS};
use crate::store::history::{AgentEvent, AgentEventRecord, HistoryStore, EVENTS_KEPT_PER_AGENT};
use crate::store::jobs::{
    job_record, target_state, JobRecord, JobRow, JobStore, JobTarget, JOBS_KEPT_MS, JOB_COLUMNS,
    REPORT_SLACK_MS,
};
use crate::store::logs::{
    batch_end, log_state, LogProgress, LogStore, FOLLOW_UNWANTED_AFTER_MS, LOG_REQUESTS_KEPT_MS,
};
use crate::store::off_async;
use crate::store::{json, parse, PutOutcome, Result, Role, StoreError};

/// Bumped by every job and log request made, so that another replica's long polls look again
/// (what SQLite's `data_version` tells between processes).
const OFFERS_COUNTER: &str = "offers";

fn bump_offers(tx: &mut postgres::Transaction) -> Result<()> {
    tx.execute(
        "INSERT INTO counters (name, value) VALUES ($1, 1)
         ON CONFLICT (name) DO UPDATE SET value = counters.value + 1",
        &[&OFFERS_COUNTER],
    )?;
    Ok(())
}

impl AccessStore for PgStore {
    fn create_token(&self, name: &str, role: Role, sha256: &str, now_ms: u64) -> Result<bool> {
        off_async(|| {
            let inserted = self.conn()?.execute(
                "INSERT INTO tokens (name, role, sha256, created_ms) VALUES ($1, $2, $3, $4)
                 ON CONFLICT DO NOTHING",
                &[&name, &role.as_str(), &sha256, &(now_ms as i64)],
            )?;
            Ok(inserted == 1)
        })
    }

    fn revoke_token(&self, name: &str) -> Result<bool> {
        off_async(|| {
            Ok(self
                .conn()?
                .execute("DELETE FROM tokens WHERE name = $1", &[&name])?
                == 1)
        })
    }

    fn tokens(&self) -> Result<Vec<TokenRecord>> {
        off_async(|| {
            let rows = self.conn()?.query(
                "SELECT name, role, created_ms FROM tokens ORDER BY name",
                &[],
            )?;
            rows.iter()
                .map(|r| {
                    Ok(TokenRecord {
                        name: r.get(0),
                        role: role(r.get(1))?,
                        created_ms: r.get::<_, i64>(2) as u64,
                    })
                })
                .collect()
        })
    }

    fn token(&self, sha256: &str) -> Result<Option<(String, Role)>> {
        off_async(|| {
            let row = self.conn()?.query_opt(
                "SELECT name, role FROM tokens WHERE sha256 = $1",
                &[&sha256],
            )?;
            row.map(|r| Ok((r.get(0), role(r.get(1))?))).transpose()
        })
    }

    fn record(&self, entry: &AuditEntry) -> Result<()> {
        off_async(|| {
            self.conn()?.execute(
                "INSERT INTO audit (at_ms, who, change) VALUES ($1, $2, $3)",
                &[&(entry.at_ms as i64), &entry.who, &json(&entry.change)],
            )?;
            Ok(())
        })
    }

    fn audit(&self, limit: usize) -> Result<Vec<AuditEntry>> {
        off_async(|| {
            let rows = self.conn()?.query(
                "SELECT at_ms, who, change FROM audit ORDER BY seq DESC LIMIT $1",
                &[&(limit as i64)],
            )?;
            let mut entries = rows
                .iter()
                .map(|r| {
                    Ok(AuditEntry {
                        at_ms: r.get::<_, i64>(0) as u64,
                        who: r.get(1),
                        change: parse("audit entry", r.get(2))?,
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            entries.reverse();
            Ok(entries)
        })
    }
}

impl HistoryStore for PgStore {
    fn add_events(&self, agent_id: &str, at_ms: u64, events: &[AgentEvent]) -> Result<()> {
        off_async(|| {
            if events.is_empty() {
                return Ok(());
            }
            let mut conn = self.conn()?;
            let mut tx = conn.transaction()?;
            for e in events {
                tx.execute(
                    "INSERT INTO agent_events (agent_id, at_ms, body) VALUES ($1, $2, $3)",
                    &[&agent_id, &(at_ms as i64), &json(e)],
                )?;
            }
            tx.execute(
                "DELETE FROM agent_events WHERE agent_id = $1 AND id <= (
                     SELECT id FROM agent_events WHERE agent_id = $1 ORDER BY id DESC LIMIT 1 OFFSET $2)",
                &[&agent_id, &EVENTS_KEPT_PER_AGENT],
            )?;
            tx.commit()?;
            Ok(())
        })
    }

    fn events(&self, agent_id: &str, limit: usize) -> Result<Vec<AgentEventRecord>> {
        off_async(|| {
            let rows = self.conn()?.query(
                "SELECT at_ms, body FROM agent_events WHERE agent_id = $1 ORDER BY id DESC LIMIT $2",
                &[&agent_id, &(limit as i64)],
            )?;
            let mut out = rows
                .iter()
                .map(|r| {
                    Ok(AgentEventRecord {
                        at_ms: r.get::<_, i64>(0) as u64,
                        event: parse("agent event", r.get(1))?,
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            out.reverse();
            Ok(out)
        })
    }
}

/// Loses the targets of ended jobs, and those running past their timeout and slack.
fn expire_in(tx: &mut postgres::Transaction, now_ms: u64) -> Result<()> {
    let now = now_ms as i64;
    tx.execute(
        "UPDATE job_targets SET state = 'lost', finished_ms = $1
         WHERE state IN ('pending', 'running')
           AND job_id IN (SELECT id FROM jobs WHERE deadline_ms <= $1)",
        &[&now],
    )?;
    tx.execute(
        "UPDATE job_targets SET state = 'lost', finished_ms = $1
         WHERE state = 'running'
           AND started_ms + $2 + (SELECT timeout_ms FROM jobs WHERE id = job_id) <= $1",
        &[&now, &(REPORT_SLACK_MS as i64)],
    )?;
    Ok(())
}

fn job_row(r: &postgres::Row) -> JobRow {
    (
        r.get(0),
        r.get(1),
        r.get(2),
        r.get(3),
        r.get(4),
        r.get(5),
        r.get(6),
        r.get(7),
    )
}

impl JobStore for PgStore {
    fn create_job(&self, job: &JobRecord, targets: &[(String, String)]) -> Result<()> {
        off_async(|| {
            let mut conn = self.conn()?;
            let mut tx = conn.transaction()?;
            let old = job.created_ms.saturating_sub(JOBS_KEPT_MS) as i64;
            tx.execute(
                "DELETE FROM job_targets WHERE job_id IN (SELECT id FROM jobs WHERE created_ms < $1)",
                &[&old],
            )?;
            tx.execute("DELETE FROM jobs WHERE created_ms < $1", &[&old])?;
            tx.execute(
                "INSERT INTO jobs (id, created_ms, order_json, signature, selector, max_parallel, deadline_ms, timeout_ms)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
                &[
                    &job.id.as_str(),
                    &(job.created_ms as i64),
                    &job.order_json,
                    &job.signature,
                    &json(&job.selector),
                    &i64::from(job.max_parallel),
                    &(job.deadline_ms as i64),
                    &(job.timeout_ms as i64),
                ],
            )?;
            for (agent, arch) in targets {
                tx.execute(
                    "INSERT INTO job_targets (job_id, agent_id, arch, state) VALUES ($1, $2, $3, 'pending')",
                    &[&job.id.as_str(), agent, arch],
                )?;
            }
            bump_offers(&mut tx)?;
            tx.commit()?;
            Ok(())
        })
    }

    fn has_offers(&self, agent_id: &str) -> Result<bool> {
        off_async(|| {
            Ok(self
                .conn()?
                .query_one(
                    "SELECT EXISTS (SELECT 1 FROM job_targets WHERE agent_id = $1 AND state = 'pending')
                         OR EXISTS (SELECT 1 FROM log_requests WHERE agent_id = $1 AND state = 'pending')",
                    &[&agent_id],
                )?
                .get(0))
        })
    }

    fn claim_jobs(&self, agent_id: &str, now_ms: u64) -> Result<Vec<JobOffer>> {
        off_async(|| {
            let mut conn = self.conn()?;
            let mut tx = conn.transaction()?;
            // Two pollers (on any replica) never both take a job's last slot.
            lock_writes(&mut tx)?;
            expire_in(&mut tx, now_ms)?;
            let candidates = tx.query(
                "SELECT j.id, j.order_json, j.signature FROM job_targets t JOIN jobs j ON j.id = t.job_id
                 WHERE t.agent_id = $1 AND t.state = 'pending' AND j.deadline_ms > $2
                   AND (SELECT count(*) FROM job_targets r WHERE r.job_id = j.id AND r.state = 'running') < j.max_parallel
                 ORDER BY j.created_ms",
                &[&agent_id, &(now_ms as i64)],
            )?;
            let mut offers = Vec::new();
            for row in candidates {
                let id: &str = row.get(0);
                tx.execute(
                    "UPDATE job_targets SET state = 'running', started_ms = $3 WHERE job_id = $1 AND agent_id = $2",
                    &[&id, &agent_id, &(now_ms as i64)],
                )?;
                offers.push(JobOffer {
                    order: row.get(1),
                    signature: row.get(2),
                });
            }
            tx.commit()?;
            Ok(offers)
        })
    }

    fn finish_job(&self, report: &JobReport, now_ms: u64) -> Result<bool> {
        off_async(|| {
            let mut conn = self.conn()?;
            let mut tx = conn.transaction()?;
            let changed = tx.execute(
                "UPDATE job_targets SET state = 'done', finished_ms = $3, report = $4
                 WHERE job_id = $1 AND agent_id = $2 AND state = 'running'",
                &[
                    &report.job_id.as_str(),
                    &report.agent_id.as_str(),
                    &(now_ms as i64),
                    &json(report),
                ],
            )?;
            // A slot freed: polls held on other replicas look again.
            bump_offers(&mut tx)?;
            tx.commit()?;
            Ok(changed == 1)
        })
    }

    fn expire_jobs(&self, now_ms: u64) -> Result<()> {
        off_async(|| {
            let mut conn = self.conn()?;
            let mut tx = conn.transaction()?;
            expire_in(&mut tx, now_ms)?;
            tx.commit()?;
            Ok(())
        })
    }

    fn jobs(&self) -> Result<Vec<JobRecord>> {
        off_async(|| {
            let rows = self.conn()?.query(
                &format!("SELECT {JOB_COLUMNS} FROM jobs ORDER BY created_ms DESC"),
                &[],
            )?;
            rows.iter().map(|r| job_record(job_row(r))).collect()
        })
    }

    fn job(&self, id: &str) -> Result<Option<(JobRecord, Vec<JobTarget>)>> {
        off_async(|| {
            let mut conn = self.conn()?;
            let Some(row) = conn.query_opt(
                &format!("SELECT {JOB_COLUMNS} FROM jobs WHERE id = $1"),
                &[&id],
            )?
            else {
                return Ok(None);
            };
            let job = job_record(job_row(&row))?;
            let rows = conn.query(
                "SELECT agent_id, arch, state, started_ms, finished_ms, report FROM job_targets
                 WHERE job_id = $1 ORDER BY agent_id",
                &[&id],
            )?;
            let targets = rows
                .iter()
                .map(|r| {
                    let agent_id: String = r.get(0);
                    let state =
                        target_state(r.get(2), r.get(3), r.get(4), r.get(5)).map_err(|e| {
                            StoreError::Corrupt(format!("job {id}, agent {agent_id}: {e}"))
                        })?;
                    Ok(JobTarget {
                        agent_id,
                        arch: r.get(1),
                        state,
                    })
                })
                .collect::<Result<_>>()?;
            Ok(Some((job, targets)))
        })
    }

    fn changed_elsewhere(&self) -> Result<u64> {
        off_async(|| {
            let row = self.conn()?.query_opt(
                "SELECT value FROM counters WHERE name = $1",
                &[&OFFERS_COUNTER],
            )?;
            Ok(row.map_or(0, |r| r.get::<_, i64>(0) as u64))
        })
    }
}

impl LogStore for PgStore {
    fn create_log_request(&self, agent_id: &str, req: &LogRequest, now_ms: u64) -> Result<()> {
        off_async(|| {
            let mut conn = self.conn()?;
            let mut tx = conn.transaction()?;
            let old = now_ms.saturating_sub(LOG_REQUESTS_KEPT_MS) as i64;
            tx.execute(
                "DELETE FROM log_lines WHERE request_id IN (SELECT id FROM log_requests WHERE created_ms < $1)",
                &[&old],
            )?;
            tx.execute("DELETE FROM log_requests WHERE created_ms < $1", &[&old])?;
            tx.execute(
                "INSERT INTO log_requests (id, agent_id, request, created_ms, wanted_ms, heard_ms, state)
                 VALUES ($1, $2, $3, $4, $4, $4, 'pending')",
                &[&req.id.as_str(), &agent_id, &json(req), &(now_ms as i64)],
            )?;
            bump_offers(&mut tx)?;
            tx.commit()?;
            Ok(())
        })
    }

    fn claim_log_requests(&self, agent_id: &str, now_ms: u64) -> Result<Vec<LogRequest>> {
        off_async(|| {
            let mut conn = self.conn()?;
            let mut tx = conn.transaction()?;
            lock_writes(&mut tx)?;
            let wanted_since = now_ms.saturating_sub(FOLLOW_UNWANTED_AFTER_MS) as i64;
            let rows = tx.query(
                "SELECT id, request FROM log_requests
                 WHERE agent_id = $1 AND state = 'pending' AND wanted_ms >= $2",
                &[&agent_id, &wanted_since],
            )?;
            let mut requests = Vec::new();
            for row in rows {
                let id: &str = row.get(0);
                tx.execute(
                    "UPDATE log_requests SET state = 'streaming', heard_ms = $2 WHERE id = $1",
                    &[&id, &(now_ms as i64)],
                )?;
                requests.push(parse(&format!("log request {id}"), row.get(1))?);
            }
            tx.commit()?;
            Ok(requests)
        })
    }

    fn append_log_batch(&self, batch: &LogBatch, now_ms: u64) -> Result<Option<bool>> {
        off_async(|| {
            let mut conn = self.conn()?;
            let mut tx = conn.transaction()?;
            let id = batch.request_id.as_str();
            // The request's row lock orders its batches (one stream, one writer at a time).
            let Some(found) = tx.query_opt(
                "SELECT wanted_ms FROM log_requests
                 WHERE id = $1 AND agent_id = $2 AND state = 'streaming' FOR UPDATE",
                &[&id, &batch.agent_id.as_str()],
            )?
            else {
                return Ok(None);
            };
            let wanted_ms: i64 = found.get(0);
            let next: i64 = tx
                .query_one(
                    "SELECT coalesce(max(seq), 0) FROM log_lines WHERE request_id = $1",
                    &[&id],
                )?
                .get(0);
            // One statement for the batch; NUL, which TEXT cannot hold, as U+FFFD.
            let lines: Vec<String> = batch.lines.iter().map(|l| text(l).into_owned()).collect();
            tx.execute(
                "INSERT INTO log_lines (request_id, seq, line)
                 SELECT $1, $2 + n, line FROM unnest($3::text[]) WITH ORDINALITY AS t(line, n)",
                &[&id, &next, &lines],
            )?;
            let end = batch_end(batch, wanted_ms as u64, next, now_ms);
            tx.execute(
                "UPDATE log_requests SET state = coalesce($2, state), error = $3, heard_ms = $4 WHERE id = $1",
                &[&id, &end, &batch.error.as_deref().map(text), &(now_ms as i64)],
            )?;
            tx.commit()?;
            Ok(Some(end.is_none()))
        })
    }

    fn log_lines(&self, id: &JobId, after: u64) -> Result<LogProgress> {
        off_async(|| {
            let mut conn = self.conn()?;
            let row = conn
                .query_opt(
                    "SELECT state, error, heard_ms FROM log_requests WHERE id = $1",
                    &[&id.as_str()],
                )?
                .ok_or_else(|| StoreError::Corrupt(format!("log request {id} vanished")))?;
            let lines = conn
                .query(
                    "SELECT seq, line FROM log_lines WHERE request_id = $1 AND seq > $2 ORDER BY seq",
                    &[&id.as_str(), &(after as i64)],
                )?
                .iter()
                .map(|r| (r.get::<_, i64>(0) as u64, r.get(1)))
                .collect();
            Ok(LogProgress {
                state: log_state(row.get(0), row.get(1))?,
                lines,
                heard_ms: row.get::<_, i64>(2) as u64,
            })
        })
    }

    fn still_wanted(&self, id: &JobId, now_ms: u64) -> Result<()> {
        off_async(|| {
            self.conn()?.execute(
                "UPDATE log_requests SET wanted_ms = $2 WHERE id = $1",
                &[&id.as_str(), &(now_ms as i64)],
            )?;
            Ok(())
        })
    }
}

fn image_row(row: &postgres::Row) -> ImageRecord {
    ImageRecord {
        name: row.get(0),
        version: row.get(1),
        manifest: row.get(2),
        signature: row.get(3),
        published_ms: row.get::<_, i64>(4) as u64,
    }
}

impl BootStore for PgStore {
    fn put_image(&self, i: &ImageRecord) -> Result<PutOutcome> {
        off_async(|| {
            let inserted = self.conn()?.execute(
                "INSERT INTO images (name, version, manifest, signature, published_ms)
                 VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
                &[
                    &i.name,
                    &i.version,
                    &i.manifest,
                    &i.signature,
                    &(i.published_ms as i64),
                ],
            )? == 1;
            let stored = if inserted {
                None
            } else {
                self.image(&i.name, &i.version)?
            };
            Ok(boot::outcome(inserted, stored.as_ref(), i))
        })
    }

    fn image(&self, name: &str, version: &str) -> Result<Option<ImageRecord>> {
        off_async(|| {
            let row = self.conn()?.query_opt(
                &format!("SELECT {IMAGE_COLUMNS} FROM images WHERE name = $1 AND version = $2"),
                &[&name, &version],
            )?;
            Ok(row.as_ref().map(image_row))
        })
    }

    fn images(&self) -> Result<Vec<ImageRecord>> {
        off_async(|| {
            let rows = self.conn()?.query(
                &format!("SELECT {IMAGE_COLUMNS} FROM images ORDER BY seq"),
                &[],
            )?;
            Ok(rows.iter().map(image_row).collect())
        })
    }

    fn issue_boot_token(
        &self,
        agent_id: &str,
        token_sha256: &str,
        now_ms: u64,
        expires_ms: u64,
    ) -> Result<()> {
        off_async(|| {
            let mut conn = self.conn()?;
            conn.execute(
                "DELETE FROM boot_tokens WHERE expires_ms <= $1",
                &[&(now_ms as i64)],
            )?;
            conn.execute(
                "INSERT INTO boot_tokens (agent_id, sha256, expires_ms) VALUES ($1, $2, $3)
                 ON CONFLICT (agent_id) DO UPDATE SET sha256 = excluded.sha256, expires_ms = excluded.expires_ms",
                &[&agent_id, &token_sha256, &(expires_ms as i64)],
            )?;
            Ok(())
        })
    }

    fn boot_token_valid(&self, agent_id: &str, token_sha256: &str, now_ms: u64) -> Result<bool> {
        off_async(|| {
            let row = self.conn()?.query_one(
                &boot::boot_token_valid_sql(),
                &[&agent_id, &token_sha256, &(now_ms as i64)],
            )?;
            Ok(row.get(0))
        })
    }

    fn enrol_machine(
        &self,
        agent_id: &str,
        token_sha256: &str,
        credential_sha256: &str,
        now_ms: u64,
    ) -> Result<bool> {
        off_async(|| {
            let mut conn = self.conn()?;
            let mut tx = conn.transaction()?;
            let taken = tx.execute(
                &boot::take_boot_token_sql(),
                &[&agent_id, &token_sha256, &(now_ms as i64)],
            )? == 1;
            let set = taken
                && tx.execute(
                    "UPDATE agents SET credential_sha256 = $2 WHERE id = $1",
                    &[&agent_id, &credential_sha256],
                )? == 1;
            if !set {
                return Ok(false);
            }
            tx.execute(
                "INSERT INTO boot_machines (agent_id, enrolled_ms) VALUES ($1, $2)
                 ON CONFLICT (agent_id) DO UPDATE SET enrolled_ms = excluded.enrolled_ms",
                &[&agent_id, &(now_ms as i64)],
            )?;
            tx.commit()?;
            Ok(true)
        })
    }
}
