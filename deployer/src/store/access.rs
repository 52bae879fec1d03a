//! Who may do what, and who did what: API tokens with roles (only their sha256 is stored), and
//! the audit log of every change made to the store.

use rusqlite::{params, OptionalExtension};
use serde::{Deserialize, Serialize};

use super::{Result, SqliteStore, StoreError};
use crate::rollout::Request;

/// What a token may do.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    /// The JSON views: fleet, releases, rollouts, jobs, audit.
    ReadOnly,
    /// Reading, and publishing releases.
    Publisher,
    /// Everything: publishing, rollouts, undeploy, jobs, logs, tokens.
    Operator,
}

/// One kind of access a request needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Permission {
    Read,
    Publish,
    Steer,
}

impl Role {
    pub fn grants(self, p: Permission) -> bool {
        match self {
            Role::ReadOnly => p == Permission::Read,
            Role::Publisher => matches!(p, Permission::Read | Permission::Publish),
            Role::Operator => true,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Role::ReadOnly => "read-only",
            Role::Publisher => "publisher",
            Role::Operator => "operator",
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct TokenRecord {
    pub name: String,
    pub role: Role,
    pub created_ms: u64,
}

/// A change to the fleet's desired state or to who may make one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum Change {
    Publish {
        app: String,
        version: String,
    },
    /// A boot image (`cargo xtask image`) was published.
    PublishImage {
        name: String,
        version: String,
    },
    RolloutStart {
        rollout: i64,
        app: String,
        version: String,
    },
    RolloutRequest {
        rollout: i64,
        request: Request,
    },
    Undeploy {
        app: String,
        agents: Vec<String>,
    },
    Exec {
        job: String,
        argv: Vec<String>,
        agents: usize,
    },
    TokenCreate {
        name: String,
        role: Role,
    },
    TokenRevoke {
        name: String,
    },
    /// A deployer replica took the rollout engine's lease (at its start, or from one that
    /// died).
    EngineTakeover {
        replica: String,
    },
}

/// One line of the audit log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEntry {
    pub at_ms: u64,
    /// `local:<user>` for the CLI on the deployer's host, `token:<name>` through the API.
    pub who: String,
    #[serde(flatten)]
    pub change: Change,
}

pub trait AccessStore {
    /// Stores a token by its hash; false when the name is taken.
    fn create_token(&self, name: &str, role: Role, sha256: &str, now_ms: u64) -> Result<bool>;
    /// False when there was no such token.
    fn revoke_token(&self, name: &str) -> Result<bool>;
    fn tokens(&self) -> Result<Vec<TokenRecord>>;
    /// The name and role of the token hashing to `sha256`.
    fn token(&self, sha256: &str) -> Result<Option<(String, Role)>>;
    fn record(&self, entry: &AuditEntry) -> Result<()>;
    /// The newest `limit` entries, oldest first.
    fn audit(&self, limit: usize) -> Result<Vec<AuditEntry>>;
}

pub(super) fn role(text: &str) -> Result<Role> {
    serde_json::from_value(serde_json::Value::String(text.to_owned()))
        .map_err(|_| StoreError::Corrupt(format!("unknown token role {text:?}")))
}

impl AccessStore for SqliteStore {
    fn create_token(&self, name: &str, role: Role, sha256: &str, now_ms: u64) -> Result<bool> {
        let inserted = self.conn().execute(
            "INSERT OR IGNORE INTO tokens (name, role, sha256, created_ms) VALUES (?1, ?2, ?3, ?4)",
            params![name, role.as_str(), sha256, now_ms as i64],
        )?;
        Ok(inserted == 1)
    }

    fn revoke_token(&self, name: &str) -> Result<bool> {
        Ok(self
            .conn()
            .execute("DELETE FROM tokens WHERE name = ?1", [name])?
            == 1)
    }

    fn tokens(&self) -> Result<Vec<TokenRecord>> {
        let conn = self.conn();
        let rows: Vec<(String, String, i64)> = conn
            .prepare("SELECT name, role, created_ms FROM tokens ORDER BY name")?
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
            .collect::<rusqlite::Result<_>>()?;
        rows.into_iter()
            .map(|(name, text, created)| {
                Ok(TokenRecord {
                    name,
                    role: role(&text)?,
                    created_ms: created as u64,
                })
            })
            .collect()
    }

    fn token(&self, sha256: &str) -> Result<Option<(String, Role)>> {
        let found: Option<(String, String)> = self
            .conn()
            .prepare_cached("SELECT name, role FROM tokens WHERE sha256 = ?1")?
            .query_row([sha256], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()?;
        found
            .map(|(name, text)| Ok((name, role(&text)?)))
            .transpose()
    }

    fn record(&self, entry: &AuditEntry) -> Result<()> {
        self.conn().execute(
            "INSERT INTO audit (at_ms, who, change) VALUES (?1, ?2, ?3)",
            params![
                entry.at_ms as i64,
                entry.who,
                serde_json::to_string(&entry.change).expect("a change serialises")
            ],
        )?;
        Ok(())
    }

    fn audit(&self, limit: usize) -> Result<Vec<AuditEntry>> {
        let conn = self.conn();
        let rows: Vec<(i64, String, String)> = conn
            .prepare("SELECT at_ms, who, change FROM audit ORDER BY seq DESC LIMIT ?1")?
            .query_map([limit as i64], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
            .collect::<rusqlite::Result<_>>()?;
        let mut entries = rows
            .into_iter()
            .map(|(at, who, change)| {
                Ok(AuditEntry {
                    at_ms: at as u64,
                    who,
                    change: serde_json::from_str(&change)
                        .map_err(|e| StoreError::Corrupt(format!("audit entry: {e}")))?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        entries.reverse();
        Ok(entries)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_grant_what_they_say() {
        use Permission::*;
        let grants = |r: Role| [Read, Publish, Steer].map(|p| r.grants(p));
        assert_eq!(grants(Role::ReadOnly), [true, false, false]);
        assert_eq!(grants(Role::Publisher), [true, true, false]);
        assert_eq!(grants(Role::Operator), [true, true, true]);
    }
}
