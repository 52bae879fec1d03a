//! Reconciling an app to its desired version: verify, stage, switch, probation, and commit or
//! roll back; and removing an app the deployer no longer wants. Part of the orchestrator: this
//! is where installs are recorded in the agent's state.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use muscle_protocol::{DesiredApp, Name, ReleaseManifest};

use crate::agent::Agent;
use crate::install::{self, offer_id, retry_delay, InstallError};
use crate::selfupdate::SELF_APP;
use crate::state::{AppState, Failure, Installed, Receipt};
use crate::{fsutil, logs};

const LOG_TAIL_BYTES: u64 = 2048;
/// How long a failed install waits for the log relay before reading the log's tail.
const RELAY_CATCH_UP: Duration = Duration::from_millis(300);
/// How often probation looks at the supervisor's verdict (a lock and a copy): its end is reported
/// at once, and a rollout's next wave waits for it.
const PROBATION_POLL: Duration = Duration::from_millis(20);

impl Agent {
    /// Moves `d.app` toward `d.version`. Returns whether anything changed on this host.
    pub fn reconcile_app(&mut self, d: &DesiredApp) -> bool {
        let is_self = d.app == SELF_APP;
        let st = self.app_state_mut(&d.app);
        let at_desired = if is_self {
            d.version == env!("CARGO_PKG_VERSION")
        } else {
            st.current
                .as_ref()
                .is_some_and(|c| c.version == d.version && c.sha256 == d.artifact.sha256)
        };
        let offer = offer_id(d);
        let refused_for_good = st
            .failure
            .as_ref()
            .is_some_and(|f| f.offer == offer && f.permanent);
        if at_desired || refused_for_good || self.backing_off(&d.app, &offer) {
            return false;
        }
        say!("{}: installing {}", d.app, d.version);
        // A successful self-update does not return: the new agent takes over this process.
        let result = if is_self {
            self.update_self(d)
        } else {
            self.install(d)
        };
        self.retry_at.remove(&d.app);
        let st = self.app_state_mut(&d.app);
        match result {
            Ok(()) => say!("{}: {} is healthy and committed", d.app, d.version),
            Err(e) => {
                let attempts = st
                    .failure
                    .as_ref()
                    .filter(|f| f.offer == offer)
                    .map_or(1, |f| f.attempts + 1);
                if !matches!(e, InstallError::Refused(_) | InstallError::Unhealthy { .. }) {
                    let delay = retry_delay(attempts);
                    self.retry_at
                        .insert(d.app.clone(), (offer.clone(), Instant::now() + delay));
                }
                let st = self.app_state_mut(&d.app);
                let (reason, log_tail, permanent) = match e {
                    // Retried after `retry_delay`, resuming the download; the deployer's
                    // deadline decides when the rollout gives up on this agent.
                    InstallError::Transient(r) => (r, None, false),
                    InstallError::Refused(r) => (r, None, true),
                    InstallError::ByClock(r) => (r, None, false),
                    InstallError::Unhealthy { reason, log_tail } => (reason, log_tail, true),
                };
                say!("{}: {} not installed: {reason}", d.app, d.version);
                st.failure = Some(Failure {
                    version: d.version.clone(),
                    sha256: d.artifact.sha256.clone(),
                    offer,
                    reason,
                    log_tail,
                    permanent,
                    attempts,
                });
            }
        }
        if let Err(e) = self.save() {
            say!("{e:#}");
        }
        true
    }

    /// Refuses, for good, each entry of the answer this agent could not read (a field of a newer
    /// deployer's): reported like any refusal, so a rollout halts with the reason, while the
    /// rest of the answer is taken. Returns whether a refusal is new.
    pub(crate) fn refuse_unreadable(&mut self) -> bool {
        let mut changed = false;
        for u in self.unreadable.clone() {
            let offer = format!("unreadable {} {}", u.version, u.sha256);
            let st = self.app_state_mut(&u.app);
            if st.failure.as_ref().is_some_and(|f| f.offer == offer) {
                continue;
            }
            let error: String = u.error.chars().take(400).collect();
            let reason = format!(
                "this agent (muscle-agent {}) cannot read the desired state the deployer sent \
                 for it: {error}; update the agent to a version that knows it",
                env!("CARGO_PKG_VERSION")
            );
            say!("{}: {} not installed: {reason}", u.app, u.version);
            st.failure = Some(Failure {
                version: u.version.clone(),
                sha256: u.sha256.clone(),
                offer,
                reason,
                log_tail: None,
                permanent: true,
                attempts: 1,
            });
            changed = true;
        }
        if changed {
            if let Err(e) = self.save() {
                say!("{e:#}");
            }
        }
        changed
    }

    /// Whether `offer` of `app` failed recently for a passing reason and waits for its retry.
    fn backing_off(&self, app: &Name, offer: &str) -> bool {
        self.retry_at
            .get(app)
            .is_some_and(|(o, at)| o == offer && Instant::now() < *at)
    }

    /// The remembered state of `app`; the agent's own lives apart from the services'.
    pub(crate) fn app_state_mut(&mut self, app: &Name) -> &mut AppState {
        if app == SELF_APP {
            &mut self.state.agent
        } else {
            self.state.apps.entry(app.clone()).or_default()
        }
    }

    pub(crate) fn app_state(&self, app: &str) -> AppState {
        if app == SELF_APP {
            self.state.agent.clone()
        } else {
            self.state.apps.get(app).cloned().unwrap_or_default()
        }
    }

    fn install(&mut self, d: &DesiredApp) -> Result<(), InstallError> {
        let manifest = self.verify(d)?;
        let spec = install::spec_to_run(d, &manifest, &self.cfg.trusted_keys)?
            .expand(&self.cfg.vars)
            .map_err(|e| InstallError::Refused(e.to_string()))?;
        spec.validate()
            .map_err(|e| InstallError::Refused(e.to_string()))?;
        self.stage(d)?;
        let new = Installed {
            version: d.version.clone(),
            binary: d.artifact.binary.clone(),
            sha256: d.artifact.sha256.clone(),
            spec,
        };
        let paths = self.paths(&d.app);
        let mut receipt = Receipt {
            installed: new.clone(),
            counter: manifest.counter,
            committed: false,
        };
        let write = |r: &Receipt| {
            r.write(&paths)
                .map_err(|e| InstallError::Transient(format!("{e:#}")))
        };
        write(&receipt)?;
        self.switch(&d.app, new)?;
        receipt.committed = true;
        write(&receipt)?;
        let st = self.state.apps.get_mut(&d.app).expect("switch created it");
        st.highest_counter = st.highest_counter.max(manifest.counter);
        st.ran.insert(d.version.clone(), d.artifact.sha256.clone());
        let keep: Vec<&str> = [&st.current, &st.previous]
            .into_iter()
            .flatten()
            .map(|i| i.version.as_str())
            .collect();
        install::clean_old_versions(&paths, &keep, self.cfg.keep_versions);
        Ok(())
    }

    /// Checks the offer's manifest against this agent's keys, clock and counters.
    pub(crate) fn verify(&self, d: &DesiredApp) -> Result<ReleaseManifest, InstallError> {
        install::check_manifest(
            d,
            &self.cfg.trusted_keys,
            &self.app_state(&d.app),
            crate::clock::now_unix(),
        )
    }

    pub(crate) fn stage(&self, d: &DesiredApp) -> Result<PathBuf, InstallError> {
        install::stage(
            &self.http,
            self.cfg.servers.current(),
            &self.paths(&d.app),
            d,
        )
    }

    /// Stops the old version, starts the new one, and keeps it only if it proves healthy.
    fn switch(&mut self, app: &Name, new: Installed) -> Result<(), InstallError> {
        let paths = self.paths(app);
        let st = self.state.apps.entry(app.clone()).or_default();
        let old = st.current.clone();
        st.pending = Some(new.clone());
        self.save()
            .map_err(|e| InstallError::Transient(format!("{e:#}")))?;
        self.stop_service(app);
        let started = fsutil::switch_symlink(&paths.current, &paths.versions.join(&new.version))
            .and_then(|_| self.start_service(app, &new, true));
        let verdict = match started {
            Ok(()) => self
                .probation(app)
                .and_then(|()| self.supervisor.commit(app)),
            Err(e) => Err(format!("{e:#}")),
        };
        match verdict {
            Ok(()) => {
                let st = self.state.apps.get_mut(app).expect("exists");
                st.previous = old;
                st.current = Some(new);
                st.pending = None;
                st.failure = None;
                self.save()
                    .map_err(|e| InstallError::Transient(format!("{e:#}")))
            }
            Err(reason) => {
                // The log relay is a process of its own: give it a moment to write the last
                // words of a process that just died.
                std::thread::sleep(RELAY_CATCH_UP);
                let log_tail = logs::tail(&paths.log, LOG_TAIL_BYTES);
                self.roll_back(app, old);
                Err(InstallError::Unhealthy {
                    reason: format!("{} rolled back: {reason}", new.version),
                    log_tail,
                })
            }
        }
    }

    fn roll_back(&mut self, app: &Name, old: Option<Installed>) {
        self.stop_service(app);
        let paths = self.paths(app);
        if let Some(old) = &old {
            let restored =
                fsutil::switch_symlink(&paths.current, &paths.versions.join(&old.version))
                    .and_then(|_| self.start_service(app, old, false));
            if let Err(e) = restored {
                say!(
                    "{app}: cannot restart {} after rollback: {e:#}",
                    old.version
                );
            }
        } else {
            let _ = std::fs::remove_file(&paths.current);
        }
        let st = self.state.apps.get_mut(app).expect("exists");
        st.pending = None;
        if let Err(e) = self.save() {
            say!("{e:#}");
        }
    }

    /// Waits, while the supervisor health-checks the new process, until it has been healthy
    /// for `min_healthy_time`; fails once `healthy_deadline` passes or the process exits.
    fn probation(&self, app: &str) -> Result<(), String> {
        let started = Instant::now();
        loop {
            let status = self
                .supervisor
                .status(app)
                .ok_or("the new process is no longer supervised")?;
            let spec = &self.state.apps[app]
                .pending
                .as_ref()
                .expect("on probation")
                .spec;
            let (min, deadline) = (spec.min_healthy_time, spec.healthy_deadline);
            if let Some(how) = status.exited_on_probation {
                return Err(format!(
                    "the new process exited during its health probation ({how})"
                ));
            }
            if !status.running {
                return Err("the new process exited during its health probation".into());
            }
            if status.healthy_for.is_some_and(|t| t >= min) {
                return Ok(());
            }
            if started.elapsed() >= deadline {
                let last = status
                    .last_problem
                    .unwrap_or_else(|| "healthy, but not for long enough".into());
                return Err(format!(
                    "not healthy for {min:?} within healthy_deadline {deadline:?} (last check: {last})"
                ));
            }
            std::thread::sleep(PROBATION_POLL);
        }
    }

    /// Stops and uninstalls `app`, which the deployer no longer wants here. Its counters stay:
    /// a later install of an older release is still a replay.
    pub(crate) fn remove_app(&mut self, app: &Name) -> bool {
        let Some(st) = self.state.apps.get_mut(app) else {
            return false;
        };
        if !st.is_present() {
            return false;
        }
        say!("{app}: removed from this host's desired state; uninstalling");
        self.stop_service(app);
        let st = self.state.apps.get_mut(app).expect("looked up above");
        st.current = None;
        st.previous = None;
        st.pending = None;
        st.failure = None;
        self.retry_at.remove(app);
        let paths = self.paths(app);
        for dir in [&paths.versions, &paths.downloads] {
            let _ = std::fs::remove_dir_all(dir);
        }
        let _ = std::fs::remove_file(&paths.current);
        if let crate::process::Launcher::Systemd { unit_dir, .. } = &self.cfg.launcher {
            if let Err(e) = crate::systemd::remove(unit_dir, app) {
                say!("{app}: {e:#}");
            }
        }
        if let Err(e) = self.save() {
            say!("{e:#}");
        }
        true
    }
}
