//! The built-in supervisor: start, restart with backoff, detect crash loops, health-check, rotate
//! logs, stop gracefully, and re-adopt services after the agent restarts.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Result;
use muscle_protocol::{Health, Name, ServiceSpec};

use crate::agent::Agent;
use crate::process::{self, Proc};
use crate::state::Installed;
use crate::{fsutil, health, logs};

/// How often a running service's health is checked outside of a rollout's probation.
const HEALTH_EVERY: Duration = Duration::from_secs(1);

pub struct Service {
    pub version: Name,
    pub spec: ServiceSpec,
    pub binary: PathBuf,
    proc: Option<Proc>,
    pub restarts: u32,
    recent_restarts: VecDeque<Instant>,
    backoff: Duration,
    restart_at: Option<Instant>,
    pub healthy_since: Option<Instant>,
    last_check: Option<Instant>,
    pub health: Health,
    pub last_problem: Option<String>,
}

impl Service {
    fn new(installed: &Installed, binary: PathBuf, proc: Proc) -> Service {
        Service {
            version: installed.version.clone(),
            spec: installed.spec.clone(),
            binary,
            proc: Some(proc),
            restarts: 0,
            recent_restarts: VecDeque::new(),
            backoff: installed.spec.restart.initial_backoff,
            restart_at: None,
            healthy_since: None,
            last_check: None,
            health: Health::Starting,
            last_problem: None,
        }
    }

    pub fn is_running(&mut self) -> bool {
        self.proc.as_mut().is_some_and(|p| p.exited().is_none())
    }

    pub fn pid(&self) -> Option<u32> {
        self.proc.as_ref().map(Proc::pid)
    }

    /// Runs the health check once and updates `health` and `healthy_since`.
    pub fn check_health(&mut self, http: &ureq::Agent) -> Result<(), String> {
        self.last_check = Some(Instant::now());
        let result = if self.is_running() {
            health::check(&self.spec.health, http)
        } else {
            Err("the process is not running".into())
        };
        match &result {
            Ok(()) => {
                self.healthy_since.get_or_insert_with(Instant::now);
                // A crash loop stays reported, with its cause, until the service has been stable
                // for a whole crash-loop window (see `supervise`).
                if self.health != Health::CrashLoop {
                    self.health = Health::Healthy;
                    self.last_problem = None;
                }
            }
            Err(problem) => {
                self.healthy_since = None;
                if self.health != Health::CrashLoop {
                    self.health = Health::Unhealthy;
                }
                self.last_problem = Some(problem.clone());
            }
        }
        result
    }

    fn stop(&mut self) {
        if let Some(mut proc) = self.proc.take() {
            let signal = self.spec.stop_signal_number().unwrap_or(libc::SIGTERM);
            proc.stop(signal, self.spec.stop_grace);
        }
        self.health = Health::Stopped;
        self.healthy_since = None;
    }

    /// Records an exit and schedules the restart with exponential backoff.
    fn on_exit(&mut self, how: &str, app: &str) {
        let now = Instant::now();
        let policy = &self.spec.restart;
        self.recent_restarts.push_back(now);
        while self
            .recent_restarts
            .front()
            .is_some_and(|t| now.duration_since(*t) > policy.crash_loop_window)
        {
            self.recent_restarts.pop_front();
        }
        let looping = self.recent_restarts.len() as u32 >= policy.crash_loop_restarts;
        self.health = if looping {
            Health::CrashLoop
        } else {
            Health::Unhealthy
        };
        self.healthy_since = None;
        self.last_problem = Some(format!(
            "{app} {} exited ({how}); restart #{} in {:?}",
            self.version,
            self.restarts + 1,
            self.backoff
        ));
        eprintln!(
            "muscle-agent: {}",
            self.last_problem.as_deref().unwrap_or_default()
        );
        self.restart_at = Some(now + self.backoff);
        self.backoff = (self.backoff * 2).min(policy.max_backoff);
    }
}

impl Agent {
    /// One pass over every service: reap, restart when due, health-check, rotate logs.
    pub fn supervise(&mut self) {
        let apps: Vec<Name> = self.services.keys().cloned().collect();
        for app in apps {
            let paths = self.paths(&app);
            let (marker, log) = (paths.marker(), paths.log);
            let svc = self.services.get_mut(&app).expect("listed above");
            if let Some(how) = svc.proc.as_mut().and_then(Proc::exited) {
                svc.proc = None;
                svc.on_exit(&how, &app);
            }
            if svc.proc.is_none() && svc.restart_at.is_some_and(|t| Instant::now() >= t) {
                svc.restart_at = None;
                svc.restarts += 1;
                let launched = self.cfg.launcher.launch(
                    &app,
                    &svc.version,
                    &svc.binary,
                    &svc.spec,
                    &log,
                    &marker,
                );
                match launched {
                    Ok(proc) => svc.proc = Some(proc),
                    Err(e) => svc.on_exit(&format!("{e:#}"), &app),
                }
                let pid = svc.pid();
                if let Some(st) = self.state.apps.get_mut(app.as_str()) {
                    st.pid = pid;
                }
                let _ = self.save();
                continue;
            }
            // A stable service earns its backoff back.
            if svc
                .healthy_since
                .is_some_and(|t| t.elapsed() > svc.spec.restart.crash_loop_window)
            {
                svc.backoff = svc.spec.restart.initial_backoff;
                if svc.health == Health::CrashLoop {
                    svc.health = Health::Healthy;
                    svc.last_problem = None;
                }
            }
            if svc.proc.is_some() && svc.last_check.is_none_or(|t| t.elapsed() >= HEALTH_EVERY) {
                let _ = svc.check_health(&self.http);
                let _ = logs::rotate_if_needed(&log, self.cfg.log_max_bytes);
            }
        }
    }

    /// Starts `installed` for `app` and records its pid.
    pub fn start_service(&mut self, app: &Name, installed: &Installed) -> Result<()> {
        let paths = self.paths(app);
        let binary = paths.binary(&installed.version, &installed.binary);
        let proc = self.cfg.launcher.launch(
            app,
            &installed.version,
            &binary,
            &installed.spec,
            &paths.log,
            &paths.marker(),
        )?;
        let pid = proc.pid();
        self.services
            .insert(app.clone(), Service::new(installed, binary, proc));
        let st = self.state.apps.entry(app.clone()).or_default();
        st.pid = Some(pid);
        st.running_version = Some(installed.version.clone());
        self.save()
    }

    pub fn stop_service(&mut self, app: &str) {
        if let Some(mut svc) = self.services.remove(app) {
            svc.stop();
        }
        if let Some(st) = self.state.apps.get_mut(app) {
            st.pid = None;
            st.running_version = None;
        }
    }

    /// At start-up: finish or undo what a previous run left half-done, and re-adopt the services
    /// it started. Afterwards exactly the committed version of each app runs.
    pub fn repair_all(&mut self) -> Result<()> {
        let apps: Vec<Name> = self.state.apps.keys().cloned().collect();
        for app in apps {
            self.repair(&app)?;
        }
        self.save()
    }

    fn repair(&mut self, app: &Name) -> Result<()> {
        let paths = self.paths(app);
        fsutil::remove_tmp_leftovers(&paths.dir);
        fsutil::remove_tmp_leftovers(&paths.versions);
        let marked = process::find_marked(&paths.marker());
        let st = self.state.apps.get_mut(app).expect("listed by the caller");
        let interrupted = st.pending.take();
        let adoptable = interrupted.is_none()
            && st.running_version == st.current.as_ref().map(|c| c.version.clone());
        let adopt = st.pid.filter(|pid| adoptable && marked.contains(pid));
        let current = st.current.clone();
        for pid in marked.iter().filter(|p| Some(**p) != adopt) {
            eprintln!("muscle-agent: {app}: stopping leftover process {pid}");
            let mut orphan = self.cfg.launcher.adopt(app, *pid);
            orphan.stop(libc::SIGTERM, Duration::from_secs(5));
        }
        if let Some(pending) = &interrupted {
            eprintln!(
                "muscle-agent: {app}: install of {} was interrupted; back to the committed version",
                pending.version
            );
        }
        let Some(current) = current else {
            st.pid = None;
            st.running_version = None;
            return Ok(());
        };
        fsutil::switch_symlink(&paths.current, &paths.versions.join(&current.version))?;
        match adopt {
            Some(pid) => {
                eprintln!(
                    "muscle-agent: {app}: adopted running {} (pid {pid})",
                    current.version
                );
                let binary = paths.binary(&current.version, &current.binary);
                let proc = self.cfg.launcher.adopt(app, pid);
                self.services
                    .insert(app.clone(), Service::new(&current, binary, proc));
                Ok(())
            }
            None => self.start_service(app, &current),
        }
    }
}
