//! The agent's main loop: check in, reconcile, supervise; and what it reports.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use muscle_protocol::{
    AppReport, CheckinRequest, CheckinResponse, DesiredApp, Health, Name, MAX_ANSWER_BYTES,
};

use crate::paths::AppPaths;
use crate::process::Launch;
use crate::state::Installed;
use crate::state::{AgentState, StateStore};
use crate::supervisor::Supervisor;

pub struct Config {
    pub servers: crate::servers::Servers,
    pub state_dir: PathBuf,
    pub id: Option<Name>,
    pub labels: BTreeMap<Name, Name>,
    pub vars: BTreeMap<String, String>,
    pub interval: Duration,
    pub trusted_keys: Vec<muscle_protocol::PublicKey>,
    pub enroll_token: Option<String>,
    /// The CA bundle an `https://` server's certificate must chain to (default: the host's; see
    /// `tls.rs`).
    pub ca_file: Option<PathBuf>,
    /// The built-in supervisor, or systemd units.
    pub launcher: crate::process::Launcher,
    pub leave_services_running: bool,
    pub log_max_bytes: u64,
    pub keep_versions: usize,
    /// The boot image this machine runs, if it booted one.
    pub boot_image: crate::image::BootImage,
}

pub struct Agent {
    pub(crate) cfg: Config,
    /// This agent's id: `--id`, else the one remembered in the state file.
    pub(crate) id: Name,
    pub(crate) store: StateStore,
    pub(crate) state: AgentState,
    /// Runs the services, on its own thread.
    pub(crate) supervisor: Supervisor,
    desired: Vec<DesiredApp>,
    /// Entries of the last answer this agent could not read: each refused for its version.
    pub(crate) unreadable: Vec<muscle_protocol::Unreadable>,
    /// Apps the deployer took off this host.
    removed: Vec<Name>,
    /// The boot image version the deployer wants this machine on.
    desired_image: Option<Name>,
    /// Set when the machine is to restart into another image: the loop ends and the agent
    /// exits for muscle-init to restart it.
    reboot: bool,
    /// A change made here (install, rollback, removal) that the next check-in reports.
    unreported_change: bool,
    generation: u64,
    pub(crate) http: ureq::Agent,
    started: Instant,
    /// Why the last check-in answer was refused, told to the server at the next check-in.
    answer_problem: Option<String>,
    /// Per app, the offer that failed for a passing reason and when to try it again.
    pub(crate) retry_at: BTreeMap<Name, (String, Instant)>,
}

/// An answer that arrived but cannot be taken: too large, unparsable, invalid names.
#[derive(Debug)]
struct BadAnswer(String);

impl std::fmt::Display for BadAnswer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for BadAnswer {}

/// A check-in (request and whole answer) that takes longer is abandoned: a peer that trickles
/// cannot hold the agent.
const ANSWER_DEADLINE: Duration = Duration::from_secs(30);

/// The most of a refused answer's reason that is reported.
const MAX_PROBLEM_CHARS: usize = 1024;

/// Set by SIGTERM/SIGINT; the loop notices it within a tick.
pub static SHUTDOWN: AtomicBool = AtomicBool::new(false);

const TICK: Duration = Duration::from_millis(100);
/// The least time between two check-ins.
const MIN_CHECKIN_GAP: Duration = Duration::from_millis(50);
const MAX_BACKOFF: Duration = Duration::from_secs(30);

impl Agent {
    pub fn start(cfg: Config) -> Result<Agent> {
        std::fs::create_dir_all(&cfg.state_dir)
            .with_context(|| format!("cannot create state dir {}", cfg.state_dir.display()))?;
        let store = StateStore::new(&cfg.state_dir);
        let mut state = store.load()?;
        // Also kept apart from state.json: an agent that lost its state keeps its id, and with
        // it the credential it enrolled with.
        let id_file = cfg.state_dir.join("agent-id");
        let remembered = std::fs::read_to_string(&id_file)
            .ok()
            .and_then(|s| Name::parse(s.trim()).ok());
        let id = cfg
            .id
            .clone()
            .or_else(|| state.agent_id.clone())
            .or(remembered.clone())
            .unwrap_or_else(new_id);
        if remembered.as_ref() != Some(&id) {
            crate::fsutil::write_atomic(&id_file, id.as_bytes())?;
        }
        state.agent_id = Some(id.clone());
        store.save(&state)?;
        let http = crate::http::client(cfg.ca_file.as_deref())?;
        let supervisor = Supervisor::spawn(cfg.launcher.clone(), http.clone(), cfg.log_max_bytes);
        let mut agent = Agent {
            cfg,
            id,
            store,
            state,
            supervisor,
            desired: vec![],
            unreadable: vec![],
            removed: vec![],
            desired_image: None,
            reboot: false,
            unreported_change: false,
            generation: 0,
            http,
            started: Instant::now(),
            answer_problem: None,
            retry_at: BTreeMap::new(),
        };
        // Before touching services: this start may be a self-update's, to count or revert.
        agent.check_self_update()?;
        agent.repair_all()?;
        Ok(agent)
    }

    pub fn paths(&self, app: &str) -> AppPaths {
        AppPaths::new(&self.cfg.state_dir, app)
    }

    pub(crate) fn save(&self) -> Result<()> {
        self.store.save(&self.state)
    }

    /// What it takes to run `installed` as `app`'s service.
    pub(crate) fn launch(&self, app: &Name, installed: &Installed) -> Launch {
        let paths = self.paths(app);
        Launch {
            app: app.clone(),
            version: installed.version.clone(),
            binary: paths.binary(&installed.version, &installed.binary),
            spec: installed.spec.clone(),
            marker: paths.marker(),
            log: paths.log,
        }
    }

    /// Starts `installed` for `app` (on probation: not restarted if it exits) and records it.
    pub(crate) fn start_service(
        &mut self,
        app: &Name,
        installed: &Installed,
        probation: bool,
    ) -> Result<()> {
        let pid = self
            .supervisor
            .start(self.launch(app, installed), probation)?;
        let st = self.state.apps.entry(app.clone()).or_default();
        st.pid = Some(pid);
        st.running_version = Some(installed.version.clone());
        self.save()
    }

    pub(crate) fn stop_service(&mut self, app: &str) {
        self.supervisor.stop(app);
        if let Some(st) = self.state.apps.get_mut(app) {
            st.pid = None;
            st.running_version = None;
        }
    }

    /// Records the pids of services the supervisor restarted, so that a restarted agent
    /// finds them.
    pub(crate) fn record_pids(&mut self) {
        let mut changed = false;
        for (app, pid) in self.supervisor.pids() {
            if let Some(st) = self.state.apps.get_mut(&app) {
                if pid.is_some() && st.pid != pid {
                    st.pid = pid;
                    changed = true;
                }
            }
        }
        if changed {
            if let Err(e) = self.save() {
                say!("{e:#}");
            }
        }
    }

    /// Runs until SIGTERM/SIGINT. Services keep running whatever the network does.
    pub fn run(&mut self) -> Result<()> {
        say!(
            "version {} ({}): id {}, server {}",
            env!("CARGO_PKG_VERSION"),
            muscle_inspect::host_arch(),
            self.id,
            self.cfg.servers.all().join(", ")
        );
        crate::jobs::spawn(crate::jobs::JobRunner {
            servers: self.cfg.servers.clone(),
            state_dir: self.cfg.state_dir.clone(),
            agent_id: self.id.clone(),
            http: self.http.clone(),
            trusted_keys: self.cfg.trusted_keys.clone(),
            needs_credential: self.cfg.enroll_token.is_some(),
        });
        let mut next_checkin = Instant::now();
        let mut backoff = self.cfg.interval;
        let mut was_down = false;
        while !SHUTDOWN.load(Ordering::Relaxed) && !self.reboot {
            self.record_pids();
            if Instant::now() >= next_checkin {
                let delay = match self.checkin() {
                    Ok(changed) => {
                        if was_down {
                            say!("server reachable again");
                            was_down = false;
                        }
                        backoff = self.cfg.interval;
                        // Report the outcome of a change at once rather than an interval later
                        // (but never back to back: an answer that changes something at every
                        // check-in must not make the agent spin).
                        if changed {
                            MIN_CHECKIN_GAP
                        } else {
                            jitter(self.cfg.interval)
                        }
                    }
                    Err(e) => {
                        if !was_down {
                            let error = muscle_protocol::causes(&*e);
                            let hint = crate::clock::hint_for(&error)
                                .or_else(|| crate::http::hint_for(&error))
                                .map_or(String::new(), |h| format!(" ({h})"));
                            say!("check-in failed: {error}{hint}; backing off");
                            was_down = true;
                        }
                        backoff = (backoff * 2).min(MAX_BACKOFF);
                        jitter(backoff)
                    }
                };
                next_checkin = Instant::now() + delay;
            }
            // Not past the next check-in: a change is reported at once, not a tick later.
            std::thread::sleep(TICK.min(next_checkin.saturating_duration_since(Instant::now())));
        }
        if self.reboot {
            // Restarting anyway: the machine's next boot starts from nothing.
            if let Err(e) = self.shutdown() {
                say!("{e:#}");
            }
            say!("exiting for muscle-init to restart the machine into its new image");
            std::process::exit(muscle_protocol::image::REBOOT_EXIT_CODE);
        }
        self.shutdown()
    }

    fn shutdown(&mut self) -> Result<()> {
        if self.cfg.leave_services_running {
            self.supervisor.halt();
            say!("exiting, services left running");
            return Ok(());
        }
        say!("stopping services");
        self.supervisor.stop_all();
        for st in self.state.apps.values_mut() {
            st.pid = None;
            st.running_version = None;
        }
        self.save()
    }

    /// POSTs `body` as JSON to `path` on the server with `bearer`, within an overall deadline;
    /// returns the answer's bytes, at most [`MAX_ANSWER_BYTES`].
    pub(crate) fn post(
        &self,
        path: &str,
        bearer: Option<&str>,
        body: &impl serde::Serialize,
    ) -> Result<Vec<u8>> {
        let body = serde_json::to_vec(body)?;
        let answer = self.cfg.servers.post(
            &self.http,
            path,
            bearer,
            &body,
            ANSWER_DEADLINE,
            MAX_ANSWER_BYTES,
        );
        match answer {
            Ok(bytes) => Ok(bytes),
            Err(e @ crate::http::PostError::TooLarge { .. }) => {
                Err(BadAnswer(e.to_string()).into())
            }
            Err(e) => Err(e.into()),
        }
    }

    /// This agent's credential: read from the state dir, or obtained by enrolling once.
    pub(crate) fn credential(&mut self, request: &CheckinRequest) -> Result<Option<String>> {
        let path = self.cfg.state_dir.join("credential");
        if let Ok(text) = std::fs::read_to_string(&path) {
            return Ok(Some(text.trim().to_owned()));
        }
        let Some(token) = self.cfg.enroll_token.clone() else {
            return Ok(None);
        };
        #[derive(serde::Deserialize)]
        struct Enrolled {
            credential: String,
        }
        let answer = self
            .post("/v1/enroll", Some(&token), request)
            .context("enrolling")?;
        let enrolled: Enrolled = serde_json::from_slice(&answer)
            .context("enrolling: the answer is not the JSON expected")?;
        crate::fsutil::write_atomic_private(&path, enrolled.credential.as_bytes())?;
        say!("enrolled as {}", self.id);
        Ok(Some(enrolled.credential))
    }

    /// One check-in and the reconcile it asks for. Returns whether anything changed on this host.
    fn checkin(&mut self) -> Result<bool> {
        let request = self.report();
        let credential = self.credential(&request)?;
        let answer = self.post("/v1/checkin", credential.as_deref(), &request);
        let parsed = answer.and_then(|bytes| {
            let response = serde_json::from_slice::<CheckinResponse>(&bytes)
                .map_err(|e| BadAnswer(format!("the check-in answer was refused: {e}")))?;
            match response.duplicate_app() {
                Some(app) => Err(BadAnswer(format!(
                    "the check-in answer was refused: it names {app} twice"
                ))
                .into()),
                None => Ok(response),
            }
        });
        // A server that answers, but not with a desired state this agent can take, is reported
        // to, not backed off from: the refusal is in the next check-in.
        let response = match parsed {
            Ok(response) => {
                self.answer_problem = None;
                response
            }
            Err(e) => match e.downcast::<BadAnswer>() {
                Ok(BadAnswer(reason)) => {
                    // A parser's message quotes the input: clipped, so that a hostile answer
                    // cannot make the next report too large to send.
                    let reason: String = reason.chars().take(MAX_PROBLEM_CHARS).collect();
                    say!("{reason}");
                    self.answer_problem = Some(reason);
                    return Ok(false);
                }
                Err(e) => return Err(e),
            },
        };
        // The answer arrived: the change it reported is known to the deployer.
        self.unreported_change = false;
        // Checking in is what a new agent binary has to prove.
        self.commit_self_update()?;
        if !response.unchanged {
            (self.desired, self.unreadable) = muscle_protocol::DesiredEntry::split(response.apps);
            self.removed = response.removed;
            self.desired_image = response.image;
            self.generation = response.generation;
        }
        let changed = self.refuse_unreadable() | self.reconcile() | self.follow_image();
        self.unreported_change |= changed;
        Ok(changed)
    }

    /// Reconciles every desired app (each one, even after one changed something), and removes
    /// those taken off this host.
    fn reconcile(&mut self) -> bool {
        let desired = self.desired.clone();
        let mut changed = false;
        for app in self.removed.clone() {
            // The agent itself is never removed, and an app is never both wanted and not.
            if app != crate::selfupdate::SELF_APP && !desired.iter().any(|d| d.app == app) {
                changed |= self.remove_app(&app);
            }
        }
        for d in &desired {
            changed |= self.reconcile_app(d);
        }
        changed
    }

    /// Moves toward the desired boot image: a restart, or a refusal to report. Returns whether
    /// there is something new to report.
    fn follow_image(&mut self) -> bool {
        let Some(desired) = self.desired_image.clone() else {
            return false;
        };
        match self.cfg.boot_image.decide(&desired) {
            crate::image::Decision::Keep => false,
            crate::image::Decision::Refused => true,
            crate::image::Decision::Reboot => {
                say!(
                    "{}: restarting the machine into {desired}",
                    muscle_protocol::IMAGE_APP
                );
                self.reboot = true;
                false
            }
        }
    }

    /// What this agent tells the server.
    pub fn report(&mut self) -> CheckinRequest {
        // An app removed from this host is kept only for its counters: not reported.
        let mut apps: Vec<AppReport> = self
            .state
            .apps
            .iter()
            .filter(|(_, st)| st.is_present())
            .map(|(app, _)| self.app_report(app))
            .collect();
        apps.push(self.self_report());
        apps.extend(self.cfg.boot_image.report(self.started.elapsed()));
        CheckinRequest {
            agent_id: self.id.clone(),
            arch: muscle_inspect::host_arch().to_owned(),
            hostname: hostname(),
            labels: self.cfg.labels.clone(),
            agent_version: env!("CARGO_PKG_VERSION").to_owned(),
            generation: self.generation,
            apps,
            interval_ms: Some(self.cfg.interval.as_millis() as u64),
            clock_unix: Some(crate::clock::now_unix()),
            problem: self.answer_problem.clone(),
            changed: self.unreported_change,
            probe_nonce: None,
            confirm_probe: None,
        }
    }

    /// The agent as an app: always running, healthy since it started (what a self-update
    /// rollout waits for), with its last failed update.
    fn self_report(&self) -> AppReport {
        let version = Name::parse(env!("CARGO_PKG_VERSION")).expect("a valid name");
        let failure = self.state.agent.failure.clone();
        AppReport {
            app: crate::selfupdate::self_app(),
            installed_version: Some(version.clone()),
            running_version: Some(version),
            health: Health::Healthy,
            healthy_for_ms: self.started.elapsed().as_millis() as u64,
            restarts: 0,
            failed_version: failure
                .as_ref()
                .filter(|f| f.permanent)
                .map(|f| f.version.clone()),
            last_error: failure.as_ref().map(|f| f.reason.clone()),
            log_tail: None,
        }
    }

    fn app_report(&self, app: &Name) -> AppReport {
        let st = self.state.apps.get(app).cloned().unwrap_or_default();
        let mut report = AppReport {
            installed_version: st.current.as_ref().map(|c| c.version.clone()),
            ..AppReport::new(app.clone())
        };
        if let Some(svc) = self.supervisor.status(app) {
            report.running_version = svc.running.then(|| svc.version.clone());
            report.health = svc.health;
            report.healthy_for_ms = svc.healthy_for.map_or(0, |t| t.as_millis() as u64);
            report.restarts = svc.restarts;
            if svc.health != Health::Healthy {
                report.last_error = svc.last_problem.clone();
            }
        }
        if let Some(f) = st.failure {
            // Only a final refusal fails a rollout member at once; a transient error (network,
            // disk) is retried, and the deployer's deadline decides.
            report.failed_version = f.permanent.then_some(f.version);
            report.last_error = Some(f.reason);
            report.log_tail = f.log_tail;
        }
        report
    }
}

/// ±10% so that a fleet started together does not check in in lockstep.
fn jitter(d: Duration) -> Duration {
    let spread = d.as_millis() as u64 / 10;
    if spread == 0 {
        return d;
    }
    let offset = u64::from(random_u32()) % (2 * spread);
    Duration::from_millis(d.as_millis() as u64 - spread + offset)
}

/// A new agent's id: its host name (what of it is a valid name, at most 40 characters) and a
/// random suffix.
fn new_id() -> Name {
    let host: String = hostname()
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-')
        .skip_while(|c| *c == '-')
        .take(40)
        .collect();
    let host = if host.is_empty() {
        "agent".into()
    } else {
        host
    };
    Name::parse(&format!("{host}-{:08x}", random_u32())).expect("only name characters")
}

pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "unknown".into())
}

fn random_u32() -> u32 {
    u32::from_le_bytes(random_bytes()) ^ std::process::id()
}

/// Bytes from the kernel's random source (zeros if it cannot be read).
pub(crate) fn random_bytes<const N: usize>() -> [u8; N] {
    let mut buf = [0u8; N];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        let _ = std::io::Read::read_exact(&mut f, &mut buf);
    }
    buf
}
