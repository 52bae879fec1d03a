//! The built-in supervisor: starts, reaps, restarts with backoff, detects crash loops,
//! health-checks, rotates logs and stops services, on a thread of its own. Check-ins, downloads
//! and installs run on the agent's thread: no peer, however slow, can keep a crashed service down.
//!
//! The agent tells it what to run ([`Supervisor::start`], [`Supervisor::stop`], ...) and reads
//! back [`Status`] snapshots; the supervisor knows nothing of check-ins or the state file.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::Result;
use muscle_protocol::{Health, HealthCheck, Name};

use crate::process::{Launch, Launcher, Proc};
use crate::{health, logs};

/// How often the supervisor looks at its services.
const TICK: Duration = Duration::from_millis(100);
/// How often a running service's health is checked.
const HEALTH_EVERY: Duration = Duration::from_secs(1);
/// How often a service on probation is checked: at every pass, since its verdict decides an
/// install and holds up a rollout's wave.
const PROBATION_HEALTH_EVERY: Duration = TICK;

/// What the agent may know of one service.
#[derive(Debug, Clone)]
pub struct Status {
    pub version: Name,
    pub running: bool,
    pub health: Health,
    /// How long it has passed every health check, if it passes now.
    pub healthy_for: Option<Duration>,
    pub restarts: u32,
    pub last_problem: Option<String>,
    /// On probation, a process that exits is not restarted: how it ended.
    pub exited_on_probation: Option<String>,
}

pub struct Supervisor {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

struct Shared {
    services: Mutex<BTreeMap<Name, Service>>,
    launcher: Launcher,
    /// For HTTP health checks.
    http: ureq::Agent,
    log_max_bytes: u64,
    /// Tells the thread to return (services keep running).
    halt: AtomicBool,
    next_id: AtomicU64,
}

/// One supervised service.
struct Service {
    /// Tells this service from a later one of the same app, for results that arrive after the
    /// lock was released.
    id: u64,
    launch: Launch,
    proc: Option<Proc>,
    probation: bool,
    exited_on_probation: Option<String>,
    restarts: u32,
    recent_exits: VecDeque<Instant>,
    backoff: Duration,
    restart_at: Option<Instant>,
    healthy_since: Option<Instant>,
    last_check: Option<Instant>,
    health: Health,
    last_problem: Option<String>,
    /// The kernel's count of OOM kills in the service's group when its process started.
    ooms_before: u64,
}

impl Supervisor {
    /// Starts the supervising thread, with no services yet.
    pub fn spawn(launcher: Launcher, http: ureq::Agent, log_max_bytes: u64) -> Supervisor {
        let shared = Arc::new(Shared {
            services: Mutex::new(BTreeMap::new()),
            launcher,
            http,
            log_max_bytes,
            halt: AtomicBool::new(false),
            next_id: AtomicU64::new(1),
        });
        let mut supervisor = Supervisor {
            shared,
            thread: None,
        };
        supervisor.resume();
        supervisor
    }

    /// (Re)starts the supervising thread after [`Supervisor::halt`].
    pub fn resume(&mut self) {
        if self.thread.is_some() {
            return;
        }
        self.shared.halt.store(false, Ordering::SeqCst);
        let shared = Arc::clone(&self.shared);
        self.thread = Some(
            std::thread::Builder::new()
                .name("supervisor".into())
                .spawn(move || shared.run())
                .expect("a thread can be started"),
        );
    }

    /// Stops supervising (nothing is restarted or checked any more); services keep running.
    pub fn halt(&mut self) {
        self.shared.halt.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }

    /// Starts a process of `launch`; on probation an exit ends it instead of restarting it.
    /// Returns its pid.
    pub fn start(&self, launch: Launch, probation: bool) -> Result<u32> {
        // Counted before the launch: an OOM kill in its first moments counts as this one's.
        let ooms_before = launch.oom_kills();
        let proc = self.shared.launcher.launch(&launch)?;
        let pid = proc.pid();
        let app = launch.app.clone();
        let mut svc = self.shared.service(launch, proc);
        svc.ooms_before = ooms_before;
        svc.probation = probation;
        self.insert(app, svc);
        Ok(pid)
    }

    /// Supervises a process a previous agent started, without restarting it.
    pub fn adopt(&self, launch: Launch, pid: u32) {
        let proc = self.shared.launcher.adopt(&launch.app, pid);
        let app = launch.app.clone();
        let svc = self.shared.service(launch, proc);
        self.insert(app, svc);
    }

    fn insert(&self, app: Name, svc: Service) {
        // A service replaced without a stop would run unsupervised: stop it.
        let old = self.shared.lock().insert(app, svc);
        if let Some(mut old) = old {
            old.stop();
        }
    }

    /// Ends the probation of `app`'s service: from now on it is restarted when it exits.
    /// Refused if its process is gone (exited after its last health check): checked and
    /// committed under one lock, so no exit falls between.
    pub fn commit(&self, app: &str) -> Result<(), String> {
        let mut services = self.shared.lock();
        let svc = services
            .get_mut(app)
            .ok_or("the new process is no longer supervised")?;
        if let Some(how) = svc.exited_on_probation.clone() {
            return Err(format!("the new process exited ({how})"));
        }
        if let Some(how) = svc.proc.as_mut().and_then(Proc::exited) {
            return Err(format!("the new process exited ({how})"));
        }
        svc.probation = false;
        Ok(())
    }

    /// Stops `app`'s service (its stop signal, then SIGKILL after its grace) and forgets it.
    pub fn stop(&self, app: &str) {
        // Taken out of the map first: stopping may take the whole grace period, and the others
        // stay supervised meanwhile.
        let svc = self.shared.lock().remove(app);
        if let Some(mut svc) = svc {
            svc.stop();
            svc.launch.remove_cgroup();
        }
    }

    /// Halts supervision, then stops every service.
    pub fn stop_all(&mut self) {
        self.halt();
        let services = std::mem::take(&mut *self.shared.lock());
        for (_, mut svc) in services {
            svc.stop();
            svc.launch.remove_cgroup();
        }
    }

    pub fn status(&self, app: &str) -> Option<Status> {
        self.shared.lock().get_mut(app).map(Service::status)
    }

    /// The pid of every service's process (none while it waits to be restarted).
    pub fn pids(&self) -> BTreeMap<Name, Option<u32>> {
        self.shared
            .lock()
            .iter()
            .map(|(app, svc)| (app.clone(), svc.proc.as_ref().map(Proc::pid)))
            .collect()
    }
}

impl Drop for Supervisor {
    fn drop(&mut self) {
        self.halt();
    }
}

/// A health check to run outside the lock.
struct Due {
    app: Name,
    id: u64,
    check: HealthCheck,
    log: std::path::PathBuf,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, BTreeMap<Name, Service>> {
        // A panic elsewhere must not stop supervision: the map stays consistent between calls.
        self.services.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn service(&self, launch: Launch, proc: Proc) -> Service {
        Service {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            backoff: launch.spec.restart.initial_backoff,
            ooms_before: launch.oom_kills(),
            launch,
            proc: Some(proc),
            probation: false,
            exited_on_probation: None,
            restarts: 0,
            recent_exits: VecDeque::new(),
            restart_at: None,
            healthy_since: None,
            last_check: None,
            health: Health::Starting,
            last_problem: None,
        }
    }

    fn run(&self) {
        while !self.halt.load(Ordering::SeqCst) {
            self.pass();
            std::thread::sleep(TICK);
        }
    }

    /// One look at every service: reap, restart when due, health-check, rotate logs. Health
    /// checks run without the lock, and exits are reaped again after each one, so that a slow
    /// check neither keeps the agent waiting nor delays a restart by more than its own timeout.
    fn pass(&self) {
        for due in self.reap_and_restart(true) {
            let result = health::check(&due.check, &self.http);
            if let Some(svc) = self.lock().get_mut(&due.app).filter(|s| s.id == due.id) {
                svc.record_check(result);
            }
            // The relay rotates on write; this catches a service that writes its file itself
            // (started by an agent without the relay).
            let _ = logs::rotate_if_needed(&due.log, self.log_max_bytes.saturating_mul(2));
            self.reap_and_restart(false);
        }
    }

    /// Under the lock: reaps exits, restarts what is due, and (with `checks`) says which services
    /// to check. Restarts happen under the lock (a fork and exec, or a `systemctl restart`): a
    /// stop or an install that comes meanwhile waits for it, and never races a launch of the
    /// same app.
    fn reap_and_restart(&self, checks_due: bool) -> Vec<Due> {
        let now = Instant::now();
        let mut checks = vec![];
        for (app, svc) in self.lock().iter_mut() {
            if let Some(how) = svc.proc.as_mut().and_then(Proc::exited) {
                svc.proc = None;
                svc.on_exit(&how);
            }
            if svc.proc.is_none() && svc.restart_at.is_some_and(|t| now >= t) {
                svc.restart_at = None;
                svc.restarts += 1;
                svc.ooms_before = svc.launch.oom_kills();
                match self.launcher.launch(&svc.launch) {
                    Ok(proc) => svc.proc = Some(proc),
                    Err(e) => svc.on_exit(&format!("{e:#}")),
                }
                continue;
            }
            svc.earn_backoff_back();
            if !checks_due {
                continue;
            }
            let every = if svc.probation {
                PROBATION_HEALTH_EVERY
            } else {
                HEALTH_EVERY
            };
            if svc.proc.is_some() && svc.last_check.is_none_or(|t| t.elapsed() >= every) {
                svc.last_check = Some(now);
                checks.push(Due {
                    app: app.clone(),
                    id: svc.id,
                    check: svc.launch.spec.health.clone(),
                    log: svc.launch.log.clone(),
                });
            }
        }
        checks
    }
}

impl Service {
    fn status(&mut self) -> Status {
        // An exit seen here is recorded here, as a pass would: probation must not see the
        // process gone before it knows how it went.
        if let Some(how) = self.proc.as_mut().and_then(Proc::exited) {
            self.proc = None;
            self.on_exit(&how);
        }
        let running = self.proc.is_some();
        Status {
            version: self.launch.version.clone(),
            running,
            health: self.health,
            healthy_for: self.healthy_since.map(|t| t.elapsed()),
            restarts: self.restarts,
            last_problem: self.last_problem.clone(),
            exited_on_probation: self.exited_on_probation.clone(),
        }
    }

    fn record_check(&mut self, result: Result<(), String>) {
        let running = self.proc.as_mut().is_some_and(|p| p.exited().is_none());
        let result = if running {
            result
        } else {
            Err("the process is not running".into())
        };
        match result {
            Ok(()) => {
                self.healthy_since.get_or_insert_with(Instant::now);
                // A crash loop stays reported, with its cause, until the service has been stable
                // for a whole crash-loop window (see `earn_backoff_back`).
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
                self.last_problem = Some(problem);
            }
        }
    }

    /// A service stable for a whole crash-loop window earns its backoff back.
    fn earn_backoff_back(&mut self) {
        let policy = &self.launch.spec.restart;
        if self
            .healthy_since
            .is_some_and(|t| t.elapsed() > policy.crash_loop_window)
        {
            self.backoff = policy.initial_backoff;
            if self.health == Health::CrashLoop {
                self.health = Health::Healthy;
                self.last_problem = None;
            }
        }
    }

    fn stop(&mut self) {
        if let Some(mut proc) = self.proc.take() {
            let spec = &self.launch.spec;
            let signal = spec.stop_signal_number().unwrap_or(libc::SIGTERM);
            proc.stop(signal, spec.stop_grace);
        }
        self.restart_at = None;
        self.health = Health::Stopped;
        self.healthy_since = None;
    }

    /// Records an exit: on probation the end of it, otherwise a restart with exponential backoff.
    fn on_exit(&mut self, how: &str) {
        // A SIGKILL from the kernel's OOM killer says nothing by itself: name the cause, when
        // the main process died of a SIGKILL (or of what an adopted process cannot tell) and
        // the group's OOM count rose (a forked worker killed for memory is not the service).
        let oom;
        let killed = how.contains("SIGKILL") || how == "exited";
        let by_systemd = how.starts_with(crate::process::OOM_KILLED);
        let how = match self.launch.spec.limits.memory {
            Some(limit) if by_systemd || (killed && self.launch.oom_kills() > self.ooms_before) => {
                oom = format!(
                    "killed by the kernel: memory limit {} reached",
                    limit.human()
                );
                oom.as_str()
            }
            _ => how,
        };
        let (app, version) = (&self.launch.app, &self.launch.version);
        self.healthy_since = None;
        if self.probation {
            self.health = Health::Unhealthy;
            self.exited_on_probation = Some(how.to_owned());
            self.last_problem = Some(format!("{app} {version} exited ({how})"));
            return;
        }
        let now = Instant::now();
        let policy = &self.launch.spec.restart;
        self.recent_exits.push_back(now);
        while self
            .recent_exits
            .front()
            .is_some_and(|t| now.duration_since(*t) > policy.crash_loop_window)
        {
            self.recent_exits.pop_front();
        }
        let looping = self.recent_exits.len() as u32 >= policy.crash_loop_restarts;
        self.health = if looping {
            Health::CrashLoop
        } else {
            Health::Unhealthy
        };
        let problem = format!(
            "{app} {version} exited ({how}); restart #{} in {:?}",
            self.restarts + 1,
            self.backoff
        );
        say!("{problem}");
        self.last_problem = Some(problem);
        self.restart_at = Some(now + self.backoff);
        self.backoff = (self.backoff * 2).min(policy.max_backoff);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use muscle_protocol::ServiceSpec;
    use std::path::PathBuf;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("muscle-sup-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// A service running `sh -c script`, restarted after 50 ms.
    fn launch(dir: &std::path::Path, script: &str) -> Launch {
        let mut spec: ServiceSpec = serde_json::from_value(serde_json::json!({
            "args": ["-c", script],
            "stop_grace": "1s",
            "restart": {"initial_backoff": "50ms", "max_backoff": "1s"},
        }))
        .unwrap();
        spec.health = HealthCheck::None;
        Launch {
            app: Name::parse("svc").unwrap(),
            version: Name::parse("1.0.0").unwrap(),
            binary: PathBuf::from("/bin/sh"),
            spec,
            log: dir.join("service.log"),
            marker: dir.display().to_string(),
        }
    }

    fn wait_for(what: &str, mut ok: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !ok() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn supervisor() -> Supervisor {
        let sink = crate::process::LogSink {
            relay: None,
            policy: crate::logs::LogPolicy {
                max_bytes: 1 << 20,
                keep: 1,
            },
        };
        Supervisor::spawn(Launcher::Builtin(sink), ureq::agent(), 1 << 20)
    }

    #[test]
    fn a_killed_service_is_restarted_while_the_agent_thread_is_busy() {
        let dir = scratch("restart");
        let sup = supervisor();
        let first = sup.start(launch(&dir, "exec sleep 60"), false).unwrap();
        // The caller's thread does nothing more: restarts need no help from it.
        crate::process::signal_pid(first, libc::SIGKILL);
        wait_for("a new process", || {
            sup.pids()["svc"].is_some_and(|pid| pid != first)
        });
        let status = sup.status("svc").unwrap();
        assert_eq!(status.restarts, 1);
        // Between fork and exec the child still carries the test's environment, not its marker.
        let mut marked = Vec::new();
        wait_for("the new process to carry its marker", || {
            marked = crate::process::find_marked(&dir.display().to_string());
            marked.len() == 1
        });
        assert_eq!(marked[0].version.as_deref(), Some("1.0.0"));
        sup.stop("svc");
        assert!(crate::process::find_marked(&dir.display().to_string()).is_empty());
    }

    #[test]
    fn on_probation_an_exit_ends_the_service_instead_of_restarting_it() {
        let dir = scratch("probation");
        let sup = supervisor();
        let pid = sup.start(launch(&dir, "exit 3"), true).unwrap();
        wait_for("the exit to be seen", || {
            sup.status("svc")
                .is_some_and(|s| s.exited_on_probation.is_some())
        });
        std::thread::sleep(Duration::from_millis(300));
        let status = sup.status("svc").unwrap();
        assert_eq!((status.running, status.restarts), (false, 0), "{status:?}");
        assert!(
            status
                .exited_on_probation
                .unwrap()
                .contains("exit status: 3"),
            "pid {pid}"
        );
        let refused = sup.commit("svc").unwrap_err();
        assert!(refused.contains("exited"), "{refused}");
    }

    #[test]
    fn a_committed_service_that_keeps_crashing_backs_off_and_reports_a_crash_loop() {
        let dir = scratch("loop");
        let sup = supervisor();
        sup.start(launch(&dir, "sleep 0.3; exit 1"), true).unwrap();
        sup.commit("svc").unwrap();
        wait_for("a crash loop", || {
            sup.status("svc")
                .is_some_and(|s| s.health == Health::CrashLoop)
        });
        let status = sup.status("svc").unwrap();
        // 50 ms doubling: five restarts take more than 50+100+200+400 ms.
        assert!(status.restarts >= 4, "{status:?}");
        assert!(status.last_problem.unwrap().contains("exited"));
    }

    /// A bounded fork bomb (200 forks, so that a limit not applied cannot hurt the host):
    /// the pids limit stops it at 16, and stopping the service leaves none of its processes.
    #[test]
    fn forks_past_the_pids_limit_fail_and_a_stop_leaves_no_process_behind() {
        if !crate::cgroup::running_as_root() {
            eprintln!("skipped: cgroups need root");
            return;
        }
        let dir = scratch("forks");
        let sup = supervisor();
        let mut l = launch(
            &dir,
            "i=0; while [ $i -lt 200 ]; do sleep 30 & i=$((i+1)); done; wait",
        );
        l.spec.limits.pids = Some(16);
        let group = crate::cgroup::Group::locate(&l.cgroup_name(), &l.spec.limits).unwrap();
        sup.start(l, false).unwrap();
        let log = dir.join("service.log");
        wait_for("a fork refused", || {
            std::fs::read_to_string(&log).is_ok_and(|t| t.contains("fork"))
        });
        let members = group.pids();
        sup.stop("svc");
        assert!(
            (2..=16).contains(&members.len()),
            "{} processes in the group",
            members.len()
        );
        assert!(members.iter().all(|p| !crate::process::is_alive(*p)));
        assert!(group.pids().is_empty());
    }

    #[test]
    fn a_service_killed_for_memory_is_reported_with_its_limit() {
        if !crate::cgroup::running_as_root() {
            eprintln!("skipped: cgroups need root");
            return;
        }
        let dir = scratch("oom");
        let sup = supervisor();
        let mut l = launch(&dir, "");
        l.binary = PathBuf::from("/usr/bin/python3");
        l.spec.args = vec![
            "-c".into(),
            "x = bytearray(256 << 20); import time; time.sleep(60)".into(),
        ];
        l.spec.limits.memory = Some(muscle_protocol::Memory(64 << 20));
        l.spec.limits.pids = Some(16);
        sup.start(l, true).unwrap();
        wait_for("the OOM kill", || {
            sup.status("svc")
                .is_some_and(|s| s.exited_on_probation.is_some())
        });
        let why = sup.status("svc").unwrap().exited_on_probation.unwrap();
        assert_eq!(why, "killed by the kernel: memory limit 64M reached");
        sup.stop("svc");
    }

    #[test]
    fn halted_supervision_restarts_nothing_and_stop_all_stops_everything() {
        let dir = scratch("halt");
        let mut sup = supervisor();
        let pid = sup.start(launch(&dir, "exec sleep 60"), false).unwrap();
        sup.halt();
        crate::process::signal_pid(pid, libc::SIGKILL);
        std::thread::sleep(Duration::from_millis(400));
        assert!(crate::process::find_marked(&dir.display().to_string()).is_empty());
        sup.resume();
        wait_for("the restart after resume", || {
            sup.status("svc").is_some_and(|s| s.running)
        });
        sup.stop_all();
        assert!(crate::process::find_marked(&dir.display().to_string()).is_empty());
        assert!(sup.status("svc").is_none());
    }
}
