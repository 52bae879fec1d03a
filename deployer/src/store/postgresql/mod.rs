//! The shared store: PostgreSQL, for several deployer replicas on one database. The same
//! records and the same transactions as [`super::SqliteStore`]; where SQLite takes its write
//! lock up front (`BEGIN IMMEDIATE`), a transaction here takes [`WRITE_LOCK`], so replicas
//! serialise the same steps SQLite serialises between processes.

mod operations;

use postgres::types::Type;
use postgres::{NoTls, Transaction};
use r2d2_postgres::r2d2::{Pool, PooledConnection};
use r2d2_postgres::PostgresConnectionManager;

use super::checkins::{self, CheckinRow, SteadyCheckins};
use super::off_async;
use super::{
    json, parse, AgentRecord, Assignment, EngineLease, Previous, PutOutcome, Recorded,
    ReleaseRecord, Result, Step, Store, StoreError, Undeploy, Undeployed,
};
use crate::rollout::{Action, Request, Rollout};

/// The advisory lock of transactions that read, decide and write (a rollout step, an
/// undeploy, claiming jobs): held to their end.
const WRITE_LOCK: i64 = 0x6d75_7363_6c65_0001;
/// The advisory lock of schema migrations.
const MIGRATE_LOCK: i64 = 0x6d75_7363_6c65_0002;
/// The engine lease: a session lock, held by one replica's own connection for as long as it
/// lives.
const ENGINE_LOCK: i64 = 0x6d75_7363_6c65_0003;

/// How long the lease's connection may take to answer before the lease counts as lost.
const LEASE_CHECK_DEADLINE: std::time::Duration = std::time::Duration::from_secs(2);

/// Connections per deployer process: check-ins, long polls and the engine share them.
const POOL_SIZE: u32 = 8;

/// The schema, one step per version: entry `i` takes a database from version `i` to `i + 1`
/// (kept in `muscle_schema`). Append only.
const MIGRATIONS: &[&str] = &[
    // 1: everything SQLite's schema had at its version 8.
    "CREATE TABLE releases (
        app TEXT NOT NULL, version TEXT NOT NULL, counter BIGINT NOT NULL,
        manifest TEXT NOT NULL, signature TEXT, published_ms BIGINT NOT NULL,
        PRIMARY KEY (app, version));
     CREATE TABLE agents (
        id TEXT PRIMARY KEY, arch TEXT NOT NULL, hostname TEXT NOT NULL, labels TEXT NOT NULL,
        agent_version TEXT NOT NULL, last_seen_ms BIGINT NOT NULL, apps TEXT NOT NULL,
        desired_generation BIGINT NOT NULL DEFAULT 0, credential_sha256 TEXT,
        interval_ms BIGINT NOT NULL DEFAULT 5000, clock_skew_s BIGINT NOT NULL DEFAULT 0,
        report_key TEXT);
     CREATE TABLE assignments (
        agent_id TEXT NOT NULL, app TEXT NOT NULL, body TEXT NOT NULL,
        PRIMARY KEY (agent_id, app));
     CREATE TABLE removals (agent_id TEXT NOT NULL, app TEXT NOT NULL, PRIMARY KEY (agent_id, app));
     CREATE TABLE rollouts (
        id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY, app TEXT NOT NULL, body TEXT NOT NULL,
        request TEXT);
     CREATE TABLE counters (name TEXT PRIMARY KEY, value BIGINT NOT NULL);
     CREATE TABLE probes (agent_id TEXT PRIMARY KEY, nonce_sha256 TEXT NOT NULL, seen_ms BIGINT NOT NULL);
     CREATE TABLE jobs (
        id TEXT PRIMARY KEY, created_ms BIGINT NOT NULL, order_json TEXT NOT NULL,
        signature TEXT, selector TEXT NOT NULL, max_parallel BIGINT NOT NULL,
        deadline_ms BIGINT NOT NULL, timeout_ms BIGINT NOT NULL);
     CREATE TABLE job_targets (
        job_id TEXT NOT NULL, agent_id TEXT NOT NULL, arch TEXT NOT NULL,
        state TEXT NOT NULL, started_ms BIGINT, finished_ms BIGINT, report TEXT,
        PRIMARY KEY (job_id, agent_id));
     CREATE INDEX job_targets_by_agent ON job_targets (agent_id, state);
     CREATE TABLE log_requests (
        id TEXT PRIMARY KEY, agent_id TEXT NOT NULL, request TEXT NOT NULL,
        created_ms BIGINT NOT NULL, wanted_ms BIGINT NOT NULL, heard_ms BIGINT NOT NULL,
        state TEXT NOT NULL, error TEXT);
     CREATE INDEX log_requests_by_agent ON log_requests (agent_id, state);
     CREATE TABLE log_lines (
        request_id TEXT NOT NULL, seq BIGINT NOT NULL, line TEXT NOT NULL,
        PRIMARY KEY (request_id, seq));
     CREATE TABLE tokens (
        name TEXT PRIMARY KEY, role TEXT NOT NULL, sha256 TEXT NOT NULL UNIQUE,
        created_ms BIGINT NOT NULL);
     CREATE TABLE audit (
        seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY, at_ms BIGINT NOT NULL,
        who TEXT NOT NULL, change TEXT NOT NULL);
     CREATE TABLE agent_events (
        id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY, agent_id TEXT NOT NULL,
        at_ms BIGINT NOT NULL, body TEXT NOT NULL);
     CREATE INDEX agent_events_by_agent ON agent_events (agent_id, id);",
    // 2: network boot: boot images (`cargo xtask image`) by name and version, and each
    // machine's one-time enrolment token from its latest boot script.
    "CREATE TABLE images (
        name TEXT NOT NULL, version TEXT NOT NULL, manifest TEXT NOT NULL, signature TEXT,
        published_ms BIGINT NOT NULL, seq BIGINT GENERATED ALWAYS AS IDENTITY,
        PRIMARY KEY (name, version));
     CREATE TABLE boot_tokens (
        agent_id TEXT PRIMARY KEY, sha256 TEXT NOT NULL, expires_ms BIGINT NOT NULL);",
    // 3: the agents that enrolled with a boot token: only their credential may be replaced
    // by the next boot's.
    "CREATE TABLE boot_machines (agent_id TEXT PRIMARY KEY, enrolled_ms BIGINT NOT NULL);",
];

type Manager = PostgresConnectionManager<NoTls>;

pub struct PgStore {
    pool: Pool<Manager>,
    steady: SteadyCheckins,
    config: postgres::Config,
    /// The connection that holds (or asks for) the engine lease, outside the pool: the lease
    /// lives exactly as long as it.
    lease: std::sync::Mutex<Option<(postgres::Client, bool)>>,
}

impl PgStore {
    /// Connects to `url` (`postgres://user@host:port/db`, or any form libpq takes) and brings
    /// the schema to this deployer's version.
    pub fn connect(url: &str) -> Result<PgStore> {
        let mut config: postgres::Config = url
            .parse()
            .map_err(|e| StoreError::Corrupt(format!("--database {}: {e}", redacted(url))))?;
        bounded(&mut config);
        let pool = Pool::builder()
            .max_size(POOL_SIZE)
            .min_idle(Some(1))
            .connection_timeout(std::time::Duration::from_secs(10))
            .build(PostgresConnectionManager::new(config.clone(), NoTls))?;
        let store = PgStore {
            pool,
            steady: SteadyCheckins::default(),
            config,
            lease: Default::default(),
        };
        store.migrate()?;
        Ok(store)
    }

    fn conn(&self) -> Result<PooledConnection<Manager>> {
        Ok(self.pool.get()?)
    }

    /// Applies the missing steps in one transaction under [`MIGRATE_LOCK`]: replicas starting
    /// together apply each step once.
    fn migrate(&self) -> Result<()> {
        let mut conn = self.conn()?;
        // Current already: nothing is written (a read-only role can run `fleet`).
        let current = conn.query_opt("SELECT version FROM muscle_schema", &[]);
        if let Ok(Some(row)) = current {
            if row.get::<_, i64>(0) == MIGRATIONS.len() as i64 {
                return Ok(());
            }
        }
        let mut tx = conn.transaction()?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATE_LOCK])?;
        tx.batch_execute("CREATE TABLE IF NOT EXISTS muscle_schema (version BIGINT NOT NULL)")?;
        let version: i64 = match tx.query_opt("SELECT version FROM muscle_schema", &[])? {
            Some(row) => row.get(0),
            None => {
                tx.execute("INSERT INTO muscle_schema (version) VALUES (0)", &[])?;
                0
            }
        };
        let version = version as usize;
        if version > MIGRATIONS.len() {
            return Err(StoreError::Corrupt(format!(
                "the database is at schema version {version}, newer than this deployer knows ({}): use a newer muscle-deploy",
                MIGRATIONS.len()
            )));
        }
        for step in &MIGRATIONS[version..] {
            tx.batch_execute(step)?;
        }
        tx.execute(
            "UPDATE muscle_schema SET version = $1",
            &[&(MIGRATIONS.len() as i64)],
        )?;
        tx.commit()?;
        Ok(())
    }
}

/// Every wait on the database ends: a replica frozen in a transaction, or gone without
/// closing its connection (a partition, a paused VM), cannot hold the write lock or the engine
/// lease for more than seconds. Settings given in the URL's `options` are kept after these.
fn bounded(config: &mut postgres::Config) {
    let ours = "-c lock_timeout=15s -c statement_timeout=60s \
                -c idle_in_transaction_session_timeout=30s -c tcp_keepalives_idle=5 \
                -c tcp_keepalives_interval=2 -c tcp_keepalives_count=3 -c tcp_user_timeout=10000";
    let theirs = config.get_options().unwrap_or_default().to_owned();
    config
        .options(format!("{ours} {theirs}").trim())
        .connect_timeout(std::time::Duration::from_secs(5))
        .keepalives_idle(std::time::Duration::from_secs(5));
}

/// `url` with its password, if any, left out: for messages and logs.
pub fn redacted(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    // `?password=` too.
    let rest = match rest.split_once('?') {
        Some((base, query)) if query.contains("password") => format!("{base}?..."),
        _ => rest.to_owned(),
    };
    match rest.rsplit_once('@') {
        Some((user, host)) => {
            let user = user.split_once(':').map_or(user, |(name, _)| name);
            format!("{scheme}://{user}@{host}")
        }
        None => format!("{scheme}://{rest}"),
    }
}

/// Text from agents as a TEXT column can hold it: PostgreSQL refuses NUL, which becomes U+FFFD
/// (SQLite keeps it; JSON columns escape it).
fn text(s: &str) -> std::borrow::Cow<'_, str> {
    match s.contains('\0') {
        true => s.replace('\0', "\u{fffd}").into(),
        false => s.into(),
    }
}

/// Takes the write lock for the rest of `tx`.
fn lock_writes(tx: &mut Transaction) -> Result<()> {
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&WRITE_LOCK])?;
    Ok(())
}

/// Every assignment of one step in a few statements (a wave of thousands would otherwise be
/// thousands of round trips under the write lock); the agents it changes get one new
/// generation.
fn assign_all(tx: &mut Transaction, actions: &[Action]) -> Result<()> {
    if actions.is_empty() {
        return Ok(());
    }
    // Two actions on one agent's app are applied in their order, one by one.
    let mut seen = std::collections::HashSet::new();
    let repeated = actions.iter().any(|Action::Assign { agent_id, app, .. }| {
        !seen.insert((agent_id.as_str(), app.as_str()))
    });
    if repeated {
        for action in actions {
            assign_all(tx, std::slice::from_ref(action))?;
        }
        return Ok(());
    }
    let (mut set, mut taken_off) = ((vec![], vec![], vec![]), (vec![], vec![]));
    for Action::Assign {
        agent_id,
        app,
        assignment,
    } in actions
    {
        match assignment {
            Some(a) => {
                set.0.push(agent_id.as_str());
                set.1.push(app.as_str());
                set.2.push(json(a));
            }
            None => {
                taken_off.0.push(agent_id.as_str());
                taken_off.1.push(app.as_str());
            }
        }
    }
    tx.execute(
        "INSERT INTO assignments (agent_id, app, body)
         SELECT * FROM unnest($1::text[], $2::text[], $3::text[])
         ON CONFLICT (agent_id, app) DO UPDATE SET body = EXCLUDED.body",
        &[&set.0, &set.1, &set.2],
    )?;
    tx.execute(
        "DELETE FROM removals r USING unnest($1::text[], $2::text[]) AS t(agent_id, app)
         WHERE r.agent_id = t.agent_id AND r.app = t.app",
        &[&set.0, &set.1],
    )?;
    // Tombstones, not just missing rows: the agents must stop what they run.
    tx.execute(
        "DELETE FROM assignments a USING unnest($1::text[], $2::text[]) AS t(agent_id, app)
         WHERE a.agent_id = t.agent_id AND a.app = t.app",
        &[&taken_off.0, &taken_off.1],
    )?;
    tx.execute(
        "INSERT INTO removals (agent_id, app) SELECT * FROM unnest($1::text[], $2::text[])
         ON CONFLICT DO NOTHING",
        &[&taken_off.0, &taken_off.1],
    )?;
    // A fleet-wide counter, so an agent's generation never repeats, even across deletes.
    let generation: i64 = tx
        .query_one(
            "INSERT INTO counters (name, value) VALUES ('generation', 1)
             ON CONFLICT (name) DO UPDATE SET value = counters.value + 1 RETURNING value",
            &[],
        )?
        .get(0);
    let agents: Vec<&str> = set.0.iter().chain(&taken_off.0).copied().collect();
    tx.execute(
        "UPDATE agents SET desired_generation = $2 WHERE id = ANY($1)",
        &[&agents, &generation],
    )?;
    Ok(())
}

const RELEASE_COLUMNS: &str = "app, version, counter, manifest, signature, published_ms";

fn release_row(row: &postgres::Row) -> ReleaseRecord {
    ReleaseRecord {
        app: row.get(0),
        version: row.get(1),
        counter: row.get::<_, i64>(2) as u64,
        manifest: row.get(3),
        signature: row.get(4),
        published_ms: row.get::<_, i64>(5) as u64,
    }
}

const AGENT_COLUMNS: &str = "id, arch, hostname, labels, agent_version, last_seen_ms, apps, \
     desired_generation, interval_ms, clock_skew_s";

fn agent_row(row: &postgres::Row) -> Result<AgentRecord> {
    Ok(AgentRecord {
        id: row.get(0),
        arch: row.get(1),
        hostname: row.get(2),
        labels: parse("agent labels", row.get(3))?,
        agent_version: row.get(4),
        last_seen_ms: row.get::<_, i64>(5) as u64,
        apps: parse("agent apps", row.get(6))?,
        desired_generation: row.get::<_, i64>(7) as u64,
        interval_ms: row.get::<_, i64>(8) as u64,
        clock_skew_s: row.get(9),
    })
}

fn rollout_bodies(rows: Vec<postgres::Row>) -> Result<Vec<Rollout>> {
    rows.iter().map(|r| parse("rollout", r.get(0))).collect()
}

impl Store for PgStore {
    fn put_release(&self, r: &ReleaseRecord) -> Result<PutOutcome> {
        off_async(|| {
            let inserted = self.conn()?.execute(
                "INSERT INTO releases (app, version, counter, manifest, signature, published_ms)
                 VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING",
                &[
                    &r.app,
                    &r.version,
                    &(r.counter as i64),
                    &r.manifest,
                    &r.signature,
                    &(r.published_ms as i64),
                ],
            )?;
            if inserted == 1 {
                return Ok(PutOutcome::Inserted);
            }
            let stored = self.release(&r.app, &r.version)?;
            Ok(match stored {
                Some(s) if s.manifest == r.manifest => PutOutcome::Identical,
                _ => PutOutcome::Conflict,
            })
        })
    }

    fn release(&self, app: &str, version: &str) -> Result<Option<ReleaseRecord>> {
        off_async(|| {
            let row = self.conn()?.query_opt(
                &format!("SELECT {RELEASE_COLUMNS} FROM releases WHERE app = $1 AND version = $2"),
                &[&app, &version],
            )?;
            Ok(row.as_ref().map(release_row))
        })
    }

    fn releases(&self) -> Result<Vec<ReleaseRecord>> {
        off_async(|| {
            let rows = self.conn()?.query(
                &format!("SELECT {RELEASE_COLUMNS} FROM releases ORDER BY app, published_ms"),
                &[],
            )?;
            Ok(rows.iter().map(release_row).collect())
        })
    }

    fn record_checkin(
        &self,
        req: &muscle_protocol::CheckinRequest,
        now_ms: u64,
    ) -> Result<Recorded> {
        off_async(|| {
            // As in SQLite: one read on the primary key; a steady check-in waits for the flush.
            // Typed queries: one round trip each instead of prepare, execute and close.
            let row = CheckinRow::of(req, now_ms);
            let id = req.agent_id.as_str();
            let mut conn = self.conn()?;
            let before: Option<(i64, Option<String>)> = conn
                .query_typed_opt(
                    "SELECT desired_generation,
                            CASE WHEN report_key IS NOT DISTINCT FROM $2 THEN NULL ELSE apps END
                     FROM agents WHERE id = $1",
                    &[(&id, Type::TEXT), (&row.key, Type::TEXT)],
                )?
                .map(|r| (r.get(0), r.get(1)));
            if let (Some((generation, None)), true) = (&before, checkins::may_wait(req)) {
                self.steady.keep(id, row);
                return Ok(Recorded {
                    generation: *generation as u64,
                    previous: Previous::Same,
                });
            }
            self.steady.forget(id);
            let (arch, hostname) = (text(&req.arch), text(&req.hostname));
            let (agent_version, labels) = (text(&req.agent_version), json(&req.labels));
            let generation: i64 = conn
                .query_typed_one(
                    "INSERT INTO agents (id, arch, hostname, labels, agent_version, last_seen_ms, apps, interval_ms, clock_skew_s, report_key)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
                     ON CONFLICT (id) DO UPDATE SET arch = $2, hostname = $3, labels = $4, agent_version = $5, last_seen_ms = $6, apps = $7, interval_ms = $8, clock_skew_s = $9, report_key = $10
                     RETURNING desired_generation",
                    &[
                        (&id, Type::TEXT),
                        (&arch, Type::TEXT),
                        (&hostname, Type::TEXT),
                        (&labels, Type::TEXT),
                        (&agent_version, Type::TEXT),
                        (&row.last_seen_ms, Type::INT8),
                        (&row.apps, Type::TEXT),
                        (&row.interval_ms, Type::INT8),
                        (&row.clock_skew_s, Type::INT8),
                        (&row.key, Type::TEXT),
                    ],
                )?
                .get(0);
            Ok(Recorded {
                generation: generation as u64,
                previous: checkins::previous(before.map(|(_, apps)| apps)),
            })
        })
    }

    fn flush_checkins(&self) -> Result<usize> {
        off_async(|| {
            let batch = self.steady.take();
            if batch.is_empty() {
                return Ok(0);
            }
            let mut conn = self.conn()?;
            let mut tx = conn.transaction()?;
            // Serialised with steps and undeploys (which lock agent rows in their own order):
            // no deadlock between them, nor between two replicas' flushes.
            lock_writes(&mut tx)?;
            // A changed report written since, on any replica, has another key: the guard keeps
            // it (a time would compare two replicas' clocks). One statement for the batch: a
            // round trip per agent would hold the write lock for a second at 10,000 agents.
            let ids: Vec<&str> = batch.keys().map(String::as_str).collect();
            let seen: Vec<i64> = batch.values().map(|c| c.last_seen_ms).collect();
            let apps: Vec<&str> = batch.values().map(|c| c.apps.as_str()).collect();
            let skews: Vec<i64> = batch.values().map(|c| c.clock_skew_s).collect();
            let keys: Vec<&str> = batch.values().map(|c| c.key.as_str()).collect();
            tx.execute(
                "UPDATE agents SET last_seen_ms = t.seen, apps = t.apps, clock_skew_s = t.skew
                 FROM unnest($1::text[], $2::bigint[], $3::text[], $4::bigint[], $5::text[])
                      AS t(id, seen, apps, skew, key)
                 WHERE agents.id = t.id AND agents.report_key = t.key
                   AND agents.last_seen_ms <= t.seen",
                &[&ids, &seen, &apps, &skews, &keys],
            )?;
            tx.commit()?;
            Ok(batch.len())
        })
    }

    fn agents(&self) -> Result<Vec<AgentRecord>> {
        off_async(|| {
            let rows = self.conn()?.query(
                &format!("SELECT {AGENT_COLUMNS} FROM agents ORDER BY id"),
                &[],
            )?;
            rows.iter().map(agent_row).collect()
        })
    }

    fn credential_sha256(&self, agent_id: &str) -> Result<Option<String>> {
        off_async(|| {
            let row = self.conn()?.query_opt(
                "SELECT credential_sha256 FROM agents WHERE id = $1",
                &[&agent_id],
            )?;
            Ok(row.and_then(|r| r.get(0)))
        })
    }

    fn set_credential(&self, agent_id: &str, credential_sha256: &str) -> Result<bool> {
        off_async(|| {
            let changed = self.conn()?.execute(
                "UPDATE agents SET credential_sha256 = $2 WHERE id = $1 AND credential_sha256 IS NULL",
                &[&agent_id, &credential_sha256],
            )?;
            Ok(changed == 1)
        })
    }

    fn assignments(&self, agent_id: &str) -> Result<Vec<Assignment>> {
        off_async(|| {
            let rows = self.conn()?.query(
                "SELECT body FROM assignments WHERE agent_id = $1 ORDER BY app",
                &[&agent_id],
            )?;
            rows.iter().map(|r| parse("assignment", r.get(0))).collect()
        })
    }

    fn assignment(&self, agent_id: &str, app: &str) -> Result<Option<Assignment>> {
        off_async(|| {
            let row = self.conn()?.query_opt(
                "SELECT body FROM assignments WHERE agent_id = $1 AND app = $2",
                &[&agent_id, &app],
            )?;
            row.map(|r| parse("assignment", r.get(0))).transpose()
        })
    }

    fn record_probe(&self, agent_id: &str, nonce_sha256: &str, now_ms: u64) -> Result<()> {
        off_async(|| {
            self.conn()?.execute(
                "INSERT INTO probes (agent_id, nonce_sha256, seen_ms) VALUES ($1, $2, $3)
                 ON CONFLICT (agent_id) DO UPDATE SET nonce_sha256 = $2, seen_ms = $3",
                &[&agent_id, &nonce_sha256, &(now_ms as i64)],
            )?;
            Ok(())
        })
    }

    fn take_probe(&self, agent_id: &str, nonce_sha256: &str) -> Result<bool> {
        off_async(|| {
            let taken = self.conn()?.execute(
                "DELETE FROM probes WHERE agent_id = $1 AND nonce_sha256 = $2",
                &[&agent_id, &nonce_sha256],
            )?;
            Ok(taken == 1)
        })
    }

    fn holds(&self, agent_id: &str, app: &str) -> Result<bool> {
        off_async(|| {
            Ok(self
                .conn()?
                .query_one(
                    "SELECT EXISTS (SELECT 1 FROM assignments WHERE agent_id = $1 AND app = $2)
                         OR EXISTS (SELECT 1 FROM removals WHERE agent_id = $1 AND app = $2)",
                    &[&agent_id, &app],
                )?
                .get(0))
        })
    }

    fn removals(&self, agent_id: &str) -> Result<Vec<String>> {
        off_async(|| {
            let rows = self.conn()?.query(
                "SELECT app FROM removals WHERE agent_id = $1 ORDER BY app",
                &[&agent_id],
            )?;
            Ok(rows.iter().map(|r| r.get(0)).collect())
        })
    }

    fn undeploy(&self, u: &Undeploy) -> Result<Undeployed> {
        off_async(|| {
            let mut conn = self.conn()?;
            let mut tx = conn.transaction()?;
            // No rollout may start or step between the check and the tombstones.
            lock_writes(&mut tx)?;
            let rows = tx.query(
                "SELECT body FROM rollouts WHERE app = $1 ORDER BY id",
                &[&u.app],
            )?;
            let mut rollouts = rollout_bodies(rows)?;
            if let Some(blocked) = Undeploy::blocked_by(&rollouts) {
                return Ok(blocked);
            }
            let mut removed = vec![];
            for agent_id in u.agent_ids {
                let assigned: bool = tx
                    .query_one(
                        "SELECT EXISTS (SELECT 1 FROM assignments WHERE agent_id = $1 AND app = $2)",
                        &[agent_id, &u.app],
                    )?
                    .get(0);
                if assigned || u.reporting.contains(agent_id) {
                    removed.push(agent_id.clone());
                }
            }
            let tombstones: Vec<Action> = removed
                .iter()
                .map(|agent_id| Action::Assign {
                    agent_id: agent_id.clone(),
                    app: u.app.to_owned(),
                    assignment: None,
                })
                .collect();
            assign_all(&mut tx, &tombstones)?;
            let mut withdrawn = vec![];
            for standing in u.withdraw(&mut rollouts) {
                tx.execute(
                    "UPDATE rollouts SET body = $2 WHERE id = $1",
                    &[&standing.id, &json(standing)],
                )?;
                withdrawn.push(standing.id);
            }
            tx.commit()?;
            Ok(Undeployed::From {
                agents: removed,
                withdrawn,
            })
        })
    }

    fn create_rollout(&self, rollout: &Rollout) -> Result<i64> {
        off_async(|| {
            let mut conn = self.conn()?;
            let mut tx = conn.transaction()?;
            let id: i64 = tx
                .query_one(
                    "INSERT INTO rollouts (app, body) VALUES ($1, '{}') RETURNING id",
                    &[&rollout.app],
                )?
                .get(0);
            let mut stored = rollout.clone();
            stored.id = id;
            tx.execute(
                "UPDATE rollouts SET body = $2 WHERE id = $1",
                &[&id, &json(&stored)],
            )?;
            tx.commit()?;
            Ok(id)
        })
    }

    fn commit_step(&self, step: &Step) -> Result<bool> {
        off_async(|| {
            let mut conn = self.conn()?;
            let mut tx = conn.transaction()?;
            lock_writes(&mut tx)?;
            let id = step.rollout.id;
            let stored = tx.query_opt("SELECT body FROM rollouts WHERE id = $1", &[&id])?;
            if let Some(row) = stored {
                if parse::<Rollout>("rollout", row.get(0))? != *step.from {
                    return Ok(false);
                }
            }
            assign_all(&mut tx, step.actions)?;
            crate::failpoint::hit("engine-step");
            if step.save_rollout {
                tx.execute(
                    "UPDATE rollouts SET body = $2 WHERE id = $1",
                    &[&id, &json(step.rollout)],
                )?;
            }
            if let Some(request) = step.handled {
                // Only the request handled: one made meanwhile stays queued for the next step.
                tx.execute(
                    "UPDATE rollouts SET request = NULL WHERE id = $1 AND request = $2",
                    &[&id, &request.as_str()],
                )?;
            }
            tx.commit()?;
            Ok(true)
        })
    }

    fn request_rollout(&self, id: i64, request: Request) -> Result<()> {
        off_async(|| {
            self.conn()?.execute(
                "UPDATE rollouts SET request = $2 WHERE id = $1",
                &[&id, &request.as_str()],
            )?;
            Ok(())
        })
    }

    fn rollout_requests(&self) -> Result<Vec<(i64, Request)>> {
        off_async(|| {
            let rows = self.conn()?.query(
                "SELECT id, request FROM rollouts WHERE request IS NOT NULL ORDER BY id",
                &[],
            )?;
            rows.iter()
                .map(|r| {
                    let id: i64 = r.get(0);
                    let text: &str = r.get(1);
                    text.parse()
                        .map(|request| (id, request))
                        .map_err(|e| StoreError::Corrupt(format!("rollout {id}: {e}")))
                })
                .collect()
        })
    }

    fn rollout(&self, id: i64) -> Result<Option<Rollout>> {
        off_async(|| {
            let row = self
                .conn()?
                .query_opt("SELECT body FROM rollouts WHERE id = $1", &[&id])?;
            row.map(|r| parse("rollout", r.get(0))).transpose()
        })
    }

    fn engine_lease(&self) -> Result<EngineLease> {
        off_async(|| {
            let mut lease = self.lease.lock().unwrap_or_else(|p| p.into_inner());
            // A connection that no longer answers took its lease with it (on the server too).
            if let Some((client, _)) = lease.as_mut() {
                if client.is_valid(LEASE_CHECK_DEADLINE).is_err() {
                    *lease = None;
                }
            }
            let (client, held) = match lease.as_mut() {
                Some(l) => l,
                None => lease.insert((self.config.connect(NoTls)?, false)),
            };
            if *held {
                return Ok(EngineLease::Held { taken: false });
            }
            *held = client
                .query_one("SELECT pg_try_advisory_lock($1)", &[&ENGINE_LOCK])?
                .get(0);
            Ok(match held {
                true => EngineLease::Held { taken: true },
                false => EngineLease::Elsewhere,
            })
        })
    }

    fn rollouts(&self) -> Result<Vec<Rollout>> {
        off_async(|| {
            rollout_bodies(
                self.conn()?
                    .query("SELECT body FROM rollouts ORDER BY id", &[])?,
            )
        })
    }
}
