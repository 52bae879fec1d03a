//! What network boot keeps: boot images (`cargo xtask image`), stored as their manifest and
//! signature (the kernel and initramfs of each target are blobs like any release's files), and
//! each machine's one-time enrolment token from its latest boot script.

use rusqlite::{params, OptionalExtension};

use super::{PutOutcome, Result, SqliteStore};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRecord {
    pub name: String,
    pub version: String,
    /// manifest.json as published, byte for byte (a signature covers these bytes).
    pub manifest: String,
    pub signature: Option<String>,
    pub published_ms: u64,
}

pub trait BootStore {
    /// Stores an image; a version's manifest never changes.
    fn put_image(&self, image: &ImageRecord) -> Result<PutOutcome>;
    fn image(&self, name: &str, version: &str) -> Result<Option<ImageRecord>>;
    /// Every image, in the order they were first published (not by clock: replicas' clocks
    /// differ).
    fn images(&self) -> Result<Vec<ImageRecord>>;

    /// Keeps the sha256 of the enrolment token a boot script gave `agent_id`, until
    /// `expires_ms`; it replaces the one of its previous boot. Expired tokens are dropped.
    fn issue_boot_token(
        &self,
        agent_id: &str,
        token_sha256: &str,
        now_ms: u64,
        expires_ms: u64,
    ) -> Result<()>;
    /// Whether a boot token may enrol `agent_id` now (checked before its check-in is recorded):
    /// an unexpired token with this sha256, for an agent that is new or a machine that enrolled
    /// this way before. Takes nothing.
    fn boot_token_valid(&self, agent_id: &str, token_sha256: &str, now_ms: u64) -> Result<bool>;
    /// In one transaction: takes the token (once), and gives the recorded agent this credential
    /// if it has none or is a network-booted machine, replacing the one of its previous boot
    /// (gone with its tmpfs). An agent enrolled with the fleet's token is never taken over.
    fn enrol_machine(
        &self,
        agent_id: &str,
        token_sha256: &str,
        credential_sha256: &str,
        now_ms: u64,
    ) -> Result<bool>;
}

/// Inserted, the same again, or another manifest under the name and version.
pub(super) fn outcome(
    inserted: bool,
    stored: Option<&ImageRecord>,
    new: &ImageRecord,
) -> PutOutcome {
    match (inserted, stored) {
        (true, _) => PutOutcome::Inserted,
        (false, Some(s)) if s.manifest == new.manifest => PutOutcome::Identical,
        (false, _) => PutOutcome::Conflict,
    }
}

/// SQL (both dialects; SQLite numbers `$1`.. by first appearance, as PostgreSQL does): the boot
/// token of agent `$1` with sha256 `$2` has not expired at `$3`, and that agent is new, has no
/// credential yet, or enrolled with a boot token before.
const USABLE_BOOT_TOKEN: &str = "agent_id = $1 AND sha256 = $2 AND expires_ms > $3 \
     AND (NOT EXISTS (SELECT 1 FROM agents WHERE agents.id = boot_tokens.agent_id AND agents.credential_sha256 IS NOT NULL) \
     OR EXISTS (SELECT 1 FROM boot_machines WHERE boot_machines.agent_id = boot_tokens.agent_id))";

/// Whether a usable boot token matches (see [`USABLE_BOOT_TOKEN`]).
pub(super) fn boot_token_valid_sql() -> String {
    format!("SELECT EXISTS (SELECT 1 FROM boot_tokens WHERE {USABLE_BOOT_TOKEN})")
}

/// Takes a usable boot token (see [`USABLE_BOOT_TOKEN`]): one row deleted when it was.
pub(super) fn take_boot_token_sql() -> String {
    format!("DELETE FROM boot_tokens WHERE {USABLE_BOOT_TOKEN}")
}

pub(super) const IMAGE_COLUMNS: &str = "name, version, manifest, signature, published_ms";

fn image_row(row: &rusqlite::Row) -> rusqlite::Result<ImageRecord> {
    Ok(ImageRecord {
        name: row.get(0)?,
        version: row.get(1)?,
        manifest: row.get(2)?,
        signature: row.get(3)?,
        published_ms: row.get::<_, i64>(4)? as u64,
    })
}

impl BootStore for SqliteStore {
    fn put_image(&self, i: &ImageRecord) -> Result<PutOutcome> {
        let inserted = self.conn().execute(
            "INSERT OR IGNORE INTO images (name, version, manifest, signature, published_ms) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![i.name, i.version, i.manifest, i.signature, i.published_ms as i64],
        )? == 1;
        let stored = if inserted {
            None
        } else {
            self.image(&i.name, &i.version)?
        };
        Ok(outcome(inserted, stored.as_ref(), i))
    }

    fn image(&self, name: &str, version: &str) -> Result<Option<ImageRecord>> {
        Ok(self
            .conn()
            .query_row(
                &format!("SELECT {IMAGE_COLUMNS} FROM images WHERE name = ?1 AND version = ?2"),
                params![name, version],
                image_row,
            )
            .optional()?)
    }

    fn images(&self) -> Result<Vec<ImageRecord>> {
        let conn = self.conn();
        let mut stmt = conn.prepare(&format!(
            "SELECT {IMAGE_COLUMNS} FROM images ORDER BY rowid"
        ))?;
        let rows = stmt
            .query_map([], image_row)?
            .collect::<rusqlite::Result<_>>()?;
        Ok(rows)
    }

    fn issue_boot_token(
        &self,
        agent_id: &str,
        token_sha256: &str,
        now_ms: u64,
        expires_ms: u64,
    ) -> Result<()> {
        let conn = self.conn();
        conn.execute(
            "DELETE FROM boot_tokens WHERE expires_ms <= ?1",
            [now_ms as i64],
        )?;
        conn.execute(
            "INSERT INTO boot_tokens (agent_id, sha256, expires_ms) VALUES (?1, ?2, ?3)
             ON CONFLICT (agent_id) DO UPDATE SET sha256 = excluded.sha256, expires_ms = excluded.expires_ms",
            params![agent_id, token_sha256, expires_ms as i64],
        )?;
        Ok(())
    }

    fn boot_token_valid(&self, agent_id: &str, token_sha256: &str, now_ms: u64) -> Result<bool> {
        Ok(self.conn().query_row(
            &boot_token_valid_sql(),
            params![agent_id, token_sha256, now_ms as i64],
            |row| row.get(0),
        )?)
    }

    fn enrol_machine(
        &self,
        agent_id: &str,
        token_sha256: &str,
        credential_sha256: &str,
        now_ms: u64,
    ) -> Result<bool> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let taken = tx.execute(
            &take_boot_token_sql(),
            params![agent_id, token_sha256, now_ms as i64],
        )? == 1;
        let set = taken
            && tx.execute(
                "UPDATE agents SET credential_sha256 = ?2 WHERE id = ?1",
                params![agent_id, credential_sha256],
            )? == 1;
        if !set {
            return Ok(false);
        }
        tx.execute(
            "INSERT INTO boot_machines (agent_id, enrolled_ms) VALUES (?1, ?2)
             ON CONFLICT (agent_id) DO UPDATE SET enrolled_ms = excluded.enrolled_ms",
            params![agent_id, now_ms as i64],
        )?;
        tx.commit()?;
        Ok(true)
    }
}
