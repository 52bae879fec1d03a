//! Rollouts as a persisted state machine, after Nomad's `update` block: a canary wave with N
//! agents of each architecture, then batches of `max_parallel`. A wave advances only on health
//! reported by its agents; failures past `max_failures` halt it, and with auto-rollback every
//! agent it moved goes back to its previous version.
//!
//! This module is pure: [`Rollout::advance`] looks at agents' reports and returns the
//! assignments to make. The engine applies them and persists the rollout.

use std::collections::BTreeMap;
use std::time::Duration;

use muscle_protocol::duration::serde_dur;
use muscle_protocol::{Health, ServiceSpec};
use serde::{Deserialize, Serialize};

use crate::store::{AgentRecord, Assignment, STALE_AFTER_MISSED};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Params {
    pub selector: BTreeMap<String, String>,
    pub canary_per_arch: usize,
    pub max_parallel: usize,
    #[serde(with = "serde_dur")]
    pub min_healthy_time: Duration,
    #[serde(with = "serde_dur")]
    pub healthy_deadline: Duration,
    #[serde(with = "serde_dur")]
    pub progress_deadline: Duration,
    pub max_failures: u32,
    pub auto_rollback: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Running,
    Paused,
    /// Every member healthy.
    Succeeded,
    /// Every wave done, but some members failed (fewer than `max_failures`): not a success.
    SucceededWithFailures,
    /// Stopped by failures, without rollback.
    Halted,
    RolledBack,
    Aborted,
    Superseded,
}

impl Status {
    pub fn is_active(self) -> bool {
        matches!(self, Status::Running | Status::Paused)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MemberState {
    Pending,
    Updating,
    Healthy,
    Failed,
    RolledBack,
    /// The rollout ended (aborted or superseded) before this member's verdict; its agent keeps
    /// what it was assigned.
    Abandoned,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    pub agent_id: String,
    pub arch: String,
    pub state: MemberState,
    /// What the agent ran for this app before the rollout touched it.
    pub previous: Option<Assignment>,
    pub assigned_ms: Option<u64>,
    pub error: Option<String>,
    /// A failed member's last log lines, as its agent reported them with the failure.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub log: Vec<String>,
}

impl Member {
    fn pending(agent: &AgentRecord) -> Member {
        Member {
            agent_id: agent.id.clone(),
            arch: agent.arch.clone(),
            state: MemberState::Pending,
            previous: None,
            assigned_ms: None,
            error: None,
            log: vec![],
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Wave {
    pub name: String,
    pub members: Vec<Member>,
}

impl Wave {
    pub fn count(&self, state: MemberState) -> usize {
        self.members.iter().filter(|m| m.state == state).count()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rollout {
    pub id: i64,
    pub app: String,
    pub version: String,
    pub service: ServiceSpec,
    pub params: Params,
    pub status: Status,
    pub waves: Vec<Wave>,
    pub current_wave: usize,
    pub created_ms: u64,
    pub last_progress_ms: u64,
    pub message: String,
    /// When `muscle-deploy undeploy` took the app off every agent: the rollout no longer
    /// stands for its selector's desired state (late joiners do not get it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub withdrawn_ms: Option<u64>,
}

/// A change to one agent's desired state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Sets what `agent_id` runs for `app`; `None` removes the assignment.
    Assign {
        agent_id: String,
        app: String,
        assignment: Option<Assignment>,
    },
}

/// Whether `agent` has every label of `selector` (`arch` also matches its architecture).
/// The lines of a failed member's log shown with the rollout.
pub const FAILURE_LOG_LINES: usize = 10;

/// The last [`FAILURE_LOG_LINES`] lines of a reported log tail, each at most 300 characters.
fn failure_log(tail: Option<&str>) -> Vec<String> {
    let lines: Vec<&str> = tail.unwrap_or_default().lines().collect();
    let skip = lines.len().saturating_sub(FAILURE_LOG_LINES);
    lines[skip..]
        .iter()
        .map(|l| l.chars().take(300).collect())
        .collect()
}

pub fn selects(selector: &BTreeMap<String, String>, agent: &AgentRecord) -> bool {
    selector
        .iter()
        .all(|(k, v)| agent.labels.get(k) == Some(v) || (k == "arch" && &agent.arch == v))
}

impl Rollout {
    /// Chooses the agents and the waves. Fails naming the selector when no agent matches.
    pub fn plan(
        app: &str,
        version: &str,
        service: ServiceSpec,
        params: Params,
        agents: &[AgentRecord],
        now_ms: u64,
    ) -> Result<Rollout, String> {
        let mut selected: Vec<&AgentRecord> = agents
            .iter()
            .filter(|a| !a.is_stale(now_ms))
            .filter(|a| selects(&params.selector, a))
            .collect();
        if selected.is_empty() {
            let sel: Vec<String> = params
                .selector
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            return Err(format!(
                "no live agent matches the selector [{}] ({} agents known; none that matches checked in within {STALE_AFTER_MISSED} of its intervals)",
                sel.join(", "),
                agents.len(),
            ));
        }
        selected.sort_by(|a, b| a.id.cmp(&b.id));
        let member = |a: &AgentRecord| Member::pending(a);
        let mut by_arch: BTreeMap<&str, Vec<&AgentRecord>> = BTreeMap::new();
        for a in &selected {
            by_arch.entry(a.arch.as_str()).or_default().push(a);
        }
        let canary: Vec<Member> = by_arch
            .values()
            .flat_map(|group| group.iter().take(params.canary_per_arch).map(|a| member(a)))
            .collect();
        let rest: Vec<Member> = selected
            .iter()
            .filter(|a| !canary.iter().any(|c| c.agent_id == a.id))
            .map(|a| member(a))
            .collect();
        let mut waves = Vec::new();
        if !canary.is_empty() {
            waves.push(Wave {
                name: "canary".into(),
                members: canary,
            });
        }
        for (i, chunk) in rest.chunks(params.max_parallel.max(1)).enumerate() {
            waves.push(Wave {
                name: format!("batch {}", i + 1),
                members: chunk.to_vec(),
            });
        }
        Ok(Rollout {
            id: 0,
            app: app.to_owned(),
            version: version.to_owned(),
            service,
            params,
            status: Status::Running,
            waves,
            current_wave: 0,
            created_ms: now_ms,
            last_progress_ms: now_ms,
            message: "started".into(),
            withdrawn_ms: None,
        })
    }

    /// Whether this rollout is the standing desired state of its selector: in progress, or
    /// settled on its version, and not withdrawn. (Of an app's standing rollouts the newest
    /// counts.)
    pub fn is_standing(&self) -> bool {
        self.withdrawn_ms.is_none()
            && matches!(
                self.status,
                Status::Running
                    | Status::Paused
                    | Status::Succeeded
                    | Status::SucceededWithFailures
            )
    }

    /// Takes in late joiners: live agents that match the selector, are not members, and are
    /// `eligible` (never given the app, and of an architecture the release has a binary for),
    /// as Mender's dynamic groups and Nomad's system jobs do. A rollout in progress adds them
    /// as new waves of `max_parallel`, health-gated like the others; a settled one assigns them
    /// its version at once. The agent itself (`muscle-agent`) never: new agents keep the
    /// version they were installed with until a rollout says otherwise.
    pub fn admit_late_joiners(
        &mut self,
        agents: &BTreeMap<String, AgentRecord>,
        now_ms: u64,
        eligible: &dyn Fn(&AgentRecord) -> bool,
    ) -> Vec<Action> {
        if !self.is_standing() || self.app == muscle_protocol::SELF_APP {
            return vec![];
        }
        let members: std::collections::BTreeSet<&str> =
            self.members().map(|m| m.agent_id.as_str()).collect();
        let joiners: Vec<&AgentRecord> = agents
            .values()
            .filter(|a| !a.is_stale(now_ms) && selects(&self.params.selector, a))
            .filter(|a| !members.contains(a.id.as_str()))
            .filter(|a| eligible(a))
            .collect();
        if joiners.is_empty() {
            return vec![];
        }
        if self.status.is_active() {
            let mut n = self
                .waves
                .iter()
                .filter(|w| w.name.starts_with("late joiners"))
                .count();
            for chunk in joiners.chunks(self.params.max_parallel.max(1)) {
                n += 1;
                self.waves.push(Wave {
                    name: format!("late joiners {n}"),
                    members: chunk.iter().map(|a| Member::pending(a)).collect(),
                });
            }
            return vec![];
        }
        joiners
            .iter()
            .map(|a| Action::Assign {
                agent_id: a.id.clone(),
                app: self.app.clone(),
                assignment: Some(Assignment {
                    agent_id: a.id.clone(),
                    app: self.app.clone(),
                    version: self.version.clone(),
                    service: self.service.clone(),
                    rollout_id: Some(self.id),
                }),
            })
            .collect()
    }

    pub fn failures(&self) -> u32 {
        self.waves
            .iter()
            .map(|w| w.count(MemberState::Failed) as u32)
            .sum()
    }

    pub fn members(&self) -> impl Iterator<Item = &Member> {
        self.waves.iter().flat_map(|w| w.members.iter())
    }

    /// One step: start the current wave's members, judge their health, and move on, halt or
    /// roll back. `previous` says what an agent runs for the app now (recorded for rollback).
    pub fn advance(
        &mut self,
        agents: &BTreeMap<String, AgentRecord>,
        now_ms: u64,
        previous: &dyn Fn(&str) -> Option<Assignment>,
    ) -> Vec<Action> {
        let mut actions = Vec::new();
        if self.status != Status::Running {
            return actions;
        }
        let Some(wave) = self.waves.get_mut(self.current_wave) else {
            self.status = Status::Succeeded;
            return actions;
        };
        let assignment = Assignment {
            agent_id: String::new(),
            app: self.app.clone(),
            version: self.version.clone(),
            service: self.service.clone(),
            rollout_id: Some(self.id),
        };
        let mut progressed = false;
        for m in &mut wave.members {
            match m.state {
                MemberState::Pending => {
                    m.previous = previous(&m.agent_id);
                    m.state = MemberState::Updating;
                    m.assigned_ms = Some(now_ms);
                    actions.push(Action::Assign {
                        agent_id: m.agent_id.clone(),
                        app: self.app.clone(),
                        assignment: Some(Assignment {
                            agent_id: m.agent_id.clone(),
                            ..assignment.clone()
                        }),
                    });
                }
                MemberState::Updating => {
                    if let Some(verdict) = judge(
                        m,
                        agents.get(&m.agent_id),
                        &self.app,
                        &self.version,
                        &self.params,
                        now_ms,
                    ) {
                        progressed |= verdict == MemberState::Healthy;
                        m.state = verdict;
                    }
                }
                _ => {}
            }
        }
        if progressed {
            self.last_progress_ms = now_ms;
        }
        let wave_done = wave
            .members
            .iter()
            .all(|m| matches!(m.state, MemberState::Healthy | MemberState::Failed));
        let wave_name = wave.name.clone();
        if self.failures() >= self.params.max_failures.max(1) {
            let failed: Vec<String> = self
                .members()
                .filter(|m| m.state == MemberState::Failed)
                .map(|m| format!("{}: {}", m.agent_id, m.error.as_deref().unwrap_or("failed")))
                .collect();
            self.message = format!(
                "halted in {wave_name}: {} failure(s) reached max_failures {} ({})",
                failed.len(),
                self.params.max_failures.max(1),
                failed.join("; ")
            );
            self.status = Status::Halted;
            if self.params.auto_rollback {
                actions.extend(self.roll_back());
            }
        } else if now_ms.saturating_sub(self.last_progress_ms)
            > self.params.progress_deadline.as_millis() as u64
        {
            self.message = format!(
                "halted in {wave_name}: no agent became healthy within progress_deadline {:?}",
                self.params.progress_deadline
            );
            self.status = Status::Halted;
            if self.params.auto_rollback {
                actions.extend(self.roll_back());
            }
        } else if wave_done {
            self.current_wave += 1;
            self.last_progress_ms = now_ms;
            if self.current_wave == self.waves.len() {
                self.finish();
            } else {
                self.message = format!(
                    "{wave_name} healthy; starting {}",
                    self.waves[self.current_wave].name
                );
            }
        }
        actions
    }

    /// The outcome once every wave is done: a success only if no member failed.
    fn finish(&mut self) {
        let failed: Vec<String> = self
            .members()
            .filter(|m| m.state == MemberState::Failed)
            .map(|m| format!("{}: {}", m.agent_id, m.error.as_deref().unwrap_or("failed")))
            .collect();
        if failed.is_empty() {
            self.status = Status::Succeeded;
            self.message = format!("every agent runs {} healthy", self.version);
        } else {
            self.status = Status::SucceededWithFailures;
            self.message = format!(
                "done, but {} agent(s) failed and do not run {} ({})",
                failed.len(),
                self.version,
                failed.join("; ")
            );
        }
    }

    /// Sends every agent this rollout moved back to what it ran before.
    pub fn roll_back(&mut self) -> Vec<Action> {
        let mut actions = Vec::new();
        for m in self.waves.iter_mut().flat_map(|w| w.members.iter_mut()) {
            if matches!(
                m.state,
                MemberState::Updating | MemberState::Healthy | MemberState::Failed
            ) {
                actions.push(Action::Assign {
                    agent_id: m.agent_id.clone(),
                    app: self.app.clone(),
                    assignment: m.previous.clone(),
                });
                if m.state != MemberState::Failed {
                    m.state = MemberState::RolledBack;
                }
            }
        }
        self.status = Status::RolledBack;
        self.message = format!("{} (rolled back {} agent(s))", self.message, actions.len());
        actions
    }

    /// The transition table of requests: whether `request` may be made now, and if not, why.
    /// Checked when the request is made (CLI) and again when the engine applies it.
    pub fn check_request(&self, request: Request) -> Result<(), String> {
        let allowed = match request {
            Request::Pause => self.status == Status::Running,
            Request::Resume => self.status == Status::Paused,
            Request::Abort | Request::Supersede => self.status.is_active(),
            Request::Rollback => matches!(
                self.status,
                Status::Running
                    | Status::Paused
                    | Status::Halted
                    | Status::Succeeded
                    | Status::SucceededWithFailures
            ),
        };
        if allowed {
            Ok(())
        } else {
            Err(format!(
                "cannot {} rollout {} while it is {:?} ({})",
                request.as_str(),
                self.id,
                self.status,
                request.allowed_from()
            ))
        }
    }

    /// A rollback is only for an app's newest rollout: an older one's `previous` versions are
    /// history (and, for a first install, would take the app off every agent).
    pub fn check_rollback_is_newest(
        &self,
        request: Request,
        newer: Option<i64>,
    ) -> Result<(), String> {
        match (request, newer) {
            (Request::Rollback, Some(newer)) => Err(format!(
                "cannot rollback rollout {}: rollout {newer} of {} is newer and decides what runs \
                 now (roll it back if it can be, or roll out the version to return to)",
                self.id, self.app
            )),
            _ => Ok(()),
        }
    }

    /// Applies a request that [`check_request`](Self::check_request) allows.
    pub fn apply_request(&mut self, request: Request, now_ms: u64) -> Result<Vec<Action>, String> {
        self.check_request(request)?;
        match request {
            Request::Pause => self.status = Status::Paused,
            Request::Resume => {
                self.status = Status::Running;
                // Time spent paused does not count against progress_deadline.
                self.last_progress_ms = now_ms;
            }
            // A machine left on an untried image may never check in again to be told otherwise:
            // an image rollout's abort sends its members back to their previous image.
            Request::Abort if self.app == muscle_protocol::IMAGE_APP => {
                self.message = "abort requested".into();
                return Ok(self.roll_back());
            }
            Request::Abort => self.settle(Status::Aborted),
            Request::Supersede => self.settle(Status::Superseded),
            Request::Rollback => return Ok(self.roll_back()),
        }
        self.message = format!("{} requested", request.as_str());
        Ok(vec![])
    }

    /// Ends the rollout as `status`: members still waiting for a verdict are abandoned, not
    /// left `updating` forever.
    fn settle(&mut self, status: Status) {
        self.status = status;
        for m in self.waves.iter_mut().flat_map(|w| w.members.iter_mut()) {
            if m.state == MemberState::Updating {
                m.state = MemberState::Abandoned;
            }
        }
    }
}

/// What an operator (or a newer rollout) asks of a rollout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Request {
    Pause,
    Resume,
    Abort,
    Rollback,
    /// A newer rollout of the same app took over.
    Supersede,
}

impl Request {
    pub fn as_str(self) -> &'static str {
        match self {
            Request::Pause => "pause",
            Request::Resume => "resume",
            Request::Abort => "abort",
            Request::Rollback => "rollback",
            Request::Supersede => "supersede",
        }
    }

    fn allowed_from(self) -> &'static str {
        match self {
            Request::Pause => "only a running rollout can be paused",
            Request::Resume => "only a paused rollout can be resumed",
            Request::Abort | Request::Supersede => "only a running or paused rollout can end so",
            Request::Rollback => {
                "only a running, paused, halted or finished rollout can be rolled back"
            }
        }
    }
}

impl std::str::FromStr for Request {
    type Err = String;
    fn from_str(s: &str) -> Result<Request, String> {
        [
            Request::Pause,
            Request::Resume,
            Request::Abort,
            Request::Rollback,
            Request::Supersede,
        ]
        .into_iter()
        .find(|r| r.as_str() == s)
        .ok_or_else(|| format!("unknown rollout request {s:?}"))
    }
}

/// How long the deployer waits for an agent's verdict. The agent itself enforces
/// `healthy_deadline` from the moment it starts the new version and reports the outcome; this
/// backstop, measured from the assignment, only catches agents that go silent (it also covers the
/// check-in interval and the download).
pub fn report_deadline(healthy_deadline: Duration) -> Duration {
    healthy_deadline * 2 + Duration::from_secs(10)
}

/// The verdict on an updating member, from its agent's last report: `None` while undecided.
fn judge(
    m: &mut Member,
    agent: Option<&AgentRecord>,
    app: &str,
    version: &str,
    params: &Params,
    now_ms: u64,
) -> Option<MemberState> {
    let report = agent.and_then(|a| a.report(app));
    if let Some(r) = report {
        if r.failed_version.as_deref() == Some(version) {
            let mut error = r
                .last_error
                .clone()
                .unwrap_or_else(|| "the agent refused or rolled back".into());
            if let Some(tail) = r.log_tail.as_deref().and_then(|t| t.lines().last()) {
                error = format!("{error} [log: {tail}]");
            }
            m.error = Some(error);
            m.log = failure_log(r.log_tail.as_deref());
            return Some(MemberState::Failed);
        }
        let healthy = r.installed_version.as_deref() == Some(version)
            && r.running_version.as_deref() == Some(version)
            && r.health == Health::Healthy
            && r.healthy_for_ms >= params.min_healthy_time.as_millis() as u64;
        if healthy {
            return Some(MemberState::Healthy);
        }
    }
    let waited = now_ms.saturating_sub(m.assigned_ms.unwrap_or(now_ms));
    if waited > report_deadline(params.healthy_deadline).as_millis() as u64 {
        let last = report
            .and_then(|r| r.last_error.clone())
            .unwrap_or_else(|| "no report of the new version".into());
        m.error = Some(format!("no healthy report within {:?} (healthy_deadline {:?} plus download and reporting time; last: {last})", report_deadline(params.healthy_deadline), params.healthy_deadline));
        return Some(MemberState::Failed);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use muscle_protocol::AppReport;

    const NOW: u64 = 1_000_000;

    fn agent(id: &str, arch: &str) -> AgentRecord {
        AgentRecord {
            id: id.into(),
            arch: arch.into(),
            hostname: "h".into(),
            labels: BTreeMap::from([("site".into(), "lab".into())]),
            agent_version: "0.1.0".into(),
            last_seen_ms: NOW,
            apps: vec![],
            desired_generation: 0,
            interval_ms: 500,
            clock_skew_s: 0,
        }
    }

    fn params() -> Params {
        Params {
            selector: BTreeMap::new(),
            canary_per_arch: 1,
            max_parallel: 2,
            min_healthy_time: Duration::from_secs(2),
            healthy_deadline: Duration::from_secs(30),
            progress_deadline: Duration::from_secs(600),
            max_failures: 1,
            auto_rollback: true,
        }
    }

    fn fleet() -> Vec<AgentRecord> {
        vec![
            agent("a1", "aarch64"),
            agent("a2", "aarch64"),
            agent("x1", "x86_64"),
            agent("x2", "x86_64"),
            agent("x3", "x86_64"),
        ]
    }

    fn name(s: &str) -> muscle_protocol::Name {
        muscle_protocol::Name::parse(s).unwrap()
    }

    fn report(agents: &mut BTreeMap<String, AgentRecord>, id: &str, r: AppReport) {
        agents.get_mut(id).unwrap().apps = vec![r];
    }

    fn healthy(version: &str) -> AppReport {
        AppReport {
            installed_version: Some(name(version)),
            running_version: Some(name(version)),
            health: Health::Healthy,
            healthy_for_ms: 5_000,
            ..AppReport::new(name("app"))
        }
    }

    fn previous(_: &str) -> Option<Assignment> {
        None
    }

    #[test]
    fn plans_one_canary_per_arch_then_batches() {
        let r = Rollout::plan("app", "2", ServiceSpec::default(), params(), &fleet(), NOW).unwrap();
        let ids = |w: &Wave| {
            w.members
                .iter()
                .map(|m| m.agent_id.clone())
                .collect::<Vec<_>>()
        };
        assert_eq!(ids(&r.waves[0]), ["a1", "x1"]);
        assert_eq!(ids(&r.waves[1]), ["a2", "x2"]);
        assert_eq!(ids(&r.waves[2]), ["x3"]);
    }

    #[test]
    fn selectors_and_staleness_choose_agents_and_an_empty_choice_is_an_error() {
        let mut agents = fleet();
        agents[0].last_seen_ms = NOW - crate::store::STALE_AFTER_MS - 1;
        // An agent that checks in every 45 s is not stale 40 s after its last check-in.
        agents[1].interval_ms = 45_000;
        agents[1].last_seen_ms = NOW - 40_000;
        let p = Params {
            selector: BTreeMap::from([("arch".into(), "aarch64".into())]),
            ..params()
        };
        let r = Rollout::plan("app", "2", ServiceSpec::default(), p, &agents, NOW).unwrap();
        assert_eq!(
            r.members().map(|m| m.agent_id.as_str()).collect::<Vec<_>>(),
            ["a2"]
        );
        let p = Params {
            selector: BTreeMap::from([("site".into(), "mars".into())]),
            ..params()
        };
        let err = Rollout::plan("app", "2", ServiceSpec::default(), p, &agents, NOW).unwrap_err();
        assert!(err.contains("site=mars"), "{err}");
    }

    #[test]
    fn late_joiners_get_a_settled_version_at_once_and_join_the_last_wave_of_a_running_one() {
        let mut r =
            Rollout::plan("app", "2", ServiceSpec::default(), params(), &fleet(), NOW).unwrap();
        let mut agents: BTreeMap<String, AgentRecord> =
            fleet().into_iter().map(|a| (a.id.clone(), a)).collect();
        let everyone = |_: &AgentRecord| true;
        assert!(
            r.admit_late_joiners(&agents, NOW, &everyone).is_empty(),
            "members are not late"
        );
        agents.insert("x9".into(), agent("x9", "x86_64"));
        let mut stale = agent("x8", "x86_64");
        stale.last_seen_ms = 0;
        agents.insert("x8".into(), stale);

        // Running: x9 waits in the last wave for its turn.
        assert!(r.admit_late_joiners(&agents, NOW, &everyone).is_empty());
        let last = r.waves.last().unwrap();
        assert_eq!(last.members.last().unwrap().agent_id, "x9");
        assert_eq!(last.members.last().unwrap().state, MemberState::Pending);
        assert!(
            r.admit_late_joiners(&agents, NOW, &everyone).is_empty(),
            "added once"
        );

        // Settled: x7 is assigned the version at once, unless it had the app or a removal.
        r.status = Status::Succeeded;
        agents.insert("x7".into(), agent("x7", "x86_64"));
        assert!(r.admit_late_joiners(&agents, NOW, &|_| false).is_empty());
        let x86_only = |a: &AgentRecord| a.arch == "x86_64";
        agents.insert("a9".into(), agent("a9", "aarch64"));
        let actions = r.admit_late_joiners(&agents, NOW, &x86_only);
        assert_eq!(actions.len(), 1, "only the x86_64 joiner: {actions:?}");
        agents.remove("a9");
        let actions = r.admit_late_joiners(&agents, NOW, &everyone);
        assert!(
            matches!(&actions[..], [Action::Assign { agent_id, assignment: Some(a), .. }]
                if agent_id == "x7" && a.version == "2" && a.rollout_id == Some(r.id)),
            "{actions:?}"
        );
        // Outside the selector, withdrawn, or no longer standing: nothing.
        let mut other = r.clone();
        other.params.selector = BTreeMap::from([("site".into(), "mars".into())]);
        assert!(other.admit_late_joiners(&agents, NOW, &everyone).is_empty());
        let mut withdrawn = r.clone();
        withdrawn.withdrawn_ms = Some(NOW);
        assert!(withdrawn
            .admit_late_joiners(&agents, NOW, &everyone)
            .is_empty());
        let mut agent_app = r.clone();
        agent_app.app = muscle_protocol::SELF_APP.into();
        assert!(agent_app
            .admit_late_joiners(&agents, NOW, &everyone)
            .is_empty());
        r.status = Status::RolledBack;
        assert!(r.admit_late_joiners(&agents, NOW, &everyone).is_empty());
    }

    #[test]
    fn a_wave_advances_only_on_reported_health() {
        let mut r =
            Rollout::plan("app", "2", ServiceSpec::default(), params(), &fleet(), NOW).unwrap();
        let mut agents: BTreeMap<String, AgentRecord> =
            fleet().into_iter().map(|a| (a.id.clone(), a)).collect();
        let actions = r.advance(&agents, NOW, &previous);
        assert_eq!(actions.len(), 2, "the canaries are assigned");
        // Installed and running is not enough: it must be healthy for min_healthy_time.
        report(
            &mut agents,
            "a1",
            AppReport {
                healthy_for_ms: 500,
                ..healthy("2")
            },
        );
        report(&mut agents, "x1", healthy("2"));
        assert!(r.advance(&agents, NOW + 1000, &previous).is_empty());
        assert_eq!(r.current_wave, 0);
        report(&mut agents, "a1", healthy("2"));
        r.advance(&agents, NOW + 2000, &previous);
        assert_eq!(r.current_wave, 1);
        let actions = r.advance(&agents, NOW + 2100, &previous);
        assert_eq!(actions.len(), 2, "batch 1 is assigned");
        for id in ["a2", "x2", "x3"] {
            report(&mut agents, id, healthy("2"));
        }
        r.advance(&agents, NOW + 3000, &previous);
        r.advance(&agents, NOW + 3100, &previous);
        r.advance(&agents, NOW + 3200, &previous);
        assert_eq!(r.status, Status::Succeeded, "{}", r.message);
    }

    #[test]
    fn a_rollout_with_a_failed_member_below_max_failures_is_not_a_success() {
        let p = Params {
            max_failures: 2,
            ..params()
        };
        let mut r = Rollout::plan("app", "2", ServiceSpec::default(), p, &fleet(), NOW).unwrap();
        let mut agents: BTreeMap<String, AgentRecord> =
            fleet().into_iter().map(|a| (a.id.clone(), a)).collect();
        r.advance(&agents, NOW, &previous);
        report(&mut agents, "a1", healthy("2"));
        report(
            &mut agents,
            "x1",
            AppReport {
                failed_version: Some(name("2")),
                last_error: Some("cannot listen on 127.0.0.1:31703: Address in use".into()),
                ..AppReport::new(name("app"))
            },
        );
        for id in ["a2", "x2", "x3"] {
            report(&mut agents, id, healthy("2"));
        }
        for step in 0..8 {
            r.advance(&agents, NOW + 1000 * step, &previous);
        }
        assert_eq!(r.status, Status::SucceededWithFailures, "{}", r.message);
        assert!(
            r.message.contains("x1: cannot listen") && r.message.contains("1 agent(s) failed"),
            "{}",
            r.message
        );
    }

    #[test]
    fn requests_follow_one_transition_table_and_abort_settles_members() {
        let mut r =
            Rollout::plan("app", "2", ServiceSpec::default(), params(), &fleet(), NOW).unwrap();
        let agents: BTreeMap<String, AgentRecord> =
            fleet().into_iter().map(|a| (a.id.clone(), a)).collect();
        r.advance(&agents, NOW, &previous);
        assert!(r
            .check_request(Request::Resume)
            .unwrap_err()
            .contains("only a paused rollout"));
        r.apply_request(Request::Pause, NOW).unwrap();
        let err = r.apply_request(Request::Pause, NOW).unwrap_err();
        assert!(
            err.contains("cannot pause rollout 0 while it is Paused"),
            "{err}"
        );
        r.apply_request(Request::Abort, NOW).unwrap();
        assert_eq!(r.status, Status::Aborted);
        assert_eq!(
            r.waves[0].count(MemberState::Abandoned),
            2,
            "the canaries were installing"
        );
        assert_eq!(r.waves[0].count(MemberState::Updating), 0);
        let err = r.check_request(Request::Rollback).unwrap_err();
        assert!(
            err.contains("cannot rollback rollout 0 while it is Aborted"),
            "{err}"
        );
        assert_eq!("supersede".parse::<Request>(), Ok(Request::Supersede));
        assert!("explode".parse::<Request>().is_err());
    }

    #[test]
    fn a_failed_canary_halts_and_rolls_back_what_was_moved() {
        let mut r =
            Rollout::plan("app", "2", ServiceSpec::default(), params(), &fleet(), NOW).unwrap();
        let mut agents: BTreeMap<String, AgentRecord> =
            fleet().into_iter().map(|a| (a.id.clone(), a)).collect();
        let old = Assignment {
            agent_id: String::new(),
            app: "app".into(),
            version: "1".into(),
            service: ServiceSpec::default(),
            rollout_id: None,
        };
        let prev = |id: &str| {
            Some(Assignment {
                agent_id: id.into(),
                ..old.clone()
            })
        };
        r.advance(&agents, NOW, &prev);
        report(
            &mut agents,
            "x1",
            AppReport {
                failed_version: Some(name("2")),
                last_error: Some("unhealthy".into()),
                ..healthy("1")
            },
        );
        let actions = r.advance(&agents, NOW + 1000, &prev);
        assert_eq!(r.status, Status::RolledBack);
        assert!(r.message.contains("halted in canary"), "{}", r.message);
        let restored: Vec<_> = actions
            .iter()
            .map(
                |Action::Assign {
                     agent_id,
                     assignment,
                     ..
                 }| {
                    (
                        agent_id.as_str(),
                        assignment.as_ref().map(|a| a.version.as_str()),
                    )
                },
            )
            .collect();
        assert_eq!(
            restored,
            [("a1", Some("1")), ("x1", Some("1"))],
            "only the canaries were moved, and they go back"
        );
        assert!(r.waves[1]
            .members
            .iter()
            .all(|m| m.state == MemberState::Pending));
    }

    #[test]
    fn a_silent_member_fails_at_the_report_deadline_and_pause_resume_abort_apply() {
        let mut r = Rollout::plan(
            "app",
            "2",
            ServiceSpec::default(),
            Params {
                auto_rollback: false,
                ..params()
            },
            &fleet(),
            NOW,
        )
        .unwrap();
        let agents: BTreeMap<String, AgentRecord> =
            fleet().into_iter().map(|a| (a.id.clone(), a)).collect();
        r.advance(&agents, NOW, &previous);
        let deadline = report_deadline(params().healthy_deadline).as_millis() as u64;
        r.advance(&agents, NOW + deadline, &previous);
        assert_eq!(r.status, Status::Running, "not before the deadline");
        r.advance(&agents, NOW + deadline + 1, &previous);
        assert_eq!(r.status, Status::Halted);
        assert!(r.message.contains("no healthy report"), "{}", r.message);

        let mut r =
            Rollout::plan("app", "2", ServiceSpec::default(), params(), &fleet(), NOW).unwrap();
        r.apply_request(Request::Pause, NOW).unwrap();
        assert!(
            r.advance(&agents, NOW, &previous).is_empty(),
            "a paused rollout does nothing"
        );
        assert!(r
            .apply_request(Request::Pause, NOW)
            .unwrap_err()
            .contains("Paused"));
        r.apply_request(Request::Resume, NOW).unwrap();
        assert_eq!(r.advance(&agents, NOW, &previous).len(), 2);
        r.apply_request(Request::Abort, NOW).unwrap();
        assert_eq!(r.status, Status::Aborted);
        assert!(r.advance(&agents, NOW + 1, &previous).is_empty());
    }

    #[test]
    fn an_image_rollout_aborted_sends_its_machines_back() {
        let agents: BTreeMap<String, AgentRecord> =
            fleet().into_iter().map(|a| (a.id.clone(), a)).collect();
        let image = muscle_protocol::IMAGE_APP;
        let mut r =
            Rollout::plan(image, "2", ServiceSpec::default(), params(), &fleet(), NOW).unwrap();
        let moved = r.advance(&agents, NOW, &previous);
        assert_eq!(moved.len(), 2, "the canary of each arch restarts");
        let back = r.apply_request(Request::Abort, NOW).unwrap();
        assert_eq!(r.status, Status::RolledBack);
        assert_eq!(back.len(), 2, "{back:?}");
        assert!(r.message.starts_with("abort requested"), "{}", r.message);
    }
}
