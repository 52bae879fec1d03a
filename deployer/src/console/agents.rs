//! An agent's page: what it runs, its history (installs, rollbacks, refusals, health changes),
//! the log lines it sent with failures, and, for operators, a fresh tail of each app's log.

use super::html::{csrf_field, esc, table, url_part, when};
use super::session::Session;
use crate::rollout::Rollout;
use crate::service_logs::Tail;
use crate::store::Permission;
use crate::views::{describe_event, AgentDetail};

pub fn page(d: &AgentDetail, rollouts: &[Rollout], session: &Session) -> String {
    let a = &d.agent;
    let labels: Vec<String> = a
        .labels
        .iter()
        .map(|(k, v)| format!("{}={}", esc(k), esc(v)))
        .collect();
    let mut out = format!(
        "<dl class=\"facts\" data-agent=\"{id}\"><dt>Arch</dt><dd>{arch}</dd><dt>Hostname</dt><dd>{host}</dd>\
         <dt>Labels</dt><dd>{labels}</dd><dt>Agent version</dt><dd>{version}</dd>\
         <dt>Last seen</dt><dd>{seen}</dd><dt>Clock skew</dt><dd>{skew:+} s</dd></dl>",
        id = esc(&a.id),
        arch = esc(&a.arch),
        host = esc(&a.hostname),
        labels = labels.join(", "),
        version = esc(&a.agent_version),
        skew = a.clock_skew_s,
        seen = super::html::seen(a),
    );
    let steer = session.may(Permission::Steer);
    let apps: Vec<String> = a
        .apps
        .iter()
        .map(|c| {
            // A form: asking an agent for its log is work, not a view.
            let tail = if steer {
                format!(
                    "<form method=\"post\" action=\"/ui/agents/{}/logs/{}\">{}\
                     <button class=\"log-tail\">Log tail</button></form>",
                    url_part(&a.id),
                    url_part(&c.app),
                    csrf_field(&session.csrf)
                )
            } else {
                String::new()
            };
            format!(
                "<tr data-app=\"{app}\"><td>{app}</td><td>{version}</td>\
                 <td><span class=\"health health-{health}\">{health}</span></td><td>{error}</td><td>{tail}</td></tr>",
                app = esc(&c.app),
                version = esc(c.version.as_deref().unwrap_or("-")),
                health = esc(&c.health),
                error = esc(c.error.as_deref().unwrap_or("")),
            )
        })
        .collect();
    out += "<h2>Apps</h2>";
    out += &table(
        "apps",
        &["App", "Version", "Health", "Last error", "Log"],
        &apps,
    );
    let history: Vec<String> = d
        .history
        .iter()
        .rev()
        .map(|e| {
            format!(
                "<tr><td>{}</td><td>{}</td></tr>",
                when(e.at_ms),
                esc(&describe_event(&e.event))
            )
        })
        .collect();
    out += "<h2>History</h2>";
    out += &table("history", &["When", "Event"], &history);
    out += &failure_logs(&a.id, rollouts);
    out
}

/// The log lines this agent sent with its failures in rollouts, newest rollout first.
fn failure_logs(agent: &str, rollouts: &[Rollout]) -> String {
    let mut out = String::new();
    for r in rollouts.iter().rev() {
        for m in r
            .members()
            .filter(|m| m.agent_id == agent && m.error.is_some())
        {
            let heading = format!(
                "<a href=\"/ui/rollouts/{id}\">rollout {id}</a> ({} {})",
                esc(&r.app),
                esc(&r.version),
                id = r.id,
            );
            out += &super::rollouts::failure(&heading, m);
        }
    }
    if out.is_empty() {
        return out;
    }
    format!("<h2>Failures</h2>{out}")
}

pub fn log_page(agent: &str, app: &str, tail: &Tail) -> String {
    let problem = match &tail.problem {
        Some(why) => format!("<p class=\"error\">{}</p>", esc(why)),
        None => String::new(),
    };
    let lines: Vec<String> = tail.lines.iter().map(|l| esc(l)).collect();
    format!(
        "<p><a href=\"/ui/agents/{link}\">← {agent}</a> · the last {n} lines of {app}'s log, as the \
         agent read them just now</p>{problem}<pre class=\"log\" data-lines=\"{n}\">{}</pre>",
        lines.join("\n"),
        link = url_part(agent),
        agent = esc(agent),
        app = esc(app),
        n = lines.len(),
    )
}
