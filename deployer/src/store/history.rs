//! Each agent's history: what changed in its reports from one check-in to the next (installs,
//! rollbacks and refusals, health changes, removals) and refused answers, kept per agent.

use muscle_protocol::{AppReport, CheckinRequest, Health};
use rusqlite::params;
use serde::{Deserialize, Serialize};

use super::{Result, SqliteStore};

/// The newest events kept per agent; older ones are deleted as new ones come.
pub const EVENTS_KEPT_PER_AGENT: i64 = 200;

/// One thing that happened on an agent, as its check-ins told it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum AgentEvent {
    /// The agent checked in for the first time.
    Joined { arch: String, agent_version: String },
    /// A version was committed (installed and through probation).
    Installed {
        app: String,
        version: String,
        previous: Option<String>,
    },
    /// A version was refused, or rolled back from, with the agent's reason.
    Failed {
        app: String,
        version: String,
        error: Option<String>,
    },
    HealthChanged {
        app: String,
        from: Health,
        to: Health,
    },
    /// The app is no longer on the agent.
    Removed { app: String },
    /// The agent refused the deployer's last answer.
    Refused { reason: String },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentEventRecord {
    pub at_ms: u64,
    #[serde(flatten)]
    pub event: AgentEvent,
}

/// A digest of everything a check-in records but what changes at each (its time, the clock
/// skew, health durations and restart counts): a check-in with the same key as the agent's last
/// changes nothing in its row that cannot wait, nor in its history.
pub fn report_key(req: &CheckinRequest) -> String {
    fn name(n: &Option<muscle_protocol::Name>) -> &str {
        n.as_ref().map_or("", |n| n.as_str())
    }
    let mut text = format!(
        "{}\0{}\0{}\0{}\0{:?}\n",
        req.arch,
        req.hostname,
        req.agent_version,
        req.interval_ms.unwrap_or(0),
        req.labels
    );
    for a in &req.apps {
        text += &format!(
            "{}\0{}\0{}\0{}\0{:?}\0{}\0{}\n",
            a.app,
            name(&a.installed_version),
            name(&a.running_version),
            name(&a.failed_version),
            a.health,
            a.last_error.as_deref().unwrap_or(""),
            a.log_tail.as_deref().unwrap_or("")
        );
    }
    muscle_protocol::sha256_hex(text.as_bytes())
}

/// What changed between an agent's previous reports and its new ones.
pub fn changes(old: &[AppReport], new: &[AppReport]) -> Vec<AgentEvent> {
    let mut events = Vec::new();
    for n in new {
        let o = old.iter().find(|o| o.app == n.app);
        let app = n.app.to_string();
        let was = |f: fn(&AppReport) -> Option<&muscle_protocol::Name>| o.and_then(f);
        if let Some(v) = &n.installed_version {
            if was(|o| o.installed_version.as_ref()) != Some(v) {
                events.push(AgentEvent::Installed {
                    app: app.clone(),
                    version: v.to_string(),
                    previous: was(|o| o.installed_version.as_ref()).map(ToString::to_string),
                });
            }
        }
        if let Some(v) = &n.failed_version {
            let same_failure = o.is_some_and(|o| {
                o.failed_version.as_ref() == Some(v) && o.last_error == n.last_error
            });
            if !same_failure {
                events.push(AgentEvent::Failed {
                    app: app.clone(),
                    version: v.to_string(),
                    error: n.last_error.clone(),
                });
            }
        }
        let from = o.map_or(Health::Stopped, |o| o.health);
        if from != n.health {
            events.push(AgentEvent::HealthChanged {
                app,
                from,
                to: n.health,
            });
        }
    }
    for o in old {
        if !new.iter().any(|n| n.app == o.app) {
            events.push(AgentEvent::Removed {
                app: o.app.to_string(),
            });
        }
    }
    events
}

pub trait HistoryStore {
    /// Appends `events` to the agent's history, dropping what is past the per-agent cap.
    fn add_events(&self, agent_id: &str, at_ms: u64, events: &[AgentEvent]) -> Result<()>;
    /// The newest `limit` events of an agent, oldest first.
    fn events(&self, agent_id: &str, limit: usize) -> Result<Vec<AgentEventRecord>>;
}

impl HistoryStore for SqliteStore {
    fn add_events(&self, agent_id: &str, at_ms: u64, events: &[AgentEvent]) -> Result<()> {
        if events.is_empty() {
            return Ok(());
        }
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        for e in events {
            tx.execute(
                "INSERT INTO agent_events (agent_id, at_ms, body) VALUES (?1, ?2, ?3)",
                params![agent_id, at_ms as i64, super::json(e)],
            )?;
        }
        tx.execute(
            "DELETE FROM agent_events WHERE agent_id = ?1 AND id <= (
                 SELECT id FROM agent_events WHERE agent_id = ?1 ORDER BY id DESC LIMIT 1 OFFSET ?2)",
            params![agent_id, EVENTS_KEPT_PER_AGENT],
        )?;
        tx.commit()?;
        Ok(())
    }

    fn events(&self, agent_id: &str, limit: usize) -> Result<Vec<AgentEventRecord>> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT at_ms, body FROM agent_events WHERE agent_id = ?1 ORDER BY id DESC LIMIT ?2",
        )?;
        let rows = stmt
            .query_map(params![agent_id, limit as i64], |r| {
                Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?))
            })?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        let mut out = rows
            .iter()
            .map(|(at, body)| {
                Ok(AgentEventRecord {
                    at_ms: *at as u64,
                    event: super::parse("agent event", body)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        out.reverse();
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use muscle_protocol::Name;

    fn report(app: &str, installed: Option<&str>, health: Health) -> AppReport {
        AppReport {
            installed_version: installed.map(|v| Name::parse(v).unwrap()),
            running_version: installed.map(|v| Name::parse(v).unwrap()),
            health,
            ..AppReport::new(Name::parse(app).unwrap())
        }
    }

    #[test]
    fn installs_failures_health_and_removals_are_told_once() {
        let v1 = report("web", Some("1.0.0"), Health::Healthy);
        assert_eq!(
            changes(&[], std::slice::from_ref(&v1)),
            vec![
                AgentEvent::Installed {
                    app: "web".into(),
                    version: "1.0.0".into(),
                    previous: None
                },
                AgentEvent::HealthChanged {
                    app: "web".into(),
                    from: Health::Stopped,
                    to: Health::Healthy
                },
            ]
        );
        assert!(changes(std::slice::from_ref(&v1), std::slice::from_ref(&v1)).is_empty());
        let rolled_back = AppReport {
            failed_version: Some(Name::parse("2.0.0").unwrap()),
            last_error: Some("health check failed".into()),
            ..v1.clone()
        };
        let events = changes(
            std::slice::from_ref(&v1),
            std::slice::from_ref(&rolled_back),
        );
        assert_eq!(
            events,
            vec![AgentEvent::Failed {
                app: "web".into(),
                version: "2.0.0".into(),
                error: Some("health check failed".into())
            }]
        );
        assert!(changes(
            std::slice::from_ref(&rolled_back),
            std::slice::from_ref(&rolled_back)
        )
        .is_empty());
        assert_eq!(
            changes(&[v1], &[]),
            vec![AgentEvent::Removed { app: "web".into() }]
        );
    }
}
