//! The fleet page: every agent with its arch, labels, versions per app, health and last check-in
//! (stale ones marked), filtered by arch, health or label and paged, so that 10,000 agents are
//! one page of [`PAGE_ROWS`] to render.

use std::collections::BTreeMap;
use std::fmt::Write;

use serde::Deserialize;

use super::html::{esc, table, url_part};
use crate::views::FleetRow;

pub const PAGE_ROWS: usize = 100;

/// The health values a filter offers: an app's health, or `stale` for agents gone silent.
const HEALTH_FILTERS: &[&str] = &[
    "healthy",
    "starting",
    "unhealthy",
    "crash_loop",
    "stopped",
    "unknown",
    "stale",
];

#[derive(Debug, Clone, Default, Deserialize)]
pub struct FleetQuery {
    #[serde(default)]
    pub arch: String,
    #[serde(default)]
    pub health: String,
    /// `key=value`, or `key` for any value.
    #[serde(default)]
    pub label: String,
    /// From 0.
    #[serde(default)]
    pub page: usize,
}

impl FleetQuery {
    fn matches(&self, row: &FleetRow) -> bool {
        let health = match self.health.as_str() {
            "" => true,
            "stale" => row.stale,
            // Healthy is every app; a trouble is any one.
            "healthy" => !row.apps.is_empty() && row.apps.iter().all(|a| a.health == "healthy"),
            h => row.apps.iter().any(|a| a.health == h),
        };
        let label = match self.label.split_once('=') {
            _ if self.label.is_empty() => true,
            Some((k, v)) => row.labels.get(k).is_some_and(|have| have == v),
            None => row.labels.contains_key(&self.label),
        };
        (self.arch.is_empty() || row.arch == self.arch) && health && label
    }

    /// This query's string, at `page`.
    fn to_query(&self, page: usize) -> String {
        format!(
            "arch={}&health={}&label={}&page={page}",
            url_part(&self.arch),
            url_part(&self.health),
            url_part(&self.label)
        )
    }
}

/// The filter form and the live table.
pub fn page(rows: &[FleetRow], q: &FleetQuery) -> String {
    // The one asked for stays offered (and shown chosen) when no agent has it any more.
    let mut arches: Vec<&str> = rows.iter().map(|r| r.arch.as_str()).collect();
    if !q.arch.is_empty() {
        arches.push(&q.arch);
    }
    arches.sort_unstable();
    arches.dedup();
    let mut health_filters = HEALTH_FILTERS.to_vec();
    if !q.health.is_empty() && !health_filters.contains(&q.health.as_str()) {
        health_filters.push(&q.health);
    }
    let select = |name: &str, any: &str, options: &[&str], chosen: &str| {
        let mut out =
            format!("<label>{name} <select name=\"{name}\"><option value=\"\">{any}</option>");
        for o in options {
            let selected = if *o == chosen { " selected" } else { "" };
            let _ = write!(
                out,
                "<option value=\"{o}\"{selected}>{o}</option>",
                o = esc(o)
            );
        }
        out + "</select></label>"
    };
    format!(
        "<form class=\"filters\" method=\"get\" action=\"/ui/fleet\">{}{}\
         <label>label <input name=\"label\" value=\"{}\" placeholder=\"key=value\"></label>\
         <button>Filter</button></form>\n\
         <div id=\"fleet\" data-live=\"/ui/fleet/live?{}\">{}</div>",
        select("arch", "any arch", &arches, &q.arch),
        select("health", "any health", &health_filters, &q.health),
        esc(&q.label),
        esc(&q.to_query(q.page)),
        fragment(rows, q)
    )
}

/// The counts, one page of matching agents and the pager: what live updates replace.
pub fn fragment(rows: &[FleetRow], q: &FleetQuery) -> String {
    let mut per_arch: BTreeMap<&str, usize> = BTreeMap::new();
    for r in rows {
        *per_arch.entry(&r.arch).or_default() += 1;
    }
    let stale = rows.iter().filter(|r| r.stale).count();
    let matching: Vec<&FleetRow> = rows.iter().filter(|r| q.matches(r)).collect();
    let first = q.page.saturating_mul(PAGE_ROWS).min(matching.len());
    let shown = &matching[first..(first + PAGE_ROWS).min(matching.len())];
    let arches: Vec<String> = per_arch
        .iter()
        .map(|(a, n)| format!(" {n} {}", esc(a)))
        .collect();
    let mut out = format!(
        "<p class=\"summary\" data-agents=\"{}\">{} agents:{} · {stale} stale · {} matching, \
         showing {}–{}</p>",
        rows.len(),
        rows.len(),
        arches.join(","),
        matching.len(),
        if shown.is_empty() { 0 } else { first + 1 },
        if shown.is_empty() {
            0
        } else {
            first + shown.len()
        }
    );
    let body: Vec<String> = shown.iter().map(|r| row(r)).collect();
    out += &table(
        "fleet",
        &[
            "Agent",
            "Arch",
            "Hostname",
            "Labels",
            "Apps",
            "Agent version",
            "Last seen",
        ],
        &body,
    );
    out += "<nav class=\"pager\">";
    if q.page > 0 {
        let _ = write!(
            out,
            "<a href=\"/ui/fleet?{}\">← previous</a>",
            esc(&q.to_query(q.page - 1))
        );
    }
    if first + shown.len() < matching.len() {
        let _ = write!(
            out,
            "<a href=\"/ui/fleet?{}\">next →</a>",
            esc(&q.to_query(q.page + 1))
        );
    }
    out + "</nav>"
}

fn row(r: &FleetRow) -> String {
    let labels: String = r
        .labels
        .iter()
        .map(|(k, v)| format!("<span class=\"label\">{}={}</span>", esc(k), esc(v)))
        .collect();
    let apps: String = r
        .apps
        .iter()
        .map(|a| {
            let error = a
                .error
                .as_deref()
                .map(|e| format!(" <span class=\"error\">{}</span>", esc(e)))
                .unwrap_or_default();
            format!(
                "<div class=\"app\" data-app=\"{app}\" data-version=\"{version}\">{app} {version} \
                 <span class=\"health health-{health}\">{health}</span>{error}</div>",
                app = esc(&a.app),
                version = esc(a.version.as_deref().unwrap_or("-")),
                health = esc(&a.health),
            )
        })
        .collect();
    let class = if r.stale { " class=\"stale\"" } else { "" };
    format!(
        "<tr data-agent=\"{id}\" data-arch=\"{arch}\"{class}><td><a href=\"/ui/agents/{link}\">{id}</a></td>\
         <td>{arch}</td><td>{host}</td><td>{labels}</td><td>{apps}</td><td>{version}</td>\
         <td>{seen}</td></tr>",
        id = esc(&r.id),
        link = url_part(&r.id),
        arch = esc(&r.arch),
        host = esc(&r.hostname),
        version = esc(&r.agent_version),
        seen = super::html::seen(r),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::views::AppCell;

    fn agent(id: &str, arch: &str, health: &str, stale: bool) -> FleetRow {
        FleetRow {
            id: id.into(),
            arch: arch.into(),
            hostname: "<b>host</b>".into(),
            labels: BTreeMap::from([("site".into(), "lab".into())]),
            agent_version: "0.1.0".into(),
            apps: vec![AppCell {
                app: "hello".into(),
                version: Some("1.0.0".into()),
                health: health.into(),
                error: Some("<script>x</script>".into()),
            }],
            last_seen_s: 3,
            last_seen_ms: 1_000,
            interval_ms: 5_000,
            clock_skew_s: 0,
            stale,
        }
    }

    #[test]
    fn filters_and_pages_and_escapes() {
        let mut rows: Vec<FleetRow> = (0..250)
            .map(|i| agent(&format!("x{i:03}"), "x86_64", "healthy", false))
            .collect();
        rows.push(agent("a1", "aarch64", "unhealthy", false));
        rows.push(agent("a2", "aarch64", "unknown", true));
        let all = fragment(&rows, &FleetQuery::default());
        assert_eq!(all.matches("<tr data-agent").count(), PAGE_ROWS);
        assert!(
            all.contains("252 agents: 2 aarch64, 250 x86_64 · 1 stale"),
            "{all}"
        );
        assert!(all.contains("next →") && !all.contains("previous"));
        assert!(
            !all.contains("<script>") && !all.contains("<b>host"),
            "agents' text is escaped"
        );
        let last = fragment(
            &rows,
            &FleetQuery {
                page: 2,
                ..Default::default()
            },
        );
        assert_eq!(last.matches("<tr data-agent").count(), 52);
        assert!(last.contains("previous") && !last.contains("next →"));
        let q = |arch: &str, health: &str, label: &str| FleetQuery {
            arch: arch.into(),
            health: health.into(),
            label: label.into(),
            page: 0,
        };
        let count = |q: FleetQuery| fragment(&rows, &q).matches("<tr data-agent").count();
        assert_eq!(count(q("aarch64", "", "")), 2);
        assert_eq!(count(q("", "unhealthy", "")), 1);
        assert_eq!(count(q("", "stale", "")), 1);
        assert_eq!(count(q("aarch64", "", "site=lab")), 2);
        assert_eq!(count(q("", "", "site=elsewhere")), 0);
        assert!(fragment(&rows, &q("", "", "site")).contains("252 matching"));
        let past_the_end = fragment(
            &rows,
            &FleetQuery {
                page: 99,
                ..Default::default()
            },
        );
        assert!(past_the_end.contains("showing 0–0"), "{past_the_end}");
        let farthest = FleetQuery {
            page: usize::MAX,
            ..Default::default()
        };
        assert!(fragment(&rows, &farthest).contains("showing 0–0"));
    }
}
