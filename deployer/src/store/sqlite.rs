//! The embedded store: one SQLite database (WAL), shared by the server and the CLI.

use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

use muscle_protocol::CheckinRequest;
use rusqlite::{params, Connection, OpenFlags, OptionalExtension};

use super::checkins::{self, CheckinRow, SteadyCheckins};
use super::{
    json, parse, AgentRecord, Assignment, Previous, PutOutcome, Recorded, ReleaseRecord, Result,
    Step, Store, StoreError, Undeploy, Undeployed,
};
use crate::rollout::{Action, Request, Rollout};

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS releases (
    app TEXT NOT NULL, version TEXT NOT NULL, counter INTEGER NOT NULL,
    manifest TEXT NOT NULL, signature TEXT, published_ms INTEGER NOT NULL,
    PRIMARY KEY (app, version));
CREATE TABLE IF NOT EXISTS agents (
    id TEXT PRIMARY KEY, arch TEXT NOT NULL, hostname TEXT NOT NULL, labels TEXT NOT NULL,
    agent_version TEXT NOT NULL, last_seen_ms INTEGER NOT NULL, apps TEXT NOT NULL,
    desired_generation INTEGER NOT NULL DEFAULT 0,
    -- sha256 of the agent's credential, set once at enrolment.
    credential_sha256 TEXT);
CREATE TABLE IF NOT EXISTS assignments (
    agent_id TEXT NOT NULL, app TEXT NOT NULL, body TEXT NOT NULL,
    PRIMARY KEY (agent_id, app));
CREATE TABLE IF NOT EXISTS rollouts (
    id INTEGER PRIMARY KEY AUTOINCREMENT, app TEXT NOT NULL, body TEXT NOT NULL,
    -- A pause/resume/abort/rollback asked for by the CLI, applied by the engine at its next tick.
    request TEXT);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
";

/// Changes to a database made by an older deployer, in order: entry `i` takes a database from
/// `PRAGMA user_version` `i` to `i + 1`. Append only.
const MIGRATIONS: &[&str] = &[
    // 1: the agent's own check-in interval, for staleness.
    "ALTER TABLE agents ADD COLUMN interval_ms INTEGER NOT NULL DEFAULT 5000;",
    // 2: how far the agent's clock is from the deployer's, when it last checked in.
    "ALTER TABLE agents ADD COLUMN clock_skew_s INTEGER NOT NULL DEFAULT 0;",
    // 3: tombstones: apps taken off an agent, told to it at every check-in until re-assigned.
    "CREATE TABLE removals (agent_id TEXT NOT NULL, app TEXT NOT NULL, PRIMARY KEY (agent_id, app));",
    // 4: the last probe of each agent's self-update, confirmed before it hands over.
    "CREATE TABLE probes (agent_id TEXT PRIMARY KEY, nonce_sha256 TEXT NOT NULL, seen_ms INTEGER NOT NULL);",
    // 5: ad hoc jobs (`exec`), each with its targets and their reports.
    "CREATE TABLE jobs (
        id TEXT PRIMARY KEY, created_ms INTEGER NOT NULL, order_json TEXT NOT NULL,
        signature TEXT, selector TEXT NOT NULL, max_parallel INTEGER NOT NULL,
        deadline_ms INTEGER NOT NULL, timeout_ms INTEGER NOT NULL);
     CREATE TABLE job_targets (
        job_id TEXT NOT NULL, agent_id TEXT NOT NULL, arch TEXT NOT NULL,
        state TEXT NOT NULL, started_ms INTEGER, finished_ms INTEGER, report TEXT,
        PRIMARY KEY (job_id, agent_id));
     CREATE INDEX job_targets_by_agent ON job_targets (agent_id, state);",
    // 6: log requests (`logs`) and the lines agents sent for them.
    "CREATE TABLE log_requests (
        id TEXT PRIMARY KEY, agent_id TEXT NOT NULL, request TEXT NOT NULL,
        created_ms INTEGER NOT NULL, wanted_ms INTEGER NOT NULL, heard_ms INTEGER NOT NULL,
        state TEXT NOT NULL, error TEXT);
     CREATE INDEX log_requests_by_agent ON log_requests (agent_id, state);
     CREATE TABLE log_lines (
        request_id TEXT NOT NULL, seq INTEGER NOT NULL, line TEXT NOT NULL,
        PRIMARY KEY (request_id, seq));",
    // 7: API tokens with roles, and the audit log of every change.
    "CREATE TABLE tokens (
        name TEXT PRIMARY KEY, role TEXT NOT NULL, sha256 TEXT NOT NULL UNIQUE,
        created_ms INTEGER NOT NULL);
     CREATE TABLE audit (
        seq INTEGER PRIMARY KEY AUTOINCREMENT, at_ms INTEGER NOT NULL, who TEXT NOT NULL,
        change TEXT NOT NULL);",
    // 8: each agent's history, and a digest of its last check-in but for what changes at each.
    "CREATE TABLE agent_events (
        id INTEGER PRIMARY KEY AUTOINCREMENT, agent_id TEXT NOT NULL, at_ms INTEGER NOT NULL,
        body TEXT NOT NULL);
     CREATE INDEX agent_events_by_agent ON agent_events (agent_id, id);
     ALTER TABLE agents ADD COLUMN report_key TEXT;",
    // 9: network boot: boot images (`cargo xtask image`) by name and version, and each
    // machine's one-time enrolment token from its latest boot script.
    "CREATE TABLE images (
        name TEXT NOT NULL, version TEXT NOT NULL, manifest TEXT NOT NULL, signature TEXT,
        published_ms INTEGER NOT NULL, PRIMARY KEY (name, version));
     CREATE TABLE boot_tokens (
        agent_id TEXT PRIMARY KEY, sha256 TEXT NOT NULL, expires_ms INTEGER NOT NULL);",
    // 10: the agents that enrolled with a boot token: only their credential may be replaced
    // by the next boot's.
    "CREATE TABLE boot_machines (agent_id TEXT PRIMARY KEY, enrolled_ms INTEGER NOT NULL);",
];

pub struct SqliteStore {
    conn: Mutex<Connection>,
    steady: SteadyCheckins,
}

impl SqliteStore {
    pub fn open(data_dir: &Path) -> Result<SqliteStore> {
        std::fs::create_dir_all(data_dir).map_err(|source| StoreError::Io {
            path: data_dir.display().to_string(),
            source,
        })?;
        let conn = Connection::open(data_dir.join("muscle.db"))?;
        // The server and CLI commands share the file: WAL lets them, busy_timeout makes them wait.
        conn.busy_timeout(Duration::from_secs(10))?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(|e| match e.sqlite_error_code() {
                Some(rusqlite::ErrorCode::ReadOnly) => StoreError::ReadOnly {
                    path: data_dir.display().to_string(),
                },
                _ => e.into(),
            })?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.execute_batch(SCHEMA)?;
        migrate(&conn)?;
        Ok(SqliteStore {
            conn: Mutex::new(conn),
            steady: SteadyCheckins::default(),
        })
    }

    /// Opens an existing store for reading only: what `fleet`, `rollout status`, `releases`
    /// and `fsck` need, so that a user with read access alone can run them. Nothing is
    /// created or migrated.
    pub fn open_read_only(data_dir: &Path) -> Result<SqliteStore> {
        let path = data_dir.join("muscle.db");
        let flags = OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_URI;
        let conn = Connection::open_with_flags(&path, flags)?;
        conn.busy_timeout(Duration::from_secs(10))?;
        // With a serving deployer the WAL files exist and can be read. Without one and without
        // a pending WAL, a reader that may not create them reads the file as it is: nobody
        // writes it meanwhile. (With a pending WAL that would lose its rows: said instead.)
        let conn = match schema_version(&conn) {
            Ok(_) => conn,
            Err(e) => {
                let wal = data_dir.join("muscle.db-wal");
                if std::fs::metadata(&wal).is_ok_and(|m| m.len() > 0) {
                    return Err(StoreError::Corrupt(format!(
                        "cannot read the store ({e}): give this user read access to {} and \
                         {}-shm too",
                        wal.display(),
                        path.display()
                    )));
                }
                let escaped = path
                    .display()
                    .to_string()
                    .replace('%', "%25")
                    .replace('?', "%3f")
                    .replace('#', "%23");
                Connection::open_with_flags(format!("file:{escaped}?immutable=1"), flags)?
            }
        };
        let version = schema_version(&conn)?;
        if version != MIGRATIONS.len() {
            return Err(StoreError::Corrupt(format!(
                "the database is at schema version {version}, this deployer reads version {}: \
                 run this muscle-deploy's `serve` or `publish` once (with write access) to migrate it",
                MIGRATIONS.len()
            )));
        }
        Ok(SqliteStore {
            conn: Mutex::new(conn),
            steady: SteadyCheckins::default(),
        })
    }

    pub(super) fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.conn
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

fn schema_version(conn: &Connection) -> Result<usize> {
    Ok(conn.query_row("PRAGMA user_version", [], |r| r.get::<_, i64>(0))? as usize)
}

/// Brings the schema to the latest version, one transaction per step.
fn migrate(conn: &Connection) -> Result<()> {
    let current = schema_version(conn)?;
    if current > MIGRATIONS.len() {
        return Err(StoreError::Corrupt(format!(
            "the database is at schema version {current}, newer than this deployer knows ({}): use a newer muscle-deploy",
            MIGRATIONS.len()
        )));
    }
    // One step per transaction, the version read again inside it: a `serve` and a `publish`
    // opening an old store at once do not both apply a step.
    loop {
        conn.execute_batch("BEGIN IMMEDIATE")?;
        let version = schema_version(conn)?;
        let Some(step) = MIGRATIONS.get(version) else {
            conn.execute_batch("COMMIT")?;
            return Ok(());
        };
        let applied = conn.execute_batch(&format!("{step} PRAGMA user_version = {};", version + 1));
        if let Err(e) = applied {
            let _ = conn.execute_batch("ROLLBACK");
            return Err(e.into());
        }
        conn.execute_batch("COMMIT")?;
    }
}

/// Sets (or removes) one assignment inside `tx`, bumping the agent's desired generation.
fn assign_in(
    tx: &rusqlite::Transaction,
    agent_id: &str,
    app: &str,
    assignment: Option<&Assignment>,
) -> Result<()> {
    match assignment {
        Some(a) => {
            tx.execute(
                "INSERT INTO assignments (agent_id, app, body) VALUES (?1, ?2, ?3) ON CONFLICT(agent_id, app) DO UPDATE SET body = ?3",
                params![agent_id, app, json(a)],
            )?;
            tx.execute(
                "DELETE FROM removals WHERE agent_id = ?1 AND app = ?2",
                params![agent_id, app],
            )?;
        }
        // A tombstone, not just a missing row: the agent must stop what it runs.
        None => {
            tx.execute(
                "DELETE FROM assignments WHERE agent_id = ?1 AND app = ?2",
                params![agent_id, app],
            )?;
            tx.execute(
                "INSERT OR IGNORE INTO removals (agent_id, app) VALUES (?1, ?2)",
                params![agent_id, app],
            )?;
        }
    }
    // A fleet-wide counter, so an agent's generation never repeats, even across deletes.
    tx.execute("INSERT INTO counters (name, value) VALUES ('generation', 1) ON CONFLICT(name) DO UPDATE SET value = value + 1", [])?;
    let generation: i64 = tx.query_row(
        "SELECT value FROM counters WHERE name = 'generation'",
        [],
        |r| r.get(0),
    )?;
    tx.execute(
        "UPDATE agents SET desired_generation = ?2 WHERE id = ?1",
        params![agent_id, generation],
    )?;
    Ok(())
}

fn release_row(row: &rusqlite::Row) -> rusqlite::Result<ReleaseRecord> {
    Ok(ReleaseRecord {
        app: row.get(0)?,
        version: row.get(1)?,
        counter: row.get::<_, i64>(2)? as u64,
        manifest: row.get(3)?,
        signature: row.get(4)?,
        published_ms: row.get::<_, i64>(5)? as u64,
    })
}

const AGENT_COLUMNS: &str = "id, arch, hostname, labels, agent_version, last_seen_ms, apps, \
     desired_generation, interval_ms, clock_skew_s";

fn agent_row(row: &rusqlite::Row) -> rusqlite::Result<(AgentRecord, String, String)> {
    let record = AgentRecord {
        id: row.get(0)?,
        arch: row.get(1)?,
        hostname: row.get(2)?,
        labels: Default::default(),
        agent_version: row.get(4)?,
        last_seen_ms: row.get::<_, i64>(5)? as u64,
        apps: vec![],
        desired_generation: row.get::<_, i64>(7)? as u64,
        interval_ms: row.get::<_, i64>(8)? as u64,
        clock_skew_s: row.get(9)?,
    };
    Ok((record, row.get(3)?, row.get(6)?))
}

fn finish_agent((mut record, labels, apps): (AgentRecord, String, String)) -> Result<AgentRecord> {
    record.labels = parse("agent labels", &labels)?;
    record.apps = parse("agent apps", &apps)?;
    Ok(record)
}

impl Store for SqliteStore {
    fn engine_lease(&self) -> Result<super::EngineLease> {
        Ok(super::EngineLease::Sole)
    }

    fn put_release(&self, r: &ReleaseRecord) -> Result<PutOutcome> {
        let conn = self.conn();
        let existing: Option<String> = conn
            .query_row(
                "SELECT manifest FROM releases WHERE app = ?1 AND version = ?2",
                params![r.app, r.version],
                |row| row.get(0),
            )
            .optional()?;
        match existing {
            Some(m) if m == r.manifest => Ok(PutOutcome::Identical),
            Some(_) => Ok(PutOutcome::Conflict),
            None => {
                conn.execute(
                    "INSERT INTO releases (app, version, counter, manifest, signature, published_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                    params![r.app, r.version, r.counter as i64, r.manifest, r.signature, r.published_ms as i64],
                )?;
                Ok(PutOutcome::Inserted)
            }
        }
    }

    fn release(&self, app: &str, version: &str) -> Result<Option<ReleaseRecord>> {
        Ok(self
            .conn()
            .query_row(
                "SELECT app, version, counter, manifest, signature, published_ms FROM releases WHERE app = ?1 AND version = ?2",
                params![app, version],
                release_row,
            )
            .optional()?)
    }

    fn releases(&self) -> Result<Vec<ReleaseRecord>> {
        let conn = self.conn();
        let mut stmt = conn.prepare("SELECT app, version, counter, manifest, signature, published_ms FROM releases ORDER BY app, published_ms")?;
        let rows = stmt
            .query_map([], release_row)?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        Ok(rows)
    }

    fn record_checkin(&self, req: &CheckinRequest, now_ms: u64) -> Result<Recorded> {
        // The hot path of every check-in: one read on the primary key. A steady check-in (the
        // same report but for its times) is kept in memory and written with the others; the
        // old reports are read back only when the report changed.
        let row = CheckinRow::of(req, now_ms);
        let id = req.agent_id.as_str();
        let conn = self.conn();
        let before: Option<(i64, Option<String>)> = conn
            .prepare_cached(
                "SELECT desired_generation, CASE WHEN report_key IS ?2 THEN NULL ELSE apps END
                 FROM agents WHERE id = ?1",
            )?
            .query_row(params![id, row.key], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()?;
        if let (Some((generation, None)), true) = (&before, checkins::may_wait(req)) {
            self.steady.keep(id, row);
            return Ok(Recorded {
                generation: *generation as u64,
                previous: Previous::Same,
            });
        }
        // Written now: a steady check-in kept from before is older, and dropped.
        self.steady.forget(id);
        let mut stmt = conn.prepare_cached(
            "INSERT INTO agents (id, arch, hostname, labels, agent_version, last_seen_ms, apps, interval_ms, clock_skew_s, report_key) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)
             ON CONFLICT(id) DO UPDATE SET arch = ?2, hostname = ?3, labels = ?4, agent_version = ?5, last_seen_ms = ?6, apps = ?7, interval_ms = ?8, clock_skew_s = ?9, report_key = ?10
             RETURNING desired_generation",
        )?;
        let generation: i64 = stmt.query_row(
            params![
                id,
                req.arch,
                req.hostname,
                json(&req.labels),
                req.agent_version,
                row.last_seen_ms,
                row.apps,
                row.interval_ms,
                row.clock_skew_s,
                row.key,
            ],
            |r| r.get(0),
        )?;
        Ok(Recorded {
            generation: generation as u64,
            previous: checkins::previous(before.map(|(_, apps)| apps)),
        })
    }

    fn flush_checkins(&self) -> Result<usize> {
        let batch = self.steady.take();
        if batch.is_empty() {
            return Ok(0);
        }
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        {
            // A row written since (a changed check-in) is newer: the guard keeps it.
            let mut stmt = tx.prepare_cached(
                "UPDATE agents SET last_seen_ms = ?2, apps = ?3, clock_skew_s = ?4
                 WHERE id = ?1 AND report_key = ?5 AND last_seen_ms <= ?2",
            )?;
            for (id, c) in &batch {
                stmt.execute(params![id, c.last_seen_ms, c.apps, c.clock_skew_s, c.key])?;
            }
        }
        tx.commit()?;
        Ok(batch.len())
    }

    fn credential_sha256(&self, agent_id: &str) -> Result<Option<String>> {
        let found: Option<Option<String>> = self
            .conn()
            .query_row(
                "SELECT credential_sha256 FROM agents WHERE id = ?1",
                [agent_id],
                |r| r.get(0),
            )
            .optional()?;
        Ok(found.flatten())
    }

    fn set_credential(&self, agent_id: &str, credential_sha256: &str) -> Result<bool> {
        let changed = self.conn().execute(
            "UPDATE agents SET credential_sha256 = ?2 WHERE id = ?1 AND credential_sha256 IS NULL",
            params![agent_id, credential_sha256],
        )?;
        Ok(changed == 1)
    }

    fn agents(&self) -> Result<Vec<AgentRecord>> {
        let conn = self.conn();
        let mut stmt = conn.prepare(&format!("SELECT {AGENT_COLUMNS} FROM agents ORDER BY id"))?;
        let rows = stmt
            .query_map([], agent_row)?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        rows.into_iter().map(finish_agent).collect()
    }

    fn assignments(&self, agent_id: &str) -> Result<Vec<Assignment>> {
        let conn = self.conn();
        let mut stmt =
            conn.prepare("SELECT body FROM assignments WHERE agent_id = ?1 ORDER BY app")?;
        let bodies = stmt
            .query_map([agent_id], |r| r.get::<_, String>(0))?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        bodies.iter().map(|b| parse("assignment", b)).collect()
    }

    fn assignment(&self, agent_id: &str, app: &str) -> Result<Option<Assignment>> {
        let body: Option<String> = self
            .conn()
            .query_row(
                "SELECT body FROM assignments WHERE agent_id = ?1 AND app = ?2",
                params![agent_id, app],
                |r| r.get(0),
            )
            .optional()?;
        body.map(|b| parse("assignment", &b)).transpose()
    }

    fn record_probe(&self, agent_id: &str, nonce_sha256: &str, now_ms: u64) -> Result<()> {
        self.conn().execute(
            "INSERT INTO probes (agent_id, nonce_sha256, seen_ms) VALUES (?1, ?2, ?3)
             ON CONFLICT(agent_id) DO UPDATE SET nonce_sha256 = ?2, seen_ms = ?3",
            params![agent_id, nonce_sha256, now_ms as i64],
        )?;
        Ok(())
    }

    fn take_probe(&self, agent_id: &str, nonce_sha256: &str) -> Result<bool> {
        let taken = self.conn().execute(
            "DELETE FROM probes WHERE agent_id = ?1 AND nonce_sha256 = ?2",
            params![agent_id, nonce_sha256],
        )?;
        Ok(taken == 1)
    }

    fn holds(&self, agent_id: &str, app: &str) -> Result<bool> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(
            "SELECT EXISTS (SELECT 1 FROM assignments WHERE agent_id = ?1 AND app = ?2)
                 OR EXISTS (SELECT 1 FROM removals WHERE agent_id = ?1 AND app = ?2)",
        )?;
        Ok(stmt.query_row(params![agent_id, app], |r| r.get(0))?)
    }

    fn removals(&self, agent_id: &str) -> Result<Vec<String>> {
        let conn = self.conn();
        let mut stmt =
            conn.prepare_cached("SELECT app FROM removals WHERE agent_id = ?1 ORDER BY app")?;
        let apps = stmt
            .query_map([agent_id], |r| r.get::<_, String>(0))?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        Ok(apps)
    }

    fn undeploy(&self, u: &Undeploy) -> Result<Undeployed> {
        let mut conn = self.conn();
        // Immediate: no rollout may start or step between the check and the tombstones.
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let mut rollouts: Vec<Rollout> = {
            let mut stmt = tx.prepare("SELECT body FROM rollouts WHERE app = ?1 ORDER BY id")?;
            let bodies = stmt
                .query_map([u.app], |r| r.get::<_, String>(0))?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            bodies
                .iter()
                .map(|b| parse("rollout", b))
                .collect::<Result<_>>()?
        };
        if let Some(blocked) = Undeploy::blocked_by(&rollouts) {
            return Ok(blocked);
        }
        let mut removed = vec![];
        for agent_id in u.agent_ids {
            let assigned: bool = tx.query_row(
                "SELECT EXISTS (SELECT 1 FROM assignments WHERE agent_id = ?1 AND app = ?2)",
                params![agent_id, u.app],
                |r| r.get(0),
            )?;
            if assigned || u.reporting.contains(agent_id) {
                assign_in(&tx, agent_id, u.app, None)?;
                removed.push(agent_id.clone());
            }
        }
        let mut withdrawn = vec![];
        for standing in u.withdraw(&mut rollouts) {
            tx.execute(
                "UPDATE rollouts SET body = ?2 WHERE id = ?1",
                params![standing.id, json(standing)],
            )?;
            withdrawn.push(standing.id);
        }
        tx.commit()?;
        Ok(Undeployed::From {
            agents: removed,
            withdrawn,
        })
    }

    fn create_rollout(&self, rollout: &Rollout) -> Result<i64> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        tx.execute(
            "INSERT INTO rollouts (app, body) VALUES (?1, '{}')",
            [&rollout.app],
        )?;
        let id = tx.last_insert_rowid();
        let mut stored = rollout.clone();
        stored.id = id;
        tx.execute(
            "UPDATE rollouts SET body = ?2 WHERE id = ?1",
            params![id, json(&stored)],
        )?;
        tx.commit()?;
        Ok(id)
    }

    fn commit_step(&self, step: &Step) -> Result<bool> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let stored: Option<String> = tx
            .query_row(
                "SELECT body FROM rollouts WHERE id = ?1",
                [step.rollout.id],
                |r| r.get(0),
            )
            .optional()?;
        if let Some(body) = stored {
            if parse::<Rollout>("rollout", &body)? != *step.from {
                return Ok(false);
            }
        }
        for Action::Assign {
            agent_id,
            app,
            assignment,
        } in step.actions
        {
            assign_in(&tx, agent_id, app, assignment.as_ref())?;
        }
        crate::failpoint::hit("engine-step");
        let id = step.rollout.id;
        if step.save_rollout {
            tx.execute(
                "UPDATE rollouts SET body = ?2 WHERE id = ?1",
                params![id, json(step.rollout)],
            )?;
        }
        if let Some(request) = step.handled {
            // Only the request handled: one made meanwhile stays queued for the next step.
            tx.execute(
                "UPDATE rollouts SET request = NULL WHERE id = ?1 AND request = ?2",
                params![id, request.as_str()],
            )?;
        }
        tx.commit()?;
        Ok(true)
    }

    fn request_rollout(&self, id: i64, request: Request) -> Result<()> {
        self.conn().execute(
            "UPDATE rollouts SET request = ?2 WHERE id = ?1",
            params![id, request.as_str()],
        )?;
        Ok(())
    }

    fn rollout_requests(&self) -> Result<Vec<(i64, Request)>> {
        let conn = self.conn();
        let mut stmt =
            conn.prepare("SELECT id, request FROM rollouts WHERE request IS NOT NULL ORDER BY id")?;
        let rows = stmt
            .query_map([], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?)))?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        rows.into_iter()
            .map(|(id, text)| {
                text.parse()
                    .map(|r| (id, r))
                    .map_err(|e| StoreError::Corrupt(format!("rollout {id}: {e}")))
            })
            .collect()
    }

    fn rollout(&self, id: i64) -> Result<Option<Rollout>> {
        let body: Option<String> = self
            .conn()
            .query_row("SELECT body FROM rollouts WHERE id = ?1", [id], |r| {
                r.get(0)
            })
            .optional()?;
        body.map(|b| parse("rollout", &b)).transpose()
    }

    fn rollouts(&self) -> Result<Vec<Rollout>> {
        let conn = self.conn();
        let mut stmt = conn.prepare("SELECT body FROM rollouts ORDER BY id")?;
        let bodies = stmt
            .query_map([], |r| r.get::<_, String>(0))?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        bodies.iter().map(|b| parse("rollout", b)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_database_of_an_older_deployer_is_migrated_and_keeps_its_rows() {
        let dir = std::env::temp_dir().join(format!("muscle-migrate-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        {
            // What the first deployer wrote: schema version 0, no interval column.
            let old = Connection::open(dir.join("muscle.db")).unwrap();
            old.execute_batch(SCHEMA).unwrap();
            old.execute(
                "INSERT INTO agents (id, arch, hostname, labels, agent_version, last_seen_ms, apps) VALUES ('x1', 'x86_64', 'h', '{}', '0.1.0', 7, '[]')",
                [],
            )
            .unwrap();
        }
        let store = SqliteStore::open(&dir).unwrap();
        let agents = store.agents().unwrap();
        assert_eq!(agents.len(), 1);
        assert_eq!((agents[0].last_seen_ms, agents[0].interval_ms), (7, 5000));
        let version: i64 = store
            .conn()
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(version as usize, MIGRATIONS.len());
        drop(store);
        // Opening again changes nothing.
        assert_eq!(SqliteStore::open(&dir).unwrap().agents().unwrap().len(), 1);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
