//! The rollouts pages: the list, and one rollout with each wave as a progress bar per
//! architecture (healthy, updating, failed, pending), why it halted, the failing members' log
//! lines, and the buttons that steer it for those who may.

use std::collections::BTreeMap;
use std::fmt::Write;

use super::html::{csrf_field, esc, table, url_part, when};
use super::session::Session;
use crate::rollout::{Member, MemberState, Request, Rollout, Wave};
use crate::store::Permission;
use crate::views::snake;

/// The requests the console offers, in the order of their buttons.
const REQUESTS: &[(Request, &str)] = &[
    (Request::Pause, "Pause"),
    (Request::Resume, "Resume"),
    (Request::Abort, "Abort"),
    (Request::Rollback, "Roll back"),
];

/// Every rollout, newest first.
pub fn list(rollouts: &[Rollout]) -> String {
    if rollouts.is_empty() {
        return "<p>No rollouts yet: <code>muscle-deploy rollout start APP VERSION</code> starts one.</p>".into();
    }
    let rows: Vec<String> = rollouts
        .iter()
        .rev()
        .map(|r| {
            let status = snake(r.status);
            format!(
                "<tr data-rollout=\"{id}\"><td><a href=\"/ui/rollouts/{id}\">{id}</a></td><td>{app}</td>\
                 <td>{version}</td><td><span class=\"status status-{status}\">{status}</span></td>\
                 <td>{wave}</td><td>{healthy}/{members}</td><td>{created}</td><td>{message}</td></tr>",
                id = r.id,
                app = esc(&r.app),
                version = esc(&r.version),
                wave = wave_position(r),
                healthy = r.members().filter(|m| m.state == MemberState::Healthy).count(),
                members = r.members().count(),
                created = when(r.created_ms),
                message = esc(&r.message),
            )
        })
        .collect();
    table(
        "rollouts",
        &[
            "Rollout", "App", "Version", "Status", "Wave", "Healthy", "Started", "Message",
        ],
        &rows,
    )
}

fn wave_position(r: &Rollout) -> String {
    match r.waves.get(r.current_wave) {
        Some(w) if r.status.is_active() => {
            format!(
                "{} ({}/{})",
                esc(&w.name),
                r.current_wave + 1,
                r.waves.len()
            )
        }
        _ => format!("{} waves", r.waves.len()),
    }
}

/// The most members a wave lists, and the most failures shown: a rollout to 10,000 agents stays
/// a page (`muscle-deploy rollout status ID` lists them all).
const LISTED: usize = 200;

/// One rollout, live. `newer`: the newer rollout of its app, which alone may be rolled back.
pub fn page(r: &Rollout, newer: Option<i64>, session: &Session) -> String {
    format!(
        "<div id=\"rollout\" data-live=\"/ui/rollouts/{}/live\">{}</div>",
        r.id,
        fragment(r, newer, session)
    )
}

/// What live updates replace: status, buttons, waves and failures.
pub fn fragment(r: &Rollout, newer: Option<i64>, session: &Session) -> String {
    let status = snake(r.status);
    let mut out = format!(
        "<p class=\"status-line\"><strong>{app} {version}</strong> · \
         <span class=\"status status-{status}\" data-status=\"{status}\">{status}</span> · \
         started {created}</p><p class=\"message\">{message}</p>",
        app = esc(&r.app),
        version = esc(&r.version),
        created = when(r.created_ms),
        message = esc(&r.message),
    );
    out += &buttons(r, newer, session);
    out += &overall(r);
    for (i, w) in r.waves.iter().enumerate() {
        out += &wave(w, i, i == r.current_wave && r.status.is_active());
    }
    out += &failures(r);
    out
}

fn buttons(r: &Rollout, newer: Option<i64>, session: &Session) -> String {
    if !session.may(Permission::Steer) {
        return String::new();
    }
    let mut out = String::from("<div class=\"buttons\">");
    for (request, label) in REQUESTS {
        let allowed = r.check_request(*request).is_ok()
            && r.check_rollback_is_newest(*request, newer).is_ok();
        if !allowed {
            continue;
        }
        let confirm = match request {
            Request::Abort | Request::Rollback => " data-confirm=\"yes\"",
            _ => "",
        };
        let _ = write!(
            out,
            "<form method=\"post\" action=\"/ui/rollouts/{id}/{name}\"{confirm}>{csrf}\
             <button class=\"request-{name}\">{label}</button></form>",
            id = r.id,
            name = request.as_str(),
            csrf = csrf_field(&session.csrf),
        );
    }
    out + "</div>"
}

/// Members per state, for one arch of one wave.
#[derive(Default)]
struct Tally {
    healthy: usize,
    updating: usize,
    failed: usize,
    pending: usize,
    /// Rolled back or abandoned.
    ended: usize,
}

impl Tally {
    fn add(&mut self, state: MemberState) {
        match state {
            MemberState::Healthy => self.healthy += 1,
            MemberState::Updating => self.updating += 1,
            MemberState::Failed => self.failed += 1,
            MemberState::Pending => self.pending += 1,
            MemberState::RolledBack | MemberState::Abandoned => self.ended += 1,
        }
    }

    fn total(&self) -> usize {
        self.healthy + self.updating + self.failed + self.pending + self.ended
    }

    /// A bar of the member counts: SVG rectangles, sized by attributes (the console's policy
    /// allows no inline styles).
    fn bar(&self, arch: &str) -> String {
        let mut x = 0;
        let mut rects = String::new();
        for (class, n) in [
            ("healthy", self.healthy),
            ("updating", self.updating),
            ("failed", self.failed),
            ("ended", self.ended),
            ("pending", self.pending),
        ] {
            if n > 0 {
                let _ = write!(
                    rects,
                    "<rect class=\"{class}\" x=\"{x}\" y=\"0\" width=\"{n}\" height=\"1\"/>"
                );
                x += n;
            }
        }
        format!(
            "<svg class=\"bar\" viewBox=\"0 0 {} 1\" preserveAspectRatio=\"none\" role=\"img\" \
             aria-label=\"{}: {} of {} healthy\">{rects}</svg>",
            self.total().max(1),
            esc(arch),
            self.healthy,
            self.total()
        )
    }
}

/// The whole rollout per arch, above its waves.
fn overall(r: &Rollout) -> String {
    format!(
        "<section class=\"overall\"><h2>All waves</h2>{}</section>",
        arch_bars(r.members())
    )
}

fn wave(w: &Wave, index: usize, current: bool) -> String {
    let mut out = format!(
        "<section class=\"wave{}\" data-wave=\"{index}\"><h2>{}{}</h2>",
        if current { " current" } else { "" },
        esc(&w.name),
        if current { " <small>(now)</small>" } else { "" }
    );
    out += &arch_bars(w.members.iter());
    out += "<div class=\"members\">";
    for m in w.members.iter().take(LISTED) {
        let state = snake(m.state);
        let _ = write!(
            out,
            "<a class=\"member state-{state}\" href=\"/ui/agents/{}\" title=\"{state}\">{}</a>",
            url_part(&m.agent_id),
            esc(&m.agent_id)
        );
    }
    if w.members.len() > LISTED {
        let _ = write!(
            out,
            "<span class=\"more\">and {} more</span>",
            w.members.len() - LISTED
        );
    }
    out + "</div></section>"
}

/// A progress bar and counts per arch of `members`.
fn arch_bars<'m>(members: impl Iterator<Item = &'m Member>) -> String {
    let mut per_arch: BTreeMap<&str, Tally> = BTreeMap::new();
    for m in members {
        per_arch.entry(&m.arch).or_default().add(m.state);
    }
    let mut out = String::new();
    for (arch, t) in &per_arch {
        let mut counts = format!("{}/{} healthy", t.healthy, t.total());
        for (n, what) in [
            (t.updating, "updating"),
            (t.failed, "failed"),
            (t.ended, "rolled back or abandoned"),
            (t.pending, "pending"),
        ] {
            if n > 0 {
                let _ = write!(counts, ", {n} {what}");
            }
        }
        let _ = write!(
            out,
            "<div class=\"arch\" data-arch=\"{a}\" data-healthy=\"{}\" data-updating=\"{}\" \
             data-failed=\"{}\" data-pending=\"{}\"><span class=\"arch-name\">{a}</span>{}\
             <span class=\"counts\">{counts}</span></div>",
            t.healthy,
            t.updating,
            t.failed,
            t.pending,
            t.bar(arch),
            a = esc(arch),
        );
    }
    out
}

/// The members that failed, with their error and the log lines their agent sent.
fn failures(r: &Rollout) -> String {
    let failed: Vec<_> = r.members().filter(|m| m.error.is_some()).collect();
    if failed.is_empty() {
        return String::new();
    }
    let mut out = format!(
        "<section class=\"failures\"><h2>Failures ({})</h2>",
        failed.len()
    );
    for m in failed.iter().take(LISTED) {
        let heading = format!(
            "<a href=\"/ui/agents/{link}\">{id}</a> [{arch}] {state}",
            id = esc(&m.agent_id),
            link = url_part(&m.agent_id),
            arch = esc(&m.arch),
            state = snake(m.state),
        );
        out += &failure(&heading, m);
    }
    if failed.len() > LISTED {
        let _ = write!(
            out,
            "<p>and {} more: <code>muscle-deploy rollout status {}</code> lists them all</p>",
            failed.len() - LISTED,
            r.id
        );
    }
    out + "</section>"
}

/// One member's failure under `heading` (markup): its error and the log lines its agent sent.
pub(super) fn failure(heading: &str, m: &Member) -> String {
    let mut out = format!(
        "<div class=\"failure\" data-agent=\"{}\"><p>{heading}: {}</p>",
        esc(&m.agent_id),
        esc(m.error.as_deref().unwrap_or_default()),
    );
    if !m.log.is_empty() {
        let lines: Vec<String> = m.log.iter().map(|l| esc(l)).collect();
        let _ = write!(out, "<pre class=\"log\">{}</pre>", lines.join("\n"));
    }
    out + "</div>"
}
