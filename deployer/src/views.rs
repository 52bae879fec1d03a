//! Tables and JSON rows for the terminal and the JSON endpoints.

use serde::{Deserialize, Serialize};

use crate::rollout::{MemberState, Rollout};
use crate::store::{
    AgentEvent, AgentEventRecord, AgentRecord, ReleaseRecord, CLOCK_SKEW_FLAGGED_S,
};

#[derive(Serialize, Deserialize)]
pub struct FleetRow {
    pub id: String,
    pub arch: String,
    pub hostname: String,
    pub labels: std::collections::BTreeMap<String, String>,
    pub agent_version: String,
    pub apps: Vec<AppCell>,
    pub last_seen_s: u64,
    /// When, in ms since the epoch (the deployer's clock).
    #[serde(default)]
    pub last_seen_ms: u64,
    /// The agent's own check-in interval: it is stale after a few of them.
    pub interval_ms: u64,
    /// The agent's clock minus the deployer's.
    pub clock_skew_s: i64,
    pub stale: bool,
}

#[derive(Serialize, Deserialize)]
pub struct AppCell {
    pub app: String,
    pub version: Option<String>,
    pub health: String,
    pub error: Option<String>,
}

/// A unit enum's name as the JSON views spell it (`crash_loop`, `rolled_back`).
pub fn snake(value: impl Serialize) -> String {
    serde_json::to_value(value)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default()
}

impl FleetRow {
    /// When the agent last checked in, as `fleet` and the console say it: `12s ago`, stale and
    /// a clock far off the deployer's marked.
    pub fn seen(&self) -> String {
        let mut seen = format!("{}s ago", self.last_seen_s);
        if self.stale {
            seen += " (stale)";
        }
        if self.clock_skew_s.abs() > CLOCK_SKEW_FLAGGED_S {
            seen += &format!(" (clock {:+}s off)", self.clock_skew_s);
        }
        seen
    }
}

pub fn fleet_rows(agents: &[AgentRecord], now_ms: u64) -> Vec<FleetRow> {
    agents
        .iter()
        .map(|a| {
            let age = now_ms.saturating_sub(a.last_seen_ms);
            let stale = a.is_stale(now_ms);
            FleetRow {
                id: a.id.clone(),
                arch: a.arch.clone(),
                hostname: a.hostname.clone(),
                labels: a.labels.clone(),
                agent_version: a.agent_version.clone(),
                apps: a
                    .apps
                    .iter()
                    .map(|r| AppCell {
                        app: r.app.to_string(),
                        version: r
                            .running_version
                            .as_ref()
                            .or(r.installed_version.as_ref())
                            .map(ToString::to_string),
                        // What a silent agent last said is no longer known to hold.
                        health: if stale {
                            "unknown".to_owned()
                        } else {
                            snake(r.health)
                        },
                        error: r.last_error.clone(),
                    })
                    .collect(),
                last_seen_s: age / 1000,
                last_seen_ms: a.last_seen_ms,
                interval_ms: a.interval_ms,
                clock_skew_s: a.clock_skew_s,
                stale,
            }
        })
        .collect()
}

pub fn fleet_table(fleet: Vec<FleetRow>) -> String {
    let rows: Vec<Vec<String>> = fleet
        .into_iter()
        .map(|r| {
            let apps = r
                .apps
                .iter()
                .map(|c| {
                    format!(
                        "{} {} ({})",
                        c.app,
                        c.version.as_deref().unwrap_or("-"),
                        c.health
                    )
                })
                .collect::<Vec<_>>()
                .join(", ");
            let seen = r.seen();
            let labels: Vec<String> = r.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
            vec![
                r.id,
                r.arch,
                r.hostname,
                labels.join(","),
                r.agent_version,
                apps,
                seen,
            ]
        })
        .collect();
    table(
        &[
            "AGENT",
            "ARCH",
            "HOSTNAME",
            "LABELS",
            "AGENT VERSION",
            "APPS",
            "LAST SEEN",
        ],
        &rows,
    )
}

#[derive(Serialize, Deserialize)]
pub struct ReleaseRow {
    pub app: String,
    pub version: String,
    pub counter: u64,
    pub signed: bool,
    pub artifacts: Vec<String>,
}

pub fn release_rows(releases: &[ReleaseRecord]) -> Vec<ReleaseRow> {
    releases
        .iter()
        .map(|r| {
            let manifest = muscle_protocol::ReleaseManifest::parse(r.manifest.as_bytes()).ok();
            ReleaseRow {
                app: r.app.clone(),
                version: r.version.clone(),
                counter: r.counter,
                signed: r.signature.is_some(),
                artifacts: manifest
                    .map(|m| {
                        m.artifacts
                            .iter()
                            .map(|a| format!("{}/{}", a.arch, a.binary))
                            .collect()
                    })
                    .unwrap_or_default(),
            }
        })
        .collect()
}

pub fn releases_table(releases: Vec<ReleaseRow>) -> String {
    let rows: Vec<Vec<String>> = releases
        .into_iter()
        .map(|r| {
            vec![
                r.app,
                r.version,
                r.counter.to_string(),
                if r.signed { "yes" } else { "no" }.into(),
                r.artifacts.join(" "),
            ]
        })
        .collect();
    table(&["APP", "VERSION", "COUNTER", "SIGNED", "ARTIFACTS"], &rows)
}

/// One agent as `fleet` shows it, with its history.
#[derive(Serialize, Deserialize)]
pub struct AgentDetail {
    pub agent: FleetRow,
    pub history: Vec<AgentEventRecord>,
}

/// `agent ID`: its fleet row, then its history, oldest first.
pub fn agent_detail(d: AgentDetail) -> String {
    let rows: Vec<Vec<String>> = d
        .history
        .iter()
        .map(|e| {
            vec![
                muscle_logline::utc(e.at_ms / 1000),
                describe_event(&e.event),
            ]
        })
        .collect();
    format!(
        "{}\nhistory:\n{}",
        fleet_table(vec![d.agent]),
        table(&["WHEN", "EVENT"], &rows)
    )
}

pub fn describe_event(e: &AgentEvent) -> String {
    let health = |h: &muscle_protocol::Health| snake(h);
    match e {
        AgentEvent::Joined {
            arch,
            agent_version,
        } => format!("joined ({arch}, agent {agent_version})"),
        AgentEvent::Installed {
            app,
            version,
            previous: Some(p),
        } => format!("{app} {version} installed (was {p})"),
        AgentEvent::Installed { app, version, .. } => format!("{app} {version} installed"),
        AgentEvent::Failed {
            app,
            version,
            error,
        } => format!(
            "{app} {version} refused or rolled back: {}",
            error.as_deref().unwrap_or("no reason given")
        ),
        AgentEvent::HealthChanged { app, from, to } => {
            format!("{app} {} -> {}", health(from), health(to))
        }
        AgentEvent::Removed { app } => format!("{app} removed"),
        AgentEvent::Refused { reason } => format!("refused the deployer's answer: {reason}"),
    }
}

pub fn rollout_summary(r: &Rollout) -> String {
    let mut out = format!(
        "rollout {}: {} {} — {:?}: {}\n",
        r.id, r.app, r.version, r.status, r.message
    );
    for (i, w) in r.waves.iter().enumerate() {
        let marker = if i == r.current_wave && r.status.is_active() {
            ">"
        } else {
            " "
        };
        let members: Vec<String> = w
            .members
            .iter()
            .map(|m| {
                let state = snake(m.state);
                match (&m.error, m.state) {
                    (Some(e), MemberState::Failed) => {
                        let mut text = format!("{} [{}] {state}: {e}", m.agent_id, m.arch);
                        for line in &m.log {
                            text += &format!("\n        | {line}");
                        }
                        text
                    }
                    _ => format!("{} [{}] {state}", m.agent_id, m.arch),
                }
            })
            .collect();
        out += &format!(
            "{marker} {:<8} {}/{} healthy\n",
            w.name,
            w.count(MemberState::Healthy),
            w.members.len()
        );
        for m in members {
            out += &format!("      {m}\n");
        }
    }
    out
}

pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_owned()
            + "\n"
    };
    let mut out = line(header.to_vec());
    for row in rows {
        out += &line(row.iter().map(String::as_str).collect());
    }
    out
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use muscle_protocol::{AppReport, Health, Name};

    use super::*;

    #[test]
    fn fleet_json_has_labels_as_an_object_and_a_stale_agents_health_unknown() {
        let mut report = AppReport::new(Name::parse("hello").unwrap());
        report.health = Health::Healthy;
        let agent = AgentRecord {
            id: "a".into(),
            arch: "x86_64".into(),
            hostname: "h".into(),
            labels: BTreeMap::from([
                ("site".into(), "lab".into()),
                ("tier".into(), "edge".into()),
            ]),
            agent_version: "0.1.0".into(),
            last_seen_ms: 1_000,
            apps: vec![report],
            desired_generation: 0,
            interval_ms: 45_000,
            clock_skew_s: 0,
        };
        let fresh =
            serde_json::to_value(fleet_rows(std::slice::from_ref(&agent), 100_000)).unwrap();
        assert_eq!(
            fresh[0]["labels"],
            serde_json::json!({"site": "lab", "tier": "edge"})
        );
        assert_eq!(
            fresh[0]["apps"][0]["health"], "healthy",
            "45 s interval: not stale at 99 s"
        );
        let later = 1_000 + 3 * 45_000;
        let stale = serde_json::to_value(fleet_rows(std::slice::from_ref(&agent), later)).unwrap();
        assert_eq!(stale[0]["stale"], true);
        assert_eq!(stale[0]["apps"][0]["health"], "unknown");
        assert!(fleet_table(fleet_rows(&[agent], later)).contains("(unknown)"));
    }
}
