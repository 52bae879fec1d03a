//! Starting, watching and stopping service processes, and finding the ones a previous agent left.

use std::io::PipeWriter;
use std::os::fd::OwnedFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use muscle_protocol::{Name, ServiceSpec};

use crate::logs;

/// The environment variable that marks a process as a service of this agent: its value is
/// `<state dir>/apps/<app>`. It survives the agent (and qemu-user, which rewrites argv and
/// `/proc/<pid>/exe`).
pub const MARKER: &str = "MUSCLE_SERVICE";
/// Beside [`MARKER`]: the version the process runs, so that an agent that lost its state can
/// tell which of the processes it finds to adopt.
pub const MARKER_VERSION: &str = "MUSCLE_SERVICE_VERSION";

/// Everything it takes to start one service process.
#[derive(Debug, Clone)]
pub struct Launch {
    pub app: Name,
    pub version: Name,
    pub binary: PathBuf,
    pub spec: ServiceSpec,
    pub log: PathBuf,
    /// The value of [`MARKER`].
    pub marker: String,
}

/// How a unit's exit reads when systemd says the OOM killer ended it.
pub const OOM_KILLED: &str = "killed by the OOM killer";

impl Launch {
    /// The name of this service's control group: unique per agent (state dir) and app.
    pub fn cgroup_name(&self) -> String {
        let hash = muscle_protocol::sha256_hex(self.marker.as_bytes());
        format!("{}-{}", self.app, &hash[..12])
    }

    /// Removes this service's control group, if it has one (its processes are gone).
    pub fn remove_cgroup(&self) {
        if !self.spec.limits.is_none() {
            if let Ok(g) = crate::cgroup::Group::locate(&self.cgroup_name(), &self.spec.limits) {
                g.remove();
            }
        }
    }

    /// How many times the kernel has killed this service's processes for memory.
    pub fn oom_kills(&self) -> u64 {
        match self.spec.limits.memory {
            Some(_) => crate::cgroup::Group::locate(&self.cgroup_name(), &self.spec.limits)
                .map_or(0, |g| g.oom_kills()),
            None => 0,
        }
    }

    /// The environment that marks the process as this service's.
    pub fn marker_env(&self) -> [(&'static str, String); 2] {
        [
            (MARKER, self.marker.clone()),
            (MARKER_VERSION, self.version.to_string()),
        ]
    }
}

/// Where a built-in service's output goes.
#[derive(Debug, Clone)]
pub struct LogSink {
    /// The agent binary, run as `log-relay` between the service and its log file (stamps and
    /// rotates lines); `None`: the service appends to the file itself.
    pub relay: Option<PathBuf>,
    pub policy: crate::logs::LogPolicy,
}

/// A live process carrying an app's marker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Marked {
    pub pid: u32,
    /// `None` for a process started by an agent older than [`MARKER_VERSION`].
    pub version: Option<String>,
}

/// A service process: our child, one adopted from a previous run of the agent, or the main
/// process of a systemd unit.
#[derive(Debug)]
pub enum Proc {
    Child(Child),
    Adopted(u32),
    Unit { unit: String, pid: u32 },
}

/// Who starts and stops service processes.
#[derive(Debug, Clone)]
pub enum Launcher {
    /// The agent itself (devices without systemd), output to the app's log file.
    Builtin(LogSink),
    /// systemd, through a hardened `muscle-<app>.service` unit written to `unit_dir`.
    Systemd {
        unit_dir: PathBuf,
        user: Option<String>,
    },
}

impl Launcher {
    /// Starts one process of `launch`.
    pub fn launch(&self, launch: &Launch) -> Result<Proc> {
        match self {
            Launcher::Builtin(sink) => Ok(Proc::Child(spawn(launch, sink)?)),
            Launcher::Systemd { unit_dir, user } => {
                crate::systemd::start(unit_dir, launch, user.as_deref())
            }
        }
    }

    /// A running service process found at start-up, taken over without restarting it.
    pub fn adopt(&self, app: &str, pid: u32) -> Proc {
        match self {
            Launcher::Builtin(_) => Proc::Adopted(pid),
            Launcher::Systemd { .. } => Proc::Unit {
                unit: crate::systemd::unit_name(app),
                pid,
            },
        }
    }
}

impl Proc {
    pub fn pid(&self) -> u32 {
        match self {
            Proc::Child(c) => c.id(),
            Proc::Adopted(pid) | Proc::Unit { pid, .. } => *pid,
        }
    }

    /// `None` while running; otherwise how it ended.
    pub fn exited(&mut self) -> Option<String> {
        match self {
            Proc::Child(c) => match c.try_wait() {
                Ok(Some(status)) => Some(status.to_string()),
                Ok(None) => None,
                Err(e) => Some(format!("cannot wait: {e}")),
            },
            Proc::Adopted(pid) => {
                // After a self-update's exec, adopted services are still our children: reap
                // them (for anyone else's process this is a harmless ECHILD).
                let mut status = 0;
                // SAFETY: waitpid on a pid with WNOHANG only reads the status into `status`.
                unsafe { libc::waitpid(*pid as libc::pid_t, &mut status, libc::WNOHANG) };
                (!is_alive(*pid)).then(|| "exited".to_owned())
            }
            Proc::Unit { unit, pid } => {
                if is_alive(*pid) {
                    return None;
                }
                // systemd may already have restarted it (Restart=always): follow the new process.
                match crate::systemd::main_pid(unit) {
                    Some(new) if new != *pid && is_alive(new) => {
                        *pid = new;
                        None
                    }
                    _ if crate::systemd::oom_killed(unit) => {
                        Some(format!("{OOM_KILLED} (unit {unit})"))
                    }
                    _ => Some(format!("exited (unit {unit})")),
                }
            }
        }
    }

    /// Sends `signal`, waits up to `grace`, then SIGKILLs. Returns once the process is gone.
    /// A unit is stopped through systemd, which applies the same signal and grace.
    pub fn stop(&mut self, signal: i32, grace: Duration) {
        if let Proc::Unit { unit, .. } = self {
            if let Err(e) = crate::systemd::stop(unit) {
                say!("{e:#}");
            }
        }
        let pid = self.pid();
        signal_pid(pid, signal);
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if self.exited().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        signal_pid(pid, libc::SIGKILL);
        while self.exited().is_none() {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// Starts `launch.binary` under its spec, its output to its log through `sink`, marked.
pub fn spawn(launch: &Launch, sink: &LogSink) -> Result<Child> {
    let (binary, spec) = (&launch.binary, &launch.spec);
    let relayed = sink.relay.as_ref().map(|relay| {
        start_relay(relay, launch, &sink.policy).inspect_err(|e| {
            say!("{}: {e:#}; the service writes its log itself", launch.app);
        })
    });
    let out: OwnedFd = match relayed {
        Some(Ok(pipe)) => pipe.into(),
        // No relay (its binary was replaced or removed): the service still starts.
        _ => logs::open_append(&launch.log)?.into(),
    };
    let err = out.try_clone()?;
    let mut cmd = Command::new(binary);
    for secret in muscle_protocol::AGENT_ONLY_ENV {
        cmd.env_remove(secret);
    }
    cmd.args(&spec.args)
        .envs(&spec.env)
        .envs(launch.marker_env())
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err);
    // Its own session (isolation.rs): a Ctrl-C meant for the agent does not reach the service,
    // nor can it type into the agent's terminal.
    match &spec.working_dir {
        Some(dir) => cmd.current_dir(dir),
        None => cmd.current_dir(binary.parent().unwrap_or(Path::new("/"))),
    };
    if !spec.limits.is_none() {
        let group = crate::cgroup::Group::locate(&launch.cgroup_name(), &spec.limits)?;
        group.create(&spec.limits)?;
        let procs = group.procs_files()?;
        // SAFETY: between fork and exec the child only writes "0" (itself) to file descriptors
        // opened before the fork: write(2) is async-signal-safe; nothing allocates or locks.
        unsafe {
            cmd.pre_exec(move || {
                for file in &procs {
                    use std::os::fd::AsRawFd;
                    if libc::write(file.as_raw_fd(), b"0".as_ptr().cast(), 1) != 1 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
    }
    crate::isolation::Isolation::prepare(spec, binary)?.apply(&mut cmd);
    cmd.spawn().with_context(|| {
        format!(
            "cannot start {} (in its sandbox: user, private /tmp, no new privileges)",
            binary.display()
        )
    })
}

/// Starts the log relay of `launch` and returns the end of the pipe the service writes to. The
/// relay detaches (its starter exits at once, so it is nobody's child to reap) and lives until
/// the service and all its children have closed their output, however often the agent restarts.
fn start_relay(relay: &Path, launch: &Launch, policy: &logs::LogPolicy) -> Result<PipeWriter> {
    let (reader, writer) = std::io::pipe()?;
    let status = Command::new(relay)
        .arg("log-relay")
        .arg("--file")
        .arg(&launch.log)
        .arg("--max-bytes")
        .arg(policy.max_bytes.to_string())
        .arg("--keep")
        .arg(policy.keep.to_string())
        .arg("--version")
        .arg(launch.version.as_str())
        .arg("--detach")
        .stdin(reader)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .status()
        .with_context(|| format!("cannot start the log relay {}", relay.display()))?;
    anyhow::ensure!(
        status.success(),
        "the log relay {} failed: {status}",
        relay.display()
    );
    Ok(writer)
}

pub fn signal_pid(pid: u32, signal: i32) {
    // SAFETY: kill(2) has no memory effects; a stale pid yields ESRCH, which we ignore.
    unsafe {
        libc::kill(pid as libc::pid_t, signal);
    }
}

/// Whether our child `pid` has exited, without reaping it (its pid stays its own until then).
pub fn has_exited(pid: u32) -> std::io::Result<bool> {
    // SAFETY: waitid writes only into `info`, which lives on this stack frame.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    let rc = unsafe {
        libc::waitid(
            libc::P_PID,
            pid as libc::id_t,
            &mut info,
            libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
        )
    };
    if rc == -1 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: with WNOHANG and no state change, waitid leaves si_pid zero.
    Ok(unsafe { info.si_pid() } != 0)
}

/// Signals every process in the group `pgid` leads.
pub fn signal_pid_group(pgid: u32, signal: i32) {
    // SAFETY: kill(2) with a negative pid signals a process group; no memory effects.
    unsafe {
        libc::kill(-(pgid as libc::pid_t), signal);
    }
}

/// Running and not a zombie.
pub fn is_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state is the first field after the parenthesised command name.
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| !rest.trim_start().starts_with(['Z', 'X'])),
        Err(_) => false,
    }
}

/// The live processes whose environment carries `MARKER=marker`, with the version they run:
/// only the roots, not the workers a service forked (they inherit its environment).
pub fn find_marked(marker: &str) -> Vec<Marked> {
    let all = find_marked_all(marker);
    let pids: std::collections::BTreeSet<u32> = all.iter().map(|m| m.pid).collect();
    all.into_iter()
        .filter(|m| parent(m.pid).is_none_or(|ppid| !pids.contains(&ppid)))
        .collect()
}

/// The parent of `pid`, from `/proc/<pid>/stat`.
fn parent(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // After the parenthesised command name: state, then ppid.
    stat.rsplit_once(')')?
        .1
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

fn find_marked_all(marker: &str) -> Vec<Marked> {
    let needle = format!("{MARKER}={marker}");
    let version_prefix = format!("{MARKER_VERSION}=");
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return vec![];
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| *pid != std::process::id())
        .filter_map(|pid| {
            let env = std::fs::read(format!("/proc/{pid}/environ")).ok()?;
            let mut vars = env.split(|b| *b == 0);
            vars.clone()
                .any(|var| var == needle.as_bytes())
                .then(|| Marked {
                    pid,
                    version: vars.find_map(|var| {
                        let value = var.strip_prefix(version_prefix.as_bytes())?;
                        String::from_utf8(value.to_vec()).ok()
                    }),
                })
        })
        .filter(|m| is_alive(m.pid))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_root_of_a_marked_process_tree_is_found() {
        let marker = format!("/tmp/muscle-marked-{}", std::process::id());
        // A service that forks a worker: both carry the marker.
        let mut child = Command::new("/bin/sh")
            .args(["-c", "sleep 60 & wait"])
            .env(MARKER, &marker)
            .env(MARKER_VERSION, "1.2.3")
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while find_marked_all(&marker).len() < 2 {
            assert!(Instant::now() < deadline, "the worker never started");
            std::thread::sleep(Duration::from_millis(20));
        }
        let found = find_marked(&marker);
        assert_eq!(
            found,
            [Marked {
                pid: child.id(),
                version: Some("1.2.3".into())
            }]
        );
        let workers: Vec<u32> = find_marked_all(&marker)
            .into_iter()
            .map(|m| m.pid)
            .filter(|p| *p != child.id())
            .collect();
        for pid in workers {
            signal_pid(pid, libc::SIGKILL);
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}
